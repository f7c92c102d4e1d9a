"""Config dataclasses are read from the reference's config.json: this is the one way they are read.

Unknown keys are ignored (reference configs carry many we do not need), nulls fall back to our defaults (e.g. a
VAE's `shift_factor: null` means 0), and JSON lists become tuples so configs stay hashable and comparable.
"""

from __future__ import annotations

from dataclasses import fields


def config_kwargs(cls, d: dict) -> dict:
    """The keyword arguments of dataclass `cls` that `d` sets."""
    names = {f.name for f in fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names and v is not None}


class FromDict:
    """Mixin for config dataclasses: `Config.from_dict(config_json_dict)`."""

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**config_kwargs(cls, d))
