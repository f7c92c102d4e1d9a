#!/usr/bin/env python3
"""Checkpoint conversion at FLUX.1-schnell's real shapes: time, throughput and the converter's peak memory.

    python benchmarks/bench_convert.py [--layers 19] [--single-layers 38] [--heads 24] [--bits 4]
                                       [--workdir DIR] [--keep]

Writes a BFL-named bf16 transformer of random weights (19 double + 38 single blocks, width 3072: ~24 GB at the
defaults; one tensor at a time, with `mlx_diffusion.tour.checkpoints`), next to small single files for the other
components (one-layer CLIP-L and T5 at their real widths, a small VAE), then converts them with `convert(None, out,
transformer=FILE, vae=..., clip_l=..., t5=..., bits=...)` in a fresh process that does nothing else, so its peak RSS (VmHWM) is the converter's own. Scale it down with
--layers/--single-layers (e.g. 1 + 2) for a quick run. The file was just written, so it is read from the page cache
where memory allows: the time is the converter's compute and writing, not the disk's read speed. VmHWM counts the
memory-mapped source pages the converter touched as well as its own allocations.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def write_checkpoint(path: Path, shapes: dict) -> int:
    """Random bf16 tensors written one at a time; returns the file's size."""
    import mlx_diffusion  # noqa: F401  before mlx.core
    from mlx_diffusion.tour import checkpoints

    checkpoints.save_safetensors(path, shapes, dtype="bfloat16")
    return path.stat().st_size


def other_parts(folder: Path) -> dict:
    """The VAE, CLIP-L and T5 as small single files whose widths fit the transformer (CLIP-L 768, T5 4096, one layer
    each), so that the conversion's time and memory are the transformer's."""
    from mlx_diffusion.tour import checkpoints

    return {"vae": checkpoints.save_safetensors(folder / "ae.safetensors", checkpoints.vae(
                channels=32, multipliers=(1, 1, 1, 1), res_blocks=1), dtype="bfloat16"),
            "clip_l": checkpoints.save_safetensors(folder / "clip_l.safetensors", checkpoints.clip(layers=1),
                                                   dtype="bfloat16"),
            "t5": checkpoints.save_safetensors(folder / "t5xxl_fp16.safetensors", checkpoints.t5_encoder(layers=1),
                                               dtype="bfloat16")}


def _status_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def worker(args):
    """Only converts, then prints one JSON line: seconds, peak RSS, and the peak of its anonymous part."""
    import threading

    import mlx_diffusion  # noqa: F401
    from mlx_diffusion.convert import convert

    # the kernel keeps no high-water mark of RssAnon (the converter's own memory, without mapped file pages): sample it
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.01):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bits = None if args.bits == "none" else int(args.bits)
    started = time.perf_counter()
    parts = json.loads(args.src)
    convert(None, args.out, transformer=args.file, **parts, bits=bits, progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_rss_kb": _status_kb("VmHWM"), "peak_anon_kb": peak_anon[0]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=19, help="double blocks (FLUX.1: 19)")
    p.add_argument("--single-layers", type=int, default=38, help="single blocks (FLUX.1: 38)")
    p.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1: 24, width 3072)")
    p.add_argument("--bits", default="4", help="4, 8, ... or none")
    p.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the converted folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--src", "--file", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from mlx_diffusion.tour import checkpoints

    shapes = checkpoints.flux_transformer(hidden=args.heads * 128, double=args.layers, single=args.single_layers)
    n_params = sum(math.prod(s) for s in shapes.values())
    largest = max(shapes, key=lambda k: math.prod(shapes[k]))
    largest_mb = math.prod(shapes[largest]) * 2 / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir))
    try:
        print(f"FLUX {args.layers} double + {args.single_layers} single blocks, width {args.heads * 128}: "
              f"{n_params / 1e9:.2f} B parameters, in {work}", flush=True)
        src = json.dumps({k: str(v) for k, v in other_parts(work).items()})
        file = work / "flux-bfl.safetensors"
        started = time.perf_counter()
        size = write_checkpoint(file, shapes)
        print(f"wrote {file.name}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s", flush=True)
        r = subprocess.run([sys.executable, __file__, "--worker", "--src", src, "--file", str(file),
                            "--out", str(work / "mlx"), "--bits", args.bits], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"conversion failed:\n{r.stderr[-4000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out_size = sum(f.stat().st_size for f in (work / "mlx").rglob("*") if f.is_file())
        print(f"converted at {args.bits} bits in {res['seconds']:.1f} s: {size / 1e6 / res['seconds']:.0f} MB/s "
              f"(bf16 in), {out_size / 1e9:.2f} GB out")
        print(f"converter peak RSS {res['peak_rss_kb'] / (1 << 20):.2f} GiB (VmHWM, with mapped file pages), "
              f"anonymous ~{res['peak_anon_kb'] / (1 << 20):.2f} GiB (sampled every 10 ms)")
        print(f"largest tensor {largest} "
              f"{shapes[largest]}: {largest_mb:.0f} MB bf16, {2 * largest_mb:.0f} MB float32")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
