"""Tiny random-weight reference pipelines in the real diffusers layout, saved to disk as users' folders are.

Sizes are deliberately odd (3 heads, non-power-of-two widths) so nothing that is hard-coded can pass. Weights
follow helpers.init_weights_ so that images have structure and respond to the prompt (see reference-facts.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import CLIP_TOKENIZER, T5_TOKENIZER, init_weights_

SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)


def tiny_clip(hidden=32, layers=2, heads=2, act="quick_gelu", projection=False, seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act=act, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return init_weights_(model, 1.0, seed=seed)


def tiny_t5(d_model=48, layers=2, heads=3, d_kv=16, seed=2):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=72, num_layers=layers, num_heads=heads,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, dropout_rate=0.0)
    return init_weights_(T5EncoderModel(cfg).eval(), 1.0, seed=seed)


def tiny_vae(channels=(8, 16, 16, 24), latent=16, groups=8, scaling=0.3611, shift=0.1159, seed=3, gain=0.2):
    # gain 0.2 (not 0.5): with four blocks the decoder's output grows with depth and 0.5 saturates a third of the
    # pixels, which would hide differences behind the clamp (measured: 34% clipped at 0.5, 0% at 0.2)
    from diffusers import AutoencoderKL

    n = len(channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=1, norm_num_groups=groups, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=scaling, shift_factor=shift).eval()
    return init_weights_(vae, gain, seed=seed)


def tiny_flux_transformer(guidance=False, layers=2, single_layers=2, heads=3, head_dim=16, axes=(4, 6, 6),
                          joint_dim=48, pooled_dim=32, seed=4):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                               attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
                               pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=axes).eval()
    return init_weights_(m, 1.0, seed=seed)


def tokenizers(t5_max_length=512):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    t5 = T5TokenizerFast.from_pretrained(T5_TOKENIZER, model_max_length=t5_max_length)
    return clip, t5


def tiny_flux_pipeline(dev=False):
    """A FluxPipeline of tiny random components (schnell, or dev with the guidance embedder and dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip_tok, t5_tok = tokenizers()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if dev else SCHNELL_SCHEDULER)),
        vae=tiny_vae(),
        text_encoder=tiny_clip(),
        tokenizer=clip_tok,
        text_encoder_2=tiny_t5(),
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(guidance=dev),
    )


def save(pipe, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves tokenizers as tokenizer.json only; the released folders also carry the original
    # vocabulary files (vocab.json + merges.txt, spiece.model), as here.
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        t = folder / sub
        if t.is_dir():
            src = T5_TOKENIZER if "T5" in (t / "tokenizer_config.json").read_text() else CLIP_TOKENIZER
            for f in src.iterdir():
                if f.name not in ("tokenizer_config.json", "tokenizer.json"):
                    shutil.copy(f, t / f.name)
    return folder


def tiny_sd3_transformer(layers=3, heads=3, head_dim=16, joint_dim=80, caption_dim=48, pooled_dim=72, max_pos=10,
                         sample_size=8, seed=5, **extra):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=layers,
                              attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
                              caption_projection_dim=caption_dim, pooled_projection_dim=pooled_dim, out_channels=16,
                              pos_embed_max_size=max_pos, **extra).eval()
    return init_weights_(m, 1.0, seed=seed)


def tiny_sd3_pipeline(with_t5=True):
    """A StableDiffusion3Pipeline of tiny random components: CLIP-L 32 + CLIP-G 40 wide (pooled 72), T5 80 wide."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    clip_tok, t5_tok = tokenizers()
    clip_g_tok = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, pad_token="!")  # as SD3's tokenizer_2
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling=1.5305, shift=0.0609),
        text_encoder=tiny_clip(hidden=32, projection=True, seed=11),
        tokenizer=clip_tok,
        text_encoder_2=tiny_clip(hidden=40, heads=4, act="gelu", projection=True, seed=12),
        tokenizer_2=clip_g_tok,
        text_encoder_3=tiny_t5(d_model=80, heads=4, d_kv=16, seed=13) if with_t5 else None,
        tokenizer_3=t5_tok if with_t5 else None,
        transformer=tiny_sd3_transformer(),
    )
