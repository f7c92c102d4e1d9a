"""Our CLIP and T5 tokenizers against transformers 5's, loaded from the same real vocabularies (tests/assets).

Ids must be identical: padded/truncated batches as the pipelines request them (CLIP 77, T5 256 and 512), the
unpadded `encode`, truncation warnings, pad token "!" (SD3's CLIP-G) and SD3-style added-token flags; and from every
folder layout: tokenizer.json only (what transformers 5 saves), vocab.json + merges.txt (the CLIP asset),
spiece.model only, both (the T5 asset: tokenizer.json wins), and unusable folders (WeightsError).
"""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
from helpers import CLIP_TOKENIZER, T5_TOKENIZER

from mlx_diffusion.pipelines.tokenizers import CLIPTokenizer, T5Tokenizer
from mlx_diffusion.errors import WeightsError

transformers = pytest.importorskip("transformers")

LONG = (
    "A breathtaking ultra-detailed matte painting of an ancient floating city above a misty valley at golden hour, "
    "with waterfalls spilling off marble terraces, hanging gardens, airships docked at crystal spires, flocks of "
    "white birds, volumetric light rays, intricate architecture, 8k resolution, trending on artstation, by Greg "
    "Rutkowski and Studio Ghibli, cinematic composition, dramatic clouds, reflections on a calm lake, tiny people "
    "walking on bridges, lanterns glowing softly; "
) * 12

PROMPTS = [
    "a photo of a cat",
    "",
    " ",
    "A PHOTO OF A CAT ON A MAT",
    "Hello, world! How's it going?? (fine) [ok] {x} <y> a/b \\ c | d ... --- ***",
    "1234.5 3x4 1,000,000 0.001 2024-01-31 12:30pm 50% $5.99 #1 @home",
    "π≈3.14159, ½ cup, ① ② ③, x² + y³, 10⁻⁶, ⅓",
    "café naïve résumé Ångström crème brûlée façade",
    "Straße, STRASSE, ß ẞ groß",
    "東京タワーの夜景 写真 高品質",
    "한국어 텍스트 안녕하세요",
    "emoji 🙂👍🏽 👨‍👩‍👧 🇫🇷 ❤️ 🐱‍👤",
    "שלום עולם and مرحبا بالعالم mixed",
    "combining e\u0301 a\u0308\u0301 n\u0303 q\u0307\u0323 and Ｅ\u0301",
    "full width Ｈｅｌｌｏ　Ｗｏｒｌｄ １２３ ！？",
    "ligatures ﬁne ﬂow ﬀ ﬃ Ĳ ǅ",
    "repeated    spaces   between     words",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "   leading and trailing whitespace   ",
    "don't it's we'll they'd I'M YOU'RE she's can't won't o'clock rock'n'roll",
    "<|startoftext|>special<|endoftext|> tokens <|ENDOFTEXT|> <|endoftext|>",
    "</s> <pad> <unk> <extra_id_0> x<extra_id_99>y <extra_id_100> ＜/s＞ ＜extra_id_1＞",
    "Greek ΟΔΟΣ Σ σ ς and Turkish İstanbul ı",
    "sooo cute!!! hmmmm... ggggg lll zzz ooooo",
    "▁ metaspace ▁▁x a▁b",
    "zero\u200bwidth\u200djoiner\ufeffbom nbsp\u00a0here ideographic\u3000space em\u2003space",
    "Ⅻ ㎏ ℃ № ™ ℡ ㈱ ﹏ ･ ｶﾞ",
    "क्षत्रिय नमस्ते देवनागरी ภาษาไทย",
    LONG,
]

