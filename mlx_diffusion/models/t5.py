"""T5 v1.1 encoder (transformers' T5EncoderModel) in MLX: the long-prompt text encoder of FLUX and SD3.

T5 differs from a textbook transformer in ways that all matter numerically: RMSNorm without mean subtraction or bias,
no 1/sqrt(d) attention scaling (folded into the initialisation), a learned relative position bias owned by the first
block and added in every block, and (v1.1) a gated-GELU feed-forward with the tanh approximation. Parameter names are
transformers' (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from ..backends import cpu
from .config import FromDict
from .layers import ACTIVATIONS, Embedding, Linear


@dataclass
class T5Config(FromDict):
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers maps the legacy name "gated-gelu" to the tanh approximation, other names literally.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


# act(gate) * linear fused into one elementwise pass (MLX's CPU runs elementwise work on a single core).
_GATED = {name: cpu.compile(lambda g, l, f=f: f(g) * l, shapeless=True) for name, f in ACTIVATIONS.items()}


def sanitize(weights: dict) -> dict:
    """Make a saved T5 encoder's tensors load strictly into `T5EncoderModel`.

    `encoder.embed_tokens.weight` is tied to `shared.weight`: some files hold both, some (FLUX's text_encoder_2)
    only `shared`, single-file exports sometimes only `encoder.embed_tokens`. A full encoder-decoder checkpoint's
    decoder and LM head are dropped.
    """
    out = {k: v for k, v in weights.items() if not k.startswith(("decoder.", "lm_head."))}
    tied = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and tied is not None:
        out["shared.weight"] = tied
    return out


@lru_cache(maxsize=16)
def _relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 buckets of key - query positions, bidirectional, as transformers computes them.

    The log-spaced part is evaluated in float32 like the reference, so that truncation lands on the same bucket.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    num_buckets //= 2
    buckets = (rel > 0) * num_buckets
    rel = np.abs(rel)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) at distances below max_exact, unused there
        large = np.log(rel.astype(np.float32) / np.float32(max_exact))
        large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
        large = np.minimum(max_exact + large.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, T, _ = x.shape

        def heads(y):
            return y.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return self.o(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nn.Module):
    """T5's feed-forward (the name is historical): wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = (_GATED if config.is_gated else ACTIVATIONS)[config.dense_act_fn]
        if config.is_gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if "wi" in self:
            return self.wo(self.act(self.wi(x)))
        return self.wo(self.act(self.wi_0(x), self.wi_1(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """`model(input_ids, attention_mask=None) -> last_hidden_state` (B, T, d_model)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def position_bias(self, length: int, attention_mask: mx.array | None = None, dtype=mx.float32) -> mx.array:
        """Additive attention bias shared by all blocks: (1, H, T, T), or (B, H, T, T) with a padding mask."""
        c = self.config
        n, dist = c.relative_attention_num_buckets, c.relative_attention_max_distance
        buckets = _relative_position_buckets(length, n, dist)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, H)
        bias = table.T.astype(dtype)[:, mx.array(buckets)][None]
        if attention_mask is None:
            return bias
        # As transformers does with SDPA: masked keys get the dtype's minimum instead of bias + mask.
        keep = attention_mask.astype(mx.bool_)[:, None, None, :]
        return mx.where(keep, bias, mx.array(mx.finfo(dtype).min, dtype))

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[1], attention_mask, x.dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
