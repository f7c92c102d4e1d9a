"""Stable Diffusion 3 / 3.5 MMDiT: diffusers' SD3Transformer2DModel in MLX.

Parameter names are exactly diffusers' (`transformer_blocks.N.attn.add_q_proj.weight`, `pos_embed.pos_embed`, ...),
so a diffusers checkpoint loads by identity. The building blocks are FLUX's (`layers.py`); SD3 differs in the
patch embedding with a centre-cropped position table instead of RoPE, optional q/k RMSNorm (3.5), a last block
whose text stream ends after attention (`context_pre_only`) and dual-attention blocks (3.5). Numerically neutral
layout choices:
- The stride-p patch convolution is a reshape and one GEMM, with the cropped position table added by that GEMM.
- Joint attention puts image tokens first, as diffusers does; q/k/v are written head-first by the concatenation
  itself rather than concatenated and then transposed.
- The last block's text queries are not computed: diffusers computes and discards them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backends import cpu
from .config import FromDict
from .layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    Linear,
    gated_residual,
    modulate,
)


@dataclass
class SD3Config(FromDict):
    """diffusers' SD3Transformer2DModel config (transformer/config.json); defaults are diffusers'."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple = ()
    qk_norm: str | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels


def sincos_pos_embed(dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed on a square grid: (grid_size², dim) float32, row-major positions.

    Channels [0, dim/2) encode the column, [dim/2, dim) the row, each as [sin, cos]; positions in float32 and
    angles in float64, as diffusers computes them.
    """
    pos = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size) / np.float32(interpolation_scale)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 2 / 2.0))
    angles = np.outer(pos.astype(np.float64), omega)
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (grid_size, dim / 2)
    col = np.broadcast_to(emb[None, :, :], (grid_size, grid_size, emb.shape[1]))
    row = np.broadcast_to(emb[:, None, :], (grid_size, grid_size, emb.shape[1]))
    return np.concatenate([col, row], axis=-1).reshape(grid_size * grid_size, dim).astype(np.float32)


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed as SD3 uses it: p x p patches -> `proj` (a stride-p conv), plus a position table.

    `pos_embed` (1, M², D) is a saved buffer in diffusers' checkpoints (M = pos_embed_max_size); an H x W patch
    grid takes the H x W window at the centre of the M x M table (PatchEmbed.cropped_pos_embed).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, pos_embed_max_size: int, base_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)  # weight (D, p, p, C): MLX layout
        self.pos_embed = mx.array(sincos_pos_embed(dim, pos_embed_max_size, base_size))[None]

    def cropped_pos_embed(self, h: int, w: int):
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"patch grid {h}x{w} exceeds pos_embed_max_size {self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(self.max_size, self.max_size, -1)
        return table[top : top + h, left : left + w].reshape(h * w, -1)

    def __call__(self, x):
        """(B, C, H, W) latents -> (B, (H/p)(W/p), D) tokens in row-major patch order."""
        B, C, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        # Features ordered (dy, dx, c) to match the OHWI kernel; a remainder row/column is dropped, as the conv does.
        patches = x[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p).transpose(0, 2, 4, 3, 5, 1)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        bias = self.cropped_pos_embed(h, w).astype(weight.dtype) + self.proj.bias
        return cpu.linear(patches.reshape(B, h * w, -1), weight, bias)


class SD3Attention(nn.Module):
    """diffusers' Attention with JointAttnProcessor2_0: softmax attention over [image, text] tokens.

    `context=True` adds the text stream's projections (every joint block's `attn`; `attn2` has none), and
    `context_pre_only` drops `to_add_out` (last block). qk_norm "rms_norm" (SD3.5) normalises every head's q and k.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None = None, context: bool = False,
                 context_pre_only: bool = False, eps: float = 1e-6):
        super().__init__()
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"unsupported qk_norm {qk_norm!r} (SD3 uses None or 'rms_norm')")
        self.heads = heads
        inner = heads * head_dim
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.to_out = [Linear(inner, dim)]  # diffusers' to_out.1 is a Dropout, without parameters
        if qk_norm:
            self.norm_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        if context:
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            if qk_norm:
                self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
                self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            if not context_pre_only:
                self.to_add_out = Linear(inner, dim)

    def _heads(self, x, proj: str, norm: str):
        """(B, L, D) -> projection as a (B, H, L, head_dim) view, RMS-normalised per head where configured."""
        B, L, _ = x.shape
        t = self[proj](x).reshape(B, L, self.heads, -1)
        if norm in self:
            t = self[norm](t)
        return t.transpose(0, 2, 1, 3)

    def __call__(self, x, context=None, context_out: bool = True):
        """x (B, L, D) image tokens; context (B, T, D) text tokens or None (self-attention, `attn2`).

        Returns the image output, or (image out, text out) with a context; the text out is None when
        `context_out` is False, and then the text queries are never formed.
        """
        q = self._heads(x, "to_q", "norm_q")
        k = self._heads(x, "to_k", "norm_k")
        v = self._heads(x, "to_v", "")
        if context is None:
            return self.to_out[0](cpu.attention(mx.contiguous(q), mx.contiguous(k), v))
        if context_out:
            q = mx.concatenate([q, self._heads(context, "add_q_proj", "norm_added_q")], axis=2)
        else:
            q = mx.contiguous(q)
        k = mx.concatenate([k, self._heads(context, "add_k_proj", "norm_added_k")], axis=2)
        v = mx.concatenate([v, self._heads(context, "add_v_proj", "")], axis=2)
        out = cpu.attention(q, k, v)
        L = x.shape[1]
        if not context_out:
            return self.to_out[0](out), None
        return self.to_out[0](out[:, :L]), self.to_add_out(out[:, L:])


