"""`mlx-diffusion generate` (also `python -m mlx_diffusion.generate`): prompts -> images, through `load_pipeline`.

One prompt or a file of them (`--prompt-file`), one seed or several (`--seed 5,6,7`, `--seed 0-7`, `--n-images N`),
made `--batch-size` at a time; `-o` names each file with `{seed}`, `{i}` and `{prompt}`, and its suffix picks the
format (PNG, JPEG, WebP). Every image carries its settings (`io.images`), and `--from-metadata` makes one again from
them, bit for bit. User mistakes end with a one-line error and a non-zero exit before any long work starts; each
image goes to a temporary file in the target folder and is renamed when complete, as soon as its batch is done.
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
from . import MAX_SEEDS, lora_list, one_line, run, seed_list

PLACEHOLDERS = ("{seed}", "{i}", "{prompt}")


def _check_output(path: Path, quality: int | None):
    """Refuse an output we could not write before any work starts (a real write probe: root ignores modes)."""
    from ..errors import InputError
    from ..io.images import LOSSY, format_of

    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder", param_hint="--output")
    try:
        fmt = format_of(path)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--output") from None
    if quality is not None and fmt not in LOSSY:
        raise click.BadParameter(f"--quality is for .jpg and .webp files; {path} is a PNG (lossless)",
                                 param_hint="--quality")
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


def read_recorded(path: Path):
    """(metadata, settings) of --from-metadata's file."""
    from ..errors import InputError
    from ..io.images import read_metadata
    from ..pipelines import GenerationSettings

    try:
        metadata = read_metadata(path)
        return metadata, GenerationSettings.from_metadata(metadata)
    except InputError as e:
        raise click.BadParameter(one_line(e), param_hint="--from-metadata") from None


def recorded_model(model: str | None) -> Path | None:
    """The model a recorded image names, as a --model value (None: the built-in)."""
    from ..pipelines import BUILTIN_NAME

    if model in (None, BUILTIN_NAME):
        return None
    if not Path(model).is_dir():
        raise click.BadParameter(f"the image was made with {model}, which is not here: give --model FOLDER",
                                 param_hint="--from-metadata")
    return Path(model)


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
@click.option("--image", "start_image", type=click.Path(path_type=Path), default=None,
              help="Image-to-image: start from this image (its size, rounded down to a multiple of 16, unless "
                   "--width/--height resize it).")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much to change the start image, above 0 and at most 1 [0.6]; 1 ignores it.")
@click.option("--width", type=int, default=None, help="Image width in pixels [1024; built-in 64].")
@click.option("--height", type=int, default=None, help="Image height in pixels [1024; built-in 64].")
@click.option("--seed", "seeds", default=None, callback=seed_list,
              help="Seed, seeds 5,6,7 or a range 0-7, for every prompt [random]; the same seed gives the same image.")
@click.option("--n-images", type=click.IntRange(min=1, max=MAX_SEEDS), default=None,
              help="Images per prompt, with random seeds [1; as many as --seed lists].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images made together as one batch (faster per image where the model is small, more memory) [1].")
@click.option("--output", "-o", default=None,
              help="Image file: .png, .jpg or .webp; {seed}, {i} (from 0) and {prompt} (slugged) are filled in "
                   "[image-{seed}.png].")
@click.option("--quality", type=click.IntRange(1, 100), default=None, help="JPEG and WebP quality, 1-100 [95].")
@click.option("--metadata", "sidecar", is_flag=True,
              help="Also write each image's settings and timings as JSON beside it (out.png -> out.json).")
@click.option("--from-metadata", "recorded_file", type=click.Path(path_type=Path), default=None,
              help="Make an image again from the settings in a PNG/JPEG/WebP this wrote (or its JSON); options "
                   "given here replace the recorded ones.")
@click.option("--lora", "loras", multiple=True, callback=lora_list, metavar="FILE[:SCALE]",
              help="A LoRA (.safetensors: diffusers/PEFT, kohya, BFL or XLabs layout) at SCALE [1.0]; repeatable, "
                   "they add up.")
@click.option("--cache", type=float, default=None, metavar="THRESHOLD",
              help="First-block cache, 0 to 1 (e.g. 0.1): on steps where the transformer's first block changed its "
                   "output by at most this fraction, reuse the other blocks' last result. Faster; the image changes "
                   "(see the README) [off].")
@click.option("--shard", is_flag=True,
              help="Under mlx.launch: split the transformer across the processes, each holding part of it; "
                   "every process makes every image, the first writes them [off: the images are shared out].")
