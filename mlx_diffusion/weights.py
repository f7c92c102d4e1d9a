"""Weight machinery shared by every model: safetensors I/O, layouts, quantized layers, loading into modules.

Our modules use the reference (diffusers / transformers) parameter names, so a diffusers checkpoint maps onto them
by identity; the only layout change is PyTorch's conv weight OIHW -> MLX's OHWI.

safetensors files are read and written here rather than through `safetensors`/`mx.load` because numpy cannot hold
bfloat16 and whole-file loaders hold every tensor at once: we read one tensor at a time with positioned reads (not a
memory map, whose pages would stay counted in the process's RSS until the end), which keeps conversion memory bounded
by the largest tensor, and we detect truncated or corrupt files ourselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class WeightsError(ValueError):
    """A checkpoint or model folder that cannot be used; the message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------------------------
# safetensors


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 read as its bit pattern
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MX_TO_ST = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8",
    mx.int32: "I32", mx.int64: "I64", mx.uint16: "U16", mx.int8: "I8", mx.bool_: "BOOL",
}


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
                if n > min(size - 8, 100 << 20):
                    raise WeightsError(f"{self.path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if isinstance(e, FileNotFoundError):
                raise WeightsError(f"{self.path}: file not found") from None
            raise WeightsError(f"{self.path}: not a valid safetensors file ({e.__class__.__name__})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._info = header
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise WeightsError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
            if self._start + end > size:
                raise WeightsError(f"{self.path}: file is truncated ({name} lies past its end)")
            count = int(np.prod(info["shape"], dtype=np.int64))
            if count * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize != end - begin:
                raise WeightsError(f"{self.path}: tensor {name} has a size that does not match its shape")

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

    def raw(self, name) -> np.ndarray:
        """The tensor read from disk as numpy (bfloat16 as uint16 bit patterns)."""
        info = self._info[name]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            if f.readinto(buf) != len(buf):
                raise WeightsError(f"{self.path}: file is truncated ({name} lies past its end)")
        return np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def get(self, name) -> mx.array:
        """The tensor as an MLX array in its stored dtype (bfloat16 stays bfloat16)."""
        a = mx.array(self.raw(name))
        return a.view(mx.bfloat16) if self.dtype(name) == "BF16" else a


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


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
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{indexes[0]}: malformed index ({e})") from None
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

    def __len__(self):
        return len(self._where)

    def file(self, name) -> SafetensorsFile:
        return self._where[name]

    def nbytes(self, name) -> int:
        return self._where[name].nbytes(name)

    def shape(self, name):
        return self._where[name].shape(name)

    def get(self, name) -> mx.array:
        return self._where[name].get(name)

    @property
    def metadata(self) -> dict:
        out = {}
        for f in self.files:
            out.update(f.metadata)
        return out


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


# ---------------------------------------------------------------------------------------------------------------
# layouts and quantization


def to_mlx_layout(name: str, array):
    """Reference layout -> MLX layout for one tensor (conv kernels OIHW -> OHWI; everything else unchanged)."""
    if array.ndim == 4 and name.endswith("weight"):
        return array.transpose(0, 2, 3, 1)
    return array


def should_quantize(name: str, shape, keep_patterns, group_size: int) -> bool:
    """Quantize 2-D Linear weights whose input width fits the group, unless a keep pattern names the layer."""
    if not name.endswith(".weight") or len(shape) != 2 or shape[1] % group_size or shape[0] % 8:
        return False
    return not any(re.search(p, name) for p in keep_patterns)


def quantize(w: mx.array, bits: int, group_size: int):
    """MLX affine quantization of a (out, in) weight, computed in float32; returns (packed, scales, biases)."""
    return mx.quantize(w.astype(mx.float32), group_size=group_size, bits=bits)


class ComponentWriter:
    """One component folder in MLX layout: config.json and model.safetensors, with the quantized layers listed in the
    file's metadata (`QUANT_KEY`: layer -> [bits, group size]), which `load_component` reads back. The converter and
    the trainer both write through it."""

    def __init__(self, dst, config: dict, dtype):
        dst = Path(dst)
        dst.mkdir(parents=True)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        self.writer = SafetensorsWriter(dst / WEIGHTS_FILE)
        self.dtype = dtype
        self.quantized = {}

    def add(self, name: str, a: mx.array, bits=None, group_size: int = 64, keep=()) -> bool:
        """Cast to the dtype, or quantize at `bits` where `should_quantize` allows; returns whether it quantized."""
        if bits and should_quantize(name, a.shape, keep, group_size):
            wq, scales, biases = quantize(a, bits, group_size)
            self.add_quantized(name, wq, scales.astype(self.dtype), biases.astype(self.dtype), bits, group_size)
            return True
        self.writer.add(name, a.astype(self.dtype) if mx.issubdtype(a.dtype, mx.floating) else a)
        return False

    def add_quantized(self, name: str, wq, scales, biases, bits: int, group_size: int):
        layer = name[: -len(".weight")]
        self.writer.add(name, wq)
        self.writer.add(layer + ".scales", scales)
        self.writer.add(layer + ".biases", biases)
        self.quantized[layer] = [bits, group_size]

    def close(self):
        self.writer.metadata[QUANT_KEY] = json.dumps(self.quantized)
        self.writer.metadata["format"] = "mlx"
        self.writer.close()

    def abort(self):
        self.writer.abort()


class QuantizedLinear(nn.Module):
    """A Linear layer stored in MLX affine-quantized form.

    On Metal, `quantized_matmul` is the fast path. On the CPU it is ~80x slower than an fp32 GEMM (see
    ../shared/notes/cpu-performance.md), so there the weight is dequantized per call and multiplied by BLAS:
    memory stays at the quantized size between calls.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))

    def __call__(self, x):
        if mx.default_device() == mx.gpu:
            y = mx.quantized_matmul(
                x, self.weight, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits
            )
        else:
            w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)
            y = x @ w.astype(x.dtype).T
        if "bias" in self:
            y = y + self.bias
        return y


def float_parameters(model: nn.Module) -> dict:
    """The model's parameters with every QuantizedLinear dequantized to a float32 weight (what its call computes with
    on a CPU): a quantized model's weights as the float model of the same config takes them."""
    params = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            prefix = name + "." if name else ""
            del params[prefix + "scales"], params[prefix + "biases"]
            params[prefix + "weight"] = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size,
                                                      bits=m.bits).astype(mx.float32)
    return tree_unflatten(list(params.items()))


