"""Checkpoint conversion: a diffusers folder -> an MLX model folder that `load_pipeline` reads without PyTorch.

Output layout (one subfolder per component, as diffusers):
    OUT/mlx_diffusion.json      what this is: family, variant, converter version, source, per-component bits/dtype
    OUT/model_index.json        carried over
    OUT/<component>/config.json carried over (the reference config our config classes read)
    OUT/<component>/model.safetensors
                                our parameter names, MLX layout; quantized Linear weights as `<layer>.weight`
                                (packed uint32) + `.scales` + `.biases`, listed in the file's metadata
    OUT/tokenizer*/, OUT/scheduler/  carried over

Tensors are streamed one at a time, and the folder is written under a temporary sibling name and renamed at the end,
so an error or Ctrl-C leaves nothing behind. The command line is `tools/convert.py`.

`transformer=FILE` takes the transformer from a single file instead of the folder (everything else still comes from
the folder): a safetensors file in the original naming (BFL FLUX, SAI SD3; mapped by `names`, its config derived
from the shapes) or in diffusers naming, or a GGUF file. The kind is read from the file's first bytes, not its name.
GGUF tensors stored in float stay float; with quantization on, the types that are affine on groups of 32
(Q4_0 ... Q5_K) are repacked losslessly at their own bit width, the others (Q2_K, Q3_K, Q6_K) requantized.

`vae=FILE`, `clip_l=FILE`, `clip_g=FILE` (SD3), `t5=FILE` do the same for the other components, with the folder's
config: BFL's ae.safetensors (LDM names), ComfyUI's clip_l / clip_g / t5xxl files (transformers names), diffusers
names, or SAI's combined file (the same file may be given for several components; each takes its own prefix).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__
from . import names as N
from .components import Kind, class_name, kind_of
from .gguf import GGUFFile
from .weights import (
    QUANT_KEY,
    WEIGHTS_FILE,
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    WeightsError,
    build_model,
    quantize,
    read_json,
    should_quantize,
    to_mlx_layout,
)

MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
COPIED_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FORMAT_VERSION = 1
INFO_FILE = "mlx_diffusion.json"
_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
# `--model NAME`: the diffusers repositories, and the files of them we read (not the root single files, which
# duplicate the transformer and VAE: FLUX.1-schnell's would add 24 GB to the download)
MODELS = {
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
}
_MODEL_FILES = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]


def resolve_model(name: str) -> Path:
    """The local diffusers folder of a known model, through huggingface_hub (its cache, HF_HUB_OFFLINE, tokens)."""
    if name not in MODELS:
        raise WeightsError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(MODELS[name], allow_patterns=_MODEL_FILES))
    except Exception as e:  # offline without a cached copy, gated repository without a token, network errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise WeightsError(f"cannot get {MODELS[name]} ({e.__class__.__name__}: {msg})") from None


def _progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def detect_family(source: Path, index: dict) -> tuple[str, str]:
    """(family, variant) of a diffusers folder: flux schnell/dev from the guidance embedder, sd3."""
    family = _PIPELINES.get(index.get("_class_name"))
    if family is None:
        raise WeightsError(f"{source}: unsupported pipeline {index.get('_class_name')!r} (expected FLUX or SD3)")
    return family, _variant(family, read_json(source / "transformer" / "config.json"))


def _expected_parameters(kind: Kind, config: dict, where) -> dict:
    model = build_model(*kind.classes(), config, where)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_tensors(where, model_name: str, expected: dict, shapes: dict):
    """One-line errors for tensors a checkpoint lacks or has extra (listed), or whose shapes differ from the model's."""
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing or unknown:
        parts = [f"{len(missing)} missing: {', '.join(missing[:5])}" if missing else "",
                 f"{len(unknown)} unknown: {', '.join(unknown[:5])}" if unknown else ""]
        raise WeightsError(f"{where}: tensors do not match {model_name} ({'; '.join(p for p in parts if p)})")
    bad = [n for n in expected if expected[n] != shapes[n]]
    if bad:
        n = bad[0]
        raise WeightsError(f"{where}: {len(bad)} tensor shape mismatches, e.g. {n}: {shapes[n]} vs {expected[n]} from config")


