#!/usr/bin/env python3
"""Tensor parallel memory and time: the FLUX `block` preset (real widths, random weights) made in one process, then
split across 2 local ranks with `generate --shard`'s machinery (`load_pipeline(shard=True)` under mlx.launch).

    python benchmarks/bench_shard.py [--bits none|4] [--size 256] [--steps 2] [--preset block]
    python benchmarks/bench_shard.py --real-shapes    # the share each rank holds of the real FLUX.1 / SD3 Medium

Per process: the transformer's weights held, peak RSS, text encoding and denoising step seconds, and the image's
difference to the one-process image. Two sharded runs: as `--shard` works (rank 0 encodes the prompts and sends the
embeddings) and with every rank encoding them itself, the alternative. On one 2-core machine the two ranks share the
cores, so the time says nothing of two Macs. Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER = """
import json, sys
import numpy as np
import mlx_diffusion
from mlx.utils import tree_flatten
from mlx_diffusion import load_pipeline
from mlx_diffusion.pipelines import distributed
from mlx_diffusion.pipelines.base import peak_rss_gb
folder, size, steps, shard, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] != "0", sys.argv[5]
if sys.argv[4] == "each":  # the alternative to rank 0 encoding the prompts for everyone: each rank encodes them
    distributed.from_rank_zero = lambda make, *args: make()
pipe = load_pipeline(folder, progress=False, shard=shard, keep_text_encoders=False)
image = pipe.generate("a red fox in the snow", seed=1, width=size, height=size, steps=steps, output_type="np")
held = sum(v.nbytes for _, v in tree_flatten(pipe.model("transformer").parameters()))
record = {"rank": distributed.rank(), "transformer_gb": held / 2**30, "peak_rss_gb": peak_rss_gb(),
          "step_seconds": min(pipe.last_stats.step_seconds), "text_seconds": pipe.last_stats.seconds["text_encoding"]}
if distributed.rank() == 0:
    np.save(out, image)
