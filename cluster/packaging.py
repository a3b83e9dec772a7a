"""Ship a job's working_dir to every node through Ray's runtime_env package store.

The client zips the directory (Ray's own packaging, so .gitignore and excludes apply)
and hands the bytes to the controller, which keeps them on the head node and
re-uploads to the GCS when a job starts: a job queued for hours, or a restarted
controller, still finds its code.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

# Never worth shipping; .gitignore'd paths are skipped as well.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "runs"]


def package_working_dir(directory: str | Path, excludes: list[str] | None = None) -> tuple[str, bytes]:
    """Returns (gcs:// URI named by content hash, zip bytes)."""
    from ray._private.runtime_env import packaging

    logging.getLogger(packaging.__name__).setLevel(logging.WARNING)  # no INFO chatter in the CLI
    directory = str(Path(directory).resolve())
    excludes = DEFAULT_EXCLUDES + list(excludes or [])
    uri = packaging.get_uri_for_directory(directory, include_gitignore=True, excludes=excludes)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        packaging.create_package(directory, target, include_gitignore=True, excludes=excludes, logger=None)
        return uri, target.read_bytes()


def ensure_uploaded(uri: str, load: Callable[[], bytes | None]) -> None:
    """Upload the package to this cluster's GCS unless it is already there (`load` gives its
    bytes, kept by the controller's store: a new head's GCS has none of the old packages)."""
    from ray._private.runtime_env import packaging

    if not packaging.package_exists(uri):
        data = load()
        if data is None:
            raise FileNotFoundError(f"the job's working_dir package {uri} is in neither the GCS nor the job store")
        packaging.upload_package_to_gcs(uri, data)
