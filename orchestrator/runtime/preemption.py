"""A rank's side of a just-in-time checkpoint (preemption, drain, resize).

The supervisor asks through the reply to a rank's periodic push ({"checkpoint_now": True}).
The ranks of one job see that reply at different steps, yet must save the same step (the save
is collective). They agree without a collective on the training path:

1. the reporter thread, on the first request, proposes the rank's last completed step
   (event "preempt_step"), from its own thread: a rank blocked in a collective still proposes;
2. the supervisor answers every push with `save_at` = max(proposals) + 1 once all ranks
   proposed: no rank can have completed a step beyond its proposal + 1 without knowing it,
   because a rank at a checkpoint-carrying report past its proposal waits for `save_at`;
3. every rank saves at its first `ctx.report(..., checkpoint=)` whose step is >= save_at, and
   stops (Preempted, caught by the rank's entry).

A job whose ranks pass their state at the same steps (the usual loop) thus saves one step on
every rank. A script job (runtime/script.py) registers a callback in `on_request` instead: it
sends its command SIGTERM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# What a rank's push reply may carry (control/jobrun.JobRun.rank_command).
CHECKPOINT_NOW = "checkpoint_now"
SAVE_AT = "save_at"
PROPOSAL_EVENT = "preempt_step"


class Preempted(BaseException):
    """Raised by ctx.report after the just-in-time checkpoint: the rank's function unwinds
    (its `finally` blocks run) and the rank's entry returns normally. A BaseException so that a
    training loop's `except Exception` does not swallow it."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class PreemptSignal:
    """Shared by the reporter thread (which learns of a request) and the training thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested = threading.Event()
        self._save_at_known = threading.Event()
        self.step = 0                       # the last step the training thread completed
        self.proposal: int | None = None    # this rank's proposal, once requested
        self.save_at: int | None = None     # the step every rank saves at, once agreed
        # called once, on the reporter thread, when a request arrives (a script job's SIGTERM)
        self.on_request: list[Callable[[], None]] = []

    # ---- the reporter thread -------------------------------------------------------------
    def on_reply(self, reply: Any, emit: Callable[[str, Any], None]) -> None:
        """A push reply from the supervisor; `emit` queues an event for the next push."""
        if not isinstance(reply, dict) or not reply.get(CHECKPOINT_NOW):
            return
        first = False
        with self._lock:
            if self.proposal is None:
                self.proposal = self.step
                first = True
        if first:
            emit(PROPOSAL_EVENT, self.proposal)
            self.requested.set()
            for callback in list(self.on_request):
                try:
                    callback()
                except Exception:  # a failed hook must not stop the reports; the grace still ends it
                    pass
        save_at = reply.get(SAVE_AT)
        if save_at is not None and self.save_at is None:
            self.save_at = int(save_at)
            self._save_at_known.set()

    @property
    def awaiting_agreement(self) -> bool:
        """Proposed, the common step not known yet: the reporter keeps asking even when idle."""
        return self.proposal is not None and self.save_at is None

    # ---- the training thread -------------------------------------------------------------
    def completed(self, step: int) -> None:
        with self._lock:
            self.step = step

    def save_now(self, step: int, wait_s: float) -> bool:
        """At a report carrying a checkpoint: is this the step to save (and then stop)?

        Past its proposal without the common step, the rank waits for it (up to `wait_s`:
        the grace period; a supervisor that never answers stops the rank itself)."""
        with self._lock:
            proposal = self.proposal
        if proposal is None:
            return False
        if self.save_at is None and step > proposal:
            self._save_at_known.wait(wait_s)
        return self.save_at is not None and step >= self.save_at


def agreed_step(proposals: dict[int, int], world_size: int) -> int | None:
    """The supervisor's side: the step every rank saves at, once all `world_size` proposed."""
    if len(proposals) < world_size:
        return None
    return max(proposals.values()) + 1
