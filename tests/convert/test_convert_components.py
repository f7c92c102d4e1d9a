"""tools/convert.py with `--vae`, `--clip-l`, `--clip-g`, `--t5`: the VAE and text encoders from single files.

From the tiny SD3 pipeline: a BFL-style `ae.safetensors` (LDM names, test_names' own inverse mapping), ComfyUI-style
clip_l / clip_g / t5xxl files (transformers names, with and without `transformer.`/`text_model.` prefixes, extra
logit_scale / position_ids, T5 with only the untied `encoder.embed_tokens`), and an SAI-style combined file. Each
conversion must give exactly the tensors that converting the plain folder gives, and the same image.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers  # noqa: F401
from helpers import IMAGE_MAX
from test_names import sd3_to_original, vae_to_original
from test_sd3_pipeline import PROMPT, _latents, _ours
from mlx_diffusion.convert import convert
from mlx_diffusion.errors import WeightsError

quiet = dict(bits=None, dtype="float32", progress=False, log=lambda *a: None)
TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _sd(module):
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _t5_file(sd):
    """As single-file T5 exports often are: the embedding only as `encoder.embed_tokens`."""
    sd = dict(sd)
    shared = sd.pop("shared.weight")
    sd["encoder.embed_tokens.weight"] = shared
    return sd


@pytest.fixture(scope="module")
def files(sd3, tmp_path_factory):
    pipe = sd3[0]
    root = tmp_path_factory.mktemp("single_files")
    vae = vae_to_original(_sd(pipe.vae))
    clip_l, clip_g, t5 = _sd(pipe.text_encoder), _sd(pipe.text_encoder_2), _sd(pipe.text_encoder_3)
    # ComfyUI-style: clip_l with the transformers names plus CLIP leftovers, clip_g under `transformer.` and
    # without `text_model.` (the model's sanitize puts it back)
    clip_l_file = clip_l | {"logit_scale": torch.tensor(4.6),
                            "text_model.embeddings.position_ids": torch.arange(77)[None]}
    clip_g_file = {"transformer." + k.removeprefix("text_model."): v for k, v in clip_g.items()}
    combined = {"model.diffusion_model." + k: v for k, v in sd3_to_original(_sd(pipe.transformer)).items()}
    combined |= {"first_stage_model." + k: v for k, v in vae.items()}
    for prefix, sd in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", _t5_file(t5))):
        combined |= {f"text_encoders.{prefix}.transformer.{k}": v for k, v in sd.items()}
    return {
        "vae": _save(root / "ae.safetensors", vae),
        "vae_sai": _save(root / "vae_sai.safetensors", {"first_stage_model." + k: v for k, v in vae.items()}),
        "vae_diffusers": _save(root / "diffusion_pytorch_model.safetensors", _sd(pipe.vae)),
        "clip_l": _save(root / "clip_l.safetensors", clip_l_file),
        "clip_g": _save(root / "clip_g.safetensors", clip_g_file),
        "t5": _save(root / "t5xxl_fp16.safetensors", _t5_file(t5)),
        "combined": _save(root / "sd3_tiny_combined.safetensors", combined),
    }


def _assert_same_tensors(out, plain, components):
    for c in components:
        got, want = mx.load(str(out / c / "model.safetensors")), mx.load(str(plain / c / "model.safetensors"))
        assert set(got) == set(want), c
        for k, v in want.items():
            assert got[k].shape == v.shape and mx.array_equal(got[k], v).item(), f"{c}: {k}"
        assert json.loads((out / c / "config.json").read_text()) == json.loads((plain / c / "config.json").read_text())


@pytest.mark.parametrize("vae", ["vae", "vae_sai", "vae_diffusers"])
def test_vae_file(sd3, files, tmp_path, vae):
    _, src, plain = sd3
    out = convert(src, tmp_path / "out", vae=files[vae], **quiet)
    _assert_same_tensors(out, plain, ["vae"])
    info = json.loads((out / "mlx_diffusion.json").read_text())["components"]["vae"]
    assert info["source_files"] == [str(files[vae].resolve())] and info["class"] == "AutoencoderKL"


def test_comfyui_text_encoder_files_and_image(sd3, files, tmp_path):
    _, src, plain = sd3
    out = convert(src, tmp_path / "out", vae=files["vae"], clip_l=files["clip_l"], clip_g=files["clip_g"],
                  t5=files["t5"], **quiet)
    _assert_same_tensors(out, plain, ["vae", *TEXT])
    latents = _latents()
    ours, ref = (_ours(f, PROMPT, latents, steps=2, guidance=5.0) for f in (out, plain))
    diff = np.abs(ours - ref).max()
    assert ref.std() > 0.05 and diff <= IMAGE_MAX, f"max abs {diff:.2e}"
    print(f"single-file VAE + text encoders image vs plain folder: max abs {diff:.2e}")


def test_sai_combined_file(sd3, files, tmp_path):
    """The same combined file for every part: each takes its own prefix and ignores the others."""
    _, src, plain = sd3
    f = files["combined"]
    out = convert(src, tmp_path / "out", vae=f, clip_l=f, clip_g=f, t5=f, **quiet)
    _assert_same_tensors(out, plain, ["vae", *TEXT])


def _fails(src, tmp_path, match, **kw):
    with pytest.raises(WeightsError, match=match):
        convert(src, tmp_path / "out", **kw, **quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_errors(sd3, sd3_no_t5, files, tmp_path):
    _, src, _ = sd3
    vae = load_file(str(files["vae"]))
    extra = _save(tmp_path / "extra.safetensors", vae | {"decoder.mid.attn_2.q.weight": torch.ones(2, 2)})
    _fails(src, tmp_path, r"1 unknown tensors: decoder\.mid\.attn_2\.q\.weight", vae=extra)
    partial = _save(tmp_path / "partial.safetensors", {k: v for k, v in vae.items() if k != "decoder.conv_out.bias"})
    _fails(src, tmp_path, r"1 missing: decoder\.conv_out\.bias", vae=partial)
    _fails(src, tmp_path, r"tensor shape mismatches", clip_l=files["clip_g"])  # CLIP-G is wider than CLIP-L
    t5_only = _save(tmp_path / "t5_only.safetensors", {"text_encoders.t5xxl.transformer.shared.weight": torch.ones(2, 2)})
    _fails(src, tmp_path, r"no vae tensors", vae=t5_only)
    _fails(sd3_no_t5[1], tmp_path, r"has no t5", t5=files["t5"])
    _fails(src, tmp_path, r"file not found", clip_g=tmp_path / "nope.safetensors")
