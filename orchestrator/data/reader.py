"""Rows by global index from a sharded dataset: memory-mapped Arrow IPC, Parquet by row group."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .manifest import DatasetError, Manifest


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
        self._starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards])]).astype(np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self.cache_shards = cache_shards
        self._local = isinstance(fs, pafs.LocalFileSystem)

    def _path(self, shard: int) -> str:
        return f"{self.base}/{self.manifest.shards[shard].file}"

    def _open(self, shard: int) -> pa.Table:
        info = self.manifest.shards[shard]
        path = self._path(shard)
        name = f"{self.where.rstrip('/')}/{info.file}"
        try:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise DatasetError(f"{name}: missing shard (listed in manifest.json); "
                                   "restore the file or re-create the dataset")
            if self.verify:
                self._verify_checksum(path, info.sha256, name)
            if self.manifest.format == "arrow":
                # Local shards are memory-mapped: batches are views of the page cache, not copies.
                source = pa.memory_map(path) if self._local else self.fs.open_input_file(path)
                table = pa.ipc.open_file(source).read_all()
            else:
                table = pq.ParquetFile(self.fs.open_input_file(path)).read()
        except DatasetError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{name}: corrupt shard, cannot decode it ({exc}); "
                               "re-create the dataset or run 'trainctl data inspect --verify'") from None
        if not table.schema.remove_metadata().equals(self.manifest.schema.remove_metadata()):
            raise DatasetError(f"{name}: schema mismatch with manifest.json "
                               f"({table.schema.to_string()!r} vs {self.manifest.schema.to_string()!r}); "
                               "re-create the dataset from sources with one schema")
        if table.num_rows != info.rows:
            raise DatasetError(f"{name}: corrupt shard: {table.num_rows} rows, manifest.json says {info.rows}")
        return table.select(self.columns)

    def _verify_checksum(self, path: str, expected: str, name: str) -> None:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise DatasetError(f"{name}: corrupt shard: checksum mismatch with manifest.json; "
                               "re-create the dataset")

    def table(self, shard: int) -> pa.Table:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        table = self._open(shard)
        self._cache[shard] = table
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return table

    def rows(self, rows: np.ndarray) -> pa.Table:
        """The given global rows, in that order. A run inside one shard is a zero-copy slice."""
        shards = np.searchsorted(self._starts, rows, side="right") - 1
        first = int(shards[0])
        local = rows - self._starts[shards]
        if (shards == first).all():
            lo = int(local[0])
            if local[-1] - lo == len(local) - 1 and (np.diff(local) == 1).all():
                return self.table(first).slice(lo, len(local))
            return self.table(first).take(pa.array(local))
        used = list(dict.fromkeys(shards.tolist()))  # in order of first use
        offset = {s: 0 for s in used}
        total = 0
        for s in used:
            offset[s] = total
            total += self.manifest.shards[s].rows
        combined = pa.concat_tables([self.table(s) for s in used])  # chunked: no copy
        index = local + np.array([offset[s] for s in shards.tolist()], dtype=np.int64)
        return combined.take(pa.array(index))
