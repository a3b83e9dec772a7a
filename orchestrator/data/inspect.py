"""`trainctl data inspect`: what a dataset holds, and (with --verify) whether its shards are intact."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fs import read_manifest, resolve


def describe(path: str) -> dict:
    fs, base = resolve(path)
    m = read_manifest(fs, base)
    return {
        "path": path, "format": m.format, "schema": m.schema.to_string(show_schema_metadata=False),
        "columns": m.schema.names, "shards": len(m.shards), "rows": m.num_rows, "bytes": m.num_bytes,
        "files": [{"file": s.file, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256} for s in m.shards],
    }


def verify(path: str) -> list[str]:
    """Every problem found, one line each, naming the shard file."""
    fs, base = resolve(path)
    m = read_manifest(fs, base)
    problems = []
    for shard in m.shards:
        name = f"{path.rstrip('/')}/{shard.file}"
        full = f"{base}/{shard.file}"
        info = fs.get_file_info(full)
        if info.type == pafs.FileType.NotFound:
            problems.append(f"{name}: missing shard")
            continue
        if info.size != shard.bytes:
            problems.append(f"{name}: size {info.size} bytes, manifest.json says {shard.bytes}")
        with fs.open_input_stream(full) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(f"{name}: checksum mismatch")
        try:
            buf = pa.py_buffer(data)
            table = pa.ipc.open_file(buf).read_all() if m.format == "arrow" else pq.read_table(pa.BufferReader(buf))
        except (pa.ArrowException, OSError) as exc:
            problems.append(f"{name}: cannot be decoded ({exc})")
            continue
        if not table.schema.remove_metadata().equals(m.schema.remove_metadata()):
            problems.append(f"{name}: schema differs from manifest.json")
        if table.num_rows != shard.rows:
            problems.append(f"{name}: {table.num_rows} rows, manifest.json says {shard.rows}")
    return problems
