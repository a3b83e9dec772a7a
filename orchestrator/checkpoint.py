"""Checkpoints committed atomically for the whole job.

Layout under the job's directory:
    checkpoint_000003/          committed: has manifest.json, written last
    checkpoint_000004.partial/  being written (or left by a crash): never read, swept later
A checkpoint becomes visible only through the rename of its finished directory, so a
crash while saving can never damage the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

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


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

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

    def prune(self) -> None:
        """Keep the newest `keep` committed checkpoints; sweep leftovers of crashed saves."""
        for old in self.committed()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        newest = self.latest()
        for child in self.root.glob("checkpoint_*.partial"):
            index = int(child.name.split("_")[1].split(".")[0])
            if newest is None or index <= newest.index:
                shutil.rmtree(child, ignore_errors=True)
