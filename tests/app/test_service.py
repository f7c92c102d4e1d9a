"""The web demo's engine without a browser: the models it offers (broken folders included, as a message), one model
in memory at a time, generations in order on its own worker thread whatever thread asks, mistakes as one-line
errors after which it keeps serving."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401
from mlx_diffusion.app.service import Service, find_models
from mlx_diffusion.errors import InputError, WeightsError
from mlx_diffusion.io.images import read_metadata

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def models_dir(tmp_path, flux_schnell):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "flux").symlink_to(flux_schnell[2], target_is_directory=True)
    (d / "broken").mkdir()
    (d / "broken" / "mlx_diffusion.json").write_text("{not json")
    (d / "not-a-model").mkdir()  # no info file: not offered
    return d


def test_the_picker_offers_builtin_converted_and_broken_models(models_dir):
    models = {m.name: m for m in find_models(models_dir)}
    assert list(models) == ["built-in", "broken", "flux"]
    assert models["built-in"].label.startswith("built-in: SD3 tiny, 8-bit,")
    assert models["flux"].family == "flux" and models["flux"].label.startswith("flux: FLUX.1 schnell, not quantized")
    assert models["broken"].problem and "broken" in models["broken"].label
    assert [m.name for m in find_models(models_dir / "missing")] == ["built-in"]


def test_generate_switch_models_and_keep_serving_after_mistakes(models_dir, tmp_path):
    service = Service(models_dir, tmp_path / "out")
    try:
        lim = service.limits("built-in")
        assert (lim.size_multiple, lim.max_size, lim.default_steps, lim.uses_negative_prompt) == (8, 64, 20, True)
        path, info = service.generate("a red circle on a blue background", model="built-in", seed=3)
        pixels = np.asarray(Image.open(path)).astype(int)
        blue = ((pixels[..., 2] > 120) & (pixels[..., 2] > pixels[..., 0] + 40)).mean()
        red = ((pixels[..., 0] > 120) & (pixels[..., 0] > pixels[..., 2] + 60)).mean()
        assert blue > 0.6 and red > 0.01, (blue, red)
        assert read_metadata(path)["seed"] == "3" and info["settings"]["model"] == "built-in"
        assert set(info["seconds"]) == {"text_encoding", "denoising", "decoding", "total"}
        json.dumps(info)  # JSON-able, for the API

        for kw, error, match in ((dict(width=50), InputError, "multiple of 8"),
                                 (dict(width=128), InputError, "at most 64"),
                                 (dict(steps=2.5), InputError, "whole number"),
                                 (dict(guidance=float("nan")), InputError, "finite"),
                                 (dict(model="broken"), WeightsError, "model broken cannot be used"),
                                 (dict(model="nope"), InputError, "no model named 'nope'")):
            with pytest.raises(error, match=match) as e:
                service.generate("x", **{"model": "built-in", "steps": 1, **kw})
            assert "\n" not in str(e.value)

        flux = service.limits("flux")  # switching releases the built-in model: one in memory
        assert service.loaded == "flux" and not flux.uses_guidance and not flux.uses_negative_prompt
        steps = []
        path, info = service.generate("a fox", "ignored", "flux", 2, 3.5, 48, 32, 1,
                                      on_step=lambda i, n: steps.append((i, n)))
        assert steps == [(1, 2), (2, 2)] and info["settings"]["guidance"] is None
        assert info["settings"]["negative_prompt"] is None and info["settings"]["unused"] == {}
        again, _ = service.generate("a red circle on a blue background", model="built-in", seed=3)
        assert np.array_equal(np.asarray(Image.open(again)), pixels)  # still serving, the same image
        assert [Path(p).name for p, _ in service.gallery] == ["0003-3.png", "0002-1.png", "0001-3.png"]
    finally:
        service.close()
    assert not service._worker.is_alive()


def test_calls_from_several_threads_run_one_after_the_other(tmp_path):
    service = Service(tmp_path / "none", tmp_path / "out")
    results = [None] * 3
    try:
        def call(i):
            results[i] = service.generate("two green squares at the top", seed=i, steps=4)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        service.close()
    spans = sorted((info["started"], info["finished"]) for _, info in results)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    assert sorted(info["settings"]["seed"] for _, info in results) == [0, 1, 2]


def test_without_gradio_the_command_says_how_to_install_it(tmp_path):
    code = "import sys; sys.modules['gradio'] = None; import runpy; runpy.run_module('mlx_diffusion.app', " \
           "run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == 'Error: the web demo needs Gradio: pip install -e ".[app]" (or ./setup.sh --test)'
