"""Image-to-image vs diffusers' FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline on the same tiny random weights,
start image and noise (diffusers' randn_tensor patched to return it; the VAE posterior's mode, as
`retrieve_latents(..., sample_mode="argmax")`): the schedule cut by strength, the image's latents noised with
scale_noise. Strength 1.0 is text-to-image with the same noise, bit for bit."""

import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401
from helpers import IMAGE_MAX, IMAGE_MEAN
from mlx_diffusion import load_pipeline
from mlx_diffusion.errors import InputError

H, W = 64, 96
PROMPT = "a watercolour lighthouse on a cliff, stormy sea"


def _start_image(size=(W, H), seed=0):
    """A smooth, structured RGB image (gradients and a disc), not noise: what a VAE encodes meaningfully."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([x * 0.8 + disc * 0.2, y * 0.7, 0.3 + 0.5 * disc], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 0.02, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)


def _reference(module_name, cls_name, pipe, image, noise, monkeypatch, **kw):
    import importlib

    import torch

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(noise).reshape(shape))
    argmax = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": argmax(out, generator, "argmax"))
    ref_pipe = getattr(module, cls_name)(**pipe.components)
    with torch.no_grad():
        return ref_pipe(PROMPT, image=image, height=H, width=W, output_type="np", **kw).images[0]


def _flux_reference(pipe, image, noise, monkeypatch, **kw):
    return _reference("diffusers.pipelines.flux.pipeline_flux_img2img", "FluxImg2ImgPipeline", pipe, image, noise,
                      monkeypatch, **kw)


def _sd3_reference(pipe, image, noise, monkeypatch, **kw):
    return _reference("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
                      "StableDiffusion3Img2ImgPipeline", pipe, image, noise, monkeypatch, **kw)


def _assert_close(ours, ref):
    diff = np.abs(ours - ref)
    assert ours.shape == ref.shape == (H, W, 3)
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    assert ref.std() > 0.05, "reference image is flat"
    return diff


@pytest.mark.parametrize("strength, steps", [(0.6, 4), (0.3, 7)])
def test_flux_img2img_matches_diffusers(flux_schnell, monkeypatch, strength, steps):
    pipe, _, converted = flux_schnell
    image, noise = _start_image(), _noise()
    ref = _flux_reference(pipe, image, noise, monkeypatch, strength=strength, num_inference_steps=steps,
                          guidance_scale=0.0, max_sequence_length=256)
    p = load_pipeline(converted, progress=False)
    counted = []
    ours = p.generate(PROMPT, image=image, strength=strength, steps=steps, latents=noise, output_type="np",
                      on_step=lambda i, n: counted.append(n))
    diff = _assert_close(ours, ref)
    print(f"flux img2img strength {strength}: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    assert counted[-1] == steps - int(steps - steps * strength)  # the steps the cut schedule runs
    s = p.last_settings
    assert (s.width, s.height, s.strength) == (W, H, strength) and s.init_image.startswith("sha256:")
    text2img = p.generate(PROMPT, steps=steps, latents=noise, width=W, height=H, output_type="np")
    assert np.abs(text2img - ours).mean() > 0.01  # the start image matters


def test_flux_dev_img2img_matches_diffusers(flux_dev, monkeypatch):
    pipe, _, converted = flux_dev
    image, noise = _start_image(seed=1), _noise(1)
    ref = _flux_reference(pipe, image, noise, monkeypatch, strength=0.75, num_inference_steps=4, guidance_scale=3.0,
                          max_sequence_length=512)
    ours = load_pipeline(converted, progress=False).generate(PROMPT, image=image, strength=0.75, steps=4,
                                                             guidance=3.0, latents=noise, output_type="np")
    _assert_close(ours, ref)


@pytest.mark.parametrize("fixture, guidance", [("sd3", 5.0), ("sd3_no_t5", 1.0)])
def test_sd3_img2img_matches_diffusers(request, monkeypatch, fixture, guidance):
    pipe, _, converted = request.getfixturevalue(fixture)
    image, noise = _start_image(seed=2), _noise(2)
    ref = _sd3_reference(pipe, image, noise, monkeypatch, strength=0.6, num_inference_steps=5,
                         guidance_scale=guidance, negative_prompt="blurry" if guidance > 1 else None)
    ours = load_pipeline(converted, progress=False).generate(
        PROMPT, image=image, strength=0.6, steps=5, guidance=guidance, latents=noise, output_type="np",
        negative_prompt="blurry" if guidance > 1 else None)
    diff = _assert_close(ours, ref)
    print(f"{fixture} img2img: max abs {diff.max():.2e}, mean {diff.mean():.2e}")


@pytest.mark.parametrize("fixture", ["flux_schnell", "sd3"])
def test_strength_one_is_text_to_image_with_the_same_noise(request, fixture):
    p = load_pipeline(request.getfixturevalue(fixture)[2], progress=False)
    noise = _noise(4)
    a = p.generate(PROMPT, image=_start_image(), strength=1.0, steps=3, latents=noise, output_type="np")
    b = p.generate(PROMPT, steps=3, width=W, height=H, latents=noise, output_type="np")
    assert np.array_equal(a, b)


def test_sizes_inputs_and_mistakes(flux_schnell, tmp_path):
    p = load_pipeline(flux_schnell[2], progress=False)
    big = _start_image((100, 70))
    p.generate("x", image=big, steps=2, output_type="np")
    assert (p.last_settings.width, p.last_settings.height) == (96, 64)  # rounded down to the multiple of 16
    p.generate("x", image=big, steps=2, width=48, height=32, output_type="np")
    assert (p.last_settings.width, p.last_settings.height) == (48, 32)  # resized to the size asked for
    big.save(tmp_path / "start.png")
    array = np.asarray(big.resize((96, 64), Image.LANCZOS), dtype=np.float32) / 255
    by_path = p.generate("x", image=tmp_path / "start.png", steps=2, seed=1, output_type="np")
    by_array = p.generate("x", image=array, steps=2, seed=1, output_type="np")
    assert np.array_equal(by_path, by_array)  # a path, a PIL image and an array are the same start image
    steps = []
    p.generate("x", image=big, strength=0.01, steps=4, on_step=lambda i, n: steps.append(i))
    assert steps == [1]  # a tiny strength still runs the last step, as diffusers
    for kw, match in ((dict(image=_start_image((8, 40))), "too small for this model"),
                      (dict(image=big, strength=0.0), "strength must be above 0"),
                      (dict(image=big, strength=1.5), "strength must be above 0"),
                      (dict(image=big, strength=float("nan")), "strength must be a finite number"),
                      (dict(image=tmp_path / "missing.png"), "does not exist"),
                      (dict(image=np.zeros((8, 8, 3), np.uint8)), "must be float"),
                      (dict(image=np.full((32, 32, 3), 2.0, np.float32)), "in \\[0, 1\\]"),
                      (dict(image=3), "must be a PIL image")):
        with pytest.raises(InputError, match=match):
            p.generate("x", **{"steps": 2, **kw})


def test_replay_needs_the_same_start_image(flux_schnell):
    p = load_pipeline(flux_schnell[2], progress=False)
    made = p.generate_many("x", image=_start_image(), seeds=[3], steps=2, output_type="np")[0]
    again = p.replay(made.metadata(), image=_start_image(), output_type="np")
    assert np.array_equal(again.image, made.image)
    with pytest.raises(InputError, match="give it again"):
        p.replay(made.metadata())
    with pytest.raises(InputError, match="not the start image"):
        p.replay(made.metadata(), image=_start_image(seed=9))
    with pytest.warns(UserWarning, match="strength is for image-to-image"):
        p.generate("x", strength=0.5, steps=1, width=32, height=32)
    assert p.last_settings.strength is None and dict(p.last_settings.unused) == {"strength": 0.5}
