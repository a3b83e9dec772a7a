"""Script jobs (`command:`) end to end on a simulated 2-node Ray cluster: an unmodified DDP
script trains, is SIGKILLed and resumes from its own snapshot; a failing script restarts and
then fails with its exit code; orchestrator.report feeds status; cancel leaves no process."""

from __future__ import annotations

import signal

import psutil
import pytest
import torch

from ..helpers import REPO, pid_alive, trainctl, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SCRIPTS = REPO / "tests" / "jobs" / "scripts"
EXAMPLE = REPO / "examples" / "torchrun_script"


def _script_job(name, tmp_path, command, **fields):
    return {"name": name, "command": command, "working_dir": str(SCRIPTS),
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"storage": str(tmp_path / "runs")}, "failure": {"max_restarts": 1}, **fields}


def _script_processes(job, marker: str) -> dict[int, psutil.Process]:
    """Per rank: the process running the script (a descendant of the rank's actor)."""
    found = {}
    for p in job["placement"]:
        try:
            for child in psutil.Process(p["pid"]).children(recursive=True):
                cmdline = child.cmdline()
                if any(marker in word for word in cmdline) and not any("script_guard" in w for w in cmdline):
                    found[p["rank"]] = child
        except psutil.NoSuchProcess:
            pass
    return found


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_an_unmodified_ddp_script_trains_on_two_nodes_is_killed_and_resumes_from_its_snapshot(client, ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    done = trainctl("submit", "--address", ray_cluster.address, "--nnodes", "2", "--nproc-per-node", "1",
                    "--set", f"checkpoint.storage={storage}", "--set", "failure.max_restarts=2", "--",
                    "python", "multinode.py", "30", "2", "--snapshot-path", "$TRAINCTL_CHECKPOINT_DIR/snapshot.pt",
                    "--dataset-size", "128", "--epoch-delay", "0.3", cwd=EXAMPLE)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    snapshot = storage / job_id / "script" / "snapshot.pt"

    def epochs_saved():
        try:
            return torch.load(snapshot, weights_only=True)["EPOCHS_RUN"]
        except Exception:  # not there yet, or being replaced
            return 0

    wait_for(lambda: epochs_saved() >= 4, 150, what="the script's snapshot at epoch 4")
    job = client.get(job_id)
    assert job["name"] == "multinode" and job["state"] == "RUNNING"
    assert len({p["node_id"] for p in job["placement"]}) == 2  # --nnodes 2: one rank on each node
    scripts = wait_for(lambda: (s := _script_processes(job, "multinode.py")) and len(s) == 2 and s, 30,
                       what="both ranks' script processes")
    scripts[1].send_signal(signal.SIGKILL)

    final = client.wait(job_id, timeout_s=200)
    assert final["state"] == "SUCCEEDED", final.get("error")
    assert len(final["restarts"]) == 1, final["restarts"]
    for proc in scripts.values():  # the killed rank's, and its peer's of the first attempt: no orphan
        wait_for(lambda proc=proc: _gone(proc), 30, what=f"first attempt's script {proc.pid} gone")
    text, _ = client.read_logs(job_id)
    resumed = [line for line in text.splitlines() if line.startswith("[rank 0] Resuming training from snapshot at Epoch")]
    assert resumed and int(resumed[-1].rsplit(" ", 1)[1]) >= 4, text[-3000:]
    assert "[rank 0] Training finished after 30 epochs" in text
    assert "[rank 1] [RANK1] Epoch 29" in text  # the other node's rank logs too
    assert epochs_saved() == 30


def test_a_script_that_exits_1_restarts_then_fails_with_its_exit_code_and_last_lines(client, tmp_path):
    job_id = client.submit(_script_job("exit-one", tmp_path, ["python", "exit_one.py"]))
    job = client.wait(job_id, timeout_s=120)
    assert job["state"] == "FAILED"
    assert len(job["restarts"]) == 1
    assert "`python exit_one.py` exited with code 3" in job["error"]
    assert "attempt 1: about to fail | RuntimeError: the data ran out" in job["error"]
    text, _ = client.read_logs(job_id)
    assert "[rank 0] attempt 0: about to fail" in text and "[rank 0] attempt 1: about to fail" in text


def test_a_script_reporting_with_orchestrator_report_shows_its_loss_in_status(client, tmp_path):
    job_id = client.submit(_script_job("report-loss", tmp_path, ["python", "report_loss.py"]))
    job = client.wait(job_id, timeout_s=120)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["metrics"]["loss"] == pytest.approx(0.2) and job["metrics"]["step"] == 5
    assert job["progress"]["total_steps"] == 5
    text, _ = client.read_logs(job_id)
    env_line = next(line for line in text.splitlines() if line.startswith("[rank 0] env "))
    assert "<unset>" not in env_line, env_line
    assert f"TORCHELASTIC_RUN_ID={job_id}" in env_line and "ROLE_NAME=default" in env_line


def test_a_lightning_fabric_script_launched_as_under_torchrun_runs_on_two_nodes(client, tmp_path):
    pytest.importorskip("lightning_fabric")
    spec = {**_script_job("fabric", tmp_path, ["python", "fabric_train.py", "--num-nodes", "2", "--devices", "1",
                                               "--epochs", "3", "--checkpoint", "$TRAINCTL_CHECKPOINT_DIR/fabric.ckpt"]),
            "working_dir": str(EXAMPLE), "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"}}
    job = client.wait(client.submit(spec), timeout_s=200)
    assert job["state"] == "SUCCEEDED", job.get("error")
    text, _ = client.read_logs(job["id"])
    assert "[rank 0] epoch 2 loss" in text and "world_size 2" in text, text[-2000:]
    assert (tmp_path / "runs" / job["id"] / "script" / "fabric.ckpt").exists()


