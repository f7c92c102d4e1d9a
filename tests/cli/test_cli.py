"""The command-line contract: PNG with settings, progress and timings, determinism, one-line errors, no partial output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def generate(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlx_diffusion.generate", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def evaluate_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_diffusion.tiny.evaluate", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_clean_error(r, match):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], r.stderr


def test_generate_writes_png_with_settings(flux_schnell, tmp_path):
    out = tmp_path / "fox.png"
    r = generate("--model", flux_schnell[2], "--prompt", "a fox", "--seed", 42, "--width", 48, "--height", 32,
                 "--output", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    img = Image.open(out)
    assert img.size == (48, 32) and img.mode == "RGB"
    meta = img.text
    assert meta["prompt"] == "a fox" and meta["seed"] == "42" and meta["steps"] == "4"
    assert meta["width"] == "48" and meta["height"] == "32" and meta["model"] == str(flux_schnell[2])
    assert "guidance" in meta
    assert "denoising" in r.stderr and "text encoding" in r.stderr and "peak memory" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]


def test_same_seed_same_image(flux_schnell, tmp_path):
    args = ["--model", flux_schnell[2], "--prompt", "a fox", "--width", 32, "--height", 32, "--quiet"]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        r = generate(*args, "--seed", seed, "--output", out)
        assert r.returncode == 0, r.stderr
    pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


def test_default_output_name_uses_seed(flux_schnell, tmp_path):
    r = generate("--model", flux_schnell[2], "--prompt", "x", "--seed", 5, "--width", 16, "--height", 16, "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "image-5.png").is_file()


@pytest.mark.parametrize("extra, match", [
    (["--width", 100], "width must be a positive multiple of 16"),
    (["--height", 0], "height must be a positive multiple of 16"),
    (["--steps", 0], "steps must be a positive integer"),
    (["--seed", -1], "--seed"),
    (["--steps", "abc"], "--steps"),
])
def test_bad_numbers(flux_schnell, tmp_path, extra, match):
    out = tmp_path / "o.png"
    r = generate("--model", flux_schnell[2], "--prompt", "x", "--output", out, *extra)
    assert_clean_error(r, match)
    assert not list(tmp_path.iterdir())


def test_bad_model_folders(flux_schnell, tmp_path):
    out = tmp_path / "o.png"
    assert_clean_error(generate("--model", tmp_path / "nope", "--prompt", "x", "--output", out), "does not exist")
    assert_clean_error(generate("--model", flux_schnell[1], "--prompt", "x", "--output", out), "convert it first")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mlx_diffusion.json").write_text("{not json")
    assert_clean_error(generate("--model", broken, "--prompt", "x", "--output", out), "not valid JSON")
    (broken / "mlx_diffusion.json").write_text(json.dumps({"family": "flux"}))
    assert_clean_error(generate("--model", broken, "--prompt", "x", "--output", out), "missing")
    no_scheduler = tmp_path / "no_scheduler"
    shutil.copytree(flux_schnell[2], no_scheduler)
    (no_scheduler / "scheduler" / "scheduler_config.json").unlink()
    assert_clean_error(generate("--model", no_scheduler, "--prompt", "x", "--output", out),
                       "scheduler_config.json is missing")
    assert not out.exists()


@pytest.mark.parametrize("module", ["mlx_diffusion", "mlx_diffusion.generate", "mlx_diffusion.compare",
                                    "mlx_diffusion.benchmark", "mlx_diffusion.train",
                                    "mlx_diffusion.evaluate", "mlx_diffusion.tiny.train", "mlx_diffusion.tiny.evaluate"])
def test_documented_command_lines_run(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "Usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_truncated_weights_give_clean_error(flux_schnell, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(flux_schnell[2], m)
    w = m / "transformer" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    out = tmp_path / "o.png"
    assert_clean_error(generate("--model", m, "--prompt", "x", "--width", 16, "--height", 16, "--output", out),
                       "truncated")
    assert not out.exists()


def test_unwritable_output(flux_schnell, tmp_path):
    for out, match in ((tmp_path / "no" / "such" / "dir.png", "does not exist"), (tmp_path, "is a folder"),
                       (tmp_path / "x.gif", ".png, .jpg"), (Path("/proc/x.png"), "cannot write")):
        assert_clean_error(generate("--model", flux_schnell[2], "--prompt", "x", "--output", out), match)
    assert not list(tmp_path.iterdir())


def test_convert_cli_errors(flux_schnell, tmp_path):
    src = flux_schnell[1]
    assert_clean_error(convert(tmp_path / "nope", "-o", tmp_path / "o"), "not a diffusers model folder")
    assert_clean_error(convert(src, "-o", flux_schnell[2]), "already exists")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    assert_clean_error(convert(tmp_path / "model.ckpt", "-o", tmp_path / "o"), "pickle")
    assert not (tmp_path / "o").exists()


def test_sd3_cli_without_t5(sd3, tmp_path):
    out = tmp_path / "sd3.png"
    r = generate("--model", sd3[2], "--prompt", "a lighthouse", "--negative-prompt", "fog", "--no-t5", "--steps", 2,
                 "--width", 32, "--height", 48, "--seed", 3, "--output", out)
    assert r.returncode == 0, r.stderr
    meta = Image.open(out).text
    assert meta["guidance"] == "7.0" and meta["negative_prompt"] == "fog" and meta["steps"] == "2"
    assert_clean_error(generate("--model", sd3[2], "--prompt", "x", "--true-cfg", 2, "--output", tmp_path / "a.png"),
                       "--true-cfg) is for FLUX")


def test_flux_cli_refuses_no_t5(flux_schnell, tmp_path):
    assert_clean_error(generate("--model", flux_schnell[2], "--prompt", "x", "--no-t5", "--output", tmp_path / "a.png"),
                       "FLUX cannot run without T5")
