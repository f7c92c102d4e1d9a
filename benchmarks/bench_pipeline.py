#!/usr/bin/env python3
"""Text-to-image: mlx_diffusion vs the diffusers baseline, side by side in one run, on the same random weights.

    python benchmarks/bench_pipeline.py [--family flux|sd3] [--preset tiny|block|wide] [--steps 4] [--size 512]
                                        [--bits none|4|8] [--repeat 2]

No real weights can be downloaded here, so the models are random at FLUX-shaped sizes (presets below). Each side runs
in its own process, so peak memory (RSS) is its own; both get the same prompt and initial latents, and the images are
compared. Times are medians over --repeat runs after one warm-up; ratios are diffusers / mlx (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FLUX_PRESETS = {
    # per-op overhead regime: the test models
    "tiny": dict(layers=2, single_layers=2, heads=3, head_dim=16, axes=(4, 6, 6), t5=(48, 2, 3, 16, 72),
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
PROMPT = "a red fox in the snow, golden hour, 35mm photograph"


def peak_rss_gb() -> float:
    """Peak RSS of this process (VmHWM: ru_maxrss would carry over the parent's peak across exec). Not imported
    from mlx_diffusion: the diffusers worker must not load MLX, OpenBLAS or our malloc settings."""
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
    if family == "flux":
        t5, (clip,) = _text_encoders(preset["t5"], [preset["clip"]], projection=False)
        vae = _vae(preset["vae"], 0.3611, 0.1159)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=preset["layers"],
                                    num_single_layers=preset["single_layers"], attention_head_dim=preset["head_dim"],
                                    num_attention_heads=preset["heads"], joint_attention_dim=preset["t5"][0],
                                    pooled_projection_dim=preset["clip"][0], axes_dims_rope=preset["axes"])
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


def run_diffusers(family, folder, latents_file, size, steps, repeat):
    import numpy as np
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    torch.set_num_threads(os.cpu_count())
    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(np.load(latents_file))
    if family == "flux":
        lat = FluxPipeline._pack_latents(lat, 1, 16, size // 8, size // 8)
    times, image = [], None
    with torch.no_grad():
        for i in range(repeat + 1):
            t = {}
            t0 = time.perf_counter()
            if family == "flux":
                emb, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=256)
                kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, max_sequence_length=256)
            else:
                emb, nemb, pooled, npooled = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="")
                kw = dict(prompt_embeds=emb, negative_prompt_embeds=nemb, pooled_prompt_embeds=pooled,
                          negative_pooled_prompt_embeds=npooled)
            t["text_encoding"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            latents = pipe(height=size, width=size, num_inference_steps=steps, latents=lat, output_type="latent",
                           **kw).images
            t["denoising"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if family == "flux":
                latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
            z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="np")[0]
            t["decoding"] = time.perf_counter() - t0
            if i:
                times.append(t)
    return times, image


def run_mlx(family, folder, latents_file, size, steps, repeat):
    import numpy as np

    import mlx_diffusion

    pipe = mlx_diffusion.load_pipeline(folder, progress=False, keep_text_encoders=True)
    lat = np.load(latents_file)
    times, image = [], None
    for i in range(repeat + 1):
        image = pipe.generate(PROMPT, negative_prompt=None if family == "flux" else "", steps=steps, width=size,
                              height=size, latents=lat, output_type="np")
        if i:
            times.append(dict(pipe.last_stats.seconds))
    return times, image


def worker(args):
    fn = run_diffusers if args.side == "diffusers" else run_mlx
    import numpy as np

    times, image = fn(args.family, args.folder, args.latents, args.size, args.steps, args.repeat)
    np.save(args.image, image)
    print(json.dumps({"times": times, "peak_rss_gb": peak_rss_gb()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=PRESETS, default="flux")
    ap.add_argument("--preset", choices=FLUX_PRESETS, default="block")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels [preset's]")
    ap.add_argument("--bits", default="none", help="mlx side: none (float32) or 4/8 (quantized transformer)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = PRESETS[args.family][args.preset]
    args.size = args.size or preset["size"]
    if args.side:
        return worker(args)

    import numpy as np

    import mlx_diffusion
    from mlx_diffusion.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"building random {args.family} {args.preset} model ...", file=sys.stderr)
        build(args.family, preset, tmp / "diffusers")
        bits = None if args.bits == "none" else int(args.bits)
        t0 = time.perf_counter()
        convert(tmp / "diffusers", tmp / "mlx", bits=bits, dtype="float32", progress=False, log=lambda *a: None)
        convert_s = time.perf_counter() - t0
        np.save(tmp / "latents.npy", np.random.default_rng(0).standard_normal(
            (1, 16, args.size // 8, args.size // 8)).astype(np.float32))
        results = {}
        for side, folder in (("diffusers", tmp / "diffusers"), ("mlx", tmp / "mlx")):
            print(f"running {side} ...", file=sys.stderr)
            cmd = [sys.executable, __file__, "--family", args.family, "--preset", args.preset, "--steps", str(args.steps), "--size",
                   str(args.size), "--repeat", str(args.repeat), "--side", side, "--folder", str(folder),
                   "--latents", str(tmp / "latents.npy"), "--image", str(tmp / f"{side}.npy")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            results[side] = json.loads(r.stdout.strip().splitlines()[-1])
        diff = np.abs(np.load(tmp / "mlx.npy") - np.load(tmp / "diffusers.npy"))

    import platform

    from mlx_diffusion.backends import blas as _blas

    print(f"\n{args.family} preset {args.preset}: {preset}, {args.size}x{args.size}, {args.steps} steps, mlx weights "
          f"{'float32' if bits is None else f'{bits}-bit'}; {platform.machine()} {os.cpu_count()} cores, "
          f"BLAS {_blas.loaded_path or _blas.status}, mlx_diffusion {mlx_diffusion.__version__}")
    print(f"image difference mlx vs diffusers: max {diff.max():.2e}, mean {diff.mean():.2e}; conversion {convert_s:.1f} s\n")
    print("| stage | diffusers (s) | mlx_diffusion (s) | ratio diffusers/mlx |")
    print("|---|---|---|---|")
    for stage in ("text_encoding", "denoising", "decoding"):
        d = statistics.median(t[stage] for t in results["diffusers"]["times"])
        m = statistics.median(t[stage] for t in results["mlx"]["times"])
        print(f"| {stage} | {d:.3f} | {m:.3f} | {d / m:.2f} |")
    d = statistics.median(sum(t.values()) for t in results["diffusers"]["times"])
    m = statistics.median(sum(t.values()) for t in results["mlx"]["times"])
    print(f"| total | {d:.3f} | {m:.3f} | {d / m:.2f} |")
    dr, mr = results["diffusers"]["peak_rss_gb"], results["mlx"]["peak_rss_gb"]
    print(f"| peak RSS (GB) | {dr:.2f} | {mr:.2f} | {dr / mr:.2f} |")


if __name__ == "__main__":
    main()
