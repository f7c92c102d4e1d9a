"""Building blocks shared by the FLUX transformer and the SD3 MMDiT, with diffusers' parameter names and semantics,
and the quantized Linear layer every model may hold.

Mirrors diffusers' `embeddings.py` (sinusoidal timestep embedding, TimestepEmbedding, PixArtAlphaTextProjection,
CombinedTimestep[Guidance]TextProjEmbeddings), `normalization.py` (AdaLayerNormZero[Single], AdaLayerNormContinuous)
and `attention.py` (FeedForward with GELU-tanh). Attention itself and the activations are `backends.cpu` calls:
MLX's own ops on a GPU, fused fast paths on a CPU.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..backends import cpu
from ..errors import WeightsError

gelu_tanh = cpu.gelu_tanh

# transformers' activation names (CLIP's hidden_act, T5's dense_act_fn) -> the `backends.cpu` forms: on a CPU MLX's
# erf, tanh and sigmoid take ~45 ns a value on one core (T5-XXL's 24 GELUs: ~2.5 s a prompt, CLIP-G's 32: ~0.5 s)
ACTIVATIONS = {
    "quick_gelu": cpu.quick_gelu,
    "gelu": cpu.gelu,  # transformers' "gelu" is the exact erf form
    "gelu_new": cpu.gelu_tanh,
    "gelu_pytorch_tanh": cpu.gelu_tanh,
    "relu": nn.relu,
    "silu": cpu.silu,
    "swish": cpu.silu,
}


class Embedding(nn.Embedding):
    """nn.Embedding (the text encoders' token tables) whose table may be left in its weights file: `keep_in_file`
    swaps the `weight` parameter for a read-only memory map of the stored tensor, and a lookup then reads the rows of
    the prompt's tokens only. T5-XXL's 32128 x 4096 table is 0.5 GB in float32 (0.26 in bfloat16), of which a prompt
    touches a few hundred rows: kept as an array it is resident memory from load to release (diffusers maps its
    weights, so never reads the rest). A lookup from the file needs evaluated ids: it cannot be traced
    (`mx.compile`, `mx.grad`)."""

    def keep_in_file(self, table: np.ndarray, bfloat16: bool, dtype):
        """`table`: the (vocab, dim) tensor mapped from the file (bfloat16 as its uint16 bit patterns); `dtype`: what
        lookups return (None: the stored type)."""
        if self.weight.shape != table.shape:
            raise WeightsError(f"embedding table of shape {table.shape} where {self.weight.shape} was expected")
        del self["weight"]
        self._table, self._bfloat16, self._dtype = table, bfloat16, dtype

    def __call__(self, ids):
        if "weight" in self:
            return super().__call__(ids)
        rows = mx.array(self._table[np.asarray(ids)])  # numpy's gather on the map reads only these rows
        rows = rows.view(mx.bfloat16) if self._bfloat16 else rows
        return rows if self._dtype is None else rows.astype(self._dtype)


class Linear(nn.Linear):
    """nn.Linear computed one sample at a time (`backends.cpu.linear`), so that an image made in a batch equals the
    image made alone. Every model's Linear layers are this one."""

    def __call__(self, x):
        return cpu.linear(x, self["weight"], self.get("bias"))


@cpu.compile
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


def attention(q, k, v, heads: int, scale: float | None = None):
    """Multi-head softmax attention on (B, L, H*D) projections -> (B, L, H*D). scale=None: D**-0.5."""
    B, L, _ = q.shape
    q, k, v = (mx.contiguous(t.reshape(B, t.shape[1], heads, -1).transpose(0, 2, 1, 3)) for t in (q, k, v))
    return cpu.attention(q, k, v, scale)


@cpu.compile
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
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim)

    def __call__(self, x):
        return self.linear_2(nn.silu(self.linear_1(x)))


class PixArtAlphaTextProjection(nn.Module):
    """linear_1 -> act_1 (GELU-tanh or SiLU) -> linear_2."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None, act_fn="gelu_tanh"):
        super().__init__()
        if act_fn not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {act_fn!r}")
        self.act_fn = act_fn
        self.linear_1 = Linear(in_features, hidden_size)
        self.linear_2 = Linear(hidden_size, out_features or hidden_size)

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
        self.linear = Linear(dim, 6 * dim, bias=bias)

    def __call__(self, x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mx.split(self.linear(nn.silu(emb)), 6, -1)
        return modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """linear(SiLU(emb)) -> shift, scale, gate; returns (modulated x, gate)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear = Linear(dim, 3 * dim, bias=bias)

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
        self.linear = Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)

    def __call__(self, x, cond):
        scale, shift = mx.split(self.linear(nn.silu(cond).astype(x.dtype)), 2, -1)
        return modulate(x, shift, scale, self.eps)


