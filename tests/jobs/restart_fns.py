"""Training functions for the head-restart tests: every step they run is traced to a file."""

from __future__ import annotations

import time


def traced_steps(ctx):
    """`config.steps` steps of `config.step_s` seconds; rank 0 appends "attempt step" per step to
    `config.trace`, so a test can count the steps redone after a restart."""
    state = ctx.restore() or {"step": 0}
    for step in range(state["step"] + 1, ctx.config["steps"] + 1):
        time.sleep(ctx.config["step_s"])
        if ctx.is_main:
            with open(ctx.config["trace"], "a") as f:
                f.write(f"{ctx.attempt} {step}\n")
        ctx.report({"step": step, "loss": 1.0 / step}, checkpoint={"step": step})
