"""orchestrator/runtime/checkpoint.py: atomically committed checkpoints, pruning, crash leftovers, and
a storage that refuses a save (full, read-only): one line, the partial removed, the last intact."""

from __future__ import annotations

import errno
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.runtime.checkpoint import (
    MANIFEST,
    CheckpointStore,
    CheckpointWriteError,
    diagnose_write_failure,
    free_bytes,
    is_writable,
    state_bytes,
    storage_ready,
)


def save(store: CheckpointStore, index: int, value: float, step: int | None = None):
    directory = store.begin(index)
    assert directory.name.endswith(".partial")
    torch.save({"w": torch.full((3,), value)}, directory / "state.pt")
    return store.commit(index, {"step": index * 10 if step is None else step})


def test_empty_store(tmp_path):
    store = CheckpointStore(tmp_path / "nothing-yet")
    assert store.committed() == [] and store.latest() is None


def test_commit_makes_checkpoint_visible(tmp_path):
    store = CheckpointStore(tmp_path)
    directory = store.begin(1)
    torch.save({"w": torch.ones(2)}, directory / "state.pt")
    assert store.latest() is None  # not visible before the commit
    ckpt = store.commit(1, {"step": 7})
    assert ckpt.index == 1 and ckpt.step == 7
    assert ckpt.path == tmp_path / "checkpoint_000001"
    assert not directory.exists()
    assert (ckpt.path / MANIFEST).is_file() and (ckpt.path / "state.pt").is_file()
    latest = store.latest()
    assert latest is not None and latest.index == 1 and latest.step == 7
    assert latest.manifest["index"] == 1
    assert torch.equal(torch.load(latest.path / "state.pt")["w"], torch.ones(2))


def test_latest_picks_highest_index(tmp_path):
    store = CheckpointStore(tmp_path, keep=10)
    for index in (2, 10, 5):
        save(store, index, float(index))
    assert [c.index for c in store.committed()] == [2, 5, 10]
    assert store.latest().index == 10
    assert torch.equal(torch.load(store.latest().path / "state.pt")["w"], torch.full((3,), 10.0))


def test_keep_prunes_older_ones(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for index in range(1, 5):
        save(store, index, float(index))
    assert [c.index for c in store.committed()] == [3, 4]
    assert not (tmp_path / "checkpoint_000001").exists()
    assert not (tmp_path / "checkpoint_000002").exists()
    assert (tmp_path / "checkpoint_000003").is_dir()


def test_recommitting_same_index_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0, step=1)
    save(store, 1, 2.0, step=2)
    assert [c.index for c in store.committed()] == [1]
    assert store.latest().step == 2
    assert torch.equal(torch.load(store.latest().path / "state.pt")["w"], torch.full((3,), 2.0))


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint_000001").iterdir()}
    # the crash: checkpoint 2 is begun and half written, but never committed
    partial = store.begin(2)
    (partial / "state.pt").write_bytes(b"\x80half a pickle")
    assert partial.is_dir()

    fresh = CheckpointStore(tmp_path)  # e.g. the restarted job
    assert [c.index for c in fresh.committed()] == [1]
    latest = fresh.latest()
    assert latest.index == 1 and latest.step == 10
    assert {p.name: p.read_bytes() for p in latest.path.iterdir()} == before
    assert torch.equal(torch.load(latest.path / "state.pt")["w"], torch.full((3,), 1.0))


def test_partial_directory_named_like_committed_without_manifest_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0)
    (tmp_path / "checkpoint_000002").mkdir()  # no manifest: not a committed checkpoint
    assert store.latest().index == 1


def test_prune_sweeps_stale_partials(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0)
    stale = store.begin(1)  # a crashed retry of an index that is already committed
    (stale / "state.pt").write_bytes(b"junk")
    older = store.partial_path(0)
    older.mkdir()
    in_flight = store.begin(5)  # newer than anything committed: may still be being written
    store.prune()
    assert not stale.exists() and not older.exists()
    assert in_flight.is_dir()
    assert [c.index for c in store.committed()] == [1]


