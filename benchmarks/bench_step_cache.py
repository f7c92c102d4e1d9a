#!/usr/bin/env python3
"""What the first-block cache (`--cache THRESHOLD`) buys and costs, per threshold, on the same prompts and seeds.

    python benchmarks/bench_step_cache.py [--prompts 48] [--steps 20] [--thresholds 0.05,0.1,0.2]
    python benchmarks/bench_step_cache.py --model FOLDER [--prompts 2] [--steps N] [--size 512] [--thresholds ...]
    python benchmarks/bench_step_cache.py --preset block --family flux-dev|flux|sd3 [--prompts 2] [--size 512] ...

The built-in model (the default): time per image, the share of transformer calls skipped, each attribute's
prompt-following accuracy (`mlx_diffusion.tiny.evaluate`) and the pixel difference to the uncached images; each
setting runs once untimed on a few prompts (compiling), then over the held-out prompt set, timing the generations
alone (not the scoring). `--model`: any converted folder (a real FLUX.1-dev or SD3 on your machine), with prompts
from the bank that suits it and the folder's default steps: time per image, share skipped and pixel change (no
attribute scores: they need the built-in model's classifier). `--preset`: a random-weight model at real widths built
first (`benchmarks/reference.py`; `flux-dev` has the guidance embedder): its steps skip as random weights do, not as
a trained model's would. Prints a table and one JSON line last.
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
import numpy as np  # noqa: E402

from mlx_diffusion import load_pipeline  # noqa: E402
from mlx_diffusion.tiny.evaluate import evaluate  # noqa: E402


def run(pipe, n, steps, cache):
    evaluate(pipe, 4, seed=1000, steps=steps, progress=False, cache=cache)  # compile
    calls, seconds = [], []
    original = pipe._stages

    def counting(*a, **k):  # the generations' own time, not the scoring's
        t0 = time.perf_counter()
        results = original(*a, **k)
        seconds.append(time.perf_counter() - t0)
        calls.append(results[0].stats.cached_calls)
        return results

    pipe._stages = counting
    _, images, generated, _, _ = evaluate(pipe, n, seed=0, steps=steps, progress=False, cache=cache)
    pipe._stages = original
    accuracy = {k: ok / asked for k, (ok, asked) in generated.items() if asked}
    return images, sum(seconds) / n, accuracy, sum(calls) / (n * steps)


def run_folder(pipe, prompts, steps, size, cache, seed=0):
    """Each prompt once with its seed; (images, seconds per image, share of transformer calls skipped)."""
    images, seconds, skipped = [], [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        images.append(pipe.generate(prompt, steps=steps, width=size, height=size, seed=seed + i, cache=cache,
                                    output_type="np"))
        seconds.append(time.perf_counter() - t0)
        skipped.append(pipe.last_stats.cached_calls / steps)
    return np.stack(images), sum(seconds) / len(prompts), sum(skipped) / len(prompts)


def main_folder(a, thresholds):
    from mlx_diffusion.pipelines import check_model_folder
    from mlx_diffusion.tour import prompts as bank

    with tempfile.TemporaryDirectory(prefix="bench-step-cache-") as tmp:
        folder = Path(a.model) if a.model else None
        if folder is None:  # a random-weight model at real widths
            family = a.family.split("-")[0]
            print(f"building a random {a.family} {a.preset} model ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", a.family, a.preset,
                            f"{tmp}/diffusers"], check=True, stdout=subprocess.DEVNULL)
            from mlx_diffusion.convert import convert

            folder = convert(f"{tmp}/diffusers", f"{tmp}/mlx", bits=None, dtype="float32", progress=False,
                             log=lambda *x: None)
        info, _ = check_model_folder(folder)
        texts = bank.select(info=info, limit=a.prompts)
        steps, size = a.steps or info["defaults"]["steps"], a.size or info["defaults"]["width"]
        pipe = load_pipeline(folder, progress=False)
        pipe.generate(texts[0], steps=2, width=size, height=size, seed=99)  # kernels built, weights read
        base_images, base_seconds, _ = run_folder(pipe, texts, steps, size, None)
        rows = {"off": {"seconds_per_image": base_seconds, "speedup": 1.0, "skipped": 0.0, "mean_abs_diff": 0.0,
                        "max_abs_diff": 0.0}}
        for threshold in thresholds:
            images, seconds, skipped = run_folder(pipe, texts, steps, size, threshold)
            diff = np.abs(images - base_images)
            rows[str(threshold)] = {"seconds_per_image": seconds, "speedup": base_seconds / seconds,
                                    "skipped": skipped, "mean_abs_diff": float(diff.mean()),
                                    "max_abs_diff": float(diff.max())}
    name = str(a.model) if a.model else f"random {a.family} {a.preset} preset"
    print(f"{name}, {len(texts)} prompts, {steps} steps, {size}x{size}")
    print(f"{'cache':>6} {'s/image':>8} {'speed-up':>8} {'skipped':>8} {'mean diff':>9} {'max diff':>9}")
    for key, r in rows.items():
        print(f"{key:>6} {r['seconds_per_image']:>8.2f} {r['speedup']:>7.2f}x {r['skipped']:>8.0%} "
              f"{r['mean_abs_diff']:>9.4f} {r['max_abs_diff']:>9.4f}")
    print(json.dumps({"model": name, "prompts": len(texts), "steps": steps, "size": size, "rows": rows}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=None, help="how many prompts (built-in: 48; other models: 2)")
    p.add_argument("--steps", type=int, default=None, help="steps (built-in: 20; other models: the folder's)")
    p.add_argument("--thresholds", default="0.05,0.1,0.2")
    p.add_argument("--model", default=None, help="a converted model folder")
    p.add_argument("--preset", choices=["tiny", "block", "wide"], default=None)
    p.add_argument("--family", choices=["flux", "flux-dev", "sd3"], default="flux-dev")
    p.add_argument("--size", type=int, default=None, help="image side (other models; default: the folder's)")
    a = p.parse_args()
    thresholds = [float(t) for t in a.thresholds.split(",")]
    if a.model or a.preset:
        a.prompts = a.prompts or 2
        return main_folder(a, thresholds)
    a.prompts, a.steps = a.prompts or 48, a.steps or 20
    pipe = load_pipeline(progress=False)
    base_images, base_seconds, base_accuracy, _ = run(pipe, a.prompts, a.steps, None)
    rows = {"off": {"seconds_per_image": base_seconds, "speedup": 1.0, "skipped": 0.0, "accuracy": base_accuracy,
                    "mean_abs_diff": 0.0, "max_abs_diff": 0.0}}
    for threshold in thresholds:
        images, seconds, accuracy, skipped = run(pipe, a.prompts, a.steps, threshold)
        diff = np.abs(images.astype(np.float32) - base_images.astype(np.float32)) / 255
        rows[str(threshold)] = {"seconds_per_image": seconds, "speedup": base_seconds / seconds, "skipped": skipped,
                                "accuracy": accuracy, "mean_abs_diff": float(diff.mean()),
                                "max_abs_diff": float(diff.max())}
    attributes = list(base_accuracy)
    print(f"built-in model, {a.prompts} held-out prompts, {a.steps} steps")
    print(f"{'cache':>6} {'s/image':>8} {'speed-up':>8} {'skipped':>8} {'mean diff':>9} "
          + " ".join(f"{k:>10}" for k in attributes))
    for name, r in rows.items():
        print(f"{name:>6} {r['seconds_per_image']:>8.3f} {r['speedup']:>7.2f}x {r['skipped']:>8.0%} "
              f"{r['mean_abs_diff']:>9.4f} " + " ".join(f"{r['accuracy'][k]:>10.2f}" for k in attributes))
    print(json.dumps({"prompts": a.prompts, "steps": a.steps, "rows": rows}))


if __name__ == "__main__":
    main()
