"""The pipeline skeleton FLUX and SD3 share (they differ in `flux.py` and `sd3.py`).

`generate` runs three stages, each loading only what it needs: the text encoders are evaluated and released before
denoising (T5-XXL alone is ~9.5 GB at bf16), then the transformer denoises with the shared flow-match Euler
sampler, then the VAE decodes. Numbers follow diffusers' pipelines step by step, so that with the same weights and
the same initial latents the images agree to float32 rounding.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

import mlx.core as mx

from ..backends import cpu
from ..errors import InputError
from ..io.folder import load_component, read_json
from .sampler import SchedulerConfig


@dataclass
class Settings:
    """What produced an image: enough to reproduce it, and what the PNG's text chunks hold."""

    prompt: str
    negative_prompt: str | None
    seed: int | None
    steps: int
    guidance: float | None
    width: int
    height: int
    model: str
    true_cfg_scale: float | None = None

    def as_text(self) -> dict:
        return {k: "" if v is None else str(v) for k, v in self.__dict__.items()}


@dataclass
class Stats:
    seconds: dict = field(default_factory=dict)
    peak_memory_gb: float = 0.0  # MLX allocator peak
    peak_rss_gb: float = 0.0  # process peak resident set


def peak_rss_gb() -> float:
    """This process's peak resident memory. Linux: VmHWM, because ru_maxrss survives exec (a child started by a
    big parent would report the parent's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 30) * (1 if sys.platform == "darwin" else 1024)


class Pipeline:
    """Shared skeleton; subclasses implement `encode`, `prepare`, `predict` and `to_vae_latents`.

    `path`: a model folder, `info`: its checked info file (`io.folder.read_info`), `scheduler_config`: its checked
    scheduler config; `load_pipeline` opens all three. Defaults (steps, guidance, T5 length, size) are the folder's.
    """

    family = ""

    def __init__(self, path: Path, info: dict, scheduler_config: SchedulerConfig, dtype=None,
                 keep_text_encoders=False, progress=True, max_sequence_length=None):
        self.path, self.info = path, info
        self.dtype = dtype if dtype is not None else cpu.weights_dtype()
        self.keep_text_encoders = keep_text_encoders
        self.progress = progress
        self.scheduler_config = scheduler_config
        self.transformer_config = read_json(path / "transformer" / "config.json")
        self.vae_config = read_json(path / "vae" / "config.json")
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self._models = {}
        self._forwards = {}
        self.last_stats = Stats()
        d = info["defaults"]
        self.default_steps, self.default_guidance = d["steps"], d["guidance"]
        self.default_width, self.default_height = d["width"], d["height"]
        self.max_sequence_length = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length

    # -- loading ------------------------------------------------------------------------------------------------
    def model(self, component: str):
        """Load a component once and keep it until `release`."""
        if component not in self._models:
            self._models[component] = load_component(self.path / component, dtype=self.dtype)
        return self._models[component]

    def release(self, *components):
        for c in components:
            self._models.pop(c, None)
            self._forwards.pop(c, None)
        mx.clear_cache()

    def forward(self, component: str, key=(), bind: dict | None = None):
        """The component's call, traced once per input shape by `mx.compile`: the same numbers (checked bit for bit)
        with fewer, fused operations; ~3x faster per step for the built-in model on a CPU, where per-op overhead
        dominates. `bind`: keyword arguments fixed at trace time (FLUX's position ids, read on the host), `key` names
        them. Without a compiler (no g++ on Linux, MLX_DISABLE_COMPILE=1) it is the plain call."""
        cache = self._forwards.setdefault(component, {})
        if key not in cache:
            model = self.model(component)
            fn = partial(model.__call__, **bind) if bind else model.__call__
            cache[key] = cpu.compile(fn)
        return cache[key]

    def has(self, component: str) -> bool:
        return (self.path / component / "config.json").is_file()

    # -- checks ---------------------------------------------------------------------------------------------------
    patch_size = 2  # latent pixels per token side (FLUX packs 2x2; SD3 reads its patch_size)
    max_size = None  # largest width/height the model can take, where it has one

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def _check(self, prompt, steps, width, height, latents):
        if not isinstance(prompt, str):
            raise InputError("prompt must be a string")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        m = self.size_multiple
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % m:
                raise InputError(f"{name} must be a positive multiple of {m}, got {v!r}")
        if self.max_size and max(width, height) > self.max_size:
            raise InputError(f"width and height can be at most {self.max_size} for this model, got {width}x{height}")
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise InputError(f"latents must have shape {shape} for {width}x{height}, got {tuple(np.shape(latents))}")

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 16))

    # -- the run ---------------------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, negative_prompt: str | None = None, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None,
                 seed: int | None = None, latents=None, output_type: str = "pil", **options):
        """Generate one image. `latents`: optional initial noise (1, C, height/8, width/8) in diffusers' layout.

        output_type "pil" returns a PIL image, "np" float32 (H, W, 3) in [0, 1] like diffusers' output_type="np".
        The settings used are in `self.last_settings`, timings and peak memory in `self.last_stats`.
        """
        steps = self.default_steps if steps is None else steps
        guidance = self.default_guidance if guidance is None else guidance
        width = self.default_width if width is None else width
        height = self.default_height if height is None else height
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        self._check(prompt, steps, width, height, latents)
        if latents is None and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self.last_settings = Settings(prompt, negative_prompt, seed if latents is None else None, steps, guidance,
                                      width, height, str(self.path))
        stats = self.last_stats = Stats()
        mx.reset_peak_memory()

        t0 = time.perf_counter()
        cond = self.encode(prompt, negative_prompt, guidance, **options)
        stats.seconds["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if latents is None:
            shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            noise = mx.random.normal(shape, key=mx.random.key(seed))
        else:
            noise = mx.array(np.asarray(latents, dtype=np.float32))
        x, scheduler = self.prepare(noise, steps)
        x = x.astype(self.compute_dtype)
        from tqdm import tqdm

        for i in tqdm(range(steps), desc="denoising", disable=not self.progress, file=sys.stderr, leave=False):
            v = self.predict(x, float(scheduler.timesteps[i]), cond, guidance)
            x = scheduler.step(v, i, x)
            mx.eval(x)
        del cond
        mx.clear_cache()
        stats.seconds["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        image = self.decode(self.to_vae_latents(x, height, width))
        stats.seconds["decoding"] = time.perf_counter() - t0
        stats.peak_memory_gb = mx.get_peak_memory() / (1 << 30)
        stats.peak_rss_gb = peak_rss_gb()
        image = np.array(image[0].astype(mx.float32))
        if output_type == "np":
            return image
        from PIL import Image

        return Image.fromarray((image * 255).round().astype(np.uint8))

    @property
    def compute_dtype(self):
        return self.dtype or mx.bfloat16

    def decode(self, z):
        """Diffusers' `latents / scaling_factor + shift_factor`, `vae.decode`, then `(x / 2 + 0.5).clamp(0, 1)`."""
        cfg = self.vae_config
        z = z / cfg.get("scaling_factor", 1.0) + (cfg.get("shift_factor") or 0.0)
        vae = self.model("vae")
        image = vae.decode(z.transpose(0, 2, 3, 1).astype(self.compute_dtype))
        image = mx.clip(image / 2 + 0.5, 0.0, 1.0)
        mx.eval(image)
        return image

    # family hooks
    def encode(self, prompt, negative_prompt, guidance, **options):
        raise NotImplementedError

    def prepare(self, noise, steps):
        raise NotImplementedError

    def predict(self, x, t, cond, guidance):
        raise NotImplementedError

    def to_vae_latents(self, x, height, width):
        raise NotImplementedError