def test_commit_sweeps_partials_it_has_overtaken(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0)
    crashed = store.begin(2)
    (crashed / "state.pt").write_bytes(b"junk")
    save(store, 3, 3.0)
    assert not crashed.exists()
    assert [c.index for c in store.committed()] == [1, 3]


def test_begin_gives_an_empty_directory(tmp_path):
    store = CheckpointStore(tmp_path)
    first = store.begin(4)
    (first / "leftover").write_text("x")
    again = store.begin(4)
    assert again == first and list(again.iterdir()) == []


def test_discard_partials_removes_every_unfinished_save(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1, 1.0)
    newer = store.begin(5)  # newer than the last commit: prune() keeps it, a teardown does not
    (newer / "state.pt").write_bytes(b"torn")
    store.discard_partials()
    assert not newer.exists()
    assert [c.index for c in store.committed()] == [1]


# ---- a storage that refuses the save -------------------------------------------------------

def test_write_error_is_one_line_and_survives_pickling():
    err = CheckpointWriteError("no space left on device", "/data/ckpt", 35_000_000, 2_000_000)
    assert str(err) == "checkpoint save failed: no space left on device in /data/ckpt (needs about 35 MB, 2 MB free)"
    back = pickle.loads(pickle.dumps(err))  # it crosses from the rank to the supervisor
    assert str(back) == str(err) and back.needed_bytes == 35_000_000
    assert str(CheckpointWriteError("permission denied", "/x", None, None)) == \
        "checkpoint save failed: permission denied in /x"


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded"),
    (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"),
    (errno.EROFS, "read-only file system"),
])
def test_the_errno_deep_in_the_chain_names_the_cause(tmp_path, code, reason):
    try:
        try:
            raise OSError(code, "os says no", str(tmp_path / "tensors" / "__0_0.distcp"))
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as exc:
        problem = diagnose_write_failure(exc, tmp_path, 1234)
    assert problem is not None and problem.reason == reason and problem.directory == str(tmp_path)
    # free space as it was a moment ago: other processes write to this disk meanwhile
    assert problem.needed_bytes == 1234 and abs(problem.free_bytes - free_bytes(tmp_path)) < 256 << 20


def test_torchs_checkpoint_exception_is_looked_into(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        wrapped = CheckpointException("save failed", {0: _wrap_exception(exc)})
    assert diagnose_write_failure(wrapped, tmp_path, None).reason == "no space left on device"


def test_an_unrelated_error_is_left_alone(tmp_path):
    assert diagnose_write_failure(ValueError("cannot pickle lambda"), tmp_path, 10) is None
    assert diagnose_write_failure(OSError(errno.EIO, "I/O error"), tmp_path, 10) is None


def test_torch_zip_writer_failure_is_no_space_only_when_space_is_short(tmp_path):
    zip_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                             "PytorchStreamWriter failed writing file data/0: file write failed")
    assert diagnose_write_failure(zip_error, tmp_path, 10**18).reason == "no space left on device"
    assert diagnose_write_failure(zip_error, tmp_path, 10) is None  # room enough: something else


def test_state_bytes_counts_modules_optimizers_and_tensors():
    model = nn.Linear(100, 10)  # 1010 float32 values
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 100)).sum().backward()
    optimizer.step()  # momentum buffers: as many values again
    assert state_bytes({"model": model, "optimizer": optimizer, "extra": [torch.ones(5)], "epoch": 3}) == \
        (1010 * 2 + 5) * 4


