"""Pipeline.generate_many: images for prompts x seeds, made as batches through the text encoders, the transformer
and the VAE, each equal to the image `generate` makes alone with the same seed; per-image results, nothing kept on
the pipeline but a read-only view of `generate`'s last image."""

import numpy as np
import pytest

import helpers  # noqa: F401
from mlx_diffusion import GenerationSettings, load_pipeline
from mlx_diffusion.errors import InputError

SIZE = dict(width=48, height=32)


def _assert_batch_equals_singles(pipe, results, **settings):
    for r in results:
        alone = pipe.generate(r.settings.prompt, seed=r.settings.seed, output_type="np",
                              negative_prompt=r.settings.negative_prompt, **settings)
        assert np.array_equal(r.image, alone), (r.settings.prompt, r.settings.seed, np.abs(r.image - alone).max())
        assert r.settings == pipe.last_settings.replace(output_type="np")


@pytest.mark.parametrize("fixture, settings", [
    ("flux_schnell", {}),
    ("flux_dev", {"guidance": 3.5}),
    ("sd3", {"guidance": 5.0}),  # classifier-free guidance: a batch of 2B through the transformer
    ("sd3_no_t5", {"guidance": 1.0}),
])
def test_a_batch_equals_single_images(request, fixture, settings):
    pipe = load_pipeline(request.getfixturevalue(fixture)[2], progress=False)
    prompts = ["a red fox in the snow", "a lighthouse at dusk, stormy sea"]
    results = pipe.generate_many(prompts, seeds=[5, 6], batch_size=4, steps=2, output_type="np", **SIZE, **settings)
    assert [(r.settings.prompt, r.settings.seed) for r in results] == [(p, s) for p in prompts for s in (5, 6)]
    assert all(r.stats.images == 4 and r.image.shape == (32, 48, 3) for r in results)
    assert np.abs(results[0].image - results[2].image).mean() > 1e-3  # the prompts matter within a batch
    assert np.abs(results[0].image - results[1].image).mean() > 1e-3  # and the seeds
    _assert_batch_equals_singles(pipe, results, steps=2, **SIZE, **settings)


def test_negative_prompts_and_true_cfg_per_image(flux_schnell):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    items = [GenerationSettings(prompt="a red fox", negative_prompt="blurry"),
             GenerationSettings(prompt="a blue car", negative_prompt="dark, grainy")]
    results = pipe.generate_many(items, seeds=[3], batch_size=2, steps=2, true_cfg_scale=2.0, output_type="np",
                                 **SIZE)
    assert [r.settings.negative_prompt for r in results] == ["blurry", "dark, grainy"]
    assert results[0].stats.images == 2
    _assert_batch_equals_singles(pipe, results, steps=2, true_cfg_scale=2.0, **SIZE)


def test_the_builtin_model_in_batches_of_three():
    pipe = load_pipeline(progress=False)
    results = pipe.generate_many(["a red circle", "two green squares at the top"], num_images_per_prompt=3,
                                 batch_size=3, steps=4, output_type="np")
    assert [r.stats.images for r in results] == [3] * 6 and len({r.settings.seed for r in results}) == 6
    _assert_batch_equals_singles(pipe, results, steps=4)
    # the seed and place where folded products once made a batch's image 1.09e-4 from the image made alone
    results = pipe.generate_many("two green squares at the top", seeds=[2733616590, 1, 2], batch_size=3, steps=4,
                                 output_type="np")
    _assert_batch_equals_singles(pipe, results[:1], steps=4)


def test_settings_that_differ_go_in_separate_batches(flux_schnell):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    items = [GenerationSettings(prompt="a", steps=1), GenerationSettings(prompt="b", steps=2),
             GenerationSettings(prompt="c", steps=1)]
    results = pipe.generate_many(items, seeds=[0], batch_size=3, **SIZE)
    assert [(r.settings.prompt, r.settings.steps, r.stats.images) for r in results] == \
        [("a", 1, 2), ("b", 2, 1), ("c", 1, 2)]
    assert results[0].stats is results[2].stats


def test_results_are_not_kept_on_the_pipeline(flux_schnell):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    assert pipe.last_settings is None and pipe.last_stats.seconds == {}
    pipe.generate_many("a fox", seeds=[1], steps=1, **SIZE)
    assert pipe.last_settings is None  # generate_many returns its results instead
    pipe.generate("a fox", seed=2, steps=1, **SIZE)
    assert pipe.last_settings.seed == 2 and pipe.last_stats.images == 1
    with pytest.raises(AttributeError):
        pipe.last_settings = None


@pytest.mark.parametrize("call, match", [
    (lambda p: p.generate_many([]), "no prompts"),
    (lambda p: p.generate_many("a", seeds=[]), "no seeds"),
    (lambda p: p.generate_many("a", seeds=[1, 2], num_images_per_prompt=3), "2 seeds but num_images_per_prompt=3"),
    (lambda p: p.generate_many("a", num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (lambda p: p.generate_many("a", batch_size=0), "batch_size must be a positive integer"),
    (lambda p: p.generate_many("a", seeds=[-1]), "seed must be a non-negative integer"),
    (lambda p: p.generate_many("a", stepz=3), "unknown setting 'stepz'"),
])
def test_bad_calls_are_one_line_errors(flux_schnell, call, match):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    with pytest.raises(InputError, match=match):
        call(pipe)


def test_replay_is_bit_exact_even_for_an_image_made_in_a_batch(flux_dev):
    pipe = load_pipeline(flux_dev[2], progress=False)
    results = pipe.generate_many(["a red fox", "a hen"], seeds=[1, 2], batch_size=3, steps=2, output_type="np",
                                 guidance=2.0, **SIZE)
    made = results[1]  # index 1 of the first batch of 3
    assert (made.stats.images, made.batch_index) == (3, 1)
    for metadata in (made.metadata(), made.record()):  # image-file text, JSON sidecar
        again = pipe.replay(metadata, output_type="np")
        assert np.array_equal(again.image, made.image) and again.settings == made.settings
    alone = pipe.replay(made.metadata(), alone=True, output_type="np")
    assert alone.stats.images == 1 and np.array_equal(alone.image, made.image)
    fewer = pipe.replay(made.metadata(), steps=1, output_type="np")  # a change makes a new image
    assert fewer.settings.steps == 1 and fewer.settings.seed == 2 and np.abs(fewer.image - made.image).mean() > 1e-3
    pil = pipe.replay(made.metadata())  # a PIL image unless told otherwise (output_type is not recorded)
    assert np.array_equal(np.asarray(pil.image), (made.image * 255).round().astype(np.uint8))


def test_replay_refuses_what_cannot_be_replayed(flux_schnell):
    pipe = load_pipeline(flux_schnell[2], progress=False)
    noise = np.zeros((1, 16, 4, 6), dtype=np.float32)
    pipe.generate("x", latents=noise, steps=1, **SIZE)
    with pytest.raises(InputError, match="made from given latents"):
        pipe.replay(pipe.last_settings.to_metadata())
    for broken in ({"mlx_diffusion.settings": '{"prompt": "x", "seed": 1}', "mlx_diffusion.batch": '{"size": 2}'},
                   {"settings": {"prompt": "x", "seed": 1}, "batch": {"size": 2, "index": 2}}):
        with pytest.raises(InputError, match="batch record is broken"):
            pipe.replay(broken)
    with pytest.warns(UserWarning, match="made with /elsewhere; making it with"):
        pipe.replay({"settings": {"prompt": "x", "seed": 1, "steps": 1, "model": "/elsewhere", **SIZE}})