def test_an_hf_accelerate_script_launched_as_under_torchrun_runs_on_two_nodes(client, tmp_path):
    pytest.importorskip("accelerate")
    spec = {**_script_job("accelerate", tmp_path, ["python", "accelerate_train.py", "--epochs", "3",
                                                   "--checkpoint", "$TRAINCTL_CHECKPOINT_DIR/accelerate"]),
            "working_dir": str(EXAMPLE), "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"}}
    job = client.wait(client.submit(spec), timeout_s=200)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert len({p["node_id"] for p in job["placement"]}) == 2
    text, _ = client.read_logs(job["id"])
    assert "[rank 0] epoch 2 loss" in text and "num_processes 2 (DistributedType.MULTI_CPU)" in text, text[-2000:]
    state = tmp_path / "runs" / job["id"] / "script" / "accelerate"
    assert (state / "epoch.txt").read_text() == "3" and (state / "random_states_1.pkl").exists()  # both ranks saved


def test_a_hung_script_is_named_by_the_scripts_own_frame_and_restarts(client, tmp_path):
    """The stack dump and the hang cause come from the script's process, not the rank waiting
    for it (nor its guard): py-spy reads the rank's whole process tree."""
    spec = {**_script_job("script-hang", tmp_path, ["python", "hang_script.py", "12", "4"]),
            "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "spread"},
            # 20 s: on 2 loaded cores both ranks once went 11 s between reports while training
            "failure": {"max_restarts": 1, "hang_timeout_s": 20}}
    job = client.wait(client.submit(spec), timeout_s=240)
    assert job["state"] == "SUCCEEDED", job.get("error")
    [restart] = job["restarts"]
    cause = restart["cause"]
    node = next(p for p in job["placement"] if p["rank"] == 1)["node_ip"]
    assert restart["kind"] == "hang" and cause.startswith("hang: rank 1 silent for "), cause
    assert f"on node {node} (" in cause and "in stuck_in_user_code (hang_script.py:18)" in cause, cause
    assert "also rank 0 silent" in cause and "in all_reduce (hang_script.py:29)" in cause, cause
    text, _ = client.read_logs(job["id"])
    assert "[rank 1]     stuck_in_user_code (" in text and "script_guard.py" in text  # the whole tree
    assert "[rank 0] step 12 world 2" in text


def test_cancel_leaves_no_process_of_the_script_behind(client, tmp_path):
    job_id = client.submit(_script_job("forever", tmp_path, ["python", "sleep_forever.py"]))
    wait_for(lambda: client.get(job_id)["state"] == "RUNNING", 90, what="running")
    job = client.get(job_id)
    tree = wait_for(lambda: _tree(job["placement"][0]["pid"]), 60, what="the script and its helper")
    assert client.cancel(job_id)["state"] == "CANCELLED"
    for proc in tree:
        wait_for(lambda proc=proc: _gone(proc), 30, what=f"process {proc.pid} of the script's tree gone")
    assert not pid_alive(job["placement"][0]["pid"]) or _gone(psutil.Process(job["placement"][0]["pid"]))


def _tree(actor_pid: int) -> list[psutil.Process] | None:
    """The guard, the script and the script's helper, once all three exist."""
    try:
        kids = psutil.Process(actor_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    helper = [k for k in kids if "time.sleep(3600)" in " ".join(_cmdline(k))]
    return kids if helper and len(kids) >= 3 else None


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.NoSuchProcess:
        return []

