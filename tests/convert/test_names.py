"""Original single-file names -> diffusers names (mlx_diffusion/names.py) on tiny random diffusers models.

Each test builds a tiny diffusers transformer, writes its state_dict in the ORIGINAL (BFL / SAI) naming with this
file's own inverse mapping, checks that diffusers' own converter reads that back to the model's state_dict (so the
inverse is right), and then that our plan does the same: names, shapes and values, including the split fused q/k/v
(and FLUX's q/k/v/mlp) and the swapped final-layer (shift, scale) halves. At the released sizes (meta tensors), the
configs derived from shapes alone (transformers, VAE, CLIP-L/G, T5-XXL) equal the released ones.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from helpers import init_weights_
from helpers import cut_plan
from mlx_diffusion.convert import configs, names

import diffusers.loaders.single_file_utils as sfu
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel


def _swap(x):
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a])


def _flux(guidance: bool):
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                               num_attention_heads=3, joint_attention_dim=20, pooled_projection_dim=10,
                               guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    return init_weights_(m).state_dict()


def flux_to_original(sd):
    """diffusers FLUX state_dict -> BFL names: the test's own inverse of diffusers' converter."""
    o, cat = {}, lambda *ks: torch.cat([sd[k] for k in ks])
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    for bfl, d in emb.items():
        for i, layer in ((1, "in_layer"), (2, "out_layer")):
            for p in ("weight", "bias"):
                key = f"time_text_embed.{d}.linear_{i}.{p}"
                if key in sd:
                    o[f"{bfl}.{layer}.{p}"] = sd[key]
    for p in ("weight", "bias"):
        o[f"txt_in.{p}"] = sd[f"context_embedder.{p}"]
        o[f"img_in.{p}"] = sd[f"x_embedder.{p}"]
        o[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        o[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    nd = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    ns = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(nd):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            o[b + f"img_mod.lin.{p}"] = sd[t + f"norm1.linear.{p}"]
            o[b + f"txt_mod.lin.{p}"] = sd[t + f"norm1_context.linear.{p}"]
            o[b + f"img_attn.qkv.{p}"] = cat(*(t + f"attn.to_{x}.{p}" for x in "qkv"))
            o[b + f"txt_attn.qkv.{p}"] = cat(*(t + f"attn.add_{x}_proj.{p}" for x in "qkv"))
            o[b + f"img_attn.proj.{p}"] = sd[t + f"attn.to_out.0.{p}"]
            o[b + f"txt_attn.proj.{p}"] = sd[t + f"attn.to_add_out.{p}"]
            o[b + f"img_mlp.0.{p}"] = sd[t + f"ff.net.0.proj.{p}"]
            o[b + f"img_mlp.2.{p}"] = sd[t + f"ff.net.2.{p}"]
            o[b + f"txt_mlp.0.{p}"] = sd[t + f"ff_context.net.0.proj.{p}"]
            o[b + f"txt_mlp.2.{p}"] = sd[t + f"ff_context.net.2.{p}"]
        o[b + "img_attn.norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        o[b + "img_attn.norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
        o[b + "txt_attn.norm.query_norm.scale"] = sd[t + "attn.norm_added_q.weight"]
        o[b + "txt_attn.norm.key_norm.scale"] = sd[t + "attn.norm_added_k.weight"]
    for i in range(ns):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for p in ("weight", "bias"):
            o[b + f"modulation.lin.{p}"] = sd[t + f"norm.linear.{p}"]
            o[b + f"linear1.{p}"] = cat(*(t + f"attn.to_{x}.{p}" for x in "qkv"), t + f"proj_mlp.{p}")
            o[b + f"linear2.{p}"] = sd[t + f"proj_out.{p}"]
        o[b + "norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        o[b + "norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
    return o


def _diffusers_flux_converter(hidden: int):
    """diffusers' converter with its hard-coded inner_dim 3072 replaced by the tiny model's width."""
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _check_plan(original, expected, prefix="", component="transformer"):
    orig = {prefix + k: v.numpy() for k, v in original.items()}
    plan = names.to_diffusers(_shapes(orig))
    assert plan.unknown == [] and plan.names(component) == set(expected)
    got = cut_plan(plan, orig, component)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    return plan


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_transformer(guidance):
    sd = _flux(guidance)
    original = flux_to_original(sd)
    # The oracle inverse is diffusers' converter run backwards.
    hidden = sd["x_embedder.weight"].shape[0]
    back = _diffusers_flux_converter(hidden)(dict(original))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    plan = _check_plan(original, sd)
    # The fused pieces and the swap were really exercised (values differ, so a wrong slice cannot pass).
    assert [t.rows for t in plan.targets["single_blocks.0.linear1.weight"]] == [(0, 24), (24, 48), (48, 72), (72, 168)]
    assert all(t.swap for t in plan.targets["final_layer.adaLN_modulation.1.bias"])
    assert not any(t.swap for ts in plan.targets.values() for t in ts if "norm_out" not in t.name)
    assert names.detect(_shapes(original)) == "flux"


def test_flux_prefix_unknown_and_config():
    sd = _flux(False)
    original = flux_to_original(sd)
    _check_plan(original, sd, prefix="model.diffusion_model.")
    shapes = {"model.diffusion_model." + k: s for k, s in _shapes(original).items()}
    shapes["model.diffusion_model.something_new.weight"] = (3, 3)
    shapes["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = (8,)
    plan = names.to_diffusers(shapes)
    assert sorted(plan.unknown) == sorted(["model.diffusion_model.something_new.weight",
                                           "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"])
    assert names.detect(shapes) == "flux"
    cfg = configs.flux_config(shapes)
    model_cfg = FluxTransformer2DModel(**{**cfg, "axes_dims_rope": (2, 2, 4)}).config
    for k, v in cfg.items():
        assert model_cfg[k] == v, k
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"]) == (2, 3, 3)


def _sd3(**kw):
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8, **kw)
    return init_weights_(m).state_dict()


def sd3_to_original(sd):
    """diffusers SD3 state_dict -> SAI names (without the `model.diffusion_model.` prefix)."""
    o, cat = {}, lambda *ks: torch.cat([sd[k] for k in ks])
    o["pos_embed"] = sd["pos_embed.pos_embed"]
    for p in ("weight", "bias"):
        o[f"x_embedder.proj.{p}"] = sd[f"pos_embed.proj.{p}"]
        o[f"context_embedder.{p}"] = sd[f"context_embedder.{p}"]
        for e, d in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            o[f"{e}.mlp.0.{p}"] = sd[f"time_text_embed.{d}.linear_1.{p}"]
            o[f"{e}.mlp.2.{p}"] = sd[f"time_text_embed.{d}.linear_2.{p}"]
        o[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        o[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    n = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n):
        b, t, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == n - 1
        x, c = b + "x_block.", b + "context_block."
        for p in ("weight", "bias"):
            o[x + f"attn.qkv.{p}"] = cat(*(t + f"attn.to_{q}.{p}" for q in "qkv"))
            o[c + f"attn.qkv.{p}"] = cat(*(t + f"attn.add_{q}_proj.{p}" for q in "qkv"))
            o[x + f"attn.proj.{p}"] = sd[t + f"attn.to_out.0.{p}"]
            o[x + f"adaLN_modulation.1.{p}"] = sd[t + f"norm1.linear.{p}"]
            ctx_mod = sd[t + f"norm1_context.linear.{p}"]
            o[c + f"adaLN_modulation.1.{p}"] = _swap(ctx_mod) if last else ctx_mod
            o[x + f"mlp.fc1.{p}"] = sd[t + f"ff.net.0.proj.{p}"]
            o[x + f"mlp.fc2.{p}"] = sd[t + f"ff.net.2.{p}"]
            if not last:
                o[c + f"attn.proj.{p}"] = sd[t + f"attn.to_add_out.{p}"]
                o[c + f"mlp.fc1.{p}"] = sd[t + f"ff_context.net.0.proj.{p}"]
                o[c + f"mlp.fc2.{p}"] = sd[t + f"ff_context.net.2.{p}"]
            if t + f"attn2.to_q.{p}" in sd:
                o[x + f"attn2.qkv.{p}"] = cat(*(t + f"attn2.to_{q}.{p}" for q in "qkv"))
                o[x + f"attn2.proj.{p}"] = sd[t + f"attn2.to_out.0.{p}"]
        for src, dst in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                         ("context_block.attn.ln_q", "attn.norm_added_q"),
                         ("context_block.attn.ln_k", "attn.norm_added_k"),
                         ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if t + dst + ".weight" in sd:
                o[b + src + ".weight"] = sd[t + dst + ".weight"]
    return o


@pytest.mark.parametrize("kind,kw", [("3", {}), ("3.5-large", {"qk_norm": "rms_norm"}),
                                     ("3.5-medium", {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)})])
def test_sd3_transformer(kind, kw):
    sd = _sd3(**kw)
    original = sd3_to_original(sd)
    prefixed = {"model.diffusion_model." + k: v for k, v in original.items()}
    back = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(prefixed))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    plan = _check_plan(original, sd, prefix="model.diffusion_model.")
    swapped = {t.name for ts in plan.targets.values() for t in ts if t.swap}
    assert swapped == {f"{m}.linear.{p}" for m in ("norm_out", "transformer_blocks.2.norm1_context")
                       for p in ("weight", "bias")}
    assert names.detect(list(prefixed)) == "sd3"
    # SD3 medium's head width is in no shape (SAI fixes 64); the 3.5 q/k norms carry it.
    cfg = configs.sd3_config(_shapes(prefixed), **({"attention_head_dim": 8} if kind == "3" else {}))
    model_cfg = SD3Transformer2DModel(**cfg).config
    for k, v in cfg.items():
        assert model_cfg[k] == v, k
    assert _sd3(**kw).keys() == SD3Transformer2DModel(**cfg).state_dict().keys()
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["patch_size"], cfg["pos_embed_max_size"]) == (3, 2, 2, 8)


def _vae(quant: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    m = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32),
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      layers_per_block=1, norm_num_groups=4, use_quant_conv=quant, use_post_quant_conv=quant)
    return m, init_weights_(m, 0.5).state_dict()


def vae_to_original(sd):
    """diffusers AutoencoderKL state_dict -> LDM names (BFL ae.safetensors): the test's own inverse."""
    import re

    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    o = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        o[k] = v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
    return o


