"""`trainctl data shard`: any tabular source -> Arrow IPC (or Parquet) shards + manifest.json.

Everything streams: sources are read a record batch at a time and shards are written
(and hashed) as the batches arrive, so memory stays near one batch whatever the size
of the inputs. The manifest is written last, atomically: a crashed or failed write
leaves no manifest, and readers refuse a directory without one.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from strategies.refs import RefError, load_ref

from .fs import join, resolve, write_bytes_atomically
from .manifest import FORMATS, MANIFEST_NAME, DatasetError, Manifest, ShardInfo

_SUFFIX_KIND = {".parquet": "parquet", ".pq": "parquet", ".arrow": "ipc", ".feather": "ipc",
                ".ipc": "ipc", ".arrows": "ipc", ".csv": "csv", ".jsonl": "json", ".json": "json",
                ".ndjson": "json"}
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# CSV/JSON column types are inferred from the first block only (pyarrow's streaming
# readers): a big block makes that inference see more rows, at a bounded memory cost.
_TEXT_BLOCK = 16 << 20
# Parquet's default pre-buffering reads ahead across row groups (a whole file in memory);
# a buffered stream reads column chunks piecewise instead.
PARQUET_STREAMING = {"pre_buffer": False, "buffer_size": 4 << 20}
ARROW_CODECS = ("lz4", "zstd")
PARQUET_CODECS = ("snappy", "gzip", "brotli", "zstd", "lz4")
_NO_CODEC = (None, "", "none", "uncompressed")


@dataclass(frozen=True)
class _Source:
    name: str                      # as the user wrote it (or the file inside their directory)
    kind: str                      # parquet | ipc | csv | json | callable
    fs: pafs.FileSystem | None = None
    path: str = ""


# --- reading ------------------------------------------------------------------------------

def _expand(sources: list[str]) -> list[_Source]:
    """Every input file; directories contribute their data files in path order."""
    out: list[_Source] = []
    for source in sources:
        if "://" not in source and _CALLABLE.match(source) and not os.path.exists(source):
            out.append(_Source(source, "callable"))
            continue
        fs, path = resolve(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DatasetError(f"{source}: no such file or directory; "
                               "give files, directories or module.path:function")
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for f in sorted((f for f in found if f.type == pafs.FileType.File), key=lambda f: f.path):
                kind = _SUFFIX_KIND.get(os.path.splitext(f.base_name)[1].lower())
                # Skip what is not data: READMEs, _SUCCESS/.crc markers, a dataset's manifest.
                if kind and f.base_name != MANIFEST_NAME and f.base_name[0] not in "._":
                    out.append(_Source(_display(source, path, f.path), kind, fs, f.path))
            continue
        kind = _SUFFIX_KIND.get(os.path.splitext(path)[1].lower())
        if kind is None:
            raise DatasetError(f"{source}: unknown file type; use .parquet, .arrow/.feather/.ipc, "
                               ".csv, .jsonl, a directory of them, or module.path:function")
        out.append(_Source(source, kind, fs, path))
    if not out:
        raise DatasetError(f"{', '.join(sources)}: no data files found "
                           "(.parquet, .arrow/.feather/.ipc, .csv, .jsonl)")
    return out


def _display(source: str, root: str, path: str) -> str:
    return source.rstrip("/") + path[len(root.rstrip("/")):]


def _from_callable(ref: str) -> Iterator[pa.RecordBatch]:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    try:
        fn = load_ref(ref)
    except RefError as exc:
        raise DatasetError(f"{ref}: cannot load the function ({exc}); "
                           "give module.path:function, importable from here") from None
    result = fn()
    # One Table or RecordBatch, or any iterable of them (a generator streams).
    items: Iterable = [result] if isinstance(result, (pa.Table, pa.RecordBatch)) else result
    if not isinstance(items, Iterable):
        items = [items]
    for item in items:
        if isinstance(item, pa.Table):
            yield from item.to_batches()
        elif isinstance(item, pa.RecordBatch):
            yield item
        else:
            raise DatasetError(f"{ref}: returned {type(item).__name__}; return a pyarrow Table, "
                               "RecordBatch, or an iterable of them")


def _ipc_batches(src: _Source) -> Iterator[pa.RecordBatch]:
    try:  # the random-access file format (what .arrow/.feather usually hold)...
        reader = pa.ipc.open_file(src.fs.open_input_file(src.path))
    except pa.ArrowInvalid:  # ...else the stream format
        with src.fs.open_input_stream(src.path) as f:
            yield from pa.ipc.open_stream(f)
        return
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def _file_batches(src: _Source, like: pa.Schema | None) -> Iterator[pa.RecordBatch]:
    """`like` (the first source's schema) types CSV columns instead of guessing them."""
    try:
        if src.kind == "parquet":
            yield from pq.ParquetFile(src.fs.open_input_file(src.path), **PARQUET_STREAMING).iter_batches()
        elif src.kind == "ipc":
            yield from _ipc_batches(src)
        elif src.kind == "csv":
            # Columns absent from the file stay absent (JSON's explicit_schema would invent
            # all-null ones instead, hiding a missing column: JSON is conformed afterwards).
            convert = pacsv.ConvertOptions(column_types=like) if like else None
            with src.fs.open_input_stream(src.path) as f:
                yield from pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=_TEXT_BLOCK),
                                          convert_options=convert)
        else:
            with src.fs.open_input_stream(src.path) as f:
                yield from pajson.open_json(f, read_options=pajson.ReadOptions(block_size=_TEXT_BLOCK))
    except pa.ArrowException as exc:
        hint = ("; column types come from the first source, else from the file's first rows: "
                "make the values consistent or convert the file to Parquet"
                if src.kind in ("csv", "json") else "")
        raise DatasetError(f"{src.name}: cannot read it as {src.kind} ({exc}){hint}") from None


