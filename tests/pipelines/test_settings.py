"""GenerationSettings: one object for every setting of a generation, filled with the model's defaults, accepted by
`generate`, carried by the image file so that the image can be made again exactly, and honest about settings the
model does not use."""

import warnings

import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401
from mlx_diffusion import GenerationSettings, load_pipeline
from mlx_diffusion.errors import InputError
from mlx_diffusion.io.images import read_metadata, write_image


def test_settings_object_equals_keywords_and_fills_defaults(sd3):
    p = load_pipeline(sd3[2], progress=False)
    s = GenerationSettings(prompt="a lighthouse", negative_prompt="fog", steps=2, width=32, height=48, seed=5)
    a = p.generate(s, output_type="np")
    resolved = p.last_settings
    b = p.generate("a lighthouse", negative_prompt="fog", steps=2, width=32, height=48, seed=5, output_type="np")
    assert np.array_equal(a, b)
    assert (resolved.guidance, resolved.max_sequence_length, resolved.use_t5) == (7.0, 256, True)
    assert resolved.model == str(sd3[2]) and resolved.true_cfg_scale is None
    c = p.generate(s.replace(guidance=3.0), output_type="np")
    assert np.abs(c - a).mean() > 1e-3  # the object's settings are the ones used


def test_png_metadata_round_trip_remakes_the_image(flux_dev, tmp_path):
    p = load_pipeline(flux_dev[2], progress=False)
    image = p.generate("a fox", steps=2, guidance=2.5, width=48, height=32, seed=11, max_sequence_length=64)
    write_image(image, tmp_path / "a.png", p.last_settings.to_metadata())
    text = read_metadata(tmp_path / "a.png")
    assert text["prompt"] == "a fox" and text["seed"] == "11" and text["guidance"] == "2.5"
    again = GenerationSettings.from_metadata(text)
    assert again == p.last_settings
    assert np.array_equal(np.asarray(p.generate(again)), np.asarray(Image.open(tmp_path / "a.png")))


def test_sd3_without_t5_per_call_equals_without_t5_at_load(sd3):
    kw = dict(steps=2, width=32, height=32, seed=1, output_type="np")
    per_call = load_pipeline(sd3[2], progress=False).generate("x", use_t5=False, max_sequence_length=16, **kw)
    at_load = load_pipeline(sd3[2], progress=False, use_t5=False, max_sequence_length=16).generate("x", **kw)
    assert np.array_equal(per_call, at_load)


