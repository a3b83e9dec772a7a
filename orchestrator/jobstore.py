"""The job table: one SQLite file on the head node, written through on every change."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs ("
            " id TEXT PRIMARY KEY, state TEXT NOT NULL, priority INTEGER NOT NULL,"
            " submitted_at REAL NOT NULL, doc TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    def put(self, job: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (id, state, priority, submitted_at, doc) VALUES (?,?,?,?,?)",
                (job["id"], job["state"], job["priority"], job["submitted_at"], json.dumps(job)),
            )

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def all(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM jobs ORDER BY submitted_at").fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        self._db.close()
