"""The prompt bank: stable unique ids, the categories the tour compares on, and a built-in bank in the built-in
model's own grammar."""

import pytest

import helpers  # noqa: F401
from mlx_diffusion.errors import InputError
from mlx_diffusion.tiny import synthetic
from mlx_diffusion.tour import prompts as P


def test_banks_have_unique_ids_and_the_categories():
    for name in P.BANKS:
        ids = [p.id for p in P.bank(name)]
        assert len(ids) == len(set(ids)) and all(p.text.strip() == p.text and p.text for p in P.bank(name))
    assert {"text", "photo", "composition", "counting", "style", "portrait", "landscape", "detail"} <= set(
        P.categories("real"))
    assert len(P.bank("real")) >= 30
    assert P.get("text-1").category == "text" and P.get("scene-2", "builtin").text == "a red circle on a blue background"


def test_builtin_bank_speaks_the_builtin_grammar():
    for p in P.bank("builtin"):
        spec = synthetic.parse(p.text)
        assert spec.colour in synthetic.COLOURS and spec.shape in synthetic.SHAPES, p
    assert P.bank_for({"variant": "tiny"}) == "builtin" and P.bank_for({"variant": "schnell"}) == "real"
    assert [p.category for p in P.showcase("real")] == P.categories("real")


def test_bank_errors():
    with pytest.raises(InputError, match="unknown prompt bank 'x'"):
        P.bank("x")
    with pytest.raises(InputError, match="has no category 'nope' .*known: text"):
        P.bank("real", "nope")
    with pytest.raises(InputError, match="no prompt with id"):
        P.get("text-999")


def test_select(tmp_path):
    assert P.select(["a", "b"]) == ["a", "b"]
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    assert P.select(file=tmp_path / "p.txt") == ["one", "two"]
    assert P.select(info={"variant": "tiny"}) == [p.text for p in P.showcase("builtin")]
    assert P.select(bank_name="real", category="counting", limit=2) == [p.text for p in P.bank("real", "counting")][:2]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="no prompts in"):
        P.select(file=tmp_path / "empty.txt")
