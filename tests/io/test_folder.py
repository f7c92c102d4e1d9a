"""The model-folder format: the info file with its generation defaults, the released defaults the converter writes,
format-1 folders read with those defaults, and the one-line errors for bad info files."""

import json
import shutil

import pytest

import helpers  # noqa: F401
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.folder import FORMAT_VERSION, INFO_FILE, read_info, released_defaults, write_info

FLUX_VAE = {"block_out_channels": [128, 256, 512, 512]}


@pytest.mark.parametrize("family, variant, transformer, expected", [
    ("flux", "schnell", {}, {"steps": 4, "guidance": None, "max_sequence_length": 256, "width": 1024}),
    ("flux", "dev", {}, {"steps": 28, "guidance": 3.5, "max_sequence_length": 512, "width": 1024}),
    ("sd3", "3", {"sample_size": 128}, {"steps": 28, "guidance": 7.0, "max_sequence_length": 256, "width": 1024}),
    ("sd3", "3.5", {"sample_size": 64}, {"steps": 28, "guidance": 7.0, "max_sequence_length": 256, "width": 512}),
])
def test_released_defaults(family, variant, transformer, expected):
    d = released_defaults(family, variant, transformer, FLUX_VAE)
    assert {k: d[k] for k in expected} == expected and d["height"] == d["width"]


def test_converted_folders_carry_their_defaults(flux_schnell, flux_dev, sd3):
    for (_, _, folder), (steps, guidance, length) in ((flux_schnell, (4, None, 256)), (flux_dev, (28, 3.5, 512)),
                                                      (sd3, (28, 7.0, 256))):
        info = json.loads((folder / INFO_FILE).read_text())
        assert info["format_version"] == FORMAT_VERSION
        d = info["defaults"]
        assert (d["steps"], d["guidance"], d["max_sequence_length"]) == (steps, guidance, length)
    assert json.loads((sd3[2] / INFO_FILE).read_text())["defaults"]["width"] == 8 * 8  # sample_size 8, VAE factor 8


def test_format_1_folder_reads_with_released_defaults(flux_dev, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(flux_dev[2], old)
    info = json.loads((old / INFO_FILE).read_text())
    expected = info.pop("defaults")
    (old / INFO_FILE).write_text(json.dumps({**info, "format_version": 1}))
    assert read_info(old)["defaults"] == expected
    # format 1 with a partial `defaults` (the built-in model's before format 2): the folder's values win
    (old / INFO_FILE).write_text(json.dumps({**info, "format_version": 1, "defaults": {"steps": 9}}))
    assert read_info(old)["defaults"] == {**expected, "steps": 9}


@pytest.mark.parametrize("change, match", [
    ({"format_version": 99}, "newer than this mlx_diffusion reads"),
    ({"format_version": "2"}, "bad format_version"),
    ({"defaults": None}, "`defaults` must be an object"),
    ({"defaults": {"steps": 4}}, "`defaults` lacks guidance, max_sequence_length, width, height"),
    ({"defaults": {"steps": 0, "guidance": "x", "max_sequence_length": 256, "width": 64, "height": 64}},
     "bad value in `defaults`: steps 0, guidance 'x'"),
    ({"defaults": {"steps": 4, "guidance": float("nan"), "max_sequence_length": -1, "width": 64, "height": 64}},
     "guidance nan, max_sequence_length -1"),
])
def test_bad_info_files(flux_schnell, tmp_path, change, match):
    folder = tmp_path / "m"
    shutil.copytree(flux_schnell[2], folder)
    info = json.loads((folder / INFO_FILE).read_text())
    (folder / INFO_FILE).write_text(json.dumps({**info, **change}))
    with pytest.raises(WeightsError, match=match):
        read_info(folder)


def test_write_info_checks_defaults(tmp_path):
    common = dict(family="sd3", variant="3", source="x", bits=4, group_size=64, dtype="bfloat16", components={})
    write_info(tmp_path, **common, defaults=released_defaults("sd3", "3", {}, FLUX_VAE), extra_key=1)
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["format_version"] == FORMAT_VERSION and info["extra_key"] == 1 and info["group_size"] == 64
    with pytest.raises(WeightsError, match="lacks"):
        write_info(tmp_path, **common, defaults={"steps": 4})
