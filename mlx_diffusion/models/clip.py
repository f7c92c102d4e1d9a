"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection) in MLX.

FLUX uses CLIP-L's pooled output; SD3 uses CLIP-L and CLIP-G with projection: the projected pooled output
(`text_embeds`) and the penultimate layer's hidden states (`hidden_states[-2]`). Parameter names are transformers'
as released checkpoints store them (`text_model.embeddings...`, `text_projection.weight`), so a diffusers
`text_encoder/` folder loads by identity once `sanitize` has dropped buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..backends import cpu
from .config import config_kwargs
from .layers import ACTIVATIONS, Embedding, Linear


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # Not a transformers config key: set from `architectures` by `from_dict` (SD3's encoders have a projection).
    with_projection: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        d = d.get("text_config", d)  # a full CLIPConfig nests the text part
        kw = config_kwargs(cls, d)
        if "with_projection" not in kw:
            kw["with_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        return cls(**kw)


class CLIPOutput(NamedTuple):
    last_hidden_state: mx.array  # (B, T, hidden), after final_layer_norm
    pooler_output: mx.array  # (B, hidden): final_layer_norm output at the EOS position
    hidden_states: tuple | None = None  # embeddings, then each layer's output (the last one before final_layer_norm)
    text_embeds: mx.array | None = None  # (B, projection_dim), with_projection only


def sanitize(weights: dict) -> dict:
    """Make a saved CLIP text encoder's tensors load strictly into `CLIPTextModel`.

    Drops the `position_ids` buffers that transformers < 4.31 saved (and some converted files still hold), and puts
    back the `text_model.` prefix that transformers >= 5 leaves out when saving a plain `CLIPTextModel`.
    """
    out = {}
    for k, v in weights.items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        out[k] = v
    return out


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (d // self.num_heads) ** -0.5
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape

        def heads(y):
            return y.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """`model(input_ids) -> CLIPOutput`. Causal attention and no padding mask, as diffusers runs it."""

    def __init__(self, config: CLIPTextConfig, with_projection: bool | None = None):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection if with_projection is None else with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def _eos_positions(self, input_ids: mx.array) -> mx.array:
        # transformers: configs with the pre-2023 eos_token_id 2 pool at argmax(ids) (the EOS token has the largest
        # id); newer ones at the first `eos_token_id`. Ties resolve to the first position in both, made explicit
        # here with a min over positions rather than relying on argmax's tie-breaking.
        eos = self.config.eos_token_id
        is_eos = input_ids == (input_ids.max(axis=-1, keepdims=True) if eos == 2 else eos)
        T = input_ids.shape[1]
        first = mx.min(mx.where(is_eos, mx.arange(T), T), axis=-1)
        # Like torch's argmax over an all-False row, a sequence without EOS pools position 0.
        return mx.where(first == T, 0, first)

    def __call__(self, input_ids: mx.array, output_hidden_states: bool = False) -> CLIPOutput:
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden_states = [x] if output_hidden_states else None
        for layer in tm.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        x = tm.final_layer_norm(x)
        pooled = x[mx.arange(x.shape[0]), self._eos_positions(input_ids)]
        text_embeds = self.text_projection(pooled) if "text_projection" in self else None
        return CLIPOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None, text_embeds)
