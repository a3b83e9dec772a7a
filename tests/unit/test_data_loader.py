"""ShardedDataset: determinism across world sizes, equal shares, exact resume, bounded prefetch, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.data import batches
from orchestrator.data.loader import ShardedDataset
from orchestrator.data.manifest import DatasetError

from ..datasets import rows_table, write_dataset

pytestmark = pytest.mark.timeout(120)

SKEWED = [1000, 7, 3, 590, 800]  # 2400 rows, very uneven shards


@pytest.fixture
def skewed(tmp_path):
    return str(write_dataset(tmp_path / "ds", SKEWED))


def _ids(ds) -> list[int]:
    return [i for batch in ds for i in batch["id"].tolist()]


@pytest.mark.parametrize("shuffle", [False, True])
def test_concatenated_ranks_give_the_same_global_order_at_any_world_size(skewed, shuffle):
    kwargs = dict(batch_size=50, shuffle=shuffle, seed=3, shuffle_window=256, block_rows=64)
    reference = _ids(ShardedDataset(skewed, **kwargs))
    assert sorted(reference) == list(range(2400))
    for world in (2, 4):
        together = [i for r in range(world) for i in _ids(ShardedDataset(skewed, rank=r, world_size=world, **kwargs))]
        assert together == reference


def test_reader_threads_do_not_change_the_order(skewed):
    kwargs = dict(batch_size=32, shuffle=True, seed=1, shuffle_window=128)
    one = _ids(ShardedDataset(skewed, num_threads=1, **kwargs))
    assert one == _ids(ShardedDataset(skewed, num_threads=3, **kwargs))
    assert one == _ids(ShardedDataset(skewed, prefetch=0, **kwargs))  # inline: no reader thread at all


def test_inline_reading_resumes_exactly_too(skewed):
    kwargs = dict(batch_size=40, shuffle=True, seed=5, prefetch=0)
    uninterrupted = _take(ShardedDataset(skewed, **kwargs), 12)
    first = ShardedDataset(skewed, **kwargs)
    head = _take(first, 5)
    resumed = ShardedDataset(skewed, **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert head + _take(resumed, 7) == uninterrupted


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path):
    path = str(write_dataset(tmp_path / "odd", [1, 1999, 401]))  # 2401 rows
    for remainder in ("drop", "pad"):
        for drop_last in (True, False):
            counts = [len(list(ShardedDataset(path, batch_size=64, rank=r, world_size=4, remainder=remainder,
                                              drop_last=drop_last))) for r in range(4)]
            assert len(set(counts)) == 1, (remainder, drop_last, counts)
            assert counts[0] == len(ShardedDataset(path, batch_size=64, rank=0, world_size=4,
                                                   remainder=remainder, drop_last=drop_last))


def _take(ds, n: int) -> list[int]:
    out = []
    it = iter(ds)
    for _ in range(n):
        out += next(it)["id"].tolist()
    it.close()
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_mid_epoch_resume_continues_exactly(skewed, shuffle):
    kwargs = dict(batch_size=40, shuffle=shuffle, seed=5, shuffle_window=300, rank=1, world_size=2)
    uninterrupted = _take(ShardedDataset(skewed, **kwargs), 20)
    first = ShardedDataset(skewed, **kwargs)
    head = _take(first, 10)
    state = first.state_dict()
    assert set(state) == {"epoch", "remaining", "world_size", "consumed", "seed"}  # a few numbers
    resumed = ShardedDataset(skewed, **kwargs)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 10) == uninterrupted


def test_resume_into_another_world_size_covers_the_rest_exactly_once(skewed):
    kwargs = dict(batch_size=25, shuffle=True, seed=9, shuffle_window=500)
    old = [ShardedDataset(skewed, rank=r, world_size=4, **kwargs) for r in range(4)]
    seen = [i for ds in old for i in _take(ds, 6)]  # 4 ranks x 6 batches x 25
    state = old[0].state_dict()
    assert all(ds.state_dict() == state for ds in old)  # the position is the same on every rank
    new = [ShardedDataset(skewed, rank=r, world_size=3, **kwargs) for r in range(3)]
    for ds in new:
        ds.load_state_dict(state)
    rest = [i for ds in new for i in _ids(ds)]
    assert len(set(seen) | set(rest)) == len(seen) + len(rest)  # nothing twice
    assert len(seen) + len(rest) == 2400 - (2400 - 600) % (3 * 25)  # only the remainder dropped
    assert all(ds.epoch == 1 for ds in new)


def test_a_resize_with_drop_last_loses_no_sample_the_new_size_can_take(skewed):
    """drop_last (the default): each rank drops its last short batch, once, at the epoch's end.
    A resize re-splits what is left, including the old shares' unread tails and the samples that
    did not divide over the old ranks, so a resized epoch drops only what the new size's split
    drops at its end. Here 7 ranks stop after 10 batches of 10 (2400 = 7 x 342 + 6: 6 never in
    a share) and 2 ranks take the 1700 left: 850 each, 85 whole batches, nothing dropped."""
    kwargs = dict(batch_size=10, shuffle=True, seed=3, shuffle_window=500, drop_last=True)
    old = [ShardedDataset(skewed, rank=r, world_size=7, **kwargs) for r in range(7)]
    seen = [i for ds in old for i in _take(ds, 10)]
    new = [ShardedDataset(skewed, rank=r, world_size=2, **kwargs) for r in range(2)]
    for ds in new:
        ds.load_state_dict(old[0].state_dict())
    assert [len(ds) for ds in new] == [85, 85]
    rest = [i for ds in new for i in _ids(ds)]
    assert sorted(seen + rest) == list(range(2400)), "a sample lost or repeated across the resize"
    # what a resized epoch does drop: the new split's remainder and short batches, at the end
    again = [ShardedDataset(skewed, rank=r, world_size=3, **kwargs) for r in range(3)]
    for ds in again:
        ds.load_state_dict(old[0].state_dict())
    rest3 = [i for ds in again for i in _ids(ds)]  # 1700 = 3 x 566 + 2; 56 batches of 10 each
    assert len(rest3) == 3 * 560 and not set(rest3) & set(seen)


def test_epochs_advance_and_reshuffle(skewed):
    ds = ShardedDataset(skewed, batch_size=100, shuffle=True, seed=0)
    first, second = _ids(ds), _ids(ds)
    assert ds.epoch == 2 and sorted(first) == sorted(second) and first != second


def _mapping_of(address: int) -> tuple[str, str]:
    """(permissions, file) of the memory mapping holding `address` (Linux /proc)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[1], fields[5] if len(fields) > 5 else ""
    raise AssertionError(f"no mapping holds {address:#x}")


