"""Supervision of running jobs: the Ray shell around each job's attempt loop (jobrun.py).

A `Supervisor` is one job's shell (its JobRun and the task running it). Many of them live as
asyncio tasks inside one `SupervisorHost` actor: a few long-lived, detached processes on the
head, not one ~130 MB process per job. The controller places jobs on hosts (`SupervisorHosts`,
up to JOBS_PER_HOST each; a restarted controller finds the hosts by name and asks each which
jobs it holds) and talks to a job through a `SupervisorRef`, bound to (host, job id); the same
ref is what the ranks push their reports to (a forked rank through its node's rank host,
cluster/rank_host.py; a classic worker actor directly). If a host dies its jobs' ranks die
too (worker actors with their owner; forked ranks when their next report finds it gone) and
the controller restarts each of its jobs from its checkpoint ("supervisor lost"). What the
loop needs from Ray is here too: the gang's worker group (`RayWorkerGroup`: forked ranks, or
worker actors with TRAINCTL_WARM_START=0), node liveness, reading a dead rank's last output
on its node, stacks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import secrets
import signal
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray import cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import gang
from cluster.connect import NAMESPACE
from cluster.inventory import HEAD_RESOURCE
from cluster.rank_host import WarmStartUnavailable, warm_start_blocker
from cluster.stacks import StackDump, dump_stacks
from cluster.wire import RankOutcome
from cluster.workers import WarmWorkerGroup, WorkerGroup

from ..runtime.reporting import PostMortem, read_spool
from ..runtime.worker_entry import RankTask
from ..spec import JobSpec
from .jobrun import EndRequest, JobRun, RankExit
from .preemption import PreemptRequest
from .record import JobRecord, RunSnapshot
from .states import JobState

log = logging.getLogger(__name__)

# How long reading a dead rank's last output from its node may take.
POST_MORTEM_TIMEOUT_S = 30.0
# Jobs per supervisor host: a host's event loop serves all their ranks' reports and the
# controller's polls (a few ms a second per job), and its death restarts all of them.
JOBS_PER_HOST = int(os.environ.get("TRAINCTL_JOBS_PER_HOST", "32"))
HOST_PREFIX = "trainctl-supervisor-host-"
# How long a restarted controller waits for a host to say which jobs it holds.
HOST_QUERY_TIMEOUT_S = 30.0
# What each node's rank host runs as its zygote (cluster/ is told, it never imports orchestrator).
ZYGOTE_MODULE = "orchestrator.runtime.zygote"


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


def outcome_exit(outcome: RankOutcome) -> RankExit:
    """A forked rank's end (cluster/rank_host.py) as the attempt loop's RankExit: its value, its
    exception, or its death in the words failure.py reads ("killed by SIGSEGV" comes from the
    crash report in its spool, as for a Ray worker)."""
    if outcome.ok is True:
        return RankExit(value=pickle.loads(outcome.payload))
    if outcome.ok is False:
        try:
            error = pickle.loads(outcome.payload) if outcome.payload is not None else None
        except Exception:  # its class is not importable here (the job's own module)
            error = None
        return RankExit(error=error if isinstance(error, BaseException) else RuntimeError(outcome.text.strip()))
    return RankExit(died=describe_exit(outcome))


def describe_exit(outcome: RankOutcome) -> str:
    status = outcome.exit_status
    if status is None:
        how = "ended without a result"
    elif status < 0:
        try:
            how = f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            how = f"was killed by signal {-status}"
    else:
        how = f"exited with code {status} without a result"
    return f"the rank process (pid {outcome.pid}) {how}" + (f": {outcome.note}" if outcome.note else "")


async def forked_rank_exit(ref) -> RankExit:
    """A forked rank's RankOutcome, awaited through its host; the host's death is the rank's."""
    try:
        return outcome_exit(await ref)
    except ray.exceptions.RayActorError as exc:
        return RankExit(died=f"its rank host died: {exc}" if str(exc) else "its rank host died",
                        unreachable=isinstance(exc, ray.exceptions.ActorUnavailableError))


