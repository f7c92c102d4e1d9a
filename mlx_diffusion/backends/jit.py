"""MLX's CPU kernel compiler made quicker to start: a precompiled header for the preamble every fused kernel includes.

On Linux, `mx.compile` writes each fused kernel as C++ into `<temp>/mlx/<version>/cpu/` and builds it there with
`g++ -std=c++17 -O3 -Wall -fPIC -shared -I <mlx>/include`, one kernel at a time. Each source starts with
`#include "mlx/backend/cpu/compiled_preamble.h"` (MLX's SIMD headers), and parsing those is most of the ~1 s a kernel
takes. A quoted include is looked up first in the including file's folder, so a copy of the header there, with its
precompiled form (`.gch`, built once with the same flags), makes g++ load the parsed header instead: measured on this
2-core x86, 1.15 s -> 0.25 s per kernel, for a build of ~2.5 s done in the background while the first generation
starts. g++ ignores a `.gch` it cannot use (another compiler, other flags) and reads the header, the same text, so
this changes how long a fresh machine's first images take and nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

_HEADER = Path("mlx") / "backend" / "cpu" / "compiled_preamble.h"
_FLAGS = ["-std=c++17", "-O3", "-Wall", "-fPIC"]  # MLX's own, less -shared (a link option)
_started: list = []


def kernel_dir() -> Path:
    """Where MLX keeps its compiled CPU kernels: std::filesystem::temp_directory_path() / mlx / version / cpu."""
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        if os.environ.get(name):
            return Path(os.environ[name]) / "mlx" / mx.__version__ / "cpu"
    return Path("/tmp") / "mlx" / mx.__version__ / "cpu"


def _include_dir() -> Path:
    return Path(mx.__file__).resolve().parent / "include"


def precompiled_header() -> Path:
    return kernel_dir() / f"{_HEADER}.gch"


def prepare(wait: bool = False):
    """Start building the precompiled header in MLX's kernel folder unless it is there (a no-op on other systems, or
    without g++). Returns the build's process, or None. Safe with several processes at once: each builds into a file
    of its own and renames it into place."""
    if _started or sys.platform != "linux" or shutil.which("g++") is None or os.environ.get("MLX_DISABLE_COMPILE"):
        return None
    source = _include_dir() / _HEADER
    target = kernel_dir() / _HEADER
    try:
        text = source.read_bytes()
        if precompiled_header().exists() and target.exists() and target.read_bytes() == text:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_bytes(text)
        os.replace(tmp, target)
    except OSError:  # no MLX headers, an unwritable temp folder: MLX compiles as it always does
        return None
    out = precompiled_header()
    part = out.with_name(f".{out.name}.{os.getpid()}")
    command = (f"g++ {' '.join(_FLAGS)} -x c++-header -I '{_include_dir()}' '{target}' -o '{part}' >/dev/null 2>&1"
               f" && mv -f '{part}' '{out}' || rm -f '{part}'")
    process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, start_new_session=True)
    _started.append(process)
    if wait:
        process.wait()
    return process
