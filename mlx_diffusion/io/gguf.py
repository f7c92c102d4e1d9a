"""GGUF checkpoints (city96 / stable-diffusion.cpp layout): header parsing, numpy decoders, MLX repacking.

mlx's own GGUF loader decodes Q4_K wrongly and refuses Q5_K, so tensors are decoded here. Each ggml block type is
split into unsigned integer codes plus per-group float32 scale and bias wherever the format is exactly affine on
groups of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K); those tensors repack losslessly into MLX's affine
quantization (`mx.dequantize(w, scales, biases, 32, bits)`). Q2_K, Q3_K and Q6_K scale groups of 16, which MLX
cannot express: they are only decoded to float32, and callers requantize.

Every product below of an fp16 scale and a code of at most 8 bits (and of d * 6-bit sub-scale, then times a 5-bit
code) is exact in float32, so `scale * q + bias` is bit-identical to gguf-py's reference formulas
(`gguf.quants.dequantize`), whatever order or fusion the arithmetic uses.

Block layouts follow ggml (ggml-common.h); dims in the file are in ggml order (fastest first), reported here in
numpy order.

gguf-py's reader memory-maps the whole file; it is used for the header only. Tensor data are read with positioned
reads (as `SafetensorsFile` does): every page touched through a map stays counted in the process's RSS until
the map goes, so reading a 12 GB file through it would look like 12 GB of memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import WeightsError

QK_K = 256

# name -> (elements per block, bytes per block)
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
GROUP_SIZE = 32


# ---------------------------------------------------------------------------------------------------------------
# block decoders: (n_blocks, bytes) uint8 -> codes / scales / biases or float32 values


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k, 16*m) bytes -> (n, k, 2, 16*m) codes: the low nibbles are the first half of the group, high the second."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _high_bits(qh: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, B) bytes, bit j of byte i -> (n, n_bits, B) with [.., j, i]; ggml's qh planes in the K-quants."""
    return (qh[:, None, :] >> np.arange(n_bits, dtype=np.uint8)[None, :, None]) & 1


def _legacy(blocks, has_min: bool, five: bool):
    n = blocks.shape[0]
    o = 4 if has_min else 2
    d = _f16(blocks[:, 0:2])
    if five:
        qh = np.ascontiguousarray(blocks[:, o:o + 4]).view("<u4")  # bit i is the high bit of element i
        q = _nibbles(blocks[:, o + 4:]).reshape(n, 32)
        q |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    else:
        q = _nibbles(blocks[:, o:]).reshape(n, 32)
    if has_min:
        bias = _f16(blocks[:, 2:4])
    else:  # symmetric: w = d * (q - 2^(bits-1))
        bias = d * np.float32(-16 if five else -8)
    return q[:, None, :], d, bias


def _q8_0(blocks):
    d = _f16(blocks[:, 0:2])
    q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q[:, None, :], d, d * np.float32(-128)


def _k_scale_min(s: np.ndarray):
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return sc, mn


def _q45_k(blocks, five: bool):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qs = blocks[:, 48:] if five else blocks[:, 16:]
    q = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)  # 32 bytes hold 64 values: sub-blocks 2j (low), 2j+1 (high)
    if five:
        q |= _high_bits(blocks[:, 16:48], 8) << 4  # bit j of byte i is the high bit of element i of sub-block j
    return q, d * sc, -(dmin * mn)


def _q2_k(blocks):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4)).reshape(n, 16, 1)
    # each half of 128 values: 32 bytes, the four 2-bit fields of byte i are elements i, 32+i, 64+i, 96+i
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return (dl * q.reshape(n, 16, 16) - ml).reshape(n, QK_K)


