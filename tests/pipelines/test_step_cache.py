"""The first-block cache (`cache=THRESHOLD`) equals diffusers' FirstBlockCache on the same tiny weights and noise,
skips steps where it should, and keeps an image made in a batch equal to the image made alone."""

import copy

import numpy as np
import pytest

import helpers  # noqa: F401
from helpers import IMAGE_MAX
from mlx_diffusion import load_pipeline
from mlx_diffusion.errors import InputError

H, W = 64, 96
STEPS = 8


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)


def _diffusers_cached(pipe, threshold, prompt, latents, flux: bool, **kw):
    """diffusers with FirstBlockCache on a copy of its transformer (its FLUX pipeline names a cache context for each
    call; StableDiffusion3Pipeline does not, so one context is set for the whole run, as the hooks need one)."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = copy.copy(pipe)
    # a fresh transformer with the same weights (a deep copy would carry the hook registry earlier calls attached)
    fresh = type(pipe.transformer).from_config(pipe.transformer.config)
    fresh.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = fresh.eval()
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    noise = torch.from_numpy(latents)
    if flux:
        noise = FluxPipeline._pack_latents(noise, 1, 16, H // 8, W // 8)
    with torch.no_grad():
        if flux:
            return pipe(prompt, height=H, width=W, latents=noise, output_type="np", **kw).images[0]
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(pipe.transformer, CacheContext("cond_uncond"))  # SD3's transformer has no cache_context
        return pipe(prompt, height=H, width=W, latents=noise, output_type="np", **kw).images[0]


@pytest.mark.parametrize("threshold", [0.05, 0.6])  # this tiny model's residual changes by 0.47-0.94 a step
def test_flux_dev_matches_diffusers_first_block_cache(flux_dev, threshold):
    pipe, _, folder = flux_dev
    latents = _latents()
    ours_pipe = load_pipeline(folder, progress=False)
    ours = ours_pipe.generate("a red fox", width=W, height=H, latents=latents, steps=STEPS, guidance=3.5,
                              output_type="np", cache=threshold)
    skipped = ours_pipe.last_stats.cached_calls
    ref = _diffusers_cached(pipe, threshold, "a red fox", latents, True, num_inference_steps=STEPS,
                            guidance_scale=3.5)
    assert np.abs(ours - ref).max() <= IMAGE_MAX, (threshold, skipped, np.abs(ours - ref).max())
    uncached = ours_pipe.generate("a red fox", width=W, height=H, latents=latents, steps=STEPS, guidance=3.5,
                                  output_type="np")
    if threshold == 0.6:  # the test means something: steps were skipped, and that changed the image
        assert 0 < skipped < STEPS - 1 and np.abs(ours - uncached).max() > 10 * IMAGE_MAX
    else:
        assert skipped == 0 and np.array_equal(ours, uncached)


def test_sd3_with_guidance_skips_steps_per_image(sd3_no_t5):
    """diffusers' FirstBlockCache fails on SD3 (0.42: its tail hook subtracts the text stream, which SD3's last block
    does not return: `None - Tensor`), so SD3 is held to what the FLUX test verifies: the same rule, here deciding
    over each image's negative and positive rows together, as diffusers' single call would."""
    latents = _latents(1)
    pipe = load_pipeline(sd3_no_t5[2], progress=False)
    kw = dict(width=W, height=H, latents=latents, steps=STEPS, guidance=5.0, negative_prompt="blurry",
              output_type="np")
    uncached = pipe.generate("a lighthouse", **kw)
    assert np.array_equal(pipe.generate("a lighthouse", cache=1e-6, **kw), uncached)  # nothing below 1e-6
    cached = pipe.generate("a lighthouse", cache=0.6, **kw)
    changes = [c[0] for c in pipe.last_stats.cache_changes["all"]]
    assert 0 < pipe.last_stats.cached_calls < STEPS - 1 and np.abs(cached - uncached).max() > 10 * IMAGE_MAX
    assert pipe.last_stats.cached_calls == sum(1 for c in changes if c <= 0.6)


@pytest.mark.parametrize("fixture, kw", [("flux_schnell", {"true_cfg_scale": 2.0, "negative_prompt": "dark"}),
                                         ("sd3_no_t5", {"guidance": 5.0})])
def test_a_cached_batch_equals_its_images_made_alone(request, fixture, kw):
    pipe = load_pipeline(request.getfixturevalue(fixture)[2], progress=False)
    results = pipe.generate_many(["a red fox", "a blue car"], seeds=[1, 2], batch_size=4, steps=STEPS, width=48,
                                 height=32, output_type="np", cache=0.2, **kw)
    for r in results:
        alone = pipe.generate(r.settings.prompt, seed=r.settings.seed, steps=STEPS, width=48, height=32,
                              output_type="np", cache=0.2, **kw)
        assert np.array_equal(r.image, alone)
        assert r.settings.cache == 0.2


def test_the_threshold_is_checked_and_recorded(flux_schnell):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    for bad in (-0.1, 2.0, float("nan")):
        with pytest.raises(InputError, match="cache"):
            pipe.generate("x", steps=2, width=48, height=32, cache=bad)
    pipe.generate("x", steps=2, width=48, height=32, cache=0.1)
    assert pipe.last_settings.cache == 0.1 and '"cache": 0.1' in pipe.last_settings.to_metadata()[
        "mlx_diffusion.settings"]
