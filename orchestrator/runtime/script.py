"""A script job's rank: the spec's `command` run as a child of the rank's worker actor.

The actor stays what Ray schedules and kills; the command runs under script_guard.py (its
own process group, killed with the actor) in the job's working_dir, with the environment
torchrun gives a rank, so `init_process_group("gloo"|"nccl")` with the default env:// works
unchanged. Its fds 1 and 2 are the rank's (OutputCapture's spool): [rank N] logs and crash
post-mortems work as for any job. `orchestrator.report(...)` in the script reaches the
rank's Reporter through a Unix socket (script_report.py).

Progress for the hang watch (control/hang.py), decided by progress_signal():
  - once the script has reported, its reports are its progress (as for an entrypoint job);
  - before that, with failure.hang_timeout_s set, a line of output counts as progress (a
    script stuck in a collective prints nothing);
  - otherwise the process being alive and not stopped counts: a silent script is never
    judged hung for being slow, only when it is frozen (SIGSTOP, a tracer) or dies.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .reporting import Reporter

GUARD = Path(__file__).with_name("script_guard.py")
# How many of the script's last lines a failure's message carries (the log has them all).
LAST_LINES = 5
_LAST_LINE_CHARS = 200


class ScriptFailed(RuntimeError):
    """The command exited non-zero or was killed by a signal (a restartable failure)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


# ---- the command and its environment (pure) ---------------------------------------------

def resolve_argv(command: list[str], python: str = sys.executable) -> list[str]:
    """`python ...` is the worker's own interpreter (the one with torch and trainctl), not
    whichever `python` the node's PATH finds first."""
    if command and command[0] in ("python", "python3"):
        return [python, *command[1:]]
    return list(command)


_TRAINCTL_VAR = re.compile(r"\$(?:\{(TRAINCTL_\w+)\}|(TRAINCTL_\w+))")


def expand_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """`$TRAINCTL_CHECKPOINT_DIR` (and the other TRAINCTL_ variables) in the command's words,
    replaced on the rank: the submitting shell cannot know them. Nothing else is expanded
    (no shell runs the command: `$5` stays `$5`)."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))
    return [_TRAINCTL_VAR.sub(value, word) for word in argv]


def checkpoint_dir(checkpoint_root: str) -> str:
    """TRAINCTL_CHECKPOINT_DIR: <checkpoint.storage>/<job id>/script, the same on every attempt."""
    return str(Path(checkpoint_root) / "script")


def report_socket_path(job_id: str, rank: int, attempt: int) -> str:
    # A Unix socket path has at most 107 bytes: a digest, not the job's name.
    digest = hashlib.sha1(f"{job_id}/{rank}/{attempt}".encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "trainctl" / f"report-{digest}.sock")


def script_env(base: dict[str, str], *, job_id: str, attempt: int, max_restarts: int,
               checkpoint_dir: str, report_socket: str, cpus_per_worker: float,
               package_root: str | None = None) -> dict[str, str]:
    """The command's environment: the rank's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*, ROLE_*,
    CUDA_VISIBLE_DEVICES: cluster/workers.rank_env and gpu_env) plus torchelastic's restart
    variables and trainctl's own."""
    env = dict(base)
    env.update({
        "TORCHELASTIC_RESTART_COUNT": str(attempt),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": job_id,
        "TRAINCTL_JOB_ID": job_id,
        "TRAINCTL_CHECKPOINT_DIR": checkpoint_dir,
        "TRAINCTL_REPORT_SOCKET": report_socket,
        "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED", "1"),  # lines reach the log as printed
    })
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus_per_worker))))
    # torchrun's agent hosts the store when this is True; here rank 0 hosts it (env://'s default)
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    if package_root:  # `import orchestrator` (for orchestrator.report) works from any script
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if package_root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([*parts, package_root])
    return env


def exit_message(argv: list[str], returncode: int, last_lines: list[str]) -> str:
    """One line: which command, how it ended, its last words."""
    shown = " ".join(argv)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    tail = [line[:_LAST_LINE_CHARS] for line in last_lines if line.strip()][-LAST_LINES:]
    return f"`{shown}` {how}" + (f"; its last lines: {' | '.join(tail)}" if tail else "; it printed nothing")


