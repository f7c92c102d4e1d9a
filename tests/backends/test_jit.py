"""MLX's fused CPU kernels are built against our precompiled header (`backends.jit`): checked through MLX's own call
of g++ (a g++ on PATH that logs what it does), and the built-in model's first image on an empty kernel folder builds
few kernels."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers  # noqa: F401
from mlx_diffusion.backends import jit

pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("g++") is None, reason="MLX's Linux JIT")
ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path, **extra):
    env = {**os.environ, "TMPDIR": str(tmp_path / "temp"), "PYTHONPATH": str(ROOT), **extra}
    env.pop("MLX_DISABLE_COMPILE", None)
    (tmp_path / "temp").mkdir(exist_ok=True)
    return env


def test_mlx_builds_its_kernels_with_the_precompiled_header(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "g++.log"
    wrapper = bin_dir / "g++"  # the real g++, also printing (-H) which headers it reads, into the log
    wrapper.write_text(f'#!/bin/sh\necho "ARGS $*" >> "{log}"\nexec {shutil.which("g++")} "$@" -H 2>> "{log}"\n')
    wrapper.chmod(0o755)
    code = ("import mlx_diffusion, mlx.core as mx\n"
            "from mlx_diffusion.backends import jit\n"
            "assert jit.prepare(wait=True).returncode == 0\n"
            "f = mx.compile(lambda a, b: mx.tanh(a) * b + 3.25)\n"
            "mx.eval(f(mx.ones((9,)), mx.ones((9,))))\n"
            "print(jit.kernel_dir())\n")
    env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    kernel_dir = Path(r.stdout.strip().splitlines()[-1])
    assert kernel_dir.is_relative_to(tmp_path / "temp") and list(kernel_dir.glob("lib*.so"))
    text = log.read_text()
    kernel_builds = [line for line in text.splitlines() if line.startswith("ARGS") and "-shared" in line]
    assert kernel_builds, text[-2000:]
    # the kernel's build read the precompiled header ("!" is -H's mark for a usable .gch), not the header's text
    assert f"! {kernel_dir / 'mlx/backend/cpu/compiled_preamble.h.gch'}" in text, text[-3000:]
    after = text.split(kernel_builds[-1])[-1]
    assert not re.search(r"^\.+ \S*unary_ops\.h$", after, re.M), after[-3000:]  # -H: ". header" read as text


def test_without_mlx_headers_nothing_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(jit, "_started", [])
    monkeypatch.setattr(jit, "_include_dir", lambda: tmp_path / "nowhere")
    assert jit.prepare() is None and not jit.precompiled_header().exists() and not jit._started


@pytest.mark.slow
def test_the_builtin_models_first_image_builds_few_kernels(tmp_path):
    """A fresh machine's first image: each fused kernel is a g++ run, so their number is its cost (84 before the
    small maps of the built-in decoder went to MLX's own ops)."""
    env = _env(tmp_path)
    code = ("import mlx_diffusion\nfrom mlx_diffusion import load_pipeline\nfrom mlx_diffusion.backends import jit\n"
            "load_pipeline(progress=False).generate('two green squares at the top', seed=1)\nprint(jit.kernel_dir())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    kernels = list(Path(r.stdout.strip().splitlines()[-1]).glob("lib*.so"))
    print(f"{len(kernels)} kernels built")
    assert 0 < len(kernels) <= 30
