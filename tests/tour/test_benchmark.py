"""The benchmark command: per-stage times and memory, the diffusers baseline in its own process on the same weights
and noise, a markdown table and one JSON line last."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers  # noqa: F401
from helpers import IMAGE_MAX

ROOT = Path(__file__).resolve().parents[2]


def benchmark(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mlx_diffusion.benchmark", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _record(r):
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert "| total (s) |" in r.stdout and "| peak RSS (GB) |" in r.stdout
    return record


def test_profile_of_the_builtin_model(tmp_path):
    r = benchmark("--steps", 3, "--repeat", 1, "--quiet", cwd=tmp_path)
    record = _record(r)
    assert record["ratios"] is None and record["steps"] == 3 and record["size"] == 64
    assert not record["empty_kernel_cache"] and "| first run, cold (s) |" in r.stdout
    s = record["seconds"]["mlx_diffusion"]
    assert s["total"] > 0 and s["step"] > 0 and s["images_per_minute"] == pytest.approx(60 / s["total"])
    assert 0 < record["rss_gb"]["mlx_diffusion"] < 2
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_against_diffusers_on_the_builtin_model(tmp_path):
    r = benchmark("--steps", 4, "--repeat", 1, "--compare-diffusers", "--empty-kernel-cache", "--quiet", cwd=tmp_path)
    record = _record(r)
    assert record["empty_kernel_cache"] and "| first run, cold, empty kernel cache (s) |" in r.stdout
    ours = record["seconds"]["mlx_diffusion"]
    assert ours["cold_total"] > ours["total"]  # the cold run builds MLX's kernels
    assert not list(tmp_path.iterdir())
    assert set(record["ratios"]) == {"text_encoding", "denoising", "decoding", "total"}
    assert all(r > 0 for r in record["ratios"].values())
    assert record["max_abs_diff"] <= IMAGE_MAX  # the same image from the same weights and noise
    assert set(record["rss_gb"]) == {"mlx_diffusion", "diffusers"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_against_diffusers_on_a_random_preset(tmp_path, family):
    record = _record(benchmark("--preset", "tiny", "--family", family, "--steps", 2, "--repeat", 1,
                               "--compare-diffusers", "--prompt", "a red fox in the snow", "--quiet", cwd=tmp_path))
    assert record["family"] == family and record["max_abs_diff"] <= IMAGE_MAX


def test_errors(tmp_path):
    from test_cli import assert_clean_error

    assert_clean_error(benchmark("--model", tmp_path / "nope", cwd=tmp_path), "does not exist")
    assert_clean_error(benchmark("--size", 60, cwd=tmp_path), "--size must be a multiple of 8")
