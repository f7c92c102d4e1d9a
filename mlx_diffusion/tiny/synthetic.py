"""Synthetic captioned shapes for training and evaluating a tiny text-to-image model, and a rule-based classifier.

A scene is 1-3 same-coloured, same-sized circles, squares or upright triangles on a plain background, optionally in
one region of a 3x3 grid; `caption` describes it in a small grammar ("two green squares at the top", "three yellow
triangles in the bottom left on a black background") that `parse` inverts. `sample` draws and renders batches
(vectorised numpy, ~10 ms per 64 images); `classify` reads an image back (background, colour, shape, count,
position) with transparent rules that tolerate the blur, noise and colour drift of generated images, and `score`
checks those against what a prompt asked for. Pure numpy: no MLX needed.

Coordinates are continuous pixels with the origin at the image's top-left corner (pixel (i, j) covers [j, j+1] x
[i, i+1]). An object's position is its area centroid (for a triangle, 1/3 of the way up from its base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PALETTE = {  # well separated: the closest pairs (red/orange, orange/yellow) are ~100 apart in RGB
    "red": (225, 30, 30),
    "green": (30, 165, 60),
    "blue": (35, 75, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 45, 175),
    "orange": (245, 128, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
POSITIONS = ("top", "bottom", "left", "right", "centre", "top left", "top right", "bottom left", "bottom right")

# (colour, shape, background) never drawn by split="train": colour i keeps shapes (2i + k) % 3 on backgrounds
# (i + 1 + 3k) % 8 for k = 0, 1. That is 16 of the 168 combinations (9.5%), each colour and each background twice,
# each shape 5-6 times, so every value still appears in training, only these pairings do not.
HELD_OUT = (
    ("red", "circle", "green"), ("red", "square", "purple"),
    ("green", "triangle", "blue"), ("green", "circle", "orange"),
    ("blue", "square", "yellow"), ("blue", "triangle", "white"),
    ("yellow", "circle", "purple"), ("yellow", "square", "black"),
    ("purple", "triangle", "orange"), ("purple", "circle", "red"),
    ("orange", "square", "white"), ("orange", "triangle", "green"),
    ("white", "circle", "black"), ("white", "square", "blue"),
    ("black", "triangle", "red"), ("black", "circle", "yellow"),
)  # fmt: skip

_NUMBER = {1: "a", 2: "two", 3: "three"}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}  # what parse accepts
_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
           "centre": "in the centre"}  # corners: "in the top left"
# Every word is a single CLIP BPE token except "triangles" (tri + angles: no single-token plural exists).
VOCABULARY = sorted({"a", "an", "one", "two", "three", "on", "the", "at", "in", "background", "top", "bottom",
                     "left", "right", "centre", "center", "middle", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)})


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for; None where it says nothing (position None: anywhere)."""

    colour: str | None = None
    shape: str | None = None
    count: int | None = None
    position: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str | None  # one of POSITIONS, or None: anywhere (a single object then sits near the centre)
    background: str
    say_background: bool = True

    def spec(self) -> Spec:
        """What this scene's caption asks for."""
        bg = self.background if self.say_background else None
        return Spec(self.colour, self.shape, self.count, self.position, bg)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene in the caption grammar; with `rng`, a fifth of the time a synonym that `parse` also reads ("one"
    for "a", "center" or "middle" for "centre"), so that a model trained on these captions knows those words."""
    number = _article(scene.colour) if scene.count == 1 else _NUMBER[scene.count]
    if rng is not None and scene.count == 1 and rng.random() < 0.2:
        number = "one"
    words = [number, scene.colour, scene.shape + ("s" if scene.count > 1 else "")]
    if scene.position is not None:
        phrase = _PHRASE.get(scene.position, "in the " + scene.position)
        if rng is not None and scene.position == "centre" and rng.random() < 0.4:
            phrase = "in the " + ("center", "middle")[int(rng.integers(2))]
        words.append(phrase)
    if scene.say_background:
        words.append(f"on {_article(scene.background)} {scene.background} background")
    return " ".join(words)


def parse(prompt: str) -> Spec:
    """Read a prompt in `caption`'s grammar (also "one", "center", "middle"; word order is not checked)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    background = next((w for w, nxt in zip(words, words[1:]) if w in PALETTE and nxt == "background"), None)
    colour = next((w for w, nxt in zip(words, words[1:] + [""]) if w in PALETTE and nxt != "background"), None)
    shape = count = None
    for i, w in enumerate(words):
        if w.rstrip("s") in SHAPES:
            shape, plural = w.rstrip("s"), w.endswith("s")
            count = next((_NUMBERS[v] for v in reversed(words[:i]) if v in _NUMBERS), None if plural else 1)
            break
    row = next((w for w in words if w in ("top", "bottom")), None)
    col = next((w for w in words if w in ("left", "right")), None)
    centre = any(w in ("centre", "center", "middle") for w in words)
    position = " ".join(w for w in (row, col) if w) or ("centre" if centre else None)
    return Spec(colour, shape, count, position, background)


