"""`generate` with several seeds, prompt files, batches and file-name templates (issue 15's command line)."""

import os
import stat

import numpy as np
from PIL import Image

import helpers  # noqa: F401
from test_cli import assert_clean_error, generate

SIZE = ("--width", 48, "--height", 32, "--steps", 2)


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_seed_list_equals_single_seed_runs(flux_schnell, tmp_path):
    folder = flux_schnell[2]
    r = generate("--model", folder, "--prompt", "a fox", "--seed", "5,6", "-o", "out-{seed}.png", *SIZE, "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["out-5.png", "out-6.png"]
    for seed in (5, 6):
        r = generate("--model", folder, "--prompt", "a fox", "--seed", seed, "-o", f"alone-{seed}.png", *SIZE,
                     "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(_pixels(tmp_path / f"out-{seed}.png"), _pixels(tmp_path / f"alone-{seed}.png"))
        assert Image.open(tmp_path / f"out-{seed}.png").text["seed"] == str(seed)
    assert not np.array_equal(_pixels(tmp_path / "out-5.png"), _pixels(tmp_path / "out-6.png"))


def test_prompt_file_range_batches_and_placeholders(flux_schnell, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n# a comment\n\nA Blue Car, at night!\n")
    r = generate("--model", flux_schnell[2], "--prompt-file", "prompts.txt", "--seed", "0-1", "--batch-size", 3,
                 "-o", "{i}-{prompt}-{seed}.png", *SIZE, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = ["0-a-red-fox-0.png", "1-a-red-fox-1.png", "2-a-blue-car-at-night-0.png", "3-a-blue-car-at-night-1.png"]
    assert r.stdout.split() == names
    texts = [Image.open(tmp_path / n).text for n in names]
    assert [(t["prompt"], t["seed"]) for t in texts] == [("a red fox", "0"), ("a red fox", "1"),
                                                         ("A Blue Car, at night!", "0"), ("A Blue Car, at night!", "1")]
    # made in batches of 3 and 1; each equals its image made alone, to a level of 8-bit rounding
    r = generate("--model", flux_schnell[2], "--prompt", "A Blue Car, at night!", "--seed", 0, "-o", "alone.png",
                 *SIZE, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.abs(_pixels(tmp_path / names[2]) - _pixels(tmp_path / "alone.png")).max() <= 1


def test_random_seeds_and_file_mode(flux_schnell, tmp_path):
    old = os.umask(0o022)
    try:
        r = generate("--model", flux_schnell[2], "--prompt", "x", "--n-images", 3, *SIZE, "--quiet", cwd=tmp_path)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("image-*.png"))
    assert len(files) == 3 and len({Image.open(f).text["seed"] for f in files}) == 3
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files)


def test_mistakes_are_one_line_and_write_nothing(flux_schnell, tmp_path):
    m = ("--model", flux_schnell[2])
    assert_clean_error(generate(*m, "--prompt", "x", "--seed", "1,2", "-o", "o.png", cwd=tmp_path),
                       "2 images need {seed}, {i} or {prompt} in the file name")
    assert_clean_error(generate(*m, "--prompt", "x", "--seed", "1,2", "--n-images", 3, cwd=tmp_path),
                       "2 seeds given but --n-images 3")
    assert_clean_error(generate(*m, "--seed", 1, cwd=tmp_path), "give --prompt TEXT or --prompt-file FILE")
    assert_clean_error(generate(*m, "--prompt", "x", "--seed", "3-x", cwd=tmp_path), "a comma-separated list")
    (tmp_path / "p.txt").write_text("a\na\n")
    assert_clean_error(generate(*m, "--prompt-file", "p.txt", "--seed", 1, "-o", "{prompt}.png", cwd=tmp_path),
                       "two images would both be written to a.png; add {i}")
    assert_clean_error(generate(*m, "--prompt-file", "missing.txt", cwd=tmp_path), "cannot read missing.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]
