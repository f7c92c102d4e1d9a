"""Scheduler parity: our FlowMatchEulerScheduler vs diffusers' FlowMatchEulerDiscreteScheduler, as each pipeline calls it."""

import numpy as np
import pytest

import helpers  # noqa: F401
from mlx_diffusion.pipelines.sampler import FlowMatchEulerScheduler, SchedulerConfig, calculate_shift

SCHNELL = dict(shift=1.0, use_dynamic_shifting=False)
DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
SD3 = dict(shift=3.0)
OTHERS = [
    dict(shift=3.0, shift_terminal=0.1),
    dict(shift=2.0, use_karras_sigmas=True),
    dict(shift=1.5, use_exponential_sigmas=True),
    dict(shift=3.0, invert_sigmas=True),
    dict(shift=6.0, use_dynamic_shifting=True, time_shift_type="linear"),
]


def _reference(cfg, steps, sigmas, mu):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(steps if sigmas is None else None, sigmas=sigmas, mu=mu)
    return ref


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # shift_terminal, 1 step: NaN in both
@pytest.mark.parametrize("cfg", [SCHNELL, DEV, SD3, *OTHERS])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("flux_sigmas", [True, False])
def test_schedule_matches_diffusers(cfg, steps, flux_sigmas):
    sigmas = np.linspace(1.0, 1 / steps, steps) if flux_sigmas else None  # what FluxPipeline passes
    mu = calculate_shift(64 * 48) if cfg.get("use_dynamic_shifting") else None
    ref = _reference(cfg, steps, sigmas, mu)
    ours = FlowMatchEulerScheduler(SchedulerConfig.from_dict(cfg))
    t, s = ours.set_timesteps(steps, sigmas=sigmas, mu=mu)
    np.testing.assert_allclose(s, ref.sigmas.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(t, ref.timesteps.numpy(), rtol=1e-7, atol=1e-4)
    assert len(t) == steps and len(s) == steps + 1


def test_known_values():
    # reference-facts.md: schnell 4 steps -> [1, .75, .5, .25, 0]; SD3 shift 3, 4 steps: last sigma before 0 is 0.0089
    t, s = FlowMatchEulerScheduler(SchedulerConfig(**SCHNELL)).set_timesteps(4, sigmas=np.linspace(1, 0.25, 4))
    np.testing.assert_allclose(s, [1, 0.75, 0.5, 0.25, 0], atol=1e-7)
    _, s = FlowMatchEulerScheduler(SchedulerConfig(**SD3)).set_timesteps(4)
    assert abs(s[-2] - 0.0089) < 1e-4


def test_euler_step_matches_diffusers():
    import torch
    import mlx.core as mx

    cfg, steps = SD3, 5
    ref = _reference(cfg, steps, None, None)
    ours = FlowMatchEulerScheduler(SchedulerConfig.from_dict(cfg))
    ours.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 8)).astype(np.float32)
    xr, xo = torch.from_numpy(x), mx.array(x)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        xr = ref.step(torch.from_numpy(v), t, xr, return_dict=False)[0]
        xo = ours.step(mx.array(v), i, xo)
    assert np.abs(np.array(xo) - xr.numpy()).max() < 1e-6


def test_scheduler_config_is_checked():
    assert SchedulerConfig.from_dict({"_class_name": "X", "shift": 3.0, "unknown_key": 1, "max_shift": None}).shift == 3.0
    for bad, match in (({"shift": "3"}, "shift must be a float"), ({"shift": 0}, "shift must be positive"),
                       ({"use_beta_sigmas": True}, "beta sigmas"), ({"stochastic_sampling": True}, "stochastic"),
                       ({"time_shift_type": "cubic"}, "time_shift_type"), ({"num_train_timesteps": 0}, "positive"),
                       ({"shift_terminal": 1.5}, "shift_terminal"), ({"invert_sigmas": "yes"}, "invert_sigmas")):
        with pytest.raises(ValueError, match=match):
            SchedulerConfig.from_dict(bad)
