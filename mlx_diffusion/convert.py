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
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import __version__
from .components import Kind, class_name, kind_of
from .weights import (
    QUANT_KEY,
    WEIGHTS_FILE,
    Checkpoint,
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


def _progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def detect_family(source: Path, index: dict) -> tuple[str, str]:
    """(family, variant) of a diffusers folder: flux schnell/dev from the guidance embedder, sd3."""
    family = _PIPELINES.get(index.get("_class_name"))
    if family is None:
        raise WeightsError(f"{source}: unsupported pipeline {index.get('_class_name')!r} (expected FLUX or SD3)")
    if family == "flux":
        cfg = read_json(source / "transformer" / "config.json")
        return family, "dev" if cfg.get("guidance_embeds") else "schnell"
    cfg = read_json(source / "transformer" / "config.json")
    return family, "3.5" if cfg.get("qk_norm") or cfg.get("dual_attention_layers") else "3"


def _expected_parameters(kind: Kind, config: dict, where) -> dict:
    model = build_model(*kind.classes(), config, where)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def convert_component(src: Path, dst: Path, *, bits, group_size, dtype, bar=None) -> dict:
    """Convert one model component folder; returns its entry for mlx_diffusion.json."""
    config = read_json(src / "config.json")
    kind = kind_of(config, str(src))
    ckpt = Checkpoint.from_folder(src)
    names = kind.rename(list(ckpt.keys()))
    expected = _expected_parameters(kind, config, src)
    shapes = {new: tuple(to_mlx_layout(new, _Shape(ckpt.shape(old))).shape) for new, old in names.items()}
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing or unknown:
        parts = [f"{len(missing)} missing: {', '.join(missing[:5])}" if missing else "",
                 f"{len(unknown)} unknown: {', '.join(unknown[:5])}" if unknown else ""]
        raise WeightsError(f"{src}: tensors do not match {class_name(config)} ({'; '.join(p for p in parts if p)})")
    bad = [n for n in expected if expected[n] != shapes[n]]
    if bad:
        n = bad[0]
        raise WeightsError(f"{src}: {len(bad)} tensor shape mismatches, e.g. {n}: {shapes[n]} vs {expected[n]} from config")

    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    quantized = {}
    writer = SafetensorsWriter(dst / WEIGHTS_FILE)
    try:
        for new, old in names.items():
            a = to_mlx_layout(new, ckpt.get(old))
            if bits and kind.quantizable and should_quantize(new, a.shape, kind.keep, group_size):
                wq, scales, biases = quantize(a, bits, group_size)
                layer = new[: -len(".weight")]
                writer.add(new, wq)
                writer.add(layer + ".scales", scales.astype(dtype))
                writer.add(layer + ".biases", biases.astype(dtype))
                quantized[layer] = [bits, group_size]
            else:
                writer.add(new, a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a)
            if bar is not None:
                bar.update(ckpt.file(old).nbytes(old))
        writer.metadata[QUANT_KEY] = json.dumps(quantized)
        writer.metadata["format"] = "mlx"
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {
        "class": class_name(config),
        "source_files": [str(f.path) for f in ckpt.files],
        "tensors": len(names),
        "quantized_layers": len(quantized),
        "bits": bits if quantized else None,
        "group_size": group_size if quantized else None,
        "dtype": str(dtype).split(".")[-1],
    }


class _Shape:
    """Stands in for an array in `to_mlx_layout` so layouts can be checked from headers alone."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)

    def transpose(self, *axes):
        return _Shape([self.shape[a] for a in axes])


def convert(source, out, *, bits: int | None = 4, group_size: int = 64, dtype: str = "bfloat16", force=False,
            progress=True, log=print) -> Path:
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

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        tmp.mkdir()
        total = sum(f.stat().st_size for c in present for f in (source / c).glob("*.safetensors"))
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
                info["components"][c] = convert_component(
                    source / c, tmp / c, bits=bits, group_size=group_size, dtype=DTYPES[dtype], bar=bar
                )
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
