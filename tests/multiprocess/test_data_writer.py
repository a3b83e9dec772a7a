"""`trainctl data shard` / `inspect`: every input kind, shard sizes, manifest truth, errors, S3."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from orchestrator.data import fs as datafs
from orchestrator.data.cli import data as data_cli
from orchestrator.data.fs import read_manifest, resolve, write_bytes_atomically
from orchestrator.data.inspect import describe, verify
from orchestrator.data.manifest import DatasetError, Manifest
from orchestrator.data.writer import shard_dataset
from orchestrator.errors import UserError

from ..helpers import REPO, trainctl
from ..s3_server import BUCKET, s3_client, s3_endpoint  # noqa: F401  (s3_endpoint: a fixture)

pytestmark = pytest.mark.timeout(120)


def simple(start: int, n: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "v": pa.array([i / 2 for i in range(start, start + n)], pa.float64())})


# module:function sources (imported by name as tests.multiprocess.test_data_writer:...)
def make_table() -> pa.Table:
    return simple(0, 25)


def make_batches():
    for start in range(0, 30, 7):  # a generator: streamed, never a whole table
        yield simple(start, min(7, 30 - start)).to_batches()[0]


def make_nonsense():
    return [{"id": 1}]


def write_ipc(path, table: pa.Table, stream: bool = False) -> None:
    with pa.OSFile(str(path), "wb") as f:
        opener = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opener(f, table.schema) as w:
            w.write_table(table, max_chunksize=13)


def write_jsonl(path, table: pa.Table) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """`tests.multiprocess.test_data_writer:make_table` importable, as from the repository root."""
    monkeypatch.syspath_prepend(REPO)


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(simple(0, 100), src / "a.parquet", row_group_size=30)
    write_ipc(src / "b.arrow", simple(100, 50))
    write_ipc(src / "c.ipc", simple(150, 30), stream=True)
    pacsv.write_csv(simple(180, 20), src / "d.csv")
    write_jsonl(src / "e.jsonl", simple(200, 10))
    return src


def shard_batches(path) -> list[list[int]]:
    """Record batch sizes of every shard, read through a memory map (as the loader does)."""
    m = read_manifest(*resolve(str(path)))
    out = []
    for s in m.shards:
        reader = pa.ipc.open_file(pa.memory_map(str(path / s.file)))
        out.append([reader.get_batch(i).num_rows for i in range(reader.num_record_batches)])
    return out


def ids(path) -> list[int]:
    m = read_manifest(*resolve(str(path)))
    if m.format == "parquet":
        return [i for s in m.shards for i in pq.read_table(path / s.file).column("id").to_pylist()]
    return [i for s in m.shards
            for i in pa.ipc.open_file(pa.memory_map(str(path / s.file))).read_all().column("id").to_pylist()]


def assert_manifest_matches_files(path) -> Manifest:
    m = read_manifest(*resolve(str(path)))
    assert sorted(p.name for p in path.iterdir()) == sorted([s.file for s in m.shards] + ["manifest.json"])
    for s in m.shards:
        data = (path / s.file).read_bytes()
        assert (s.bytes, s.sha256) == (len(data), hashlib.sha256(data).hexdigest()), s.file
        rows = pq.ParquetFile(path / s.file).metadata.num_rows if m.format == "parquet" else \
            pa.ipc.open_file(pa.memory_map(str(path / s.file))).read_all().num_rows
        assert rows == s.rows, s.file
    return m


# --- writing ------------------------------------------------------------------------------

def test_every_input_kind_in_order_split_by_rows_per_shard(sources, tmp_path, on_path):
    inputs = [str(sources / n) for n in ("a.parquet", "b.arrow", "c.ipc", "d.csv", "e.jsonl")]
    out = tmp_path / "out"
    progress = []
    manifest = shard_dataset(inputs + ["tests.multiprocess.test_data_writer:make_table"], str(out),
                             rows_per_shard=64, batch_rows=16, progress=progress.append)
    assert [s.rows for s in manifest.shards] == [64, 64, 64, 43]  # the last shard is smaller
    assert ids(out) == list(range(210)) + list(range(25))
    assert sum(progress) == 235 and manifest.num_rows == 235
    assert manifest.schema.names == ["id", "v"] and manifest.source == inputs + ["tests.multiprocess.test_data_writer:make_table"]
    assert assert_manifest_matches_files(out).num_rows == 235
    # Memory-mappable IPC files whose record batches are batch_rows long, whatever the inputs were.
    assert shard_batches(out) == [[16] * 4] * 3 + [[16, 16, 11]]


def test_batches_end_at_shard_boundaries(sources, tmp_path):
    out = tmp_path / "out"
    shard_dataset([str(sources / "a.parquet")], str(out), rows_per_shard=50, batch_rows=16)
    assert shard_batches(out) == [[16, 16, 16, 2], [16, 16, 16, 2]]
    assert ids(out) == list(range(100))


def test_a_directory_source_and_parquet_row_groups(tmp_path):
    src = tmp_path / "dir"
    (src / "sub").mkdir(parents=True)
    pq.write_table(simple(0, 40), src / "1.parquet")
    pq.write_table(simple(40, 40), src / "sub" / "2.parquet")  # nested: read too, in path order
    (src / "README").write_text("not data")
    (src / "_SUCCESS").write_text("")
    out = tmp_path / "pq"
    manifest = shard_dataset([str(src)], str(out), format="parquet", rows_per_shard=50, batch_rows=10)
    assert manifest.format == "parquet" and [s.rows for s in manifest.shards] == [50, 30]
    assert ids(out) == list(range(80))
    groups = [[pq.ParquetFile(out / s.file).metadata.row_group(i).num_rows
               for i in range(pq.ParquetFile(out / s.file).metadata.num_row_groups)] for s in manifest.shards]
    assert groups == [[10] * 5, [10] * 3]
    assert_manifest_matches_files(out)


def test_function_sources_stream_batches_and_bad_ones_are_named(tmp_path, on_path):
    out = tmp_path / "gen"
    manifest = shard_dataset(["tests.multiprocess.test_data_writer:make_batches"], str(out), rows_per_shard=20)
    assert [s.rows for s in manifest.shards] == [20, 10] and ids(out) == list(range(30))
    with pytest.raises(DatasetError, match=r"tests.multiprocess.test_data_writer:make_nonsense: returned dict"):
        shard_dataset(["tests.multiprocess.test_data_writer:make_nonsense"], str(tmp_path / "x"))
    with pytest.raises(DatasetError, match=r"no_such_module:f: cannot load the function"):
        shard_dataset(["no_such_module:f"], str(tmp_path / "y"))


def test_compressed_arrow_shards_round_trip(sources, tmp_path):
    out = tmp_path / "z"
    shard_dataset([str(sources / "a.parquet")], str(out), rows_per_shard=40, compression="zstd")
    assert ids(out) == list(range(100)) and verify(str(out)) == []
    with pytest.raises(DatasetError, match="arrow shards take one of lz4, zstd"):
        shard_dataset([str(sources / "a.parquet")], str(tmp_path / "z2"), compression="snappy")


def test_digits_example_tables(tmp_path, on_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits-eval"
    manifest = shard_dataset(["examples.digits.data:digits_eval"], str(out))
    assert manifest.num_rows == 360  # 20% of 1797, stratified
    assert manifest.schema.field("image").type == pa.list_(pa.float32(), 64)
    assert manifest.schema.field("label").type == pa.int64()
    table = pa.ipc.open_file(pa.memory_map(str(out / "shard-00000.arrow"))).read_all()
    pixels = table.column("image").combine_chunks().flatten()
    assert 0.0 <= pa.compute.min(pixels).as_py() and pa.compute.max(pixels).as_py() == 1.0
    assert set(table.column("label").to_pylist()) == set(range(10))


# --- refusing bad input -------------------------------------------------------------------

def test_schema_mismatch_names_both_files_and_the_column(tmp_path):
    pq.write_table(simple(0, 5), tmp_path / "a.parquet")
    pq.write_table(simple(0, 5).rename_columns(["id", "w"]), tmp_path / "b.parquet")
    pq.write_table(simple(0, 5).set_column(1, "v", pa.array(["x"] * 5)), tmp_path / "c.parquet")
    a, b, c = (str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet"))
    out = tmp_path / "o"
    with pytest.raises(DatasetError, match=rf"{b}: schema mismatch with {a}: column 'v' is missing"):
        shard_dataset([a, b], str(out), rows_per_shard=2)
    with pytest.raises(DatasetError, match=rf"{c}: schema mismatch with {a}: column 'v' is string, not double"):
        shard_dataset([a, c], str(out), rows_per_shard=2)
    # The failed writes left nothing behind: no manifest, no shards, and no --overwrite needed now.
    assert not out.exists() or list(out.iterdir()) == []
    assert shard_dataset([a], str(out)).num_rows == 5


def test_text_sources_take_the_types_of_the_first_source(tmp_path):
    pq.write_table(simple(0, 4), tmp_path / "a.parquet")
    (tmp_path / "ints.csv").write_text("v,id\n1,4\n2,5\n")              # v looks int64; other order
    write_jsonl(tmp_path / "ints.jsonl", pa.table({"id": [6], "v": [3]}))  # v parses as int64
    (tmp_path / "bad.csv").write_text("id,v\n7,oops\n")
    write_jsonl(tmp_path / "short.jsonl", pa.table({"id": [8]}))
    a = str(tmp_path / "a.parquet")
    out = tmp_path / "o"
    manifest = shard_dataset([a, str(tmp_path / "ints.csv"), str(tmp_path / "ints.jsonl")], str(out))
    table = pa.ipc.open_file(pa.memory_map(str(out / "shard-00000.arrow"))).read_all()
    assert manifest.schema == simple(0, 1).schema
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4, 5, 6]
    assert table.column("v").to_pylist() == [0.0, 0.5, 1.0, 1.5, 1.0, 2.0, 3.0]
    with pytest.raises(DatasetError, match=r"bad\.csv: cannot read it as csv .*oops"):
        shard_dataset([a, str(tmp_path / "bad.csv")], str(tmp_path / "o2"))
    with pytest.raises(DatasetError, match=r"short\.jsonl: schema mismatch with .*a\.parquet: column 'v' is missing"):
        shard_dataset([a, str(tmp_path / "short.jsonl")], str(tmp_path / "o3"))


def test_empty_input_busy_output_and_overwrite(tmp_path):
    pq.write_table(simple(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match="no rows to shard; the inputs are empty"):
        shard_dataset([str(tmp_path / "empty.parquet")], str(tmp_path / "o1"))
    assert not (tmp_path / "o1" / "manifest.json").exists()
    pq.write_table(simple(0, 30), tmp_path / "a.parquet")
    out = tmp_path / "o2"
    shard_dataset([str(tmp_path / "a.parquet")], str(out), rows_per_shard=10)
    with pytest.raises(DatasetError, match=r"o2: directory is not empty; pass --overwrite"):
        shard_dataset([str(tmp_path / "a.parquet")], str(out))
    assert len(read_manifest(*resolve(str(out))).shards) == 3  # untouched by the refusal
    shard_dataset([str(tmp_path / "a.parquet")], str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.arrow"]
    with pytest.raises(DatasetError, match="holds the source"):  # --overwrite never eats its inputs
        shard_dataset([str(tmp_path / "a.parquet")], str(tmp_path), overwrite=True)
    with pytest.raises(DatasetError, match="no such file or directory"):
        shard_dataset([str(tmp_path / "nope.parquet")], str(tmp_path / "o3"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"notes\.txt: unknown file type"):
        shard_dataset([str(tmp_path / "notes.txt")], str(tmp_path / "o4"))


def test_a_write_that_fails_midway_leaves_no_dataset(sources, tmp_path):
    out = tmp_path / "o"
    seen = []

    def crash(rows: int) -> None:
        seen.append(rows)
        if sum(seen) >= 40:
            raise KeyboardInterrupt  # like ^C halfway through
    with pytest.raises(KeyboardInterrupt):
        shard_dataset([str(sources / "a.parquet")], str(out), rows_per_shard=20, batch_rows=10, progress=crash)
    assert list(out.iterdir()) == []  # neither a manifest nor orphan shards
    with pytest.raises(DatasetError, match="no manifest.json; create the dataset with 'trainctl data shard'"):
        read_manifest(*resolve(str(out)))


# --- fs helpers ---------------------------------------------------------------------------

def test_resolve_join_and_atomic_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("rel/ds")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "ds")
    fs, path = resolve(f"file://{tmp_path}/ds/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/ds"
    assert datafs.join("s3-bucket/ds/", "shard-00000.arrow") == "s3-bucket/ds/shard-00000.arrow"
    write_bytes_atomically(fs, str(tmp_path / "f"), b"old")
    write_bytes_atomically(fs, str(tmp_path / "f"), b"new")
    assert (tmp_path / "f").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["f"]
    with pytest.raises(DatasetError, match=r"nosuch://x: cannot open this URI"):
        resolve("nosuch://x")


def test_s3_endpoint_comes_from_the_standard_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")  # the S3-specific one wins
    assert datafs._with_endpoint("s3://b/ds") == "s3://b/ds?endpoint_override=127.0.0.1%3A9001&scheme=http"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert datafs._with_endpoint("s3://b/ds?region=eu-west-1") == \
        "s3://b/ds?region=eu-west-1&endpoint_override=127.0.0.1%3A9000&scheme=http"
    # A URI that names its endpoint keeps it; other schemes are left alone.
    assert datafs._with_endpoint("s3://b/ds?endpoint_override=h:1") == "s3://b/ds?endpoint_override=h:1"
    assert datafs._with_endpoint("gs://b/ds") == "gs://b/ds"


# --- inspect / verify ---------------------------------------------------------------------

def test_verify_names_each_damaged_file(tmp_path):
    pq.write_table(simple(0, 500), tmp_path / "a.parquet")
    out = tmp_path / "o"
    shard_dataset([str(tmp_path / "a.parquet")], str(out), rows_per_shard=100)
    assert verify(str(out)) == []
    info = describe(str(out))
    assert (info["rows"], info["shards"], info["format"]) == (500, 5, "arrow")
    assert [f["rows"] for f in info["files"]] == [100] * 5 and "id: int64" in info["schema"]

    flipped = bytearray((out / "shard-00000.arrow").read_bytes())
    flipped[len(flipped) // 2] ^= 1                                            # one corrupted byte
    (out / "shard-00000.arrow").write_bytes(bytes(flipped))
    (out / "shard-00001.arrow").write_bytes((out / "shard-00001.arrow").read_bytes()[:-30])  # truncated
    (out / "shard-00002.arrow").unlink()                                       # missing
    size = (out / "shard-00003.arrow").stat().st_size
    (out / "shard-00003.arrow").write_bytes(b"\0" * size)                      # undecodable
    other = pa.BufferOutputStream()                                            # another schema
    with pa.ipc.new_file(other, pa.schema([("id", pa.int32())])) as w:
        w.write_table(pa.table({"id": pa.array(range(100), pa.int32())}))
    (out / "shard-00004.arrow").write_bytes(other.getvalue().to_pybytes())

    problems = verify(str(out))
    at = {p.split(": ", 1)[0]: p for p in problems}
    assert f"{out}/shard-00000.arrow: checksum mismatch (sha256 differs from manifest.json)" in problems
    assert any(p.startswith(f"{out}/shard-00001.arrow: size ") for p in problems)
    assert any(p.startswith(f"{out}/shard-00001.arrow: cannot be decoded") for p in problems)
    assert f"{out}/shard-00002.arrow: missing shard (listed in manifest.json)" in problems
    assert any(p.startswith(f"{out}/shard-00003.arrow: cannot be decoded") for p in problems)
    assert f"{out}/shard-00004.arrow: schema differs from manifest.json: column 'id' is int32, not int64" \
        in problems
    assert set(at) == {f"{out}/shard-0000{i}.arrow" for i in range(5)}


def test_verify_reads_parquet_shards(tmp_path):
    pq.write_table(simple(0, 60), tmp_path / "a.parquet")
    out = tmp_path / "o"
    shard_dataset([str(tmp_path / "a.parquet")], str(out), format="parquet", rows_per_shard=30)
    assert verify(str(out)) == []
    (out / "shard-00001.parquet").write_bytes((out / "shard-00001.parquet").read_bytes()[:-10])
    problems = verify(str(out))
    assert any(p.startswith(f"{out}/shard-00001.parquet: size") for p in problems)
    assert any(p.startswith(f"{out}/shard-00001.parquet: cannot be decoded as parquet") for p in problems)
    assert not any("shard-00000" in p for p in problems)


# --- the CLI ------------------------------------------------------------------------------

def test_cli_shard_and_inspect(tmp_path):
    pq.write_table(simple(0, 120), tmp_path / "a.parquet")
    out = tmp_path / "o"
    runner = CliRunner()
    made = runner.invoke(data_cli, ["shard", str(tmp_path / "a.parquet"), "--out", str(out),
                                    "--rows-per-shard", "50", "--compression", "lz4"])
    assert made.exit_code == 0, made.output
    assert made.output.strip().splitlines()[-1].startswith("wrote 3 arrow shards, 120 rows, ")
    shown = runner.invoke(data_cli, ["inspect", str(out), "--verify", "--json"])
    info = json.loads(shown.output)
    assert shown.exit_code == 0 and info["problems"] == []
    assert (info["rows"], info["shards"], [f["rows"] for f in info["files"]]) == (120, 3, [50, 50, 20])
    text = runner.invoke(data_cli, ["inspect", str(out), "--verify"])
    assert text.exit_code == 0 and "3 shards, 120 rows" in text.output and "verified: OK" in text.output

    (out / "shard-00001.arrow").unlink()
    broken = runner.invoke(data_cli, ["inspect", str(out), "--verify", "--json"])
    assert broken.exit_code == 1
    assert json.loads(broken.output)["problems"] == [f"{out}/shard-00001.arrow: missing shard (listed in manifest.json)"]

    busy = runner.invoke(data_cli, ["shard", str(tmp_path / "a.parquet"), "--out", str(out)])
    assert isinstance(busy.exception, UserError) and "not empty" in str(busy.exception)
    missing = runner.invoke(data_cli, ["inspect", str(tmp_path)])
    assert isinstance(missing.exception, UserError) and "no manifest.json" in str(missing.exception)


def test_main_cli_prints_user_errors_as_one_line(tmp_path):
    result = trainctl("data", "inspect", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"trainctl: error: {tmp_path}: no manifest.json; "
                                     "create the dataset with 'trainctl data shard'")


# --- S3 -----------------------------------------------------------------------------------

def test_s3_round_trip(s3_endpoint, sources, tmp_path):  # noqa: F811  (s3_endpoint: a fixture)
    uri = f"s3://{BUCKET}/ds"
    inputs = [str(sources / "a.parquet"), str(sources / "d.csv")]
    manifest = shard_dataset(inputs, uri, rows_per_shard=48, batch_rows=16)
    assert [s.rows for s in manifest.shards] == [48, 48, 24]
    info = describe(uri)
    assert (info["rows"], info["shards"], info["path"]) == (120, 3, uri) and verify(uri) == []
    # The objects are what the manifest says, byte for byte.
    client = s3_client(s3_endpoint)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="ds/")["Contents"]
                  if not o["Key"].endswith("/"))  # "ds/": the directory marker create_dir leaves
    assert keys == ["ds/manifest.json", "ds/shard-00000.arrow", "ds/shard-00001.arrow", "ds/shard-00002.arrow"]
    body = client.get_object(Bucket=BUCKET, Key="ds/shard-00001.arrow")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == manifest.shards[1].sha256
    assert pa.ipc.open_file(pa.py_buffer(body)).read_all().column("id").to_pylist() == list(range(48, 96))

    # A dataset on S3 is a source too (its manifest skipped), and --overwrite works there.
    again = shard_dataset([uri], str(tmp_path / "back"), rows_per_shard=1000)
    assert ids(tmp_path / "back") == list(range(100)) + list(range(180, 200)) and again.num_rows == 120
    with pytest.raises(DatasetError, match="not empty"):
        shard_dataset(inputs, uri)
    assert len(shard_dataset(inputs, uri, overwrite=True).shards) == 1

    # Damage on S3 is named by its URI; the CLI reads S3 with the same variables.
    body = client.get_object(Bucket=BUCKET, Key="ds/shard-00000.arrow")["Body"].read()
    client.put_object(Bucket=BUCKET, Key="ds/shard-00000.arrow", Body=body[:-1] + bytes([body[-1] ^ 1]))
    result = CliRunner().invoke(data_cli, ["inspect", uri, "--verify", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["problems"][0] == f"{uri}/shard-00000.arrow: checksum mismatch " \
        "(sha256 differs from manifest.json)"


def test_s3_errors_are_user_errors(s3_endpoint, sources):  # noqa: F811
    result = CliRunner().invoke(data_cli, ["shard", str(sources / "a.parquet"), "--out", "s3://no-such-bucket/ds"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith("s3://no-such-bucket/ds: ")
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/nothing: no manifest.json"):
        describe(f"s3://{BUCKET}/nothing")
