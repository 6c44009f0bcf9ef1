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
