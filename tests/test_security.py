"""What a downloaded file cannot make us do: import or run code (class names map through our own table only, pickle
is refused: tests/io/test_safetensors.py, tests/pipelines/test_lora.py, tests/cli/test_cli.py), write where its
metadata says; and the web demo listens on this machine only unless told otherwise."""

import json

import pytest

import helpers  # noqa: F401
from mlx_diffusion.errors import Error, InputError, WeightsError
from mlx_diffusion.models import kind_of
from mlx_diffusion.pipelines.settings import GenerationSettings


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "diffusers.FluxPipeline", "subprocess.Popen",
                                  "__import__"])
def test_a_config_names_classes_only_from_our_table(name):
    for config in ({"_class_name": name}, {"architectures": [name]}):
        with pytest.raises(WeightsError, match="unsupported component class"):
            kind_of(config, "folder")


@pytest.mark.parametrize("field", ["output", "path", "out", "filename", "directory"])
def test_recorded_settings_hold_no_place_to_write(field):
    for data in ({"settings": {"prompt": "x", "seed": 1, field: "/etc/evil.png"}},
                 {"mlx_diffusion.settings": json.dumps({"prompt": "x", "seed": 1, field: "../evil.png"})}):
        with pytest.raises(InputError, match="broken"):
            GenerationSettings.from_metadata(data)


def test_components_of_a_folder_are_folder_names_not_paths(tmp_path):
    from mlx_diffusion.io.folder import read_info

    (tmp_path / "mlx_diffusion.json").write_text(json.dumps(
        {"format_version": 2, "family": "flux", "components": {"../../etc": "CLIPTextModel"},
         "defaults": {"steps": 4, "guidance": None, "max_sequence_length": 256, "width": 1024, "height": 1024}}))
    with pytest.raises(Error, match="malformed components"):
        read_info(tmp_path)


def test_the_web_demo_listens_on_this_machine_only_by_default():
    pytest.importorskip("gradio")
    from mlx_diffusion.app import main

    host = next(p for p in main.params if p.name == "host")
    assert host.default == "127.0.0.1"
