"""The real `trainctl` executable against a simulated 2-node cluster (and without one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from .helpers import REPO, TRAINCTL, digits_shards, trainctl, wait_for

pytestmark = pytest.mark.timeout(300)

GOOD = """\
name: cli-job
entrypoint: tests.jobs.train_fns:gated
working_dir: {repo}
config: {{epochs: 2}}
resources: {{workers: 2, cpus_per_worker: 1, placement: spread}}
strategy: {{name: ddp}}
checkpoint: {{storage: {runs}}}
"""


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD.format(repo=REPO, runs=tmp_path / "runs"))
    return path


def _one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainctl: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- bad input: exit 2, one line, nothing created (no cluster needed) ------------------

@pytest.mark.parametrize("edit, needles", [
    (lambda t: t + "bogus: 1\n", ["bogus", "unknown field"]),
    (lambda t: t.replace("workers: 2", "workers: two"), ["resources.workers", "integer"]),
    (lambda t: t.replace("name: ddp", "name: nosuch"), ["unknown strategy 'nosuch'", "ddp"]),
    (lambda t: t.replace("name: ddp", "name: ddp, options: {nope: 1}"), ["unknown option 'nope'", "bucket_cap_mb"]),
    (lambda t: t.replace("train_fns:gated", "no_such_module:train"), ["entrypoint", "no_such_module"]),
    (lambda t: t.replace("train_fns:gated", "train_fns:missing"), ["entrypoint", "missing"]),
    (lambda t: t.replace("cli-job", "bad name!"), ["name"]),
    (lambda t: t + "resources: [\n", ["line", "YAML"]),
])
def test_bad_spec_exits_2_with_one_line(job_file, tmp_path, edit, needles):
    job_file.write_text(edit(job_file.read_text()))
    _one_line_error(trainctl("run", str(job_file)), *needles)
    assert not (tmp_path / "runs").exists()


def test_bad_data_split_exits_2(job_file, tmp_path):
    from .datasets import write_dataset

    missing = trainctl("run", str(job_file), "--set", f"data.train.path={tmp_path / 'nope'}")
    _one_line_error(missing, "data.train", "no manifest.json")
    ds = write_dataset(tmp_path / "ds", [10])
    no_column = trainctl("run", str(job_file), "--set", f"data.train.path={ds}",
                         "--set", "data.train.columns=[id, pixels]")
    _one_line_error(no_column, "data.train", "column 'pixels' does not exist")
    assert not (tmp_path / "runs").exists()


def test_data_shard_and_inspect_errors_exit_2(tmp_path):
    _one_line_error(trainctl("data", "shard", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")),
                    "nope.csv")
    _one_line_error(trainctl("data", "inspect", str(tmp_path)), "no manifest.json")


def test_pipeline_split_point_that_does_not_exist_exits_2_before_reserving(tmp_path):
    """The GPT example's build_model lets trainctl check split points on the meta device."""
    from .test_jobs_cluster import _gpt_data

    path = _gpt_data(tmp_path, 20_000)["data"]["train"]["path"]
    result = trainctl("submit", "examples/gpt/pipeline.yaml", "--set", f"data.train.path={path}",
                      "--set", "strategy.options.split_points=[blocks.9]")
    _one_line_error(result, "strategy: pipeline split point 'blocks.9' is not a module of the model",
                    "split at one of: tok, pos, blocks.0")


def test_hybrid_mesh_that_does_not_fit_the_workers_exits_2(tmp_path):
    from .test_jobs_cluster import _gpt_data

    path = _gpt_data(tmp_path, 20_000)["data"]["train"]["path"]
    result = trainctl("submit", "examples/gpt/hybrid.yaml", "--set", f"data.train.path={path}",
                      "--set", "strategy.options.pp=2")
    _one_line_error(result, "strategy: the mesh pp 2 × dp 2 × tp 2 has 8 ranks but the job has 4 workers")


def test_bad_override_exits_2(job_file, tmp_path):
    _one_line_error(trainctl("run", str(job_file), "--set", "resources.workers=0"), "resources.workers")
    _one_line_error(trainctl("run", str(job_file), "--set", "noequals"), "key.path=value")
    assert not (tmp_path / "runs").exists()


def test_missing_job_file_exits_2(tmp_path):
    _one_line_error(trainctl("run", str(tmp_path / "nope.yaml")), "nope.yaml", "no such job file")


def test_submit_without_a_cluster_gives_a_hint(job_file, monkeypatch):
    env = {"RAY_ADDRESS": ""}
    _one_line_error(trainctl("submit", str(job_file), env=env), "trainctl cluster up", "--address")
    _one_line_error(trainctl("list", env=env), "no Ray cluster")


