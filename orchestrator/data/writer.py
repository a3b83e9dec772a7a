"""`trainctl data shard`: any tabular source -> Arrow IPC (or Parquet) shards + manifest.json."""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .fs import resolve
from .manifest import FORMATS, MANIFEST_NAME, DatasetError, Manifest, ShardInfo

_SUFFIX_FORMAT = {".parquet": "parquet", ".pq": "parquet", ".arrow": "ipc", ".feather": "ipc",
                  ".ipc": "ipc", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


def _is_callable_ref(source: str) -> bool:
    return ":" in source and "://" not in source and not Path(source).exists()


def _from_callable(ref: str) -> Iterator[pa.RecordBatch]:
    module_name, _, attr = ref.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules of the current directory
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DatasetError(f"{ref}: cannot load the function ({exc}); give module.path:function") from None
    result = fn()
    items = [result] if isinstance(result, (pa.Table, pa.RecordBatch)) else result
    for item in items:
        if isinstance(item, pa.Table):
            yield from item.to_batches()
        elif isinstance(item, pa.RecordBatch):
            yield item
        else:
            raise DatasetError(f"{ref}: returned {type(item).__name__}; return a pyarrow Table, "
                               "RecordBatch, or an iterable of them")


def _ipc_batches(path: str) -> Iterator[pa.RecordBatch]:
    try:
        reader = pa.ipc.open_file(pa.memory_map(path))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    except pa.ArrowInvalid:  # not the file format: try the stream format
        with pa.OSFile(path) as f:
            yield from pa.ipc.open_stream(f)


def _file_batches(path: str, kind: str) -> Iterator[pa.RecordBatch]:
    try:
        if kind == "parquet":
            yield from pq.ParquetFile(path).iter_batches()
        elif kind == "ipc":
            yield from _ipc_batches(path)
        elif kind == "csv":
            yield from pacsv.open_csv(path)
        else:
            yield from pajson.read_json(path).to_batches()
    except pa.ArrowException as exc:
        raise DatasetError(f"{path}: cannot read it as {kind} ({exc})") from None


def _expand(sources: list[str]) -> list[tuple[str, str]]:
    """(source, kind) for every input file; directories contribute their files in name order."""
    out = []
    for source in sources:
        if _is_callable_ref(source):
            out.append((source, "callable"))
            continue
        path = Path(source)
        if not path.exists():
            raise DatasetError(f"{source}: no such file or directory; give files, directories or module:function")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            kind = _SUFFIX_FORMAT.get(f.suffix.lower())
            if kind is None:
                if path.is_dir():
                    continue  # not data (e.g. a README) inside a directory of data
                raise DatasetError(f"{f}: unknown file type; use .parquet, .arrow/.feather/.ipc, .csv or .jsonl")
            out.append((str(f), kind))
    if not out:
        raise DatasetError(f"{', '.join(sources)}: no input files found")
    return out


def _batches(sources: list[str]) -> Iterator[tuple[str, pa.RecordBatch]]:
    for source, kind in _expand(sources):
        batches = _from_callable(source) if kind == "callable" else _file_batches(source, kind)
        for batch in batches:
            yield source, batch


class _ShardSink:
    """Writes one shard file at a time and hashes it as it goes."""

    def __init__(self, fs: pafs.FileSystem, base: str, fmt: str, schema: pa.Schema,
                 compression: str | None, batch_rows: int):
        self.fs, self.base, self.fmt, self.schema = fs, base, fmt, schema
        self.compression, self.batch_rows = compression, batch_rows
        self.shards: list[ShardInfo] = []

    def write(self, table: pa.Table) -> None:
        name = f"shard-{len(self.shards):05d}.{self.fmt}"
        sink = pa.BufferOutputStream()
        if self.fmt == "arrow":
            options = pa.ipc.IpcWriteOptions(compression=self.compression)
            with pa.ipc.new_file(sink, self.schema, options=options) as writer:
                for batch in table.to_batches(max_chunksize=self.batch_rows):
                    writer.write_batch(batch)
        else:
            pq.write_table(table, sink, row_group_size=self.batch_rows, compression=self.compression or "snappy")
        data = sink.getvalue()
        with self.fs.open_output_stream(f"{self.base}/{name}") as out:
            out.write(data)
        self.shards.append(ShardInfo(name, table.num_rows, data.size, hashlib.sha256(data).hexdigest()))


def shard_dataset(sources: list[str], out: str, format: str = "arrow", rows_per_shard: int = 100_000,
                  compression: str | None = None, batch_rows: int = 8192, overwrite: bool = False,
                  progress: Callable[[int], None] | None = None) -> Manifest:
    """Write `sources` as shards of `rows_per_shard` rows under `out`; the manifest goes last."""
    if format not in FORMATS:
        raise DatasetError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if rows_per_shard < 1 or batch_rows < 1:
        raise DatasetError("--rows-per-shard must be at least 1")
    fs, base = resolve(out)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise DatasetError(f"{out}: is a file; give a directory for the shards")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(base)):
        if not overwrite:
            raise DatasetError(f"{out}: directory is not empty; pass --overwrite or choose another --out")
        fs.delete_dir_contents(base)
    fs.create_dir(base, recursive=True)

    schema: pa.Schema | None = None
    first_source = None
    sink: _ShardSink | None = None
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for source, batch in _batches(sources):
        if schema is None:
            schema, first_source = batch.schema, source
            sink = _ShardSink(fs, base, format, schema, compression, batch_rows)
        elif not batch.schema.equals(schema):
            raise DatasetError(_schema_mismatch(first_source, schema, source, batch.schema))
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= rows_per_shard:
            table = pa.Table.from_batches(pending, schema)
            sink.write(table.slice(0, rows_per_shard))
            rest = table.slice(rows_per_shard)
            pending, pending_rows = rest.to_batches(), rest.num_rows
            if progress:
                progress(rows_per_shard)
    if sink is None or (pending_rows == 0 and not sink.shards):
        raise DatasetError(f"{', '.join(sources)}: no rows to shard; the inputs are empty")
    if pending_rows:
        sink.write(pa.Table.from_batches(pending, schema))
        if progress:
            progress(pending_rows)
    manifest = Manifest(format, schema, sink.shards, source=list(sources))
    tmp = f"{base}/{MANIFEST_NAME}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(manifest.to_json().encode())
    fs.move(tmp, f"{base}/{MANIFEST_NAME}")  # a dataset is complete only once this exists
    return manifest


def _schema_mismatch(a: str, sa: pa.Schema, b: str, sb: pa.Schema) -> str:
    for field in sa:
        if field.name not in sb.names:
            return f"{b}: schema mismatch with {a}: column {field.name!r} is missing"
        if not sb.field(field.name).type.equals(field.type):
            return (f"{b}: schema mismatch with {a}: column {field.name!r} is "
                    f"{sb.field(field.name).type}, not {field.type}")
    extra = [n for n in sb.names if n not in sa.names]
    return f"{b}: schema mismatch with {a}: extra column {extra[0]!r}" if extra else \
        f"{b}: schema mismatch with {a}: columns in another order"


__all__ = ["shard_dataset"]
