#!/usr/bin/env python3
"""The diffusers side of `mlx-diffusion benchmark --compare-diffusers` and `compare --reference diffusers`, kept
out of the package: mlx_diffusion never imports torch, diffusers or transformers.

    python benchmarks/reference.py build FAMILY PRESET OUT     a random-weight diffusers pipeline at a preset's sizes
    python benchmarks/reference.py run REQUEST.json            diffusers on a converted folder's own weights, timed

`run` builds the diffusers pipeline from the folder (`reference_pipeline`: quantized layers dequantized, transformers'
tokenizers on the folder's tokenizer files), or for a preset loads the diffusers folder it was built as, runs every prompt from the given initial latents once to warm up and
`repeat` times more, and writes per-stage times, per-step times, its peak RSS and the images. It runs in its own
process, so its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FLUX_PRESETS = {
    # per-op overhead regime: the test models
    "tiny": dict(layers=2, single_layers=2, heads=3, head_dim=16, axes=(4, 6, 6), t5=(48, 2, 3, 16, 72),
                 clip=(32, 2, 2), vae=(8, 16, 16, 24), size=64),
    # the same with 4 heads, which split across 2 ranks (bench_shard.py's test)
    "tiny4": dict(layers=2, single_layers=2, heads=4, head_dim=16, axes=(4, 6, 6), t5=(48, 2, 3, 16, 72),
                  clip=(32, 2, 2), vae=(8, 16, 16, 24), size=64),
    # real FLUX widths (3072 = 24 x 128, RoPE axes 16/56/56, real VAE and CLIP-L), few blocks, small T5
    "block": dict(layers=1, single_layers=2, heads=24, head_dim=128, axes=(16, 56, 56), t5=(4096, 2, 64, 64, 10240),
                  clip=(768, 12, 12), vae=(128, 256, 512, 512), size=512),
    # a quarter-width FLUX with more depth
    "wide": dict(layers=4, single_layers=8, heads=8, head_dim=128, axes=(16, 56, 56), t5=(1024, 4, 16, 64, 2816),
                 clip=(768, 12, 12), vae=(128, 256, 512, 512), size=512),
}
SD3_PRESETS = {
    "tiny": dict(layers=3, heads=3, head_dim=16, t5=(80, 2, 4, 16, 72), clip=((32, 2, 2), (40, 2, 4)),
                 vae=(8, 16, 16, 24), size=64, max_pos=16),
    # SD3 Medium widths (1536 = 24 x 64, CLIP-L and CLIP-G at full size, real VAE), 2 joint blocks, small T5
    "block": dict(layers=2, heads=24, head_dim=64, t5=(4096, 2, 64, 64, 10240), clip=((768, 12, 12), (1280, 32, 20)),
                  vae=(128, 256, 512, 512), size=512, max_pos=192),
    "wide": dict(layers=6, heads=8, head_dim=64, t5=(1024, 4, 16, 64, 2816), clip=((768, 12, 12), (1280, 32, 20)),
                 vae=(128, 256, 512, 512), size=512, max_pos=192),
}
PRESETS = {"flux": FLUX_PRESETS, "sd3": SD3_PRESETS}


def peak_rss_gb() -> float:
    """Peak RSS of this process (VmHWM: ru_maxrss would carry over the parent's peak across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / (1 << 20)
    return float("nan")


def _text_encoders(t5_dims, clip_dims, projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    d, L, H, dk, ff = t5_dims
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=d, d_kv=dk, d_ff=ff, num_layers=L, num_heads=H,
                                 feed_forward_proj="gated-gelu"))
    clips = []
    for i, (width, layers, heads) in enumerate(clip_dims):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=77, projection_dim=width,
                             hidden_act="quick_gelu" if i == 0 else "gelu", eos_token_id=49407)
        clips.append((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg))
    return t5, clips


def _vae(channels, scaling, shift):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=2, norm_num_groups=32 if channels[0] >= 32 else 8, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift)


