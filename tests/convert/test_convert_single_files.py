"""tools/convert.py with no diffusers folder: models made only of single checkpoint files, checked by whole images.

The files are written from tiny diffusers pipelines in the original namings with test_names' inverse mappings:
SAI's combined SD3 file (`model.diffusion_model.*`, `first_stage_model.*`, `text_encoders.{clip_l,clip_g,t5xxl}.*`;
CLIP-L without a text projection, as SAI ships it) and FLUX as users download it (BFL `flux1-*.safetensors` or a
GGUF, `ae.safetensors`, ComfyUI's `clip_l.safetensors` and `t5xxl_fp16.safetensors`). Every config is then derived
from tensor shapes, so the tiny models have what the real ones have and shapes cannot tell: 64-wide heads in the
SD3 transformer and in CLIP, FLUX's 128-wide heads with RoPE axes (16, 56, 56), 32 VAE norm groups, the released
CLIP token ids, sample sizes; the tokenizers and schedulers come from the package's assets.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import helpers
import tiny_models
import test_flux_pipeline as flux_ref
import test_sd3_pipeline as sd3_ref
from test_names import flux_to_original, sd3_to_original, vae_to_original
from mlx_diffusion import load_pipeline
from mlx_diffusion.convert import convert
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.safetensors import SafetensorsFile

quiet = dict(bits=None, dtype="float32", progress=False, log=lambda *a: None)


def _clip(hidden, heads, act, projection, seed):
    """A CLIP text encoder with the released configs' legacy token ids (eos 2: pooled at the highest token id)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return helpers.init_weights_(model, 1.0, seed=seed)


def _vae(scaling, shift, seed):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,) * 4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift).eval()
    return helpers.init_weights_(vae, 0.2, seed=seed)  # 0.2: see tiny_models.tiny_vae


def _sd(module):
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _t5_file(sd):
    """As T5 single files often are: the embedding only as `encoder.embed_tokens`."""
    sd = dict(sd)
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    return sd


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _config_classes():
    from mlx_diffusion.models.clip import CLIPTextConfig
    from mlx_diffusion.models.flux import FluxConfig
    from mlx_diffusion.models.sd3 import SD3Config
    from mlx_diffusion.models.t5 import T5Config
    from mlx_diffusion.models.vae import VAEConfig

    return {"transformer": {"flux": FluxConfig, "sd3": SD3Config}, "vae": VAEConfig, "t5": T5Config,
            "clip": CLIPTextConfig}


def _assert_same_configs(out, pipe, family):
    """(c) What our config classes read from the derived config.json equals what they read from diffusers'."""
    classes = _config_classes()
    for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ref = getattr(pipe, c, None)
        if ref is None:
            continue
        cls = classes.get(c) or (classes["t5"] if "T5" in type(ref).__name__ else classes["clip"])
        cls = cls[family] if isinstance(cls, dict) else cls
        # transformers configs name their class only once saved
        theirs = dict(ref.config) if isinstance(ref.config, dict) else ref.config.to_dict()
        theirs = cls.from_dict({**theirs, "architectures": [type(ref).__name__]})
        ours = cls.from_dict(json.loads((out / c / "config.json").read_text()))
        if c == "transformer" and family == "flux":  # diffusers: out_channels None means in_channels
            ours.out_channels, theirs.out_channels = ours.out_channels or ours.in_channels, theirs.out_channels or 64
        assert ours == theirs, c


# --------------------------------------------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """(diffusers pipeline, SAI combined file, SAI transformer + VAE file, CLIP-L file, CLIP-G file)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 0.0609, seed=31),
        text_encoder=_clip(64, 1, "quick_gelu", True, seed=32),
        tokenizer=clip_tok,
        text_encoder_2=_clip(128, 2, "gelu", True, seed=33),
        tokenizer_2=CLIPTokenizer.from_pretrained(helpers.CLIP_TOKENIZER, pad_token="!"),
        text_encoder_3=tiny_models.tiny_t5(d_model=192, heads=3, d_kv=32, seed=34),
        tokenizer_3=t5_tok,
        transformer=tiny_models.tiny_sd3_transformer(layers=2, heads=2, head_dim=64, joint_dim=192, caption_dim=128,
                                                     pooled_dim=64 + 128, max_pos=10, sample_size=128, seed=35),
    )
    with torch.no_grad():  # SAI's CLIP-L has no projection: their code and diffusers' loader use the identity
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(64))
    root = tmp_path_factory.mktemp("sd3_files")
    clip_l = {k: v for k, v in _sd(pipe.text_encoder).items() if k != "text_projection.weight"}
    clip_g = _sd(pipe.text_encoder_2)
    base = {"model.diffusion_model." + k: v for k, v in sd3_to_original(_sd(pipe.transformer)).items()}
    base |= {"first_stage_model." + k: v for k, v in vae_to_original(_sd(pipe.vae)).items()}
    combined = dict(base)
    for prefix, sd in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", _t5_file(_sd(pipe.text_encoder_3)))):
        combined |= {f"text_encoders.{prefix}.transformer.{k}": v for k, v in sd.items()}
    return (pipe, _save(root / "sd3_medium_incl_clips_t5xxlfp16.safetensors", combined),
            _save(root / "sd3_medium.safetensors", base), _save(root / "clip_l.safetensors", clip_l),
            _save(root / "clip_g.safetensors", clip_g))