VOCAB_WORDS = "photo portrait cat dog castle neon city forest oil painting Tokyo ultra detailed 4K HDR sunset".split()
PUNCT = list(",.;:!?'\"()[]{}<>-_/\\|@#$%^&*~`+=")
UNICODE = list("éèêëàâäôöûüçñßæøåÆØÅœŒ東京大阪猫犬한글ㅎㅏ日本語αβγΔΩжЖщЩשלוםمرحبا١٢٣٤ক্ষ😀🎨🌸👍🏽🇯🇵✨™©®°±×÷…—–“”‘’«»¿¡")
UNICODE += ["\u0301", "\u0308", "\u200d", "\ufe0f", "\u00a0", "\u3000", "ﬁ", "Ｋ", "①", "Ⅸ", "ǅ", "İ", "Σ", "▁"]
SPECIAL = ["<|endoftext|>", "<|startoftext|>", "</s>", "<pad>", "<extra_id_7>", "<unk>"]
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", ", "]


def random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 20)):
            r = rng.random()
            pool = VOCAB_WORDS if r < 0.5 else PUNCT if r < 0.65 else UNICODE if r < 0.95 else SPECIAL
            word = rng.choice(pool)
            if rng.random() < 0.2:
                word = word.upper() if rng.random() < 0.5 else word * rng.randint(2, 4)
            parts += [word, rng.choice(SEPARATORS)]
        prompts.append("".join(parts))
    return prompts


ALL_PROMPTS = PROMPTS + random_prompts(300)


def reference_ids(tokenizer, prompts, max_length):
    # One prompt per call: the Rust batch encoder runs threads and was seen to return a wrong BPE for one word
    # out of 20000 in a large batch (state dependent, not reproducible one at a time).
    rows = [tokenizer(p, padding="max_length", max_length=max_length, truncation=True).input_ids for p in prompts]
    return np.array(rows, dtype=np.int32)


def ours(tokenizer, prompts, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts, max_length=max_length)


@pytest.fixture(scope="module")
def clip():
    return CLIPTokenizer.from_folder(CLIP_TOKENIZER), transformers.AutoTokenizer.from_pretrained(CLIP_TOKENIZER)


@pytest.fixture(scope="module")
def t5():
    return T5Tokenizer.from_folder(T5_TOKENIZER), transformers.AutoTokenizer.from_pretrained(T5_TOKENIZER)


def assert_same(mine, ref, prompts):
    assert mine.shape == ref.shape and mine.dtype == np.int32
    bad = [p for p, a, b in zip(prompts, mine, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]!r}"


def test_clip_matches_transformers(clip):
    mine, ref = clip
    assert_same(ours(mine, ALL_PROMPTS, 77), reference_ids(ref, ALL_PROMPTS, 77), ALL_PROMPTS)


@pytest.mark.parametrize("max_length", [256, 512])
def test_t5_matches_transformers(t5, max_length):
    mine, ref = t5
    assert_same(ours(mine, ALL_PROMPTS, max_length), reference_ids(ref, ALL_PROMPTS, max_length), ALL_PROMPTS)


def test_encode_is_unpadded_untruncated(clip, t5):
    for mine, ref in (clip, t5):
        for prompt in ALL_PROMPTS:
            assert mine.encode(prompt) == ref(prompt).input_ids, prompt
    assert clip[0].encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t5[0].encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712, 1]


@pytest.mark.parametrize("which,max_length", [("clip", 77), ("t5", 256), ("t5", 512)])
def test_truncation_warns_once_per_prompt(clip, t5, which, max_length):
    mine, ref = clip if which == "clip" else t5
    prompts = [LONG, "short", LONG[: len(LONG) // 2], LONG[: len(LONG) // 4]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = mine(prompts, max_length=max_length)
    np.testing.assert_array_equal(ids, reference_ids(ref, prompts, max_length))
    expected = []
    for prompt in prompts:
        full = ref(prompt).input_ids  # [BOS] + tokens + EOS, untruncated
        if len(full) > max_length:
            dropped = full[max_length - 1 : -1]
            text = ref.decode(dropped, clean_up_tokenization_spaces=False).strip()
            head = f"{mine.name} can only handle {max_length} tokens; {len(dropped)} tokens were dropped"
            expected.append(f"{head}: {text!r}")
    assert len(expected) >= 2  # the test must exercise truncation
    assert [str(w.message) for w in caught] == expected
    assert all(w.category is UserWarning for w in caught)


def test_api_defaults(clip, t5, tmp_path):
    ids = clip[0]("a cat")
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert t5[0]("a cat").shape == (1, 512)  # the asset config says 512
    assert t5[0](["a", "b"], max_length=256).shape == (2, 256)
    folder = tmp_path / "t5"
    shutil.copytree(T5_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1e30}))
    assert T5Tokenizer.from_folder(folder)("a cat").shape == (1, 256)


