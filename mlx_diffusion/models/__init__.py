"""The models: diffusers' and transformers' components in MLX, with their parameter names, one module each
(`flux`, `sd3`, `vae`, `clip`, `t5`; shared blocks in `layers`), and the table of them by the class name their
reference config declares.

A diffusers folder's `model_index.json` names each component's class; a component's own `config.json` says it again
(`_class_name` for diffusers, `architectures` for transformers). `kind_of(config)` finds our model and config classes
for it, and the module's `sanitize`, which only renames or drops a saved checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

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
            return self.model(self.config.from_dict(config))
        except (ValueError, TypeError) as e:
            raise WeightsError(f"{where}: unsupported {self.model.__name__} configuration ({e})") from None

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
    return config.get("_class_name") or (config.get("architectures") or [None])[0]


def kind_of(config: dict, where="") -> Kind:
    name = class_name(config)
    if name not in KINDS:
        raise WeightsError(f"{where}: unsupported component class {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]
