#!/usr/bin/env python3
"""mlx_diffusion vs the diffusers baseline on the same random weights: a thin wrapper over the benchmark command.

    python benchmarks/bench_pipeline.py [--family flux|sd3] [--preset tiny|block|wide] [--steps 4] [--size 512]
                                        [--bits none|4|8] [--repeat 2]
  = python -m mlx_diffusion.benchmark --preset PRESET --family FAMILY --steps 4 ... --compare-diffusers

The presets and the diffusers side are in benchmarks/reference.py.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["flux", "sd3"], default="flux")
    ap.add_argument("--preset", choices=["tiny", "block", "wide"], default="block")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels [preset's]")
    ap.add_argument("--bits", choices=["none", "4", "8"], default="none")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "mlx_diffusion.benchmark", "--preset", a.preset, "--family", a.family, "--steps",
           str(a.steps), "--bits", a.bits, "--repeat", str(a.repeat), "--compare-diffusers",
           "--prompt", "a red fox in the snow, golden hour, 35mm photograph", *(["--size", str(a.size)] if a.size else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.exit(subprocess.call(cmd, env=env))
