"""Linux process set-up done at import, before `mlx.core` is loaded: a real BLAS, and a malloc that keeps big blocks.

mlx-cpu's Linux wheel links the netlib *reference* BLAS, whose sgemm is ~40x slower than OpenBLAS. Symbols of a
library opened with RTLD_GLOBAL before `libmlx.so` win the dynamic linker's lookup, so loading OpenBLAS first makes
every MLX fp32 matmul and conv use it. This must run before anything imports `mlx.core`; `mlx_diffusion/__init__.py`
calls it first (this module must not import mlx). On macOS MLX uses Accelerate/Metal and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings

# Debian/Ubuntu `libopenblas0-pthread` first (what the README installs), then other common places.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

ENV_VAR = "MLX_DIFFUSION_BLAS"  # a path to a BLAS exporting unprefixed cblas_sgemm, or "none" to keep mlx's own

loaded_path: str | None = None
library: ctypes.CDLL | None = None  # its handle (backends/cpu.py's attention calls into it)
status: str = "not attempted"


def _candidates():
    override = os.environ.get(ENV_VAR)
    if override:
        yield override
        return
    yield from _CANDIDATES
    found = ctypes.util.find_library("openblas")
    if found:
        yield found
    for site in sys.path:  # a BLAS shipped in a wheel (e.g. ngsolve-openblas) exporting unprefixed symbols
        yield from sorted(glob.glob(os.path.join(site, "*", "libopenblas*.so*")))


def interpose() -> str | None:
    """Load a fast BLAS globally; return its path, or None (with one warning) when none could be loaded."""
    global loaded_path, library, status
    if loaded_path is not None or not sys.platform.startswith("linux"):
        return loaded_path
    if os.environ.get(ENV_VAR, "").lower() == "none":
        status = f"disabled by {ENV_VAR}=none"
        return None
    if "mlx.core" in sys.modules:
        status = "mlx.core was imported before mlx_diffusion"
        warnings.warn(
            "mlx_diffusion: mlx.core was imported before mlx_diffusion, so the fast BLAS could not be interposed; "
            "import mlx_diffusion first (fp32 matmuls will be ~40x slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    errors = []
    for path in _candidates():
        if not path or (os.path.isabs(path) and not os.path.exists(path)):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.cblas_sgemm  # must export the unprefixed CBLAS symbol that libmlx resolves
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        loaded_path, library, status = path, lib, "loaded"
        return path
    status = "no OpenBLAS found"
    warnings.warn(
        "mlx_diffusion: no OpenBLAS found, MLX will use its bundled reference BLAS (~40x slower fp32 matmul). "
        "Install it with `apt-get install libopenblas0-pthread` or point "
        f"{ENV_VAR} at a libopenblas.so." + (f" Tried: {'; '.join(errors)}" if errors else ""),
        RuntimeWarning,
        stacklevel=3,
    )
    return None


MALLOC_ENV_VAR = "MLX_DIFFUSION_MALLOC"  # "default" leaves glibc's malloc settings alone
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
allocator_tuned = False


def tune_allocator() -> bool:
    """Serve large MLX buffers from the heap instead of fresh mmaps, and never give the heap back.

    glibc mmaps every allocation above 32 MB and unmaps it on free, so each new large MLX array page-faults all of
    its memory in again: ~2 ns per float32 element, about 10x the cost of an elementwise pass over it (measured on
    the VAE's GroupNorm+SiLU at 128-512 channels: 106/206/503 ms -> 23/43/99 ms). Keeping freed blocks in the heap
    (no mmap, no trimming) lets them be reused; the price is that memory freed by one stage stays with the process
    for the next one instead of returning to the OS. Trimming is off with -1 (`man mallopt`): the largest threshold
    short of that, 2^31 - 1, still gave back the heap's top after a 1024x1024 decode (which frees more than 2 GB),
    and the next image's first denoising step faulted it in again: 160,000 faults in its GELUs, +2.8 s of a 9.8 s
    SD3 `block` step on this VM.
    """
    global allocator_tuned
    if allocator_tuned or not sys.platform.startswith("linux") or os.environ.get(MALLOC_ENV_VAR) == "default":
        return allocator_tuned
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        ok = False
    allocator_tuned = ok
    return ok
