"""Our safetensors reader/writer against the `safetensors` package, and its one-line errors."""

import json

import numpy as np
import pytest

import helpers  # noqa: F401
import mlx.core as mx
from mlx_diffusion.errors import WeightsError
from mlx_diffusion.io.safetensors import Checkpoint, SafetensorsFile, SafetensorsWriter


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "b.bias": rng.standard_normal(3).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.scalar": np.array(2.5, dtype=np.float32),
    }


def test_reader_matches_safetensors_package(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = {k: torch.from_numpy(v) for k, v in _tensors().items()}
    t["e.bf16"] = torch.randn(4, 8).to(torch.bfloat16)
    save_file(t, tmp_path / "x.safetensors", metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"k": "v"} and set(f.keys()) == set(t)
    for k, v in t.items():
        ours = f.get(k)
        assert ours.shape == tuple(v.shape)
        np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), v.float().numpy())
    assert f.get("e.bf16").dtype == mx.bfloat16


def test_writer_roundtrip_and_safetensors_reads_it(tmp_path):
    from safetensors.torch import load_file

    w = SafetensorsWriter(tmp_path / "y.safetensors", metadata={"m": 1})
    for k, v in _tensors().items():
        w.add(k, mx.array(v))
    w.add("q", mx.array(np.arange(8, dtype=np.uint32)))
    w.add("bf", mx.array([1.5, -2.0]).astype(mx.bfloat16))
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.safetensors"]  # no side files left
    back = load_file(tmp_path / "y.safetensors")
    for k, v in _tensors().items():
        np.testing.assert_array_equal(back[k].numpy(), v)
    assert back["bf"].float().tolist() == [1.5, -2.0]
    f = SafetensorsFile(tmp_path / "y.safetensors")
    assert f.metadata == {"m": "1"}
    np.testing.assert_array_equal(np.array(f.get("bf").astype(mx.float32)), [1.5, -2.0])


def test_truncated_and_garbage_files_give_one_line_errors(tmp_path):
    w = SafetensorsWriter(tmp_path / "z.safetensors")
    w.add("x", mx.zeros((100, 100)))
    w.close()
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    (tmp_path / "g.safetensors").write_bytes(b"hello world, not a checkpoint" * 10)
    (tmp_path / "e.safetensors").write_bytes(b"")
    for name, what in (("t", "truncated"), ("g", "not"), ("e", "not a safetensors"), ("missing", "not found")):
        with pytest.raises(WeightsError, match=what) as e:
            SafetensorsFile(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)


def test_sharded_checkpoint_with_index(tmp_path):
    for i, names in enumerate((["a", "b"], ["c"])):
        w = SafetensorsWriter(tmp_path / f"m-{i}.safetensors")
        for n in names:
            w.add(n, mx.ones((2,)) * i)
        w.close()
    index = {"weight_map": {"a": "m-0.safetensors", "b": "m-0.safetensors", "c": "m-1.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    ck = Checkpoint.from_folder(tmp_path)
    assert sorted(ck.keys()) == ["a", "b", "c"] and ck.get("c").tolist() == [1.0, 1.0]
    (tmp_path / "m-1.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing"):
        Checkpoint.from_folder(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="pickle"):
        Checkpoint.from_folder(tmp_path)
