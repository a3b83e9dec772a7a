"""The attempt loop of one job: start the worker group, watch it, classify a failure, decide,
restart from the last committed checkpoint. A plain class (the Supervisor actor is its thin
shell): the cluster comes in as `JobCluster` (worker groups, node liveness, a dead rank's last
output, stack dumps), so unit tests drive every failure path with a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from strategies import StrategyConfigError

from ..errors import NonRetryableError, UserError
from ..monitoring.telemetry import JobTelemetry
from ..runtime.checkpoint import (
    CheckpointStore,
    checkpoint_metric,
    load_checkpoint_dir,
    storage_ready,
)
from ..runtime.preemption import PROPOSAL_EVENT
from ..runtime.reporting import PostMortem, SpoolInfo
from ..runtime.worker_entry import RankTask, run_rank
from .early_stop import EarlyStopper, EarlyStopState
from .failure import (
    Decision,
    Failure,
    FailureKind,
    RankDeath,
    classify_exception,
    counted_restarts,
    decide,
    describe_death,
    oom_kills_between,
    ray_exit_type,
    root_failure,
)
from .hang import HangWatch, Silence
from .preemption import JitCheckpoint, PreemptRequest, largest_size
from .progress import ProgressTracker
from .record import HistoryEntry, JobRecord, RestartRecord, RunSnapshot
from .states import JobState, check_transition
from .tracking import JobTracking, sinks_for

if TYPE_CHECKING:  # the loop itself never imports Ray
    from cluster.stacks import StackDump

logger = logging.getLogger(__name__)

# How long a rank whose connection dropped may take to be declared on a dead node
# (Ray's health check: a few missed 3-second heartbeats).
NODE_DEATH_GRACE_S = 30.0
# After a rank fails, how long its peers' failures are awaited: a rank that dies makes its
# peers fail in their collectives, and the death, not their errors, is what to report.
PEER_FAILURE_GRACE_S = 5.0
# How often the hang watch looks at the ranks' signals.
HANG_CHECK_S = 2.0
# How long a job's end waits for its tracking (the MLflow run's last metrics and its end).
TRACKING_CLOSE_S = 30.0


@dataclass(frozen=True)
class RankExit:
    """How one rank's run ended, as the worker group saw it."""

    value: Any = None
    error: BaseException | None = None  # what the rank's function raised
    died: str | None = None             # the process (or its node) went away: the cluster's words
    unreachable: bool = False           # only the connection dropped: the node may be dying


@dataclass(frozen=True)
class EndRequest:
    """Why the job should end although no rank failed: early stopping (SUCCEEDED), a sweep
    pruning its trial (STOPPED). The running attempt is torn down and the job ends in `state`."""

    state: JobState
    note: str


class WorkerGroup(Protocol):
    """One attempt's ranks (cluster.workers.WorkerGroup behind the Supervisor's adapter)."""

    def placement(self) -> list[dict]: ...
    def run(self, fn: Callable, args: tuple) -> list[Awaitable[RankExit]]: ...
    def run_on_rank0(self, fn: Callable, *args) -> Awaitable[RankExit]: ...
    def shutdown(self) -> None: ...


class JobCluster(Protocol):
    """What the attempt loop needs from the cluster."""

    rank_handle: Any  # what ranks report to (the Supervisor actor)

    async def start_group(self, timeout_s: float) -> WorkerGroup | None: ...
    def node_alive(self, node_id: str) -> bool: ...
    async def read_spool(self, node_id: str, path: str, offset: int) -> PostMortem: ...
    async def dump_stacks(self, targets: list[tuple[str, int]]) -> list[StackDump]: ...
    def release(self) -> None: ...
    # elastic jobs only: give the gang back and reserve `workers` instead (False: not within
    # timeout_s; the smaller reservation stays pending and start_group waits for it)
    async def resize(self, workers: int, timeout_s: float) -> bool: ...