class SD35AdaLayerNormZeroX(nn.Module):
    """AdaLayerNormZero with a third (shift, scale, gate) for the dual-attention blocks' `attn2` (SD3.5)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear = Linear(dim, 9 * dim, bias=bias)

    def __call__(self, x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = mx.split(
            self.linear(nn.silu(emb)), 9, -1)
        return (modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(x, shift_msa2, scale_msa2), gate_msa2)


class JointTransformerBlock(nn.Module):
    """diffusers' JointTransformerBlock: image and text streams with their own norms/MLPs and one joint attention.

    `context_pre_only` (the last block): the text stream is only a key/value source and is not returned.
    `dual_attention` (SD3.5): a second, image-only self-attention `attn2` with its own modulation.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool = False,
                 qk_norm: str | None = None, dual_attention: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim, eps=1e-6) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = SD3Attention(dim, heads, head_dim, qk_norm, context=True, context_pre_only=context_pre_only)
        if dual_attention:
            self.attn2 = SD3Attention(dim, heads, head_dim, qk_norm)
        # norm2 / norm2_context: affine-free LayerNorms (no parameters), inside `modulate`.
        self.ff = FeedForward(dim, dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim, dim)

    def __call__(self, x, c, temb):
        """x (B, L, D) image, c (B, T, D) text, temb (B, D) -> (c or None, x)."""
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(x, temb)
        if self.context_pre_only:
            attn_x, _ = self.attn(nx, self.norm1_context(c, temb), context_out=False)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
            attn_x, attn_c = self.attn(nx, nc)
        x = gated_residual(x, gate_msa, attn_x)
        if self.dual_attention:
            nx2, gate_msa2 = dual
            x = gated_residual(x, gate_msa2, self.attn2(nx2))
        x = gated_residual(x, gate_mlp, self.ff(modulate(x, shift_mlp, scale_mlp)))
        if self.context_pre_only:
            return None, x
        c = gated_residual(c, c_gate_msa, attn_c)
        c = gated_residual(c, c_gate_mlp, self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp)))
        return c, x


class SD3Transformer2DModel(nn.Module):
    """diffusers' SD3Transformer2DModel (SD3, SD3.5; without ControlNet / IP-Adapter inputs)."""

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        if c.caption_projection_dim != dim:
            raise ValueError(f"caption_projection_dim {c.caption_projection_dim} must equal heads x head_dim {dim}")
        if not c.pos_embed_max_size:
            raise ValueError("pos_embed_max_size is required (every SD3 checkpoint sets it)")
        self.pos_embed = PatchEmbed(c.patch_size, c.in_channels, dim, c.pos_embed_max_size,
                                    c.sample_size // c.patch_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, c.pooled_projection_dim)
        self.context_embedder = Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = [
            JointTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, qk_norm=c.qk_norm,
                                  context_pre_only=i == c.num_layers - 1, dual_attention=i in c.dual_attention_layers)
            for i in range(c.num_layers)
        ]
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = Linear(dim, c.patch_size * c.patch_size * c.output_channels)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers=()):
        """Velocity for latents.

        hidden_states (B, C, H, W) latents (channels first, as diffusers); encoder_hidden_states (B, T,
        joint_attention_dim); pooled_projections (B, pooled_projection_dim); timestep (B,) or a scalar, the raw
        scheduler timestep in [0, 1000] (StableDiffusion3Pipeline does not divide it); skip_layers: block indices
        to skip (SD3.5 skip-layer guidance). Returns (B, out_channels, H, W) (H, W rounded down to the patch).
        """
        if skip_layers:
            B, _, H, W = hidden_states.shape
            x, c, temb = self._embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
            for i, block in enumerate(self.transformer_blocks):
                if i not in skip_layers:
                    c, x = block(x, c, temb)
            return self.output(x, temb, H, W)
        x_in, x, c, temb = self.first_block(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        return self.output(self.remaining_blocks(x, c, temb), temb, *hidden_states.shape[2:])

    # The forward in three parts, for the first-block cache (pipelines/step_cache.py)
    def _embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        B = hidden_states.shape[0]
        x = self.pos_embed(hidden_states)
        timestep = mx.broadcast_to(mx.array(timestep), (B,))
        temb = self.time_text_embed(timestep, pooled_projections)
        return x, self.context_embedder(encoder_hidden_states), temb

    def first_block(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """(tokens into the first block, image and text streams out of it, the conditioning)."""
        x, c, temb = self._embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        c2, x2 = self.transformer_blocks[0](x, c, temb)
        return x, x2, c2, temb

    def remaining_blocks(self, x, c, temb):
        for block in self.transformer_blocks[1:]:
            c, x = block(x, c, temb)
        return x

    def output(self, x, temb, H: int, W: int):
        """Final norm and projection, unpatched to (B, out_channels, H, W) (rounded down to the patch)."""
        B, p = x.shape[0], self.config.patch_size
        h, w = H // p, W // p
        x = self.proj_out(self.norm_out(x, temb))
        x = x.reshape(B, h, w, p, p, -1).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(B, -1, h * p, w * p)