def sd3_clip_g_folder(tmp_path, sd3_style: bool):
    """A copy of the CLIP folder with pad "!" like SD3's tokenizer_2; `sd3_style` also writes the real file's
    added_tokens_decoder (startoftext `normalized`) and a special_tokens_map.json."""
    folder = tmp_path / f"clip_g_{sd3_style}"
    shutil.copytree(CLIP_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "!"
    if sd3_style:
        flags = dict(lstrip=False, rstrip=False, single_word=False, special=True)
        config["added_tokens_decoder"] = {
            "0": {"content": "!", "normalized": False, **flags},
            "49406": {"content": "<|startoftext|>", "normalized": True, **flags},
            "49407": {"content": "<|endoftext|>", "normalized": False, **flags},
        }
        specials = {"bos_token": {"content": "<|startoftext|>", "normalized": True}, "pad_token": "!"}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("sd3_style", [False, True])
def test_clip_pad_bang(tmp_path, sd3_style):
    folder = sd3_clip_g_folder(tmp_path, sd3_style)
    mine, ref = CLIPTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert mine.pad_id == ref.pad_token_id == 0
    prompts = PROMPTS + ["wow!", "wow !! <|STARTOFTEXT|> hi!!!"] + random_prompts(100, seed=1)
    ids = ours(mine, prompts, 77)
    assert_same(ids, reference_ids(ref, prompts, 77), prompts)
    assert ids[0, -1] == 0


# ---------------------------------------------------------------------------------------------------- folder layouts


@pytest.fixture(scope="module")
def saved(clip, t5, tmp_path_factory):
    """Folders written by transformers 5's save_pretrained: tokenizer.json + tokenizer_config.json only."""
    folders = {}
    for which, (_, ref) in (("clip", clip), ("t5", t5)):
        folder = folders[which] = tmp_path_factory.mktemp(f"saved_{which}")
        ref.save_pretrained(folder)
        assert sorted(f.name for f in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return folders


@pytest.mark.parametrize("which,max_length", [("clip", 77), ("t5", 256)])
def test_tokenizer_json_only(saved, which, max_length):
    cls = CLIPTokenizer if which == "clip" else T5Tokenizer
    mine, ref = cls.from_folder(saved[which]), transformers.AutoTokenizer.from_pretrained(saved[which])
    assert_same(ours(mine, ALL_PROMPTS, max_length), reference_ids(ref, ALL_PROMPTS, max_length), ALL_PROMPTS)
    assert [mine.encode(p) for p in PROMPTS] == [ref(p).input_ids for p in PROMPTS]


def test_clip_tokenizer_json_merges_as_strings(saved, tmp_path):
    """Older tokenizer.json files write each merge as "a b" rather than ["a", "b"]."""
    backend = json.loads((saved["clip"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(backend["model"]["merges"][0], list)
    backend["model"]["merges"] = [" ".join(m) for m in backend["model"]["merges"]]
    shutil.copy(saved["clip"] / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
    mine, ref = CLIPTokenizer.from_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompts = PROMPTS + random_prompts(50, seed=2)
    assert_same(ours(mine, prompts, 77), reference_ids(ref, prompts, 77), prompts)


def test_clip_vocab_merges_only_is_the_asset():
    # test_clip_matches_transformers covers the vocab.json + merges.txt path only while the asset has no tokenizer.json
    assert sorted(f.name for f in CLIP_TOKENIZER.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]


@pytest.fixture
def spiece_only(tmp_path):
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(T5_TOKENIZER / name, tmp_path)
    return tmp_path


def test_t5_spiece_only(spiece_only, t5):
    mine = T5Tokenizer.from_folder(spiece_only)
    assert mine.encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712, 1]
    for prompt in ("<extra_id_0> ＜/s＞ <pad>x", "café ﬁne Ｈｅｌｌｏ"):  # sentinels, controls, charsmap
        assert mine.encode(prompt) == t5[1](prompt).input_ids
    # spiece.model's float32 scores break this exact tie the other way than tokenizer.json's float64 ones, in
    # transformers too (see test_t5_spiece_only_matches_transformers): proof that each file is read as it should be
    assert mine.encode("ggggg") == [3, 122, 4102, 4102, 1]
    assert t5[0].encode("ggggg") == t5[1]("ggggg").input_ids == [3, 4102, 4102, 122, 1]


def test_t5_spiece_only_matches_transformers(spiece_only):
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model with protobuf")
    mine, ref = T5Tokenizer.from_folder(spiece_only), transformers.AutoTokenizer.from_pretrained(spiece_only)
    assert_same(ours(mine, ALL_PROMPTS, 256), reference_ids(ref, ALL_PROMPTS, 256), ALL_PROMPTS)


BROKEN = {
    "empty": lambda folder: None,
    "config only": lambda folder: shutil.copy(T5_TOKENIZER / "tokenizer_config.json", folder),
    "vocab without merges": lambda folder: shutil.copy(CLIP_TOKENIZER / "vocab.json", folder),
    "truncated tokenizer.json": lambda folder: (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vo'),
    "tokenizer.json not an object": lambda folder: (folder / "tokenizer.json").write_text("[]"),
    "tokenizer.json without model": lambda folder: (folder / "tokenizer.json").write_text('{"added_tokens": []}'),
    "wrong model type": lambda folder: (folder / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}'),
    "bad unigram vocab": lambda folder: (folder / "tokenizer.json").write_text(
        '{"model": {"type": "Unigram", "vocab": [["a"]], "merges": [["a"]]}}'
    ),
    "bad bpe merges": lambda folder: (folder / "tokenizer.json").write_text(
        '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}}'
    ),
    "bad charsmap": lambda folder: (folder / "tokenizer.json").write_text(
        '{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}, "normalizer": {"type": "Precompiled",'
        ' "precompiled_charsmap": "not base64!"}}'
    ),
    "truncated spiece.model": lambda folder: (folder / "spiece.model").write_bytes(
        (T5_TOKENIZER / "spiece.model").read_bytes()[:1000]
    ),
    "truncated charsmap": lambda folder: (folder / "tokenizer.json").write_text(
        '{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}, "normalizer": {"type": "Sequence", "normalizers":'
        ' [{"type": "Precompiled", "precompiled_charsmap": "ALQCAACEAAAAAACAAQAAgMz8AgC4BQAA"}]}}'
    ),
    "bad tokenizer_config.json": lambda folder: (
        shutil.copy(T5_TOKENIZER / "spiece.model", folder),
        shutil.copy(CLIP_TOKENIZER / "vocab.json", folder),
        shutil.copy(CLIP_TOKENIZER / "merges.txt", folder),
        (folder / "tokenizer_config.json").write_text("{"),
    ),
}


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("cls", [CLIPTokenizer, T5Tokenizer])
def test_unusable_folder_raises_weights_error(tmp_path, cls, case):
    BROKEN[case](tmp_path)
    with pytest.raises(WeightsError) as info:
        cls.from_folder(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "\n" not in message, message
    if case in ("empty", "config only", "vocab without merges"):  # nothing to read: say what was looked for
        assert "tokenizer.json" in message and ("spiece.model" if cls is T5Tokenizer else "merges.txt") in message


def test_missing_folder_raises_weights_error(tmp_path):
    for cls in (CLIPTokenizer, T5Tokenizer):
        with pytest.raises(WeightsError, match="looked for tokenizer.json"):
            cls.from_folder(tmp_path / "nowhere")
