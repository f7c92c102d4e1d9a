#!/usr/bin/env python3
"""What a LoRA costs per denoising step: on a quantized model it runs beside the quantized weights
(`base(x) + (x @ down.T) @ up.T`), baked in (`convert --lora`) it costs nothing at run time.

    python benchmarks/bench_lora.py [--family flux|sd3] [--preset block] [--bits 4] [--rank 16] [--size 512]
                                    [--steps 3]

Builds a random-weight model at real widths (benchmarks/reference.py, needs `./setup.sh --test`), converts it at
--bits, makes a random rank --rank LoRA (diffusers/PEFT layout) over every Linear layer of the transformer blocks, and
times the denoising steps (after one untimed run that compiles) without the LoRA, with it beside the quantized weights,
and with it baked in by the converter. Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_diffusion  # noqa: E402,F401  before mlx.core
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mlx_diffusion import load_pipeline  # noqa: E402
from mlx_diffusion.convert import convert  # noqa: E402
from mlx_diffusion.io.folder import linear_shapes  # noqa: E402


def step_seconds(folder, lora, steps, size) -> float:
    pipe = load_pipeline(folder, progress=False, lora=lora, keep_text_encoders=True)
    pipe.generate("a lighthouse", steps=1, width=size, height=size, seed=0)  # compile and load
    pipe.generate("a lighthouse", steps=steps, width=size, height=size, seed=0)
    return float(np.median(pipe.last_stats.step_seconds))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["flux", "sd3"], default="flux")
    p.add_argument("--preset", choices=["tiny", "block", "wide"], default="block")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", args.family, args.preset,
                        f"{tmp}/diffusers"], check=True, capture_output=True)
        quiet = dict(progress=False, log=lambda *a: None, dtype="float32")
        folder = convert(f"{tmp}/diffusers", f"{tmp}/plain", bits=args.bits, **quiet)
        rng = np.random.default_rng(0)
        lora = {}
        layers = [name for name in linear_shapes(folder / "transformer") if "transformer_blocks." in name]
        for name in layers:
            out_dims, in_dims = linear_shapes(folder / "transformer")[name]
            lora[f"transformer.{name}.lora_A.weight"] = rng.standard_normal((args.rank, in_dims), np.float32) * 0.01
            lora[f"transformer.{name}.lora_B.weight"] = rng.standard_normal((out_dims, args.rank), np.float32) * 0.01
        save_file(lora, f"{tmp}/lora.safetensors")
        baked = convert(f"{tmp}/diffusers", f"{tmp}/baked", bits=args.bits, lora=[(f"{tmp}/lora.safetensors", 1.0)],
                        **quiet)
        plain = step_seconds(folder, (), args.steps, args.size)
        beside = step_seconds(folder, [(f"{tmp}/lora.safetensors", 1.0)], args.steps, args.size)
        fused = step_seconds(baked, (), args.steps, args.size)
    name = f"{args.family} {args.preset} preset, {args.bits}-bit, rank-{args.rank} LoRA on {len(layers)} layers"
    print(f"{name}, {args.size}x{args.size}, median seconds per denoising step")
    print("| without LoRA | LoRA beside the quantized weights (--lora) | LoRA baked in (convert --lora) |")
    print("|---|---|---|")
    print(f"| {plain:.3f} s | {beside:.3f} s ({beside / plain:.2f}x) | {fused:.3f} s ({fused / plain:.2f}x) |")
    print(json.dumps({"family": args.family, "preset": args.preset, "bits": args.bits, "rank": args.rank,
                      "layers": len(layers), "size": args.size, "plain_s": plain, "beside_s": beside,
                      "baked_s": fused}))


if __name__ == "__main__":
    main()