def last_lines(path: str | Path, n: int = LAST_LINES, start: int = 0, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` non-empty lines written to the spool after offset `start` (the script's)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rstrip("\r") for line in text.split("\n")]
    return [line for line in lines if line.strip() and not line.startswith("[trainctl] ")][-n:]


ProgressSignal = Literal["reports", "output", "alive"]


def progress_signal(hang_timeout_s: float | None, reported: bool) -> ProgressSignal:
    """What counts as the script's progress for the hang watch (see the module doc)."""
    if reported:
        return "reports"
    return "output" if hang_timeout_s is not None else "alive"


# ---- the process --------------------------------------------------------------------------

def _process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, D, T, t, Z...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_resident_bytes(pid: int) -> int:
    """The resident memory of a process and all its descendants (the script and its workers)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _resident_bytes(current)
        todo += _children(current)
    return total


class ScriptProcess:
    """The command under its guard, in a process group of its own."""

    def __init__(self, popen: subprocess.Popen, argv: list[str]):
        self.popen, self.argv = popen, argv
        self.terminate_requested = False

    @classmethod
    def start(cls, argv: list[str], cwd: str, env: dict[str, str]) -> ScriptProcess:
        popen = subprocess.Popen(
            [sys.executable, "-I", "-S", str(GUARD), str(os.getpid()), *argv],
            cwd=cwd, env=env, start_new_session=True, close_fds=True,
        )  # stdout/stderr inherited: fds 1 and 2 are the rank's spool
        return cls(popen, argv)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def script_pid(self) -> int:
        """The command's own process (the guard's child that is not its keeper, a fork of the
        guard with the guard's command line), or the guard while it starts."""
        guard = _cmdline(self.popen.pid)
        kids = [kid for kid in _children(self.popen.pid) if _cmdline(kid) != guard]
        return kids[0] if kids else self.popen.pid

    def running(self) -> bool:
        """Alive and not stopped (SIGSTOP, a tracer) or a zombie."""
        if self.popen.poll() is not None:
            return False
        return _process_state(self.script_pid()) not in (None, "T", "t", "Z", "X")

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole group (whatever the script left behind too)."""
        self._signal_group(signal.SIGKILL)
        if self.popen.poll() is None:
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def terminate(self, grace_s: float) -> int | None:
        """Preemption as torchelastic and Kubernetes do it: SIGTERM to the script's group, up
        to `grace_s` for it to save and exit, then SIGKILL. Returns its exit code. Blocks:
        call it from a thread of its own; the rank's run then returns ("preempted") instead
        of failing. run_script registers it with the reporter's PreemptSignal.on_request."""
        self.terminate_requested = True
        self._signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.poll()


_current: ScriptProcess | None = None


def current() -> ScriptProcess | None:
    """The script process this worker runs now, if any (the preemption hook's handle)."""
    return _current


# ---- reports from the script --------------------------------------------------------------

class ReportServer:
    """The rank's end of TRAINCTL_REPORT_SOCKET: JSON lines from the script (and its children).

    A thread of its own reads them as they come: the kernel holds only a few hundred small
    messages per connection, and a script reporting every step must never wait on the
    reporter's 0.25 s tick. poll() hands over what arrived since the last call."""

    def __init__(self, path: str):
        import selectors
        import socket

        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._partial: dict[int, bytes] = {}
        self._received: list[dict] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.bad_lines = 0
        self._thread = threading.Thread(target=self._serve, name="trainctl-script-reports", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                ready = self._selector.select(timeout=0.2)
            except (OSError, ValueError):  # closed under us
                return
            for key, _ in ready:
                if key.fileobj is self._sock:
                    self._accept()
                else:
                    self._read(key.fileobj)

    def _accept(self) -> bool:
        import selectors

        try:
            conn, _ = self._sock.accept()
        except OSError:  # nothing pending (BlockingIOError), or closed
            return False
        conn.setblocking(False)
        self._selector.register(conn, selectors.EVENT_READ)
        return True

    def _read(self, conn) -> bool:
        """Read what `conn` has now; False once nothing more is to be had from it."""
        import json

        try:
            chunk = conn.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:  # the sender closed (or died): its unfinished line is dropped
            self._selector.unregister(conn)
            self._partial.pop(conn.fileno(), None)
            conn.close()
            return False
        *lines, rest = (self._partial.pop(conn.fileno(), b"") + chunk).split(b"\n")
        if rest:
            self._partial[conn.fileno()] = rest
        items = []
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if isinstance(item, dict):
                items.append(item)
            elif line.strip():
                self.bad_lines += 1
        if items:
            with self._lock:
                self._received += items
        return True

    def poll(self) -> list[dict]:
        with self._lock:
            items, self._received = self._received, []
        return items

    def close(self) -> None:
        """Read what is left, then stop. Called once the script's whole group is gone: every
        line it sent is in the kernel's buffers by then, connections not yet accepted too."""
        self._closing.set()
        self._thread.join(timeout=2)
        while self._accept():
            pass
        for key in list(self._selector.get_map().values()):
            if key.fileobj is not self._sock:
                while self._read(key.fileobj):
                    pass
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()
        Path(self.path).unlink(missing_ok=True)


@dataclass
class ScriptMonitor:
    """A reporter poller (runs on the reporter's thread every tick): the script's reports as
    "metrics" events, and its liveness as "progress" events (see progress_signal)."""

    reporter: Reporter
    server: ReportServer
    process: ScriptProcess
    spool: Path
    hang_timeout_s: float | None
    meter: object | None = None   # monitoring.telemetry.RankMeter: step time for `trainctl top`
    alive_every_s: float = 1.0
    rss_every_s: float = 1.0
    step: int = 0
    reported: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._last_alive = 0.0
        self._last_rss = 0.0
        self._spool_size = 0

    def __call__(self) -> None:
        with self._lock:
            for metrics in self.server.poll():
                self._on_report(metrics)
            now = time.monotonic()
            if now - self._last_rss >= self.rss_every_s:
                # after the rank's own sample (an earlier poller): the memory an OOM post-mortem
                # names is the actor's and the script's together, the script being the big one
                self._last_rss = now
                self.reporter.emit("rss", _resident_bytes(os.getpid()) + tree_resident_bytes(self.process.pid))
            mode = progress_signal(self.hang_timeout_s, self.reported)
            if mode == "alive":
                now = time.monotonic()
                if now - self._last_alive >= self.alive_every_s and self.process.running():
                    self._last_alive = now
                    self.reporter.emit("progress", {"alive": True})
            elif mode == "output":
                try:
                    size = self.spool.stat().st_size
                except OSError:
                    size = self._spool_size
                if size > self._spool_size:
                    self._spool_size = size
                    self.reporter.emit("progress", {"output": True})

    def _on_report(self, metrics: dict) -> None:
        if "total_steps" in metrics:
            total = metrics.pop("total_steps")
            if isinstance(total, (int, float)) and total > 0:
                self.reporter.emit("total_steps", int(total))
            if not metrics:
                return
        previous = self.step
        try:
            self.step = int(metrics["step"]) if "step" in metrics else self.step + 1
        except (TypeError, ValueError):
            self.step += 1
        metrics["step"] = self.step
        self.reported = True
        if self.meter is not None:
            self.meter.on_report(metrics, self.step - previous, None)
            self.meter.mark()
        self.reporter.emit("metrics", metrics)


def _size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def package_root() -> str:
    """The directory holding the orchestrator package."""
    return str(Path(__file__).resolve().parents[2])


def run_script(task, spec, reporter: Reporter, spool: Path) -> dict:
    """Run the spec's command on this rank until it exits; raises ScriptFailed if it failed."""
    global _current
    from ..monitoring.metrics import enabled as metrics_enabled
    from ..monitoring.telemetry import RankMeter

    rank = int(os.environ.get("RANK", "0"))
    ckpt = checkpoint_dir(task.checkpoint_root)
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    sock_path = report_socket_path(task.job_id, rank, task.attempt)
    env = script_env(dict(os.environ), job_id=task.job_id, attempt=task.attempt,
                     max_restarts=spec.failure.max_restarts, checkpoint_dir=ckpt, report_socket=sock_path,
                     cpus_per_worker=spec.resources.cpus_per_worker, package_root=package_root())
    argv = expand_args(resolve_argv(spec.command), env)
    meter = RankMeter() if metrics_enabled() else None
    if meter is not None:
        reporter.sources.append(meter.drain)  # unmarked: the first step's time would include the startup
    server = ReportServer(sock_path)
    spool_start = _size(spool)  # what the rank wrote before: not the script's last words
    try:
        proc = ScriptProcess.start(argv, cwd=os.getcwd(), env=env)
    except BaseException:
        server.close()
        raise
    monitor = ScriptMonitor(reporter, server, proc, Path(spool), spec.failure.hang_timeout_s, meter)
    reporter.pollers.append(monitor)
    _current = proc
    preempt = getattr(reporter, "preempt", None)  # runtime/preemption.PreemptSignal
    if preempt is not None:  # a preemption: SIGTERM, then SIGKILL after the grace (off the reporter thread)
        preempt.on_request.append(lambda: threading.Thread(
            target=proc.terminate, args=(spec.preemption.grace_s,), name="trainctl-script-terminate",
            daemon=True).start())
    try:
        code = proc.wait()
    finally:
        _current = None
        proc.kill()  # no-op after a clean exit, but nothing the script started may outlive the rank
        server.close()  # after reading what the script sent just before it exited
        monitor()  # ... which becomes its last metrics events
        reporter.pollers.remove(monitor)
    result = {"rank": rank, "step": monitor.step, "exit_code": code}
    if proc.terminate_requested:  # preempted: it had its grace to save its own snapshot
        return {**result, "preempted": True}
    if code == 0:
        return result
    raise ScriptFailed(exit_message(spec.command, code, last_lines(spool, start=spool_start)), exit_code=code)