class JobRun:
    def __init__(self, job: JobRecord, log_path: Path, cluster: JobCluster):
        self.job_id = job.id
        self.spec = job.spec
        self.cluster = cluster
        self.state = job.state
        self.history = list(job.history)
        self.restarts = list(job.restarts)
        self.placement: list[dict] = []
        self.checkpoint = job.checkpoint
        self.error: str | None = None
        self.attempt = len(self.restarts)
        self.progress = ProgressTracker()
        self.telemetry = JobTelemetry()  # what the controller's /metrics renders
        self.checkpoints = CheckpointStore(job.checkpoint_root, keep=self.spec.checkpoint.keep,
                                           keep_best=self.spec.checkpoint.keep_best)
        self.log_path = log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.group: WorkerGroup | None = None
        self.cancel_reason: str | None = None
        # per rank of the running attempt: its spool on its node, how far the log has it, memory
        self._spools: dict[int, SpoolInfo] = {}
        self._shipped: dict[int, int] = {}
        self._rss: dict[int, int] = {}
        self._hang: HangWatch | None = None  # the running attempt's ranks' progress and heartbeats
        self.post_training: dict | None = job.post_training  # the report, once the stage ran
        self.end_request: EndRequest | None = None
        self._end_requested = asyncio.Event()
        # preemption, drain, resize: a standing checkpoint-now request (see request_preempt)
        self.preemptions = list(job.preemptions)
        self.jit: JitCheckpoint | None = None
        self._jit_requested = asyncio.Event()
        self.workers = job.workers or self.spec.resources.workers  # the size the gang was reserved at
        self.best_checkpoint: dict | None = job.best_checkpoint
        self.early_stop = (EarlyStopper(self.spec.early_stop, EarlyStopState.from_json(job.early_stop))
                           if self.spec.early_stop is not None else None)
        self.tracking = JobTracking(self.job_id, sinks_for(self.job_id, self.spec, job.checkpoint_root), self._log)

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(
            state=self.state, history=self.history, restarts=self.restarts, placement=self.placement,
            checkpoint=self.checkpoint, error=self.error, attempt=self.attempt,
            metrics=self.progress.metrics, progress=self.progress.snapshot(),
            post_training=self.post_training, telemetry=self.telemetry.snapshot(),
            preemptions=self.preemptions, workers=self.workers,
            best_checkpoint=self.best_checkpoint,
            early_stop=self.early_stop.state.to_json() if self.early_stop is not None else None)

    # ---- what the ranks report -----------------------------------------------------------
    def on_events(self, rank: int, events: list) -> None:
        lines = []
        now, hang = time.time(), self._hang  # our clock, not the rank's: nodes' clocks differ
        if hang is not None:
            hang.on_heartbeat(rank, now)  # the rank's reporter thread sends at least once a second
        for kind, at, payload in events:
            if kind == "metrics":
                self.progress.on_metrics(rank, at, payload)
                if rank == 0:
                    self._check_early_stop(payload)
                if hang is not None:
                    hang.on_progress(rank, now)
            elif kind == "progress" and hang is not None:  # batches taken from ctx.dataset
                hang.on_progress(rank, now)
            elif kind == "busy" and hang is not None:  # a checkpoint save began (True) or ended
                hang.on_busy(rank, now, payload)
            elif kind == "output":
                lines += [f"[rank {rank}] {line}\n" for line in payload["lines"]]
                spool = self._spools.get(rank)
                if spool is not None and spool.path == payload["path"]:
                    self._shipped[rank] = max(self._shipped.get(rank, 0), payload["end"])
            elif kind == "rank_started":
                self._spools[rank], self._shipped[rank] = payload, 0
            elif kind == "rss":
                self._rss[rank] = payload
            elif kind == "checkpoint":
                self.checkpoint = payload
                self.telemetry.on_checkpoint(at, payload)
                self._update_best_checkpoint()
            elif kind == "telemetry":
                self.telemetry.merge(rank, at, payload)
            elif kind == "total_steps":
                self.progress.total_steps = payload
            elif kind == PROPOSAL_EVENT and self.jit is not None:  # the step it completed at the request
                self.jit.on_proposal(rank, payload)
        if lines:
            self._log("".join(lines))
        self.tracking.on_events(rank, events)  # never waits: the sinks run in their own thread

    def request_end(self, request: EndRequest) -> None:
        """End the job at once, in request.state (the first request wins)."""
        if self.end_request is None and not self.state.terminal:
            logger.info("job %s: end requested: %s (%s)", self.job_id, request.state.value, request.note)
            self.end_request = request
            self._end_requested.set()

    def request_preempt(self, request: PreemptRequest) -> bool:
        """Checkpoint just in time and give the gang back (request.resize_to: continue at that
        size at once). False when there is nothing to preempt: the job ended, is ending, runs
        its post-training passes, or a request already stands (the first one wins)."""
        if self.state.terminal or self.state in (JobState.POST_TRAINING, JobState.PREEMPTING) \
                or self.jit is not None or self.end_request is not None:
            return False
        latest = self.checkpoints.latest()
        self.jit = JitCheckpoint(request, len(self.placement) or self.workers, self.spec.preemption.grace_s,
                                 latest.index if latest else None)
        logger.info("job %s: checkpoint now: %s", self.job_id, request.note)
        if self.state is JobState.RUNNING:
            self._transition(JobState.PREEMPTING, request.note)
        self._jit_requested.set()
        return True

    def rank_command(self) -> dict | None:
        """The reply to a rank's push: while a request stands, checkpoint now (and at which step)."""
        return self.jit.rank_command() if self.jit is not None else None

    # ---- the job -------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def _transition(self, new: JobState, note: str = "") -> None:
        check_transition(self.state, new)
        self.state = new
        self.history.append(HistoryEntry(state=new, at=time.time(), note=note))
        self._log(f"[trainctl] {new.value}{': ' + note if note else ''}\n")
        logger.info("job %s: %s%s", self.job_id, new.value, f" ({note})" if note else "")
        if new.terminal:
            # Waited for here, on the loop, on purpose: until this returns no snapshot shows
            # the end, so the controller cannot kill this actor before the MLflow run is ended.
            self.tracking.close(new, TRACKING_CLOSE_S)

    async def main(self) -> None:
        """Every attempt until the job ends; cancelling the task that runs this cancels the job."""
        try:
            await self._attempts()
        except asyncio.CancelledError:
            self._teardown()
            await self._drain_spools()
            self._transition(JobState.CANCELLED, self.cancel_reason or "cancelled")
        except Exception as exc:  # a bug of ours must still end the job, visibly
            logger.exception("job %s: the attempt loop failed", self.job_id)
            self._teardown()
            self.error = f"supervisor error: {type(exc).__name__}: {exc}"
            self._transition(JobState.FAILED, self.error)
        finally:
            self.tracking.close(self.state, TRACKING_CLOSE_S)  # done at the end already, unless preempted
            self.cluster.release()

    def _teardown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    async def _attempts(self) -> None:
        while True:
            if self.jit is not None:  # asked between two attempts: no rank runs, nothing to save
                latest = self.checkpoints.latest()
                self.preemptions.append(self.jit.record(latest.index if latest else None,
                                                        latest.step if latest else None))
                if await self._give_back():
                    return
            self.group = await self.cluster.start_group(self.spec.failure.restart_timeout_s)
            if self.group is None:
                self.error = (f"could not re-reserve {self.workers} workers within "
                              f"{self.spec.failure.restart_timeout_s:g}s after a loss")
                self._transition(JobState.FAILED, self.error)
                return
            self.placement = self.group.placement()
            self.workers = len(self.placement)  # the reservation's size (elastic: may be below the spec's)
            if self.jit is not None:  # asked while the group started: no rank ran
                self._teardown()
                continue
            resume = self.checkpoints.latest() or self._initial_checkpoint()
            owner = f"{self.job_id}/attempt-{self.attempt}/{secrets.token_hex(4)}"
            self.checkpoints.claim(owner)  # ranks of any older attempt can no longer commit
            task = RankTask(
                job_id=self.job_id, spec=self.spec.model_dump(mode="json"), attempt=self.attempt,
                checkpoint_root=str(self.checkpoints.root),
                resume_path=str(resume.path) if resume else None,
                supervisor=self.cluster.rank_handle, owner=owner,
            )
            self._spools, self._shipped, self._rss = {}, {}, {}
            self._hang = HangWatch(self.workers, time.time(), self.spec.failure.hang_timeout_s)
            exits = self.group.run(run_rank, (task,))
            note = f"attempt {self.attempt}" + (f", from checkpoint {resume.index}" if resume else "")
            self._transition(JobState.RUNNING, note)
            self.tracking.attempt_started(self.attempt, resume.step if resume else None)
            failure = await self._watch(exits)
            if failure is None and self.end_request is not None:
                await self._end_early(self.end_request)
                return
            jit = self.jit
            if jit is not None and (failure is not None or jit.expired or jit.stopped_ranks):
                if await self._after_jit_checkpoint(failure):
                    return
                continue
            if failure is None and self.spec.post_training is not None:
                await self._post_training()  # on rank 0's worker, before the gang is released
                return
            self._teardown()
            if failure is None:
                self._transition(JobState.SUCCEEDED)
                return
            await self._drain_spools()  # what the torn-down ranks printed last
            self.checkpoints.discard_partials()  # no rank is left writing: a torn save only takes space
            if not self._restart_after(failure):
                return
            await self._shrink_after_node_loss(failure)

    def _restart_after(self, failure: Failure) -> bool:
        """Decide on a failure (the group is torn down): FAILED (False), or RESTARTING, counted."""
        ready = failure.kind is FailureKind.STORAGE and storage_ready(self.checkpoints.root, failure.needed_bytes)
        decision = decide(failure, counted_restarts(self.restarts), self.spec.failure.max_restarts, ready)
        logger.info("job %s: %s -> %s (restarts so far %d of %d)", self.job_id, failure.describe(),
                    decision.value, counted_restarts(self.restarts), self.spec.failure.max_restarts)
        if decision is Decision.FAIL:
            self.error = failure.describe()
            self._transition(JobState.FAILED, self.error)
            return False
        latest = self.checkpoints.latest()
        self.restarts.append(RestartRecord(
            at=time.time(), attempt=self.attempt, cause=failure.describe(),
            kind=failure.kind.value, from_checkpoint=latest.index if latest else None))
        self.attempt += 1
        self.telemetry.on_restart(int(self.progress.metrics.get("step", 0) or 0),
                                  (latest.step or 0) if latest else 0)
        self.progress.restart()
        self._transition(JobState.RESTARTING, failure.describe())
        return True

    # ---- preemption, drain, resize -------------------------------------------------------
    async def _after_jit_checkpoint(self, failure: Failure | None) -> bool:
        """The ranks saved and stopped, or the grace period ended (they are stopped now), or
        a rank failed meanwhile (a failure like any other: counted). Then the gang goes back.
        True: this supervisor is done (the job is QUEUED or FAILED)."""
        jit = self.jit
        self._teardown()
        await self._drain_spools()
        self.checkpoints.discard_partials()
        if jit.expired and not jit.all_stopped():
            self._log(f"[trainctl] no just-in-time checkpoint within preemption.grace_s "
                      f"({jit.grace_s:g}s): the ranks were stopped; the job resumes from its last checkpoint\n")
        if failure is not None and not self._restart_after(failure):
            return True
        latest = self.checkpoints.latest()
        self.preemptions.append(jit.record(latest.index if latest else None, latest.step if latest else None))
        if failure is None:  # a failure's restart accounted for the redone steps already
            self.telemetry.on_restart(int(self.progress.metrics.get("step", 0) or 0),
                                      (latest.step or 0) if latest else 0)
            self.progress.restart()
        return await self._give_back()

    async def _give_back(self) -> bool:
        """The request's end: to the queue (True), or the gang resized and the loop goes on."""
        request = self.jit.request
        self.jit = None
        self._jit_requested.clear()
        if request.resize_to is None:
            self._transition(JobState.QUEUED, request.note)
            return True
        if self.state is not JobState.RESTARTING:
            self._transition(JobState.RESTARTING, request.note)
        if not await self.cluster.resize(request.resize_to, self.spec.failure.restart_timeout_s):
            self._transition(JobState.QUEUED, f"{request.note}; {request.resize_to} workers could not be "
                                              "reserved: back in the queue")
            return True
        self.workers = request.resize_to
        return False

    async def _shrink_after_node_loss(self, failure: Failure) -> None:
        """An elastic job that lost a node continues at once on the ranks' nodes still alive
        (the largest size its mesh allows, >= min_workers) instead of waiting for the node."""
        sizes = elastic_sizes(self.spec)
        if not sizes:
            return
        # any failure: the peers of a rank on a lost node often fail first (gloo's connection
        # reset), before Ray reports that rank's death; what counts is which nodes are gone
        alive_nodes = {node: self.cluster.node_alive(node) for node in {p["node_id"] for p in self.placement}}
        alive = sum(1 for p in self.placement if alive_nodes[p["node_id"]])
        if alive == len(self.placement):
            return
        size = largest_size(sizes, alive)
        if size is None or size >= self.workers:
            return
        self._log(f"[trainctl] elastic: continuing at {size} workers (was {self.workers}) on the nodes left\n")
        if await self.cluster.resize(size, self.spec.failure.restart_timeout_s):
            self.workers = size

    async def _end_early(self, request: EndRequest) -> None:
        """The ranks are stopped where they are (the last committed checkpoint stays); a job
        that ends SUCCEEDED still runs its post-training passes, on a fresh rank 0."""
        self._teardown()
        await self._drain_spools()
        self.checkpoints.discard_partials()
        self.checkpoints.prune()  # rank 0 may have been stopped between a commit and its prune
        self._update_best_checkpoint()
        if request.state is JobState.SUCCEEDED and self.spec.post_training is not None:
            self.group = await self.cluster.start_group(self.spec.failure.restart_timeout_s)
            if self.group is not None:
                self._log(f"[trainctl] {request.note}\n")
                await self._post_training()
                return
        self._transition(request.state, request.note)

    async def _post_training(self) -> None:
        """Pruning/quantization passes on the final checkpoint (orchestrator/compress), run in
        rank 0's worker: the job's runtime env and reserved CPUs. Then SUCCEEDED or FAILED."""
        from ..compress.stage import default_output, run_stage

        post = self.spec.post_training
        latest = self._post_training_checkpoint()  # post_training.checkpoint: last or best
        if latest is None:
            self._teardown()
            self.error = "post_training: the job committed no checkpoint to compress; save one with ctx.report(..., checkpoint=...)"
            self._transition(JobState.FAILED, self.error)
            return
        output = post.output or str(default_output(self.checkpoints.root))
        stopped = f"{self.end_request.note}; " if self.end_request is not None else ""  # early stopping's note
        self._transition(JobState.POST_TRAINING, f"{stopped}{len(post.passes)} passes on checkpoint {latest.index}")
        threads = post.eval.threads or max(1, int(self.spec.resources.cpus_per_worker))
        done = await self.group.run_on_rank0(run_stage, self.spec.model_dump(mode="json"), str(latest.path),
                                             output, self.job_id, threads)
        if done.error is not None:
            cause = done.error
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            self.error = f"post_training failed: {type(cause).__name__}: {first}".strip()
            self._log(f"[post-training] {type(cause).__name__}: {cause}\n")
        elif done.died is not None:
            self.error = f"post_training failed: the worker died: {_first_line(done.died)}"
        else:
            result = done.value
            self._log("".join(f"[post-training] {line.removeprefix('[post-training] ')}\n" for line in result.pop("log", [])))
            self.post_training = {"report": result["report"].get("md"), "files": result["report"],
                                  "model": result["final"]["path"], "kept": result["kept"],
                                  "rejected": result["rejected"], "final": result["final"]}
            self.tracking.artifacts([p for p in result["report"].values() if isinstance(p, str)])
        self._teardown()
        if self.error:
            self._transition(JobState.FAILED, self.error)
        else:
            self._transition(JobState.SUCCEEDED, f"post-training kept {', '.join(self.post_training['kept']) or 'no pass'}")

    # ---- early stopping, the best checkpoint (spec: early_stop, checkpoint.keep_best) ----------
    def _check_early_stop(self, metrics: dict) -> None:
        note = self.early_stop.observe(metrics) if self.early_stop is not None else None
        if note is not None:
            self.request_end(EndRequest(JobState.SUCCEEDED, note))

    def _update_best_checkpoint(self) -> None:
        """After a commit: which checkpoint is now the best (status names it; tracking tags it)."""
        goal = self.spec.checkpoint.keep_best
        best = self.checkpoints.best() if goal is not None else None
        if best is None or (self.best_checkpoint or {}).get("index") == best.index:
            return
        self.best_checkpoint = {"index": best.index, "path": str(best.path), "step": best.step,
                                "metric": goal.metric, "value": checkpoint_metric(best, goal.metric)}
        self.tracking.tag("trainctl.best_checkpoint", str(best.path))
        self.tracking.tag(f"trainctl.best_{goal.metric}", f"{self.best_checkpoint['value']:.6g}")

    def _post_training_checkpoint(self):
        """The newest committed checkpoint, or with post_training.checkpoint: best, the best one;
        a job that saved none compresses the one it started from (checkpoint.resume_from: how a
        sweep's post-training job, which trains nothing, gets the best trial's)."""
        if self.spec.post_training.checkpoint == "best":
            best = self.checkpoints.best()
            if best is not None:
                return best
            self._log("[trainctl] post_training.checkpoint is best, but no checkpoint was saved with a "
                      f"report of {self.spec.checkpoint.keep_best.metric}: the passes start from the newest\n")
        return self.checkpoints.latest() or self._initial_checkpoint()

    def _initial_checkpoint(self):
        """`checkpoint.resume_from`: another job's checkpoint, in any layout, to start from."""
        path = self.spec.checkpoint.resume_from
        return load_checkpoint_dir(path) if path else None

    async def _wait_node_dead(self, node_id: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.cluster.node_alive(node_id) and loop.time() < deadline:
            await asyncio.sleep(0.5)

    async def _watch(self, exits: list[Awaitable[RankExit]]) -> Failure | None:
        """Wait for every rank; the first failure (or a hang) ends the wait (after its peers' grace)."""
        waits = [asyncio.ensure_future(self._rank_result(rank, ex)) for rank, ex in enumerate(exits)]
        watchdog = asyncio.ensure_future(self._hang_watchdog())
        ended = asyncio.ensure_future(self._end_requested.wait())  # see request_end
        grace = asyncio.ensure_future(self._jit_grace())  # see request_preempt
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending | {watchdog, ended, grace},
                                                   return_when=asyncio.FIRST_COMPLETED)
                if watchdog in done:
                    return watchdog.result()
                if ended in done or grace in done:
                    return None  # self.end_request or self.jit says how the attempt ends
                pending -= {watchdog, ended, grace}
                failures = [d.result() for d in done if d.result() is not None]
                if failures:
                    if pending:
                        more, _ = await asyncio.wait(pending, timeout=PEER_FAILURE_GRACE_S)
                        failures += [d.result() for d in more if d.result() is not None]
                    return root_failure(failures)
            return None
        finally:
            watchdog.cancel()
            ended.cancel()
            grace.cancel()
            for w in waits:
                w.cancel()

    async def _jit_grace(self) -> None:
        """Returns when a checkpoint-now request's grace period is over (preemption.grace_s)."""
        await self._jit_requested.wait()
        await asyncio.sleep(max(0.0, self.jit.deadline() - time.time()))
        self.jit.expired = True

    async def _hang_watchdog(self) -> Failure:
        """Returns once ranks are hung (see hang.py): every rank's stack is in the log first."""
        while True:
            await asyncio.sleep(HANG_CHECK_S)
            silent = self._hang.hung(time.time()) if self._hang is not None else []
            if silent:
                break
        threshold = self._hang.threshold_s()
        logger.warning("job %s: %s (threshold %.0f s): dumping every rank's stack", self.job_id,
                       ", ".join(s.describe() for s in silent), threshold)
        stacks = await self.cluster.dump_stacks([(p["node_id"], p["pid"]) for p in self.placement])
        for rank, dump in enumerate(stacks):
            self._log(f"[trainctl] rank {rank} stack (py-spy, pid {dump.pid}):\n" + "".join(
                f"[rank {rank}] {line}\n" for line in dump.text.rstrip("\n").split("\n")))
        message = hang_message(silent, self.placement, stacks)
        self._log(f"[trainctl] hang: {message}\n")
        return Failure(FailureKind.HANG, silent[0].rank, message)

    async def _post_mortem(self, rank: int) -> PostMortem | None:
        """What `rank` wrote that the log does not have yet, read from its node (and removed)."""
        spool = self._spools.pop(rank, None)
        if spool is None:
            return None
        try:
            found = await self.cluster.read_spool(self.placement[rank]["node_id"], spool.path,
                                                  self._shipped.get(rank, 0))
        except Exception as exc:  # its node went away meanwhile: the cause is still named, without the text
            logger.warning("job %s: reading rank %d's spool %s failed", self.job_id, rank, spool.path, exc_info=True)
            self._log(f"[trainctl] could not read rank {rank}'s last output: {type(exc).__name__}: "
                      f"{_first_line(str(exc))}\n")
            return None
        if found.text:
            self._log("".join(f"[rank {rank}] {line}\n" for line in found.text.rstrip("\n").split("\n")))
        return found

    async def _drain_spools(self) -> None:
        """After a teardown: every rank's unshipped output into the log; their spools removed."""
        try:
            alive = [rank for rank in self._spools if self.cluster.node_alive(self.placement[rank]["node_id"])]
            await asyncio.gather(*(self._post_mortem(rank) for rank in alive))
        except Exception:  # the last lines are a courtesy: never what fails or blocks the job's end
            logger.exception("job %s: could not read the ranks' last output", self.job_id)
        self._spools = {}

    async def _rank_result(self, rank: int, exit_: Awaitable[RankExit]) -> Failure | None:
        outcome = await exit_
        stopped = isinstance(outcome.value, dict) and (outcome.value.get("preempted") or outcome.value.get("terminated"))
        if stopped and self.jit is not None:  # saved just in time and returned (a script: exited on SIGTERM)
            self.jit.stopped_ranks.add(rank)
        if outcome.error is not None:
            cause = outcome.error
            kind = classify_exception(cause, (NonRetryableError, UserError, StrategyConfigError))
            if kind is FailureKind.STORAGE:
                return Failure(kind, rank, str(cause), needed_bytes=cause.needed_bytes)
            return Failure(kind, rank, f"{type(cause).__name__}: {cause}".strip())
        if outcome.died is None:
            return None
        node_id = self.placement[rank]["node_id"]
        if outcome.unreachable:
            # The connection dropped: give the cluster time to tell whether the node died.
            await self._wait_node_dead(node_id, NODE_DEATH_GRACE_S)
        if "node has died" in outcome.died or not self.cluster.node_alive(node_id):
            return Failure(FailureKind.NODE_LOST, rank, f"node {self.placement[rank]['node_ip']} ({node_id[:8]}) was lost")
        spool = self._spools.get(rank)
        found = await self._post_mortem(rank)
        death = RankDeath(
            ray_error=outcome.died, crash_text=found.text if found else "",
            oom_kills=oom_kills_between(spool.oom_kills if spool else None, found.oom_kills if found else None),
            last_rss_bytes=self._rss.get(rank))
        message = describe_death(death, self.job_id, rank)
        self._log(f"[trainctl] rank {rank} (pid {self.placement[rank]['pid']}) {message}; "
                  f"Ray's worker exit type: {ray_exit_type(outcome.died) or 'unknown'}\n")
        return Failure(FailureKind.WORKER_DIED, rank, message)


def elastic_sizes(spec) -> tuple[int, ...]:
    """The worker counts an elastic job (resources.min_workers) may run at; () for a fixed one."""
    from .elastic import allowed_sizes  # the scheduler's rule: colocate groups, the strategy's mesh

    return allowed_sizes(spec)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def hang_message(silent: list[Silence], placement: list[dict], stacks: list[StackDump]) -> str:
    """`rank 1 silent for 300 s on node 10.0.0.2 (ab12cd34) in all_reduce (train.py:42)`, and the others.

    The rank named first is the likely culprit: a frozen one, else one not waiting in a
    collective (its peers wait for it there), else the first."""
    silent = sorted(silent, key=lambda s: (not s.frozen, stacks[s.rank].in_collective()))
    first, others = silent[0], silent[1:]
    where = placement[first.rank]
    text = (f"{first.describe()} on node {where['node_ip']} ({where['node_id'][:8]}) "
            f"{stacks[first.rank].summary()}")
    if others:
        text += "; also " + ", ".join(f"{s.describe()} {stacks[s.rank].summary()}" for s in others)
    return text