# ---------------------------------------------------------------------------------------------------- sampling

def _combo_index(colour, shape, background):
    return (colour * len(SHAPES) + shape) * len(COLOURS) + background


_HELD_OUT_IDS = np.array([_combo_index(COLOURS.index(c), SHAPES.index(s), COLOURS.index(b)) for c, s, b in HELD_OUT])
_IS_HELD_OUT = np.isin(np.arange(len(COLOURS) ** 2 * len(SHAPES)), _HELD_OUT_IDS)


COUNT_WEIGHTS = (0.5, 0.25, 0.25)  # how often 1, 2 and 3 objects are drawn


def count_probabilities(counts) -> np.ndarray:
    """Weights of 1, 2 and 3 objects (any non-negative numbers, not all zero) as probabilities."""
    weights = np.asarray(counts, dtype=np.float64)
    if weights.shape != (len(COUNTS),) or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"counts must be {len(COUNTS)} non-negative weights, not all zero")
    return weights / weights.sum()


def draw_scenes(rng: np.random.Generator, n: int, split: str = "train", counts=COUNT_WEIGHTS) -> list[Scene]:
    """Uniform colour/shape/background (background != colour); count 1/2/3 in the proportions `counts` (50/25/25%);
    position None 30%, else uniform; the background named in 70% of captions. "train" never draws HELD_OUT,
    "heldout" draws only it."""
    if split == "heldout":
        colour, shape, background = np.array([[COLOURS.index(c), SHAPES.index(s), COLOURS.index(b)]
                                              for c, s, b in HELD_OUT])[rng.integers(len(HELD_OUT), size=n)].T
    elif split == "train":
        colour, shape, background = (np.empty(n, np.int64) for _ in range(3))
        todo = np.arange(n)
        while todo.size:  # redraw held-out combinations (~10% each round)
            c = rng.integers(len(COLOURS), size=todo.size)
            b = (c + rng.integers(1, len(COLOURS), size=todo.size)) % len(COLOURS)
            s = rng.integers(len(SHAPES), size=todo.size)
            colour[todo], shape[todo], background[todo] = c, s, b
            todo = todo[_IS_HELD_OUT[_combo_index(c, s, b)]]
    else:
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    count = rng.choice(COUNTS, size=n, p=count_probabilities(counts))
    position = np.where(rng.random(n) < 0.3, -1, rng.integers(len(POSITIONS), size=n))
    say = rng.random(n) < 0.7
    return [Scene(COLOURS[c], SHAPES[s], int(k), None if p < 0 else POSITIONS[p], COLOURS[b], bool(y))
            for c, s, k, p, b, y in zip(colour, shape, count, position, background, say)]


