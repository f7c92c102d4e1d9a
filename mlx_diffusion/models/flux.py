"""FLUX.1 (schnell, dev): diffusers' FluxTransformer2DModel in MLX.

Parameter names are exactly diffusers' (`transformer_blocks.N.attn.add_q_proj.weight`, ...), so a diffusers
checkpoint loads by identity. Layout choices, all numerically neutral:
- The single-stream blocks see one (B, text + image, D) sequence: diffusers concatenates and splits it inside every
  single block; here that happens once around the stack.
- RoPE tables are built once per call on the host in float64 (as diffusers' FluxPosEmbed does on the CPU) and shared
  by every block; the softmax scale is folded into the query tables.
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
    AdaLayerNormZeroSingle,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    Linear,
    apply_rope,
    gated_residual,
    gelu_tanh,
    modulate,
)


@dataclass
class FluxConfig(FromDict):
    """diffusers' FluxTransformer2DModel config (transformer/config.json); defaults are diffusers' (FLUX.1)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


def rope(ids, axes_dims, theta: float = 10000.0):
    """diffusers' FluxPosEmbed: (L, n_axes) positions -> (cos, sin), float32 (L, sum(axes_dims)), for `apply_rope`.

    Axis i's d_i channels rotate in interleaved pairs by pos_i * theta^(-2j / d_i), j < d_i / 2. Angles in float64
    as diffusers computes them on the CPU; sin's even entries negated (the rotation's sign, see `apply_rope`).
    """
    pos = np.asarray(ids, dtype=np.float32).astype(np.float64)
    inv_freqs = [1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims]
    angles = np.concatenate([np.outer(pos[:, i], f) for i, f in enumerate(inv_freqs)], axis=1)
    cos = np.repeat(np.cos(angles), 2, axis=1)
    sin = np.stack([-np.sin(angles), np.sin(angles)], axis=-1).reshape(cos.shape)
    return mx.array(cos.astype(np.float32)), mx.array(sin.astype(np.float32))


class FluxAttention(nn.Module):
    """diffusers' FluxAttention: q/k RMSNorm per head, RoPE, softmax attention over [text, image] tokens.

    `context=True` adds the text stream's projections (double blocks); `pre_only` drops `to_out` (single blocks).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool = False, pre_only: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        if not pre_only:
            self.to_out = [Linear(inner, dim)]
        if context:
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            self.to_add_out = Linear(inner, dim)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        B, L, _ = x.shape
        q = norm_q(to_q(x).reshape(B, L, self.heads, -1))
        k = norm_k(to_k(x).reshape(B, L, self.heads, -1))
        return q, k, to_v(x).reshape(B, L, self.heads, -1)

    def __call__(self, x, freqs, context=None):
        """x: (B, L, D) (single blocks: text + image tokens); context: (B, T, D) text (double blocks).

        freqs: (query tables with the softmax scale folded in, key tables), each a `rope` (cos, sin) pair.
        Returns the (B, T + L, inner) attention output, or (image out, text out) with `context`.
        """
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                                   self.norm_added_k)
            q, k, v = (mx.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
        out = cpu.attention(apply_rope(q, freqs[0]), apply_rope(k, freqs[1]), v.transpose(0, 2, 1, 3), scale=1.0)
        if context is None:
            return out
        T = context.shape[1]
        return self.to_out[0](out[:, T:]), self.to_add_out(out[:, :T])


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text streams with their own norms/MLPs and one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, context=True)
        self.ff = FeedForward(dim, dim)
        self.ff_context = FeedForward(dim, dim)

    def __call__(self, x, c, temb, freqs):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(nx, freqs, context=nc)
        x = gated_residual(x, gate_msa, attn_x)
        x = gated_residual(x, gate_mlp, self.ff(modulate(x, shift_mlp, scale_mlp)))
        c = gated_residual(c, c_gate_msa, attn_c)
        c = gated_residual(c, c_gate_mlp, self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp)))
        return c, x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on [text, image] tokens: attention and MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = Linear(dim, mlp_dim)
        self.proj_out = Linear(dim + mlp_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, pre_only=True)

    def __call__(self, x, temb, freqs):
        nx, gate = self.norm(x, temb)
        mlp = gelu_tanh(self.proj_mlp(nx))
        out = self.proj_out(mx.concatenate([self.attn(nx, freqs), mlp], axis=-1))
        return gated_residual(x, gate, out)


class FluxTransformer2DModel(nn.Module):
    """diffusers' FluxTransformer2DModel (without ControlNet / IP-Adapter inputs)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        c, dim = config, config.inner_dim
        heads, head_dim = c.num_attention_heads, c.attention_head_dim
        if sum(c.axes_dims_rope) != head_dim:
            raise ValueError(f"axes_dims_rope {c.axes_dims_rope} must sum to attention_head_dim {head_dim}")
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = Linear(c.joint_attention_dim, dim)
        self.x_embedder = Linear(c.in_channels, dim)
        self.transformer_blocks = [FluxTransformerBlock(dim, heads, head_dim) for _ in range(c.num_layers)]
        self.single_transformer_blocks = [
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        ]
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = Linear(dim, c.patch_size * c.patch_size * c.output_channels)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        """Velocity for packed latents.

        hidden_states (B, L, in_channels); encoder_hidden_states (B, T, joint_attention_dim); pooled_projections
        (B, pooled_projection_dim); timestep (B,) in [0, 1] (FluxPipeline passes t / 1000); img_ids (L, 3) and
        txt_ids (T, 3) (a leading batch axis is dropped, as diffusers does); guidance (B,) the guidance scale for
        guidance-distilled models (dev; required there, ignored otherwise). Returns (B, L, patch_size² * out_channels).
        """
        x_in, x, c, temb = self.first_block(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                            img_ids, txt_ids, guidance)
        return self.output(self.remaining_blocks(x, c, temb, img_ids, txt_ids), temb)

    # The forward in three parts, for the first-block cache (pipelines/step_cache.py), which looks at how much the
    # first block changed the image stream before deciding whether to run the rest.
    def first_block(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                    guidance=None):
        """(image stream into the first double block, image and text streams out of it, the conditioning)."""
        x = self.x_embedder(hidden_states)
        timestep = timestep.astype(x.dtype) * 1000
        if guidance is not None:
            guidance = guidance.astype(x.dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        c = self.context_embedder(encoder_hidden_states)
        if not self.transformer_blocks:
            return x, x, c, temb
        c2, x2 = self.transformer_blocks[0](x, c, temb, self._freqs(img_ids, txt_ids))
        return x, x2, c2, temb

    def remaining_blocks(self, x, c, temb, img_ids, txt_ids):
        """The image stream after every block but the first."""
        freqs = self._freqs(img_ids, txt_ids)
        for block in self.transformer_blocks[1:]:
            c, x = block(x, c, temb, freqs)
        T = c.shape[1]
        x = mx.concatenate([c, x], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, freqs)
        return x[:, T:]

    def output(self, x, temb):
        return self.proj_out(self.norm_out(x, temb))

    def _freqs(self, img_ids, txt_ids):
        ids = np.concatenate([_ids2d(txt_ids), _ids2d(img_ids)], axis=0)
        k_freqs = rope(ids, self.config.axes_dims_rope)
        return tuple(t * self.config.attention_head_dim**-0.5 for t in k_freqs), k_freqs


def _ids2d(ids) -> np.ndarray:
    ids = np.asarray(ids.astype(mx.float32) if isinstance(ids, mx.array) else ids)
    return ids[0] if ids.ndim == 3 else ids
