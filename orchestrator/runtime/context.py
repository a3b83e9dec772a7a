"""TrainContext: the one object a training function receives on every rank."""

from __future__ import annotations

import shutil
import time
from typing import Any

from strategies import Strategy, WorkerEnv

from ..monitoring.metrics import enabled as metrics_enabled
from ..monitoring.telemetry import DeviceTimer, DeviceValue, RankMeter, plain
from .checkpoint import (
    Checkpoint,
    CheckpointStore,
    diagnose_write_failure,
    directory_bytes,
    state_bytes,
)
from .preemption import Preempted, PreemptSignal
from .reporting import Reporter

DATA_STATE_KEY = "__trainctl_data__"
# How long a rank past its proposal waits for the common just-in-time step (the supervisor
# answers within a few pushes; one that never does stops the ranks after the grace period).
JIT_AGREEMENT_WAIT_S = 600.0


def _plain(value: Any) -> Any:
    """A metric as a plain number now (a one-element tensor is read here: on a GPU, a sync)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


def _deferred(value: Any) -> Any:
    """A metric on its way to a plain number: a one-element tensor is not read on the step
    (on a GPU `.item()` would wait for the device every step); the reporter's thread reads it."""
    if hasattr(value, "detach") and getattr(value, "numel", lambda: 0)() == 1:
        return DeviceValue.of(value)
    return _plain(value)  # numpy scalars and the like: no device behind them