def _context(root: Path):
    from orchestrator.runtime.context import TrainContext
    from strategies import WorkerEnv, get_strategy_class

    class Collected:
        def __init__(self):
            self.events, self.sources = [], []

        def emit(self, kind, payload):
            self.events.append((kind, payload))

    strategy_cls = get_strategy_class("ddp")
    strategy = strategy_cls(strategy_cls.parse_options({}))  # not set up: one process, no group
    return TrainContext(WorkerEnv(rank=0, world_size=1), strategy, job_id="j", config={},
                        reporter=Collected(), checkpoints=CheckpointStore(root), resume_from=None)


@pytest.mark.timeout(60)
def test_a_save_into_a_full_filesystem_is_one_line_and_keeps_the_last_checkpoint(tiny_storage):
    ctx = _context(tiny_storage)
    ctx.report({"step": 1}, checkpoint={"model": nn.Linear(1000, 1)})  # 4 KB: fits
    first = ctx._checkpoints.latest()
    before = {p.relative_to(first.path): p.read_bytes() for p in first.path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointWriteError) as caught:
        ctx.report({"step": 2}, checkpoint={"model": nn.Linear(1_000_000, 1)})  # 4 MB into 2 MB
    err = caught.value
    assert err.reason == "no space left on device" and err.directory == str(tiny_storage)
    assert err.needed_bytes == 4_000_004 and err.free_bytes > 2_000_000 - 100_000  # the torn save was removed
    assert "\n" not in str(err) and str(err).startswith(
        f"checkpoint save failed: no space left on device in {tiny_storage} (needs about 4 MB, ")
    assert not list(tiny_storage.glob("*.partial"))
    latest = ctx._checkpoints.latest()
    assert latest.index == 1 and latest.step == 1
    assert {p.relative_to(latest.path): p.read_bytes() for p in latest.path.rglob("*") if p.is_file()} == before
    assert not storage_ready(tiny_storage, err.needed_bytes)
    assert storage_ready(tiny_storage, 100_000)  # a smaller save would fit: a restart could help


@pytest.mark.timeout(60)
def test_torch_save_into_a_full_filesystem_is_named_too(tiny_storage):
    """Plain tensors go through torch.save, whose zip writer drops the errno."""
    ctx = _context(tiny_storage)
    with pytest.raises(CheckpointWriteError, match="no space left on device"):
        ctx.report({"step": 1}, checkpoint={"weights": torch.ones(1_000_000)})
    assert not list(tiny_storage.glob("*.partial"))


@pytest.mark.timeout(60)
def test_a_save_into_a_read_only_filesystem_is_one_line(tiny_storage):
    """Root ignores mode bits, so the storage is made read-only by remounting it."""
    ctx = _context(tiny_storage)
    ctx.report({"step": 1}, checkpoint={"model": nn.Linear(10, 1)})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_storage)], check=True)
    assert not is_writable(tiny_storage)
    with pytest.raises(CheckpointWriteError) as caught:
        ctx.report({"step": 2}, checkpoint={"model": nn.Linear(10, 1)})
    assert str(caught.value).startswith(f"checkpoint save failed: read-only file system in {tiny_storage}")
    assert ctx._checkpoints.latest().index == 1
    assert not storage_ready(tiny_storage, 1)


def test_an_older_attempt_cannot_commit_once_a_newer_one_claimed_the_job(tmp_path):
    """Ranks that outlive a head restart must not overwrite the new attempt's checkpoints."""
    from orchestrator.runtime.checkpoint import CheckpointStore, SupersededError

    old = CheckpointStore(tmp_path, keep=3)
    old.claim("job/attempt-0/aa")
    old.begin(1)
    old.commit(1, {"step": 10})
    new = CheckpointStore(tmp_path, keep=3)
    new.claim("job/attempt-1/bb")
    old.begin(2)
    with pytest.raises(SupersededError, match="attempt-1"):
        old.commit(2, {"step": 20})
    new.begin(2)
    assert new.commit(2, {"step": 11}).manifest["step"] == 11
    assert [c.step for c in CheckpointStore(tmp_path).committed()] == [10, 11]