def sample(rng: np.random.Generator, n: int, size: int = 64, split: str = "train", counts=COUNT_WEIGHTS,
           gap: float | None = None, layout: str = "random"):
    """n random scenes: (images uint8 (n, size, size, 3), captions (with synonyms at times), scenes)."""
    scenes = draw_scenes(rng, n, split, counts)
    return render_many(scenes, rng, size, gap, layout), [caption(s, rng) for s in scenes], scenes


def eval_scenes(n: int = 60, seed: int = 0) -> list[Scene]:
    """A fixed prompt set over the HELD_OUT combinations: every (count, position) pair appears once per 30 scenes,
    the combinations cycle in a seeded order, and 2 of every 3 captions name the background."""
    rng = np.random.default_rng(seed)
    pairs = [(k, p) for k in COUNTS for p in (None, *POSITIONS)]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    combos = [HELD_OUT[i] for i in rng.permutation(len(HELD_OUT))]
    scenes = []
    for i in range(n):
        (colour, shape, background), (count, position) = combos[i % len(combos)], pairs[i % len(pairs)]
        scenes.append(Scene(colour, shape, count, position, background, say_background=i % 3 != 2))
    return scenes


# --------------------------------------------------------------------------------------------------- rendering

# Object half-size (half the bounding box side) in pixels at size 64, by count; shrunk further when they must fit.
_HALF_SIZE = {1: (7.0, 13.0), 2: (5.0, 9.0), 3: (4.0, 7.5)}
GAP = 3.0  # pixels between the bounding boxes of two objects, so they stay separate components when blurred
_EDGE = 1.0  # object to image border: border pixels stay pure background
_BAND = 1.0  # centres this far inside their third, so a centroid measured to a pixel still lands in it
_JITTER = 6.0  # a lone object without a position: centre +- this


def _regions(scenes, size):
    """Per scene (x_lo, x_hi, y_lo, y_hi) that centroids must lie in (before keeping objects inside the image)."""
    third, m = size / 3, _BAND * size / 64
    lo, hi = {0: 0.0, 1: third + m, 2: 2 * third + m}, {0: third - m, 1: 2 * third - m, 2: float(size)}
    out = np.empty((len(scenes), 4))
    for i, s in enumerate(scenes):
        if s.position is None:
            j = _JITTER * size / 64
            out[i] = (size / 2 - j, size / 2 + j) * 2 if s.count == 1 else (0, size, 0, size)
            continue
        words = s.position.split()
        row = 0 if "top" in words else 2 if "bottom" in words else 1 if words == ["centre"] else None
        col = 0 if "left" in words else 2 if "right" in words else 1 if words == ["centre"] else None
        out[i] = (*((lo[col], hi[col]) if col is not None else (0, size)),
                  *((lo[row], hi[row]) if row is not None else (0, size)))
    return out


def _bounds(half, triangle, region, size):
    """Where centroids may go: the region, shrunk so that objects of this half-size stay inside the image."""
    edge, drop = half + _EDGE * size / 64, triangle * half / 3  # a triangle's centroid is half/3 below its box centre
    return (np.maximum(region[..., 0], edge), np.minimum(region[..., 1], size - edge),
            np.maximum(region[..., 2], edge + drop), np.minimum(region[..., 3], size - edge + drop))


def _fits(count, half, triangle, region, size, gap, slack=1.1):
    """Whether `count` objects can sit in the region with `slack` x the spacing they need (1-3 objects: a pair
    along the longer side, three in an L or a row)."""
    x0, x1, y0, y1 = _bounds(half, triangle, region, size)
    w, h, sep = x1 - x0, y1 - y0, slack * (2 * half + gap * size / 64)
    long = np.maximum(w, h)
    return (w >= 0) & (h >= 0) & ((count == 1) | ((count == 2) & (long >= sep))
                                  | ((w >= sep) & (h >= sep)) | (long >= 2 * sep))


