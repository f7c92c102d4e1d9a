"""The native elementwise kernel (`backends/elementwise.c`): GELU(tanh) on large arrays equals MLX's fused kernel bit
for bit (same formula, no fused multiply-adds) and so torch's within the activation's bound; a traced call falls
back to MLX's kernel."""

import shutil
import sys

import numpy as np
import pytest
import torch

import mlx.core as mx
from mlx_diffusion.backends import cpu, native

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the native kernels are built on Linux")


def test_the_kernel_is_built_here():
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert native.load("elementwise") is not None and cpu._native_gelu_tanh_kernel() is not None


@pytest.mark.parametrize("shape", [(1, 3, 1 << 19), (2, 1000, 1037)])  # an odd length: the vector loop's tail
def test_gelu_tanh_equals_mlx_fused_kernel_and_torch(shape):
    x = mx.array(np.random.default_rng(0).normal(0, 4, shape).astype(np.float32))
    x = mx.concatenate([x.reshape(-1)[:-7], mx.array([-30.0, -7.9, -1e-8, 0.0, 3e-8, 7.9, 30.0])]).reshape(shape)
    assert x.size >= cpu.NATIVE_MIN_ELEMENTS
    native_out = cpu._native_gelu_tanh(x)
    assert native_out is not None
    assert np.array_equal(np.array(native_out), np.array(cpu._gelu_tanh_fused(x)))
    assert np.array_equal(np.array(cpu.gelu_tanh(x)), np.array(native_out))
    ref = torch.nn.functional.gelu(torch.from_numpy(np.array(x)).double(), approximate="tanh").numpy()
    assert (np.abs(np.array(native_out) - ref) / np.maximum(1, np.abs(ref))).max() < 2.5e-6


def test_a_strided_input_is_read_in_order():
    x = mx.random.normal((1024, 2048), key=mx.random.key(1)).T  # a transposed view
    assert np.array_equal(np.array(cpu._native_gelu_tanh(x)), np.array(cpu._gelu_tanh_fused(mx.contiguous(x))))


def test_traced_calls_use_mlx_kernel():
    x = mx.random.normal((1 << 20,), key=mx.random.key(2))
    assert cpu._native_gelu_tanh(x * 1) is not None
    traced = mx.compile(lambda a: cpu.gelu_tanh(a) * 2)  # cannot evaluate its input: MLX's kernel, same numbers
    assert np.array_equal(np.array(traced(x)), np.array(cpu._native_gelu_tanh(x)) * 2)
