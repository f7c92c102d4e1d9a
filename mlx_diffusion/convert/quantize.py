"""The quantization policy: which weights are stored in MLX's affine-quantized form, and which stay in high precision.

Linear weights of the transformers and text encoders are quantized; the embedders, the final layer, the text
encoders' embedding tables and projection, norms and biases stay, as stable-diffusion.cpp and city96's GGUFs keep
them (norms and biases are 1-D and never quantized anyway); the VAE is never quantized. A layer whose input width is
not a multiple of the group size stays too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

_DIT_KEEP = (r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)\.",)
_TEXT_KEEP = (r"(embeddings|embed_tokens|shared|relative_attention_bias)\.", r"^text_projection\.")
# reference class name -> regexes of weight names kept in high precision; None: never quantized
KEEP = {
    "FluxTransformer2DModel": _DIT_KEEP,
    "SD3Transformer2DModel": _DIT_KEEP,
    "AutoencoderKL": None,
    "CLIPTextModel": _TEXT_KEEP,
    "CLIPTextModelWithProjection": _TEXT_KEEP,
    "T5EncoderModel": _TEXT_KEEP,
}


@dataclass(frozen=True)
class Policy:
    bits: int | None  # None: nothing is quantized
    group_size: int = 64
    keep: tuple = ()

    @classmethod
    def for_class(cls, class_name: str, bits: int | None, group_size: int = 64) -> "Policy":
        keep = KEEP[class_name]
        return cls(bits if keep is not None else None, group_size, keep or ())

    def quantizes(self, name: str, shape) -> bool:
        """2-D Linear weights whose input width fits the group, unless a keep pattern names the layer."""
        if not self.bits or not name.endswith(".weight") or len(shape) != 2:
            return False
        if shape[1] % self.group_size or shape[0] % 8:
            return False
        return not any(re.search(p, name) for p in self.keep)

    def write(self, out, name: str, a: mx.array, may_quantize: bool = True) -> bool:
        """Add `a` to the ComponentWriter `out`: quantized (in float32, scales and biases in the folder's dtype) where
        the policy says so, else as it is; returns whether it quantized."""
        if not (may_quantize and self.quantizes(name, a.shape)):
            out.add(name, a)
            return False
        wq, scales, biases = mx.quantize(a.astype(mx.float32), group_size=self.group_size, bits=self.bits)
        out.add_quantized(name, wq, scales.astype(out.dtype), biases.astype(out.dtype), self.bits, self.group_size)
        return True
