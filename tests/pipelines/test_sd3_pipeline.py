"""Whole SD3 pipeline vs diffusers' StableDiffusion3Pipeline: CFG with a negative prompt, with and without T5."""

import numpy as np
import pytest

import helpers  # noqa: F401
from helpers import IMAGE_MAX, IMAGE_MEAN
from mlx_diffusion import GenerationSettings, load_pipeline

H, W = 64, 96  # latents 8x12 -> 4x6 patches, cropped from pos_embed_max_size 10
PROMPT = "a watercolour lighthouse on a cliff, stormy sea"
NEGATIVE = "blurry, low quality"


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)


def _reference(pipe, prompt, latents, **kw):
    import torch

    with torch.no_grad():
        return pipe(prompt, height=H, width=W, latents=torch.from_numpy(latents), output_type="np", **kw).images[0]


def _ours(folder, prompt, latents, **kw):
    return load_pipeline(folder, progress=False, **kw.pop("load", {})).generate(
        prompt, width=W, height=H, latents=latents, output_type="np", **kw)


def _assert_close(ours, ref):
    diff = np.abs(ours - ref)
    assert ours.shape == ref.shape == (H, W, 3)
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert ref.std() > 0.05 and np.mean((ref <= 0) | (ref >= 1)) < 0.1, "reference image is flat or saturated"
    return diff


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_sd3_with_t5_matches_diffusers(sd3, guidance):
    pipe, _, converted = sd3
    latents = _latents()
    ref = _reference(pipe, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=guidance)
    ours = _ours(converted, PROMPT, latents, negative_prompt=NEGATIVE, steps=4, guidance=guidance)
    diff = _assert_close(ours, ref)
    print(f"sd3 guidance {guidance}: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    other = _reference(pipe, "a green tractor in a field", latents, negative_prompt=NEGATIVE, num_inference_steps=4,
                       guidance_scale=guidance)
    assert np.abs(other - ref).mean() > 0.01  # the prompt matters far beyond the tolerance


def test_sd3_through_the_native_attention_matches_diffusers(sd3, monkeypatch):
    from mlx_diffusion.backends import cpu

    monkeypatch.setattr(cpu, "NATIVE_MIN_SCORES", 0)  # every attention call, however small, through the C kernel
    pipe, _, converted = sd3
    latents = _latents(2)
    ref = _reference(pipe, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0)
    _assert_close(_ours(converted, PROMPT, latents, negative_prompt=NEGATIVE, steps=3, guidance=6.0), ref)


def test_sd3_with_tables_in_file_and_a_banded_decoder_matches_diffusers(sd3, monkeypatch):
    """The memory-saving paths a real model takes, forced on the tiny one: every text encoder's token table read
    from the file per lookup, the VAE's encoder not loaded, its decoder's GroupNorm+SiLU, convs and residuals in
    bands of a few rows."""
    from mlx_diffusion.backends import cpu
    from mlx_diffusion.io import folder

    monkeypatch.setattr(folder, "TABLE_IN_FILE_BYTES", 0)
    monkeypatch.setattr(cpu, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu, "BAND_ELEMENTS", 1 << 12)
    pipe, _, converted = sd3
    latents = _latents(4)
    ref = _reference(pipe, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0)
    ours = load_pipeline(converted, progress=False)
    _assert_close(ours.generate(PROMPT, width=W, height=H, latents=latents, output_type="np", negative_prompt=NEGATIVE,
                                steps=3, guidance=6.0), ref)
    assert "weight" not in ours.model("text_encoder_3").shared
    assert "encoder" not in ours.model("vae:decode")


def test_sd3_default_negative_prompt_is_empty(sd3):
    pipe, _, converted = sd3
    latents = _latents(3)
    ref = _reference(pipe, PROMPT, latents, num_inference_steps=3, guidance_scale=5.0)
    _assert_close(_ours(converted, PROMPT, latents, steps=3, guidance=5.0), ref)


def test_sd3_folder_without_t5_matches_diffusers(sd3_no_t5):
    pipe, _, converted = sd3_no_t5
    latents = _latents(1)
    ref = _reference(pipe, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0)
    p = load_pipeline(converted, progress=False)
    assert not p.use_t5
    ours = p.generate(PROMPT, negative_prompt=NEGATIVE, steps=3, guidance=6.0, width=W, height=H, latents=latents,
                      output_type="np")
    _assert_close(ours, ref)


