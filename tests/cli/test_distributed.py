"""`generate` under `mlx.launch` (2 local ranks, ring backend over 127.0.0.1): data parallel images equal to a
one-process run's; rank 0's random seeds are everyone's; a rank holding another model, or a rank that died, ends
every rank with a message instead of a hang."""

import json
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


def test_a_hostfile_as_the_readme_shows_it(tmp_path):
    """The README's two-Mac hostfile, with this machine as both Macs (mlx.launch runs 127.0.0.1 without ssh)."""
    host = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}
    (tmp_path / "hosts.json").write_text(json.dumps([host, host]))
    r = subprocess.run([LAUNCH, "--backend", "ring", "--hostfile", "hosts.json", "--", sys.executable, "-m",
                        "mlx_diffusion.generate", "--prompt", "a red circle", "--seed", "1,2", "--steps", "2", "--quiet",
                        "-o", "circle-{seed}.png"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert sorted(r.stdout.split()) == ["circle-1.png", "circle-2.png"], r.stdout + r.stderr


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


@pytest.fixture(scope="module")
def flux_four_heads(tmp_path_factory):
    """A tiny FLUX.1-schnell whose 4 attention heads split across 2 ranks; float32 and 8-bit (groups of 32)."""
    import tiny_models
    from mlx_diffusion.convert import convert

    root = tmp_path_factory.mktemp("flux4")
    pipe = tiny_models.tiny_flux_pipeline(dev=False)
    pipe.register_modules(transformer=tiny_models.tiny_flux_transformer(heads=4, head_dim=16))
    src = tiny_models.save(pipe, root / "diffusers")
    log = lambda *a: None  # noqa: E731
    return (convert(src, root / "float", bits=None, dtype="float32", progress=False, log=log),
            convert(src, root / "q8", bits=8, group_size=32, dtype="float32", progress=False, log=log))


@pytest.mark.parametrize("quantized", [False, True])
def test_a_sharded_transformer_gives_the_one_process_image(flux_four_heads, quantized, tmp_path):
    folder = flux_four_heads[quantized]
    args = ("--model", folder, "--prompt", "a red fox", "--seed", "4,5", "--width", 48, "--height", 32, "--steps", 2,
            "--quiet")
    r = launch("-m", "mlx_diffusion.generate", *args, "--shard", "-o", "two-{seed}.png", cwd=tmp_path)
    assert r.stdout.split() == ["two-4.png", "two-5.png"], r.stdout + r.stderr  # rank 0 writes every image
    r = generate(*args, "-o", "one-{seed}.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for seed in (4, 5):
        two = np.asarray(Image.open(tmp_path / f"two-{seed}.png"), dtype=np.int16)
        one = np.asarray(Image.open(tmp_path / f"one-{seed}.png"), dtype=np.int16)
        assert np.abs(two - one).max() <= 1, seed  # 8-bit pixels: the sums' order differs, the image does not


API_SCRIPT = """
import sys, numpy as np
import mlx_diffusion
from mlx_diffusion import load_pipeline
from mlx_diffusion.pipelines import distributed
from mlx.utils import tree_flatten
pipe = load_pipeline(sys.argv[1], progress=False, shard=sys.argv[2] == "shard")
size = {} if sys.argv[1] == "built-in" else dict(width=48, height=32)
loaded, load = set(), pipe.model
pipe.model = lambda component: loaded.add(component) or load(component)
image = pipe.generate("a red fox", seed=4, steps=2, output_type="np", **size)
print("encoders", distributed.rank(), sorted(c for c in loaded if c.startswith("text_encoder")))
held = sum(v.nbytes for _, v in tree_flatten(load("transformer").parameters()))
print("held", distributed.rank(), held)
if distributed.rank() == 0:
    np.save(sys.argv[3], image)
"""


@pytest.mark.parametrize("model", ["flux", "builtin"])
def test_a_sharded_transformer_is_within_the_parity_bound(flux_four_heads, model, tmp_path):
    """FLUX (double and single blocks) and the built-in model (SD3's joint blocks, its last one without a text
    output; 8-bit weights in groups of 64 split at 64)."""
    folder = flux_four_heads[0] if model == "flux" else "built-in"
    (tmp_path / "x.py").write_text(API_SCRIPT)
    sharded = launch("x.py", folder, "shard", "two.npy", cwd=tmp_path)
    r = subprocess.run([sys.executable, "x.py", folder, "whole", "one.npy"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    two, one = np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")
    assert np.abs(two - one).max() <= 1e-4 and one.std() > 0.05
    # each rank holds its half of the split layers (the embedders and modulations stay whole)
    whole = int(r.stdout.split()[-1])
    held = [int(line.split()[-1]) for line in sharded.stdout.splitlines() if line.startswith("held")]
    assert len(held) == 2 and held[0] == held[1] and 0.5 * whole < held[0] < 0.8 * whole, (held, whole)
    # the prompts are encoded once, on rank 0, and the embeddings sent to the other rank
    encoders = dict(line.split(" ", 2)[1:] for line in sharded.stdout.splitlines() if line.startswith("encoders"))
    assert encoders["1"] == "[]" and "text_encoder" in encoders["0"], encoders


TREE_SCRIPT = """
import mlx_diffusion
import mlx.core as mx
from mlx_diffusion.pipelines import distributed

def make():
    assert distributed.rank() == 0, "only rank 0 makes it"
    k = mx.random.key(3)
    return {"pos": (mx.random.normal((2, 5, 3), key=k), mx.arange(4, dtype=mx.int32)),
            "neg": [mx.random.normal((1, 7), key=k).astype(mx.bfloat16)]}

tree = distributed.from_rank_zero(make)
for key in ("pos", "neg"):
    for a in tree[key]:
        print("got", distributed.rank(), key, a.dtype, a.shape, a.astype(mx.float32).reshape(-1).tolist())
"""


def test_rank_zeros_arrays_reach_every_rank_bit_for_bit(tmp_path):
    (tmp_path / "x.py").write_text(TREE_SCRIPT)
    r = launch("x.py", cwd=tmp_path, timeout=120)
    got = [line.split(" ", 2) for line in r.stdout.splitlines() if line.startswith("got")]
    by_rank = {rank: [rest for _, r_, rest in got if r_ == rank] for rank in ("0", "1")}
    assert len(by_rank["0"]) == 3 and by_rank["0"] == by_rank["1"], r.stdout + r.stderr
    assert "mlx.core.bfloat16 (1, 7)" in r.stdout and "mlx.core.int32 (4,) [0.0, 1.0, 2.0, 3.0]" in r.stdout


def test_shard_outside_mlx_launch_is_refused(flux_four_heads, tmp_path):
    r = generate("--model", flux_four_heads[0], "--prompt", "a fox", "--shard", cwd=tmp_path)
    assert r.returncode != 0 and "mlx.launch" in r.stderr and "Traceback" not in r.stderr
