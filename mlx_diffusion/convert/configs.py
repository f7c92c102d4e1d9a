"""Diffusers / transformers configs derived from a checkpoint's tensor shapes, for single files that come without one.

Sizes (depths, widths, heads, channels) are read from the shapes, never assumed; what no shape holds (norm groups, the
VAE's latent scaling, CLIP's activation, T5's maximum distance) is the released models' value. stable-diffusion.cpp
reads architectures from shapes the same way.
"""

from __future__ import annotations

import math
import re

from .names import indices


def flux_config(name_to_shape) -> dict:
    """diffusers FluxTransformer2DModel config keys derived from an original-named checkpoint's shapes."""
    s = {re.sub(r"^model\.diffusion_model\.", "", k): tuple(v) for k, v in name_to_shape.items()}
    hidden = s["img_in.weight"][0]
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return {
        "in_channels": s["img_in.weight"][1],
        "out_channels": s["final_layer.linear.weight"][0],
        "num_layers": len(indices(s, r"^double_blocks\.(\d+)\.")),
        "num_single_layers": len(indices(s, r"^single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
    }


def sd3_config(name_to_shape, attention_head_dim: int = 64) -> dict:
    """diffusers SD3Transformer2DModel config keys derived from an original-named checkpoint's shapes.

    Without q/k norms (SD3 medium) the head width is in no shape: `attention_head_dim`, 64 in all of SAI's MMDiTs.
    `sample_size` (the position-table base size) is not in the shapes either and keeps diffusers' default.
    """
    s = {re.sub(r"^model\.diffusion_model\.", "", k): tuple(v) for k, v in name_to_shape.items()}
    hidden, in_channels, patch, _ = s["x_embedder.proj.weight"]
    head_dim = s.get("joint_blocks.0.x_block.attn.ln_q.weight", (attention_head_dim,))[0]
    return {
        "num_layers": len(indices(s, r"^joint_blocks\.(\d+)\.")),
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": s["context_embedder.weight"][1],
        "caption_projection_dim": hidden,
        "pooled_projection_dim": s["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": math.isqrt(s["pos_embed"][1]),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in s else None,
        "dual_attention_layers": tuple(indices(s, r"^joint_blocks\.(\d+)\.x_block\.attn2\.")),
    }


# The released VAEs' latent scaling and shift (vae/config.json of the FLUX.1 and SD3 diffusers repositories).
VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


def vae_config(shapes, family: str) -> dict:
    """diffusers AutoencoderKL config from its parameter shapes in diffusers naming (after `to_diffusers`).

    Norm groups (32), sample size and the latent scaling are in no shape: FLUX.1's and SD3's released values.
    """
    s = {k: tuple(v) for k, v in shapes.items()}
    n = len(indices(s, r"^encoder\.down_blocks\.(\d+)\."))
    scaling, shift = VAE_FACTORS[family]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [s[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(n)],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["decoder.conv_in.weight"][1],
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": len(indices(s, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in s),
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
    }


def clip_config(shapes, which: str) -> dict:
    """transformers CLIPTextModel(WithProjection) config from its parameter shapes in transformers naming.

    `which` is "clip_l" (OpenAI ViT-L/14: quick_gelu) or "clip_g" (OpenCLIP bigG: exact gelu), the one thing the
    shapes cannot tell. Heads are 64 wide in both (12 and 20 heads). Token ids are the released configs' (the legacy
    eos_token_id 2, with which transformers pools at the highest token id: CLIP's end-of-text token).
    """
    s = {k: tuple(v) for k, v in shapes.items()}
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    projection = "text_projection.weight" in s
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_act": {"clip_l": "quick_gelu", "clip_g": "gelu"}[which],
        "hidden_size": hidden,
        "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(indices(s, r"^text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": hidden // 64,
        "projection_dim": s["text_projection.weight"][0] if projection else hidden,
        "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        "vocab_size": vocab,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def t5_config(shapes) -> dict:
    """transformers T5EncoderModel config from its parameter shapes in transformers naming (T5 v1.1 when gated).

    The relative-attention table is (buckets, heads); its maximum distance (128), the norm epsilon and the
    activation are the released T5-XXL's.
    """
    s = {k: tuple(v) for k, v in shapes.items()}
    vocab, d_model = s["shared.weight"]
    b = "encoder.block.0.layer."
    buckets, heads = s[b + "0.SelfAttention.relative_attention_bias.weight"]
    gated = b + "1.DenseReluDense.wi_0.weight" in s
    layers = len(indices(s, r"^encoder\.block\.(\d+)\."))
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": d_model,
        "d_kv": s[b + "0.SelfAttention.q.weight"][0] // heads,
        "d_ff": s[b + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight")][0],
        "num_heads": heads,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "vocab_size": vocab,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "dense_act_fn": "gelu_new" if gated else "relu",
        "is_gated_act": gated,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