def test_sd3_use_t5_false_never_loads_t5_and_equals_diffusers_without_it(sd3, monkeypatch):
    pipe, _, converted = sd3
    import diffusers

    no_t5 = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    latents = _latents(2)
    ref = _reference(no_t5, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0)
    p = load_pipeline(converted, progress=False, use_t5=False)
    loaded = []
    original = p.model
    monkeypatch.setattr(p, "model", lambda c: loaded.append(c) or original(c))
    ours = p.generate(PROMPT, negative_prompt=NEGATIVE, steps=3, guidance=6.0, width=W, height=H, latents=latents,
                      output_type="np")
    _assert_close(ours, ref)
    assert "text_encoder_3" not in loaded and "text_encoder" in loaded
    with_t5 = _reference(pipe, PROMPT, latents, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=6.0)
    assert np.abs(with_t5 - ref).mean() > 0.005  # T5 really contributes when present


def test_sd3_defaults(sd3):
    p = load_pipeline(sd3[2], progress=False)
    assert p.family == "sd3" and p.default_steps == 28 and p.default_guidance == 7.0 and p.max_sequence_length == 256
    assert p.default_width == p.default_height == 8 * 8  # transformer sample_size x VAE factor (1024 for SD3 Medium)
    assert p.scheduler_config.shift == 3.0
    img = p.generate("a cat", steps=2, seed=4)
    assert img.size == (64, 64)
    assert p.last_settings.guidance == 7.0 and p.last_settings.seed == 4


@pytest.mark.parametrize("use_t5", [True, False])
def test_prompt_embedding_assembly_matches_diffusers(sd3, use_t5):
    """CLIP-L/G penultimate states concatenated and zero-padded, T5 (or zeros) appended; pooled = both projections."""
    import diffusers
    import torch

    pipe, _, converted = sd3
    if not use_t5:
        pipe = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    ours = load_pipeline(converted, progress=False, use_t5=use_t5)
    prompt = "Two cats, one black & one white; 3 mice (tiny) — naïve art " * 6  # long: truncated by CLIP
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, negative_prompt="ugly",
                                              do_classifier_free_guidance=True)
    with pytest.warns(UserWarning, match="tokens were dropped"):
        settings = ours.resolve(GenerationSettings(prompt=prompt, negative_prompt="ugly", guidance=7.0))
        seq, pooled = ours.encode([settings])
    assert seq.shape == (2, 77 + 256, 80) and pooled.shape == (2, 72)
    for a, b in ((seq[1], pe[0]), (seq[0], npe[0]), (pooled[1], pp[0]), (pooled[0], npp[0])):
        assert helpers.max_rel_err(a, b) < 1e-5
    assert np.abs(np.array(seq[1, :77, 72:])).max() == 0  # zero padding up to the T5 width
    if not use_t5:
        assert np.abs(np.array(seq[:, 77:])).max() == 0


def test_sd3_size_beyond_position_table_is_refused(sd3):
    from mlx_diffusion.errors import InputError

    p = load_pipeline(sd3[2], progress=False)
    with pytest.raises(InputError, match="at most 160"):  # pos_embed_max_size 10 x patch 2 x VAE factor 8
        p.generate("x", width=176, height=64, steps=1)


def test_sd3_other_configuration(tmp_path):
    """Another shape of everything: 2 layers of 2 heads x 24, other CLIP/T5 widths, a 3-level VAE, odd size."""
    import tiny_models
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer
    from mlx_diffusion.convert import convert

    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=2.5),
        vae=tiny_models.tiny_vae(channels=(8, 16, 24), scaling=1.1, shift=-0.05, seed=21),
        text_encoder=tiny_models.tiny_clip(hidden=24, layers=3, heads=2, projection=True, seed=22),
        tokenizer=clip_tok,
        text_encoder_2=tiny_models.tiny_clip(hidden=36, heads=3, act="gelu", projection=True, seed=23),
        tokenizer_2=CLIPTokenizer.from_pretrained(helpers.CLIP_TOKENIZER, pad_token="!"),
        text_encoder_3=tiny_models.tiny_t5(d_model=64, layers=1, heads=2, d_kv=24, seed=24),
        tokenizer_3=t5_tok,
        transformer=tiny_models.tiny_sd3_transformer(layers=2, heads=2, head_dim=24, joint_dim=64, caption_dim=48,
                                                     pooled_dim=60, max_pos=12, sample_size=10, seed=25),
    )
    src = tiny_models.save(pipe, tmp_path / "src")
    out = convert(src, tmp_path / "mlx", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    h, w = 40, 24  # multiples of VAE factor 4 x patch 2
    latents = np.random.default_rng(6).standard_normal((1, 16, h // 4, w // 4)).astype(np.float32)
    import torch

    with torch.no_grad():
        ref = pipe("a red kite over the dunes ✨", height=h, width=w, latents=torch.from_numpy(latents),
                   negative_prompt="rain", num_inference_steps=3, guidance_scale=4.5, output_type="np").images[0]
    ours = load_pipeline(out, progress=False).generate("a red kite over the dunes ✨", negative_prompt="rain", steps=3,
                                                       guidance=4.5, width=w, height=h, latents=latents,
                                                       output_type="np")
    diff = np.abs(ours - ref)
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert ref.std() > 0.03
