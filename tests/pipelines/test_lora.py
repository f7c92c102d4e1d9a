"""LoRA against diffusers: random rank-4 LoRAs on tiny random FLUX and SD3 models, in diffusers/PEFT and kohya layouts
(text encoder included), loaded into diffusers with `load_lora_weights` + `fuse_lora(lora_scale=0.7)`, give the same
image as ours. Where diffusers cannot read a tiny model's file (kohya's linear1, whose widths it hard-codes) and for
BFL and XLabs files, the file is proved equal to the PEFT file holding the same update. Quantized models keep the
update beside the quantized weight; the converter can bake it in; image-to-image and LoRA go together."""

import copy

import numpy as np
import pytest
from safetensors.numpy import save_file

import helpers  # noqa: F401
from helpers import IMAGE_MAX, IMAGE_MEAN
from mlx_diffusion import load_pipeline
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.folder import linear_shapes

H, W = 64, 96
PROMPT = "a photo of a red fox, 35mm, golden hour!"
RANK, SCALE = 4, 0.7


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)


def _peft(shapes: dict, layers: list[str], seed=0, component="transformer") -> dict:
    """A random PEFT-layout LoRA for `layers` ({layer: (out, in)} from the model), large enough to change the image."""
    rng = np.random.default_rng(seed)
    sd = {}
    for layer in layers:
        out_dims, in_dims = shapes[layer]
        sd[f"{component}.{layer}.lora_A.weight"] = (rng.standard_normal((RANK, in_dims)) / np.sqrt(in_dims)).astype(np.float32)
        sd[f"{component}.{layer}.lora_B.weight"] = (rng.standard_normal((out_dims, RANK)) * 0.3).astype(np.float32)
    return sd


FLUX_LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
               "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
               "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
               "single_transformer_blocks.1.proj_out", "context_embedder", "x_embedder"]
SD3_LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.ff.net.0.proj", "context_embedder",
              "transformer_blocks.1.ff_context.net.2", "transformer_blocks.2.attn.to_k"]


