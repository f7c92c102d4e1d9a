"""tools/convert.py with `--transformer FILE`: BFL-named safetensors and GGUF transformers, checked by whole images.

The BFL files are written from the tiny diffusers model with test_names' own inverse mapping; the GGUF is written by
gguf-py with Q8_0 / Q4_0 weights, and the reference for it is diffusers run with the dequantized weights.
"""

import json

import numpy as np
import pytest
import torch

import helpers  # noqa: F401
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

import tiny_models
from test_flux_pipeline import H, PROMPT, W, _assert_close, _latents, _reference
from test_names import flux_to_original
from mlx_diffusion import load_pipeline
from helpers import cut_plan
from mlx_diffusion.convert import names
from mlx_diffusion.convert import convert
from mlx_diffusion.io.gguf import GGUFFile
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.safetensors import SafetensorsFile

quiet = dict(progress=False, log=lambda *a: None)
KW = dict(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)


def _ours(folder, latents):
    return load_pipeline(folder, progress=False).generate(PROMPT, width=W, height=H, latents=latents,
                                                          output_type="np")


@pytest.fixture(scope="module")
def schnell_reference(flux_schnell):
    pipe, _, _ = flux_schnell
    latents = _latents()
    return latents, _reference(pipe, PROMPT, latents, **KW)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_safetensors_transformer(flux_schnell, schnell_reference, tmp_path, prefix):
    pipe, src, _ = flux_schnell
    original = flux_to_original(pipe.transformer.state_dict())
    path = tmp_path / "flux1-tiny.weights"  # the kind comes from the content, not the name
    save_file({prefix + k: v.contiguous() for k, v in original.items()}, str(path))
    out = convert(src, tmp_path / "out", transformer=path, bits=None, dtype="float32", **quiet)
    info = json.loads((out / "mlx_diffusion.json").read_text())
    t = info["components"]["transformer"]
    assert info["variant"] == "schnell" and t["source_format"] == "safetensors"
    assert t["source_files"] == [str(path.resolve())] and t["quantized_layers"] == 0
    latents, ref = schnell_reference
    diff = _assert_close(_ours(out, latents), ref)
    print(f"BFL{' prefixed' if prefix else ''} file image: max abs {diff.max():.2e}, mean {diff.mean():.2e}")


def _gguf_type(name, a):
    if a.ndim != 2 or a.shape[1] % 32:
        return "F32"
    return "Q8_0" if name.startswith("double_blocks.") else "Q4_0"


def write_gguf(path, tensors: dict, arch="flux"):
    w = gguf.GGUFWriter(path, arch)
    for name, a in tensors.items():
        qtype = _gguf_type(name, a)
        data = a if qtype == "F32" else gguf.quants.quantize(a, T[qtype])
        w.add_tensor(name, data, raw_dtype=None if qtype == "F32" else T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_case(flux_schnell, tmp_path_factory):
    """(pipeline whose transformer holds the GGUF's dequantized weights, its folder, the GGUF file)."""
    from diffusers import FluxPipeline

    base, _, _ = flux_schnell
    root = tmp_path_factory.mktemp("gguf")
    # width 2 x 16 = 32: the attention projections fit GGUF's 32-wide blocks (the fixture's 48 does not)
    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                        tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                        transformer=tiny_models.tiny_flux_transformer(heads=2, head_dim=16, seed=7))
    src = tiny_models.save(pipe, root / "diffusers")
    original = {k: v.numpy().astype(np.float32) for k, v in flux_to_original(pipe.transformer.state_dict()).items()}
    path = root / "flux1-tiny-Q8_0.gguf"
    write_gguf(path, original)
    f = GGUFFile(path)
    assert {f.qtype(k) for k in f.keys()} == {"F32", "Q8_0", "Q4_0"}
    dequantized = {k: f.get(k) for k in f.keys()}
    sd = cut_plan(names.to_diffusers({k: a.shape for k, a in dequantized.items()}), dequantized)
    pipe.transformer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                     strict=True)
    return pipe, src, path