def test_schema_prints_the_json_schema():
    result = trainctl("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert {"name", "entrypoint", "resources", "strategy", "checkpoint", "failure"} <= set(schema["properties"])


# ---- against a cluster ---------------------------------------------------------------------

def test_gpu_request_on_a_cluster_without_gpus_exits_2(ray_cluster, job_file):
    result = trainctl("submit", str(job_file), "--address", ray_cluster.address,
                      "--set", "resources.gpus_per_worker=1")
    _one_line_error(result, "resources.gpus_per_worker", "GPU")


def test_submit_list_status_logs(ray_cluster, job_file):
    addr = ["--address", ray_cluster.address]
    result = trainctl("submit", str(job_file), *addr)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()

    def finished():
        out = trainctl("status", job_id, "--json", *addr)
        return out.returncode == 0 and json.loads(out.stdout)["state"] in ("SUCCEEDED", "FAILED") \
            and json.loads(out.stdout)
    job = wait_for(finished, 120, interval=1, what="job to finish")
    assert job["state"] == "SUCCEEDED", job["error"]
    assert {"id", "name", "state", "placement", "restarts", "metrics", "checkpoint", "error"} <= set(job)
    assert sorted(p["rank"] for p in job["placement"]) == [0, 1]

    listed = json.loads(trainctl("list", "--json", *addr).stdout)
    assert job_id in [j["id"] for j in listed]
    table = trainctl("list", *addr).stdout
    assert job_id in table and "SUCCEEDED" in table and "ddp" in table

    human = trainctl("status", job_id, *addr).stdout
    assert "placement" in human and "rank 1" in human

    logs = trainctl("logs", job_id, *addr).stdout
    assert "[rank 0] finished epoch 1" in logs and "[rank 1] finished epoch 1" in logs
    assert trainctl("logs", job_id, "--follow", *addr).stdout == logs  # ended job: --follow returns
    only_1 = trainctl("logs", job_id, "--rank", "1", *addr).stdout.splitlines()
    assert only_1 and all(line.startswith("[rank 1] ") for line in only_1)

    _one_line_error(trainctl("status", "no-such-job", *addr), "no job 'no-such-job'")


def test_run_follows_to_the_end_and_prints_the_accuracy(ray_cluster, tmp_path):
    result = trainctl("run", "examples/digits/ddp.yaml", "--address", ray_cluster.address,
                      "--set", "config.epochs=4", "--logs", *digits_shards(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank 0] epoch 3: loss" in result.stdout  # --logs streams the ranks' output
    final = result.stdout.strip().splitlines()[-1]
    assert "SUCCEEDED" in final
    accuracy = float(final.split("accuracy=")[1].split()[0])
    assert accuracy >= 0.9


def test_run_of_a_failing_job_exits_1(ray_cluster, job_file):
    result = trainctl("run", str(job_file), "--address", ray_cluster.address,
                      "--set", "entrypoint=tests.jobs.train_fns:fails_fatally")
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "bad data in shard 3" in result.stdout


def test_ctrl_c_cancels_the_job_and_exits_130(ray_cluster, job_file, tmp_path):
    from orchestrator.client import Client

    gate = tmp_path / "never"
    proc = subprocess.Popen(
        [*TRAINCTL, "run", str(job_file), "--address", ray_cluster.address,
         "--set", f"config.gate={gate}", "--set", "config.epochs=3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = Client(ray_cluster.address)
        job = wait_for(lambda: next((j for j in client.list() if j["name"] == "cli-job"
                                     and j["state"] == "RUNNING"), None), 120, what="job running")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert client.get(job["id"])["state"] == "CANCELLED"


def test_cancel_command(ray_cluster, job_file, tmp_path):
    addr = ["--address", ray_cluster.address]
    job_id = trainctl("submit", str(job_file), *addr, "--set", f"config.gate={tmp_path / 'g'}",
                      "--set", "config.epochs=3").stdout.strip()
    wait_for(lambda: json.loads(trainctl("status", job_id, "--json", *addr).stdout)["state"] == "RUNNING",
             120, interval=1, what="running")
    result = trainctl("cancel", job_id, *addr)
    assert result.returncode == 0 and "CANCELLED" in result.stdout
    _one_line_error(trainctl("cancel", job_id, *addr), "already ended")


def test_python_m_orchestrator_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "submit" in result.stdout and "cluster" in result.stdout


def test_python_api_inside_a_users_own_ray_session_shares_the_cluster_controller(ray_cluster, job_file):
    """A driver that called ray.init() itself (anonymous namespace) still reaches the
    one controller the CLI uses."""
    code = (
        f"import ray; ray.init(address={ray_cluster.address!r}, log_to_driver=False)\n"
        "from orchestrator.client import Client\n"
        f"print(Client().submit({str(job_file)!r}))\n"
    )
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip().splitlines()[-1]
    listed = json.loads(trainctl("list", "--json", "--address", ray_cluster.address).stdout)
    assert job_id in [j["id"] for j in listed]
