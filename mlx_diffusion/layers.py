"""Building blocks shared by the FLUX transformer and the SD3 MMDiT, with diffusers' parameter names and semantics.

Mirrors diffusers' `embeddings.py` (sinusoidal timestep embedding, TimestepEmbedding, PixArtAlphaTextProjection,
CombinedTimestep[Guidance]TextProjEmbeddings), `normalization.py` (AdaLayerNormZero[Single], AdaLayerNormContinuous)
and `attention.py` (FeedForward with GELU-tanh), plus an attention core on (batch, heads, tokens, head_dim).

MLX's CPU backend runs everything that is not a BLAS call on one core and evaluates transcendental functions
(exp, tanh) one value at a time at ~10-40 ns each. At FLUX sizes the softmax's exp and the MLP's GELU would then
cost as much as the matmuls, so on the CPU in float32 both are rewritten as multiply-add polynomials that
`mx.compile` fuses into a few vectorised passes, and attention runs in cache-sized chunks alternately on two CPU
streams (MLX gives each stream a thread), which puts the softmax on both cores.
Elsewhere (GPU, half precision, no compiler) the plain MLX ops are used.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# elementwise kernels


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


# `mx.compile` builds its fused CPU kernels with g++ on Linux (at first evaluation); without one, stay unfused.
_CAN_FUSE = (sys.platform != "linux" or shutil.which("g++") is not None) and not os.environ.get("MLX_DISABLE_COMPILE")
fuse = mx.compile if _CAN_FUSE else (lambda fn: fn)  # shared with vae.py


def _fast_path(x) -> bool:
    return _CAN_FUSE and x.dtype == mx.float32 and on_cpu()


def _tanh_rational(z):
    # Eigen's float tanh (also XLA's CPU tanh): a 13/6 rational in z, max error ~2e-7 (~2 ulp) and exactly +-1 at
    # the clamp with the numerator in Horner form (which keeps GELU's negative tail at 0).
    z = mx.clip(z, -7.90531110763549805, 7.90531110763549805)
    z2 = z * z
    p = z2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = z2 * p + -8.60467152213735e-11
    p = z2 * p + 5.12229709037114e-08
    p = z2 * p + 1.48572235717979e-05
    p = z2 * p + 6.37261928875436e-04
    p = z2 * p + 4.89352455891786e-03
    z4 = z2 * z2
    q = (4.89352518554385e-03 + 2.26843463243900e-03 * z2) + z4 * (1.18534705686654e-04 + 1.19825839466702e-06 * z2)
    return z * p / q


@fuse
def _gelu_tanh_fused(x):
    half_x = 0.5 * x
    return half_x + half_x * _tanh_rational(x * (0.7978845608028654 + 0.035677408136300125 * (x * x)))


def gelu_tanh(x):
    """torch's GELU(approximate="tanh"); max abs error ~1e-6 with the fused rational tanh (CPU, float32)."""
    return _gelu_tanh_fused(x) if _fast_path(x) else nn.gelu_approx(x)


@fuse
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


@fuse
def _gated_add(x, gate, y):
    return x + gate * y


def gated_residual(x, gate, y):
    """x + gate[:, None] * y for (B, L, D) x and y and a (B, D) gate, in one pass."""
    return _gated_add(x, gate[:, None], y)


