"""Checkpoint conversion: a diffusers folder or single checkpoint files -> an MLX model folder (the format of
`io.folder`) that `load_pipeline` reads without PyTorch.

Tensors are streamed one at a time, and the folder is written under a temporary sibling name and renamed at the end,
so an error or Ctrl-C leaves nothing behind. Every component is planned and checked against its model before the
first tensor is read. The command line is `python -m mlx_diffusion convert` (`cli/convert.py`).

`transformer=FILE` takes the transformer from a single file instead of the folder (everything else still comes from
the folder): a safetensors file in the original naming (BFL FLUX, SAI SD3; mapped by `names`, its config derived
from the shapes) or in diffusers naming, or a GGUF file. The kind is read from the file's first bytes, not its name.
GGUF tensors stored in float stay float; with quantization on, the types that are affine on groups of 32
(Q4_0 ... Q5_K) are repacked losslessly at their own bit width, the others (Q2_K, Q3_K, Q6_K) requantized.

`vae=FILE`, `clip_l=FILE`, `clip_g=FILE` (SD3), `t5=FILE` do the same for the other components, with the folder's
config: BFL's ae.safetensors (LDM names), ComfyUI's clip_l / clip_g / t5xxl files (transformers names), diffusers
names, or SAI's combined file (the same file may be given for several components; each takes its own prefix).

Without a folder (`source` a single file, or None with `transformer=FILE`), the family comes from the transformer's
original tensor names, the components a combined file holds (SAI's `sd3_medium_incl_clips_t5xxlfp16.safetensors`)
are taken from it unless given separately, every config is derived from the tensor shapes (`configs`), and
the tokenizers, scheduler config and model_index.json are the released repositories', shipped in `assets/`.

Every output folder gets the released model's generation defaults in its info file (`io.folder.released_defaults`)
and a scheduler config (the source folder's, or the released one where it has none).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import WeightsError
from ..io.folder import ComponentWriter, atomic_folder, read_json, released_defaults, to_mlx_layout, write_info
from ..io.gguf import GGUFFile
from ..io.safetensors import Checkpoint, SafetensorsFile
from ..models import KINDS, Kind, class_name, kind_of
from ..models.clip import CLIPTextConfig
from . import configs
from . import names as N
from .quantize import Policy

MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
COPIED_COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
# `--model NAME`: the diffusers repositories, and the files of them we read (not the root single files, which
# duplicate the transformer and VAE: FLUX.1-schnell's would add 24 GB to the download)
MODELS = {
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
}
_MODEL_FILES = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ASSETS = Path(__file__).parent.parent / "assets"
# What a folder made from single files gets from ASSETS: output path -> asset files or folders, copied in order
_TOKENIZERS = {
    "flux": {"tokenizer": ["tokenizers/clip"], "tokenizer_2": ["tokenizers/t5"]},
    "sd3": {"tokenizer": ["tokenizers/clip"], "tokenizer_2": ["tokenizers/clip", "tokenizers/clip_g"],
            "tokenizer_3": ["tokenizers/t5"]},
}
_SCHEDULERS = {("flux", "schnell"): "flux-schnell", ("flux", "dev"): "flux-dev"}  # SD3 and SD3.5: "sd3"


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


def released_index(family: str, with_t5: bool = True) -> dict:
    """The released diffusers repository's model_index.json, without T5 where the model has none (SD3)."""
    index = read_json(ASSETS / "pipelines" / f"{family}.json")
    if not with_t5:
        index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    return index


def _expected_parameters(kind: Kind, config: dict, where) -> dict:
    return {k: tuple(v.shape) for k, v in tree_flatten(kind.build(config, where).parameters())}


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


