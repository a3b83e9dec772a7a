"""Which Ray cluster to talk to, and the local head that `trainctl cluster up` manages.

Resolution order: --address > RAY_ADDRESS > the head started by `trainctl cluster up`
> (only for `trainctl run`) an embedded Ray that lives as long as the command.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

NAMESPACE = "trainctl"
logger = logging.getLogger(__name__)


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


class HeadStartError(RuntimeError):
    """`cluster up` started a head that does not answer (the message says why and where to look)."""


# What Ray's `ray start` raises when its raylet did not register with the GCS in time: on a
# loaded machine a second start usually succeeds.
GCS_STARTUP_TIMEOUT = "timed out during startup"
HEAD_START_TIMEOUT_S = 120.0  # per `ray start`: the port, then the probe; generous for loaded machines


class HeadVerdict(NamedTuple):
    """How one `ray start` went: `cause` is empty when the head answers."""

    cause: str = ""
    retry: bool = False  # another `ray start` may succeed (a transient GCS timeout)

    @property
    def ok(self) -> bool:
        return not self.cause


def head_verdict(ray_start_rc: int | None, probe_rc: int | None, log_text: str, probe_error: str = "",
                 waited_s: float | None = None) -> HeadVerdict:
    """Judge one `ray start --block` from what is known when the wait ends: its exit code (None:
    still running, as it must be), the probe's (0: the head and its controller answered; None:
    no answer yet when `waited_s` ran out), and the log `ray start` wrote."""
    transient = GCS_STARTUP_TIMEOUT in log_text
    if transient:  # Ray's own words for it, then ours
        cause = "its node timed out during startup (the raylet did not register: GCS overloaded?)"
    elif ray_start_rc is not None:
        cause = f"`ray start` exited with code {ray_start_rc}" + (f" ({last})" if (last := _last_error(log_text)) else "")
    elif probe_rc is None:
        cause = f"it did not answer within {waited_s or 0:.0f} s"
    elif probe_rc != 0:
        cause = f"it does not answer ({probe_error or f'the probe exited with code {probe_rc}'})"
    else:
        return HeadVerdict()
    return HeadVerdict(cause, retry=transient)


def _last_error(log_text: str) -> str:
    """The last line of a log that names an error (a traceback's last line), else ''."""
    lines = [line.strip() for line in log_text.splitlines()
             if re.match(r"^\s*([\w.]*(Error|Exception)\b|error:)", line.strip(), re.IGNORECASE)]
    return lines[-1][:300] if lines else ""


def raylet_abort(raylet_log: str) -> str:
    """Why a raylet aborted, from its log (raylet.out), '' if it did not: `ray start` itself
    only says that the node timed out. The commonest on a loaded machine: an agent slower to
    start than the raylet waits for it (a fixed 15 s, ray-project/ray#65983)."""
    found = re.findall(r"Check failed: \S+ (.*)", raylet_log)
    if not found:
        return ""
    reason = re.sub(r"/\S*/([^/\s]+)", r"\1", found[-1].strip())  # a file's name, not its session path
    if "Timed out waiting for file" in reason:
        reason += " (a Ray agent started slower than the raylet waits for it; a loaded machine?)"
    return reason[:300]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def ray_session_logs(pid: int) -> Path | None:
    """The logs directory of the Ray session that `ray start` with process id `pid` created
    (Ray names it session_<date>_<pid> under its temp dir), if there is one."""
    root = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
    found = sorted(root.glob(f"session_*_{pid}/logs"))
    return found[-1] if found else None


def _launch(cmd: list[str], env: dict, log) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground, owning the head's processes: stopping
    # this one process (its process group) stops exactly this cluster (not every Ray on the machine).
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _probe_head(command: list[str], env: dict, errors) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)