class TrainContext:
    def __init__(self, env: WorkerEnv, strategy: Strategy, *, job_id: str, config: dict,
                 reporter: Reporter, checkpoints: CheckpointStore, resume_from: Checkpoint | None,
                 every_n_steps: int | None = None, attempt: int = 0, data: dict | None = None):
        self.env = env
        self.strategy = strategy
        self.job_id = job_id
        self.config = dict(config)
        self.attempt = attempt
        self._reporter = reporter
        self._checkpoints = checkpoints
        self._resume_from = resume_from
        self._every_n_steps = every_n_steps
        self._next_index = (resume_from.index + 1) if resume_from else 1
        self.step = (resume_from.step or 0) if resume_from else 0
        self._last_saved_step = self.step
        self._data_specs = data or {}
        self._datasets: dict = {}
        self._data_states: dict = {}  # restored loader positions, applied when a split is opened
        self._reported_wait = 0.0
        # a checkpoint-now request (preemption, drain, resize) comes through the reporter's thread
        self._preempt: PreemptSignal = getattr(reporter, "preempt", None) or PreemptSignal()
        self._preempt.completed(self.step)
        # step time, data wait, collectives, GPU memory: summed here, drained by the reporter thread
        self._meter = RankMeter(lambda: self.strategy.device) if metrics_enabled() else None
        if self._meter is not None:
            reporter.sources.append(self._meter.drain)

    # ---- who am I ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def node_rank(self) -> int:
        return self.env.node_rank

    @property
    def device(self):
        return self.strategy.device

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def preempting(self) -> bool:
        """A checkpoint has been requested (preemption, drain, resize): the next
        `report(..., checkpoint=state)` at the step the ranks agree on saves, then the ranks stop."""
        return self._preempt.requested.is_set()

    # ---- training ------------------------------------------------------------------
    def prepare(self, model, optimizer=None):
        """Wrap model and optimizer for the job's strategy (DDP module, shards, engine...)."""
        prepared = self.strategy.prepare(model, optimizer)
        if self._meter is not None:
            self._meter.mark()  # the first step's clock starts once the model is ready
        return prepared

    def backward(self, loss) -> None:
        self.strategy.backward(loss)

    def train_step(self, model, optimizer, inputs, targets, loss_fn):
        """zero_grad, forward, `loss_fn(model(inputs), targets)`, backward, optimizer step, the
        way the strategy needs it (a pipeline runs its micro-batch schedule here). Returns the
        loss of this rank's batch, detached, on every rank."""
        return self.strategy.train_step(model, optimizer, inputs, targets, loss_fn)

    def set_total_steps(self, total: int) -> None:
        """Lets the progress bar show an ETA."""
        if self.is_main:
            self._reporter.emit("total_steps", int(total))

    # ---- data ----------------------------------------------------------------------
    def dataset(self, name: str, device=None):
        """This rank's share of the job's data split `name` (a resumable ShardedDataset).

        Its position is saved with every checkpoint and restored by `restore()`. With
        `device` (e.g. `ctx.device`) its batches come on that device, copied by the reader
        thread while the step runs; None leaves it where it was (the CPU at first)."""
        if name not in self._datasets:
            from ..data.loader import ShardedDataset
            from ..data.manifest import DatasetError

            spec = self._data_specs.get(name)
            if spec is None:
                splits = ", ".join(self._data_specs) or "none"
                raise DatasetError(f"no data split {name!r} in the job spec (splits: {splits}); add data.{name}")
            # DataSpec's fields are ShardedDataset's keyword arguments, one to one
            ds = ShardedDataset(**spec.model_dump(), rank=self.strategy.data_parallel_rank,
                                world_size=self.strategy.data_parallel_size)
            if name in self._data_states:
                ds.load_state_dict(self._data_states[name])
            self._datasets[name] = ds
        if device is not None:
            self._datasets[name].device = device
        return self._datasets[name]

    def _data_wait(self) -> float:
        total = sum(ds.wait_seconds for ds in self._datasets.values())
        delta, self._reported_wait = total - self._reported_wait, total
        return delta

    # ---- metrics and checkpoints ---------------------------------------------------
    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        """Record metrics; with `checkpoint`, every rank must call it (the save is collective).

        Known keys: `step` (else each report counts one step), `loss`, and `samples`
        (samples this rank processed since its last report, for throughput). Values may be
        0-d tensors on the device: they are read in the background, the step never waits.
        """
        metrics = {k: _plain(v) if k == "step" else _deferred(v) for k, v in metrics.items()}
        previous = self.step
        self.step = int(metrics["step"]) if "step" in metrics else self.step + 1
        metrics["step"] = self.step
        if self._datasets:
            metrics["data_wait_s"] = self._data_wait()
        meter = self._meter
        if meter is not None:
            meter.on_report(metrics, self.step - previous, metrics.get("data_wait_s"))
        self._reporter.emit("metrics", metrics)
        self._preempt.completed(self.step)
        # just in time: every rank saves the step they agreed on (see runtime/preemption.py)
        just_in_time = checkpoint is not None and self._preempt.save_now(self.step, JIT_AGREEMENT_WAIT_S)
        if checkpoint is not None and (just_in_time or self._checkpoint_due()):
            # the checkpoint's record keeps numbers (a save waits for the device anyway)
            self._save(checkpoint, {k: plain(v) for k, v in metrics.items()})
        if meter is not None:
            meter.mark()  # the save (if any) is not the next step's time
        if just_in_time:
            raise Preempted(self.step)  # the rank's entry returns; the supervisor gives the gang back

    def _checkpoint_due(self) -> bool:
        if self._every_n_steps is None:
            return True
        return self.step - self._last_saved_step >= self._every_n_steps

    def _save(self, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        started = time.perf_counter()
        index = self._next_index
        if self._datasets:  # loader positions travel with every checkpoint
            state = {**state, DATA_STATE_KEY: {n: ds.state_dict() for n, ds in self._datasets.items()}}
        self._reporter.emit("busy", True)  # a long save is not a hang (orchestrator/control/hang.py)
        try:
            if self.is_main:
                self._checkpoints.begin(index)
            self.strategy.barrier()  # the directory exists before anyone writes into it
            self.strategy.save_checkpoint(state, self._checkpoints.partial_path(index))
            self.strategy.barrier()  # every rank's part is on disk before the commit
            if self.is_main:
                committed = self._checkpoints.commit(index, {
                    "step": self.step, "job_id": self.job_id, "attempt": self.attempt,
                    "world_size": self.world_size, "strategy": self.strategy.name, "metrics": metrics,
                })
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            self._raise_storage_problem(exc, index, state)
            raise
        finally:
            self._reporter.emit("busy", False)
        if self.is_main:
            self._reporter.emit("checkpoint", {
                "index": index, "path": str(committed.path), "step": self.step,
                "bytes": directory_bytes(committed.path), "seconds": time.perf_counter() - started,
            })
        self._next_index += 1
        self._last_saved_step = self.step

    def _raise_storage_problem(self, exc: BaseException, index: int, state: dict[str, Any]) -> None:
        """A full or unwritable checkpoint storage becomes one line (CheckpointWriteError), its
        partial directory removed; any other failure is left to propagate as it is."""
        if self.is_main:  # the free space reported is what is left without the torn save
            shutil.rmtree(self._checkpoints.partial_path(index), ignore_errors=True)
        latest = self._checkpoints.latest()
        try:
            estimate = state_bytes(state)
        except Exception:  # an engine whose state_dict cannot be taken now: the last checkpoint's size
            estimate = 0
        needed = max(estimate, directory_bytes(latest.path) if latest else 0)
        problem = diagnose_write_failure(exc, self._checkpoints.root, needed or None)
        if problem is not None:
            raise problem from None  # torch's 45-line traceback buries the cause: the line is enough

    def restore(self, into: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The latest committed checkpoint, or None on a fresh start.

        Modules and optimizers passed in `into` (e.g. {"model": model, "optimizer": opt})
        are loaded in place; the returned dict also holds everything else that was saved.
        """
        if self._resume_from is None:
            return None
        state = self.strategy.load_checkpoint(self._resume_from.path, into)
        self._data_states = state.pop(DATA_STATE_KEY, {})
        for name, ds in self._datasets.items():
            if name in self._data_states:
                ds.load_state_dict(self._data_states[name])
        if self.is_main:
            print(f"[trainctl] restored checkpoint {self._resume_from.index} (step {self.step})")
        if self._meter is not None:
            self._meter.mark()
        return state

    # ---- collectives ---------------------------------------------------------------
    def all_reduce(self, tensor, op: str = "sum"):
        return self._timed("all_reduce", self.strategy.all_reduce, tensor, op)

    def broadcast(self, tensor, src: int = 0):
        return self._timed("broadcast", self.strategy.broadcast, tensor, src)

    def barrier(self) -> None:
        self._timed("barrier", self.strategy.barrier)

    def _timed(self, op: str, fn, *args):
        """A collective, its duration recorded for trainctl_collective_duration_seconds{op}.

        On a GPU the call may return once nccl has enqueued it, so CUDA events around it
        measure the collective itself (read later, on the reporter's thread)."""
        if self._meter is None:
            return fn(*args)
        timer = DeviceTimer.for_device(self.strategy.device)
        started = time.perf_counter()
        if timer is not None:
            timer.start()
        out = fn(*args)
        if timer is not None:
            timer.stop()
        self._meter.collective(op, time.perf_counter() - started, timer)
        return out