@dataclasses.dataclass
class _Job:
    """One output component: where its tensors come from and how they map onto the model built from `config`."""

    f: object  # a folder's Checkpoint, a SafetensorsFile or a GGUFFile
    plan: N.Plan
    config: dict
    kind: Kind
    where: str
    sources: list
    extra: dict = dataclasses.field(default_factory=dict)  # tensors no file holds: name -> MLX array

    def nbytes(self) -> int:
        return sum(self.f.nbytes(old) for old in self.plan.targets)

    def check(self):
        """Names and shapes against the model built from the config, from headers alone."""
        expected = _expected_parameters(self.kind, self.config, self.where)
        shapes = {t.name: tuple(to_mlx_layout(t.name, _Shape(t.out_shape(self.f.shape(old)))).shape)
                  for old, ts in self.plan.targets.items() for t in ts}
        shapes |= {k: tuple(to_mlx_layout(k, v).shape) for k, v in self.extra.items()}
        check_tensors(self.where, class_name(self.config), expected, shapes)


def _folder_job(src: Path) -> _Job:
    """A diffusers component folder: an identity plan over its checkpoint, through the model's `sanitize`."""
    config = read_json(src / "config.json")
    kind = kind_of(config, str(src))
    ckpt = Checkpoint.from_folder(src)
    plan = N.Plan({old: [N.Target(src.name, new)] for new, old in kind.rename(list(ckpt.keys())).items()})
    return _Job(ckpt, plan, config, kind, str(src), [str(f.path) for f in ckpt.files])


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
            head = f.read(9)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    if head[:4] == b"GGUF":
        return GGUFFile(path)
    # safetensors: a little-endian header length (whose first byte may be anything, 0x80 too), then the JSON header
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return SafetensorsFile(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / bare pickle stream
        raise WeightsError(f"{path}: pickle checkpoints are refused (they can run code); use safetensors or GGUF")
    return SafetensorsFile(path)


def _variant(family: str, config: dict) -> str:
    """The variant, from the transformer's config: FLUX dev has the guidance embedder, SD3.5 q/k norms or
    dual-attention blocks."""
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


# The model class of a single-file component (the transformer's by family) when no folder config names it; whether
# CLIP has a projection is decided from the family and the file
_FILE_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                 "clip_l": "CLIPTextModel", "clip_g": "CLIPTextModel", "t5": "T5EncoderModel"}


def _file_job(f, component: str, family: str, config: dict | None, log=print) -> _Job:
    """One component (a `names` component: transformer, vae, clip_l, clip_g, t5) of a single file (safetensors or
    GGUF); `config` is the folder's, or None to derive it from the shapes."""
    if config is None:
        kind = KINDS[_FILE_CLASSES[family if component == "transformer" else component]]
    else:
        kind = kind_of(config, str(f.path))
    plan, config, extra = _plan_file(f, component, family, kind, config, log)
    return _Job(f, plan, config, kind, str(f.path), [str(Path(f.path).resolve())], extra)


def _plan_file(f, component: str, family: str, kind: Kind, config: dict | None, log=print):
    """(plan, config, extra tensors) for one component of a single file: original names through `names`, diffusers
    names as they are. Tensors a combined file's prefix gives to other components are left out; the target names
    then go through the model's `sanitize`, as a folder's would. `config` None: derived from the shapes."""
    shapes = {k: f.shape(k) for k in f.keys()}
    if component == "transformer":
        detected = N.detect(shapes)
        if detected is not None and detected != family:
            raise WeightsError(f"{f.path}: holds a {detected} transformer but the folder is {family}")
        original = detected is not None
        if not original and config is None:
            raise WeightsError(f"{f.path}: no FLUX or SD3 transformer in the original (BFL / SAI) naming; a file in "
                               f"diffusers naming needs its diffusers folder as SOURCE for the configs")
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
            derived = configs.flux_config(shapes) if family == "flux" else configs.sd3_config(shapes)
        except KeyError as e:
            raise WeightsError(f"{f.path}: tensors do not match a {family} transformer (missing {e.args[0]})") from None
        config = {**(config or {"_class_name": kind.name}),
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in derived.items()}}
    mine = {t.name: (old, t) for old, ts in plan.targets.items() for t in ts if t.component == component}
    targets = {}
    for new, name in kind.rename(list(mine)).items():
        old, t = mine[name]
        targets.setdefault(old, []).append(dataclasses.replace(t, name=new))
    if not targets:
        raise WeightsError(f"{f.path}: no {component} tensors in the file")
    extra = {}
    if kind.config is CLIPTextConfig:
        targets, extra = _clip_projection(f, component, family, kind, config, targets, log)
    if config is None:
        named = {t.name: t.out_shape(shapes[old]) for old, ts in targets.items() for t in ts}
        named |= {k: v.shape for k, v in extra.items()}
        try:
            if component == "vae":
                config = configs.vae_config(named, family)
            else:
                config = configs.t5_config(named) if component == "t5" else configs.clip_config(named, component)
        except KeyError as e:
            raise WeightsError(f"{f.path}: tensors do not match a {component} (missing {e.args[0]})") from None
    return N.Plan(targets), config, extra


