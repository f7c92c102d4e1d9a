"""Config dataclasses are read from the reference's config.json: this is the one way they are read.

Unknown keys are ignored (reference configs carry many we do not need), nulls fall back to our defaults (e.g. a
VAE's `shift_factor: null` means 0), and JSON lists become tuples so configs stay hashable and comparable. Every value
is checked against its field's type here, so a malformed file is a ValueError naming the key, never a failure deep
inside a model (or a model of absurd size: integers are bounded).
"""

from __future__ import annotations

import math
from dataclasses import fields

MAX_INT = 1 << 24  # no size or id in a config is near this; 2^40 channels would be an attack
MAX_LAYERS = 512  # counts of layers and blocks (FLUX has 57, T5-XXL 24): each is Python objects made one by one
MAX_ITEMS = 64


def _check(name: str, kind: str, v):
    """v if it is a valid value of annotation `kind` ("int", "float | None", "tuple", ...), else ValueError."""
    kind = kind.replace(" | None", "")
    if kind == "bool":
        ok = isinstance(v, bool)
    elif kind == "int":
        bound = MAX_LAYERS if "layers" in name or "blocks" in name else MAX_INT
        ok = isinstance(v, int) and not isinstance(v, bool) and abs(v) <= bound
    elif kind == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    elif kind == "str":
        ok = isinstance(v, str)
    elif kind.startswith("tuple"):  # "tuple", "tuple[int, ...]", "tuple[str, ...]"
        item = kind[6:].split(",")[0] if "[" in kind else None
        ok = isinstance(v, (list, tuple)) and len(v) <= MAX_ITEMS and all(
            (isinstance(x, str) and item in (None, "str"))
            or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= MAX_INT
                and item in (None, "int", "float") and (item != "int" or isinstance(x, int))) for x in v)
        v = tuple(v) if ok else v
        kind = "tuple"
    else:
        ok = True
    if not ok:
        what = {"bool": "true or false", "int": f"an integer from -{bound} to {bound}" if kind == "int" else "",
                "float": "a float (finite)", "str": "a string", "tuple": f"a list of at most {MAX_ITEMS} numbers/strings"}
        raise ValueError(f"{name} must be {what[kind]}, got {str(v)[:40]!r}")
    return v


def config_kwargs(cls, d: dict) -> dict:
    """The keyword arguments of dataclass `cls` that `d` sets, each checked against its field's type."""
    kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(cls)}
    return {k: _check(k, kinds[k], v) for k, v in d.items() if k in kinds and v is not None}


class FromDict:
    """Mixin for config dataclasses: `Config.from_dict(config_json_dict)`."""

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**config_kwargs(cls, d))