class GELU(nn.Module):
    """diffusers' GELU(approximate="tanh"): proj -> GELU-tanh."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=bias)

    def __call__(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): `net.0.proj` -> GELU-tanh -> `net.2`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        inner_dim = inner_dim or int(dim * mult)
        # net.1 is diffusers' Dropout: no parameters, kept so the names line up.
        self.net = [GELU(dim, inner_dim, bias=bias), nn.Dropout(0.0), Linear(inner_dim, dim_out or dim, bias=bias)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


# ---------------------------------------------------------------------------------------------------------------
# quantized Linear layers


class QuantizedLinear(nn.Module):
    """A Linear layer stored in MLX affine-quantized form (`mx.quantize`'s packed weight, scales and biases); its call
    is `backends.cpu.quantized_linear`."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))

    def __call__(self, x):
        y = cpu.quantized_linear(x, self.weight, self.scales, self.biases, self.group_size, self.bits)
        return y + self.bias if "bias" in self else y

    def dequantized(self):
        """The float32 weight this layer computes with."""
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size,
                             bits=self.bits).astype(mx.float32)


def quantize_layers(model: nn.Module, layers: dict):
    """Replace the nn.Linear modules named in `layers` ({path: (bits, group_size)}) by QuantizedLinear.

    Done before loading so that the full-precision weights of those layers are never materialised (MLX's
    initialisers are lazy and the replaced modules are dropped unevaluated).
    """
    if not layers:
        return
    replacements = []
    for path, module in model.named_modules():
        if path in layers:
            if not isinstance(module, nn.Linear):
                raise WeightsError(f"quantized weights given for {path}, which is not a Linear layer")
            bits, group_size = layers[path]
            out_dims, in_dims = module.weight.shape
            replacements.append((path, QuantizedLinear(in_dims, out_dims, "bias" in module, group_size, bits)))
    missing = set(layers) - {p for p, _ in replacements}
    if missing:
        raise WeightsError(f"quantized weights for unknown layers, e.g. {sorted(missing)[0]}")
    model.update_modules(tree_unflatten(replacements))


def float_parameters(model: nn.Module) -> dict:
    """The model's parameters with every QuantizedLinear dequantized to a float32 weight (what its call computes with
    on a CPU): a quantized model's weights as the float model of the same config takes them."""
    params = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            prefix = name + "." if name else ""
            del params[prefix + "scales"], params[prefix + "biases"]
            params[prefix + "weight"] = m.dequantized()
    return tree_unflatten(list(params.items()))


# ---------------------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """A quantized Linear with low-rank updates beside it: `base(x) + (x @ down.T) @ up.T`. The quantized weight stays
    as it is (requantizing a fused weight would add a second rounding); several LoRAs are stacked along the rank."""

    def __init__(self, base: nn.Module, down: mx.array, up: mx.array):
        super().__init__()
        self.base, self.lora_down, self.lora_up = base, down, up

    def __call__(self, x):
        return self.base(x) + cpu.linear(cpu.linear(x, self.lora_down), self.lora_up)


def add_low_rank(model: nn.Module, updates: list[tuple[str, np.ndarray, np.ndarray]]):
    """Apply LoRA updates [(layer path, down (rank, in), up (out, rank) with its scale folded in)]: fused into a float
    Linear's weight (`W + up @ down`, computed in float32, as diffusers' fuse_lora), beside a quantized one
    (LoRALinear). Updates of one layer add up."""
    by_layer: dict[str, list] = {}
    for layer, down, up in updates:
        by_layer.setdefault(layer, []).append((down, up))
    modules = dict(model.named_modules())
    replaced = []
    for layer, pairs in by_layer.items():
        module = modules.get(layer)
        if isinstance(module, nn.Linear):
            delta = sum(np.asarray(up, np.float32) @ np.asarray(down, np.float32) for down, up in pairs)
            weight = module.weight
            module.weight = (weight.astype(mx.float32) + mx.array(delta)).astype(weight.dtype)
        elif isinstance(module, QuantizedLinear):
            down = mx.array(np.concatenate([d for d, _ in pairs], axis=0))
            up = mx.array(np.concatenate([u for _, u in pairs], axis=1))
            replaced.append((layer, LoRALinear(module, down, up)))
        else:
            raise WeightsError(f"a LoRA adapts {layer}, which is not a Linear layer")
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    mx.eval(model.parameters())
