"""The controller: one detached, named actor per cluster, pinned to the head node.

It owns the job table (a durable store outside Ray, see store.py), admits queued jobs
when their whole gang fits, starts one supervisor per admitted job and mirrors the
supervisors' state into the table. Killed and recreated, it reloads the table (with the
nodes it cordoned and the preemptions it asked for) and reattaches to the supervisors that
kept running (they are detached too). After the whole head restarted (a new Ray session: no
supervisor, no placement group is left), every job that held resources goes back to the
queue and resumes from its last committed checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import secrets
import time
from collections import deque
from pathlib import Path

import ray

from cluster import drain, gang, inventory, packaging
from cluster.connect import NAMESPACE

from ..errors import JobNotFound, UserError
from ..monitoring.exporter import start_exporter
from ..monitoring.metrics import exporter_options
from ..monitoring.telemetry import health
from ..spec import JobSpec
from ..sweep.record import StopTrial, SubmitPostTraining, SubmitTrial
from ..sweep.service import SweepService, trial_job
from . import planning
from . import queues as queue_rules
from .elastic import allowed_sizes
from .failure import Decision, Failure, FailureKind, counted_restarts, decide
from .http_api import start_api
from .preemption import largest_size
from .record import JobRecord, RestartRecord, RunSnapshot
from .scheduler import Preemption, plan
from .states import JobState
from .store import JobStore, StateLocation
from .supervisor import NotHosted, SupervisorHosts

log = logging.getLogger(__name__)

CONTROLLER_NAME = "trainctl-controller"
LOOP_INTERVAL_S = 0.5  # a submit wakes it at once; this paces the polling of supervisors
ADMISSION_TIMEOUT_S = 10.0  # a reservation that Ray cannot place this fast goes back in the queue
GROW_COOLDOWN_S = 300.0  # an elastic job grows at most once per this many seconds (see grow_cooldown_s)


def grow_cooldown_s() -> float | None:
    """`TRAINCTL_GROW_COOLDOWN_S` in this process's environment (None: not set). Read where the
    controller is created and, if it is not set there, in the controller's own process (the head's
    environment: `TRAINCTL_GROW_COOLDOWN_S=60 trainctl cluster up`).

    Read when called, never at import: Ray ships this actor class pickled by value, and with it
    the module globals its methods use, as the creating process had them when it imported this
    module (a value read from the environment at import reached the controller from there, not
    from the head, and not as set later, e.g. by a test fixture)."""
    value = os.environ.get("TRAINCTL_GROW_COOLDOWN_S", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise UserError(f"TRAINCTL_GROW_COOLDOWN_S={value!r} is not a number of seconds >= 0; "
                        "set it like TRAINCTL_GROW_COOLDOWN_S=300, or unset it for the default")
    return seconds


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


def _new_job_id(name: str) -> str:
    return f"{name[:40]}-{secrets.token_hex(3)}"


@ray.remote(num_cpus=0, max_restarts=-1)
class Controller:
    def __init__(self, starvation_s: float = 600.0, metrics: dict | None = None,
                 grow_cooldown: float | None = None):
        self.location = state_location()
        self.state_dir = self.location.files  # job logs (and SQLite's jobs.db)
        self.store = JobStore(self.location)
        self.session = _session_name()
        self.jobs: dict[str, JobRecord] = {job.id: job for job in self.store.all()}
        self.hosts = SupervisorHosts(str(self.state_dir))  # the jobs' supervisors, many per process
        self.tick_seconds: deque[float] = deque(maxlen=200)  # recent scheduling ticks, for ping()
        self._requeue_after_head_restart()
        self.starvation_s = starvation_s
        # given by the creator (its TRAINCTL_GROW_COOLDOWN_S), else the head's, else the default
        self.grow_cooldown_s = next(s for s in (grow_cooldown, grow_cooldown_s(), GROW_COOLDOWN_S) if s is not None)
        self.queues = self.store.get_queues()  # trainctl queue create|set; `default` is implicit
        self._sizes: dict[str, tuple[int, ...]] = {}  # elastic jobs' allowed sizes (elastic.py), per job
        self._asked_preemptions: dict[str, Preemption] = {}  # victim -> what it was asked, while PREEMPTING
        # nodes nothing new goes to and whose jobs move off: `trainctl cluster drain`, and Ray's
        # own draining nodes (a spot instance's notice), read every few seconds
        self.draining: set[str] = set()
        self._recover_scheduling_state({n.node_id for n in inventory.nodes()})
        self._loop: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # /metrics on 127.0.0.1 (options: metrics.exporter_options, from the creator's environment)
        self.exporter = start_exporter(lambda: list(self.jobs.values()), metrics)
        # the read verbs' JSON API, on the same host; published in state_dir/api.json (http_api.py)
        self.api = start_api(self, self.state_dir, self.exporter.host, ray.get_runtime_context().gcs_address)
        self._nodes_at = 0.0
        # sweeps (orchestrator/sweep): their records and Optuna studies in the job store's database
        self.sweeps = SweepService(self.location.url)

    # ---- API used by the client ----------------------------------------------------------
    async def ping(self) -> dict:
        self._ensure_loop()
        ticks = sorted(self.tick_seconds)
        return {"state": self.location.describe(), "state_dir": str(self.state_dir),
                "jobs": len(self.jobs), "pid": os.getpid(), "metrics": self.exporter.endpoint,
                "api": self.api.url if self.api else None,
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
        queue_rules.check_submit(self.queues, parsed.queue)  # before anything is stored
        return self._new_job(parsed, self._put_package(package), priority).to_json()

    def _put_package(self, package: tuple[str, bytes] | None) -> str | None:
        if package is None:
            return None
        package_uri, data = package
        self.store.put_package(package_uri, data)
        return package_uri

    def _new_job(self, parsed: JobSpec, package_uri: str | None, priority: int | None = None) -> JobRecord:
        """A queued job (from a client, or a sweep's trial)."""
        job_id = _new_job_id(parsed.name)
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
        return job

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

    async def cancel(self, job_id: str, reason: str = "cancelled by user") -> dict:
        self._ensure_loop()
        job = self._job(job_id)
        if job.state.terminal:
            raise UserError(f"job {job_id} already ended ({job.state.value}); nothing to cancel")
        sup = self._supervisor(job_id)
        if sup is not None:
            try:
                self._merge(job, await sup.cancel.remote(reason))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                pass  # its host is gone, or no longer has it: nothing runs to cancel
        if not job.state.terminal:
            self._set_state(job, JobState.CANCELLED, reason)
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

    # ---- queues (control/queues.py checks every value; the store keeps them) ------------------
    async def create_queue(self, name: str, cpus: float | None = None, gpus: float | None = None,
                           weight: float = 1.0, borrow: bool = True) -> dict:
        self._ensure_loop()
        return self._keep_queue(queue_rules.new_queue(self.queues, name, cpus, gpus, weight, borrow))

    async def set_queue(self, name: str, changes: dict) -> dict:
        """`changes`: only the fields given (cpus, gpus, weight, borrow); None for cpus/gpus: no quota."""
        self._ensure_loop()
        unknown = set(changes) - {"cpus", "gpus", "weight", "borrow"}
        if unknown:
            raise UserError(f"queue set: unknown field {sorted(unknown)[0]!r} (cpus, gpus, weight, borrow)")
        return self._keep_queue(queue_rules.changed_queue(self.queues, name, **changes))

    async def list_queues(self) -> list[dict]:
        self._ensure_loop()
        return queue_rules.describe(self.queues, self.jobs.values())

    async def delete_queue(self, name: str) -> dict:
        self._ensure_loop()
        queue_rules.check_delete(self.queues, self.jobs.values(), name)
        self.store.delete_queue(name)
        gone = self.queues.pop(name)
        return dataclasses.asdict(gone)

    def _keep_queue(self, queue) -> dict:
        self.store.put_queue(queue)
        self.queues[queue.name] = queue
        self._wake.set()  # a larger quota may admit a job now
        return dataclasses.asdict(queue)

    # ---- sweeps: trials are ordinary jobs, decided by each sweep's driver (orchestrator/sweep) --
    async def submit_sweep(self, spec: dict, base: dict, package: tuple[str, bytes] | None = None) -> dict:
        self._ensure_loop()
        record = self.sweeps.create(spec, base, self._put_package(package))
        await self._sweep_tick()
        return record.summary()

    async def sweep_status(self, sweep: str) -> dict:
        self._ensure_loop()
        return self.sweeps.status(sweep)

    async def list_sweeps(self) -> list[dict]:
        self._ensure_loop()
        return self.sweeps.list()

    async def cancel_sweep(self, sweep: str) -> dict:
        self._ensure_loop()
        record, actions = self.sweeps.cancel(sweep)
        await self._sweep_actions(actions)
        return record.summary()

    async def _sweep_tick(self) -> None:
        names = self.sweeps.trial_names()
        trials = {job.name: trial_job(job) for job in self.jobs.values() if job.name in names}
        await self._sweep_actions(self.sweeps.tick(trials))

    async def _sweep_actions(self, actions: list) -> None:
        for action in actions:
            try:
                if isinstance(action, SubmitTrial):
                    record = self.sweeps.records[action.sweep_id]
                    if record.trial(action.number).job_id is not None:
                        continue  # a tick that ran while this one awaited created it already
                    job = self._new_job(JobSpec.model_validate(action.spec), record.package_uri)
                    self.sweeps.submitted(action.sweep_id, action.number, job.id)
                elif isinstance(action, SubmitPostTraining):  # the passes on the best trial's checkpoint
                    record = self.sweeps.records[action.sweep_id]
                    if record.post_training.job_id is None:
                        job = self._new_job(JobSpec.model_validate(action.spec), record.package_uri)
                        self.sweeps.submitted(action.sweep_id, None, job.id)
                elif isinstance(action, StopTrial):  # pruned: ends STOPPED, its gang freed at once
                    sup = self._supervisor(action.job_id)
                    if sup is not None:
                        await sup.end.remote(JobState.STOPPED.value, action.note)
                elif not self._job(action.job_id).state.terminal:  # CancelTrial
                    await self.cancel(action.job_id, action.note)
            except Exception:  # one trial's trouble must not stop the others' sweep
                log.exception("sweep action %s failed", action)

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
        if self.sweeps.active:  # before scheduling: a trial it submits can start this tick
            await self._sweep_tick()
        await self._schedule()
        if time.time() - self._nodes_at > 2.0:  # the exporter's node inventory; stale series out
            self._nodes_at = time.time()
            self.exporter.nodes = inventory.nodes()
            self.exporter.prune()
            self._uncordon_gone({n.node_id for n in self.exporter.nodes})
            await self._move_off_draining()

    async def _follow(self, job: JobRecord) -> None:
        sup = self._supervisor(job.id)
        if sup is None:
            await self._supervisor_lost(job)
            return
        try:
            snap = await asyncio.wait_for(sup.snapshot.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, asyncio.TimeoutError) as exc:
            if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc.cause, NotHosted):
                raise  # a bug in snapshot: the tick logs it
            if self.hosts.lost(job.id, not_hosted=isinstance(exc, ray.exceptions.RayTaskError)):
                await self._supervisor_lost(job)
            return
        self._merge(job, snap)
        if job.state.terminal:
            self._finish(job)
        elif job.state is JobState.QUEUED:
            self._requeued(job)

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
        self.hosts.forget(job.id)
        gang.release(gang.find(job.id))
        self._with_health(job)  # its last health signals stay with the record
        self.store.put(job)

    async def _schedule(self) -> None:
        """One pass of the pure scheduler (scheduler.plan) over every job, then act on its plan:
        starts at their sizes, waiting reasons, preemptions (PREEMPT's _preempt), growth."""
        jobs = [j for j in self.jobs.values() if not j.state.terminal]
        self._forget_answered_preemptions()
        growable = any(j.state is JobState.RUNNING and self._job_sizes(j) and
                       (j.workers or j.spec.resources.workers) < j.spec.resources.workers for j in jobs)
        if not growable and not any(j.state is JobState.QUEUED for j in jobs):
            return
        given = planning.inputs(jobs, inventory.nodes(), self.queues, self._job_sizes,
                                self.draining, self._asked_preemptions)
        decision = plan(given.queued, given.free, given.total, time.time(), self.starvation_s,
                        running=given.running, queues=given.queues, cordoned=given.cordoned,
                        grow_cooldown_s=self.grow_cooldown_s)
        for job_id, reason in decision.unschedulable.items():
            job = self.jobs[job_id]
            if job.spec.failure.unschedulable == "fail":
                job.error = f"unschedulable: {reason}"
                self._set_state(job, JobState.FAILED, job.error)
            else:
                self._set_queue_reason(job, reason)
        for job_id, reason in decision.waiting.items():
            self._set_queue_reason(self.jobs[job_id], reason)
        for preemption in decision.preempt:
            victim = self.jobs[preemption.victim]
            log.info("job %s: preempting %s (%s%s)", preemption.by, victim.id, preemption.reason,
                     f", shrink to {preemption.shrink_to} workers" if preemption.shrink_to else "")
            self._asked_preemptions[victim.id] = preemption
            self.store.put_preemption(preemption)  # before asking: a controller restarted meanwhile knows
            done = self._preempt(victim, preemption.by, preemption.shrink_to)
            if inspect.isawaitable(done):
                await done
        for job_id in decision.start:
            await self._admit(self.jobs[job_id], decision.sizes[job_id])
        for grow in decision.grow:
            log.info("job %s: grows to %d workers", grow.job_id, grow.to_workers)
            done = self._resize(self.jobs[grow.job_id], grow.to_workers)
            if inspect.isawaitable(done):
                await done

    def _job_sizes(self, job: JobRecord) -> tuple[int, ...]:
        """The worker counts an elastic job may run at (the strategy is asked once per job)."""
        if job.spec.resources.min_workers is None:
            return ()
        if job.id not in self._sizes:
            self._sizes[job.id] = allowed_sizes(job.spec)
        return self._sizes[job.id]

    # ---- preemption, resize, drain: a just-in-time checkpoint, then the gang given back --------
    async def _preempt(self, job: JobRecord, by_job_id: str, shrink_to: int | None = None) -> None:
        """Make room for `by_job_id`: the job checkpoints just in time, then goes back to the
        queue (keeping its priority and age) or, elastic, continues at `shrink_to` workers."""
        note = f"preempted by {by_job_id}" + (f": continues at {shrink_to} workers" if shrink_to else "")
        if not await self._checkpoint_now(job, note, by=by_job_id, resize_to=shrink_to):
            self._asked_preemptions.pop(job.id, None)
            self.store.forget_preemptions([job.id])

    async def _resize(self, job: JobRecord, workers: int) -> None:
        """An elastic job grows: a just-in-time checkpoint, then it restarts at `workers` at once
        (its cool-down counts from now)."""
        if await self._checkpoint_now(job, f"grows to {workers} workers", resize_to=workers):
            job.started_at = time.time()
            self.store.put(job)

    async def _checkpoint_now(self, job: JobRecord, note: str, by: str | None = None,
                              resize_to: int | None = None) -> bool:
        """Ask the job's supervisor (Supervisor.preempt); False if it was not asked (no
        supervisor, or nothing to preempt: the job is ending or already giving its gang back)."""
        sup = self._supervisor(job.id)
        if sup is None:
            return False
        try:
            asked = await asyncio.wait_for(sup.preempt.remote(note, by=by, resize_to=resize_to), timeout=10)
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            log.warning("job %s: could not ask for a just-in-time checkpoint (%s)", job.id, note, exc_info=True)
            return False
        if asked:
            log.info("job %s: checkpoint now: %s", job.id, note)
            await self._follow(job)  # PREEMPTING in the record before the next plan
        return bool(asked)

    def _requeued(self, job: JobRecord) -> None:
        """The supervisor gave the gang back (a preemption or a drain): the job waits in the queue
        again, by its priority and age, and resumes from its checkpoint when it is admitted."""
        self.hosts.forget(job.id)
        gang.release(gang.find(job.id))
        job.placement = []
        job.workers = None
        job.queue_reason = f"{job.history[-1].note}: waiting to resume" if job.history else None
        self.store.put(job)

    async def drain_node(self, node: str) -> dict:
        """`trainctl cluster drain NODE` (id or IP): nothing new goes there (Ray drains it too),
        and the jobs with ranks on it checkpoint just in time and move elsewhere or shrink."""
        self._ensure_loop()
        nodes = inventory.nodes()
        try:
            node_id = drain.resolve(node, nodes)
        except drain.UnknownNode as exc:
            raise UserError(f"cluster drain: node {exc}") from None
        try:
            accepted, why = drain.request_drain(node_id, "trainctl cluster drain")
        except Exception as exc:  # trainctl still keeps new work off it
            log.warning("Ray did not drain node %s", node_id, exc_info=True)
            accepted, why = False, f"{type(exc).__name__}: {exc}"
        self._cordon([node_id])
        moved = await self._move_off_draining()
        address = next(n.address for n in nodes if n.node_id == node_id)
        return {"node_id": node_id, "address": address, "ray_draining": accepted, "ray_reason": why,
                "jobs": moved}

    async def _move_off_draining(self) -> list[str]:
        """Jobs running on a draining node (trainctl's or Ray's) checkpoint just in time, then
        go back to the queue, or shrink onto their other nodes if elastic. Returns their ids."""
        try:
            self._cordon(drain.draining_nodes())
        except Exception:
            log.warning("could not read Ray's draining nodes", exc_info=True)
        if not self.draining:
            return []
        moved = []
        for job in list(self.jobs.values()):
            if job.state is not JobState.RUNNING:
                continue
            on = [p for p in job.placement if p.node_id in self.draining]
            if not on:
                continue
            sizes = self._job_sizes(job)
            size = largest_size(sizes, len(job.placement) - len(on)) if sizes else None
            note = f"node {on[0].node_ip} drains" + (f": continues at {size} workers" if size else "")
            if await self._checkpoint_now(job, note, resize_to=size):
                moved.append(job.id)
        return moved

    def _cordon(self, node_ids) -> None:
        """Nothing new goes to these nodes (kept in the store: a restarted controller still knows)."""
        for node_id in set(node_ids) - self.draining:
            self.draining.add(node_id)
            self.store.put_drained_node(node_id, time.time())

    def _uncordon_gone(self, alive: set[str]) -> None:
        """A node that left the cluster never comes back under its id: its cordon goes. (A raylet
        restarted on the same machine, e.g. with the head, is a new node with a new id, and is
        not draining: a drain is of one raylet's life, as Ray's own is.)"""
        gone = self.draining - alive
        if gone:
            self.draining -= gone
            self.store.forget_drained_nodes(gone)

    def _forget_answered_preemptions(self) -> None:
        """A victim that is no longer PREEMPTING gave its gang back (or ended): its ask is done."""
        answered = [v for v in self._asked_preemptions
                    if v not in self.jobs or self.jobs[v].state is not JobState.PREEMPTING]
        for victim in answered:
            del self._asked_preemptions[victim]
        self.store.forget_preemptions(answered)

    def _recover_scheduling_state(self, alive_nodes: set[str]) -> None:
        """The recovery path's part for scheduling (after the controller or the head restarted):
        the preemptions asked of victims still giving their gang back, so the next plan counts
        the room they are making instead of picking an extra victim; and the drained nodes still
        alive (`alive_nodes`: their ids)."""
        self._asked_preemptions = self.store.preemptions()
        # An ask stays while its victim holds a gang: the first tick follows the victim (its
        # record may not say PREEMPTING yet, if the old controller died right after asking)
        # before anything is planned. After a head restart the victims are QUEUED again.
        answered = [v for v in self._asked_preemptions if v not in self.jobs or not self.jobs[v].state.holds_resources]
        for victim in answered:
            del self._asked_preemptions[victim]
        self.store.forget_preemptions(answered)
        self.draining = self.store.drained_nodes()
        self._uncordon_gone(alive_nodes)

    def _set_queue_reason(self, job: JobRecord, reason: str | None) -> None:
        if job.queue_reason != reason:
            job.queue_reason = reason
            self.store.put(job)

    async def _admit(self, job: JobRecord, workers: int | None = None) -> None:
        """Reserve the gang at `workers` ranks (an elastic job's size; default the spec's) and start it."""
        r = job.spec.resources
        workers = workers or r.workers
        gang.release(gang.find(job.id))  # left over if a controller died mid-admission
        pg = gang.reserve(job.id, workers, r.cpus_per_worker, r.gpus_per_worker, r.placement, r.colocate)
        if not await gang.wait_created(pg, ADMISSION_TIMEOUT_S):
            gang.release(pg)
            self._set_queue_reason(job, "waiting for resources (in use outside trainctl)")
            return
        job.queue_reason = None
        job.started_at = time.time()
        job.workers = workers if workers != r.workers else None  # the attempt runs at this size
        job.session = self.session
        self._set_state(job, JobState.STARTING)
        self._start_supervisor(job)

    def _start_supervisor(self, job: JobRecord) -> None:
        if job.package_uri:
            packaging.ensure_uploaded(job.package_uri, lambda: self.store.get_package(job.package_uri))
        self.hosts.start(job)

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
        """The job's SupervisorRef (`.snapshot.remote()`, `.cancel.remote()`, ...), None if no host has it."""
        return self.hosts.find(job_id)

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
    ).remote(metrics=exporter_options(), grow_cooldown=grow_cooldown_s())


def metrics_endpoint(timeout_s: float = 60.0) -> str | None:
    """The controller's /metrics URL (the controller is started if it was not yet)."""
    return ray.get(get_or_create_controller().metrics_endpoint.remote(), timeout=timeout_s)
