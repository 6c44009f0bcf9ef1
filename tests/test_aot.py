"""Ahead-of-time compilation of every Triton kernel to GPU code (cubin for sm_80 and sm_90), on a
machine without a GPU, with the ptxas that the triton wheel bundles.

Each module of ``tetsnn.kernels`` that launches Triton kernels declares ``AOT_VARIANTS``: a list of
``(kernel, signature, constexprs)``, every combination its Python side can launch. The interpreter
(``TRITON_INTERPRET=1``, used by the other kernel tests) accepts code the compiler rejects, so this
compiles each declared variant for real: every one for sm_90 (H100, H200), and for sm_80 a subset in
which every pair of settings of a kernel (two constexprs, or one and the argument types) that some
variant combines appears together (:func:`pairwise`). The compiler needs the kernels as ``triton.jit``
objects, not the interpreter's, so compiling runs in fresh processes without ``TRITON_INTERPRET`` (two,
in parallel, each with an empty cache, splitting the work).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def kernel_modules():
    """Every module of tetsnn.kernels, imported (new modules are found without being listed)."""
    import tetsnn.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def declared_variants():
    """``[(module name, kernel, signature, constexprs)]`` over every kernel module."""
    return [(mod.__name__, *variant) for mod in kernel_modules() for variant in getattr(mod, "AOT_VARIANTS", ())]


def is_triton_kernel(obj) -> bool:
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:   # pragma: no cover - older layouts
        InterpretedFunction = ()
    return isinstance(obj, (JITFunction, InterpretedFunction))


def launched_names(source: str) -> set:
    """Names ``k`` of every ``k[grid](...)`` or ``mod.k[grid](...)`` call in Python source."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            if isinstance(target, ast.Name):
                names.add(target.id)
            elif isinstance(target, ast.Attribute):
                names.add(target.attr)
    return names


def undeclared_launches(modules, sources, declared) -> list:
    """``module.kernel`` of every triton kernel defined in ``modules`` that some source launches
    from Python but no ``AOT_VARIANTS`` declares (kernels called only from kernels need none)."""
    launched = set().union(*(launched_names(s) for s in sources))
    declared_ids = {id(k) for k in declared}
    return sorted(f"{mod.__name__}.{name}" for mod in modules for name, obj in vars(mod).items()
                  if is_triton_kernel(obj) and name in launched and id(obj) not in declared_ids)


def _settings(signature, constexprs) -> list:
    return [("types", repr(sorted(signature.items())))] + [(k, repr(v)) for k, v in sorted(constexprs.items())]


def pairwise(variants) -> list:
    """Indices into ``variants`` (``(module, kernel, signature, constexprs)``) of a subset that holds, for
    each kernel, every pair of settings that some variant of it holds; chosen greedily, in order."""
    wanted, chosen = {}, []
    for i, (module, kernel, signature, constexprs) in enumerate(variants):
        items = _settings(signature, constexprs)
        wanted[i] = {(id(kernel), a, b) for j, a in enumerate(items) for b in items[j + 1:]}
    left = set().union(*wanted.values())
    while left:
        best = max(wanted, key=lambda i: (len(wanted[i] & left), -i))
        chosen.append(best)
        left -= wanted[best]
    return sorted(chosen)


def jobs() -> list:
    """``(arch, variant index)`` of every compile: all variants for sm_90, the pairwise ones for sm_80."""
    variants = declared_variants()
    return [(90, i) for i in range(len(variants))] + [(80, i) for i in pairwise(variants)]


def compile_variants(worker: int, workers: int) -> list:
    """Compile this worker's share of :func:`jobs`; returns ``[(arch, kernel, constexprs, error)]``."""
    import triton
    from triton.backends.compiler import GPUTarget

    variants = declared_variants()
    failures = []
    for arch, i in jobs()[worker::workers]:
        module, kernel, signature, constexprs = variants[i]
        target = GPUTarget("cuda", arch, 32)
        name = f"{module}.{kernel.__name__}"
        try:
            compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target)
            assert compiled.asm.get("cubin"), "no cubin produced"
        except Exception as e:  # the compiler's own message is the useful part
            failures.append((arch, name, repr(constexprs), f"{type(e).__name__}: {e}"))
    return failures


# --------------------------------------------------------------------------- tests

# triton is imported only inside the tests: other test modules switch its interpreter on at
# collection, which must come before triton's first import in the process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _bundled_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception:
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


WORKERS = 2


@pytest.mark.slow
def test_every_declared_variant_compiles_for_sm80_and_sm90(tmp_path):
    if _bundled_ptxas() is None:
        pytest.skip("the triton wheel's ptxas is not there")
    variants = declared_variants()
    assert len(variants) >= 32       # the Triton LIF alone: 8 forward + 24 backward variants
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, __file__, str(w), str(WORKERS)], text=True,
                              env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"cache{w}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in range(WORKERS)]
    failures = []
    for w, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)   # a few hundred variants on a busy 2-core machine
        assert proc.returncode == 0, f"compile worker {w} crashed:\n{err[-3000:]}"
        failures += [f"sm_{arch} {name} {consts}: {msg}" for arch, name, consts, msg in json.loads(out.splitlines()[-1])]
    assert not failures, "\n\n".join(failures)


def test_the_sm80_subset_holds_every_pair_of_settings():
    variants = declared_variants()
    chosen = pairwise(variants)
    assert len(set(chosen)) == len(chosen) < len(variants)
    for i, (_, kernel, signature, constexprs) in enumerate(variants):
        items = _settings(signature, constexprs)
        for j, a in enumerate(items):
            for b in items[j + 1:]:
                assert any(variants[c][1] is kernel and {a, b} <= set(_settings(*variants[c][2:])) for c in chosen)
    # every kernel in it, and every sm_90 compile besides
    assert {id(variants[c][1]) for c in chosen} == {id(v[1]) for v in variants}
    assert sorted(i for arch, i in jobs() if arch == 90) == list(range(len(variants)))


def test_every_launched_kernel_is_declared():
    import tetsnn

    root = Path(tetsnn.__file__).parent
    sources = [p.read_text() for p in sorted(root.rglob("*.py"))]
    modules = kernel_modules()
    declared = [k for _, k, _, _ in declared_variants()]
    assert undeclared_launches(modules, sources, declared) == []
    # the check itself: the LIF forward kernel is launched from Python, the surrogate is not
    from tetsnn.kernels import triton_lif

    assert {"_integrate", "_lif_bwd"} <= set().union(*map(launched_names, sources))
    assert "_surrogate" not in set().union(*map(launched_names, sources))
    without = [k for k in declared if k is not triton_lif._integrate]
    assert undeclared_launches(modules, sources, without) == ["tetsnn.kernels.triton_lif._integrate"]


def test_signatures_name_every_argument():
    for module, kernel, signature, constexprs in declared_variants():
        assert list(signature) == kernel.arg_names, f"{module}.{kernel.__name__}"
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs), f"{module}.{kernel.__name__}"


if __name__ == "__main__":   # compile worker W of N: prints the failures of its share of the jobs as JSON
    print(json.dumps(compile_variants(int(sys.argv[1]), int(sys.argv[2]))))
