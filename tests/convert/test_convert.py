"""tools/convert.py on diffusers folders: layout, metadata, quantization, atomicity and bad input."""

import json
import shutil

import numpy as np
import pytest

import helpers  # noqa: F401
from mlx_diffusion import load_pipeline
from mlx_diffusion.convert import convert
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.safetensors import SafetensorsFile
from mlx_diffusion.models.layers import QuantizedLinear

quiet = dict(progress=False, log=lambda *a: None)


def test_float32_folder_layout_and_metadata(flux_schnell):
    _, src, out = flux_schnell
    info = json.loads((out / "mlx_diffusion.json").read_text())
    assert info["family"] == "flux" and info["variant"] == "schnell" and info["bits"] is None
    assert info["dtype"] == "float32" and info["converter_version"]
    assert set(info["components"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for c in ("tokenizer", "tokenizer_2", "scheduler"):
        assert sorted(p.name for p in (out / c).iterdir()) == sorted(p.name for p in (src / c).iterdir())
    f = SafetensorsFile(out / "transformer" / "model.safetensors")
    assert all(f.dtype(k) == "F32" for k in f.keys())
    assert json.loads(f.metadata["mlx_diffusion.quantization"]) == {}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_loads_and_stays_close(flux_schnell, tmp_path, bits):
    _, src, ref_out = flux_schnell
    out = convert(src, tmp_path / "q", bits=bits, group_size=32, dtype="bfloat16", **quiet)
    info = json.loads((out / "mlx_diffusion.json").read_text())
    t = info["components"]["transformer"]
    assert t["bits"] == bits and t["group_size"] == 32 and t["quantized_layers"] > 0
    assert info["components"]["vae"]["quantized_layers"] == 0
    layers = json.loads(SafetensorsFile(out / "transformer" / "model.safetensors").metadata["mlx_diffusion.quantization"])
    assert "transformer_blocks.0.ff.net.2" in layers  # input width 192 fits
    assert "transformer_blocks.0.attn.to_q" not in layers  # input width 48 does not fit groups of 32
    assert not any(k.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"))
                   for k in layers), "embedders and the final layer stay high precision"
    size = lambda d: sum(p.stat().st_size for p in (d / "transformer").iterdir())
    assert size(out) < 0.5 * size(ref_out)

    p = load_pipeline(out, progress=False)
    assert isinstance(p.model("transformer").transformer_blocks[0].ff.net[2], QuantizedLinear)
    latents = np.random.default_rng(0).standard_normal((1, 16, 4, 6)).astype(np.float32)
    a = p.generate("a fox", width=48, height=32, latents=latents, output_type="np")
    b = load_pipeline(ref_out, progress=False).generate("a fox", width=48, height=32, latents=latents, output_type="np")
    assert np.abs(a - b).mean() < (0.05 if bits == 4 else 0.01)


def test_existing_output_needs_force(flux_schnell, tmp_path):
    _, src, _ = flux_schnell
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(WeightsError, match="already exists"):
        convert(src, out, bits=None, dtype="float32", **quiet)
    assert (out / "keep.txt").exists()
    convert(src, out, bits=None, dtype="float32", force=True, **quiet)
    assert not (out / "keep.txt").exists() and (out / "mlx_diffusion.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_failure_midway_leaves_nothing(flux_schnell, tmp_path):
    src = _copy(flux_schnell[1], tmp_path / "src")
    f = src / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])  # truncated: found after the transformer was already written
    with pytest.raises(WeightsError, match="truncated"):
        convert(src, tmp_path / "out", **quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_and_unknown_tensors_are_listed(flux_schnell, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(flux_schnell[1], tmp_path / "src")
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    t = load_file(f)
    t.pop("proj_out.weight")
    t["extra.weight"] = t["proj_out.bias"].clone()
    save_file(t, f)
    with pytest.raises(WeightsError, match=r"1 missing: proj_out.weight; 1 unknown: extra.weight"):
        convert(src, tmp_path / "out", **quiet)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(flux_schnell, tmp_path):
    src = _copy(flux_schnell[1], tmp_path / "src")
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    cfg["joint_attention_dim"] += 8
    (src / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape mismatch.*context_embedder.weight"):
        convert(src, tmp_path / "out", **quiet)


def test_bad_options(flux_schnell, tmp_path):
    src = flux_schnell[1]
    for kw, match in ((dict(bits=7), "bit width"), (dict(group_size=48), "group size"), (dict(dtype="int8"), "dtype")):
        with pytest.raises(WeightsError, match=match):
            convert(src, tmp_path / "o", **kw, **quiet)


def test_unsupported_config_is_a_one_line_error(flux_schnell, tmp_path):
    src = _copy(flux_schnell[1], tmp_path / "src")
    cfg = json.loads((src / "vae" / "config.json").read_text())
    cfg["act_fn"] = "mish"
    (src / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unsupported AutoencoderKL configuration"):
        convert(src, tmp_path / "out", **quiet)
