"""The pipeline skeleton FLUX and SD3 share (they differ in `flux.py` and `sd3.py`).

`generate` runs three stages, each loading only what it needs: the text encoders are evaluated and released before
denoising (T5-XXL alone is ~9.5 GB at bf16), then the transformer denoises with the shared flow-match Euler
sampler, then the VAE decodes. Numbers follow diffusers' pipelines step by step, so that with the same weights and
the same initial latents the images agree to float32 rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

import mlx.core as mx

from ..backends import cpu, jit
from ..errors import InputError
from ..io.folder import load_component, read_json
from .sampler import SchedulerConfig
from .settings import BATCH_KEY, GenerationSettings, batch_position


MAX_SIDE = 4096  # pixels a side: 16 MP, 8x what FLUX was trained for; more would only exhaust memory
MAX_IMAGES = 10_000  # per call: its settings are all made and checked before the first image


@dataclass
class Stats:
    """Timings and memory of one run: a single image, or a batch of `images` made together (the seconds are the
    batch's; divide by `images` for one image's share)."""

    seconds: dict = field(default_factory=dict)  # text_encoding, denoising, decoding
    step_seconds: list = field(default_factory=list)  # each denoising step
    peak_memory_gb: float = 0.0  # MLX allocator peak
    peak_rss_gb: float = 0.0  # process peak resident set
    images: int = 1  # how many images the run made together
    cached_calls: int = 0  # transformer calls whose blocks after the first were skipped (first-block cache)
    cache_changes: dict = field(default_factory=dict)  # per cache branch, per step: each image's residual change


@dataclass(frozen=True)
class Result:
    """One image of `Pipeline.generate_many`: the image ("pil" or "np" as its settings say), the resolved settings
    that make it again, the stats of the run (batch) it came from and its place in that batch."""

    image: object
    settings: GenerationSettings
    stats: Stats
    batch_index: int = 0

    def metadata(self) -> dict[str, str]:
        """Flat text metadata for the image file (`io.images.write_image`): the settings, and the batch it was made
        in when that was more than one image (needed to make it again bit for bit)."""
        text = self.settings.to_metadata()
        if self.stats.images > 1:
            text[BATCH_KEY] = json.dumps({"size": self.stats.images, "index": self.batch_index})
        return text

    def record(self) -> dict:
        """The JSON sidecar document: settings, batch and stats (the batch's timings and memory)."""
        from .. import __version__

        return {"mlx_diffusion": __version__, "settings": self.settings.to_dict(),
                "batch": {"size": self.stats.images, "index": self.batch_index}, "stats": asdict(self.stats)}


def peak_rss_gb() -> float:
    """This process's peak resident memory. Linux: VmHWM, because ru_maxrss survives exec (a child started by a
    big parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
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

    Threads: a pipeline can be shared; its generations run one at a time (a lock), each returning its own results.
    A thread other than the main one that used MLX should call `mx.clear_streams()` as its last MLX call before it
    ends: with MLX 0.32 the process can otherwise abort at exit ("terminate called without an active exception").
    """

    family = ""

    use_t5 = True  # whether generations use T5 unless their settings say otherwise (SD3 may run without)

    def __init__(self, path: Path, info: dict, scheduler_config: SchedulerConfig, dtype=None,
                 keep_text_encoders=False, progress=True, max_sequence_length=None, name=None, lora=(),
                 lora_files=()):
        jit.prepare()  # MLX's kernel compiler, quicker on a machine's first run
        self.path, self.info = path, info
        self.lora = list(lora)  # (component, layer, down, up with its scale): applied as each component loads
        self.lora_files = tuple(lora_files)  # ((file, scale), ...): what images record
        self.name = str(path) if name is None else name  # what images record as their model
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
        self.shard = False  # the transformer split across mlx.launch's ranks (load_pipeline(shard=True))
        self._lock = threading.RLock()  # one generation at a time: calls from other threads wait their turn
        d = info["defaults"]
        self.default_steps, self.default_guidance = d["steps"], d["guidance"]
        self.default_width, self.default_height = d["width"], d["height"]
        self.max_sequence_length = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length

    # -- loading ------------------------------------------------------------------------------------------------
    # Halves of a component loaded on their own: generating decodes only, so the VAE's encoder (SD3's: 137 MB in
    # float32) is read only for a start image.
    PARTS = {"vae:decode": ("decoder", "post_quant_conv"), "vae:encode": ("encoder", "quant_conv")}

    def model(self, component: str):
        """Load a component (or one of its `PARTS`, "folder:part") once and keep it until `release`."""
        folder = component.partition(":")[0]
        if component not in self._models and folder in self._models:  # the whole of it is loaded already
            return self._models[folder]
        if component not in self._models:
            shard = None
            if component == "transformer" and self.shard:  # only this rank's slices are read
                from .distributed import shard_model as shard
            model = load_component(self.path / folder, dtype=self.dtype, shard=shard, parts=self.PARTS.get(component))
            updates = [(layer, down, up) for c, layer, down, up in self.lora if c == folder]
            if updates:
                from ..models.layers import add_low_rank

                add_low_rank(model, updates)
            self._models[component] = model
        return self._models[component]

    def release(self, *components):
        """Drop components (a folder's name drops its parts too)."""
        for c in [k for k in self._models if k in components or k.partition(":")[0] in components]:
            self._models.pop(c, None)
            self._forwards.pop(c, None)
        mx.clear_cache()

    def forward(self, component: str, key=(), bind: dict | None = None, method: str = "__call__"):
        """The component's call, traced once per input shape by `mx.compile`: the same numbers (checked bit for bit)
        with fewer, fused operations; ~3x faster per step for the built-in model on a CPU, where per-op overhead
        dominates. `bind`: keyword arguments fixed at trace time (FLUX's position ids, read on the host), `key` names
        them. Without a compiler (no g++ on Linux, MLX_DISABLE_COMPILE=1) it is the plain call, and so it is for
        models whose attention runs in the native CPU kernel (see `_Compiled`)."""
        cache = self._forwards.setdefault(component, {})
        if (method, key) not in cache:
            model = self.model(component)
            fn = getattr(model, method)
            cache[method, key] = _Compiled(partial(fn, **bind) if bind else fn)
        return cache[method, key]

    def cached_forward(self, s: GenerationSettings, caches: dict, branch: str, rows: list[list[int]], args: tuple,
                       kwargs: dict | None = None, key=(), bind=None, output_bind=None):
        """The transformer's output through the first-block cache of `branch` (made on first use with the settings'
        threshold and the batch's `rows` of each image): first block, then the other blocks or their cached
        residual, then the output layers; each part traced once per shape, as `forward` does."""
        from .step_cache import FirstBlockCache

        first = self.forward("transformer", key, bind, method="first_block")
        rest = self.forward("transformer", key, bind, method="remaining_blocks")
        output = self.forward("transformer", tuple(sorted((output_bind or {}).items())), output_bind, method="output")
        x_in, x_head, c, temb = first(*args, **(kwargs or {}))
        if branch not in caches:
            caches[branch] = FirstBlockCache(s.cache, rows)
        return output(caches[branch](x_in, x_head, lambda x: rest(x, c, temb)), temb)

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
        generation with them uses and what its image records. Without `latents` and a seed, a random seed. A
        setting the model does not use is warned about and moved to `unused` (None in its own field)."""
        s, why = self._resolve(settings, latents)
        self._warn(why)
        return s

    def _resolve(self, settings: GenerationSettings, latents=None):
        """(resolved settings, {unused setting: why}) without warning."""
        given = settings.checked()
        pick = lambda value, default: default if value is None else value  # noqa: E731
        s = given.replace(steps=pick(given.steps, self.default_steps),
                          guidance=pick(given.guidance, self.default_guidance),
                          width=pick(given.width, self.default_width), height=pick(given.height, self.default_height),
                          max_sequence_length=pick(given.max_sequence_length, self.max_sequence_length),
                          use_t5=pick(given.use_t5, self.use_t5), model=self.name, unused=(),
                          lora=self.lora_files)
        if latents is not None:
            s = s.replace(seed=None)
        elif s.seed is None:
            s = s.replace(seed=int.from_bytes(os.urandom(4), "little"))
        m = self.size_multiple
        for name, v in (("width", s.width), ("height", s.height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % m:
                raise InputError(f"{name} must be a positive multiple of {m}, got {v!r}")
        if max(s.width, s.height) > MAX_SIDE:
            raise InputError(f"width and height can be at most {MAX_SIDE}, got {s.width}x{s.height}")
        if self.max_size and max(s.width, s.height) > self.max_size:
            raise InputError(f"width and height can be at most {self.max_size} for this model, got {s.width}x{s.height}")
        shape = (1, self.latent_channels, s.height // self.vae_scale_factor, s.width // self.vae_scale_factor)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise InputError(f"latents must have shape {shape} for {s.width}x{s.height}, got {tuple(np.shape(latents))}")
        s = self.resolve_family(s)
        unused = self.unused_settings(s)
        if s.init_image is None and s.strength is not None:
            unused["strength"] = "strength is for image-to-image (image= / --image): without a start image it is unused"
        why = {name: reason for name, reason in unused.items() if getattr(given, name) is not None}
        s = s.replace(**{name: None for name in unused}, unused=tuple((name, getattr(given, name)) for name in why))
        return s, why

    @staticmethod
    def _warn(why: dict):
        for reason in dict.fromkeys(why.values()):
            warnings.warn(reason, stacklevel=4)

    def resolve_family(self, s: GenerationSettings) -> GenerationSettings:
        """The family's own checks and settings (a hook)."""
        return s

    def unused_settings(self, s: GenerationSettings) -> dict[str, str]:
        """{name: why} of the resolved settings this model will not use (a hook): they are recorded as None, and
        under `unused` with the reason warned about once where the caller gave them."""
        return {}

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

    def generate(self, prompt, *, image=None, latents=None, on_step=None, **settings):
        """Generate one image from a prompt (or a GenerationSettings) and any settings by name (GenerationSettings'
        fields: negative_prompt, steps, guidance, width, height, seed, strength, output_type, ...), which replace the
        object's.

        `image`: image-to-image from this start image (a PIL image, a float (H, W, 3) array in [0, 1] or a path), as
        diffusers' img2img pipelines: the schedule is cut by `strength` (default 0.6), the image's VAE latents
        (posterior mean) noised to the first step kept. Its size is the image's, rounded down to the size multiple,
        unless width and height are given (then it is resized to them).
        `latents`: optional initial noise (1, C, height/8, width/8) in diffusers' layout, instead of the seed's.
        output_type "pil" returns a PIL image, "np" float32 (H, W, 3) in [0, 1] like diffusers' output_type="np".
        `on_step(step, steps)` is called after each denoising step (a progress bar of one's own; step counts from 1).
        The resolved settings are in `self.last_settings`, timings and peak memory in `self.last_stats`.
        """
        base = prompt if isinstance(prompt, GenerationSettings) else GenerationSettings(prompt=prompt)
        starts, source = {}, None if image is None else open_image(image)
        s = self.resolve(self._with_image(base.replace(**settings), source, starts), latents)
        with self._lock:
            result = self._run([s], None if latents is None else mx.array(np.asarray(latents, dtype=np.float32)),
                               on_step, starts.get(s.init_image))[0]
            self._last = result
        return result.image

    def replay(self, metadata: dict, *, image=None, alone: bool = False, **changes) -> Result:
        """Make an image again from the metadata it carries (`io.images.read_metadata`: a PNG, JPEG or WebP we
        wrote, or its JSON sidecar), bit for bit on the same machine and model.

        An image made in a batch of B is made again as one: B copies, it at its own place, exact whatever a device's
        kernels do with a batch (B times one image's work); alone=True makes it alone, the same pixels on the CPU,
        where every product is made per image (`backends.cpu.linear`). `changes`
        (settings by name) replace recorded ones; any but output_type makes a new image, made alone. An image made
        from a start image needs it again (`image`), the same one (its digest is checked).
        """
        recorded = GenerationSettings.from_metadata(metadata)
        if recorded.seed is None:
            raise InputError("the image was made from given latents, not a seed: its settings cannot make it again")
        if recorded.model not in (None, self.name):
            warnings.warn(f"the image was made with {recorded.model}; making it with {self.name}", stacklevel=2)
        size, index = batch_position(metadata)
        s = recorded.replace(**changes)
        if alone or any(k != "output_type" for k in changes):
            size, index = 1, 0
        results = self.generate_many([s] * size, batch_size=size, image=image)
        return results[index]

    def generate_many(self, prompts, *, seeds=None, num_images_per_prompt: int | None = None,
                      batch_size: int = 1, image=None, on_step=None, **settings) -> list[Result]:
        """Images for every prompt x seed, made `batch_size` at a time through the text encoders, the transformer and
        the VAE as one batch; returns a `Result` (image, resolved settings, stats) per image, prompt-major.

        `prompts`: a string, a GenerationSettings, or a list of either. `seeds`: the seeds each prompt is drawn with
        (default: `num_images_per_prompt` random ones, 1 unless given). Other settings by name apply to all. An
        image from a batch equals the one `generate` makes with its seed, bit for bit on the CPU. Every setting is
        checked before the first image; `iter_generate` is the same, yielding each batch's results as it is done.
        `image`: image-to-image from this start image for every prompt (see `generate`). `on_step(step, steps)`:
        called after each denoising step of each batch.
        """
        return list(self.iter_generate(prompts, seeds=seeds, num_images_per_prompt=num_images_per_prompt,
                                       batch_size=batch_size, image=image, on_step=on_step, **settings))

    def iter_generate(self, prompts, *, seeds=None, num_images_per_prompt: int | None = None,
                      batch_size: int = 1, image=None, on_step=None, **settings):
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
        if len(items) * n > MAX_IMAGES:
            raise InputError(f"at most {MAX_IMAGES} images per call, asked for {len(items) * n}")
        todo, why, starts = [], {}, {}
        source = None if image is None else open_image(image)  # once, however many prompts share it
        for item in items:
            base = item if isinstance(item, GenerationSettings) else GenerationSettings(prompt=item)
            base = self._with_image(base.replace(**settings), source, starts)
            for i in range(n):
                s, reasons = self._resolve(base if seeds is None else base.replace(seed=seeds[i]))
                todo.append(s)
                why.update(reasons)
        self._warn(why)  # once per call, not once per image
        return self._batches(todo, batch_size, on_step, starts)

    def _batches(self, todo: list[GenerationSettings], batch_size: int, on_step, starts: dict):
        for start in range(0, len(todo), batch_size):  # a batch shares everything but prompts and seeds
            chunk = todo[start:start + batch_size]
            groups = {}
            for s in chunk:
                groups.setdefault(self._batch_key(s), []).append(s)
            done = {id(s): r for group in groups.values()
                    for s, r in zip(group, self._run(group, on_step=on_step, init=starts.get(group[0].init_image)))}
            yield from (done[id(s)] for s in chunk)

    @staticmethod
    def _batch_key(s: GenerationSettings):
        """What images made in one batch must share: all but prompt, negative prompt and seed."""
        return s.replace(prompt="", negative_prompt=None if s.negative_prompt is None else "", seed=None, unused=())

    def _run(self, batch: list[GenerationSettings], latents=None, on_step=None, init=None) -> list[Result]:
        """The three stages for resolved settings that differ only in prompts and seeds, as one batch; `init`: the
        start image of image-to-image, (H, W, 3) in [0, 1] at the settings' size."""
        with self._lock:
            return self._stages(batch, latents, on_step, init)

    def _stages(self, batch, latents, on_step, init):
        s = batch[0]
        stats = Stats(images=len(batch))
        mx.reset_peak_memory()

        t0 = time.perf_counter()
        if self.shard:  # every rank makes the same images: rank 0 encodes the prompts, the others receive them
            from .distributed import from_rank_zero

            cond = from_rank_zero(lambda: self.encode(batch))
        else:
            cond = self.encode(batch)
        stats.seconds["text_encoding"] = time.perf_counter() - t0

        first = 0
        if init is not None:
            t0 = time.perf_counter()
            start = self.encode_image(init)
            mx.eval(start)
            stats.seconds["image_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        noise = latents if latents is not None else mx.concatenate([self.noise(b) for b in batch])
        x, scheduler = self.prepare(noise, s)
        if init is not None:  # diffusers' get_timesteps and scheduler.scale_noise
            first = start_step(s.steps, s.strength)
            sigma = np.float32(scheduler.sigmas[first])
            x = sigma.item() * x + (np.float32(1) - sigma).item() * self.from_vae_latents(start, s)
        x = x.astype(self.compute_dtype)
        from tqdm import tqdm

        steps = range(first, s.steps)
        caches = {} if s.cache else None  # FirstBlockCache per guidance branch, made by `cached_forward`
        for i in tqdm(steps, desc="denoising", disable=not self.progress, file=sys.stderr, leave=False):
            t_step = time.perf_counter()
            v = self.predict(x, float(scheduler.timesteps[i]), cond, s, caches)
            x = scheduler.step(v, i, x)
            mx.eval(x)
            stats.step_seconds.append(time.perf_counter() - t_step)
            if on_step is not None:
                on_step(i - first + 1, len(steps))
        del cond
        stats.cached_calls = sum(c.all_skipped for c in (caches or {}).values())
        stats.cache_changes = {k: c.changes for k, c in (caches or {}).items()}
        mx.clear_cache()
        stats.seconds["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images = self.decode(self.to_vae_latents(x, s))
        stats.seconds["decoding"] = time.perf_counter() - t0
        stats.peak_memory_gb = mx.get_peak_memory() / (1 << 30)
        stats.peak_rss_gb = peak_rss_gb()
        images = np.array(images.astype(mx.float32))
        return [Result(self._output(image, b.output_type), b, stats, i) for i, (image, b) in enumerate(zip(images, batch))]

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

    def encode_image(self, image: np.ndarray):
        """A start image (H, W, 3) in [0, 1] -> its scaled latents (1, C, H/8, W/8) in diffusers' layout: the VAE
        posterior's mean, then `(z - shift_factor) * scaling_factor`, as diffusers' img2img `_encode_vae_image` with
        `retrieve_latents(..., sample_mode="argmax")`."""
        cfg = self.vae_config
        x = mx.array(np.asarray(image, dtype=np.float32))[None] * 2 - 1
        mean, _ = self.model("vae:encode").encode(x.astype(self.compute_dtype))
        z = mean.astype(mx.float32).transpose(0, 3, 1, 2)
        return (z - (cfg.get("shift_factor") or 0.0)) * cfg.get("scaling_factor", 1.0)

    def decode(self, z):
        """Diffusers' `latents / scaling_factor + shift_factor`, `vae.decode`, then `(x / 2 + 0.5).clamp(0, 1)`.

        One image at a time: a conv's products round a batch's images differently from one image alone (the row
        count of its GEMMs), and the decoder's activations are the largest of a run."""
        cfg = self.vae_config
        z = z / cfg.get("scaling_factor", 1.0) + (cfg.get("shift_factor") or 0.0)
        vae = self.model("vae:decode")
        images = []
        for one in z.transpose(0, 2, 3, 1).astype(self.compute_dtype):
            image = mx.clip(vae.decode(one[None]) / 2 + 0.5, 0.0, 1.0)
            mx.eval(image)
            images.append(image)
        return mx.concatenate(images)

    # family hooks, given the resolved settings (`encode`: the batch's; the others: the first, which the batch shares
    # but for prompts and seeds)
    def encode(self, batch: list[GenerationSettings]):
        """The prompts' conditioning (and the negative prompts', where guidance uses them), batched."""
        raise NotImplementedError

    def prepare(self, noise, s: GenerationSettings):
        """(the transformer's initial input from diffusers-layout noise, the scheduler set for the run)"""
        raise NotImplementedError

    def predict(self, x, t, cond, s: GenerationSettings, caches=None):
        """The velocity at timestep t, guidance applied; `caches`: this run's first-block caches (None: off)."""
        raise NotImplementedError

    def to_vae_latents(self, x, s: GenerationSettings):
        raise NotImplementedError

    def from_vae_latents(self, z, s: GenerationSettings):
        """Diffusers-layout latents (B, C, h, w) -> the transformer's input layout (the inverse of to_vae_latents)."""
        raise NotImplementedError

    # -- image-to-image ------------------------------------------------------------------------------------------
    def _with_image(self, s: GenerationSettings, source, starts: dict) -> GenerationSettings:
        """Settings for image-to-image from `source` (`open_image`'s; None: text-to-image): its size unless they give
        one, the default strength 0.6, and the digest of the start image as the VAE will see it; `starts` maps that
        digest to the array, which is what `_run` is given."""
        if source is None:
            if s.init_image is not None:
                raise InputError("these settings were made from a start image: give it again (image= / --image)")
            return s
        m = self.size_multiple
        w0, h0 = (source.shape[1], source.shape[0]) if isinstance(source, np.ndarray) else source.size
        width, height = s.width or w0 // m * m, s.height or h0 // m * m
        if not width or not height:
            raise InputError(f"the start image is {w0}x{h0}: too small for this model (at least {m} pixels a side)")
        array = resized(source, width, height)
        digest = "sha256:" + hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()
        if s.init_image is not None and s.init_image != digest:
            raise InputError("this is not the start image these settings were made from (its digest differs)")
        starts.setdefault(digest, array)
        return s.replace(width=width, height=height, init_image=digest, strength=0.6 if s.strength is None else s.strength)

def start_step(steps: int, strength: float) -> int:
    """The first step image-to-image runs: diffusers' `get_timesteps` (the same float arithmetic). At least the last
    step always runs for a strength above 0."""
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


def open_image(image):
    """A start image as given: a PIL image (RGB), a float32 (H, W, 3) array in [0, 1], or a path (read as RGB);
    InputError for anything else."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        from ..io.images import read_image

        return read_image(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"a start image array must be float (H, W, 3), got {image.dtype} {image.shape}")
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise InputError("a start image array must hold finite values in [0, 1]")
        return image.astype(np.float32)
    raise InputError(f"a start image must be a PIL image, a (H, W, 3) array or a path, got {type(image).__name__}")


def resized(source, width: int, height: int) -> np.ndarray:
    """float32 (height, width, 3) in [0, 1]: a PIL image resized as diffusers' VaeImageProcessor does (Lanczos, then
    /255), an array resized channel by channel the same way (not at all when it has the size already)."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        if source.shape[:2] == (height, width):
            return source
        channels = [np.asarray(Image.fromarray(np.ascontiguousarray(source[..., c])).resize((width, height), Image.LANCZOS))
                    for c in range(3)]
        return np.clip(np.stack(channels, axis=-1), 0, 1).astype(np.float32)
    if source.size != (width, height):
        source = source.resize((width, height), Image.LANCZOS)
    return np.asarray(source, dtype=np.float32) / 255


class _Compiled:
    """`cpu.compile(fn)`, or `fn` itself from the first trace on which an operation has to run eagerly (on the CPU,
    attention over long sequences: `cpu.attention`'s native kernel works on evaluated arrays). For such models,
    at FLUX and SD3 widths, the fusions compilation brings are a small part of a step next to what the kernel
    saves, and per-operation overhead is nothing; the built-in model stays compiled."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = cpu.compile(fn)

    def __call__(self, *args, **kwargs):
        if self.compiled is self.fn:
            return self.fn(*args, **kwargs)
        try:
            with cpu.eager_fallback():
                return self.compiled(*args, **kwargs)
        except cpu.EagerOnly:
            self.compiled = self.fn
            return self.fn(*args, **kwargs)
