"""diffusers' `AutoencoderKL` in MLX: the image VAE of FLUX.1 and SD3 (16 latent channels, no quant convs) and of
SD 1.x/2.x/XL (4 channels, quant convs).

Parameter names equal diffusers' state_dict names, so a diffusers checkpoint loads by identity (conv kernels in MLX's
OHWI layout). Tensors are NHWC. `encode` returns the posterior's (mean, logvar); `decode` returns the raw decoder
output (unclamped, like `vae.decode(z).sample`). The latent scaling/shift is the pipeline's job, as in diffusers;
the config carries it.

The CPU fast paths of its GroupNorm+SiLU and convolutions (Winograd, bands of rows on large maps, which call
`mx.eval` internally: do not wrap `encode`/`decode` in `mx.compile`) are in `backends.cpu`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..backends import cpu
from .config import config_kwargs
from .layers import Linear


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


# --- GroupNorm and convolution: parameters here, the computation in `backends.cpu` ---------------------------------


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (statistics over H, W and each group's channels), optionally fused with SiLU."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x, act: bool = False, rows: bool = False):
        """`rows`: the result goes to a conv, which may read it band by band (see `cpu.Rows`)."""
        return cpu.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act, rows)


class Conv2d(nn.Module):
    """A conv with torch's parameters (weight OHWI, bias) on NHWC input; `padding` may be ((top, left), (bottom,
    right)) as in `mx.conv_general`. A module in training mode (MLX modules start in it; loading a model switches it
    to eval) uses no Winograd transform on the CPU: backpropagating through it is slower (see `cpu.conv2d`)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding=0):
        super().__init__()
        self.weight = mx.zeros((cout, k, k, cin))
        self.bias = mx.zeros((cout,))
        self.stride, self.padding = stride, padding

    def __call__(self, x, upsample: bool = False, residual=None):
        return cpu.conv2d(x, self.weight, self.bias, self.stride, self.padding, upsample, not self.training, residual)


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
        # Large maps are read in bands (`cpu.Rows`): the normalized inputs, the shortcut and the sum are never made
        # whole; the decoder's last blocks hold a few 0.5-1 GB maps at 1024x1024.
        h = self.conv1(self.norm1(x, act=True, rows=True))
        skip = cpu.Rows(x, self.conv_shortcut, self.conv_shortcut.weight.shape[0]) if "conv_shortcut" in self else x
        return self.conv2(self.norm2(h, act=True, rows=True), residual=skip)


class Attention(nn.Module):
    """The VAE mid-block self-attention: GroupNorm, one head over all H*W positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = [Linear(channels, channels)]

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        o = cpu.attention(q, k, v, scale=1.0 / math.sqrt(C))  # at 1024x1024: 16,384 positions, 2^28 scores
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

    @property
    def layers(self):
        return [*self.resnets, *self.downsamplers] if "downsamplers" in self else self.resnets

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample2D(cout)]

    @property
    def layers(self):
        return [*self.resnets, *self.upsamplers] if "upsamplers" in self else self.resnets

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


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
        for layer in [layer for b in self.down_blocks for layer in b.layers]:  # not b(x): see Decoder
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, act=True, rows=True))


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
        # One loop over every block's layers: calling a block would keep its input alive (held by this frame) through
        # all of the block's layers, and the last block's input at 1024x1024 is a 1 GB map.
        for layer in [layer for b in self.up_blocks for layer in b.layers]:
            x = layer(x)
        return self.conv_out(self.conv_norm_out(x, act=True, rows=True))


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
