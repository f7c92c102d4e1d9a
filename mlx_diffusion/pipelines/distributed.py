"""Several processes (ranks) started by `mlx.launch` sharing one command's images: data parallel over MLX's own
`mx.distributed` (ring over TCP or Thunderbolt, MPI, JACCL), no engine of ours.

Rank r makes the images r, r + N, r + 2N, ... of the command's list (N ranks) and writes them itself, so the files
are those of a one-process run, each on the machine of the rank that made it. The ranks talk only at the start:
rank 0's random seeds become everyone's, and every rank checks that all hold the same model. Each such exchange has
a deadline (`MLX_DIFFUSION_COLLECTIVE_TIMEOUT`, default 120 s): a rank whose partners died or never started ends
with a one-line message instead of waiting for ever. Outside `mlx.launch` the group has one rank and nothing is
exchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import InputError

_group = []


def group():
    """This process's group (`mx.distributed.init`, once; a group of one outside `mlx.launch`)."""
    if not _group:
        launched = "MLX_RANK" in os.environ  # mlx.launch's: the ranks connect first, which waits for every one
        _group.append(None if not mx.distributed.is_available() else
                      _bounded("connecting", mx.distributed.init, rank_name=os.environ.get("MLX_RANK", "?"))
                      if launched else mx.distributed.init())
    return _group[0]


def size() -> int:
    g = group()
    return 1 if g is None else g.size()


def rank() -> int:
    g = group()
    return 0 if g is None else g.rank()


def share(n: int) -> list[int]:
    """The indices of n items this rank takes: rank, rank + size, ..."""
    return list(range(rank(), n, size()))


def _timeout() -> float:
    try:
        return float(os.environ.get("MLX_DIFFUSION_COLLECTIVE_TIMEOUT", 120))
    except ValueError:
        return 120.0


def _bounded(what: str, fn, rank_name: str | None = None):
    """fn() (a collective, evaluated, or the group's start) with a deadline. MLX may wait inside such a call without
    letting other Python threads run, so the deadline is kept by a small shell process: past it, it prints the
    message and ends this process."""
    timeout = _timeout()
    who = f"rank {rank_name}" if rank_name is not None else f"rank {rank()} of {size()}"
    message = (f"Error: {who}: no answer from the other ranks in {timeout:g} s while {what}; did one of them fail "
               "or not start?")
    watchdog = subprocess.Popen(["sh", "-c", 'sleep "$1" && printf "%s\\n" "$2" >&2 && kill -9 "$3"', "watchdog",
                                 f"{timeout:g}", message, str(os.getpid())], stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        out = fn()
        if isinstance(out, mx.array):
            mx.eval(out)
        return out
    except RuntimeError as e:  # a partner's connection dropped
        raise InputError(f"{who}: the other ranks stopped while {what} ({e})") from None
    finally:
        watchdog.kill()
        watchdog.wait()


def agree(values: list[int]) -> list[int]:
    """Rank 0's unsigned 32-bit values (e.g. random seeds), on every rank."""
    if size() == 1:
        return list(values)
    mine = mx.array(values if rank() == 0 else [0] * len(values), dtype=mx.uint32)
    return [int(v) for v in _bounded("agreeing on seeds", lambda: mx.distributed.all_sum(mine)).tolist()]


def fingerprint(folder: Path | None) -> bytes:
    """8 bytes that differ between model folders that differ (their info file, each file's name and size)."""
    from . import BUILTIN_MODEL

    folder = Path(folder) if folder is not None else BUILTIN_MODEL
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder)}:{path.stat().st_size};".encode())
        if path.name in ("mlx_diffusion.json", "config.json"):
            h.update(path.read_bytes())
    return h.digest()[:8]


def check_same_model(folder: Path | None, name: str):
    """An InputError on every rank unless every rank holds the same model folder."""
    if size() == 1:
        return
    mine = mx.array(list(fingerprint(folder)), dtype=mx.uint8).astype(mx.int32)
    everyone = _bounded("comparing models", lambda: mx.distributed.all_gather(mine)).reshape(size(), -1)
    differ = [r for r in range(size()) if not mx.array_equal(everyone[r], everyone[0]).item()]
    if differ:
        raise InputError(f"rank {differ[0]} holds another model than rank 0 under {name}: every rank needs the same "
                         "model folder (the same conversion)")


# ---------------------------------------------------------------------------------------------------------------
# tensor parallel: one image's transformer split across the ranks (Megatron-style, as MLX's nn sharding layers)


