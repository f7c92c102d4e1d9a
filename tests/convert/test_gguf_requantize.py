"""GGUF K-quants with no lossless MLX form (Q2_K, Q3_K, Q6_K): the converter dequantizes and requantizes them.

gguf-py cannot write K-quants, so the blocks here are random bytes in ggml's layouts (every bit pattern is a valid
block once the fp16 super-block scales are finite); the file is written by gguf.GGUFWriter with the raw type. The
decoded reference is gguf-py's own `gguf.quants.dequantize`, independent of mlx_diffusion.io.gguf.
"""

import json

import numpy as np
import pytest

import helpers  # noqa: F401
import gguf
import mlx.core as mx
from gguf import GGMLQuantizationType as T

import tiny_models
from test_names import flux_to_original
from helpers import cut_plan
from mlx_diffusion.convert import names
from mlx_diffusion.convert import convert
from mlx_diffusion.io.gguf import GGUFFile
from mlx_diffusion.io.safetensors import SafetensorsFile

# width 4 x 16 = 64, MLP 256: the double blocks' `img_mlp.2` / `txt_mlp.2` (diffusers `ff.net.2`,
# `ff_context.net.2`) are the weights whose input width is one 256-value K-quant super-block
K_QUANTS = {
    "double_blocks.0.img_mlp.2.weight": "Q6_K",
    "double_blocks.0.txt_mlp.2.weight": "Q3_K",
    "double_blocks.1.img_mlp.2.weight": "Q2_K",
    "double_blocks.1.txt_mlp.2.weight": "Q6_K",
}
# where the fp16 super-block scales sit in each 256-value block: (offset, count)
_FP16_FIELDS = {"Q6_K": (208, 1), "Q3_K": (108, 1), "Q2_K": (80, 2)}


def random_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """(rows, row_bytes) uint8 of random valid blocks, decoding to values of order 0.1-1."""
    bs, ts = gguf.GGML_QUANT_SIZES[T[qtype]]
    b = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
    off, n = _FP16_FIELDS[qtype]
    # Q6_K: d * int8 scale * 6-bit code reaches 128 * 32 * d; Q2_K/Q3_K reach about 16 * 4 * d
    d = rng.uniform(0.5, 1.0, (b.shape[0], n)) * (2e-4 if qtype == "Q6_K" else 1e-2)
    b[:, off:off + 2 * n] = d.astype(np.float16).view(np.uint8)
    return b.reshape(rows, -1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(diffusers folder, GGUF file, the GGUF's tensors decoded by gguf-py in diffusers names)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    root = tmp_path_factory.mktemp("requant")
    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**tiny_models.SCHNELL_SCHEDULER),
                        vae=tiny_models.tiny_vae(), text_encoder=tiny_models.tiny_clip(), tokenizer=clip_tok,
                        text_encoder_2=tiny_models.tiny_t5(), tokenizer_2=t5_tok,
                        transformer=tiny_models.tiny_flux_transformer(heads=4, head_dim=16, seed=9))
    src = tiny_models.save(pipe, root / "diffusers")
    original = {k: v.numpy().astype(np.float32) for k, v in flux_to_original(pipe.transformer.state_dict()).items()}

    rng = np.random.default_rng(0)
    path = root / "flux1-tiny-Q6_K.gguf"
    w = gguf.GGUFWriter(path, "flux")
    decoded = {}
    for name, a in original.items():
        qtype = K_QUANTS.get(name)
        if qtype is None:
            w.add_tensor(name, a)
            decoded[name] = a
        else:
            assert a.shape[1] % 256 == 0, (name, a.shape)
            raw = random_blocks(*a.shape, qtype, rng)
            w.add_tensor(name, raw, raw_dtype=T[qtype])
            decoded[name] = gguf.quants.dequantize(raw, T[qtype])
            assert decoded[name].shape == a.shape and np.isfinite(decoded[name]).all()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = GGUFFile(path)
    for name, qtype in K_QUANTS.items():
        assert f.qtype(name) == qtype
        np.testing.assert_array_equal(f.get(name), decoded[name])  # our decoders agree with gguf-py's
    reference = cut_plan(names.to_diffusers({k: a.shape for k, a in decoded.items()}), decoded)
    return src, path, reference


REQUANTIZED = ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
               "transformer_blocks.1.ff.net.2", "transformer_blocks.1.ff_context.net.2"]


def test_requantized_at_requested_bits(case, tmp_path):
    src, path, reference = case
    logs = []
    out = convert(src, tmp_path / "q8", transformer=path, bits=8, dtype="float32", progress=False, log=logs.append)
    info = json.loads((out / "mlx_diffusion.json").read_text())["components"]["transformer"]
    assert info["gguf_types"] == {"F32": len(GGUFFile(path).keys()) - 4, "Q6_K": 2, "Q3_K": 1, "Q2_K": 1}
    assert info["requantized_layers"] == 4 and info["quantized_layers"] == 4
    assert info["bits"] == 8 and info["group_size"] == 64
    line = next(x for x in logs if "requantized" in x)
    assert "requantized 4 GGUF tensors at 8 bits" in line
    assert "transformer_blocks.0.ff.net.2.weight (Q6_K)" in line and "(Q3_K)" in line and "(Q2_K)" in line

    st = SafetensorsFile(out / "transformer" / "model.safetensors")
    layers = json.loads(st.metadata["mlx_diffusion.quantization"])
    assert sorted(layers) == sorted(REQUANTIZED) and all(v == [8, 64] for v in layers.values())
    for layer in REQUANTIZED:
        ref = reference[layer + ".weight"]
        wq, scales, biases = (mx.array(st.raw(f"{layer}.{p}")) for p in ("weight", "scales", "biases"))
        ours = np.array(mx.dequantize(wq, scales, biases, group_size=64, bits=8))
        # within one step (range / 255) of each 64-value group: mx.quantize snaps the step so that one end of the
        # range is exact, which costs up to a whole step elsewhere, not the half step of plain rounding
        err = np.abs(ours - ref).reshape(ref.shape[0], -1, 64).max(-1)
        assert (err <= np.abs(np.array(scales)) * 1.01).all(), layer
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"{layer}: 8-bit requantization max rel err {rel:.2e}")
        assert 0 < rel <= 2 / 255 * 1.01  # a group's range is at most 2 max|w|
    # everything else is the file's float data, unquantized
    for name, ref in reference.items():
        if name[: -len(".weight")] not in layers:
            np.testing.assert_array_equal(np.array(st.raw(name)), ref)


def test_dequantized_without_quantization(case, tmp_path):
    src, path, reference = case
    logs = []
    out = convert(src, tmp_path / "f32", transformer=path, bits=None, dtype="float32", progress=False,
                  log=logs.append)
    info = json.loads((out / "mlx_diffusion.json").read_text())["components"]["transformer"]
    assert info["quantized_layers"] == 0 and info["requantized_layers"] == 0
    assert not any("requantized" in x for x in logs)
    st = SafetensorsFile(out / "transformer" / "model.safetensors")
    assert set(st.keys()) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_array_equal(np.array(st.raw(name)), ref)
