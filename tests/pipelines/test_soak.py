"""A long run: 200 generations in one process with the built-in model (PNG written each time, a batch every tenth,
prompts and seeds varying), in a subprocess of its own so that its memory is the pipeline's alone. Once warm (after
20 images) the process's resident memory stays within a few percent, and every image is written whole."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SOAK = textwrap.dedent("""
    import json, os, sys
    import mlx_diffusion
    from mlx_diffusion import load_pipeline
    from mlx_diffusion.io.images import read_metadata, write_image

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    out = sys.argv[1]
    pipe = load_pipeline(progress=False)
    prompts = ["a red circle", "two green squares at the top", "a blue triangle on the left", "a yellow star"]
    samples = {}
    for i in range(200):
        if i % 10 == 9:
            results = pipe.generate_many(prompts[:2], seeds=[i], batch_size=2, steps=2)
        else:
            results = [pipe.generate_many(prompts[i % 4], seeds=[i], steps=2 + i % 2)[0]]
        for r in results:
            write_image(r.image, os.path.join(out, "soak.png"), r.metadata())
        assert read_metadata(os.path.join(out, "soak.png"))["mlx_diffusion.settings"]
        if i + 1 in (20, 50, 100, 150, 200):
            samples[i + 1] = rss()
    print(json.dumps(samples))
""")


@pytest.mark.slow  # ~80 s
def test_200_generations_hold_their_memory(tmp_path):
    r = subprocess.run([sys.executable, "-c", SOAK, str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    rss = {int(k): v for k, v in json.loads(r.stdout.splitlines()[-1]).items()}
    growth = max(rss.values()) / rss[20] - 1
    print("RSS after 20/50/100/150/200 generations (MB):", [round(rss[k] / 2**20) for k in sorted(rss)],
          f"growth {growth:+.1%}")
    assert growth < 0.03, rss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soak.png"]
