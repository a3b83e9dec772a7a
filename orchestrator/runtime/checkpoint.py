"""Checkpoints committed atomically for the whole job.

Layout under the job's directory:
    checkpoint_000003/          committed: has manifest.json, written last
    checkpoint_000004.partial/  being written (or left by a crash): never read, swept later
A checkpoint becomes visible only through the rename of its finished directory, so a
crash while saving can never damage the previous one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control.early_stop import improves, metric_value
from ..control.failure import format_bytes
from ..spec import MetricGoal

MANIFEST = "manifest.json"
_COMMITTED = re.compile(r"^checkpoint_(\d{6,})$")


@dataclass(frozen=True)
class Checkpoint:
    index: int
    path: Path
    manifest: dict

    @property
    def step(self) -> int | None:
        return self.manifest.get("step")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint_dir(path: str | Path) -> Checkpoint:
    """A committed checkpoint directory given by path (e.g. another job's, to start from)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path}: not a committed trainctl checkpoint (no {MANIFEST})")
    doc = json.loads(manifest.read_text())
    return Checkpoint(int(doc.get("index", 0)), path, doc)


def checkpoint_metric(checkpoint: Checkpoint, metric: str) -> float | None:
    """The metric as reported with the checkpoint (its manifest's metrics), if that report had it."""
    return metric_value(checkpoint.manifest.get("metrics") or {}, metric)


def best_checkpoint(checkpoints: list[Checkpoint], goal: MetricGoal) -> Checkpoint | None:
    """The checkpoint with the best value of goal.metric (the earliest of equals); None when no
    checkpoint was saved with a report that carried the metric."""
    best, best_value = None, None
    for c in sorted(checkpoints, key=lambda c: c.index):
        value = checkpoint_metric(c, goal.metric)
        if value is not None and improves(goal, value, best_value):
            best, best_value = c, value
    return best


OWNER = "OWNER"  # which attempt of the job may commit into this directory (see claim)


class SupersededError(RuntimeError):
    """This attempt's ranks were replaced by a newer attempt (e.g. they outlived a head restart):
    they must not commit checkpoints any more."""


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3, owner: str | None = None,
                 keep_best: MetricGoal | None = None):
        self.root = Path(root)
        self.keep = keep
        self.owner = owner  # this attempt's token: commit() refuses once another attempt claimed the job
        self.keep_best = keep_best  # checkpoint.keep_best: the best one survives pruning too

    def claim(self, owner: str) -> None:
        """Make `owner` (a new attempt) the only one whose commits are accepted: ranks of an older
        attempt still running somewhere (a head restart left them behind) can then not overwrite
        the new attempt's checkpoints."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{OWNER}.{os.getpid()}"
        tmp.write_text(owner)
        os.replace(tmp, self.root / OWNER)
        self.owner = owner

    def _check_owner(self) -> None:
        if self.owner is None:
            return
        try:
            current = (self.root / OWNER).read_text()
        except FileNotFoundError:
            return  # nobody claimed the directory: a store used outside a job
        if current != self.owner:
            raise SupersededError(f"a newer attempt ({current}) owns {self.root}; this one "
                                  f"({self.owner}) stops without committing")

    def committed(self) -> list[Checkpoint]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _COMMITTED.match(child.name)
            manifest = child / MANIFEST
            if match and manifest.is_file():
                found.append(Checkpoint(int(match.group(1)), child, json.loads(manifest.read_text())))
        return sorted(found, key=lambda c: c.index)

    def latest(self) -> Checkpoint | None:
        done = self.committed()
        return done[-1] if done else None

    def partial_path(self, index: int) -> Path:
        return self.root / f"checkpoint_{index:06d}.partial"

    def begin(self, index: int) -> Path:
        """A fresh, empty directory for checkpoint `index` (called by one rank)."""
        tmp = self.partial_path(index)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, index: int, manifest: dict) -> Checkpoint:
        """Seal checkpoint `index`: write its manifest, then make it visible by renaming."""
        self._check_owner()
        tmp = self.partial_path(index)
        manifest = {"index": index, "committed_at": time.time(), **manifest}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        final = self.root / f"checkpoint_{index:06d}"
        if final.exists():  # a re-run attempt reached the same index again
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self.prune()
        return Checkpoint(index, final, manifest)

    def best(self) -> Checkpoint | None:
        """The committed checkpoint with the best value of checkpoint.keep_best's metric."""
        return best_checkpoint(self.committed(), self.keep_best) if self.keep_best else None

    def prune(self) -> None:
        """Keep the newest `keep` committed checkpoints and the best one (keep_best); sweep
        leftovers of crashed saves."""
        done = self.committed()
        kept = {c.index for c in done[-self.keep:]}
        best = best_checkpoint(done, self.keep_best) if self.keep_best else None
        if best is not None:
            kept.add(best.index)
        for old in done:
            if old.index not in kept:
                shutil.rmtree(old.path, ignore_errors=True)
        newest = self.latest()
        for child in self.root.glob("checkpoint_*.partial"):
            index = int(child.name.split("_")[1].split(".")[0])
            if newest is None or index <= newest.index:
                shutil.rmtree(child, ignore_errors=True)

    def discard_partials(self) -> None:
        """Remove every unfinished checkpoint; only when no rank is writing (after a teardown)."""
        for child in self.root.glob("checkpoint_*.partial"):
            shutil.rmtree(child, ignore_errors=True)


