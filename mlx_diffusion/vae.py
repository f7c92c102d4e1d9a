"""diffusers' `AutoencoderKL` in MLX: the image VAE of FLUX.1 and SD3 (16 latent channels, no quant convs) and of
SD 1.x/2.x/XL (4 channels, quant convs).

Parameter names equal diffusers' state_dict names, so a diffusers checkpoint loads by identity (conv kernels in MLX's
OHWI layout). Tensors are NHWC. `encode` returns the posterior's (mean, logvar); `decode` returns the raw decoder
output (unclamped, like `vae.decode(z).sample`). The latent scaling/shift is the pipeline's job, as in diffusers;
the config carries it.

Speed on CPU, where MLX runs elementwise ops on one core, evaluates exp/sigmoid at ~11 ns per element and convolves
through a 9x im2col buffer:
- GroupNorm is two short reductions plus one affine pass; SiLU uses a rational tanh (Eigen's, no exp).
- 3x3 convs are Winograd F(4x4, 3x3): 36 GEMMs, 2.25 instead of 9 multiply-adds per output; the decoder's nearest x2
  upsampling is folded into the following conv's input transform.
- Large maps run in bands of rows that are evaluated one by one (`BAND_ELEMENTS`), which bounds peak memory; so
  `encode`/`decode` on large inputs call `mx.eval` internally (do not wrap them in `mx.compile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import config_kwargs
from .layers import fuse, on_cpu

# Scratch memory budget, in elements, of one band of a large conv or GroupNorm+SiLU: large maps are processed in bands
# of rows, each evaluated into its slice of a preallocated output. Bounds e.g. a 1024^2 decode's peak memory.
BAND_ELEMENTS = 1 << 26
# Winograd 3x3 convs on the CPU (inference). Training turns them off: backpropagating through the transforms is ~3x
# slower than through `mx.conv_general` at the built-in model's small channel counts (mlx_diffusion.train).
CPU_WINOGRAD = True


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int = 32

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        cfg = cls(**config_kwargs(cls, d))
        if cfg.act_fn not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL act_fn {cfg.act_fn!r} is not supported (only silu)")
        n = len(cfg.block_out_channels)
        if cfg.down_block_types != ("DownEncoderBlock2D",) * n or cfg.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"unsupported block types {cfg.down_block_types} / {cfg.up_block_types}")
        return cfg


# --- GroupNorm (+ SiLU) -----------------------------------------------------------------------------------------------

# Eigen's float tanh: x * P(x^2) / Q(x^2) on [-c, c], exactly +-1 beyond.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _horner(z, coeffs):
    acc = z * coeffs[0] + coeffs[1]
    for c in coeffs[2:]:
        acc = acc * z + c
    return acc


# SiLU runs as two compiled kernels on contiguous data. A single fused graph is deeper than MLX's fusion limit and
# gets split at arbitrary points, and min/max (clip) in a kernel keep g++ from vectorizing it: hence `where`.
@fuse
def _tanh_num_den(u):
    c = mx.where(u > _TANH_CLAMP, _TANH_CLAMP, mx.where(u < -_TANH_CLAMP, -_TANH_CLAMP, u))
    z = c * c
    return c * _horner(z, _TANH_P), _horner(z, _TANH_Q)


@fuse
def _silu_finish(u, num, den):
    return u + u * (num / den)


def _silu_from_half(u):
    """silu(2u) = 2u * sigmoid(2u) = u * (1 + tanh(u)), with tanh from polynomials only (no exp)."""
    return _silu_finish(u, *_tanh_num_den(u))


def silu(x):
    """SiLU without exp: within ~1 float32 ulp of |x| (absolute error <= 2.2e-6 for x << 0, where it underflows)."""
    return _silu_from_half(0.5 * x)


def _group_sum(a):
    """(B, H, W, G, Cg) -> (B, 1, 1, G, 1) sums, in three short float32 accumulations (W, then Cg, then H terms)."""
    return a.sum(axis=2, keepdims=True).sum(axis=4, keepdims=True).sum(axis=1, keepdims=True)


@fuse
def _group_norm_affine(g, weight, bias, eps: float, factor: float):
    """Per-(sample, channel) scale and shift of GroupNorm on g = (B, H, W, G, Cg), both times `factor`.

    Compiled apart from the elementwise pass so that MLX does not fuse this small math into it (per element).
    """
    n = g.shape[1] * g.shape[2] * g.shape[4]
    mean = _group_sum(g) / n
    var = _group_sum(mx.square(g - mean)) / n  # two passes: no E[x^2] - E[x]^2 cancellation
    scale = weight.reshape(g.shape[3], -1) * (factor * mx.rsqrt(var + eps))
    return scale, factor * bias.reshape(g.shape[3], -1) - mean * scale


@fuse
def _affine(x, scale, shift):
    return x * scale + shift


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (statistics over H, W and each group's channels), optionally fused with SiLU."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x, act: bool = False):
        B, H, W, C = x.shape
        g = x.reshape(B, H, W, self.num_groups, C // self.num_groups)
        scale, shift = _group_norm_affine(g, self.weight, self.bias, self.eps, 0.5 if act else 1.0)

        def normalize(g):  # act: SiLU's 1/2 is folded into the affine
            y = _affine(g, scale, shift)
            return _silu_from_half(y) if act else y

        # SiLU keeps three full-size temporaries alive: on large maps, run it in bands of rows
        rows = max(1, BAND_ELEMENTS // (4 * B * W * C))
        if not act or rows >= H:
            return normalize(g).reshape(B, H, W, C)
        y = mx.zeros(g.shape, dtype=x.dtype)
        for r in range(0, H, rows):
            y[:, r : r + rows] = normalize(g[:, r : r + rows])
            mx.eval(y)  # in place: y's buffer is donated to the update
        return y.reshape(B, H, W, C)


# --- convolution ------------------------------------------------------------------------------------------------------

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


@fuse
def _winograd_in(p, nt: int, ns: int, offsets: tuple, step: int):
    """Input tiles B^T d B; tile (i, j) row k is p's row offsets[k] + step * i (columns alike)."""
    rows = [p[:, o : o + step * nt : step] for o in offsets]
    out = []
    for a in range(_T):
        r = _lincomb(_WINO_BT[a], rows)
        cols = [r[:, :, o : o + step * ns : step] for o in offsets]
        out += [_lincomb(_WINO_BT[b], cols) for b in range(_T)]
    return out