def build(family: str, preset: dict, folder: Path):
    """A random-weight diffusers pipeline folder at the preset's sizes."""
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTokenizer

    import tiny_models
    from helpers import CLIP_TOKENIZER, init_weights_

    torch.manual_seed(0)
    clip_tok, t5_tok = tiny_models.tokenizers()
    if family in ("flux", "flux-dev"):
        t5, (clip,) = _text_encoders(preset["t5"], [preset["clip"]], projection=False)
        vae = _vae(preset["vae"], 0.3611, 0.1159)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=preset["layers"],
                                    num_single_layers=preset["single_layers"], attention_head_dim=preset["head_dim"],
                                    num_attention_heads=preset["heads"], joint_attention_dim=preset["t5"][0],
                                    pooled_projection_dim=preset["clip"][0], axes_dims_rope=preset["axes"],
                                    guidance_embeds=family == "flux-dev")
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip,
                            tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=tr)
        models = (t5, clip, vae, tr)
    else:
        t5, (clip_l, clip_g) = _text_encoders(preset["t5"], preset["clip"], projection=True)
        vae = _vae(preset["vae"], 1.5305, 0.0609)
        inner = preset["heads"] * preset["head_dim"]
        tr = SD3Transformer2DModel(sample_size=preset["size"] // 8, patch_size=2, in_channels=16,
                                   num_layers=preset["layers"], attention_head_dim=preset["head_dim"],
                                   num_attention_heads=preset["heads"], joint_attention_dim=preset["t5"][0],
                                   caption_projection_dim=inner,
                                   pooled_projection_dim=sum(c[0] for c in preset["clip"]), out_channels=16,
                                   pos_embed_max_size=preset["max_pos"])
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g,
                                        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, pad_token="!"),
                                        text_encoder_3=t5, tokenizer_3=t5_tok, transformer=tr)
        models = (t5, clip_l, clip_g, vae, tr)
    for m in models:
        init_weights_(m.eval(), 0.2 if m is vae else 1.0)
    tiny_models.save(pipe, folder)


WEIGHTS_DIR = None  # `run`: the folder's weights exported in the reference layout, so this process never loads MLX


def _state(folder):
    """A component's weights as torch tensors: from WEIGHTS_DIR (exported by the caller), or read through
    mlx_diffusion (in-process use, e.g. from a notebook)."""
    import torch

    if WEIGHTS_DIR is not None:
        from safetensors.torch import load_file

        return load_file(str(Path(WEIGHTS_DIR) / f"{Path(folder).name}.safetensors"))
    import mlx_diffusion  # noqa: F401  (before mlx.core)
    from mlx_diffusion.io.folder import reference_arrays

    return {k: torch.from_numpy(v) for k, v in reference_arrays(folder).items()}


def reference_pipeline(path: Path, family: str):
    """A diffusers pipeline holding the folder's weights."""
    import diffusers
    import transformers

    def config(c):
        return json.loads((path / c / "config.json").read_text())

    def diffusers_model(cls, c):
        m = cls.from_config(config(c))
        m.load_state_dict(_state(path / c), strict=True)
        return m.eval()

    def transformers_model(c):
        cfg = config(c)
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch)
        m = cls(getattr(transformers, cls.config_class.__name__).from_dict(cfg))
        state, own = _state(path / c), set(m.state_dict())
        # transformers 5 names a plain CLIPTextModel's parameters without the `text_model.` our folders keep
        state = {k.removeprefix("text_model.") if k not in own and k.removeprefix("text_model.") in own else k: v
                 for k, v in state.items()}
        missing, unexpected = m.load_state_dict(state, strict=False)
        # buffers that older files held, and T5's embed_tokens, which is tied to `shared` (the folder has only that)
        if unexpected or any("position_ids" not in k and not k.endswith("embed_tokens.weight") for k in missing):
            raise SystemExit(f"{path / c}: weights do not fit {arch} ({missing[:3]} {unexpected[:3]})")
        return m.eval()

    def tokenizer(c):
        if not (path / c).is_dir():
            return None
        cfg = json.loads((path / c / "tokenizer_config.json").read_text())
        cls = transformers.T5TokenizerFast if "T5" in cfg.get("tokenizer_class", "") else transformers.CLIPTokenizer
        return cls.from_pretrained(path / c)

    def encoder(c):
        return transformers_model(c) if (path / c / "config.json").is_file() else None

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    vae = diffusers_model(diffusers.AutoencoderKL, "vae")
    if family == "flux":
        return diffusers.FluxPipeline(
            transformer=diffusers_model(diffusers.FluxTransformer2DModel, "transformer"), vae=vae,
            scheduler=scheduler, text_encoder=encoder("text_encoder"), tokenizer=tokenizer("tokenizer"),
            text_encoder_2=encoder("text_encoder_2"), tokenizer_2=tokenizer("tokenizer_2"))
    return diffusers.StableDiffusion3Pipeline(
        transformer=diffusers_model(diffusers.SD3Transformer2DModel, "transformer"), vae=vae, scheduler=scheduler,
        text_encoder=encoder("text_encoder"), tokenizer=tokenizer("tokenizer"),
        text_encoder_2=encoder("text_encoder_2"), tokenizer_2=tokenizer("tokenizer_2"),
        text_encoder_3=encoder("text_encoder_3"), tokenizer_3=tokenizer("tokenizer_3"))


