"""Training functions that hang (or only look slow) for the hang-watch tests."""

from __future__ import annotations

import os
import signal
import time


def _steps(ctx, body):
    state = ctx.restore() or {"step": 0}
    for step in range(state["step"] + 1, ctx.config["steps"] + 1):
        body(ctx, step)
        ctx.all_reduce(__import__("torch").ones(1))  # the peers wait for the stuck rank here
        ctx.report({"step": step}, checkpoint={"step": step})
        time.sleep(ctx.config.get("step_s", 0.05))


def sleeps_forever_on_attempt_0(ctx):
    """Rank 1 stops in the middle of attempt 0 (a stuck training thread); attempt 1 finishes."""
    def body(ctx, step):
        if ctx.attempt == 0 and ctx.rank == 1 and step == ctx.config["hang_at"]:
            stuck_in_user_code()
    _steps(ctx, body)


def stuck_in_user_code():
    time.sleep(3600)


def freezes_on_attempt_0(ctx):
    """Rank 1's whole process stops (SIGSTOP) in attempt 0: no reports, no heartbeats."""
    def body(ctx, step):
        if ctx.attempt == 0 and ctx.rank == 1 and step == ctx.config["hang_at"]:
            os.kill(os.getpid(), signal.SIGSTOP)
    _steps(ctx, body)


class SlowToSave:
    """A checkpoint entry that takes `seconds` to pickle: a long (but progressing) save."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        time.sleep(self.seconds)
        return (SlowToSave, (self.seconds,))


def slow_first_step_and_slow_save(ctx):
    """Legitimately slow: a first step and one checkpoint save each far over hang_timeout_s."""
    state = ctx.restore() or {"step": 0}
    slow = ctx.config["slow_s"]
    for step in range(state["step"] + 1, ctx.config["steps"] + 1):
        if step == 1:
            time.sleep(slow)  # compiling, warming up: before the first report
        ctx.all_reduce(__import__("torch").ones(1))
        extra = {"slow": SlowToSave(slow)} if step == 5 else {}
        ctx.report({"step": step}, checkpoint={"step": step, **extra})
        time.sleep(0.05)
