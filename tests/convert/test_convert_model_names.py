"""`tools/convert.py --model NAME` resolves through huggingface_hub's cache, offline."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import fake_hub_cache

ROOT = Path(__file__).resolve().parents[2]


def _convert(*args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_model_name_from_offline_cache(flux_schnell, tmp_path):
    cache = tmp_path / "cache"
    snap = fake_hub_cache(cache, "black-forest-labs/FLUX.1-schnell", flux_schnell[1])
    r = _convert("--model", "flux-schnell", "-o", tmp_path / "out", "-q", "none", "--dtype", "float32", "--quiet",
                 cache=cache)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads((tmp_path / "out" / "mlx_diffusion.json").read_text())
    assert info["family"] == "flux" and info["variant"] == "schnell" and info["source"] == str(snap.resolve())


def test_model_name_missing_offline_is_one_line(tmp_path):
    r = _convert("--model", "sd3-medium", "-o", tmp_path / "out", cache=tmp_path / "empty")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "cannot get stabilityai/stable-diffusion-3-medium-diffusers" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_source_or_model_not_both(tmp_path, flux_schnell):
    r = _convert(flux_schnell[1], "--model", "flux-schnell", "-o", tmp_path / "o", cache=tmp_path / "c")
    assert r.returncode != 0 and "either SOURCE or --model" in r.stderr
