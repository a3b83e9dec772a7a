"""Queues on a real `trainctl cluster up` head (2 CPUs): the CLI, admission within a quota, and the
queues surviving a head restart (the store keeps them; see test_head_restart.py for the jobs)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from ..helpers import REPO, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


def _up(env, state):
    """Start the head and wait until it answers. On a loaded machine Ray's raylet can abort on
    its own a few seconds after `ray start` returned (its dashboard agent missed a hard-coded 15 s
    port-file timeout, ray-project/ray#65983): then the head is started again (up to 4 times)."""
    for _ in range(4):
        result = trainctl("cluster", "up", "--num-cpus", "2", "--state", state, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        answered = trainctl("queue", "list", "--json", env=env)
        if answered.returncode == 0:
            return
        trainctl("cluster", "down", env=env)
    raise AssertionError(f"the head did not come up: {answered.stderr}")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    base = tmp_path_factory.mktemp("queues")
    env = {"RAY_ADDRESS": "", "TRAINCTL_HOME": str(base / "home")}
    state = str(base / "state")
    _up(env, state)
    yield SimpleNamespace(env=env, state=state, base=base)
    trainctl("cluster", "down", env=env)


def _job_file(head, name, queue):
    spec = {"name": name, "entrypoint": "tests.jobs.train_fns:gated", "working_dir": str(REPO), "queue": queue,
            "config": {"gate": str(head.base / "gate"), "hold_after": 0},  # holds until the file exists
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"storage": str(head.base / "runs")},
            "failure": {"hang_timeout_s": 3600}}  # held at the gate on purpose: not a hang
    path = head.base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _ok(*args, env):
    result = trainctl(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _queues(head) -> dict:
    return {q["name"]: q for q in json.loads(_ok("queue", "list", "--json", env=head.env))}


def _job(head, job_id) -> dict:
    return json.loads(_ok("status", job_id, "--json", env=head.env))


def _one_error_line(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr


def test_queue_cli(head):
    env = head.env
    assert "created queue research" in _ok("queue", "create", "research", "--cpus", "1", "--no-borrow", env=env)
    _one_error_line(trainctl("queue", "create", "research", env=env), "already exists", "trainctl queue set research")
    _one_error_line(trainctl("queue", "create", "Bad", env=env), "queue name 'Bad'")
    _one_error_line(trainctl("queue", "set", "research", "--weight", "-1", env=env), "--weight")
    _one_error_line(trainctl("queue", "delete", "nope", env=env), "no queue 'nope'")
    _ok("queue", "set", "research", "--weight", "2", env=env)
    queues = _queues(head)
    assert queues["research"] | {"used_cpus": 0} == {"name": "research", "cpus": 1.0, "gpus": None, "weight": 2.0,
                                                      "borrow": False, "used_cpus": 0, "used_gpus": 0.0,
                                                      "running": 0, "queued": 0}
    assert queues["default"]["cpus"] is None and queues["default"]["weight"] == 1.0
    assert "research" in _ok("queue", "list", env=env)
    # a job for a queue that does not exist: refused at submit, nothing created
    jobs_before = json.loads(_ok("list", "--json", env=env))
    _one_error_line(trainctl("submit", _job_file(head, "lost", "nope"), env=env),
                    "no queue 'nope'", "trainctl queue create nope")
    assert json.loads(_ok("list", "--json", env=env)) == jobs_before


def test_quota_admission_and_queues_survive_a_head_restart(head):
    env = head.env
    if "research" not in _queues(head):
        _ok("queue", "create", "research", "--cpus", "1", "--no-borrow", env=env)
    first = _ok("submit", _job_file(head, "r-first", "research"), env=env).strip()
    wait_for(lambda: _job(head, first)["state"] == "RUNNING", 120, what="the first research job to run")
    second = _ok("submit", _job_file(head, "r-second", "research"), env=env).strip()
    # one CPU is free, but research holds its whole quota: the second waits, and says why
    waiting = wait_for(lambda: (j := _job(head, second))["queue_reason"] and j, 60, what="a queue reason")
    assert waiting["state"] == "QUEUED"
    assert waiting["queue_reason"].startswith("queue research is at its quota (1/1 CPUs"), waiting["queue_reason"]
    assert "queued     queue research is at its quota" in _ok("status", second, env=env)
    other = _ok("submit", _job_file(head, "d-other", "default"), env=env).strip()
    wait_for(lambda: _job(head, other)["state"] == "RUNNING", 120, what="the default job to take the free CPU")
    assert _job(head, second)["state"] == "QUEUED"
    _one_error_line(trainctl("queue", "delete", "research", env=env), "still has 1 waiting and 1 running jobs")
    # a larger quota: now only the cluster's capacity keeps it waiting
    _ok("queue", "set", "research", "--cpus", "2", env=env)
    wait_for(lambda: (_job(head, second)["queue_reason"] or "").startswith("waiting for resources"), 30,
             what="the reason to follow the new quota")

    assert trainctl("cluster", "down", env=env).returncode == 0
    _up(env, head.state)
    queues = _queues(head)
    assert (queues["research"]["cpus"], queues["research"]["borrow"]) == (2.0, False)
    assert {j["id"] for j in json.loads(_ok("list", "--json", env=env))} >= {first, second, other}
    (head.base / "gate").write_text("go")
    for job_id in (first, second, other):
        wait_for(lambda job_id=job_id: _job(head, job_id)["state"] == "SUCCEEDED", 180, interval=1.0,
                 what=f"{job_id} to finish")
    assert "deleted queue research" in _ok("queue", "delete", "research", env=env)
    assert set(_queues(head)) == {"default"}
