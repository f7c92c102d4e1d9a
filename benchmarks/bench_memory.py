#!/usr/bin/env python3
"""Memory per option at the released models' full sizes: FLUX.1-schnell and SD3 Medium, 4 and 8 bits, SD3 with and
without T5: converted folder sizes per component and the peak memory of generating one image.

    python benchmarks/bench_memory.py [--family flux sd3] [--bits 4 8] [--size 256] [--steps 1]
                                      [--max-sequence-length 256] [--workdir DIR] [--keep] [--tiny]

No real weights can be downloaded here, so the checkpoints are random, written one tensor at a time in the files
users download (`mlx_diffusion.tour.checkpoints`: BFL's `flux1-schnell.safetensors` and `ae.safetensors`, SAI's
`sd3_medium.safetensors` with transformer and VAE, ComfyUI's `clip_l` / `clip_g` / `t5xxl` files; bf16; ~40 GB of
disk at once), at the real shapes: FLUX 19 + 38 blocks at 3072, SD3 24 blocks at 1536, T5-XXL, CLIP-L, CLIP-G, the
16-channel VAE. Each is converted at each bit width, then each option generates one image in a fresh process with
the defaults a user gets (text encoders released before denoising); its peak RSS (VmHWM) and MLX's peak are the
numbers. Memory depends on the weights and the image size, not on the values, so random weights measure it
faithfully; the image is small by default (256x256, one step) because a 12 B model on a 2-core CPU takes minutes
a step, and the weights dominate at that size. Not measured: unquantized folders, which a CPU computes in float32
(FLUX's transformer alone would be 48 GB); their folder sizes are given from the shapes.
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

import mlx_diffusion  # noqa: E402,F401  before mlx.core

GB = 1e9


# keyword arguments of the tour.checkpoints shape functions: the released sizes, and tiny ones for the test
FULL = {"t5": {}, "clip_l": {}, "clip_g": dict(hidden=1280, layers=32, projection=True), "vae": {}, "flux": {},
        "sd3": {}}
TINY = {"t5": dict(d_model=256, layers=1, heads=2, d_kv=32, d_ff=96), "clip_l": dict(hidden=64, layers=1),
        "clip_g": dict(hidden=128, layers=1, projection=True),
        "vae": dict(channels=32, multipliers=(1, 1, 1, 1), res_blocks=1),
        "flux": dict(hidden=256, double=1, single=1, context_dim=256, pooled_dim=64),
        "sd3": dict(depth=2, context_dim=256, pooled_dim=192, pos_max=16)}


def write_sources(family: str, work: Path, sizes: dict, log) -> dict:
    """The downloaded files of one family (T5-XXL and CLIP-L shared between the two)."""
    from mlx_diffusion.io.safetensors import SafetensorsWriter
    from mlx_diffusion.tour import checkpoints as ck

    def save(name, shapes, **kw):
        path = work / name
        if not path.exists():
            started = time.perf_counter()
            ck.save_safetensors(path, shapes, dtype="bfloat16", **kw)
            log(f"wrote {name}: {path.stat().st_size / GB:.2f} GB in {time.perf_counter() - started:.0f} s")
        return path

    files = {"t5": save("t5xxl.safetensors", ck.t5_encoder(**sizes["t5"])),
             "clip_l": save("clip_l.safetensors", ck.clip(**sizes["clip_l"]))}
    if family == "flux":
        files["vae"] = save("ae.safetensors", ck.vae(**sizes["vae"]))
        files["transformer"] = save("flux1-schnell.safetensors", ck.flux_transformer(**sizes["flux"]))
    else:
        files["clip_g"] = save("clip_g.safetensors", ck.clip(**sizes["clip_g"]))
        path = work / "sd3_medium.safetensors"
        if not path.exists():
            started = time.perf_counter()
            w = SafetensorsWriter(path)
            ck.save_safetensors(None, ck.sd3_transformer(**sizes["sd3"]), dtype="bfloat16",
                                prefix="model.diffusion_model.", writer=w)
            ck.save_safetensors(None, ck.vae(**sizes["vae"]), dtype="bfloat16", prefix="first_stage_model.", writer=w)
            w.close()
            log(f"wrote {path.name}: {path.stat().st_size / GB:.2f} GB in {time.perf_counter() - started:.0f} s")
        files["transformer"] = path
    return files


def folder_sizes(folder: Path) -> dict:
    return {c.name: sum(f.stat().st_size for f in c.glob("*.safetensors")) / GB
            for c in sorted(folder.iterdir()) if c.is_dir() and any(c.glob("*.safetensors"))}


def worker(args):
    """One image with a user's defaults; prints one JSON line."""
    from mlx_diffusion import load_pipeline
    from mlx_diffusion.pipelines.base import peak_rss_gb

    pipe = load_pipeline(args.folder, use_t5=not args.no_t5, progress=False)
    pipe.generate("a red fox in the snow, golden hour", seed=0, steps=args.steps, width=args.size, height=args.size,
                  max_sequence_length=args.max_sequence_length, output_type="np")
    st = pipe.last_stats
    print(json.dumps({"peak_rss_gb": peak_rss_gb(), "peak_mlx_gb": st.peak_memory_gb, "seconds": st.seconds}))


