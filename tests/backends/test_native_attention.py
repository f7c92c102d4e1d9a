"""The native CPU attention kernel (`backends/attention.c`, built by `backends/native.py`) against PyTorch's attention,
and how it meets MLX: traced calls fall back or go eager, worker threads, batch invariance. Whole images through it:
tests/pipelines/test_flux_pipeline.py and test_sd3_pipeline.py (`*_native_attention_*`)."""

import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from helpers import max_rel_err

import mlx.core as mx
from mlx_diffusion.backends import blas, cpu, native

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the native kernels are built on Linux")


@pytest.fixture
def native_always(monkeypatch):
    """Every float32 CPU attention call through the native kernel, however small."""
    monkeypatch.setattr(cpu, "NATIVE_MIN_SCORES", 0)


def _mx(t):
    return mx.array(t.detach().numpy())


def _reference(q, k, v, scale=None):
    B, H, L, D = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    return out.transpose(1, 2).reshape(B, L, H * D)


def test_the_kernel_is_built_here():
    # where CI runs (Linux, a C compiler, OpenBLAS) the kernel must exist, or every test below would test MLX's path
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert blas.loaded_path is not None, blas.status
    assert native.load("attention") is not None
    assert cpu._native_kernel() is not None


def test_a_call_too_small_stays_in_mlx(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_native_attention", lambda *a: calls.append(a))
    q = mx.ones((1, 2, 8, 4))
    mx.eval(cpu.attention(q, q, q))
    assert calls == []
    monkeypatch.setattr(cpu, "NATIVE_MIN_SCORES", 2 * 8 * 8)
    mx.eval(cpu.attention(q, q, q))
    assert len(calls) == 1


@pytest.mark.parametrize("B, H, L, S, D, sharpness", [
    (1, 3, 37, 37, 16, 1.0),
    (2, 5, 300, 333, 64, 3.0),  # keys != queries, SD3's head width, chunks of rows with a short last one
    (1, 2, 1100, 900, 40, 1.0),  # > 1 task per head at S=900 (1165 rows a task), an odd width
    (2, 2, 50, 70, 128, 30.0),  # logits spread over hundreds: rows dominated by one weight, the clamp at e^-87
])
def test_matches_torch(native_always, B, H, L, S, D, sharpness):
    g = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, H, L, D, generator=g) * sharpness
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    expected = _reference(q, k, v)
    got = cpu.attention(_mx(q), _mx(k), _mx(v))
    assert got.shape == (B, L, H * D) and got.dtype == mx.float32
    assert max_rel_err(got, expected) < 2e-5  # float32 logits of size ~100 carry ~1e-5 relative error


def test_strided_broadcast_and_scaled_inputs(native_always):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 3, 24, generator=g) for _ in range(3))  # (B, L, H, D): heads as a strided view
    expected = _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.3)
    got = cpu.attention(*(_mx(t).transpose(0, 2, 1, 3) for t in (q, k, v)), scale=0.3)
    assert max_rel_err(got, expected) < 2e-5
    # keys and values broadcast over the batch (stride 0), the last axis reversed (not contiguous: copied)
    kb, vb = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)
    expected = _reference(q.transpose(1, 2), kb.transpose(1, 2), vb.flip(-1).transpose(1, 2))
    kx = mx.broadcast_to(_mx(k[:1]), (2, 40, 3, 24)).transpose(0, 2, 1, 3)
    vx = mx.broadcast_to(_mx(v[:1].flip(-1)), (2, 40, 3, 24)).transpose(0, 2, 1, 3)
    got = cpu.attention(_mx(q).transpose(0, 2, 1, 3), kx, vx)
    assert max_rel_err(got, expected) < 2e-5


def test_a_sample_gets_the_same_bits_alone_and_in_a_batch(native_always):
    q, k, v = (mx.random.normal((3, 4, 300, 32), key=mx.random.key(i)) for i in range(3))
    batch = np.asarray(cpu.attention(q, k, v))
    for i in range(3):
        assert np.array_equal(np.asarray(cpu.attention(q[i : i + 1], k[i : i + 1], v[i : i + 1])), batch[i : i + 1])


def test_traced_calls(native_always):
    q, k, v = (mx.random.normal((1, 2, 64, 16), key=mx.random.key(i)) for i in range(3))
    eager = np.asarray(cpu.attention(q, k, v))
    # a trace of someone else's (mx.compile, a gradient) cannot evaluate: MLX's form is traced instead
    traced = mx.compile(lambda a, b, c: cpu.attention(a, b, c))
    assert np.abs(np.asarray(traced(q, k, v)) - eager).max() < 1e-5
    grad = mx.grad(lambda a: cpu.attention(a, k, v).sum())(q)
    assert grad.shape == q.shape and bool(mx.all(mx.isfinite(grad)))
    # under eager_fallback (Pipeline.forward's traces) it says so, and the caller runs the function uncompiled
    with cpu.eager_fallback(), pytest.raises(cpu.EagerOnly):
        mx.compile(lambda a, b, c: cpu.attention(a, b, c))(q, k, v)

    from mlx_diffusion.pipelines.base import _Compiled

    fn = _Compiled(lambda a, b, c: cpu.attention(a, b, c) * 2)
    assert np.array_equal(np.asarray(fn(q, k, v)), eager * 2) and fn.compiled is fn.fn
    assert np.array_equal(np.asarray(fn(q, k, v)), eager * 2)


def test_worker_threads(native_always):
    q, k, v = (mx.random.normal((1, 3, 200, 32), key=mx.random.key(i)) for i in range(3))
    expected = np.asarray(cpu.attention(q, k, v))
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(np.asarray(cpu.attention(q, k, v)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    assert all(np.array_equal(r, expected) for r in results)


def test_no_kernel_without_a_working_compiler_or_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert native.load.__wrapped__("attention") is None
    assert not [p for p in tmp_path.iterdir() if p.name != "cc"]  # no half-written library left behind
    monkeypatch.delenv("CC")
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert native.load.__wrapped__("attention") is None