def modulate(x, shift, scale, eps: float = 1e-6):
    """LayerNorm(x, no affine) * (1 + scale) + shift with (B, D) shift/scale, as diffusers' AdaLayerNorm* do.

    With one conditioning row (the usual batch of 1) the modulation is LayerNorm's own weight and bias: one pass.
    """
    if shift.shape[0] == 1:
        return mx.fast.layer_norm(x, 1.0 + scale[0], shift[0], eps)
    return mx.fast.layer_norm(x, None, None, eps) * (1.0 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------------------------
# attention


@functools.cache
def _cpu_streams():
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


def attention(q, k, v, heads: int, scale: float | None = None):
    """Multi-head softmax attention on (B, L, H*D) projections -> (B, L, H*D). scale=None: D**-0.5."""
    B, L, _ = q.shape
    q, k, v = (mx.contiguous(t.reshape(B, t.shape[1], heads, -1).transpose(0, 2, 1, 3)) for t in (q, k, v))
    return sdpa(q, k, v, scale)


def sdpa(q, k, v, scale: float | None = None, max_scores: int = 1 << 22):
    """softmax(q k^T * scale) v for (B, H, L, D) inputs, returned merged as (B, L, H*D). scale=None: D**-0.5.

    On the CPU the work is cut into chunks of one head and as many query rows as keep the chunk's scores within
    `max_scores` values (cache-sized, and a few big GEMMs rather than many thin ones), alternating between two
    streams; in float32 the softmax uses the fused exponential above (output relative error ~5e-6) and
    normalises after the second matmul.
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if not on_cpu():
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        return o.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    if scale != 1.0:
        q = q * scale
    v = mx.contiguous(v)  # sliced once per chunk below
    fast = _fast_path(q)
    rows = max(1, min(L, max_scores // (B * S)))
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


@fuse
def _rotate_pairs(x, x_swapped, cos, sin):
    return x * cos + x_swapped * sin


def apply_rope(x, freqs):
    """diffusers' apply_rotary_emb (use_real, interleaved pairs), also moving heads first: (B, L, H, D) -> (B, H, L, D).

    freqs = (cos, sin), each (L, D): diffusers' repeat-interleaved tables with the rotation's sign folded into sin
    (entries 2i negated), so out = x * cos + swap_pairs(x) * sin. One fused pass over strided views writes the
    contiguous head-first layout the attention matmuls want. Like diffusers, rotates in float32 and casts back.
    """
    B, L, H, D = x.shape
    pairs = x.reshape(B, L, H, D // 2, 2).transpose(0, 2, 1, 3, 4)
    cos, sin = (t.reshape(1, L, D // 2, 2) for t in freqs)
    return _rotate_pairs(pairs, pairs[..., ::-1], cos, sin).reshape(B, H, L, D).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# embeddings


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: int = 10000):
    """diffusers' get_timestep_embedding: (N,) timesteps -> (N, dim) float32 [sin, cos] (or [cos, sin])."""
    half = dim // 2
    # The frequency table in float32 exactly as torch builds it, the exp correctly rounded.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = scale * (timesteps.astype(mx.float32)[:, None] * freqs[None])
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class PixArtAlphaTextProjection(nn.Module):
    """linear_1 -> act_1 (GELU-tanh or SiLU) -> linear_2."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None, act_fn="gelu_tanh"):
        super().__init__()
        if act_fn not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {act_fn!r}")
        self.act_fn = act_fn
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, out_features or hidden_size)

    def __call__(self, x):
        h = self.linear_1(x)
        return self.linear_2(nn.silu(h) if self.act_fn == "silu" else gelu_tanh(h))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = timestep_embedder(sinusoid(t)) [+ guidance_embedder(sinusoid(g))] + text_embedder(pooled).

    diffusers' CombinedTimestepTextProjEmbeddings (SD3, FLUX schnell) or, with `guidance`,
    CombinedTimestepGuidanceTextProjEmbeddings (FLUX dev). Sinusoids: 256 channels, cos first, no shift.
    """

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(256, embedding_dim)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu")

    def __call__(self, timestep, pooled_projection, guidance=None):
        def proj(t):
            sinusoid = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
            return sinusoid.astype(pooled_projection.dtype)

        emb = self.timestep_embedder(proj(timestep))
        if "guidance_embedder" in self:
            if guidance is None:
                raise ValueError("this model embeds the guidance scale (FLUX dev): pass `guidance`")
            emb = emb + self.guidance_embedder(proj(guidance))
        return emb + self.text_embedder(pooled_projection)


# ---------------------------------------------------------------------------------------------------------------
# adaptive norms and the MLP


class AdaLayerNormZero(nn.Module):
    """linear(SiLU(emb)) -> shift/scale/gate for attention and MLP; returns the modulated x and the other four."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim, bias=bias)

    def __call__(self, x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mx.split(self.linear(nn.silu(emb)), 6, -1)
        return modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """linear(SiLU(emb)) -> shift, scale, gate; returns (modulated x, gate)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * dim, bias=bias)

    def __call__(self, x, emb):
        shift, scale, gate = mx.split(self.linear(nn.silu(emb)), 3, -1)
        return modulate(x, shift, scale), gate


class AdaLayerNormContinuous(nn.Module):
    """norm_out of FLUX and SD3: LayerNorm(x) * (1 + scale) + shift, with (scale, shift) = linear(SiLU(cond)).

    Note the order: scale first (BFL checkpoints store shift first). Only the affine-free LayerNorm both models use.
    """

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)

    def __call__(self, x, cond):
        scale, shift = mx.split(self.linear(nn.silu(cond).astype(x.dtype)), 2, -1)
        return modulate(x, shift, scale, self.eps)


class GELU(nn.Module):
    """diffusers' GELU(approximate="tanh"): proj -> GELU-tanh."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def __call__(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): `net.0.proj` -> GELU-tanh -> `net.2`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        inner_dim = inner_dim or int(dim * mult)
        # net.1 is diffusers' Dropout: no parameters, kept so the names line up.
        self.net = [GELU(dim, inner_dim, bias=bias), nn.Dropout(0.0), nn.Linear(inner_dim, dim_out or dim, bias=bias)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))
