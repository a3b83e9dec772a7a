"""One supervisor actor per running job: the Ray shell around the job's attempt loop (jobrun.py).

It lives on the head node, is detached (a restarted controller finds it by name), and owns
the job's worker actors. What the loop needs from Ray is here: the gang's worker group
(`RayWorkerGroup`), node liveness, reading a dead rank's last output on its node, stack dumps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import gang
from cluster.connect import NAMESPACE
from cluster.inventory import HEAD_RESOURCE
from cluster.stacks import StackDump, dump_stacks
from cluster.workers import WorkerGroup

from ..runtime.reporting import PostMortem, read_spool
from ..spec import JobSpec
from .jobrun import EndRequest, JobRun, RankExit
from .record import JobRecord, RunSnapshot
from .states import JobState

# How long reading a dead rank's last output from its node may take.
POST_MORTEM_TIMEOUT_S = 30.0


def supervisor_name(job_id: str) -> str:
    return f"trainctl-supervisor-{job_id}"


@ray.remote(num_cpus=0, max_retries=0)
def _read_spool_on_node(path: str, offset: int) -> PostMortem:
    return read_spool(path, offset)


async def rank_exit(ref) -> RankExit:
    """A rank's Ray task, awaited, as the attempt loop's RankExit."""
    try:
        return RankExit(value=await ref)
    except ray.exceptions.RayTaskError as exc:
        return RankExit(error=exc.cause)
    except ray.exceptions.RayActorError as exc:
        return RankExit(died=str(exc) or "actor died",
                        unreachable=isinstance(exc, ray.exceptions.ActorUnavailableError))


class RayWorkerGroup:
    """cluster.workers.WorkerGroup as the attempt loop sees it."""

    def __init__(self, group: WorkerGroup):
        self.group = group

    def placement(self) -> list[dict]:
        return self.group.placement()

    def run(self, fn, args: tuple) -> list:
        return [rank_exit(ref) for ref in self.group.run(fn, [args] * self.group.size)]

    def run_on_rank0(self, fn, *args):
        slot = self.group.slots[0]
        return rank_exit(self.group.actors[slot.worker_index].run.remote(self.group.env_by_rank[0], fn, *args))

    def shutdown(self) -> None:
        self.group.shutdown()


class RayJobCluster:
    """The job's gang on Ray, as the attempt loop needs it (jobrun.JobCluster)."""

    def __init__(self, job_id: str, spec: JobSpec, package_uri: str | None, log):
        self.job_id, self.spec, self.package_uri, self._log = job_id, spec, package_uri, log
        self.rank_handle = ray.get_runtime_context().current_actor

    def _runtime_env(self) -> dict:
        threads = str(max(1, int(self.spec.resources.cpus_per_worker)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **self.spec.env}
        runtime_env = {"env_vars": env}
        if self.package_uri:
            runtime_env["working_dir"] = self.package_uri
        return runtime_env

    async def start_group(self, timeout_s: float) -> RayWorkerGroup | None:
        """Create and lay out the workers; retried while Ray re-places the bundles of a lost node."""
        res = self.spec.resources
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            pg = gang.find(self.job_id)
            if pg is None or not await gang.wait_created(pg, max(0.0, deadline - loop.time())):
                return None
            group = WorkerGroup(pg, res.workers, res.cpus_per_worker, res.gpus_per_worker,
                                self._runtime_env(), colocate=res.colocate)
            try:
                await group.start()
                return RayWorkerGroup(group)
            except ray.exceptions.RayActorError as exc:
                # A bundle still on a node that just died: Ray has not re-placed it yet.
                group.shutdown()
                self._log(f"[trainctl] worker start failed, retrying: {str(exc).splitlines()[0]}\n")
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(1.0)

    def node_alive(self, node_id: str) -> bool:
        return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())

    async def read_spool(self, node_id: str, path: str, offset: int) -> PostMortem:
        if node_id == ray.get_runtime_context().get_node_id():
            return read_spool(path, offset)  # this node's file: no task to start
        return await asyncio.wait_for(_read_spool_on_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(path, offset), POST_MORTEM_TIMEOUT_S)

    async def dump_stacks(self, targets: list[tuple[str, int]]) -> list[StackDump]:
        return await dump_stacks(targets)

    def release(self) -> None:
        gang.release(gang.find(self.job_id))


@ray.remote(num_cpus=0, max_restarts=0)
class Supervisor:
    def __init__(self, job: JobRecord, state_dir: str):
        log_path = Path(state_dir) / "logs" / f"{job.id}.log"
        self.run = JobRun(job, log_path, RayJobCluster(job.id, job.spec, job.package_uri,
                                                       lambda text: self.run._log(text)))
        self._task: asyncio.Task | None = None

    # ---- called by the controller ----------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run.main())

    async def snapshot(self) -> RunSnapshot:
        return self.run.snapshot()

    async def cancel(self, reason: str = "cancelled by user") -> RunSnapshot:
        if not self.run.state.terminal and self._task is not None:
            self.run.cancel_reason = reason
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return self.run.snapshot()

    async def end(self, state: str, note: str) -> None:
        """End the running job in `state` (a sweep's pruned trial: STOPPED), its gang freed at
        once; a second request changes nothing."""
        self.run.request_end(EndRequest(JobState(state), note))

    # ---- called by the ranks -----------------------------------------------------------
    async def push(self, rank: int, events: list) -> None:
        self.run.on_events(rank, events)


def create_supervisor(job: JobRecord, state_dir: str):
    return Supervisor.options(
        name=supervisor_name(job.id), namespace=NAMESPACE, lifetime="detached",
        resources={HEAD_RESOURCE: 0.001},
    ).remote(job, state_dir)