class ShardedToAll(nn.Module):
    """A Linear layer holding this rank's columns of the input: the ranks' partial products summed (all_sum), then
    the bias, so every rank gets the whole output."""

    def __init__(self, part: nn.Module, bias):
        super().__init__()
        self.part = part
        if bias is not None:
            self.bias = bias

    def __call__(self, x):
        y = mx.distributed.all_sum(self.part(x), group=group())
        return y + self.bias if "bias" in self else y


def _slice_linear(layer, rows: slice | None = None, cols: list[slice] | None = None):
    """A Linear or QuantizedLinear keeping output rows `rows` and/or the input columns in `cols` (no bias when
    columns are taken: the caller adds it once, after the sum)."""
    from ..models.layers import Linear, QuantizedLinear

    if isinstance(layer, QuantizedLinear):
        per = 32 // layer.bits
        for s in cols or ():
            if s.start % layer.group_size or s.stop % layer.group_size:
                raise InputError(f"cannot shard a {layer.bits}-bit layer with groups of {layer.group_size} at "
                                 f"column {s.start}: use fewer ranks or a float model")
        w, sc, bi = layer.weight, layer.scales, layer.biases
        if rows is not None:
            w, sc, bi = w[rows], sc[rows], bi[rows]
        if cols:
            w = mx.concatenate([w[:, s.start // per : s.stop // per] for s in cols], axis=1)
            g = layer.group_size
            sc = mx.concatenate([sc[:, s.start // g : s.stop // g] for s in cols], axis=1)
            bi = mx.concatenate([bi[:, s.start // g : s.stop // g] for s in cols], axis=1)
        out = QuantizedLinear(1, 1, False, layer.group_size, layer.bits)
        out.weight, out.scales, out.biases = mx.contiguous(w), mx.contiguous(sc), mx.contiguous(bi)
    else:
        w = layer.weight if rows is None else layer.weight[rows]
        if cols:
            w = mx.concatenate([w[:, s] for s in cols], axis=1)
        out = Linear(1, 1, bias=False)
        out.weight = mx.contiguous(w)
    if "bias" in layer and not cols:
        out.bias = layer.bias if rows is None else mx.contiguous(layer.bias[rows])
    return out


def _rows(layer, n, r):
    step = _out_dim(layer) // n
    return _slice_linear(layer, rows=slice(r * step, (r + 1) * step))


def _cols(layer, segments: list[int], n, r):
    """Sharded-to-all over an input made of `segments` (widths), each split in n."""
    cols, start = [], 0
    for width in segments:
        step = width // n
        cols.append(slice(start + r * step, start + (r + 1) * step))
        start += width
    return ShardedToAll(_slice_linear(layer, cols=cols), layer.get("bias"))


def _out_dim(layer):
    return layer.scales.shape[0] if "scales" in layer else layer.weight.shape[0]


def shard_transformer(model, family: str):
    """Split a FLUX transformer's attention heads and MLP width across the ranks, in place: q/k/v and the MLPs' first
    layers by output rows, the output projections by input columns with an all_sum. The embedders, modulations and
    output layers stay whole on every rank."""
    n, r = size(), rank()
    if family != "flux":
        raise InputError(f"--shard splits FLUX transformers so far, not {family}")
    c = model.config
    heads, inner = c.num_attention_heads, c.num_attention_heads * c.attention_head_dim
    mlp = int(inner * 4.0)
    if heads % n or mlp % n:
        raise InputError(f"the model's {heads} attention heads do not split evenly across {n} ranks")
    for block in model.transformer_blocks:
        a = block.attn
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(a, name, _rows(getattr(a, name), n, r))
        a.to_out[0] = _cols(a.to_out[0], [inner], n, r)
        a.to_add_out = _cols(a.to_add_out, [inner], n, r)
        a.heads = heads // n
        for ff in (block.ff, block.ff_context):
            ff.net[0].proj = _rows(ff.net[0].proj, n, r)
            ff.net[2] = _cols(ff.net[2], [_out_dim(ff.net[0].proj) * n], n, r)
    for block in model.single_transformer_blocks:
        a = block.attn
        for name in ("to_q", "to_k", "to_v"):
            setattr(a, name, _rows(getattr(a, name), n, r))
        a.heads = heads // n
        width = _out_dim(block.proj_mlp)
        block.proj_mlp = _rows(block.proj_mlp, n, r)
        block.proj_out = _cols(block.proj_out, [inner, width], n, r)
    mx.eval(model.parameters())
    mx.clear_cache()
    return model
