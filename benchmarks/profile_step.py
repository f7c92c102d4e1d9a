#!/usr/bin/env python3
"""Where one denoising step's time goes, ours against diffusers: GEMMs (Linear layers), attention, GELU, norms and
everything else, on a random-weight preset at real widths, with this machine's fp32 GEMM peak for scale.

    python benchmarks/profile_step.py [--family flux|sd3] [--preset block] [--size 1024] [--workdir DIR]

Each side runs in a process of its own on the same weights (the preset as diffusers builds it, converted to float32
for ours), 2 denoising steps; the second step is the one profiled. diffusers: `torch.profiler` self times by
operator. Ours: MLX evaluates a traced graph, which no per-op profiler sees into, so the step is timed whole and its
parts are re-run alone at the shapes the step used (recorded while tracing): the Linear products, the attention
calls, GELU and the norms; "everything else" is the step less those (RoPE, modulation, residuals, copies). Prints a
markdown table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "a red fox in the snow, golden hour, 35mm photograph"
CATEGORIES = ("gemm", "attention", "gelu", "norms", "other")


def _median_ms(fn, repeat=3):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def ours(folder: str, size: int, family: str) -> dict:
    import mlx_diffusion  # noqa: F401  before mlx.core
    import mlx.core as mx

    from mlx_diffusion import load_pipeline
    from mlx_diffusion.backends import cpu

    kinds = ("gemm", "attention", "gelu", "layer_norm", "rms_norm")
    rounds = []  # the calls made by each run of the transformer's Python code: once when compiled (the trace),
    wrapped = {}  # every step when it runs eagerly (native attention); the last round is one step's

    def record(kind, owner, name, key):
        original = getattr(owner, name)
        wrapped[kind] = (owner, name, original)

        def call(*a, **k):
            if rounds:  # not the text encoders, which run before the transformer's first call
                rounds[-1][kind][key(*a, **k)] += 1
            return original(*a, **k)

        setattr(owner, name, call)

    record("gemm", cpu, "linear", lambda x, w, b=None: (x.shape, w.shape, b is not None))
    record("attention", cpu, "attention", lambda q, k, v, scale=None, **_: (q.shape, k.shape, scale))
    record("gelu", cpu, "gelu_tanh", lambda x: x.shape)
    record("layer_norm", mx.fast, "layer_norm", lambda x, w, b, eps: (x.shape, w is not None, b is not None))
    record("rms_norm", mx.fast, "rms_norm", lambda x, w, eps: (x.shape, w is not None))

    pipe = load_pipeline(folder, progress=False)
    pipe.decode = lambda latents: mx.zeros((latents.shape[0], 8, 8, 3))  # the VAE is not profiled here
    transformer = type(pipe.model("transformer"))
    forward = transformer.__call__

    def counted(self, *a, **k):
        rounds.append({kind: Counter() for kind in kinds})
        return forward(self, *a, **k)

    transformer.__call__ = counted
    pipe.generate(PROMPT, steps=2, width=size, height=size, seed=0)
    step_ms = pipe.last_stats.step_seconds[-1] * 1000
    transformer.__call__ = forward
    for owner, name, original in wrapped.values():
        setattr(owner, name, original)
    del pipe
    calls = rounds[-1]

    def rand(shape):
        return mx.random.normal(shape) * 0.1

    parts, flops = {}, 0
    ms = 0.0
    for (xs, ws, bias), n in calls["gemm"].items():
        x, w, b = rand(xs), rand(ws), rand(ws[:1]) if bias else None
        mx.eval(x, w, b)
        ms += n * _median_ms(lambda: mx.eval(cpu.linear(x, w, b)))
        flops += n * 2 * (x.size // xs[-1]) * ws[0] * ws[1]
    parts["gemm"] = ms
    ms = 0.0
    for (qs, ks, scale), n in calls["attention"].items():
        q, k, v = rand(qs), rand(ks), rand(ks)
        mx.eval(q, k, v)
        ms += n * _median_ms(lambda: mx.eval(cpu.attention(q, k, v, scale=scale)), repeat=1)
    parts["attention"] = ms
    ms = 0.0
    for xs, n in calls["gelu"].items():
        x = rand(xs)
        mx.eval(x)
        ms += n * _median_ms(lambda: mx.eval(cpu.gelu_tanh(x)))
    parts["gelu"] = ms
    ms = 0.0
    for (xs, has_w, has_b), n in calls["layer_norm"].items():
        x, w, b = rand(xs), rand(xs[-1:]) if has_w else None, rand(xs[-1:]) if has_b else None
        mx.eval(x, w, b)
        ms += n * _median_ms(lambda: mx.eval(mx.fast.layer_norm(x, w, b, 1e-6)))
    for (xs, has_w), n in calls["rms_norm"].items():
        x, w = rand(xs), rand(xs[-1:]) if has_w else None
        mx.eval(x, w)
        ms += n * _median_ms(lambda: mx.eval(mx.fast.rms_norm(x, w, 1e-6)))
    parts["norms"] = ms
    parts["other"] = step_ms - sum(parts.values())
    a = rand((4096, 3072))
    w = rand((3072, 3072))
    mx.eval(a, w)
    peak = 2 * 4096 * 3072 * 3072 / _median_ms(lambda: mx.eval(a @ w.T)) / 1e6  # GFLOP/s
    return {"step_ms": step_ms, "parts_ms": parts, "gemm_gflop": flops / 1e9, "gemm_peak_gflops": peak}


_TORCH_CATEGORIES = {
    "gemm": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "gelu": ("aten::gelu",),
    "norms": ("layer_norm", "rms_norm", "aten::native_layer_norm", "aten::rsqrt"),
}


def diffusers_side(folder: str, size: int, family: str) -> dict:
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    torch.set_num_threads(os.cpu_count())
    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    profiles = []
    forward = pipe.transformer.forward

    def profiled(*a, **k):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            out = forward(*a, **k)
            elapsed = time.perf_counter() - t0
        profiles.append((prof, elapsed))
        return out

    pipe.transformer.forward = profiled
    kw = {} if family == "flux" else {"negative_prompt": ""}
    with torch.no_grad():
        pipe(PROMPT, height=size, width=size, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **kw)
    prof, elapsed = profiles[-1]
    parts = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        name = event.key
        category = next((c for c, keys in _TORCH_CATEGORIES.items() if any(k in name for k in keys)), "other")
        parts[category] += event.self_cpu_time_total / 1000
    step_ms = elapsed * 1000
    parts["other"] += step_ms - sum(parts.values())  # time outside operators (Python, the profiler)
    return {"step_ms": step_ms, "parts_ms": parts}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["flux", "sd3"], default="flux")
    p.add_argument("--preset", default="block")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:  # a child process: one side
        fn = ours if a.side == "ours" else diffusers_side
        print(json.dumps(fn(a.folder, a.size, a.family)))
        return
    from mlx_diffusion.convert import convert

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="profile-step-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", a.family, a.preset,
                        str(tmp / "diffusers")], check=True, env=env)
        convert(tmp / "diffusers", tmp / "mlx", bits=None, dtype="float32", progress=False, log=lambda *x: None)
        results = {}
        for side, folder in (("ours", tmp / "mlx"), ("diffusers", tmp / "diffusers")):
            r = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder), "--size",
                                str(a.size), "--family", a.family], capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{side} failed: {r.stderr.strip().splitlines()[-1:]}")
            results[side] = json.loads(r.stdout.strip().splitlines()[-1])
    o, d = results["ours"], results["diffusers"]
    ideal = o["gemm_gflop"] / o["gemm_peak_gflops"] * 1000
    print(f"{a.family} {a.preset}, {a.size}x{a.size}, one denoising step (the second of 2); fp32 GEMM peak here "
          f"{o['gemm_peak_gflops']:.0f} GFLOP/s; the step's Linear layers: {o['gemm_gflop']:.0f} GFLOP = "
          f"{ideal:.0f} ms at that peak")
    print("")
    print("| part | diffusers (ms) | ours (ms) | diffusers / ours |")
    print("|---|---|---|---|")
    for c in CATEGORIES:
        dm, om = d["parts_ms"][c], o["parts_ms"][c]
        print(f"| {c} | {dm:.0f} | {om:.0f} | {dm / om:.2f} |" if om > 0 else f"| {c} | {dm:.0f} | {om:.0f} | |")
    print(f"| step | {d['step_ms']:.0f} | {o['step_ms']:.0f} | {d['step_ms'] / o['step_ms']:.2f} |")
    print("")
    print(json.dumps({"family": a.family, "preset": a.preset, "size": a.size, "ours": o, "diffusers": d,
                      "gemm_ms_at_peak": ideal}))


if __name__ == "__main__":
    main()
