#!/usr/bin/env python3
"""Tensor parallel memory and time: the FLUX `block` preset (real widths, random weights) made in one process, then
split across 2 local ranks with `generate --shard`'s machinery (`load_pipeline(shard=True)` under mlx.launch).

    python benchmarks/bench_shard.py [--bits none|4] [--size 256] [--steps 2] [--preset block]

Per process: the transformer's weights held, peak RSS, seconds per denoising step, and the image's difference to the
one-process image. On one 2-core machine the two ranks share the cores, so the time says nothing of two Macs.
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = """
import json, sys
import numpy as np
import mlx_diffusion
from mlx.utils import tree_flatten
from mlx_diffusion import load_pipeline
from mlx_diffusion.pipelines import distributed
from mlx_diffusion.pipelines.base import peak_rss_gb
folder, size, steps, shard, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
pipe = load_pipeline(folder, progress=False, shard=shard, keep_text_encoders=False)
image = pipe.generate("a red fox in the snow", seed=1, width=size, height=size, steps=steps, output_type="np")
held = sum(v.nbytes for _, v in tree_flatten(pipe.model("transformer").parameters()))
record = {"rank": distributed.rank(), "transformer_gb": held / 2**30, "peak_rss_gb": peak_rss_gb(),
          "step_seconds": min(pipe.last_stats.step_seconds)}
if distributed.rank() == 0:
    np.save(out, image)
print("RECORD " + json.dumps(record), flush=True)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="block")
    p.add_argument("--bits", choices=["none", "4", "8"], default="none")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    import numpy as np

    from mlx_diffusion.convert import convert

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launcher = Path(sys.executable).parent / "mlx.launch"
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", "flux", a.preset,
                        str(tmp / "diffusers")], check=True, env=env, capture_output=True)
        folder = convert(tmp / "diffusers", tmp / "mlx", bits=None if a.bits == "none" else int(a.bits),
                         dtype="float32", progress=False, log=lambda *x: None)
        (tmp / "worker.py").write_text(WORKER)
        common = [str(folder), str(a.size), str(a.steps)]
        runs = {}
        for name, cmd in (("one process", [sys.executable, str(tmp / "worker.py"), *common, "0", str(tmp / "one.npy")]),
                          ("2 ranks, --shard", [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
                                                "--", sys.executable, str(tmp / "worker.py"), *common, "1",
                                                str(tmp / "two.npy")])):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
            records = [json.loads(line.split("RECORD ", 1)[1]) for line in r.stdout.splitlines() if "RECORD " in line]
            if not records:
                sys.exit(f"{name} failed: {r.stderr.strip().splitlines()[-3:]}")
            runs[name] = sorted(records, key=lambda x: x["rank"])
        diff = float(np.abs(np.load(tmp / "two.npy") - np.load(tmp / "one.npy")).max())
    print(f"FLUX {a.preset} preset, bits {a.bits}, {a.size}x{a.size}, {a.steps} steps; 2 ranks on this machine")
    print("")
    print("| | rank | transformer weights held (GB) | peak RSS (GB) | s per step |")
    print("|---|---|---|---|---|")
    for name, records in runs.items():
        for x in records:
            print(f"| {name} | {x['rank']} | {x['transformer_gb']:.2f} | {x['peak_rss_gb']:.2f} | "
                  f"{x['step_seconds']:.2f} |")
    print(f"\nimage max abs difference, sharded vs one process: {diff:.2e}")
    print(json.dumps({"preset": a.preset, "bits": a.bits, "size": a.size, "runs": runs, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
