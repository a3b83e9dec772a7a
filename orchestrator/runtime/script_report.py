"""`orchestrator.report(metrics)` for a script job: metrics without the ctx API.

Stdlib only. Each call sends one JSON line over the Unix socket named by
TRAINCTL_REPORT_SOCKET (set by trainctl in every rank's environment, see runtime/script.py);
outside trainctl the variable is unset and a call does nothing. A report never raises: a
supervisor that went away must not fail the training loop.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

SOCKET_ENV = "TRAINCTL_REPORT_SOCKET"

_sock: socket.socket | None = None
_sock_pid: int | None = None  # a forked child (DataLoader worker) opens its own connection
_broken = False


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as plain numbers (a one-element tensor is read here)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # a tensor of many elements
            pass
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _connection(path: str) -> socket.socket | None:
    global _sock, _sock_pid, _broken
    if _sock is not None and _sock_pid == os.getpid():
        return _sock
    if _broken and _sock_pid == os.getpid():
        return None
    _sock, _sock_pid, _broken = None, os.getpid(), False
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError:
        _broken = True
        return None
    _sock = sock
    return sock


def report(metrics: dict[str, Any]) -> None:
    """Send `metrics` (e.g. {"loss": 0.3, "step": 120}) to the job's status, progress bar and
    Prometheus. Known keys as for ctx.report: `step` (else each report counts one step),
    `loss`, `samples`; `total_steps` sets the progress bar's end."""
    global _sock, _broken
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    if not isinstance(metrics, dict):
        raise TypeError(f"orchestrator.report takes a dict of metrics, got {type(metrics).__name__}")
    line = json.dumps({str(k): _plain(v) for k, v in metrics.items()}) + "\n"
    sock = _connection(path)
    if sock is None:
        return
    try:
        sock.sendall(line.encode())
    except OSError:
        sock.close()
        _sock, _broken = None, True
