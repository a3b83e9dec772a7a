"""One supervisor actor per running job: runs attempts of the worker group until done.

It lives on the head node, is detached (a restarted controller finds it by name),
and owns the job's worker actors: when a rank dies it tears the whole group down,
asks the failure policy, and starts a new group from the last committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import gang
from cluster.connect import NAMESPACE
from cluster.inventory import HEAD_RESOURCE
from cluster.stacks import StackDump, dump_stacks
from cluster.workers import WorkerGroup
from strategies import StrategyConfigError

from ..errors import NonRetryableError, UserError
from ..monitoring.telemetry import JobTelemetry
from ..runtime.checkpoint import (
    CheckpointStore,
    CheckpointWriteError,
    load_checkpoint_dir,
    storage_ready,
)
from ..runtime.reporting import PostMortem, SpoolInfo, read_spool
from ..runtime.worker_entry import RankTask, run_rank
from ..spec import JobSpec
from .failure import (
    Decision,
    Failure,
    FailureKind,
    RankDeath,
    counted_restarts,
    decide,
    describe_death,
    oom_kills_between,
    ray_exit_type,
    root_failure,
)
from .hang import HangWatch, Silence
from .progress import ProgressTracker
from .states import JobState, check_transition

logger = logging.getLogger(__name__)


def supervisor_name(job_id: str) -> str:
    return f"trainctl-supervisor-{job_id}"


# How long a rank whose connection dropped may take to be declared on a dead node
# (Ray's health check: a few missed 3-second heartbeats).
NODE_DEATH_GRACE_S = 30.0
# After a rank fails, how long its peers' failures are awaited: a rank that dies makes its
# peers fail in their collectives, and the death, not their errors, is what to report.
PEER_FAILURE_GRACE_S = 5.0
# How long reading a dead rank's last output from its node may take.
POST_MORTEM_TIMEOUT_S = 30.0
# How often the hang watch looks at the ranks' signals.
HANG_CHECK_S = 2.0


@ray.remote(num_cpus=0, max_retries=0)
def _read_spool_on_node(path: str, offset: int) -> PostMortem:
    return read_spool(path, offset)


def _node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


@ray.remote(num_cpus=0, max_restarts=0)
class Supervisor:
    def __init__(self, job: dict, state_dir: str):
        self.job_id = job["id"]
        self.spec = JobSpec.model_validate(job["spec"])
        self.package_uri = job.get("package_uri")
        self.state = JobState(job["state"])
        self.history = list(job.get("history", []))
        self.restarts = list(job.get("restarts", []))
        self.placement: list[dict] = []
        self.checkpoint = job.get("checkpoint")
        self.error: str | None = None
        self.attempt = len(self.restarts)
        self.progress = ProgressTracker()
        self.telemetry = JobTelemetry()  # what the controller's /metrics renders
        self.checkpoints = CheckpointStore(job["checkpoint_root"], keep=self.spec.checkpoint.keep)
        self.log_path = Path(state_dir) / "logs" / f"{self.job_id}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.group: WorkerGroup | None = None
        self._task: asyncio.Task | None = None
        self._cancel_reason: str | None = None
        # per rank of the running attempt: its spool on its node, how far the log has it, memory
        self._spools: dict[int, SpoolInfo] = {}
        self._shipped: dict[int, int] = {}
        self._rss: dict[int, int] = {}
        self._hang: HangWatch | None = None  # the running attempt's ranks' progress and heartbeats
        self.post_training: dict | None = job.get("post_training")  # the report, once the stage ran

    # ---- called by the controller ----------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._main())

    async def snapshot(self) -> dict:
        return {
            "state": self.state.value, "history": self.history, "restarts": self.restarts,
            "placement": self.placement, "checkpoint": self.checkpoint, "error": self.error,
            "attempt": self.attempt, "metrics": self.progress.metrics,
            "progress": self.progress.snapshot(), "post_training": self.post_training,
            "telemetry": self.telemetry.snapshot(),
        }

    async def cancel(self, reason: str = "cancelled by user") -> dict:
        if not self.state.terminal and self._task is not None:
            self._cancel_reason = reason
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return await self.snapshot()

    # ---- called by the ranks -----------------------------------------------------------
    async def push(self, rank: int, events: list) -> None:
        lines = []
        now, hang = time.time(), self._hang  # our clock, not the rank's: nodes' clocks differ
        if hang is not None:
            hang.on_heartbeat(rank, now)  # the rank's reporter thread sends at least once a second
        for kind, at, payload in events:
            if kind == "metrics":
                self.progress.on_metrics(rank, at, payload)
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
            elif kind == "telemetry":
                self.telemetry.merge(rank, at, payload)
            elif kind == "total_steps":
                self.progress.total_steps = payload
        if lines:
            self._log("".join(lines))

    # ---- the job -----------------------------------------------------------------------
    def _log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def _transition(self, new: JobState, note: str = "") -> None:
        check_transition(self.state, new)
        self.state = new
        self.history.append({"state": new.value, "at": time.time(), "note": note})
        self._log(f"[trainctl] {new.value}{': ' + note if note else ''}\n")

    async def _main(self) -> None:
        try:
            await self._attempts()
        except asyncio.CancelledError:
            self._teardown()
            await self._drain_spools()
            self._transition(JobState.CANCELLED, self._cancel_reason or "cancelled")
        except Exception as exc:  # a bug of ours must still end the job, visibly
            self._teardown()
            self.error = f"supervisor error: {type(exc).__name__}: {exc}"
            self._transition(JobState.FAILED, self.error)
        finally:
            gang.release(gang.find(self.job_id))

    def _teardown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def _runtime_env(self) -> dict:
        threads = str(max(1, int(self.spec.resources.cpus_per_worker)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **self.spec.env}
        runtime_env = {"env_vars": env}
        if self.package_uri:
            runtime_env["working_dir"] = self.package_uri
        return runtime_env

    async def _attempts(self) -> None:
        res = self.spec.resources
        while True:
            if not await self._start_group():
                self.error = (f"could not re-reserve {res.workers} workers within "
                              f"{self.spec.failure.restart_timeout_s:g}s after a loss")
                self._transition(JobState.FAILED, self.error)
                return
            resume = self.checkpoints.latest() or self._initial_checkpoint()
            owner = f"{self.job_id}/attempt-{self.attempt}/{secrets.token_hex(4)}"
            self.checkpoints.claim(owner)  # ranks of any older attempt can no longer commit
            task = RankTask(
                job_id=self.job_id, spec=self.spec.model_dump(mode="json"), attempt=self.attempt,
                checkpoint_root=str(self.checkpoints.root),
                resume_path=str(resume.path) if resume else None,
                supervisor=ray.get_runtime_context().current_actor, owner=owner,
            )
            self._spools, self._shipped, self._rss = {}, {}, {}
            self._hang = HangWatch(res.workers, time.time(), self.spec.failure.hang_timeout_s)
            refs = self.group.run(run_rank, [(task,)] * res.workers)
            note = f"attempt {self.attempt}" + (f", from checkpoint {resume.index}" if resume else "")
            self._transition(JobState.RUNNING, note)
            failure = await self._watch(refs)
            if failure is None and self.spec.post_training is not None:
                await self._post_training()  # on rank 0's worker, before the gang is released
                return
            self._teardown()
            if failure is None:
                self._transition(JobState.SUCCEEDED)
                return
            await self._drain_spools()  # what the torn-down ranks printed last
            self.checkpoints.discard_partials()  # no rank is left writing: a torn save only takes space
            ready = failure.kind is FailureKind.STORAGE and storage_ready(self.checkpoints.root, failure.needed_bytes)
            if decide(failure, counted_restarts(self.restarts), self.spec.failure.max_restarts, ready) is Decision.FAIL:
                self.error = failure.describe()
                self._transition(JobState.FAILED, self.error)
                return
            latest = self.checkpoints.latest()
            self.restarts.append({
                "at": time.time(), "attempt": self.attempt, "cause": failure.describe(),
                "kind": failure.kind.value, "from_checkpoint": latest.index if latest else None,
            })
            self.attempt += 1
            self.telemetry.on_restart(int(self.progress.metrics.get("step", 0) or 0),
                                      (latest.step or 0) if latest else 0)
            self.progress.restart()
            self._transition(JobState.RESTARTING, failure.describe())

    async def _post_training(self) -> None:
        """Pruning/quantization passes on the final checkpoint (orchestrator/compress), run in
        rank 0's worker actor: the job's runtime env and reserved CPUs. Then SUCCEEDED or FAILED."""
        from ..compress.stage import default_output, run_stage

        post = self.spec.post_training
        latest = self.checkpoints.latest()
        if latest is None:
            self._teardown()
            self.error = "post_training: the job committed no checkpoint to compress; save one with ctx.report(..., checkpoint=...)"
            self._transition(JobState.FAILED, self.error)
            return
        output = post.output or str(default_output(self.checkpoints.root))
        self._transition(JobState.POST_TRAINING, f"{len(post.passes)} passes on checkpoint {latest.index}")
        slot = self.group.slots[0]
        threads = post.eval.threads or max(1, int(self.spec.resources.cpus_per_worker))
        ref = self.group.actors[slot.worker_index].run.remote(
            self.group.env_by_rank[0], run_stage, self.spec.model_dump(mode="json"), str(latest.path),
            output, self.job_id, threads)
        try:
            result = await ref
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            self.error = f"post_training failed: {type(cause).__name__}: {first}".strip()
            self._log(f"[post-training] {type(cause).__name__}: {cause}\n")
        except ray.exceptions.RayActorError as exc:
            self.error = f"post_training failed: the worker died: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        else:
            self._log("".join(f"[post-training] {line.removeprefix('[post-training] ')}\n" for line in result.pop("log", [])))
            self.post_training = {"report": result["report"].get("md"), "files": result["report"],
                                  "model": result["final"]["path"], "kept": result["kept"],
                                  "rejected": result["rejected"], "final": result["final"]}
        self._teardown()
        if self.error:
            self._transition(JobState.FAILED, self.error)
        else:
            self._transition(JobState.SUCCEEDED, f"post-training kept {', '.join(self.post_training['kept']) or 'no pass'}")

    def _initial_checkpoint(self):
        """`checkpoint.resume_from`: another job's checkpoint, in any layout, to start from."""
        path = self.spec.checkpoint.resume_from
        return load_checkpoint_dir(path) if path else None

    async def _wait_node_dead(self, node_id: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while _node_alive(node_id) and loop.time() < deadline:
            await asyncio.sleep(0.5)

    async def _start_group(self) -> bool:
        """Create and lay out the workers; retried while Ray re-places the bundles of a lost node."""
        res = self.spec.resources
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.failure.restart_timeout_s
        while True:
            pg = gang.find(self.job_id)
            if pg is None or not await gang.wait_created(pg, max(0.0, deadline - loop.time())):
                return False
            self.group = WorkerGroup(pg, res.workers, res.cpus_per_worker, res.gpus_per_worker,
                                     self._runtime_env(), colocate=res.colocate)
            try:
                await self.group.start()
                self.placement = self.group.placement()
                return True
            except ray.exceptions.RayActorError as exc:
                # A bundle still on a node that just died: Ray has not re-placed it yet.
                self._teardown()
                self._log(f"[trainctl] worker start failed, retrying: {str(exc).splitlines()[0]}\n")
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(1.0)

    async def _watch(self, refs: list) -> Failure | None:
        """Wait for every rank; the first failure (or a hang) ends the wait (after its peers' grace)."""
        waits = [asyncio.ensure_future(self._rank_result(rank, ref)) for rank, ref in enumerate(refs)]
        watchdog = asyncio.ensure_future(self._hang_watchdog())
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending | {watchdog}, return_when=asyncio.FIRST_COMPLETED)
                if watchdog in done:
                    return watchdog.result()
                pending.discard(watchdog)
                failures = [d.result() for d in done if d.result() is not None]
                if failures:
                    if pending:
                        more, _ = await asyncio.wait(pending, timeout=PEER_FAILURE_GRACE_S)
                        failures += [d.result() for d in more if d.result() is not None]
                    return root_failure(failures)
            return None
        finally:
            watchdog.cancel()
            for w in waits:
                w.cancel()

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
        stacks = await dump_stacks([(p["node_id"], p["pid"]) for p in self.placement])
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
        node_id = self.placement[rank]["node_id"]
        offset = self._shipped.get(rank, 0)
        try:
            if node_id == ray.get_runtime_context().get_node_id():
                found = read_spool(spool.path, offset)  # this node's file: no task to start
            else:
                found = await asyncio.wait_for(_read_spool_on_node.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(spool.path, offset), POST_MORTEM_TIMEOUT_S)
        except Exception as exc:  # its node went away meanwhile: the cause is still named, without the text
            logger.warning("job %s: reading rank %d's spool %s failed", self.job_id, rank, spool.path, exc_info=True)
            self._log(f"[trainctl] could not read rank {rank}'s last output: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n")
            return None
        if found.text:
            self._log("".join(f"[rank {rank}] {line}\n" for line in found.text.rstrip("\n").split("\n")))
        return found

    async def _drain_spools(self) -> None:
        """After a teardown: every rank's unshipped output into the log; their spools removed."""
        try:
            alive = [rank for rank in self._spools if _node_alive(self.placement[rank]["node_id"])]
            await asyncio.gather(*(self._post_mortem(rank) for rank in alive))
        except Exception:  # the last lines are a courtesy: never what fails or blocks the job's end
            logger.exception("job %s: could not read the ranks' last output", self.job_id)
        self._spools = {}

    async def _rank_result(self, rank: int, ref) -> Failure | None:
        try:
            await ref
            return None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            # bad input cannot be fixed by a restart: a user error, bad data, an impossible strategy setup
            fatal = (NonRetryableError, UserError, StrategyConfigError)
            if isinstance(cause, CheckpointWriteError):
                return Failure(FailureKind.STORAGE, rank, str(cause), needed_bytes=cause.needed_bytes)
            kind = FailureKind.FATAL if isinstance(cause, fatal) else FailureKind.ERROR
            return Failure(kind, rank, f"{type(cause).__name__}: {cause}".strip())
        except ray.exceptions.RayActorError as exc:
            node_id = self.placement[rank]["node_id"]
            if isinstance(exc, ray.exceptions.ActorUnavailableError):
                # The connection dropped: give the GCS time to tell whether the node died.
                await self._wait_node_dead(node_id, NODE_DEATH_GRACE_S)
            if "node has died" in str(exc) or not _node_alive(node_id):
                return Failure(FailureKind.NODE_LOST, rank, f"node {self.placement[rank]['node_ip']} ({node_id[:8]}) was lost")
            spool = self._spools.get(rank)
            found = await self._post_mortem(rank)
            death = RankDeath(
                ray_error=str(exc), crash_text=found.text if found else "",
                oom_kills=oom_kills_between(spool.oom_kills if spool else None, found.oom_kills if found else None),
                last_rss_bytes=self._rss.get(rank))
            message = describe_death(death, self.job_id, rank)
            self._log(f"[trainctl] rank {rank} (pid {self.placement[rank]['pid']}) {message}; "
                      f"Ray's worker exit type: {ray_exit_type(str(exc)) or 'unknown'}\n")
            return Failure(FailureKind.WORKER_DIED, rank, message)


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


def create_supervisor(job: dict, state_dir: str):
    return Supervisor.options(
        name=supervisor_name(job["id"]), namespace=NAMESPACE, lifetime="detached",
        resources={HEAD_RESOURCE: 0.001},
    ).remote(job, state_dir)
