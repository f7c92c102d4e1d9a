"""Native CPU kernels of our own: C sources beside this file, built on first use with the machine's C compiler and
loaded with ctypes. Linux only (where MLX runs on the CPU); everything here is optional and callers fall back to
MLX's own ops when `load` returns None.

Why C at all: MLX has no CPU extension point short of a C++ extension built against its headers and Python
bindings, and its own CPU kernels are scalar loops on one core (see `cpu.py`). A kernel here works on evaluated
arrays (through NumPy views of MLX's memory), so it runs outside MLX's lazy graph: the caller evaluates the inputs,
calls in (ctypes releases the GIL), and wraps the output as a new array.

Built with `-O3 -march=native -fopenmp`: for the machine that runs it, using all its cores. The shared library is
kept in `<temp>/mlx_diffusion/native/` under a name that hashes the source, the flags and the compiler's identity,
so an edit or another compiler builds anew; a build is written to a temporary name and renamed into place, so
processes building at once do not see half a file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fPIC", "-shared"]
ENV_VAR = "MLX_DIFFUSION_NATIVE"  # "0" turns every native kernel off (MLX's own ops are used)


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(ENV_VAR, "1") != "0"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "")) or shutil.which("gcc") or shutil.which("cc")


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mlx_diffusion" / "native"


@functools.cache
def _identity(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(name: str) -> Path | None:
    compiler = _compiler()
    if compiler is None:
        return None
    source = (Path(__file__).parent / f"{name}.c").read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _identity(compiler).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The built library of `backends/<name>.c`, building it if needed (~0.3 s); None where that is not possible
    (not Linux, no C compiler, a failed build, MLX_DIFFUSION_NATIVE=0)."""
    if not enabled():
        return None
    path = library_path(name)
    if path is None:
        return None
    if not path.exists():
        part = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([_compiler(), *FLAGS, str(Path(__file__).parent / f"{name}.c"), "-o", str(part)],
                           check=True, capture_output=True, timeout=300)
            os.replace(part, path)
        except (OSError, subprocess.SubprocessError):
            part.unlink(missing_ok=True)
            return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None
