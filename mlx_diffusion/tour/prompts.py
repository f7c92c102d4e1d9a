"""A curated prompt bank: prompts by category, each with a stable id, for comparing and profiling models.

Two banks: `real` for FLUX.1 and SD3 (what such models are judged on: text rendering, photorealism, composition and
spatial relations, counting, art styles, portraits, landscapes, fine detail, hands and anatomy, lighting), and
`builtin` for the built-in model, written in the only grammar it understands (its training captions: one to three
circles, squares or triangles, eight colours, nine places, a background). `bank_for(info)` picks the bank a model
folder's info file calls for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


def _bank(category_prompts: dict) -> tuple:
    return tuple(Prompt(f"{category}-{i + 1}", category, text) for category, texts in category_prompts.items()
                 for i, text in enumerate(texts))


REAL = _bank({
    "text": [
        'a neon sign that reads "OPEN ALL NIGHT" above a diner door, rain on the window',
        'a hand-painted wooden sign on a beach that says "NO SWIMMING TODAY", sunset light',
        'a chalkboard menu in a cafe listing "COFFEE 3", "TEA 2" and "CAKE 4" in white chalk',
        'the cover of a paperback novel titled "The Last Lighthouse", minimalist design',
        'a birthday cake with "HAPPY 30TH MAYA" written in blue icing',
    ],
    "photo": [
        "a close-up photograph of a red fox in fresh snow, golden hour, 85mm lens, shallow depth of field",
        "a street photograph of a rainy Tokyo crossing at night, reflections of neon lights on wet asphalt",
        "a product photo of a glass perfume bottle on black marble, soft studio lighting",
        "an aerial photograph of a winding river through an autumn forest",
        "a photograph of a steaming bowl of ramen on a wooden table, overhead shot",
    ],
    "composition": [
        "a red cube on top of a blue sphere, next to a green cone, on a white table",
        "a cat sitting to the left of a dog, both looking at a ball in front of them",
        "a small yellow boat in the bottom right corner of a huge empty grey sea",
        "a bicycle leaning against a brick wall, with a potted plant on its right",
        "a teacup inside a bird cage, the cage hanging from a tree branch",
    ],
    "counting": [
        "three red apples and two green pears on a plate",
        "exactly five birds sitting on a power line against a blue sky",
        "four candles on a table, the second one from the left unlit",
        "two children and one dog walking on a beach",
    ],
    "style": [
        "a lighthouse on a cliff in a stormy sea, watercolour painting",
        "a fox in a forest, ukiyo-e woodblock print",
        "a city skyline at dusk, in the style of an art deco travel poster",
        "a portrait of an astronaut, oil painting with thick impasto brush strokes",
        "a cozy reading nook, isometric pixel art",
    ],
    "portrait": [
        "a portrait of an elderly fisherman with a white beard, weathered skin, natural window light",
        "a portrait of a young woman with freckles and curly red hair, looking over her shoulder",
        "a studio portrait of a smiling chef in a white uniform, holding a whisk",
    ],
    "landscape": [
        "a misty mountain valley at sunrise with a lake reflecting the peaks",
        "a desert with tall sand dunes under a starry night sky, the milky way overhead",
        "a lavender field in Provence with a single tree, late afternoon",
        "a frozen waterfall in a pine forest in winter",
    ],
    "detail": [
        "a macro photograph of a dew-covered spider web at dawn",
        "an intricate mechanical pocket watch, opened, showing its gears",
        "a close-up of a hummingbird feeding from a red flower, every feather visible",
        "an ornate gothic cathedral rose window from the inside, sunlight through stained glass",
    ],
    "anatomy": [
        "a pianist's hands on the keys of a grand piano, close-up",
        "a dancer mid-leap in a sunlit studio, full body",
        "two people shaking hands across a desk",
    ],
    "lighting": [
        "a candle-lit medieval tavern interior with wooden beams",
        "a forest path with god rays through the fog",
        "a silhouette of a hiker on a ridge against an orange sunset",
    ],
})

BUILTIN = _bank({
    "colour": ["a red circle", "a green square", "a blue triangle", "a yellow circle", "a purple square",
               "an orange triangle", "a white circle on a black background", "a black square on a white background"],
    "shape": ["a red square", "a red triangle", "a blue circle", "a blue square"],
    "count": ["two green squares", "three yellow triangles", "two blue circles", "three red squares"],
    "position": ["a red circle at the top", "a blue square on the left", "a green triangle in the bottom right",
                 "an orange circle in the centre", "two yellow circles at the bottom",
                 "three purple triangles on the right"],
    "scene": ["two green squares at the top", "a red circle on a blue background",
              "three yellow triangles in the bottom left on a black background",
              "two yellow circles in the bottom right on a black background", "a white circle on the right"],
})

BANKS = {"real": REAL, "builtin": BUILTIN}


def bank(name: str = "real", category: str | None = None) -> list[Prompt]:
    """The prompts of a bank, or of one of its categories; InputError naming what exists."""
    if name not in BANKS:
        raise InputError(f"unknown prompt bank {name!r} (known: {', '.join(BANKS)})")
    prompts = list(BANKS[name])
    if category is not None:
        prompts = [p for p in prompts if p.category == category]
        if not prompts:
            raise InputError(f"bank {name!r} has no category {category!r} (known: {', '.join(categories(name))})")
    return prompts


def categories(name: str = "real") -> list[str]:
    return list(dict.fromkeys(p.category for p in BANKS[name]))


def get(prompt_id: str, name: str | None = None) -> Prompt:
    """A prompt by id (e.g. "text-1"), from one bank or the first that has it."""
    for bank_name in [name] if name else list(BANKS):
        for p in bank(bank_name):
            if p.id == prompt_id:
                return p
    raise InputError(f"no prompt with id {prompt_id!r}")


def showcase(name: str) -> list[Prompt]:
    """A short selection: the built-in bank's whole scenes, the real bank's first prompt of each category."""
    if name == "builtin":
        return bank(name, "scene")
    return [next(p for p in bank(name) if p.category == c) for c in categories(name)]


def bank_for(info: dict) -> str:
    """The bank that suits a model folder (its info file): the built-in model understands only its own captions."""
    return "builtin" if info.get("variant") == "tiny" else "real"


def read_file(path) -> list[str]:
    """A prompt file: one prompt a line; blank lines and lines starting with # are skipped. InputError if unreadable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} ({e.__class__.__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def select(texts=(), file=None, bank_name: str | None = None, category: str | None = None, info: dict | None = None,
           limit: int | None = None) -> list[str]:
    """The prompts a command was given: `texts`, else a file's lines, else a bank (or one of its categories), else a
    short selection from the bank that suits the model (`info`: its folder's info file). InputError when none."""
    if texts:
        chosen = list(texts)
    elif file is not None:
        chosen = read_file(file)
    else:
        name = bank_name or bank_for(info or {})
        chosen = [p.text for p in (bank(name, category) if (bank_name or category) else showcase(name))]
    chosen = chosen[:limit]
    if not chosen:
        raise InputError(f"no prompts{f' in {file}' if file is not None else ''}")
    return chosen
