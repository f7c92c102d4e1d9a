"""The model-folder format: what `convert` and `tiny.train` write and `load_pipeline` reads.

    FOLDER/mlx_diffusion.json       the info file: format version, family, variant, source, bits, dtype, per-component
                                    records, and the generation defaults (`defaults`: steps, guidance, T5 length, size)
    FOLDER/model_index.json         as diffusers'
    FOLDER/<component>/config.json  the reference config our config classes read
    FOLDER/<component>/model.safetensors
                                    reference parameter names in MLX layout (conv kernels OHWI); quantized Linear
                                    weights as `<layer>.weight` (packed uint32) + `.scales` + `.biases`, listed in the
                                    file's metadata under QUANT_KEY
    FOLDER/tokenizer*/, FOLDER/scheduler/scheduler_config.json

Every folder is written under a temporary sibling name and swapped in when complete (`atomic_folder`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from .. import __version__
from ..errors import WeightsError
from ..models import kind_of
from ..models.layers import Embedding, quantize_layers
from .safetensors import SafetensorsFile, SafetensorsWriter

INFO_FILE = "mlx_diffusion.json"
WEIGHTS_FILE = "model.safetensors"
QUANT_KEY = "mlx_diffusion.quantization"  # safetensors metadata: {layer path: [bits, group_size]}
# 1: the first; 2: `defaults` is required (format-1 folders get the released models' defaults when read)
FORMAT_VERSION = 2


def read_json(path) -> dict:
    """A JSON object from a file, or a one-line WeightsError saying what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing") from None
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, a 5000-digit number, nesting 10^5 deep
        raise WeightsError(f"{path} is not valid JSON ({' '.join(str(e).split())[:100]})") from None
    except OSError as e:
        raise WeightsError(f"{path} cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return data


def write_json(path, data: dict):
    Path(path).write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# the info file and the generation defaults

# The released models' generation defaults (diffusers' FluxPipeline / StableDiffusion3Pipeline and the model cards).
# The converter writes them into each folder; folders of format 1, which had no `defaults`, get them when read.
RELEASED_DEFAULTS = {
    ("flux", "schnell"): {"steps": 4, "guidance": None, "max_sequence_length": 256},
    ("flux", "dev"): {"steps": 28, "guidance": 3.5, "max_sequence_length": 512},
    "sd3": {"steps": 28, "guidance": 7.0, "max_sequence_length": 256},
}


def released_defaults(family: str, variant: str, transformer_config: dict, vae_config: dict) -> dict:
    """The generation defaults of a released model of this family and variant at the configs' sizes: the size is
    diffusers' default_sample_size (FLUX: 128; SD3: the transformer's sample_size) times the VAE's factor."""
    factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    if family == "flux":
        d = RELEASED_DEFAULTS[("flux", "dev" if variant == "dev" else "schnell")]
        size = 128 * factor
    else:
        d = RELEASED_DEFAULTS["sd3"]
        size = int(transformer_config.get("sample_size", 128)) * factor
    return {**d, "width": size, "height": size}


def _check_defaults(d, where) -> dict:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    def count(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(d, dict):
        raise WeightsError(f"{where}: `defaults` must be an object")
    checks = {"steps": lambda v: count(v, 1), "guidance": lambda v: v is None or number(v),
              "max_sequence_length": lambda v: count(v, 0), "width": lambda v: count(v, 1),
              "height": lambda v: count(v, 1)}
    missing = [k for k in checks if k not in d]
    if missing:
        raise WeightsError(f"{where}: `defaults` lacks {', '.join(missing)}")
    bad = [f"{k} {d[k]!r}" for k, ok in checks.items() if not ok(d[k])]
    if bad:
        raise WeightsError(f"{where}: bad value in `defaults`: {', '.join(bad)}")
    return d


def read_info(folder) -> dict:
    """A model folder's info file, checked: a known format version and a `defaults` entry (filled in for format 1)."""
    folder = Path(folder)
    path = folder / INFO_FILE
    info = read_json(path)
    version = info.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WeightsError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path}: format {version} is newer than this mlx_diffusion reads ({FORMAT_VERSION}); "
                           f"update mlx_diffusion")
    if "defaults" not in info or version == 1:
        family, variant = info.get("family"), info.get("variant")
        if family not in ("flux", "sd3"):
            raise WeightsError(f"{path}: unknown model family {family!r}")
        base = released_defaults(family, variant, read_json(folder / "transformer" / "config.json"),
                                 read_json(folder / "vae" / "config.json"))
        info["defaults"] = {**base, **(info.get("defaults") or {})}
    info["defaults"] = _check_defaults(info["defaults"], path)
    components = info.setdefault("components", {})
    if not isinstance(components, dict) or not all(isinstance(c, str) and re.fullmatch(r"[a-z0-9_]+", c)
                                                   for c in components):  # folder names: never a path elsewhere
        raise WeightsError(f"{path}: malformed components (a map of component folder names)")
    return info