def _clip_projection(f, component, family, kind, config, targets, log):
    """CLIP's text projection where files and models disagree: FLUX pools CLIP-L without one (some files carry
    OpenAI's: dropped); SD3 projects both pooled outputs, but SAI's CLIP-L files carry none and SAI's code and
    diffusers' single-file loader use the identity for it."""
    name = "text_projection.weight"
    projection = family == "sd3" if config is None else kind.config.from_dict(config).with_projection
    has = any(t.name == name for ts in targets.values() for t in ts)
    if not projection:
        return {old: kept for old, ts in targets.items() if (kept := [t for t in ts if t.name != name])}, {}
    if has:
        return targets, {}
    if component != "clip_l":
        raise WeightsError(f"{f.path}: the {component} text encoder has no {name}, which SD3 needs")
    width = next((f.shape(old)[0] for old, ts in targets.items() for t in ts
                  if t.name == "text_model.final_layer_norm.weight"), None)
    if width is None:
        return targets, {}  # the check reports the missing tensors
    log(f"{f.path}: no CLIP-L {name}; using the identity, as SAI's SD3 code and diffusers do")
    return targets, {name: mx.eye(width)}


def _linear_shapes(job: _Job) -> dict[str, tuple[int, int]]:
    """{layer: (out, in)} of a job's 2-D weights, from its plan and the source shapes: what a LoRA is checked against."""
    out = {}
    for old, targets in job.plan.targets.items():
        for t in targets:
            shape = t.out_shape(job.f.shape(old))
            if t.name.endswith(".weight") and len(shape) == 2:
                out[t.name.removesuffix(".weight")] = tuple(shape)
    return out


def _lora_deltas(jobs: dict, lora, log) -> dict[str, dict[str, np.ndarray]]:
    """{component: {weight name: float32 delta}} of LoRA files (`lora.as_list`) to bake into the written weights."""
    from .lora import read_all

    deltas: dict[str, dict] = {}
    updates = read_all(lora, {c: _linear_shapes(job) for c, job in jobs.items()})
    for u in updates:
        target = deltas.setdefault(u.component, {})
        name = f"{u.layer}.weight"
        target[name] = target[name] + u.up @ u.down if name in target else u.up @ u.down
    log(f"baking {len(lora)} LoRA file(s) into {len({(u.component, u.layer) for u in updates})} layers")
    return deltas


