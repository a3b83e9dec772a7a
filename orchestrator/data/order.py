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

    def _block_sequence(self, positions: np.ndarray) -> np.ndarray:
        block = np.searchsorted(self._block_pos, positions, side="right") - 1
        return self._block_start[block] + (positions - self._block_pos[block])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Global row indices at epoch positions [start, stop)."""
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        out = []
        w = start // self.window
        while w * self.window < stop:
            lo, hi = w * self.window, min((w + 1) * self.window, self.num_rows)
            perm = lo + _rng(self.seed, self.epoch, 1, w).permutation(hi - lo)
            a, b = max(start, lo), min(stop, hi)
            out.append(self._block_sequence(perm[a - lo:b - lo]))
            w += 1
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


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
    """What is left of the epoch once every rank took `consumed` samples of its share."""
    left = []
    for rank in range(world_size):
        share = split(remaining, world_size, rank, drop_remainder)
        left += list(share.runs(skip=consumed))
    return left
