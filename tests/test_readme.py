"""Every command in the README runs, as a user would type it, on files named as the README names them.

Each line of the README's ```bash blocks (continuations joined, `&&` chains split, comments dropped) runs in a
sandbox folder that holds what a user would have there: a Hugging Face cache with tiny random diffusers repositories
under the real repository names (so `convert --model flux-schnell` works offline), and tiny random checkpoints in
the files users download (`flux1-schnell.safetensors`, `flux1-schnell-Q4_K_S.gguf`, `ae.safetensors`, SAI's SD3
files, ...; from `mlx_diffusion.tour.checkpoints`). The convert lines are alternatives that make the same folder, so
each starts from no output folder, as a user choosing one would. ```text blocks are synopses and are not run; the
```python block runs after the commands. `./setup.sh` and the test command run in CI (`.ci/run`).
Inline commands with arguments are either run here too or named with the test that runs them.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models
from helpers import fake_hub_cache

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Inline commands (in `code spans`) with arguments, and the test that runs each ("here": run in the sandbox below).
INLINE = {
    'python -c "from PIL import Image; print(Image.open(\'fox.png\').text)"': "here",
    "python -m mlx_diffusion.tiny.evaluate --prompts 96": "tests/tiny/test_builtin_model.py::test_cli_defaults_to_the_builtin_model",
    "mlx-diffusion benchmark --steps 8 --compare-diffusers":
        "tests/tour/test_benchmark.py::test_against_diffusers_on_the_builtin_model",
    "mlx-diffusion benchmark --empty-kernel-cache --compare-diffusers":
        "tests/tour/test_benchmark.py::test_against_diffusers_on_the_builtin_model",
    "mlx-diffusion benchmark --preset block --family flux --steps 4 --repeat 2 --compare-diffusers":
        "tests/tour/test_benchmark.py::test_against_diffusers_on_a_random_preset",
    "mlx-diffusion benchmark --preset block --family flux --steps 4 --repeat 2 --compare-diffusers --bits 4":
        "tests/tour/test_benchmark.py::test_against_diffusers_on_a_random_preset",
    "mlx-diffusion benchmark --preset block --family flux --size 1024 --steps 2 --repeat 1 --compare-diffusers":
        "tests/tour/test_benchmark.py::test_against_diffusers_on_a_random_preset",
    "python benchmarks/bench_memory.py": "tests/test_readme.py::test_memory_benchmark_runs",
    "python benchmarks/bench_batch.py": "tests/test_readme.py::test_batch_benchmark_runs",
    "python3 tools/convert.py": "tests/convert/test_convert_model_names.py::test_model_name_from_offline_cache",
    "mlx-diffusion compare --reference diffusers": "tests/tour/test_compare.py::test_reference_column_equals_ours",
    "python benchmarks/bench_convert.py": "tests/test_readme.py::test_convert_benchmark_runs",
    "python benchmarks/bench_lora.py": "tests/test_readme.py::test_lora_benchmark_runs",
    "python benchmarks/bench_step_cache.py": "tests/test_readme.py::test_step_cache_benchmark_runs",
    "python benchmarks/bench_step_cache.py --model FOLDER": "tests/test_readme.py::test_step_cache_benchmark_on_a_preset_runs",
    "python benchmarks/bench_step_cache.py --preset block --family flux-dev --prompts 1 --size 256 --thresholds "
    "0.1,0.2,0.5,1.0": "tests/test_readme.py::test_step_cache_benchmark_on_a_preset_runs",
    "python benchmarks/bench_step_cache.py --preset block --family sd3 --prompts 1 --size 256 --thresholds "
    "0.1,0.2,0.5,1.0": "tests/test_readme.py::test_step_cache_benchmark_on_a_preset_runs",
    "python benchmarks/profile_step.py --family flux --size 1024": "tests/test_readme.py::test_step_profile_runs",
    "python benchmarks/bench_shard.py": "tests/test_readme.py::test_shard_benchmark_runs",
    "python benchmarks/bench_shard.py --real-shapes": "tests/test_readme.py::test_shard_shares_at_real_shapes",
    "python benchmarks/profile_step.py --family sd3 --size 1024": "tests/test_readme.py::test_step_profile_runs",
}
_HEAD = re.compile(r"^(python3? -m \S+|python3? -c|python3? \S+\.py|mlx-diffusion(-\w+)?( [a-z]+)?)( |$)")


def bash_commands(text: str) -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out += [c.strip() for c in line.split("&&")]
    return out


def inline_commands(text: str) -> list[str]:
    """Code spans in the prose that are commands: scripts, and commands with arguments (a bare command name is a name)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [re.sub(r"\s*\n\s*", " ", s) for s in re.findall(r"`([^`]+)`", prose)]
    return [s for s in spans if (m := _HEAD.match(s)) and " | " not in s and not re.search(r"\b(COMMAND|FOLDER|FILE|NAME|TEXT)\b", s)
            and (s[m.end():].strip() or m.group(1).endswith(".py"))]


