"""The numba kernels (CPU, float32 / float64): the neuron recurrence forward and backward, BatchNorm's
output rebuilt inside them, and the bit packing of spikes.

Every kernel reads the constant array of :mod:`tetsnn.neuron.spec` (layout ``C_*``) in the input's
dtype, and its surrogate from :func:`tetsnn.surrogate.numba_grad`. Each operation is the one the
per-step loop's autograd performs, in the same dtype and order (no fast-math, so no fused
multiply-adds), so forward and backward agree with the loop bit for bit wherever none intervenes. The
one exception, BatchNorm's statistics (``bn_stats``), reorders float64 sums only (see its builder).

Kernels are built on first use per configuration key and compiled on their first call; a failed build
or compile makes :func:`call` return False (the caller then runs the torch-op kernels) and marks numba
unusable for the process. A kernel's outer loop hands its work items to all threads (``numba.prange``);
the environment setting ``TETSNN_NUMBA_PARALLEL=0`` compiles the kernels for one thread instead, in
about half the compile time, with the same results (each work item is computed alone either way).
"""
from __future__ import annotations

import os
import warnings

from ..neuron.spec import C_DECAY, C_INPUT, C_K, C_LEVELS, C_ONE, C_THRESHOLD, C_WIDTH, C_ZERO
from ..surrogate import SURROGATE_IDS, numba_surrogate

__all__ = ["available", "module", "call", "kernel", "register", "parallel", "outer_jit", "jobs", "BLOCK",
           "PACK_BLOCK"]

# the numba module once imported (False when numba is unusable); whether outer loops run on all threads
STATE = {"numba": None, "parallel": None}
_KERNELS = {}  # ((kind, *flags), parallel) -> numba kernel
BLOCK = 2048  # neurons per work item
PACK_BLOCK = 4096  # elements per work item of the bit packing (a multiple of 64)


def module():
    """The numba module, or False where it cannot be imported (warns once) or the environment sets
    ``TETSNN_NUMBA=0`` (the torch-op kernels run instead, with no JIT compile at the start)."""
    if STATE["numba"] is None and os.environ.get("TETSNN_NUMBA", "").strip() == "0":
        STATE["numba"] = False
    if STATE["numba"] is None:
        try:
            import numba
            STATE["numba"] = numba
        except ImportError:
            warnings.warn("numba is not installed: the 'fused' LIF backend runs its loop in torch ops "
                          "(about 2x slower)", RuntimeWarning, stacklevel=3)
            STATE["numba"] = False
    return STATE["numba"]


def available() -> bool:
    return bool(module())


def disable() -> None:
    STATE["numba"] = False


def parallel() -> bool:
    """Whether the kernels' outer loops run on all threads: yes, unless the environment sets
    ``TETSNN_NUMBA_PARALLEL=0`` (one thread; compiles in about half the time, for tests and short runs)."""
    if STATE["parallel"] is None:
        STATE["parallel"] = os.environ.get("TETSNN_NUMBA_PARALLEL", "").strip() != "0"
    return STATE["parallel"]


def outer_jit(**options):
    """The decorator of a kernel whose outer loop takes work items with ``numba.prange``: compiled to run
    them on all threads, or on one (:func:`parallel`)."""
    return module().njit(parallel=parallel(), error_model="numpy", **options)