def test_fixed_width_columns_are_tensors_without_a_copy(skewed):
    before = pa.total_allocated_bytes()
    ds = ShardedDataset(skewed, batch_size=64, columns=["id", "x"])
    batch = next(iter(ds))
    assert isinstance(batch["x"], torch.Tensor) and batch["x"].shape == (64, 4)
    assert batch["x"].dtype == torch.float32 and torch.equal(batch["x"][:, 0], batch["id"].float())
    # the tensor's memory is the shard file itself, mapped copy-on-write ("p": private,
    # writable): no copy until training writes to it, and then only to this process
    perms, path = _mapping_of(batch["x"].data_ptr())
    assert path.endswith("shard-00000.arrow") and perms == "rw-p"
    peak = before
    for _ in ds:
        peak = max(peak, pa.total_allocated_bytes())
    # memory-mapped shards, sliced in place: Arrow allocated nothing for the batches
    assert peak - before < 64 * 1024


@pytest.mark.parametrize("shuffle", [False, True])
def test_numeric_columns_with_nulls_come_through_arrow(tmp_path, shuffle):
    from orchestrator.data.writer import shard_dataset

    values = pa.array([None if i % 7 == 0 else float(i) for i in range(500)], type=pa.float64())
    table = pa.table({"id": pa.array(range(500), type=pa.int64()), "v": values})
    src = tmp_path / "src.arrow"
    with pa.OSFile(str(src), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    shard_dataset([str(src)], str(tmp_path / "ds"), rows_per_shard=200, batch_rows=50)
    got = list(ShardedDataset(str(tmp_path / "ds"), batch_size=40, shuffle=shuffle, drop_last=False))
    ids = [i for b in got for i in b["id"].tolist()]
    values = [v for b in got for v in (b["v"] if isinstance(b["v"], list) else b["v"].tolist())]
    assert sorted(ids) == list(range(500))
    assert values == [None if i % 7 == 0 else float(i) for i in ids]


def test_batches_ahead_stay_bounded_without_a_transform(skewed, monkeypatch):
    monkeypatch.setattr(batches, "CHUNK_ROWS", 100)  # chunks of up to 100 rows
    built = []
    real_build = batches.BatchBuilder.build
    monkeypatch.setattr(batches.BatchBuilder, "build",
                        lambda self, ranges: built.append(sum(b - a for a, b in ranges)) or real_build(self, ranges))
    ds = ShardedDataset(skewed, batch_size=10, shuffle=True, prefetch=4)
    max_ahead = 0
    for consumed, _batch in enumerate(ds, start=1):
        time.sleep(0.002)  # the training step: far slower than reading a batch
        max_ahead = max(max_ahead, sum(built) - 10 * consumed)
        if consumed == 60:
            break
    assert max_ahead <= 4 * 100  # the chunk being consumed, two queued, one being built


def test_ragged_lists_are_padded_or_packed(skewed):
    batch = next(iter(ShardedDataset(skewed, batch_size=8, columns=["id", "tokens"])))
    lengths = batch["tokens_lengths"].tolist()
    assert lengths == [i % 5 for i in batch["id"].tolist()]
    assert batch["tokens"].shape == (8, max(lengths))
    assert batch["tokens"][4].tolist()[:4] == [0, 1, 2, 3]
    packed = next(iter(ShardedDataset(skewed, batch_size=8, columns=["tokens"], ragged="pack")))
    assert packed["tokens"].numel() == sum(lengths) and packed["tokens_offsets"][-1] == sum(lengths)


def test_transform_runs_in_the_background_thread(skewed):
    threads = set()

    def transform(batch):
        threads.add(threading.current_thread().name)
        return {**batch, "double": batch["id"] * 2}

    batch = next(iter(ShardedDataset(skewed, batch_size=16, transform=transform)))
    assert torch.equal(batch["double"], batch["id"] * 2)
    assert threads and threading.main_thread().name not in threads


def test_prefetch_stays_bounded_with_a_slow_consumer(skewed):
    built = []
    ds = ShardedDataset(skewed, batch_size=10, shuffle=True, prefetch=3, transform=lambda b: built.append(1) or b)
    start_bytes = pa.total_allocated_bytes()
    max_ahead = max_bytes = 0
    for consumed, _batch in enumerate(ds, start=1):
        time.sleep(0.002)  # the training step: far slower than reading a batch
        max_ahead = max(max_ahead, len(built) - consumed)
        max_bytes = max(max_bytes, pa.total_allocated_bytes() - start_bytes)
        if consumed == 60:
            break
    assert max_ahead <= 3 + 1  # the queue plus the batch being built
    assert max_bytes < 50 * 10 * 64  # a few batches, not the dataset


def test_wait_time_is_measured(skewed):
    ds = ShardedDataset(skewed, batch_size=100)
    _ids(ds)
    assert ds.wait_seconds > 0 and ds.batches_served == 24


def test_parquet_shards_read_by_row_group_give_the_same_data(tmp_path):
    arrow = str(write_dataset(tmp_path / "a", SKEWED, "arrow"))
    parquet = str(write_dataset(tmp_path / "p", SKEWED, "parquet"))
    kwargs = dict(batch_size=64, shuffle=True, seed=2)
    assert _ids(ShardedDataset(arrow, **kwargs)) == _ids(ShardedDataset(parquet, **kwargs))


# ---- errors: one message naming the file or column ---------------------------------

def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        ShardedDataset(str(tmp_path))


def test_unknown_column(skewed):
    with pytest.raises(DatasetError, match="column 'nope' does not exist"):
        ShardedDataset(skewed, columns=["id", "nope"])


def test_empty_dataset(tmp_path):
    path = write_dataset(tmp_path / "empty", [])
    with pytest.raises(DatasetError, match="empty"):
        ShardedDataset(str(path))


def test_missing_shard_fails_when_read(skewed):
    (pa_path := __import__("pathlib").Path(skewed) / "shard-00003.arrow").unlink()
    ds = ShardedDataset(skewed, batch_size=100)
    with pytest.raises(DatasetError, match="shard-00003.arrow: missing shard"):
        _ids(ds)
    assert not pa_path.exists()


def test_corrupt_shard_fails_when_read(skewed):
    from pathlib import Path

    shard = Path(skewed) / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-20])  # a torn write: the footer is gone
    with pytest.raises(DatasetError, match="shard-00000.arrow: corrupt shard"):
        _ids(ShardedDataset(skewed, batch_size=100))


