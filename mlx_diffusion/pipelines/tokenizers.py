"""CLIP (byte-level BPE) and T5 (SentencePiece unigram) tokenizers that reproduce transformers 5 without it.

transformers 5 runs both through the Rust `tokenizers` library; the ids depend on details of that pipeline, which
this module follows step by step:

1. special ("added") tokens are cut out of the raw text first; those flagged `normalized` are looked for again
   after normalisation, and the text between them is normalised and tokenized on its own;
2. CLIP: NFC, every run of `\\s` -> one space, per-character lower case (no final-sigma rule), the CLIP split regex,
   then the GPT-2 byte-level regex and byte->unicode map, then BPE with `</w>` ending each word;
3. T5: the SentencePiece `precompiled_charsmap` applied the way `tokenizers` does it (per grapheme cluster, shortest
   match; SentencePiece itself uses longest matches, which differs on e.g. full-width letters with combining marks),
   split on Unicode whitespace, "▁" before every word, then the unigram Viterbi of `tokenizers`, whose vocabulary
   holds the special pieces (`</s>`, `<extra_id_0>`, ...) with score 0, so normalisation can produce them
   (`＜/s＞` -> `</s>`). sentencepiece reads the model; its own encoder breaks score ties differently.

Both load from what a folder holds, as transformers does: `tokenizer.json` when present (saved by transformers 5,
it is the only vocabulary file there; for T5 it also carries the charsmap), else `vocab.json` + `merges.txt` (CLIP)
or `spiece.model` (T5). Missing or malformed files raise `WeightsError` with a one-line message.

Known gaps, all in characters newer than the Unicode data of some part of `tokenizers` 0.23: its Oniguruma knows
Unicode 14 while `regex` is newer (letters/digits assigned since split differently); Rust lower-cases ~55 such
characters that Python 3.11 does not; its NFC tables predate Unicode 10, so it never reorders the 98 combining
marks added since (e.g. U+1183A, U+1AC1-U+1ACE) against other marks.
"""

from __future__ import annotations

import base64
import heapq
import json
import unicodedata
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import regex

from ..errors import WeightsError

# Rust `char::is_whitespace` (Unicode White_Space), which `tokenizers`' WhitespaceSplit uses.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUNS = regex.compile(f"[{_WHITESPACE}]+")
_GRAPHEMES = regex.compile(r"\X")
_HUGE_MAX_LENGTH = 100_000  # transformers writes ~1e30 as "no limit"


@contextmanager
def _reading(path: Path):
    """Turn whatever a missing, truncated or malformed file raises while it is parsed into a one-line WeightsError."""
    try:
        yield
    except WeightsError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"{path}: malformed tokenizer file ({type(e).__name__}: {detail})") from None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with _reading(path):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data


def _backend_model(backend: dict, kind: str) -> dict:
    """tokenizer.json's `model`, checked to be a `kind` model."""
    model = backend["model"]
    if model.get("type", kind) != kind:
        raise ValueError(f"holds a {model['type']} model, not {kind}")
    return model


def _pairs(merges) -> list[tuple[str, str]]:
    merges = [tuple(m) for m in merges]
    if not all(len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str) for m in merges):
        raise ValueError("merges must be pairs of strings")
    return merges


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _alternation(strings) -> regex.Pattern | None:
    """Leftmost-longest matcher for literal strings, like the Aho-Corasick search in `tokenizers`."""
    strings = sorted(set(strings), key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in strings)) if strings else None


def _split(text: str, pattern, ids: dict[str, int]):
    """Yield the text between matches of `pattern` (as str) and the id of each match (as int)."""
    if pattern is None:
        yield text
        return
    start = 0
    for m in pattern.finditer(text):
        yield text[start : m.start()]
        yield ids[m.group()]
        start = m.end()
    yield text[start:]


