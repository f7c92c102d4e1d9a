"""LoRA files -> low-rank updates of a converted model's Linear layers, with the layouts users have as data.

A LoRA stores, per adapted layer, `down` (rank x in) and `up` (out x rank) and optionally `alpha`; the update is
`W += scale * alpha / rank * up @ down` (no alpha: alpha = rank, as diffusers). The layouts, told apart by their keys
(FORMATS below, first match wins):

- diffusers / PEFT: `transformer.<layer>.lora_A.weight` / `lora_B` (and the older `.lora.down` / `.lora.up`), text
  encoders as `text_encoder.<layer>`, `text_encoder_2.` ...; layer names are ours (diffusers' / transformers');
- kohya (sd-scripts): `lora_unet_<layer>.lora_down.weight` / `lora_up` / `.alpha`, text encoders as `lora_te1_` /
  `lora_te2_`; the layer name has its dots as underscores, and for FLUX and SD3 it is the original training code's
  name (`double_blocks_0_img_attn_qkv`), or ours (`lora_transformer_...`);
- BFL (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`) and XLabs
  (`double_blocks.0.processor.qkv_lora1.down.weight`): original names, as diffusers converts them.

Original names go through the converter's tables (`names.original_layers`): a fused layer (q,k,v; FLUX's linear1 with
its MLP) gets the same `down` for each piece and `up` cut by the pieces' widths, as diffusers does. Every key must
land on a layer of the model and every shape must fit it; otherwise a one-line WeightsError names a few keys or the
layer. Only safetensors files are read (no pickle).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import WeightsError
from ..io.safetensors import SafetensorsFile
from . import names

_TEXT = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}
_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# (layout, key regex with groups prefix/layer/role, role names -> down|up|alpha); `layer` is the raw layer name
FORMATS = [
    ("diffusers", r"(?P<prefix>transformer|text_encoder(?:_[23])?|unet)\.(?P<layer>.+)\.lora_(?P<role>A|B)\.weight"),
    ("diffusers", r"(?P<prefix>transformer|text_encoder(?:_[23])?|unet)\.(?P<layer>.+)\.lora\.(?P<role>down|up)\.weight"),
    ("diffusers", r"(?P<prefix>transformer|text_encoder(?:_[23])?|unet)\.(?P<layer>.+)\.(?P<role>alpha)"),
    ("kohya", r"lora_(?P<prefix>unet|transformer|te[123]?)_(?P<layer>.+)\.(?P<role>lora_down|lora_up)\.weight"),
    ("kohya", r"lora_(?P<prefix>unet|transformer|te[123]?)_(?P<layer>.+)\.(?P<role>alpha)"),
    ("bfl", r"(?P<prefix>diffusion_model)\.(?P<layer>.+)\.lora_(?P<role>A|B)\.weight"),
    ("bfl", r"(?P<prefix>diffusion_model)\.(?P<layer>.+)\.(?P<role>alpha)"),
    ("xlabs", r"(?P<prefix>)double_blocks\.(?P<block>\d+)\.processor\.(?P<kind>qkv|proj)_lora(?P<stream>[12])"
              r"\.(?P<role>down|up)\.weight"),
]
ROLES = {"A": "down", "B": "up", "down": "down", "up": "up", "lora_down": "down", "lora_up": "up", "alpha": "alpha"}
# XLabs' processors -> the original layer they adapt (stream 1: image, 2: text)
XLABS = {("qkv", "1"): "double_blocks.{}.img_attn.qkv", ("qkv", "2"): "double_blocks.{}.txt_attn.qkv",
         ("proj", "1"): "double_blocks.{}.img_attn.proj", ("proj", "2"): "double_blocks.{}.txt_attn.proj"}


@dataclass
class Update:
    """`scale * up @ down` for one Linear layer of one component (float32 numpy; up holds alpha / rank)."""

    component: str
    layer: str
    down: np.ndarray  # (rank, in)
    up: np.ndarray  # (out, rank), alpha / rank folded in


def _parse(key: str):
    """(layout, component, raw layer name, role) of a LoRA key, or None."""
    for layout, pattern in FORMATS:
        m = re.fullmatch(pattern, key)
        if not m:
            continue
        g = m.groupdict()
        if layout == "xlabs":
            return layout, "transformer", XLABS[(g["kind"], g["stream"])].format(g["block"]), ROLES[g["role"]]
        prefix = g["prefix"]
        component = "transformer" if prefix in ("unet", "transformer", "diffusion_model") else _TEXT.get(prefix, prefix)
        return layout, component, g["layer"], ROLES[g["role"]]
    return None


def read(path, layers: dict[str, dict[str, tuple[int, int]]]) -> list[Update]:
    """A LoRA file's updates for a model whose Linear layers are `layers` ({component: {layer: (out, in)}});
    WeightsError for a file that is not a LoRA, keys that match no layer, or shapes that do not fit."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: LoRA files are read as .safetensors only (pickle files are never loaded)")
    f = SafetensorsFile(path)
    groups: dict[tuple, dict] = defaultdict(dict)  # (layout, component, raw layer) -> {down, up, alpha: key}
    unknown = []
    for key in f.keys():
        parsed = _parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        layout, component, raw, role = parsed
        groups[(layout, component, raw)][role] = key
    if not groups:
        raise WeightsError(f"{path}: no LoRA weights found (keys like {', '.join(sorted(unknown)[:3])})")
    updates = []
    for (layout, component, raw), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            unknown.append(next(iter(parts.values())))
            continue
        targets = _targets(layout, component, raw, layers.get(component, {}))
        if targets is None:
            unknown.append(parts["down"])
            continue
        down, up = (np.array(f.get(parts[k]).astype(mx.float32)) for k in ("down", "up"))
        if down.ndim == 4:  # kohya stores some as 1x1 convolutions
            down, up = down.reshape(down.shape[:2]), up.reshape(up.shape[:2])
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise WeightsError(f"{path}: {parts['down']} and its up weight do not make a low-rank pair "
                               f"({down.shape} and {up.shape})")
        rank = down.shape[0]
        alpha = float(np.array(f.get(parts["alpha"]).astype(mx.float32)).reshape(-1)[0]) if "alpha" in parts \
            else float(rank)
        up = up * np.float32(alpha / rank)
        updates += _cut(path, component, targets, down, up, layers.get(component, {}))
    if unknown:
        shown = ", ".join(sorted(unknown)[:3])
        raise WeightsError(f"{path}: {len(unknown)} LoRA key(s) match no layer of this model, e.g. {shown}")
    return updates


