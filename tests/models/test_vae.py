"""AutoencoderKL parity with diffusers on tiny random VAEs: FLUX/SD3-like (16 latent channels, no quant convs) and
SD-like (4 channels, quant convs); plus GroupNorm+SiLU against torch and the conv paths against MLX's direct conv."""

import numpy as np
import pytest
import torch
from helpers import init_weights_, max_rel_err, to_np, torch_to_mlx

import mlx.core as mx
from mlx_diffusion.backends import cpu
from mlx_diffusion.backends.cpu import conv3x3, silu
from mlx_diffusion.models.vae import AutoencoderKL, GroupNorm, VAEConfig

TOL = 1e-4

CONFIGS = {
    # FLUX / SD3 layout: 16 latent channels, no quant convs, 3 levels (factor 4), 2 resnets per level
    "flux_like": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, latent_channels=16,
                      use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    # SD 1.x layout: 4 latent channels with quant convs, 32 groups (one channel per group at width 32)
    "sd_like": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4),
}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _pair(name):
    from diffusers import AutoencoderKL as RefVAE

    kw = CONFIGS[name]
    blocks = len(kw["block_out_channels"])
    ref = RefVAE(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks, **kw)
    init_weights_(ref, gain=0.5).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    ours.load_weights(list(torch_to_mlx(ref.state_dict()).items()), strict=True)
    return ref, ours.eval()  # eval: the inference convs (Winograd on the CPU), as a loaded model runs


@pytest.fixture(scope="module", params=list(CONFIGS))
def vaes(request):
    return _pair(request.param)


def test_config_from_dict():
    d = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 16,
         "layers_per_block": 2, "norm_num_groups": 32, "scaling_factor": 1.5305, "shift_factor": None,
         "use_quant_conv": False, "use_post_quant_conv": False, "latents_mean": None, "unknown_key": 1,
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    cfg = VAEConfig.from_dict(d)
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.latent_channels == 16
    assert cfg.shift_factor == 0.0 and cfg.scaling_factor == 1.5305
    assert not cfg.use_quant_conv and cfg.mid_block_add_attention and cfg.in_channels == 3
    with pytest.raises(ValueError):
        VAEConfig.from_dict({**d, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})


def test_parameter_names_match_diffusers(vaes):
    ref, ours = vaes
    from mlx.utils import tree_flatten

    mine = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    theirs = {k: tuple(to_np(v).shape) for k, v in torch_to_mlx(ref.state_dict()).items()}
    assert mine == {k: tuple(s) for k, s in theirs.items()}
    assert ("quant_conv.weight" in mine) == ref.config.use_quant_conv


@pytest.mark.parametrize("path", ["cpu", "banded", "small", "plain"])
def test_decode_matches_diffusers(vaes, path, monkeypatch):
    ref, ours = vaes
    if path in ("cpu", "banded"):  # the fused paths, which maps this small would not take (they do: "small")
        monkeypatch.setattr(cpu, "FUSED_MIN_ELEMENTS", 0)
    if path == "banded":  # the large-map code path: GroupNorm+SiLU and Winograd convs in bands of a few rows
        monkeypatch.setattr(cpu, "BAND_ELEMENTS", 1 << 13)
    if path == "plain":  # the GPU path: mx.conv_general and an explicit nearest upsampling
        monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 6, 10, ref.config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(_nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
        other = ref.decode(_nchw(z + 0.5 * rng.standard_normal(z.shape).astype(np.float32))).sample.numpy()
    got = ours.decode(mx.array(z))
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    assert got.shape == (1, 6 * f, 10 * f, 3)
    err = max_rel_err(got, want)
    print(f"decode max rel err {err:.2e}")
    assert err < TOL
    # the reference output has structure and depends on the latent far beyond the tolerance
    assert want.std() > 0.05 and np.abs(other.transpose(0, 2, 3, 1) - want).max() > 1000 * TOL * np.abs(want).max()


def test_encode_matches_diffusers(vaes):
    ref, ours = vaes
    rng = np.random.default_rng(1)
    x = np.tanh(rng.standard_normal((1, 24, 40, 3))).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(x)).latent_dist
        other = ref.encode(_nchw(np.roll(x, 3, axis=2))).latent_dist
    mean, logvar = ours.encode(mx.array(x))
    for name, got, want, moved in (("mean", mean, dist.mean, other.mean), ("logvar", logvar, dist.logvar, other.logvar)):
        want, moved = want.numpy().transpose(0, 2, 3, 1), moved.numpy().transpose(0, 2, 3, 1)
        err = max_rel_err(got, want)
        print(f"encode {name} max rel err {err:.2e}")
        assert err < TOL
        assert want.std() > 0.05 and np.abs(moved - want).max() > 1000 * TOL * np.abs(want).max()


@pytest.mark.parametrize("banded", [False, True, "small"])
def test_group_norm_silu_matches_torch(banded, monkeypatch):
    if banded != "small":  # the fused path, which a map this small would not take
        monkeypatch.setattr(cpu, "FUSED_MIN_ELEMENTS", 0)
    if banded is True:  # bands of 8 rows (the last one ragged)
        monkeypatch.setattr(cpu, "BAND_ELEMENTS", 4 * 2 * 20 * 64 * 8)
    rng = np.random.default_rng(2)
    C, G = 64, 16
    x = (rng.standard_normal((2, 33, 20, C)) * 3 + rng.standard_normal(C) * 5).astype(np.float32)  # offset means
    w = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    b = (0.5 * rng.standard_normal(C)).astype(np.float32)
    tg = torch.nn.GroupNorm(G, C, eps=1e-6)
    with torch.no_grad():
        tg.weight.copy_(torch.from_numpy(w))
        tg.bias.copy_(torch.from_numpy(b))
        y = tg(_nchw(x))
        want_norm = y.numpy().transpose(0, 2, 3, 1)
        want_act = torch.nn.functional.silu(y).numpy().transpose(0, 2, 3, 1)
    gn = GroupNorm(G, C)
    gn.weight, gn.bias = mx.array(w), mx.array(b)
    assert max_rel_err(gn(mx.array(x)), want_norm) < 1e-5
    assert max_rel_err(gn(mx.array(x), act=True), want_act) < 1e-5


