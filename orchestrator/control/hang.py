"""Hang detection: which ranks stopped making progress, from the signals they send.

Every rank sends two signals to its supervisor: *progress* (a `ctx.report`, or batches taken
from `ctx.dataset`) and a *heartbeat* from its reporter thread every few seconds, even while
the training thread is blocked. So:
  - no heartbeat for `heartbeat_timeout_s`: the process is frozen (SIGSTOP, a deadlock that
    holds the GIL, a machine swapping to death);
  - heartbeats but no progress for the job's threshold: the training thread is stuck (a
    collective whose peer is gone, a deadlock, an endless loop).
A rank saving a checkpoint is busy, not silent. Before a rank's first progress of an attempt
only `startup_s` applies (model build, compile, data warm-up may take long). After it, the
threshold is `failure.hang_timeout_s` when set, else learned from the job's own cadence:
`factor` times the longest gap between progress seen so far, within [floor_s, cap_s], so a
job that reports every second is caught within a minute and one that evaluates for three
minutes between reports is not flagged for it. Times are passed in: this is a pure class.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Silence:
    """A rank judged hung: what it stopped doing and for how long."""

    rank: int
    frozen: bool       # no heartbeat either: the whole process stopped
    silent_s: float

    def describe(self) -> str:
        what = "frozen (no heartbeat)" if self.frozen else "silent"
        return f"rank {self.rank} {what} for {self.silent_s:.0f} s"


@dataclass
class _Rank:
    first_progress_at: float | None = None
    last_progress_at: float | None = None
    last_heartbeat_at: float | None = None
    busy_since: float | None = None  # saving a checkpoint
    longest_gap_s: float = 0.0


@dataclass
class HangWatch:
    world_size: int
    started_at: float
    timeout_s: float | None = None   # failure.hang_timeout_s; None: learn it
    startup_s: float = 1800.0        # until a rank's first progress
    floor_s: float = 60.0
    cap_s: float = 300.0             # a hang is caught within 5 minutes by default
    factor: float = 5.0
    heartbeat_timeout_s: float = 120.0
    busy_max_s: float = 3600.0       # a checkpoint save longer than this is a hang too
    _ranks: dict[int, _Rank] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ranks = {r: _Rank() for r in range(self.world_size)}
        if self.timeout_s is not None:  # who asks for a short timeout wants frozen ranks caught as fast
            self.heartbeat_timeout_s = min(self.heartbeat_timeout_s, self.timeout_s)

    # ---- signals -----------------------------------------------------------------------
    def on_progress(self, rank: int, at: float) -> None:
        r = self._ranks[rank]
        if r.last_progress_at is not None and r.busy_since is None:
            r.longest_gap_s = max(r.longest_gap_s, at - r.last_progress_at)
        if r.first_progress_at is None:
            r.first_progress_at = at
        r.last_progress_at = at
        r.last_heartbeat_at = max(r.last_heartbeat_at or at, at)

    def on_heartbeat(self, rank: int, at: float) -> None:
        r = self._ranks[rank]
        r.last_heartbeat_at = max(r.last_heartbeat_at or at, at)

    def on_busy(self, rank: int, at: float, busy: bool) -> None:
        """A checkpoint save began (busy) or ended: the time in between is not silence."""
        r = self._ranks[rank]
        if busy:
            r.busy_since = at
        else:
            r.busy_since = None
            r.last_progress_at = at  # the gap starts again after the save
        self.on_heartbeat(rank, at)

    # ---- the decision --------------------------------------------------------------------
    def threshold_s(self) -> float:
        """How long a rank that has made progress may go without it."""
        if self.timeout_s is not None:
            return self.timeout_s
        longest = max((r.longest_gap_s for r in self._ranks.values()), default=0.0)
        return min(self.cap_s, max(self.floor_s, self.factor * longest))

    def hung(self, now: float) -> list[Silence]:
        """The ranks that are hung at `now` (empty while every rank is fine), then the peers
        silent for half the threshold: they stopped with it (waiting in its collective), even
        when they got their last step in a moment after it went quiet."""
        threshold = self.threshold_s()
        out, stalled = [], []
        for rank, r in self._ranks.items():
            if r.last_heartbeat_at is not None and now - r.last_heartbeat_at > self.heartbeat_timeout_s:
                out.append(Silence(rank, True, now - r.last_heartbeat_at))
            elif r.busy_since is not None:
                if now - r.busy_since > self.busy_max_s:
                    out.append(Silence(rank, False, now - r.busy_since))
            elif r.last_progress_at is None:
                if now - self.started_at > self.startup_s:
                    out.append(Silence(rank, False, now - self.started_at))
            elif now - r.last_progress_at > threshold:
                out.append(Silence(rank, False, now - r.last_progress_at))
            elif now - r.last_progress_at > threshold / 2:
                stalled.append(Silence(rank, False, now - r.last_progress_at))
        return out + stalled if out else []
