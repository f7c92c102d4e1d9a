"""The diffusers baseline as the commands reach it: `benchmarks/reference.py` of a checkout, run in a process of its
own (the package never imports torch, diffusers or transformers), on a model folder's weights exported in the
reference layout so that process never loads MLX."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from ..errors import InputError

REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "reference.py"


def module():
    """benchmarks/reference.py loaded for its presets (it imports torch only when it builds or runs)."""
    if not REFERENCE.is_file():
        raise InputError("the diffusers baseline and presets need a checkout with benchmarks/reference.py and the test "
                         "dependencies (./setup.sh --test)")
    spec = importlib.util.spec_from_file_location("mlx_diffusion_reference", REFERENCE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def call(args, what, say, env=None):
    """Run a command; its last stderr line becomes a one-line InputError when it fails."""
    say(f"running {what} ...")
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode:
        tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise InputError(f"{what} failed: {tail[0]}")


def export_weights(folder: Path, components, dst: Path):
    """Each component's weights in the reference layout (quantized layers dequantized) as dst/<component>.safetensors."""
    import mlx.core as mx

    from ..io.folder import reference_arrays
    from ..io.safetensors import SafetensorsWriter

    dst.mkdir(parents=True)
    for c in components:
        writer = SafetensorsWriter(dst / f"{c}.safetensors")
        for k, v in reference_arrays(folder / c).items():
            writer.add(k, mx.array(v))
        writer.close()


def run(request: dict, tmp: Path, say) -> dict:
    """`benchmarks/reference.py run` on a request (see tour.benchmark.profile); its result, images beside `out`."""
    module()
    path = tmp / "reference-request.json"
    path.write_text(json.dumps(request))
    call([sys.executable, str(REFERENCE), "run", str(path)], "diffusers", say)
    return json.loads(Path(request["out"]).read_text())