def measure(folder: Path, no_t5: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--size", str(args.size), "--steps",
           str(args.steps), "--max-sequence-length", str(args.max_sequence_length)] + (["--no-t5"] if no_t5 else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"generation failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def unquantized_gb(files: dict, family: str) -> dict:
    """Folder sizes at `-q none` (bf16), from the source files: they are bf16 already (CLIP-L's projection, which
    FLUX drops, is not in ours)."""
    from mlx_diffusion.io.safetensors import SafetensorsFile

    def size(path, prefix=""):
        f = SafetensorsFile(path)
        return sum(f.nbytes(k) for k in f.keys() if k.startswith(prefix)) / GB

    out = {"transformer": size(files["transformer"], "model.diffusion_model." if family == "sd3" else ""),
           "text_encoder": size(files["clip_l"]), "t5": size(files["t5"])}
    if family == "sd3":
        out["text_encoder_2"] = size(files["clip_g"])
        out["vae"] = size(files["transformer"], "first_stage_model.")
    else:
        out["vae"] = size(files["vae"])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["flux", "sd3"], choices=["flux", "sd3"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the same path in seconds (the test)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--no-t5", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from mlx_diffusion.convert import convert

    def log(msg):
        print(msg, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_memory-", dir=args.workdir))
    rows, result = [], {"size": args.size, "steps": args.steps, "max_sequence_length": args.max_sequence_length,
                        "options": []}
    try:
        for family in args.family:
            files = write_sources(family, work, TINY if args.tiny else FULL, log)
            bf16 = result.setdefault("unquantized_gb", {})[family] = unquantized_gb(files, family)
            for bits in args.bits:
                folder = work / f"{family}-{bits}bit"
                started = time.perf_counter()
                parts = {k: v for k, v in files.items() if k != "transformer"}
                convert(None, folder, transformer=files["transformer"], **parts, bits=bits, progress=False,
                        log=lambda *a: None)
                sizes = folder_sizes(folder)
                log(f"converted {family} at {bits} bits in {time.perf_counter() - started:.0f} s: "
                    + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()))
                for no_t5 in ([False, True] if family == "sd3" else [False]):
                    m = measure(folder, no_t5, args)
                    option = {"family": family, "bits": bits, "t5": not no_t5, "folder_gb": sizes, **m}
                    result["options"].append(option)
                    log(f"{family} {bits}-bit{' without T5' if no_t5 else ''}: peak RSS {m['peak_rss_gb']:.2f} GB, "
                        f"MLX peak {m['peak_mlx_gb']:.2f} GB, "
                        + ", ".join(f"{k} {v:.0f} s" for k, v in m["seconds"].items()))
                    t5_key = "text_encoder_2" if family == "flux" else "text_encoder_3"
                    folder_total = sum(v for k, v in sizes.items() if not (no_t5 and k == t5_key))
                    rows.append(f"| {'FLUX.1-schnell' if family == 'flux' else 'SD3 Medium'} | {bits} | "
                                f"{'no' if no_t5 else 'yes'} | {sizes['transformer']:.2f} | "
                                f"{sizes.get(t5_key, 0) if not no_t5 else 0:.2f} | {folder_total:.2f} | "
                                f"**{m['peak_rss_gb']:.1f}** | {m['peak_mlx_gb']:.1f} |")
                if not args.keep:
                    shutil.rmtree(folder)
            for no_t5 in ([False, True] if family == "sd3" else [False]):
                total = sum(v for k, v in bf16.items() if not (no_t5 and k == "t5"))
                rows.append(f"| {'FLUX.1-schnell' if family == 'flux' else 'SD3 Medium'} | none (bf16) | "
                            f"{'no' if no_t5 else 'yes'} | {bf16['transformer']:.2f} | "
                            f"{0 if no_t5 else bf16['t5']:.2f} | {total:.2f} | not measured | |")
            if not args.keep:  # the family's own sources; T5 and CLIP-L serve the next family
                for k in ("transformer", "vae", "clip_g"):
                    if k in files:
                        files[k].unlink(missing_ok=True)
        print(f"\n{args.size}x{args.size}, {args.steps} step(s), T5 length {args.max_sequence_length}; GB = 1e9 bytes\n")
        print("| model | bits | T5 | transformer (GB) | T5 (GB) | folder (GB) | peak process memory (GB) | "
              "MLX peak (GB) |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
