"""Importing a job's own modules (entrypoint, post-training hooks) in this process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def importable_from(directory: str | None) -> Iterator[None]:
    """The job's working_dir on sys.path for a while, as it is the cwd on the workers."""
    added = bool(directory) and directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            sys.path.remove(directory)
