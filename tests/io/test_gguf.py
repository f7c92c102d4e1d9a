"""GGUF reading, decoding and MLX repacking, checked bit for bit against gguf-py's reference decoders."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import mx  # noqa: F401  (imports mlx_diffusion before mlx.core)
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

import mlx_diffusion.io.gguf as G
from mlx_diffusion.io.gguf import BLOCKS, GGUFFile, dequantize, repack
from mlx_diffusion.errors import WeightsError

K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the fp16 super-block scales (d, dmin) inside each block
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks: every code and sub-scale byte random, fp16 fields any finite value (subnormals too)."""
    rng = np.random.default_rng(seed)
    _, ts = BLOCKS[qtype]
    b = rng.integers(0, 256, size=(rows * blocks_per_row, ts), dtype=np.uint8)
    for o in FP16_FIELDS[qtype]:
        h = rng.integers(0, 1 << 16, size=rows * blocks_per_row, dtype=np.uint16)
        h = np.where((h & 0x7C00) == 0x7C00, h & 0xBFFF, h)  # exponent all ones (inf / NaN) -> finite
        b[:, o:o + 2] = h.astype("<u2").view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, blocks_per_row * ts)


def quantized(qtype: str, shape, seed: int = 0) -> np.ndarray:
    """Data produced by gguf-py's own quantizer (realistic blocks) for the types it can write."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return ref_quantize(x, T[qtype]) if qtype != "F32" else x


def mlx_dequantize(r) -> np.ndarray:
    wq, s, z, bits, gs = r
    return np.array(mx.dequantize(mx.array(wq), mx.array(s), mx.array(z), group_size=gs, bits=bits))


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_decode_matches_reference(qtype, monkeypatch):
    monkeypatch.setattr(G, "_CHUNK", 4096)  # several chunks, one partial, so the chunked paths are exercised
    datas = []
    if qtype in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        datas.append(quantized(qtype, (7, 3, 512)))
    if qtype in FP16_FIELDS:
        datas.append(random_blocks(qtype, 24, 4 if qtype in K_QUANTS else 40))
    for raw in datas:
        out, ref = dequantize(raw, qtype), ref_dequantize(raw, T[qtype])
        assert out.dtype == np.float32 and out.shape == ref.shape
        assert np.all(np.isfinite(ref)) and ref.std() > 0
        np.testing.assert_array_equal(out, ref)  # bit-exact


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"])
def test_repack_is_lossless(qtype, monkeypatch):
    monkeypatch.setattr(G, "_CHUNK", 4096)
    raws = [random_blocks(qtype, 24, 4 if qtype in K_QUANTS else 40, seed=1)]
    if qtype not in K_QUANTS:
        raws.append(quantized(qtype, (5, 2, 256), seed=2))
    for raw in raws:
        r = repack(raw, qtype)
        wq, scales, biases, bits, gs = r
        cols = ref_dequantize(raw, T[qtype]).shape[-1]
        assert (bits, gs) == (G.AFFINE_BITS[qtype], 32) and wq.dtype == np.uint32
        assert wq.shape == (*raw.shape[:-1], cols * bits // 32) and scales.shape == (*raw.shape[:-1], cols // 32)
        np.testing.assert_array_equal(mlx_dequantize(r), ref_dequantize(raw, T[qtype]))  # bit-exact


def test_repack_none_for_non_affine():
    for qtype in ("Q2_K", "Q3_K", "Q6_K"):
        assert repack(random_blocks(qtype, 2, 1), qtype) is None
    assert repack(np.zeros((2, 32), np.float32), "F32") is None
    with pytest.raises(WeightsError, match="IQ4_NL"):
        dequantize(np.zeros((1, 18), np.uint8), "IQ4_NL")


def test_pack_matches_mx_quantize():
    # codes that mx.quantize itself produces come back in the same words
    rng = np.random.default_rng(3)
    for bits in (4, 5, 8):
        w = mx.array(rng.normal(size=(4, 128)).astype(np.float32))
        wq, s, z = mx.quantize(w, group_size=32, bits=bits)
        q = np.rint((np.array(mx.dequantize(wq, s, z, group_size=32, bits=bits)).reshape(4, 4, 32)
                     - np.array(z)[..., None]) / np.array(s)[..., None]).astype(np.uint8)
        np.testing.assert_array_equal(G._pack(q.reshape(16, 32), bits).reshape(4, -1), np.array(wq))


def write_gguf(path, tensors: dict, arch: str | None = "flux", extra=None):
    w = gguf.GGUFWriter(path, arch or "x")
    if arch is None:
        w.kv_data[0].pop("general.architecture")
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in ("F32", "F16") else T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_roundtrip(tmp_path):
    q4k = random_blocks("Q4_K", 6, 2, seed=4)  # numpy shape (6, 512)
    q8 = quantized("Q8_0", (3, 4, 64), seed=5)
    tensors = {
        "img_in.bias": (np.random.default_rng(6).normal(size=40).astype(np.float32), "F32"),
        "double_blocks.0.img_attn.qkv.weight": (q4k, "Q4_K"),
        "time_in.in_layer.weight": (quantized("F16", (8, 32), seed=7), "F16"),
        "x.weight": (quantized("BF16", (2, 48), seed=8), "BF16"),
        "y.weight": (q8, "Q8_0"),
        "z.weight": (random_blocks("Q6_K", 2, 1, seed=9), "Q6_K"),
    }
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tensors, extra={"general.name": "tiny"})
    f = GGUFFile(path)
    assert f.metadata["general.architecture"] == "flux" and f.metadata["general.name"] == "tiny"
    assert set(f.keys()) == set(tensors) and len(f.keys()) == 6
    expect_shapes = {"img_in.bias": (40,), "double_blocks.0.img_attn.qkv.weight": (6, 512),
                     "time_in.in_layer.weight": (8, 32), "x.weight": (2, 48), "y.weight": (3, 4, 64),
                     "z.weight": (2, 256)}
    for name, (data, qtype) in tensors.items():
        assert f.qtype(name) == qtype and f.shape(name) == expect_shapes[name]
        got = f.get(name)
        assert got.shape == expect_shapes[name] and got.dtype == np.float32
        np.testing.assert_array_equal(got, ref_dequantize(data, T[qtype]).reshape(expect_shapes[name]))
    np.testing.assert_array_equal(mlx_dequantize(f.repack("double_blocks.0.img_attn.qkv.weight")),
                                  f.get("double_blocks.0.img_attn.qkv.weight"))
    assert mlx_dequantize(f.repack("y.weight")).shape == (3, 4, 64)
    assert f.repack("z.weight") is None and f.repack("img_in.bias") is None

    bare = tmp_path / "bare.gguf"  # stable-diffusion.cpp files may carry no metadata at all
    write_gguf(bare, {"a": tensors["img_in.bias"]}, arch=None)
    g = GGUFFile(bare)
    assert g.metadata == {} and g.shape("a") == (40,)


def one_line_error(path, match):
    with pytest.raises(WeightsError, match=match) as e:
        GGUFFile(path)
    assert "\n" not in str(e.value)


def test_errors(tmp_path):
    one_line_error(tmp_path / "missing.gguf", "not found")
    (tmp_path / "empty.gguf").write_bytes(b"")
    one_line_error(tmp_path / "empty.gguf", "not a valid GGUF")
    (tmp_path / "text.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    one_line_error(tmp_path / "text.gguf", "not a valid GGUF")

    good = tmp_path / "good.gguf"
    write_gguf(good, {"w": (random_blocks("Q4_K", 4, 4), "Q4_K")})
    data = good.read_bytes()
    for cut in (len(data) - 100, 40):  # inside the tensor data, inside the header
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        one_line_error(tmp_path / "cut.gguf", "truncated")

    write_gguf(tmp_path / "iq.gguf", {"w": (np.zeros((2, 18), np.uint8), "IQ4_NL")})
    one_line_error(tmp_path / "iq.gguf", "tensor w has unsupported GGUF type IQ4_NL")


def _rss_file_mb() -> float | None:
    """File-backed resident memory of this process (pages of mapped files), Linux only."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def test_reading_every_tensor_keeps_file_pages_out_of_rss(tmp_path):
    """Tensor data are read with positioned reads, not through the reader's map, whose touched pages would stay
    resident: reading all 64 MB here must not add 64 MB of the file to RSS."""
    if _rss_file_mb() is None:
        pytest.skip("needs /proc/self/status")
    rows = np.random.default_rng(0).integers(0, 256, size=(256, 34 * 64), dtype=np.uint8)  # 256 x 2048 Q8_0, 557 KB
    path = tmp_path / "big.gguf"
    write_gguf(path, {f"w{i}": (rows, "Q8_0") for i in range(120)})  # 67 MB
    f = GGUFFile(path)
    before = _rss_file_mb()
    for name in f.keys():
        assert f.raw(name).shape == (256, 34 * 64)
    grown = _rss_file_mb() - before
    assert grown < 16, f"RssFile grew by {grown:.0f} MB while reading a {path.stat().st_size / 1e6:.0f} MB file"
