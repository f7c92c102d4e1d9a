"""`generate` under `mlx.launch` (2 local ranks, ring backend over 127.0.0.1): data parallel images equal to a
one-process run's; rank 0's random seeds are everyone's; a rank holding another model, or a rank that died, ends
every rank with a message instead of a hang."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers  # noqa: F401
from test_cli import generate

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")


def launch(*args, cwd, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([LAUNCH, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--", sys.executable,
                           *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("model", ["builtin", "flux"])
def test_data_parallel_images_equal_one_process(model, flux_schnell, tmp_path):
    size = () if model == "builtin" else ("--model", flux_schnell[2], "--width", 48, "--height", 32, "--steps", 2)
    args = ("--prompt", "a red circle", "--seed", "1,2,3", *size, "--quiet")
    r = launch("-m", "mlx_diffusion.generate", *args, "-o", "two-{seed}.png", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.split()) == ["two-1.png", "two-2.png", "two-3.png"]  # each written once, by one rank
    r = generate(*args, "-o", "one-{seed}.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for seed in (1, 2, 3):
        assert np.array_equal(_pixels(tmp_path / f"two-{seed}.png"), _pixels(tmp_path / f"one-{seed}.png"))
        assert Image.open(tmp_path / f"two-{seed}.png").text["seed"] == str(seed)
    assert not np.array_equal(_pixels(tmp_path / "two-1.png"), _pixels(tmp_path / "two-2.png"))


def test_random_seeds_are_rank_zeros(tmp_path):
    r = launch("-m", "mlx_diffusion.generate", "--prompt", "a red circle", "--n-images", 3, "--steps", 2, "--quiet",
               cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(tmp_path.glob("image-*.png"))
    assert len(files) == 3 == len(set(r.stdout.split()))  # three seeds in all, not three per rank


SCRIPT = """
import os, sys
import mlx_diffusion
from mlx_diffusion.errors import Error
from mlx_diffusion.pipelines import distributed
try:
    if sys.argv[1] == "model":
        distributed.check_same_model(sys.argv[2 + distributed.rank()], "FOLDER")
    elif distributed.rank() == 1:
        os._exit(3)  # dies before the first exchange
    else:
        distributed.agree([5, 6])
except Error as e:
    print(f"rank {distributed.rank()}: {e}", file=sys.stderr)
    sys.exit(1)
print("done", distributed.rank())
"""


def test_ranks_with_different_models_all_stop(flux_schnell, tmp_path):
    (tmp_path / "x.py").write_text(SCRIPT)
    r = launch("x.py", "model", flux_schnell[2], flux_schnell[2], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split().count("done") == 2, r.stdout + r.stderr
    other = shutil.copytree(flux_schnell[2], tmp_path / "other")
    (other / "mlx_diffusion.json").write_text((other / "mlx_diffusion.json").read_text().replace("{", '{"x": 1, ', 1))
    r = launch("x.py", "model", flux_schnell[2], other, cwd=tmp_path)
    # every rank stops (mlx.launch ends the others once one fails, and itself exits 0), with the message
    assert "done" not in r.stdout and "exited with code 1" in r.stderr, r.stderr
    assert "rank 1 holds another model than rank 0 under FOLDER" in r.stderr, r.stderr


def test_a_dead_rank_ends_the_other_instead_of_a_hang(tmp_path):
    (tmp_path / "x.py").write_text(SCRIPT)
    r = launch("x.py", "dead", cwd=tmp_path, env={"MLX_DIFFUSION_COLLECTIVE_TIMEOUT": "10"}, timeout=120)
    assert "done" not in r.stdout and "rank 1 exited with code 3" in r.stderr, r.stderr


def test_a_rank_that_never_starts_ends_the_other_after_the_deadline(tmp_path):
    """Rank 0 of 2 started by hand (as mlx.launch would, by its environment) without rank 1: it waits for the
    connection until the deadline, then says so, instead of waiting for ever."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    (tmp_path / "hosts.json").write_text(f'[["127.0.0.1:{ports[0]}"], ["127.0.0.1:{ports[1]}"]]')
    (tmp_path / "x.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "hosts.json"),
           "MLX_DIFFUSION_COLLECTIVE_TIMEOUT": "5"}
    r = subprocess.run([sys.executable, "x.py", "seeds"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode != 0 and "done" not in r.stdout, r.stdout + r.stderr  # ended (SIGKILL) by the deadline
    assert "rank 0: no answer from the other ranks in 5 s while connecting" in r.stderr, r.stderr
