"""From a rank to its job's supervisor: metrics, checkpoints and log lines, batched.

The training step only appends to a list; a background thread ships the batch to
the supervisor every `interval_s`, so reporting never waits on the network.

A rank's output is captured at the file-descriptor level (OutputCapture): fds 1 and 2
point at a spool file on the rank's node, so print(), logging, C++ libraries (NCCL's
watchdog) and faulthandler's stack of a crashing rank all land there. The reporter
thread tails it into the job log; whatever it had not shipped when the process died is
still in the file, and the supervisor reads it from the node afterwards (read_spool).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .preemption import PreemptSignal


class PushChannel(Protocol):
    """Where a rank's event batches go and its replies (commands) come from."""

    def push(self, rank: int, events: list) -> Any:
        """Send a batch; returns a pending reply."""

    def replies(self, pending: list, wait: bool) -> tuple[list, list]:
        """(the replies that are there, the still pending); `wait`: all of them, within 30 s."""


class RayPushChannel:
    """To the job's supervisor through Ray (a rank in a Ray worker: the SupervisorRef)."""

    def __init__(self, supervisor):
        self.supervisor = supervisor

    def push(self, rank: int, events: list) -> Any:
        return self.supervisor.push.remote(rank, events)

    def replies(self, pending: list, wait: bool) -> tuple[list, list]:
        import ray

        if wait:
            return ray.get(pending, timeout=30), []
        ready, rest = ray.wait(pending, num_returns=len(pending), timeout=0)
        return (ray.get(ready) if ready else []), rest


def push_channel(supervisor) -> PushChannel | None:
    """The rank's channel: the host relay of a forked rank (runtime/zygote.py) is one already.
    Asked of the type: a SupervisorRef answers any attribute (its methods are the supervisor's)."""
    if supervisor is None or callable(getattr(type(supervisor), "replies", None)):
        return supervisor
    return RayPushChannel(supervisor)