def install_quantized_layers(model: nn.Module, layers: dict):
    """Replace the nn.Linear modules named in `layers` ({path: (bits, group_size)}) by QuantizedLinear.

    Done before loading so that the full-precision weights of those layers are never materialised (MLX's
    initialisers are lazy and the replaced modules are dropped unevaluated).
    """
    if not layers:
        return
    replacements = []
    for path, module in model.named_modules():
        if path in layers:
            if not isinstance(module, nn.Linear):
                raise WeightsError(f"quantized weights given for {path}, which is not a Linear layer")
            bits, group_size = layers[path]
            out_dims, in_dims = module.weight.shape
            replacements.append((path, QuantizedLinear(in_dims, out_dims, "bias" in module, group_size, bits)))
    missing = set(layers) - {p for p, _ in replacements}
    if missing:
        raise WeightsError(f"quantized weights for unknown layers, e.g. {sorted(missing)[0]}")
    model.update_modules(_nest(replacements))


def _nest(items):
    """[('a.b.0.c', v)] -> {'a': {'b': [{'c': v}]}} as `update_modules` wants (lists padded with {})."""

    return tree_unflatten(items)


# ---------------------------------------------------------------------------------------------------------------
# model folders


WEIGHTS_FILE = "model.safetensors"
QUANT_KEY = "mlx_diffusion.quantization"  # safetensors metadata: {layer path: [bits, group_size]}


def read_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None


def build_model(model_cls, config_cls, config: dict, where):
    """`model_cls(config_cls.from_dict(config))`, with a config we cannot build reported as a one-line error.

    Construction is lazy in MLX: no weights are materialised here.
    """
    try:
        return model_cls(config_cls.from_dict(config))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{where}: unsupported {model_cls.__name__} configuration ({e})") from None


def load_component(folder, model_cls, config_cls, dtype=None):
    """Build `model_cls(config_cls.from_dict(config.json))` and load an MLX component folder into it.

    `dtype` casts floating-point weights (None keeps what the folder stores); quantized layers stay quantized.
    """
    folder = Path(folder)
    model = build_model(model_cls, config_cls, read_json(folder / "config.json"), folder)
    f = SafetensorsFile(folder / WEIGHTS_FILE)
    layers = {k: tuple(v) for k, v in json.loads(f.metadata.get(QUANT_KEY, "{}")).items()}
    install_quantized_layers(model, layers)
    weights = []
    for name in f.keys():
        a = f.get(name)
        if dtype is not None and mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(dtype)
        weights.append((name, a))
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise WeightsError(f"{folder}: weights do not fit the model built from its config.json ({e})") from None
    mx.eval(model.parameters())
    return model


def reference_arrays(folder) -> dict[str, np.ndarray]:
    """A converted component folder's weights back in the reference layout, as float32 numpy arrays: quantized layers
    dequantized, conv kernels OIHW. With the folder's config.json this is what diffusers / transformers load
    (`model.load_state_dict({k: torch.from_numpy(v) ...})`); tests and benchmarks run the reference on our weights."""
    f = SafetensorsFile(Path(folder) / WEIGHTS_FILE)
    layers = json.loads(f.metadata.get(QUANT_KEY, "{}"))
    out = {}
    for name in f.keys():
        layer, leaf = name.rsplit(".", 1)
        if layer in layers and leaf in ("scales", "biases"):
            continue
        a = f.get(name)
        if layer in layers and leaf == "weight":
            bits, group_size = layers[layer]
            scales, biases = (f.get(f"{layer}.{k}").astype(mx.float32) for k in ("scales", "biases"))
            a = mx.dequantize(a, scales, biases, group_size=group_size, bits=bits)  # in float32, as QuantizedLinear
        a = np.array(a.astype(mx.float32))
        out[name] = a.transpose(0, 3, 1, 2) if a.ndim == 4 and leaf == "weight" else a
    return out


@contextmanager
def atomic_folder(out):
    """Yield a temporary sibling of `out` to write a folder into, then swap it in for `out` (replacing what was
    there); an error or Ctrl-C on the way removes it and leaves `out` as it was."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
