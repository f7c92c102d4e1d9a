"""The fast BLAS is interposed under mlx-cpu on Linux, and its absence is reported once, clearly."""

import os
import subprocess
import sys

import pytest

import helpers  # noqa: F401
from mlx_diffusion.backends import blas as _blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS interposition is Linux-only")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@linux
def test_openblas_is_loaded_and_mapped():
    assert _blas.loaded_path, f"no fast BLAS: {_blas.status}"
    real = os.path.realpath(_blas.loaded_path)
    maps = open("/proc/self/maps").read()
    assert real in maps


@linux
def test_mlx_resolves_sgemm_to_the_interposed_blas():
    """The process-wide `cblas_sgemm` (what libmlx binds to) lies in the OpenBLAS we loaded, not in MLX's bundled
    reference BLAS."""
    import ctypes

    address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    real = os.path.realpath(_blas.loaded_path)
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            assert len(parts) == 6 and os.path.realpath(parts[5]) == real, line
            return
    pytest.fail("cblas_sgemm is in no mapped file")


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


@linux
def test_missing_blas_warns_once():
    r = _run("import mlx_diffusion, mlx_diffusion.backends.blas as b; print(b.status)", MLX_DIFFUSION_BLAS="/nonexistent/libx.so")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no OpenBLAS found") == 1
    assert "no OpenBLAS found" in r.stdout


@linux
def test_mlx_imported_first_warns():
    r = _run("import mlx.core, mlx_diffusion")
    assert r.returncode == 0, r.stderr
    assert "imported before mlx_diffusion" in r.stderr


@linux
def test_allocator_keeps_large_blocks():
    assert _blas.allocator_tuned  # glibc mallopt accepted (see tune_allocator's docstring for why)
    r = _run("import mlx_diffusion.backends.blas as b; print(b.allocator_tuned)", MLX_DIFFUSION_MALLOC="default")
    assert r.stdout.strip() == "False"
