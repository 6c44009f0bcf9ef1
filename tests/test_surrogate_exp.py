"""The float32 sigmoid surrogate of the numba kernels computes exp itself (tetsnn.surrogate._exp32, so that
the kernel loops vectorise): its exp and the derivative against float64 references, over the whole float32
range the kernels can see."""
import math

import numpy as np
import pytest
import torch

from tetsnn import surrogate as S

numba = pytest.importorskip("numba")


@pytest.fixture(scope="module")
def kernels():
    grad = S.numba_surrogate()
    exp32 = numba.njit(S._exp32)

    @numba.njit
    def exps(x, out, one):
        for i in range(x.shape[0]):
            out[i] = exp32(x[i], one)

    @numba.njit
    def grads(v, out, w, one):
        for i in range(v.shape[0]):
            out[i] = grad(v[i], 1, w, w, one - one, one)
    return exps, grads


def ulps(a, b):
    """ulp distance of float32 arrays of equal signs (0 and -0 are one value)."""
    ia, ib = (np.abs(x).view(np.int32).astype(np.int64) for x in (a, b))
    return np.abs(ia - ib)


def sweep(lo_bits=0, hi_bits=0x7F800000, step=2003):
    """Positive float32 values from every 2003rd bit pattern below inf (subnormals to FLT_MAX)."""
    return np.arange(lo_bits, hi_bits, step, dtype=np.uint32).view(np.float32)


def test_exp32_within_one_ulp(kernels):
    exps, _ = kernels
    x = -sweep()
    x = np.concatenate([x[x >= -120], np.float32([0.0, -0.0, -87.33654, -103.97208, -103.98, -104.0, -1e-45])])
    out = np.empty_like(x)
    exps(x, out, np.float32(1))
    exact = np.exp(x.astype(np.float64))
    assert ulps(out, exact.astype(np.float32)).max() <= 1
    normal = exact >= np.finfo(np.float32).tiny
    err = np.abs(out[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
    assert err.max() < 1.0      # below one ulp of the exact value: rounds to one of its two neighbours
    assert (out[x < -104] == 0).all() and out[x == 0][0] == 1
    special = np.float32([-np.inf, np.nan])
    exps(special, out[:2], np.float32(1))
    assert out[0] == 0 and np.isnan(out[1])


@pytest.mark.parametrize("alpha", [4.0, 2.0, 0.5])
def test_float32_sigmoid_surrogate_within_3_ulp_of_float64(kernels, alpha):
    """Every sign and magnitude of v (alpha a power of two, so alpha * v is exact in both dtypes); the
    reference is torch's sigmoid_grad in float64 at -|v| (the derivative is even; at +|v| float64's own
    1 - sig(z) cancels)."""
    _, grads = kernels
    pos = sweep()
    v = np.concatenate([-pos, pos, np.float32([0.0, -0.0, 3.4e38, -3.4e38])])
    out = np.empty_like(v)
    grads(v, out, np.float32(alpha), np.float32(1))
    ref = S.sigmoid_grad(-torch.from_numpy(v).double().abs(), alpha).float().numpy()
    assert ulps(out, ref).max() <= 3
    assert (out > 0).sum() > len(v) // 20            # the sweep covers the support, not only zeros
    # where float32's torch form does not cancel (v <= 0, normal results) both are within 3 ulp of float64
    t32 = S.sigmoid_grad(torch.from_numpy(v), alpha).numpy()
    ok = (v <= 0) & (ref >= np.finfo(np.float32).tiny)
    assert ulps(out[ok], t32[ok]).max() <= 6


def test_float32_sigmoid_surrogate_non_finite_as_torch(kernels):
    _, grads = kernels
    v = np.float32([np.inf, -np.inf, np.nan])
    out = np.empty_like(v)
    grads(v, out, np.float32(4), np.float32(1))
    t32 = S.sigmoid_grad(torch.from_numpy(v), 4.0).numpy()
    np.testing.assert_array_equal(out, t32)      # 0, 0, nan


def test_float64_sigmoid_surrogate_is_the_torch_formula():
    """float64 keeps math.exp and the torch form's operations: bit for bit the scalar Python formula."""
    grad = S.numba_surrogate()

    @numba.njit
    def grads(v, out, w):
        for i in range(v.shape[0]):
            out[i] = grad(v[i], 1, w, w, 0.0, 1.0)
    v = np.random.default_rng(0).standard_normal(10_000) * 5
    out = np.empty_like(v)
    grads(v, out, 4.0)
    ref = np.array([S.numba_sigmoid(4.0 * x, 4.0, 1.0) for x in v])
    assert np.array_equal(out, ref)
    assert math.isclose(out[0], S.sigmoid_grad(torch.tensor(v[0]), 4.0).item(), rel_tol=1e-14)