@pytest.mark.parametrize("quant", [False, True])
def test_vae(quant):
    model, sd = _vae(quant)
    original = vae_to_original(sd)
    assert "decoder.up.0.block.1.conv2.weight" in original and original["encoder.mid.attn_1.q.weight"].ndim == 4
    # diffusers' converter agrees with the inverse (it leaves the 1x1 attention convs 4-D; its loader squeezes them).
    back = sfu.convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in original.items()}, model.config)
    assert set(back) == set(sd) and all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)

    _check_plan(original, sd, component="vae")  # bare names, as in BFL's ae.safetensors
    plan = _check_plan(original, sd, prefix="first_stage_model.", component="vae")
    assert {t.component for ts in plan.targets.values() for t in ts} == {"vae"}
    # The up-block reversal was exercised: the decoder's stages have different widths.
    assert plan.targets["first_stage_model.decoder.up.0.block.0.conv1.weight"][0].name == \
        "decoder.up_blocks.2.resnets.0.conv1.weight"


def test_combined_sd3_file_with_mlx_arrays():
    """A SAI-style single file: transformer, VAE and text encoders in one namespace, tensors as MLX arrays."""
    import mlx.core as mx

    sd, (_, vae_sd) = _sd3(), _vae(False)
    original = {"model.diffusion_model." + k: v for k, v in sd3_to_original(sd).items()}
    original |= {"first_stage_model." + k: v for k, v in vae_to_original(vae_sd).items()}
    clip = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
    original[clip] = torch.ones(8)
    plan = names.to_diffusers(_shapes(original))
    assert plan.unknown == [clip]
    assert names.detect(_shapes(original)) == "sd3"
    tensors = {k: mx.array(v.numpy()) for k, v in original.items()}
    for component, expected in (("transformer", sd), ("vae", vae_sd)):
        got = cut_plan(plan, tensors, component)
        assert set(got) == set(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(np.array(got[k]), v.numpy(), err_msg=k)


def test_misfit_fused_tensor_is_unknown():
    """A fused tensor whose rows do not split into the layer's width is reported, not cut arbitrarily."""
    shapes = {"single_blocks.0.linear1.weight": (3 * 16 + 64, 16), "single_blocks.0.linear1.bias": (112,),
              "double_blocks.0.img_attn.qkv.weight": (50, 16), "double_blocks.0.img_attn.qkv.bias": (50,)}
    plan = names.to_diffusers(shapes)
    assert sorted(plan.unknown) == ["double_blocks.0.img_attn.qkv.bias", "double_blocks.0.img_attn.qkv.weight"]
    assert [t.rows for t in plan.targets["single_blocks.0.linear1.bias"]] == [(0, 16), (16, 32), (32, 48), (48, 112)]


def _meta_state_dict(cls, **config):
    with torch.device("meta"):
        return cls(**config).state_dict()


@pytest.mark.parametrize("guidance", [False, True])
def test_full_size_flux_header(guidance):
    """FLUX.1 at its real size (hidden 3072, 19 + 38 blocks, MLP 12288), names and shapes only (meta tensors)."""
    sd = _meta_state_dict(FluxTransformer2DModel, guidance_embeds=guidance)
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in flux_to_original(sd).items()}
    plan = names.to_diffusers(shapes)
    assert plan.unknown == [] and plan.names("transformer") == set(sd)
    got = {t.name: (t.rows[1] - t.rows[0],) + shapes[k][1:] if t.rows else shapes[k]
           for k, ts in plan.targets.items() for t in ts}
    assert got == {k: tuple(v.shape) for k, v in sd.items()}
    assert [t.rows for t in plan.targets["model.diffusion_model.single_blocks.37.linear1.weight"]] == \
        [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]
    assert names.detect(shapes) == "flux"
    cfg = configs.flux_config(shapes)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"], cfg["in_channels"]) == \
        (19, 38, 24, 64)