@pytest.mark.parametrize("kw, match", [
    (dict(num_steps=3), "unknown setting 'num_steps'"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(max_sequence_length=-3), "max_sequence_length"),
    (dict(use_t5="no"), "use_t5 must be true or false"),
    (dict(true_cfg_scale=2.0), "is for FLUX"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
    (dict(guidance=1e9), "guidance must be from 0 to 100"),
    (dict(guidance=-2.0), "guidance must be from 0 to 100"),
    (dict(steps=10**9), "steps can be at most 1000"),
    (dict(width=10**6), "at most 4096"),
    (dict(seed=2**64), "seed must be below 2\\*\\*64"),
    (dict(max_sequence_length=10**6), "max_sequence_length can be at most 512"),
    (dict(strength=float("nan")), "strength must be a finite number"),
])
def test_bad_settings(sd3, kw, match):
    pipe = load_pipeline(sd3[2], progress=False)
    with pytest.raises(InputError, match=match):
        pipe.generate("x", **{"steps": 1, "width": 32, "height": 32, **kw})
    if "seed" not in kw:  # (seeds= gives the seeds here)
        with pytest.raises(InputError, match=match):  # checked for every image before the first is made
            pipe.generate_many(["x", "y"], seeds=[1, 2], **{"steps": 1, "width": 32, "height": 32, **kw})


def test_absurd_image_counts_are_refused_before_any_work(sd3):
    pipe = load_pipeline(sd3[2], progress=False)
    with pytest.raises(InputError, match="at most 10000 images per call"):
        pipe.generate_many(["x"] * 3, num_images_per_prompt=5000, steps=1, width=32, height=32)


def test_sd3_folder_without_t5_refuses_use_t5(sd3_no_t5):
    with pytest.raises(InputError, match="has no T5"):
        load_pipeline(sd3_no_t5[2], progress=False).generate("x", steps=1, width=32, height=32, use_t5=True)


def test_broken_metadata():
    with pytest.raises(InputError, match="records no mlx_diffusion settings"):
        GenerationSettings.from_metadata({"prompt": "x"})
    with pytest.raises(InputError, match="broken"):
        GenerationSettings.from_metadata({"mlx_diffusion.settings": "{not json"})
    with pytest.raises(InputError, match="unknown setting"):
        GenerationSettings.from_metadata({"mlx_diffusion.settings": '{"evil": 1}'})


@pytest.mark.parametrize("changes, expected", [
    (dict(num_inference_steps=3), dict(steps=3)),
    (dict(guidance_scale=4.5, height=32, width=48, negative_prompt="x"),
     dict(guidance=4.5, height=32, width=48, negative_prompt="x")),
])
def test_diffusers_names_are_taken(changes, expected):
    s = GenerationSettings(prompt="a").replace(**changes)
    assert all(getattr(s, k) == v for k, v in expected.items())


@pytest.mark.parametrize("changes, match", [
    (dict(steps=2, num_inference_steps=3), "give steps or num_inference_steps, not both"),
    (dict(stpes=2), r"unknown setting 'stpes' \(did you mean 'steps'\?"),
    (dict(guidance_scal=2.0), r"did you mean 'guidance_scale'\?"),
    (dict(num_images_per_prompt=2), r"generate makes one image: use generate_many\(\.\.\., num_images_per_prompt=N\)"),
])
def test_wrong_names_name_the_right_one(changes, match):
    with pytest.raises(InputError, match=match):
        GenerationSettings(prompt="a").replace(**changes)


def _no_warnings():
    catcher = warnings.catch_warnings(record=True)
    caught = catcher.__enter__()
    warnings.simplefilter("always")
    return catcher, caught


KW = dict(steps=1, width=32, height=32, seed=3, output_type="np")


@pytest.mark.parametrize("fixture, given, unused, match", [
    ("flux_schnell", dict(guidance=3.5), {"guidance": 3.5}, "schnell has no guidance input"),
    ("flux_schnell", dict(negative_prompt="fog"), {"negative_prompt": "fog"}, "only with true_cfg_scale"),
    ("flux_dev", dict(true_cfg_scale=4.0), {"true_cfg_scale": 4.0}, "unused without a negative prompt"),
    ("flux_dev", dict(negative_prompt="fog", true_cfg_scale=1.0), {"negative_prompt": "fog", "true_cfg_scale": 1.0},
     "only with true_cfg_scale"),
    ("sd3", dict(negative_prompt="fog", guidance=1.0), {"negative_prompt": "fog"}, "unused at guidance 1 or less"),
])
def test_unused_settings_are_warned_once_and_recorded_as_unused(request, fixture, given, unused, match):
    p = load_pipeline(request.getfixturevalue(fixture)[2], progress=False)
    plain = p.generate("a fox", **{**KW, **{k: v for k, v in given.items() if k not in unused}})
    catcher, caught = _no_warnings()
    try:
        results = p.generate_many(["a fox", "a hen"], seeds=[3, 4], batch_size=2, **{**KW, **given})
    finally:
        catcher.__exit__(None, None, None)
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    assert len(messages) == len(set(messages)) >= 1 and any(match in m for m in messages)  # once, not per image
    s = results[0].settings
    assert dict(s.unused) == unused and all(getattr(s, name) is None for name in unused)
    assert np.abs(results[0].image - plain).max() <= 1e-4  # and it made no difference
    text = s.to_metadata()
    assert GenerationSettings.from_metadata(text).unused == s.unused and "unused" in text


def test_defaults_the_model_does_not_use_are_not_recorded_and_not_warned(flux_schnell, sd3):
    catcher, caught = _no_warnings()
    try:
        s = load_pipeline(flux_schnell[2], progress=False).resolve(GenerationSettings(prompt="x"))
        t = load_pipeline(sd3[2], progress=False).resolve(GenerationSettings(prompt="x", guidance=7.0))
    finally:
        catcher.__exit__(None, None, None)
    assert not caught and s.guidance is None and s.unused == () and t.guidance == 7.0 and t.unused == ()
