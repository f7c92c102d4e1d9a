"""SD3Transformer2DModel (mlx_diffusion.models.sd3) against diffusers' SD3Transformer2DModel.

Tiny random models (init_weights_ gain 1): SD3-like (no qk norm) and SD3.5-like (qk RMSNorm, dual-attention blocks
including the context_pre_only last one), batch 2 with different text, pooled vectors and timesteps per item,
non-square latents whose patch grids sit at different offsets in the position table. Parity is
max|ours - ref| / max|ref| in float32. The reference position table is perturbed so it must be loaded, not recomputed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import init_weights_, max_rel_err, to_np, torch_to_mlx

import mlx.core as mx
from mlx_diffusion.models.sd3 import SD3Config, SD3Transformer2DModel

TOL = 1e-4

SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=3,
           joint_attention_dim=40, caption_projection_dim=48, pooled_projection_dim=32, out_channels=16,
           pos_embed_max_size=16)
# SD3.5: the dual-attention blocks include the last (context_pre_only) one; other output channels
SD35 = dict(SD3, qk_norm="rms_norm", dual_attention_layers=(0, 2), out_channels=8)


def _mx(t):
    return mx.array(t.detach().numpy())


def _pair(config: dict, seed=0):
    from diffusers import SD3Transformer2DModel as Ref

    ref = init_weights_(Ref(**config).eval(), 1.0, seed=seed)
    with torch.no_grad():
        # A buffer, untouched by init_weights_: make it differ from the sincos table our model would build.
        ref.pos_embed.pos_embed.add_(0.2 * torch.randn(ref.pos_embed.pos_embed.shape, generator=torch.Generator()))
    ours = SD3Transformer2DModel(SD3Config.from_dict({**ref.config, "_class_name": "SD3Transformer2DModel"}))
    ours.load_weights(list(torch_to_mlx(ref.state_dict()).items()), strict=True)
    return ref, ours


def _inputs(config: dict, size, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, config["in_channels"], *size, generator=g),
        encoder_hidden_states=torch.randn(2, text_len, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(2, config["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([980.0, 250.5]),  # raw scheduler timesteps, as StableDiffusion3Pipeline passes them
    )


def _run_both(ref, ours, inputs, **kwargs):
    with torch.no_grad():
        expected = ref(**inputs, **kwargs).sample
    got = ours(*(_mx(v) for v in inputs.values()), **kwargs)
    return got, expected


@pytest.mark.parametrize(
    "config, size",
    [(SD3, (8, 12)), (SD3, (10, 6)), (SD3, (7, 5)), (SD35, (8, 12))],
    ids=["sd3-8x12", "sd3-10x6", "sd3-odd-7x5", "sd35-8x12"],
)
def test_matches_diffusers(config, size):
    # Patch grids 4x6 / 5x3 crop the 16x16 table at (6, 5) / (5, 6); 7x5 latents drop a row and column as the conv does.
    ref, ours = _pair(config)
    inputs = _inputs(config, size)
    got, expected = _run_both(ref, ours, inputs)
    err = max_rel_err(got, expected)
    print(f"max rel err {err:.2e}")
    assert got.shape == tuple(expected.shape) and err <= TOL

    # The reference output must be informative: structured, and moved far beyond the tolerance by the text of one
    # batch item, while the other item stays as it was.
    e = to_np(expected)
    assert e.std() > 100 * TOL * np.abs(e).max()
    text = inputs["encoder_hidden_states"].clone()
    text[1] = torch.randn(text[1].shape, generator=torch.Generator().manual_seed(5))
    got2, expected2 = _run_both(ref, ours, dict(inputs, encoder_hidden_states=text))
    assert max_rel_err(expected2[1], expected[1]) > 100 * TOL
    assert max_rel_err(got2, expected2) <= TOL
    assert max_rel_err(got2[0], got[0]) <= 1e-6


def test_skip_layers_match_diffusers():
    ref, ours = _pair(SD35)
    inputs = _inputs(SD35, (6, 10), text_len=4, seed=1)
    got, expected = _run_both(ref, ours, inputs, skip_layers=[1])
    assert max_rel_err(got, expected) <= TOL
    full = to_np(ref(**inputs).sample.detach())
    assert max_rel_err(expected, full) > 100 * TOL


def test_scalar_timestep_is_broadcast():
    _, ours = _pair(SD3)
    inputs = {k: _mx(v) for k, v in _inputs(SD3, (4, 4)).items()}
    got = ours(**dict(inputs, timestep=mx.array(500.0)))
    assert max_rel_err(got, ours(**dict(inputs, timestep=mx.array([500.0, 500.0])))) == 0.0


@pytest.mark.parametrize("size", [(4, 6), (5, 3), (16, 16), (1, 16), (3, 1)])
def test_patch_embed_crops_the_position_table_like_diffusers(size):
    ref, ours = _pair(SD3)
    x = torch.randn(2, 16, 2 * size[0], 2 * size[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.pos_embed(x)
    assert max_rel_err(ours.pos_embed(_mx(x)), expected) <= 1e-5


def test_patch_grid_larger_than_the_table_is_refused():
    _, ours = _pair(SD3)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours.pos_embed(mx.zeros((1, 16, 34, 8)))


@pytest.mark.parametrize("config", [SD3, SD35], ids=["sd3", "sd35"])
def test_parameter_names_and_position_table_are_diffusers(config):
    from diffusers import SD3Transformer2DModel as Ref
    from mlx.utils import tree_flatten

    ref = Ref(**config)
    ours = SD3Transformer2DModel(SD3Config.from_dict(dict(ref.config)))
    params = dict(tree_flatten(ours.parameters()))
    assert set(params) == set(ref.state_dict())
    assert "transformer_blocks.2.attn.to_add_out.weight" not in params  # the last block is context_pre_only
    # A fresh model's sincos table (a saved buffer in diffusers) is diffusers' own.
    np.testing.assert_array_equal(to_np(params["pos_embed.pos_embed"]), to_np(ref.pos_embed.pos_embed))


def test_config_from_dict_defaults_and_unknown_keys():
    c = SD3Config.from_dict({"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0"})
    assert (c.num_layers, c.inner_dim, c.output_channels, c.pos_embed_max_size, c.qk_norm) == (18, 1152, 16, 96, None)
    medium = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
              "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}
    c = SD3Config.from_dict(medium)
    assert (c.num_layers, c.inner_dim, c.pos_embed_max_size, c.dual_attention_layers) == (24, 1536, 192, ())
    c = SD3Config.from_dict({**medium, "dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm", "out_channels": None})
    assert c.dual_attention_layers == (0, 1, 2) and c.qk_norm == "rms_norm" and c.output_channels == 16
