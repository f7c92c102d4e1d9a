"""Original single-file checkpoint names -> diffusers parameter names, as data.

BFL's FLUX files (`flux1-schnell.safetensors`, GGUF conversions of it) and SAI's SD3 files use the names of the
original training code; our models use diffusers' names. The mapping follows diffusers' own converters
(`loaders/single_file_utils.py`: convert_flux_transformer_checkpoint_to_diffusers,
convert_sd3_transformer_checkpoint_to_diffusers) but is written as tables so it can be read and checked at a glance:

- RENAMES: (regex, replacement) applied to the whole name, first match wins;
- FUSED: tensors that hold several diffusers tensors stacked along dim 0 (q,k,v and FLUX's q,k,v,mlp). The split
  widths come from the tensor shapes: every piece but an optional trailing `rest` is as wide as the layer's input
  (the hidden size), which is the last dim of the fused `.weight`; diffusers hard-codes 3072 here instead;
- SWAPS: final-layer modulations that the original code splits as (shift, scale) and diffusers as (scale, shift).
  Only 2-chunk modulations swap (out = 2 x in); the 6-chunk block modulations agree in both codebases, which is what
  makes SD3's last text block (a 2-chunk AdaLayerNormContinuous) swap and the others not;
- the LDM VAE (BFL's ae.safetensors, SAI's first_stage_model.*, after diffusers' convert_ldm_vae_checkpoint) adds
  REVERSED_INDEX (decoder stages count the other way) and TO_LINEAR (1x1 attention convs are linears in diffusers).

`to_diffusers(name -> shape)` turns this into a plan: each original name -> [Target(component, name, rows, swap,
shape)] plus the names nothing matched (e.g. the text encoders of SAI's combined files unless asked for). It needs
only names and shapes (in torch order), so it can be planned from a safetensors/GGUF header before any tensor is
read; `Target.cut` then cuts each tensor as it is read. `detect` reads the model family from the same header, and
`configs` the diffusers configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

# Prefixes of combined single files -> the component their tensors belong to. Bare names are tried as transformer
# names, then as VAE names (BFL's ae.safetensors). The text encoders (`clip_l`, `clip_g`, `t5`) are mapped only when
# asked for (`to_diffusers(..., components=)`): their bare names cannot tell CLIP-L from CLIP-G, and which diffusers
# folder they go to depends on the pipeline (SD3's T5 is text_encoder_3, FLUX's text_encoder_2).
PREFIXES = {
    "model.diffusion_model.": "transformer",
    "first_stage_model.": "vae",
    "text_encoders.clip_l.": "clip_l",
    "text_encoders.clip_g.": "clip_g",
    "text_encoders.t5xxl.": "t5",
}
DEFAULT_COMPONENTS = ("transformer", "vae")

_N = r"(\d+)"
_WB = r"(weight|bias)"

_FLUX = [
    (rf"time_in\.in_layer\.{_WB}", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (rf"time_in\.out_layer\.{_WB}", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (rf"vector_in\.in_layer\.{_WB}", r"time_text_embed.text_embedder.linear_1.\1"),
    (rf"vector_in\.out_layer\.{_WB}", r"time_text_embed.text_embedder.linear_2.\1"),
    (rf"guidance_in\.in_layer\.{_WB}", r"time_text_embed.guidance_embedder.linear_1.\1"),
    (rf"guidance_in\.out_layer\.{_WB}", r"time_text_embed.guidance_embedder.linear_2.\1"),
    (rf"txt_in\.{_WB}", r"context_embedder.\1"),
    (rf"img_in\.{_WB}", r"x_embedder.\1"),
    (rf"double_blocks\.{_N}\.img_mod\.lin\.{_WB}", r"transformer_blocks.\1.norm1.linear.\2"),
    (rf"double_blocks\.{_N}\.txt_mod\.lin\.{_WB}", r"transformer_blocks.\1.norm1_context.linear.\2"),
    (rf"double_blocks\.{_N}\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (rf"double_blocks\.{_N}\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (rf"double_blocks\.{_N}\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (rf"double_blocks\.{_N}\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (rf"double_blocks\.{_N}\.img_attn\.proj\.{_WB}", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (rf"double_blocks\.{_N}\.txt_attn\.proj\.{_WB}", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (rf"double_blocks\.{_N}\.img_mlp\.0\.{_WB}", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (rf"double_blocks\.{_N}\.img_mlp\.2\.{_WB}", r"transformer_blocks.\1.ff.net.2.\2"),
    (rf"double_blocks\.{_N}\.txt_mlp\.0\.{_WB}", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (rf"double_blocks\.{_N}\.txt_mlp\.2\.{_WB}", r"transformer_blocks.\1.ff_context.net.2.\2"),
    (rf"single_blocks\.{_N}\.modulation\.lin\.{_WB}", r"single_transformer_blocks.\1.norm.linear.\2"),
    (rf"single_blocks\.{_N}\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (rf"single_blocks\.{_N}\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (rf"single_blocks\.{_N}\.linear2\.{_WB}", r"single_transformer_blocks.\1.proj_out.\2"),
    (rf"final_layer\.linear\.{_WB}", r"proj_out.\1"),
    (rf"final_layer\.adaLN_modulation\.1\.{_WB}", r"norm_out.linear.\1"),
]

_SD3 = [
    (r"pos_embed", r"pos_embed.pos_embed"),
    (rf"x_embedder\.proj\.{_WB}", r"pos_embed.proj.\1"),
    (rf"t_embedder\.mlp\.0\.{_WB}", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (rf"t_embedder\.mlp\.2\.{_WB}", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (rf"y_embedder\.mlp\.0\.{_WB}", r"time_text_embed.text_embedder.linear_1.\1"),
    (rf"y_embedder\.mlp\.2\.{_WB}", r"time_text_embed.text_embedder.linear_2.\1"),
    (rf"context_embedder\.{_WB}", r"context_embedder.\1"),
    (rf"joint_blocks\.{_N}\.x_block\.attn\.ln_q\.weight", r"transformer_blocks.\1.attn.norm_q.weight"),
    (rf"joint_blocks\.{_N}\.x_block\.attn\.ln_k\.weight", r"transformer_blocks.\1.attn.norm_k.weight"),
    (rf"joint_blocks\.{_N}\.context_block\.attn\.ln_q\.weight", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (rf"joint_blocks\.{_N}\.context_block\.attn\.ln_k\.weight", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (rf"joint_blocks\.{_N}\.x_block\.attn\.proj\.{_WB}", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (rf"joint_blocks\.{_N}\.context_block\.attn\.proj\.{_WB}", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (rf"joint_blocks\.{_N}\.x_block\.attn2\.ln_q\.weight", r"transformer_blocks.\1.attn2.norm_q.weight"),
    (rf"joint_blocks\.{_N}\.x_block\.attn2\.ln_k\.weight", r"transformer_blocks.\1.attn2.norm_k.weight"),
    (rf"joint_blocks\.{_N}\.x_block\.attn2\.proj\.{_WB}", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (rf"joint_blocks\.{_N}\.x_block\.adaLN_modulation\.1\.{_WB}", r"transformer_blocks.\1.norm1.linear.\2"),
    (rf"joint_blocks\.{_N}\.context_block\.adaLN_modulation\.1\.{_WB}",
     r"transformer_blocks.\1.norm1_context.linear.\2"),
    (rf"joint_blocks\.{_N}\.x_block\.mlp\.fc1\.{_WB}", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (rf"joint_blocks\.{_N}\.x_block\.mlp\.fc2\.{_WB}", r"transformer_blocks.\1.ff.net.2.\2"),
    (rf"joint_blocks\.{_N}\.context_block\.mlp\.fc1\.{_WB}", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (rf"joint_blocks\.{_N}\.context_block\.mlp\.fc2\.{_WB}", r"transformer_blocks.\1.ff_context.net.2.\2"),
    (rf"final_layer\.linear\.{_WB}", r"proj_out.\1"),
    (rf"final_layer\.adaLN_modulation\.1\.{_WB}", r"norm_out.linear.\1"),
]

# (regex, one replacement per piece, whether the last piece takes the remaining rows).
FUSED = {
    "transformer": [
        (rf"double_blocks\.{_N}\.img_attn\.qkv\.{_WB}",
         [rf"transformer_blocks.\1.attn.to_{p}.\2" for p in "qkv"], False),
        (rf"double_blocks\.{_N}\.txt_attn\.qkv\.{_WB}",
         [rf"transformer_blocks.\1.attn.add_{p}_proj.\2" for p in "qkv"], False),
        (rf"single_blocks\.{_N}\.linear1\.{_WB}",
         [rf"single_transformer_blocks.\1.attn.to_{p}.\2" for p in "qkv"]
         + [r"single_transformer_blocks.\1.proj_mlp.\2"], True),
        (rf"joint_blocks\.{_N}\.x_block\.attn\.qkv\.{_WB}",
         [rf"transformer_blocks.\1.attn.to_{p}.\2" for p in "qkv"], False),
        (rf"joint_blocks\.{_N}\.context_block\.attn\.qkv\.{_WB}",
         [rf"transformer_blocks.\1.attn.add_{p}_proj.\2" for p in "qkv"], False),
        (rf"joint_blocks\.{_N}\.x_block\.attn2\.qkv\.{_WB}",
         [rf"transformer_blocks.\1.attn2.to_{p}.\2" for p in "qkv"], False),
    ],
}

# Original names whose (shift, scale) halves swap, when they are 2-chunk modulations (see the module docstring).
SWAPS = {"transformer": [r"final_layer\.adaLN_modulation\.1\.(weight|bias)",
                         r"joint_blocks\.\d+\.context_block\.adaLN_modulation\.1\.(weight|bias)"]}


# LDM autoencoder (BFL's ae.safetensors, SAI's first_stage_model.*), after diffusers' convert_ldm_vae_checkpoint.
_RES = r"(norm1|conv1|norm2|conv2)"
_VAE = [
    (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_WB}", r"\1.\2.\3"),
    (rf"(encoder|decoder)\.norm_out\.{_WB}", r"\1.conv_norm_out.\2"),
    (rf"(quant_conv|post_quant_conv)\.{_WB}", r"\1.\2"),
    (rf"encoder\.down\.{_N}\.block\.{_N}\.{_RES}\.{_WB}", r"encoder.down_blocks.\1.resnets.\2.\3.\4"),
    (rf"encoder\.down\.{_N}\.block\.{_N}\.nin_shortcut\.{_WB}", r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3"),
    (rf"encoder\.down\.{_N}\.downsample\.conv\.{_WB}", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
    (rf"decoder\.up\.{_N}\.block\.{_N}\.{_RES}\.{_WB}", r"decoder.up_blocks.\1.resnets.\2.\3.\4"),
    (rf"decoder\.up\.{_N}\.block\.{_N}\.nin_shortcut\.{_WB}", r"decoder.up_blocks.\1.resnets.\2.conv_shortcut.\3"),
    (rf"decoder\.up\.{_N}\.upsample\.conv\.{_WB}", r"decoder.up_blocks.\1.upsamplers.0.conv.\2"),
    (rf"(encoder|decoder)\.mid\.block_1\.{_RES}\.{_WB}", r"\1.mid_block.resnets.0.\2.\3"),
    (rf"(encoder|decoder)\.mid\.block_2\.{_RES}\.{_WB}", r"\1.mid_block.resnets.1.\2.\3"),
    (rf"(encoder|decoder)\.mid\.attn_1\.norm\.{_WB}", r"\1.mid_block.attentions.0.group_norm.\2"),
    (rf"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.{_WB}", r"\1.mid_block.attentions.0.to_\2.\3"),
    (rf"(encoder|decoder)\.mid\.attn_1\.proj_out\.{_WB}", r"\1.mid_block.attentions.0.to_out.0.\2"),
]

# Text encoders in single files (ComfyUI's clip_l / clip_g / t5xxl files, SAI's text_encoders.*) use transformers'
# names, sometimes under `transformer.`; the model modules' `sanitize` then restores a missing `text_model.` prefix
# and unties T5's embeddings. OpenCLIP-named CLIP-G files (`transformer.resblocks.N.*`) are not mapped.
_TEXT = [(r"(?:transformer\.)?(.+)", r"\1")]

RENAMES = {"transformer": _FLUX + _SD3, "vae": _VAE, "clip_l": _TEXT, "clip_g": _TEXT, "t5": _TEXT}

# Tensors of single files that no model parameter stands for: CLIP's logit scale (a contrastive-training leftover)
# and position-id buffers.
DROPS = {c: [r"(?:transformer\.)?logit_scale", r".*position_ids"] for c in ("clip_l", "clip_g")}

# Block indices that count the other way in diffusers: the LDM decoder's `up.0` is its last (highest-resolution)
# stage, diffusers' `up_blocks.0` its first. Rewritten to n - 1 - i (n counted from the names) before renaming.
REVERSED_INDEX = {"vae": [r"(?<=^decoder\.up\.)(\d+)(?=\.)"]}

# Original 1x1 convolutions that are linear layers in diffusers: their (O, I, 1, 1) weights become (O, I).
TO_LINEAR = {"vae": [r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight"]}


@dataclass(frozen=True)
class Target:
    component: str  # "transformer", "vae"
    name: str  # diffusers parameter name
    rows: tuple[int, int] | None = None  # slice [start, stop) along dim 0; None: the whole tensor
    swap: bool = False  # exchange the two halves (of the slice) along dim 0
    shape: tuple[int, ...] | None = None  # reshape to this (1x1 conv -> linear); None: unchanged

    def out_shape(self, shape) -> tuple:
        """The target's shape, from the original tensor's."""
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        return tuple(self.shape or shape)

    def cut(self, x):
        """The target's tensor from the original one (an MLX array in torch order): rows, halves swapped, reshape."""
        if self.rows is not None:
            x = x[self.rows[0]:self.rows[1]]
        if self.swap:
            half = x.shape[0] // 2
            x = mx.concatenate([x[half:], x[:half]], axis=0)
        if self.shape is not None:
            x = x.reshape(self.shape)
        return x


