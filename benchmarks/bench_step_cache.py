#!/usr/bin/env python3
"""What the first-block cache (`--cache THRESHOLD`) buys and costs on the built-in model: time per image, the share
of transformer calls skipped, each attribute's prompt-following accuracy (`mlx_diffusion.tiny.evaluate`) and the
pixel difference to the uncached images, per threshold, on the same prompts and seeds.

    python benchmarks/bench_step_cache.py [--prompts 48] [--steps 20] [--thresholds 0.05,0.1,0.2]

Each setting runs once untimed on a few prompts (compiling), then over the held-out prompt set; the time is the
generations' alone (not the scoring's). Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--thresholds", default="0.05,0.1,0.2")
    a = p.parse_args()
    pipe = load_pipeline(progress=False)
    base_images, base_seconds, base_accuracy, _ = run(pipe, a.prompts, a.steps, None)
    rows = {"off": {"seconds_per_image": base_seconds, "speedup": 1.0, "skipped": 0.0, "accuracy": base_accuracy,
                    "mean_abs_diff": 0.0, "max_abs_diff": 0.0}}
    for threshold in [float(t) for t in a.thresholds.split(",")]:
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
