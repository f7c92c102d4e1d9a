"""The models: diffusers' and transformers' components in MLX, with their parameter names, one module each
(`flux`, `sd3`, `vae`, `clip`, `t5`; shared blocks in `layers`), and the table of them by the class name their
reference config declares.

A diffusers folder's `model_index.json` names each component's class; a component's own `config.json` says it again
(`_class_name` for diffusers, `architectures` for transformers). `kind_of(config)` finds our model and config classes
for it, and the module's `sanitize`, which only renames or drops a saved checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import WeightsError
from . import clip, flux, sd3, t5, vae


@dataclass(frozen=True)
class Kind:
    name: str  # the reference class name
    module: object
    model: type
    config: type

    def build(self, config: dict, where=""):
        """`model(config.from_dict(config))`, with a config we cannot build reported as a one-line error. Lazy in
        MLX: no weights are materialised here."""
        try:
            model = self.model(self.config.from_dict(config))
        except (ValueError, TypeError, ArithmeticError, IndexError, KeyError) as e:  # sizes of 0, heads not dividing
            detail = " ".join(str(e).split())[:120] or e.__class__.__name__
            raise WeightsError(f"{where}: unsupported {self.model.__name__} configuration ({detail})") from None
        # Each layer's (lazy, never used) random initialiser splits MLX's global key, whose state is then a chain of
        # unevaluated splits that grows with every model built: 176 KB a load of the built-in model's text encoders,
        # which a pipeline reloads each generation (measured: +26% RSS over 200 generations). Evaluating the key
        # (splits only, no weights) drops the chain.
        mx.eval(mx.random.state)
        return model

    def rename(self, names) -> dict:
        """{new name: old name} after the module's `sanitize`."""
        mapping = {n: n for n in names}
        sanitize = getattr(self.module, "sanitize", None)
        return sanitize(mapping) if sanitize else mapping


KINDS = {k.name: k for k in (
    Kind("FluxTransformer2DModel", flux, flux.FluxTransformer2DModel, flux.FluxConfig),
    Kind("SD3Transformer2DModel", sd3, sd3.SD3Transformer2DModel, sd3.SD3Config),
    Kind("AutoencoderKL", vae, vae.AutoencoderKL, vae.VAEConfig),
    Kind("CLIPTextModel", clip, clip.CLIPTextModel, clip.CLIPTextConfig),
    Kind("CLIPTextModelWithProjection", clip, clip.CLIPTextModel, clip.CLIPTextConfig),
    Kind("T5EncoderModel", t5, t5.T5EncoderModel, t5.T5Config),
)}


def class_name(config: dict) -> str | None:
    name = config.get("_class_name")
    if name is None:
        architectures = config.get("architectures")
        name = architectures[0] if isinstance(architectures, list) and architectures else None
    return name if isinstance(name, str) else None


def kind_of(config: dict, where="") -> Kind:
    name = class_name(config)
    if name not in KINDS:
        raise WeightsError(f"{where}: unsupported component class {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]