def test_the_readme_has_commands_and_ci_runs_its_test_command():
    commands = bash_commands(README)
    assert len(commands) >= 15
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./setup.sh --test" in ci and "python3 -m pytest -q" in ci
    assert "./setup.sh --test" in commands and "python3 -m pytest -q" in README


def test_every_inline_command_is_run_somewhere():
    for cmd in inline_commands(README):
        assert cmd in INLINE, f"README command `{cmd}` is run by no test: add it to INLINE with the test that runs it"
    for where in set(INLINE.values()) - {"here"}:
        path, name = where.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), where


# ---------------------------------------------------------------------------------------------------------------
# the sandbox


def _tiny_repo(family: str, folder: Path):
    """A released repository's layout at tiny widths; the transformer one block and one head deep, because the
    README's commands run at the released models' default 1024x1024, where attention over 4,096 tokens is the cost;
    SD3's position table covers that size."""
    if family == "flux":  # FLUX's 128-wide heads, so that a GGUF of the same architecture fits the folder's config
        pipe = tiny_models.tiny_flux_pipeline()
        pipe.transformer = tiny_models.tiny_flux_transformer(layers=1, single_layers=1, heads=1,
                                                             head_dim=128, axes=(16, 56, 56))
    else:
        pipe = tiny_models.tiny_sd3_pipeline()
        pipe.transformer = tiny_models.tiny_sd3_transformer(layers=1, heads=1, head_dim=48, max_pos=64,
                                                            sample_size=128)
    return tiny_models.save(pipe, folder)


def _downloads(work: Path, flux_repo: Path):
    """The single files the README's convert commands name, tiny and random, in their real layouts."""
    from mlx_diffusion.io.safetensors import SafetensorsWriter
    from mlx_diffusion.tour import checkpoints as ck

    # a city96 GGUF of the repository's transformer architecture, as the real ones are of FLUX.1-schnell's
    cfg = json.loads((flux_repo / "transformer" / "config.json").read_text())
    ck.write_gguf(work / "flux1-schnell-Q4_K_S.gguf", ck.tensors(ck.flux_transformer(
        hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"], double=cfg["num_layers"],
        single=cfg["num_single_layers"], context_dim=cfg["joint_attention_dim"],
        pooled_dim=cfg["pooled_projection_dim"])))
    # a kohya-layout LoRA over BFL's names for that repository's FLUX (fused qkv, an MLP layer), with its alpha
    import numpy as np
    from safetensors.numpy import save_file

    hidden, rng = cfg["num_attention_heads"] * cfg["attention_head_dim"], np.random.default_rng(0)
    lora = {}
    for stem, out_dims in (("double_blocks_0_img_attn_qkv", 3 * hidden), ("double_blocks_0_img_mlp_0", 4 * hidden)):
        lora[f"lora_unet_{stem}.lora_down.weight"] = rng.standard_normal((4, hidden), np.float32) * 0.1
        lora[f"lora_unet_{stem}.lora_up.weight"] = rng.standard_normal((out_dims, 4), np.float32) * 0.1
        lora[f"lora_unet_{stem}.alpha"] = np.array(2.0, np.float32)
    save_file(lora, work / "fox-style.safetensors")
    # the files FLUX.1 and SD3 users download; one CLIP-L and one T5 file serve both, as they do for real
    ck.save_safetensors(work / "flux1-schnell.safetensors",
                        ck.flux_transformer(hidden=256, double=1, single=1, context_dim=256, pooled_dim=64),
                        dtype="bfloat16")
    ck.write_gguf(work / "flux1-dev-Q8_0.gguf",
                  ck.tensors(ck.flux_transformer(hidden=256, double=1, single=1, context_dim=256, pooled_dim=64,
                                                 guidance=True), seed=1),
                  types=lambda name, a: ck.city96_type(name, a, "Q8_0"))
    small_vae = dict(channels=32, multipliers=(1, 1, 1, 1), res_blocks=1)
    ck.save_safetensors(work / "ae.safetensors", ck.vae(**small_vae))
    parts = {"clip_l": ck.clip(hidden=64, layers=1), "clip_g": ck.clip(hidden=128, layers=1, projection=True),
             "t5xxl": ck.t5_encoder(d_model=256, layers=1, heads=2, d_kv=32, d_ff=96)}
    ck.save_safetensors(work / "clip_l.safetensors", parts["clip_l"])
    ck.save_safetensors(work / "clip_g.safetensors", parts["clip_g"])
    ck.save_safetensors(work / "t5xxl_fp16.safetensors", parts["t5xxl"], dtype="float16")
    sd3 = ck.sd3_transformer(depth=2, context_dim=256, pooled_dim=192, pos_max=64)
    for name, with_encoders in (("sd3_medium.safetensors", False), ("sd3_medium_incl_clips_t5xxlfp16.safetensors", True)):
        w = SafetensorsWriter(work / name)
        ck.save_safetensors(None, sd3, prefix="model.diffusion_model.", writer=w)
        ck.save_safetensors(None, ck.vae(**small_vae), prefix="first_stage_model.", writer=w)
        if with_encoders:
            for part, shapes in parts.items():
                ck.save_safetensors(None, shapes, prefix=f"text_encoders.{part}.transformer.", writer=w,
                                    dtype="float16" if part == "t5xxl" else "float32")
        w.close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    cache, made = tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("repos")
    repos = {"black-forest-labs/FLUX.1-schnell": _tiny_repo("flux", made / "s"),
             "stabilityai/stable-diffusion-3-medium-diffusers": _tiny_repo("sd3", made / "m")}
    _downloads(work, repos["black-forest-labs/FLUX.1-schnell"])
    for repo, folder in repos.items():
        fake_hub_cache(cache, repo, folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache / "home"),
           "PYTHONPATH": str(ROOT)}
    return work, env


