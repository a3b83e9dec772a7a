"""The controller's sweeps: their records in a `trainctl_sweeps` table and their Optuna studies,
both in the job store's database (the SQLite file in the state directory, or PostgreSQL), so a
sweep survives a head restart: a new controller reloads the records and the drivers go on.

Runs inside the controller; Optuna is imported only once there is a sweep.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import sqlalchemy as sa

from ..errors import UserError
from .driver import SweepDriver, make_study
from .post import post_job_name
from .record import Action, SweepRecord, TrialJob
from .spec import SweepSpec
from .tracking import close_parent_run

_metadata = sa.MetaData()
sweeps_table = sa.Table(
    "trainctl_sweeps", _metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("doc", sa.Text, nullable=False),
)


def trial_job(job) -> TrialJob:
    """What a sweep's driver sees of a trial's job (a control.record.JobRecord)."""
    progress = job.progress or {}
    return TrialJob(name=job.name, job_id=job.id, state=job.state, metrics=dict(job.metrics or {}),
                    step=int(progress.get("step") or job.metrics.get("step") or 0),
                    total_steps=progress.get("total_steps"), error=job.error,
                    checkpoint=(job.checkpoint or {}).get("path"),
                    best_checkpoint=(job.best_checkpoint or {}).get("path"), started_at=job.started_at,
                    ended_at=job.ended_at, post_training=job.post_training)


class SweepNotFound(UserError):
    def __init__(self, sweep: str):
        super().__init__(f"no sweep {sweep!r}; 'trainctl sweep list' shows the sweeps")


class SweepService:
    def __init__(self, url: str):
        self.url = url
        self._engine = sa.create_engine(url, pool_pre_ping=True)
        _metadata.create_all(self._engine)
        self._lock = threading.Lock()
        with self._engine.connect() as conn:
            docs = conn.execute(sa.select(sweeps_table.c.doc).order_by(sweeps_table.c.created_at)).scalars()
            self.records = {r.id: r for r in (SweepRecord.model_validate_json(d) for d in docs)}
        self._saved = {sweep_id: r.model_dump_json() for sweep_id, r in self.records.items()}
        self._drivers: dict[str, SweepDriver] = {}
        self._storage = None

    # ---- the controller's calls ------------------------------------------------------------
    def create(self, spec: dict, base: dict, package_uri: str | None) -> SweepRecord:
        parsed = SweepSpec.model_validate(spec)
        sweep_id = f"{parsed.name}-{secrets.token_hex(3)}"
        record = SweepRecord(id=sweep_id, name=parsed.name, spec=parsed.model_dump(mode="json"), base=base,
                             package_uri=package_uri, study=f"trainctl-{sweep_id}", created_at=time.time())
        self.records[sweep_id] = record
        self._save(record)
        self._driver(record)
        return record

    @property
    def active(self) -> bool:
        return any(not r.state.terminal for r in self.records.values())

    def trial_names(self) -> set[str]:
        """The names of the running sweeps' jobs: their trials' and post-training jobs'."""
        running = [r for r in self.records.values() if not r.state.terminal]
        return {t.name for r in running for t in r.trials} | {post_job_name(r.id) for r in running}

    def tick(self, jobs: dict[str, TrialJob]) -> list[Action]:
        """Every running sweep's driver, on its trials' jobs (by job name)."""
        actions: list[Action] = []
        for record in list(self.records.values()):
            if record.state.terminal:
                continue
            actions += self._driver(record).tick(jobs)
            self._save(record)
            if record.state.terminal:
                self._ended(record)
        return actions

    def submitted(self, sweep_id: str, number: int | None, job_id: str) -> None:
        """The controller created trial `number`'s job (None: the post-training job)."""
        record = self.records[sweep_id]
        if number is None:
            self._driver(record).post_training_submitted(job_id)
        else:
            self._driver(record).submitted(number, job_id)
        self._save(record)

    def cancel(self, sweep: str) -> tuple[SweepRecord, list[Action]]:
        record = self.find(sweep)
        if record.state.terminal:
            raise UserError(f"sweep {record.id} already ended ({record.state.value}); nothing to cancel")
        actions = self._driver(record).cancel("sweep cancelled by user")
        self._save(record)
        self._ended(record)
        return record, actions

    def find(self, sweep: str) -> SweepRecord:
        """By id, else the newest sweep of that name."""
        if sweep in self.records:
            return self.records[sweep]
        named = [r for r in self.records.values() if r.name == sweep]
        if not named:
            raise SweepNotFound(sweep)
        return max(named, key=lambda r: r.created_at)

    def status(self, sweep: str) -> dict[str, Any]:
        """The record, and each trial's intermediate values (Optuna's), for tables and charts."""
        record = self.find(sweep)
        doc = record.model_dump(mode="json")
        try:
            study = self._study(record)
            curves = {t.number: {str(k): v for k, v in t.intermediate_values.items()}
                      for t in study.get_trials(deepcopy=False)}
        except Exception:  # the table still shows without the curves
            curves = {}
        for trial in doc["trials"]:
            trial["intermediate"] = curves.get(trial["number"], {})
        return doc

    def list(self) -> list[dict[str, Any]]:
        return [r.summary() for r in sorted(self.records.values(), key=lambda r: r.created_at)]

    def close(self) -> None:
        self._engine.dispose()

    # ---- helpers ---------------------------------------------------------------------------
    def _ended(self, record: SweepRecord) -> None:
        self._drivers.pop(record.id, None)
        close_parent_run(record)

    def _driver(self, record: SweepRecord) -> SweepDriver:
        driver = self._drivers.get(record.id)
        if driver is None:
            driver = self._drivers[record.id] = SweepDriver(record, self._study(record))
        return driver

    def _study(self, record: SweepRecord):
        if self._storage is None:
            import optuna

            self._storage = optuna.storages.RDBStorage(self.url)
        return make_study(SweepSpec.model_validate(record.spec), self._storage, record.study)

    def _save(self, record: SweepRecord) -> None:
        doc = record.model_dump_json()
        if self._saved.get(record.id) == doc:
            return  # nothing new: no write (the controller ticks twice a second)
        row = {"id": record.id, "state": record.state.value, "created_at": record.created_at, "doc": doc}
        with self._lock, self._engine.begin() as conn:
            if conn.execute(sweeps_table.update().where(sweeps_table.c.id == record.id).values(**row)).rowcount == 0:
                conn.execute(sweeps_table.insert().values(**row))
        self._saved[record.id] = doc

