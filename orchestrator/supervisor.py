"""One supervisor actor per running job: runs attempts of the worker group until done.

It lives on the head node, is detached (a restarted controller finds it by name),
and owns the job's worker actors: when a rank dies it tears the whole group down,
asks the failure policy, and starts a new group from the last committed checkpoint.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import ray

from cluster import gang
from cluster.connect import NAMESPACE
from cluster.inventory import HEAD_RESOURCE
from cluster.workers import WorkerGroup
from strategies import StrategyConfigError

from .checkpoint import CheckpointStore, load_checkpoint_dir
from .errors import NonRetryableError, UserError
from .failure import Decision, Failure, FailureKind, decide
from .progress import ProgressTracker
from .spec import JobSpec
from .states import JobState, check_transition
from .telemetry import JobTelemetry
from .worker_entry import RankTask, run_rank


def supervisor_name(job_id: str) -> str:
    return f"trainctl-supervisor-{job_id}"


# How long a rank whose connection dropped may take to be declared on a dead node
# (Ray's health check: a few missed 3-second heartbeats).
NODE_DEATH_GRACE_S = 30.0


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
        for kind, at, payload in events:
            if kind == "metrics":
                self.progress.on_metrics(rank, at, payload)
            elif kind == "log":
                lines.append(f"[rank {rank}] {payload}\n")
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
            task = RankTask(
                job_id=self.job_id, spec=self.spec.model_dump(mode="json"), attempt=self.attempt,
                checkpoint_root=str(self.checkpoints.root),
                resume_path=str(resume.path) if resume else None,
                supervisor=ray.get_runtime_context().current_actor,
            )
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
            if decide(failure, len(self.restarts), self.spec.failure.max_restarts) is Decision.FAIL:
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
        from .compress.stage import default_output, run_stage

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
        """Wait for every rank; the first failure ends the wait."""
        waits = [asyncio.ensure_future(self._rank_result(rank, ref)) for rank, ref in enumerate(refs)]
        try:
            for next_done in asyncio.as_completed(waits):
                failure = await next_done
                if failure is not None:
                    return failure
            return None
        finally:
            for w in waits:
                w.cancel()

    async def _rank_result(self, rank: int, ref) -> Failure | None:
        try:
            await ref
            return None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            # bad input cannot be fixed by a restart: a user error, bad data, an impossible strategy setup
            fatal = (NonRetryableError, UserError, StrategyConfigError)
            kind = FailureKind.FATAL if isinstance(cause, fatal) else FailureKind.ERROR
            return Failure(kind, rank, f"{type(cause).__name__}: {cause}".strip())
        except ray.exceptions.RayActorError as exc:
            node_id = self.placement[rank]["node_id"]
            if isinstance(exc, ray.exceptions.ActorUnavailableError):
                # The connection dropped: give the GCS time to tell whether the node died.
                await self._wait_node_dead(node_id, NODE_DEATH_GRACE_S)
            if "node has died" in str(exc) or not _node_alive(node_id):
                return Failure(FailureKind.NODE_LOST, rank, f"node {self.placement[rank]['node_ip']} ({node_id[:8]}) was lost")
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "actor died"
            return Failure(FailureKind.WORKER_DIED, rank, f"worker process (pid {self.placement[rank]['pid']}) died: {detail}")


def create_supervisor(job: dict, state_dir: str):
    return Supervisor.options(
        name=supervisor_name(job["id"]), namespace=NAMESPACE, lifetime="detached",
        resources={HEAD_RESOURCE: 0.001},
    ).remote(job, state_dir)
