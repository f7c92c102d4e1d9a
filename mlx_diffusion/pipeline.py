"""Text-to-image pipelines over converted MLX model folders: one skeleton, FLUX and SD3 where they differ.

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
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

import mlx.core as mx

from .components import kind_of
from .layers import _CAN_FUSE
from .convert import INFO_FILE
from .sampler import FlowMatchEulerScheduler, SchedulerConfig, calculate_shift
from .weights import WEIGHTS_FILE, SafetensorsFile, WeightsError, load_component, read_json


class InputError(ValueError):
    """A bad argument from the user; the message is one line."""


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


def _free():
    mx.clear_cache()


class Pipeline:
    """Shared skeleton; subclasses implement `encode`, `prepare`, `predict` and `to_vae_latents`."""

    family = ""

    def __init__(self, path: Path, info: dict, dtype=None, keep_text_encoders=False, progress=True):
        self.path, self.info = path, info
        self.dtype = dtype if dtype is not None else (mx.float32 if mx.default_device() == mx.cpu else None)
        self.keep_text_encoders = keep_text_encoders
        self.progress = progress
        self.scheduler_config = SchedulerConfig.from_folder(path / "scheduler")
        self.transformer_config = read_json(path / "transformer" / "config.json")
        self.vae_config = read_json(path / "vae" / "config.json")
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self._models = {}
        self._forwards = {}
        self.last_stats = Stats()
        # a model folder may carry its own defaults (the built-in model does: steps, guidance, T5 length)
        self.defaults = dict(info.get("defaults") or {})
        self.default_steps = int(self.defaults.get("steps", self.default_steps))
        self.default_guidance = self.defaults.get("guidance", self.default_guidance)

    # -- loading ------------------------------------------------------------------------------------------------
    def model(self, component: str):
        """Load a component once and keep it until `release`."""
        if component not in self._models:
            folder = self.path / component
            kind = kind_of(read_json(folder / "config.json"), str(folder))
            model_cls, config_cls = kind.classes()
            self._models[component] = load_component(folder, model_cls, config_cls, dtype=self.dtype)
        return self._models[component]

    def release(self, *components):
        for c in components:
            self._models.pop(c, None)
            self._forwards.pop(c, None)
        _free()

    def forward(self, component: str, key=(), bind: dict | None = None):
        """The component's call, traced once per input shape by `mx.compile`: the same numbers (checked bit for bit)
        with fewer, fused operations; ~3x faster per step for the built-in model on a CPU, where per-op overhead
        dominates. `bind`: keyword arguments fixed at trace time (FLUX's position ids, read on the host), `key` names
        them. Without a compiler (no g++ on Linux, MLX_DISABLE_COMPILE=1) it is the plain call."""
        cache = self._forwards.setdefault(component, {})
        if key not in cache:
            model = self.model(component)
            fn = partial(model.__call__, **bind) if bind else model.__call__
            cache[key] = mx.compile(fn) if _CAN_FUSE else fn
        return cache[key]

    def has(self, component: str) -> bool:
        return (self.path / component / "config.json").is_file()

    # -- defaults and checks --------------------------------------------------------------------------------------
    default_steps = 28
    default_guidance: float | None = None
    patch_size = 2  # latent pixels per token side (FLUX packs 2x2; SD3 reads its patch_size)
    max_size = None  # largest width/height the model can take, where it has one

    @property
    def default_size(self) -> int:
        return 128 * self.vae_scale_factor  # diffusers: default_sample_size 128 (1024 px for the real models)

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
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
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
        _free()
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


class FluxPipeline(Pipeline):
    """FLUX.1 schnell/dev as diffusers' FluxPipeline: CLIP pooled + T5 sequence, 2x2-packed latents, RoPE ids."""

    family = "flux"

    def __init__(self, *args, max_sequence_length=None, use_t5=True, **kwargs):
        super().__init__(*args, **kwargs)
        if not use_t5:
            raise InputError("FLUX cannot run without T5 (use_t5=False / --no-t5 is for SD3)")
        self.is_dev = bool(self.transformer_config.get("guidance_embeds"))
        self.default_steps = int(self.defaults.get("steps", 28 if self.is_dev else 4))
        self.default_guidance = self.defaults.get("guidance", 3.5 if self.is_dev else None)
        self.max_sequence_length = max_sequence_length or int(
            self.defaults.get("max_sequence_length", 512 if self.is_dev else 256))
        from .tokenizers import CLIPTokenizer, T5Tokenizer

        self.clip_tokenizer = CLIPTokenizer.from_folder(self.path / "tokenizer")
        self.t5_tokenizer = T5Tokenizer.from_folder(self.path / "tokenizer_2")

    def _encode_one(self, prompt):
        clip = self.model("text_encoder")
        ids = mx.array(self.clip_tokenizer([prompt], max_length=self.clip_tokenizer.model_max_length))
        pooled = clip(ids).pooler_output
        t5 = self.model("text_encoder_2")
        seq = t5(mx.array(self.t5_tokenizer([prompt], max_length=self.max_sequence_length)))
        mx.eval(pooled, seq)
        return seq.astype(self.compute_dtype), pooled.astype(self.compute_dtype)

    def encode(self, prompt, negative_prompt, guidance, true_cfg_scale: float = 1.0):
        cond = {"pos": self._encode_one(prompt), "true_cfg_scale": true_cfg_scale}
        if negative_prompt is not None and true_cfg_scale <= 1:
            warnings.warn("FLUX ignores the negative prompt unless true_cfg_scale (--true-cfg) is above 1", stacklevel=3)
        if true_cfg_scale > 1 and negative_prompt is not None:  # diffusers: true CFG only with a negative prompt
            cond["neg"] = self._encode_one(negative_prompt)
            self.last_settings.true_cfg_scale = true_cfg_scale
        if not self.keep_text_encoders:
            self.release("text_encoder", "text_encoder_2")
        return cond

    def prepare(self, noise, steps):
        from .flux import pack_latents, prepare_ids

        _, _, h, w = noise.shape
        x = pack_latents(noise)
        self._img_ids, self._txt_ids = prepare_ids(h // 2, w // 2, self.max_sequence_length)
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        c = self.scheduler_config
        mu = calculate_shift(x.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift or 0.5,
                             c.max_shift or 1.15)
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return x, scheduler

    def predict(self, x, t, cond, guidance):
        dt = self.compute_dtype
        timestep = mx.array([t], dtype=dt) / 1000
        g = mx.array([guidance], dtype=mx.float32) if self.is_dev else None

        ids = dict(img_ids=self._img_ids, txt_ids=self._txt_ids)
        forward = self.forward("transformer", key=(self._img_ids.shape, self._txt_ids.shape), bind=ids)

        def run(seq, pooled):
            return forward(x, seq, pooled, timestep, guidance=g)

        v = run(*cond["pos"])
        if "neg" in cond:
            neg = run(*cond["neg"])
            v = neg + cond["true_cfg_scale"] * (v - neg)
        return v

    def to_vae_latents(self, x, height, width):
        from .flux import unpack_latents

        return unpack_latents(x, height // self.vae_scale_factor, width // self.vae_scale_factor)


class SD3Pipeline(Pipeline):
    """Stable Diffusion 3 as diffusers' StableDiffusion3Pipeline: CLIP-L + CLIP-G (+ T5), true CFG, raw timesteps.

    Without T5 (no `text_encoder_3/` in the folder, or `use_t5=False`) T5 is never loaded and its sequence is zeros,
    exactly as diffusers does when `text_encoder_3` is None.
    """

    family = "sd3"
    default_steps = 28
    default_guidance = 7.0

    def __init__(self, *args, use_t5=True, max_sequence_length=None, **kwargs):
        super().__init__(*args, **kwargs)
        from .tokenizers import CLIPTokenizer, T5Tokenizer

        self.use_t5 = bool(use_t5) and self.has("text_encoder_3")
        if max_sequence_length is None:
            max_sequence_length = int(self.defaults.get("max_sequence_length", 256))
        self.max_sequence_length = max_sequence_length
        self.tokenizers = [CLIPTokenizer.from_folder(self.path / "tokenizer"),
                           CLIPTokenizer.from_folder(self.path / "tokenizer_2")]
        if self.use_t5:
            self.tokenizers.append(T5Tokenizer.from_folder(self.path / "tokenizer_3"))
        self.joint_attention_dim = int(self.transformer_config.get("joint_attention_dim", 4096))

    @property
    def default_size(self) -> int:
        return int(self.transformer_config.get("sample_size", 128)) * self.vae_scale_factor

    @property
    def patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def max_size(self) -> int:  # the learned position table covers pos_embed_max_size patches per side
        return int(self.transformer_config.get("pos_embed_max_size") or 10**6) * self.size_multiple

    def _encode_one(self, prompt):
        seqs, pooled = [], []
        for name, tok in zip(("text_encoder", "text_encoder_2"), self.tokenizers):
            out = self.model(name)(mx.array(tok([prompt], max_length=self.tokenizers[0].model_max_length)),
                                   output_hidden_states=True)
            seqs.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = mx.concatenate(seqs, axis=-1)
        if self.use_t5:
            t5 = self.model("text_encoder_3")(mx.array(self.tokenizers[2]([prompt], max_length=self.max_sequence_length)))
        else:
            t5 = mx.zeros((1, self.max_sequence_length, self.joint_attention_dim), dtype=clip.dtype)
        clip = mx.pad(clip, [(0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])])
        seq = mx.concatenate([clip, t5.astype(clip.dtype)], axis=1)
        pooled = mx.concatenate(pooled, axis=-1)
        mx.eval(seq, pooled)
        return seq.astype(self.compute_dtype), pooled.astype(self.compute_dtype)

    def encode(self, prompt, negative_prompt, guidance):
        seq, pooled = self._encode_one(prompt)
        if guidance is not None and guidance > 1:  # diffusers: CFG with "" as the default negative prompt
            neg_seq, neg_pooled = self._encode_one(negative_prompt or "")
            seq, pooled = mx.concatenate([neg_seq, seq]), mx.concatenate([neg_pooled, pooled])
        if not self.keep_text_encoders:
            self.release("text_encoder", "text_encoder_2", "text_encoder_3")
        return seq, pooled

    def prepare(self, noise, steps):
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        mu = None
        c = self.scheduler_config
        if c.use_dynamic_shifting:  # SD3.5-style configs
            seq_len = (noise.shape[2] // self.patch_size) * (noise.shape[3] // self.patch_size)
            mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift or 0.5,
                                 c.max_shift or 1.16)
        scheduler.set_timesteps(steps, mu=mu)
        return noise, scheduler

    def predict(self, x, t, cond, guidance):
        seq, pooled = cond
        cfg = seq.shape[0] == 2
        xin = mx.concatenate([x, x]) if cfg else x
        timestep = mx.full((xin.shape[0],), t, dtype=self.compute_dtype)
        v = self.forward("transformer")(xin, seq, pooled, timestep)
        if cfg:
            uncond, text = v[0:1], v[1:2]
            v = uncond + guidance * (text - uncond)
        return v

    def to_vae_latents(self, x, height, width):
        return x


_FAMILIES = {"flux": FluxPipeline, "sd3": SD3Pipeline}


BUILTIN_MODEL = Path(__file__).parent / "assets" / "models" / "tiny"


def load_pipeline(path=None, *, dtype=None, progress=True, **kwargs) -> Pipeline:
    """Open a converted MLX model folder (see tools/convert.py); without a path, the built-in tiny model (trained
    on synthetic shapes by `python -m mlx_diffusion.train`; it works offline, with nothing to download)."""
    path = BUILTIN_MODEL if path is None else Path(path)
    if not path.is_dir():
        raise WeightsError(f"model folder {path} " + ("is a file, not a folder" if path.exists() else "does not exist"))
    info_file = path / INFO_FILE
    if not info_file.is_file():
        hint = " (a diffusers folder: convert it first with tools/convert.py)" if (path / "model_index.json").exists() else ""
        raise WeightsError(f"{path} is not an mlx_diffusion model folder: no {INFO_FILE}{hint}")
    info = read_json(info_file)
    family = info.get("family")
    if family not in _FAMILIES:
        raise WeightsError(f"{info_file}: unknown model family {family!r}")
    for c in ("transformer", "vae", "scheduler"):
        if not (path / c).is_dir():
            raise WeightsError(f"{path}: component folder {c}/ is missing")
    for c in info.get("components", {}):  # fail now, not after minutes of work: headers, sizes and configs
        kind_of(read_json(path / c / "config.json"), str(path / c))
        SafetensorsFile(path / c / WEIGHTS_FILE)
    return _FAMILIES[family](path, info, dtype=dtype, progress=progress, **kwargs)