def call(key, *args) -> bool:
    """Run kernel ``key`` on ``args``; False (with a warning, numba disabled) when it cannot run."""
    try:
        kernel(key)(*args)
    except Exception as e:  # a failed compile leaves the torch-op kernels in charge
        disable()
        warnings.warn(f"the numba {key[0]} kernel failed ({type(e).__name__}: {e}); falling back to torch ops",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


_BUILDERS = {}   # kind -> builder of the kernel (kind, *flags) from the flags; filled below and by register


def register(kind: str, build) -> None:
    """Make ``build(*flags)`` the builder of the kernels ``(kind, *flags)`` of another kernel module."""
    _BUILDERS[kind] = build


def kernel(key):
    """The numba kernel ``key = (kind, *flags)``, built on first use (per :func:`parallel` setting)."""
    at = (key, parallel())
    if at not in _KERNELS:
        _KERNELS[at] = _BUILDERS[key[0]](*key[1:])
    return _KERNELS[at]


def jobs(n: int, m: int, block: int = BLOCK) -> int:
    """The number of work items of ``block`` neurons (of one sample each) over ``[n, T, m]``."""
    return n * ((m + block - 1) // block)


def _blocks_kernel(block: int):
    """How the kernels split ``[N, T, M]`` into work items of ``block`` neurons of one sample (threads
    take items): ``count(n, m)`` items (:func:`jobs`); item ``job`` is ``at(job, m) -> (n, m0, w)``,
    neurons ``m0 .. m0+w`` of sample ``n``. (Imports numba itself: the PSN kernels use it whether or not
    a failed LIF kernel switched these off.)"""
    import numba
    njit = numba.njit(inline="always")

    @njit
    def count(n_, m_):
        return n_ * ((m_ + block - 1) // block)

    @njit
    def at(job, m_):
        nb = (m_ + block - 1) // block
        m0 = (job % nb) * block
        return job // nb, m0, min(block, m_ - m0)
    return count, at


def _fma():
    """``fma(a, b, c)``: ``a * b + c`` rounded once (LLVM's ``llvm.fma``)."""
    numba = module()

    @numba.extending.intrinsic
    def fma(typingctx, a, b, c):
        return a(a, b, c), lambda context, builder, sig, args: builder.fma(*args)
    return fma


# --------------------------------------------------------------------------- input sources

def _load_kernel(source: str, fused_madd: bool):
    """How a kernel reads its input ``x[n, t, m]`` from the arrays ``src`` (a tuple): ``rows(src, n, t,
    m0, w, c)`` takes the rows of step t for neurons ``m0 .. m0+w``, ``value(rows, i)`` gives neuron
    ``m0 + i``'s input from them. The sources:

    - ``"x"``: ``src = (x,)``, the input itself;
    - ``"bn"``: ``src = (y, a, b)``, BatchNorm's output ``y * a[m] + b[m]`` rebuilt from its input
      ``y`` and the per-neuron scale ``a`` and shift ``b`` (``fused_madd``: rounded once, by fma);
    - ``"bn+bn"``: ``src = (y, a, b, y2, a2, b2)``, the sum of two such outputs;
    - ``"bn+bits"``: ``src = (y, a, b, bits)``, one such output plus 0/1 spikes packed as bits
      (bit ``f % 8`` of byte ``f // 8`` for the flat index ``f`` of ``[n, t, m]``);
    - ``"bn+x"``: ``src = (y, a, b, r)``, one such output plus the values ``r[n, t, m]`` (ILIF's counts);
    - ``"x+x"``: ``src = (x, x2)``, the sum of two inputs (a normalised input and its residual).
    """
    numba = module()
    fma = _fma()
    njit = numba.njit(inline="always")
    spikes = kernel(("spikes",))

    @njit
    def bn(y, a, b, i):
        return fma(y[i], a[i], b[i]) if fused_madd else y[i] * a[i] + b[i]

    if source == "x":
        @njit
        def rows(src, n, t, m0, w, c):
            return (src[0][n, t, m0:m0 + w],)

        @njit
        def value(r, i):
            return r[0][i]
    elif source == "bn":
        @njit
        def rows(src, n, t, m0, w, c):
            return src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w]

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i)
    elif source == "bn+bn":
        @njit
        def rows(src, n, t, m0, w, c):
            return (src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w],
                    src[3][n, t, m0:m0 + w], src[4][m0:m0 + w], src[5][m0:m0 + w])

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i) + bn(r[3], r[4], r[5], i)
    elif source == "bn+x":
        @njit
        def rows(src, n, t, m0, w, c):
            return src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w], src[3][n, t, m0:m0 + w]

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i) + r[3][i]
    elif source == "x+x":
        @njit
        def rows(src, n, t, m0, w, c):
            return src[0][n, t, m0:m0 + w], src[1][n, t, m0:m0 + w]

        @njit
        def value(r, i):
            return r[0][i] + r[1][i]
    else:  # "bn+bits"
        @njit
        def rows(src, n, t, m0, w, c):
            f0 = (n * src[0].shape[1] + t) * src[0].shape[2] + m0   # the flat index of neuron m0
            return src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w], spikes(src[3], f0, w, c)

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i) + r[3][i]
    return rows, value


