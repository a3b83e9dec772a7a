"""The job record: what the controller knows of one job, typed, kept as JSON in the store.

`RunState` is the part the job's supervisor owns while the job holds resources (its attempt
loop reports it in a `RunSnapshot`); the controller mirrors it into the `JobRecord` and owns
the rest. Clients get `JobRecord.to_json()`: plain JSON, as the HTTP API and `--json` print it.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..spec import JobSpec
from .states import JobState, check_transition


class _Record(BaseModel):
    # records are rebuilt from older stores too: unknown keys are ignored, not an error
    model_config = ConfigDict(extra="ignore", validate_assignment=True)


class HistoryEntry(_Record):
    state: JobState
    at: float
    note: str = ""


class RestartRecord(_Record):
    at: float
    attempt: int
    cause: str
    kind: str  # failure.FailureKind's value
    from_checkpoint: int | None = None


class RankPlacement(_Record):
    rank: int
    node_id: str
    node_ip: str
    pid: int
    node_rank: int = 0
    local_rank: int = 0
    hostname: str = ""


class PreemptionRecord(_Record):
    """One just-in-time checkpoint and hand-back of the gang: a preemption, a drain, a resize."""

    at: float                        # when it was asked for
    by: str | None = None            # the job it made room for (None: a drain or a resize)
    reason: str = ""                 # "preempted by j-2", "node 10.0.0.2 drains", "grows to 4 workers"
    resize_to: int | None = None     # workers it continued with (shrink or grow); None: back to the queue
    saved: bool = False              # its just-in-time checkpoint was committed within the grace period
    from_checkpoint: int | None = None  # the checkpoint it resumes from
    step: int | None = None          # that checkpoint's step
    seconds: float | None = None     # from the request to the gang given back


class RunState(_Record):
    """What the supervisor owns while the job runs (JobRun.snapshot)."""

    state: JobState
    history: list[HistoryEntry] = Field(default_factory=list)
    restarts: list[RestartRecord] = Field(default_factory=list)
    placement: list[RankPlacement] = Field(default_factory=list)
    checkpoint: dict[str, Any] | None = None  # the last committed one: index, step, path, ...
    error: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # the last reported, per key
    progress: dict[str, Any] = Field(default_factory=dict)  # step, rate, ETA (progress.py)
    attempt: int = 0
    post_training: dict[str, Any] | None = None  # the passes' report, once they ran
    preemptions: list[PreemptionRecord] = Field(default_factory=list)  # not failures: no restart spent
    workers: int | None = None  # ranks of the current attempt (an elastic job's size); None: the spec's
    best_checkpoint: dict[str, Any] | None = None  # checkpoint.keep_best's: index, path, step, metric, value
    early_stop: dict[str, Any] | None = None  # the early stopper's state (early_stop.EarlyStopState)


RUN_FIELDS = tuple(RunState.model_fields)


class RunSnapshot(RunState):
    telemetry: dict[str, Any] = Field(default_factory=dict)  # for /metrics (monitoring/telemetry.py)


class JobRecord(RunState):
    id: str
    name: str
    spec: JobSpec  # parsed once, at submit
    priority: int
    submitted_at: float
    queue_reason: str | None = None  # why a queued job waits (the scheduler's words)
    package_uri: str | None = None  # the working_dir package, kept in the store for a new head
    checkpoint_root: str
    log_path: str
    session: str | None = None  # the Ray session it was admitted in (a new one: the head restarted)
    started_at: float | None = None
    ended_at: float | None = None
    health: dict[str, Any] = Field(default_factory=dict)  # what status/top show (telemetry.health)

    def set_state(self, new: JobState, note: str = "") -> None:
        check_transition(self.state, new)
        self.state = new
        self.history.append(HistoryEntry(state=new, at=time.time(), note=note))

    def absorb(self, snap: RunSnapshot) -> bool:
        """Take the supervisor's part of the record; False when nothing changed."""
        changed = False
        for key in RUN_FIELDS:
            value = getattr(snap, key)
            if getattr(self, key) != value:
                setattr(self, key, value)
                changed = True
        return changed

    @property
    def strategy_label(self) -> str:
        """What list, top and the metrics' `strategy` label show: a script job has no strategy."""
        return "script" if self.spec.command else self.spec.strategy.name

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def summary(self) -> dict[str, Any]:
        """What `trainctl list` and `top` show of a job: a few fields, not its whole record."""
        return {
            "id": self.id, "name": self.name, "state": self.state.value, "priority": self.priority,
            "queue": self.spec.queue, "strategy": self.strategy_label, "workers": self.spec.resources.workers,
            "progress": self.progress, "submitted_at": self.submitted_at, "ended_at": self.ended_at,
            "queue_reason": self.queue_reason, "error": self.error, "restarts": len(self.restarts),
            "health": self.health, "preemptions": len(self.preemptions),
            "last_preemption": self.preemptions[-1].reason if self.preemptions else None,
        }
