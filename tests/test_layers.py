import pytest
import torch
from torch import nn

import tetsnn
from tetsnn import Layer, SeqToANNContainer, add_time_dim, to_batch_first, to_time_first


def test_add_time_dim_copies():
    x = torch.randn(3, 2, 4, 4)
    y = add_time_dim(x, 5)
    assert y.shape == (3, 5, 2, 4, 4)
    for t in range(5):
        assert torch.equal(y[:, t], x)
    y.add_(1)
    assert not torch.equal(y[:, 0], x)  # the caller's tensor is untouched
    with pytest.raises(ValueError, match="T must be an integer >= 1, got 0"):
        add_time_dim(x, 0)


def test_layout_converters_round_trip():
    x = torch.randn(2, 3, 4, 5)
    tf = to_time_first(x)
    assert tf.shape == (3, 2, 4, 5) and tf.is_contiguous()
    assert torch.equal(tf[1, 0], x[0, 1])
    assert torch.equal(to_batch_first(tf), x)
    with pytest.raises(ValueError):
        to_time_first(torch.zeros(3))


def test_seq_container_equals_per_step_application():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    c = SeqToANNContainer(conv)
    x = torch.randn(4, 3, 2, 5, 5)
    y = c(x)
    for t in range(3):
        torch.testing.assert_close(y[:, t], conv(x[:, t]))


def test_seq_container_batchnorm_pools_batch_and_time():
    bn = nn.BatchNorm2d(2)
    c = SeqToANNContainer(bn)
    x = torch.randn(4, 3, 2, 5, 5) * 3 + 1
    c(x)
    flat = x.transpose(0, 2).reshape(2, -1)  # channel-major over N, T, H, W
    torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(1))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * flat.var(1, unbiased=True))


def test_layer_is_conv_bn_lif():
    torch.manual_seed(0)
    layer = Layer(2, 4).eval()
    conv, bn = layer.fwd.module[0], layer.fwd.module[1]
    assert conv.bias is not None and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    x = torch.randn(2, 3, 2, 6, 6)
    h = torch.stack([bn(conv(x[:, t])) for t in range(3)], 1)
    assert torch.equal(layer(x), tetsnn.LIF()(h))
