"""From a rank to its job's supervisor: metrics, checkpoints and log lines, batched.

The training step only appends to a list; a background thread ships the batch to
the supervisor every `interval_s`, so reporting never waits on the network.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any


class Reporter:
    def __init__(self, supervisor, rank: int, interval_s: float = 0.25):
        self.supervisor = supervisor
        self.rank = rank
        self.interval_s = interval_s
        self._events: list[tuple[str, float, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # called on this thread before each send: aggregated telemetry (telemetry.RankMeter.drain)
        self.sources: list = []
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
        for source in self.sources:
            try:
                payload = source()
            except Exception:  # metrics must never break the reports that carry progress
                payload = None
            if payload:
                self.emit("telemetry", payload)
        events = self._take()
        if not events or self.supervisor is None:
            return
        ref = self.supervisor.push.remote(self.rank, events)
        if wait:
            import ray

            ray.get(ref, timeout=30)

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


class _LineTee(io.TextIOBase):
    """Writes through to the real stream and hands complete lines to the reporter."""

    def __init__(self, stream, reporter: Reporter):
        self._stream, self._reporter, self._partial = stream, reporter, ""

    def write(self, text: str) -> int:
        self._stream.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._reporter.emit("log", line)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def finish(self) -> None:
        if self._partial:
            self._reporter.emit("log", self._partial)
            self._partial = ""

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()


@contextmanager
def captured_output(reporter: Reporter):
    """Send this rank's print()/logging output to the job log as well as to Ray's."""
    out, err = _LineTee(sys.stdout, reporter), _LineTee(sys.stderr, reporter)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        out.finish()
        err.finish()
        sys.stdout, sys.stderr = saved
