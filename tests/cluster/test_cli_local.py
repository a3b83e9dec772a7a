"""`trainctl cluster up/down/status`, address resolution, and `run` on an embedded Ray."""

from __future__ import annotations

import json

import pytest

from ..helpers import digits_shards, trainctl

pytestmark = pytest.mark.timeout(300)


def test_cluster_up_status_run_down(tmp_path):
    env = {"RAY_ADDRESS": ""}
    up = trainctl("cluster", "up", "--num-cpus", "2", env=env)
    assert up.returncode == 0, up.stderr
    try:
        assert "started at 127.0.0.1:" in up.stdout
        again = trainctl("cluster", "up", env=env)
        assert "already running" in again.stdout  # idempotent

        status = json.loads(trainctl("cluster", "status", "--json", env=env).stdout)
        assert len(status["nodes"]) == 1 and status["nodes"][0]["cpus"] == 2
        assert status["nodes"][0]["address"] == "127.0.0.1"

        # No --address, no RAY_ADDRESS: submit/run go to the head `cluster up` started.
        run = trainctl("run", "examples/digits/ddp.yaml", "--set", "config.epochs=2",
                       "--set", f"checkpoint.storage={tmp_path / 'runs'}", *digits_shards(tmp_path), env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "embedded" not in run.stdout
        listed = json.loads(trainctl("list", "--json", env=env).stdout)
        assert [j["state"] for j in listed] == ["SUCCEEDED"]
    finally:
        down = trainctl("cluster", "down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
    gone = trainctl("list", env=env)
    assert gone.returncode == 2 and "trainctl cluster up" in gone.stderr
    assert "no local cluster" in trainctl("cluster", "down", env=env).stdout


def test_run_without_any_cluster_uses_an_embedded_ray(tmp_path):
    # what `make demo` runs, with checkpoints kept out of the repository
    run = trainctl("run", "examples/digits/ddp.yaml", *digits_shards(tmp_path),
                   "--set", f"checkpoint.storage={tmp_path / 'runs'}", env={"RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "embedded Ray" in run.stdout
    final = run.stdout.strip().splitlines()[-1]
    assert float(final.split("accuracy=")[1].split()[0]) >= 0.95
    checkpoints = sorted(p.name for p in (tmp_path / "runs").glob("*/checkpoint_*"))
    assert checkpoints == ["checkpoint_000013", "checkpoint_000014", "checkpoint_000015"]  # keep: 3


@pytest.mark.parametrize("args, line", [
    (["--port", "99999"], "cluster up: Invalid value for '--port': 99999 is not in the range 1<=x<=65535"),
    (["--num-cpus", "-1"], "cluster up: Invalid value for '--num-cpus': -1 is not in the range x>=0"),
    (["--num-gpus", "-2"], "cluster up: Invalid value for '--num-gpus': -2 is not in the range x>=0"),
])
def test_cluster_up_with_a_bad_value_exits_2_and_starts_nothing(tmp_path, args, line):
    """--port 99999 was an OverflowError traceback; a negative --num-cpus started a head anyway."""
    result = trainctl("cluster", "up", *args, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"trainctl: error: {line}; see 'trainctl cluster up --help'"
    assert not (tmp_path / "trainctl-home").exists()  # no head recorded, no token written


def test_run_of_a_binary_job_file_starts_no_embedded_ray(tmp_path):
    binary = tmp_path / "job.yaml"
    binary.write_bytes(bytes(range(256)))
    result = trainctl("run", str(binary), env={"RAY_ADDRESS": ""})
    assert result.returncode == 2 and "embedded" not in result.stdout
    assert result.stderr.strip().startswith(f"trainctl: error: {binary}: not a text file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_an_address_where_nothing_listens_is_one_line_at_once():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = trainctl("list", "--address", f"127.0.0.1:{port}", timeout=30)  # Ray alone retries for minutes
    assert result.returncode == 2
    assert result.stderr.strip() == (f"trainctl: error: cannot reach the Ray cluster at 127.0.0.1:{port}: "
                                     "Connection refused; check --address or RAY_ADDRESS (HOST:PORT of the head)")


# ---- `cluster up` decides whether the head it started answers (fakes: no failing Ray needed) ----

RAY_NODE_TIMEOUT = ("Exception: The current node timed out during startup. This could happen because "
                    "some of the raylet failed to startup or the GCS has become overloaded.\n")


class FakeRayStart:
    """`ray start --block` as cluster.connect launches it: `rc` None runs on, else it has exited."""

    def __init__(self, pid: int, log, output: str = "", rc: int | None = None):
        self.pid, self.rc = pid, rc
        log.write(output.encode())
        log.flush()

    def poll(self):
        return self.rc


class FakeProbe:
    """The controller probe: `rc` None never answers."""

    def __init__(self, rc: int | None, stderr: str, errors):
        self.rc, self.killed = rc, False
        errors.write(stderr.encode())

    def poll(self):
        return self.rc

    def kill(self):
        self.killed = True
        self.rc = -9

    def wait(self):
        return self.rc


@pytest.fixture
def fake_head(tmp_path, monkeypatch):
    """connect.up with each `ray start` and probe scripted: `starts` and `probes` are consumed in order."""
    from cluster import connect

    monkeypatch.setenv("TRAINCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    script = {"starts": [], "probes": [], "launched": [], "stopped": [], "probe_objs": []}

    def launch(cmd, env, log):
        output, rc = script["starts"].pop(0)
        proc = FakeRayStart(1000 + len(script["launched"]), log, output, rc)
        script["launched"].append((cmd, env))
        return proc

    def probe(command, env, errors):
        rc, stderr = script["probes"].pop(0)
        made = FakeProbe(rc, stderr, errors)
        script["probe_objs"].append((command, made))
        return made

    monkeypatch.setattr(connect, "_launch", launch)
    monkeypatch.setattr(connect, "_probe_head", probe)
    monkeypatch.setattr(connect, "_port_open", lambda port: True)
    monkeypatch.setattr(connect, "_free_port", lambda: 40000 + len(script["launched"]))
    monkeypatch.setattr(connect, "_stop_group", lambda proc: script["stopped"].append(proc.pid))
    return script


def _up(**kwargs):
    from cluster import connect

    return connect.up(num_cpus=2, state="/tmp/state", probe=["probe-cmd"], **kwargs)


def test_cluster_up_records_a_head_only_once_its_probe_answers(fake_head, tmp_path):
    fake_head["starts"] = [("Ray runtime started.\n", None)]
    fake_head["probes"] = [(0, "")]
    info = _up()
    assert info["address"] == "127.0.0.1:40000" and info["pid"] == 1000
    assert fake_head["probe_objs"][0][0] == ["probe-cmd", "127.0.0.1:40000"]  # the head's own address
    assert json.loads((tmp_path / "home" / "cluster.json").read_text())["address"] == "127.0.0.1:40000"
    assert fake_head["stopped"] == []
    env = fake_head["launched"][0][1]
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_ADDRESS" not in env


def test_cluster_up_retries_once_when_ray_times_out_starting_the_node(fake_head, tmp_path):
    """What a loaded machine did: `ray start` gave up on its raylet, yet `cluster up` said started."""
    fake_head["starts"] = [(RAY_NODE_TIMEOUT, 1), ("Ray runtime started.\n", None)]
    fake_head["probes"] = [(0, "")]
    info = _up()
    assert [pid for pid in fake_head["stopped"]] == [1000]  # the first head's processes are gone
    assert info["pid"] == 1001 and info["address"] == "127.0.0.1:40001"
    assert "starting it once more" in (tmp_path / "home" / "cluster.log").read_text()


def test_cluster_up_that_fails_twice_says_why_and_records_nothing(fake_head, tmp_path):
    from cluster.connect import HeadStartError

    logs = tmp_path / "raytmp" / "ray" / "session_2026-12-01_16-00-00_123456_1001" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text("[...] (raylet) node_manager.cc:3576: Check failed: status.has_value() "
                                     f"Timed out waiting for file {logs.parent}/dashboard_agent_listen_port_ab12\n")
    fake_head["starts"] = [(RAY_NODE_TIMEOUT, 1), (RAY_NODE_TIMEOUT, 1)]
    with pytest.raises(HeadStartError) as failed:
        _up()
    home = tmp_path / "home"
    assert str(failed.value) == (
        "the Ray head did not start: its node timed out during startup (the raylet did not register: "
        "GCS overloaded?), also on a second try; its raylet aborted: Timed out waiting for file "
        "dashboard_agent_listen_port_ab12 (a Ray agent started slower than the raylet waits for it; a loaded "
        f"machine?); nothing was recorded; see {home / 'cluster.log'} and Ray's logs in {logs}")
    assert fake_head["stopped"] == [1000, 1001]
    assert not (home / "cluster.json").exists()


def test_cluster_up_whose_controller_does_not_answer_is_stopped_without_a_retry(fake_head, tmp_path):
    from cluster.connect import HeadStartError

    fake_head["starts"] = [("Ray runtime started.\n", None)]
    fake_head["probes"] = [(1, "some Ray warning\nRayActorError: The actor died unexpectedly\n")]
    with pytest.raises(HeadStartError, match=r"did not start: it does not answer \(RayActorError: The actor "
                                             r"died unexpectedly\); nothing was recorded; see .*cluster.log$"):
        _up()
    assert fake_head["stopped"] == [1000] and len(fake_head["launched"]) == 1
    assert not (tmp_path / "home" / "cluster.json").exists()


def test_cluster_up_gives_up_on_a_head_that_never_answers(fake_head, tmp_path):
    from cluster.connect import HeadStartError

    fake_head["starts"] = [("", None)]
    fake_head["probes"] = [(None, "")]  # ray.init hangs
    with pytest.raises(HeadStartError, match="did not start: it did not answer within 0 s; nothing was recorded"):
        _up(timeout_s=0.3)
    assert fake_head["probe_objs"][0][1].killed and fake_head["stopped"] == [1000]
    assert not (tmp_path / "home" / "cluster.json").exists()


@pytest.mark.parametrize("rc, probe, log, cause, retry", [
    (None, 0, "Ray runtime started.", "", False),
    (1, None, "Traceback ...\nValueError: bad --num-cpus\n", "`ray start` exited with code 1 (ValueError: bad --num-cpus)", False),
    (1, None, RAY_NODE_TIMEOUT, "its node timed out during startup", True),
    (None, None, "", "it did not answer within 90 s", False),
    (None, 1, "", "it does not answer (boom)", False),
    (0, 0, "", "`ray start` exited with code 0", False),  # `--block` never exits while its head lives
])
def test_head_verdict(rc, probe, log, cause, retry):
    from cluster.connect import head_verdict

    verdict = head_verdict(rc, probe, log, "boom", 90)
    assert verdict.cause.startswith(cause) and verdict.retry == retry and verdict.ok == (cause == "")


def test_raylet_abort_names_what_the_raylet_gave_up_on():
    from cluster.connect import raylet_abort

    log = ("[2026-12-01 16:44:28,824 I 29154 29189] (raylet) agent_manager.cc:81: Monitor agent process\n"
           "[2026-12-01 16:44:44,828 C 29154 29154] (raylet) node_manager.cc:3576:  An unexpected system state "
           "has occurred. Check failed: statussetor3576.has_value() Timed out waiting for file "
           "/tmp/ray/session_2026-12-01_16-44-24_234877_28862/metrics_agent_port_33241c2d\n*** StackTrace ***\n")
    assert raylet_abort(log) == ("Timed out waiting for file metrics_agent_port_33241c2d (a Ray agent started "
                                 "slower than the raylet waits for it; a loaded machine?)")
    assert raylet_abort("[...] (raylet) main.cc:1: started\n") == ""