def test_checksum_verification_catches_a_flipped_byte(skewed):
    from pathlib import Path

    shard = Path(skewed) / "shard-00004.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still decodes; only the checksum can tell
    shard.write_bytes(bytes(data))
    assert len(_ids(ShardedDataset(skewed, batch_size=100))) == 2400
    with pytest.raises(DatasetError, match="shard-00004.arrow: corrupt shard: checksum"):
        _ids(ShardedDataset(skewed, batch_size=100, verify_checksums=True))


def test_shard_with_another_schema_fails_when_read(skewed):
    from pathlib import Path

    table = rows_table(0, 1000).rename_columns(["id", "y", "tokens"])
    with pa.OSFile(str(Path(skewed) / "shard-00000.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DatasetError, match="shard-00000.arrow: schema mismatch"):
        _ids(ShardedDataset(skewed, batch_size=100))


def test_a_numpy_sanity_check_of_the_shard_helper(tmp_path):
    path = write_dataset(tmp_path / "s", [5, 5])
    ids = _ids(ShardedDataset(str(path), batch_size=5))
    assert np.array_equal(ids, np.arange(10))


def test_parquet_row_groups_are_decoded_one_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "CHUNK_ROWS", 100)  # chunks of 2 batches, to see them one by one
    parquet = str(write_dataset(tmp_path / "p", [1000], "parquet", batch_rows=100))  # 10 row groups
    decoded = []
    real_read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: decoded.append(i) or real_read(self, i, **kw))
    ds = ShardedDataset(parquet, batch_size=50, prefetch=1)  # chunks of 50, 100, 100, ... rows
    it = iter(ds)
    assert next(it)["id"].tolist() == list(range(50))
    it.close()
    row_groups, starts = ds.reader.table(0)
    assert len(row_groups) == 10 and starts[-1] == 1000
    # each once, and only for the chunks read ahead (two queued, one being built: rows
    # 0-349 at most), not the whole shard
    assert sorted(set(decoded)) == sorted(decoded) and len(decoded) <= 4


