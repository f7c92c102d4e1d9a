#!/usr/bin/env python3
"""`python tools/convert.py ...` = `mlx-diffusion convert ...` (mlx_diffusion/cli/convert.py), runnable from a
checkout without installing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_diffusion  # noqa: E402,F401  (before mlx.core: fast BLAS)
from mlx_diffusion.cli import run  # noqa: E402
from mlx_diffusion.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    run(main)
