"""A weight holding NaN or infinity is named, never carried into a model: by the converter when it would write one
(also when casting to float16 overflows), and when a converted folder's component is loaded."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import helpers  # noqa: F401
from mlx_diffusion import load_pipeline
from mlx_diffusion.convert import convert
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.safetensors import SafetensorsFile


def _spoil(path, value, pick=0):
    """Put `value` into one float tensor of a safetensors file (keeping its metadata); returns the tensor's name."""
    tensors = load_file(path)
    name = sorted(k for k, v in tensors.items() if v.dtype.kind == "f" and v.size > 1)[pick]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[1] = value
    save_file(tensors, path, metadata=SafetensorsFile(path).metadata or None)
    return name


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_the_converter_names_a_nan_or_infinite_weight_and_writes_nothing(flux_schnell, tmp_path, value):
    src = shutil.copytree(flux_schnell[1], tmp_path / "src")
    name = _spoil(src / "vae" / "diffusion_pytorch_model.safetensors", value)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="NaN or infinite") as e:
        convert(src, out, bits=None, dtype="float32", progress=False, log=lambda *a: None)
    assert name.rsplit(".", 1)[0] in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_float16_overflow_is_named_as_such(flux_schnell, tmp_path):
    src = shutil.copytree(flux_schnell[1], tmp_path / "src")
    _spoil(src / "vae" / "diffusion_pytorch_model.safetensors", 1e6)  # finite in float32, infinite in float16
    with pytest.raises(WeightsError, match="after the cast to float16"):
        convert(src, tmp_path / "out", bits=None, dtype="float16", progress=False, log=lambda *a: None)


def test_loading_a_folder_with_a_nan_weight_names_it(flux_schnell, tmp_path):
    folder = shutil.copytree(flux_schnell[2], tmp_path / "model")
    name = _spoil(folder / "vae" / "model.safetensors", np.nan)
    pipe = load_pipeline(folder, progress=False)
    with pytest.raises(WeightsError, match=f"{name} holds NaN or infinite values"):
        pipe.generate("x", steps=1, width=32, height=32)
