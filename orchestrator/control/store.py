"""The job table, durable outside Ray's session directory: SQLite in a directory, or PostgreSQL.

Where it lives is `TRAINCTL_STATE` on the head node: a directory (the default for `trainctl
cluster up` is ~/.trainctl/state) holding `jobs.db`, or a `postgresql://` URL for a head that
can be replaced. Each job is one row: a few columns to filter and sort on, and the whole
record as JSON. The working_dir packages of queued jobs are rows too, so a new head can still
start a job that was queued on the old one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from .record import JobRecord
from .scheduler import Preemption, QueueQuota

_metadata = sa.MetaData()
jobs_table = sa.Table(
    "trainctl_jobs", _metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False, index=True),
    sa.Column("doc", sa.Text, nullable=False),
)
packages_table = sa.Table(
    "trainctl_packages", _metadata,
    sa.Column("uri", sa.String(200), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
queues_table = sa.Table(  # trainctl queue create|set (control/queues.py); `default` is implicit
    "trainctl_queues", _metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("cpus", sa.Float, nullable=True),  # NULL: no quota
    sa.Column("gpus", sa.Float, nullable=True),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("borrow", sa.Boolean, nullable=False),
)
# What the controller must not forget across its own restart or the head's (its recovery path
# reloads both): the nodes it cordoned (`trainctl cluster drain`, Ray's draining nodes) while
# they are alive, and the preemptions it asked for while their victims give their gangs back
# (forgotten, the next plan would pick an extra victim). New tables: create_all adds them to an
# existing store.
drained_nodes_table = sa.Table(
    "trainctl_drained_nodes", _metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),  # Ray's hex node id
    sa.Column("at", sa.Float, nullable=False),
)
preemptions_table = sa.Table(
    "trainctl_preemptions", _metadata,
    sa.Column("victim", sa.String(80), primary_key=True),
    sa.Column("by", sa.String(80), nullable=False),
    sa.Column("shrink_to", sa.Integer, nullable=True),  # NULL: evicted to the queue
    sa.Column("reason", sa.String(20), nullable=False),
)

_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


@dataclass(frozen=True)
class StateLocation:
    """Where the job table is (a SQLAlchemy URL) and where the head keeps its files (logs)."""

    url: str
    files: Path

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    @classmethod
    def parse(cls, value: str, files: Path | None = None) -> StateLocation:
        """A directory (SQLite file `jobs.db` in it) or a PostgreSQL URL; `files` is where logs
        go with PostgreSQL (else the directory itself)."""
        if value.startswith(_POSTGRES_SCHEMES):
            # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg 3.
            url = "postgresql+psycopg://" + value.split("://", 1)[1]
            return cls(url, files or Path("~/.trainctl/state").expanduser())
        if "://" in value:
            raise ValueError(f"TRAINCTL_STATE: {value!r} is neither a directory nor a postgresql:// URL")
        directory = Path(value).expanduser().resolve()
        return cls(f"sqlite:///{directory / 'jobs.db'}", directory)

    def describe(self) -> str:
        """For status lines: the URL without its password."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class JobStore:
    """Rows of job records (the controller is the only writer; it keeps them in memory too)."""

    def __init__(self, location: StateLocation):
        self.location = location
        _private_dir(location.files)
        if not location.is_postgres:
            # Readable by its owner only: create the file before SQLite does (its -wal and
            # -shm files take the database file's permissions).
            db_file = Path(sa.engine.make_url(location.url).database)
            os.close(os.open(db_file, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(db_file, 0o600)
        self._engine = sa.create_engine(location.url, pool_pre_ping=True)
        if not location.is_postgres:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        _metadata.create_all(self._engine)
        self._lock = threading.Lock()

    # ---- jobs ------------------------------------------------------------------------------
    def put(self, job: JobRecord) -> None:
        self.put_many([job])

    def put_many(self, jobs: Iterable[JobRecord]) -> None:
        rows = [{"id": j.id, "state": j.state.value, "priority": j.priority,
                 "submitted_at": j.submitted_at, "doc": j.model_dump_json()} for j in jobs]
        if not rows:
            return
        with self._lock, self._engine.begin() as conn:
            for row in rows:  # an upsert both databases speak: update, else insert
                updated = conn.execute(
                    jobs_table.update().where(jobs_table.c.id == row["id"]).values(**row))
                if updated.rowcount == 0:
                    conn.execute(jobs_table.insert().values(**row))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock, self._engine.connect() as conn:
            doc = conn.execute(sa.select(jobs_table.c.doc).where(jobs_table.c.id == job_id)).scalar()
        return JobRecord.model_validate_json(doc) if doc is not None else None

    def all(self) -> list[JobRecord]:
        with self._lock, self._engine.connect() as conn:
            docs = list(conn.execute(sa.select(jobs_table.c.doc).order_by(jobs_table.c.submitted_at)).scalars())
        return [JobRecord.model_validate_json(d) for d in docs]

    # ---- working_dir packages --------------------------------------------------------------
    def put_package(self, uri: str, data: bytes) -> None:
        with self._lock, self._engine.begin() as conn:
            if conn.execute(sa.select(packages_table.c.uri).where(packages_table.c.uri == uri)).first() is None:
                conn.execute(packages_table.insert().values(uri=uri, data=data))

    def get_package(self, uri: str) -> bytes | None:
        with self._lock, self._engine.connect() as conn:
            return conn.execute(sa.select(packages_table.c.data).where(packages_table.c.uri == uri)).scalar()

    def _upsert(self, table: sa.Table, key: str, row: dict) -> None:
        """Update the row whose `key` column matches, else insert it (both databases speak this)."""
        with self._lock, self._engine.begin() as conn:
            updated = conn.execute(table.update().where(table.c[key] == row[key]).values(**row))
            if updated.rowcount == 0:
                conn.execute(table.insert().values(**row))

    def _delete(self, table: sa.Table, key: str, values: Iterable[str]) -> None:
        values = list(values)
        if values:
            with self._lock, self._engine.begin() as conn:
                conn.execute(table.delete().where(table.c[key].in_(values)))

    # ---- queues ----------------------------------------------------------------------------
    def put_queue(self, queue: QueueQuota) -> None:
        self._upsert(queues_table, "name", {"name": queue.name, "cpus": queue.cpus, "gpus": queue.gpus,
                                            "weight": queue.weight, "borrow": queue.borrow})

    def get_queues(self) -> dict[str, QueueQuota]:
        with self._lock, self._engine.connect() as conn:
            rows = conn.execute(sa.select(queues_table)).mappings().all()
        return {r["name"]: QueueQuota(r["name"], r["cpus"], r["gpus"], r["weight"], r["borrow"]) for r in rows}

    def delete_queue(self, name: str) -> None:
        with self._lock, self._engine.begin() as conn:
            conn.execute(queues_table.delete().where(queues_table.c.name == name))

    # ---- drained nodes, asked preemptions (the controller's scheduling state) ---------------
    def put_drained_node(self, node_id: str, at: float) -> None:
        self._upsert(drained_nodes_table, "node_id", {"node_id": node_id, "at": at})

    def drained_nodes(self) -> set[str]:
        with self._lock, self._engine.connect() as conn:
            return set(conn.execute(sa.select(drained_nodes_table.c.node_id)).scalars())

    def forget_drained_nodes(self, node_ids: Iterable[str]) -> None:
        self._delete(drained_nodes_table, "node_id", node_ids)

    def put_preemption(self, asked: Preemption) -> None:
        self._upsert(preemptions_table, "victim", {"victim": asked.victim, "by": asked.by,
                                                   "shrink_to": asked.shrink_to, "reason": asked.reason})

    def preemptions(self) -> dict[str, Preemption]:
        """Victim id -> the preemption asked of it."""
        with self._lock, self._engine.connect() as conn:
            rows = conn.execute(sa.select(preemptions_table)).mappings().all()
        return {r["victim"]: Preemption(r["victim"], r["by"], r["shrink_to"], r["reason"]) for r in rows}

    def forget_preemptions(self, victims: Iterable[str]) -> None:
        self._delete(preemptions_table, "victim", victims)

    def close(self) -> None:
        self._engine.dispose()
