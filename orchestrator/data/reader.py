"""Rows by global index from a sharded dataset: memory-mapped Arrow IPC, Parquet by row group."""

from __future__ import annotations

import bisect
import hashlib
import math
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .manifest import DatasetError, Manifest
from .tensors import fixed_width, numpy_view


class ShardReader:
    """Thread-safe enough for one producer: tables are immutable and cached per shard."""

    def __init__(self, fs: pafs.FileSystem, base: str, manifest: Manifest,
                 columns: list[str] | None = None, cache_shards: int = 8, where: str | None = None,
                 verify: bool = False):
        self.fs, self.base, self.manifest = fs, base.rstrip("/"), manifest
        self.verify = verify  # sha256 of each shard when first opened (a full read)
        self.where = where or base
        names = manifest.schema.names
        for col in columns or []:
            if col not in names:
                raise DatasetError(f"{self.where}: column {col!r} does not exist (columns: {', '.join(names)}); "
                                   "fix data.<split>.columns")
        self.columns = list(columns) if columns else names
        # Fixed-width numeric columns are read as numpy views: a batch is then a slice,
        # and a shuffled batch one numpy gather, instead of Arrow calls per batch.
        self.fixed = {name: spec for name in self.columns
                      if (spec := fixed_width(manifest.schema.field(name).type)) is not None}
        self.fixed_row_bytes = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                                   for shape, dtype in self.fixed.values())
        self._views: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        # per mapped shard: the address its shared mapping starts at, and the file's size
        self._map_base: dict[int, int] = {}
        self._map_size: dict[int, int] = {}
        self._spans: dict[tuple[int, int], dict[str, _Span]] = {}  # per mapped record batch: columns in the file
        self._opened: dict[int, OpenShard] = {}  # per mapped shard: its entry in OPEN_SHARDS
        self._starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards])]).astype(np.int64)
        self._shard_starts: list[int] = self._starts.tolist()
        self._batch_starts: dict[int, list[int]] = {}  # per shard: where each record batch starts
        self._cache: OrderedDict[int, tuple[list, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = isinstance(fs, pafs.LocalFileSystem)
        # A memory-mapped shard costs address space, not memory: keep them all open, or a
        # shuffle that touches many shards per batch would re-open them again and again.
        self._mapped = self._local and manifest.format == "arrow"
        self.cache_shards = len(manifest.shards) if self._mapped else cache_shards

    @property
    def mapped(self) -> bool:
        """Whether the shards are memory-mapped (local Arrow IPC): fixed-width columns are
        then views of the files (see writable_views)."""
        return self._mapped

    def _path(self, shard: int) -> str:
        return f"{self.base}/{self.manifest.shards[shard].file}"

    def _open(self, shard: int) -> tuple[list, np.ndarray, tuple[int, int] | None]:
        """(record batches, where each starts, (address, size) of its shared mapping if it is
        memory-mapped) of one shard, checked against the manifest."""
        info = self.manifest.shards[shard]
        path = self._path(shard)
        name = f"{self.where.rstrip('/')}/{info.file}"
        if self._mapped:
            return self._open_mapped(shard, path, name)
        try:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise DatasetError(f"{name}: missing shard (listed in manifest.json); "
                                   "restore the file or re-create the dataset")
            if self.verify:
                self._verify_checksum(path, info.sha256, name)
            if self.manifest.format == "arrow":  # remote (local ones are mapped: _open_mapped)
                table = pa.ipc.open_file(self.fs.open_input_file(path)).read_all()
                self._check(table.schema, table.num_rows, info.rows, name)
                batches = table.select(self.columns).to_batches()
                sizes = [b.num_rows for b in batches]
            else:  # Parquet: only the footer now; each row group is decoded when first needed
                parquet = pq.ParquetFile(self.fs.open_input_file(path))
                self._check(parquet.schema_arrow, parquet.metadata.num_rows, info.rows, name)
                batches = _RowGroups(parquet, self.columns, name)
                sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        except DatasetError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{name}: corrupt shard, cannot decode it ({exc}); "
                               "re-create the dataset or run 'trainctl data inspect --verify'") from None
        return batches, np.cumsum([0, *sizes]).astype(np.int64), None

    def _open_mapped(self, shard: int, path: str, name: str) -> tuple[list, np.ndarray, tuple[int, int]]:
        """`_open` of a local Arrow IPC shard: memory-mapped (batches are views of the page
        cache, not copies), and opened once per process while the file stays the same (see
        OpenShards); checked against this dataset's manifest every time."""
        info = self.manifest.shards[shard]
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DatasetError(f"{name}: missing shard (listed in manifest.json); "
                               "restore the file or re-create the dataset") from None
        except OSError as exc:
            raise DatasetError(f"{name}: cannot read the shard ({exc}); restore the file or "
                               "re-create the dataset") from None
        if self.verify:
            self._verify_checksum(path, info.sha256, name)
        key = (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, tuple(self.columns))
        opened = OPEN_SHARDS.get(key)
        if opened is None:
            try:
                source = pa.memory_map(path)
                mapped = source.read_buffer(1).address, source.size()  # where views' bytes are in the file
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{name}: corrupt shard, cannot decode it ({exc}); "
                                   "re-create the dataset or run 'trainctl data inspect --verify'") from None
            self._check(table.schema, table.num_rows, info.rows, name)
            batches = table.select(self.columns).to_batches()
            starts = np.cumsum([0, *(b.num_rows for b in batches)]).astype(np.int64)
            opened = OPEN_SHARDS.put(key, OpenShard(table.schema, table.num_rows, batches, starts, mapped, {}, {}))
        else:  # the same file, perhaps listed by another manifest
            self._check(opened.schema, opened.num_rows, info.rows, name)
        self._opened[shard] = opened
        return opened.batches, opened.starts, opened.mapped

    def _check(self, schema: pa.Schema, rows: int, expected_rows: int, name: str) -> None:
        if not schema.remove_metadata().equals(self.manifest.schema.remove_metadata()):
            raise DatasetError(f"{name}: schema mismatch with manifest.json "
                               f"({schema.to_string()!r} vs {self.manifest.schema.to_string()!r}); "
                               "re-create the dataset from sources with one schema")
        if rows != expected_rows:
            raise DatasetError(f"{name}: corrupt shard: {rows} rows, manifest.json says {expected_rows}")

    def _verify_checksum(self, path: str, expected: str, name: str) -> None:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise DatasetError(f"{name}: corrupt shard: checksum mismatch with manifest.json; "
                               "re-create the dataset")

    def table(self, shard: int) -> tuple[list, np.ndarray]:
        """The shard's record batches (views of the mapped file) and where each one starts."""
        with self._lock:  # reader threads share the cache
            if shard in self._cache:
                self._cache.move_to_end(shard)
                return self._cache[shard]
        batches, starts, mapped = self._open(shard)
        with self._lock:
            if shard in self._cache:  # another reader thread opened it meanwhile: one mapping each
                return self._cache[shard]
            self._cache[shard] = batches, starts
            if mapped is not None:
                self._map_base[shard], self._map_size[shard] = mapped
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return batches, starts

    def _source_views(self, shard: int, index: int, batches) -> dict[str, np.ndarray]:
        """Numpy views of one record batch's (row group's) fixed-width columns without nulls."""
        key = (shard, index)
        views = self._views.get(key)
        if views is None:
            opened = self._opened.get(shard)
            if opened is not None and index in opened.views:  # found by an earlier dataset on the file
                views, spans = opened.views[index], opened.spans[index]
            else:
                batch = batches[index]
                views = {}
                for name, (shape, _) in self.fixed.items():
                    view = numpy_view(batch.column(name), shape)
                    if view is not None:
                        views[name] = view
                spans = {name: _Span.of(view, self._map_base[shard]) for name, view in views.items()} \
                    if self._mapped else {}
                if opened is not None:  # read-only views of the shared mapping: safe to share
                    opened.spans[index], opened.views[index] = spans, views
            if self._mapped:  # views of the mapped file cost nothing to keep
                self._views[key] = views
                self._spans[key] = spans
        return views

    def views(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Global rows [start, stop) as (rows, {column: numpy view}) pieces, one per record
        batch (row group) they cross; no copy, read-only (the shared mapping, or cached decoded
        row groups: never hand these to training code, see writable_views). A column with
        nulls in a piece is left out."""
        for _, lo, n, views in self._pieces(start, stop):
            yield n, {name: view[lo:lo + n] for name, view in views.items()}

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[tuple[int, int], int, int, dict[str, np.ndarray]]]:
        """The record batches (row groups) global rows [start, stop) cross: ((shard, record
        batch), first row in it, rows, {column: view of the whole record batch})."""
        while start < stop:
            shard = bisect.bisect_right(self._shard_starts, start) - 1
            batches, starts = self.table(shard)
            bounds = self._batch_starts.get(shard)
            if bounds is None:  # plain ints: bisect on them is quicker than numpy on scalars
                bounds = self._batch_starts[shard] = starts.tolist()
            local = start - self._shard_starts[shard]
            index = bisect.bisect_right(bounds, local) - 1
            lo = local - bounds[index]
            n = min(stop - start, bounds[index + 1] - local)
            yield (shard, index), lo, n, self._source_views(shard, index, batches)
            start += n

    def writable_views(self, ranges: list[tuple[int, int]], mappings: PrivateMappings
                       ) -> list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """The fixed-width columns of the row ranges `ranges` as views() gives them, but in
        memory training may change in place (batches are handed to code that may normalise
        them in place: that must neither fault on a read-only map nor change what the next
        epoch, or another dataset on the same files, reads), each piece with the same rows
        read-only too, to copy from. Memory-mapped shards: views of `mappings` (copy-on-write:
        no copy until written), and of the shared mapping to copy from (reading those leaves
        the private mappings untouched: they cost nothing to drop). Other shards (decoded
        Parquet row groups, remote files: held in caches that later reads share): one copy
        per column, the same arrays to copy from."""
        if not self._mapped:
            size = sum(b - a for a, b in ranges)
            out = {name: np.empty((size, *shape), dtype) for name, (shape, dtype) in self.fixed.items()}
            out = self.copy_runs(ranges, out)
            return [(size, out, out)]
        pieces = []
        for a, b in ranges:
            for key, lo, n, views in self._pieces(a, b):
                spans = self._spans[key]
                whole = mappings.record_batch(key, spans, len(next(iter(views.values())))) if views else {}
                if whole is not None:  # a slice per column, as views() gives
                    arrays = {name: view[lo:lo + n] for name, view in whole.items()}
                else:  # columns larger than a window: this piece's rows alone
                    arrays = {name: mappings.array(key[0], span.offset + lo * span.row_bytes, span, n)
                              for name, span in spans.items()}
                pieces.append((n, arrays, {name: view[lo:lo + n] for name, view in views.items()}))
        return pieces

    def map_private(self, shard: int, start: int, size: int) -> mmap.mmap:
        """A private (copy-on-write) mapping of `size` bytes of shard `shard`'s file from `start`
        (a multiple of mmap.ALLOCATIONGRANULARITY), at most to the end of the file."""
        try:
            fd = os.open(self._path(shard), os.O_RDONLY)
            try:  # the mapping keeps a descriptor of its own
                return mmap.mmap(fd, min(size, self._map_size[shard] - start), offset=start, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        except OSError as exc:
            name = f"{self.where.rstrip('/')}/{self.manifest.shards[shard].file}"
            raise DatasetError(f"{name}: cannot map the shard again ({exc}); restore the file or "
                               "re-create the dataset") from None

    def copy_runs(self, runs: list[tuple[int, int]], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy the fixed-width columns of the row ranges `runs`, concatenated, into `out`
        (sequential copies). Columns with nulls anywhere in them are dropped from `out`."""
        at = 0
        for a, b in runs:
            for rows, views in self.views(a, b):
                for name in list(out):
                    if name in views:
                        out[name][at:at + rows] = views[name]
                    else:
                        del out[name]
                at += rows
        return out

    def rows(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The given global rows, in that order.

        A run of consecutive rows is a zero-copy slice of the mapped record batches;
        scattered rows (shuffling) are gathered record batch by record batch, so the
        copy is the size of the batch, never of a shard. `columns`: only these."""
        table = self._rows(rows, columns)
        return table if columns is None else table.select(columns)

    def _rows(self, rows: np.ndarray, columns: list[str] | None) -> pa.Table:
        shards = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[shards]
        if len(rows) > 1 and (np.diff(rows) == 1).all() and shards[0] == shards[-1]:
            batches, starts = self.table(int(shards[0]))
            lo, hi = int(local[0]), int(local[-1]) + 1
            first = np.searchsorted(starts, lo, side="right") - 1
            last = np.searchsorted(starts, hi - 1, side="right") - 1
            pieces = [batches[b].slice(max(lo - starts[b], 0), min(hi, starts[b + 1]) - max(lo, starts[b]))
                      for b in range(first, last + 1)]
            return pa.Table.from_batches(pieces)
        # which record batch holds each row: (shard, batch) as one sortable key
        key = np.empty(len(rows), dtype=np.int64)
        in_batch = np.empty(len(rows), dtype=np.int64)
        for shard in np.unique(shards):
            mask = shards == shard
            _, starts = self.table(int(shard))
            b = np.searchsorted(starts, local[mask], side="right") - 1
            key[mask] = shard * (1 << 32) + b
            in_batch[mask] = local[mask] - starts[b]
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(np.diff(sorted_key)) + 1
        pieces = []
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(rows)]]), strict=True):
            k = int(sorted_key[lo])
            batch = self.table(k >> 32)[0][k & 0xFFFFFFFF]
            batch = batch if columns is None else batch.select(columns)
            pieces.append(batch.take(pa.array(in_batch[order[lo:hi]])))
        gathered = pa.concat_batches(pieces) if len(pieces) > 1 else pieces[0]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.Table.from_batches([gathered.take(pa.array(inverse))])


class OpenShard(NamedTuple):
    """A local Arrow IPC shard as opened once: its shared read-only mapping's record batches
    (of some columns), and the numpy views and file spans of their fixed-width columns,
    found as first needed. Nothing here is ever written or handed to training code: batches
    are views of per-epoch private mappings (see PrivateMappings)."""

    schema: pa.Schema  # the file's, to check against each dataset's manifest
    num_rows: int
    batches: list
    starts: np.ndarray  # where each record batch starts
    mapped: tuple[int, int]  # (address, size) of the shared mapping
    views: dict[int, dict[str, np.ndarray]]  # per record batch
    spans: dict[int, dict[str, _Span]]


class OpenShards:
    """The shards this process has opened (memory-mapped, footer and record batches read:
    about a third of an unshuffled epoch's time), kept for the next dataset on the same files:
    training loops make a new dataset per epoch, per evaluation, per sweep trial. Keyed by
    the file's path and identity (device, inode, size, modification time: a rewritten file is
    opened afresh) and the columns read. The last LIMIT are kept, each an open descriptor and
    address space (no memory: pages stay in the page cache, shared)."""

    LIMIT = 256

    def __init__(self):
        self._open: OrderedDict[tuple, OpenShard] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> OpenShard | None:
        with self._lock:
            opened = self._open.get(key)
            if opened is not None:
                self._open.move_to_end(key)
            return opened

    def put(self, key: tuple, opened: OpenShard) -> OpenShard:
        """Keep `opened`; the one kept already if another thread opened the file meanwhile."""
        with self._lock:
            kept = self._open.setdefault(key, opened)
            self._open.move_to_end(key)
            while len(self._open) > self.LIMIT:
                self._open.popitem(last=False)
            return kept

    def clear(self) -> None:
        with self._lock:
            self._open.clear()

    def __len__(self) -> int:
        return len(self._open)


OPEN_SHARDS = OpenShards()


class _Span(NamedTuple):
    """Where one fixed-width column of one record batch is in its shard's file."""

    offset: int  # of its first row
    dtype: np.dtype
    row_shape: tuple[int, ...]
    row_bytes: int

    @classmethod
    def of(cls, view: np.ndarray, base: int) -> _Span:
        """The span of `view`, a view of a mapping of the file that starts at address `base`."""
        return cls(view.ctypes.data - base, view.dtype, view.shape[1:], math.prod(view.shape[1:]) * view.itemsize)


class PrivateMappings:
    """Copy-on-write mappings of memory-mapped shards, for one epoch's batches.

    A batch is the user's to change in place, yet a write must reach neither the file nor
    what the next epoch (or another dataset on the same files) reads. So batches are views
    of private mappings (MAP_PRIVATE: the page cache's own pages until one is written, then a
    copy of that page alone). One is made per window of a shard's file and the last few are
    kept, so that mapping costs a system call per window rather than per chunk; a written
    page lives as long as its mapping: until the loader has moved past the window and the
    last batch in it is freed. One instance per epoch: the next epoch maps the files again."""

    WINDOW = 16 << 20  # bytes; a mapping spans two windows, so a piece up to a window fits one
    KEEP = 4

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # bytes of each mapping
        # the last few record batches' columns, whole, in the windows: chunks that cross one
        # slice it, rather than a few numpy calls per column and piece
        self._batches: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # reader threads share the mappings

    def record_batch(self, key: tuple[int, int], spans: dict[str, _Span], rows: int) -> dict[str, np.ndarray] | None:
        """The columns `spans` of record batch `key` ((shard, index), `rows` rows), whole, as
        views of the windows' mappings; None when one is larger than a window (its pieces
        are then mapped one by one, see array)."""
        views = self._batches.get(key)
        if views is not None:
            return views
        if any(span.offset % self.WINDOW + rows * span.row_bytes > 2 * self.WINDOW for span in spans.values()):
            return None
        views = {name: self.array(key[0], span.offset, span, rows) for name, span in spans.items()}
        with self._lock:
            self._batches[key] = views
            while len(self._batches) > self.KEEP:  # their windows go with them (see _map_window)
                self._batches.popitem(last=False)
        return views

    def array(self, shard: int, offset: int, span: _Span, rows: int) -> np.ndarray:
        """`rows` rows of a column of shard `shard`, starting at `offset` in its file: a view
        of a window's mapping (a slice: no call into Python per piece), or for a piece larger
        than a window, of a mapping of its own."""
        size = rows * span.row_bytes
        if not size:
            return np.empty((rows, *span.row_shape), span.dtype)  # no bytes to map
        window = offset // self.WINDOW
        start = window * self.WINDOW
        if offset + size <= start + 2 * self.WINDOW:
            data = self._windows.get((shard, window))  # oldest out first: chunks walk through the file
            if data is None:
                data = self._map_window(shard, window)
            data = data[offset - start:offset - start + size]
        else:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            data = np.frombuffer(self.reader.map_private(shard, start, offset + size - start), np.uint8,
                                 size, offset - start)
        return data.view(span.dtype).reshape(rows, *span.row_shape)

    def _map_window(self, shard: int, window: int) -> np.ndarray:
        data = np.frombuffer(self.reader.map_private(shard, window * self.WINDOW, 2 * self.WINDOW), np.uint8)
        with self._lock:
            self._windows[(shard, window)] = data
            while len(self._windows) > self.KEEP:  # still alive while a batch uses it
                self._windows.popitem(last=False)
        return data


class _RowGroups:
    """A Parquet shard's row groups as a list of record batches, each decoded on first use
    and a few kept decoded (memory stays at a few row groups, not the shard)."""

    def __init__(self, parquet: pq.ParquetFile, columns: list[str], name: str, keep: int = 4):
        self.parquet, self.columns, self.name, self.keep = parquet, columns, name, keep
        self._decoded: OrderedDict[int, pa.RecordBatch] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.parquet.num_row_groups

    def __getitem__(self, i: int) -> pa.RecordBatch:
        with self._lock:
            if i in self._decoded:
                self._decoded.move_to_end(i)
                return self._decoded[i]
            try:
                table = self.parquet.read_row_group(i, columns=self.columns).combine_chunks()
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{self.name}: corrupt shard, cannot decode row group {i} ({exc}); "
                                   "re-create the dataset") from None
            batch = table.to_batches()[0]
            self._decoded[i] = batch
            while len(self._decoded) > self.keep:
                self._decoded.popitem(last=False)
            return batch