def _write_component(job: _Job, dst: Path, *, bits, group_size, dtype, bar=None, log=print, deltas=None) -> dict:
    """Write a checked job's tensors one at a time into `dst`.

    GGUF blocks with an exact MLX affine form are repacked at their own bits; everything else is cast to `dtype` and,
    where the policy says so, quantized. `deltas` ({weight name: float32 array}, a baked LoRA) are added first (a GGUF
    tensor they touch is dequantized and quantized again). Returns the component's entry for mlx_diffusion.json.
    """
    deltas = deltas or {}
    f, plan, config = job.f, job.plan, job.config
    is_gguf = isinstance(f, GGUFFile)
    requantized, types = [], {}
    policy = Policy.for_class(job.kind.name, bits, group_size)
    out = ComponentWriter(dst, config, dtype)

    try:
        for old, targets in plan.targets.items():
            qtype = f.qtype(old) if is_gguf else None
            if qtype is not None:
                types[qtype] = types.get(qtype, 0) + 1
            packed = None
            if qtype not in (None, *_FLOAT_TYPES) and bits and len(f.shape(old)) == 2 \
                    and not any(t.name in deltas for t in targets):
                packed = f.repack(old)
            if packed is not None:
                # GGUF blocks run along rows, so the plan's row slices and swaps apply to the packed rows as they are;
                # scales stay float32: a K-quant scale has 17 significant bits, and f16 dequantization would round
                wq, scales, biases, b, gs = packed
                arrays = [mx.array(wq), mx.array(scales), mx.array(biases)]
                for t in targets:
                    out.add_quantized(t.name, *(t.cut(x) for x in arrays), b, gs)
            else:
                a = mx.array(f.get(old)) if is_gguf else f.get(old)
                for t in targets:
                    piece = t.cut(a)
                    if t.name in deltas:
                        piece = (piece.astype(mx.float32) + mx.array(deltas[t.name])).astype(piece.dtype)
                    # float tensors of a GGUF stay float; its other types are requantized at `bits`
                    if policy.write(out, t.name, to_mlx_layout(t.name, piece),
                                    may_quantize=qtype is None or qtype not in _FLOAT_TYPES):
                        if qtype is not None:
                            requantized.append(f"{t.name} ({qtype})")
            if bar is not None:
                bar.update(f.nbytes(old))
        for name, a in job.extra.items():
            policy.write(out, name, to_mlx_layout(name, a))
        out.close()
    except BaseException:
        out.abort()
        raise
    quantized = out.quantized
    if requantized:
        log(f"requantized {len(requantized)} GGUF tensors at {bits} bits (no lossless MLX form): "
            f"{', '.join(requantized[:5])}{', ...' if len(requantized) > 5 else ''}")
    used_bits = sorted({b for b, _ in quantized.values()})
    used_groups = sorted({g for _, g in quantized.values()})
    return {
        "class": class_name(config),
        "source_format": "gguf" if is_gguf else "safetensors",
        **({"gguf_types": types} if is_gguf else {}),
        "tensors": sum(map(len, plan.targets.values())) + len(job.extra),
        "quantized_layers": len(quantized),
        "requantized_layers": len(requantized),
        "bits": (used_bits[0] if len(used_bits) == 1 else used_bits) if quantized else None,
        "group_size": (used_groups[0] if len(used_groups) == 1 else used_groups) if quantized else None,
        "dtype": str(dtype).split(".")[-1],
        "source_files": job.sources,
    }


