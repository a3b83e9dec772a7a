"""S3 round trip against a real S3-compatible HTTP server (moto's) on 127.0.0.1."""

from __future__ import annotations

import pytest

from orchestrator.data.inspect import describe, verify
from orchestrator.data.loader import ShardedDataset
from orchestrator.data.writer import shard_dataset

from ..datasets import write_dataset
from ..s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = pytest.mark.timeout(120)


def test_shard_to_s3_inspect_and_stream_back(s3_endpoint, tmp_path):  # noqa: F811  (the fixture)
    sources = [str(p) for p in sorted(write_dataset(tmp_path / "src", [300, 50, 250]).glob("shard-*.arrow"))]
    manifest = shard_dataset(sources, "s3://trainctl-test/ds", rows_per_shard=128)
    local = tmp_path / "local"
    shard_dataset(sources, str(local), rows_per_shard=128)  # the same layout on disk
    assert [s.rows for s in manifest.shards] == [128, 128, 128, 128, 88]
    info = describe("s3://trainctl-test/ds")
    assert info["rows"] == 600 and info["shards"] == 5
    assert verify("s3://trainctl-test/ds") == []
    kwargs = dict(batch_size=32, shuffle=True, seed=3)
    from_s3 = [i for r in range(2) for b in ShardedDataset("s3://trainctl-test/ds", rank=r, world_size=2, **kwargs)
               for i in b["id"].tolist()]
    from_disk = [i for r in range(2) for b in ShardedDataset(str(local), rank=r, world_size=2, **kwargs)
                 for i in b["id"].tolist()]
    assert from_s3 == from_disk and len(from_s3) == 576  # 600 minus the dropped remainder
