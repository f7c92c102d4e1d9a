"""safetensors files, read and written one tensor at a time.

They are read and written here rather than through `safetensors`/`mx.load` because numpy cannot hold
bfloat16 and whole-file loaders hold every tensor at once: we read one tensor at a time with positioned reads (not a
memory map, whose pages would stay counted in the process's RSS until the end), which keeps conversion memory bounded
by the largest tensor, and we detect truncated or corrupt files ourselves.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

import mlx.core as mx

from ..errors import WeightsError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 read as its bit pattern
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MX_TO_ST = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8",
    mx.int32: "I32", mx.int64: "I64", mx.uint16: "U16", mx.int8: "I8", mx.bool_: "BOOL",
}


_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_MAX_DIMS = 16


def _check_entry(path, name: str, info, data_bytes: int):
    """A header entry is {"dtype": known, "shape": [ints >= 0], "data_offsets": [begin, end]} inside the data, whose
    byte count is the shape's: checked with Python integers, so no claimed size can overflow or be allocated."""
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: tensor {name} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {str(dtype)[:20]}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WeightsError(f"{path}: tensor {name} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"{path}: tensor {name} has malformed data offsets")
    if offsets[1] > data_bytes:
        raise WeightsError(f"{path}: file is truncated ({name} lies past its end)")
    count = 1
    for d in shape:
        count *= d
    if count * np.dtype(_ST_DTYPES[dtype]).itemsize != offsets[1] - offsets[0]:
        raise WeightsError(f"{path}: tensor {name} has a size that does not match its shape")


class SafetensorsFile:
    """A safetensors file: names, shapes and dtypes from the header, tensors read one at a time."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{self.path}: not a safetensors file (truncated header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise WeightsError(f"{self.path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except WeightsError:
            raise
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8, a 5000-digit number
            if isinstance(e, FileNotFoundError):
                raise WeightsError(f"{self.path}: file not found") from None
            raise WeightsError(f"{self.path}: not a valid safetensors file ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: not a valid safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise WeightsError(f"{self.path}: malformed __metadata__ (must map names to strings)")
        self.metadata = metadata
        self._start = 8 + n
        self._info = header
        for name, info in header.items():
            _check_entry(self.path, name, info, size - self._start)
        spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items())
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise WeightsError(f"{self.path}: tensors {a} and {b} overlap in the file")

    def keys(self):
        return self._info.keys()

    def __contains__(self, name):
        return name in self._info

    def shape(self, name) -> tuple:
        return tuple(self._info[name]["shape"])

    def dtype(self, name) -> str:
        return self._info[name]["dtype"]

    def nbytes(self, name) -> int:
        b, e = self._info[name]["data_offsets"]
        return e - b

    def raw(self, name, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The tensor read from disk as numpy (bfloat16 as uint16 bit patterns); with `start`/`stop`, only those
        entries of its first axis."""
        info = self._info[name]
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        if start is not None or stop is not None:
            n = shape[0]
            start, stop = max(0, min(n, start or 0)), max(0, min(n, n if stop is None else stop))
            row = (end - begin) // n if n else 0
            begin, end, shape[0] = begin + start * row, begin + max(start, stop) * row, max(0, stop - start)
        buf = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            if f.readinto(buf) != len(buf):
                raise WeightsError(f"{self.path}: file is truncated ({name} lies past its end)")
        return np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(shape)

    def mapped(self, name) -> np.ndarray:
        """The tensor as a read-only memory map of the file (bfloat16 as uint16 bit patterns): pages are read, and
        count as the process's memory, only where it is indexed. For lookup tables (`models.layers.Embedding`)."""
        info = self._info[name]
        return np.memmap(self.path, dtype=_ST_DTYPES[info["dtype"]], mode="r",
                         offset=self._start + info["data_offsets"][0], shape=tuple(info["shape"]))

    def get(self, name) -> mx.array:
        """The tensor as an MLX array in its stored dtype (bfloat16 stays bfloat16)."""
        a = mx.array(self.raw(name))
        return a.view(mx.bfloat16) if self.dtype(name) == "BF16" else a


class Checkpoint:
    """One or more safetensors files seen as a single name -> tensor mapping (diffusers shards with an index)."""

    def __init__(self, files):
        self.files = [f if isinstance(f, SafetensorsFile) else SafetensorsFile(f) for f in files]
        self._where = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f

    @classmethod
    def from_folder(cls, folder) -> "Checkpoint":
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) and v == Path(v).name for v in weight_map.values()):
                    raise ValueError("weight_map must map names to file names in the folder")
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                raise WeightsError(f"{indexes[0]}: malformed index ({' '.join(str(e).split())[:80]})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise WeightsError(f"{folder}: shard(s) missing: {', '.join(missing)}")
            ckpt = cls([folder / n for n in names])
            absent = [k for k in weight_map if k not in ckpt]
            if absent:
                raise WeightsError(f"{folder}: {len(absent)} tensors listed in the index are missing, e.g. {absent[0]}")
            return ckpt
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
            hint = f" (found {', '.join(pickles)}: pickle formats are refused, use safetensors)" if pickles else ""
            raise WeightsError(f"{folder}: no .safetensors weights{hint}")
        return cls(files)

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def nbytes(self, name) -> int:
        return self._where[name].nbytes(name)

    def shape(self, name):
        return self._where[name].shape(name)

    def get(self, name) -> mx.array:
        return self._where[name].get(name)


class SafetensorsWriter:
    """Writes tensors one at a time (each is evaluated, written and dropped), then the header, atomically.

    Data go to a side file first because the header (with every offset) must precede them; `close` streams the
    two into the final file under a temporary name and renames it.
    """

    def __init__(self, path, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._data_path = self.path.with_name(self.path.name + ".data.tmp")
        self._data = open(self._data_path, "wb")
        self._header = {}
        self._offset = 0

    def add(self, name: str, array: mx.array):
        if name in self._header:
            raise WeightsError(f"duplicate tensor name {name}")
        dtype = _MX_TO_ST.get(array.dtype)
        if dtype is None:
            raise WeightsError(f"cannot store {name} of dtype {array.dtype}")
        host = np.array(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        buf = np.ascontiguousarray(host).tobytes()
        self._data.write(buf)
        self._header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [self._offset, self._offset + len(buf)]}
        self._offset += len(buf)

    def close(self):
        self._data.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)) + blob)
            while chunk := data.read(64 << 20):
                out.write(chunk)
        os.replace(tmp, self.path)
        os.remove(self._data_path)

    def abort(self):
        self._data.close()
        for p in (self._data_path, self.path.with_name(self.path.name + ".tmp")):
            if p.exists():
                p.unlink()
