"""The controller: one detached, named actor per cluster, pinned to the head node.

It owns the job table (a durable store outside Ray, see store.py), admits queued jobs
when their whole gang fits, starts one supervisor per admitted job and mirrors the
supervisors' state into the table. Killed and recreated, it reloads the table and
reattaches to the supervisors that kept running (they are detached too). After the whole
head restarted (a new Ray session: no supervisor, no placement group is left), every job
that held resources goes back to the queue and resumes from its last committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from pathlib import Path

import ray

from cluster import gang, inventory, packaging
from cluster.connect import NAMESPACE

from ..errors import JobNotFound, UserError
from ..monitoring.exporter import start_exporter
from ..monitoring.metrics import exporter_options
from ..monitoring.telemetry import health
from ..spec import JobSpec
from .failure import Decision, Failure, FailureKind, counted_restarts, decide
from .record import JobRecord, RestartRecord, RunSnapshot
from .scheduler import Demand, NodeFree, QueuedJob, plan
from .states import JobState
from .store import JobStore, StateLocation
from .supervisor import create_supervisor, supervisor_name

log = logging.getLogger(__name__)

CONTROLLER_NAME = "trainctl-controller"
LOOP_INTERVAL_S = 0.5  # a submit wakes it at once; this paces the polling of supervisors
ADMISSION_TIMEOUT_S = 10.0  # a reservation that Ray cannot place this fast goes back in the queue


def state_location() -> StateLocation:
    """`TRAINCTL_STATE` on the head (a directory or a PostgreSQL URL; `trainctl cluster up` sets
    it), else Ray's session directory: an embedded Ray that lives for one `trainctl run`."""
    if os.environ.get("TRAINCTL_STATE"):
        return StateLocation.parse(os.environ["TRAINCTL_STATE"])
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    return StateLocation.parse(str(Path(session) / "trainctl"))


def _session_name() -> str:
    """This Ray cluster's lifetime: a head restart starts a new session."""
    return ray._private.worker.global_worker.node.session_name


