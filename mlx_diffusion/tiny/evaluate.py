"""Does the model draw what it is told? Prompt-following accuracy of a model trained on `synthetic` scenes.

    python -m mlx_diffusion.tiny.evaluate [--model PATH] [--prompts 96] [--seed 0] [--steps N] [--guidance G] [--grid F.png]

Two fixed prompt sets: `heldout` (`synthetic.eval_scenes`: colour/shape/background combinations the model never
saw in training, every count and position: does it compose?) and `seen` (scenes drawn like the training data, with
a fixed seed: does it draw what it was taught, on new noise?). One image per prompt with seeds seed, seed+1, ...;
each image is read back with the rule-based `synthetic.classify`, and per attribute the prompt mentions, the fraction
of images that match it is reported. Alongside: the same classifier on true renderings of the same scenes (its own
accuracy), on those renderings passed through the model's VAE and back (the most the transformer could reach with
this VAE), and chance level.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import synthetic

ATTRIBUTES = ("colour", "shape", "count", "position", "background")
# chance of a uniform random guess: 8 colours, 3 shapes, 3 counts; positions: 1/3 for a row or column only, 1/9 for a
# cell (mixed in the prompt set; the set's own mix is computed in `chance`); background: 1 in 8
_CHOICES = {"colour": len(synthetic.COLOURS), "shape": len(synthetic.SHAPES), "count": len(synthetic.COUNTS),
            "background": len(synthetic.COLOURS)}


def chance(specs) -> dict:
    out = {k: 1 / n for k, n in _CHOICES.items()}
    pos = [1 / 9 if s.position in ("centre", "top left", "top right", "bottom left", "bottom right") else 1 / 3
           for s in specs if s.position is not None]
    out["position"] = float(np.mean(pos)) if pos else None
    return out


def accuracy(specs, attrs_list) -> dict:
    """attribute -> (correct, asked) over the prompts that mention it."""
    tally = {k: [0, 0] for k in ATTRIBUTES}
    for spec, attrs in zip(specs, attrs_list):
        for k, ok in synthetic.score(spec, attrs).items():
            tally[k][0] += bool(ok)
            tally[k][1] += 1
    return {k: tuple(v) for k, v in tally.items()}


SEEN_SCENES_SEED = 12345


def prompt_scenes(split: str, n: int):
    if split == "heldout":
        return synthetic.eval_scenes(n)
    if split == "seen":
        return synthetic.draw_scenes(np.random.default_rng(SEEN_SCENES_SEED), n, "train")
    raise ValueError(f"unknown prompt set {split!r} (heldout or seen)")


def round_trip(pipe, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 images encoded by the pipeline's VAE (latent means) and decoded back, as uint8."""
    import mlx.core as mx

    vae, out = pipe.model("vae"), []
    for i in range(0, len(images), batch):
        x = mx.array(images[i : i + batch].astype(np.float32) / 127.5 - 1.0).astype(pipe.compute_dtype)
        y = mx.clip(vae.decode(vae.encode(x)[0]).astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
        out.append(np.array(mx.round(y * 255)).astype(np.uint8))
    return np.concatenate(out)


def evaluate(pipe, n: int = 96, seed: int = 0, steps=None, guidance=None, progress=True, split="heldout", cache=None):
    """Generate a prompt set; returns (prompts, images uint8, per-attribute (correct, asked), the classifier's own
    accuracy on true renderings of the same scenes, its accuracy on those passed through the VAE)."""
    from tqdm import tqdm

    scenes = prompt_scenes(split, n)
    prompts = [synthetic.caption(s) for s in scenes]
    specs = [synthetic.parse(p) for p in prompts]
    images = []
    for i, p in enumerate(tqdm(prompts, desc="evaluating", disable=not progress, file=sys.stderr, leave=False)):
        image = pipe.generate(p, seed=seed + i, steps=steps, guidance=guidance, output_type="np", cache=cache)
        images.append((image * 255).round().astype(np.uint8))
    images = np.stack(images)
    generated = accuracy(specs, [synthetic.classify(im) for im in images])
    truth = synthetic.render_many(scenes, np.random.default_rng(seed), images.shape[1])
    ceiling = accuracy(specs, [synthetic.classify(im) for im in truth])
    through_vae = accuracy(specs, [synthetic.classify(im) for im in round_trip(pipe, truth)])
    return prompts, images, generated, ceiling, through_vae


def grid(images: np.ndarray, columns: int = 12) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + 2), columns * (w + 2), c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        out[r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = im
    return out


def report(generated: dict, ceiling: dict, through_vae: dict, base: dict) -> str:
    lines = [f"{'attribute':<11} {'model':>7} {'true images':>12} {'VAE round trip':>15} {'chance':>7}   prompts"]
    for k in ATTRIBUTES:
        ok, asked = generated[k]
        if asked:
            lines.append(f"{k:<11} {ok / asked:>7.2f} {ceiling[k][0] / asked:>12.2f} "
                         f"{through_vae[k][0] / asked:>15.2f} {base[k]:>7.2f}   {asked}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="A model folder trained on synthetic scenes [the built-in model].")
@click.option("--prompts", "n", type=int, default=96, show_default=True, help="How many prompts per set.")
@click.option("--set", "splits", type=click.Choice(["heldout", "seen"]), multiple=True, default=("heldout", "seen"),
              show_default=True, help="Prompt sets: held-out combinations, and combinations seen in training.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first image (then +1 each).")
@click.option("--steps", type=int, default=None, help="Denoising steps [the model's default].")
@click.option("--guidance", type=float, default=None, help="Guidance scale [the model's default].")
@click.option("--grid", "grid_path", type=click.Path(path_type=Path), default=None, help="Also save all images as one PNG.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also save the numbers.")
@click.option("--cache", type=float, default=None, help="First-block cache threshold (as generate's) [off].")
@click.option("--quiet", is_flag=True)
def main(model_path, n, splits, seed, steps, guidance, grid_path, json_path, cache, quiet):
    """Prompt-following accuracy per attribute on fixed prompt sets."""
    from ..cli import one_line
    from ..errors import Error
    from ..pipelines import load_pipeline

    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--prompts")
    try:
        pipe = load_pipeline(model_path, progress=False)
    except Error as e:
        raise click.ClickException(one_line(e)) from None
    results, grids = {}, []
    for split in splits:
        t0 = time.perf_counter()
        try:
            prompts, images, generated, ceiling, through_vae = evaluate(pipe, n, seed, steps, guidance, not quiet, split,
                                                                        cache)
        except Error as e:
            raise click.ClickException(one_line(e)) from None
        seconds = time.perf_counter() - t0
        base = chance([synthetic.parse(p) for p in prompts])
        click.echo(f"{split} prompts ({n}): {pipe.path}, steps {pipe.last_settings.steps}, guidance "
                   f"{pipe.last_settings.guidance}, seeds {seed}..{seed + n - 1} ({seconds / n:.2f} s per image)"
                   + (f", first-block cache {cache}" if cache else ""))
        click.echo(report(generated, ceiling, through_vae, base) + "\n")
        grids.append(grid(images))
        results[split] = {"accuracy": {k: v[0] / v[1] for k, v in generated.items() if v[1]},
                          "classifier_on_truth": {k: v[0] / v[1] for k, v in ceiling.items() if v[1]},
                          "classifier_on_vae_round_trip": {k: v[0] / v[1] for k, v in through_vae.items() if v[1]},
                          "chance": base}
    if grid_path is not None:
        from PIL import Image

        Image.fromarray(np.concatenate(grids, axis=0)).save(grid_path)
    if json_path is not None:
        json_path.write_text(json.dumps({"model": str(pipe.path), "prompts": n, "seed": seed, "cache": cache,
                                         "steps": pipe.last_settings.steps, "guidance": pipe.last_settings.guidance,
                                         **results}, indent=2))


if __name__ == "__main__":
    from ..cli import run

    run(main)
