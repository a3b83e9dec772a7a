"""A throwaway PostgreSQL server on 127.0.0.1 for the job-store tests (Debian's `postgresql`).

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    """The directory with initdb and pg_ctl, or None where PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server():
    """Yields a postgresql:// URL of a fresh database; stops and deletes the cluster after."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; `make setup` does)")
    root = Path(tempfile.mkdtemp(prefix="trainctl-pg-"))
    data = root / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = dict(check=True, capture_output=True, cwd=root)
    subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "trainctl",
                              "--auth=trust", "-E", "UTF8"]), **run)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
    subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
                              "-l", str(root / "server.log"), "-w", "-t", "60", "start"]), **run)
    try:
        subprocess.run(_as_owner([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                  "-U", "trainctl", "jobs"]), **run)
        yield f"postgresql://trainctl@127.0.0.1:{port}/jobs"
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