def _demand(spec: JobSpec) -> Demand:
    r = spec.resources  # a colocated group of workers is placed like one big worker
    c = r.colocate
    return Demand(r.workers // c, r.cpus_per_worker * c, r.gpus_per_worker * c, r.placement, group=c)


def _new_job_id(name: str) -> str:
    return f"{name[:40]}-{secrets.token_hex(3)}"


@ray.remote(num_cpus=0, max_restarts=-1)
class Controller:
    def __init__(self, starvation_s: float = 600.0, metrics: dict | None = None):
        self.location = state_location()
        self.state_dir = self.location.files  # job logs (and SQLite's jobs.db)
        self.store = JobStore(self.location)
        self.session = _session_name()
        self.jobs: dict[str, JobRecord] = {job.id: job for job in self.store.all()}
        self.supervisors: dict[str, object] = {}
        self.tick_seconds: deque[float] = deque(maxlen=200)  # recent scheduling ticks, for ping()
        self._requeue_after_head_restart()
        self.starvation_s = starvation_s
        self._loop: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # /metrics on 127.0.0.1 (options: metrics.exporter_options, from the creator's environment)
        self.exporter = start_exporter(lambda: list(self.jobs.values()), metrics)
        self._nodes_at = 0.0

    # ---- API used by the client ----------------------------------------------------------
    async def ping(self) -> dict:
        self._ensure_loop()
        ticks = sorted(self.tick_seconds)
        return {"state": self.location.describe(), "state_dir": str(self.state_dir),
                "jobs": len(self.jobs), "pid": os.getpid(), "metrics": self.exporter.endpoint,
                "tick_p50_s": ticks[len(ticks) // 2] if ticks else None,
                "tick_max_s": ticks[-1] if ticks else None}

    async def metrics_endpoint(self) -> str | None:
        """The URL Prometheus scrapes (None: metrics switched off)."""
        self._ensure_loop()
        return self.exporter.endpoint

    async def submit(self, spec: dict, package: tuple[str, bytes] | None = None,
                     priority: int | None = None) -> dict:
        self._ensure_loop()
        parsed = JobSpec.model_validate(spec)
        job_id = _new_job_id(parsed.name)
        package_uri = None
        if package is not None:
            package_uri, data = package
            self.store.put_package(package_uri, data)
        now = time.time()
        job = JobRecord(
            id=job_id, name=parsed.name, spec=parsed, state=JobState.PENDING,
            priority=parsed.priority if priority is None else priority, submitted_at=now,
            history=[{"state": JobState.PENDING, "at": now}], package_uri=package_uri,
            checkpoint_root=str(Path(parsed.checkpoint.storage) / job_id),
            log_path=str(self.state_dir / "logs" / f"{job_id}.log"),
        )
        self._set_state(job, JobState.QUEUED)
        self._wake.set()
        return job.to_json()

    async def list_jobs(self, states: list[str] | None = None, ended_since: float | None = None,
                        limit: int | None = None) -> list[dict]:
        """Summaries (JobRecord.summary), oldest first: only `states` if given, finished jobs only
        if they ended at or after `ended_since`, and of those the newest `limit`."""
        self._ensure_loop()
        picked = []
        for job in self.jobs.values():
            if states and job.state.value not in states:
                continue
            if ended_since is not None and job.state.terminal and (job.ended_at or job.submitted_at) < ended_since:
                continue
            picked.append(job)
        picked.sort(key=lambda j: j.submitted_at)
        if limit is not None:
            picked = picked[-limit:] if limit > 0 else []
        return [(j if j.state.terminal else self._with_health(j)).summary() for j in picked]

    async def get_job(self, job_id: str) -> dict:
        self._ensure_loop()
        return self._with_health(self._job(job_id)).to_json()

    async def cancel(self, job_id: str) -> dict:
        self._ensure_loop()
        job = self._job(job_id)
        if job.state.terminal:
            raise UserError(f"job {job_id} already ended ({job.state.value}); nothing to cancel")
        sup = self._supervisor(job_id)
        if sup is not None:
            try:
                self._merge(job, await sup.cancel.remote())
            except ray.exceptions.RayActorError:
                pass
        if not job.state.terminal:
            self._set_state(job, JobState.CANCELLED, "cancelled by user")
        self._finish(job)
        return job.to_json()

    async def read_logs(self, job_id: str, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[str, int]:
        self._ensure_loop()
        path = Path(self._job(job_id).log_path)
        if not path.exists():
            return "", offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(max_bytes)
        # hand out whole lines only, so a follower never splits one
        cut = data.rfind(b"\n") + 1
        return data[:cut].decode(errors="replace"), offset + cut

    # ---- the loop ------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run_forever())

    async def _run_forever(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await self._tick()
                self.tick_seconds.append(time.perf_counter() - started)
            except Exception:  # keep scheduling whatever one job did
                log.exception("controller tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), LOOP_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def _tick(self) -> None:
        for job in list(self.jobs.values()):
            if job.state.holds_resources:
                await self._follow(job)
        await self._schedule()
        if time.time() - self._nodes_at > 2.0:  # the exporter's node inventory; stale series out
            self._nodes_at = time.time()
            self.exporter.nodes = inventory.nodes()
            self.exporter.prune()

    async def _follow(self, job: JobRecord) -> None:
        sup = self._supervisor(job.id)
        if sup is None:
            await self._supervisor_lost(job)
            return
        try:
            snap = await asyncio.wait_for(sup.snapshot.remote(), timeout=10)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            self.supervisors.pop(job.id, None)
            if self._supervisor(job.id) is None:
                await self._supervisor_lost(job)
            return
        self._merge(job, snap)
        if job.state.terminal:
            self._finish(job)

    async def _supervisor_lost(self, job: JobRecord) -> None:
        """The supervisor died with the job unfinished: a new one resumes from the checkpoint."""
        lost = Failure(FailureKind.SUPERVISOR_LOST, None, "the job's supervisor was lost")
        decision = decide(lost, counted_restarts(job.restarts), job.spec.failure.max_restarts)
        log.warning("job %s: %s -> %s", job.id, lost.message, decision.value)
        if decision is Decision.FAIL:
            job.error = "the job's supervisor was lost and no restarts are left"
            self._set_state(job, JobState.FAILED, job.error)
            self._finish(job)
            return
        job.restarts.append(RestartRecord(at=time.time(), attempt=len(job.restarts), cause="supervisor lost",
                                          kind=lost.kind.value))
        if job.state is not JobState.RESTARTING:
            self._set_state(job, JobState.RESTARTING, "supervisor lost")
        self._start_supervisor(job)

    def _merge(self, job: JobRecord, snap: RunSnapshot) -> None:
        self.exporter.observe(job, snap)  # the supervisor's telemetry, for /metrics
        if job.absorb(snap):  # else nothing new: no store write (this runs twice a second per job)
            self.store.put(job)

    def _finish(self, job: JobRecord) -> None:
        """Release everything a finished job held (idempotent)."""
        if job.ended_at is None:
            job.ended_at = time.time()
        sup = self._supervisor(job.id)
        if sup is not None:
            ray.kill(sup, no_restart=True)
        self.supervisors.pop(job.id, None)
        gang.release(gang.find(job.id))
        self._with_health(job)  # its last health signals stay with the record
        self.store.put(job)

    async def _schedule(self) -> None:
        queued = [j for j in self.jobs.values() if j.state is JobState.QUEUED]
        if not queued:
            return
        nodes = inventory.nodes()
        free = [NodeFree(n.free_cpus, n.free_gpus) for n in nodes]
        total = [NodeFree(n.cpus, n.gpus) for n in nodes]
        candidates = [QueuedJob(j.id, j.priority, j.submitted_at, _demand(j.spec)) for j in queued]
        decision = plan(candidates, free, total, time.time(), self.starvation_s)
        for job_id, reason in decision.unschedulable.items():
            job = self.jobs[job_id]
            if job.spec.failure.unschedulable == "fail":
                job.error = f"unschedulable: {reason}"
                self._set_state(job, JobState.FAILED, job.error)
            else:
                self._set_queue_reason(job, reason)
        for job_id, reason in decision.waiting.items():
            self._set_queue_reason(self.jobs[job_id], reason)
        for job_id in decision.start:
            await self._admit(self.jobs[job_id])

    def _set_queue_reason(self, job: JobRecord, reason: str | None) -> None:
        if job.queue_reason != reason:
            job.queue_reason = reason
            self.store.put(job)

    async def _admit(self, job: JobRecord) -> None:
        r = job.spec.resources
        gang.release(gang.find(job.id))  # left over if a controller died mid-admission
        pg = gang.reserve(job.id, r.workers, r.cpus_per_worker, r.gpus_per_worker, r.placement, r.colocate)
        if not await gang.wait_created(pg, ADMISSION_TIMEOUT_S):
            gang.release(pg)
            self._set_queue_reason(job, "waiting for resources (in use outside trainctl)")
            return
        job.queue_reason = None
        job.started_at = time.time()
        job.session = self.session
        self._set_state(job, JobState.STARTING)
        self._start_supervisor(job)

    def _start_supervisor(self, job: JobRecord) -> None:
        if job.package_uri:
            packaging.ensure_uploaded(job.package_uri, lambda: self.store.get_package(job.package_uri))
        sup = create_supervisor(job, str(self.state_dir))
        self.supervisors[job.id] = sup
        sup.start.remote()

    def _requeue_after_head_restart(self) -> None:
        """Jobs admitted in an earlier Ray session lost their workers, supervisor and
        reservation with that head: back to the queue, to resume from the last checkpoint.
        (A controller restarted inside the same session reattaches to its supervisors.)"""
        for job in self.jobs.values():
            if not job.state.holds_resources or job.session == self.session:
                continue
            was = job.state.value
            job.restarts.append(RestartRecord(at=time.time(), attempt=len(job.restarts), cause="the head restarted",
                                              kind=FailureKind.HEAD_RESTARTED.value))
            if job.state is not JobState.RESTARTING:
                self._set_state(job, JobState.RESTARTING, "the head restarted")
            job.placement = []
            self._set_state(job, JobState.QUEUED, "waiting for resources after the head restarted")
            log.info("job %s was %s when the head restarted: queued again", job.id, was)

    # ---- helpers -------------------------------------------------------------------------
    def _job(self, job_id: str) -> JobRecord:
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self.jobs[job_id]

    def _with_health(self, job: JobRecord) -> JobRecord:
        """The health signals status/top show (from the same telemetry as /metrics)."""
        if job.id in self.exporter.telemetry or not job.health:
            job.health = health(job, self.exporter.telemetry.get(job.id), time.time())
        return job

    def _supervisor(self, job_id: str):
        if job_id in self.supervisors:
            return self.supervisors[job_id]
        try:
            sup = ray.get_actor(supervisor_name(job_id), namespace=NAMESPACE)
        except ValueError:
            return None
        self.supervisors[job_id] = sup
        return sup

    def _set_state(self, job: JobRecord, new: JobState, note: str = "") -> None:
        job.set_state(new, note)
        self.jobs[job.id] = job
        self.store.put(job)
        if new.terminal:
            self._log(job, f"[trainctl] {new.value}{': ' + note if note else ''}\n")

    def _log(self, job: JobRecord, text: str) -> None:
        path = Path(job.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)


def get_or_create_controller():
    """The cluster's controller, created on first use (and re-created after it was killed)."""
    head = {inventory.HEAD_RESOURCE: 0.001}
    return Controller.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, resources=head,
    ).remote(metrics=exporter_options())


def metrics_endpoint(timeout_s: float = 60.0) -> str | None:
    """The controller's /metrics URL (the controller is started if it was not yet)."""
    return ray.get(get_or_create_controller().metrics_endpoint.remote(), timeout=timeout_s)
