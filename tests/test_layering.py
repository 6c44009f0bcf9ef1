"""The code's layering: the library never imports the training engine, and no module imports
itself back through others (checked on the source, so a lazy import inside a function counts too)."""
import ast
from pathlib import Path

import tetsnn

SRC = Path(tetsnn.__file__).parent
ENGINE_ALIASES = {"tetsnn.train", "tetsnn.evaluate", "tetsnn.config", "tetsnn.checkpoint", "tetsnn.distributed"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every tetsnn module a file imports, as absolute dotted names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("tetsnn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("tetsnn"):
                yield mod
                yield from (f"{mod}.{a.name}" for a in node.names)   # "from . import analysis"


def _files():
    return sorted(SRC.rglob("*.py"))


def _known():
    return {_module_name(p) for p in _files()}


def test_the_library_never_imports_the_engine():
    top = {"tetsnn", "tetsnn.cli", "tetsnn.__main__"}   # the public API and the command line sit above both
    bad = []
    for path in _files():
        name = _module_name(path)
        if name in top or name.startswith("tetsnn.engine"):
            continue
        for mod in _imports(path):
            if mod.startswith("tetsnn.engine") or mod in ENGINE_ALIASES or mod == "tetsnn.data.build_data":
                bad.append(f"{name} imports {mod}")
    assert not bad, bad
    assert (SRC / "engine" / "train.py").is_file()


def test_no_import_cycles():
    known = _known()
    graph = {}
    for path in _files():
        name = _module_name(path)
        if path.name == "__init__.py" or name == "tetsnn.__main__":
            continue    # a package's __init__ only gathers its modules
        graph[name] = {m for m in _imports(path) if m in known and m != name
                       and not (SRC.parent / m.replace(".", "/") / "__init__.py").exists()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
    assert "tetsnn.engine.train" in graph and "tetsnn.engine.evaluate" in graph["tetsnn.engine.train"]


def test_engine_modules_keep_their_short_names():
    import tetsnn.checkpoint
    import tetsnn.config
    import tetsnn.distributed
    import tetsnn.engine
    import tetsnn.train
    from tetsnn.evaluate import main as test_main

    assert tetsnn.train is tetsnn.engine.train
    assert tetsnn.config is tetsnn.engine.config and tetsnn.checkpoint is tetsnn.engine.checkpoint
    assert tetsnn.distributed is tetsnn.engine.distributed
    assert test_main is tetsnn.engine.evaluate.main
    assert tetsnn.data.build_data is tetsnn.engine.data.build_data