@click.option("--no-t5", is_flag=True, help="SD3 only: never load T5; its embedding is zeros (saves ~9.5 GB).")
@click.option("--quiet", is_flag=True, help="No progress bar or timings.")
def main(model_path, prompt, prompt_file, negative_prompt, steps, guidance, true_cfg_scale, start_image, strength,
         width, height, seeds, n_images, batch_size, output, quality, sidecar, recorded_file, loras, cache, shard,
         no_t5, quiet):
    """Generate images from text prompts."""
    from ..errors import Error
    from ..io.images import write_image, write_json
    from ..pipelines import GenerationSettings, load_pipeline

    prompts = ([prompt] if prompt is not None else []) + (read_prompts(prompt_file) if prompt_file else [])
    overrides = {k: v for k, v in dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                       true_cfg_scale=true_cfg_scale, strength=strength, width=width, height=height,
                                       cache=cache, use_t5=False if no_t5 else None).items() if v is not None}
    base, metadata = GenerationSettings(), None
    if recorded_file is not None:
        metadata, base = read_recorded(recorded_file)
        if model_path is None:
            model_path = recorded_model(base.model)
        if base.seed is None:
            raise click.BadParameter("the image was made from given latents, not a seed: its settings cannot make "
                                     "it again", param_hint="--from-metadata")
        prompts = prompts or [base.prompt]
        if not loras and base.lora:  # the recorded LoRAs, as the recorded model
            loras = lora_list(None, None, [f"{file}:{scale}" for file, scale in base.lora])
        if seeds is None and n_images is None:
            seeds = [base.seed]
    if not prompts:
        raise click.UsageError("give --prompt TEXT or --prompt-file FILE")
    if seeds is not None and n_images is not None and n_images != len(seeds):
        raise click.BadParameter(f"{len(seeds)} seeds given but --n-images {n_images}", param_hint="--n-images")
    from ..pipelines import distributed

    if seeds is None:  # under mlx.launch, rank 0's random seeds
        seeds = distributed.agree([int.from_bytes(os.urandom(4), "little") for _ in range(n_images or 1)])
    jobs = [(p, s) for p in prompts for s in seeds]
    paths = output_paths(output or "image-{seed}.png", jobs)
    if shard and distributed.size() == 1:
        raise click.BadParameter("splits the transformer across processes: start them with mlx.launch",
                                 param_hint="--shard")
    # under mlx.launch each rank makes its share; with --shard every rank makes every image, and rank 0 writes them
    mine = list(range(len(jobs))) if shard else distributed.share(len(jobs))
    writes = not shard or distributed.rank() == 0
    if writes:
        for path in dict.fromkeys(paths[j] for j in mine):
            _check_output(path, quality)
    # an unchanged replay is made as the original was (in its batch, if it had one), for the same pixels
    replay = metadata is not None and jobs == [(base.prompt, base.seed)] and not overrides and batch_size is None
    if start_image is not None:  # read now: a missing or broken file is an error before any work
        from ..errors import InputError
        from ..io.images import read_image

        try:
            start_image = read_image(start_image)
        except InputError as e:
            raise click.BadParameter(one_line(e), param_hint="--image") from None
    items = [base.replace(prompt=p, seed=None, model=None, unused=(), **overrides,
                          **({"init_image": None} if start_image is not None else {})) for p in prompts]
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    warnings.showwarning = lambda message, *a, **k: click.echo(f"warning: {message}", err=True)
    t0 = time.perf_counter()
    try:
        distributed.check_same_model(model_path, str(model_path or "the built-in model"))
        if not mine:
            say(f"rank {distributed.rank()} of {distributed.size()}: no images to make")
            return
        pipe = load_pipeline(model_path, progress=not quiet and writes, use_t5=base.use_t5 is not False and not no_t5,
                             lora=loras, shard=shard)
        if replay:
            from ..pipelines.settings import batch_position

            size, _ = batch_position(metadata)
            if size > 1:
                say(f"it was made in a batch of {size}: making it again as one, for the same pixels "
                    f"(--batch-size 1: alone, 1/{size} of the work, the same pixels on the CPU)")
            results = iter([pipe.replay(metadata, image=start_image)])
        elif distributed.size() > 1 and not shard:  # this rank's share of prompts x seeds, each image with its own seed
            ns = len(seeds)
            share = [items[j // ns].replace(seed=seeds[j % ns]) for j in mine]
            results = pipe.iter_generate(share, batch_size=batch_size or 1, image=start_image)
            paths = [paths[j] for j in mine]
        else:
            results = pipe.iter_generate(items, seeds=seeds, batch_size=batch_size or 1, image=start_image)
        stats = None
        for path, result in zip(paths, results):
            if not writes:
                continue
            write_image(result.image, path, result.metadata(), quality=quality)
            if sidecar:
                write_json(path.with_suffix(".json"), result.record())
            if result.stats is not stats:
                stats = result.stats
                times = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in stats.seconds.items())
                cached = f"; first-block cache skipped {stats.cached_calls} transformer calls" if result.settings.cache \
                    else ""
                say(f"{times}" + (f" ({stats.images} images)" if stats.images > 1 else "") + cached)
            click.echo(str(path))
    except Error as e:
        raise click.ClickException(one_line(e)) from None
    if not writes:
        return
    say(f"total {time.perf_counter() - t0:.2f} s; peak memory: MLX {stats.peak_memory_gb:.2f} GB, process "
        f"{stats.peak_rss_gb:.2f} GB" + ("" if blas.loaded_path or sys.platform != "linux" else " (no fast BLAS)"))


if __name__ == "__main__":
    run(main)