def _spikes_kernel():
    """``spikes(bits, f0, w, c)``: the 0/1 values of bits ``f0 .. f0+w`` (bit ``f % 8`` of byte ``f // 8``)
    in c's dtype, a byte at a time where ``f0`` starts a byte."""
    numba, np = module(), __import__("numpy")

    @numba.njit(inline="always")
    def spikes(bits, f0, w, c):
        out = np.empty(w, c.dtype)
        zero, one = c[C_ZERO], c[C_ONE]
        start = 0
        if f0 & 7 == 0:
            start = w & ~7
            for j in range(w >> 3):
                byte = bits[(f0 >> 3) + j]
                for k in range(8):
                    out[8 * j + k] = one if (byte >> k) & 1 else zero
        for i in range(start, w):
            f = f0 + i
            out[i] = one if (bits[f >> 3] >> (f & 7)) & 1 else zero
        return out
    return spikes


def _values_kernel(source: str, fused_madd: bool):
    """``out[n, t, :]`` = the input a kernel reads through :func:`_load_kernel` (for checks)."""
    numba = module()
    rows, value = kernel(("load", source, fused_madd))

    @numba.njit
    def values(src, out, c):
        for n in range(out.shape[0]):
            for t in range(out.shape[1]):
                r = rows(src, n, t, 0, out.shape[2], c)
                for i in range(out.shape[2]):
                    out[n, t, i] = value(r, i)
    return values


# --------------------------------------------------------------------------- the neuron recurrence

def _step_kernel(dynamics: str, hard: bool):
    """One step of the neuron from its pre-reset membrane ``h``, given the scalars ``p = params(c)``
    (read once per block, so the loops vectorise): ``fire(h, p) -> (s, u)``, and ``grad(h, gs, gu, p,
    kind, detach) -> dL/dh`` from dL/ds and dL/du (the BPTT step; see :mod:`tetsnn.kernels.ops`)."""
    numba, np = module(), __import__("numpy")
    njit = numba.njit(inline="always")
    sgrad = numba_surrogate()

    @njit
    def params(c):
        return (c[C_DECAY], c[C_THRESHOLD], c[C_WIDTH], c[C_K], c[C_ZERO], c[C_ONE], c[C_INPUT], c[C_LEVELS])

    if dynamics == "ilif":
        @njit
        def fire(h, p):
            th, zero, levels = p[1], p[4], p[7]
            s = np.rint(min(max(h / th, zero), levels))
            return s, h - th * s

        @njit
        def grad(h, gs, gu, p, kind, detach):
            th, zero, levels = p[1], p[4], p[7]
            q = h / th
            g = gs if detach else gs - gu * th
            gh = g / th if zero <= q and q <= levels else zero
            return gh + gu
        return params, fire, grad

    @njit
    def fire(h, p):
        th, zero, one = p[1], p[4], p[5]
        s = one if h - th > zero else zero
        return s, (h * (one - s) if hard else h - th * s)

    @njit
    def grad(h, gs, gu, p, kind, detach):
        th, zero, one = p[1], p[4], p[5]
        v = h - th
        g = gs
        if not detach:
            g = g - gu * h if hard else g - gu * th
        gh = g * sgrad(v, kind, p[2], p[3], zero, one)
        return gh + gu * (one - (one if v > zero else zero)) if hard else gh + gu
    return params, fire, grad


def _integrate_kernel(dynamics: str, hard: bool, decay_input: bool, source: str, fused_madd: bool,
                      pack: bool = False):
    """The forward recurrence for one block of neurons (inlined into the kernels below), reading its
    input through :func:`_load_kernel`; with ``pack`` (0/1 spikes, rows starting at a byte) it also packs
    each step's spikes into ``bits`` as :func:`_pack_kernel` would, while the row is in cache."""
    numba, np = module(), __import__("numpy")
    rows, value = kernel(("load", source, fused_madd))
    params, fire, _ = kernel(("step", dynamics, hard))

    @numba.njit(inline="always")
    def integrate(src, n, m0, w, c, out, to_h, bits):
        # neurons m0 .. m0+w of sample n: spikes into out[n, t, m0 + i], or (to_h) pre-reset membranes
        # into out[t, i]
        p = params(c)
        decay, cin, zero = p[0], p[6], p[4]
        u = np.zeros(w, c.dtype)
        flags = np.empty(w if pack else 8, np.uint8)
        t_, m_ = src[0].shape[1], src[0].shape[2]
        for t in range(t_):
            xt = rows(src, n, t, m0, w, c)
            ot = out[t] if to_h else out[n, t, m0:m0 + w]
            for i in range(w):
                ht = decay * u[i] + cin * value(xt, i) if decay_input else decay * u[i] + value(xt, i)
                st, ut = fire(ht, p)
                u[i] = ut
                ot[i] = ht if to_h else st
                if pack:
                    flags[i] = st != zero
            if pack:   # eight 0/1 bytes -> one byte: the multiply moves byte k to bit 56 + k
                f64 = flags.view(np.uint64)
                o = bits[((n * t_ + t) * m_ + m0) >> 3:]
                for i in range(w >> 3):
                    o[i] = (f64[i] * np.uint64(0x0102040810204080)) >> np.uint64(56)
    return integrate


