#!/usr/bin/env python3
"""A comparison grid: the same model, prompts and initial noise through mlx_diffusion and through diffusers.

    python benchmarks/compare_grid.py [--model FOLDER] [--prompt TEXT ...] [--seeds 0 1 2] [--steps N]
                                      [--guidance G] [-o grid.png]

FOLDER is any mlx_diffusion model folder (tools/convert.py output, or the built-in model, the default, which needs
no download). diffusers runs on the folder's own weights (`io.folder.reference_arrays`: quantized layers dequantized)
with transformers' tokenizers on the folder's tokenizer files; both sides start from the same latents. Each row of
the grid is one prompt and seed: mlx_diffusion, diffusers, and their absolute difference x10. The script prints each
image pair's max/mean difference and both sides' time per image (ratio diffusers / ours: above 1, we are faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_diffusion  # noqa: E402  (before mlx.core: OpenBLAS on Linux)
from mlx_diffusion import load_pipeline  # noqa: E402
from reference import reference_pipeline  # noqa: E402  (benchmarks/reference.py: the diffusers side)

PROMPTS = ["a red circle on a blue background", "two green squares at the top",
           "three yellow triangles in the bottom left on a black background", "a white square on the right"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="an mlx_diffusion model folder [built-in model]")
    ap.add_argument("--prompt", action="append", default=None, help="repeatable [four shape prompts]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--size", type=int, default=None, help="width and height [the model's default]")
    ap.add_argument("-o", "--output", type=Path, default=Path("compare_grid.png"))
    args = ap.parse_args()

    import torch
    from PIL import Image

    ours = load_pipeline(args.model, progress=False, keep_text_encoders=True)
    ref = reference_pipeline(ours.path, ours.family)
    ref.set_progress_bar_config(disable=True)
    size = args.size or ours.default_width
    steps = args.steps or ours.default_steps
    guidance = ours.default_guidance if args.guidance is None else args.guidance
    f = ours.vae_scale_factor
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="np")
    if ours.family == "sd3":
        kw.update(guidance_scale=guidance, max_sequence_length=ours.max_sequence_length)
    else:
        kw.update(guidance_scale=guidance or 0.0, max_sequence_length=ours.max_sequence_length)

    rows, t_ours, t_ref = [], [], []
    print(f"{ours.path} ({ours.family}), {size}x{size}, {steps} steps, guidance {guidance}")
    for prompt in args.prompt or PROMPTS:
        for seed in args.seeds:
            latents = np.random.default_rng(seed).standard_normal((1, ours.latent_channels, size // f, size // f))
            latents = latents.astype(np.float32)
            t0 = time.perf_counter()
            a = ours.generate(prompt, steps=steps, guidance=guidance, width=size, height=size, latents=latents,
                              output_type="np")
            t_ours.append(time.perf_counter() - t0)
            x = torch.from_numpy(latents)
            if ours.family == "flux":
                x = ref._pack_latents(x, 1, x.shape[1], x.shape[2], x.shape[3])
            t0 = time.perf_counter()
            with torch.no_grad():
                b = ref(prompt, latents=x, **kw).images[0]
            t_ref.append(time.perf_counter() - t0)
            d = np.abs(a - b)
            print(f"  {prompt!r} seed {seed}: max abs diff {d.max():.2e}, mean {d.mean():.2e}")
            rows.append(np.concatenate([a, b, np.clip(10 * d, 0, 1)], axis=1))
    grid = np.concatenate([np.pad(r, ((1, 1), (0, 0), (0, 0)), constant_values=1) for r in rows], axis=0)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(args.output)
    mo, mr = np.median(t_ours), np.median(t_ref)
    print(f"time per image: mlx_diffusion {mo:.2f} s, diffusers {mr:.2f} s (diffusers / ours {mr / mo:.2f}x)")
    print(f"wrote {args.output} (columns: mlx_diffusion, diffusers, |difference| x10)")


if __name__ == "__main__":
    main()