class Reporter:
    def __init__(self, supervisor, rank: int, interval_s: float = 0.25):
        self.supervisor = push_channel(supervisor)
        self.rank = rank
        self.interval_s = interval_s
        self._events: list[tuple[str, float, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # called on this thread before each send: aggregated telemetry (telemetry.RankMeter.drain)
        self.sources: list = []
        # called on this thread before each send, before the sources: they emit events of their
        # own (the output capture's new lines, the memory sample)
        self.pollers: list[Callable[[], None]] = []
        # a checkpoint-now request arrives in the reply to a push (preemption, drain, resize)
        self.preempt = PreemptSignal()
        self._replies: list = []  # pushes whose reply was not read yet
        self._thread = threading.Thread(target=self._loop, name="trainctl-reporter", daemon=True)
        self._thread.start()

    def emit(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._events.append((kind, time.time(), payload))

    def _take(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events

    def flush(self, wait: bool = False) -> None:
        for poll in list(self.pollers):  # the capture removes itself as the rank ends
            try:
                poll()
            except Exception:  # a lost log line must not stop the reports that carry progress
                pass
        for source in self.sources:
            try:
                payload = source()
            except Exception:  # metrics must never break the reports that carry progress
                payload = None
            if payload:
                self.emit("telemetry", payload)
        events = self._take()
        if self.supervisor is None:
            return
        if events or self.preempt.awaiting_agreement:  # waiting for the common step: ask anyway
            self._replies.append(self.supervisor.push(self.rank, events))
        self._read_replies(wait)

    def _read_replies(self, wait: bool) -> None:
        """Apply what the supervisor answered; without `wait`, only the replies already there
        (the reporter thread never waits on the network)."""
        if not self._replies:
            return
        pending, self._replies = self._replies, []
        replies, self._replies = self.supervisor.replies(pending, wait)
        for reply in replies:
            self.preempt.on_reply(reply, self.emit)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # the supervisor is gone: the group is being torn down
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.flush(wait=True)
        except Exception:
            pass


# ---- the rank's output, captured at the file-descriptor level ----------------------------

# Bytes shipped per reporter tick at most: a rank printing in a tight loop cannot make one
# push enormous; the rest follows on the next ticks.
_MAX_CHUNK = 1 << 20
# What the supervisor reads back from a dead rank's spool at most: its last words.
POST_MORTEM_LIMIT = 256 * 1024


@dataclass(frozen=True)
class SpoolInfo:
    """Sent by a rank as it starts (event "rank_started"): where to look if it dies."""
    path: str                 # the spool file on the rank's node
    oom_kills: int | None     # the node's kernel OOM-kill counter at the start


def spool_path(job_id: str, rank: int, attempt: int) -> Path:
    return Path(tempfile.gettempdir()) / "trainctl" / job_id / f"rank{rank}-attempt{attempt}.out"


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has killed on this node since boot."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident memory (RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class PostMortem:
    text: str                 # the spool from the last shipped offset (its last POST_MORTEM_LIMIT bytes)
    oom_kills: int | None     # the node's OOM-kill counter now


def read_spool(path: str, offset: int, remove: bool = True) -> PostMortem:
    """Runs on a dead rank's node: what it wrote after `offset` (the supervisor has the
    rest already), and the node's OOM-kill counter; the spool file is removed."""
    text = ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(offset, size - POST_MORTEM_LIMIT)
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
            if start > offset:
                text = f"[trainctl] ... {start - offset} bytes left out ...\n" + text
        if remove:
            os.unlink(path)
            _remove_if_empty(Path(path).parent)
    except FileNotFoundError:
        pass
    return PostMortem(text, oom_kill_count())


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # another rank's spool is still there
        pass


class OutputCapture:
    """Points fds 1 and 2 at a spool file and tails it into the reporter.

    Each complete line goes to the job log (event "output": the lines, the spool and the
    offset they end at, so the supervisor knows what is still unread if the rank dies) and is
    written through to the original fd 2 (Ray's worker log). Output is not duplicated:
    Python's sys.stdout/sys.stderr are left alone and reach the spool through the fds.
    """

    def __init__(self, reporter: Reporter, path: Path):
        self.reporter, self.path = reporter, Path(path)
        self._offset = 0  # everything before it has been shipped
        self._lock = threading.Lock()
        self._saved: dict[int, int] = {}
        self._reader = None

    def start(self) -> None:
        _flush_python_streams()
        spool = self._create()
        try:
            for fd in (1, 2):
                self._saved[fd] = os.dup(fd)
                os.dup2(spool, fd)
        finally:
            os.close(spool)
        self._reader = open(self.path, "rb")
        # A fatal signal's Python stack (every thread's) goes to fd 2, now the spool.
        faulthandler.enable(file=2, all_threads=True)
        self.reporter.pollers.append(self.poll)

    def _create(self) -> int:
        for _ in range(3):  # the job's directory may be removed by a rank that just ended
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"cannot create the output spool {self.path}")

    def poll(self, final: bool = False) -> None:
        """Ship the complete lines written since the last poll (and, if final, the rest)."""
        with self._lock:
            if self._reader is None:
                return
            self._reader.seek(self._offset)
            chunk = self._reader.read(_MAX_CHUNK)
            if not final and len(chunk) < _MAX_CHUNK:
                chunk = chunk[: chunk.rfind(b"\n") + 1]  # a partial line waits for its end
            if not chunk:
                return
            self._offset += len(chunk)
            _write_all(self._saved[2], chunk)
            lines = chunk.decode("utf-8", errors="replace").split("\n")
            if lines[-1] == "":
                lines.pop()
            self.reporter.emit("output", {"lines": lines, "end": self._offset, "path": str(self.path)})

    def stop(self) -> None:
        _flush_python_streams()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
        faulthandler.enable(file=2, all_threads=True)  # Ray's stderr again
        try:
            self.poll(final=True)
            while self._reader is not None and self._offset < os.path.getsize(self.path):
                self.poll(final=True)  # a long last burst: _MAX_CHUNK at a time
        finally:
            with self._lock:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
            for saved in self._saved.values():
                os.close(saved)
            self._saved = {}
            if self.poll in self.reporter.pollers:
                self.reporter.pollers.remove(self.poll)
            self.path.unlink(missing_ok=True)
            _remove_if_empty(self.path.parent)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # Ray's log file gone: the job log still has the lines
        pass


@contextmanager
def captured_output(reporter: Reporter, job_id: str, rank: int, attempt: int):
    """This rank's output, from any writer (Python, C++, faulthandler), into the job log.

    Tells the supervisor at once where its spool is, so that a rank that dies in its
    first second still leaves its last words."""
    capture = OutputCapture(reporter, spool_path(job_id, rank, attempt))
    _remove_older_spools(capture.path, attempt)
    capture.start()
    sampler = _MemorySampler(reporter)
    reporter.pollers.append(sampler)
    reporter.emit("rank_started", SpoolInfo(str(capture.path), oom_kill_count()))
    try:
        reporter.flush(wait=True)
    except Exception:  # the supervisor is unreachable: the job is being torn down
        pass
    try:
        yield capture
    finally:
        reporter.pollers.remove(sampler)
        capture.stop()


class _MemorySampler:
    """Reports the rank's resident memory once a second: after an OOM kill, its last value says how big it was."""

    def __init__(self, reporter: Reporter, every_s: float = 1.0):
        self.reporter, self.every_s, self._last = reporter, every_s, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            rss = resident_bytes()
            if rss is not None:
                self.reporter.emit("rss", rss)


def _remove_older_spools(path: Path, attempt: int) -> None:
    """Spools of this rank's earlier attempts, left when their group was torn down."""
    prefix = path.name.split("-attempt")[0] + "-attempt"
    for old in path.parent.glob(prefix + "*.out"):
        try:
            if int(old.name[len(prefix):-len(".out")]) < attempt:
                old.unlink(missing_ok=True)
        except ValueError:
            pass
