"""Metric values on their way from a rank to the controller, aggregated where they arise.

RankMeter   in every rank: the training thread adds a step's time to a bucket (a lock, a
            bisect, a few additions); the reporter's background thread drains the sums
            every 0.25 s into one `telemetry` event, so the step never waits.
            On a GPU nothing the step hands over is read on the training thread: reported
            0-d tensors travel as DeviceValues and collectives are timed with CUDA events
            (DeviceTimer), both read on the reporter's thread once the GPU got there.
JobTelemetry in the supervisor: cumulative per-rank sums (counters only grow, across
            restarts too), checkpoints, work lost to restarts. Its snapshot travels with
            the supervisor's snapshot to the controller, which renders it (exporter.py).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any

from . import metrics as M

if TYPE_CHECKING:  # this module also runs in the ranks, which need no job record
    from ..control.record import JobRecord, RankPlacement

STALL_WINDOW_S = 30.0
# collectives whose CUDA events have not completed yet; beyond this the oldest are dropped
# (a GPU that far behind has bigger problems than a missing histogram sample)
MAX_PENDING_TIMINGS = 1024
NVML_HINT = ("GPU utilisation (trainctl_gpu_utilization_ratio) is not exported: {why}; "
             "install NVML's Python binding: pip install 'trainctl[gpu]' (nvidia-ml-py)")


class DeviceValue:
    """A reported 0-d tensor on its way to plain numbers, without a device sync on the step.

    At report time the value is copied to (pinned) host memory without blocking and a CUDA
    event marks when the copy is done; the reporter's thread reads it when it ships the
    report: pickling a DeviceValue yields the plain number, so the supervisor, progress and
    status only ever see numbers. A CPU tensor takes the same path (its copy is immediate).
    """

    __slots__ = ("_host", "_ready")

    def __init__(self, host, ready=None):
        self._host = host    # a CPU tensor, possibly still being filled by the copy
        self._ready = ready  # an event that completes with the copy (None: already complete)

    @classmethod
    def of(cls, tensor) -> DeviceValue:
        if tensor.device.type != "cuda":
            return cls(tensor.detach().to("cpu", copy=True))  # a copy: later in-place ops don't leak in
        import torch

        host = tensor.detach().to("cpu", non_blocking=True)  # into pinned memory, asynchronously
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tensor.device))
        return cls(host, ready)

    def read(self) -> float | int | bool:
        """The number (waits for the copy: call it off the training thread)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.item()

    def __reduce__(self):
        try:
            value = self.read()
        except Exception:  # a broken device must not lose the rest of the batch of reports
            value = float("nan")
        return type(value), (value,)

    def __repr__(self) -> str:
        return f"DeviceValue({self._host.dtype}, ready={self._ready is None or self._ready.query()})"


def plain(value: Any) -> Any:
    """A reported value as a plain number where it is a DeviceValue (blocks until it is ready)."""
    return value.read() if isinstance(value, DeviceValue) else value


class DeviceTimer:
    """A collective's time as the GPU sees it: under nccl the call only enqueues the work,
    so the host's clock measures the enqueue. CUDA events recorded on the current stream
    before and after the call complete when the collective has (the stream waits for it);
    the reporter's thread reads the elapsed time once the end event is done."""

    __slots__ = ("_start", "_end", "_stream")

    def __init__(self, start, end, stream=None):
        self._start, self._end, self._stream = start, end, stream

    @classmethod
    def for_device(cls, device) -> DeviceTimer | None:
        """Events for a CUDA device (None elsewhere: the host's clock is the collective's)."""
        if getattr(device, "type", None) != "cuda":
            return None
        import torch

        return cls(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                   torch.cuda.current_stream(device))

    def start(self) -> None:
        self._record(self._start)

    def stop(self) -> None:
        self._record(self._end)

    def _record(self, event) -> None:
        if self._stream is None:
            event.record()
        else:
            event.record(self._stream)

    def done(self) -> bool:
        return bool(self._end.query())

    def seconds(self) -> float:
        return self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in milliseconds


