"""Fuzzed readers: every file a user may download or hand us (safetensors and GGUF weights, the JSON of model
folders, tokenizer files), malformed at random, either reads or ends in the package's own error with one line; none
allocates more than the file could hold or runs for more than a moment.

Hypothesis draws structured headers (lengths, offsets, counts, types, shapes, with huge and negative values) and
mutates valid files byte by byte. Derandomized with a bounded number of examples, so CI runs the same cases in
bounded time; `HYPOTHESIS_PROFILE=long` runs many more.
"""

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers  # noqa: F401
from mlx_diffusion.errors import Error
from mlx_diffusion.io.images import MAX_PIXELS
from mlx_diffusion.io.gguf import GGUFFile
from mlx_diffusion.io.safetensors import SafetensorsFile
from mlx_diffusion.models import KINDS, kind_of
from mlx_diffusion.pipelines import check_model_folder, read_scheduler_config
from mlx_diffusion.pipelines.tokenizers import CLIPTokenizer, T5Tokenizer

settings.register_profile("ci", max_examples=120, deadline=5000, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=5000,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
HUGE = st.sampled_from([2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**64 - 1])
INTS = st.one_of(st.integers(0, 70), st.integers(-3, -1), HUGE)


def opened_within_bounds(open_and_read, path: Path, factor: float = 2.0, limit: int | None = None):
    """Run `open_and_read(path)`: either it works or it raises our Error with a one-line message; in both cases the
    peak Python/numpy allocation stays within `factor` x the file's size (+ 1 MB of bookkeeping), or `limit`."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        open_and_read(path)
    except Error as e:
        assert "\n" not in str(e) and str(e), repr(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    bound = factor * size + (1 << 20) if limit is None else limit
    assert peak <= bound, f"{peak} bytes allocated reading a {size}-byte file"


# ---------------------------------------------------------------------------------------------------------------
# safetensors

DTYPES = st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "Q4", "", None, 3, ["F32"]])
SHAPES = st.one_of(st.lists(INTS, max_size=4), st.lists(st.sampled_from([True, 1.5, "2", None]), max_size=2),
                   st.just("3x3"), st.none())
OFFSETS = st.one_of(st.tuples(INTS, INTS).map(list), st.lists(INTS, max_size=3), st.just("0-4"), st.none())
ENTRY = st.one_of(st.fixed_dictionaries({"dtype": DTYPES, "shape": SHAPES, "data_offsets": OFFSETS}),
                  st.sampled_from([None, 1, "x", [], {}]))
HEADER = st.one_of(
    st.dictionaries(st.text(max_size=8), ENTRY, max_size=4),
    st.dictionaries(st.just("__metadata__"), st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4)),
                                                       st.sampled_from([None, 1, [], {"a": 1}]))),
    st.sampled_from([[], 1, "x", None]),
)


def read_safetensors(path):
    f = SafetensorsFile(path)
    for name in f.keys():
        f.get(name)


@settings(settings.get_profile(PROFILE))
@given(header=HEADER, data=st.binary(max_size=300), length=st.one_of(st.none(), INTS))
def test_safetensors_headers(tmp_path, header, data, length):
    blob = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length % 2**64) + blob + data)
    opened_within_bounds(read_safetensors, path)


def _valid_safetensors(path):
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
              "__metadata__": {"format": "pt"}}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(range(32)))
    return path.read_bytes()


MUTATIONS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])),
                     min_size=1, max_size=4)


def mutated(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for pos, value, how in mutations:
        pos %= max(1, len(b))
        if how == "set" and b:
            b[pos] = value
        elif how == "cut":
            del b[pos:]
        else:
            b[pos:pos] = bytes([value]) * (1 + value % 9)
    return bytes(b)


@settings(settings.get_profile(PROFILE))
@given(mutations=MUTATIONS)
def test_safetensors_byte_mutations(tmp_path, mutations):
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutated(_valid_safetensors(path), mutations))
    opened_within_bounds(read_safetensors, path)


def test_a_header_claiming_exabytes_is_refused_before_any_allocation(tmp_path):
    for shape, offsets in (([2**31, 2**31], [0, 2**64]), ([2**62], [0, 2**62 * 4]), ([1], [0, 2**60])):
        blob = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
        path = tmp_path / "big.safetensors"
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
        opened_within_bounds(read_safetensors, path)
        with pytest.raises(Error, match="truncated|does not match"):
            SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def _gguf_string(s: bytes, length=None) -> bytes:
    return struct.pack("<Q", len(s) if length is None else length) + s


KV_VALUES = st.one_of(
    st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]), st.binary(min_size=0, max_size=8)),
    st.tuples(st.just(8), st.binary(max_size=12).map(_gguf_string)),
    st.tuples(st.just(8), st.tuples(st.binary(max_size=4), HUGE).map(lambda t: _gguf_string(*t))),
    st.tuples(st.just(9), st.tuples(st.sampled_from([0, 4, 8, 9, 13, 99]), st.one_of(st.integers(0, 5), HUGE),
                                    st.binary(max_size=24))
              .map(lambda t: struct.pack("<IQ", t[0], t[1]) + t[2])),
    st.tuples(st.integers(13, 2**32 - 1), st.binary(max_size=8)),
)
TENSOR_INFOS = st.lists(st.tuples(
    st.binary(max_size=6),
    st.one_of(st.integers(0, 4), st.just(2**32 - 1)),
    st.lists(st.one_of(st.sampled_from([1, 2, 32, 64, 256]), HUGE, st.just(0)), max_size=4),
    st.one_of(st.sampled_from([0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30]), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from([0, 32, 64, 7]), HUGE),
), max_size=3)


def read_gguf(path):
    f = GGUFFile(path)
    for name in f.keys():
        f.get(name)
        f.repack(name)


@settings(settings.get_profile(PROFILE))
@given(version=st.sampled_from([1, 2, 3, 3 << 24, 99]), kvs=st.lists(st.tuples(st.binary(max_size=5), KV_VALUES),
                                                                      max_size=4),
       kv_count=st.one_of(st.none(), HUGE), tensors=TENSOR_INFOS, tensor_count=st.one_of(st.none(), HUGE),
       alignment=st.one_of(st.none(), st.sampled_from([1, 3, 32, 2**20, 0])), data=st.binary(max_size=2048))
def test_gguf_headers(tmp_path, version, kvs, kv_count, tensors, tensor_count, alignment, data):
    if alignment is not None:
        kvs = kvs + [(b"general.alignment", (4, struct.pack("<I", alignment)))]
    body = b"".join(_gguf_string(k) + struct.pack("<I", t) + v for k, (t, v) in kvs)
    for name, n_dims, dims, type_id, offset in tensors:
        body += _gguf_string(name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", type_id, offset % 2**64)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(head + body + b"\0" * (-len(head + body) % 32) + data)
    opened_within_bounds(read_gguf, path, factor=16)  # a 2-bit block decodes to 12x its bytes as float32


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    w = gguf.GGUFWriter(path, "flux")
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.list", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.normal(size=(2, 32)).astype(np.float32))
    w.add_tensor("q8", rng.integers(0, 255, size=(2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q4k", rng.integers(0, 255, size=(1, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@settings(settings.get_profile(PROFILE))
@given(mutations=MUTATIONS)
def test_gguf_byte_mutations(tmp_path, valid_gguf, mutations):
    path = tmp_path / "m.gguf"
    path.write_bytes(mutated(valid_gguf, mutations))
    opened_within_bounds(read_gguf, path, factor=16)


def test_gguf_valid_file_reads(tmp_path, valid_gguf):
    path = tmp_path / "v.gguf"
    path.write_bytes(valid_gguf)
    f = GGUFFile(path)
    assert f.metadata["general.name"] == "tiny" and f.metadata["tokenizer.list"] == [1, 2, 3]
    assert {n: f.shape(n) for n in f.keys()} == {"f32": (2, 32), "q8": (2, 32), "q4k": (1, 256)}


def test_gguf_claiming_2_to_the_60_metadata_elements_fails_at_once(tmp_path):
    path = tmp_path / "huge.gguf"
    body = _gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**60)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + b"\0" * 64)
    with pytest.raises(Error, match="more than the file holds"):
        GGUFFile(path)


# ---------------------------------------------------------------------------------------------------------------
# JSON of model folders: component configs, the scheduler, mlx_diffusion.json, model_index.json

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 70), HUGE, st.floats(allow_nan=False) | st.just(1e308),
              st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def _field_names(kind):
    from dataclasses import fields

    return [f.name for f in fields(kind.config)]


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_component_configs(data):
    kind = data.draw(st.sampled_from(sorted(KINDS.values(), key=lambda k: k.name)))
    names = _field_names(kind) + ["_class_name", "architectures"]
    config = {"_class_name": kind.name} if kind.name[0] != "T" and "CLIP" not in kind.name else \
        {"architectures": [kind.name]}
    config.update(data.draw(st.dictionaries(st.sampled_from(names), JSON, max_size=4)))
    try:
        kind_of(config, "fuzz").build(config, "fuzz")
    except Error as e:
        assert "\n" not in str(e)


@settings(settings.get_profile(PROFILE))
@given(text=st.one_of(JSON.map(json.dumps), st.text(max_size=30), st.just('{"a": ' * 5000)))
def test_scheduler_config(tmp_path, text):
    (tmp_path / "scheduler").mkdir(exist_ok=True)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(text)
    try:
        read_scheduler_config(tmp_path)
    except Error as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The built-in model's folder, copied (its configs are what a converted folder holds)."""
    from mlx_diffusion.pipelines import BUILTIN_MODEL

    dest = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(BUILTIN_MODEL, dest)
    return dest


@settings(settings.get_profile(PROFILE))
@given(which=st.sampled_from(["mlx_diffusion.json", "model_index.json", "transformer/config.json",
                              "vae/config.json", "text_encoder/config.json"]),
       change=st.one_of(JSON.map(json.dumps), st.text(max_size=20)), key=st.one_of(st.none(), st.text(max_size=12)))
def test_model_folder_files(model_folder, which, change, key):
    path = model_folder / which
    original = path.read_text() if path.exists() else None
    try:
        if key is not None and original is not None:  # one key of the real file changed
            data = json.loads(original)
            data[data and key not in data and sorted(data)[len(key) % len(data)] or key] = json.loads(change) \
                if change[:1] in "[{\"0123456789-tfn" and _is_json(change) else change
            path.write_text(json.dumps(data))
        else:
            path.write_text(change)
        try:
            check_model_folder(model_folder)
        except Error as e:
            assert "\n" not in str(e)
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(original)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# tokenizer files

TOKENIZERS = {"clip": (CLIPTokenizer, ["vocab.json", "merges.txt", "tokenizer_config.json"]),
              "t5": (T5Tokenizer, ["spiece.model", "tokenizer_config.json"])}


@pytest.fixture(scope="module")
def tokenizer_sources():
    return {name: {f: (ASSETS / "tokenizers" / name / f).read_bytes() for f in files
                   if (ASSETS / "tokenizers" / name / f).exists()}
            for name, (_, files) in TOKENIZERS.items()}


@settings(settings.get_profile(PROFILE), max_examples=60)
@given(which=st.sampled_from(sorted(TOKENIZERS)), data=st.data())
def test_tokenizer_files(tmp_path, tokenizer_sources, which, data):
    cls, _ = TOKENIZERS[which]
    files = tokenizer_sources[which]
    name = data.draw(st.sampled_from(sorted(files)))
    folder = tmp_path / which
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for f, content in files.items():
        (folder / f).write_bytes(content)
    small = files[name][:4096] if name != "spiece.model" else files[name]
    (folder / name).write_bytes(mutated(small, data.draw(MUTATIONS)))
    try:
        tok = cls.from_folder(folder)
        tok(["a red fox, 雪", ""], max_length=16)
    except Error as e:
        assert "\n" not in str(e)


@settings(settings.get_profile(PROFILE), max_examples=60)
@given(which=st.sampled_from(["clip", "t5"]), backend=st.one_of(
    JSON, st.fixed_dictionaries({"model": st.one_of(JSON, st.fixed_dictionaries(
        {"type": st.sampled_from(["BPE", "Unigram", "WordPiece", 3]), "vocab": JSON, "merges": JSON}))}),
    st.fixed_dictionaries({"model": st.fixed_dictionaries({"type": st.just("Unigram"), "vocab": st.lists(
        st.one_of(st.tuples(st.text(max_size=3), st.floats(allow_nan=True)).map(list), JSON), max_size=6)}),
        "normalizer": JSON, "added_tokens": JSON})))
def test_tokenizer_json_structures(tmp_path, which, backend):
    folder = tmp_path / which
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    try:
        TOKENIZERS[which][0].from_folder(folder)(["a red fox"], max_length=8)
    except Error as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------------------------
# an image's metadata (`--from-metadata`, `Pipeline.replay`)


@settings(settings.get_profile(PROFILE))
@given(fields=st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "seed", "steps", "guidance", "width", "height", "strength", "lora",
                                     "unused", "model", "init_image", "use_t5", "negative_prompt", "x"]), JSON),
    JSON), flat=st.booleans(), batch=st.one_of(st.none(), JSON, JSON.map(json.dumps)))
