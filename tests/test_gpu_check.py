"""benchmarks/gpu_check.py cannot rot: its dry run (every section on the CPU at tiny sizes) passes,
its JSON renders into docs/performance.md's format, and a planted mismatch fails the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton kernels built in this process run on the CPU

import pytest  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SRC = BENCH.parent / "src"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    return res, out


@pytest.mark.slow
def test_dry_run_passes_every_section(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["versions"]["torch"]
    assert set(result["sections"]) == set(gpu_check.ORDER)
    for name, s in result["sections"].items():
        assert s["status"] == "ok", (name, s)
        assert s["figures"], name
    corr = result["sections"]["correctness"]
    assert corr["figures"]["LIF cases against the loop"] == 2 * 3 * 2 * 2 * 2 * 3   # backends, dtypes, T, flags
    assert corr["figures"]["mismatches"] == 0
    goals = [g for s in result["sections"].values() for g in s["goals"]]
    assert {g["verdict"] for g in goals} <= {"meets", "misses"}
    measures = " ".join(g["measure"] for g in goals)
    for what in ("bandwidth", "time vs ANN", "memory rise in one step vs ANN", "accuracy, amp bf16",
                 "accuracy, amp fp16", "SIGTERM", "batch_transform"):
        assert what in measures, what
    train = result["sections"]["training"]["figures"]
    assert train["resumed vs uninterrupted weights (deterministic algorithms on)"] == "equal"


@pytest.mark.slow
def test_render_rewrites_only_its_own_section(dry_run, tmp_path):
    _, out = dry_run
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n<!-- begin other -->\nkept\n<!-- end other -->\n")
    for _ in range(2):   # a second render replaces the section
        gpu_check.render(out / "gpu_check.json", doc)
    text = doc.read_text()
    assert text.count("<!-- begin gpu_check -->") == 1 and "<!-- begin other -->\nkept\n<!-- end other -->" in text
    assert "dry run on the CPU" in text and "| kernels | Triton LIF forward bandwidth" in text
    for name in gpu_check.ORDER:
        assert f"### {name}: ok" in text


def test_a_mismatch_fails_the_run(tmp_path, monkeypatch):
    from tetsnn.kernels import numba_kernels

    monkeypatch.setitem(numba_kernels.STATE, "numba", numba_kernels.STATE["numba"])   # the dry run switches numba off
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setitem(gpu_check.SIZES["dry"], "lif_T", (2,))
    compare = gpu_check._compare_lif

    def against_another_tau(fast, loop, x, grad):   # the reference now leaks differently
        loop.tau = 0.25
        return compare(fast, loop, x, grad)
    monkeypatch.setattr(gpu_check, "_compare_lif", against_another_tau)
    monkeypatch.setattr(gpu_check, "CORRECTNESS_CASES", (gpu_check.lif_cases,))
    assert gpu_check.main(["--dry-run", "--only", "correctness", "--out", str(tmp_path)]) == 1
    s = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["correctness"]
    assert s["status"] == "failed" and s["mismatch_count"] > 0
    assert "spikes differ" in s["mismatches"][0] or "gradient differs" in s["mismatches"][0]


def test_a_missing_package_skips_its_section_and_a_broken_import_is_an_error(monkeypatch):
    def needs_absent(ctx, sec):
        import tetsnn_absent_package  # noqa: F401

    def broken(ctx, sec):
        from tetsnn.kernels import no_such_module  # noqa: F401
    monkeypatch.setitem(gpu_check.SECTIONS, "kernels", needs_absent)
    monkeypatch.setitem(gpu_check.SECTIONS, "tools", broken)
    skipped = gpu_check.run_section(None, "kernels")
    assert skipped["status"] == "skipped"
    assert skipped["reason"] == "needs the 'tetsnn_absent_package' package, which is not installed"
    assert gpu_check.run_section(None, "tools")["status"] == "error"
