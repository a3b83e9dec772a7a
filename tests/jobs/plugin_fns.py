"""The GPT example's own training function, held on its first attempt after the checkpoint
at step `hold_at` until the file `gate` exists, so a test can kill a worker mid-run."""

from __future__ import annotations

import time
from pathlib import Path

from examples.gpt.train import train


class _HeldContext:
    """The job's TrainContext, except that report() waits at the gate once."""

    def __init__(self, ctx, gate: str, hold_at: int):
        self._ctx, self._gate, self._hold_at = ctx, gate, hold_at

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def report(self, metrics, checkpoint=None):
        self._ctx.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and self._ctx.attempt == 0 and self._ctx.step == self._hold_at:
            deadline = time.monotonic() + 240
            while not Path(self._gate).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate file {self._gate} never appeared")
                time.sleep(0.05)


def gpt_gated(ctx) -> None:
    cfg = ctx.config
    train(_HeldContext(ctx, cfg["gate"], cfg["hold_at"]) if cfg.get("gate") else ctx)
