"""Comparison grids: models x prompts x seeds, models loaded one after the other, a labelled grid, its JSON record and
tiles that remake themselves from their metadata."""

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

import helpers  # noqa: F401
from mlx_diffusion import GenerationSettings, load_pipeline
from mlx_diffusion.tour import compare

ROOT = Path(__file__).resolve().parents[2]


def test_two_models_loaded_one_after_the_other(flux_schnell, monkeypatch, tmp_path):
    events, alive = [], []
    real_load = compare.load_pipeline

    def load(path, **kw):
        gc.collect()
        events.append(("load", compare.model_name(path), sum(r() is not None for r in alive)))
        pipe = real_load(path, **kw)
        alive.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(compare, "load_pipeline", load)
    tiles = compare.render([None, flux_schnell[2]], ["a red circle", "two green squares"], [0, 1], size=32)
    assert [e[:2] for e in events] == [("load", "built-in"), ("load", "mlx")]
    assert events[1][2] == 0  # the built-in pipeline was gone before the second model was loaded
    assert [(t.model, t.prompt, t.seed) for t in tiles][:3] == [("built-in", "a red circle", 0),
                                                                ("built-in", "a red circle", 1),
                                                                ("built-in", "two green squares", 0)]
    assert {t.steps for t in tiles if t.model == "built-in"} == {20} and {t.steps for t in tiles if t.model == "mlx"} == {4}
    record = compare.write(tiles, tmp_path / "grid.png")
    assert len(record["tiles"]) == 8 and set(record["tiles"][0]) == {
        "model", "prompt", "seed", "steps", "guidance", "seconds", "peak_memory_gb", "file"}
    assert json.loads((tmp_path / "grid.json").read_text()) == record
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 4 * 128 and grid.size[1] > 2 * 128
    # every tile is a PNG whose settings remake it
    t = record["tiles"][-1]
    tile = Image.open(tmp_path / t["file"])
    settings = GenerationSettings.from_metadata(tile.text)
    assert (settings.prompt, settings.seed, settings.steps) == (t["prompt"], t["seed"], t["steps"])
    again = load_pipeline(flux_schnell[2], progress=False).generate(settings)
    assert np.array_equal(np.asarray(again), np.asarray(tile))


def test_compare_command_defaults_offline(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlx_diffusion.compare", "--seeds", "0,1", "--steps", "4", "-o",
                        "grid.png", "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "grid.json").read_text())
    assert len(record["tiles"]) == 2 * 5 and {t["model"] for t in record["tiles"]} == {"built-in"}
    assert all((tmp_path / t["file"]).is_file() for t in record["tiles"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 128


def test_compare_command_errors(tmp_path):
    from test_cli import assert_clean_error

    def compare_cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_diffusion.compare", *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})

    assert_clean_error(compare_cli("--models", tmp_path / "nope", "-o", "g.png"), "does not exist")
    assert_clean_error(compare_cli("--bank", "real", "--category", "nope", "-o", "g.png"), "has no category")
    assert_clean_error(compare_cli("--seeds", "a,b", "-o", "g.png"), "--seeds")
    assert_clean_error(compare_cli("-o", "g.jpg"), "must end in .png")
    assert not list(tmp_path.iterdir())


def test_reference_column_equals_ours(tmp_path):
    """--reference diffusers: each model's tiles are followed by diffusers' on the same weights and noise."""
    r = subprocess.run([sys.executable, "-m", "mlx_diffusion.compare", "--prompt", "a red circle on a blue background",
                        "--prompt", "two green squares", "--seeds", "3", "--steps", "4", "--reference", "diffusers",
                        "-o", "grid.png", "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    tiles = json.loads((tmp_path / "grid.json").read_text())["tiles"]
    assert [t["model"] for t in tiles] == ["built-in"] * 2 + ["built-in (diffusers)"] * 2
    for ours, ref in zip(tiles[:2], tiles[2:]):
        assert (ours["prompt"], ours["seed"], ours["steps"]) == (ref["prompt"], ref["seed"], ref["steps"])
        a, b = (np.asarray(Image.open(tmp_path / t["file"]), dtype=int) for t in (ours, ref))
        assert np.abs(a - b).max() <= 1  # the same image, to uint8 rounding
        assert ref["peak_memory_gb"] is None and ref["seconds"] > 0
