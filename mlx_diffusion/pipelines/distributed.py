"""Several processes (ranks) started by `mlx.launch` working on one command, over MLX's own `mx.distributed` (ring over
TCP or Thunderbolt, MPI, JACCL), no engine of ours.

Data parallel (the default): rank r makes the images r, r + N, r + 2N, ... of the command's list (N ranks) and writes
them itself, so the files are those of a one-process run, each on the machine of the rank that made it. Tensor
parallel (`shard_model`, `--shard`): every rank makes every image with its share of the transformer's heads, MLP
width and modulations, read from the file as slices; rank 0 alone encodes the prompts and sends the embeddings
(`from_rank_zero`), the layers' partial sums are exchanged in every step, and rank 0 writes the images. Before
that, rank 0's random seeds become everyone's, and every rank checks that all hold the same model. Each exchange
outside the transformer has a deadline (`MLX_DIFFUSION_COLLECTIVE_TIMEOUT`, default 120 s): a rank whose partners
died or never started ends with a one-line message instead of waiting for ever. Outside `mlx.launch` the group has
one rank and nothing is exchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..backends import cpu
from ..errors import InputError
from ..models.layers import Linear, QuantizedLinear

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


def _bounded(what: str, fn, rank_name: str | None = None, patience: float = 1.0):
    """fn() (a collective, evaluated, or the group's start) with a deadline (`patience` times the configured one).
    MLX may wait inside such a call without letting other Python threads run, so the deadline is kept by a small
    shell process: past it, it prints the message and ends this process."""
    timeout = _timeout() * patience
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


def agree(values: list[int], what: str = "agreeing on seeds", patience: float = 1.0) -> list[int]:
    """Rank 0's unsigned 32-bit values (e.g. random seeds), on every rank; the others give as many (any values)."""
    if size() == 1:
        return list(values)
    mine = mx.array(values if rank() == 0 else [0] * len(values), dtype=mx.uint32)
    return [int(v) for v in _bounded(what, lambda: mx.distributed.all_sum(mine), patience=patience).tolist()]


# Rank 0's prompt encoding may include loading the text encoders (T5-XXL: ~10 GB from disk), so the others wait for
# it longer than for a plain exchange; a rank 0 that fails ends its connections, which the others see at once.
ENCODING_PATIENCE = 10


def from_rank_zero(make, what: str = "waiting for rank 0's prompt encoding"):
    """`make()` run on rank 0 only and its arrays (a tree of dicts, lists and tuples; tuples come back as lists) sent to
    every rank, bit for bit: each array is summed with zeros from the others. Under `--shard` this keeps the text
    encoders on rank 0 alone, so no other rank loads or runs them."""
    if size() == 1:
        return make()
    header = b""
    if rank() == 0:
        flat = tree_flatten(make())
        if not all(isinstance(v, mx.array) for _, v in flat):
            raise TypeError("from_rank_zero: only trees of arrays can be sent")
        header = json.dumps([[k, v.shape, str(v.dtype).rpartition(".")[2]] for k, v in flat]).encode()
    # the layout (names, shapes, dtypes) as JSON bytes, its length first; then the arrays
    (length,) = agree([len(header)], what, patience=ENCODING_PATIENCE)
    layout = json.loads(bytes(agree(list(header) or [0] * length, "receiving prompt embeddings")))
    if rank() != 0:
        flat = [(k, mx.zeros(shape, getattr(mx, dtype))) for k, shape, dtype in layout]

    def send():
        out = [mx.distributed.all_sum(v) for _, v in flat]
        mx.eval(out)
        return out

    received = _bounded("receiving prompt embeddings", send)
    return tree_unflatten([(k, v) for (k, _), v in zip(flat, received)])


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
# tensor parallel: one image's transformer split across the ranks (Megatron-style, as MLX's nn sharding layers), each
# rank reading only its slices of the weights from the file


class ShardedToAllLinear(Linear):
    """A Linear holding this rank's columns of the input: the ranks' partial products are summed (all_sum), then the
    bias is added, so every rank gets the whole output. Its parameters keep the Linear's names."""

    def __call__(self, x):
        y = mx.distributed.all_sum(cpu.linear(x, self["weight"]), group=group())
        return y + self["bias"] if "bias" in self else y


class ShardedToAllQuantizedLinear(QuantizedLinear):
    """ShardedToAllLinear on a quantized weight."""

    def __call__(self, x):
        y = cpu.quantized_linear(x, self.weight, self.scales, self.biases, self.group_size, self.bits)
        y = mx.distributed.all_sum(y, group=group())
        return y + self.bias if "bias" in self else y


def _gather(y):
    """(..., O/N) on each rank -> (..., O): the ranks' parts side by side, in rank order."""
    g = mx.distributed.all_gather(y.reshape(1, -1, y.shape[-1]), group=group())
    return g.transpose(1, 0, 2).reshape(*y.shape[:-1], g.shape[0] * y.shape[-1])


class GatheredLinear(Linear):
    """A Linear holding this rank's share of the output rows, whose outputs are gathered from every rank: for the
    modulations, a quarter of FLUX's weights with one vector per image as input."""

    def __call__(self, x):
        return _gather(super().__call__(x))


class GatheredQuantizedLinear(QuantizedLinear):
    """GatheredLinear on a quantized weight."""

    def __call__(self, x):
        return _gather(super().__call__(x))


def _dims(layer) -> tuple[int, int]:
    if isinstance(layer, QuantizedLinear):
        return layer.scales.shape[0], layer.scales.shape[1] * layer.group_size
    return layer.weight.shape


_SHELLS = {"rows": (Linear, QuantizedLinear), "cols": (ShardedToAllLinear, ShardedToAllQuantizedLinear),
           "gather": (GatheredLinear, GatheredQuantizedLinear)}


def _shell(layer, out_dims: int, in_dims: int, how: str):
    """An unloaded layer of the same kind at the sharded shape."""
    bias = "bias" in layer
    if isinstance(layer, QuantizedLinear):
        return _SHELLS[how][1](in_dims, out_dims, bias, layer.group_size, layer.bits)
    return _SHELLS[how][0](in_dims, out_dims, bias=bias)


def _split(width: int, n: int, r: int, what: str) -> slice:
    if width % n:
        raise InputError(f"{what} of {width} does not split evenly across {n} ranks")
    step = width // n
    return slice(r * step, (r + 1) * step)


class _Planner:
    """Collects this rank's shells of a model's layers and how to cut each from the file."""

    def __init__(self, n: int, r: int):
        self.n, self.r, self.plan, self.replace = n, r, {}, []

    def rows(self, path, layer, cut, how="rows"):
        _, in_dims = _dims(layer)
        self.plan[path] = ("rows", cut)
        self.replace.append((path, _shell(layer, cut.stop - cut.start, in_dims, how)))

    def gathered(self, path, layer):
        self.rows(path, layer, _split(_dims(layer)[0], self.n, self.r, "a modulation's width"), "gather")

    def cols(self, path, layer, widths):
        out_dims, _ = _dims(layer)
        cuts, start = [], 0
        for width in widths:
            cut = _split(width, self.n, self.r, "a layer's input")
            cuts.append(slice(start + cut.start, start + cut.stop))
            start += width
        if isinstance(layer, QuantizedLinear) and any(s.start % layer.group_size for s in cuts):
            raise InputError(f"cannot split {path}'s groups of {layer.group_size} across {self.n} ranks: use fewer "
                             "ranks or a float model")
        self.plan[path] = ("cols", cuts)
        self.replace.append((path, _shell(layer, out_dims, sum(s.stop - s.start for s in cuts), "cols")))

    def attention(self, path, attn, heads, inner, names=("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                           "add_v_proj")):
        """Heads split: the projections by output rows, the output projections by input columns."""
        if heads % self.n:
            raise InputError(f"the model's {heads} attention heads do not split evenly across {self.n} ranks")
        cut = _split(inner, self.n, self.r, "the attention width")
        for name in names:
            if name in attn:
                self.rows(f"{path}.{name}", attn[name], cut)
        if "to_out" in attn:
            self.cols(f"{path}.to_out.0", attn.to_out[0], [inner])
        if "to_add_out" in attn:
            self.cols(f"{path}.to_add_out", attn.to_add_out, [inner])
        attn.heads = heads // self.n

    def mlp(self, path, ff):
        width = _dims(ff.net[0].proj)[0]
        self.rows(f"{path}.net.0.proj", ff.net[0].proj, _split(width, self.n, self.r, "an MLP's width"))
        self.cols(f"{path}.net.2", ff.net[2], [width])


def shard_model(model):
    """Replace a FLUX or SD3 transformer's attention, MLP and modulation layers (not yet loaded) by this rank's shells:
    q/k/v and the MLPs' first layers keep their share of output rows, the output projections their share of input
    columns (summed over ranks), the modulations their share of output rows (gathered from all ranks). The embedders
    and the output projection stay whole. Returns `cut(name, array)`: this rank's part of each tensor in the file."""
    c = model.config
    heads, inner = c.num_attention_heads, c.num_attention_heads * c.attention_head_dim
    pl = _Planner(size(), rank())
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        pl.attention(f"{p}.attn", block.attn, heads, inner)
        if "attn2" in block:  # SD3.5's image-only self-attention
            pl.attention(f"{p}.attn2", block.attn2, heads, inner)
        pl.gathered(f"{p}.norm1.linear", block.norm1.linear)
        pl.gathered(f"{p}.norm1_context.linear", block.norm1_context.linear)
        pl.mlp(f"{p}.ff", block.ff)
        if "ff_context" in block:  # not in SD3's last block
            pl.mlp(f"{p}.ff_context", block.ff_context)
    for i, block in enumerate(getattr(model, "single_transformer_blocks", [])):  # FLUX
        p = f"single_transformer_blocks.{i}"
        pl.attention(f"{p}.attn", block.attn, heads, inner, names=("to_q", "to_k", "to_v"))
        pl.gathered(f"{p}.norm.linear", block.norm.linear)
        width = _dims(block.proj_mlp)[0]
        pl.rows(f"{p}.proj_mlp", block.proj_mlp, _split(width, pl.n, pl.r, "an MLP's width"))
        pl.cols(f"{p}.proj_out", block.proj_out, [inner, width])
    pl.gathered("norm_out.linear", model.norm_out.linear)
    model.update_modules(tree_unflatten(pl.replace))
    layers = dict(model.named_modules())
    return lambda name, array: _cut(name, array, pl.plan, layers)


def _cut(name: str, array, plan: dict, layers: dict):
    """This rank's part of a tensor read from the file (numpy, so only the part is copied into MLX)."""
    path, _, leaf = name.rpartition(".")
    if path not in plan:
        return array
    how, cut = plan[path]
    layer = layers[path]
    scale = 1
    if isinstance(layer, QuantizedLinear):
        scale = {"weight": layer.bits / 32, "scales": 1 / layer.group_size, "biases": 1 / layer.group_size}.get(leaf, 1)
    if how == "rows":
        return array[cut]
    if leaf == "bias":  # added once, after the sum
        return array
    return np.concatenate([array[:, int(s.start * scale) : int(s.stop * scale)] for s in cut], axis=1)
