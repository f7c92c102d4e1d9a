"""`mlx-diffusion generate` (also `python -m mlx_diffusion.generate`): a prompt -> one PNG, through `load_pipeline`.

The PNG's text chunks hold the prompt, seed, steps, guidance, size and model, so an image says how to make it again.
User mistakes end with a one-line error and a non-zero exit, before any long work starts, and nothing is written:
the image goes to a temporary file in the target folder and is renamed when complete.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click

from ..backends import blas
from . import one_line, run


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default=None, type=click.Path(path_type=Path),
              help="A converted model folder: what `convert -o` wrote (convert's --model names a model to download "
                   "instead) [the built-in model: 64x64 shapes].")
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", default=None, help="What to avoid (SD3; FLUX only with --true-cfg > 1).")
@click.option("--steps", type=int, default=None, help="Denoising steps [schnell 4, dev 28, SD3 28, built-in 20].")
@click.option("--guidance", type=float, default=None, help="Guidance scale [dev 3.5, SD3 and built-in 7.0; unused by schnell].")
@click.option("--true-cfg", "true_cfg_scale", type=float, default=None,
              help="FLUX only: true classifier-free guidance scale with --negative-prompt (as diffusers' true_cfg_scale).")
@click.option("--width", type=int, default=None, help="Image width in pixels [1024; built-in 64].")
@click.option("--height", type=int, default=None, help="Image height in pixels [1024; built-in 64].")
@click.option("--seed", type=int, default=None, help="Random seed [random]; the same seed gives the same image.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="PNG file to write [image-SEED.png].")
@click.option("--no-t5", is_flag=True, help="SD3 only: never load T5; its embedding is zeros (saves ~9.5 GB).")
@click.option("--quiet", is_flag=True, help="No progress bar or timings.")
def main(model_path, prompt, negative_prompt, steps, guidance, true_cfg_scale, width, height, seed, output, no_t5,
         quiet):
    """Generate an image from a text prompt."""
    from ..errors import Error
    from ..io.images import write_png
    from ..pipelines import GenerationSettings, load_pipeline

    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if seed < 0 or seed >= 2**64:
        raise click.BadParameter("must be between 0 and 2**64 - 1", param_hint="--seed")
    output = output or Path(f"image-{seed}.png")
    _check_output(output)
    settings = GenerationSettings(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                  true_cfg_scale=true_cfg_scale, width=width, height=height, seed=seed,
                                  use_t5=False if no_t5 else None)
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    warnings.showwarning = lambda message, *a, **k: click.echo(f"warning: {message}", err=True)
    try:
        t0 = time.perf_counter()
        pipe = load_pipeline(model_path, progress=not quiet, use_t5=not no_t5)
        image = pipe.generate(settings)
    except Error as e:
        raise click.ClickException(one_line(e)) from None
    write_png(image, output, pipe.last_settings.to_metadata())
    st = pipe.last_stats
    times = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in st.seconds.items())
    say(f"{times}; total {time.perf_counter() - t0:.2f} s")
    say(f"peak memory: MLX {st.peak_memory_gb:.2f} GB, process {st.peak_rss_gb:.2f} GB"
        + ("" if blas.loaded_path or sys.platform != "linux" else " (no fast BLAS)"))
    click.echo(str(output))


if __name__ == "__main__":
    run(main)