class _Tokenizer:
    """Added-token handling, truncation with a warning, padding; subclasses normalise and run the model."""

    name = ""
    default_max_length = 77

    def __init__(self, added: dict[str, tuple[int, bool]], bos: int | None, eos: int, pad: int, max_length: int):
        # added: content -> (id, normalized); normalized tokens are matched in normalised text
        self.added_ids = {s: i for s, (i, _) in added.items()}
        self._raw_added = _alternation(s for s, (_, n) in added.items() if not n)
        self._norm_added_ids = {self.normalize(s): i for s, (i, n) in added.items() if n}
        self._norm_added = _alternation(self._norm_added_ids)
        self.bos_id, self.eos_id, self.pad_id = bos, eos, pad
        self.model_max_length = max_length if 0 < max_length <= _HUGE_MAX_LENGTH else self.default_max_length
        self.id_to_token = {i: s for s, i in self.added_ids.items()}

    def normalize(self, text: str) -> str:
        raise NotImplementedError

    def _model(self, normalized: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS."""
        ids = []
        for part in _split(text, self._raw_added, self.added_ids):
            if isinstance(part, int):
                ids.append(part)
                continue
            for sub in _split(self.normalize(part), self._norm_added, self._norm_added_ids):
                ids.extend([sub] if isinstance(sub, int) else self._model(sub))
        return ids

    def _wrap(self, ids: list[int]) -> list[int]:
        return ([] if self.bos_id is None else [self.bos_id]) + ids + [self.eos_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` with BOS/EOS (as transformers' `input_ids` with neither padding nor truncation)."""
        ids = self.tokenize(text)
        return self._wrap(ids) if add_special_tokens else ids

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
        """(B, max_length) int32 ids: BOS + tokens + EOS, truncated (with a warning) and padded to `max_length`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = max_length or self.model_max_length
        room = max_length - len(self._wrap([]))
        out = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)
        for row, prompt in zip(out, prompts):
            ids = self.tokenize(prompt)
            if len(ids) > room:
                dropped = ids[room:]
                warnings.warn(
                    f"{self.name} can only handle {max_length} tokens; {len(dropped)} tokens were dropped: "
                    f"{self._decode(dropped)!r}",
                    UserWarning,
                    stacklevel=2,
                )
                ids = ids[:room]
            ids = self._wrap(ids)
            row[: len(ids)] = ids
        return out


# ---------------------------------------------------------------------------------------------------- CLIP


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + i for i in range(len(extra))])}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_CLIP_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_GPT2_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_SPACES = regex.compile(r"\s+")


def _lower(text: str) -> str:
    # Rust lower-cases char by char; Python's str.lower() turns a word-final "Σ" into "ς".
    return text.lower() if "Σ" not in text else "".join(c.lower() for c in text)


class CLIPTokenizer(_Tokenizer):
    """OpenAI CLIP byte-level BPE, as transformers 5's `CLIPTokenizer` (no ftfy / html unescaping)."""

    name = "CLIP"
    default_max_length = 77

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], config: dict):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}
        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        specials = {k: _content(config.get(k)) or d for k, d in {**defaults, "unk_token": "<|endoftext|>"}.items()}
        added = _added_tokens(config, [*specials.values(), *_extra_special_tokens(config)], vocab)
        super().__init__(
            added,
            added[specials["bos_token"]][0],
            added[specials["eos_token"]][0],
            added[specials["pad_token"]][0],
            config.get("model_max_length", 77),
        )
        self.unk_id = added[specials["unk_token"]][0]
        self.id_to_token.update({i: s for s, i in vocab.items()})

    @classmethod
    def from_folder(cls, path) -> "CLIPTokenizer":
        """From `tokenizer.json` (BPE vocab and merges, added tokens) if the folder has it, else from `vocab.json` +
        `merges.txt`; `tokenizer_config.json` names the special tokens and the maximum length."""
        path = Path(path)
        backend = _read_json(path / "tokenizer.json")
        if (source := path / "tokenizer.json").is_file():
            with _reading(source):
                model = _backend_model(backend, "BPE")
                vocab = {str(token): int(i) for token, i in model["vocab"].items()}
                merges = _pairs(m.split(" ") if isinstance(m, str) else m for m in model["merges"])
        elif (path / "vocab.json").is_file() and (source := path / "merges.txt").is_file():
            with _reading(path / "vocab.json"):
                vocab = {str(token): int(i) for token, i in _read_json(path / "vocab.json").items()}
            with _reading(source):
                lines = source.read_text(encoding="utf-8").splitlines()
                merges = _pairs(line.split() for line in lines if line and not line.startswith("#version"))
        else:
            raise WeightsError(f"{path}: no CLIP tokenizer (looked for tokenizer.json, or vocab.json and merges.txt)")
        with _reading(source):
            return cls(vocab, merges, _config(path, backend))

    def normalize(self, text: str) -> str:
        return _lower(_SPACES.sub(" ", unicodedata.normalize("NFC", text)))

    def _model(self, normalized: str) -> list[int]:
        ids = []
        for piece in _CLIP_WORDS.findall(normalized):
            for word in _GPT2_WORDS.findall(piece):
                ids.extend(self._bpe("".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8"))))
        return ids

    def _bpe(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        parts: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        nxt = [*range(1, len(parts)), -1]
        prv = [*range(-1, len(parts) - 1)]
        # Lowest-ranked pair first, leftmost on ties: the merge queue of `tokenizers`.
        queue = [(r, i) for i, pair in enumerate(zip(parts, parts[1:])) if (r := self.ranks.get(pair)) is not None]
        heapq.heapify(queue)
        while queue:
            rank, i = heapq.heappop(queue)
            j = nxt[i]
            if parts[i] is None or j < 0 or self.ranks.get((parts[i], parts[j])) != rank:
                continue  # stale: one side has merged since
            parts[i], parts[j], nxt[i] = parts[i] + parts[j], None, nxt[j]
            if nxt[i] >= 0:
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b >= 0 and (r := self.ranks.get((parts[a], parts[b]))) is not None:
                    heapq.heappush(queue, (r, a))
        parts = [p for p in parts if p is not None]
        ids = self._cache[word] = [self.vocab.get(p, self.unk_id) for p in parts]
        return ids

    def _decode(self, ids: list[int]) -> str:
        text = "".join(self.id_to_token.get(i, "") for i in ids)
        data = bytes(_CHAR_TO_BYTE.get(c, 32) for c in text.replace("</w>", " "))
        return data.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------------------------------------------- T5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _proto_fields(buf: bytes) -> list[tuple[int, bytes]]:
    """Top-level (field number, raw bytes with tag) of a protobuf message."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = _varint(buf, pos)
        kind = tag & 7
        if kind == 0:
            _, pos = _varint(buf, pos)
        elif kind == 2:
            n, pos = _varint(buf, pos)
            pos += n
        else:
            pos += {1: 8, 5: 4}[kind]
        fields.append((tag >> 3, buf[start:pos]))
    return fields


def _payload(field: bytes) -> bytes:
    """Payload of a length-delimited field (tag and length stripped)."""
    _, pos = _varint(field, 0)
    n, pos = _varint(field, pos)
    return field[pos : pos + n]


def _charsmap(model: bytes) -> bytes:
    """NormalizerSpec.precompiled_charsmap (field 3, then 2) of a serialized SentencePiece ModelProto."""
    spec = next((_payload(f) for n, f in _proto_fields(model) if n == 3), b"")
    return next((_payload(f) for n, f in _proto_fields(spec) if n == 2), b"")


class _Charsmap:
    """SentencePiece `precompiled_charsmap` (a Darts double-array trie + replacement strings), applied as
    `tokenizers`' Precompiled normaliser does: per extended grapheme cluster, replacing a cluster shorter than 6
    bytes by the value of its *shortest* matching prefix, else each character on its own."""

    def __init__(self, blob: bytes):
        size = int.from_bytes(blob[:4], "little")
        if size % 4 or not 4 <= size <= len(blob) - 4:
            raise ValueError("truncated precompiled_charsmap")
        self.trie = np.frombuffer(blob[4 : 4 + size], dtype="<u4").tolist()
        self.strings = blob[4 + size :]
        self._cache: dict[str, str] = {}

    def _shortest(self, key: bytes) -> str | None:
        array = self.trie
        pos = array[0] >> 10 << ((array[0] & 512) >> 6)
        for c in key:
            if c == 0:  # the Rust search stops at NUL
                return None
            pos ^= c
            unit = array[pos]
            if unit & 0x800000FF != c:
                return None
            pos ^= unit >> 10 << ((unit & 512) >> 6)
            if unit >> 8 & 1:
                start = array[pos] & 0x7FFFFFFF
                return self.strings[start : self.strings.index(0, start)].decode("utf-8")
        return None

    def _grapheme(self, g: str) -> str:
        out = self._cache.get(g)
        if out is None:
            out = self._shortest(g.encode("utf-8")) if len(g.encode("utf-8")) < 6 else None
            if out is None:
                out = "".join(c if (r := self._shortest(c.encode("utf-8"))) is None else r for c in g)
            self._cache[g] = out
        return out

    def __call__(self, text: str) -> str:
        return "".join(self._grapheme(g) for g in _GRAPHEMES.findall(text))


class T5Tokenizer(_Tokenizer):
    """T5 SentencePiece unigram, as transformers 5's `T5Tokenizer` (its `tokenizers` backend)."""

    name = "T5"
    default_max_length = 256

    def __init__(
        self,
        pieces: list[tuple[str, float]],
        unk_id: int,
        charsmap: bytes,
        config: dict,
        controls: list[str] = (),
    ):
        """`pieces`: the whole unigram vocabulary with scores, extra ids included (as in tokenizer.json);
        `controls`: spiece.model's control pieces, which transformers matches as added tokens."""
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        defaults = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        specials = {k: _content(config.get(k)) or d for k, d in defaults.items()}
        # transformers' T5Tokenizer makes the extra ids special tokens whatever the config lists
        extra = [f"<extra_id_{i}>" for i in range(config.get("extra_ids", 100))]
        listed = [*specials.values(), *controls, *_extra_special_tokens(config), *extra]
        added = _added_tokens(config, listed, vocab)
        self.charsmap = _Charsmap(charsmap) if charsmap else None
        eos, pad = added[specials["eos_token"]][0], added[specials["pad_token"]][0]
        super().__init__(added, None, eos, pad, config.get("model_max_length", 256))
        self.pieces = {p: (vocab[p], score) for p, score in pieces}
        self.max_piece = max(map(len, self.pieces))
        self.unk_id = unk_id
        self.unk_score = min(score for _, score in pieces) - 10.0
        self.id_to_token.update({i: s for s, i in vocab.items()})
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path) -> "T5Tokenizer":
        """From `tokenizer.json` (unigram vocabulary, normaliser charsmap, added tokens) if the folder has it, else
        from `spiece.model` plus `extra_ids` sentinels, as transformers converts it; `tokenizer_config.json` names
        the special tokens and the maximum length.

        Which file is read matters beyond convenience: tokenizer.json scores are float64 and spiece.model's float32,
        which decides exact ties such as "g" + "gg" + "gg" against "gg" + "gg" + "g", each as transformers does."""
        path = Path(path)
        backend = _read_json(path / "tokenizer.json")
        if (path / "tokenizer.json").is_file():
            with _reading(path / "tokenizer.json"):
                model = _backend_model(backend, "Unigram")
                pieces = [(str(p), float(s)) for p, s in model["vocab"]]
                normalizer = backend.get("normalizer") or {}
                sequence = normalizer.get("type") == "Sequence"
                normalizers = normalizer["normalizers"] if sequence else [normalizer]
                blob = next((n["precompiled_charsmap"] for n in normalizers if n.get("type") == "Precompiled"), "")
                charsmap = base64.b64decode(blob or "", validate=True)
                unk_id = model.get("unk_id")
                return cls(pieces, 2 if unk_id is None else int(unk_id), charsmap, _config(path, backend))
        if not (path / "spiece.model").is_file():
            raise WeightsError(f"{path}: no T5 tokenizer (looked for tokenizer.json or spiece.model)")
        import sentencepiece

        config = _config(path, backend)
        with _reading(path / "spiece.model"):
            model = (path / "spiece.model").read_bytes()
            sp = sentencepiece.SentencePieceProcessor(model_proto=model)
            pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(len(sp))]
            # Sentinels follow the pieces, last first, score 0 like the control pieces, so normalised text can
            # produce them (`＜extra_id_0＞` -> `<extra_id_0>`).
            pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(config.get("extra_ids", 100)))]
            controls = [p for i, (p, _) in enumerate(pieces[: len(sp)]) if sp.is_control(i)]
            return cls(pieces, sp.unk_id(), _charsmap(model), config, controls)

    def normalize(self, text: str) -> str:
        return self.charsmap(text) if self.charsmap else text

    def _model(self, normalized: str) -> list[int]:
        ids = []
        for word in _WHITESPACE_RUNS.split(normalized):
            if word:
                ids.extend(self._word(word))
        return ids

    def _word(self, word: str) -> list[int]:
        """Best unigram segmentation of "▁" + word, ties going to the earliest start as in `tokenizers`
        (sentencepiece breaks them the other way, e.g. "lll" -> "l", "ll" here but "ll", "l" there)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        text = "▁" + word
        n = len(text)
        best: list[tuple[float, int, int] | None] = [(0.0, 0, -1)] + [None] * n  # score, start, id
        for start in range(n):
            base, single = best[start][0], False
            for end in range(start + 1, min(n, start + self.max_piece) + 1):
                hit = self.pieces.get(text[start:end])
                if hit is not None:
                    score = base + hit[1]
                    if best[end] is None or score > best[end][0]:
                        best[end] = (score, start, hit[0])
                    single = single or end == start + 1
            if not single and (best[start + 1] is None or base + self.unk_score > best[start + 1][0]):
                best[start + 1] = (base + self.unk_score, start, self.unk_id)
        ids, end = [], n
        while end > 0:
            _, start, i = best[end]
            if not (i == self.unk_id and ids and ids[-1] == self.unk_id):  # runs of unknowns fuse
                ids.append(i)
            end = start
        ids = self._cache[word] = ids[::-1]
        return ids

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.id_to_token.get(i, "") for i in ids).replace("▁", " ").strip()


# ---------------------------------------------------------------------------------------------------- config


def _config(path: Path, backend: dict) -> dict:
    """tokenizer_config.json; when it has no added_tokens_decoder, special_tokens_map.json fills in and
    tokenizer.json's `added_tokens` (with their flags) become it (transformers' legacy rule; transformers 5 saves
    no added_tokens_decoder)."""
    config = _read_json(path / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config.update(_read_json(path / "special_tokens_map.json"))
        with _reading(path / "tokenizer.json"):
            config["added_tokens_decoder"] = {t["id"]: t for t in backend.get("added_tokens") or []}
    return config


def _extra_special_tokens(config: dict) -> list:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    return list(extra.values()) if isinstance(extra, dict) else list(extra)


def _added_tokens(config: dict, listed: list, vocab: dict[str, int]) -> dict[str, tuple[int, bool]]:
    """content -> (id, normalized) for every special token: the config's added_tokens_decoder (with its flags)
    plus the named special tokens, matched on the raw text; tokens missing from the vocabulary get new ids."""
    decoder = config.get("added_tokens_decoder", {})
    added = {t["content"]: (int(i), bool(t.get("normalized", False))) for i, t in decoder.items()}
    next_id = max([*vocab.values(), *(i for i, _ in added.values()), -1]) + 1
    for token in listed:
        content = _content(token)
        if content is None or content in added:
            continue
        if content not in vocab:
            vocab[content], next_id = next_id, next_id + 1
        added[content] = (vocab[content], isinstance(token, dict) and bool(token.get("normalized", False)))
    return added
