"""Which sample comes when: the global order of an epoch, and each rank's share of it.

The order is a function of (seed, epoch, shard row counts) only -- never of the world
size or the number of reader threads -- so any world size sees the same global
sequence. Shuffling is two-level, so reads stay local and memory stays bounded:
blocks of consecutive rows are permuted, then samples are permuted inside windows
of `window` consecutive positions.

A rank's share is a contiguous run of the remaining sequence: concatenating the
ranks' shares in rank order gives the global order back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]))


class EpochOrder:
    """position in the epoch -> global row index (rows numbered across shards in manifest order)."""

    def __init__(self, shard_rows: list[int], epoch: int, seed: int, shuffle: bool,
                 block_rows: int = 1024, window: int = 16384):
        self.num_rows = int(sum(shard_rows))
        self.shuffle = shuffle
        self.epoch, self.seed, self.window = epoch, seed, max(1, window)
        self._last: Window | None = None  # the window asked for last (a chunk asks several times)
        if not shuffle:
            return
        # Blocks never straddle shards, so a block is one contiguous read.
        starts, lengths = [], []
        offset = 0
        for rows in shard_rows:
            for b in range(0, rows, block_rows):
                starts.append(offset + b)
                lengths.append(min(block_rows, rows - b))
            offset += rows
        perm = _rng(seed, epoch, 0).permutation(len(starts))
        self._block_start = np.asarray(starts, dtype=np.int64)[perm]
        lengths = np.asarray(lengths, dtype=np.int64)[perm]
        self._block_pos = np.concatenate([[0], np.cumsum(lengths)])  # where each block begins

    def __len__(self) -> int:
        return self.num_rows

    def window_at(self, w: int) -> Window:
        """Shuffle window `w` (shuffled orders only): its rows in block order and their permutation."""
        last = self._last
        if last is not None and last.index == w:
            return last
        lo, hi = w * self.window, min((w + 1) * self.window, self.num_rows)
        # The blocks (in block order) that cover positions [lo, hi), cut to those positions.
        first = int(np.searchsorted(self._block_pos, lo, side="right")) - 1
        last_block = int(np.searchsorted(self._block_pos, hi - 1, side="right")) - 1
        runs = []
        for k in range(first, last_block + 1):
            a, b = max(lo, int(self._block_pos[k])), min(hi, int(self._block_pos[k + 1]))
            start = int(self._block_start[k]) + a - int(self._block_pos[k])
            runs.append((start, start + b - a))
        window = Window(w, lo, runs, _rng(self.seed, self.epoch, 1, w).permutation(hi - lo))
        self._last = window
        return window

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Global row indices at epoch positions [start, stop)."""
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        out = []
        for w in range(start // self.window, -(-stop // self.window)):
            window = self.window_at(w)
            a, b = max(start, window.lo) - window.lo, min(stop, window.hi) - window.lo
            out.append(window.rows()[window.perm[a:b]])
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


class Window:
    """A shuffle window: positions [lo, hi) hold the rows of `runs` (contiguous global row
    ranges, concatenated) in the order `perm`: position lo + i holds that concatenation's
    row perm[i]. Reading the runs is sequential; only the permutation is random."""

    def __init__(self, index: int, lo: int, runs: list[tuple[int, int]], perm: np.ndarray):
        self.index, self.lo, self.hi = index, lo, lo + len(perm)
        self.runs, self.perm = runs, perm
        self._rows: np.ndarray | None = None

    def rows(self) -> np.ndarray:
        """The runs' global row indices, concatenated."""
        if self._rows is None:
            self._rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.runs])
        return self._rows


@dataclass
class Share:
    """One rank's part of what is left of an epoch, in epoch positions."""

    segments: list[tuple[int, int]]  # runs of epoch positions, in order
    num_samples: int

    def runs(self, skip: int = 0):
        """Yield (start, stop) runs of positions, after skipping `skip` samples."""
        for a, b in self.segments:
            if skip >= b - a:
                skip -= b - a
                continue
            yield a + skip, b
            skip = 0


@dataclass
class Cursor:
    """Where the loader stands: tiny, and enough to continue exactly at any world size."""

    epoch: int = 0
    remaining: list[tuple[int, int]] | None = None  # epoch positions left at the last split; None = all
    world_size: int = 1
    consumed: int = 0  # samples each rank has taken since that split
    seed: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "remaining": self.remaining, "world_size": self.world_size,
                "consumed": self.consumed, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        remaining = [tuple(s) for s in d["remaining"]] if d.get("remaining") is not None else None
        return cls(epoch=int(d["epoch"]), remaining=remaining, world_size=int(d["world_size"]),
                   consumed=int(d["consumed"]), seed=int(d.get("seed", 0)))


def _take(segments: list[tuple[int, int]], start: int, count: int) -> list[tuple[int, int]]:
    """Positions [start, start+count) of the sequence formed by concatenating `segments`."""
    out, skip = [], start
    for a, b in segments:
        if count <= 0:
            break
        n = b - a
        if skip >= n:
            skip -= n
            continue
        lo = a + skip
        hi = min(b, lo + count)
        out.append((lo, hi))
        count -= hi - lo
        skip = 0
    return out


def split(remaining: list[tuple[int, int]], world_size: int, rank: int, drop_remainder: bool) -> Share:
    """Rank `rank`'s equal, contiguous share. `drop_remainder` drops what does not divide;
    otherwise the last shares are padded by wrapping around to the start."""
    total = sum(b - a for a, b in remaining)
    per_rank = total // world_size if drop_remainder else -(-total // world_size)
    start = rank * per_rank
    segments = _take(remaining, start, per_rank)
    short = per_rank - sum(b - a for a, b in segments)
    if short > 0 and total > 0:  # padding: wrap around
        segments += _take(remaining, 0, short)
    return Share(segments, per_rank)


def after_consumed(remaining: list[tuple[int, int]], world_size: int, consumed: int,
                   drop_remainder: bool) -> list[tuple[int, int]]:
    """What is left of the epoch once every rank took `consumed` samples of its share: every
    position of `remaining` that no rank took, in order, each once. That includes the positions
    no share held (the remainder a split at `world_size` drops; a split at another size may use
    them), and a padded share's wrapped-around positions are not repeated: a resize then drops
    or pads only what the new size's split does at the epoch's end, as an unresized epoch does."""
    taken = []
    for rank in range(world_size):
        taken += _take(split(remaining, world_size, rank, drop_remainder).segments, 0, consumed)
    return _without(remaining, taken)


def _without(segments: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`segments` (in their order) less the positions of the runs in `cut` (which may overlap)."""
    cut = sorted(cut)
    out: list[tuple[int, int]] = []
    for a, b in segments:
        lo = a
        for c, d in cut:
            if d <= lo or c >= b:
                continue
            if c > lo:
                out.append((lo, c))
            lo = max(lo, d)
        if lo < b:
            if out and out[-1][1] == lo:  # a run continued: keep the cursor small
                out[-1] = (out[-1][0], b)
            else:
                out.append((lo, b))
    return out