def _targets(layout, component, raw, model_layers):
    """([our layer, ...] a raw name adapts, whether the last piece takes the remaining rows, whether its halves
    swap), or None when it names no layer."""
    if layout == "diffusers":
        return ([raw], False, False) if raw in model_layers else None
    if layout == "kohya":
        underscored = {name.replace(".", "_"): name for name in model_layers}
        if raw in underscored:
            return [underscored[raw]], False, False
    if component == "transformer":
        return names.original_layers(raw)
    return None


def _cut(path, component, targets, down, up, model_layers) -> list[Update]:
    layers, rest, swap = targets
    widths = []
    for layer in layers:
        if layer not in model_layers:
            raise WeightsError(f"{path}: the LoRA adapts {component}.{layer}, which this model does not have")
        widths.append(model_layers[layer][0])
    if rest:
        widths[-1] = up.shape[0] - sum(widths[:-1])
    if sum(widths) != up.shape[0] or widths[-1] <= 0:
        raise WeightsError(f"{path}: the LoRA for {component}.{layers[0]} has {up.shape[0]} output rows; the layer "
                           f"has {sum(w for w in widths if w > 0)}")
    out_dims, in_dims = model_layers[layers[0]]
    if swap and out_dims == 2 * in_dims:  # a 2-chunk (shift, scale) -> (scale, shift), as the converter swaps it
        half = up.shape[0] // 2
        up = np.concatenate([up[half:], up[:half]])
    out, start = [], 0
    for layer, width in zip(layers, widths):
        if model_layers[layer][1] != down.shape[1]:
            raise WeightsError(f"{path}: the LoRA for {component}.{layer} takes {down.shape[1]} inputs; the layer "
                               f"takes {model_layers[layer][1]}")
        out.append(Update(component, layer, down, up[start:start + width]))
        start += width
    return out


def as_list(lora) -> list[tuple[Path, float]]:
    """[(file, scale)] from a file, a (file, scale) pair or a list of either (a bare file: scale 1.0); WeightsError
    for a scale that is not a finite number."""
    if isinstance(lora, (str, Path)) or (isinstance(lora, tuple) and len(lora) == 2
                                          and isinstance(lora[1], (int, float))):
        lora = [lora]
    out = []
    for item in lora:
        file, scale = (item, 1.0) if isinstance(item, (str, Path)) else item
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise WeightsError(f"LoRA scale must be a finite number, got {scale!r}")
        out.append((Path(file), float(scale)))
    return out


def read_all(lora, layers: dict[str, dict[str, tuple[int, int]]]) -> list[Update]:
    """The updates of every LoRA in `lora` (see `as_list`), each file's scale folded into its `up`; a file at scale
    0 is read and checked, and adapts nothing."""
    updates = []
    for file, scale in as_list(lora):
        found = read(file, layers)
        if scale:
            updates += [Update(u.component, u.layer, u.down, u.up * np.float32(scale)) for u in found]
    return updates


__all__ = ["FORMATS", "Update", "as_list", "read", "read_all"]
