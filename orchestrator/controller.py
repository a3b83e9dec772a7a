"""The controller: one detached, named actor per cluster, pinned to the head node.

It owns the job table (SQLite on the head node), admits queued jobs when their whole
gang fits, starts one supervisor per admitted job and mirrors the supervisors'
state into the table. Killed and recreated, it reloads the table and reattaches to
the supervisors that kept running (they are detached too).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

import ray

from cluster import gang, inventory, packaging
from cluster.connect import NAMESPACE

from .errors import JobNotFound, UserError
from .exporter import start_exporter
from .jobstore import JobStore
from .metrics import exporter_options
from .scheduler import Demand, NodeFree, QueuedJob, plan
from .spec import JobSpec
from .states import JobState, check_transition
from .supervisor import create_supervisor, supervisor_name
from .telemetry import health

CONTROLLER_NAME = "trainctl-controller"
LOOP_INTERVAL_S = 0.5  # a submit wakes it at once; this paces the polling of supervisors
ADMISSION_TIMEOUT_S = 10.0  # a reservation that Ray cannot place this fast goes back in the queue


def default_state_dir() -> Path:
    if os.environ.get("TRAINCTL_STATE_DIR"):
        return Path(os.environ["TRAINCTL_STATE_DIR"])
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    return Path(session) / "trainctl"


def _demand(spec: JobSpec) -> Demand:
    r = spec.resources  # a colocated group of workers is placed like one big worker
    c = r.colocate
    return Demand(r.workers // c, r.cpus_per_worker * c, r.gpus_per_worker * c, r.placement, group=c)


def _new_job_id(name: str) -> str:
    return f"{name[:40]}-{secrets.token_hex(3)}"


@ray.remote(num_cpus=0, max_restarts=-1)
class Controller:
    def __init__(self, state_dir: str | None = None, starvation_s: float = 600.0,
                 metrics: dict | None = None):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        (self.state_dir / "packages").mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.state_dir / "jobs.db")
        self.jobs: dict[str, dict] = {job["id"]: job for job in self.store.all()}
        self.supervisors: dict[str, object] = {}
        self.starvation_s = starvation_s
        self._loop: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # /metrics on 127.0.0.1 (options: metrics.exporter_options, from the creator's environment)
        self.exporter = start_exporter(lambda: list(self.jobs.values()), metrics)
        self._nodes_at = 0.0

    # ---- API used by the client ----------------------------------------------------------
    async def ping(self) -> dict:
        self._ensure_loop()
        return {"state_dir": str(self.state_dir), "jobs": len(self.jobs), "pid": os.getpid(),
                "metrics": self.exporter.endpoint}

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
            target = self._package_path(package_uri)
            if not target.exists():
                target.write_bytes(data)
        now = time.time()
        job = {
            "id": job_id, "name": parsed.name, "spec": spec, "state": JobState.PENDING.value,
            "priority": parsed.priority if priority is None else priority, "submitted_at": now,
            "history": [{"state": JobState.PENDING.value, "at": now, "note": ""}],
            "placement": [], "restarts": [], "metrics": {}, "progress": {}, "checkpoint": None,
            "error": None, "queue_reason": None, "package_uri": package_uri,
            "checkpoint_root": str(Path(parsed.checkpoint.storage) / job_id),
            "log_path": str(self.state_dir / "logs" / f"{job_id}.log"),
        }
        self._set_state(job, JobState.QUEUED)
        self._wake.set()
        return job

    async def list_jobs(self) -> list[dict]:
        self._ensure_loop()
        return sorted((self._with_health(j) for j in self.jobs.values()), key=lambda j: j["submitted_at"])

    async def get_job(self, job_id: str) -> dict:
        self._ensure_loop()
        if job_id not in self.jobs:
            raise JobNotFound(job_id)
        return self._with_health(self.jobs[job_id])

    async def cancel(self, job_id: str) -> dict:
        job = await self.get_job(job_id)
        state = JobState(job["state"])
        if state.terminal:
            raise UserError(f"job {job_id} already ended ({state.value}); nothing to cancel")
        sup = self._supervisor(job_id)
        if sup is not None:
            try:
                self._merge(job, await sup.cancel.remote())
            except ray.exceptions.RayActorError:
                pass
        if not JobState(job["state"]).terminal:
            self._set_state(job, JobState.CANCELLED, "cancelled by user")
        self._finish(job)
        return job

    async def read_logs(self, job_id: str, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[str, int]:
        job = await self.get_job(job_id)
        path = Path(job["log_path"])
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
            try:
                await self._tick()
            except Exception as exc:  # keep scheduling whatever one job did
                print(f"[trainctl controller] tick failed: {type(exc).__name__}: {exc}")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), LOOP_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def _tick(self) -> None:
        for job in list(self.jobs.values()):
            if JobState(job["state"]).holds_resources:
                await self._follow(job)
        await self._schedule()
        if time.time() - self._nodes_at > 2.0:  # the exporter's node inventory; stale series out
            self._nodes_at = time.time()
            self.exporter.nodes = inventory.nodes()
            self.exporter.prune()

    async def _follow(self, job: dict) -> None:
        sup = self._supervisor(job["id"])
        if sup is None:
            await self._supervisor_lost(job)
            return
        try:
            snap = await asyncio.wait_for(sup.snapshot.remote(), timeout=10)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            self.supervisors.pop(job["id"], None)
            if self._supervisor(job["id"]) is None:
                await self._supervisor_lost(job)
            return
        self._merge(job, snap)
        if JobState(job["state"]).terminal:
            self._finish(job)

    async def _supervisor_lost(self, job: dict) -> None:
        """The supervisor died with the job unfinished: a new one resumes from the checkpoint."""
        restarts = job.get("restarts", [])
        if len(restarts) >= JobSpec.model_validate(job["spec"]).failure.max_restarts:
            job["error"] = "the job's supervisor was lost and no restarts are left"
            self._set_state(job, JobState.FAILED, job["error"])
            self._finish(job)
            return
        restarts.append({"at": time.time(), "attempt": len(restarts), "cause": "supervisor lost",
                         "kind": "supervisor_lost", "from_checkpoint": None})
        job["restarts"] = restarts
        if job["state"] != JobState.RESTARTING.value:
            self._set_state(job, JobState.RESTARTING, "supervisor lost")
        self._start_supervisor(job)

    def _merge(self, job: dict, snap: dict) -> None:
        self.exporter.observe(job, snap)  # the supervisor's telemetry, for /metrics
        keys = ("state", "history", "restarts", "placement", "checkpoint", "error",
                "metrics", "progress", "attempt", "post_training")
        if all(job.get(k) == snap.get(k) for k in keys):
            return  # nothing new: no SQLite write (this runs twice a second per job)
        for key in keys:
            job[key] = snap.get(key)
        self.store.put(job)

    def _finish(self, job: dict) -> None:
        """Release everything a finished job held (idempotent)."""
        job.setdefault("ended_at", time.time())
        sup = self._supervisor(job["id"])
        if sup is not None:
            ray.kill(sup, no_restart=True)
        self.supervisors.pop(job["id"], None)
        gang.release(gang.find(job["id"]))
        self._with_health(job)  # its last health signals stay with the record
        self.store.put(job)

    async def _schedule(self) -> None:
        queued = [j for j in self.jobs.values() if j["state"] == JobState.QUEUED.value]
        if not queued:
            return
        nodes = inventory.nodes()
        free = [NodeFree(n.free_cpus, n.free_gpus) for n in nodes]
        total = [NodeFree(n.cpus, n.gpus) for n in nodes]
        candidates = [
            QueuedJob(j["id"], j["priority"], j["submitted_at"],
                      _demand(JobSpec.model_validate(j["spec"])))
            for j in queued
        ]
        decision = plan(candidates, free, total, time.time(), self.starvation_s)
        for job_id, reason in decision.unschedulable.items():
            job = self.jobs[job_id]
            if JobSpec.model_validate(job["spec"]).failure.unschedulable == "fail":
                job["error"] = f"unschedulable: {reason}"
                self._set_state(job, JobState.FAILED, job["error"])
            elif job.get("queue_reason") != reason:
                job["queue_reason"] = reason
                self.store.put(job)
        for job_id, reason in decision.waiting.items():
            job = self.jobs[job_id]
            if job.get("queue_reason") != reason:
                job["queue_reason"] = reason
                self.store.put(job)
        for job_id in decision.start:
            await self._admit(self.jobs[job_id])

    async def _admit(self, job: dict) -> None:
        spec = JobSpec.model_validate(job["spec"])
        r = spec.resources
        gang.release(gang.find(job["id"]))  # left over if a controller died mid-admission
        pg = gang.reserve(job["id"], r.workers, r.cpus_per_worker, r.gpus_per_worker, r.placement, r.colocate)
        if not await gang.wait_created(pg, ADMISSION_TIMEOUT_S):
            gang.release(pg)
            job["queue_reason"] = "waiting for resources (in use outside trainctl)"
            self.store.put(job)
            return
        job["queue_reason"] = None
        job["started_at"] = time.time()
        self._set_state(job, JobState.STARTING)
        self._start_supervisor(job)

    def _start_supervisor(self, job: dict) -> None:
        if job.get("package_uri"):
            packaging.ensure_uploaded(job["package_uri"], self._package_path(job["package_uri"]))
        sup = create_supervisor(job, str(self.state_dir))
        self.supervisors[job["id"]] = sup
        sup.start.remote()

    # ---- helpers -------------------------------------------------------------------------
    def _package_path(self, uri: str) -> Path:
        return self.state_dir / "packages" / uri.split("://", 1)[-1]

    def _with_health(self, job: dict) -> dict:
        """The health signals status/top show (from the same telemetry as /metrics)."""
        if job["id"] in self.exporter.telemetry or not job.get("health"):
            job["health"] = health(job, self.exporter.telemetry.get(job["id"]), time.time())
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

    def _set_state(self, job: dict, new: JobState, note: str = "") -> None:
        check_transition(JobState(job["state"]), new)
        job["state"] = new.value
        job["history"].append({"state": new.value, "at": time.time(), "note": note})
        self.jobs[job["id"]] = job
        self.store.put(job)
        if new.terminal:
            self._log(job, f"[trainctl] {new.value}{': ' + note if note else ''}\n")

    def _log(self, job: dict, text: str) -> None:
        path = Path(job["log_path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)


def get_or_create_controller():
    """The cluster's controller, created on first use (and re-created after it was killed)."""
    head = {inventory.HEAD_RESOURCE: 0.001}
    return Controller.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, resources=head,
    ).remote(os.environ.get("TRAINCTL_STATE_DIR"), metrics=exporter_options())


def metrics_endpoint(timeout_s: float = 60.0) -> str | None:
    """The controller's /metrics URL (the controller is started if it was not yet)."""
    return ray.get(get_or_create_controller().metrics_endpoint.remote(), timeout=timeout_s)