def _batches(sources: list[_Source]) -> Iterator[tuple[_Source, pa.RecordBatch]]:
    schema = None
    for src in sources:
        batches = _from_callable(src.name) if src.kind == "callable" else _file_batches(src, schema)
        for batch in batches:
            schema = schema or batch.schema
            yield src, batch


def schema_difference(expected: pa.Schema, got: pa.Schema, by_name: bool = False) -> str | None:
    """What differs between two schemas, naming the column; None when they match.

    Metadata is ignored: it does not change the data (Parquet files carry pandas')."""
    for field in expected:
        if field.name not in got.names:
            return f"column {field.name!r} is missing"
        other = got.field(field.name)
        if not other.type.equals(field.type):
            return f"column {field.name!r} is {other.type}, not {field.type}"
        if other.nullable != field.nullable:
            return f"column {field.name!r} is {'' if other.nullable else 'not '}nullable here"
    extra = [n for n in got.names if n not in expected.names]
    if extra:
        return f"extra column {extra[0]!r}"
    if got.names != expected.names and not by_name:
        return f"columns in another order ({', '.join(got.names)})"
    return None


def _conform(batch: pa.RecordBatch, schema: pa.Schema, src: _Source, first: str) -> pa.RecordBatch:
    """`batch` with exactly `schema`, or a DatasetError naming both sources and the column.

    Parquet, Arrow and functions declare their types: those must match. CSV and JSON
    types are guesses from the text (`1` is int64, `1.5` double), so their columns
    are matched by name and converted where no value changes (int64 -> double)."""
    if batch.schema.equals(schema):
        return batch if batch.schema.equals(schema, check_metadata=True) else \
            pa.RecordBatch.from_arrays(batch.columns, schema=schema)  # metadata only
    guessed = src.kind in ("csv", "json")
    diff = schema_difference(schema, batch.schema, by_name=guessed)
    if guessed and sorted(batch.schema.names) == sorted(schema.names):
        try:
            columns = []
            for field in schema:
                column = batch.column(field.name)
                if not column.type.equals(field.type):
                    column = pc.cast(column, field.type, safe=True)
                if not field.nullable and column.null_count:
                    raise ValueError(f"nulls in non-nullable column {field.name!r}")
                columns.append(column)
            return pa.RecordBatch.from_arrays(columns, schema=schema)
        except (pa.ArrowException, ValueError) as exc:
            diff = f"{diff}, and its values do not convert ({exc})"
    if diff is None:  # only possible for guessed types: same names, other order
        return pa.RecordBatch.from_arrays([batch.column(n) for n in schema.names], schema=schema)
    raise DatasetError(f"{src.name}: schema mismatch with {first}: {diff}; "
                       "every source needs the same columns and types")