def test_gguf_dequantized_and_repacked(gguf_case, tmp_path):
    pipe, src, path = gguf_case
    latents = _latents(2)
    ref = _reference(pipe, PROMPT, latents, **KW)
    assert ref.std() > 0.05

    plain = convert(src, tmp_path / "plain", transformer=path, bits=None, dtype="float32", **quiet)
    info = json.loads((plain / "mlx_diffusion.json").read_text())["components"]["transformer"]
    assert info["quantized_layers"] == 0 and info["gguf_types"]["Q8_0"] > 0 and info["gguf_types"]["Q4_0"] > 0
    ours = _ours(plain, latents)
    diff = _assert_close(ours, ref)
    print(f"GGUF dequantized image: max abs {diff.max():.2e}, mean {diff.mean():.2e}")

    logs = []
    packed = convert(src, tmp_path / "packed", transformer=path, dtype="float32", progress=False, log=logs.append)
    layers = json.loads(SafetensorsFile(packed / "transformer" / "model.safetensors").metadata[
        "mlx_diffusion.quantization"])
    assert layers["transformer_blocks.0.attn.to_q"] == [8, 32]  # Q8_0, split out of the fused qkv
    assert layers["transformer_blocks.1.ff.net.2"] == [8, 32]
    assert layers["single_transformer_blocks.0.proj_mlp"] == [4, 32]  # Q4_0, the rest of the fused linear1
    assert layers["x_embedder"] == [4, 32]
    assert "norm_out.linear" in layers  # Q4_0 with swapped (shift, scale) halves
    assert "context_embedder" not in layers  # input width 48: stored F32 in the file, stays float
    assert not any("requantized" in line for line in logs)
    again = _ours(packed, latents)
    d = np.abs(again - ours).max()
    print(f"GGUF repacked vs dequantized: max abs {d:.2e}")
    assert d <= 1e-5


def test_errors(flux_schnell, sd3, tmp_path):
    pipe, src, _ = flux_schnell
    original = flux_to_original(pipe.transformer.state_dict())

    def fails(file, match, source=src):
        with pytest.raises(WeightsError, match=match) as e:
            convert(source, tmp_path / "out", transformer=file, bits=None, **quiet)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

    pickle = tmp_path / "model.safetensors"  # a pickle whatever its name says
    torch.save({"x": torch.zeros(2)}, pickle)
    fails(pickle, "pickle checkpoints are refused")
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    fails(cut, "truncated")
    g = tmp_path / "t.gguf"
    write_gguf(g, {"img_in.weight": np.zeros((4, 64), np.float32)})
    cut_gguf = tmp_path / "cut.gguf"
    cut_gguf.write_bytes(g.read_bytes()[:-50])
    fails(cut_gguf, "truncated")
    fails(good, "holds a flux transformer but the folder is sd3", source=sd3[1])
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in original.items() if not k.startswith("txt_in.")}
              | {"foo.weight": torch.zeros(2)}, str(partial))
    fails(partial, "1 unknown tensors: foo.weight")
    del_txt = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in original.items() if not k.startswith("txt_in.")}, str(del_txt))
    fails(del_txt, r"missing txt_in\.weight")
    no_proj = tmp_path / "no_proj.safetensors"
    save_file({k: v.contiguous() for k, v in original.items() if not k.startswith("double_blocks.1.img_attn.proj")},
              str(no_proj))
    fails(no_proj, r"2 missing: transformer_blocks\.1\.attn\.to_out\.0\.bias, transformer_blocks\.1\.attn\.to_out")


def test_cli_with_diffusers_named_file(flux_schnell, tmp_path):
    """A single file in diffusers naming, through the command line: the same tensors as converting the folder."""
    import subprocess
    import sys
    from pathlib import Path

    pipe, src, converted = flux_schnell
    path = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path))
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert.py"
    r = subprocess.run([sys.executable, str(tool), str(src), "--transformer", str(path), "-o", str(tmp_path / "o"),
                        "-q", "none", "--dtype", "float32", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = SafetensorsFile(tmp_path / "o" / "transformer" / "model.safetensors")
    b = SafetensorsFile(converted / "transformer" / "model.safetensors")
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.raw(k), b.raw(k))