@fuse
def _winograd_out(m, bias):
    """Output tiles A^T m A + bias, interleaved to (B, nt, 4, ns, 4, O)."""
    tiles = []
    for i in range(_M):
        row = [_lincomb([_WINO_AT[i][a] for a in range(_T)], m[b::_T]) for b in range(_T)]
        tiles.append(mx.stack([_lincomb(_WINO_AT[j], row) + bias for j in range(_M)], axis=3))
    return mx.stack(tiles, axis=2)


@fuse
def _sum_shifted_taps(y, H: int, W: int, O: int):
    """y: (B, rows, 9 * O) products of the flattened padded input with each tap's weights -> (B, H * (W + 2), O)."""
    n, wp = H * (W + 2), W + 2
    return _lincomb([1] * 9, [y[:, dy * wp + dx : dy * wp + dx + n, (3 * dy + dx) * O : (3 * dy + dx + 1) * O]
                              for dy in range(3) for dx in range(3)])


def _conv3x3_shifted(x, weight, bias):
    """Few output channels: one GEMM of the flattened padded input with all 9 taps, then 9 shifted slices summed."""
    B, H, W, C = x.shape
    O = weight.shape[0]
    p = mx.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]).reshape(B, -1, C)  # one extra row keeps the shifts in bounds
    y = p @ weight.transpose(3, 1, 2, 0).reshape(C, 9 * O)
    return _sum_shifted_taps(y, H, W, O).reshape(B, H, W + 2, O)[:, :, :W] + bias


