"""A head restart loses no job (after Determined's master-restart test).

A real `trainctl cluster up` head runs one job while another waits in the queue; the head goes
down (cleanly, or SIGKILLed) for 0, 20 or 60 s and comes back on the same store (SQLite, or a
real PostgreSQL server started here). Both jobs then finish, the job list is the one from
before, and the running job redid at most the steps since its last committed checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from ..helpers import REPO, pid_alive, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

ENV = {"RAY_ADDRESS": ""}


def _job_file(tmp_path, name: str, steps: int) -> str:
    spec = {
        "name": name, "entrypoint": "tests.jobs.restart_fns:traced_steps", "working_dir": str(REPO),
        "config": {"steps": steps, "step_s": 0.25, "trace": str(tmp_path / f"trace-{name}")},
        "resources": {"workers": 1, "cpus_per_worker": 2},  # the whole head: the other job waits
        "checkpoint": {"storage": str(tmp_path / "runs"), "every_n_steps": 5},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _trace(tmp_path, name: str) -> list[tuple[int, int]]:
    path = tmp_path / f"trace-{name}"
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def _list(env) -> list[dict]:
    result = trainctl("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _committed_step(tmp_path) -> int:
    steps = [json.loads(m.read_text())["step"] for m in (tmp_path / "runs").glob("*/checkpoint_*/manifest.json")]
    return max(steps, default=0)


def _up(env, state: str):
    result = trainctl("cluster", "up", "--num-cpus", "2", "--state", state, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def _kill_head(env) -> None:
    """SIGKILL the whole head (GCS, raylet, workers): no drain, nothing gets to clean up."""
    with open(os.path.join(env["TRAINCTL_HOME"], "cluster.json")) as f:
        info = json.load(f)
    os.killpg(info["pid"], signal.SIGKILL)
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"gcs_server.*{info['address'].split(':')[1]}"],
                                    capture_output=True).returncode != 0, 30, what="the head's GCS to die")


@pytest.mark.parametrize("store, down_s, how", [
    ("sqlite", 0, "down"), ("postgresql", 20, "sigkill"), ("sqlite", 60, "sigkill")])
def test_head_restart_loses_no_job(tmp_path, request, store, down_s, how):
    env = {**ENV, "TRAINCTL_HOME": str(tmp_path / "home")}
    state = request.getfixturevalue("postgres_url") if store == "postgresql" else str(tmp_path / "state")
    _up(env, state)
    try:
        running = trainctl("submit", _job_file(tmp_path, "long", steps=120), env=env).stdout.strip()
        queued = trainctl("submit", _job_file(tmp_path, "waiting", steps=4), env=env).stdout.strip()
        wait_for(lambda: _committed_step(tmp_path) >= 10 and len(_trace(tmp_path, "long")) > 12,
                 90, what="the first job to commit checkpoints and go on")
        before = _list(env)
        assert {j["id"]: j["state"] for j in before} == {running: "RUNNING", queued: "QUEUED"}

        ranks = [p["pid"] for p in json.loads(trainctl("status", running, "--json", env=env).stdout)["placement"]]
        if how == "down":
            assert trainctl("cluster", "down", env=env).returncode == 0
        else:
            _kill_head(env)
        # A rank outlives a killed head by a moment (until it notices its raylet is gone): what
        # it did until then counts as done before the restart.
        wait_for(lambda: not any(pid_alive(pid) for pid in ranks), 60, what="the old ranks to exit")
        steps_at_kill = max(step for _, step in _trace(tmp_path, "long"))
        committed_at_kill = _committed_step(tmp_path)
        assert _trace(tmp_path, "waiting") == []  # the queued job never ran on the old head
        time.sleep(down_s)  # the head stays down this long: nothing runs, nothing to wait on
        _up(env, state)

        after = _list(env)  # the same jobs, before any of them moved on
        assert [j["id"] for j in after] == [j["id"] for j in before]
        done = wait_for(lambda: (jobs := _list(env)) and all(j["state"] == "SUCCEEDED" for j in jobs) and jobs,
                        180, interval=1.0, what="both jobs to finish after the restart")
        assert [j["id"] for j in done] == [running, queued]
        record = json.loads(trainctl("status", running, "--json", env=env).stdout)
        kinds = [r["kind"] for r in record["restarts"]]
        drains = [p for p in record["preemptions"] if "drains" in p["reason"]]
        # `cluster down` drains the head first: the job may checkpoint just in time and go back
        # to the queue before the head is gone; else the new head requeues it (head_restarted)
        assert kinds == ["head_restarted"] or (how == "down" and kinds == [] and len(drains) == 1), record
        assert [h["state"] for h in record["history"]].count("RUNNING") == 2
    finally:
        trainctl("cluster", "down", env=env)

    trace = _trace(tmp_path, "long")
    assert sorted({step for _, step in trace}) == list(range(1, 121))  # nothing skipped
    redone = [step for step, n in Counter(step for _, step in trace).items() if n > 1]
    assert len(redone) <= steps_at_kill - committed_at_kill, (redone, steps_at_kill, committed_at_kill)
    attempts = [attempt for attempt, _ in trace]
    # one attempt at a time, in order (a preemption resumes the same attempt: it is no failure)
    assert attempts == sorted(attempts) and attempts[-1] == len(kinds)
    assert [step for _, step in _trace(tmp_path, "waiting")] == [1, 2, 3, 4]  # ran once, whole


def test_the_local_head_requires_its_token(tmp_path):
    """`cluster up` keeps Ray's token authentication on: trainctl's own clients present the
    token from TRAINCTL_HOME; a client without it is refused."""
    env = {**ENV, "TRAINCTL_HOME": str(tmp_path / "home")}
    _up(env, str(tmp_path / "state"))
    try:
        assert trainctl("list", env=env).returncode == 0
        address = json.loads((tmp_path / "home" / "cluster.json").read_text())["address"]
        token = tmp_path / "home" / "auth_token"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        probe = ("import ray, sys\n"
                 "try:\n"
                 f"    ray.init(address={address!r}, log_to_driver=False)\n"
                 "except Exception as exc:\n"
                 "    print('refused:', type(exc).__name__); sys.exit(3)\n")
        no_token = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "RAY_AUTH_MODE": "token",
                                       "RAY_AUTH_TOKEN": "not-the-token", "RAY_ADDRESS": ""})
        assert no_token.returncode == 3, no_token.stdout + no_token.stderr
    finally:
        trainctl("cluster", "down", env=env)


def _sweep_status(env, sweep: str) -> dict:
    result = trainctl("sweep", "status", sweep, "--json", "--no-chart", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_sweep_goes_on_through_a_head_restart(tmp_path):
    """Two trials running and one queued when the head goes down (`cluster down`, then `up` on
    the same SQLite store): the sweep then ends with every trial once, none lost, none run twice
    at once, and `sweep status` shows the trials from before, then the new ones."""
    env = {**ENV, "TRAINCTL_HOME": str(tmp_path / "home")}
    state = str(tmp_path / "state")
    traces = [str(tmp_path / f"trace-{i}") for i in range(4)]
    sweep = {
        "name": "restarted", "search": "grid", "max_concurrent": 3,  # 2 run (the head's 2 CPUs), 1 waits
        "base": {"name": "traced", "entrypoint": "tests.jobs.restart_fns:traced_steps", "working_dir": str(REPO),
                 "config": {"steps": 40, "step_s": 0.25},
                 "resources": {"workers": 1, "cpus_per_worker": 1},
                 "checkpoint": {"storage": str(tmp_path / "runs"), "every_n_steps": 5}},
        "parameters": {"config.trace": {"choice": traces}},  # a trace file per trial: 4 trials
        "objective": {"metric": "loss", "mode": "min"}}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))

    def lines(trace: str) -> list[tuple[int, int]]:
        path = tmp_path / trace
        return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []

    _up(env, state)
    try:
        started = trainctl("sweep", str(sweep_file), env=env)
        assert started.returncode == 0, started.stderr
        sweep_id = started.stdout.strip()

        def mid_sweep():
            status = _sweep_status(env, sweep_id)
            states = sorted(t["state"] for t in status["trials"])
            running = [t for t in status["trials"] if t["state"] == "RUNNING"]
            return states == ["QUEUED", "RUNNING", "RUNNING"] and all(
                len(lines(t["params"]["config.trace"])) >= 8 for t in running) and status
        before = wait_for(mid_sweep, 150, interval=1.0, what="two trials running past a checkpoint, one queued")
        ranks = [p["pid"] for t in before["trials"] if t["state"] == "RUNNING"
                 for p in json.loads(trainctl("status", t["job_id"], "--json", env=env).stdout)["placement"]]
        assert trainctl("cluster", "down", env=env).returncode == 0
        wait_for(lambda: not any(pid_alive(pid) for pid in ranks), 60, what="the old ranks to exit")
        _up(env, state)

        after = _sweep_status(env, sweep_id)  # the same trials, before any of them moved on
        assert after["state"] == "RUNNING"
        assert [(t["name"], t["job_id"]) for t in after["trials"]] == [(t["name"], t["job_id"]) for t in before["trials"]]
        done = wait_for(lambda: (s := _sweep_status(env, sweep_id))["state"] != "RUNNING" and s, 240,
                        interval=1.0, what="the sweep to end after the restart")
        assert done["state"] == "SUCCEEDED", done["note"]
        jobs = [j for j in _list(env) if j["name"].startswith(f"{sweep_id}-t")]
        interrupted = [json.loads(trainctl("status", t["job_id"], "--json", env=env).stdout)
                       for t in before["trials"] if t["state"] == "RUNNING"]
    finally:
        trainctl("cluster", "down", env=env)

    trials = done["trials"]
    assert [(t["name"], t["job_id"]) for t in trials[:3]] == [(t["name"], t["job_id"]) for t in before["trials"]]
    assert len(trials) == 4 and {t["state"] for t in trials} == {"SUCCEEDED"}
    assert sorted(t["params"]["config.trace"] for t in trials) == traces  # each grid point once
    assert sorted(j["id"] for j in jobs) == sorted(t["job_id"] for t in trials)  # one job per trial, no extra
    for record in interrupted:  # back to the queue with the head, then resumed: not started over
        assert [h["state"] for h in record["history"]].count("RUNNING") == 2, record["history"]
    for t in trials:
        trace = lines(t["params"]["config.trace"])
        assert sorted({step for _, step in trace}) == list(range(1, 41)), t["name"]  # nothing lost
        attempts = [attempt for attempt, _ in trace]
        assert attempts == sorted(attempts), t["name"]  # one attempt at a time: never two at once