_TIDY_JITTER = 1.5  # pixels each tidy slot may move, on each axis


def _tidy_slots(count, half, triangle, region, size, gap):
    """The "tidy" layout's centroids (n, 3, 2) before jitter, and whether they fit (n,).

    Objects sit on the region's longer axis (x when square), centred across it, at the centres of `count` equal cells
    of the region where the allowed centroid box is long enough, else as far apart as it allows; three that do not fit
    in a row make a triangle: two on one line, one centred on the next. Neighbours are at least 2 half + gap + 2
    jitter apart along one axis, so jittered objects stay `gap` apart."""
    x0, x1, y0, y1 = _bounds(half, triangle, region, size)
    box = np.stack([x1 - x0, y1 - y0], -1)  # (..., 2)
    mid = np.stack([x0 + x1, y0 + y1], -1) / 2
    reg = np.stack([region[..., 1] - region[..., 0], region[..., 3] - region[..., 2]], -1)
    sep = 2 * half + (gap + 2 * _TIDY_JITTER) * size / 64
    vertical = box[..., 1] > box[..., 0]  # the longer axis is y
    long_box, short_box = np.where(vertical, box[..., 1], box[..., 0]), np.where(vertical, box[..., 0], box[..., 1])
    long_reg, short_reg = np.where(vertical, reg[..., 1], reg[..., 0]), np.where(vertical, reg[..., 0], reg[..., 1])
    row = long_box >= (count - 1) * sep
    fits = (box >= 0).all(-1) & (row | ((count == 3) & (long_box >= sep) & (short_box >= sep)))
    d_row = np.clip(long_reg / count, sep, long_box / np.maximum(count - 1, 1))
    d_pair = np.clip(long_reg / 2, sep, long_box)
    d_line = np.clip(short_reg / 2, sep, short_box)
    offsets = np.zeros(row.shape + (3, 2))  # (along the long axis, across it) from the box centre
    for j in range(3):
        in_row = (j - (count - 1) / 2) * d_row
        tri = np.where(j < 2, (j - 0.5) * d_pair, 0.0), np.where(j < 2, -d_line / 2, d_line / 2)
        offsets[..., j, 0] = np.where(row, in_row, tri[0])
        offsets[..., j, 1] = np.where(row, 0.0, tri[1])
    xy = np.where(vertical[..., None, None], offsets[..., ::-1], offsets)
    return mid[..., None, :] + xy, fits


def _place_tidy(count, triangle, region, lo, hi, rng, size, gap):
    """Half-sizes and centroids of the "tidy" layout: the size drawn from the count's range, capped at the largest
    that fits, then every object moved by up to _TIDY_JITTER on each axis (kept inside the allowed box)."""
    n = len(count)
    grid = np.linspace(0.1, 1, 46)[:, None] * hi  # (46, n)
    _, fit = _tidy_slots(count, grid, triangle, region[None], size, gap)
    cap = np.where(fit.any(0), grid[::-1][np.argmax(fit[::-1], 0), np.arange(n)], grid[0])
    hi = np.minimum(hi, cap)
    half = np.minimum(lo, hi) + np.maximum(hi - lo, 0) * rng.random(n)
    centres, _ = _tidy_slots(count, half, triangle, region, size, gap)
    x0, x1, y0, y1 = _bounds(half, triangle, region, size)
    j = _TIDY_JITTER * size / 64
    centres = centres + rng.uniform(-j, j, centres.shape)
    centres[..., 0] = np.clip(centres[..., 0], x0[:, None], x1[:, None])
    centres[..., 1] = np.clip(centres[..., 1], y0[:, None], y1[:, None])
    centres[np.arange(3)[None, :] >= count[:, None]] = np.nan
    return half, centres


