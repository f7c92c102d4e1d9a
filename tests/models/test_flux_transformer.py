"""FluxTransformer2DModel (mlx_diffusion.models.flux) and its building blocks (mlx_diffusion.models.layers) against diffusers.

Tiny random models (init_weights_ gain 1) on non-square patch grids (4x6 with 7 text tokens, 5x3 with 4); parity is
max|ours - ref| / max|ref| in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import init_weights_, max_rel_err, to_np, torch_to_mlx

import mlx.core as mx
from mlx_diffusion.backends import cpu
from mlx_diffusion.models import layers
from mlx_diffusion.models.flux import FluxConfig, FluxTransformer2DModel
from mlx_diffusion.pipelines.flux import pack_latents, prepare_ids, unpack_latents

TOL = 1e-4

CONFIG_A = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
# other depths, heads, RoPE split, patch size and output channels: nothing may be hard-coded
CONFIG_B = dict(patch_size=2, in_channels=32, out_channels=8, num_layers=1, num_single_layers=3, attention_head_dim=8,
                num_attention_heads=3, joint_attention_dim=40, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                guidance_embeds=False)


def _mx(t):
    return mx.array(t.detach().numpy())


def _pair(config: dict, seed=0):
    from diffusers import FluxTransformer2DModel as Ref

    ref = init_weights_(Ref(**config).eval(), 1.0, seed=seed)
    ours = FluxTransformer2DModel(FluxConfig.from_dict({**ref.config, "_class_name": "FluxTransformer2DModel"}))
    ours.load_weights(list(torch_to_mlx(ref.state_dict()).items()), strict=True)
    return ref, ours


def _inputs(config: dict, batch: int, grid=(4, 6), text_len=7, seed=0):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    h, w = grid
    guidance = torch.tensor([3.5, 5.0][:batch]) if config.get("guidance_embeds") else None
    return dict(
        hidden_states=torch.randn(batch, h * w, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.75, 0.3][:batch]),  # already divided by 1000, as FluxPipeline passes it
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
        txt_ids=torch.zeros(text_len, 3),
        guidance=guidance,
    )


def _run_both(ref, ours, inputs):
    with torch.no_grad():
        expected = ref(**inputs).sample
    got = ours(**{k: None if v is None else _mx(v) for k, v in inputs.items()})
    return got, expected


@pytest.mark.parametrize(
    "config, batch, grid, text_len",
    [
        (dict(CONFIG_A, guidance_embeds=False), 1, (4, 6), 7),  # schnell-like; batch 1: fused-modulation path
        (dict(CONFIG_A, guidance_embeds=True), 2, (4, 6), 7),  # dev-like: guidance, per-sample timestep/guidance
        (CONFIG_B, 2, (5, 3), 4),
    ],
    ids=["schnell-like", "dev-like", "other-shape"],
)
def test_matches_diffusers(config, batch, grid, text_len):
    ref, ours = _pair(config)
    inputs = _inputs(config, batch, grid, text_len)
    got, expected = _run_both(ref, ours, inputs)
    err = max_rel_err(got, expected)
    print(f"max rel err {err:.2e}")
    assert err <= TOL

    # The reference output must be informative: structured, and moved far beyond the tolerance by the text.
    e = to_np(expected)
    assert e.std() > 100 * TOL * np.abs(e).max()
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 0.5)
    got2, expected2 = _run_both(ref, ours, changed)
    assert max_rel_err(expected2, expected) > 100 * TOL
    assert max_rel_err(got2, expected2) <= TOL
    if config.get("guidance_embeds"):
        changed = dict(inputs, guidance=inputs["guidance"] + 1.0)
        got3, expected3 = _run_both(ref, ours, changed)
        assert max_rel_err(expected3, expected) > 100 * TOL
        assert max_rel_err(got3, expected3) <= TOL


def test_parameter_names_are_diffusers():
    ref, ours = _pair(dict(CONFIG_A, guidance_embeds=True))
    from mlx.utils import tree_flatten

    assert {k for k, _ in tree_flatten(ours.parameters())} == set(ref.state_dict())
    assert "time_text_embed.guidance_embedder.linear_1.weight" in ref.state_dict()


def test_dev_requires_guidance():
    ref, ours = _pair(dict(CONFIG_A, guidance_embeds=True))
    inputs = {k: None if v is None else _mx(v) for k, v in _inputs(dict(CONFIG_A, guidance_embeds=True), 1).items()}
    with pytest.raises(ValueError, match="guidance"):
        ours(**dict(inputs, guidance=None))


def test_config_from_dict_defaults_and_unknown_keys():
    c = FluxConfig.from_dict({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0",
                              "axes_dims_rope": [16, 56, 56], "guidance_embeds": True})
    assert (c.num_layers, c.num_single_layers, c.inner_dim, c.output_channels) == (19, 38, 3072, 64)
    assert c.axes_dims_rope == (16, 56, 56) and c.guidance_embeds


# ---------------------------------------------------------------------------------------------------------------
# FluxPipeline helpers


@pytest.mark.parametrize("h, w", [(8, 12), (6, 2)])
def test_pack_unpack_and_ids_match_flux_pipeline(h, w):
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1))
    packed = FluxPipeline._pack_latents(z, 2, 16, h, w)
    np.testing.assert_array_equal(to_np(pack_latents(_mx(z))), packed.numpy())
    np.testing.assert_array_equal(pack_latents(z.numpy()), packed.numpy())  # numpy in, numpy out
    nhwc = np.ascontiguousarray(z.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(to_np(pack_latents(mx.array(nhwc), channels_last=True)), packed.numpy())

    vae_scale = 8
    unpacked = FluxPipeline._unpack_latents(packed, h * vae_scale, w * vae_scale, vae_scale)
    np.testing.assert_array_equal(to_np(unpack_latents(_mx(packed), h, w)), unpacked.numpy())
    np.testing.assert_array_equal(to_np(unpack_latents(_mx(packed), h, w, channels_last=True)), nhwc)

    img_ids, txt_ids = prepare_ids(h // 2, w // 2, 5)
    expected = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(to_np(img_ids), expected.numpy())
    np.testing.assert_array_equal(to_np(txt_ids), np.zeros((5, 3), np.float32))
    assert img_ids.dtype == txt_ids.dtype == mx.float32


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def test_gelu_tanh_matches_torch():
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(100000) * 3, torch.tensor([0.0, 1e-30, -1e-30])])
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    got = to_np(cpu.gelu_tanh(_mx(x)))
    assert np.abs(got - expected.numpy()).max() < 2e-6
    assert np.all(np.abs(got - expected.numpy()) <= 2e-6 * np.maximum(1.0, np.abs(expected.numpy())))


@pytest.mark.parametrize("flip, shift, scale", [(True, 0, 1), (False, 1, 1), (True, 1, 1000)])
def test_timestep_embedding_matches_diffusers(flip, shift, scale):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    expected = get_timestep_embedding(t / (scale if scale > 1 else 1), 256, flip, shift, scale)
    got = layers.timestep_embedding(_mx(t / (scale if scale > 1 else 1)), 256, flip, shift, scale)
    assert np.abs(to_np(got) - expected.numpy()).max() < 1e-4  # float32 sin/cos of arguments up to 1000


@pytest.mark.parametrize("heads, max_scores, sharpness", [(3, 1 << 22, 1.0), (4, 500, 1.0), (2, 1, 8.0)])
def test_attention_matches_torch(heads, max_scores, sharpness):
    # max_scores 500: 6 query rows per chunk, the last one short; 1: one row per chunk. sharpness 8: logits spread
    # over hundreds, so the softmax's clamped range and tiny weights are exercised.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, heads, 37, 16, generator=g) for _ in range(3))
    q = q * sharpness
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 37, heads * 16)
    got = cpu.attention(_mx(q), _mx(k), _mx(v), max_scores=max_scores)
    assert max_rel_err(got, expected) < 2e-5
    got = cpu.attention(_mx(q * 0.25), _mx(k), _mx(v.transpose(1, 2)).transpose(0, 2, 1, 3), scale=16**-0.5 * 4)
    assert max_rel_err(got, expected) < 2e-5  # a strided v, an explicit scale
    got = cpu.attention(*(_mx(t).astype(mx.bfloat16) for t in (q, k, v)), max_scores=max_scores)
    assert got.dtype == mx.bfloat16 and max_rel_err(got, expected) < 2e-2  # the plain-softmax path
    merged = [_mx(t.transpose(1, 2).reshape(2, 37, heads * 16)) for t in (q, k, v)]
    assert max_rel_err(layers.attention(*merged, heads=heads), expected) < 2e-5  # (B, L, H*D) in and out
