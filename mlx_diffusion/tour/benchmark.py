"""Profiling a model folder: per-stage times (text encoding, each denoising step, VAE decoding), peak MLX and process
memory, images per minute; the first (cold) run apart from the warm ones.

`profile` runs in a process of its own (`python -m mlx_diffusion.tour.benchmark REQUEST.json`, started by the
benchmark command), so that its peak memory is the pipeline's alone; `summary` and `table` turn its runs, and those
of the diffusers baseline (`benchmarks/reference.py`, same request), into medians, ratios (diffusers / ours: above
1, we are faster) and a markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

from ..pipelines import load_pipeline
from ..pipelines.base import peak_rss_gb

STAGES = ("text_encoding", "denoising", "decoding")


def profile(request: dict) -> dict:
    """Every prompt of the request from its initial latents: one cold run, then `repeat` warm runs. Returns the runs'
    stage and step times, the peak memory, and saves the last run's images as .npy beside the request's `out`."""
    pipe = load_pipeline(request["folder"], progress=False, keep_text_encoders=True)
    runs, cold, mlx_peak = [], [], 0.0
    for r in range(request["repeat"] + 1):
        for i, (prompt, lat) in enumerate(zip(request["prompts"], request["latents"])):
            image = pipe.generate(prompt, steps=request["steps"], guidance=request["guidance"],
                                  width=request["size"], height=request["size"],
                                  max_sequence_length=request["max_sequence_length"], latents=np.load(lat),
                                  output_type="np")
            st = pipe.last_stats
            (runs if r else cold).append({**st.seconds, "step_seconds": list(st.step_seconds)})
            mlx_peak = max(mlx_peak, st.peak_memory_gb)
            if r == request["repeat"]:
                np.save(Path(request["out"]).with_name(f"mlx_diffusion-{i}.npy"), image)
    return {"runs": runs, "cold": cold, "peak_rss_gb": peak_rss_gb(), "peak_memory_gb": mlx_peak}


def summary(result: dict) -> dict:
    """Medians over the warm runs: per stage, per step, total, images per minute; the cold run's total."""
    runs = result["runs"]
    out = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    out["step"] = statistics.median(s for r in runs for s in r["step_seconds"])
    out["total"] = statistics.median(sum(r[k] for k in STAGES) for r in runs)
    out["images_per_minute"] = 60.0 / out["total"]
    out["cold_total"] = sum(sum(r[k] for k in STAGES) for r in result["cold"]) / len(result["cold"])
    return out


def table(ours: dict, reference: dict | None = None, ours_result=None, reference_result=None,
          empty_kernel_cache: bool = False) -> str:
    """The markdown table of one or two summaries; `empty_kernel_cache`: our cold run started without compiled
    kernels."""
    cold = "first run, cold, empty kernel cache (s)" if empty_kernel_cache else "first run, cold (s)"
    rows = [("text encoding (s)", "text_encoding"), ("denoising (s)", "denoising"), ("per step (s)", "step"),
            ("decoding (s)", "decoding"), ("total (s)", "total"), ("images per minute", "images_per_minute"),
            (cold, "cold_total")]
    if reference is None:
        lines = ["| | mlx_diffusion |", "|---|---|"] + [f"| {name} | {ours[k]:.3f} |" for name, k in rows]
        lines.append(f"| peak RSS (GB) | {ours_result['peak_rss_gb']:.2f} |")
        lines.append(f"| peak MLX memory (GB) | {ours_result['peak_memory_gb']:.2f} |")
        return "\n".join(lines)
    lines = ["| | diffusers | mlx_diffusion | diffusers / mlx_diffusion |", "|---|---|---|---|"]
    for name, k in rows:
        ratio = ours[k] / reference[k] if k == "images_per_minute" else reference[k] / ours[k]
        lines.append(f"| {name} | {reference[k]:.3f} | {ours[k]:.3f} | {ratio:.2f} |")
    d, m = reference_result["peak_rss_gb"], ours_result["peak_rss_gb"]
    lines.append(f"| peak RSS (GB) | {d:.2f} | {m:.2f} | {d / m:.2f} |")
    lines.append(f"| peak MLX memory (GB) | | {ours_result['peak_memory_gb']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    Path(request["out"]).write_text(json.dumps(profile(request)))
