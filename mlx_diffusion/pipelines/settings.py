"""One object for every setting of a generation: what `Pipeline.generate` takes, what the commands (generate,
compare, benchmark) build, and what an image's metadata records so that it can be made again.

Fields left None mean "the model's default": `Pipeline.resolve` fills them from the model folder (steps, guidance,
size, T5 use and length) and draws a seed, and the resolved object is what an image records.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import InputError

METADATA_KEY = "mlx_diffusion.settings"  # the PNG text chunk with every field as JSON
# diffusers' keyword names for the same settings (height, width and negative_prompt are the same in both)
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance (SD3), embedded guidance (FLUX dev); schnell: unused
    true_cfg_scale: float | None = None  # FLUX only: true classifier-free guidance with the negative prompt
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    use_t5: bool | None = None  # SD3: False runs without T5 (zeros in its place); FLUX always uses it
    max_sequence_length: int | None = None  # T5 tokens
    output_type: str = "pil"  # "pil" (a PIL image) or "np" (float32 (H, W, 3) in [0, 1])
    model: str | None = None  # the model folder that made the image (filled by `resolve`)

    def replace(self, **changes) -> "GenerationSettings":
        """A copy with `changes`, by our names or diffusers' (`num_inference_steps`, `guidance_scale`); an unknown
        name is an InputError that names the closest known one and lists them all."""
        for theirs, ours in DIFFUSERS_NAMES.items():
            if theirs in changes:
                if ours in changes:
                    raise InputError(f"give {ours} or {theirs}, not both")
                changes[ours] = changes.pop(theirs)
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            name = unknown[0]
            if name == "num_images_per_prompt":
                raise InputError("generate makes one image: use generate_many(..., num_images_per_prompt=N)")
            close = difflib.get_close_matches(name, sorted(known | set(DIFFUSERS_NAMES)), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"unknown setting {name!r} ({hint}known: {', '.join(sorted(known))})")
        return replace(self, **changes)

    def to_metadata(self) -> dict[str, str]:
        """PNG text chunks: each setting readable on its own ("" for None), and all of them as one JSON chunk."""
        out = {f.name: "" if getattr(self, f.name) is None else str(getattr(self, f.name)) for f in fields(self)
               if f.name != "output_type"}
        out[METADATA_KEY] = json.dumps({k: v for k, v in asdict(self).items() if k != "output_type"})
        return out

    @classmethod
    def from_metadata(cls, text: dict) -> "GenerationSettings":
        """The settings an image recorded (`to_metadata`'s JSON chunk); InputError if it has none or a broken one."""
        if METADATA_KEY not in text:
            raise InputError("the image records no mlx_diffusion settings")
        try:
            data = json.loads(text[METADATA_KEY])
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return cls().replace(**data).checked()
        except ValueError as e:
            raise InputError(f"the image's mlx_diffusion settings are broken ({e})") from None

    def checked(self) -> "GenerationSettings":
        """The same settings, after checks of their types and ranges that need no model (InputError)."""
        def whole(name, least):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                raise InputError(f"{name} must be a {'positive' if least else 'non-negative'} integer, got {v!r}")

        def number(name):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise InputError(f"{name} must be a finite number, got {v!r}")

        if not isinstance(self.prompt, str):
            raise InputError("prompt must be a string")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InputError("negative_prompt must be a string")
        whole("steps", 1)  # width and height: the pipeline, which knows the multiple they must be of
        whole("max_sequence_length", 0)
        whole("seed", 0)
        if self.seed is not None and self.seed >= 2**64:
            raise InputError(f"seed must be below 2**64, got {self.seed}")
        number("guidance")
        number("true_cfg_scale")
        if self.use_t5 is not None and not isinstance(self.use_t5, bool):
            raise InputError(f"use_t5 must be true or false, got {self.use_t5!r}")
        if self.output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {self.output_type!r}")
        return self
