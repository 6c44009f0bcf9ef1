"""``import tetsnn`` on a bare machine: without nir, numba, tensorboard or matplotlib (each is
imported where it is used), checked in a fresh process where importing them fails."""
import subprocess
import sys
import textwrap
from pathlib import Path

OPTIONAL = ("nir", "numba", "tensorboard", "matplotlib")
SRC = Path(__file__).resolve().parents[1] / "src"


def run_without_optional(code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None   # import fails\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": ""})


def test_import_and_train_step_without_optional_packages():
    res = run_without_optional("""
        import warnings
        import torch
        import tetsnn
        from tetsnn import engine
        from tetsnn.engine import train, evaluate, checkpoint, config, export_cli, profile_cli

        model = tetsnn.create_model("digits_snn", T=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tetsnn.tet_loss(model(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
        assert any("numba is not installed" in str(w.message) for w in caught)   # the torch-op kernels ran
        try:
            tetsnn.to_nir(model, (1, 8, 8))
        except ImportError as e:
            print("IMPORT-ERROR:", e)
        for name in ("nir", "numba", "tensorboard", "matplotlib"):
            assert sys.modules[name] is None, name
        print("OK")
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
    assert "IMPORT-ERROR: NIR export and import need the nir package: pip install nir" in res.stdout


def test_export_cli_names_the_missing_package(tmp_path):
    res = run_without_optional(f"""
        import torch
        from tetsnn.engine import checkpoint, config, export_cli

        cfg = config.resolve(config.load_config("digits"))
        ckpt = {{"model": checkpoint.build_model(cfg).state_dict(), "config": cfg}}
        checkpoint.save_checkpoint(ckpt, {str(tmp_path / "last.pt")!r})
        sys.exit(export_cli.main(["--checkpoint", {str(tmp_path / "last.pt")!r}, "--out", {str(tmp_path / "m.nir")!r}]))
    """)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == ["tetsnn export: error: NIR export and import need the nir package: "
                                               "pip install nir"]
    assert not (tmp_path / "m.nir").exists()