def _nvml_installed() -> bool:
    return importlib.util.find_spec("pynvml") is not None  # the module nvidia-ml-py installs


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

    def __init__(self, device_fn=None, cuda=None):
        self._lock = threading.Lock()
        self._device_fn = device_fn
        self._cuda = cuda  # torch.cuda (a stand-in in tests: no GPU here)
        self._gpu: bool | None = None  # unknown until the first drain
        self._nvml_said = False  # the rank's log says once why utilisation is missing
        self._last_mark: float | None = None
        self._timings: deque[tuple[str, float, DeviceTimer]] = deque()  # GPU not there yet
        self._fresh()

    def _fresh(self) -> None:
        self._step = new_hist(M.STEP_DURATION.buckets)
        self._wait = new_hist(M.DATA_WAIT.buckets)
        self._coll: dict[str, dict] = {}
        self._counts = {"samples": 0.0, "tokens": 0.0}
        self._counts_on_device: list[tuple[str, DeviceValue]] = []  # samples/tokens given as tensors
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
            for key in self._counts:
                count = metrics.get(key)
                if isinstance(count, DeviceValue):
                    self._counts_on_device.append((key, count))
                elif count:
                    self._counts[key] += count
            values = self._values
            values["step"] = metrics.get("step")
            if "loss" in metrics:
                values["loss"] = metrics["loss"]
            lr = metrics.get("lr", metrics.get("learning_rate"))
            if lr is not None:
                values["lr"] = lr
            self._dirty = True

    def collective(self, op: str, seconds: float, timer: DeviceTimer | None = None) -> None:
        """A collective took `seconds` on the host's clock; with a timer (a GPU), the longer of
        that and the GPU's time counts, read on the reporter's thread when the GPU is done."""
        with self._lock:
            if timer is not None:
                self._timings.append((op, seconds, timer))
                if len(self._timings) > MAX_PENDING_TIMINGS:
                    self._timings.popleft()
                return
            self._observe_collective(op, seconds)

    def _observe_collective(self, op: str, seconds: float) -> None:
        hist = self._coll.get(op)
        if hist is None:
            hist = self._coll[op] = new_hist(M.COLLECTIVE_DURATION.buckets)
        observe(hist, M.COLLECTIVE_DURATION.buckets, seconds)
        self._dirty = True

    # ---- the reporter's thread ------------------------------------------------------------------
    def drain(self) -> dict | None:
        """The sums since the last drain, as one event payload (None: nothing new)."""
        gpu = self._gpu_sample()
        self._settle_timings()
        with self._lock:
            if not self._dirty and gpu is None:
                return None
            payload = {"step_h": self._step, "wait_h": self._wait, "coll": self._coll,
                       **self._counts, **self._values}
            on_device = self._counts_on_device
            self._fresh()
        # device values are read here, off the training thread and outside the lock
        for key, count in on_device:
            payload[key] += plain(count)
        for key in ("loss", "lr"):
            if key in payload:
                payload[key] = plain(payload[key])
        if gpu is not None:
            payload["gpu"] = gpu
        return payload

    def _settle_timings(self) -> None:
        """Collectives whose end event completed go into the histogram, in order."""
        while True:
            with self._lock:
                if not self._timings:
                    return
                op, host_seconds, timer = self._timings[0]
            if not timer.done():
                return  # the GPU is not there yet: the next drain looks again
            seconds = max(host_seconds, timer.seconds())  # gloo blocks the host; nccl the GPU
            with self._lock:
                if self._timings and self._timings[0][2] is timer:  # not dropped meanwhile
                    self._timings.popleft()
                self._observe_collective(op, seconds)

    def _gpu_sample(self) -> dict | None:
        if self._gpu is False:
            return None
        try:
            cuda = self._cuda
            if cuda is None:
                import torch

                cuda = torch.cuda
            if not cuda.is_available():
                self._gpu = False  # no GPU here (CPU build, or none visible to this rank)
                return None
            device = self._device_fn() if self._device_fn else None
            if getattr(device, "type", None) != "cuda" or not cuda.is_initialized():
                return None  # not (yet) training on the GPU
            sample = {"allocated": float(cuda.memory_allocated(device)),
                      "reserved": float(cuda.memory_reserved(device))}
        except Exception:
            self._gpu = False
            return None
        utilization = self._utilization(cuda, device)
        if utilization is not None:
            sample["utilization"] = utilization
        return sample

    def _utilization(self, cuda, device) -> float | None:
        """NVML's utilisation of the device (torch maps CUDA_VISIBLE_DEVICES to NVML's index);
        where NVML is missing the rank's log says so, once."""
        if self._nvml_said:
            return None
        why = None if _nvml_installed() else "NVML's Python binding (pynvml) is not installed"
        if why is None:
            try:
                return cuda.utilization(device) / 100.0
            except Exception as exc:  # no NVML library, a driver mismatch, a device NVML hides
                why = f"NVML failed ({type(exc).__name__}: {exc})"
        self._nvml_said = True
        print(f"[trainctl] {NVML_HINT.format(why=why)}", file=sys.stderr, flush=True)
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


def health(job: JobRecord, telemetry: dict | None, now: float) -> dict:
    """The health signals `trainctl status`/`top` show, from the same data as the metrics."""
    p = job.progress
    started = next((h.at for h in job.history if h.state == "STARTING"), None)
    end = job.ended_at or now
    wall = max(0.0, end - started) if started else 0.0
    out = {"samples_per_s": p.get("samples_per_s") or 0.0, "steps_per_s": p.get("steps_per_s") or 0.0,
           "restarts": len(job.restarts), "wall_s": wall,
           "productive_s": None, "goodput_ratio": None, "data_stall_ratio": None,
           "step_s": None, "rank_skew": None, "straggler": None}
    if not telemetry:
        return out
    productive = telemetry.get("productive_s", 0.0)
    out["productive_s"] = productive
    out["goodput_ratio"] = min(1.0, productive / wall) if wall > 0 else None
    by_rank = telemetry.get("ranks", {})
    stalls = [r["stall"] for r in by_rank.values() if r.get("stall") is not None]
    steps = {int(rank): r["recent_step_s"] for rank, r in by_rank.items() if r.get("recent_step_s")}
    if stalls:
        out["data_stall_ratio"] = sum(stalls) / len(stalls)
    if steps:
        out["step_s"] = sum(steps.values()) / len(steps)
        out["rank_skew"] = max(steps.values()) / min(steps.values())
        out["straggler"] = straggler(steps, job.placement)
    return out


STRAGGLER_RATIO = 1.5  # a rank this much slower than the job's median step is named


def straggler(step_s_by_rank: dict[int, float], placement: list[RankPlacement]) -> dict | None:
    """The slowest rank, when its recent step time is over STRAGGLER_RATIO x the median's."""
    if len(step_s_by_rank) < 2:
        return None
    times = sorted(step_s_by_rank.values())
    middle = len(times) // 2
    median = times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2
    rank, slowest = max(step_s_by_rank.items(), key=lambda kv: kv[1])
    if median <= 0 or slowest <= STRAGGLER_RATIO * median:
        return None
    node = next((p.node_ip for p in placement if p.rank == rank), None)
    return {"rank": rank, "node": node, "step_s": slowest, "ratio": slowest / median}