def _stop_group(proc) -> None:
    """Kill `ray start` and whatever of the head it started (its process group), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _wait_for_head(proc, port: int, probe_command: list[str] | None, env: dict, log_path: Path,
                   log_from: int, timeout_s: float) -> HeadVerdict:
    """Wait until `ray start` (`proc`) listens on `port` and `probe_command` (run then) exits 0,
    or either fails, or `timeout_s` runs out; judged by head_verdict."""
    deadline = time.monotonic() + timeout_s
    probe, probe_rc = None, None
    errors = tempfile.TemporaryFile()  # not a pipe: Ray's warnings would fill it and block the probe
    try:
        while True:
            if proc.poll() is not None:
                break
            if probe is None and _port_open(port):
                if probe_command is None:
                    probe_rc = 0
                    break
                probe = _probe_head(probe_command, env, errors)
            if probe is not None and (probe_rc := probe.poll()) is not None:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        error = ""
        if probe_rc:
            errors.seek(0)
            error = _last_line(errors.read().decode(errors="replace"))
        with open(log_path, "rb") as f:
            f.seek(log_from)
            log_text = f.read().decode(errors="replace")
        return head_verdict(proc.poll(), probe_rc, log_text, error, timeout_s)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()
        errors.close()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("trainctl: error: ")[:300] if lines else ""


def up(port: int | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
       timeout_s: float = HEAD_START_TIMEOUT_S, state: str | None = None,
       probe: list[str] | None = None) -> dict:
    """Start a local Ray head on 127.0.0.1 (idempotent) and remember it for later commands.

    `state` is where the head's controller keeps the job store (a directory or a PostgreSQL
    URL, default `default_state()`): it outlives the head, so `down` then `up` loses no job.
    `probe`: a command, run with the head's address appended once its port is open, that
    exits 0 when the head really answers (the CLI's checks that its controller does). The head
    is recorded only then; else it is stopped and HeadStartError says why (one more `ray
    start` first if Ray timed out starting the node, which a loaded machine does)."""
    existing = local_cluster()
    if existing:
        return {**existing, "already_running": True}
    if port is not None and _port_open(port):
        raise NoClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
    home = trainctl_home()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    state = state or default_state()
    if "://" not in state:  # the head's processes resolve nothing relative to our cwd
        state = str(Path(state).expanduser().resolve())
    # Ray's token auth stays on, with a token of our own (owner-only, in TRAINCTL_HOME) that
    # every later trainctl command presents (see resolve_address).
    # On `down` the head drains first; our detached actors never finish, so keep that short.
    token = _ensure_auth_token()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "TRAINCTL_STATE": state, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)  # the probe talks to this head alone
    log_path = home / "cluster.log"
    with open(log_path, "wb") as log:
        for attempt in (1, 2):
            head_port = port or _free_port()
            if attempt > 1 and port is not None:  # the killed head's port frees up at once
                _wait_closed(port)
            log_from = log_path.stat().st_size  # this attempt's part of the log
            proc = _launch(_ray_start_command(head_port, num_cpus, num_gpus), env, log)
            address = f"127.0.0.1:{head_port}"
            verdict = _wait_for_head(proc, head_port, probe and [*probe, address], env, log_path,
                                     log_from, timeout_s)
            if verdict.ok:
                break
            _stop_group(proc)  # nothing of a head that does not answer stays behind
            if verdict.retry and attempt == 1:
                logger.info("the Ray head did not start: %s; starting it once more", verdict.cause)
                log.write(b"\n[trainctl] the Ray head did not start; starting it once more\n")
                log.flush()
                continue
            logs = ray_session_logs(proc.pid)
            again = ", also on a second try" if attempt > 1 else ""
            aborted = raylet_abort(_read(logs / "raylet.out")) if logs else ""
            raise HeadStartError(f"the Ray head did not start: {verdict.cause}{again}"
                                 + (f"; its raylet aborted: {aborted}" if aborted else "")
                                 + f"; nothing was recorded; see {log_path}"
                                 + (f" and Ray's logs in {logs}" if logs else ""))
    info = {"address": address, "pid": proc.pid, "started_at": time.time(), "state": state}
    _local_cluster_file().write_text(json.dumps(info))
    return info


def _ray_start_command(port: int, num_cpus: int | None, num_gpus: int | None) -> list[str]:
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
           f"--port={port}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=false"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


def _wait_closed(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.2)


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
