"""The fast BLAS is interposed under mlx-cpu on Linux, and its absence is reported once, clearly."""

import os
import subprocess
import sys
import time

import pytest

import helpers  # noqa: F401
from mlx_diffusion import _blas

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS interposition is Linux-only")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@linux
def test_openblas_is_loaded_and_mapped():
    assert _blas.loaded_path, f"no fast BLAS: {_blas.status}"
    real = os.path.realpath(_blas.loaded_path)
    maps = open("/proc/self/maps").read()
    assert real in maps


@linux
def test_matmul_runs_at_blas_speed():
    import mlx.core as mx

    a = mx.random.normal((1024, 1024))
    b = mx.random.normal((1024, 1024))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    # netlib reference BLAS: ~1.5 s here (1.4 GFLOP/s); OpenBLAS: ~0.02 s. 0.3 s separates them with a wide margin.
    assert best < 0.3, f"1024^3 fp32 matmul took {best:.3f} s: the reference BLAS is in use"


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


@linux
def test_missing_blas_warns_once():
    r = _run("import mlx_diffusion, mlx_diffusion._blas as b; print(b.status)", MLX_DIFFUSION_BLAS="/nonexistent/libx.so")
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
    r = _run("import mlx_diffusion._blas as b; print(b.allocator_tuned)", MLX_DIFFUSION_MALLOC="default")
    assert r.stdout.strip() == "False"