def test_sd3_combined_file_alone(sd3_files, tmp_path):
    """(a) SAI's combined file and nothing else: the image equals diffusers'."""
    pipe, combined, *_ = sd3_files
    logs = []
    out = convert(combined, tmp_path / "out", bits=None, dtype="float32", progress=False, log=logs.append)
    assert any("no CLIP-L text_projection.weight; using the identity" in line for line in logs)
    info = json.loads((out / "mlx_diffusion.json").read_text())
    assert (info["family"], info["variant"], info["source"]) == ("sd3", "3", str(combined.resolve()))
    assert set(info["components"]) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert all(e["source_files"] == [str(combined.resolve())] for e in info["components"].values())
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["tokenizer_3"][0] == "transformers"
    assert json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    _assert_same_configs(out, pipe, "sd3")

    latents = sd3_ref._latents()
    kw = dict(negative_prompt=sd3_ref.NEGATIVE, num_inference_steps=3, guidance_scale=7.0)
    ref = sd3_ref._reference(pipe, sd3_ref.PROMPT, latents, **kw)
    ours = sd3_ref._ours(out, sd3_ref.PROMPT, latents, negative_prompt=sd3_ref.NEGATIVE, steps=3, guidance=7.0)
    diff = sd3_ref._assert_close(ours, ref)
    print(f"SD3 from the SAI combined file alone: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    other = sd3_ref._reference(pipe, "a green tractor in a field", latents, **kw)
    assert np.abs(other - ref).mean() > 0.01  # the prompt matters far beyond the tolerance


def test_sd3_transformer_file_with_text_encoder_files_no_t5(sd3_files, tmp_path):
    """`sd3_medium.safetensors` (transformer + VAE) with separate CLIP files and no T5: diffusers without T5."""
    from diffusers import StableDiffusion3Pipeline

    pipe, _, base, clip_l, clip_g = sd3_files
    logs = []
    out = convert(None, tmp_path / "out", transformer=base, clip_l=clip_l, clip_g=clip_g, bits=None,
                  dtype="float32", progress=False, log=logs.append)
    assert any("no T5 text encoder given" in line for line in logs)
    assert not (out / "text_encoder_3").exists() and not (out / "tokenizer_3").exists()
    assert json.loads((out / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    latents = sd3_ref._latents(1)
    ref = sd3_ref._reference(no_t5, sd3_ref.PROMPT, latents, num_inference_steps=2, guidance_scale=5.0)
    p = load_pipeline(out, progress=False)
    assert not p.use_t5
    ours = p.generate(sd3_ref.PROMPT, steps=2, guidance=5.0, width=sd3_ref.W, height=sd3_ref.H, latents=latents,
                      output_type="np")
    sd3_ref._assert_close(ours, ref)


# -------------------------------------------------------------------------------------------------------------- FLUX


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """(diffusers pipeline, {flux1, ae, clip_l, t5}: the files FLUX.1 users download)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip_tok, t5_tok = tiny_models.tokenizers()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**tiny_models.SCHNELL_SCHEDULER),
        vae=_vae(0.3611, 0.1159, seed=41),
        text_encoder=_clip(64, 1, "quick_gelu", False, seed=42),
        tokenizer=clip_tok,
        text_encoder_2=tiny_models.tiny_t5(d_model=64, heads=2, d_kv=32, seed=43),
        tokenizer_2=t5_tok,
        transformer=tiny_models.tiny_flux_transformer(heads=2, head_dim=128, axes=(16, 56, 56), joint_dim=64,
                                                      pooled_dim=64, seed=44),
    )
    root = tmp_path_factory.mktemp("flux_files")
    # ComfyUI's CLIP-L files may carry OpenAI's text projection, which FLUX does not use
    clip_l = _sd(pipe.text_encoder) | {"text_projection.weight": torch.randn(64, 64)}
    return pipe, {
        "flux1": _save(root / "flux1-schnell.safetensors", flux_to_original(_sd(pipe.transformer))),
        "ae": _save(root / "ae.safetensors", vae_to_original(_sd(pipe.vae))),
        "clip_l": _save(root / "clip_l.safetensors", clip_l),
        "t5": _save(root / "t5xxl_fp16.safetensors", _t5_file(_sd(pipe.text_encoder_2))),
    }


def _write_f32_gguf(path, tensors):
    import gguf

    w = gguf.GGUFWriter(path, "flux")
    for name, a in tensors.items():
        w.add_tensor(name, a.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_flux_from_bfl_files(flux_files, tmp_path):
    """(b) flux1 + ae + clip_l + t5xxl files, no folder: the image equals diffusers'."""
    pipe, files = flux_files
    out = convert(files["flux1"], tmp_path / "out", vae=files["ae"], clip_l=files["clip_l"], t5=files["t5"], **quiet)
    info = json.loads((out / "mlx_diffusion.json").read_text())
    assert (info["family"], info["variant"]) == ("flux", "schnell")
    assert info["components"]["text_encoder"]["source_files"] == [str(files["clip_l"].resolve())]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["use_dynamic_shifting"] is False
    assert "text_projection.weight" not in SafetensorsFile(out / "text_encoder" / "model.safetensors").keys()
    _assert_same_configs(out, pipe, "flux")

    latents = flux_ref._latents()
    kw = dict(num_inference_steps=2, guidance_scale=0.0, max_sequence_length=256)
    ref = flux_ref._reference(pipe, flux_ref.PROMPT, latents, **kw)
    ours = load_pipeline(out, progress=False).generate(flux_ref.PROMPT, steps=2, width=flux_ref.W, height=flux_ref.H,
                                                       latents=latents, output_type="np")
    diff = flux_ref._assert_close(ours, ref)
    print(f"FLUX from BFL / ComfyUI files: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    flux_ref._assert_informative(pipe, ref, latents, **kw)


def test_flux_gguf_transformer_through_the_cli(flux_files, tmp_path):
    """No SOURCE, `--transformer x.gguf` and the other files: the same tensors as from the safetensors files."""
    pipe, files = flux_files
    path = tmp_path / "flux1-schnell-F32.gguf"
    _write_f32_gguf(path, flux_to_original(_sd(pipe.transformer)))
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert.py"
    r = subprocess.run([sys.executable, str(tool), "--transformer", str(path), "--vae", str(files["ae"]),
                        "--clip-l", str(files["clip_l"]), "--t5", str(files["t5"]), "-o", str(tmp_path / "g"),
                        "-q", "none", "--dtype", "float32", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plain = convert(files["flux1"], tmp_path / "s", vae=files["ae"], clip_l=files["clip_l"], t5=files["t5"], **quiet)
    for c in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = (SafetensorsFile(d / c / "model.safetensors") for d in (tmp_path / "g", plain))
        assert set(a.keys()) == set(b.keys()), c
        for k in a.keys():
            np.testing.assert_array_equal(a.raw(k), b.raw(k), err_msg=f"{c}: {k}")
        assert (tmp_path / "g" / c / "config.json").read_text() == (plain / c / "config.json").read_text()
    for f in ("tokenizer/vocab.json", "tokenizer_2/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / "g" / f).read_bytes() == (plain / f).read_bytes()


# ------------------------------------------------------------------------------------------------------------ errors


def test_errors(sd3_files, flux_files, tmp_path):
    """(d) One-line errors naming what is missing; nothing is left behind."""
    _, combined, base, clip_l, clip_g = sd3_files
    _, files = flux_files

    def fails(match, source, **kw):
        with pytest.raises(WeightsError, match=match) as e:
            convert(source, tmp_path / "out", **kw, **quiet)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    fails(r"sd3_medium\.safetensors: holds no CLIP-L, CLIP-G, which SD3 needs: give --clip-l FILE --clip-g FILE "
          r"\(and --t5 FILE for T5\), or a diffusers folder as SOURCE", base)
    fails(r"holds no CLIP-G, which SD3 needs: give --clip-g FILE \(and --t5", base, clip_l=clip_l)
    fails(r"flux1-schnell\.safetensors: holds no VAE, CLIP-L, T5, which FLUX\.1 needs: give --vae FILE --clip-l FILE "
          r"--t5 FILE, or a diffusers folder as SOURCE", files["flux1"])
    fails(r"holds no T5, which FLUX\.1 needs", None, transformer=files["flux1"], vae=files["ae"],
          clip_l=files["clip_l"])
    fails(r"a flux model takes no CLIP-G text encoder", files["flux1"], clip_g=clip_g)
    fails(r"either as SOURCE or as a transformer file, not both", files["flux1"], transformer=files["flux1"])
    diffusers_named = _save(tmp_path / "diffusion_pytorch_model.safetensors", _sd(flux_files[0].transformer))
    fails(r"no FLUX or SD3 transformer in the original \(BFL / SAI\) naming", diffusers_named)
    fails(r"clip_g\.safetensors: CLIP-L width 128 does not fit the transformer's pooled_projection_dim 64",
          files["flux1"], vae=files["ae"], clip_l=clip_g, t5=files["t5"])
    fails(r"nothing to convert", None)
    fails(r"not a diffusers model folder or a checkpoint file \(no such file or folder\)", tmp_path / "nope")