# --- writing ------------------------------------------------------------------------------

class _RowQueue:
    """Batches in, exactly-sized batches out (shards get record batches of batch_rows)."""

    def __init__(self) -> None:
        self.parts: list[pa.RecordBatch] = []
        self.rows = 0

    def push(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.parts.append(batch)
            self.rows += batch.num_rows

    def take(self, n: int) -> pa.RecordBatch:
        out, need = [], n
        while need:
            head = self.parts[0]
            if head.num_rows <= need:
                out.append(self.parts.pop(0))
                need -= head.num_rows
            else:
                out.append(head.slice(0, need))
                self.parts[0] = head.slice(need)
                need = 0
        self.rows -= n
        return out[0] if len(out) == 1 else pa.concat_batches(out)


class _HashingSink:
    """A file-like sink that hashes and counts what passes through to `raw`."""

    def __init__(self, raw: pa.NativeFile):
        self.raw, self.sha, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.raw.close()


class _ShardWriter:
    """One shard file, written batch by batch and hashed on the way out."""

    def __init__(self, fs: pafs.FileSystem, path: str, fmt: str, schema: pa.Schema,
                 compression: str | None):
        self.sink = _HashingSink(fs.open_output_stream(path))
        self.rows = 0
        self.parquet = fmt == "parquet"
        if self.parquet:
            self.writer = pq.ParquetWriter(self.sink, schema, compression=compression or "snappy")
        else:
            options = pa.ipc.IpcWriteOptions(compression=compression)
            self.writer = pa.ipc.new_file(self.sink, schema, options=options)

    def write(self, batch: pa.RecordBatch) -> None:
        if self.parquet:
            self.writer.write_batch(batch, row_group_size=batch.num_rows)  # one row group each
        else:
            self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> tuple[int, str]:
        """(bytes, sha256) of the finished file."""
        self.writer.close()
        self.sink.close()
        return self.sink.size, self.sink.sha.hexdigest()

    def discard(self) -> None:
        try:
            self.sink.close()
        except OSError:
            pass  # the file is deleted next anyway


class _ShardSet:
    """Cuts the row stream into shards of `rows_per_shard` rows, batches of `batch_rows`."""

    def __init__(self, fs: pafs.FileSystem, base: str, fmt: str, codec: str | None,
                 schema: pa.Schema, rows_per_shard: int, batch_rows: int):
        self.fs, self.base, self.fmt, self.codec, self.schema = fs, base, fmt, codec, schema
        self.rows_per_shard, self.batch_rows = rows_per_shard, batch_rows
        self.queue = _RowQueue()
        self.shards: list[ShardInfo] = []
        self.written: list[str] = []  # paths, for cleaning up after a failure
        self.current: _ShardWriter | None = None

    def _want(self) -> int:  # the next batch ends at batch_rows or at the shard's end
        done = self.current.rows if self.current else 0
        return min(self.batch_rows, self.rows_per_shard - done)

    def push(self, batch: pa.RecordBatch) -> int:
        """Rows written to shards by this call."""
        self.queue.push(batch)
        written = 0
        while self.queue.rows >= self._want():
            written += self._emit(self.queue.take(self._want()))
        return written

    def finish(self) -> int:
        written = 0
        while self.queue.rows:
            written += self._emit(self.queue.take(min(self._want(), self.queue.rows)))
        if self.current is not None:
            self._close()
        return written

    def _emit(self, batch: pa.RecordBatch) -> int:
        if self.current is None:
            self.written.append(join(self.base, f"shard-{len(self.shards):05d}.{self.fmt}"))
            self.current = _ShardWriter(self.fs, self.written[-1], self.fmt, self.schema, self.codec)
        self.current.write(batch)
        if self.current.rows == self.rows_per_shard:
            self._close()
        return batch.num_rows

    def _close(self) -> None:
        rows = self.current.rows
        size, sha = self.current.close()
        self.current = None
        self.shards.append(ShardInfo(self.written[-1].rsplit("/", 1)[-1], rows, size, sha))

    def discard(self) -> None:
        """Remove every file written, so the directory is as we found it and a rerun
        needs no --overwrite."""
        if self.current is not None:
            self.current.discard()
        for path in self.written:
            try:
                self.fs.delete_file(path)
            except OSError:
                pass  # never created (the error came first) or already gone


def _codec(fmt: str, compression: str | None) -> str | None:
    codec = None if compression is None or compression.lower() in _NO_CODEC else compression.lower()
    allowed = ARROW_CODECS if fmt == "arrow" else PARQUET_CODECS
    if codec is not None and codec not in allowed:
        raise DatasetError(f"--compression {compression!r}: {fmt} shards take one of "
                           f"{', '.join(allowed)} (or none)")
    if codec is not None and not pa.Codec.is_available(codec):
        raise DatasetError(f"--compression {codec}: this pyarrow build lacks it; pick another")
    return codec


def _prepare_output(fs: pafs.FileSystem, base: str, out: str, overwrite: bool,
                    sources: list[_Source]) -> None:
    for src in sources:  # --overwrite must never delete the inputs
        if src.fs is not None and src.fs.type_name == fs.type_name and \
                (src.path + "/").startswith(base.rstrip("/") + "/"):
            raise DatasetError(f"{out}: holds the source {src.name}; choose another --out")
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise DatasetError(f"{out}: is a file; give a directory for the shards")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(base)):
        if not overwrite:
            raise DatasetError(f"{out}: directory is not empty; pass --overwrite or choose another --out")
        # The old manifest first: were we to crash midway, no manifest may describe new shards.
        if fs.get_file_info(join(base, MANIFEST_NAME)).type == pafs.FileType.File:
            fs.delete_file(join(base, MANIFEST_NAME))
        fs.delete_dir_contents(base)
    fs.create_dir(base, recursive=True)


