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


def default_state() -> str:
    """Where `cluster up` keeps the job store: TRAINCTL_STATE, else ~/.trainctl/state."""
    return os.environ.get("TRAINCTL_STATE") or str(trainctl_home() / "state")


def auth_token_path() -> Path:
    """The local head's Ray token (owner-only), made by the first `cluster up`."""
    return trainctl_home() / "auth_token"


def _ensure_auth_token() -> Path:
    path = auth_token_path()
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def _use_local_token() -> None:
    """Ray's token auth for a client of the `cluster up` head (which always has it on)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(auth_token_path())
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a token of some other cluster would win over the file
    try:  # Ray caches its auth settings when it is imported: make it read them again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except ImportError:  # a Ray without token authentication
        pass


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
    _use_local_token()
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
    unreachable = _unreachable(resolved)
    if unreachable:  # Ray itself would retry for minutes before giving up
        raise NoClusterError(f"cannot reach the Ray cluster at {resolved}: {unreachable}; "
                             "check --address or RAY_ADDRESS (HOST:PORT of the head)")
    try:
        ray.init(address=resolved, **common)
    except (ConnectionError, ValueError) as exc:  # ValueError: not HOST:PORT ("Invalid address format")
        raise NoClusterError(f"cannot reach the Ray cluster at {resolved}: {exc}; "
                             "check --address or RAY_ADDRESS (HOST:PORT of the head)") from None
    return resolved


def _unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing answers at HOST:PORT (None: something does, or it is not of that form)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None  # "auto", ray://..., or bad input that ray.init explains itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def up(port: int | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
       timeout_s: float = 60.0, state: str | None = None) -> dict:
    """Start a local Ray head on 127.0.0.1 (idempotent) and remember it for later commands.

    `state` is where the head's controller keeps the job store (a directory or a PostgreSQL
    URL, default `default_state()`): it outlives the head, so `down` then `up` loses no job."""
    existing = local_cluster()
    if existing:
        return {**existing, "already_running": True}
    port = port or _free_port()
    if _port_open(port):
        raise NoClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
    home = trainctl_home()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    state = state or default_state()
    if "://" not in state:  # the head's processes resolve nothing relative to our cwd
        state = str(Path(state).expanduser().resolve())
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
    # Ray's token auth stays on, with a token of our own (owner-only, in TRAINCTL_HOME) that
    # every later trainctl command presents (see resolve_address).
    # On `down` the head drains first; our detached actors never finish, so keep that short.
    token = _ensure_auth_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "TRAINCTL_STATE": state, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"}
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while not _port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise NoClusterError(f"the Ray head did not start; see {home / 'cluster.log'}")
        time.sleep(0.2)
    info = {"address": f"127.0.0.1:{port}", "pid": proc.pid, "started_at": time.time(), "state": state}
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