def _q3_k(blocks):
    n = blocks.shape[0]
    hmask, qs, s = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    lo = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
    hi = (s[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 2, 1).reshape(n, 16) & 3
    dl = (d * ((lo | (hi << 4)).astype(np.int8) - 32)).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, 16, 16)
    # a clear hmask bit subtracts 4
    qh = (_high_bits(hmask, 8) ^ 1).reshape(n, 16, 16)
    return (dl * (ql.astype(np.int8) - (qh << 2).astype(np.int8))).reshape(n, QK_K)


def _q6_k(blocks):
    n = blocks.shape[0]
    ql, qh, sc = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208].view(np.int8)
    d = _f16(blocks[:, 208:210])
    dl = (d * sc).reshape(n, 16, 1)
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 2, 4, 32)  # per 128 values: 64 bytes, low then high nibbles
    hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (lo | (hi << 4)).astype(np.int8) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


_AFFINE = {
    "Q4_0": lambda b: _legacy(b, False, False), "Q4_1": lambda b: _legacy(b, True, False),
    "Q5_0": lambda b: _legacy(b, False, True), "Q5_1": lambda b: _legacy(b, True, True),
    "Q8_0": _q8_0, "Q4_K": lambda b: _q45_k(b, False), "Q5_K": lambda b: _q45_k(b, True),
}
_OTHER = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q6_K": _q6_k}

_CHUNK = 1 << 20  # elements decoded per pass: bounds the temporaries and keeps them in cache


def _rows(raw: np.ndarray, qtype: str):
    """raw bytes (..., row_bytes) -> (leading shape, n_cols, uint8 blocks (n_blocks, block_bytes))."""
    if qtype not in BLOCKS:
        raise WeightsError(f"unsupported GGUF tensor type {qtype}")
    bs, ts = BLOCKS[qtype]
    raw = np.ascontiguousarray(raw)
    lead = raw.shape[:-1]
    b = raw.view(np.uint8)
    row_bytes = b.shape[-1]
    if row_bytes % ts:
        raise WeightsError(f"{qtype} row of {row_bytes} bytes is not a whole number of {ts}-byte blocks")
    return lead, row_bytes // ts * bs, b.reshape(-1, ts)


