"""``compile: true``: torch.compile of the model, checked against eager on the CPU.

The neuron custom ops trace without graph breaks; the first training step of compiled and eager
``digits_snn`` agrees; a compiled run's checkpoint has the plain state_dict keys and an eager run
resumes it.
"""
import copy

import pytest
import torch

import tetsnn
from tetsnn.engine.checkpoint import load_checkpoint, load_trained_model
from tetsnn.engine.config import ConfigError, load_config, resolve
from tetsnn.engine.train import build_model, compile_model, main, resolve_run_config

from conftest import QUICK


@pytest.fixture(autouse=True)
def one_compile_thread():
    """Inductor compiles in this process: on 2 cores a pool of compile workers (each importing
    torch) costs more than it saves."""
    from torch._inductor import config

    with config.patch(compile_threads=1):
        yield


def digits_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 3, torch.randint(0, 10, (n,), generator=g)


def test_digits_snn_training_step_has_no_graph_breaks():
    torch.manual_seed(0)
    model = tetsnn.create_model("digits_snn", T=4).train()
    x, y = digits_batch()
    explained = torch._dynamo.explain(lambda x, y: tetsnn.tet_loss(model(x), y))(x, y)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "tetsnn.lif_forward.default" in ops    # the neuron stays one custom op in the graph


def test_memory_min_traces_without_graph_breaks():
    """``memory: min`` with ``compile: true``: the graph is traced as in the default mode (the same ops,
    one graph)."""
    torch.manual_seed(0)
    model = tetsnn.create_model("digits_snn", T=4, memory="min").train()
    x, y = digits_batch(8)
    explained = torch._dynamo.explain(lambda x, y: tetsnn.tet_loss(model(x), y))(x, y)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_first_step_matches_eager():
    cfg = resolve({**load_config("digits"), "compile": True})
    torch.manual_seed(0)
    eager = build_model(cfg).train()
    compiled = compile_model(cfg, copy.deepcopy(eager))
    assert compile_model({**cfg, "compile": False}, eager) is eager and eager._compiled_call_impl is None
    x, y = digits_batch(cfg["batch_size"])   # a full batch of the default run
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        loss = tetsnn.tet_loss(model(x), y)
        loss.backward()
        results[name] = loss.detach(), {k: p.grad for k, p in model.named_parameters()}
    (le, ge), (lc, gc) = results["eager"], results["compiled"]
    torch.testing.assert_close(lc, le, rtol=0, atol=1e-5)
    assert ge.keys() == gc.keys() and all(g.abs().sum() > 0 for g in ge.values())
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=0, atol=1e-5, msg=k)
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.slow
def test_compiled_run_checkpoint_is_plain_and_resumes_eager(tmp_path):
    out = tmp_path / "run"
    assert main(QUICK + ["--limit-train", "128", "--epochs", "1", "--compile", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["compile"] is True
    assert not [k for k in ckpt["model"] if "_orig_mod" in k]
    cfg, model, _ = load_trained_model(out / "last.pt")   # an eager model takes the weights as they are
    assert model._compiled_call_impl is None
    assert resolve_run_config(["--resume", str(out), "--compile", "false"])["compile"] is False
    assert main(["--resume", str(out), "--epochs", "2", "--compile", "false"]) == 0   # may differ on resume
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_compile_flag_is_a_boolean():
    with pytest.raises(ConfigError, match="compile"):
        resolve({**load_config("digits"), "compile": "yes"})
