"""A sample's result must not depend on the batch it is in: an image made in a batch equals the image made alone, bit
for bit. A BLAS rounds a row of a product by where it falls (full register tile or tail, which thread), so one
product of all B*N rows gives a sample other last bits than its own N rows; guidance and the sampler amplified that
past 1e-4 in the image (the built-in model, seed 2733616590, batch of 3: 1.09e-4). These check each product the
models make, on sizes where folding the batch does change the bits."""

import ast
from pathlib import Path

import numpy as np
import pytest

import helpers  # noqa: F401
import mlx.core as mx

import mlx_diffusion
from mlx_diffusion.backends import cpu
from mlx_diffusion.models.layers import Linear, LoRALinear, QuantizedLinear


def _alone(f, *batched):
    """f applied to each sample of the batched inputs on its own, stacked."""
    return mx.concatenate([f(*(x[i : i + 1] for x in batched)) for i in range(batched[0].shape[0])])


def _key(i):
    return mx.random.key(i)


@pytest.mark.parametrize("shape", [(6, 37, 128), (6, 128), (3, 2, 5, 128), (1, 50, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_of_a_batch_equals_its_samples_alone(shape, bias):
    x = mx.random.normal(shape, key=_key(1))
    w = mx.random.normal((512, 128), key=_key(2))
    b = mx.random.normal((512,), key=_key(3)) if bias else None
    y = cpu.linear(x, w, b)
    assert y.shape == (*shape[:-1], 512)
    assert np.array_equal(np.asarray(y), np.asarray(_alone(lambda v: cpu.linear(v, w, b), x)))
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + (0 if b is None else np.asarray(b, np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)


def test_folding_the_batch_would_change_the_bits():
    """The reason for `linear`: at these sizes one product of all rows rounds some rows differently (if a BLAS ever
    stops doing so this test says the per-sample products are no longer needed, not that they are wrong)."""
    x = mx.random.normal((6, 37, 128), key=_key(1))
    w = mx.random.normal((512, 128), key=_key(2))
    folded = np.asarray(x @ w.T)
    assert not np.array_equal(folded, np.asarray(_alone(lambda v: v @ w.T, x)))


@pytest.mark.parametrize("rows", [1, 3, 40])  # quantized_matmul for a few rows per sample, dequantize + BLAS past that
def test_quantized_and_lora_layers_of_a_batch_equal_their_samples_alone(rows):
    w = mx.random.normal((256, 128), key=_key(4)) * 0.1
    layer = QuantizedLinear(128, 256, True, 64, 4)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=64, bits=4)
    layer.bias = mx.random.normal((256,), key=_key(5))
    lora = LoRALinear(layer, mx.random.normal((8, 128), key=_key(6)), mx.random.normal((256, 8), key=_key(7)))
    x = mx.random.normal((5, rows, 128), key=_key(8))
    for f in (layer, lora):
        assert np.array_equal(np.asarray(f(x)), np.asarray(_alone(f, x)))


def test_chunked_attention_of_a_batch_equals_its_samples_alone():
    B, H, L, D = 3, 2, 64, 16
    q, k, v = (mx.random.normal((B, H, L, D), key=_key(10 + i)) for i in range(3))
    for max_scores in (1000, 1 << 22):  # chunks of 15 query rows; one chunk a head
        y = cpu.attention(q, k, v, max_scores=max_scores)
        assert np.array_equal(np.asarray(y), np.asarray(_alone(lambda *a: cpu.attention(*a, max_scores=max_scores),
                                                               q, k, v)))


def test_every_model_builds_its_linear_layers_per_sample():
    """No model file makes an nn.Linear of its own (mlx.nn's multiplies the whole batch as one product)."""
    wrong = []
    for path in (Path(mlx_diffusion.__file__).parent / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Linear"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "nn"):
                wrong.append(f"{path.name}:{node.lineno}")
    assert not wrong, wrong
    assert issubclass(Linear, mlx_diffusion.models.layers.nn.Linear)  # quantizing and LoRA find it as one