print("RECORD " + json.dumps(record), flush=True)
"""


# The real transformers' configs (diffusers' config.json values that differ from our dataclasses' defaults), and a
# 1024x1024 image's tokens: (image, text, images per transformer call: 2 with SD3's guidance)
REAL = {"FLUX.1-dev": ("flux", {"guidance_embeds": True}, (4096, 512, 1)),
        "FLUX.1-schnell": ("flux", {}, (4096, 256, 1)),
        "SD3 Medium": ("sd3", {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                               "pos_embed_max_size": 192, "sample_size": 128}, (4096, 77 + 256, 2))}


def summed_per_step(model, tokens) -> int:
    """Values all_summed per denoising step by the sharded model's ShardedToAll layers: each sums a (batch, tokens,
    out) product; which tokens, the layer's name says (the text stream's, the image stream's, or both in FLUX's
    single blocks)."""
    from mlx_diffusion.pipelines import distributed

    image, text, batch = tokens
    total = 0
    for name, layer in model.named_modules():
        if isinstance(layer, (distributed.ShardedToAllLinear, distributed.ShardedToAllQuantizedLinear)):
            text_only = "add_out" in name or "context" in name
            n = image + text if name.startswith("single_") else text if text_only else image
            total += batch * n * distributed._dims(layer)[0]
    return total


def real_shares(ranks=(2, 4, 8)) -> dict:
    """The transformer's parameters each rank holds under `--shard`, at the real models' shapes (the models are built
    with unevaluated, never allocated, weights and split by `shard_model` as rank 0 of N would), and the values each
    step sums across the ranks at 1024x1024."""
    from mlx.utils import tree_flatten

    from mlx_diffusion.models.flux import FluxConfig, FluxTransformer2DModel
    from mlx_diffusion.models.sd3 import SD3Config, SD3Transformer2DModel
    from mlx_diffusion.pipelines import distributed

    def params(model):
        return sum(v.size for _, v in tree_flatten(model.parameters()))

    build = {"flux": lambda d: FluxTransformer2DModel(FluxConfig.from_dict(d)),
             "sd3": lambda d: SD3Transformer2DModel(SD3Config.from_dict(d))}
    out = {}
    size, rank = distributed.size, distributed.rank
    try:
        for name, (family, config, tokens) in REAL.items():
            whole = params(build[family](config))
            out[name] = {"params": whole}
            for n in ranks:
                distributed.size, distributed.rank = (lambda n=n: n), (lambda: 0)
                model = build[family](config)
                distributed.shard_model(model)
                out[name][n] = params(model) / whole
            out[name]["summed_per_step"] = summed_per_step(model, tokens)
    finally:
        distributed.size, distributed.rank = size, rank
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="block")
    p.add_argument("--bits", choices=["none", "4", "8"], default="none")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--real-shapes", action="store_true",
                   help="only the share of the transformer each rank holds at FLUX.1's and SD3 Medium's real shapes")
    a = p.parse_args()
    if a.real_shapes:
        shares = real_shares()
        print("| transformer | parameters | held per rank, 2 ranks | 4 ranks | 8 ranks | summed per step, 1024x1024 |")
        print("|---|---|---|---|---|---|")
        for name, x in shares.items():
            print(f"| {name} | {x['params'] / 1e9:.2f} B | {x[2]:.1%} | {x[4]:.1%} | {x[8]:.1%} | "
                  f"{x['summed_per_step'] / 1e9:.2f} G values ({x['summed_per_step'] * 2 / 2**30:.2f} GiB in bf16) |")
        print("\n(a ring all_sum of N ranks sends and receives 2(N-1)/N of the summed bytes per rank)")
        print(json.dumps({"real_shapes": shares}))
        return
    import numpy as np

    from mlx_diffusion.convert import convert

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launcher = Path(sys.executable).parent / "mlx.launch"
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference.py"), "build", "flux", a.preset,
                        str(tmp / "diffusers")], check=True, env=env, capture_output=True)
        folder = convert(tmp / "diffusers", tmp / "mlx", bits=None if a.bits == "none" else int(a.bits),
                         dtype="float32", progress=False, log=lambda *x: None)
        (tmp / "worker.py").write_text(WORKER)
        common = [str(folder), str(a.size), str(a.steps)]
        runs = {}
        ranks = [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--", sys.executable,
                 str(tmp / "worker.py"), *common]
        for name, cmd in (("one process", [sys.executable, str(tmp / "worker.py"), *common, "0", str(tmp / "one.npy")]),
                          ("2 ranks, --shard", [*ranks, "1", str(tmp / "two.npy")]),
                          ("2 ranks, each encodes", [*ranks, "each", str(tmp / "each.npy")])):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
            records = [json.loads(line.split("RECORD ", 1)[1]) for line in r.stdout.splitlines() if "RECORD " in line]
            if not records:
                sys.exit(f"{name} failed: {r.stderr.strip().splitlines()[-3:]}")
            runs[name] = sorted(records, key=lambda x: x["rank"])
        one = np.load(tmp / "one.npy")
        diff = float(np.abs(np.load(tmp / "two.npy") - one).max())
        diff_each = float(np.abs(np.load(tmp / "each.npy") - one).max())
    print(f"FLUX {a.preset} preset, bits {a.bits}, {a.size}x{a.size}, {a.steps} steps; 2 ranks on this machine")
    print("")
    print("| | rank | transformer weights held (GB) | peak RSS (GB) | text encoding (s) | s per step |")
    print("|---|---|---|---|---|---|")
    for name, records in runs.items():
        for x in records:
            print(f"| {name} | {x['rank']} | {x['transformer_gb']:.2f} | {x['peak_rss_gb']:.2f} | "
                  f"{x['text_seconds']:.2f} | {x['step_seconds']:.2f} |")
    print(f"\nimage max abs difference, sharded vs one process: {diff:.2e} (each rank encoding: {diff_each:.2e})")
    print(json.dumps({"preset": a.preset, "bits": a.bits, "size": a.size, "runs": runs, "max_abs_diff": diff,
                      "max_abs_diff_each_encodes": diff_each}))


if __name__ == "__main__":
    main()
