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

The header is parsed here, every count and length checked against the file's size before it is used (gguf-py's reader
maps the file and makes a Python object per metadata element, however many a header claims). Tensor data are read
with positioned reads (as `SafetensorsFile` does), not through a memory map, whose touched pages stay counted in the
process's RSS: reading a 12 GB file through one would look like 12 GB of memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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
_MAX_HEADER = 512 << 20  # bytes of header read at most (metadata with a whole tokenizer is ~10-50 MB)


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


# ggml type ids (ggml.h) of the tensor types decoded here; other ids are named in the error when known
_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
               12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
_OTHER_GGML_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                     21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                     29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# metadata value types: id -> struct format of one scalar (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_KEPT_ARRAY = 1024  # metadata arrays longer than this are skipped, not kept (tokenizer vocabularies)


class _Header:
    """A bounded reader of a GGUF header: every length and count is checked against the bytes the file has left
    before anything is read, allocated or looped over, so a corrupt or hostile header fails fast with a
    WeightsError. Reads the file in growing pieces, as far as the header goes."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path
        self.data, self.pos = b"", 0

    def fail(self, why: str):
        raise WeightsError(f"{self.path}: not a valid GGUF file ({why})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} runs past the end of the file")
        if self.pos + n > len(self.data):
            if self.pos + n > _MAX_HEADER:
                self.fail(f"the header is over {_MAX_HEADER >> 20} MB")
            want = min(self.size, _MAX_HEADER, max(self.pos + n, 2 * len(self.data), 1 << 20))
            self.f.seek(len(self.data))
            self.data += self.f.read(want - len(self.data))
            if self.pos + n > len(self.data):
                self.fail(f"truncated: {what} runs past the end of the file")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("<I", what), self.scalar("<Q", what)
            if etype == _ARRAY:
                self.fail(f"{what} is an array of arrays")
            if etype not in _SCALARS and etype != _STRING:
                self.fail(f"{what} has unknown element type {etype}")
            least = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8
            if count > (len(self.data) - self.pos) // least:
                self.fail(f"{what} claims {count} elements, more than the file holds")
            if etype in _SCALARS:
                raw = self.take(count * least, what)
                return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", raw)) if count <= _KEPT_ARRAY else None
            items = [self.string(what) for _ in range(count)]
            return items if count <= _KEPT_ARRAY else None
        self.fail(f"{what} has unknown value type {vtype}")


@dataclass(frozen=True)
class _TensorInfo:
    qtype: str
    shape: tuple  # numpy order
    offset: int  # absolute, in the file
    n_bytes: int


class GGUFFile:
    """A .gguf file: tensor names, numpy-order shapes and types, metadata; tensors read and decoded one at a time.

    The header is parsed here (version 2 and 3, little-endian), bounded by the file's size: gguf-py's reader maps the
    file and turns every metadata element into Python objects, so a header claiming 2^40 array elements would
    run for hours; here it is refused in microseconds."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                self._read_header(f, size)
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read ({e.strerror or e.__class__.__name__})") from None

    def _read_header(self, f, size: int):
        head = _Header(f, size, self.path)
        if size < 24 or head.take(4, "magic") != b"GGUF":
            raise WeightsError(f"{self.path}: not a valid GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head.take(20, "header"))
        if version & 0xFFFF == 0 and version:
            raise WeightsError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise WeightsError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        # a key-value pair takes at least 12 bytes and a tensor's info at least 28: counts beyond what the file could
        # hold are refused before any loop
        if n_kv > size // 12 or n_tensors > size // 28:
            head.fail("its counts exceed what the file holds")
        self.metadata = {}
        for i in range(n_kv):
            key = head.string(f"metadata key {i}")
            vtype = head.scalar("<I", f"metadata {key!r}")
            value = head.value(vtype, f"metadata {key!r}")
            if value is not None:
                self.metadata[key] = value
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 1 << 16 \
                or alignment & (alignment - 1):
            head.fail(f"general.alignment {alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = head.string(f"tensor {i}'s name")
            n_dims = head.scalar("<I", f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                head.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = struct.unpack(f"<{n_dims}Q", head.take(8 * n_dims, f"tensor {name!r}"))
            type_id = head.scalar("<I", f"tensor {name!r}")
            offset = head.scalar("<Q", f"tensor {name!r}")
            infos.append((name, dims, type_id, offset))
        data_start = -(-head.pos // alignment) * alignment
        self._tensors = {}
        for name, dims, type_id, offset in infos:
            if name in self._tensors:
                head.fail(f"tensor {name!r} appears twice")
            qtype = _GGML_TYPES.get(type_id)
            if qtype is None:
                known = _OTHER_GGML_TYPES.get(type_id, f"id {type_id}")
                raise WeightsError(f"{self.path}: tensor {name} has unsupported GGUF type {known} "
                                   f"(supported: {', '.join(BLOCKS)})")
            block, block_bytes = BLOCKS[qtype]
            if dims[0] % block:
                head.fail(f"tensor {name!r}: a row of {dims[0]} is not a whole number of {qtype} blocks")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * block_bytes
            start = data_start + offset
            if offset % alignment or start + n_bytes > size:
                raise WeightsError(f"{self.path}: file is truncated or corrupt ({name} lies past its end "
                                   f"or off its alignment)")
            self._tensors[name] = _TensorInfo(qtype, tuple(reversed(dims)), start, n_bytes)
        ends = sorted((t.offset, t.offset + t.n_bytes, name) for name, t in self._tensors.items())
        for (_, end, a), (begin, _, b) in zip(ends, ends[1:]):
            if begin < end:
                head.fail(f"tensors {a!r} and {b!r} overlap")

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, name):
        return name in self._tensors

    def shape(self, name) -> tuple:
        return self._tensors[name].shape

    def qtype(self, name) -> str:
        return self._tensors[name].qtype

    def raw(self, name) -> np.ndarray:
        """The stored data read from disk: typed and shaped for F32/F16, (..., row_bytes) uint8 for the others."""
        t = self._tensors[name]
        buf = bytearray(t.n_bytes)
        view, done = memoryview(buf), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            while done < len(buf):  # one read may stop short (2 GiB at most on macOS)
                n = f.readinto(view[done:])
                if not n:
                    raise WeightsError(f"{self.path}: file is truncated ({name} lies past its end)")
                done += n
        if t.qtype in ("F32", "F16"):
            return np.frombuffer(buf, dtype=np.float32 if t.qtype == "F32" else np.float16).reshape(t.shape)
        block, block_bytes = BLOCKS[t.qtype]
        return np.frombuffer(buf, dtype=np.uint8).reshape(*t.shape[:-1], t.shape[-1] // block * block_bytes)

    def nbytes(self, name) -> int:
        return self._tensors[name].n_bytes

    def get(self, name) -> np.ndarray:
        """The tensor decoded to float32 in numpy order."""
        return dequantize(self.raw(name), self.qtype(name)).reshape(self.shape(name))

    def repack(self, name):
        """`repack` of the tensor (MLX affine arrays, leading dims in numpy order), or None if not affine."""
        return repack(self.raw(name), self.qtype(name))
