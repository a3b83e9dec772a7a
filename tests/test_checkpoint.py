"""orchestrator/checkpoint.py: atomically committed checkpoints, pruning, crash leftovers."""

from __future__ import annotations

import torch

from orchestrator.checkpoint import MANIFEST, CheckpointStore


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