# ---- batches are the user's to change in place ------------------------------------

MODES = [  # every way a batch is made: (format, loader options)
    ("arrow", {}), ("arrow", {"prefetch": 0}), ("arrow", {"num_threads": 2}),
    ("arrow", {"shuffle": True}), ("arrow", {"shuffle": True, "prefetch": 0}),
    ("arrow", {"ragged": "pack"}), ("arrow", {"columns": ["id", "tokens"]}),
    ("arrow", {"shuffle": True, "shuffle_window": 100_000}),  # window over WINDOW_BYTES: through Arrow
    ("parquet", {}), ("parquet", {"prefetch": 0}), ("parquet", {"shuffle": True}), ("parquet", {"ragged": "pack"}),
]


def _check_and_scribble(batch) -> list[int]:
    """Checks a batch against how tests/datasets.py made it, then writes over every tensor
    in place, the ways training code does; returns the batch's ids."""
    ids = batch["id"].tolist()
    if "x" in batch:
        assert batch["x"][:, 0].tolist() == [float(i) for i in ids]
    tokens = batch["tokens"]
    if "tokens_lengths" in batch:
        assert batch["tokens_lengths"].tolist() == [i % 5 for i in ids]
        assert [row[:i % 5] for row, i in zip(tokens.tolist(), ids, strict=True)] == [list(range(i % 5)) for i in ids]
    else:
        assert tokens.tolist() == [t for i in ids for t in range(i % 5)]
    for value in batch.values():
        if value.is_floating_point():
            value.div_(16).sub_(3).clamp_(-1, 1)
        else:
            value.add_(1_000_000).mul_(-1)
    return ids


