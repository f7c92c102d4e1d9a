"""One object for every setting of a generation: what `Pipeline.generate` takes, what the commands (generate,
compare, benchmark) build, and what an image's metadata records so that it can be made again.

Fields left None mean "the model's default": `Pipeline.resolve` fills them from the model folder (steps, guidance,
size, T5 use and length) and draws a seed, and the resolved object is what an image records. A setting the model
does not use (guidance on FLUX.1-schnell, a negative prompt without guidance) is None there, and if it was given,
recorded under `unused` instead, so that an image never claims a setting that played no part in it.

Metadata comes in two shapes, both read by `from_metadata`: flat text (`to_metadata`: PNG text chunks, and as JSON in
JPEG/WebP EXIF and XMP) with every field readable on its own plus all of them as JSON under METADATA_KEY; and the
JSON sidecar document (`{"settings": {...}, "batch": {...}, "stats": {...}}`, `Result.record`).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import InputError

METADATA_KEY = "mlx_diffusion.settings"  # the PNG text chunk with every field as JSON
BATCH_KEY = "mlx_diffusion.batch"  # {"size": B, "index": i}: the batch an image was made in (when B > 1)
# diffusers' keyword names for the same settings (height, width and negative_prompt are the same in both)
DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


MAX_STEPS = 1000  # a sampler trained on 1000 timesteps has no more to give; 10**9 would run for years
MAX_GUIDANCE = 100.0  # beyond this every image is saturated noise


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
    model: str | None = None  # the model folder that made the image, "built-in" for the built-in (filled by `resolve`)
    strength: float | None = None  # image-to-image: how much of the schedule runs from the noised image (0, 1]
    init_image: str | None = None  # image-to-image: "sha256:..." of the start image's pixels as the VAE saw them
    cache: float | None = None  # first-block cache threshold (pipelines/step_cache.py); None or 0: every block, always
    lora: tuple = ()  # ((file, scale), ...) of the LoRAs the pipeline was loaded with (filled by `resolve`)
    unused: tuple = ()  # (name, value) of each setting given but not used by the model (filled by `resolve`)

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

    def to_dict(self) -> dict:
        """Every field but output_type, JSON-able (`unused` as a {name: value} object)."""
        out = {k: v for k, v in asdict(self).items() if k != "output_type"}
        out["unused"] = dict(self.unused)
        out["lora"] = [list(pair) for pair in self.lora]
        return out

    def to_metadata(self) -> dict[str, str]:
        """Flat text metadata (PNG text chunks): each setting readable on its own ("" for None), and all of them as
        one JSON value under METADATA_KEY."""
        data = self.to_dict()
        out = {k: "" if v is None else str(v) for k, v in data.items() if k not in ("unused", "lora")}
        if self.lora:
            out["lora"] = ", ".join(f"{file}:{scale}" for file, scale in self.lora)
        if self.unused:
            out["unused"] = ", ".join(f"{k}={v!r}" for k, v in self.unused)
        out[METADATA_KEY] = json.dumps(data)
        return out

    @classmethod
    def from_metadata(cls, data: dict) -> "GenerationSettings":
        """The settings an image recorded: flat text metadata (`to_metadata`, as read from a PNG, JPEG or WebP) or a
        JSON sidecar document (`{"settings": {...}}`); InputError if it has none or broken ones."""
        if isinstance(data.get("settings"), dict):
            fields_ = data["settings"]
        elif METADATA_KEY in data:
            try:
                fields_ = json.loads(data[METADATA_KEY])
            except (TypeError, ValueError, RecursionError) as e:
                raise InputError(f"the image's mlx_diffusion settings are broken ({e})") from None
        else:
            raise InputError("the image records no mlx_diffusion settings")
        try:
            if not isinstance(fields_, dict):
                raise ValueError("not an object")
            fields_ = dict(fields_)
            unused = fields_.pop("unused", None) or {}
            if not isinstance(unused, dict):
                raise ValueError("unused is not an object")
            lora = fields_.pop("lora", None) or []
            if not isinstance(lora, list) or not all(isinstance(p, list) and len(p) == 2 for p in lora):
                raise ValueError("lora is not a list of [file, scale] pairs")
            return cls().replace(**fields_, unused=tuple(unused.items()),
                                 lora=tuple(tuple(p) for p in lora)).checked()
        except (ValueError, InputError) as e:
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
        if self.steps is not None and self.steps > MAX_STEPS:
            raise InputError(f"steps can be at most {MAX_STEPS}, got {self.steps}")
        if self.max_sequence_length is not None and self.max_sequence_length > 512:  # as diffusers
            raise InputError(f"max_sequence_length can be at most 512, got {self.max_sequence_length}")
        number("guidance")
        number("true_cfg_scale")
        for name in ("guidance", "true_cfg_scale"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_GUIDANCE:
                raise InputError(f"{name} must be from 0 to {MAX_GUIDANCE}, got {v!r}")
        number("strength")
        number("cache")
        if self.cache is not None and not 0 <= self.cache <= 1:
            raise InputError(f"cache must be a threshold from 0 to 1, got {self.cache!r}")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise InputError(f"strength must be above 0 and at most 1, got {self.strength!r}")
        if self.init_image is not None and not (isinstance(self.init_image, str)
                                                and self.init_image.startswith("sha256:")):
            raise InputError(f"init_image must be a 'sha256:...' digest, got {self.init_image!r}")
        if self.use_t5 is not None and not isinstance(self.use_t5, bool):
            raise InputError(f"use_t5 must be true or false, got {self.use_t5!r}")
        if not isinstance(self.unused, tuple) or not all(
                isinstance(u, tuple) and len(u) == 2 and isinstance(u[0], str)
                and (u[1] is None or isinstance(u[1], (str, int, float))) for u in self.unused):
            raise InputError(f"unused must be (name, value) pairs, got {self.unused!r}")
        if not isinstance(self.lora, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], (int, float))
                and not isinstance(p[1], bool) and math.isfinite(p[1]) for p in self.lora):
            raise InputError(f"lora must be (file, scale) pairs, got {self.lora!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise InputError(f"model must be a string, got {self.model!r}")
        if self.output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {self.output_type!r}")
        return self


def batch_position(data: dict) -> tuple[int, int]:
    """(size, index) of the batch an image was made in, from its metadata (either shape); (1, 0) when it records
    none. A batch of the same size with the image at the same index makes it again bit for bit on any device; on the
    CPU, whose products are made per image, one image alone does too."""
    batch = data.get("batch", data.get(BATCH_KEY))
    if batch is None:
        return 1, 0
    try:
        batch = json.loads(batch) if isinstance(batch, str) else batch
        size, index = batch["size"], batch["index"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, index)) or not 0 <= index < size:
            raise ValueError
        if size > 4096:
            raise ValueError
    except (TypeError, ValueError, KeyError, RecursionError):
        raise InputError(f"the image's batch record is broken: {str(batch)[:80]}") from None
    return size, index
