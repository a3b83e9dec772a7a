"""Epoch positions -> batches, many batches per numpy call.

The loader asks for a chunk at a time: a few runs of epoch positions, a whole number
of batches (up to a few MB; a mapping window of views when the chunk is zero-copy).
Fixed-width numeric columns are handled for the whole chunk at once, so a batch costs
a tensor view per column (one `split` per column and piece), not Arrow calls:
  * unshuffled: numpy views of the record batches in private copy-on-write mappings of
    the shards (no copy at all until training writes to a batch, and then only the pages
    written); only a batch that straddles two record batches is copied. Shards that are
    not memory-mapped (Parquet, remote files) are copied, once per chunk;
  * shuffled: a shuffle window's rows are copied once, sequentially, in block order
    (that copy is the in-memory shuffle window); the chunk is then one numpy `take`
    per column from it, into a new array the batches are slices of.
Other columns (ragged lists, strings, booleans, columns with nulls) go through Arrow,
batch by batch, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from .order import EpochOrder, Window
from .reader import PrivateMappings, ShardReader
from .tensors import table_to_batch

# A chunk: up to this many rows or bytes of fixed-width columns (at least one batch).
# Each hand-over between the reader thread and the training thread (waking a thread,
# passing the GIL) costs from tens of microseconds to a fraction of a millisecond on
# busy cores; a chunk of batches pays it once.
CHUNK_ROWS = 16384
CHUNK_BYTES = 8 << 20
# The largest shuffle window held in memory (the fixed-width columns of its rows).
# Beyond it, shuffled batches are gathered batch by batch through Arrow (slower, smaller).
WINDOW_BYTES = 256 << 20

Ranges = list[tuple[int, int]]  # runs of epoch positions
Batch = tuple[int, dict]  # (samples, columns)


class BatchBuilder:
    """Builds the batches of chunks of one epoch's positions; safe to call from several threads."""

    def __init__(self, reader: ShardReader, order: EpochOrder, batch_size: int, ragged: str = "pad",
                 pad_value: float = 0, transform: Callable[[dict], dict] | None = None):
        self.reader, self.order, self.batch_size = reader, order, batch_size
        self.ragged, self.pad_value, self.transform = ragged, pad_value, transform
        self.fixed = dict(reader.fixed)
        if order.shuffle and min(order.window, order.num_rows) * reader.fixed_row_bytes > WINDOW_BYTES:
            self.fixed = {}  # the window does not fit in memory: gather through Arrow
        self._window: tuple[Window, dict[str, np.ndarray]] | None = None
        self._lock = threading.Lock()
        self._mappings = PrivateMappings(reader)  # this epoch's copy-on-write views of mapped shards

    def batches_per_chunk(self) -> int:
        """Batches per chunk, from the row size (fixed-width columns, or the shard bytes per row)."""
        manifest = self.reader.manifest
        row_bytes = max(self.reader.fixed_row_bytes, manifest.num_bytes // max(1, manifest.num_rows), 1)
        if self.zero_copy():
            # views of the mapped file: a chunk costs no memory until training touches it, and
            # fewer, larger chunks mean fewer hand-overs between threads; a window's worth
            # keeps a chunk's views within a mapping or two
            rows = PrivateMappings.WINDOW // row_bytes
        else:
            rows = min(CHUNK_ROWS, CHUNK_BYTES // row_bytes)
        return max(1, rows // self.batch_size)

    def zero_copy(self) -> bool:
        """Whether every column's batches are views of the memory-mapped shards (unshuffled,
        local Arrow IPC, fixed-width columns only): building a chunk then reads no data."""
        return (not self.order.shuffle and self.reader.mapped and self.transform is None
                and len(self.fixed) == len(self.reader.columns))

    def build(self, ranges: Ranges) -> Iterator[Batch]:
        """The batches of the positions `ranges` (all full but perhaps the last), to be
        iterated once. Reading, gathering, Arrow columns and the transform happen here (in
        the reader thread); batches of fixed-width columns alone are cut from the chunk as
        they are asked for (a slice per column: not worth a hand-over between threads)."""
        n = sum(b - a for a, b in ranges)
        pieces = (self._gather(ranges, n) if self.order.shuffle else self._views(ranges)) or [Piece(n, {}, {})]
        other = [c for c in self.reader.columns if c not in pieces[0].arrays]  # through Arrow
        if not other and self.transform is None:
            return _slices(pieces, self.batch_size)
        rows = self._rows(ranges) if other else None
        out, at = [], 0
        for size, batch in _slices(pieces, self.batch_size):
            if other:
                batch = self._add_columns(batch, rows[at:at + size], other)
            out.append((size, self.transform(batch) if self.transform else batch))
            at += size
        return handed_out(out)

    def _add_columns(self, batch: dict, rows: np.ndarray, columns: list[str]) -> dict:
        """`batch` plus `columns` of `rows` read through Arrow, keys in column order
        (a column's extras, like `<name>_lengths`, after it)."""
        batch.update(table_to_batch(self.reader.rows(rows, columns), self.ragged, self.pad_value))
        ordered = {}
        for name in self.reader.columns:
            for key in (name, f"{name}_lengths", f"{name}_offsets"):
                if key in batch:
                    ordered[key] = batch[key]
        return ordered

    def _rows(self, ranges: Ranges) -> np.ndarray:
        pieces = [self.order.rows(a, b) for a, b in ranges]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _views(self, ranges: Ranges) -> Pieces | None:
        """Unshuffled: positions are rows; pieces of numpy views, one per record batch crossed,
        that training may write to (copy-on-write mappings of the shards)."""
        if not self.fixed:
            return None
        pieces = [Piece(*piece) for piece in self.reader.writable_views(ranges, self._mappings)]
        common = set.intersection(*(set(p.arrays) for p in pieces))  # nulls: leave out
        if all(len(p.arrays) == len(common) for p in pieces):
            return pieces
        return [Piece(size, {k: v for k, v in views.items() if k in common},
                      {k: v for k, v in readable.items() if k in common}) for size, views, readable in pieces]

    def _gather(self, ranges: Ranges, n: int) -> Pieces | None:
        """Shuffled: one numpy take per column and shuffle window, into new arrays."""
        if not self.fixed:
            return None
        out = None
        at = 0
        with self._lock:  # the window's arrays are reused for the next window
            for a, b in ranges:
                while a < b:
                    window, arrays = self._window_at(a // self.order.window)
                    if out is None:
                        out = {name: np.empty((n, *shape), dtype)
                               for name, (shape, dtype) in self.fixed.items() if name in arrays}
                    stop = min(b, window.hi)
                    perm = window.perm[a - window.lo:stop - window.lo]
                    for name in list(out):
                        if name in arrays:  # mode "clip": "raise" would gather into a temporary first
                            np.take(arrays[name], perm, axis=0, out=out[name][at:at + len(perm)], mode="clip")
                        else:  # nulls in this window: this chunk reads the column through Arrow
                            del out[name]
                    at, a = at + len(perm), stop
        return [Piece(n, out, out)]

    def _window_at(self, w: int) -> tuple[Window, dict[str, np.ndarray]]:
        """Shuffle window `w` with its rows' fixed-width columns copied in block order into
        arrays reused from window to window (chunks walk through the windows in order)."""
        if self._window is None or self._window[0].index != w:
            window = self.order.window_at(w)
            size = window.hi - window.lo
            spare = self._window[1] if self._window else {}
            arrays = {name: spare[name][:size] if name in spare and len(spare[name]) >= size
                      else np.empty((size, *shape), dtype) for name, (shape, dtype) in self.fixed.items()}
            self._window = window, self.reader.copy_runs(window.runs, arrays)
        return self._window


class Piece(NamedTuple):
    """Consecutive rows of fixed-width columns: `arrays` become the batches' tensors (training
    may write to them); `source` holds the same values read-only, to copy from (for memory-
    mapped shards, the shared mapping: reading it leaves the copy-on-write ones untouched)."""

    rows: int
    arrays: dict[str, np.ndarray]
    source: dict[str, np.ndarray]


Pieces = list[Piece]  # consecutive


def _slices(pieces: Pieces, size: int) -> Iterator[Batch]:
    """Batches of `size` rows of tensors from consecutive pieces: slices of a piece (no
    copy), or, for a batch that straddles pieces, its parts concatenated. The last one
    may be short."""
    parts, have = [], 0
    for rows, arrays, source in pieces:
        at = 0
        if parts:  # complete the batch begun in the previous piece
            at = min(size - have, rows)
            parts.append(({k: v[:at] for k, v in arrays.items()}, {k: v[:at] for k, v in source.items()}))
            have += at
            if have < size:
                continue
            yield size, _tensors(_concat(parts), 0, size)
            parts, have = [], 0
        whole = (rows - at) // size
        if whole:
            yield from _whole_batches(arrays, at, whole, size)
            at += whole * size
        if at < rows:
            parts, have = [({k: v[at:] for k, v in arrays.items()}, {k: v[at:] for k, v in source.items()})], rows - at
    if parts:
        yield have, _tensors(_concat(parts), 0, have)


def _tensors(arrays: dict[str, np.ndarray], lo: int, size: int) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array[lo:lo + size]) for name, array in arrays.items()}


def _whole_batches(arrays: dict[str, np.ndarray], lo: int, count: int, size: int) -> Iterator[Batch]:
    """`count` batches of `size` rows from row `lo` of a piece: one tensor per column cut
    by one `split` call (views, in C), so a batch costs a dict, not a numpy slice and a
    tensor per column (the bulk of the unshuffled loader's time)."""
    if not arrays:
        for _ in range(count):
            yield size, {}
        return
    names = list(arrays)
    columns = [torch.from_numpy(arrays[name][lo:lo + count * size]).split(size) for name in names]
    for tensors in zip(*columns, strict=True):
        yield size, dict(zip(names, tensors, strict=True))


def handed_out(batches: list[Batch]) -> Iterator[Batch]:
    """Built batches in order, each let go of as it is handed out: a batch is then freed
    when training drops it, not with the whole chunk at the next hand-over (which would
    put a chunk's teardown on one step, as if waiting for data)."""
    for i, batch in enumerate(batches):
        batches[i] = None
        yield batch


def _concat(parts: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """One batch from its parts, (arrays, source) each: a part's own arrays, or a new array
    copied from the parts' sources."""
    if len(parts) == 1:
        return parts[0][0]
    return {k: np.concatenate([source[k] for _, source in parts]) for k in parts[0][1]}
