"""The model components we know, keyed by the class name their reference config declares.

A diffusers folder's `model_index.json` names each component's class; a component's own `config.json` says it again
(`_class_name` for diffusers, `architectures` for transformers). This table maps that name to our module, model and
config classes, and to the quantization policy: which weights stay in high precision (embedders, the final layer,
norms and biases, as stable-diffusion.cpp and city96's GGUFs keep them; norms and biases are 1-D and never
quantized anyway).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .weights import WeightsError


@dataclass(frozen=True)
class Kind:
    module: str
    model: str
    config: str
    keep: tuple = ()  # regexes of weight names kept in high precision
    quantizable: bool = True

    def classes(self):
        mod = importlib.import_module(f"mlx_diffusion.{self.module}")
        return getattr(mod, self.model), getattr(mod, self.config)

    def rename(self, names):
        """{new name: old name} after the module's `sanitize`, which only renames or drops keys."""
        mod = importlib.import_module(f"mlx_diffusion.{self.module}")
        sanitize = getattr(mod, "sanitize", None)
        mapping = {n: n for n in names}
        return sanitize(mapping) if sanitize else mapping


_DIT_KEEP = (r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)\.",)
_TEXT_KEEP = (r"(embeddings|embed_tokens|shared|relative_attention_bias)\.", r"^text_projection\.")

KINDS = {
    "FluxTransformer2DModel": Kind("flux", "FluxTransformer2DModel", "FluxConfig", keep=_DIT_KEEP),
    "SD3Transformer2DModel": Kind("sd3", "SD3Transformer2DModel", "SD3Config", keep=_DIT_KEEP),
    "AutoencoderKL": Kind("vae", "AutoencoderKL", "VAEConfig", quantizable=False),
    "CLIPTextModel": Kind("clip", "CLIPTextModel", "CLIPTextConfig", keep=_TEXT_KEEP),
    "CLIPTextModelWithProjection": Kind("clip", "CLIPTextModel", "CLIPTextConfig", keep=_TEXT_KEEP),
    "T5EncoderModel": Kind("t5", "T5EncoderModel", "T5Config", keep=_TEXT_KEEP),
}


def class_name(config: dict) -> str | None:
    return config.get("_class_name") or (config.get("architectures") or [None])[0]


def kind_of(config: dict, where="") -> Kind:
    name = class_name(config)
    if name not in KINDS:
        raise WeightsError(f"{where}: unsupported component class {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]
