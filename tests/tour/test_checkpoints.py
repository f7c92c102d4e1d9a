"""tour.checkpoints: tiny FLUX files in the layouts users download, written without torch (notebook 05 uses them).

The Q4_K encoder is checked against gguf-py's own decoder; the files are checked by what the converter makes of them:
every tensor mapped, configs derived from the shapes asked for, GGUF blocks repacked at their own widths."""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import helpers  # noqa: F401
from mlx_diffusion import load_pipeline
from mlx_diffusion.convert import convert, names
from mlx_diffusion.io.gguf import GGUFFile
from mlx_diffusion.tour import checkpoints

quiet = dict(progress=False, log=lambda *a: None)


@pytest.mark.parametrize("shape, scale", [((4, 256), 1.0), ((3, 768), 0.02), ((2, 512), 50.0)])
def test_q4_k_decodes_to_its_input_within_half_a_step(shape, scale):
    rng = np.random.default_rng(shape[1])
    a = (rng.standard_normal(shape) * scale).astype(np.float32)
    a[0, :32] = np.abs(a[0, :32]) + scale  # a sub-block with no negative value: minimum 0
    a[-1, -256:] = 0.0  # an all-zero super-block
    blocks = checkpoints.quantize_q4_k(a)
    assert blocks.shape == (shape[0], shape[1] // 256 * 144) and blocks.dtype == np.uint8
    decoded = gguf.quants.dequantize(blocks, T.Q4_K)
    sub = a.reshape(-1, 32)
    step = (sub.max(1) - np.minimum(sub.min(1), 0)) / 15
    # half a step, plus what the 6-bit scale and minimum and their fp16 factors round away
    bound = (0.5 * step + 0.06 * np.abs(sub).max(1) + 1e-7)[:, None]
    err = np.abs(decoded.reshape(-1, 32) - sub)
    assert (err <= bound).all(), float((err - bound).max())
    assert np.array_equal(decoded[-1, -256:], np.zeros(256, np.float32))
    rms = np.sqrt(((decoded - a) ** 2).mean()) / np.sqrt((a ** 2).mean())
    assert rms < 0.12, rms  # Q4_K keeps roughly 4 bits of a normal distribution


def test_q4_k_refuses_partial_super_blocks():
    with pytest.raises(ValueError, match="whole 256-value super-blocks"):
        checkpoints.quantize_q4_k(np.zeros((2, 96), np.float32))


def test_our_gguf_reader_decodes_the_encoder_as_gguf_py(tmp_path):
    a = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    path = tmp_path / "t.gguf"
    assert checkpoints.write_gguf(path, {"w": a, "b": a[:, :64].copy()},
                                  types=lambda n, x: "Q4_K" if n == "w" else "Q8_0") == {"w": "Q4_K", "b": "Q8_0"}
    f = GGUFFile(path)
    assert f.qtype("w") == "Q4_K" and f.shape("w") == (8, 512)
    np.testing.assert_array_equal(f.get("w"), gguf.quants.dequantize(checkpoints.quantize_q4_k(a), T.Q4_K))


@pytest.mark.parametrize("guidance", [False, True])
def test_the_files_convert_as_the_released_ones(tmp_path, guidance):
    files = checkpoints.write_flux_files(tmp_path / "files", hidden=384, double=2, single=1, guidance=guidance,
                                         seed=3)
    f = GGUFFile(files["transformer"])
    plan = names.to_diffusers({k: f.shape(k) for k in f.keys()})
    assert not plan.unknown and len(plan.targets) == len(f.keys())
    types = {f.qtype(k) for k in f.keys()}
    assert types == {"F32", "Q8_0", "Q4_K"}

    out = convert(None, tmp_path / "out", transformer=files["transformer"], vae=files["vae"], clip_l=files["clip_l"],
                  t5=files["t5"], bits=4, dtype="float32", **quiet)
    info = json.loads((out / "mlx_diffusion.json").read_text())
    assert (info["family"], info["variant"]) == ("flux", "dev" if guidance else "schnell")
    t = info["components"]["transformer"]
    assert t["requantized_layers"] == 0 and sorted(t["bits"]) == [4, 8]
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"],
            cfg["joint_attention_dim"], cfg["pooled_projection_dim"], cfg["guidance_embeds"]) == \
        (2, 1, 3, 128, 64, 64, guidance)
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["block_out_channels"] == [32, 64, 64, 64] and vae["latent_channels"] == 16
    t5 = json.loads((out / "text_encoder_2" / "config.json").read_text())
    assert (t5["d_model"], t5["num_heads"], t5["d_kv"], t5["num_layers"]) == (64, 2, 32, 2)

    image = load_pipeline(out, progress=False).generate("a lighthouse", seed=0, width=64, height=64,
                                                        output_type="np")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_sd3_files_convert_as_sai_ships_them(tmp_path):
    """SAI's layout: transformer and VAE in one file behind their prefixes, the text encoders beside it."""
    from mlx_diffusion.io.safetensors import SafetensorsWriter

    combined = tmp_path / "sd3_medium.safetensors"
    w = SafetensorsWriter(combined)
    checkpoints.save_safetensors(None, checkpoints.sd3_transformer(depth=2, context_dim=256, pooled_dim=192,
                                                                   pos_max=16), prefix="model.diffusion_model.",
                                 writer=w)
    checkpoints.save_safetensors(None, checkpoints.vae(channels=32, multipliers=(1, 1, 1, 1), res_blocks=1),
                                 prefix="first_stage_model.", writer=w, seed=1)
    w.close()
    clip_l = checkpoints.save_safetensors(tmp_path / "clip_l.safetensors", checkpoints.clip(hidden=64, layers=2))
    clip_g = checkpoints.save_safetensors(tmp_path / "clip_g.safetensors",
                                          checkpoints.clip(hidden=128, layers=2, projection=True))
    t5 = checkpoints.save_safetensors(tmp_path / "t5xxl_fp16.safetensors",
                                      checkpoints.t5_encoder(d_model=256, layers=1, heads=2, d_kv=32, d_ff=96),
                                      dtype="float16")
    out = convert(combined, tmp_path / "out", clip_l=clip_l, clip_g=clip_g, t5=t5, bits=None, dtype="float32",
                  **quiet)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"],
            cfg["pos_embed_max_size"]) == (2, 2, 256, 192, 16)
    image = load_pipeline(out, progress=False).generate("a lighthouse", seed=0, width=64, height=64, steps=2,
                                                        output_type="np")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
