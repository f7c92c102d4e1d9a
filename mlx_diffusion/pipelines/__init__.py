"""Text-to-image pipelines over converted model folders: one skeleton (`base`), FLUX and SD3 where they differ, the
flow-match Euler sampler both use (`sampler`) and the tokenizers (`tokenizers`). `load_pipeline` is the entry."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, WeightsError
from ..io.folder import INFO_FILE, WEIGHTS_FILE, read_info, read_json
from ..io.safetensors import SafetensorsFile
from ..models import kind_of
from .base import Pipeline, Result, Stats
from .flux import FluxPipeline
from .sampler import FlowMatchEulerScheduler, SchedulerConfig
from .sd3 import SD3Pipeline
from .settings import GenerationSettings

FAMILIES = {"flux": FluxPipeline, "sd3": SD3Pipeline}
BUILTIN_MODEL = Path(__file__).parent.parent / "assets" / "models" / "tiny"
BUILTIN_NAME = "built-in"  # what `load_pipeline` takes for the built-in model and what its images record


def read_scheduler_config(folder) -> SchedulerConfig:
    """A model folder's `scheduler/scheduler_config.json`, checked: missing, malformed or asking for what the sampler
    does not implement is a one-line WeightsError (SD3 without its shift would draw wrong images, silently)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    config = read_json(path)
    if config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise WeightsError(f"{path}: unsupported scheduler {config['_class_name']!r} (FlowMatchEulerDiscreteScheduler)")
    try:
        return SchedulerConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def check_model_folder(path) -> tuple[dict, SchedulerConfig]:
    """(info, scheduler config) of a model folder, after every check a generation relies on: the info file, the
    scheduler config, every component's config and weight-file header (one-line WeightsError). Reads no weights."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"model folder {path} " + ("is a file, not a folder" if path.exists() else "does not exist"))
    if not (path / INFO_FILE).is_file():
        hint = " (a diffusers folder: convert it first with `python -m mlx_diffusion convert`)" \
            if (path / "model_index.json").exists() else ""
        raise WeightsError(f"{path} is not an mlx_diffusion model folder: no {INFO_FILE}{hint}")
    family = read_json(path / INFO_FILE).get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise WeightsError(f"{path / INFO_FILE}: unknown model family {family!r}")
    for c in ("transformer", "vae", "scheduler"):
        if not (path / c).is_dir():
            raise WeightsError(f"{path}: component folder {c}/ is missing")
    info = read_info(path)
    scheduler = read_scheduler_config(path)
    for c in info.get("components", {}):  # fail now, not after minutes of work: headers, sizes and configs
        kind_of(read_json(path / c / "config.json"), str(path / c))
        SafetensorsFile(path / c / WEIGHTS_FILE)
    return info, scheduler


def read_loras(path, lora) -> tuple[list, tuple]:
    """(updates, record) of `lora` for the model folder `path`: [(file, scale) or file, ...] read and checked against
    the folder's layers (WeightsError, one line) before anything is loaded; scale 0 adapts nothing."""
    from ..convert import lora as lora_files
    from ..io.folder import linear_shapes

    layers = {c: linear_shapes(path / c) for c in ("transformer", "text_encoder", "text_encoder_2",
                                                    "text_encoder_3") if (path / c / WEIGHTS_FILE).is_file()}
    updates = lora_files.read_all(lora, layers)
    record = tuple((str(file), scale) for file, scale in lora_files.as_list(lora))
    return [(u.component, u.layer, u.down, u.up) for u in updates], record


def load_pipeline(path=None, *, dtype=None, progress=True, use_t5=True, keep_text_encoders=False,
                  max_sequence_length=None, lora=(), shard=False) -> Pipeline:
    """Open a converted model folder; without a path (or "built-in"), the built-in model (it works offline, nothing to
    download).

    dtype: the weights' compute dtype (default float32 on a CPU, as stored on a GPU); progress: a progress bar over
    the denoising steps; use_t5=False: SD3 without T5 (zeros in its place, as diffusers); keep_text_encoders: keep
    them in memory between calls (they are released before denoising otherwise); max_sequence_length: T5's token
    count instead of the model's default; lora: LoRA files [(file, scale), ...] (a bare file: scale 1.0), fused into
    float layers and added beside quantized ones as each component loads (`convert/lora.py` reads their layouts);
    shard: under `mlx.launch`, split the transformer across the ranks (every rank then makes every image).
    Everything a generation will read is checked here: the info file, the scheduler config, every component's config
    and weight-file header, every LoRA key and shape.
    """
    builtin = path is None or path == BUILTIN_NAME or Path(path) == BUILTIN_MODEL
    path = BUILTIN_MODEL if builtin else Path(path)
    info, scheduler = check_model_folder(path)
    updates, record = read_loras(path, lora) if lora else ([], ())
    if shard:
        from .distributed import size

        if size() == 1:
            raise InputError("shard=True splits the transformer across processes started by mlx.launch; this is one")
        if lora:
            raise InputError("shard=True does not take LoRAs yet: bake them in with `convert --lora` first")
    pipe = FAMILIES[info["family"]](path, info, scheduler, dtype=dtype, progress=progress, use_t5=use_t5,
                                    keep_text_encoders=keep_text_encoders, max_sequence_length=max_sequence_length,
                                    name=BUILTIN_NAME if builtin else str(path), lora=updates, lora_files=record)
    pipe.shard = shard
    return pipe


__all__ = ["BUILTIN_MODEL", "BUILTIN_NAME", "FAMILIES", "FlowMatchEulerScheduler", "FluxPipeline", "GenerationSettings",
           "Pipeline", "Result", "SD3Pipeline", "Stats", "check_model_folder", "load_pipeline", "read_loras",
           "read_scheduler_config"]
