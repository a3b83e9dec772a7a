"""The durable job store against SQLite and a real PostgreSQL server started here."""

from __future__ import annotations

import stat

import pytest

from orchestrator.control.scheduler import Preemption
from orchestrator.control.store import JobStore, StateLocation
from tests.helpers import job_record


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return StateLocation.parse(str(tmp_path / "state"))
    url = request.getfixturevalue("postgres_url")
    store = JobStore(StateLocation.parse(url, files=tmp_path / "files"))
    with store._engine.begin() as conn:  # each test starts from an empty table
        conn.exec_driver_sql("DELETE FROM trainctl_jobs")
        conn.exec_driver_sql("DELETE FROM trainctl_packages")
        conn.exec_driver_sql("DELETE FROM trainctl_drained_nodes")
        conn.exec_driver_sql("DELETE FROM trainctl_preemptions")
    store.close()
    return StateLocation.parse(url, files=tmp_path / "files")


def _job(job_id: str, state: str = "QUEUED", at: float = 1.0):
    return job_record(job_id, state, submitted_at=at, history=[{"state": state, "at": at}])


def test_a_reopened_store_has_every_job_as_it_was_written(location):
    store = JobStore(location)
    store.put(_job("b", at=2.0))
    store.put(_job("a", at=1.0))
    updated = _job("a", at=1.0)
    updated.state = "RUNNING"
    store.put(updated)  # an update, not a second row
    store.close()

    reopened = JobStore(location)
    assert [j.id for j in reopened.all()] == ["a", "b"]  # oldest first
    assert reopened.get("a").state == "RUNNING"
    assert [h.model_dump(mode="json") for h in reopened.get("a").history] == [{"state": "QUEUED", "at": 1.0, "note": ""}]
    assert reopened.get("nope") is None


def test_packages_survive_in_the_store(location):
    store = JobStore(location)
    store.put_package("gcs://_ray_pkg_abc.zip", b"zip bytes")
    store.put_package("gcs://_ray_pkg_abc.zip", b"zip bytes")  # content-addressed: kept once
    store.close()
    assert JobStore(location).get_package("gcs://_ray_pkg_abc.zip") == b"zip bytes"
    assert JobStore(location).get_package("gcs://_ray_pkg_other.zip") is None


def test_drained_nodes_and_asked_preemptions_survive_in_the_store(location):
    """The controller's scheduling state that a restart must not forget (its recovery path
    reloads both: tests/unit/test_preemption.py)."""
    store = JobStore(location)
    store.put_drained_node("node-a", 10.0)
    store.put_drained_node("node-b", 11.0)
    store.put_drained_node("node-a", 12.0)  # drained twice: one row
    store.put_preemption(Preemption("low", "high"))
    store.put_preemption(Preemption("elastic", "high", shrink_to=2, reason="reclaim"))
    store.put_preemption(Preemption("low", "higher"))  # asked again: the last ask counts
    store.close()

    reopened = JobStore(location)
    assert reopened.drained_nodes() == {"node-a", "node-b"}
    assert reopened.preemptions() == {"low": Preemption("low", "higher"),
                                      "elastic": Preemption("elastic", "high", 2, "reclaim")}
    reopened.forget_drained_nodes(["node-a", "never-drained"])
    reopened.forget_drained_nodes([])
    reopened.forget_preemptions(["low"])
    reopened.close()
    again = JobStore(location)
    assert again.drained_nodes() == {"node-b"}
    assert list(again.preemptions()) == ["elastic"]


def test_sqlite_files_are_readable_by_their_owner_only(tmp_path):
    location = StateLocation.parse(str(tmp_path / "state"))
    store = JobStore(location)
    store.put(_job("a"))
    for path in (tmp_path / "state").iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}"
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_state_location_parses_directories_and_postgres_urls(tmp_path):
    assert StateLocation.parse(str(tmp_path)).url == f"sqlite:///{tmp_path}/jobs.db"
    pg = StateLocation.parse("postgresql://me:secret@db:5432/jobs", files=tmp_path)
    assert pg.url == "postgresql+psycopg://me:secret@db:5432/jobs" and pg.is_postgres
    assert "secret" not in pg.describe()
    with pytest.raises(ValueError, match="neither a directory nor a postgresql"):
        StateLocation.parse("s3://bucket/jobs")
