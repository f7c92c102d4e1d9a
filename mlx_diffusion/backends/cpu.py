"""The CPU fast paths, behind the few calls the models make: attention, conv, GroupNorm(+SiLU), Linear on quantized
weights, fused activations, and the one guard in front of every `mx.compile`.

Why they exist: MLX's CPU backend runs everything that is not a BLAS call on one core, evaluates transcendental
functions (exp, tanh, sigmoid) one value at a time at ~10-40 ns each, convolves through a 9x im2col buffer, and its
`quantized_matmul` is ~80x slower than an fp32 GEMM. At FLUX and SD3 sizes these would cost as much as the matmuls.
So on the CPU in float32:
- exp in the softmax and tanh in GELU / SiLU are multiply-add polynomials that `mx.compile` fuses into a few
  vectorised passes (Eigen's float tanh; a Taylor exp raised to the 64th power);
- attention over long sequences runs in a C kernel of ours (`attention.c`, built by `native.py`): tasks of one head
  and a few hundred query rows on every core, BLAS products, a vectorised softmax; shorter ones run in cache-sized
  chunks alternately on two CPU streams (MLX gives each stream a thread), which puts the softmax on both cores;
- 3x3 convs are Winograd F(4x4, 3x3), with the decoder's nearest x2 upsampling folded into the input transform, and
  large maps run in bands of rows (`BAND_ELEMENTS`), which bounds peak memory; small maps (`FUSED_MIN_ELEMENTS`)
  use MLX's own ops, which are as fast there and need no kernel built on first use;
- quantized Linear weights are dequantized per call and multiplied by BLAS.
Everywhere else (a GPU, half precision, no compiler) each call is MLX's own op. The models' files therefore read
like the reference math; what is done differently for speed is here, and `MLX_DISABLE_COMPILE=1` turns the fused
forms off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas, native

# ---------------------------------------------------------------------------------------------------------------
# the compile guard

# `mx.compile` builds its fused CPU kernels with g++ on Linux (at first evaluation); without one, or with
# MLX_DISABLE_COMPILE set, everything runs unfused.
CAN_COMPILE = (sys.platform != "linux" or shutil.which("g++") is not None) and not os.environ.get("MLX_DISABLE_COMPILE")


def compile(fn=None, **kwargs):
    """`mx.compile(fn, **kwargs)` where MLX can compile, else `fn` itself; also a decorator, bare or with arguments."""
    if fn is None:
        return lambda f: compile(f, **kwargs)
    return mx.compile(fn, **kwargs) if CAN_COMPILE else fn


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _fast(x) -> bool:
    return CAN_COMPILE and x.dtype == mx.float32 and on_cpu()


def weights_dtype():
    """The dtype pipelines load floating-point weights in: float32 on the CPU, whose fp16/bf16 matmuls are slow
    paths (see the module docstring); None (as stored) elsewhere."""
    return mx.float32 if on_cpu() else None


# ---------------------------------------------------------------------------------------------------------------
# activations: Eigen's float tanh (also XLA's CPU tanh), x * P(x^2) / Q(x^2) on [-c, c] and exactly +-1 beyond, max
# error ~2e-7 (~2 ulp)

_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _horner(z, coeffs):
    acc = z * coeffs[0] + coeffs[1]
    for c in coeffs[2:]:
        acc = acc * z + c
    return acc


def _tanh_parts(u, gelu: bool = False):
    """tanh(u) as (numerator, denominator) on the shared coefficients. The two compiled graphs that use it differ
    only in how the same values are computed, and g++ rounds each graph in its own way (last-bit differences that
    show in images), so each keeps its measured form: SiLU clamps with `where` (min/max in a kernel keep g++ from
    vectorizing it) and evaluates Q by Horner; GELU clamps with clip and evaluates Q in Estrin form. With the
    numerator in Horner form the result is exactly +-1 at the clamp (which keeps GELU's negative tail at 0)."""
    if gelu:
        c = mx.clip(u, -_TANH_CLAMP, _TANH_CLAMP)
        z = c * c
        q = _TANH_Q
        den = (q[3] + q[2] * z) + (z * z) * (q[1] + q[0] * z)
    else:
        c = mx.where(u > _TANH_CLAMP, _TANH_CLAMP, mx.where(u < -_TANH_CLAMP, -_TANH_CLAMP, u))
        z = c * c
        den = _horner(z, _TANH_Q)
    return c * _horner(z, _TANH_P), den


# SiLU runs as two compiled kernels on contiguous data: as a single graph it is deeper than MLX's fusion limit and
# gets split at arbitrary points.
_tanh_num_den = compile(_tanh_parts)


@compile
def _gelu_tanh_fused(x):
    half_x = 0.5 * x
    num, den = _tanh_parts(x * (0.7978845608028654 + 0.035677408136300125 * (x * x)), gelu=True)
    return half_x + half_x * (num / den)


# From this many values an activation runs in the native kernel (`elementwise.c`, every core, vectorised) when its
# input can be evaluated (not inside a trace): FLUX's and SD3's MLPs at 256x256 and up; below, MLX's fused kernel.
NATIVE_MIN_ELEMENTS = 1 << 20


@functools.cache
def _native_gelu_tanh_kernel():
    lib = native.load("elementwise")
    if lib is None:
        return None
    fn = lib.md_gelu_tanh
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def _native_gelu_tanh(x):
    """The native kernel's GELU, or None where it cannot run (no kernel; inside a trace, which cannot evaluate x)."""
    fn = _native_gelu_tanh_kernel()
    if fn is None:
        return None
    try:
        mx.eval(x)
    except ValueError:  # "[eval] Attempting to eval an array during function transformations ..."
        return None
    xn = np.ascontiguousarray(np.asarray(x))
    out = np.empty_like(xn)
    fn(xn.ctypes.data, out.ctypes.data, xn.size)
    return mx.array(out)


def gelu_tanh(x):
    """torch's GELU(approximate="tanh"); max abs error ~1e-6 with the rational tanh (CPU, float32)."""
    if not _fast(x):
        return nn.gelu_approx(x)
    if x.size >= NATIVE_MIN_ELEMENTS:
        out = _native_gelu_tanh(x)
        if out is not None:
            return out
    return _gelu_tanh_fused(x)


# erf as XLA's and Eigen's float erf: x * P(x^2) / Q(x^2) on [-4, 4] (erf is 1 - 1.5e-8 at 4), max abs error ~4e-7
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


@compile
def _gelu_erf_fused(x):
    u = mx.clip(x * 0.7071067811865476, -4.0, 4.0)
    z = u * u
    half_x = 0.5 * x
    return half_x + half_x * (u * _horner(z, _ERF_P) / _horner(z, _ERF_Q))


def gelu(x):
    """torch's exact GELU, x * (1 + erf(x / sqrt 2)) / 2 (CLIP-G's and some T5s' activation); max abs error ~1e-6
    with the rational erf (CPU, float32), where MLX's takes ~45 ns a value on one core."""
    return _gelu_erf_fused(x) if _fast(x) else nn.gelu(x)


@compile
def _quick_gelu_finish(h, num, den):
    return h + h * (num / den)


def quick_gelu(x):
    """x * sigmoid(1.702 x) (CLIP-L's activation) = x/2 * (1 + tanh(0.851 x)), tanh by polynomials on the CPU."""
    if not _fast(x):
        return x * mx.sigmoid(1.702 * x)
    return _quick_gelu_finish(0.5 * x, *_tanh_num_den(0.851 * x))


@compile
def _silu_finish(u, num, den):
    return u + u * (num / den)


def _silu_from_half(u):
    """silu(2u) = 2u * sigmoid(2u) = u * (1 + tanh(u)), with tanh from polynomials only (no exp)."""
    return _silu_finish(u, *_tanh_num_den(u))


def silu(x):
    """SiLU; without exp on the CPU: within ~1 float32 ulp of |x| (abs error <= 2.2e-6 for x << 0, where it
    underflows)."""
    return _silu_from_half(0.5 * x) if _fast(x) else nn.silu(x)


# ---------------------------------------------------------------------------------------------------------------
# attention


@compile
def _softmax_numerator(s, row_max):
    # e^(s - max + 15) as p(u)^64 with u = (s - max + 15) / 64 in [-0.23, 0.23] and p the degree-6 Taylor polynomial:
    # only multiply-adds. Relative error ~5e-6 (rounding amplified by the squarings). The constant e^15 cancels in
    # the normalisation; the clamp at -30 moves weights below e^-30 of the row's largest, a negligible change.
    u = (mx.maximum(s - row_max, -30.0) + 15.0) * (1 / 64)
    p = u * (1 / 720) + 1 / 120
    for c in (1 / 24, 1 / 6, 0.5, 1.0, 1.0):
        p = p * u + c
    for _ in range(6):
        p = p * p
    return p


@functools.cache
def _main_streams():
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


def _cpu_streams():
    """Two CPU streams for attention's chunks to alternate between (FLUX at 512x512: 0.32 vs 0.40 s per call; no
    gain at 1024x1024), in the main thread only. MLX streams belong to the thread that made them ("There is no
    Stream(cpu, N) in current thread" elsewhere), and with MLX 0.32 a stream made in a thread that ends can abort the
    process at exit; so other threads (a web server's workers) use their own default stream for both."""
    if threading.current_thread() is threading.main_thread():
        return _main_streams()
    stream = mx.default_stream(mx.cpu)
    return stream, stream


# From this many scores per call (B * H * L * S) attention runs in the native kernel (`attention.c`): from FLUX and
# SD3 at 256x256 up. Below it the MLX form keeps the model inside one compiled graph, which is what small models
# (the built-in one's ~10^5 scores a call) need: their time is per-operation overhead, not attention.
NATIVE_MIN_SCORES = 1 << 22

_local = threading.local()
_blas_lock = threading.Lock()


class EagerOnly(Exception):
    """Raised while `mx.compile` traces a call made under `eager_fallback()` by an operation that has to run
    eagerly (the native attention evaluates its inputs); the caller then runs the function uncompiled."""


@contextlib.contextmanager
def eager_fallback():
    """Inside: a traced call to `attention` that would use the native kernel raises EagerOnly instead of falling back
    to MLX's ops. `Pipeline.forward` traces under it and, on EagerOnly, keeps the call uncompiled: for models big
    enough to need the kernel, compilation's fusions are worth far less than the kernel (FLUX `block` at 1024x1024,
    one step with `benchmarks/profile_step.py`: 37.7 s compiled with MLX's attention, 29.3 s eager with the kernel)."""
    before = getattr(_local, "raise_eager", False)
    _local.raise_eager = True
    try:
        yield
    finally:
        _local.raise_eager = before


@functools.cache
def _native_kernel():
    """(md_attention, cblas_sgemm's address, openblas_get/set_num_threads) or None: the kernel needs the process's
    OpenBLAS (`blas.interpose`), both for its products and to run them one thread per task."""
    lib, openblas = native.load("attention"), blas.library
    if lib is None or openblas is None:
        return None
    try:
        sgemm = ctypes.cast(openblas.cblas_sgemm, ctypes.c_void_p).value
        get_threads, set_threads = openblas.openblas_get_num_threads, openblas.openblas_set_num_threads
    except AttributeError:  # MLX_DIFFUSION_BLAS pointing at a BLAS other than OpenBLAS
        return None
    fn = lib.md_attention
    fn.restype = ctypes.c_int
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [ptr] * 4 + [i32] * 5 + [ptr] * 4 + [ctypes.c_float, i32, ptr]
    return fn, sgemm, get_threads, set_threads


def _host_view(a):
    """A NumPy view of an evaluated float32 MLX array (its memory, no copy), last axis contiguous."""
    x = np.asarray(a)
    return x if x.strides[-1] == 4 else np.ascontiguousarray(x)


# Scores per task of the native kernel (4 MB; each thread holds that much). Measured on an SD3 call (2 x 24 x 4429
# x 64): 2^20 1.09 s, 2^21 1.10 s; tasks small enough for a 1 MB L2 were slower (2^19 1.14 s, 2^18 1.32 s, 2^17
# 1.43 s): each task's products pack K and V again.
TASK_SCORES = 1 << 20


def _native_attention(q, k, v, scale: float):
    """The native kernel's attention, merged as (B, L, H*D); None where it cannot run here (no kernel, or inside a
    trace that is not `eager_fallback`'s: a gradient, a compile of someone else's)."""
    kernel = _native_kernel()
    if kernel is None:
        return None
    fn, sgemm, get_threads, set_threads = kernel
    try:
        mx.eval(q, k, v)
    except ValueError:  # "[eval] Attempting to eval an array during function transformations ..."
        if getattr(_local, "raise_eager", False):
            raise EagerOnly("attention") from None
        return None
    qn, kn, vn = (_host_view(t) for t in (q, k, v))
    B, H, L, D = qn.shape
    S = kn.shape[2]
    out = np.empty((B, L, H * D), np.float32)
    strides = [(ctypes.c_int64 * 4)(*(s // 4 for s in t.strides))
               for t in (qn, kn, vn, out.reshape(B, L, H, D).transpose(0, 2, 1, 3))]
    rows = max(16, min(L, TASK_SCORES // S))
    with _blas_lock:  # one caller at a time changes OpenBLAS's thread count (a web server's workers)
        threads = get_threads()
        set_threads(1)
        try:
            failed = fn(qn.ctypes.data, kn.ctypes.data, vn.ctypes.data, out.ctypes.data, B, H, L, S, D, *strides,
                        scale, rows, sgemm)
        finally:
            set_threads(threads)
    if failed:
        raise MemoryError(f"attention: could not allocate {rows} x {S} scores per thread")
    return mx.array(out)


def attention(q, k, v, scale: float | None = None, max_scores: int = 1 << 22):
    """softmax(q k^T * scale) v for (B, H, L, D) inputs, returned merged as (B, L, H*D). scale=None: D**-0.5.

    On the CPU in float32 with at least NATIVE_MIN_SCORES scores, the native kernel (`attention.c`: tasks of one
    head and a few hundred query rows on every core, BLAS products, a vectorised exact-to-1-ulp softmax). Otherwise
    on the CPU the work is cut into chunks of one head and as many query rows as keep a sample's scores within
    `max_scores` values (cache-sized, and a few big GEMMs rather than many thin ones), alternating between two
    streams; in float32 the softmax uses the polynomial exponential above (output relative error ~5e-6) and
    normalises after the second matmul. Elsewhere: `mx.fast.scaled_dot_product_attention`.
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if not on_cpu():
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        return o.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    fast = _fast(q)
    if fast and B * H * L * S >= NATIVE_MIN_SCORES:
        out = _native_attention(q, k, v, scale)
        if out is not None:
            return out
    if scale != 1.0:
        q = q * scale
    v = mx.contiguous(v)  # sliced once per chunk below
    rows = max(1, min(L, max_scores // S))  # per sample: a sample's products must not depend on the batch's size
    heads, n = [], 0
    for h in range(H):
        kt = k[:, h : h + 1].swapaxes(-1, -2)
        blocks = []
        for r in range(0, L, rows):
            with mx.stream(_cpu_streams()[n % 2]):
                s = q[:, h : h + 1, r : r + rows] @ kt
                if fast:
                    e = _softmax_numerator(s, mx.max(s, axis=-1, keepdims=True))
                    blocks.append((e @ v[:, h : h + 1]) / mx.sum(e, axis=-1, keepdims=True))
                else:
                    blocks.append(mx.softmax(s, axis=-1, precise=True) @ v[:, h : h + 1])
            n += 1
        heads.append((mx.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]).transpose(0, 2, 1, 3))
    return mx.concatenate(heads, axis=2).reshape(B, L, H * D)


# ---------------------------------------------------------------------------------------------------------------
# Linear: one product per sample, and on quantized weights


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias) for x (B, ..., in) as B products, one per sample, in one MLX call (the weight broadcast
    over the batch), on every device.

    Why not one product of all B*N rows: a BLAS rounds a row differently depending on how many rows it is given (which
    rows fall in a full register tile and which in the tail, where the threads split the work), so a sample in a
    batch got other last bits than alone, which guidance and the sampler amplify: measured, 1 in 120 built-in images
    made in batches of 3 was more than 1e-4 from the same image made alone. Given one sample's rows per product, a
    batch's images equal the images made alone bit for bit. Measured on 2 cores: the same speed at real sizes (2 x
    1024 rows of 3072 -> 3072: 272 vs 270 ms); ~10% slower for 4 x 256 rows of 3072 -> 12288, +0.05 ms per call at
    the built-in model's sizes."""
    if x.ndim < 2:
        return x @ weight.T.astype(x.dtype) + (bias if bias is not None else 0)
    B, K, O = x.shape[0], x.shape[-1], weight.shape[0]
    xs = x.reshape(B, -1, K)
    wt = mx.broadcast_to(weight.T.astype(x.dtype), (B, K, O))
    y = mx.addmm(bias.astype(x.dtype), xs, wt) if bias is not None else xs @ wt
    return y.reshape(*x.shape[:-1], O)


# Rows of x per sample up to which the CPU multiplies by the quantized weight directly. Measured on a 2-core x86
# (18432 x 3072 weight): quantized_matmul takes 66 / 147 / 524 ms for 1 / 2 / 8 rows at 4 bits, dequantize + BLAS
# ~400 ms whatever the rows; its rows do not depend on each other, unlike BLAS's (see `linear`). It also keeps the layers fed one vector per image (FLUX's and SD3's modulations, from the timestep
# embedding alone) from being dequantized all at once: they depend on nothing MLX must compute first.
_DIRECT_ROWS = 4


def quantized_linear(x, weight, scales, biases, group_size: int, bits: int):
    """x @ W.T for a weight in MLX's affine-quantized form. On a GPU, and on the CPU for a few rows of x:
    `quantized_matmul`. On the CPU for more rows, where that is ~80x slower than an fp32 GEMM, the weight is
    dequantized per call and multiplied by BLAS, so memory stays at the quantized size between calls.

    The dequantization is made to depend on x: otherwise MLX's scheduler, which runs up to 20 ready operations
    breadth-first, dequantizes the next layers' weights before this one's input exists. Measured on T5-XXL at 4 bits
    (2.9 GB), encoding one prompt: 2.5 GB above the weights without the dependency, 1.3 GB with it, same speed."""
    if mx.default_device() == mx.gpu or x.size <= _DIRECT_ROWS * x.shape[-1] * x.shape[0]:  # rows per sample
        return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
    w = mx.dequantize(mx.depends(weight, x), scales, biases, group_size=group_size, bits=bits)
    return linear(x, w)


# ---------------------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU) and convolutions, NHWC

# Scratch memory budget, in elements, of one band of a large conv or GroupNorm+SiLU: large maps are processed in bands
# of rows, each evaluated into its slice of a preallocated output. Bounds e.g. a 1024^2 decode's peak memory; so the
# VAE's `encode`/`decode` on large inputs call `mx.eval` internally (do not wrap them in `mx.compile`). A Winograd band
# holds ~8 buffers of this size (tiles, products, outputs). Measured on SD3's VAE decoding 1024x1024 (2 cores):
# 2^26 -> 3.1 GB MLX peak over the weights, 77 s; 2^24 -> 2.4 GB, 71 s; 2^23 -> 2.3 GB, 77 s.
BAND_ELEMENTS = 1 << 24

# Maps with fewer elements per sample than this (the built-in model's 64x64 decoder) use MLX's own ops: Winograd is
# slower than MLX's direct conv there (measured on 2 cores: 3.5 vs 0.9 ms at 32x32x32, 8.1 vs 6.6 ms at 32x32x128),
# and the fused GroupNorm saves under a millisecond a call, while each fused kernel costs ~0.25-1 s to build on a
# machine's first run (g++, see `backends.jit`): the built-in model's first image built 60 kernels for its decoder.
FUSED_MIN_ELEMENTS = 1 << 18


def _large(elements: int) -> bool:
    return elements >= FUSED_MIN_ELEMENTS


def _group_sum(a):
    """(B, H, W, G, Cg) -> (B, 1, 1, G, 1) sums, in three short float32 accumulations (W, then Cg, then H terms)."""
    return a.sum(axis=2, keepdims=True).sum(axis=4, keepdims=True).sum(axis=1, keepdims=True)


@compile
def _square_sum(g, mean):
    return _group_sum(mx.square(g - mean))


@compile
def _group_norm_affine(mean, square_sum, n: int, weight, bias, eps: float, factor: float):
    """Per-(sample, channel) scale and shift of GroupNorm from its groups' means and sums of squared deviations
    (B, 1, 1, G, 1), both times `factor`.

    Compiled apart from the elementwise pass so that MLX does not fuse this small math into it (per element).
    """
    G = mean.shape[3]
    scale = weight.reshape(G, -1) * (factor * mx.rsqrt(square_sum / n + eps))
    return scale, factor * bias.reshape(G, -1) - mean * scale


@compile
def _affine(x, scale, shift):
    return x * scale + shift


def _in_bands(shape, dtype, n: int, rows: int, band):
    """`band(a, b)` for rows [a, b) of an (B, n, ...) output, `rows` at a time, each evaluated into its slice of one
    preallocated buffer (so only one band's temporaries exist at a time); a single band is returned unevaluated."""
    if rows >= n:
        return band(0, n)
    y = mx.zeros(shape, dtype=dtype)
    for a in range(0, n, rows):
        y[:, a : a + rows] = band(a, min(n, a + rows))
        mx.eval(y)  # in place: y's buffer is donated to the update
    return y


class Rows:
    """A map that is made band by band where it is read: `fn(x[:, a:b])` for rows a:b of the NHWC map `x`.

    GroupNorm(+SiLU) hands its output to a 3x3 conv this way: the conv normalizes each band of rows (and its one-row
    halo) as it reads it, and the normalized map, as large as the input, is never held whole; at 1024x1024 that is a
    1 GB float32 map (256 channels) in the decoder's last block. Anything else takes `materialize(rows)`.
    """

    def __init__(self, x, fn, channels: int | None = None):  # channels: fn's output channels, if not x's
        self.x, self.fn = x, fn
        self.shape, self.dtype = (*x.shape[:3], channels or x.shape[3]), x.dtype

    def rows(self, a: int, b: int):
        return self.fn(self.x[:, a:b])

    def full(self):
        B, H, W, C = self.shape
        if not on_cpu():
            return self.fn(self.x)
        return _in_bands(self.shape, self.dtype, H, max(1, BAND_ELEMENTS // (4 * B * W * max(C, self.x.shape[3]))),
                         self.rows)


def materialize(x):
    return x.full() if isinstance(x, Rows) else x


def rows_of(x, a: int, b: int):
    """Rows [a, b) of an NHWC array or `Rows`."""
    return x.rows(a, b) if isinstance(x, Rows) else x[:, a:b]


def group_norm(x, weight, bias, groups: int, eps: float, act: bool = False, rows: bool = False):
    """torch.nn.GroupNorm on NHWC `x` (statistics over H, W and each group's channels), followed by SiLU when `act`.

    On the CPU, for large maps: the statistics in two short float32 reductions over bands of rows, one affine pass
    with SiLU's 1/2 folded in, the polynomial SiLU, in bands of rows (SiLU keeps three temporaries as large as its
    input). With `rows`, a large map's result is a `Rows` for a conv to read band by band.
    """
    B, H, W, C = x.shape
    if not on_cpu() or not _large(H * W * C):
        g = x.reshape(B, H, W, groups, C // groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = mx.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * mx.rsqrt(var + eps)).reshape(B, H, W, C) * weight + bias
        return nn.silu(y) if act else y
    g = x.reshape(B, H, W, groups, C // groups)
    step = max(1, BAND_ELEMENTS // (4 * B * W * C))  # the squared deviations are a band-sized temporary
    bands = [(a, min(H, a + step)) for a in range(0, H, step)]
    n = H * W * (C // groups)
    mean = functools.reduce(mx.add, [_group_sum(g[:, a:b]) for a, b in bands]) / n
    square_sum = functools.reduce(mx.add, [_square_sum(g[:, a:b], mean) for a, b in bands])  # no E[x^2] - E[x]^2
    scale, shift = _group_norm_affine(mean, square_sum, n, weight, bias, eps, 0.5 if act else 1.0)

    def normalize(xb):  # act: SiLU's 1/2 is folded into the affine
        y = _affine(xb.reshape(B, -1, W, groups, C // groups), scale, shift)
        return (_silu_from_half(y) if act else y).reshape(xb.shape)

    out = Rows(x, normalize)
    return out if rows else out.full()


# Winograd F(4x4, 3x3) for the 3x3 convs: 36 GEMMs on 4x4 output tiles, 2.25 instead of 9 multiply-adds per output
# and no 9x im2col buffer (MLX's CPU conv materializes one). Interpolation points 0, 1, -1, 1/2, -2 (instead of
# +-2): float32 error ~1.5e-6 of the output's max per conv, vs ~3.4e-6 with +-2 and ~2e-7 for a direct conv.
_M = 4
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 1 / 2, -2, 0), (0, 1, 1, 1 / 4, 4, 0), (0, 1, -1, 1 / 8, -8, 1))
_WINO_G = ((1, 0, 0), (1 / 3, 1 / 3, 1 / 3), (-1 / 3, 1 / 3, -1 / 3), (-16 / 15, -8 / 15, -4 / 15),
           (1 / 15, -2 / 15, 4 / 15), (0, 0, 1))
_WINO_BT = ((1, -3 / 2, -2, 3 / 2, 1, 0), (0, -1, 1 / 2, 5 / 2, 1, 0), (0, 1, -5 / 2, 1 / 2, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 1 / 2, -1, -1 / 2, 1, 0), (0, 1, -3 / 2, -2, 3 / 2, 1))
_T = _M + 2  # input tile size


def _lincomb(coeffs, xs):
    terms = [x if c == 1 else -x if c == -1 else x * c for c, x in zip(coeffs, xs) if c != 0]
    while len(terms) > 1:  # a balanced sum keeps the fused graph shallow
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def winograd_weights(w):
    """OHWI (O, 3, 3, C) kernel -> (36, C, O) transformed kernel G w G^T: one (36, 9) x (9, C*O) matmul in float32."""
    O, _, _, C = w.shape
    gg = mx.array([[ga * gb for ga in _WINO_G[a] for gb in _WINO_G[b]] for a in range(_T) for b in range(_T)])
    return (gg @ w.astype(mx.float32).transpose(1, 2, 3, 0).reshape(9, -1)).reshape(_T * _T, C, O).astype(w.dtype)


@compile
def _winograd_in(p, nt: int, ns: int, offsets: tuple, step: int):
    """Input tiles B^T d B; tile (i, j) row k is p's row offsets[k] + step * i (columns alike)."""
    rows = [p[:, o : o + step * nt : step] for o in offsets]
    out = []
    for a in range(_T):
        r = _lincomb(_WINO_BT[a], rows)
        cols = [r[:, :, o : o + step * ns : step] for o in offsets]
        out += [_lincomb(_WINO_BT[b], cols) for b in range(_T)]
    return out


@compile
def _winograd_out(m, bias):
    """Output tiles A^T m A + bias, interleaved to (B, nt, 4, ns, 4, O)."""
    tiles = []
    for i in range(_M):
        row = [_lincomb([_WINO_AT[i][a] for a in range(_T)], m[b::_T]) for b in range(_T)]
        tiles.append(mx.stack([_lincomb(_WINO_AT[j], row) + bias for j in range(_M)], axis=3))
    return mx.stack(tiles, axis=2)


@compile
def _sum_shifted_taps(y, H: int, W: int, O: int):
    """y: (B, rows, 9 * O) products of the flattened padded input with each tap's weights -> (B, H * (W + 2), O)."""
    n, wp = H * (W + 2), W + 2
    return _lincomb([1] * 9, [y[:, dy * wp + dx : dy * wp + dx + n, (3 * dy + dx) * O : (3 * dy + dx + 1) * O]
                              for dy in range(3) for dx in range(3)])


def _padded_rows(x, a: int, b: int, cols: tuple):
    """Rows [a, b) of `x` (an array or `Rows`) zero-padded by one row above, as many below as b reaches, and `cols` =
    (left, right) columns: one band of the padded map, without making the padded map."""
    B, H, W, C = x.shape
    lo, hi = min(max(a - 1, 0), H), min(max(b - 1, 0), H)
    if hi <= lo:
        return mx.zeros((B, b - a, W + sum(cols), C), dtype=x.dtype)
    return mx.pad(rows_of(x, lo, hi), [(0, 0), (lo - (a - 1), (b - 1) - hi), cols, (0, 0)])


def _conv3x3_shifted(x, weight, bias):
    """Few output channels: per band of rows, one GEMM of the flattened padded input with all 9 taps, then 9 shifted
    slices summed."""
    B, H, W, C = x.shape
    O = weight.shape[0]
    taps = weight.transpose(3, 1, 2, 0).reshape(C, 9 * O)

    def band(r0, r1):  # padded rows r0 .. r1 + 1, and one more that keeps the shifts in bounds
        y = _padded_rows(x, r0, r1 + 3, (1, 1)).reshape(B, -1, C) @ taps
        return _sum_shifted_taps(y, r1 - r0, W, O).reshape(B, r1 - r0, W + 2, O)[:, :, :W] + bias

    rows = max(1, BAND_ELEMENTS // (4 * B * (W + 2) * max(C, 9 * O)))
    return _in_bands((B, H, W, O), x.dtype, H, rows, band)


def conv3x3(x, weight, bias, upsample: bool = False, residual=None):
    """3x3 conv, stride 1, zero padding 1, of NHWC `x` (an array or `Rows`), or of `x` upsampled 2x (nearest) when
    `upsample`; plus `residual` (an array or `Rows` of the output's shape) when given.

    Winograd, except where the input or the output has few channels (e.g. the decoder's conv_out, the encoder's
    conv_in): there the transforms cost more than they save. The upsampled map is never built: its tiles are read
    from `x` with a stride of 2 and repeated rows/columns. Large maps are done in bands of tile rows, each read from
    `x` with its halo, padded, and evaluated into its slice of the output; neither a padded copy of `x` nor, for a
    `Rows` input, `x` itself is made whole; a residual is added band by band, so no sum is made apart.
    """
    B, H, W, C = x.shape
    O = weight.shape[0]
    if not upsample and (9 * O <= C or 9 * C <= O):
        if 9 * O <= C:
            y = _conv3x3_shifted(x, weight, bias)
        else:  # MLX's im2col buffer is small here
            y = mx.conv_general(materialize(x), weight, padding=1) + bias
        return y if residual is None else y + materialize(residual)
    f = 2 if upsample else 1
    nt, ns = -(-f * H // _M), -(-f * W // _M)
    if upsample:  # padded upsampled row 4i + k is padded x's row 2i + (k + 1) // 2
        step, offsets, cols = 2, tuple((k + 1) // 2 for k in range(_T)), (1, 2 * ns + 1 - W)
    else:
        step, offsets, cols = _M, tuple(range(_T)), (1, 1 + _M * ns - W)
    u = winograd_weights(weight)

    def band(t0, t1):
        p = _padded_rows(x, step * t0, step * t1 + offsets[-1] + 1 - step, cols)
        v = _winograd_in(p, t1 - t0, ns, offsets, step)
        m = [(v[i].reshape(-1, C) @ u[i]).reshape(B, t1 - t0, ns, O) for i in range(_T * _T)]
        y = _winograd_out(m, bias)  # (B, t1 - t0, 4, ns, 4, O)
        if residual is None:
            return y
        a, b = _M * t0, min(_M * t1, f * H)  # the band's output rows, less the last band's ragged tile rows
        r = mx.pad(rows_of(residual, a, b), [(0, 0), (0, _M * (t1 - t0) - (b - a)), (0, _M * ns - f * W), (0, 0)])
        return y + r.reshape(B, t1 - t0, _M, ns, _M, O)

    rows = max(1, BAND_ELEMENTS // (_T * _T * B * ns * max(C, O)))
    y = _in_bands((B, nt, _M, ns, _M, O), x.dtype, nt, rows, band).reshape(B, _M * nt, _M * ns, O)
    return y if (_M * nt, _M * ns) == (f * H, f * W) else y[:, : f * H, : f * W]


def conv2d(x, weight, bias, stride: int = 1, padding=0, upsample: bool = False, winograd: bool = True,
           residual=None):
    """A conv with torch's parameters (weight OHWI, bias) on NHWC `x` (an array or `Rows`), of `x` upsampled 2x
    (nearest) when `upsample`, plus `residual` (an array or `Rows`) when given; `padding` may be ((top, left),
    (bottom, right)) as in `mx.conv_general`.

    On the CPU 3x3 stride-1 convs with at least `FUSED_MIN_ELEMENTS` outputs per sample run through `conv3x3` unless
    `winograd` is False (training: backpropagating through the transforms is ~3x slower than through
    `mx.conv_general` at the built-in model's small channel counts); its kernel transform is cheap next to the conv,
    so it is not cached. 1x1 convs are one matmul; anything else, and
    every conv on a GPU, is `mx.conv_general`.
    """
    f = 2 if upsample else 1
    if (weight.shape[1:3] == (3, 3) and stride == 1 and padding == 1 and winograd and on_cpu()
            and _large(f * f * x.shape[1] * x.shape[2] * weight.shape[0])):
        return conv3x3(x, weight, bias, upsample, residual)
    x = materialize(x)
    if upsample:  # nearest x2
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    if weight.shape[1:3] == (1, 1) and stride == 1 and padding == 0:
        y = linear(x, weight.reshape(weight.shape[0], -1), bias)
    else:
        y = mx.conv_general(x, weight, stride=stride, padding=padding) + bias
    return y if residual is None else y + materialize(residual)
