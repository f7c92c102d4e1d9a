"""Stable Diffusion 3 and 3.5 as diffusers' StableDiffusion3Pipeline: CLIP-L + CLIP-G (+ T5) prompt embeddings,
classifier-free guidance with a negative prompt, raw scheduler timesteps."""

from __future__ import annotations

import mlx.core as mx

from ..errors import InputError
from .base import Pipeline
from .sampler import FlowMatchEulerScheduler
from .tokenizers import CLIPTokenizer, T5Tokenizer


def prompt_embeds(clips, clip_ids, t5=None, t5_ids=None, *, t5_length: int, width: int):
    """SD3's prompt embeddings (StableDiffusion3Pipeline.encode_prompt for one side of the guidance).

    clips: the CLIP-L and CLIP-G encoders (with projection), clip_ids their (B, 77) token ids; t5 and its ids, or None
    for zeros of (B, t5_length, width) in T5's place, as diffusers uses when `text_encoder_3` is None. The sequence is
    both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens: (B, 77 + T, width);
    pooled is both projected pooled outputs side by side. Pure MLX ops: the built-in model's training backpropagates
    through it.
    """
    outs = [clip(ids, output_hidden_states=True) for clip, ids in zip(clips, clip_ids)]
    clip_seq = mx.concatenate([o.hidden_states[-2] for o in outs], axis=-1)
    if t5 is None:
        t5_seq = mx.zeros((clip_seq.shape[0], t5_length, width), dtype=clip_seq.dtype)
    else:
        t5_seq = t5(t5_ids)
    clip_seq = mx.pad(clip_seq, [(0, 0), (0, 0), (0, t5_seq.shape[-1] - clip_seq.shape[-1])])
    seq = mx.concatenate([clip_seq, t5_seq.astype(clip_seq.dtype)], axis=1)
    return seq, mx.concatenate([o.text_embeds for o in outs], axis=-1)


class SD3Pipeline(Pipeline):
    """Stable Diffusion 3 as diffusers' StableDiffusion3Pipeline: CLIP-L + CLIP-G (+ T5), true CFG, raw timesteps.

    Without T5 (no `text_encoder_3/` in the folder, or `use_t5=False`) T5 is never loaded and its sequence is zeros,
    exactly as diffusers does when `text_encoder_3` is None.
    """

    family = "sd3"

    def __init__(self, *args, use_t5=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_t5 = bool(use_t5) and self.has("text_encoder_3")
        self.tokenizers = [CLIPTokenizer.from_folder(self.path / "tokenizer"),
                           CLIPTokenizer.from_folder(self.path / "tokenizer_2")]
        self._t5_tokenizer = None
        self.joint_attention_dim = int(self.transformer_config.get("joint_attention_dim", 4096))

    @property
    def patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def max_size(self) -> int:  # the learned position table covers pos_embed_max_size patches per side
        return int(self.transformer_config.get("pos_embed_max_size") or 10**6) * self.size_multiple

    def resolve_family(self, s):
        if s.true_cfg_scale is not None:
            raise InputError("true_cfg_scale (--true-cfg) is for FLUX; SD3 always uses classifier-free guidance "
                             "(guidance)")
        if s.use_t5 and not self.has("text_encoder_3"):
            raise InputError(f"{self.path} has no T5 (text_encoder_3/): it runs without T5 only")
        return s

    def unused_settings(self, s):
        """Classifier-free guidance (and with it the negative prompt) runs only at guidance above 1, as diffusers'
        do_classifier_free_guidance."""
        if s.negative_prompt is not None and s.guidance <= 1:
            return {"negative_prompt": "the negative prompt is unused at guidance 1 or less (no classifier-free "
                                       "guidance)"}
        return {}

    def _t5(self, prompts, length):
        """T5 and its token ids; the tokenizer is read the first time T5 is used."""
        if self._t5_tokenizer is None:
            self._t5_tokenizer = T5Tokenizer.from_folder(self.path / "tokenizer_3")
        return self.model("text_encoder_3"), mx.array(self._t5_tokenizer(prompts, max_length=length))

    def _encode(self, prompts, s):
        clips = (self.model("text_encoder"), self.model("text_encoder_2"))
        length = self.tokenizers[0].model_max_length
        clip_ids = [mx.array(tok(prompts, max_length=length)) for tok in self.tokenizers]
        t5, t5_ids = self._t5(prompts, s.max_sequence_length) if s.use_t5 else (None, None)
        seq, pooled = prompt_embeds(clips, clip_ids, t5, t5_ids, t5_length=s.max_sequence_length,
                                    width=self.joint_attention_dim)
        mx.eval(seq, pooled)
        return seq.astype(self.compute_dtype), pooled.astype(self.compute_dtype)

    def encode(self, batch):
        """(sequence, pooled) of the batch's prompts; with guidance above 1 the negative prompts' first ("" by
        default, as diffusers), stacked in front: (2B, ...)."""
        s = batch[0]
        seq, pooled = self._encode([b.prompt for b in batch], s)
        if s.guidance is not None and s.guidance > 1:
            neg_seq, neg_pooled = self._encode([b.negative_prompt or "" for b in batch], s)
            seq, pooled = mx.concatenate([neg_seq, seq]), mx.concatenate([neg_pooled, pooled])
        if not self.keep_text_encoders:
            self.release("text_encoder", "text_encoder_2", "text_encoder_3")
        return seq, pooled

    def prepare(self, noise, s):
        scheduler = FlowMatchEulerScheduler(self.scheduler_config)
        tokens = (noise.shape[2] // self.patch_size) * (noise.shape[3] // self.patch_size)
        scheduler.set_timesteps(s.steps, mu=scheduler.mu(tokens))  # dynamic shifting: SD3.5-style configs
        return noise, scheduler

    def predict(self, x, t, cond, s, caches=None):
        seq, pooled = cond
        batch = x.shape[0]
        cfg = seq.shape[0] == 2 * batch
        xin = mx.concatenate([x, x]) if cfg else x
        timestep = mx.full((xin.shape[0],), t, dtype=self.compute_dtype)
        if caches is None:
            v = self.forward("transformer")(xin, seq, pooled, timestep)
        else:  # an image's rows: its negative and positive halves under guidance, decided together as diffusers does
            rows = [[i, batch + i] if cfg else [i] for i in range(batch)]
            H, W = xin.shape[2:]
            v = self.cached_forward(s, caches, "all", rows, (xin, seq, pooled, timestep), output_bind=dict(H=H, W=W))
        if cfg:
            uncond, text = v[:batch], v[batch:]
            v = uncond + s.guidance * (text - uncond)
        return v

    def to_vae_latents(self, x, s):
        return x

    def from_vae_latents(self, z, s):
        return z
