"""Whole FLUX pipeline vs diffusers' FluxPipeline on the same tiny random weights and the same initial latents."""

import numpy as np
import pytest

import helpers  # noqa: F401
from helpers import IMAGE_MAX, IMAGE_MEAN
from mlx_diffusion import load_pipeline

H, W = 64, 96  # non-square: 8x12 latents, 4x6 packed tokens
PROMPT = "a photo of a red fox, 35mm, golden hour!"


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)


def _reference(pipe, prompt, latents, **kw):
    import torch
    from diffusers import FluxPipeline

    packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 1, 16, H // 8, W // 8)
    with torch.no_grad():
        return pipe(prompt, height=H, width=W, latents=packed, output_type="np", **kw).images[0]


def _assert_close(ours, ref):
    diff = np.abs(ours - ref)
    assert ours.shape == ref.shape == (H, W, 3) and ours.dtype == np.float32
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    return diff


def _assert_informative(pipe, ref, latents, **kw):
    """The reference image has structure, is not saturated, and depends on the prompt far beyond the tolerance."""
    assert ref.std() > 0.05 and np.mean((ref <= 0) | (ref >= 1)) < 0.1
    other = _reference(pipe, "a blue bicycle leaning on a wall", latents, **kw)
    assert np.abs(other - ref).mean() > 0.01


def test_schnell_matches_diffusers(flux_schnell):
    pipe, _, converted = flux_schnell
    latents = _latents()
    kw = dict(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)
    ref = _reference(pipe, PROMPT, latents, **kw)
    ours = load_pipeline(converted, progress=False).generate(PROMPT, width=W, height=H, latents=latents,
                                                             output_type="np")
    diff = _assert_close(ours, ref)
    print(f"schnell image: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    _assert_informative(pipe, ref, latents, **kw)


def test_schnell_through_the_native_attention_matches_diffusers(flux_schnell, monkeypatch):
    from mlx_diffusion.backends import cpu

    monkeypatch.setattr(cpu, "NATIVE_MIN_SCORES", 0)  # every attention call, however small, through the C kernel
    pipe, _, converted = flux_schnell
    latents = _latents()
    ref = _reference(pipe, PROMPT, latents, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)
    ours_pipe = load_pipeline(converted, progress=False)
    _assert_close(ours_pipe.generate(PROMPT, width=W, height=H, latents=latents, output_type="np"), ref)
    (forward,) = ours_pipe._forwards["transformer"].values()
    assert forward.compiled is forward.fn  # the transformer ran uncompiled, as the kernel needs


def test_dev_with_guidance_matches_diffusers(flux_dev):
    pipe, _, converted = flux_dev
    latents = _latents(1)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, max_sequence_length=512)
    ref = _reference(pipe, PROMPT, latents, **kw)
    mlx_pipe = load_pipeline(converted, progress=False)
    assert mlx_pipe.default_steps == 28 and mlx_pipe.default_guidance == 3.5 and mlx_pipe.max_sequence_length == 512
    ours = mlx_pipe.generate(PROMPT, steps=3, guidance=4.0, width=W, height=H, latents=latents, output_type="np")
    diff = _assert_close(ours, ref)
    print(f"dev image: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    other = mlx_pipe.generate(PROMPT, steps=3, guidance=1.0, width=W, height=H, latents=latents, output_type="np")
    assert np.abs(other - ours).mean() > 0.005  # the guidance embedder is live


def test_true_cfg_with_negative_prompt_matches_diffusers(flux_schnell):
    pipe, _, converted = flux_schnell
    latents = _latents(2)
    ref = _reference(pipe, PROMPT, latents, num_inference_steps=2, max_sequence_length=256,
                     negative_prompt="blurry, low quality", true_cfg_scale=2.5)
    ours = load_pipeline(converted, progress=False).generate(
        PROMPT, negative_prompt="blurry, low quality", true_cfg_scale=2.5, steps=2, width=W, height=H,
        latents=latents, output_type="np")
    _assert_close(ours, ref)


def test_defaults_and_seed(flux_schnell):
    _, _, converted = flux_schnell
    p = load_pipeline(converted, progress=False)
    assert p.default_steps == 4 and p.default_guidance is None and p.max_sequence_length == 256
    a = p.generate("a cat", width=32, height=48, seed=7, output_type="np")
    b = p.generate("a cat", width=32, height=48, seed=7, output_type="np")
    c = p.generate("a cat", width=32, height=48, seed=8, output_type="np")
    assert np.array_equal(a, b) and np.abs(a - c).mean() > 1e-3
    img = p.generate("a cat", width=32, height=48, seed=7)
    assert img.size == (32, 48) and np.array_equal(np.asarray(img), (a * 255).round().astype(np.uint8))
    s = p.last_settings
    assert (s.seed, s.steps, s.width, s.height, s.prompt) == (7, 4, 32, 48, "a cat")
    assert set(p.last_stats.seconds) == {"text_encoding", "denoising", "decoding"}
    assert "text_encoder" not in p._models and "text_encoder_2" not in p._models  # released before denoising


@pytest.mark.parametrize("kw, match", [
    (dict(width=100), "width must be a positive multiple of 16"),
    (dict(height=0), "height must be a positive multiple of 16"),
    (dict(height=-16), "height"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(latents=np.zeros((1, 16, 3, 3), np.float32)), "latents must have shape"),
    (dict(output_type="latent"), "output_type"),
])
def test_bad_arguments(flux_schnell, kw, match):
    from mlx_diffusion.errors import InputError

    p = load_pipeline(flux_schnell[2], progress=False)
    with pytest.raises(InputError, match=match):
        p.generate("x", **{"width": 32, "height": 32, **kw})


def test_other_configuration_and_unicode_prompt(tmp_path):
    """Another shape of everything: depths, heads, RoPE axes, T5/CLIP widths, a 3-level VAE (factor 4), odd size."""
    import tiny_models
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from mlx_diffusion.convert import convert

    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=tiny_models.tiny_vae(channels=(8, 16, 24), seed=7),
        text_encoder=tiny_models.tiny_clip(hidden=24, layers=3, heads=3, seed=8),
        tokenizer=clip_tok,
        text_encoder_2=tiny_models.tiny_t5(d_model=40, layers=3, heads=5, d_kv=8, seed=9),
        tokenizer_2=t5_tok,
        transformer=tiny_models.tiny_flux_transformer(layers=1, single_layers=3, heads=4, head_dim=8, axes=(2, 2, 4),
                                                      joint_dim=40, pooled_dim=24, seed=10),
    )
    src = tiny_models.save(pipe, tmp_path / "src")
    out = convert(src, tmp_path / "mlx", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    h, w = 40, 56  # multiples of 8 = VAE factor 4 x packing 2
    latents = np.random.default_rng(5).standard_normal((1, 16, h // 4, w // 4)).astype(np.float32)
    prompt = "Ein Fuchs im Schnee 🦊, 雪の中の狐, renard « roux » — №7 (ÆØÅ) " * 8  # long: CLIP truncates
    import torch

    packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 1, 16, h // 4, w // 4)
    with torch.no_grad():
        ref = pipe(prompt, height=h, width=w, latents=packed, num_inference_steps=3, max_sequence_length=256,
                   output_type="np").images[0]
    ours = load_pipeline(out, progress=False).generate(prompt, steps=3, width=w, height=h, latents=latents,
                                                       output_type="np")
    diff = np.abs(ours - ref)
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert ref.std() > 0.03
