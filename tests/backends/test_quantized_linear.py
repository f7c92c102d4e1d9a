"""backends.cpu.quantized_linear: the Linear of quantized layers on the CPU, both of its paths against float math.

A few rows (one vector per image: the modulations) go through MLX's quantized_matmul; more rows dequantize the weight,
which is made to depend on the input so that MLX cannot dequantize later layers' weights ahead of time."""

import numpy as np
import pytest

import helpers  # noqa: F401
import mlx.core as mx

from mlx_diffusion.backends import cpu


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 64), (4, 32), (5, 32)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 33])
def test_equals_the_dequantized_matmul(bits, group_size, rows):
    key = mx.random.key(rows * 10 + bits)
    w = mx.random.normal((96, 128), key=key) * 0.1
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    x = mx.random.normal((1, rows, 128), key=mx.random.split(key)[0])
    ref = np.asarray(x, np.float64) @ np.asarray(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits),
                                                 np.float64).T
    y = cpu.quantized_linear(x, wq, scales, biases, group_size, bits)
    assert y.shape == (1, rows, 96)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_later_weights_are_not_dequantized_ahead():
    """Twelve chained layers of a 1024-wide weight (4 MB each dequantized): measured 4.25 layers' worth above the
    weights at the peak, against 16.2 without the dependency (every layer dequantized before the first multiply)."""
    weights = []
    for i in range(12):
        w = mx.random.normal((1024, 1024), key=mx.random.key(i)) * 1024 ** -0.5
        weights.append(mx.quantize(w, group_size=64, bits=4))
    x = mx.random.normal((64, 1024), key=mx.random.key(99))
    mx.eval(weights, x)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for wq, s, b in weights:
        x = cpu.quantized_linear(x, wq, s, b, 64, 4)
    mx.eval(x)
    extra = (mx.get_peak_memory() - base) / (1024 * 1024 * 4)  # in dequantized layers
    assert extra < 6, extra
