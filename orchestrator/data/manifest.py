"""A sharded dataset's manifest: schema, shard files, row counts, sizes, checksums.

`manifest.json` sits beside the shards. It is the canonical shard layout: sample
order, rank shares and resume positions are all defined on it, never on the files
a directory listing happens to return.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from ..errors import UserError

MANIFEST_NAME = "manifest.json"
FORMATS = ("arrow", "parquet")
VERSION = 1


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read: the message names the file or column and the fix.

    From the CLI it is one line and exit 2; raised inside a job it fails the job
    at once (restarting cannot fix bad data)."""


@dataclass(frozen=True)
class ShardInfo:
    file: str   # relative to the dataset directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format: str
    schema: pa.Schema
    shards: list[ShardInfo]
    created_at: float = field(default_factory=time.time)
    source: list[str] = field(default_factory=list)
    version: int = VERSION

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version,
            "format": self.format,
            "num_rows": self.num_rows,
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
            "schema_text": self.schema.to_string(show_schema_metadata=False),
            "shards": [asdict(s) for s in self.shards],
            "created_at": self.created_at,
            "source": self.source,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            doc = json.loads(text)
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(doc["schema"])))
            shards = [ShardInfo(**s) for s in doc["shards"]]
            fmt = doc["format"]
        except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            raise DatasetError(f"{where}: not a valid trainctl manifest ({exc}); "
                               "re-create the dataset with 'trainctl data shard'") from None
        if fmt not in FORMATS:
            raise DatasetError(f"{where}: unknown shard format {fmt!r}; expected one of {FORMATS}")
        return cls(format=fmt, schema=schema, shards=shards, created_at=doc.get("created_at", 0.0),
                   source=doc.get("source", []), version=doc.get("version", VERSION))
