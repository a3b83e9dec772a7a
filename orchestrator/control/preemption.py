"""The supervisor's side of a just-in-time checkpoint: a preemption, a drain, a resize.

`JitCheckpoint` is the state of one request inside the attempt loop (control/jobrun.py): what
the ranks are told in the replies to their pushes (runtime/preemption.py has the ranks' side and
the agreement on the step), when the grace period ends, and the record the job keeps of it.
Pure: no Ray, no asyncio, so each decision is unit-tested on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..runtime.preemption import CHECKPOINT_NOW, SAVE_AT, agreed_step
from .record import PreemptionRecord


@dataclass(frozen=True)
class PreemptRequest:
    """Checkpoint now and give the gang back: to the queue (resize_to None), or to continue at
    `resize_to` workers at once (an elastic job shrunk for a preemptor, grown, or moved off a
    draining node)."""

    note: str                      # the history's words: "preempted by j-2", "node 10.0.0.2 drains"
    by: str | None = None          # the job it makes room for
    resize_to: int | None = None


@dataclass
class JitCheckpoint:
    request: PreemptRequest
    world_size: int
    grace_s: float
    checkpoint_before: int | None          # the last committed checkpoint's index at the request
    requested_at: float = field(default_factory=time.time)
    proposals: dict[int, int] = field(default_factory=dict)  # rank -> its last completed step
    stopped_ranks: set[int] = field(default_factory=set)     # ranks that saved and returned
    expired: bool = False                  # the grace period ended before every rank stopped

    def on_proposal(self, rank: int, step: int) -> None:
        self.proposals.setdefault(rank, int(step))

    def rank_command(self) -> dict:
        """The reply to every push while the request stands."""
        return {CHECKPOINT_NOW: True, SAVE_AT: agreed_step(self.proposals, self.world_size)}

    @property
    def save_step(self) -> int | None:
        return agreed_step(self.proposals, self.world_size)

    def deadline(self) -> float:
        return self.requested_at + self.grace_s

    def all_stopped(self) -> bool:
        return len(self.stopped_ranks) >= self.world_size

    def record(self, latest_index: int | None, latest_step: int | None, now: float | None = None) -> PreemptionRecord:
        """What the job keeps: `saved` when a checkpoint newer than the request's was committed."""
        now = time.time() if now is None else now
        saved = latest_index is not None and (self.checkpoint_before is None or latest_index > self.checkpoint_before)
        return PreemptionRecord(
            at=self.requested_at, by=self.request.by, reason=self.request.note,
            resize_to=self.request.resize_to, saved=saved, from_checkpoint=latest_index,
            step=latest_step, seconds=now - self.requested_at)


def largest_size(sizes: tuple[int, ...] | list[int], at_most: int) -> int | None:
    """The largest allowed worker count that is at most `at_most` (None: none is)."""
    fitting = [n for n in sizes if n <= at_most]
    return max(fitting) if fitting else None


PREEMPTION_REASONS = ("priority", "drain", "resize")


def preemption_reason(record: PreemptionRecord) -> str:
    """The `reason` label of trainctl_job_preemptions_total."""
    if record.by is not None:
        return "priority"
    return "drain" if "drains" in record.reason else "resize"


def admission_waits(history) -> list[tuple[str, float]]:
    """(reason, seconds) for each admission in a job's history (HistoryEntry list): the wait from
    entering QUEUED to the next STARTING; reason `submitted` for the first, `preempted` after a
    preemption or drain, `requeued` otherwise (the head restarted)."""
    waits, queued_at, reason, previous = [], None, "submitted", None
    for entry in history:
        if entry.state.value == "QUEUED" and queued_at is None:
            queued_at = entry.at
            if previous is not None and previous != "PENDING":
                reason = "preempted" if previous == "PREEMPTING" else "requeued"
        elif entry.state.value == "STARTING" and queued_at is not None:
            waits.append((reason, max(0.0, entry.at - queued_at)))
            queued_at = None
        previous = entry.state.value
    return waits