def shard_dataset(sources: list[str], out: str, format: str = "arrow", rows_per_shard: int = 100_000,
                  compression: str | None = None, batch_rows: int = 8192, overwrite: bool = False,
                  progress: Callable[[int], None] | None = None) -> Manifest:
    """Write `sources` as shards of `rows_per_shard` rows under `out` (a path or URI).

    Shards hold record batches (Arrow) or row groups (Parquet) of `batch_rows` rows;
    `progress(rows)` is called as rows are written. Returns the manifest, written last."""
    if format not in FORMATS:
        raise DatasetError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if rows_per_shard < 1 or batch_rows < 1:
        raise DatasetError("--rows-per-shard and batch_rows must be at least 1")
    codec = _codec(format, compression)
    srcs = _expand(list(sources))
    fs, base = resolve(out)
    _prepare_output(fs, base, out, overwrite, srcs)

    shards: _ShardSet | None = None
    first = ""
    try:
        for src, batch in _batches(srcs):
            if shards is None:
                shards = _ShardSet(fs, base, format, codec, batch.schema, rows_per_shard, batch_rows)
                first = src.name
            batch = _conform(batch, shards.schema, src, first)
            done = shards.push(batch)
            if progress and done:
                progress(done)
        done = shards.finish() if shards else 0
        if progress and done:
            progress(done)
        if shards is None or not shards.shards:
            raise DatasetError(f"{', '.join(sources)}: no rows to shard; the inputs are empty")
        manifest = Manifest(format, shards.schema, shards.shards, source=list(sources))
        write_bytes_atomically(fs, join(base, MANIFEST_NAME), manifest.to_json().encode())
    except BaseException:
        if shards is not None:
            shards.discard()
        raise
    return manifest


__all__ = ["shard_dataset", "schema_difference", "ARROW_CODECS", "PARQUET_CODECS"]
