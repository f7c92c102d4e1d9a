"""`mlx-diffusion benchmark` (also `python -m mlx_diffusion.benchmark`): profile a model folder, optionally side by
side with the diffusers baseline on the same weights and noise, through `tour.benchmark`.

    mlx-diffusion benchmark [--model FOLDER | --preset tiny|block|wide --family flux|sd3 [--bits none|4|8]]
                            [--prompts FILE | --prompt TEXT ... | --bank NAME [--category C]] [--n-prompts 1]
                            [--steps N] [--guidance G] [--size S] [--repeat 2] [--seed 0] [--compare-diffusers]
                            [--empty-kernel-cache]

Each side runs in a process of its own (its peak memory is its own), after one cold run, `--repeat` times; times
are medians. The cold run is the first in its process; with `--empty-kernel-cache` also the first on an empty cache
of MLX's compiled kernels, as on a fresh install (it includes building them). It prints a markdown table and, as its last line, one JSON object: {"ratios": {"text_encoding",
"denoising", "decoding", "total"}, "rss_gb": {...}, ...} with ratios = diffusers time / ours (above 1: we are
faster; null without --compare-diffusers). `--preset` builds a random-weight model at FLUX or SD3 widths (real widths
with few blocks: `block`) and converts it; presets and the diffusers side need a checkout's
`benchmarks/reference.py` and the test dependencies (`./setup.sh --test`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import click

from ..errors import Error, InputError
from . import one_line, prompt_options, reference as baseline, run

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="A converted model folder [the built-in model].")
@click.option("--preset", type=click.Choice(["tiny", "block", "wide"]), default=None,
              help="Instead of --model: a random-weight model at these sizes (block: real widths, few blocks).")
@click.option("--family", type=click.Choice(["flux", "sd3"]), default="flux", show_default=True,
              help="The preset's family.")
@click.option("--bits", type=click.Choice(["none", "4", "8"]), default="none", show_default=True,
              help="The preset converted at these bits (ours; diffusers runs the same weights in float32).")
@prompt_options
@click.option("--n-prompts", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many of the prompts to run.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps [the model's default].")
@click.option("--guidance", type=float, default=None, help="Guidance [the model's default].")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Width and height [the model's default].")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="Warm runs per prompt.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--compare-diffusers", is_flag=True, help="Also run diffusers on the same weights and noise.")
@click.option("--empty-kernel-cache", is_flag=True,
              help="Our first run with MLX's compiled-kernel cache empty, as on a fresh install.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def main(model_path, preset, family, bits, prompt_file, prompt_texts, bank, category, n_prompts, steps, guidance,
         size, repeat, seed, compare_diffusers, empty_kernel_cache, quiet):
    """Profile a model (per-stage times, memory), optionally against diffusers."""
    import numpy as np

    from .. import __version__
    from ..backends import blas
    from ..convert import convert
    from ..io.folder import read_json
    from ..pipelines import BUILTIN_MODEL, check_model_folder
    from ..tour import benchmark, prompts as bank_module

    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    if preset and model_path:
        raise click.UsageError("give --model or --preset, not both")
    try:
        with tempfile.TemporaryDirectory(prefix="mlx-diffusion-benchmark-") as tmp:
            tmp = Path(tmp)
            if preset:
                presets = baseline.module().PRESETS
                baseline.call([sys.executable, str(baseline.REFERENCE), "build", family, preset, str(tmp / "diffusers")],
                              f"building a random {family} {preset} model", say)
                folder = convert(tmp / "diffusers", tmp / "mlx", bits=None if bits == "none" else int(bits),
                                 dtype="float32", progress=False, log=lambda *a: None)
                size = size or presets[family][preset]["size"]
            else:
                folder = Path(model_path) if model_path else BUILTIN_MODEL
            info, _ = check_model_folder(folder)
            d = info["defaults"]
            texts = bank_module.select(prompt_texts, prompt_file, bank, category, info, limit=n_prompts)
            vae = read_json(folder / "vae" / "config.json")
            factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            size = size or d["width"]
            if size % (2 * factor):
                raise InputError(f"--size must be a multiple of {2 * factor}, got {size}")
            rng = np.random.default_rng(seed)
            latents = []
            for i in range(len(texts)):
                latents.append(str(tmp / f"latents-{i}.npy"))
                shape = (1, int(vae.get("latent_channels", 16)), size // factor, size // factor)
                np.save(latents[-1], rng.standard_normal(shape).astype(np.float32))
            request = {"folder": str(folder), "family": info["family"], "prompts": texts, "latents": latents,
                       "steps": steps or d["steps"], "guidance": d["guidance"] if guidance is None else guidance,
                       "size": size, "max_sequence_length": d["max_sequence_length"], "repeat": repeat}
            (tmp / "ours.json").write_text(json.dumps({**request, "out": str(tmp / "ours-result.json")}))
            env = None
            if empty_kernel_cache:  # MLX keeps its compiled kernels under the temp folder (see backends.jit)
                (tmp / "temp").mkdir()
                env = {**os.environ, "TMPDIR": str(tmp / "temp")}
            baseline.call([sys.executable, "-m", "mlx_diffusion.tour.benchmark", str(tmp / "ours.json")], "mlx_diffusion",
                          say, env=env)
            ours_result = json.loads((tmp / "ours-result.json").read_text())
            ref_result = diff = None
            if compare_diffusers:
                ref_request = {**request, "out": str(tmp / "ref-result.json")}
                if preset:  # diffusers runs the float32 folder the preset was built as
                    ref_request["pretrained"] = str(tmp / "diffusers")
                else:
                    baseline.export_weights(folder, info["components"], tmp / "weights")
                    ref_request["weights"] = str(tmp / "weights")
                ref_result = baseline.run(ref_request, tmp, say)
                diff = max(float(np.abs(np.load(tmp / f"mlx_diffusion-{i}.npy") - np.load(tmp / f"diffusers-{i}.npy"))
                                 .max()) for i in range(len(texts)))
    except Error as e:
        raise click.ClickException(one_line(e)) from None

    ours = benchmark.summary(ours_result)
    ref = benchmark.summary(ref_result) if ref_result else None
    name = f"random {family} {preset} preset ({bits} bits)" if preset else str(folder)
    click.echo(f"{name}: {info['family']} {info.get('variant')}, {size}x{size}, {request['steps']} steps, guidance "
               f"{request['guidance']}, {len(texts)} prompt(s) x {repeat} warm runs; {platform.machine()} "
               f"{os.cpu_count()} cores, BLAS {blas.loaded_path or blas.status}, mlx_diffusion {__version__}")
    if diff is not None:
        click.echo(f"image difference mlx_diffusion vs diffusers: max abs {diff:.2e}")
    click.echo("")
    click.echo(benchmark.table(ours, ref, ours_result, ref_result, empty_kernel_cache))
    click.echo("")
    record = {"model": name, "family": info["family"], "size": size, "steps": request["steps"],
              "ratios": {k: ref[k] / ours[k] for k in (*benchmark.STAGES, "total")} if ref else None,
              "rss_gb": {"mlx_diffusion": ours_result["peak_rss_gb"],
                         **({"diffusers": ref_result["peak_rss_gb"]} if ref_result else {})},
              "seconds": {"mlx_diffusion": ours, **({"diffusers": ref} if ref else {})},
              "peak_mlx_memory_gb": ours_result["peak_memory_gb"], "max_abs_diff": diff,
              "empty_kernel_cache": empty_kernel_cache}
    click.echo(json.dumps(record))


if __name__ == "__main__":
    run(main)