def test_full_size_sd3_medium_header():
    sd = _meta_state_dict(SD3Transformer2DModel, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                          pooled_projection_dim=2048, joint_attention_dim=4096, pos_embed_max_size=192,
                          out_channels=16)
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in sd3_to_original(sd).items()}
    plan = names.to_diffusers(shapes)
    assert plan.unknown == [] and plan.names("transformer") == set(sd)
    cfg = configs.sd3_config(shapes)
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["pos_embed_max_size"], cfg["qk_norm"]) == \
        (24, 24, 192, None)
    assert names.detect(shapes) == "sd3"


# The released components' configs (the FLUX.1 / SD3 diffusers repositories' config.json), as far as they matter.
REAL_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
REAL_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
REAL_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
                   dense_act_fn="gelu_new", is_gated_act=True, relative_attention_max_distance=128,
                   relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, vocab_size=32128)
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.mark.parametrize("which,real,projection", [("clip_l", REAL_CLIP_L, False), ("clip_l", REAL_CLIP_L, True),
                                                   ("clip_g", REAL_CLIP_G, True)])
def test_full_size_clip_config(which, real, projection):
    """CLIP-L (FLUX: no projection; SD3: with) and CLIP-G from their shapes: what our config class reads matches."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from mlx_diffusion.models.clip import CLIPTextConfig as Ours

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    cfg = CLIPTextConfig(**real)
    with torch.device("meta"):
        sd = cls(cfg).state_dict()
    # transformers 5 saves a plain CLIPTextModel without `text_model.`; the model's sanitize puts it back
    shapes = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: tuple(v.shape)
              for k, v in sd.items()}
    derived = configs.clip_config(shapes, which)
    assert derived["architectures"] == [cls.__name__]
    assert Ours.from_dict(derived) == Ours.from_dict({**cfg.to_dict(), "architectures": [cls.__name__]})
    assert {k: derived[k] for k in real} == real


def test_full_size_t5_and_vae_configs():
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel
    from mlx_diffusion.models.t5 import T5Config as OursT5
    from mlx_diffusion.models.vae import VAEConfig

    cfg = T5Config(**REAL_T5_XXL)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(cfg).state_dict().items()}
    derived = configs.t5_config(shapes)
    assert OursT5.from_dict(derived) == OursT5.from_dict(cfg.to_dict())
    assert {k: derived[k] for k in REAL_T5_XXL} == REAL_T5_XXL

    for family, (scaling, shift) in (("flux", (0.3611, 0.1159)), ("sd3", (1.5305, 0.0609))):
        real = dict(REAL_VAE, scaling_factor=scaling, shift_factor=shift)
        original = {k: tuple(v.shape) for k, v in vae_to_original(_meta_state_dict(AutoencoderKL, **real)).items()}
        plan = names.to_diffusers(original, components=("vae",))  # from BFL's / SAI's LDM names, as the converter
        shapes = {t.name: t.shape or original[k] for k, ts in plan.targets.items() for t in ts}
        derived = configs.vae_config(shapes, family)
        assert VAEConfig.from_dict(derived) == VAEConfig.from_dict(real)
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in derived.items() if k in real} == real