def _run(args: list[str], work, env):
    started = time.perf_counter()
    r = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    print(f"{time.perf_counter() - started:6.1f} s  {shlex.join(args)[:150]}")
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{shlex.join(args)}\n{r.stderr[-3000:]}"
    return r


def _serve(args, work, env):
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([*args, "--port", str(port)], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.perf_counter() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.perf_counter() < deadline, proc.stderr.read()[-3000:]
                time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -15, 128 + 15) and "Traceback" not in err, err[-3000:]  # 143: SIGTERM handled


@pytest.mark.slow
def test_every_readme_command_runs(sandbox):
    work, env = sandbox
    ran = 0
    for cmd in bash_commands(README):
        args = shlex.split(cmd)
        if args[0] == "./setup.sh" or args[:3] == ["python3", "-m", "pytest"]:
            continue  # CI runs these (test above)
        if args[:2] == ["pip", "install"]:  # setup.sh --test installed it; the extra must exist
            extra = re.fullmatch(r'(?:-e )?\.\[(\w+)\]', " ".join(args[2:]).replace('"', ""))
            assert extra and f"\n{extra.group(1)} = [" in (ROOT / "pyproject.toml").read_text(), cmd
            continue
        if args[0] in ("python", "python3"):
            args[0] = sys.executable
        if args[1:3] == ["-m", "mlx_diffusion.app"]:  # a server: it must come up and answer, then it is stopped
            _serve(args, work, env)
            ran += 1
            continue
        if args[:2] == ["mlx-diffusion", "convert"] and "-o" in args:
            shutil.rmtree(work / args[args.index("-o") + 1], ignore_errors=True)  # the alternatives: one each
        r = _run(args, work, env)
        ran += 1
        for flag in ("-o", "--output"):
            if flag in args:
                out = args[args.index(flag) + 1]
                written = r.stdout.split() if "{" in out else [out]  # a template: the files it printed
                assert written and all((work / f).exists() for f in written), cmd
    assert ran >= 15

    # the Python example, then the inline commands marked "here"
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert code
    for block in code:
        _run([sys.executable, "-c", block], work, env)
    for cmd, where in INLINE.items():
        if where == "here":
            args = shlex.split(cmd)
            _run([sys.executable, *args[1:]], work, env)