def _forward_kernel(dynamics: str, hard: bool, decay_input: bool, source: str = "x", pack: bool = False,
                    fused_madd: bool = False):
    """Spikes of the input ``src`` (read as ``source`` and ``fused_madd`` say, :func:`_load_kernel`) into
    ``s``; threads over blocks of neurons. With ``pack`` (0/1 spikes, ``M`` a multiple of 8) also their
    bits into ``bits`` (as :func:`_pack_kernel` packs ``s``)."""
    numba = module()
    integrate = kernel(("integrate", dynamics, hard, decay_input, source, fused_madd, pack))
    count, at = kernel(("blocks", BLOCK))

    @outer_jit()
    def fwd(src, s, c, bits):
        n_, t_, m_ = src[0].shape
        for job in numba.prange(count(n_, m_)):
            n, m0, w = at(job, m_)
            integrate(src, n, m0, w, c, s, False, bits)
    return fwd


def _backward_kernel(dynamics: str, hard: bool, detach: bool, surrogate: str, decay_input: bool, grad_decay: bool,
                     source: str = "x", fused_madd: bool = False):
    """BPTT: ``gx`` (dL/d input) from ``gs`` (dL/ds) and the input source; with ``grad_decay`` also
    ``gd[job]``, each work item's share of dL/d decay."""
    numba, np = module(), __import__("numpy")
    kind = SURROGATE_IDS.get(surrogate, 0)
    rows, value = kernel(("load", source, fused_madd))
    integrate = kernel(("integrate", dynamics, hard, decay_input, source, fused_madd, False))
    params, fire, grad = kernel(("step", dynamics, hard))
    count, at = kernel(("blocks", BLOCK))

    @outer_jit()
    def bwd(gs, src, gx, gd, c):
        n_, t_, m_ = src[0].shape
        for job in numba.prange(count(n_, m_)):
            n, m0, w = at(job, m_)
            h = np.empty((t_, w), c.dtype)
            integrate(src, n, m0, w, c, h, True, np.empty(0, np.uint8))
            p = params(c)
            decay, cin, zero = p[0], p[6], p[4]
            gu = np.zeros(w, c.dtype)
            acc = zero
            for t in range(t_ - 1, -1, -1):
                ht_, gs_, gx_ = h[t], gs[n, t, m0:m0 + w], gx[n, t, m0:m0 + w]
                if grad_decay:
                    xt = rows(src, n, t, m0, w, c)
                for i in range(w):
                    gh = grad(ht_[i], gs_[i], gu[i], p, kind, detach)
                    gx_[i] = gh * cin if decay_input else gh
                    if grad_decay:   # dh[t]/d decay = u[t-1] (- x[t] with decay_input)
                        up = fire(h[t - 1, i], p)[1] if t > 0 else zero
                        acc += gh * (up - value(xt, i)) if decay_input else gh * up
                    gu[i] = decay * gh
            if grad_decay:
                gd[job] = acc
    return bwd


# --------------------------------------------------------------------------- BatchNorm scale and shift

def _scale_shift_kernel(fused_madd: bool):
    """``a = invstd * weight`` and ``b = bias - mean * a`` per channel, rounded as ``fused_madd`` says."""
    numba = module()
    fma = _fma()

    @numba.njit
    def scale_shift(mean, invstd, weight, bias, a, b):
        for c in range(mean.shape[0]):
            a[c] = invstd[c] * weight[c]
            b[c] = fma(-mean[c], a[c], bias[c]) if fused_madd else bias[c] - mean[c] * a[c]
    return scale_shift