@pytest.mark.parametrize(("fmt", "options"), MODES)
def test_batches_can_be_changed_in_place_without_changing_what_is_read_next(tmp_path, fmt, options):
    path = str(write_dataset(tmp_path / "ds", [300, 7, 250], fmt))  # record batches and shards straddled
    kwargs = {"batch_size": 50, "drop_last": False, **options}
    ds = ShardedDataset(path, **kwargs)
    first = [i for batch in ds for i in _check_and_scribble(batch)]  # epoch 0, written all over
    second = [i for batch in ds for i in _check_and_scribble(batch)]  # epoch 1 reads the data unchanged
    assert sorted(first) == sorted(second) == list(range(557))
    # so does another reader of the same files (another rank), and the files are intact
    other = ShardedDataset(path, verify_checksums=True, **kwargs)
    assert sorted(i for batch in other for i in _check_and_scribble(batch)) == list(range(557))


def test_in_place_writes_to_a_kept_batch_stay_in_it(skewed):
    ds = ShardedDataset(skewed, batch_size=64)
    it = iter(ds)
    kept = next(it)
    kept["x"].mul_(2)
    rest = [b["x"][:, 0].tolist() == b["id"].float().tolist() for b in it]  # neighbours untouched
    assert all(rest) and kept["x"][:, 0].tolist() == [2.0 * i for i in kept["id"].tolist()]


# ---- batches on the training device ------------------------------------------------

@pytest.mark.parametrize("prefetch", [4, 0])
def test_device_cpu_gives_the_same_batches(skewed, prefetch):
    kwargs = dict(batch_size=64, shuffle=True, seed=3, prefetch=prefetch)
    plain = list(ShardedDataset(skewed, **kwargs))
    on_cpu = list(ShardedDataset(skewed, device="cpu", **kwargs))
    assert len(plain) == len(on_cpu) == 37
    for a, b in zip(plain, on_cpu, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].device.type == "cpu" for k in a)


def test_batches_go_to_another_device_in_the_reader_thread(skewed, monkeypatch):
    """The meta device stands in for an accelerator here: a real copy, no GPU needed."""
    from orchestrator.data import device

    threads = []
    real_send = device.ToDevice.send
    monkeypatch.setattr(device.ToDevice, "send",
                        lambda self, batches: threads.append(threading.current_thread().name) or real_send(self, batches))
    ds = ShardedDataset(skewed, batch_size=64, device="meta")
    batches = list(ds)
    assert len(batches) == 37 and all(v.device.type == "meta" for b in batches for v in b.values())
    assert threads and threading.main_thread().name not in threads


class _FakeCuda:
    """Stands in for device.CudaCopies (no GPU here): records what the transfer asks of CUDA,
    and from which thread."""

    def __init__(self):
        self.calls = []
        self.held = set()

    def _log(self, *what):
        self.calls.append((threading.current_thread() is threading.main_thread(), *what))

    def copy(self, tensor):
        self._log("copy")
        return tensor.clone()

    def record(self):
        self._log("record")
        return object()

    def wait(self, event):
        self._log("wait", event)
        return "training stream"

    def hold(self, tensor, stream):
        self._log("hold", stream)
        self.held.add(id(tensor))


