"""`trainctl data inspect`: what a dataset holds, and (with --verify) whether its shards are intact."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fs import display_join, join, read_manifest, resolve
from .manifest import Manifest, ShardInfo
from .writer import PARQUET_STREAMING, schema_difference

_CHUNK = 4 << 20  # hash shards in pieces: a shard may be far larger than memory


def describe(path: str) -> dict:
    """Everything the manifest says, as plain data (the CLI prints it, or dumps it as JSON)."""
    fs, base = resolve(path)
    m = read_manifest(fs, base, path)
    return {
        "path": path, "format": m.format, "schema": m.schema.to_string(show_schema_metadata=False),
        "columns": m.schema.names, "shards": len(m.shards), "rows": m.num_rows, "bytes": m.num_bytes,
        "created_at": m.created_at, "source": m.source,
        "files": [{"file": s.file, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256} for s in m.shards],
    }


def verify(path: str) -> list[str]:
    """Every problem found, one line each, naming the shard file; [] when all is well.

    Reads every shard in full: its size and sha256 against the manifest, then decodes
    every batch and compares schema and row count."""
    fs, base = resolve(path)
    m = read_manifest(fs, base, path)
    problems: list[str] = []
    for shard in m.shards:
        problems += _check_shard(fs, join(base, shard.file), display_join(path, shard.file), shard, m)
    return problems


def _check_shard(fs: pafs.FileSystem, full: str, name: str, shard: ShardInfo, m: Manifest) -> list[str]:
    info = fs.get_file_info(full)
    if info.type == pafs.FileType.NotFound:
        return [f"{name}: missing shard (listed in manifest.json)"]
    if info.size != shard.bytes:  # the checksum cannot match either: one line says it
        problems = [f"{name}: size {info.size} bytes, manifest.json says {shard.bytes}"]
    elif _sha256(fs, full) != shard.sha256:
        problems = [f"{name}: checksum mismatch (sha256 differs from manifest.json)"]
    else:
        problems = []
    try:
        schema, rows = _decode(fs, full, m.format)
    except (pa.ArrowException, OSError) as exc:
        return problems + [f"{name}: cannot be decoded as {m.format} ({exc})"]
    diff = schema_difference(m.schema, schema)
    if diff:
        problems.append(f"{name}: schema differs from manifest.json: {diff}")
    if rows != shard.rows:
        problems.append(f"{name}: {rows} rows, manifest.json says {shard.rows}")
    return problems


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(fs: pafs.FileSystem, path: str, fmt: str) -> tuple[pa.Schema, int]:
    """(schema, rows) after decoding and validating every batch, one at a time."""
    rows = 0
    with fs.open_input_file(path) as f:
        if fmt == "arrow":
            reader = pa.ipc.open_file(f)
            schema = reader.schema
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                batch.validate(full=True)  # offsets and lengths, not just the framing
                rows += batch.num_rows
        else:
            pf = pq.ParquetFile(f, **PARQUET_STREAMING)
            schema = pf.schema_arrow
            for batch in pf.iter_batches():
                batch.validate(full=True)
                rows += batch.num_rows
    return schema, rows