def run(request: dict) -> dict:
    """Time diffusers on the request's folder, prompts and latents; images saved as .npy beside the request's out."""
    import torch

    global WEIGHTS_DIR
    torch.set_num_threads(os.cpu_count())
    folder, family = Path(request["folder"]), request["family"]
    if request.get("pretrained"):  # a preset: the diffusers folder it was built as
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
        pipe = cls.from_pretrained(request["pretrained"], torch_dtype=torch.float32)
    else:
        WEIGHTS_DIR = request["weights"]
        pipe = reference_pipeline(folder, family)
    pipe.set_progress_bar_config(disable=True)
    size, steps, guidance = request["size"], request["steps"], request["guidance"]
    length = request["max_sequence_length"]
    runs, cold = [], []
    with torch.no_grad():
        for r in range(request["repeat"] + 1):
            for i, (prompt, lat_file) in enumerate(zip(request["prompts"], request["latents"])):
                lat = torch.from_numpy(np.load(lat_file))
                if family == "flux":
                    lat = pipe._pack_latents(lat, 1, lat.shape[1], lat.shape[2], lat.shape[3])
                t, marks = {}, []
                t0 = time.perf_counter()
                if family == "flux":
                    emb, pooled, _ = pipe.encode_prompt(prompt, prompt, max_sequence_length=length)
                    kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, guidance_scale=guidance or 0.0)
                else:
                    emb, nemb, pooled, npooled = pipe.encode_prompt(
                        prompt, prompt, prompt, negative_prompt="", max_sequence_length=length,
                        do_classifier_free_guidance=guidance is not None and guidance > 1)
                    kw = dict(prompt_embeds=emb, negative_prompt_embeds=nemb, pooled_prompt_embeds=pooled,
                              negative_pooled_prompt_embeds=npooled, guidance_scale=guidance)
                t["text_encoding"] = time.perf_counter() - t0

                def mark(p, step, timestep, kwargs):
                    marks.append(time.perf_counter())
                    return {}

                t0 = time.perf_counter()
                latents = pipe(height=size, width=size, num_inference_steps=steps, latents=lat, output_type="latent",
                               max_sequence_length=length, callback_on_step_end=mark, **kw).images
                t["denoising"] = time.perf_counter() - t0
                t["step_seconds"] = list(np.diff([t0, *marks]))
                t0 = time.perf_counter()
                if family == "flux":
                    latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
                z = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
                image = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="np")[0]
                t["decoding"] = time.perf_counter() - t0
                (runs if r else cold).append(t)
                if r == request["repeat"]:
                    np.save(Path(request["out"]).with_name(f"diffusers-{i}.npy"), image)
    return {"runs": runs, "cold": cold, "peak_rss_gb": peak_rss_gb()}


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "build" and len(sys.argv) == 5:
        family, preset, out = sys.argv[2:]  # family flux-dev: FLUX with the guidance embedder (FLUX.1-dev's layout)
        build(family, PRESETS[family.split("-")[0]][preset], Path(out))
    elif len(sys.argv) == 3 and sys.argv[1] == "run":
        request = json.loads(Path(sys.argv[2]).read_text())
        result = run(request)
        Path(request["out"]).write_text(json.dumps(result))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