def call_payload(fn, args: tuple) -> tuple[bytes, Any]:
    """(fn, args) pickled for a forked rank, and where its reports go: the RankTask's supervisor
    ref stays here (the rank reaches it through its host), the rank gets None in its place."""
    relay_to = None
    plain = []
    for arg in args:
        if isinstance(arg, RankTask) and arg.supervisor is not None:
            relay_to = arg.supervisor
            arg = replace(arg, supervisor=None)
        plain.append(arg)
    return cloudpickle.dumps((fn, tuple(plain))), relay_to


class RayWorkerGroup:
    """cluster.workers.WorkerGroup (classic) or WarmWorkerGroup (forked ranks) as the attempt loop sees it."""

    def __init__(self, group: WorkerGroup | WarmWorkerGroup, rank_handle=None):
        self.group = group
        self.rank_handle = rank_handle  # where a forked rank's reports go when its args name none

    @property
    def warm(self) -> bool:
        return isinstance(self.group, WarmWorkerGroup)

    def placement(self) -> list[dict]:
        return self.group.placement()

    def run(self, fn, args: tuple) -> list:
        if self.warm:
            payload, relay_to = call_payload(fn, args)
            return [forked_rank_exit(ref) for ref in self.group.run(payload, relay_to or self.rank_handle)]
        return [rank_exit(ref) for ref in self.group.run(fn, [args] * self.group.size)]

    def run_on_rank0(self, fn, *args):
        if self.warm:
            payload, relay_to = call_payload(fn, args)
            return forked_rank_exit(self.group.run_again(0, payload, relay_to or self.rank_handle))
        slot = self.group.slots[0]
        return rank_exit(self.group.actors[slot.worker_index].run.remote(self.group.env_by_rank[0], fn, *args))

    def shutdown(self) -> None:
        self.group.shutdown()


