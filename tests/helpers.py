"""Shared test helpers: random weights that keep parity tests sensitive, torch -> MLX weight transfer, errors.

Weight init: N(0, gain^2 / fan_in) for matrices, norms ~1, biases small (measured: images then have structure).
With N(0, 0.02) a tiny model's output barely depends on its inputs and a broken component can still "match".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import mlx_diffusion  # noqa: F401  (interposes the fast BLAS before mlx.core)
import mlx.core as mx

ASSETS = Path(__file__).parent / "assets"
# Whole-image parity in [0, 1] against the reference on float32 weights: measured at most 6e-6 (max) and 5e-7 (mean)
# over the FLUX, SD3 and built-in pipelines; the limits keep a margin of ~15x.
IMAGE_MAX, IMAGE_MEAN = 1e-4, 1e-5
CLIP_TOKENIZER = ASSETS / "tokenizers" / "clip"
T5_TOKENIZER = ASSETS / "tokenizers" / "t5"


def init_weights_(module, gain: float = 1.0, seed: int = 0):
    """Re-initialise a torch module in place: N(0, gain^2/fan_in) weights, norm scales ~1, small biases.

    Embedding tables (token, position, relative-position) get N(0, gain^2): rows are looked up, not summed. Linear
    and conv embedders are scaled by fan-in like every other layer; std-1 weights there (e.g. SD3's timestep
    embedder) make modulation scales ~40 and saturate attention until float32 itself disagrees with float64.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in module.named_modules():
            for leaf, p in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g) * gain)
                elif p.ndim == 1 and leaf == "bias":
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
                elif p.ndim == 1:  # norm scales
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = int(np.prod(p.shape[1:]))
                    p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in)))
    return module


def torch_to_mlx(state_dict, dtype=mx.float32) -> dict:
    """torch state_dict -> {name: mx.array} in MLX layout (conv weights OIHW -> OHWI), names unchanged."""
    from mlx_diffusion.io.folder import to_mlx_layout

    out = {}
    for k, v in state_dict.items():
        a = v.detach().float().cpu().numpy()
        out[k] = mx.array(to_mlx_layout(k, a)).astype(dtype)
    return out


def to_np(x) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the per-component parity metric (float32 target ~1e-4)."""
    a, b = to_np(ours), to_np(ref)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def cut_plan(plan, tensors, component: str = "transformer") -> dict:
    """{diffusers name: numpy array} of one component: each plan target cut from its original tensor (numpy or MLX)
    by `Target.cut`, the converter's own path."""
    out = {}
    for original, targets in plan.targets.items():
        for t in targets:
            if t.component == component:
                out[t.name] = to_np(t.cut(mx.array(to_np(tensors[original]))))
    return out


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding a copy of `folder` as the main revision of `repo` (the layout
    huggingface_hub reads offline); returns the snapshot folder."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)
    return base / "snapshots" / commit
