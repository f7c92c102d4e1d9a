#!/usr/bin/env python3
"""Images per minute made one at a time and in batches (`Pipeline.generate_many(batch_size=B)`), same seeds.

    python benchmarks/bench_batch.py [--model FOLDER | --preset block --family flux|sd3] [--batch 4] [--images 8]
                                     [--steps N] [--size S]

Without --model, the built-in model. `--preset` builds a random-weight model at real widths (benchmarks/reference.py,
needs `./setup.sh --test`) and converts it in float32. Each setting runs once to compile (not timed), then timed
over --images images (a whole number of batches). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_diffusion  # noqa: E402,F401  before mlx.core
from mlx_diffusion import load_pipeline  # noqa: E402


def images_per_minute(pipe, batch: int, images: int, **settings) -> float:
    prompts = ["a red circle", "two green squares at the top", "three yellow triangles", "a blue square"]
    pipe.generate_many(prompts[:1], seeds=list(range(batch)), batch_size=batch, **settings)  # compile
    started = time.perf_counter()
    pipe.generate_many(prompts[:1], seeds=list(range(images)), batch_size=batch, **settings)
    return 60 * images / (time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--preset", choices=["tiny", "block", "wide"], default=None)
    p.add_argument("--family", choices=["flux", "sd3"], default="flux")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if args.preset:
            from mlx_diffusion.convert import convert

            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", args.family,
                            args.preset, f"{tmp}/diffusers"], check=True, capture_output=True)
            folder = convert(f"{tmp}/diffusers", f"{tmp}/mlx", bits=None, dtype="float32", progress=False,
                             log=lambda *a: None)
        pipe = load_pipeline(folder, progress=False)
        settings = {k: v for k, v in dict(steps=args.steps, width=args.size, height=args.size).items() if v}
        one = images_per_minute(pipe, 1, args.images, **settings)
        many = images_per_minute(pipe, args.batch, args.images, **settings)
    name = f"{args.family} {args.preset} preset" if args.preset else (args.model or "the built-in model")
    print(f"{name}: {one:.1f} images/min one at a time, {many:.1f} in batches of {args.batch} "
          f"({many / one:.2f}x)")
    print(json.dumps({"model": name, "batch": args.batch, "images_per_minute": {"1": one, str(args.batch): many},
                      "speedup": many / one, "settings": settings}))


if __name__ == "__main__":
    main()
