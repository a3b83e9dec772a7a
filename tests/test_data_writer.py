"""`trainctl data shard` / `inspect`: every input kind, shard sizes, manifest truth, errors."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from orchestrator.data.fs import read_manifest, resolve
from orchestrator.data.inspect import describe, verify
from orchestrator.data.manifest import DatasetError
from orchestrator.data.writer import shard_dataset

from .helpers import trainctl

pytestmark = pytest.mark.timeout(120)


def simple(start: int, n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "v": pa.array([float(i) / 2 for i in range(start, start + n)], pa.float64())})


def make_table() -> pa.Table:  # used as a module:function source
    return simple(0, 25)


@pytest.fixture
def sources(tmp_path):
    pq.write_table(simple(0, 100), tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as f, pa.ipc.new_file(f, simple(100, 50).schema) as w:
        w.write_table(simple(100, 50))
    with pa.OSFile(str(tmp_path / "c.ipc"), "wb") as f, pa.ipc.new_stream(f, simple(150, 30).schema) as w:
        w.write_table(simple(150, 30))
    pacsv.write_csv(simple(180, 20), tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"id": i, "v": i / 2}) + "\n" for i in range(200, 210)))
    return tmp_path


def _ids(path) -> list[int]:
    fs, base = resolve(str(path))
    m = read_manifest(fs, base)
    out = []
    for s in m.shards:
        out += pa.ipc.open_file(pa.memory_map(f"{base}/{s.file}")).read_all().column("id").to_pylist()
    return out


def test_every_input_kind_in_order_and_split_by_rows_per_shard(sources, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    inputs = [str(sources / n) for n in ("a.parquet", "b.arrow", "c.ipc", "d.csv", "e.jsonl")]
    out = tmp_path / "out"
    manifest = shard_dataset(inputs + ["tests.test_data_writer:make_table"], str(out), rows_per_shard=64,
                             batch_rows=16)
    assert [s.rows for s in manifest.shards] == [64, 64, 64, 43]
    assert _ids(out) == list(range(210)) + list(range(25))
    for shard in manifest.shards:  # the manifest tells the truth about every file
        data = (out / shard.file).read_bytes()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
        reader = pa.ipc.open_file(pa.memory_map(str(out / shard.file)))  # memory-mappable IPC file
        assert max(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)) == 16


def test_a_directory_source_and_parquet_output(sources, tmp_path):
    src = tmp_path / "dir"
    src.mkdir()
    pq.write_table(simple(0, 40), src / "1.parquet")
    pq.write_table(simple(40, 40), src / "2.parquet")
    (src / "README").write_text("not data")
    manifest = shard_dataset([str(src)], str(tmp_path / "pq"), format="parquet", rows_per_shard=50, batch_rows=10)
    assert manifest.format == "parquet" and [s.rows for s in manifest.shards] == [50, 30]
    f = pq.ParquetFile(tmp_path / "pq" / "shard-00000.parquet")
    assert f.metadata.num_row_groups == 5


def test_schema_mismatch_names_both_files(tmp_path):
    pq.write_table(simple(0, 5), tmp_path / "a.parquet")
    pq.write_table(simple(0, 5).rename_columns(["id", "w"]), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match=r"b\.parquet: schema mismatch with .*a\.parquet"):
        shard_dataset([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "o"))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_empty_input_and_busy_output_are_errors(tmp_path):
    pq.write_table(simple(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match="no rows"):
        shard_dataset([str(tmp_path / "empty.parquet")], str(tmp_path / "o1"))
    pq.write_table(simple(0, 5), tmp_path / "a.parquet")
    shard_dataset([str(tmp_path / "a.parquet")], str(tmp_path / "o2"))
    with pytest.raises(DatasetError, match="not empty; pass --overwrite"):
        shard_dataset([str(tmp_path / "a.parquet")], str(tmp_path / "o2"))
    shard_dataset([str(tmp_path / "a.parquet")], str(tmp_path / "o2"), overwrite=True)


def test_verify_names_each_damaged_file(tmp_path):
    pq.write_table(simple(0, 300), tmp_path / "a.parquet")
    out = tmp_path / "o"
    shard_dataset([str(tmp_path / "a.parquet")], str(out), rows_per_shard=100)
    assert verify(str(out)) == [] and describe(str(out))["rows"] == 300
    flipped = bytearray((out / "shard-00000.arrow").read_bytes())
    flipped[len(flipped) // 2] ^= 1
    (out / "shard-00000.arrow").write_bytes(bytes(flipped))
    (out / "shard-00001.arrow").write_bytes((out / "shard-00001.arrow").read_bytes()[:-30])
    (out / "shard-00002.arrow").unlink()
    problems = verify(str(out))
    assert any("shard-00000.arrow: checksum mismatch" in p for p in problems)
    assert any("shard-00001.arrow" in p and "size" in p for p in problems)
    assert any("shard-00002.arrow: missing shard" in p for p in problems)


def test_cli_shard_and_inspect(tmp_path):
    pq.write_table(simple(0, 120), tmp_path / "a.parquet")
    out = tmp_path / "o"
    made = trainctl("data", "shard", str(tmp_path / "a.parquet"), "--out", str(out), "--rows-per-shard", "50")
    assert made.returncode == 0 and "wrote 3 arrow shards, 120 rows" in made.stdout
    info = json.loads(trainctl("data", "inspect", str(out), "--verify", "--json").stdout)
    assert info["rows"] == 120 and info["shards"] == 3 and info["problems"] == []
    (out / "shard-00001.arrow").unlink()
    broken = trainctl("data", "inspect", str(out), "--verify")
    assert broken.returncode == 1 and "shard-00001.arrow: missing shard" in broken.stdout