@pytest.mark.parametrize("prefetch", [4, 0])
def test_cuda_copies_are_made_ahead_and_waited_for_before_a_batch_is_used(skewed, monkeypatch, prefetch):
    from orchestrator.data import device

    fake = _FakeCuda()
    monkeypatch.setattr(device.ToDevice, "for_device", classmethod(lambda cls, d: cls("cuda:0", cuda=fake)))
    ds = ShardedDataset(skewed, batch_size=64, prefetch=prefetch, columns=["id", "x"])
    for batch in ds:  # each batch comes after its chunk was waited for and held on the training stream
        assert id(batch["x"]) in fake.held and id(batch["id"]) in fake.held
    calls = fake.calls
    assert sum(c[1] == "copy" for c in calls) == 2 * 37 and sum(c[1] == "hold" for c in calls) == 2 * 37
    records = [i for i, c in enumerate(calls) if c[1] == "record"]
    waits = [i for i, c in enumerate(calls) if c[1] == "wait"]
    assert len(records) == len(waits) >= 2  # one event per chunk
    for r, w in zip(records, waits, strict=True):
        assert r < w  # an event is recorded after its chunk's copies, then waited on
    # copies in the reader thread (with prefetch), waits and holds in the training thread
    assert all(main == (prefetch == 0) for main, what, *_ in calls if what in ("copy", "record"))
    assert all(main for main, what, *_ in calls if what in ("wait", "hold"))
    assert all(stream == "training stream" for _, what, *rest in calls if what == "hold" for stream in rest)


def test_a_bad_device_is_one_line(skewed):
    with pytest.raises(DatasetError, match="'nope' is not a device"):
        ShardedDataset(skewed, device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(DatasetError, match="sees no CUDA device"):
            ShardedDataset(skewed, device="cuda")


def test_position_and_state_do_not_depend_on_the_device(skewed):
    kwargs = dict(batch_size=40, shuffle=True, seed=5)
    plain, moved = ShardedDataset(skewed, **kwargs), ShardedDataset(skewed, device="meta", **kwargs)
    for ds in (plain, moved):
        it = iter(ds)
        for _ in range(7):
            next(it)
        it.close()
    assert moved.state_dict() == plain.state_dict() and plain.state_dict()["consumed"] == 7 * 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefetch", [4, 0])
def test_batches_on_a_real_gpu_match_the_cpu_ones(skewed, prefetch):
    kwargs = dict(batch_size=64, shuffle=True, seed=3, prefetch=prefetch)
    on_gpu = ShardedDataset(skewed, device="cuda", **kwargs)
    for cpu, gpu in zip(ShardedDataset(skewed, **kwargs), on_gpu, strict=True):
        torch.cuda._sleep(1_000_000)  # a step still running on the GPU while the next chunk is copied
        assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]) for k in cpu)
        gpu["x"].sub_(1)  # in place, on the device
    assert on_gpu.epoch == 1


def test_ctx_dataset_delivers_on_the_device_asked_for(skewed, tmp_path):
    from orchestrator.runtime.checkpoint import CheckpointStore
    from orchestrator.runtime.context import TrainContext
    from orchestrator.spec import DataSpec
    from strategies import WorkerEnv, get_strategy_class

    class Collected:
        def __init__(self):
            self.sources = []

        def emit(self, kind, payload):
            pass

    strategy_cls = get_strategy_class("ddp")
    strategy = strategy_cls(strategy_cls.parse_options({}))  # not set up: one process, no group
    ctx = TrainContext(WorkerEnv(rank=0, world_size=1), strategy, job_id="j", config={}, reporter=Collected(),
                       checkpoints=CheckpointStore(tmp_path / "runs"), resume_from=None,
                       data={"train": DataSpec(path=skewed, batch_size=64)})
    assert ctx.dataset("train").device is None  # the CPU, where batches are made
    data = ctx.dataset("train", device="meta")
    assert data is ctx.dataset("train") and data.device == torch.device("meta")  # kept by later calls
    assert next(iter(data))["x"].device.type == "meta"
    assert ctx.dataset("train", device=ctx.device).device == torch.device("cpu")


def test_in_place_writes_with_record_batches_larger_than_a_mapping_window(tmp_path, monkeypatch):
    """Large record batches (images) are mapped a piece at a time, pieces beyond a window
    each on their own: the same guarantees."""
    from orchestrator.data import reader

    monkeypatch.setattr(reader.PrivateMappings, "WINDOW", 4096)  # columns of 16 KB, pieces up to 9.6 KB
    path = str(write_dataset(tmp_path / "ds", [2500, 1100], batch_rows=1000))
    ds = ShardedDataset(path, batch_size=600, columns=["id", "x"], drop_last=False)
    for _ in range(2):
        assert sorted(i for batch in ds for i in _check_and_scribble_fixed(batch)) == list(range(3600))