class RayJobCluster:
    """The job's gang on Ray, as the attempt loop needs it (jobrun.JobCluster)."""

    def __init__(self, job_id: str, spec: JobSpec, package_uri: str | None, log, rank_handle):
        self.job_id, self.spec, self.package_uri, self._log = job_id, spec, package_uri, log
        self.rank_handle = rank_handle  # what the ranks push to: the job's SupervisorRef
        self.warm = True  # ranks forked from the nodes' zygotes, until a reason says otherwise

    def _runtime_env(self) -> dict:
        threads = str(max(1, int(self.spec.resources.cpus_per_worker)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **self.spec.env}
        runtime_env = {"env_vars": env}
        if self.package_uri:
            runtime_env["working_dir"] = self.package_uri
        return runtime_env

    def _group(self, pg, warm: bool) -> WorkerGroup | WarmWorkerGroup:
        res = self.spec.resources
        # as many workers as the reservation holds: an elastic job's may be below res.workers
        size = pg.bundle_count * res.colocate
        runtime_env = self._runtime_env()
        if warm:
            return WarmWorkerGroup(pg, size, res.cpus_per_worker, res.gpus_per_worker, runtime_env["env_vars"],
                                   self.package_uri, ZYGOTE_MODULE, colocate=res.colocate)
        return WorkerGroup(pg, size, res.cpus_per_worker, res.gpus_per_worker, runtime_env, colocate=res.colocate)

    async def start_group(self, timeout_s: float) -> RayWorkerGroup | None:
        """Create and lay out the workers; retried while Ray re-places the bundles of a lost node."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        blocker = warm_start_blocker(self._runtime_env()["env_vars"], os.environ.get("TRAINCTL_WARM_START"))
        if blocker is not None and self.warm:
            self._log(f"[trainctl] ranks start as new Ray workers: {blocker}\n")
        self.warm = self.warm and blocker is None
        while True:
            pg = gang.find(self.job_id)
            if pg is None or not await gang.wait_created(pg, max(0.0, deadline - loop.time())):
                return None
            group = self._group(pg, self.warm)
            try:
                await group.start()
                return RayWorkerGroup(group, self.rank_handle)
            except WarmStartUnavailable as exc:
                group.shutdown()
                self._log(f"[trainctl] warm start unavailable, ranks start as new Ray workers: {exc}\n")
                self.warm = False
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError) as exc:
                # A bundle still on a node that just died: Ray has not re-placed it yet.
                group.shutdown()
                self._log(f"[trainctl] worker start failed, retrying: {str(exc).splitlines()[0]}\n")
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(1.0)

    async def resize(self, workers: int, timeout_s: float) -> bool:
        """An elastic job's gang at another size: the old reservation goes, a new one of
        `workers` is made (Ray cannot resize a placement group in place)."""
        res = self.spec.resources
        gang.release(gang.find(self.job_id))
        pg = gang.reserve(self.job_id, workers, res.cpus_per_worker, res.gpus_per_worker, res.placement,
                          res.colocate)
        return await gang.wait_created(pg, timeout_s)

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


class Supervisor:
    """One job's shell on its SupervisorHost: its attempt loop and the task running it. Every
    method is callable through the job's SupervisorRef (`ref.cancel.remote(reason)`)."""

    def __init__(self, job: JobRecord, state_dir: str, rank_handle):
        log_path = Path(state_dir) / "logs" / f"{job.id}.log"
        self.run = JobRun(job, log_path, RayJobCluster(job.id, job.spec, job.package_uri,
                                                       lambda text: self.run._log(text), rank_handle))
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

    async def preempt(self, note: str, by: str | None = None, resize_to: int | None = None) -> bool:
        """Checkpoint just in time, then give the gang back (to the queue, or continue at
        `resize_to` workers); False when there is nothing to preempt (see JobRun.request_preempt)."""
        return self.run.request_preempt(PreemptRequest(note, by, resize_to))

    # ---- called by the ranks -----------------------------------------------------------
    async def push(self, rank: int, events: list) -> dict | None:
        self.run.on_events(rank, events)
        return self.run.rank_command()  # e.g. checkpoint now: the rank's reporter acts on it


# ---- many jobs' supervisors in a few processes -----------------------------------------------
class NotHosted(LookupError):
    """The host holds no such job (it ended and was forgotten, or it was never placed there)."""


@dataclass(frozen=True)
class SupervisorRef:
    """One job's supervisor on its host, called like an actor: `ref.snapshot.remote()`,
    `ref.cancel.remote(reason)`, and by the ranks `ref.push.remote(rank, events)`. Any method of
    `Supervisor` works; the call returns the host's ObjectRef. Picklable (an actor handle and a
    string), so it travels inside the ranks' RankTask."""

    host: Any
    job_id: str

    def __getattr__(self, method: str) -> _BoundCall:
        if method.startswith("_"):  # pickle's and copy's probes, before the fields exist
            raise AttributeError(method)
        return _BoundCall(self.host, self.job_id, method)


@dataclass(frozen=True)
class _BoundCall:
    host: Any
    job_id: str
    method: str

    def remote(self, *args, **kwargs):
        return self.host.call.remote(self.job_id, self.method, *args, **kwargs)


def host_name() -> str:
    # never a dead host's name again: Ray may not have released it yet
    return f"{HOST_PREFIX}{secrets.token_hex(4)}"


@ray.remote(num_cpus=0, max_restarts=0)
class SupervisorHost:
    """Runs many jobs' Supervisors as asyncio tasks in one detached process on the head."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.jobs: dict[str, Supervisor] = {}
        self.me = ray.get_runtime_context().current_actor

    async def start(self, job: JobRecord) -> None:
        """Supervise `job` from its record (idempotent: a job already running here keeps running)."""
        old = self.jobs.get(job.id)
        if old is not None and old._task is not None and not old._task.done():
            return
        sup = self.jobs[job.id] = Supervisor(job, self.state_dir, SupervisorRef(self.me, job.id))
        await sup.start()

    async def call(self, job_id: str, method: str, *args, **kwargs):
        sup = self.jobs.get(job_id)
        if sup is None:
            if method == "push":  # a torn-down rank's last report: nobody is listening
                return None
            raise NotHosted(f"job {job_id} is not supervised by this host")
        result = getattr(sup, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def forget(self, job_id: str) -> None:
        """The controller ended the job: cancel what still runs, drop it."""
        sup = self.jobs.pop(job_id, None)  # first, before any await: a new start() finds it gone
        if sup is not None and sup._task is not None and not sup._task.done():
            await sup.cancel("ended by the controller")

    async def job_ids(self) -> list[str]:
        return list(self.jobs)


class SupervisorHosts:
    """The controller's side: which host supervises which job, and where a new job goes."""

    def __init__(self, state_dir: str, per_host: int = JOBS_PER_HOST):
        self.state_dir, self.per_host = state_dir, per_host
        self.hosts: dict[str, Any] = {}    # host name -> actor handle
        self.host_of: dict[str, str] = {}  # job id -> host name
        # job id -> its host's start() call: until that ran, "not hosted" only means "not yet"
        # (a big record argument is fetched first, so a later small call may overtake it)
        self.starts: dict[str, Any] = {}
        self._discovered = False

    def _discover(self) -> None:
        """Once per controller: the hosts an earlier controller of this session started."""
        if self._discovered:
            return
        self._discovered = True
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != NAMESPACE or not entry["name"].startswith(HOST_PREFIX):
                continue
            try:
                host = ray.get_actor(entry["name"], namespace=NAMESPACE)
                job_ids = ray.get(host.job_ids.remote(), timeout=HOST_QUERY_TIMEOUT_S)
            except (ValueError, ray.exceptions.RayError, TimeoutError):
                log.warning("supervisor host %s did not answer: its jobs count as lost", entry["name"], exc_info=True)
                continue
            self.hosts[entry["name"]] = host
            for job_id in job_ids:
                self.host_of.setdefault(job_id, entry["name"])
        if self.hosts:
            log.info("found %d supervisor hosts holding %d jobs", len(self.hosts), len(self.host_of))

    def start(self, job: JobRecord) -> SupervisorRef:
        """Supervise `job` on a host with room (a new host if none has)."""
        self._discover()
        name = self.host_of.get(job.id)
        if name is None:
            name = pick_host(Counter(self.host_of.values()), list(self.hosts), self.per_host)
        if name is None:
            name = host_name()
            self.hosts[name] = SupervisorHost.options(
                name=name, namespace=NAMESPACE, lifetime="detached",
                resources={HEAD_RESOURCE: 0.001},
            ).remote(self.state_dir)
            log.info("started supervisor host %s", name)
        self.host_of[job.id] = name
        host = self.hosts[name]
        self.starts[job.id] = host.start.remote(job)
        return SupervisorRef(host, job.id)

    def find(self, job_id: str) -> SupervisorRef | None:
        self._discover()
        name = self.host_of.get(job_id)
        return None if name is None else SupervisorRef(self.hosts[name], job_id)

    def lost(self, job_id: str, not_hosted: bool = False) -> bool:
        """After a call to the job's supervisor failed: is it gone? Its host may only be slow
        (then the job stays where it is); a dead host (max_restarts=0) takes every job it held:
        each is found lost when the controller next follows it. `not_hosted`: the host answered
        that it has no such job."""
        name = self.host_of.get(job_id)
        if name is None:
            return True
        if not_hosted:
            start = self.starts.get(job_id)
            if start is not None and not ray.wait([start], timeout=0)[0]:
                return False  # the host has not run start() yet
            del self.host_of[job_id]
            self.starts.pop(job_id, None)
            return True
        try:
            ray.get_actor(name, namespace=NAMESPACE)
            return False  # alive: a slow answer, not a lost supervisor
        except ValueError:
            pass
        log.warning("supervisor host %s is gone with its jobs", name)
        self.hosts.pop(name, None)
        for other in [j for j, n in self.host_of.items() if n == name]:
            del self.host_of[other]
            self.starts.pop(other, None)
        return True

    def forget(self, job_id: str) -> None:
        """The job ended: its host drops it; a host left empty goes too unless it is the last."""
        name = self.host_of.pop(job_id, None)
        self.starts.pop(job_id, None)
        if name is None or name not in self.hosts:
            return
        host = self.hosts[name]
        host.forget.remote(job_id)
        if name not in self.host_of.values() and len(self.hosts) > 1:
            del self.hosts[name]
            # after the forget (calls from one caller run in order): a clean exit
            host.__ray_terminate__.remote()


def pick_host(load: Counter, hosts: list[str], per_host: int) -> str | None:
    """The fullest host that still has room: jobs pack into few processes (None: all full)."""
    room = [h for h in hosts if load.get(h, 0) < per_host]
    return max(room, key=lambda h: (load.get(h, 0), h), default=None)