def convert(source, out, *, transformer=None, vae=None, clip_l=None, clip_g=None, t5=None, bits: int | None = 4,
            group_size: int = 64, dtype: str = "bfloat16", force=False, progress=True, log=print, lora=()) -> Path:
    """Convert `source` into the MLX model folder `out` (see the module docstring).

    `source`: a diffusers folder, a single checkpoint file (its transformer, and whatever else a combined file
    holds), or None with `transformer=FILE`. `transformer`, `vae`, `clip_l`, `clip_g`, `t5`: single files that
    replace (with a folder) or supply (without one) those components. `lora`: LoRA files [(file, scale), ...] baked
    into the weights before they are quantized (recorded in the info file).
    """
    out = Path(out)
    if bits is not None and bits not in BITS:
        raise WeightsError(f"unsupported bit width {bits} (choose from {', '.join(map(str, BITS))} or none)")
    if group_size not in GROUP_SIZES:
        raise WeightsError(f"unsupported group size {group_size} (choose from {', '.join(map(str, GROUP_SIZES))})")
    if dtype not in DTYPES:
        raise WeightsError(f"unsupported dtype {dtype} (choose from {', '.join(DTYPES)})")
    given = {k: Path(v) for k, v in dict(transformer=transformer, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5).items()
             if v is not None}
    if source is not None:
        source = Path(source)
        if source.is_file() and source.suffix in _PICKLE_SUFFIXES:
            raise WeightsError(f"{source}: pickle checkpoints are refused (they can run code); use a safetensors file")
        if source.is_file():
            if "transformer" in given:
                raise WeightsError(f"{source}: give the transformer either as SOURCE or as a transformer file, "
                                   f"not both")
            given, source = {"transformer": source, **given}, None
        elif not (source / "model_index.json").is_file():
            why = "no model_index.json" if source.is_dir() else "no such file or folder"
            raise WeightsError(f"{source}: not a diffusers model folder or a checkpoint file ({why})")
    elif "transformer" not in given:
        raise WeightsError("nothing to convert: give a diffusers folder or a checkpoint file as SOURCE")
    if out.exists() and not force:
        raise WeightsError(f"{out} already exists (use --force to replace it)")

    if source is not None:
        family, jobs, copies = _from_folder(source, given, log)
    else:
        family, jobs, copies = _from_files(given, log)
    variant = _variant(family, jobs["transformer"].config)
    if "scheduler" not in copies:
        released = _SCHEDULERS.get((family, variant), "sd3")
        copies["scheduler/scheduler_config.json"] = ASSETS / "schedulers" / f"{released}.json"
        if source is not None:
            log(f"{source}: no scheduler/ folder; using the released {family} {variant} scheduler config")
    for job in jobs.values():
        job.check()  # every component, before anything is written
    _check_fit(family, jobs)
    if lora:
        from .lora import as_list

        lora = as_list(lora)
    deltas = _lora_deltas(jobs, lora, log) if lora else {}

    origin = source or given["transformer"]
    started = time.time()
    with atomic_folder(out) as tmp:
        components = {}
        total = sum(job.nbytes() for job in jobs.values())
        with _progress(total, progress, f"converting {origin.name}") as bar:
            for c, job in jobs.items():
                components[c] = _write_component(job, tmp / c, bits=bits, group_size=group_size,
                                                 dtype=DTYPES[dtype], bar=bar, log=log, deltas=deltas.get(c))
        for dst, src in copies.items():
            _copy(src, tmp / dst)
        defaults = released_defaults(family, variant, jobs["transformer"].config, jobs["vae"].config)
        write_info(tmp, family=family, variant=variant, source=str(origin.resolve()), bits=bits,
                   group_size=group_size, dtype=dtype, defaults=defaults, components=components,
                   **({"lora": [[str(Path(f).resolve()), float(s)] for f, s in lora]} if lora else {}))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({family} {variant}, {'%d-bit' % bits if bits else dtype}, {size / 1e6:.1f} MB) "
        f"in {time.time() - started:.1f} s")
    return out


def _open(opened: dict, path: Path):
    """A single file opened once however many components it gives (SAI's combined files)."""
    key = Path(path).resolve()
    if key not in opened:
        opened[key] = open_single_file(path)
    return opened[key]


def _from_folder(source: Path, given: dict, log):
    """(family, jobs, copies) for a diffusers folder whose components `given` files may replace."""
    index = read_json(source / "model_index.json")
    family = _PIPELINES.get(index.get("_class_name"))
    if family is None:
        raise WeightsError(f"{source}: unsupported pipeline {index.get('_class_name')!r} (expected FLUX or SD3)")
    present = [c for c in MODEL_COMPONENTS if index.get(c) and index[c][0] is not None and (source / c).is_dir()]
    if "transformer" not in present or "vae" not in present:
        raise WeightsError(f"{source}: the folder has no transformer/ or vae/ component")
    files = {}  # folder component -> (names component, single file)
    for part, path in given.items():
        folder = FILE_COMPONENTS[family].get(part)
        if folder is None or folder not in present:
            raise WeightsError(f"{source}: a {family} folder {'has no' if folder else 'takes no'} {part} text encoder"
                               f" to replace with {path}")
        files[folder] = (part, path)
    opened, jobs = {}, {}
    for c in present:
        if c in files:
            part, path = files[c]
            jobs[c] = _file_job(_open(opened, path), part, family, read_json(source / c / "config.json"), log)
        else:
            jobs[c] = _folder_job(source / c)
    copies = {c: source / c for c in COPIED_COMPONENTS if (source / c).is_dir()}
    copies["model_index.json"] = source / "model_index.json"
    return family, jobs, copies