def _benchmark_record(script: str, *args, timeout=900) -> dict:
    """Run benchmarks/SCRIPT with ARGS; its last output line, the JSON record."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_benchmark_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--tiny", "--size", "64",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| SD3 Medium | 4 | no |" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("{")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_convert_benchmark_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_convert.py"), "--layers", "1",
                        "--single-layers", "1", "--heads", "2", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converted at 4 bits" in r.stdout and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_batch_benchmark_runs():
    record = _benchmark_record("bench_batch.py", "--images", 2, "--batch", 2, "--steps", 2, timeout=600)
    assert record["batch"] == 2 and record["speedup"] > 0


@pytest.mark.slow
def test_lora_benchmark_runs():
    record = _benchmark_record("bench_lora.py", "--preset", "tiny", "--bits", 8, "--rank", 2, "--size", 64,
                               "--steps", 2)
    assert record["layers"] > 0 and record["beside_s"] > 0 and record["baked_s"] > 0


@pytest.mark.slow
def test_step_cache_benchmark_runs():
    record = _benchmark_record("bench_step_cache.py", "--prompts", 4, "--steps", 6, "--thresholds", "0.3")
    assert set(record["rows"]) == {"off", "0.3"} and record["rows"]["off"]["skipped"] == 0
    assert 0 <= record["rows"]["0.3"]["skipped"] < 1 and record["rows"]["0.3"]["seconds_per_image"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux-dev", "sd3"])
def test_step_cache_benchmark_on_a_preset_runs(family):
    """The real-widths mode on the tiny preset: threshold 0 (every block always) skips nothing and changes nothing;
    threshold 1 skips at most the steps after the first, and changes the image exactly when it skips."""
    record = _benchmark_record("bench_step_cache.py", "--preset", "tiny", "--family", family, "--prompts", 1, "--steps",
                               4, "--size", 64, "--thresholds", "0,1")
    rows = record["rows"]
    assert set(rows) == {"off", "0.0", "1.0"} and record["steps"] == 4 and record["size"] == 64
    assert rows["0.0"]["skipped"] == 0 and rows["0.0"]["max_abs_diff"] == 0
    assert 0 <= rows["1.0"]["skipped"] <= 0.75 and (rows["1.0"]["mean_abs_diff"] > 0) == (rows["1.0"]["skipped"] > 0)
    assert all(r["seconds_per_image"] > 0 for r in rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_step_profile_runs(tmp_path, family):
    record = _benchmark_record("profile_step.py", "--family", family, "--preset", "tiny", "--size", 64, "--workdir",
                               tmp_path)
    for side in ("ours", "diffusers"):
        parts = record[side]["parts_ms"]
        assert set(parts) == {"gemm", "attention", "gelu", "norms", "other"} and record[side]["step_ms"] > 0
        assert parts["gemm"] > 0 and parts["attention"] > 0
    assert record["ours"]["gemm_gflop"] > 0 and record["ours"]["gemm_peak_gflops"] > 0
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_shard_benchmark_runs():
    record = _benchmark_record("bench_shard.py", "--preset", "tiny4", "--size", 64, "--steps", 2)
    one, two = record["runs"]["one process"], record["runs"]["2 ranks, --shard"]
    assert len(one) == 1 and [x["rank"] for x in two] == [0, 1]
    assert all(x["transformer_gb"] < one[0]["transformer_gb"] for x in two) and record["max_abs_diff"] <= 1e-4
    assert [x["rank"] for x in record["runs"]["2 ranks, each encodes"]] == [0, 1]
    assert record["max_abs_diff_each_encodes"] <= 1e-4


def test_shard_shares_at_real_shapes():
    """FLUX.1's and SD3 Medium's real parameter counts, and each rank's share under --shard a little above 1/N (the
    embedders and the output layer stay whole)."""
    shares = _benchmark_record("bench_shard.py", "--real-shapes", timeout=300)["real_shapes"]
    assert abs(shares["FLUX.1-dev"]["params"] - 11.90e9) < 0.01e9 and 2.0e9 < shares["SD3 Medium"]["params"] < 2.2e9
    for x in shares.values():
        for n in ("2", "4", "8"):
            assert 1 / int(n) < x[n] < 1 / int(n) + 0.04, (n, x)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_shard_benchmarks_count_is_what_a_sharded_step_sums(family, monkeypatch):
    """bench_shard's values summed per step (from the layers' names) against the all_sums a sharded tiny transformer
    makes in a call (rank 0 of 2, the other rank's gathered halves played by this one's)."""
    import mlx.core as mx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_shard
    from mlx_diffusion.models.flux import FluxConfig, FluxTransformer2DModel
    from mlx_diffusion.models.sd3 import SD3Config, SD3Transformer2DModel
    from mlx_diffusion.pipelines import distributed
    from mlx_diffusion.pipelines.flux import prepare_ids

    monkeypatch.setattr(distributed, "size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    common = dict(num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                  pooled_projection_dim=16)
    if family == "flux":
        model = FluxTransformer2DModel(FluxConfig(**common, num_single_layers=2, in_channels=16,
                                                  axes_dims_rope=(2, 2, 4)))
        img_ids, txt_ids = prepare_ids(4, 6, 5)
        args = (mx.zeros((1, 24, 16)), mx.ones((1, 5, 32)), mx.ones((1, 16)), mx.ones((1,)), img_ids, txt_ids)
        tokens = (24, 5, 1)
    else:
        model = SD3Transformer2DModel(SD3Config(**common, caption_projection_dim=32, in_channels=4, out_channels=4,
                                                pos_embed_max_size=16, sample_size=8))
        args = (mx.zeros((2, 4, 8, 12)), mx.ones((2, 5, 32)), mx.ones((2, 16)), mx.ones((2,)))
        tokens = (24, 5, 2)
    distributed.shard_model(model)
    summed = []
    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None: summed.append(x.size) or x)
    monkeypatch.setattr(mx.distributed, "all_gather", lambda x, group=None: mx.concatenate([x, x]))
    mx.eval(model(*args))
    assert summed and sum(summed) == bench_shard.summed_per_step(model, tokens)
