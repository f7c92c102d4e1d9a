"""QuantizedLinear and the replacement of Linear layers by it before loading."""

import numpy as np
import pytest

import helpers  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.models.layers import QuantizedLinear, quantize_layers


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_quantized_linear_equals_dequantized_matmul(bits):
    w = mx.random.normal((48, 128), key=mx.random.key(bits))
    b = mx.random.normal((48,), key=mx.random.key(9))
    x = mx.random.normal((3, 5, 128), key=mx.random.key(1))
    layer = QuantizedLinear(128, 48, True, 64, bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=64, bits=bits)
    layer.bias = b
    ref = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=bits).T + b
    assert np.abs(np.array(layer(x) - ref)).max() < 1e-4
    err = float(np.abs(np.array(layer(x) - (x @ w.T + b))).max() / np.abs(np.array(x @ w.T + b)).max())
    assert err < {2: 0.6, 3: 0.3, 4: 0.15, 5: 0.08, 6: 0.04, 8: 0.01}[bits]  # quantization error shrinks with bits


def test_quantize_layers_replaces_only_named_linears():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = [nn.Linear(64, 32), nn.Linear(64, 32, bias=False)]
            self.keep = nn.Linear(64, 8)

    m = M()
    quantize_layers(m, {"blocks.0": (4, 64), "blocks.1": (8, 32)})
    assert isinstance(m.blocks[0], QuantizedLinear) and m.blocks[0].bits == 4 and "bias" in m.blocks[0]
    assert isinstance(m.blocks[1], QuantizedLinear) and "bias" not in m.blocks[1]
    assert isinstance(m.keep, nn.Linear)
    with pytest.raises(WeightsError):
        quantize_layers(M(), {"nope": (4, 64)})