def _blockwise(fn, blocks, out, per_block):
    step = max(1, _CHUNK // per_block)
    for i in range(0, blocks.shape[0], step):
        fn(blocks[i:i + step], out[i * per_block:(i + step) * per_block])


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Decode a GGUF tensor's data (bytes shaped (..., row_bytes), or typed F32/F16 arrays) to float32 (..., cols)."""
    qtype = getattr(qtype, "name", qtype)
    lead, cols, blocks = _rows(raw, qtype)
    if qtype == "F32":
        return blocks.view(np.float32).reshape(*lead, cols).copy()
    if qtype == "F16":
        return blocks.view(np.float16).astype(np.float32).reshape(*lead, cols)
    if qtype == "BF16":
        return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(*lead, cols)
    out = np.empty(blocks.shape[0] * BLOCKS[qtype][0], np.float32)
    if qtype in _AFFINE:
        def fn(b, o):
            q, s, z = _AFFINE[qtype](b)
            np.add(s[..., None] * q, z[..., None], out=o.reshape(q.shape))
    else:
        def fn(b, o):
            o[:] = _OTHER[qtype](b).ravel()
    _blockwise(fn, blocks, out, BLOCKS[qtype][0])
    return out.reshape(*lead, cols)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (n, 8k) < 2^bits -> uint32 words in mx.quantize's layout: one little-endian bit stream, LSB first."""
    n = q.shape[0]
    v = q.reshape(n, -1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * bits)
    v = np.bitwise_or.reduce(v, axis=-1)  # 8 codes fill exactly `bits` bytes
    return np.ascontiguousarray(v.view(np.uint8).reshape(n, -1, 8)[:, :, :bits]).reshape(n, -1).view("<u4")


def repack(raw: np.ndarray, qtype: str):
    """Lossless GGUF -> MLX affine quantization: (wq uint32, scales f32, biases f32, bits, group_size), or None.

    `mx.dequantize(wq, scales, biases, group_size, bits)` reproduces `dequantize(raw, qtype)` bit for bit. None for
    the types that are not affine on groups of 32 (F32/F16/BF16, Q2_K, Q3_K, Q6_K). Scales stay float32 because a
    K-quant scale d * sc carries 17 significant bits.
    """
    qtype = getattr(qtype, "name", qtype)
    if qtype not in AFFINE_BITS:
        if qtype not in BLOCKS:
            raise WeightsError(f"unsupported GGUF tensor type {qtype}")
        return None
    bits = AFFINE_BITS[qtype]
    lead, cols, blocks = _rows(raw, qtype)
    bs = BLOCKS[qtype][0]
    n_groups = blocks.shape[0] * bs // GROUP_SIZE
    wq = np.empty((n_groups, GROUP_SIZE * bits // 32), np.uint32)
    scales = np.empty(n_groups, np.float32)
    biases = np.empty(n_groups, np.float32)
    step = max(1, _CHUNK // bs)
    g = bs // GROUP_SIZE
    for i in range(0, blocks.shape[0], step):
        q, s, z = _AFFINE[qtype](blocks[i:i + step])
        sl = slice(i * g, i * g + q.shape[0] * g)
        wq[sl] = _pack(q.reshape(-1, GROUP_SIZE), bits)
        scales[sl], biases[sl] = s.ravel(), z.ravel()
    per_row = cols // GROUP_SIZE
    return (wq.reshape(*lead, per_row * GROUP_SIZE * bits // 32), scales.reshape(*lead, per_row),
            biases.reshape(*lead, per_row), bits, GROUP_SIZE)


# ---------------------------------------------------------------------------------------------------------------
# files


class GGUFFile:
    """A .gguf file: tensor names, numpy-order shapes and types, metadata; tensors read and decoded one at a time."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: file not found")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:
            # truncated files fail inside the reader while reshaping a tensor or field that runs past the end
            why = (str(e).splitlines() or [e.__class__.__name__])[0]
            raise WeightsError(f"{self.path}: not a valid GGUF file or truncated ({why})") from None
        if reader.byte_order == "S":
            raise WeightsError(f"{self.path}: big-endian GGUF files are not supported")
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type.name not in BLOCKS:
                raise WeightsError(
                    f"{self.path}: tensor {t.name} has unsupported GGUF type {t.tensor_type.name} "
                    f"(supported: {', '.join(BLOCKS)})"
                )
        self.metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, name):
        return name in self._tensors

    def shape(self, name) -> tuple:
        return tuple(int(x) for x in reversed(self._tensors[name].shape.tolist()))

    def qtype(self, name) -> str:
        return self._tensors[name].tensor_type.name

    def raw(self, name) -> np.ndarray:
        """The stored data read from disk: shaped (..., row_bytes) uint8 for block types, typed for F32/F16."""
        t = self._tensors[name]
        layout = t.data  # a view into the reader's map: its shape and dtype only, no page is read
        buf = bytearray(int(t.n_bytes))
        view, done = memoryview(buf), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(int(t.data_offset))
            while done < len(buf):  # one read may stop short (2 GiB at most on macOS)
                n = f.readinto(view[done:])
                if not n:
                    raise WeightsError(f"{self.path}: file is truncated ({name} lies past its end)")
                done += n
        return np.frombuffer(buf, dtype=layout.dtype).reshape(layout.shape)

    def nbytes(self, name) -> int:
        return int(self._tensors[name].n_bytes)

    def get(self, name) -> np.ndarray:
        """The tensor decoded to float32 in numpy order."""
        return dequantize(self.raw(name), self.qtype(name)).reshape(self.shape(name))

    def repack(self, name):
        """`repack` of the tensor (MLX affine arrays, leading dims in numpy order), or None if not affine."""
        return repack(self.raw(name), self.qtype(name))
