"""Many jobs' supervisors in a few SupervisorHost processes (control/supervisor.py).

Unit tests for the placement rule and the per-job ref; then one 2-node cluster for the module
(hosts hold at most 2 jobs here): jobs pack into hosts, an emptied extra host goes away, and a
killed host's jobs resume from their checkpoints.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter

import pytest

from orchestrator.control.supervisor import SupervisorRef, pick_host

from ..helpers import job_spec, wait_for

PER_HOST = 2


# ---- placement and the ref, no Ray ------------------------------------------------------------
@pytest.mark.timeout(10)
def test_pick_host_fills_the_fullest_host_with_room_first():
    load = Counter({"a": 1, "b": 2, "c": 0})
    assert pick_host(load, ["a", "b", "c"], per_host=3) == "b"
    assert pick_host(load, ["a", "b", "c"], per_host=2) == "a"  # b is full
    assert pick_host(Counter({"a": 2}), ["a"], per_host=2) is None  # all full: a new host
    assert pick_host(Counter(), [], per_host=2) is None


class _RecordingHost:
    """Stands in for a SupervisorHost actor handle: what `.call.remote` got."""

    def __init__(self):
        self.calls = []
        self.call = self

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "ref"


@pytest.mark.timeout(10)
def test_supervisor_ref_calls_the_host_for_its_job_and_survives_pickling():
    host = _RecordingHost()
    ref = SupervisorRef(host, "job-1")
    assert ref.push.remote(3, [("metrics", 1.0, {})]) == "ref"  # what runtime/reporting.py calls
    assert ref.cancel.remote("why") == "ref"
    assert host.calls == [(("job-1", "push", 3, [("metrics", 1.0, {})]), {}),
                          (("job-1", "cancel", "why"), {})]
    back = pickle.loads(pickle.dumps(SupervisorRef("a-handle", "job-2")))  # it travels in RankTask
    assert (back.host, back.job_id) == ("a-handle", "job-2")
    with pytest.raises(AttributeError):
        ref._private  # noqa: B018 - probes of pickle/copy must not become remote calls


class _FakeHostHandle:
    """A SupervisorHost handle that records `handle.method.remote(*args)` calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        outer = self

        class _Method:
            def remote(self, *args):
                outer.calls.append((method, *args))
                return f"{method}-ref"

        return _Method()


def _hosts_with(jobs_by_host: dict[str, list[str]]):
    from orchestrator.control.supervisor import SupervisorHosts

    hosts = SupervisorHosts("/nonexistent", per_host=PER_HOST)
    hosts._discovered = True  # no Ray to ask
    hosts.hosts = {name: _FakeHostHandle() for name in jobs_by_host}
    hosts.host_of = {job: name for name, jobs in jobs_by_host.items() for job in jobs}
    return hosts


@pytest.mark.timeout(10)
def test_not_hosted_before_the_host_ran_start_is_not_a_lost_supervisor(monkeypatch):
    import ray

    hosts = _hosts_with({"h": ["job"]})
    hosts.starts["job"] = "start-ref"
    # the record argument of start() is still being fetched: a later snapshot overtook it
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: ([], refs))
    assert hosts.lost("job", not_hosted=True) is False
    assert hosts.find("job") is not None
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: (refs, []))  # start() ran: truly not there
    assert hosts.lost("job", not_hosted=True) is True
    assert hosts.find("job") is None


@pytest.mark.timeout(10)
def test_forget_drops_the_job_and_retires_an_emptied_host_unless_it_is_the_last():
    hosts = _hosts_with({"a": ["j1"], "b": ["j2", "j3"]})
    a, b = hosts.hosts["a"], hosts.hosts["b"]
    hosts.forget("j1")
    assert a.calls == [("forget", "j1"), ("__ray_terminate__",)] and "a" not in hosts.hosts
    hosts.forget("j2")
    hosts.forget("j3")
    assert b.calls == [("forget", "j2"), ("forget", "j3")]  # the last host stays, for the next job
    assert list(hosts.hosts) == ["b"] and hosts.find("j3") is None


# ---- on a cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def per_host_env():
    """Set before the cluster starts: its processes (the controller) inherit it."""
    old = os.environ.get("TRAINCTL_JOBS_PER_HOST")
    os.environ["TRAINCTL_JOBS_PER_HOST"] = str(PER_HOST)
    yield
    if old is None:
        os.environ.pop("TRAINCTL_JOBS_PER_HOST", None)
    else:
        os.environ["TRAINCTL_JOBS_PER_HOST"] = old


@pytest.fixture(scope="module")
def client(per_host_env, ray_cluster):
    from orchestrator.client.api import Client

    return Client(ray_cluster.address)


def _hosts() -> list[str]:
    import ray

    from orchestrator.control.supervisor import HOST_PREFIX

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(HOST_PREFIX))


def _one_worker(name, tmp_path, **overrides):
    return job_spec(name, "tests.jobs.restart_fns:traced_steps", tmp_path,
                    resources={"workers": 1, "cpus_per_worker": 1}, **overrides)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_jobs_pack_into_hosts_and_an_emptied_extra_host_goes(client, tmp_path):
    gate = tmp_path / "gate"
    specs = [job_spec(f"packed-{i}", "tests.jobs.train_fns:gated", tmp_path,
                      resources={"workers": 1, "cpus_per_worker": 1},
                      config={"gate": str(gate), "epochs": 2, "hold_after": 0}) for i in range(3)]
    ids = [client.submit(s) for s in specs]
    wait_for(lambda: all(client.get(j)["state"] == "RUNNING" for j in ids), 180, what="3 jobs running")
    assert len(_hosts()) == 2  # 3 jobs, 2 per host: not one process per job
    gate.touch()
    for job_id in ids:
        job = client.wait(job_id, timeout_s=120)
        assert job["state"] == "SUCCEEDED", job.get("error")
    wait_for(lambda: len(_hosts()) == 1, 60, what="the emptied extra host to go")


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_killed_host_restarts_each_of_its_jobs_from_its_checkpoint(client, tmp_path):
    import ray

    from cluster.connect import NAMESPACE

    traces = [tmp_path / f"trace-{i}" for i in range(2)]
    ids = [client.submit(_one_worker(f"hosted-{i}", tmp_path,
                                     config={"steps": 40, "step_s": 0.25, "trace": str(traces[i])}))
           for i in range(2)]
    wait_for(lambda: all((client.get(j).get("checkpoint") or {}).get("step", 0) >= 3 for j in ids), 180,
             what="both jobs past step 3")
    hosts = _hosts()
    assert len(hosts) == 1  # both on the one host left by the test before (or a new one)
    ray.kill(ray.get_actor(hosts[0], namespace=NAMESPACE), no_restart=True)
    for job_id, trace in zip(ids, traces, strict=True):
        job = client.wait(job_id, timeout_s=180)
        assert job["state"] == "SUCCEEDED", job.get("error")
        assert [r["cause"] for r in job["restarts"]] == ["supervisor lost"]
        steps = [tuple(map(int, line.split())) for line in trace.read_text().splitlines()]
        resumed = [step for attempt, step in steps if attempt == 1]
        assert resumed and resumed[0] > 1, steps  # attempt 1 began after a checkpoint, not at step 1
        assert resumed[-1] == 40
