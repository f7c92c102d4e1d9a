"""Interrupted or starved commands leave nothing half-written: real SIGINT / SIGTERM sent to a converting or
generating subprocess, and a full disk simulated with RLIMIT_FSIZE (writes past the limit fail with EFBIG; Python
ignores the SIGXFSZ that comes with them). Each ends with one line and exit status 128 + signal, or 1.

To interrupt at a known point, the subprocess runs the real command with one function wrapped to announce itself and
wait (after a few tensors are written, after the first denoising step, in the middle of writing the image)."""

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PAUSES = {
    # wrap SafetensorsWriter.add: pause after the third tensor of the conversion
    "convert": """
        from mlx_diffusion.io import safetensors as target
        original = target.SafetensorsWriter.add
        count = [0]
        def add(self, name, array):
            original(self, name, array)
            count[0] += 1
            if count[0] == 3:
                pause()
        target.SafetensorsWriter.add = add
        from mlx_diffusion.cli.convert import main
    """,
    # wrap the sampler's step: pause after the first denoising step
    "denoising": """
        from mlx_diffusion.pipelines import sampler as target
        original = target.FlowMatchEulerScheduler.step
        def step(self, *a, **k):
            out = original(self, *a, **k)
            pause()
            return out
        target.FlowMatchEulerScheduler.step = step
        from mlx_diffusion.cli.generate import main
    """,
    # wrap write_atomic: pause with the image's bytes in its temporary file
    "writing": """
        from mlx_diffusion.io import images as target
        original = target.write_atomic
        def write_atomic(path, write):
            def slow(f):
                write(f)
                f.flush()
                pause()
            return original(path, slow)
        target.write_atomic = write_atomic
        from mlx_diffusion.cli.generate import main
    """,
}


def _script(tmp_path, where: str) -> Path:
    script = tmp_path / f"pause_{where}.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import mlx_diffusion
        def pause():
            print("\\nPAUSED", file=sys.stderr, flush=True)
            time.sleep(120)
    """) + textwrap.dedent(PAUSES[where]) + textwrap.dedent("""
        from mlx_diffusion.cli import run
        run(main, sys.argv[1:])
    """))
    return script


def _interrupt(tmp_path, where, sig, args):
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # inherits it ignored, and Python then leaves it so (as it should for a user's `command &`)
    p = subprocess.Popen([sys.executable, str(_script(tmp_path, where)), *map(str, args)], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "PAUSED" in line:
            p.send_signal(sig)
            break
    else:
        p.wait(timeout=60)
        pytest.fail("the command ended before the pause: " + "".join(seen))
    rest = p.stderr.read()
    p.wait(timeout=60)
    return p.returncode, rest


def _leftovers(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_conversion_leaves_nothing(flux_schnell, tmp_path, sig):
    out = tmp_path / "out" / "model"
    code, stderr = _interrupt(tmp_path, "convert", sig, [flux_schnell[1], "-o", out, "--quiet"])
    assert code == 128 + sig, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)


@pytest.mark.parametrize("where, sig", [("denoising", signal.SIGINT), ("denoising", signal.SIGTERM),
                                        ("writing", signal.SIGTERM)])
def test_an_interrupted_generation_leaves_nothing(tmp_path, where, sig):
    out = tmp_path / "fox.png"
    code, stderr = _interrupt(tmp_path, where, sig, ["--prompt", "a red circle", "--steps", "3", "-o", out])
    assert code == 128 + sig, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)


def _limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run_limited(args, limit, cwd):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300,
                          preexec_fn=_limited(limit), env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(flux_schnell, tmp_path):
    out = tmp_path / "model"
    r = _run_limited([ROOT / "tools" / "convert.py", flux_schnell[1], "-o", out, "--quiet"], 20_000, tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], r.stderr
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)


def test_a_full_disk_while_writing_an_image_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "fox.png"
    r = _run_limited(["-m", "mlx_diffusion.generate", "--prompt", "a red circle", "--steps", "2", "-o", out,
                      "--quiet"], 2_000, tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], r.stderr
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)