def _check_and_scribble_fixed(batch) -> list[int]:
    ids = batch["id"].tolist()
    assert batch["x"][:, 0].tolist() == [float(i) for i in ids]
    batch["x"].mul_(-1)
    batch["id"].add_(7)
    return ids


def _anonymous_bytes() -> int:
    """This process's anonymous resident memory: where copy-on-write copies of pages go."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_pages_written_in_place_are_freed_as_the_loader_moves_on(tmp_path, monkeypatch):
    """Every batch of a 48 MB shard written in place: the copies made stay a few windows'
    worth, not the shard (a mapping per shard would hold them all until the epoch ends)."""
    from orchestrator.data import reader
    from orchestrator.data.writer import shard_dataset

    monkeypatch.setattr(reader.PrivateMappings, "WINDOW", 1 << 20)
    rows, dim = 12_000, 1024  # 4 KB rows
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(rows * dim, dtype=np.float32)), dim)
    src = tmp_path / "src.arrow"
    with pa.OSFile(str(src), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", x.type)])) as writer:
        writer.write_table(pa.table({"x": x}))
    shard_dataset([str(src)], str(tmp_path / "ds"), rows_per_shard=rows, batch_rows=256)
    ds = ShardedDataset(str(tmp_path / "ds"), batch_size=64, prefetch=2)
    before = peak = _anonymous_bytes()
    for batch in ds:
        batch["x"].mul_(2)  # copies the batch's pages: 256 KB
        peak = max(peak, _anonymous_bytes())
    assert batch["x"][0, 0] == 2
    del batch
    assert peak - before < 16 << 20, (peak - before) / 2**20  # the shard is 48 MB


# ---- the zero-copy path: unshuffled, memory-mapped, fixed-width columns ---------------

@pytest.mark.parametrize("prefetch", [4, 0])
def test_zero_copy_batches_are_built_in_the_training_thread(skewed, monkeypatch, prefetch):
    """Building them reads no data (views of the mapped shards): a prefetch thread would
    only add hand-overs. The building still counts as waiting for data."""
    threads = set()
    real_build = batches.BatchBuilder.build
    monkeypatch.setattr(batches.BatchBuilder, "build",
                        lambda self, ranges: threads.add(threading.current_thread().name) or real_build(self, ranges))
    ds = ShardedDataset(skewed, batch_size=64, columns=["id", "x"], prefetch=prefetch, drop_last=False)
    got = [b for b in ds]
    assert threads == {threading.current_thread().name}
    ids = [i for b in got for i in b["id"].tolist()]
    assert ids == list(range(2400))
    assert all(torch.equal(b["x"][:, 0], b["id"].float()) for b in got)
    assert (ds.wait_seconds > 0) == (prefetch > 0) and ds.batches_served == len(got)
    # anything else read through Arrow, or a transform, still builds in the prefetch thread
    threads.clear()
    list(ShardedDataset(skewed, batch_size=64, prefetch=4))  # with the ragged column
    assert threads and threading.current_thread().name not in threads


def test_zero_copy_chunks_hold_a_mapping_window_of_batches(skewed):
    """Chunks of views cost no memory until touched: one per mapping window, not per 8 MB."""
    zero_copy = ShardedDataset(skewed, batch_size=8, columns=["id", "x"])
    builder, _ = zero_copy._builder()
    rows = builder.batches_per_chunk() * 8
    assert builder.zero_copy() and rows > batches.CHUNK_ROWS  # the copying paths' bound
    assert rows * zero_copy.reader.fixed_row_bytes <= batches.PrivateMappings.WINDOW
    for options in ({"shuffle": True}, {"transform": lambda b: b}, {}):  # copies: the 8 MB bound
        builder, _ = ShardedDataset(skewed, batch_size=8, **options)._builder()
        assert not builder.zero_copy()


def test_batches_of_a_piece_are_its_views_cut_in_one_call():
    x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
    label = np.arange(70)
    pieces = [batches.Piece(45, {"x": x[:45], "label": label[:45]}, {"x": x[:45], "label": label[:45]}),
              batches.Piece(25, {"x": x[45:], "label": label[45:]}, {"x": x[45:], "label": label[45:]})]
    got = list(batches._slices(pieces, 20))
    assert [n for n, _ in got] == [20, 20, 20, 10]  # the third straddles the pieces
    assert [b["label"].tolist() for _, b in got] == [list(range(a, min(a + 20, 70))) for a in range(0, 70, 20)]
    assert all(torch.equal(b["x"], torch.from_numpy(x[20 * i:20 * i + n])) for i, (n, b) in enumerate(got))
    got[0][1]["x"].mul_(-1)  # a view of the piece: written through, the neighbour untouched
    assert x[0, 1] == -1 and x[20, 1] == 61 and got[1][1]["x"][0, 1] == 61
    assert [n for n, b in batches._slices([batches.Piece(70, {}, {})], 32)] == [32, 32, 6]  # Arrow-only columns


def test_numpy_views_of_sliced_fixed_size_lists_are_the_sliced_rows():
    from orchestrator.data.tensors import numpy_view

    inner = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(120, dtype=np.float32)), 3)
    nested = pa.FixedSizeListArray.from_arrays(inner, 2)  # 20 rows of 2 x 3
    for arr in (nested, nested.slice(3, 9), nested.slice(3, 9).slice(2, 4)):
        view = numpy_view(arr, (2, 3))
        assert view.shape == (len(arr), 2, 3)
        assert view.tolist() == arr.to_pylist()


# ---- shards opened once per process, for every dataset on the same files ----------------------

def _count_opens(monkeypatch) -> list[str]:
    opened = []
    real = pa.ipc.open_file

    def counting(source, *args, **kwargs):
        opened.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pa.ipc, "open_file", counting)
    return opened


def test_a_new_dataset_on_the_same_files_opens_no_shard_again(tmp_path, monkeypatch):
    """Training makes a new dataset per epoch, evaluation or sweep trial: opening the shards
    was a third of an unshuffled epoch. Batches stay the dataset's own to change in place."""
    from orchestrator.data.reader import OPEN_SHARDS

    OPEN_SHARDS.clear()
    opened = _count_opens(monkeypatch)
    path = str(write_dataset(tmp_path / "ds", [300, 7, 250]))
    first = [i for batch in ShardedDataset(path, batch_size=50) for i in _check_and_scribble(batch)]
    assert len(opened) == 3
    again = ShardedDataset(path, batch_size=50, prefetch=0)  # another mode, the same files
    assert [i for batch in again for i in _check_and_scribble(batch)] == first == list(range(550))
    assert len(opened) == 3
    ShardedDataset(path, batch_size=50, columns=["id"]).__iter__().__next__()  # other columns: opened for them
    assert len(opened) == 4


def test_a_shard_rewritten_in_place_is_opened_afresh(tmp_path):
    from ..datasets import SCHEMA

    path = write_dataset(tmp_path / "ds", [120, 80])
    assert _ids(ShardedDataset(str(path), batch_size=40))[:3] == [0, 1, 2]
    shard = path / "shard-00000.arrow"
    size = shard.stat().st_size
    with open(shard, "r+b") as f, pa.ipc.new_file(f, SCHEMA) as writer:  # same file, same size, new rows
        for batch in rows_table(1000, 120).to_batches(max_chunksize=64):
            writer.write_batch(batch)
    assert shard.stat().st_size == size
    assert _ids(ShardedDataset(str(path), batch_size=40))[:3] == [1000, 1001, 1002]


def test_a_shard_deleted_after_it_was_opened_is_missing_for_a_new_dataset(tmp_path):
    path = write_dataset(tmp_path / "ds", [120, 80])
    assert len(_ids(ShardedDataset(str(path), batch_size=40))) == 200
    (path / "shard-00001.arrow").unlink()
    with pytest.raises(DatasetError, match="shard-00001.arrow: missing shard"):
        _ids(ShardedDataset(str(path), batch_size=40))