def _bn_stats_kernel():
    """``stats(y, mean, var_sum)``: per channel of a float32 ``y[N, C, L]`` (``L > 1``), the statistics as
    torch's CPU batch_norm forms them for contiguous input: ``mean = float32(sum / count)``, the sum in
    float64, then ``var_sum = float32(sum of float64((y - mean)^2))``, the square in float32. The sums
    may be reassociated (fast-math ``reassoc`` alone, so they vectorise; torch adds in order, one value
    at a time): in float64 that moves a float32 result only where the sum lies within a few float64
    ulps of a float32 rounding boundary, and a probe (``ops._stats_mode``) checks the result once."""
    numba, np = module(), __import__("numpy")

    @outer_jit(fastmath={"reassoc"})
    def stats(y, mean, var_sum):
        n_, c_, l_ = y.shape
        count = n_ * l_
        for c in numba.prange(c_):
            s = 0.0
            for n in range(n_):
                for i in range(l_):
                    s += np.float64(y[n, c, i])
            m = np.float32(s / count)
            v = 0.0
            for n in range(n_):
                for i in range(l_):
                    d = y[n, c, i] - m
                    v += np.float64(d * d)
            mean[c] = m
            var_sum[c] = np.float32(v)
    return stats


# --------------------------------------------------------------------------- bit packing

def _pack_kernel(check: bool = False):
    """``pack(x, out, bad)``: ``out[j]`` holds the flags ``x[8j .. 8j+7] != 0``, ``x[8j]`` in the lowest
    bit. With ``check`` it also sets ``bad[0]`` to 1 where a value is neither 0 nor 1 (in the same pass:
    a separate check would read the input again); without, ``bad`` is left alone."""
    numba, np = module(), __import__("numpy")

    @outer_jit()
    def pack(x, out, bad):  # x: flat float array
        blocks = x.shape[0] // PACK_BLOCK
        found = np.zeros(blocks + 1, np.uint8)
        for j in numba.prange(blocks):
            flags = np.empty(PACK_BLOCK, np.uint8)
            xs = x[j * PACK_BLOCK:(j + 1) * PACK_BLOCK]
            if check:
                wrong = 0
                for i in range(PACK_BLOCK):
                    v = xs[i]
                    flags[i] = v != 0
                    wrong |= (v != 0) & (v != 1)
                found[j] = wrong
            else:
                for i in range(PACK_BLOCK):
                    flags[i] = xs[i] != 0
            # eight 0/1 bytes -> one byte: the multiply moves byte k to bit 56 + k (little-endian)
            f64 = flags.view(np.uint64)
            o = out[j * (PACK_BLOCK // 8):(j + 1) * (PACK_BLOCK // 8)]
            for i in range(PACK_BLOCK // 8):
                o[i] = (f64[i] * np.uint64(0x0102040810204080)) >> np.uint64(56)
        for i in range(blocks * PACK_BLOCK, x.shape[0]):  # the tail, bit by bit
            if i % 8 == 0:
                out[i // 8] = 0
            if x[i] != 0:
                out[i // 8] |= 1 << (i % 8)
            if check and x[i] != 1 and x[i] != 0:
                found[blocks] = 1
        if check:
            bad[0] = found.max()
    return pack


UNPACK_BLOCK = 512   # bytes per work item of the unpacking


def _unpack_kernel():
    """``unpack(p, out, lut)``: ``out[8j + k]`` = bit k of ``p[j]``, each byte's eight values copied
    from the table ``lut[256, 8]`` (in out's dtype)."""
    numba = module()

    @outer_jit()
    def unpack(p, out, lut):
        full = out.shape[0] // 8
        for jb in numba.prange((full + UNPACK_BLOCK - 1) // UNPACK_BLOCK):
            for j in range(jb * UNPACK_BLOCK, min(full, (jb + 1) * UNPACK_BLOCK)):
                row = lut[p[j]]
                for k in range(8):
                    out[8 * j + k] = row[k]
        for k in range(out.shape[0] - 8 * full):
            out[8 * full + k] = lut[p[full], k]
    return unpack


_BUILDERS.update({"spikes": _spikes_kernel, "blocks": _blocks_kernel, "load": _load_kernel, "values": _values_kernel,
                  "step": _step_kernel, "integrate": _integrate_kernel, "fwd": _forward_kernel,
                  "bwd": _backward_kernel, "scale_shift": _scale_shift_kernel, "bn_stats": _bn_stats_kernel,
                  "pack": _pack_kernel, "unpack": _unpack_kernel})
