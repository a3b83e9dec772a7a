"""Failure policy: a function from what went wrong to RESTART or FAIL."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Decision(str, Enum):
    RESTART = "RESTART"
    FAIL = "FAIL"


class FailureKind(str, Enum):
    WORKER_DIED = "worker_died"   # the rank's process vanished (SIGKILL, OOM killer, segfault)
    NODE_LOST = "node_lost"       # the node under the rank went away
    ERROR = "error"               # the training function raised
    FATAL = "fatal"               # NonRetryableError or bad input: restarting cannot help


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    rank: int | None
    message: str

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the job"
        return f"{who}: {self.kind.value}: {self.message}"


def decide(failure: Failure, restarts_so_far: int, max_restarts: int) -> Decision:
    if failure.kind is FailureKind.FATAL:
        return Decision.FAIL
    return Decision.RESTART if restarts_so_far < max_restarts else Decision.FAIL