# ---- a checkpoint that cannot be written ---------------------------------------------------

# errno -> the words for it; restarting cannot help until someone frees space or fixes access.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
# torch.save's zip writer loses the errno: these are what it says on a full disk instead
_WRITE_FAILED = ("file write failed", "failed writing file", "unexpected pos", "iostream error",
                 "No space left on device")


class CheckpointWriteError(Exception):
    """One line for a save the storage refused: what, where, how big, how much room."""

    def __init__(self, reason: str, directory: str, needed_bytes: int | None, free_bytes: int | None):
        self.reason, self.directory = reason, directory
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes
        super().__init__(reason, directory, needed_bytes, free_bytes)  # pickles across Ray as is

    def __str__(self) -> str:
        sizes = []
        if self.needed_bytes is not None:
            sizes.append(f"needs about {format_bytes(self.needed_bytes)}")
        if self.free_bytes is not None:
            sizes.append(f"{format_bytes(self.free_bytes)} free")
        return (f"checkpoint save failed: {self.reason} in {self.directory}"
                + (f" ({', '.join(sizes)})" if sizes else ""))


def free_bytes(path: str | Path) -> int | None:
    """Space an unprivileged writer may still use on the filesystem of `path` (df's Avail)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_writable(directory: str | Path) -> bool:
    """Whether a file can be created in `directory` now (tried: root ignores mode bits)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".trainctl-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def storage_ready(directory: str | Path, needed_bytes: int | None) -> bool:
    """Would a restart's next save fit? Writable, with room for another checkpoint."""
    if not is_writable(directory):
        return False
    free = free_bytes(directory)
    return free is None or needed_bytes is None or free >= needed_bytes


def _causes(exc: BaseException):
    """The exception, its causes/contexts, and what torch's CheckpointException gathered."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # {rank: (exception, traceback summary)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def diagnose_write_failure(exc: BaseException, directory: str | Path,
                           needed_bytes: int | None) -> CheckpointWriteError | None:
    """A CheckpointWriteError if the storage refused the save, else None (a real bug: re-raise)."""
    free = free_bytes(directory)
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
            return CheckpointWriteError(_STORAGE_ERRNOS[cause.errno], str(directory), needed_bytes, free)
    text = " ".join(str(c) for c in _causes(exc))
    if any(marker in text for marker in _WRITE_FAILED) and free is not None and needed_bytes is not None \
            and free < needed_bytes:
        return CheckpointWriteError(_STORAGE_ERRNOS[errno.ENOSPC], str(directory), needed_bytes, free)
    return None


def state_bytes(state: Any) -> int:
    """About how many bytes `state` takes on disk: its tensors (modules, optimizers, nested)."""
    if hasattr(state, "state_dict") and callable(state.state_dict):
        state = state.state_dict()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if hasattr(state, "numel") and hasattr(state, "element_size"):
        return state.numel() * state.element_size()
    return 0


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