@dataclass
class Plan:
    targets: dict[str, list[Target]] = field(default_factory=dict)  # original name -> targets
    unknown: list[str] = field(default_factory=list)

    def names(self, component: str) -> set[str]:
        """The diffusers names the plan produces for one component (to compare with a model's parameters)."""
        return {t.name for ts in self.targets.values() for t in ts if t.component == component}


def _strip(name):
    """(component or None, name without the combined-file prefix)."""
    for prefix, comp in PREFIXES.items():
        if name.startswith(prefix):
            return comp, name[len(prefix):]
    return None, name


def _weight_shape(full_name, shapes):
    """Shape of the `.weight` next to a `.weight`/`.bias`: biases carry no input width of their own."""
    return shapes.get(re.sub(r"\.bias$", ".weight", full_name))


def _reverse_indices(component, names):
    """{original name: stripped name with REVERSED_INDEX indices counted from the other end} for one component."""
    out = dict(names)
    for pattern in REVERSED_INDEX.get(component, []):
        count = max(indices(names.values(), pattern), default=-1) + 1
        for n, cur in out.items():
            out[n] = re.sub(pattern, lambda m: str(count - 1 - int(m.group(1))), cur, count=1)
    return out


def _map_one(component, name, full_name, shapes):
    """Targets of one tensor (`name`: prefix-free, indices already reversed), or None if no table matches it."""
    shape = shapes[full_name]
    for pattern, pieces, rest in FUSED.get(component, []):
        m = re.fullmatch(pattern, name)
        if not m:
            continue
        w = _weight_shape(full_name, shapes)
        if w is None or len(w) != 2:
            return None
        hidden, total = w[-1], shape[0]
        widths = [hidden] * (len(pieces) - 1)
        widths.append(total - sum(widths) if rest else hidden)
        if sum(widths) != total or widths[-1] <= 0:
            return None
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return [Target(component, m.expand(p), (s, s + w_)) for p, s, w_ in zip(pieces, starts, widths)]
    for pattern, repl in RENAMES.get(component, []):
        m = re.fullmatch(pattern, name)
        if not m:
            continue
        swap = False
        if any(re.fullmatch(p, name) for p in SWAPS.get(component, [])):
            w = _weight_shape(full_name, shapes)
            swap = w is not None and len(w) == 2 and w[0] == 2 * w[1]
        to_shape = None
        if shape[2:] == (1, 1) and any(re.fullmatch(p, name) for p in TO_LINEAR.get(component, [])):
            to_shape = shape[:2]
        return [Target(component, m.expand(repl), None, swap, to_shape)]
    return None


