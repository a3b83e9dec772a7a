"""What a sweep is while it runs: its record (kept in the store), its trials, what the driver
sees of a trial's job and what it asks the controller to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..control.states import JobState


class SweepState(str, Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # every trial ended and at least one completed
    FAILED = "FAILED"        # most trials failed the same way, or none completed
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self is not SweepState.RUNNING


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TrialRecord(_Record):
    number: int  # the Optuna trial number
    trial_id: int  # Optuna's id of it in the storage (numbers restart per study, ids do not)
    name: str  # the job's name, <sweep id>-t<number>
    params: dict[str, Any]
    job_id: str | None = None  # set once the controller created the job
    state: str = "PENDING"  # the job's state, as last seen
    value: float | None = None  # the objective it ended with (Optuna's value)
    best: float | None = None  # the best objective it reported
    reported: int = 0  # the last rung resource (step or epoch) told to Optuna
    steps: int = 0  # steps run, as its progress last said
    total_steps: int | None = None
    error: str | None = None
    checkpoint: str | None = None  # its last committed checkpoint's directory
    best_checkpoint: str | None = None  # checkpoint.keep_best's, if the base job keeps one
    pruned_at: int | None = None  # the resource at which the sweep stopped it
    note: str = ""  # why it was stopped
    started_at: float | None = None
    ended_at: float | None = None
    done: bool = False  # told to Optuna: nothing more to do for it


class PostTrainingRecord(_Record):
    """The sweep's post_training: one job running the passes on the best trial's checkpoint."""

    name: str  # the job's name, <sweep id>-post
    trial: int  # the trial whose checkpoint it compresses
    checkpoint: str  # that checkpoint's directory
    job_id: str | None = None  # set once the controller created the job
    state: str = "PENDING"  # the job's state, as last seen
    error: str | None = None
    report: dict[str, Any] | None = None  # the job's post_training (report, files, model, kept, ...)


class SweepRecord(_Record):
    id: str
    name: str
    spec: dict[str, Any]  # the SweepSpec, as JSON
    base: dict[str, Any]  # the resolved base job spec, with the sweep's overrides, priority and queue
    package_uri: str | None = None
    study: str  # the Optuna study's name in the store's database
    state: SweepState = SweepState.RUNNING
    note: str = ""
    created_at: float
    ended_at: float | None = None
    trials: list[TrialRecord] = Field(default_factory=list)
    best: int | None = None  # the best trial's number
    post_training: PostTrainingRecord | None = None  # with the spec's post_training, once the trials ended

    def trial(self, number: int) -> TrialRecord:
        return next(t for t in self.trials if t.number == number)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.state] = counts.get(t.state, 0) + 1
        best = self.trial(self.best) if self.best is not None else None
        return {"id": self.id, "name": self.name, "state": self.state.value, "note": self.note,
                "search": self.spec.get("search"), "trials": len(self.trials), "states": counts,
                "objective": self.spec.get("objective"), "best_value": best.value if best else None,
                "best_trial": best.name if best else None,
                "post_training": self.post_training.state if self.post_training else None,
                "created_at": self.created_at,
                "ended_at": self.ended_at}


@dataclass(frozen=True)
class TrialJob:
    """What the driver sees of a trial's job (built by the controller from its job record)."""

    name: str
    job_id: str
    state: JobState
    metrics: dict[str, Any] = field(default_factory=dict)  # rank 0's last reported values
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    checkpoint: str | None = None
    best_checkpoint: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    post_training: dict[str, Any] | None = None  # the passes' report (the post-training job's)


@dataclass(frozen=True)
class SubmitTrial:
    sweep_id: str
    number: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class SubmitPostTraining:
    """Create the sweep's post-training job (see sweep/post.py)."""

    sweep_id: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class StopTrial:
    """End a running trial STOPPED (pruned): its resources are freed at once."""

    job_id: str
    note: str


@dataclass(frozen=True)
class CancelTrial:
    job_id: str
    note: str


Action = SubmitTrial | SubmitPostTraining | StopTrial | CancelTrial