def _place(scenes, rng, size, gap=None, layout="random", candidates=48, rounds=40):
    """Half-sizes (n,) and centroids (n, 3, 2) as (x, y); unused slots are NaN. `layout` "tidy": `_place_tidy`.

    Sizes are drawn from the count's range, capped where the region is too small to hold the objects comfortably.
    Then random sequential placement, vectorised over scenes: each round draws `candidates` points in the allowed
    region and greedily keeps the first ones that clear every object kept so far; scenes that fail retry, and
    shrink by 3% each time.
    """
    n, scale = len(scenes), size / 64
    count = np.array([s.count for s in scenes])
    triangle = np.array([s.shape == "triangle" for s in scenes])
    region = _regions(scenes, size)
    lo, hi = np.array([_HALF_SIZE[k] for k in count]).T * scale
    gap = GAP if gap is None else gap
    if layout == "tidy":
        return _place_tidy(count, triangle, region, lo, hi, rng, size, gap)
    if layout != "random":
        raise ValueError(f"layout must be 'random' or 'tidy', not {layout!r}")
    grid = np.linspace(0.25, 1, 31)[:, None] * hi  # (31, n): the largest that fits caps the range
    fit = _fits(count, grid, triangle, region[None], size, gap)
    cap = np.where(fit.any(0), grid[::-1][np.argmax(fit[::-1], 0), np.arange(n)], grid[0])
    hi = np.minimum(hi, cap)
    half = np.minimum(lo, hi) + np.maximum(hi - lo, 0) * rng.random(n)
    centres = np.full((n, 3, 2), np.nan)
    todo = np.arange(n)
    for _ in range(rounds):
        h, k = half[todo], count[todo]
        x0, x1, y0, y1 = _bounds(h, triangle[todo], region[todo], size)
        low, span = np.stack([x0, y0], -1)[:, None], np.stack([x1 - x0, y1 - y0], -1)[:, None]
        cand = low + rng.random((len(todo), candidates, 2)) * span
        ok = (x0 <= x1) & (y0 <= y1)
        free = np.ones((len(todo), candidates), bool)
        rows = np.arange(len(todo))
        for j in range(3):
            first = np.argmax(free, axis=1)
            need = k > j
            ok &= ~need | free[rows, first]
            centres[todo, j] = np.where(need[:, None], cand[rows, first], np.nan)
            dist = np.abs(cand - cand[rows, first][:, None]).max(-1)  # boxes separate along x or y
            free &= dist >= (2 * h + gap * scale)[:, None]
        todo = todo[~ok]
        if not todo.size:
            return half, centres
        half[todo] *= 0.97
    raise RuntimeError("could not place objects")  # unreachable in practice: shrinking always fits eventually


def _coverage(shape, half, centres, size):
    """Anti-aliased coverage (m, size, size) of m scenes' objects (non-overlapping, so coverages add).

    Squares use the exact pixel-box overlap; circle and triangle edges use the signed distance d to the edge,
    coverage clip(0.5 - d, 0, 1), the usual analytic approximation (exact for axis-aligned edges, close elsewhere).
    """
    p = np.arange(size, dtype=np.float32) + 0.5
    h = half.astype(np.float32)[:, None, None, None]
    cx = np.nan_to_num(centres[..., 0], nan=-1e4).astype(np.float32)[:, :, None, None]  # (m, 3, 1, 1)
    cy = np.nan_to_num(centres[..., 1], nan=-1e4).astype(np.float32)[:, :, None, None]
    x, y = p[None, None, None, :], p[None, None, :, None]
    if shape == "square":
        over_x = np.clip(np.minimum(x + 0.5, cx + h) - np.maximum(x - 0.5, cx - h), 0, 1)
        over_y = np.clip(np.minimum(y + 0.5, cy + h) - np.maximum(y - 0.5, cy - h), 0, 1)
        cov = over_x * over_y
    elif shape == "circle":
        cov = np.clip(h + 0.5 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), 0, 1)
    else:  # upright isosceles triangle, base 2h, height 2h: half-width at depth t below the apex is t / 2
        top, base = cy - h * (4 / 3), cy + h * (2 / 3)
        side = (2 * np.abs(x - cx) - (y - top)) / np.float32(np.sqrt(5))
        cov = np.clip(0.5 - side, 0, 1) * np.clip(base + 0.5 - y, 0, 1)
    return cov.sum(1)