def _reference_flux(pipe, sd, noise, **kw):
    import torch
    from diffusers import FluxPipeline

    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights({k: torch.from_numpy(v) for k, v in sd.items()})
    # FLUX fuses only the transformer unless told (its text encoder's LoRA would run at scale 1.0)
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=SCALE)
    packed = FluxPipeline._pack_latents(torch.from_numpy(noise), 1, 16, H // 8, W // 8)
    with torch.no_grad():
        return pipe(PROMPT, height=H, width=W, latents=packed, output_type="np", **kw).images[0]


def _reference_sd3(pipe, sd, noise, **kw):
    import torch

    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights({k: torch.from_numpy(v) for k, v in sd.items()})
    pipe.fuse_lora(lora_scale=SCALE)
    with torch.no_grad():
        return pipe(PROMPT, height=H, width=W, latents=torch.from_numpy(noise), output_type="np", **kw).images[0]


def _assert_close(ours, ref):
    diff = np.abs(ours - ref)
    assert diff.max() <= IMAGE_MAX and diff.mean() <= IMAGE_MEAN, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    return diff


def test_flux_peft_lora_matches_diffusers(flux_schnell, tmp_path):
    pipe, _, converted = flux_schnell
    sd = _peft(linear_shapes(converted / "transformer"), FLUX_LAYERS)
    save_file(sd, tmp_path / "lora.safetensors")
    noise = _noise()
    kw = dict(num_inference_steps=3, guidance_scale=0.0, max_sequence_length=256)
    ref = _reference_flux(pipe, sd, noise, **kw)
    ours = load_pipeline(converted, progress=False, lora=[(tmp_path / "lora.safetensors", SCALE)]).generate(
        PROMPT, steps=3, width=W, height=H, latents=noise, output_type="np")
    diff = _assert_close(ours, ref)
    print(f"flux LoRA: max abs {diff.max():.2e}, mean {diff.mean():.2e}")
    plain = load_pipeline(converted, progress=False).generate(PROMPT, steps=3, width=W, height=H, latents=noise,
                                                              output_type="np")
    assert np.abs(plain - ours).mean() > 0.01  # the LoRA changes the image far beyond the tolerance
    zero = load_pipeline(converted, progress=False, lora=[(tmp_path / "lora.safetensors", 0.0)]).generate(
        PROMPT, steps=3, width=W, height=H, latents=noise, output_type="np")
    assert np.array_equal(zero, plain)  # scale 0: exactly the image without it


@pytest.mark.parametrize("fixture, guidance", [("sd3", 5.0)])
def test_sd3_peft_lora_matches_diffusers(request, tmp_path, fixture, guidance):
    pipe, _, converted = request.getfixturevalue(fixture)
    sd = _peft(linear_shapes(converted / "transformer"), SD3_LAYERS, seed=1)
    save_file(sd, tmp_path / "lora.safetensors")
    noise = _noise(1)
    ref = _reference_sd3(pipe, sd, noise, num_inference_steps=3, guidance_scale=guidance)
    ours = load_pipeline(converted, progress=False, lora=[(tmp_path / "lora.safetensors", SCALE)]).generate(
        PROMPT, steps=3, guidance=guidance, width=W, height=H, latents=noise, output_type="np")
    diff = _assert_close(ours, ref)
    print(f"sd3 LoRA: max abs {diff.max():.2e}, mean {diff.mean():.2e}")


def _kohya_flux(peft: dict, alpha: float) -> dict:
    """The same update in kohya's layout over BFL's names: fused qkv / linear1 with one down and stacked ups,
    alpha stored (so up is divided by alpha / rank)."""
    sd = {}
    A = lambda layer: peft[f"transformer.{layer}.lora_A.weight"]  # noqa: E731
    B = lambda layer: peft[f"transformer.{layer}.lora_B.weight"] / (alpha / RANK)  # noqa: E731
    q = "transformer_blocks.0.attn"
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = A(f"{q}.to_q")
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = np.concatenate([B(f"{q}.to_q"), B(f"{q}.to_k"),
                                                                                  B(f"{q}.to_v")])
    sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = np.array(alpha, np.float32)
    s = "single_transformer_blocks.0"
    sd["lora_unet_single_blocks_0_linear1.lora_down.weight"] = A(f"{s}.attn.to_q")
    sd["lora_unet_single_blocks_0_linear1.lora_up.weight"] = np.concatenate(
        [B(f"{s}.attn.to_q"), B(f"{s}.attn.to_k"), B(f"{s}.attn.to_v"), B(f"{s}.proj_mlp")])
    sd["lora_unet_single_blocks_0_linear1.alpha"] = np.array(alpha, np.float32)
    sd["lora_unet_double_blocks_1_txt_mlp_2.lora_down.weight"] = A("transformer_blocks.1.ff_context.net.2")
    sd["lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight"] = B("transformer_blocks.1.ff_context.net.2")
    sd["lora_unet_double_blocks_1_txt_mlp_2.alpha"] = np.array(alpha, np.float32)
    return sd


def _fused_peft(shapes, seed=2):
    """A PEFT LoRA whose fused groups share their down weight (as a kohya file over fused layers must)."""
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
              "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
              "transformer_blocks.1.ff_context.net.2"]
    sd = _peft(shapes, layers, seed)
    for group in (layers[:3], layers[3:7]):
        for layer in group[1:]:
            sd[f"transformer.{layer}.lora_A.weight"] = sd[f"transformer.{group[0]}.lora_A.weight"]
    return sd


