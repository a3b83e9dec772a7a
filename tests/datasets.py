"""Small sharded datasets written straight with pyarrow (independent of `trainctl data shard`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.data.manifest import MANIFEST_NAME, Manifest, ShardInfo

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("x", pa.list_(pa.float32(), 4)),          # fixed-size list: becomes an (n, 4) tensor
    ("tokens", pa.list_(pa.int32())),          # ragged: padded or packed
])


def rows_table(start: int, count: int) -> pa.Table:
    ids = np.arange(start, start + count, dtype=np.int64)
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, 4).astype(np.float32)), 4)
    tokens = pa.array([list(range(int(i) % 5)) for i in ids], type=pa.list_(pa.int32()))
    return pa.table([pa.array(ids), x, tokens], schema=SCHEMA)


def write_dataset(directory: Path, shard_rows: list[int], fmt: str = "arrow", batch_rows: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for i, rows in enumerate(shard_rows):
        table = rows_table(start, rows)
        name = f"shard-{i:05d}.{fmt}"
        path = directory / name
        if fmt == "arrow":
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
                for batch in table.to_batches(max_chunksize=batch_rows):
                    writer.write_batch(batch)
        else:
            pq.write_table(table, str(path), row_group_size=batch_rows)
        data = path.read_bytes()
        shards.append(ShardInfo(name, rows, len(data), hashlib.sha256(data).hexdigest()))
        start += rows
    (directory / MANIFEST_NAME).write_text(Manifest(fmt, SCHEMA, shards).to_json())
    return directory
