"""Early stopping (the spec's `early_stop`): end a job once its metric stops improving.

Fed with rank 0's reports by the attempt loop (jobrun.JobRun.on_events). Only reports that
carry the metric count towards `patience`. A resumed attempt reports again the steps after
its checkpoint: each step is counted once, so the state (`EarlyStopState`, kept in the job's
record) means the same after any restart of the job as in an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real

from ..spec import EarlyStopSpec, MetricGoal


def metric_value(metrics: dict, metric: str) -> float | None:
    """The metric as a float, or None where the report does not carry a number for it."""
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


def improves(goal: MetricGoal, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in the goal's direction (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if goal.mode == "max" else value < best - min_delta


@dataclass
class EarlyStopState:
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0  # reports of the metric since the best one, none of them an improvement
    last_step: int | None = None  # the newest step counted
    stopped_at: int | None = None  # the step it fired at

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict | None) -> EarlyStopState:
        return cls(**{k: v for k, v in (doc or {}).items() if k in cls.__dataclass_fields__})


class EarlyStopper:
    def __init__(self, spec: EarlyStopSpec, state: EarlyStopState | None = None):
        self.spec = spec
        self.state = state or EarlyStopState()

    def observe(self, metrics: dict) -> str | None:
        """One of rank 0's reports; returns the note for the job's history once it should stop."""
        s = self.state
        if s.stopped_at is not None:
            return self.note()  # it fired before a restart of the job: the job still has to end
        value = metric_value(metrics, self.spec.metric)
        step = metrics.get("step")
        if value is None or not isinstance(step, int):
            return None
        if s.last_step is not None and step <= s.last_step:
            return None  # a resumed attempt redoing steps this job already counted
        s.last_step = step
        if improves(self.spec, value, s.best, self.spec.min_delta):
            s.best, s.best_step, s.since_best = value, step, 0
            return None
        if s.best is None:
            return None  # NaN before any real value: nothing to compare with yet
        s.since_best += 1
        if s.since_best < self.spec.patience:
            return None
        s.stopped_at = step
        return self.note()

    def note(self) -> str:
        s = self.state
        return (f"early stopped at step {s.stopped_at} (best {self.spec.metric} {s.best:.6g} "
                f"at step {s.best_step})")
