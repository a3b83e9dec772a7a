"""The real `trainctl` executable against a simulated 2-node cluster (and without one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from ..helpers import REPO, TRAINCTL, digits_shards, trainctl, wait_for

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
    (lambda t: t.replace("cli-job", "bad name!"),
     ["name: 'bad name!' is not allowed; a job name is 1 to 63 letters, digits, '.', '_' or '-', starting with"]),
    (lambda t: t.replace("placement: spread", "placement: everywhere"),
     ["resources.placement: 'everywhere' is not one of pack, spread, strict_spread or strict_pack"]),
    (lambda t: t.replace("name: ddp", "name: ddp, options: {bucket_cap_mb: lots}"),
     ["strategy.options.bucket_cap_mb (of strategy 'ddp'): 'lots' is not a number; give a number"]),
    (lambda t: t.replace("strategy: {name: ddp}", "strategy: ddp"),
     ["strategy: 'ddp' is text, not a mapping; write it as a mapping of its fields (name, options)"]),
    (lambda t: t + "resources: [\n", ["line", "YAML"]),
])
def test_bad_spec_exits_2_with_one_line(job_file, tmp_path, edit, needles):
    job_file.write_text(edit(job_file.read_text()))
    _one_line_error(trainctl("run", str(job_file)), *needles)
    assert not (tmp_path / "runs").exists()


def test_bad_data_split_exits_2(job_file, tmp_path):
    from ..datasets import write_dataset

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
    (tmp_path / "manifest.json").write_bytes(bytes(range(128, 256)))  # was a UnicodeDecodeError traceback
    _one_line_error(trainctl("data", "inspect", str(tmp_path)),
                    f"{tmp_path / 'manifest.json'}: not a valid trainctl manifest")


def test_pipeline_split_point_that_does_not_exist_exits_2_before_reserving(tmp_path):
    """The GPT example's build_model lets trainctl check split points on the meta device."""
    from tests.cluster.test_jobs_cluster import _gpt_data

    path = _gpt_data(tmp_path, 20_000)["data"]["train"]["path"]
    result = trainctl("submit", "examples/gpt/pipeline.yaml", "--set", f"data.train.path={path}",
                      "--set", "strategy.options.split_points=[blocks.9]")
    _one_line_error(result, "strategy: pipeline split point 'blocks.9' is not a module of the model",
                    "split at one of: tok, pos, blocks.0")


def test_hybrid_mesh_that_does_not_fit_the_workers_exits_2(tmp_path):
    from tests.cluster.test_jobs_cluster import _gpt_data

    path = _gpt_data(tmp_path, 20_000)["data"]["train"]["path"]
    result = trainctl("submit", "examples/gpt/hybrid.yaml", "--set", f"data.train.path={path}",
                      "--set", "strategy.options.pp=2")
    _one_line_error(result, "strategy: the mesh pp 2 × dp 2 × tp 2 has 8 ranks but the job has 4 workers")


def test_bad_override_exits_2(job_file, tmp_path):
    _one_line_error(trainctl("run", str(job_file), "--set", "resources.workers=0"), "resources.workers")
    _one_line_error(trainctl("run", str(job_file), "--set", "noequals"), "key.path=value")
    assert not (tmp_path / "runs").exists()


def test_a_job_file_that_is_not_text_exits_2(job_file, tmp_path):
    """A checkpoint or a tarball passed by mistake: one line, not a UnicodeDecodeError traceback."""
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02}q\x00")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(job_file.read_bytes().replace(b"cli-job", b"cli\x00job"))
    before = sorted(tmp_path.rglob("*"))
    for verb in ("run", "submit"):
        _one_line_error(trainctl(verb, str(binary), env={"RAY_ADDRESS": ""}),
                        f"{binary}: not a text file (byte 0x80 at offset 0 is not UTF-8); pass the path of a job YAML")
    _one_line_error(trainctl("run", str(nul)), f"{nul}: character U+0000 at offset", "not allowed in YAML")
    assert sorted(tmp_path.rglob("*")) == before  # no job, no runs/ directory


