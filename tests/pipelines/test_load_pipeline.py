"""`load_pipeline` checks what a generation will read before any work: the scheduler config (required, one JSON
reader, validated), and reads every default from the folder through one path."""

import json
import shutil

import pytest

import helpers  # noqa: F401
from mlx_diffusion import load_pipeline
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.folder import INFO_FILE

SCHEDULER = "scheduler/scheduler_config.json"


@pytest.fixture
def folder(sd3, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(sd3[2], out)
    return out


@pytest.mark.parametrize("content, match", [
    (None, r"scheduler_config\.json is missing"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"_class_name": "EulerDiscreteScheduler"}', "unsupported scheduler 'EulerDiscreteScheduler'"),
    ('{"shift": 3.0, "use_beta_sigmas": true}', "beta sigmas"),
    ('{"shift": 3.0, "stochastic_sampling": true}', "stochastic sampling is not supported"),
    ('{"shift": "3.0"}', "shift must be a float"),
    ('{"shift": 3.0, "use_dynamic_shifting": true, "time_shift_type": "cubic"}', "unknown time_shift_type"),
])
def test_scheduler_config_missing_malformed_or_unsupported(folder, content, match):
    path = folder / SCHEDULER
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(WeightsError, match=match) as e:
        load_pipeline(folder, progress=False)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_defaults_come_from_the_folder(folder):
    p = load_pipeline(folder, progress=False)
    assert p.scheduler_config.shift == 3.0  # SD3's, read from the folder: without it SD3 samples at shift 1
    info = json.loads((folder / INFO_FILE).read_text())
    info["defaults"] = {"steps": 3, "guidance": 2.5, "max_sequence_length": 20, "width": 32, "height": 48}
    (folder / INFO_FILE).write_text(json.dumps(info))
    p = load_pipeline(folder, progress=False)
    assert (p.default_steps, p.default_guidance, p.max_sequence_length) == (3, 2.5, 20)
    image = p.generate("a lighthouse", seed=1)
    s = p.last_settings
    assert image.size == (32, 48) and (s.steps, s.guidance, s.width, s.height) == (3, 2.5, 32, 48)
    assert load_pipeline(folder, progress=False, max_sequence_length=8).max_sequence_length == 8


def test_converter_supplies_a_scheduler_when_the_source_has_none(sd3, tmp_path):
    from mlx_diffusion.convert import convert

    src = tmp_path / "src"
    shutil.copytree(sd3[1], src)
    shutil.rmtree(src / "scheduler")
    said = []
    out = convert(src, tmp_path / "out", bits=None, dtype="float32", progress=False, log=said.append)
    assert any("no scheduler/ folder" in m for m in said)
    assert json.loads((out / SCHEDULER).read_text())["shift"] == 3.0  # the released SD3 scheduler
    assert load_pipeline(out, progress=False).scheduler_config.shift == 3.0
