"""First-block cache: skip a transformer's blocks after the first on steps where the first block barely changed.

As diffusers' FirstBlockCache (hooks/first_block_cache.py, after ParaAttention's): each step runs the first block
and compares its residual on the image stream (output - input) with the residual of the last step that ran every
block: when `mean|r - r_last| / mean|r_last|` is at most `threshold`, the rest is skipped and the image stream is
the first block's output plus the residual the other blocks added at that last full step. The first step always
runs everything.

diffusers decides once per transformer call, over everything in it. Here each image decides for itself, over its own
rows (its negative and positive halves together under SD3's classifier-free guidance, as diffusers' one-image call
does), so that an image made in a batch is the image made alone: the other blocks are skipped when every image of
the batch skips, and when some run them, the images that skip take their cached result.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class FirstBlockCache:
    """The cache state of one run (one batch, one guidance branch): `rows[g]` are the batch rows of image g."""

    def __init__(self, threshold: float, rows: list[list[int]]):
        self.threshold = float(threshold)
        self.rows = [mx.array(r) for r in rows]
        self.head = None  # first-block residual of each row at its image's last full step
        self.tail = None  # what the other blocks added then
        self.steps = 0
        self.skipped = np.zeros(len(rows), dtype=int)  # steps each image skipped
        self.all_skipped = 0  # steps every image skipped: the calls that saved the other blocks' work
        self.changes = []  # each step's relative change of each image's first-block residual (for tuning)

    def _skips(self, residual) -> np.ndarray:
        if self.head is None:
            return np.zeros(len(self.rows), dtype=bool)
        changes = []
        for r in self.rows:
            prev = self.head[r]
            changes.append((mx.mean(mx.abs(residual[r] - prev)) / mx.mean(mx.abs(prev))).item())
        self.changes.append(changes)
        return np.array(changes) <= self.threshold

    def __call__(self, x_in, x_head, rest):
        """The image stream after every block: `rest(x_head)`, or cached, per image."""
        residual = x_head - x_in
        skip = self._skips(residual)
        self.steps += 1
        self.skipped += skip
        if skip.all():
            self.all_skipped += 1
            return x_head + self.tail
        out = rest(x_head)
        if not skip.any():
            self.head, self.tail = residual, out - x_head
            return out
        row_skips = np.zeros(x_head.shape[0], dtype=bool)
        for g in np.flatnonzero(skip):
            row_skips[np.asarray(self.rows[g])] = True
        mask = mx.array(row_skips).reshape(-1, *([1] * (x_head.ndim - 1)))
        cached = x_head + self.tail
        self.head = mx.where(mask, self.head, residual)
        self.tail = mx.where(mask, self.tail, out - x_head)
        return mx.where(mask, cached, out)