def test_compress_with_a_passes_or_job_file_that_is_not_text_exits_2(job_file, tmp_path):
    checkpoint = tmp_path / "checkpoint_000001"
    (checkpoint / "tensors").mkdir(parents=True)
    (checkpoint / "manifest.json").write_text("{}")
    binary = tmp_path / "passes.bin"
    binary.write_bytes(bytes(range(128, 256)))
    passes = tmp_path / "passes.yaml"
    passes.write_text("passes: [{quantize: {method: dynamic_int8}}]\n")
    _one_line_error(trainctl("compress", str(checkpoint), "--passes", str(binary)),
                    f"{binary}: not a text file", "pass the path of a passes YAML")
    _one_line_error(trainctl("compress", str(checkpoint), "--passes", str(passes), "--job", str(binary)),
                    f"{binary}: not a text file", "pass the path of a job YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- prune\n")
    _one_line_error(trainctl("compress", str(checkpoint), "--passes", str(listed)),
                    f"{listed}: a passes file must be a mapping of fields (passes, gate, eval, or a whole job spec); "
                    "it holds a list")
    assert not (checkpoint.parent / "post_training").exists()


def test_compress_on_a_directory_that_is_not_a_checkpoint_exits_2(tmp_path):
    passes = tmp_path / "passes.yaml"
    passes.write_text("passes: [{quantize: {method: dynamic_int8}}]\n")
    _one_line_error(trainctl("compress", str(tmp_path), "--passes", str(passes)),
                    f"{tmp_path}: not a trainctl checkpoint directory (no tensors/)")
    (tmp_path / "tensors").mkdir()  # half written, never committed
    _one_line_error(trainctl("compress", str(tmp_path), "--passes", str(passes)),
                    f"{tmp_path}: not a trainctl checkpoint directory (no manifest.json)")
    assert not (tmp_path / "post_training").exists()


@pytest.mark.parametrize("args, line", [
    (["status"], "status: Missing argument 'JOB_ID'; see 'trainctl status --help'"),
    (["logs"], "logs: Missing argument 'JOB_ID'; see 'trainctl logs --help'"),
    (["cancel"], "cancel: Missing argument 'JOB_ID'; see 'trainctl cancel --help'"),
    (["run"], "run: Missing argument 'JOB_FILE' (or a command after --, e.g. trainctl run --workers 2 -- python "
              "train.py); see 'trainctl run --help'"),
    (["submit", "job.yaml", "--priority", "high"],
     "submit: Invalid value for '--priority': 'high' is not a valid integer; see 'trainctl submit --help'"),
    (["list", "--bogus"], "list: No such option '--bogus'"),
    (["stats"], "No such command 'stats' (did you mean 'status'?); see 'trainctl --help'"),
    (["list", "--jsn"], "list: No such option '--jsn' (did you mean '--json'?); see 'trainctl list --help'"),
    (["compress", "ckpt"], "compress: Missing option '--passes'; see 'trainctl compress --help'"),
    (["compress", "ckpt", "--passes", "p.yaml", "--threads", "0"], "compress: Invalid value for '--threads'"),
    (["data", "shard", "a.csv"], "data shard: Missing option '--out'; see 'trainctl data shard --help'"),
    (["cluster", "up", "--num-cpus", "many"], "cluster up: Invalid value for '--num-cpus'"),
    (["logs", "some-job", "--rank", "first"], "logs: Invalid value for '--rank'"),
    (["top", "--interval", "-1"], "top: Invalid value for '--interval': -1.0 is not in the range x>0"),
])
def test_a_command_line_mistake_is_one_line(args, line):
    """click's three-line usage block becomes the same one line as every other bad input."""
    from click.testing import CliRunner

    from orchestrator.client.cli import main

    ran = CliRunner().invoke(main, args, prog_name="trainctl")  # in-process: no interpreter start per case
    _one_line_error(subprocess.CompletedProcess(args, ran.exit_code, ran.stdout, ran.stderr), line)


