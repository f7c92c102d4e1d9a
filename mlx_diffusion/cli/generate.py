"""`mlx-diffusion generate` (also `python -m mlx_diffusion.generate`): prompts -> images, through `load_pipeline`.

One prompt or a file of them (`--prompt-file`), one seed or several (`--seed 5,6,7`, `--seed 0-7`, `--n-images N`),
made `--batch-size` at a time; `-o` names each file with `{seed}`, `{i}` and `{prompt}`. Each PNG's text chunks hold
every setting, so an image says how to make it again. User mistakes end with a one-line error and a non-zero exit
before any long work starts; each image goes to a temporary file in the target folder and is renamed when complete,
as soon as its batch is done.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click

from ..backends import blas
from . import one_line, run, seed_list

PLACEHOLDERS = ("{seed}", "{i}", "{prompt}")


def _check_output(path: Path):
    """Refuse an output we could not write before any work starts (a real write probe: root ignores modes)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder", param_hint="--output")
    if path.suffix.lower() != ".png":
        raise click.BadParameter(f"{path} must end in .png", param_hint="--output")
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist", param_hint="--output")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise click.BadParameter(f"cannot write in {folder} ({e.strerror})", param_hint="--output") from None


def slug(text: str, limit: int = 60) -> str:
    """A prompt as a file-name part: lower case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def output_paths(template: str, jobs: list[tuple[str, int]]) -> list[Path]:
    """The file of each (prompt, seed); BadParameter if two images would land in the same file."""
    paths = [Path(template.replace("{seed}", str(seed)).replace("{i}", str(i)).replace("{prompt}", slug(prompt)))
             for i, (prompt, seed) in enumerate(jobs)]
    if len(set(paths)) < len(paths):
        if not any(p in template for p in PLACEHOLDERS):
            raise click.BadParameter(f"{len(paths)} images need {{seed}}, {{i}} or {{prompt}} in the file name, "
                                     f"e.g. out-{{seed}}.png", param_hint="--output")
        dup = next(p for p in paths if paths.count(p) > 1)
        raise click.BadParameter(f"two images would both be written to {dup}; add {{i}}", param_hint="--output")
    return paths


def read_prompts(path: Path) -> list[str]:
    from ..errors import InputError
    from ..tour.prompts import read_file

    try:
        prompts = read_file(path)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--prompt-file") from None
    if not prompts:
        raise click.BadParameter(f"{path} holds no prompt", param_hint="--prompt-file")
    return prompts


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default=None, type=click.Path(path_type=Path),
              help="A converted model folder: what `convert -o` wrote (convert's --model names a model to download "
                   "instead) [the built-in model: 64x64 shapes].")
@click.option("--prompt", default=None, help="What to draw.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
              help="A text file of prompts, one a line (blank lines and lines starting with # are skipped).")
@click.option("--negative-prompt", default=None, help="What to avoid (SD3; FLUX only with --true-cfg > 1).")
@click.option("--steps", type=int, default=None, help="Denoising steps [schnell 4, dev 28, SD3 28, built-in 20].")
@click.option("--guidance", type=float, default=None, help="Guidance scale [dev 3.5, SD3 and built-in 7.0; unused by schnell].")
@click.option("--true-cfg", "true_cfg_scale", type=float, default=None,
              help="FLUX only: true classifier-free guidance scale with --negative-prompt (as diffusers' true_cfg_scale).")
@click.option("--width", type=int, default=None, help="Image width in pixels [1024; built-in 64].")
@click.option("--height", type=int, default=None, help="Image height in pixels [1024; built-in 64].")
@click.option("--seed", "seeds", default=None, callback=seed_list,
              help="Seed, seeds 5,6,7 or a range 0-7, for every prompt [random]; the same seed gives the same image.")
@click.option("--n-images", type=click.IntRange(min=1), default=None,
              help="Images per prompt, with random seeds [1; as many as --seed lists].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images made together as one batch (faster per image where the model is small, more memory).")
@click.option("--output", "-o", default=None,
              help="PNG file to write; {seed}, {i} (from 0) and {prompt} (slugged) are filled in [image-{seed}.png].")
@click.option("--no-t5", is_flag=True, help="SD3 only: never load T5; its embedding is zeros (saves ~9.5 GB).")
@click.option("--quiet", is_flag=True, help="No progress bar or timings.")
def main(model_path, prompt, prompt_file, negative_prompt, steps, guidance, true_cfg_scale, width, height, seeds,
         n_images, batch_size, output, no_t5, quiet):
    """Generate images from text prompts."""
    from ..errors import Error
    from ..io.images import write_png
    from ..pipelines import GenerationSettings, load_pipeline

    prompts = ([prompt] if prompt is not None else []) + (read_prompts(prompt_file) if prompt_file else [])
    if not prompts:
        raise click.UsageError("give --prompt TEXT or --prompt-file FILE")
    if seeds is not None and n_images is not None and n_images != len(seeds):
        raise click.BadParameter(f"{len(seeds)} seeds given but --n-images {n_images}", param_hint="--n-images")
    if seeds is None:
        seeds = [int.from_bytes(os.urandom(4), "little") for _ in range(n_images or 1)]
    jobs = [(p, s) for p in prompts for s in seeds]
    paths = output_paths(output or "image-{seed}.png", jobs)
    for path in dict.fromkeys(paths):
        _check_output(path)
    items = [GenerationSettings(prompt=p, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                true_cfg_scale=true_cfg_scale, width=width, height=height,
                                use_t5=False if no_t5 else None) for p in prompts]
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    warnings.showwarning = lambda message, *a, **k: click.echo(f"warning: {message}", err=True)
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(model_path, progress=not quiet, use_t5=not no_t5)
        results = pipe.iter_generate(items, seeds=seeds, batch_size=batch_size)
        stats = None
        for path, result in zip(paths, results):
            write_png(result.image, path, result.settings.to_metadata())
            if result.stats is not stats:
                stats = result.stats
                times = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in stats.seconds.items())
                say(f"{times}" + (f" ({stats.images} images)" if stats.images > 1 else ""))
            click.echo(str(path))
    except Error as e:
        raise click.ClickException(one_line(e)) from None
    say(f"total {time.perf_counter() - t0:.2f} s; peak memory: MLX {stats.peak_memory_gb:.2f} GB, process "
        f"{stats.peak_rss_gb:.2f} GB" + ("" if blas.loaded_path or sys.platform != "linux" else " (no fast BLAS)"))


if __name__ == "__main__":
    run(main)