@pytest.mark.parametrize("shape,cout", [((2, 5, 7, 24), 40), ((1, 8, 12, 16), 40), ((1, 1, 3, 8), 40),
                                        ((1, 18, 9, 16), 40), ((2, 6, 5, 64), 3), ((1, 7, 6, 3), 40)])
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("banded", [False, True])
def test_conv3x3(shape, cout, upsample, banded, monkeypatch):
    """conv3x3 against MLX's direct conv: Winograd (ragged tiles, batch 2, fused nearest-x2 upsampling, bands of 2
    tile rows) and the few-output-channel (64 -> 3) and few-input-channel (3 -> 40) paths."""
    if banded:  # two tile rows per band
        tile_cols = -(-shape[2] * (2 if upsample else 1) // 4)
        monkeypatch.setattr(cpu, "BAND_ELEMENTS", 2 * 36 * shape[0] * tile_cols * max(shape[3], cout))
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    w = mx.array((rng.standard_normal((cout, 3, 3, shape[-1])) / np.sqrt(9 * shape[-1])).astype(np.float32))
    b = mx.array(rng.standard_normal(cout).astype(np.float32))
    if upsample:
        B, H, W, C = shape
        x_up = mx.broadcast_to(x[:, :, None, :, None], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        want = mx.conv2d(x_up, w, padding=1) + b
    else:
        want = mx.conv2d(x, w, padding=1) + b
    assert max_rel_err(conv3x3(x, w, b, upsample), want) < 1e-5


@pytest.mark.parametrize("shape,cout", [((1, 33, 20, 64), 40), ((2, 9, 13, 32), 32), ((1, 21, 11, 64), 3)])
@pytest.mark.parametrize("upsample", [False, True])
def test_conv3x3_reads_rows_and_adds_a_residual_in_bands(shape, cout, upsample, monkeypatch):
    """A GroupNorm+SiLU output handed over as `cpu.Rows` (normalized band by band as the conv reads it, halos and
    edges included) and a residual added per band (an array, or a 1x1 conv's `Rows`) give the same numbers as the
    whole maps, in bands of 2 tile rows (the last one ragged)."""
    if upsample and cout == 3:
        pytest.skip("the few-output-channel path takes no upsampling")
    monkeypatch.setattr(cpu, "FUSED_MIN_ELEMENTS", 0)
    f = 2 if upsample else 1
    tile_cols = -(-shape[2] * f // 4)
    monkeypatch.setattr(cpu, "BAND_ELEMENTS", 2 * 36 * shape[0] * tile_cols * max(shape[3], cout))
    rng = np.random.default_rng(4)
    B, H, W, C = shape
    x = mx.array((rng.standard_normal(shape) * 2 + 1).astype(np.float32))
    gn = GroupNorm(8, C)
    gn.weight, gn.bias = mx.array(1 + 0.3 * rng.standard_normal(C).astype(np.float32)), mx.array(
        0.2 * rng.standard_normal(C).astype(np.float32))
    w = mx.array((rng.standard_normal((cout, 3, 3, C)) / np.sqrt(9 * C)).astype(np.float32))
    b = mx.array(rng.standard_normal(cout).astype(np.float32))
    rows = gn(x, act=True, rows=True)
    assert isinstance(rows, cpu.Rows)
    whole = gn(x, act=True)
    want = conv3x3(whole, w, b, upsample)
    assert max_rel_err(conv3x3(rows, w, b, upsample), want) < 1e-6
    residual = mx.array(rng.standard_normal((B, f * H, f * W, cout)).astype(np.float32))
    assert max_rel_err(conv3x3(rows, w, b, upsample, residual=residual), want + residual) < 1e-6
    if not upsample:  # a shortcut 1x1 conv read in bands, as the ResNet blocks hand theirs over
        w1 = mx.array(rng.standard_normal((cout, 1, 1, C)).astype(np.float32))
        skip = cpu.Rows(x, lambda xb: cpu.conv2d(xb, w1, b), cout)
        assert max_rel_err(conv3x3(rows, w, b, residual=skip), want + cpu.conv2d(x, w1, b)) < 1e-6
        assert max_rel_err(skip.full(), cpu.conv2d(x, w1, b)) < 1e-6


def test_silu_accuracy():
    x = np.linspace(-40, 40, 400001, dtype=np.float32)
    want = torch.nn.functional.silu(torch.from_numpy(x).double()).numpy()
    err = np.abs(np.array(silu(mx.array(x)), dtype=np.float64) - want)
    print(f"silu max abs err {err.max():.1e}, x<0 {err[x < 0].max():.1e}")
    # absolute error ~ float32 ulp of |x| (<= 4e-6 at |x| = 40); for x << 0, 1 + tanh(x/2) cancels, so there the
    # error is absolute (<= 2.2e-6 at x = -15.8, where the rational tanh reaches -1), not relative
    assert err.max() < 4e-6 and err[x < 0].max() < 3e-6
    keep = (x > -4) & (want != 0)
    assert (err[keep] / np.abs(want[keep])).max() < 1e-5
