"""Which Ray cluster to talk to, and the local head that `trainctl cluster up` manages.

Resolution order: --address > RAY_ADDRESS > the head started by `trainctl cluster up`
> (only for `trainctl run`) an embedded Ray that lives as long as the command.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NAMESPACE = "trainctl"


class NoClusterError(RuntimeError):
    """No cluster to submit to (user error: the message says how to get one)."""


def trainctl_home() -> Path:
    return Path(os.environ.get("TRAINCTL_HOME", "~/.trainctl")).expanduser()


def _local_cluster_file() -> Path:
    return trainctl_home() / "cluster.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_cluster() -> dict | None:
    """The head recorded by `trainctl cluster up`, if its process is still alive."""
    path = _local_cluster_file()
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return info if _pid_alive(info["pid"]) else None


def resolve_address(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    local = local_cluster()
    if local is None:
        return None
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as the head was started (see `up`)
    return local["address"]


def connect(address: str | None = None, allow_embedded: bool = False) -> str:
    """ray.init against the resolved cluster; returns the address or 'embedded'."""
    import ray

    if ray.is_initialized():
        return "connected"
    resolved = resolve_address(address)
    common = dict(namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    if resolved is None:
        if not allow_embedded:
            raise NoClusterError(
                "no Ray cluster to submit to: start one with 'trainctl cluster up', "
                "pass --address HOST:PORT, or set RAY_ADDRESS"
            )
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", include_dashboard=False, **common)  # never a stale local head
        return "embedded"
    try:
        ray.init(address=resolved, **common)
    except ConnectionError as exc:
        raise NoClusterError(f"cannot reach the Ray cluster at {resolved}: {exc}") from None
    return resolved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def up(port: int | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
       timeout_s: float = 60.0) -> dict:
    """Start a local Ray head on 127.0.0.1 (idempotent) and remember it for later commands."""
    existing = local_cluster()
    if existing:
        return {**existing, "already_running": True}
    port = port or _free_port()
    if _port_open(port):
        raise NoClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
    home = trainctl_home()
    home.mkdir(parents=True, exist_ok=True)
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
           f"--port={port}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=false"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    log = open(home / "cluster.log", "wb")
    # --block keeps `ray start` in the foreground, owning the head's processes: stopping
    # this one process stops exactly this cluster (not every Ray on the machine).
    # The head listens on 127.0.0.1 only, so Ray's token auth is off: it would otherwise
    # turn itself on when ~/.ray/auth_token exists and lock out our own clients.
    # On `down` the head drains first; our detached actors never finish, so keep that short.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while not _port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise NoClusterError(f"the Ray head did not start; see {home / 'cluster.log'}")
        time.sleep(0.2)
    info = {"address": f"127.0.0.1:{port}", "pid": proc.pid, "started_at": time.time()}
    _local_cluster_file().write_text(json.dumps(info))
    return info


def down(timeout_s: float = 60.0) -> dict | None:
    """Stop the head that `up` started; None if there was none."""
    info = local_cluster()
    _local_cluster_file().unlink(missing_ok=True)
    if info is None:
        return None
    try:  # only `ray start --block` itself: it drains the node, then stops what it started
        os.kill(info["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return info
    deadline = time.monotonic() + timeout_s
    while _pid_alive(info["pid"]) and time.monotonic() < deadline:
        try:  # reap it if it is our child (it is not, from another CLI call)
            os.waitpid(info["pid"], os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(info["pid"], signal.SIGKILL)  # anything of that head still left
    except ProcessLookupError:
        pass
    return info
