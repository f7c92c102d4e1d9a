"""FLUX.1 schnell and dev as diffusers' FluxPipeline: CLIP-L's pooled output and T5's sequence, 2x2-packed latents
with RoPE position ids, FLUX.1-dev's embedded guidance, and true classifier-free guidance with a negative prompt."""

from __future__ import annotations

import functools

import numpy as np

import mlx.core as mx

from ..errors import InputError
from .base import Pipeline
from .sampler import FlowMatchEulerScheduler
from .tokenizers import CLIPTokenizer, T5Tokenizer


class FluxPipeline(Pipeline):
    """FLUX.1 schnell/dev as diffusers' FluxPipeline: CLIP pooled + T5 sequence, 2x2-packed latents, RoPE ids."""

    family = "flux"

    def __init__(self, *args, use_t5=True, **kwargs):
        super().__init__(*args, **kwargs)
        if not use_t5:
            raise InputError("FLUX cannot run without T5 (use_t5=False / --no-t5 is for SD3)")
        self.is_dev = bool(self.transformer_config.get("guidance_embeds"))
        self.clip_tokenizer = CLIPTokenizer.from_folder(self.path / "tokenizer")
        self.t5_tokenizer = T5Tokenizer.from_folder(self.path / "tokenizer_2")

    def resolve_family(self, s):
        if s.use_t5 is False:
            raise InputError("FLUX cannot run without T5 (use_t5=False / --no-t5 is for SD3)")
        return s

    def unused_settings(self, s):
        """schnell has no guidance input; true CFG (diffusers' true_cfg_scale) runs only above 1 and with a negative
        prompt, so either alone is unused."""
        unused = {} if self.is_dev else {"guidance": "FLUX.1-schnell has no guidance input: guidance is unused"}
        cfg = s.true_cfg_scale is not None and s.true_cfg_scale > 1
        if s.negative_prompt is not None and not cfg:
            unused["negative_prompt"] = "FLUX uses a negative prompt only with true_cfg_scale (--true-cfg) above 1"
        if s.true_cfg_scale is not None and (not cfg or s.negative_prompt is None):
            unused["true_cfg_scale"] = ("true_cfg_scale (--true-cfg) is unused without a negative prompt" if cfg else
                                        "true_cfg_scale (--true-cfg) of 1 or less does nothing")
        return unused

    def _encode(self, prompts, t5_length):
        clip = self.model("text_encoder")
        ids = mx.array(self.clip_tokenizer(prompts, max_length=self.clip_tokenizer.model_max_length))
        pooled = clip(ids).pooler_output
        t5 = self.model("text_encoder_2")
        seq = t5(mx.array(self.t5_tokenizer(prompts, max_length=t5_length)))
        mx.eval(pooled, seq)
        return seq.astype(self.compute_dtype), pooled.astype(self.compute_dtype)

    def encode(self, batch):
        s = batch[0]
        cond = {"pos": self._encode([b.prompt for b in batch], s.max_sequence_length)}
        if s.true_cfg_scale is not None:  # resolved: only above 1 and with a negative prompt
            cond["neg"] = self._encode([b.negative_prompt for b in batch], s.max_sequence_length)
        if not self.keep_text_encoders:
            self.release("text_encoder", "text_encoder_2")
        return cond

    def prepare(self, noise, s):
        x = pack_latents(noise)
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        scheduler.set_timesteps(s.steps, sigmas=np.linspace(1.0, 1 / s.steps, s.steps), mu=scheduler.mu(x.shape[1]))
        return x, scheduler

    def predict(self, x, t, cond, s, caches=None):
        dt = self.compute_dtype
        batch = x.shape[0]
        timestep = mx.full((batch,), t, dtype=dt) / 1000
        g = mx.full((batch,), s.guidance, dtype=mx.float32) if self.is_dev else None

        grid = (s.height // self.vae_scale_factor // 2, s.width // self.vae_scale_factor // 2)
        img_ids, txt_ids = prepare_ids(*grid, s.max_sequence_length)
        forward = self.forward("transformer", key=(img_ids.shape, txt_ids.shape),
                               bind=dict(img_ids=img_ids, txt_ids=txt_ids))

        def run(seq, pooled, branch):
            if caches is None:
                return forward(x, seq, pooled, timestep, guidance=g)
            return self.cached_forward(s, caches, branch, [[i] for i in range(batch)], (x, seq, pooled, timestep),
                                       {"guidance": g}, key=(img_ids.shape, txt_ids.shape),
                                       bind=dict(img_ids=img_ids, txt_ids=txt_ids))

        v = run(*cond["pos"], "pos")
        if "neg" in cond:  # diffusers' true CFG: two transformer calls, each with a cache of its own
            neg = run(*cond["neg"], "neg")
            v = neg + s.true_cfg_scale * (v - neg)
        return v

    def to_vae_latents(self, x, s):
        return unpack_latents(x, s.height // self.vae_scale_factor, s.width // self.vae_scale_factor)

    def from_vae_latents(self, z, s):
        return pack_latents(z)


# ---------------------------------------------------------------------------------------------------------------
# FluxPipeline's latent layout. These work on numpy and MLX arrays alike (reshape/transpose only).


def pack_latents(z, channels_last: bool = False):
    """FluxPipeline._pack_latents: (B, C, H, W) latents -> (B, (H/2) * (W/2), C * 4) tokens of 2x2 patches.

    Token features are ordered (c, dy, dx). channels_last=True takes (B, H, W, C) (MLX's VAE layout) instead.
    """
    if channels_last:
        B, H, W, C = z.shape
        return z.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4).reshape(B, H * W // 4, C * 4)
    B, C, H, W = z.shape
    return z.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)


def unpack_latents(x, latent_height: int, latent_width: int, channels_last: bool = False):
    """FluxPipeline._unpack_latents: (B, L, C * 4) -> (B, C, h, w), h = latent_height rounded down to even.

    diffusers takes the image size: latent_height = height // vae_scale_factor gives the same result.
    channels_last=True returns (B, h, w, C).
    """
    B, _, C4 = x.shape
    h, w, C = latent_height // 2, latent_width // 2, C4 // 4
    x = x.reshape(B, h, w, C, 2, 2)
    if channels_last:
        return x.transpose(0, 1, 4, 2, 5, 3).reshape(B, 2 * h, 2 * w, C)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(B, C, 2 * h, 2 * w)


@functools.lru_cache(maxsize=8)
def prepare_ids(height: int, width: int, text_len: int):
    """Position ids for a (height x width) grid of packed tokens (latent size / 2) and text_len text tokens.

    Image ids are (0, row, col) in row-major token order (FluxPipeline._prepare_latent_image_ids); text ids are 0.
    Returns float32 (img_ids (height * width, 3), txt_ids (text_len, 3)); cached, as every step asks for them.
    """
    ids = np.zeros((height, width, 3), dtype=np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return mx.array(ids.reshape(-1, 3)), mx.zeros((text_len, 3), dtype=mx.float32)