def test_recorded_settings(fields, flat, batch):
    from mlx_diffusion.pipelines.settings import GenerationSettings, batch_position

    data = {"mlx_diffusion.settings": json.dumps(fields)} if flat else {"settings": fields}
    if batch is not None:
        data["batch"] = batch
    try:
        GenerationSettings.from_metadata(data)
        batch_position(data)
    except Error as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def png_with_metadata(tmp_path_factory):
    from mlx_diffusion.io.images import write_image

    path = tmp_path_factory.mktemp("png") / "a.png"
    from PIL import Image

    write_image(Image.new("RGB", (8, 8)), path, {"prompt": "a fox", "mlx_diffusion.settings": '{"seed": 1}'})
    return path.read_bytes()


@settings(settings.get_profile(PROFILE))
@given(mutations=MUTATIONS, suffix=st.sampled_from([".png", ".jpg", ".webp", ".json"]))
def test_image_metadata_files(tmp_path, png_with_metadata, mutations, suffix):
    from mlx_diffusion.io.images import read_image, read_metadata

    path = tmp_path / f"m{suffix}"
    path.write_bytes(mutated(png_with_metadata, mutations))

    def read(p):
        read_metadata(p)
        if suffix != ".json":
            read_image(p)

    # compressed pixels may decode to far more than the file: the bound is the largest image read_image accepts
    opened_within_bounds(read, path, limit=4 * MAX_PIXELS + (1 << 20))


@settings(settings.get_profile(PROFILE), max_examples=25)
@given(which=st.sampled_from(["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
                              "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json"]),
       key=st.text(max_size=12), value=JSON)
def test_diffusers_folder_json_read_by_the_converter(flux_schnell, tmp_path_factory, which, key, value):
    """A diffusers folder (what the converter reads) with one key of one JSON file changed: converted, or refused
    with one line, never a traceback."""
    from mlx_diffusion.convert import convert

    root = tmp_path_factory.mktemp("src")
    src = shutil.copytree(flux_schnell[1], root / "src")
    path = src / which
    data = json.loads(path.read_text())
    data[sorted(data)[len(key) % len(data)] if key[:1] in "abc" and data else key] = value
    path.write_text(json.dumps(data))
    try:
        convert(src, root / "out", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    except Error as e:
        assert "\n" not in str(e)