def write_info(folder, *, family: str, variant: str, source: str, bits, group_size, dtype: str, defaults: dict,
               components: dict, **extra):
    """The info file of a folder being written (the converter's and the trainer's)."""
    info = {"format_version": FORMAT_VERSION, "converter_version": __version__, "family": family,
            "variant": variant, "source": source, "bits": bits, "group_size": group_size if bits else None,
            "dtype": dtype, "defaults": _check_defaults(dict(defaults), INFO_FILE), "components": components, **extra}
    write_json(Path(folder) / INFO_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# components


def to_mlx_layout(name: str, array):
    """Reference layout -> MLX layout for one tensor (conv kernels OIHW -> OHWI; everything else unchanged)."""
    if array.ndim == 4 and name.endswith("weight"):
        return array.transpose(0, 2, 3, 1)
    return array


def _check_finite(name: str, a: mx.array, source: mx.array | None = None):
    """WeightsError if `a` holds NaN or infinity; `source`: what `a` was cast from, examined only then, to say
    whether the cast overflowed."""
    if bool(mx.all(mx.isfinite(a))):
        return
    why = ""
    if source is not None and source.dtype != a.dtype and bool(mx.all(mx.isfinite(source))):
        why = f" after the cast to {str(a.dtype).split('.')[-1]}"
    raise WeightsError(f"{name} holds NaN or infinite values{why}: the checkpoint is corrupt or was saved from a "
                       "diverged model")


class ComponentWriter:
    """One component folder in MLX layout: config.json and model.safetensors, with the quantized layers listed in the
    file's metadata (QUANT_KEY: layer -> [bits, group size]), which `load_component` reads back. Which tensors are
    quantized is the caller's policy (`convert.quantize`)."""

    def __init__(self, dst, config: dict, dtype):
        dst = Path(dst)
        dst.mkdir(parents=True)
        write_json(dst / "config.json", config)
        self.writer = SafetensorsWriter(dst / WEIGHTS_FILE)
        self.dtype = dtype
        self.quantized = {}

    def add(self, name: str, a: mx.array):
        """A tensor as it is, floating-point ones cast to the folder's dtype; NaN or infinity is refused."""
        if mx.issubdtype(a.dtype, mx.floating):
            cast = a.astype(self.dtype)
            _check_finite(name, cast, source=a)
            a = cast
        self.writer.add(name, a)

    def add_quantized(self, name: str, wq, scales, biases, bits: int, group_size: int):
        """A Linear `name` (".weight") in MLX's affine form."""
        layer = name[: -len(".weight")]
        _check_finite(name, scales)
        _check_finite(name, biases)
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


def _quantized_layers(f: SafetensorsFile) -> dict:
    try:
        layers = json.loads(f.metadata.get(QUANT_KEY, "{}"))
        return {k: (int(v[0]), int(v[1])) for k, v in layers.items()}
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError):
        raise WeightsError(f"{f.path}: malformed {QUANT_KEY} metadata") from None


# Lookup tables at least this large are read from the file per lookup instead of held (see models.layers.Embedding):
# the text encoders' token tables (CLIP-L 152 MB, CLIP-G 253 MB, T5-XXL 526 MB in float32); the built-in model's
# are far below it.
TABLE_IN_FILE_BYTES = 16 << 20


def _keep_tables_in_file(model, f: SafetensorsFile, dtype) -> set:
    """Leaves the model's large floating-point Embedding tables in `f`, memory-mapped; returns their names."""
    names = set()
    for path, module in model.named_modules():
        name = f"{path}.weight" if path else "weight"
        if (isinstance(module, Embedding) and name in f and f.dtype(name) in ("F32", "F16", "BF16")
                and f.nbytes(name) >= TABLE_IN_FILE_BYTES):
            table = f.mapped(name)
            _check_finite_rows(f, name)
            try:
                module.keep_in_file(table, f.dtype(name) == "BF16", dtype)
            except WeightsError as e:
                raise WeightsError(f"{f.path}: {name}: {e}") from None
            names.add(name)
    return names


