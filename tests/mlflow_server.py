"""A throwaway MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts in a temp dir)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def mlflow_bin() -> Path | None:
    """The venv's `mlflow` command, or None where mlflow is not installed."""
    found = Path(sys.executable).parent / "mlflow"
    return found if found.exists() else (Path(p) if (p := shutil.which("mlflow")) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(timeout_s: float = 120.0):
    """Yields the server's http:// URI once it answers /health; stops it and deletes its files after."""
    root = Path(tempfile.mkdtemp(prefix="trainctl-mlflow-"))
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_bin()), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f}s")
            time.sleep(0.3)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
