"""`mlx-diffusion compare` (also `python -m mlx_diffusion.compare`): models x prompts x seeds in one labelled grid,
through `tour.compare`.

    mlx-diffusion compare [--models FOLDER ...] [--prompts FILE | --prompt TEXT ... | --bank NAME [--category C]]
                          [--seeds 0,1] [--steps N] [--guidance G] [--size S] [-o grid.png]

Writes grid.png, grid.json ({"tiles": [{model, prompt, seed, steps, guidance, seconds, peak_memory_gb, file}]}) and
every tile in grid-tiles/ as a PNG with its settings. Models are loaded one after the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import Error
from . import one_line, prompt_options, run, seed_list


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--models", "models", multiple=True, type=click.Path(path_type=Path),
              help="Converted model folders, one per option or several after it [the built-in model]; "
                   "'built-in' names the built-in model.")
@click.argument("more_models", nargs=-1, type=click.Path(path_type=Path))
@prompt_options
@click.option("--seeds", default="0,1", show_default=True, callback=seed_list, help="Seeds: 0,1 or a range 0-3.")
@click.option("--steps", type=int, default=None, help="Denoising steps for every model [each model's default].")
@click.option("--guidance", type=float, default=None, help="Guidance for every model [each model's default].")
@click.option("--size", type=int, default=None, help="Width and height for every model [each model's default].")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("grid.png"), show_default=True,
              help="The grid PNG; its .json and -tiles/ folder go beside it.")
@click.option("--reference", type=click.Choice(["diffusers"]), default=None,
              help="Also each model run by diffusers on its weights and the same noise, a column beside it (needs a "
                   "checkout's benchmarks/reference.py and ./setup.sh --test).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def main(models, more_models, prompt_file, prompt_texts, bank, category, seeds, steps, guidance, size, output,
         reference, quiet):
    """Render models x prompts x seeds into one labelled grid."""
    from ..pipelines import BUILTIN_MODEL, check_model_folder
    from ..tour import compare, prompts as bank_module

    folders = [None if str(m) == "built-in" else m for m in (*models, *more_models)] or [None]
    if output.suffix.lower() != ".png":
        raise click.BadParameter(f"{output} must end in .png", param_hint="--output")
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise click.BadParameter(f"folder {output.parent} does not exist", param_hint="--output")
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        infos = [check_model_folder(f or BUILTIN_MODEL)[0] for f in folders]  # every folder, before any work
        texts = bank_module.select(prompt_texts, prompt_file, bank, category, infos[0])

        def progress(done, total, tile):
            say(f"[{done}/{total}] {tile.model}, seed {tile.seed}: {tile.seconds:.2f} s  {tile.prompt[:60]}")

        tiles = compare.render(folders, texts, seeds, steps=steps, guidance=guidance, size=size, progress=progress,
                               keep_noise=reference is not None)
        if reference:
            tiles = _with_reference(tiles, folders, infos, say)
        compare.write(tiles, output)
    except Error as e:
        raise click.ClickException(one_line(e)) from None
    say(f"wrote {output}, {output.with_suffix('.json')} and {len(tiles)} tiles in {output.stem}-tiles/")
    click.echo(str(output))


def _with_reference(tiles, folders, infos, say):
    """Each model's tiles followed by diffusers' on the same weights and noise."""
    import tempfile

    import numpy as np

    from ..pipelines import BUILTIN_MODEL
    from ..tour import compare
    from . import reference as baseline

    baseline.module()
    out = []
    for folder, info in zip(folders, infos):
        name = compare.model_name(folder)
        mine = [t for t in tiles if t.model == name]
        folder = folder or BUILTIN_MODEL
        with tempfile.TemporaryDirectory(prefix="mlx-diffusion-compare-") as tmp:
            tmp = Path(tmp)
            request = compare.reference_request(mine, folder, info["family"], tmp)
            baseline.export_weights(Path(folder), info["components"], tmp / "weights")
            result = baseline.run({**request, "weights": str(tmp / "weights")}, tmp, say)
            images = [np.load(tmp / f"diffusers-{i}.npy") for i in range(len(mine))]
        out += mine + compare.reference_tiles(mine, result, images, f"{name} (diffusers)")
    return out


if __name__ == "__main__":
    sys.exit(run(main))