def _check_finite_rows(f: SafetensorsFile, name: str, chunk_bytes: int = 16 << 20):
    """The NaN/infinity check load_component makes on every weight, for a table that stays in the file: read a chunk
    at a time (positioned reads, not the map, so the table does not become resident)."""
    rows, row_bytes = f.shape(name)[0], max(1, f.nbytes(name) // max(1, f.shape(name)[0]))
    step = max(1, chunk_bytes // row_bytes)
    for a in range(0, rows, step):
        chunk = f.raw(name, a, min(rows, a + step))
        if f.dtype(name) == "BF16":  # exponent bits all ones: infinity or NaN
            ok = not np.any((chunk & 0x7F80) == 0x7F80)
        else:
            ok = bool(np.isfinite(chunk).all())
        if not ok:
            raise WeightsError(f"{f.path}: {name} holds NaN or infinite values: the folder is corrupt or was converted "
                               "from a broken model")


def load_component(folder, dtype=None, shard=None, parts=None, tables_in_file: bool = True):
    """The model its config.json declares, with the folder's weights, in eval mode.

    `tables_in_file`: large token tables are left in the file and read per lookup (see `TABLE_IN_FILE_BYTES`); False
    loads them as parameters (to train or to export the weights).
    `parts`: the names of the top-level submodules to keep (e.g. a VAE's "decoder" and "post_quant_conv"); the others
    are dropped and their weights not read.
    `dtype` casts floating-point weights (None keeps what the folder stores); quantized layers stay quantized.
    `shard(model)`, when given, restructures the built (not yet loaded) model and returns `cut(name, array)`, which
    gives the part of each tensor read from the file that the model keeps: only that part is ever held.
    """
    folder = Path(folder)
    config = read_json(folder / "config.json")
    model = kind_of(config, str(folder)).build(config, folder)
    f = SafetensorsFile(folder / WEIGHTS_FILE)
    quantize_layers(model, _quantized_layers(f))
    dropped = set()
    if parts is not None:
        dropped = {k for k, v in model.items() if isinstance(v, nn.Module) and k not in parts}
        for k in dropped:
            del model[k]
    cut = shard(model) if shard is not None else None
    in_file = _keep_tables_in_file(model, f, dtype) if cut is None and tables_in_file else set()
    weights = []
    for name in f.keys():
        if name in in_file or name.partition(".")[0] in dropped:
            continue
        if cut is None:
            a = f.get(name)
        else:
            a = mx.array(np.ascontiguousarray(cut(name, f.raw(name))))
            a = a.view(mx.bfloat16) if f.dtype(name) == "BF16" else a
        if dtype is not None and mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(dtype)
        weights.append((name, a))
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise WeightsError(f"{folder}: weights do not fit the model built from its config.json ({e})") from None
    floats = [(n, a) for n, a in weights if mx.issubdtype(a.dtype, mx.floating)]
    finite = [mx.all(mx.isfinite(a)) for _, a in floats]  # one pass, made with the load
    mx.eval(model.parameters(), finite)
    bad = [n for (n, _), ok in zip(floats, finite) if not ok.item()]
    if bad:
        more = f" and {len(bad) - 1} more tensors hold" if len(bad) > 1 else " holds"
        raise WeightsError(f"{folder}: {bad[0]}{more} NaN or infinite values: the folder is corrupt or was converted "
                           "from a broken model")
    return model.eval()


def linear_shapes(folder) -> dict[str, tuple[int, int]]:
    """{layer: (out, in)} of a component folder's 2-D weights (Linear layers, quantized ones unpacked), from its file's
    header alone: what a LoRA is checked against before anything is loaded."""
    f = SafetensorsFile(Path(folder) / WEIGHTS_FILE)
    layers = _quantized_layers(f)
    out = {}
    for name in f.keys():
        layer, _, leaf = name.rpartition(".")
        shape = f.shape(name)
        if leaf == "weight" and len(shape) == 2:
            bits = layers[layer][0] if layer in layers else None
            out[layer] = (shape[0], shape[1] * 32 // bits if bits else shape[1])
    return out


def reference_arrays(folder) -> dict[str, np.ndarray]:
    """A converted component folder's weights back in the reference layout, as float32 numpy arrays: quantized layers
    dequantized, conv kernels OIHW. With the folder's config.json this is what diffusers / transformers load
    (`model.load_state_dict({k: torch.from_numpy(v) ...})`); tests and benchmarks run the reference on our weights."""
    f = SafetensorsFile(Path(folder) / WEIGHTS_FILE)
    layers = _quantized_layers(f)
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