_PART_NAMES = {"vae": "VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}


def _from_files(given: dict, log):
    """(family, jobs, copies) for single files only: the transformer's file decides the family and gives
    the parts it holds (SAI's combined files) unless given separately; configs are derived, the rest is ASSETS."""
    opened = {}
    main = _open(opened, given["transformer"])
    family = N.detect(main.keys())
    if family is None:
        raise WeightsError(f"{main.path}: no FLUX or SD3 transformer in the original (BFL / SAI) naming; a file in "
                           f"diffusers naming needs its diffusers folder as SOURCE for the configs")
    parts = FILE_COMPONENTS[family]
    for part, path in given.items():
        if part not in parts:
            raise WeightsError(f"{path}: a {family} model takes no {_PART_NAMES[part]} text encoder")
    held = {N.component_of(n) for n in main.keys()}
    files = {p: given.get(p, main.path if p in held else None) for p in parts}
    missing = [p for p, path in files.items() if path is None and (p != "t5" or family == "flux")]
    if missing:
        what = ", ".join(_PART_NAMES[p] for p in missing)
        flags = " ".join("--" + p.replace("_", "-") + " FILE" for p in missing)
        if family == "sd3" and files["t5"] is None:
            flags += " (and --t5 FILE for T5)"
        raise WeightsError(f"{main.path}: holds no {what}, which {'FLUX.1' if family == 'flux' else 'SD3'} needs: "
                           f"give {flags}, or a diffusers folder as SOURCE")
    if files["t5"] is None:
        log("no T5 text encoder given: the model will run without it, as SD3 can (add one with --t5 FILE)")
    jobs = {parts[p]: _file_job(_open(opened, path), p, family, None, log) for p, path in files.items() if path}
    copies = {folder: [ASSETS / a for a in assets] for folder, assets in _TOKENIZERS[family].items()
              if folder != "tokenizer_3" or "text_encoder_3" in jobs}
    copies["model_index.json"] = released_index(family, with_t5=family == "flux" or "text_encoder_3" in jobs)
    return family, jobs, copies


def _check_fit(family: str, jobs: dict):
    """The widths the components exchange agree (configs derived from separate files need not)."""
    cfg = {c: job.kind.config.from_dict(job.config) for c, job in jobs.items()}
    t = cfg["transformer"]
    if family == "flux":
        checks = [("vae", "latent channels x 4", cfg["vae"].latent_channels * 4, "in_channels", t.in_channels),
                  ("text_encoder", "CLIP-L width", cfg["text_encoder"].hidden_size, "pooled_projection_dim",
                   t.pooled_projection_dim),
                  ("text_encoder_2", "T5 width", cfg["text_encoder_2"].d_model, "joint_attention_dim",
                   t.joint_attention_dim)]
    else:
        checks = [("vae", "latent channels", cfg["vae"].latent_channels, "in_channels", t.in_channels),
                  ("text_encoder_2", "CLIP-L + CLIP-G projection width",
                   cfg["text_encoder"].projection_dim + cfg["text_encoder_2"].projection_dim,
                   "pooled_projection_dim", t.pooled_projection_dim)]
        if "text_encoder_3" in cfg:
            checks.append(("text_encoder_3", "T5 width", cfg["text_encoder_3"].d_model, "joint_attention_dim",
                           t.joint_attention_dim))
    for c, what, value, key, expected in checks:
        if value != expected:
            raise WeightsError(f"{jobs[c].where}: {what} {value} does not fit the transformer's {key} {expected}")


def _copy(src, dst: Path):
    """Into the output: a file, a folder, folders merged in order (a list), or a dict written as JSON."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, dict):
        dst.write_text(json.dumps(src, indent=2))
        return
    for s in src if isinstance(src, list) else [src]:
        if s.is_dir():
            shutil.copytree(s, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(s, dst)
