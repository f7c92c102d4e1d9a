"""The synthetic shapes data set: captions and their parser, held-out split, rendering, classifier and scoring."""

from collections import Counter

import numpy as np
import pytest

import helpers
from mlx_diffusion.tiny import synthetic as S


def _accuracy(images, scenes, degrade=None, seed=0):
    """Fraction of images whose classified attributes match the scene, per attribute (position: scenes that ask)."""
    rng = np.random.default_rng(seed)
    hits, total = Counter(), Counter()
    for image, scene in zip(images, scenes):
        attrs = S.classify(degrade(image, rng) if degrade else image)
        truth = S.Spec(scene.colour, scene.shape, scene.count, scene.position, scene.background)
        for key, ok in S.score(truth, attrs).items():
            hits[key] += ok
            total[key] += 1
    return {key: hits[key] / total[key] for key in total}


def _blur_and_noise(image, rng, sigma=8.0):
    x = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    x = sum(x[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def both_splits():
    images, _, scenes = S.sample(np.random.default_rng(1), 400)
    held, _, held_scenes = S.sample(np.random.default_rng(2), 150, split="heldout")
    return np.concatenate([images, held]), scenes + held_scenes


def test_vocabulary_is_clip_tokens():
    from mlx_diffusion.pipelines.tokenizers import CLIPTokenizer

    tok = CLIPTokenizer.from_folder(helpers.CLIP_TOKENIZER)
    bos, eos = tok.encode("")
    lengths = {word: len(tok.encode(word)) - 2 for word in S.VOCABULARY}
    assert {w for w, n in lengths.items() if n != 1} == {"triangles"}, lengths  # "tri" + "angles": no other plural
    assert all(tok.encode(w)[0] == bos and tok.encode(w)[-1] == eos for w in S.VOCABULARY)
    _, captions, _ = S.sample(np.random.default_rng(0), 500)
    used = {w for c in captions + [S.caption(s) for s in S.eval_scenes()] for w in c.split()}
    assert used == set(S.VOCABULARY)


def test_captions_and_parse():
    examples = {
        S.Scene("red", "circle", 1, None, "blue", False): "a red circle",
        S.Scene("red", "circle", 1, None, "blue", True): "a red circle on a blue background",
        S.Scene("green", "square", 2, "top", "red", False): "two green squares at the top",
        S.Scene("yellow", "triangle", 3, "bottom left", "black"): "three yellow triangles in the bottom left on a "
        "black background",
        S.Scene("white", "square", 1, "right", "red", False): "a white square on the right",
        S.Scene("blue", "circle", 1, "centre", "red", False): "a blue circle in the centre",
        S.Scene("orange", "square", 1, "left", "orange", True): "an orange square on the left on an orange background",
    }
    for scene, text in examples.items():
        assert S.caption(scene) == text
    every = [S.Scene(c, s, k, p, b, y) for c in S.COLOURS for s in S.SHAPES for k in S.COUNTS
             for p in (None, *S.POSITIONS) for b in S.COLOURS if b != c for y in (False, True)]
    for scene in every:
        assert S.parse(S.caption(scene)) == scene.spec(), S.caption(scene)
    # user prompts in the same grammar, with a few liberties
    assert S.parse("One Blue circle in the center.") == S.Spec("blue", "circle", 1, "centre")
    assert S.parse("three red squares") == S.Spec("red", "square", 3)
    assert S.parse("purple triangles at the bottom") == S.Spec("purple", "triangle", None, "bottom")
    assert S.parse("a square in the middle on a white background") == S.Spec(None, "square", 1, "centre", "white")


def test_training_captions_use_synonyms():
    """With an rng (as `sample` draws training captions) "one", "center" and "middle" appear at times, and every
    caption still parses back to its scene; without one the caption is the canonical one."""
    rng = np.random.default_rng(0)
    centre = S.Scene("blue", "circle", 1, "centre", "red", False)
    texts = {S.caption(centre, rng) for _ in range(200)}
    assert texts == {f"{n} blue circle in the {w}" for n in ("a", "one") for w in ("centre", "center", "middle")}
    assert all(S.parse(t) == centre.spec() for t in texts)
    two = S.Scene("red", "square", 2, "top", "blue", True)
    assert {S.caption(two, rng) for _ in range(50)} == {S.caption(two)}
    _, captions, scenes = S.sample(np.random.default_rng(1), 400)
    assert all(S.parse(c) == s.spec() for c, s in zip(captions, scenes))
    assert 0.1 < np.mean([c.startswith("one ") for c, s in zip(captions, scenes) if s.count == 1]) < 0.3


def test_held_out_split():
    formula = {(S.COLOURS[i], S.SHAPES[(2 * i + k) % 3], S.COLOURS[(i + 1 + 3 * k) % 8]) for i in range(8)
               for k in range(2)}
    assert set(S.HELD_OUT) == formula and len(S.HELD_OUT) == 16  # of 8 * 3 * 7 = 168
    rng = np.random.default_rng(0)
    train = S.draw_scenes(rng, 20000)
    combos = {(s.colour, s.shape, s.background) for s in train}
    assert not combos & set(S.HELD_OUT)
    assert len(combos) == 168 - 16  # every other combination is drawn
    for field, values in (("colour", S.COLOURS), ("shape", S.SHAPES), ("background", S.COLOURS),
                          ("count", S.COUNTS), ("position", (None, *S.POSITIONS))):
        assert {getattr(s, field) for s in train} == set(values)
    assert abs(np.mean([s.position is None for s in train]) - 0.3) < 0.02
    assert abs(np.mean([s.count == 1 for s in train]) - 0.5) < 0.02
    assert abs(np.mean([s.say_background for s in train]) - 0.7) < 0.02
    held = S.draw_scenes(rng, 2000, split="heldout")
    assert {(s.colour, s.shape, s.background) for s in held} == set(S.HELD_OUT)
    evals = S.eval_scenes()
    assert evals == S.eval_scenes() and evals != S.eval_scenes(seed=1)
    assert {(s.colour, s.shape, s.background) for s in evals} <= set(S.HELD_OUT)
    assert {(s.count, s.position) for s in evals} == {(k, p) for k in S.COUNTS for p in (None, *S.POSITIONS)}


def test_count_proportions():
    rng = np.random.default_rng(1)
    more = [s.count for s in S.draw_scenes(rng, 6000, counts=(1, 2, 2))]  # weights need not sum to 1
    assert np.allclose(np.bincount(more, minlength=4)[1:] / 6000, (0.2, 0.4, 0.4), atol=0.02)
    assert {s.count for s in S.draw_scenes(rng, 500, counts=(0, 0, 1))} == {3}
    # the default proportions draw exactly what they drew before the option existed
    a, b = (S.draw_scenes(np.random.default_rng(2), 100, counts=c) for c in (S.COUNT_WEIGHTS, (2, 1, 1)))
    assert a == b
    for bad in ((1, 1), (0, 0, 0), (1, -1, 1)):
        with pytest.raises(ValueError, match="counts must be"):
            S.draw_scenes(rng, 10, counts=bad)


def test_tidy_layout():
    rng = np.random.default_rng(4)
    scenes = S.draw_scenes(rng, 3000)
    for gap in (S.GAP, 5.0):
        half, centres = S._place(scenes, rng, 64, gap=gap, layout="tidy")
        _check_placement(scenes, half, centres, gap)
    # objects in a row along the region's longer side, evenly: "two ... at the top" side by side at the centres of
    # the halves of the width, give or take the jitter; three in a corner make a triangle
    j = S._TIDY_JITTER
    pair = [S.Scene("green", "square", 2, "top", "red")] * 50
    half, c = S._place(pair, rng, 64, layout="tidy")
    assert np.allclose(np.sort(c[:, :2, 0], 1), [16, 48], atol=j) and np.ptp(c[:, :2, 1], 1).max() <= 2 * j
    column = [S.Scene("red", "circle", 3, "left", "blue")] * 50
    half, c = S._place(column, rng, 64, layout="tidy")
    assert np.allclose(np.sort(c[:, :, 1], 1), [64 / 6, 32, 64 * 5 / 6], atol=j) and np.ptp(c[:, :, 0], 1).max() <= 2 * j
    corner = [S.Scene("red", "circle", 3, "bottom right", "blue")] * 50
    half, c = S._place(corner, rng, 64, layout="tidy")
    ys = np.sort(c[:, :, 1], 1)
    assert (ys[:, 1] - ys[:, 0] <= 2 * j).all() and (ys[:, 2] - ys[:, 1] > 2 * half + S.GAP).all()  # two, then one
    with pytest.raises(ValueError, match="layout must be"):
        S._place(pair, rng, 64, layout="neat")


def test_deterministic_from_seed():
    a = S.sample(np.random.default_rng(7), 32)
    b = S.sample(np.random.default_rng(7), 32)
    c = S.sample(np.random.default_rng(8), 32)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(a[0], c[0]) and a[1] != c[1]
    scene = a[2][0]
    assert np.array_equal(S.render(scene, np.random.default_rng(3)), S.render(scene, np.random.default_rng(3)))


def _check_placement(scenes, half, centres, gap):
    regions = S._regions(scenes, 64)
    for scene, h, slots, (x0, x1, y0, y1) in zip(scenes, half, centres, regions):
        c = slots[: scene.count]
        assert not np.isnan(c).any() and np.isnan(slots[scene.count :]).all()
        box_y = c[:, 1] - (h / 3 if scene.shape == "triangle" else 0)  # bounding-box centres
        assert (c[:, 0] >= x0).all() and (c[:, 0] <= x1).all() and (c[:, 1] >= y0).all() and (c[:, 1] <= y1).all()
        assert (c[:, 0] - h >= 1 - 1e-9).all() and (c[:, 0] + h <= 63 + 1e-9).all() and (box_y - h >= 1 - 1e-9).all()
        assert (box_y + h <= 63 + 1e-9).all()
        for i in range(scene.count):
            for j in range(i):
                assert max(abs(c[i, 0] - c[j, 0]), abs(c[i, 1] - c[j, 1])) >= 2 * h + gap - 1e-9
    assert half.min() > 2.5


def test_placement_and_rendering():
    rng = np.random.default_rng(0)
    scenes = S.draw_scenes(rng, 3000) + S.draw_scenes(rng, 1000, split="heldout")
    half, centres = S._place(scenes, rng, 64)
    _check_placement(scenes, half, centres, S.GAP)
    print("\nhalf-size percentiles 0/5/50/95/100 by count: " + ", ".join(
        f"{k}: {np.percentile([h for s, h in zip(scenes, half) if s.count == k], [0, 5, 50, 95, 100]).round(1)}"
        for k in S.COUNTS))
    # a wider gap (train --gap) keeps objects that far apart; the default is GAP, drawn exactly as before
    few = scenes[:600]
    half, centres = S._place(few, np.random.default_rng(1), 64, gap=5.0)
    _check_placement(few, half, centres, 5.0)
    default, three = (S.render_many(few[:64], np.random.default_rng(2), gap=g) for g in (None, S.GAP))
    assert np.array_equal(default, three)

    # coverage: anti-aliased edges, and areas as the shapes' formulas say (square 4h^2, circle pi h^2, triangle 2h^2)
    for shape, area in (("square", 4), ("circle", np.pi), ("triangle", 2)):
        hs = np.linspace(4, 12, 9)
        one = np.stack([rng.integers(20, 44, (9, 2)) + 0.3, *[np.full((9, 2), np.nan)] * 2], axis=1)  # off-grid
        cover = S._coverage(shape, hs, one, 64)
        np.testing.assert_allclose(cover.sum((1, 2)), area * hs**2, rtol=0.01)
        assert ((cover > 0.05) & (cover < 0.95)).any(axis=(1, 2)).all()
    image = S.render(S.Scene("red", "circle", 1, None, "blue"), rng)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert len({tuple(p) for p in image.reshape(-1, 3)}) > 2  # edge pixels blend
    assert S.render(S.Scene("red", "circle", 1, None, "blue"), rng, size=32).shape == (32, 32, 3)


def test_classifier_on_ground_truth(both_splits):
    images, scenes = both_splits
    acc = _accuracy(images, scenes)
    print(f"\nclassifier accuracy, {len(scenes)} clean renders (train + held-out): {acc}")
    assert set(acc) == {"colour", "shape", "count", "background", "position"}
    assert min(acc.values()) >= 0.99
    # other image sizes
    images, _, scenes = S.sample(np.random.default_rng(3), 100, size=32)
    assert min(_accuracy(images, scenes).values()) >= 0.99


def test_classifier_on_degraded_renders(both_splits):
    images, scenes = both_splits
    acc = _accuracy(images, scenes, degrade=_blur_and_noise)
    print(f"\nclassifier accuracy after a 3x3 box blur and noise sigma 8: {acc}")
    assert min(acc.values()) >= 0.95


def test_classify_empty_and_score():
    blank = np.zeros((64, 64, 3), np.uint8) + np.uint8(S.PALETTE["green"])
    assert S.classify(blank) == dict(background="green", colour=None, shape=None, count=0, position=None)
    attrs = dict(background="black", colour="red", shape="circle", count=2, position=("top", "left"))
    assert S.score(S.parse("two red circles in the top left on a black background"), attrs) == dict(
        colour=True, shape=True, count=True, background=True, position=True)
    assert S.score(S.parse("a red circle"), attrs) == dict(colour=True, shape=True, count=False)
    assert S.score(S.parse("two blue squares at the top"), attrs) == dict(
        colour=False, shape=False, count=True, position=True)
    assert S.score(S.parse("two red circles on the left on a white background"), attrs)["position"]
    assert not S.score(S.parse("two red circles on the right on a white background"), attrs)["background"]
    for prompt, cell, ok in (("a red circle in the centre", ("middle", "centre"), True),
                             ("a red circle in the centre", ("top", "centre"), False),
                             ("a red circle at the top", ("top", "right"), True),
                             ("a red circle at the bottom", ("middle", "centre"), False),
                             ("a red circle in the bottom right", ("bottom", "right"), True),
                             ("a red circle in the bottom right", ("bottom", "centre"), False)):
        assert S.score(S.parse(prompt), dict(attrs, position=cell))["position"] is ok, (prompt, cell)
    assert S.score(S.parse("a red circle on the left"), dict(attrs, count=0, position=None))["position"] is False