def render_many(scenes: list[Scene], rng: np.random.Generator, size: int = 64, gap: float | None = None,
                layout: str = "random") -> np.ndarray:
    """Render scenes to uint8 (n, size, size, 3); sizes and placements drawn from rng; objects at least `gap` pixels
    apart (at size 64; default GAP), placed at random in their region or, `layout="tidy"`, evenly in a row (or a
    triangle of three) with a little jitter."""
    half, centres = _place(scenes, rng, size, gap, layout)
    alpha = np.zeros((len(scenes), size, size), np.float32)
    shapes = np.array([SHAPES.index(s.shape) for s in scenes])
    for i, shape in enumerate(SHAPES):
        idx = np.flatnonzero(shapes == i)
        if idx.size:
            alpha[idx] = _coverage(shape, half[idx], centres[idx], size)
    table = np.array(list(PALETTE.values()), np.float32)
    fg = table[[COLOURS.index(s.colour) for s in scenes]][:, None, None, :]
    bg = table[[COLOURS.index(s.background) for s in scenes]][:, None, None, :]
    return (bg + np.minimum(alpha, 1)[..., None] * (fg - bg) + 0.5).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One scene as uint8 (size, size, 3)."""
    return render_many([scene], rng, size)[0]


# -------------------------------------------------------------------------------------------------- classifier

_TABLE = np.array(list(PALETTE.values()), np.float32)


def _nearest(rgb) -> str:
    return COLOURS[int(np.argmin(((_TABLE - rgb) ** 2).sum(1)))]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of a boolean mask, found on its row runs: (label image, -1 off the mask; areas)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, x0 = np.nonzero(step == 1)  # row-major order, so starts and ends pair up
    x1 = np.nonzero(step == -1)[1]
    parent = list(range(len(rows)))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # runs in consecutive rows touch when their column intervals overlap
    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(mask.shape[0] - 1):
        a, b = slice(first[r], first[r + 1]), slice(first[r + 1], first[r + 2])
        ia, ib = np.nonzero((x0[a, None] < x1[None, b]) & (x0[None, b] < x1[a, None]))
        for i, j in zip(ia + first[r], ib + first[r + 1]):
            parent[root(i)] = root(j)
    labels = np.unique([root(i) for i in range(len(rows))], return_inverse=True)[1].reshape(-1).astype(np.int64)
    length = x1 - x0
    image = np.full(mask.shape, -1)
    offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    image[np.repeat(rows, length), np.repeat(x0, length) + offset] = np.repeat(labels, length)
    return image, np.bincount(labels, length)


def _shape(cover: np.ndarray) -> str:
    """Shape of one object from its coverage (0..1) in a window around it.

    fill = area / (widest row x tallest column), all measured as coverage sums: square 1, circle pi/4, triangle
    1/2, and blur (which conserves these sums) or a stray edge pixel barely move it, unlike a pixel bounding box.
    skew = skewness of the rows' mass: 0 for circles and squares, -0.57 for an upright triangle (mass at its base).
    """
    area, rows = cover.sum(), cover.sum(1)
    fill = area / (rows.max() * cover.sum(0).max())
    y = np.arange(len(rows)) - (rows @ np.arange(len(rows))) / area
    skew = (rows @ y**3) / area / max((rows @ y**2) / area, 1e-9) ** 1.5
    if abs(skew) > 0.2 or fill < 0.69:
        return "triangle"
    return "circle" if fill < 0.87 else "square"


def classify(image: np.ndarray, min_area: float = 8.0) -> dict:
    """Attributes of a rendered or generated image (uint8 HxWx3).

    background: nearest palette colour to the median border pixel. Object pixels: first those far from the
    measured background (0.4x the distance from the background's palette colour to its closest other one); the
    median of their eroded interior is the typical object colour. coverage = each pixel's fraction of the way
    from the background colour to that; objects are the 4-connected components of coverage > 1/2, less specks
    under `min_area` pixels (at 64x64, scaled with the image) or under 20% of the largest. count: components;
    colour: nearest palette colour to the median of the purest 40% of interior pixels; shape: majority vote of
    `_shape` over the objects; position: (row, col), the 3x3 cell holding the mean of the objects' centroids,
    rows ROWS (top, middle, bottom) and columns COLS (left, centre, right).
    """
    img = image.astype(np.float32)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = _nearest(bg)
    ref = _TABLE[COLOURS.index(background)]
    others = np.delete(_TABLE, COLOURS.index(background), axis=0)
    far = ((img - bg) ** 2).sum(-1) > (0.4 * np.sqrt(((others - ref) ** 2).sum(1)).min()) ** 2
    out = dict(background=background, colour=None, shape=None, count=0, position=None)
    if not far.any():
        return out
    # The eroded mask drops isolated noise pixels; its median is the typical interior, the full-coverage level.
    inner = far.copy()
    inner[1:-1, 1:-1] &= far[:-2, 1:-1] & far[2:, 1:-1] & far[1:-1, :-2] & far[1:-1, 2:]
    pixels = img[inner] if inner.any() else img[far]
    typical = np.median(pixels, axis=0) - bg
    cover = np.clip((img - bg) @ (typical / (typical @ typical)), 0, 1)
    # Blur mixes small objects with the background all through, bg + t (obj - bg): name the colour from the purest
    # pixels, the largest t (selected along that one axis, so that noise does not bias the hue).
    t = (pixels - bg) @ typical
    colour = _nearest(np.median(pixels[t >= np.percentile(t, 60)], axis=0))
    labels, area = _components(cover > 0.5)
    keep = np.flatnonzero(area >= max(min_area * h * w / 64**2, 0.2 * area.max(initial=0)))
    if not keep.size:
        return out
    votes, centres = [], []
    for c in keep:
        ys, xs = np.nonzero(labels == c)
        y0, y1, x0, x1 = max(ys.min() - 1, 0), ys.max() + 2, max(xs.min() - 1, 0), xs.max() + 2
        near = labels[y0:y1, x0:x1]  # its halo (below 1/2 coverage) counts, other objects do not
        votes.append(_shape(cover[y0:y1, x0:x1] * ((near == c) | (near < 0))))
        centres.append((xs.mean() + 0.5, ys.mean() + 0.5))  # pixel centres, in placement coordinates
    cx, cy = np.mean(centres, axis=0)
    return dict(background=background, colour=colour, shape=max(SHAPES, key=votes.count),
                count=len(keep), position=(ROWS[min(int(3 * cy / h), 2)], COLS[min(int(3 * cx / w), 2)]))


def score(spec: Spec, attrs: dict) -> dict:
    """attribute -> whether the image (classify's attrs) does what the prompt asked, for what the prompt mentions.

    Positions: "top"/"bottom" check the row only, "left"/"right" the column only, "centre" the middle cell,
    "top left" etc. both.
    """
    out = {k: attrs[k] == getattr(spec, k) for k in ("colour", "shape", "count", "background")
           if getattr(spec, k) is not None}
    if spec.position is not None:
        words = spec.position.split()
        want_row = next((w for w in words if w in ("top", "bottom")), "middle" if words == ["centre"] else None)
        want_col = next((w for w in words if w in ("left", "right")), "centre" if words == ["centre"] else None)
        got = attrs.get("position") or (None, None)
        out["position"] = (want_row is None or got[0] == want_row) and (want_col is None or got[1] == want_col)
    return out