def component_of(name: str) -> str | None:
    """The component a combined file's prefix assigns `name` to, or None for a bare name."""
    return _strip(name)[0]


def to_diffusers(name_to_shape: dict[str, tuple[int, ...]], components=DEFAULT_COMPONENTS) -> Plan:
    """Plan the renaming of an original-named checkpoint; names nothing matches end up in `plan.unknown`.

    Shapes are in torch order (GGUF readers must reverse ggml's). Prefixed names (PREFIXES) go to their component if
    it is one of `components`; bare names are tried as each of `components` in turn (transformer, then VAE).
    """
    shapes = {k: tuple(v) for k, v in name_to_shape.items()}
    stripped = {k: _strip(k) for k in shapes}
    renamed = {}  # component -> {original name: name to match}
    for comp in components:
        renamed[comp] = _reverse_indices(comp, {k: n for k, (c, n) in stripped.items() if c in (comp, None)})
    plan = Plan()
    for full_name, (component, _) in stripped.items():
        if component is not None and component not in components:
            plan.unknown.append(full_name)
            continue
        tried = [component] if component else list(components)
        if any(re.fullmatch(p, renamed[c][full_name]) for c in tried for p in DROPS.get(c, [])):
            continue
        for comp in tried:
            targets = _map_one(comp, renamed[comp][full_name], full_name, shapes)
            if targets:
                plan.targets[full_name] = targets
                break
        else:
            plan.unknown.append(full_name)
    return plan