def test_a_group_alone_still_prints_its_help():
    result = trainctl("data")
    assert "shard" in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_an_address_that_is_not_host_port_exits_2():
    _one_line_error(trainctl("list", "--address", "nonsense"), "cannot reach the Ray cluster at nonsense",
                    "HOST:PORT")


def test_job_not_found_crosses_ray_unchanged():
    """The controller's error is pickled to the client; rebuilt from its message, it used to
    read: no job "no job 'x'; 'trainctl list' shows the jobs"; 'trainctl list' shows the jobs."""
    import pickle

    import cloudpickle

    from orchestrator.errors import JobNotFound, UserError

    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        again = loads(dumps(JobNotFound("nope")))
        assert type(again) is JobNotFound and again.job_id == "nope"
        assert str(again) == "no job 'nope'; 'trainctl list' shows the jobs"
        plain = loads(dumps(UserError("job x already ended (SUCCEEDED); nothing to cancel")))
        assert str(plain) == "job x already ended (SUCCEEDED); nothing to cancel"


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


def test_an_unknown_job_id_is_one_clean_line_for_every_verb_and_the_python_api(ray_cluster):
    from orchestrator import JobNotFound
    from orchestrator.client.api import Client

    line = "no job 'nope'; 'trainctl list' shows the jobs"
    addr = ["--address", ray_cluster.address]
    for args in (["status", "nope"], ["status", "nope", "--json"], ["status", "nope", "--watch"],
                 ["logs", "nope"], ["logs", "nope", "--follow"], ["cancel", "nope"]):
        assert _one_line_error(trainctl(*args, *addr), line) == f"trainctl: error: {line}", args
    client = Client(ray_cluster.address)
    for call in (client.get, client.cancel, client.read_logs, client.wait):
        with pytest.raises(JobNotFound) as info:
            call("nope")
        assert str(info.value) == line, call


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
    from orchestrator.client.api import Client

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


def test_list_filters_by_state_pages_and_ships_summaries(ray_cluster):
    """After the jobs above: `list` shows summaries, filtered and paged by the controller."""
    import orchestrator

    addr = ["--address", ray_cluster.address]
    everything = json.loads(trainctl("list", "--json", "--all", *addr).stdout)
    assert len(everything) >= 3 and all("spec" not in j and "history" not in j for j in everything)
    assert {"id", "name", "state", "strategy", "workers", "progress", "submitted_at"} <= set(everything[0])
    cancelled = json.loads(trainctl("list", "--json", "--state", "cancelled", *addr).stdout)
    assert cancelled and {j["state"] for j in cancelled} == {"CANCELLED"}
    newest = json.loads(trainctl("list", "--json", "--all", "--limit", "1", *addr).stdout)
    assert [j["id"] for j in newest] == [max(everything, key=lambda j: j["submitted_at"])["id"]]
    client = orchestrator.Client(ray_cluster.address)
    assert client.list(ended_since=time.time() + 60) == []  # every job above has ended
    _one_line_error(trainctl("list", "--state", "DONE", *addr), "--state")


def test_python_m_orchestrator_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "submit" in result.stdout and "cluster" in result.stdout


def test_python_api_inside_a_users_own_ray_session_shares_the_cluster_controller(ray_cluster, job_file):
    """A driver that called ray.init() itself (anonymous namespace) still reaches the
    one controller the CLI uses."""
    code = (
        f"import ray; ray.init(address={ray_cluster.address!r}, log_to_driver=False)\n"
        "from orchestrator.client.api import Client\n"
        f"print(Client().submit({str(job_file)!r}))\n"
    )
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip().splitlines()[-1]
    listed = json.loads(trainctl("list", "--json", "--address", ray_cluster.address).stdout)
    assert job_id in [j["id"] for j in listed]
