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
