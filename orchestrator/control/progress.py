"""Job progress from the ranks' reports: step, throughput, ETA (used by the supervisor)."""

from __future__ import annotations

from collections import deque


class ProgressTracker:
    """Keeps rank 0's latest metrics and every rank's sample count; rates over a sliding window."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.metrics: dict = {}
        self.total_steps: int | None = None
        self.samples_total = 0.0
        self.first_report_at: float | None = None
        self._history: deque[tuple[float, float, int]] = deque()  # (time, samples_total, step)

    def on_metrics(self, rank: int, at: float, metrics: dict) -> None:
        if self.first_report_at is None:
            self.first_report_at = at
        self.samples_total += float(metrics.get("samples", 0) or 0)
        if rank == 0:
            self.metrics = {**self.metrics, **metrics}
        self._history.append((at, self.samples_total, int(self.metrics.get("step", 0))))
        while len(self._history) > 2 and self._history[0][0] < at - self.window_s:
            self._history.popleft()

    def restart(self) -> None:
        """A new attempt: its rates start over (the step count comes from the checkpoint)."""
        self._history.clear()

    def snapshot(self) -> dict:
        step = int(self.metrics.get("step", 0))
        samples_per_s = steps_per_s = 0.0
        if len(self._history) >= 2:
            (t0, s0, k0), (t1, s1, k1) = self._history[0], self._history[-1]
            if t1 > t0:
                samples_per_s, steps_per_s = (s1 - s0) / (t1 - t0), (k1 - k0) / (t1 - t0)
        eta = None
        if self.total_steps and steps_per_s > 0:
            eta = max(0.0, (self.total_steps - step) / steps_per_s)
        return {
            "step": step, "total_steps": self.total_steps, "samples_total": self.samples_total,
            "samples_per_s": samples_per_s, "steps_per_s": steps_per_s, "eta_s": eta,
            "first_report_at": self.first_report_at,
        }