def test_kohya_bfl_and_xlabs_layouts_equal_the_peft_file(flux_schnell, tmp_path):
    _, _, converted = flux_schnell
    peft = _fused_peft(linear_shapes(converted / "transformer"))
    kohya = _kohya_flux(peft, alpha=8.0)
    bfl = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv")
           .replace("lora_unet_single_blocks_0_linear1", "diffusion_model.single_blocks.0.linear1")
           .replace("lora_unet_double_blocks_1_txt_mlp_2", "diffusion_model.double_blocks.1.txt_mlp.2")
           .replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in kohya.items()}
    for name, sd in (("peft", peft), ("kohya", kohya), ("bfl", bfl)):
        save_file(sd, tmp_path / f"{name}.safetensors")
    noise = _noise(3)
    images = {name: load_pipeline(converted, progress=False, lora=[(tmp_path / f"{name}.safetensors", SCALE)])
              .generate(PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np")
              for name in ("peft", "kohya", "bfl")}
    assert np.abs(images["kohya"] - images["peft"]).max() <= 1e-5
    assert np.abs(images["bfl"] - images["peft"]).max() <= 1e-5

    # XLabs: qkv and proj of double blocks' image (1) and text (2) streams, no alpha
    rng = np.random.default_rng(5)
    shapes = linear_shapes(converted / "transformer")
    out_dims, in_dims = shapes["transformer_blocks.0.attn.to_q"]
    down, up = rng.standard_normal((RANK, in_dims)).astype(np.float32), rng.standard_normal((3 * out_dims, RANK)).astype(np.float32) * 0.1
    save_file({"double_blocks.0.processor.qkv_lora2.down.weight": down,
               "double_blocks.0.processor.qkv_lora2.up.weight": up}, tmp_path / "xlabs.safetensors")
    same = {f"transformer.transformer_blocks.0.attn.add_{p}_proj.lora_{ab}.weight": v
            for i, p in enumerate("qkv") for ab, v in (("A", down), ("B", up[i * out_dims:(i + 1) * out_dims]))}
    save_file(same, tmp_path / "same.safetensors")
    a, b = (load_pipeline(converted, progress=False, lora=[(tmp_path / f"{n}.safetensors", 1.0)]).generate(
        PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np") for n in ("xlabs", "same"))
    assert np.abs(a - b).max() <= 1e-5


def test_several_loras_add_up_and_quantized_layers_keep_it_beside(flux_schnell, tmp_path):
    _, src, converted = flux_schnell
    shapes = linear_shapes(converted / "transformer")
    one, two = _peft(shapes, FLUX_LAYERS[:6], seed=7), _peft(shapes, FLUX_LAYERS[3:], seed=8)
    save_file(one, tmp_path / "one.safetensors")
    save_file(two, tmp_path / "two.safetensors")
    both = {}
    for sd, scale in ((one, 0.5), (two, 0.8)):
        for k, v in sd.items():
            both.setdefault(k, []).append(v * (scale if "lora_B" in k else 1))
    merged = {}
    for k, vs in both.items():  # rank-stacked: the sum of both updates
        merged[k] = np.concatenate(vs, axis=0 if "lora_A" in k else 1)
    save_file(merged, tmp_path / "merged.safetensors")
    noise = _noise(4)
    run = lambda folder, lora: load_pipeline(folder, progress=False, lora=lora).generate(  # noqa: E731
        PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np")
    a = run(converted, [(tmp_path / "one.safetensors", 0.5), (tmp_path / "two.safetensors", 0.8)])
    b = run(converted, [(tmp_path / "merged.safetensors", 1.0)])
    assert np.abs(a - b).max() <= 1e-5

    # a 8-bit model: the update is added beside the quantized weight; LoRA's effect survives quantization
    from mlx_diffusion.convert import convert

    q8 = convert(src, tmp_path / "q8", bits=8, dtype="float32", progress=False, log=lambda *a: None)
    with_lora, without = run(q8, [(tmp_path / "one.safetensors", 0.5)]), run(q8, [])
    exact = run(converted, [(tmp_path / "one.safetensors", 0.5)])
    quant_err = np.abs(run(converted, []) - without).max()
    assert np.abs(with_lora - exact).max() <= 2 * quant_err + 1e-3, (np.abs(with_lora - exact).max(), quant_err)
    assert np.abs(with_lora - without).mean() > 0.005


def test_lora_mistakes_are_one_line(flux_schnell, tmp_path):
    _, _, converted = flux_schnell
    shapes = linear_shapes(converted / "transformer")
    sd = _peft(shapes, FLUX_LAYERS[:2])
    cases = {
        "stray": {**sd, "transformer.no_such_layer.lora_A.weight": sd[next(iter(sd))],
                  "transformer.no_such_layer.lora_B.weight": sd[list(sd)[1]]},
        "shape": {**sd, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((RANK, 7), np.float32)},
        "empty": {"something.else": np.zeros(3, np.float32)},
    }
    for name, bad in cases.items():
        save_file(bad, tmp_path / f"{name}.safetensors")
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04pickle")
    for file, match in (("stray", "match no layer of this model, e.g. transformer.no_such_layer.lora_A.weight"),
                        ("shape", "transformer.transformer_blocks.0.attn.to_q takes 7 inputs"),
                        ("empty", "no LoRA weights found")):
        with pytest.raises(WeightsError, match=match) as e:
            load_pipeline(converted, progress=False, lora=[(tmp_path / f"{file}.safetensors", 1.0)])
        assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="pickle files are never loaded"):
        load_pipeline(converted, progress=False, lora=tmp_path / "lora.ckpt")
    with pytest.raises(WeightsError, match="scale must be a finite number"):
        load_pipeline(converted, progress=False, lora=[(tmp_path / "stray.safetensors", float("nan"))])


def test_baked_into_a_converted_folder(flux_schnell, tmp_path):
    from mlx_diffusion.convert import convert

    _, src, converted = flux_schnell
    sd = _peft(linear_shapes(converted / "transformer"), FLUX_LAYERS, seed=11)
    save_file(sd, tmp_path / "lora.safetensors")
    baked = convert(src, tmp_path / "baked", bits=None, dtype="float32", progress=False, log=lambda *a: None,
                    lora=[(tmp_path / "lora.safetensors", SCALE)])
    noise = _noise(6)
    run = lambda folder, lora=(): load_pipeline(folder, progress=False, lora=lora).generate(  # noqa: E731
        PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np")
    assert np.abs(run(baked) - run(converted, [(tmp_path / "lora.safetensors", SCALE)])).max() <= 1e-5
    import json

    assert json.loads((baked / "mlx_diffusion.json").read_text())["lora"][0][1] == SCALE


def test_lora_from_the_command_line(flux_schnell, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[2]
    _, src, converted = flux_schnell
    save_file(_peft(linear_shapes(converted / "transformer"), FLUX_LAYERS, seed=12), tmp_path / "style.safetensors")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_diffusion", *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})

    size = ("--width", 48, "--height", 32, "--steps", 2, "--seed", 1, "--quiet")
    r = cli("generate", "--model", converted, "--prompt", "a fox", *size, "--lora", "style.safetensors:0.7", "-o",
            "a.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").text["lora"] == "style.safetensors:0.7"
    r = cli("generate", "--from-metadata", "a.png", "-o", "b.png", "--quiet")  # the recorded LoRA comes back
    assert r.returncode == 0, r.stderr
    pixels = lambda name: np.asarray(Image.open(tmp_path / name))  # noqa: E731
    assert np.array_equal(pixels("a.png"), pixels("b.png"))
    r = cli("generate", "--model", converted, "--prompt", "a fox", *size, "-o", "c.png")
    assert r.returncode == 0 and not np.array_equal(pixels("a.png"), pixels("c.png"))
    r = cli("convert", src, "-o", "baked", "-q", "none", "--dtype", "float32", "--lora", "style.safetensors:0.7",
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "baked" / "mlx_diffusion.json").read_text())["lora"][0][1] == 0.7
    r = cli("generate", "--model", "baked", "--prompt", "a fox", *size, "-o", "d.png")
    assert r.returncode == 0, r.stderr
    assert np.abs(pixels("d.png").astype(int) - pixels("a.png")).max() <= 1
    for args, match in ((("--lora", "missing.safetensors"), "missing.safetensors does not exist"),
                        (("--lora", "style.safetensors:nan"), "must be a finite number")):
        r = cli("generate", "--model", converted, "--prompt", "x", *size, *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr and match in r.stderr, r.stderr


def test_image_to_image_with_a_lora_matches_diffusers(flux_schnell, tmp_path, monkeypatch):
    import torch
    from test_img2img import _flux_reference, _start_image

    pipe, _, converted = flux_schnell
    sd = _peft(linear_shapes(converted / "transformer"), FLUX_LAYERS, seed=13)
    save_file(sd, tmp_path / "lora.safetensors")
    with_lora = copy.deepcopy(pipe)
    with_lora.load_lora_weights({k: torch.from_numpy(v) for k, v in sd.items()})
    with_lora.fuse_lora(lora_scale=SCALE)
    image, noise = _start_image(seed=3), _noise(7)
    ref = _flux_reference(with_lora, image, noise, monkeypatch, strength=0.7, num_inference_steps=3,
                          guidance_scale=0.0, max_sequence_length=256)
    ours = load_pipeline(converted, progress=False, lora=[(tmp_path / "lora.safetensors", SCALE)]).generate(
        "a watercolour lighthouse on a cliff, stormy sea", image=image, strength=0.7, steps=3, latents=noise,
        output_type="np")
    _assert_close(ours, ref)


def test_text_encoder_lora_matches_diffusers_and_kohya_names_it_the_same(flux_schnell, tmp_path):
    pipe, _, converted = flux_schnell
    te = linear_shapes(converted / "text_encoder")
    te_layers = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
    sd = {**_peft(linear_shapes(converted / "transformer"), FLUX_LAYERS[:4], seed=14),
          **_peft(te, te_layers, seed=15, component="text_encoder")}
    save_file(sd, tmp_path / "peft.safetensors")
    noise = _noise(8)
    kw = dict(num_inference_steps=2, guidance_scale=0.0, max_sequence_length=256)
    ref = _reference_flux(pipe, sd, noise, **kw)
    run = lambda name: load_pipeline(converted, progress=False, lora=[(tmp_path / name, SCALE)]).generate(  # noqa: E731
        PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np")
    _assert_close(run("peft.safetensors"), ref)
    without_te = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    save_file(without_te, tmp_path / "transformer-only.safetensors")
    assert np.abs(run("transformer-only.safetensors") - ref).mean() > 1e-3  # the text encoder's LoRA is live
    kohya = {}
    for k, v in sd.items():
        component, layer = k.split(".", 1)
        layer, _, role = layer.rpartition(".lora_")
        prefix = "lora_te1_" if component == "text_encoder" else "lora_transformer_"
        kohya[prefix + layer.replace(".", "_") + (".lora_down.weight" if role == "A.weight" else ".lora_up.weight")] = v
    save_file(kohya, tmp_path / "kohya.safetensors")
    assert np.abs(run("kohya.safetensors") - run("peft.safetensors")).max() <= 1e-6


def test_kohya_lora_matches_diffusers(flux_schnell, tmp_path):
    """kohya's layout straight into diffusers, on the layers whose split diffusers derives from the shapes (a double
    block's fused qkv, an MLP layer); for single blocks' linear1 diffusers hard-codes FLUX.1's widths
    ([3072, 3072, 3072, 12288]), so there the test above proves kohya == PEFT instead."""
    pipe, _, converted = flux_schnell
    kohya = {k: v for k, v in _kohya_flux(_fused_peft(linear_shapes(converted / "transformer"), seed=16), 8.0).items()
             if "single_blocks" not in k}
    save_file(kohya, tmp_path / "kohya.safetensors")
    noise = _noise(9)
    ref = _reference_flux(pipe, kohya, noise, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=256)
    ours = load_pipeline(converted, progress=False, lora=[(tmp_path / "kohya.safetensors", SCALE)]).generate(
        PROMPT, steps=2, width=W, height=H, latents=noise, output_type="np")
    diff = _assert_close(ours, ref)
    print(f"kohya LoRA: max abs {diff.max():.2e}, mean {diff.mean():.2e}")


def test_sd3_kohya_over_sai_names_equals_the_peft_file(sd3, tmp_path):
    _, _, converted = sd3
    shapes = linear_shapes(converted / "transformer")
    qkv = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    peft = _peft(shapes, qkv + ["transformer_blocks.1.ff_context.net.2"], seed=17)
    for layer in qkv[1:]:
        peft[f"transformer.{layer}.lora_A.weight"] = peft[f"transformer.{qkv[0]}.lora_A.weight"]
    B = lambda layer: peft[f"transformer.{layer}.lora_B.weight"] / 2  # noqa: E731  alpha 8 over rank 4
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": peft[f"transformer.{qkv[0]}.lora_A.weight"],
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": np.concatenate([B(q) for q in qkv]),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": np.array(8.0, np.float32),
             "lora_unet_joint_blocks_1_context_block_mlp_fc2.lora_down.weight":
                 peft["transformer.transformer_blocks.1.ff_context.net.2.lora_A.weight"],
             "lora_unet_joint_blocks_1_context_block_mlp_fc2.lora_up.weight": B("transformer_blocks.1.ff_context.net.2"),
             "lora_unet_joint_blocks_1_context_block_mlp_fc2.alpha": np.array(8.0, np.float32)}
    save_file(peft, tmp_path / "peft.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors")
    noise = _noise(10)
    a, b = (load_pipeline(converted, progress=False, lora=[(tmp_path / f"{n}.safetensors", SCALE)]).generate(
        PROMPT, steps=2, guidance=4.0, width=W, height=H, latents=noise, output_type="np") for n in ("peft", "kohya"))
    assert np.abs(a - b).max() <= 1e-5
