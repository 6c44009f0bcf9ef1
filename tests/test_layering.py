"""The code's layering: the library never imports the training engine, and no module imports
itself back through others (checked on the source, so a lazy import inside a function counts too)."""
import ast
from pathlib import Path

import tetsnn

SRC = Path(tetsnn.__file__).parent


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
            if mod.startswith("tetsnn.engine"):
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


def test_package_root_has_no_engine_aliases():
    """``tetsnn.train`` and the other engine modules' short names are not defined in any import
    style; the engine modules live under tetsnn.engine and the public functions keep their names."""
    import importlib

    import pytest

    import tetsnn.engine.evaluate
    import tetsnn.engine.train

    for name in ("train", "evaluate", "config", "checkpoint", "distributed"):
        assert not hasattr(tetsnn, name), name
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"tetsnn.{name}")
        with pytest.raises(ImportError):
            exec(f"from tetsnn import {name}", {})
    assert tetsnn.evaluate_model is tetsnn.engine.evaluate.evaluate
    assert callable(tetsnn.engine.evaluate.main) and callable(tetsnn.engine.train.main)
    assert tetsnn.build_data is tetsnn.engine.data.build_data
    assert not hasattr(tetsnn.data, "build_data")   # the library package holds no engine function
    assert {"load_checkpoint", "load_config", "build_data", "build_model", "evaluate_model"} <= set(tetsnn.__all__)
    assert all(hasattr(tetsnn, name) for name in tetsnn.__all__)
