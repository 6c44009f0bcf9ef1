"""The checked bit planes of spike counts (``pack_counts`` / ``unpack_counts``, and ``pack_levels`` /
``unpack_levels`` built on them) against the plain per-plane reference, with numba and torch ops."""
import pytest
import torch

from tetsnn.compact import pack_levels, pack_spikes, unpack_levels
from tetsnn.kernels import levels as levels_mod
from tetsnn.kernels import ops


@pytest.fixture(params=["numba", "torch"])
def kernels(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(levels_mod, "numba_applies", lambda t: False)
        monkeypatch.setattr(ops, "_cpu_fast", lambda t: False)
    return request.param


def reference_planes(x, levels):
    """One pack_spikes per bit b of the integer counts: the obvious definition."""
    xi = x.to(torch.int64)
    return torch.stack([pack_spikes(((xi >> b) & 1).to(x.dtype)) for b in range(max(1, levels.bit_length()))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("n", [1, 7, 8, 63, 4097, 9001])
def test_planes_match_the_reference_and_rebuild_the_counts(kernels, dtype, levels, n):
    g = torch.Generator().manual_seed(n + levels)
    x = torch.randint(0, levels + 1, (n,), generator=g).to(dtype)
    planes = levels_mod.pack_counts(x, levels)
    assert planes.dtype == torch.uint8 and planes.shape == (max(1, levels.bit_length()), (n + 7) // 8)
    assert torch.equal(planes, reference_planes(x, levels))
    assert torch.equal(levels_mod.unpack_counts(planes, [n], dtype), x)
    y = x.view(1, n)   # pack_levels / unpack_levels: the tuple of planes of any shape
    got = unpack_levels(pack_levels(y, levels), list(y.shape), dtype)
    assert got.dtype == dtype and torch.equal(got, y)


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("bad", [0.5, -1.0, 5.0, float("nan"), float("inf"), -0.25])
def test_a_value_that_is_no_count_raises_naming_it(kernels, levels, bad):
    x = torch.randint(0, levels + 1, (3, 5000), generator=torch.Generator().manual_seed(1)).float()
    x[2, 4321] = bad
    with pytest.raises(ValueError, match=r"spikes=True\) got the value") as info:
        levels_mod.pack_counts(x, levels)
    assert "\n" not in str(info.value)
    assert f"{bad:g}" in str(info.value)


def test_strided_input_packs_its_values_in_logical_order(kernels):
    x = torch.randint(0, 4, (6, 40), generator=torch.Generator().manual_seed(2)).float()
    t = x.t()   # not contiguous
    assert torch.equal(levels_mod.pack_counts(t, 3), reference_planes(t.contiguous(), 3))


def test_unpack_reads_the_planes_in_place_or_from_copies():
    x = torch.randint(0, 6, (4, 300), generator=torch.Generator().manual_seed(3)).float()
    planes = pack_levels(x, 5)
    assert len(planes) == 3 and all(p._base is planes[0]._base for p in planes)
    assert torch.equal(unpack_levels(planes, list(x.shape), x.dtype), x)
    copies = tuple(p.clone() for p in planes)   # separate tensors (as a caller may keep them)
    assert torch.equal(unpack_levels(copies, list(x.shape), x.dtype), x)


def test_unchecked_planes_are_the_checked_ones_without_the_check(kernels):
    # checked=False (what torch.compile traces): the per-plane torch ops, the same planes, no error
    x = torch.randint(0, 6, (5, 333), generator=torch.Generator().manual_seed(4)).float()
    planes = levels_mod.pack_counts(x, 5, checked=False)
    assert torch.equal(planes, levels_mod.pack_counts(x, 5)) and torch.equal(planes, reference_planes(x, 5))
    x[1, 7] = 0.5
    levels_mod.pack_counts(x, 5, checked=False)
