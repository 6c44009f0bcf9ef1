import pytest
import torch
import torch.nn.functional as F

from tetsnn import sdt_loss, tet_loss


def tet_loop(out, y, lamb, means):
    T = out.shape[1]
    ce = 0
    for t in range(T):
        ce = ce + F.cross_entropy(out[:, t], y)
    ce = ce / T
    mse = ((out - means) ** 2).sum() / out.numel()
    return (1 - lamb) * ce + lamb * mse


@pytest.mark.parametrize("lamb", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("means", [1.0, 0.3])
def test_tet_loss_matches_loop(lamb, means):
    g = torch.Generator().manual_seed(int(lamb * 1000) + int(means * 10))
    out = torch.randn(6, 4, 5, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    a = out.clone().requires_grad_()
    b = out.clone().requires_grad_()
    la, lb = tet_loss(a, y, lamb=lamb, means=means), tet_loop(b, y, lamb, means)
    torch.testing.assert_close(la.double(), lb, rtol=1e-6, atol=1e-7)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_tet_gradient_is_per_step_softmax():
    out = torch.randn(3, 4, 6, requires_grad=True)
    y = torch.tensor([0, 5, 2])
    tet_loss(out, y).backward()
    N, T = 3, 4
    expect = (torch.softmax(out.detach(), -1) - F.one_hot(y, 6)[:, None]) / (N * T)
    torch.testing.assert_close(out.grad, expect)


def test_sdt_loss_is_ce_of_mean():
    out = torch.randn(5, 3, 7, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    ref = F.cross_entropy(out.mean(1), y)
    torch.testing.assert_close(sdt_loss(out, y), ref)
    sdt_loss(out, y).backward()
    expect = (torch.softmax(out.detach().mean(1), -1) - F.one_hot(y, 7)) / 5 / 3
    torch.testing.assert_close(out.grad, expect[:, None].expand(-1, 3, -1))


def test_loss_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, T, C\], got shape \(4, 10\)"):
        tet_loss(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target has 3 samples"):
        sdt_loss(torch.zeros(4, 2, 10), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("loss", [tet_loss, lambda o, y: tet_loss(o, y, lamb=0.3, means=0.8), sdt_loss])
def test_losses_keep_float64_and_pass_gradcheck(loss):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2])
    assert loss(out, y).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda o: loss(o, y), (out,))
    assert loss(out.detach().bfloat16(), y).dtype == torch.float32  # half logits are upcast
    assert loss(out.detach().float(), y).dtype == torch.float32


@pytest.mark.parametrize("loss", [tet_loss, lambda o, y: tet_loss(o, y, lamb=0.3), sdt_loss])
def test_relu_twin_plus_loss_passes_gradcheck(loss):
    """A float64 ANN twin and the loss, end to end (a spiking model's surrogate is not the Heaviside's
    derivative, so only its ReLU twin can pass)."""
    from tetsnn import create_model
    torch.manual_seed(0)
    model = create_model("digits_snn", T=2, neuron="relu").double().train()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, 7])
    assert torch.autograd.gradcheck(lambda v: loss(model(v), y), (x,), atol=1e-6, fast_mode=True)


def _soft_ce(logits, p, eps):
    """Cross-entropy against soft targets, written out: -sum_c q_c log softmax(z)_c, q smoothed."""
    q = p * (1 - eps) + eps / logits.shape[-1]
    return -(q * torch.log_softmax(logits, -1)).sum(-1).mean()


def _soft_targets(g, n, c):
    return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 3, -1)


@pytest.mark.parametrize("lamb, eps", [(0.0, 0.0), (1e-3, 0.1), (0.5, 0.3)])
def test_tet_loss_soft_targets_match_per_step_loop(lamb, eps):
    g = torch.Generator().manual_seed(7)
    out = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    p = _soft_targets(g, 5, 4)
    a, b = out.clone().requires_grad_(), out.clone().requires_grad_()
    la = tet_loss(a, p, lamb=lamb, means=0.7, label_smoothing=eps)
    lb = sum(_soft_ce(b[:, t], p, eps) for t in range(3)) / 3
    lb = (1 - lamb) * lb + lamb * ((b - 0.7) ** 2).mean()
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda o: tet_loss(o, p, lamb=lamb, means=0.7, label_smoothing=eps),
                                    (out.clone().requires_grad_(),))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sdt_loss_soft_targets_match_reference_and_gradcheck(eps):
    g = torch.Generator().manual_seed(8)
    out = torch.randn(4, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = _soft_targets(g, 4, 6)
    torch.testing.assert_close(sdt_loss(out, p, label_smoothing=eps), _soft_ce(out.mean(1), p, eps),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda o: sdt_loss(o, p, label_smoothing=eps), (out,))


@pytest.mark.parametrize("loss", [tet_loss, sdt_loss])
def test_one_hot_soft_targets_equal_hard_labels(loss):
    g = torch.Generator().manual_seed(9)
    out = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    hot = F.one_hot(y, 5).double()
    torch.testing.assert_close(loss(out, hot), loss(out, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss(out, hot, label_smoothing=0.1), loss(out, y, label_smoothing=0.1),
                               rtol=1e-12, atol=1e-12)
    assert loss(out.bfloat16(), hot.float()).dtype == torch.float32    # soft targets follow the logits


def test_hard_labels_unchanged_by_the_soft_target_path():
    """The default (hard labels, no smoothing) is the plain cross_entropy call, bit for bit."""
    g = torch.Generator().manual_seed(10)
    out = torch.randn(8, 4, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(tet_loss(out, y), F.cross_entropy(out.reshape(32, 10), y.repeat_interleave(4)))
    assert torch.equal(sdt_loss(out, y), F.cross_entropy(out.mean(1), y))


def test_loss_rejects_bad_soft_targets():
    with pytest.raises(ValueError, match="soft targets must be float"):
        tet_loss(torch.zeros(4, 2, 10), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="soft targets must be float"):
        sdt_loss(torch.zeros(4, 2, 10), torch.zeros(4, 10, dtype=torch.long))
