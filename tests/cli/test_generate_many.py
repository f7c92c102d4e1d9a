"""`generate` with several seeds, prompt files, batches and file-name templates (issue 15's command line)."""

import json
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
    assert_clean_error(generate(*m, "--prompt", "x", "--seed", "0-10000000000", cwd=tmp_path),
                       "at most 10000 seeds at a time")  # refused, not a list of 10^10 seeds
    assert_clean_error(generate(*m, "--prompt", "x", "--n-images", 10**9, cwd=tmp_path), "--n-images")
    (tmp_path / "p.txt").write_text("a\na\n")
    assert_clean_error(generate(*m, "--prompt-file", "p.txt", "--seed", 1, "-o", "{prompt}.png", cwd=tmp_path),
                       "two images would both be written to a.png; add {i}")
    assert_clean_error(generate(*m, "--prompt-file", "missing.txt", cwd=tmp_path), "cannot read missing.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_jpeg_webp_metadata_and_replay(flux_schnell, tmp_path):
    m = ("--model", flux_schnell[2], "--prompt", "a fox", *SIZE, "--quiet")
    for args in (("--seed", "5,6", "-o", "out-{seed}.png"), ("--seed", 5, "-o", "x.jpg"),
                 ("--seed", 5, "-o", "x.webp", "--quality", 80, "--metadata")):
        r = generate(*m, *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    for name in ("x.jpg", "x.webp"):
        assert Image.open(tmp_path / name).format == {"jpg": "JPEG", "webp": "WEBP"}[name[2:]]
    sidecar = json.loads((tmp_path / "x.json").read_text())
    assert sidecar["settings"]["seed"] == 5 and sidecar["settings"]["steps"] == 2 and sidecar["batch"]["size"] == 1
    assert set(sidecar["stats"]["seconds"]) == {"text_encoding", "denoising", "decoding"}
    # each file makes out-5.png again, bit for bit, with no other option given (the model comes from the record)
    for source in ("out-5.png", "x.jpg", "x.webp", "x.json"):
        r = generate("--from-metadata", source, "-o", "again.png", "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(tmp_path / "out-5.png")), source
    # options replace recorded settings
    r = generate("--from-metadata", "x.webp", "--steps", 1, "--prompt", "a hen", "-o", "o.png", "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = Image.open(tmp_path / "o.png").text
    assert (text["steps"], text["prompt"], text["seed"], text["width"]) == ("1", "a hen", "5", "48")


def test_replay_of_a_batch_member_is_exact(flux_schnell, tmp_path):
    m = ("--model", flux_schnell[2], "--prompt", "a fox", *SIZE)
    r = generate(*m, "--seed", "1-3", "--batch-size", 3, "-o", "b-{seed}.png", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = generate("--from-metadata", "b-2.png", "-o", "again.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "made in a batch of 3: making it again as one" in r.stderr
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(tmp_path / "b-2.png"))
    assert json.loads(Image.open(tmp_path / "again.png").text["mlx_diffusion.batch"]) == {"size": 3, "index": 1}


def test_replay_and_format_mistakes_are_one_line(flux_schnell, tmp_path):
    m = ("--model", flux_schnell[2], "--prompt", "x")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "moved.json").write_text(json.dumps({"settings": {"prompt": "x", "seed": 1, "model": "/no/such"}}))
    for args, match in (((*m, "-o", "x.png", "--quality", 50), "--quality is for .jpg and .webp files"),
                        ((*m, "-o", "x.tif"), "must end in .png, .jpg, .jpeg or .webp"),
                        (("--from-metadata", "plain.png"), "records no mlx_diffusion settings"),
                        (("--from-metadata", "missing.png"), "missing.png does not exist"),
                        (("--from-metadata", "moved.json"), "made with /no/such, which is not here: give --model")):
        assert_clean_error(generate(*args, cwd=tmp_path), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.json", "plain.png"]


def test_image_to_image_from_the_command_line(flux_schnell, tmp_path):
    m = ("--model", flux_schnell[2], "--prompt", "a fox", "--steps", 3, "--quiet")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(tmp_path / "start.jpg")
    r = generate(*m, "--image", "start.jpg", "--strength", 0.5, "--seed", 2, "-o", "a.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = Image.open(tmp_path / "a.png").text
    assert Image.open(tmp_path / "a.png").size == (48, 32)  # the start image's size, down to a multiple of 16
    assert text["strength"] == "0.5" and text["init_image"].startswith("sha256:")
    r = generate("--from-metadata", "a.png", "--image", "start.jpg", "-o", "b.png", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert_clean_error(generate("--from-metadata", "a.png", "-o", "c.png", cwd=tmp_path),
                       "made from a start image: give it again")
    assert_clean_error(generate(*m, "--image", "nothing.png", cwd=tmp_path), "nothing.png does not exist")
    assert_clean_error(generate(*m, "--image", "start.jpg", "--strength", 0, cwd=tmp_path),
                       "strength must be above 0 and at most 1")
    assert not (tmp_path / "c.png").exists()
