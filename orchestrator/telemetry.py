"""Metric values on their way from a rank to the controller, aggregated where they arise.

RankMeter   in every rank: the training thread adds a step's time to a bucket (a lock, a
            bisect, a few additions); the reporter's background thread drains the sums
            every 0.25 s into one `telemetry` event, so the step never waits.
JobTelemetry in the supervisor: cumulative per-rank sums (counters only grow, across
            restarts too), checkpoints, work lost to restarts. Its snapshot travels with
            the supervisor's snapshot to the controller, which renders it (exporter.py).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque

from . import metrics as M

STALL_WINDOW_S = 30.0


def new_hist(bounds: tuple[float, ...]) -> dict:
    """Plain-data histogram: per-bucket counts (last one +Inf, not cumulative), sum, count."""
    return {"b": [0] * (len(bounds) + 1), "s": 0.0, "n": 0}


def observe(hist: dict, bounds: tuple[float, ...], value: float, count: int = 1) -> None:
    hist["b"][bisect_left(bounds, value)] += count
    hist["s"] += value * count
    hist["n"] += count


def add_hist(into: dict, delta: dict) -> None:
    into["b"] = [a + b for a, b in zip(into["b"], delta["b"], strict=True)]
    into["s"] += delta["s"]
    into["n"] += delta["n"]


def cumulative_buckets(hist: dict, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """prometheus_client's histogram form: cumulative counts with `le` labels, +Inf last."""
    out, running = [], 0
    for bound, count in zip((*bounds, float("inf")), hist["b"], strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


class RankMeter:
    """One rank's in-process aggregation (see the module doc). Thread-safe, cheap to record."""

    def __init__(self, device_fn=None):
        self._lock = threading.Lock()
        self._device_fn = device_fn
        self._gpu: bool | None = None  # unknown until the first drain
        self._last_mark: float | None = None
        self._fresh()

    def _fresh(self) -> None:
        self._step = new_hist(M.STEP_DURATION.buckets)
        self._wait = new_hist(M.DATA_WAIT.buckets)
        self._coll: dict[str, dict] = {}
        self._samples = 0.0
        self._tokens = 0.0
        self._values: dict = {}
        self._dirty = False

    # ---- the training thread ------------------------------------------------------------------
    def mark(self) -> None:
        """The next step's clock starts now (after a report, a checkpoint save, a restore)."""
        self._last_mark = time.perf_counter()

    def on_report(self, metrics: dict, steps: int, data_wait: float | None) -> None:
        now = time.perf_counter()
        last = self._last_mark
        with self._lock:
            if steps > 0 and last is not None:
                elapsed = now - last
                observe(self._step, M.STEP_DURATION.buckets, elapsed / steps, steps)
            if data_wait is not None:
                observe(self._wait, M.DATA_WAIT.buckets, data_wait)
            self._samples += metrics.get("samples", 0) or 0
            self._tokens += metrics.get("tokens", 0) or 0
            values = self._values
            values["step"] = metrics.get("step")
            if "loss" in metrics:
                values["loss"] = metrics["loss"]
            lr = metrics.get("lr", metrics.get("learning_rate"))
            if lr is not None:
                values["lr"] = lr
            self._dirty = True

    def collective(self, op: str, seconds: float) -> None:
        with self._lock:
            hist = self._coll.get(op)
            if hist is None:
                hist = self._coll[op] = new_hist(M.COLLECTIVE_DURATION.buckets)
            observe(hist, M.COLLECTIVE_DURATION.buckets, seconds)
            self._dirty = True

    # ---- the reporter's thread ------------------------------------------------------------------
    def drain(self) -> dict | None:
        """The sums since the last drain, as one event payload (None: nothing new)."""
        gpu = self._gpu_sample()
        with self._lock:
            if not self._dirty and gpu is None:
                return None
            payload = {"step_h": self._step, "wait_h": self._wait, "coll": self._coll,
                       "samples": self._samples, "tokens": self._tokens, **self._values}
            self._fresh()
        if gpu is not None:
            payload["gpu"] = gpu
        return payload

    def _gpu_sample(self) -> dict | None:
        if self._gpu is False:
            return None
        try:
            import torch

            if not torch.cuda.is_available():
                self._gpu = False  # no GPU here (CPU build, or none visible to this rank)
                return None
            device = self._device_fn() if self._device_fn else None
            if getattr(device, "type", None) != "cuda" or not torch.cuda.is_initialized():
                return None  # not (yet) training on the GPU
            sample = {"allocated": float(torch.cuda.memory_allocated(device)),
                      "reserved": float(torch.cuda.memory_reserved(device))}
            try:
                sample["utilization"] = torch.cuda.utilization(device) / 100.0  # NVML (pynvml)
            except Exception:
                pass
            return sample
        except Exception:
            self._gpu = False
            return None


def _new_rank() -> dict:
    return {"step_h": new_hist(M.STEP_DURATION.buckets), "wait_h": new_hist(M.DATA_WAIT.buckets),
            "coll": {}, "samples": 0.0, "tokens": 0.0, "step": None, "loss": None, "lr": None,
            "gpu": None, "at": None}


class JobTelemetry:
    """The supervisor's cumulative view of a job's metrics (plain data, cheap to snapshot)."""

    def __init__(self):
        self.ranks: dict[int, dict] = {}
        self._windows: dict[int, deque] = {}
        self.checkpoint = {"h": new_hist(M.CHECKPOINT_DURATION.buckets), "bytes": None, "at": None}
        self.lost_s = 0.0  # rank 0's step time of steps a restart made redo

    def merge(self, rank: int, at: float, payload: dict) -> None:
        r = self.ranks.get(rank)
        if r is None:
            r = self.ranks[rank] = _new_rank()
        add_hist(r["step_h"], payload["step_h"])
        add_hist(r["wait_h"], payload["wait_h"])
        for op, hist in payload.get("coll", {}).items():
            if op not in r["coll"]:
                r["coll"][op] = new_hist(M.COLLECTIVE_DURATION.buckets)
            add_hist(r["coll"][op], hist)
        r["samples"] += payload.get("samples", 0.0)
        r["tokens"] += payload.get("tokens", 0.0)
        for key in ("step", "loss", "lr", "gpu"):
            if payload.get(key) is not None:
                r[key] = payload[key]
        r["at"] = at
        window = self._windows.setdefault(rank, deque())
        window.append((at, r["wait_h"]["s"], r["step_h"]["s"], r["step_h"]["n"]))
        while len(window) > 2 and window[0][0] < at - STALL_WINDOW_S:
            window.popleft()

    def on_checkpoint(self, at: float, payload: dict) -> None:
        if payload.get("seconds") is not None:
            observe(self.checkpoint["h"], M.CHECKPOINT_DURATION.buckets, float(payload["seconds"]))
        self.checkpoint["bytes"] = payload.get("bytes")
        self.checkpoint["at"] = at

    def on_restart(self, reached_step: int, resumed_step: int) -> None:
        """Steps between the resumed checkpoint and where rank 0 got are done again: not goodput."""
        r0 = self.ranks.get(0)
        if r0 and r0["step_h"]["n"]:
            self.lost_s += max(0, reached_step - resumed_step) * r0["step_h"]["s"] / r0["step_h"]["n"]

    def _recent(self, rank: int) -> tuple[float | None, float | None]:
        """(data stall ratio, mean step seconds) over the last STALL_WINDOW_S."""
        window = self._windows.get(rank)
        if not window:
            return None, None
        (_, w0, s0, n0), (_, w1, s1, n1) = window[0], window[-1]
        if len(window) == 1:
            w0 = s0 = n0 = 0
        if s1 - s0 <= 0 or n1 - n0 <= 0:
            return None, None
        return min(1.0, max(0.0, (w1 - w0) / (s1 - s0))), (s1 - s0) / (n1 - n0)

    def snapshot(self) -> dict:
        ranks = {}
        for rank, r in self.ranks.items():
            stall, step_s = self._recent(rank)
            ranks[rank] = {**r, "stall": stall, "recent_step_s": step_s}
        r0 = self.ranks.get(0)
        productive = max(0.0, (r0["step_h"]["s"] if r0 else 0.0) - self.lost_s)
        return {"ranks": ranks, "checkpoint": self.checkpoint, "productive_s": productive}


def health(job: dict, telemetry: dict | None, now: float) -> dict:
    """The health signals `trainctl status`/`top` show, from the same data as the metrics."""
    p = job.get("progress") or {}
    started = next((h["at"] for h in job.get("history", []) if h["state"] == "STARTING"), None)
    end = job.get("ended_at") or now
    wall = max(0.0, end - started) if started else 0.0
    out = {"samples_per_s": p.get("samples_per_s") or 0.0, "steps_per_s": p.get("steps_per_s") or 0.0,
           "restarts": len(job.get("restarts") or []), "wall_s": wall,
           "productive_s": None, "goodput_ratio": None, "data_stall_ratio": None,
           "step_s": None, "rank_skew": None}
    if not telemetry:
        return out
    productive = telemetry.get("productive_s", 0.0)
    out["productive_s"] = productive
    out["goodput_ratio"] = min(1.0, productive / wall) if wall > 0 else None
    ranks = telemetry.get("ranks", {}).values()
    stalls = [r["stall"] for r in ranks if r.get("stall") is not None]
    steps = [r["recent_step_s"] for r in ranks if r.get("recent_step_s")]
    if stalls:
        out["data_stall_ratio"] = sum(stalls) / len(stalls)
    if steps:
        out["step_s"] = sum(steps) / len(steps)
        out["rank_skew"] = max(steps) / min(steps)
    return out
