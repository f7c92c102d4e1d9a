"""GenerationSettings: one object for every setting of a generation, filled with the model's defaults, accepted by
`generate`, and carried by the PNG so that the image can be made again exactly."""

import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401
from mlx_diffusion import GenerationSettings, load_pipeline
from mlx_diffusion.errors import InputError
from mlx_diffusion.io.images import read_png_text, write_png


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
    write_png(image, tmp_path / "a.png", p.last_settings.to_metadata())
    text = read_png_text(tmp_path / "a.png")
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
])
def test_bad_settings(sd3, kw, match):
    with pytest.raises(InputError, match=match):
        load_pipeline(sd3[2], progress=False).generate("x", steps=1, width=32, height=32, **kw)


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