def conv3x3(x, weight, bias, upsample: bool = False):
    """3x3 conv, stride 1, zero padding 1, of NHWC `x`, or of `x` upsampled 2x (nearest) when `upsample`.

    Winograd, except where the input or the output has few channels (e.g. the decoder's conv_out, the encoder's
    conv_in): there the transforms cost more than they save. The upsampled map is never built: its tiles are read
    from `x` with a stride of 2 and repeated rows/columns. Large maps are done in bands of tile rows, each evaluated
    into its slice of the output.
    """
    B, H, W, C = x.shape
    O = weight.shape[0]
    if not upsample and 9 * O <= C:
        return _conv3x3_shifted(x, weight, bias)
    if not upsample and 9 * C <= O:  # MLX's im2col buffer is small here
        return mx.conv_general(x, weight, padding=1) + bias
    f = 2 if upsample else 1
    nt, ns = -(-f * H // _M), -(-f * W // _M)
    if upsample:  # padded upsampled row 4i + k is padded x's row 2i + (k + 1) // 2
        step, offsets = 2, tuple((k + 1) // 2 for k in range(_T))
        p = mx.pad(x, [(0, 0), (1, 2 * nt + 1 - H), (1, 2 * ns + 1 - W), (0, 0)])
    else:
        step, offsets = _M, tuple(range(_T))
        p = mx.pad(x, [(0, 0), (1, 1 + _M * nt - H), (1, 1 + _M * ns - W), (0, 0)])
    u = winograd_weights(weight)

    def band(t0, t1):
        v = _winograd_in(p[:, step * t0 : step * t1 + offsets[-1] + 1 - step], t1 - t0, ns, offsets, step)
        m = [(v[i].reshape(-1, C) @ u[i]).reshape(B, t1 - t0, ns, O) for i in range(_T * _T)]
        return _winograd_out(m, bias)  # (B, t1 - t0, 4, ns, 4, O)

    rows = max(1, BAND_ELEMENTS // (_T * _T * B * ns * max(C, O)))
    if rows >= nt:
        y = band(0, nt)
    else:
        y = mx.zeros((B, nt, _M, ns, _M, O), dtype=x.dtype)
        for t0 in range(0, nt, rows):
            y[:, t0 : t0 + rows] = band(t0, min(nt, t0 + rows))
            mx.eval(y)  # in place: y's buffer is donated to the update
    y = y.reshape(B, _M * nt, _M * ns, O)
    return y if (_M * nt, _M * ns) == (f * H, f * W) else y[:, : f * H, : f * W]


class Conv2d(nn.Module):
    """A conv with torch's parameters (weight OHWI, bias) on NHWC input; `padding` may be ((top, left), (bottom,
    right)) as in `mx.conv_general`.

    On the CPU 3x3 stride-1 convs run through `conv3x3` (Winograd; its kernel transform is cheap next to the conv,
    so it is not cached); 1x1 convs are one matmul; anything else, and every conv on a GPU, is `mx.conv_general`.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding=0):
        super().__init__()
        self.weight = mx.zeros((cout, k, k, cin))
        self.bias = mx.zeros((cout,))
        self.stride, self.padding = stride, padding

    def __call__(self, x, upsample: bool = False):
        w = self.weight
        if w.shape[1:3] == (3, 3) and self.stride == 1 and self.padding == 1 and CPU_WINOGRAD and on_cpu():
            return conv3x3(x, w, self.bias, upsample)
        if upsample:  # nearest x2
            B, H, W, C = x.shape
            x = mx.broadcast_to(x[:, :, None, :, None], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        if w.shape[1:3] == (1, 1) and self.stride == 1 and self.padding == 0:
            return x @ w.reshape(w.shape[0], -1).T + self.bias
        return mx.conv_general(x, w, stride=self.stride, padding=self.padding) + self.bias


# --- blocks -----------------------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = Conv2d(cin, cout, 1)

    def __call__(self, x):
        h = self.conv1(self.norm1(x, act=True))
        h = self.conv2(self.norm2(h, act=True))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class Attention(nn.Module):
    """The VAE mid-block self-attention: GroupNorm, one head over all H*W positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.to_out[0](o).reshape(B, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        if attention:
            self.attentions = [Attention(channels, groups)]

    def __call__(self, x):
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 0), (1, 1)))  # diffusers pads (0, 1, 0, 1)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        return self.conv(x, upsample=True)  # nearest x2, then the conv


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample2D(cout)]

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, act=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(x, act=True))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(c, c, 1)

    def encode(self, x):
        """Image (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        h = self.encoder(x)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Latent (B, h, w, latent_channels), unscaled -> image (B, h*f, w*f, out_channels), unclamped."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)
