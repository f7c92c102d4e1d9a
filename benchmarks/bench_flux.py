#!/usr/bin/env python3
"""FLUX text-to-image: mlx_diffusion vs the diffusers baseline, side by side in one run, on the same random weights.

    python benchmarks/bench_flux.py [--preset tiny|block|wide] [--steps 4] [--size 512] [--bits none|4|8] [--repeat 2]

No real weights can be downloaded here, so the models are random at FLUX-shaped sizes (presets below). Each side runs
in its own process, so peak memory (RSS) is its own; both get the same prompt and initial latents, and the images are
compared. Times are medians over --repeat runs after one warm-up; ratios are diffusers / mlx (above 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PRESETS = {
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
PROMPT = "a red fox in the snow, golden hour, 35mm photograph"


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def build(preset: dict, folder: Path):
    """A random-weight diffusers FluxPipeline folder at the preset's sizes."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    import tiny_models
    from helpers import init_weights_

    torch.manual_seed(0)
    d, L, H, dk, ff = preset["t5"]
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=d, d_kv=dk, d_ff=ff, num_layers=L, num_heads=H,
                                 feed_forward_proj="gated-gelu"))
    ch, cl, chh = preset["clip"]
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=ch, intermediate_size=4 * ch,
                                        num_hidden_layers=cl, num_attention_heads=chh, max_position_embeddings=77,
                                        hidden_act="quick_gelu", eos_token_id=49407))
    n = len(preset["vae"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=preset["vae"],
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=2, norm_num_groups=32 if preset["vae"][0] >= 32 else 8,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=preset["layers"],
                                num_single_layers=preset["single_layers"], attention_head_dim=preset["head_dim"],
                                num_attention_heads=preset["heads"], joint_attention_dim=d, pooled_projection_dim=ch,
                                axes_dims_rope=preset["axes"])
    for m, gain in ((t5, 1.0), (clip, 1.0), (vae, 0.2), (tr, 1.0)):
        init_weights_(m.eval(), gain)
    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=tr)
    tiny_models.save(pipe, folder)


def run_diffusers(folder, latents_file, size, steps, repeat):
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(os.cpu_count())
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(np.load(latents_file))
    packed = FluxPipeline._pack_latents(lat, 1, 16, size // 8, size // 8)
    times, image = [], None
    with torch.no_grad():
        for i in range(repeat + 1):
            t = {}
            t0 = time.perf_counter()
            emb, pooled, text_ids = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=256)
            t["text_encoding"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            latents = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=size, width=size,
                           num_inference_steps=steps, latents=packed, output_type="latent",
                           max_sequence_length=256).images
            t["denoising"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            z = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
            z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="np")[0]
            t["decoding"] = time.perf_counter() - t0
            if i:
                times.append(t)
    return times, image


def run_mlx(folder, latents_file, size, steps, repeat):
    import numpy as np

    import mlx_diffusion

    pipe = mlx_diffusion.load_pipeline(folder, progress=False, keep_text_encoders=True)
    lat = np.load(latents_file)
    times, image = [], None
    for i in range(repeat + 1):
        image = pipe.generate(PROMPT, steps=steps, width=size, height=size, latents=lat, output_type="np")
        if i:
            times.append(dict(pipe.last_stats.seconds))
    return times, image


def worker(args):
    fn = run_diffusers if args.side == "diffusers" else run_mlx
    import numpy as np

    times, image = fn(args.folder, args.latents, args.size, args.steps, args.repeat)
    np.save(args.image, image)
    print(json.dumps({"times": times, "peak_rss_gb": peak_rss_gb()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="block")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels [preset's]")
    ap.add_argument("--bits", default="none", help="mlx side: none (float32) or 4/8 (quantized transformer)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    args.size = args.size or preset["size"]
    if args.side:
        return worker(args)

    import numpy as np

    import mlx_diffusion
    from mlx_diffusion.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"building random {args.preset} model ...", file=sys.stderr)
        build(preset, tmp / "diffusers")
        bits = None if args.bits == "none" else int(args.bits)
        t0 = time.perf_counter()
        convert(tmp / "diffusers", tmp / "mlx", bits=bits, dtype="float32", progress=False, log=lambda *a: None)
        convert_s = time.perf_counter() - t0
        np.save(tmp / "latents.npy", np.random.default_rng(0).standard_normal(
            (1, 16, args.size // 8, args.size // 8)).astype(np.float32))
        results = {}
        for side, folder in (("diffusers", tmp / "diffusers"), ("mlx", tmp / "mlx")):
            print(f"running {side} ...", file=sys.stderr)
            cmd = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps), "--size",
                   str(args.size), "--repeat", str(args.repeat), "--side", side, "--folder", str(folder),
                   "--latents", str(tmp / "latents.npy"), "--image", str(tmp / f"{side}.npy")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            results[side] = json.loads(r.stdout.strip().splitlines()[-1])
        diff = np.abs(np.load(tmp / "mlx.npy") - np.load(tmp / "diffusers.npy"))

    import platform

    from mlx_diffusion import _blas

    print(f"\nFLUX preset {args.preset}: {preset}, {args.size}x{args.size}, {args.steps} steps, mlx weights "
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
