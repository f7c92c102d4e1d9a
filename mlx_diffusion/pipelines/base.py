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
from .settings import GenerationSettings


@dataclass
class Stats:
    """Timings and memory of one run: a single image, or a batch of `images` made together (the seconds are the
    batch's; divide by `images` for one image's share)."""

    seconds: dict = field(default_factory=dict)  # text_encoding, denoising, decoding
    step_seconds: list = field(default_factory=list)  # each denoising step
    peak_memory_gb: float = 0.0  # MLX allocator peak
    peak_rss_gb: float = 0.0  # process peak resident set
    images: int = 1  # how many images the run made together


@dataclass(frozen=True)
class Result:
    """One image of `Pipeline.generate_many`: the image ("pil" or "np" as its settings say), the resolved settings
    that make it again, and the stats of the run (batch) it came from."""

    image: object
    settings: GenerationSettings
    stats: Stats


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

    use_t5 = True  # whether generations use T5 unless their settings say otherwise (SD3 may run without)

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
        self._last = None
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

    def resolve(self, settings: GenerationSettings, latents=None) -> GenerationSettings:
        """`settings` with this model's defaults filled in and checked against the model (InputError): what a
        generation with them uses and what its image records. Without `latents` and a seed, a random seed."""
        s = settings.checked()
        pick = lambda value, default: default if value is None else value  # noqa: E731
        s = s.replace(steps=pick(s.steps, self.default_steps), guidance=pick(s.guidance, self.default_guidance),
                      width=pick(s.width, self.default_width), height=pick(s.height, self.default_height),
                      max_sequence_length=pick(s.max_sequence_length, self.max_sequence_length),
                      use_t5=pick(s.use_t5, self.use_t5), model=str(self.path))
        if latents is not None:
            s = s.replace(seed=None)
        elif s.seed is None:
            s = s.replace(seed=int.from_bytes(os.urandom(4), "little"))
        m = self.size_multiple
        for name, v in (("width", s.width), ("height", s.height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % m:
                raise InputError(f"{name} must be a positive multiple of {m}, got {v!r}")
        if self.max_size and max(s.width, s.height) > self.max_size:
            raise InputError(f"width and height can be at most {self.max_size} for this model, got {s.width}x{s.height}")
        shape = (1, self.latent_channels, s.height // self.vae_scale_factor, s.width // self.vae_scale_factor)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise InputError(f"latents must have shape {shape} for {s.width}x{s.height}, got {tuple(np.shape(latents))}")
        return self.resolve_family(s)

    def resolve_family(self, s: GenerationSettings) -> GenerationSettings:
        """The family's own checks and settings (a hook)."""
        return s

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 16))

    # -- the run ---------------------------------------------------------------------------------------------------
    @property
    def last_settings(self) -> GenerationSettings | None:
        """The resolved settings of the last image `generate` made (a read-only view; `generate_many` returns them
        with each image instead)."""
        return self._last.settings if self._last else None

    @property
    def last_stats(self) -> Stats:
        """The stats of the last `generate` call (read-only view)."""
        return self._last.stats if self._last else Stats()

    def generate(self, prompt, *, latents=None, **settings):
        """Generate one image from a prompt (or a GenerationSettings) and any settings by name (GenerationSettings'
        fields: negative_prompt, steps, guidance, width, height, seed, output_type, ...), which replace the object's.

        `latents`: optional initial noise (1, C, height/8, width/8) in diffusers' layout, instead of the seed's.
        output_type "pil" returns a PIL image, "np" float32 (H, W, 3) in [0, 1] like diffusers' output_type="np".
        The resolved settings are in `self.last_settings`, timings and peak memory in `self.last_stats`.
        """
        base = prompt if isinstance(prompt, GenerationSettings) else GenerationSettings(prompt=prompt)
        s = self.resolve(base.replace(**settings), latents)
        result = self._run([s], None if latents is None else mx.array(np.asarray(latents, dtype=np.float32)))[0]
        self._last = result
        return result.image

    def generate_many(self, prompts, *, seeds=None, num_images_per_prompt: int | None = None,
                      batch_size: int = 1, **settings) -> list[Result]:
        """Images for every prompt x seed, made `batch_size` at a time through the text encoders, the transformer and
        the VAE as one batch; returns a `Result` (image, resolved settings, stats) per image, prompt-major.

        `prompts`: a string, a GenerationSettings, or a list of either. `seeds`: the seeds each prompt is drawn with
        (default: `num_images_per_prompt` random ones, 1 unless given). Other settings by name apply to all. An
        image from a batch equals the one `generate` makes with its seed, to float rounding. Every setting is
        checked before the first image; `iter_generate` is the same, yielding each batch's results as it is done.
        """
        return list(self.iter_generate(prompts, seeds=seeds, num_images_per_prompt=num_images_per_prompt,
                                       batch_size=batch_size, **settings))

    def iter_generate(self, prompts, *, seeds=None, num_images_per_prompt: int | None = None,
                      batch_size: int = 1, **settings):
        """`generate_many` as a generator: the checks run at the call, the images as they are consumed."""
        items = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        if not items:
            raise InputError("no prompts given")
        if seeds is not None and num_images_per_prompt is not None and num_images_per_prompt != len(seeds):
            raise InputError(f"{len(seeds)} seeds but num_images_per_prompt={num_images_per_prompt}")
        if seeds is not None and not list(seeds):
            raise InputError("no seeds given")
        n = len(seeds) if seeds is not None else (1 if num_images_per_prompt is None else num_images_per_prompt)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        todo = []
        for item in items:
            base = item if isinstance(item, GenerationSettings) else GenerationSettings(prompt=item)
            base = base.replace(**settings)
            for i in range(n):
                todo.append(self.resolve(base if seeds is None else base.replace(seed=seeds[i])))
        return self._batches(todo, batch_size)

    def _batches(self, todo: list[GenerationSettings], batch_size: int):
        for start in range(0, len(todo), batch_size):  # a batch shares everything but prompts and seeds
            chunk = todo[start:start + batch_size]
            groups = {}
            for s in chunk:
                groups.setdefault(self._batch_key(s), []).append(s)
            done = {id(s): r for group in groups.values() for s, r in zip(group, self._run(group))}
            yield from (done[id(s)] for s in chunk)

    @staticmethod
    def _batch_key(s: GenerationSettings):
        """What images made in one batch must share: all but prompt, negative prompt and seed."""
        return s.replace(prompt="", negative_prompt=None if s.negative_prompt is None else "", seed=None)

    def _run(self, batch: list[GenerationSettings], latents=None) -> list[Result]:
        """The three stages for resolved settings that differ only in prompts and seeds, as one batch."""
        s = batch[0]
        stats = Stats(images=len(batch))
        mx.reset_peak_memory()

        t0 = time.perf_counter()
        cond = self.encode(batch)
        stats.seconds["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise = latents if latents is not None else mx.concatenate([self.noise(b) for b in batch])
        x, scheduler = self.prepare(noise, s)
        x = x.astype(self.compute_dtype)
        from tqdm import tqdm

        for i in tqdm(range(s.steps), desc="denoising", disable=not self.progress, file=sys.stderr, leave=False):
            t_step = time.perf_counter()
            v = self.predict(x, float(scheduler.timesteps[i]), cond, s)
            x = scheduler.step(v, i, x)
            mx.eval(x)
            stats.step_seconds.append(time.perf_counter() - t_step)
        del cond
        mx.clear_cache()
        stats.seconds["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images = self.decode(self.to_vae_latents(x, s))
        stats.seconds["decoding"] = time.perf_counter() - t0
        stats.peak_memory_gb = mx.get_peak_memory() / (1 << 30)
        stats.peak_rss_gb = peak_rss_gb()
        images = np.array(images.astype(mx.float32))
        return [Result(self._output(image, b.output_type), b, stats) for image, b in zip(images, batch)]

    @staticmethod
    def _output(image: np.ndarray, output_type: str):
        if output_type == "np":
            return image
        from PIL import Image

        return Image.fromarray((image * 255).round().astype(np.uint8))

    def noise(self, s: GenerationSettings):
        """The initial noise of resolved settings' seed, (1, C, height/8, width/8) in diffusers' unpacked layout: what
        `generate` starts from, and what another implementation must be given to make the same image."""
        shape = (1, self.latent_channels, s.height // self.vae_scale_factor, s.width // self.vae_scale_factor)
        return mx.random.normal(shape, key=mx.random.key(s.seed))

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

    # family hooks, given the resolved settings (`encode`: the batch's; the others: the first, which the batch shares
    # but for prompts and seeds)
    def encode(self, batch: list[GenerationSettings]):
        """The prompts' conditioning (and the negative prompts', where guidance uses them), batched."""
        raise NotImplementedError

    def prepare(self, noise, s: GenerationSettings):
        """(the transformer's initial input from diffusers-layout noise, the scheduler set for the run)"""
        raise NotImplementedError

    def predict(self, x, t, cond, s: GenerationSettings):
        """The velocity at timestep t, guidance applied."""
        raise NotImplementedError

    def to_vae_latents(self, x, s: GenerationSettings):
        raise NotImplementedError


