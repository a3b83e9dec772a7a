"""`trainctl cluster up/down/status`, address resolution, and `run` on an embedded Ray."""

from __future__ import annotations

import json

import pytest

from .helpers import digits_shards, trainctl

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
