"""What loading leaves in the weights file: large embedding tables stay memory-mapped and are read per lookup
(`models.layers.Embedding.keep_in_file`), and a component's unused half (the VAE's encoder) is not read at all."""

import shutil

import numpy as np
import pytest

import helpers  # noqa: F401
import mlx.core as mx
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io import folder as folder_io
from mlx_diffusion.io.folder import WEIGHTS_FILE, load_component
from mlx_diffusion.io.safetensors import SafetensorsFile, SafetensorsWriter


def _ids(vocab, shape=(2, 19), seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32))


def _rewrite(src, dst, change):
    """A copy of component folder `src` whose tensors pass through `change(name, array)`."""
    shutil.copytree(src, dst)
    f = SafetensorsFile(src / WEIGHTS_FILE)
    w = SafetensorsWriter(dst / WEIGHTS_FILE, f.metadata)
    for name in f.keys():
        w.add(name, change(name, f.get(name)))
    w.close()
    return dst


@pytest.mark.parametrize("component,table", [("text_encoder_3", "shared"),
                                             ("text_encoder_2", "text_model.embeddings.token_embedding")])
@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16"])
def test_tables_in_file_give_the_same_outputs(sd3, component, table, stored, tmp_path, monkeypatch):
    src = sd3[2] / component
    if stored != "float32":
        dt = getattr(mx, stored)
        src = _rewrite(src, tmp_path / component, lambda n, a: a.astype(dt) if mx.issubdtype(a.dtype, mx.floating)
                       else a)
    for dtype in (None, mx.float32):
        held = load_component(src, dtype=dtype)
        monkeypatch.setattr(folder_io, "TABLE_IN_FILE_BYTES", 0)
        mapped = load_component(src, dtype=dtype)
        monkeypatch.undo()
        module = dict(mapped.named_modules())[table]
        assert "weight" not in module and "weight" in dict(held.named_modules())[table]
        vocab = module._table.shape[0]
        ids = _ids(vocab)
        lookup, want = module(ids), dict(held.named_modules())[table](ids)
        assert lookup.dtype == want.dtype == (dtype or getattr(mx, stored))
        assert mx.array_equal(lookup, want).item()  # the same rows, bit for bit
        out, ref = mapped(ids), held(ids)
        out = out if isinstance(out, mx.array) else out.last_hidden_state
        ref = ref if isinstance(ref, mx.array) else ref.last_hidden_state
        assert mx.array_equal(out, ref).item()


def test_a_table_in_file_is_checked_for_nan(sd3, tmp_path, monkeypatch):
    def poison(name, a):
        if name == "shared.weight":
            a = mx.concatenate([a[:7], mx.full((1, a.shape[1]), float("nan"), a.dtype), a[8:]])
        return a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a

    src = _rewrite(sd3[2] / "text_encoder_3", tmp_path / "t5", poison)
    monkeypatch.setattr(folder_io, "TABLE_IN_FILE_BYTES", 0)
    with pytest.raises(WeightsError, match=r"shared\.weight holds NaN or infinite values"):
        load_component(src)


def test_only_the_vae_half_asked_for_is_read(sd3):
    vae = sd3[2] / "vae"
    whole = load_component(vae)
    decoder = load_component(vae, parts=("decoder", "post_quant_conv"))
    encoder = load_component(vae, parts=("encoder", "quant_conv"))
    assert "encoder" not in decoder and "decoder" in decoder
    assert "decoder" not in encoder and "encoder" in encoder
    z = mx.array(np.random.default_rng(1).standard_normal((1, 4, 6, whole.config.latent_channels)).astype(np.float32))
    assert mx.array_equal(decoder.decode(z), whole.decode(z)).item()
    x = mx.array(np.random.default_rng(2).uniform(-1, 1, (1, 16, 24, 3)).astype(np.float32))
    assert mx.array_equal(encoder.encode(x)[0], whole.encode(x)[0]).item()


def test_partial_reads_of_a_tensor(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(10, 6)
    w = SafetensorsWriter(tmp_path / "x.safetensors")
    w.add("a", mx.array(a))
    w.close()
    f = SafetensorsFile(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(f.raw("a", 3, 7), a[3:7])
    np.testing.assert_array_equal(f.raw("a", 8, 20), a[8:])
    assert f.raw("a", 5, 5).shape == (0, 6)
    np.testing.assert_array_equal(np.asarray(f.mapped("a")[[9, 0, 4]]), a[[9, 0, 4]])