def convert_component(src: Path, dst: Path, *, bits, group_size, dtype, bar=None) -> dict:
    """Convert one model component folder; returns its entry for mlx_diffusion.json."""
    config = read_json(src / "config.json")
    kind = kind_of(config, str(src))
    ckpt = Checkpoint.from_folder(src)
    plan = N.Plan({old: [N.Target(src.name, new)] for new, old in kind.rename(list(ckpt.keys())).items()})
    entry = _write_component(ckpt, plan, config, kind, src, dst, bits=bits, group_size=group_size, dtype=dtype,
                             bar=bar)
    return {**entry, "source_files": [str(f.path) for f in ckpt.files]}


class _Shape:
    """Stands in for an array in `to_mlx_layout` so layouts can be checked from headers alone."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)

    def transpose(self, *axes):
        return _Shape([self.shape[a] for a in axes])


_FLOAT_TYPES = ("F32", "F16", "BF16")


def open_single_file(path):
    """A GGUFFile or SafetensorsFile, chosen by the file's magic bytes; pickles are refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    if head[:4] == b"GGUF":
        return GGUFFile(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / bare pickle stream
        raise WeightsError(f"{path}: pickle checkpoints are refused (they can run code); use safetensors or GGUF")
    return SafetensorsFile(path)


def _variant(family: str, config: dict) -> str:
    if family == "flux":
        return "dev" if config.get("guidance_embeds") else "schnell"
    return "3.5" if config.get("qk_norm") or config.get("dual_attention_layers") else "3"


# The folder component each single-file option fills, per family (`names` component -> diffusers folder)
FILE_COMPONENTS = {
    "flux": {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder", "t5": "text_encoder_2"},
    "sd3": {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
            "t5": "text_encoder_3"},
}
# LDM VAE names (BFL's ae.safetensors, SAI's first_stage_model.*), as opposed to diffusers' down_blocks / up_blocks
_LDM_VAE = re.compile(r"(^|\.)(encoder\.down|decoder\.up)\.\d+\.")


def _plan_file(f, component: str, family: str, kind: Kind, config: dict):
    """(plan, config) for one component of a single file: original names through `names`, diffusers names as they
    are. Tensors a combined file's prefix gives to other components are left out; the target names then go through
    the model's `sanitize`, as a folder's would."""
    shapes = {k: f.shape(k) for k in f.keys()}
    if component == "transformer":
        detected = N.detect(shapes)
        if detected is not None and detected[0] != family:
            raise WeightsError(f"{f.path}: holds a {detected[0]} transformer but the folder is {family}")
        original = detected is not None
    else:
        original = component != "vae" or any(_LDM_VAE.search(n) or N.component_of(n) for n in shapes)
    if original:
        plan = N.to_diffusers(shapes, components=(component,))
        unknown = [n for n in plan.unknown if N.component_of(n) in (None, component)]
        if unknown:
            raise WeightsError(f"{f.path}: {len(unknown)} unknown tensors: {', '.join(unknown[:5])}")
    else:
        plan = N.Plan({old: [N.Target(component, old)] for old in shapes})
    if original and component == "transformer":
        try:
            derived = N.flux_config(shapes) if family == "flux" else N.sd3_config(shapes)
        except KeyError as e:
            raise WeightsError(f"{f.path}: tensors do not match a {family} transformer (missing {e.args[0]})") from None
        config = {**config, **{k: list(v) if isinstance(v, tuple) else v for k, v in derived.items()}}
    mine = {t.name: (old, t) for old, ts in plan.targets.items() for t in ts if t.component == component}
    targets = {}
    for new, name in kind.rename(list(mine)).items():
        old, t = mine[name]
        targets.setdefault(old, []).append(dataclasses.replace(t, name=new))
    if not targets:
        raise WeightsError(f"{f.path}: no {component} tensors in the file")
    return N.Plan(targets), config


def _target_shape(t, shape):
    if t.rows is not None:
        shape = (t.rows[1] - t.rows[0], *shape[1:])
    return tuple(t.shape or shape)


def _cut(t, x):
    """One plan target of an array (rows, halves swap, reshape) in MLX layout."""
    if t.rows is not None:
        x = x[t.rows[0]:t.rows[1]]
    if t.swap:
        half = x.shape[0] // 2
        x = mx.concatenate([x[half:], x[:half]], axis=0)
    if t.shape is not None:
        x = x.reshape(t.shape)
    return to_mlx_layout(t.name, x)


def convert_file(path, src: Path, dst: Path, family: str, component: str = "transformer", *, bits, group_size,
                 dtype, bar=None, log=print) -> dict:
    """Convert one component (a `names` component: transformer, vae, clip_l, clip_g, t5) of a single file
    (safetensors or GGUF) with the folder's `src` config; returns its entry for the info."""
    f = open_single_file(path)
    config = read_json(src / "config.json")
    kind = kind_of(config, str(src))
    plan, config = _plan_file(f, component, family, kind, config)
    entry = _write_component(f, plan, config, kind, path, dst, bits=bits, group_size=group_size, dtype=dtype,
                             bar=bar, log=log)
    return {**entry, "source_files": [str(Path(path).resolve())]}


def _write_component(f, plan, config: dict, kind: Kind, where, dst: Path, *, bits, group_size, dtype, bar=None,
                     log=print) -> dict:
    """Check a plan's tensors against the model built from `config`, then write them one at a time into `dst`.

    `f` is a folder's Checkpoint, a single safetensors file or a GGUFFile. GGUF blocks with an exact MLX affine form
    are repacked at their own bits; everything else is cast to `dtype` and, where the policy says so, quantized.
    Returns the component's entry for mlx_diffusion.json (without its source files).
    """
    is_gguf = isinstance(f, GGUFFile)
    expected = _expected_parameters(kind, config, where)
    shapes = {t.name: tuple(to_mlx_layout(t.name, _Shape(_target_shape(t, f.shape(old)))).shape)
              for old, ts in plan.targets.items() for t in ts}
    check_tensors(where, class_name(config), expected, shapes)

    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    quantized, requantized, types = {}, [], {}
    writer = SafetensorsWriter(dst / WEIGHTS_FILE)

    def add_float(name, a, may_quantize):
        if may_quantize and bits and kind.quantizable and should_quantize(name, a.shape, kind.keep, group_size):
            wq, scales, biases = quantize(a, bits, group_size)
            add_quantized(name, wq, scales.astype(dtype), biases.astype(dtype), bits, group_size)
            return True
        writer.add(name, a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a)
        return False

    def add_quantized(name, wq, scales, biases, b, gs):
        layer = name[: -len(".weight")]
        writer.add(name, wq)
        writer.add(layer + ".scales", scales)
        writer.add(layer + ".biases", biases)
        quantized[layer] = [b, gs]

    try:
        for old, targets in plan.targets.items():
            qtype = f.qtype(old) if is_gguf else None
            if qtype is not None:
                types[qtype] = types.get(qtype, 0) + 1
            packed = None
            if qtype not in (None, *_FLOAT_TYPES) and bits and len(f.shape(old)) == 2:
                packed = f.repack(old)
            if packed is not None:
                # GGUF blocks run along rows, so the plan's row slices and swaps apply to the packed rows as they are;
                # scales stay float32: a K-quant scale has 17 significant bits, and f16 dequantization would round
                wq, scales, biases, b, gs = packed
                arrays = [mx.array(wq), mx.array(scales), mx.array(biases)]
                for t in targets:
                    add_quantized(t.name, *(_cut(t, x) for x in arrays), b, gs)
            else:
                a = mx.array(f.get(old)) if is_gguf else f.get(old)
                for t in targets:
                    # float tensors of a GGUF stay float; its other types are requantized at `bits`
                    if add_float(t.name, _cut(t, a), may_quantize=qtype is None or qtype not in _FLOAT_TYPES):
                        if qtype is not None:
                            requantized.append(f"{t.name} ({qtype})")
            if bar is not None:
                bar.update(f.nbytes(old))
        writer.metadata[QUANT_KEY] = json.dumps(quantized)
        writer.metadata["format"] = "mlx"
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if requantized:
        log(f"requantized {len(requantized)} GGUF tensors at {bits} bits (no lossless MLX form): "
            f"{', '.join(requantized[:5])}{', ...' if len(requantized) > 5 else ''}")
    used_bits = sorted({b for b, _ in quantized.values()})
    used_groups = sorted({g for _, g in quantized.values()})
    return {
        "class": class_name(config),
        "source_format": "gguf" if is_gguf else "safetensors",
        **({"gguf_types": types} if is_gguf else {}),
        "tensors": len(shapes),
        "quantized_layers": len(quantized),
        "requantized_layers": len(requantized),
        "bits": (used_bits[0] if len(used_bits) == 1 else used_bits) if quantized else None,
        "group_size": (used_groups[0] if len(used_groups) == 1 else used_groups) if quantized else None,
        "dtype": str(dtype).split(".")[-1],
    }


def convert(source, out, *, transformer=None, vae=None, clip_l=None, clip_g=None, t5=None, bits: int | None = 4, group_size: int = 64, dtype: str = "bfloat16",
            force=False, progress=True, log=print) -> Path:
    source, out = Path(source), Path(out)
    if bits is not None and bits not in BITS:
        raise WeightsError(f"unsupported bit width {bits} (choose from {', '.join(map(str, BITS))} or none)")
    if group_size not in GROUP_SIZES:
        raise WeightsError(f"unsupported group size {group_size} (choose from {', '.join(map(str, GROUP_SIZES))})")
    if dtype not in DTYPES:
        raise WeightsError(f"unsupported dtype {dtype} (choose from {', '.join(DTYPES)})")
    if source.is_file() and source.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise WeightsError(f"{source}: pickle checkpoints are refused (they can run code); use a safetensors file")
    if not (source / "model_index.json").is_file():
        raise WeightsError(f"{source}: not a diffusers model folder (no model_index.json)")
    if out.exists() and not force:
        raise WeightsError(f"{out} already exists (use --force to replace it)")
    index = read_json(source / "model_index.json")
    family, variant = detect_family(source, index)
    present = [c for c in MODEL_COMPONENTS if index.get(c) and index[c][0] is not None and (source / c).is_dir()]
    if "transformer" not in present or "vae" not in present:
        raise WeightsError(f"{source}: the folder has no transformer/ or vae/ component")
    given = {k: v for k, v in dict(transformer=transformer, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5).items()
             if v is not None}
    files = {}  # folder component -> (names component, single file)
    for part, path in given.items():
        folder = FILE_COMPONENTS[family].get(part)
        if folder is None or folder not in present:
            raise WeightsError(f"{source}: a {family} folder {'has no' if folder else 'takes no'} {part} text encoder"
                               f" to replace with {path}")
        files[folder] = (part, path)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        tmp.mkdir()
        total = sum(f.stat().st_size for c in present if c not in files for f in (source / c).glob("*.safetensors"))
        total += sum(Path(p).stat().st_size for _, p in files.values() if Path(p).is_file())
        info = {
            "format_version": FORMAT_VERSION,
            "converter_version": __version__,
            "family": family,
            "variant": variant,
            "source": str(source.resolve()),
            "bits": bits,
            "group_size": group_size if bits else None,
            "dtype": dtype,
            "components": {},
        }
        with _progress(total, progress, f"converting {source.name}") as bar:
            for c in present:
                if c in files:
                    part, path = files[c]
                    entry = convert_file(path, source / c, tmp / c, family, part, bits=bits, group_size=group_size,
                                         dtype=DTYPES[dtype], bar=bar, log=log)
                    if part == "transformer":
                        info["variant"] = variant = _variant(family, read_json(tmp / c / "config.json"))
                else:
                    entry = convert_component(source / c, tmp / c, bits=bits, group_size=group_size,
                                              dtype=DTYPES[dtype], bar=bar)
                info["components"][c] = entry
        for c in COPIED_COMPONENTS:
            if (source / c).is_dir():
                shutil.copytree(source / c, tmp / c)
        shutil.copy2(source / "model_index.json", tmp / "model_index.json")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
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
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({family} {variant}, {'%d-bit' % bits if bits else dtype}, {size / 1e6:.1f} MB) "
        f"in {time.time() - started:.1f} s")
    return out
