"""Comparison grids: models x prompts x seeds, rendered with each model's own defaults unless told otherwise, into one
labelled image, a JSON record and every tile as a PNG that carries its settings.

Models are loaded one at a time and released before the next (peak memory is one model's, as on a 16 GB machine).
Rows are prompts; columns are model x seed; each tile is captioned with its model, steps and seconds.
"""

from __future__ import annotations

import gc
import json
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..io.folder import atomic_folder
from ..io.images import write_image, write_json
from ..pipelines import GenerationSettings, load_pipeline
from .benchmark import STAGES


@dataclass
class Tile:
    model: str  # the name shown: the folder's name, or "built-in" (and " (diffusers)" for the reference)
    prompt: str
    seed: int
    steps: int
    guidance: float | None
    seconds: float
    peak_memory_gb: float | None  # MLX's peak (None for a reference implementation's tiles)
    file: str = ""  # the tile's PNG, relative to the grid's folder
    image: object = field(default=None, repr=False)  # the PIL image (not recorded)
    settings: GenerationSettings | None = field(default=None, repr=False)
    noise: object = field(default=None, repr=False)  # the initial noise, with render(keep_noise=True)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("image", "settings", "noise")}


def model_name(path) -> str:
    return "built-in" if path is None else Path(path).name


def render(models, prompts, seeds, *, steps=None, guidance=None, size=None, progress=None,
           keep_noise=False) -> list[Tile]:
    """Every model x prompt x seed, model by model (each released before the next is loaded).

    models: folders (None: the built-in model); steps / guidance / size: the same for every model, or None for each
    model's defaults; progress: called with (done, total, tile) after each image.
    """
    if not models or not prompts or not seeds:
        raise InputError("a comparison needs at least one model, one prompt and one seed")
    names = [model_name(m) for m in models]
    if len(set(names)) != len(names):
        raise InputError(f"two models have the same name: {', '.join(names)}")
    tiles, total = [], len(models) * len(prompts) * len(seeds)
    for model, name in zip(models, names):
        pipe = load_pipeline(model, progress=False, keep_text_encoders=True)
        for prompt in prompts:
            for seed in seeds:
                settings = GenerationSettings(prompt=prompt, steps=steps, guidance=guidance, width=size, height=size,
                                              seed=seed)
                t0 = time.perf_counter()
                image = pipe.generate(settings)
                s = pipe.last_settings
                tile = Tile(name, prompt, seed, s.steps, s.guidance, round(time.perf_counter() - t0, 3),
                            round(pipe.last_stats.peak_memory_gb, 3), image=image, settings=s)
                if keep_noise:
                    tile.noise = np.array(pipe.noise(s))
                tiles.append(tile)
                if progress:
                    progress(len(tiles), total, tile)
        del pipe  # released before the next model is loaded
        gc.collect()
        mx.clear_cache()
    return tiles


def reference_request(tiles: list[Tile], folder, family: str, tmp: Path) -> dict:
    """The request (as `tour.benchmark.profile` and benchmarks/reference.py take) that makes one model's tiles again
    with another implementation: each tile's prompt from the noise its seed drew (`render(keep_noise=True)`), at
    its resolved settings, once."""
    s = tiles[0].settings
    latents = []
    for i, t in enumerate(tiles):
        latents.append(str(tmp / f"noise-{i}.npy"))
        np.save(latents[-1], t.noise)
    return {"folder": str(folder), "family": family, "prompts": [t.prompt for t in tiles], "latents": latents,
            "steps": s.steps, "guidance": s.guidance, "size": s.width, "max_sequence_length": s.max_sequence_length,
            "repeat": 0, "out": str(tmp / "reference-result.json")}


def reference_tiles(tiles: list[Tile], result: dict, images, name: str) -> list[Tile]:
    """Tiles of the reference's images (float arrays in [0, 1]) for `tiles`, under the model name `name`."""
    from PIL import Image

    out = []
    for t, run, image in zip(tiles, result["cold"], images):
        seconds = sum(run[k] for k in STAGES)
        pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        out.append(Tile(name, t.prompt, t.seed, t.steps, t.guidance, round(seconds, 3), None, image=pil))
    return out


def grid_image(tiles: list[Tile], cell: int | None = None):
    """One labelled image: a row per prompt (its text on the left), a column per model x seed (headed by both),
    each tile scaled to `cell` pixels (default: the largest tile's side, between 128 and 384) and captioned."""
    from PIL import Image, ImageDraw, ImageFont

    prompts = list(dict.fromkeys(t.prompt for t in tiles))
    columns = list(dict.fromkeys((t.model, t.seed) for t in tiles))
    cell = cell or min(384, max(128, max(max(t.image.size) for t in tiles)))
    font = ImageFont.load_default()
    line = 14
    label_w, head_h, cap_h, pad = 220, 2 * line + 8, 2 * line + 6, 6
    width = label_w + len(columns) * (cell + pad) + pad
    height = head_h + len(prompts) * (cell + cap_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, (model, seed) in enumerate(columns):
        x = label_w + pad + c * (cell + pad)
        draw.text((x, 4), textwrap.shorten(model, 32), fill="black", font=font)
        draw.text((x, 4 + line), f"seed {seed}", fill="dimgray", font=font)
    by_key = {(t.prompt, t.model, t.seed): t for t in tiles}
    for r, prompt in enumerate(prompts):
        y = head_h + r * (cell + cap_h + pad)
        for i, text in enumerate(textwrap.wrap(prompt, 34)[: max(1, cell // line)]):
            draw.text((pad, y + i * line), text, fill="black", font=font)
        for c, (model, seed) in enumerate(columns):
            t = by_key.get((prompt, model, seed))
            if t is None:
                continue
            x = label_w + pad + c * (cell + pad)
            w, h = t.image.size
            scale = cell / max(w, h)
            resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
            im = t.image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
            grid.paste(im, (x + (cell - im.size[0]) // 2, y + (cell - im.size[1]) // 2))
            draw.text((x, y + cell + 2), textwrap.shorten(t.model, 32), fill="black", font=font)
            draw.text((x, y + cell + 2 + line), f"{t.steps} steps, {t.seconds:.2f} s", fill="dimgray", font=font)
    return grid


def write(tiles: list[Tile], out) -> dict:
    """`out` (a .png): the grid there, `<stem>.json` beside it and the tiles in `<stem>-tiles/`, each file written
    under a temporary name and renamed when complete. Returns the JSON record."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out} must end in .png")
    folder = out.with_name(out.stem + "-tiles")
    with atomic_folder(folder) as tmp:
        for i, t in enumerate(tiles):
            name = f"{i:03d}-{t.model}-seed{t.seed}.png"
            write_image(t.image, tmp / name, t.settings.to_metadata() if t.settings else {})
            t.file = f"{folder.name}/{name}"
    record = {"grid": out.name, "tiles": [t.record() for t in tiles]}
    write_json(out.with_suffix(".json"), record)
    write_image(grid_image(tiles), out, {"mlx_diffusion.grid": json.dumps({"tiles": len(tiles)})})
    return record