def original_layers(name: str):
    """An original-named transformer layer (`double_blocks.0.img_attn.qkv`, or kohya's
    `double_blocks_0_img_attn_qkv`) -> ([the diffusers layers it holds, stacked by rows], whether the last takes the
    remaining rows, whether its (shift, scale) halves swap), or None. The same tables as the weights, with each
    `.` of a pattern also matching kohya's `_`."""
    full = name + ".weight"
    loose = lambda pattern: pattern.replace(r"\.", r"[._]")  # noqa: E731
    swap = any(re.fullmatch(loose(p), full) for p in SWAPS["transformer"])
    for pattern, pieces, rest in FUSED["transformer"]:
        m = re.fullmatch(loose(pattern), full)
        if m:
            return [m.expand(p).removesuffix(".weight") for p in pieces], rest, swap
    for pattern, replacement in RENAMES["transformer"]:
        m = re.fullmatch(loose(pattern), full)
        if m:
            return [m.expand(replacement).removesuffix(".weight")], False, swap
    return None


def indices(names, pattern):
    """Sorted distinct integers captured by `pattern` (group 1) in `names`: block indices."""
    return sorted({int(m.group(1)) for n in names if (m := re.search(pattern, n))})


def detect(names) -> str | None:
    """"flux" or "sd3" from a checkpoint's tensor names (original naming), or None: double blocks make FLUX, joint
    blocks SD3 (stable-diffusion.cpp style). The variant (schnell/dev, 3/3.5) is read from the derived config."""
    names = list(names)
    if any(re.search(r"(^|\.)double_blocks\.\d+\.", n) for n in names):
        return "flux"
    if any(re.search(r"(^|\.)joint_blocks\.\d+\.", n) for n in names):
        return "sd3"
    return None



