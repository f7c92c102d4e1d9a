"""Rectified-flow Euler sampling, shared by FLUX and SD3: diffusers' FlowMatchEulerDiscreteScheduler, exactly.

The schedule is computed in numpy with the reference's dtypes (float32 where it uses torch float32 or casts, float64
where it uses numpy defaults), so sigmas and timesteps equal diffusers' bit for bit or to the last float32 ulp.
That matters: SD3's shift is applied to sigma_min once at construction and again in `set_timesteps`, FLUX passes
its own linearly spaced sigmas, and FLUX.1-dev shifts them by a resolution-dependent `mu`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ..models.config import FromDict


@dataclass
class SchedulerConfig(FromDict):
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self):
        """Values of the types diffusers' scheduler takes, and only the options we implement (ValueError)."""
        for f in fields(self):
            v = getattr(self, f.name)
            kind = f.type.split(" ")[0]
            ok = {"int": lambda: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  "bool": lambda: isinstance(v, bool),
                  "str": lambda: isinstance(v, str)}[kind]()
            if not ok and not (v is None and "None" in f.type):
                raise ValueError(f"{f.name} must be {'a positive integer' if kind == 'int' else 'a ' + kind}, "
                                 f"got {v!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {self.time_shift_type!r} (exponential or linear)")
        if self.use_beta_sigmas:
            raise ValueError("beta sigmas (use_beta_sigmas) are not supported")
        if self.stochastic_sampling:
            raise ValueError("stochastic sampling is not supported")
        if self.use_dynamic_shifting and (self.base_shift is None or self.max_shift is None):
            raise ValueError("dynamic shifting needs base_shift and max_shift")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be between 0 and 1, got {self.shift_terminal}")
        if sum((self.use_karras_sigmas, self.use_exponential_sigmas)) > 1:
            raise ValueError("only one of use_karras_sigmas and use_exponential_sigmas can be set")


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The resolution-dependent `mu` of FLUX.1-dev (and SD3.5 with dynamic shifting)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class FlowMatchEulerScheduler:
    """Timesteps/sigmas and the Euler update of diffusers' FlowMatchEulerDiscreteScheduler (deterministic mode)."""

    def __init__(self, config: SchedulerConfig | None = None):
        c = self.config = config or SchedulerConfig()
        n = c.num_train_timesteps
        t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        s = t / np.float32(n)
        if not c.use_dynamic_shifting:
            s = (np.float32(c.shift) * s / (1 + np.float32(c.shift - 1) * s)).astype(np.float32)
        self.sigma_min, self.sigma_max = float(s[-1]), float(s[0])
        self.sigmas = self.timesteps = None

    def mu(self, image_seq_len: int) -> float | None:
        """The resolution-dependent shift for `image_seq_len` latent tokens, from the config's base and max shift
        (FluxPipeline's and StableDiffusion3Pipeline's `calculate_shift(..., scheduler.config...)`); None without
        dynamic shifting, where `set_timesteps` takes none."""
        c = self.config
        if not c.use_dynamic_shifting:
            return None
        return calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config.time_shift_type == "linear":
            return mu / (mu + (1 / t - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))

    def set_timesteps(self, steps: int, sigmas=None, mu: float | None = None):
        """As diffusers' `set_timesteps(num_inference_steps, sigmas=..., mu=...)`; returns (timesteps, sigmas)."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("this scheduler uses dynamic shifting, so `mu` must be given")
        if sigmas is None:
            n = c.num_train_timesteps
            s = np.linspace(self.sigma_max * n, self.sigma_min * n, steps) / n
        else:
            s = np.asarray(sigmas).astype(np.float32)
            steps = len(s)
        if c.use_dynamic_shifting:
            s = self._time_shift(mu, s)
        else:
            s = c.shift * s / (1 + (c.shift - 1) * s)
        if c.shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        if c.use_karras_sigmas:
            lo, hi, rho = float(s[-1]), float(s[0]), 7.0
            ramp = np.linspace(0, 1, steps)
            s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif c.use_exponential_sigmas:
            s = np.exp(np.linspace(math.log(float(s[0])), math.log(float(s[-1])), steps))
        s = np.asarray(s).astype(np.float32)
        timesteps = s * np.float32(c.num_train_timesteps)
        if c.invert_sigmas:
            s = (1.0 - s).astype(np.float32)
            timesteps = s * np.float32(c.num_train_timesteps)
            s = np.concatenate([s, np.ones(1, np.float32)])
        else:
            s = np.concatenate([s, np.zeros(1, np.float32)])
        self.timesteps, self.sigmas = timesteps.astype(np.float32), s
        return self.timesteps, self.sigmas

    def step(self, model_output, i: int, sample):
        """Euler step i: x <- x + (sigma_{i+1} - sigma_i) * v, with dt rounded to float32 as the reference does."""
        dt = np.float32(self.sigmas[i + 1] - self.sigmas[i])
        return sample + dt.item() * model_output
