"""A rank's output is captured at the file-descriptor level, so what C++ libraries write and
the stack faulthandler prints as a rank dies by a signal reach `trainctl logs`; the job's
error names the signal. A full checkpoint storage fails the job with one line.

The capture itself is tested in child processes (a rank must be able to die for real, and
pytest's own fd capture must not be disturbed); then whole jobs on the shared 2-node cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from orchestrator.control.failure import fatal_signal
from orchestrator.runtime.reporting import read_spool, spool_path
from orchestrator.runtime.worker_entry import apply_nccl_env_defaults

from ..helpers import REPO, job_spec

# A child process that plays a rank: its output captured as run_rank does, shipped events
# written to `events.json` when it ends normally; with `crash` it dies instead.
RANK = textwrap.dedent("""
    import ctypes, json, os, sys
    from orchestrator.runtime.reporting import Reporter, captured_output

    class Collecting(Reporter):  # keeps what would be pushed to the supervisor
        def __init__(self):
            super().__init__(None, rank=3, interval_s=0.05)
            self.shipped = []

        def flush(self, wait=False):
            for poll in list(self.pollers):
                poll()
            self.shipped += self._take()

    job, out, crash = sys.argv[1], sys.argv[2], sys.argv[3]
    reporter = Collecting()
    with captured_output(reporter, job, 3, 0):
        print("python print")
        os.write(2, b"raw fd 2\\n")
        ctypes.CDLL(None).dprintf(1, b"libc dprintf %d\\n", ctypes.c_int(7))
        sys.stderr.write("no newline at the end")
        if crash == "segv":
            ctypes.string_at(0)
        elif crash == "abort":
            os.abort()
    reporter.close()
    lines = [line for kind, _, p in reporter.shipped if kind == "output" for line in p["lines"]]
    json.dump({"lines": lines}, open(out, "w"))
""")


def _run_rank(tmp_path, job: str, crash: str = "none"):
    out = tmp_path / "events.json"
    done = subprocess.run([sys.executable, "-c", RANK, job, str(out), crash], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return done, out


@pytest.mark.timeout(90)
def test_every_writer_of_fds_1_and_2_reaches_the_log_once(tmp_path):
    job = f"capture-{tmp_path.name}"
    done, out = _run_rank(tmp_path, job)
    assert done.returncode == 0, done.stderr
    lines = json.loads(out.read_text())["lines"]
    assert lines == ["python print", "raw fd 2", "libc dprintf 7", "no newline at the end"]
    # written through to the original fd (Ray's worker log) too
    assert done.stderr.splitlines()[:3] == ["python print", "raw fd 2", "libc dprintf 7"]
    assert not spool_path(job, 3, 0).exists()  # a rank that ends removes its spool


@pytest.mark.timeout(90)
@pytest.mark.parametrize("crash, signal", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_rank_killed_by_a_signal_leaves_its_stack_in_its_spool(tmp_path, crash, signal):
    job = f"crash-{crash}-{tmp_path.name}"
    done, _ = _run_rank(tmp_path, job, crash)
    assert done.returncode == -getattr(__import__("signal"), signal)
    found = read_spool(str(spool_path(job, 3, 0)), offset=0)
    assert "raw fd 2\nlibc dprintf 7\n" in found.text
    assert fatal_signal(found.text) == signal
    assert 'File "<string>", line' in found.text  # the Python stack of the crashing thread
    assert not spool_path(job, 3, 0).exists()  # read once, then removed


def test_read_spool_starts_where_the_log_stopped(tmp_path):
    path = tmp_path / "spool.out"
    path.write_bytes(b"shipped already\nnot yet\n")
    assert read_spool(str(path), offset=len(b"shipped already\n")).text == "not yet\n"
    assert read_spool(str(tmp_path / "gone"), 0).text == ""


def test_nccl_fails_collectives_instead_of_hanging_unless_the_user_chose():
    environ = {}
    apply_nccl_env_defaults(environ)
    assert environ == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    chosen = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    apply_nccl_env_defaults(chosen)
    assert chosen == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    blocking = {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    apply_nccl_env_defaults(blocking)
    assert blocking == {"TORCH_NCCL_BLOCKING_WAIT": "1"}


@pytest.mark.parametrize("name", ["ddp", "fsdp", "tensor", "hybrid", "pipeline", "deepspeed", "horovod"])
def test_collectives_time_out_sooner_than_30_minutes(name):
    from strategies import get_strategy_class

    options = get_strategy_class(name).parse_options({})
    assert options.timeout_s == 600


# ---- whole jobs on the shared cluster ----------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_segfaulting_rank_is_named_with_its_stack_in_the_log(client, tmp_path):
    spec = job_spec("segv", "tests.jobs.train_fns:crashes", tmp_path,
                    config={"rank": 1, "how": "segv", "attempts": [0]}, failure={"max_restarts": 1})
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    [restart] = job["restarts"]
    assert restart["kind"] == "worker_died"
    assert restart["cause"] == f"rank 1 killed by SIGSEGV (see trainctl logs {job['id']} --rank 1)"
    text, _ = client.read_logs(job["id"])
    assert text.count("[rank 1] about to crash by segv\n") == 1  # shipped live or read after: once
    assert "[rank 1] Fatal Python error: Segmentation fault" in text
    assert "[rank 1]   File " in text and " in crashes\n" in text  # the user's frame in the stack
    assert "[trainctl] rank 1 (pid " in text


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_an_aborting_rank_fails_the_job_naming_sigabrt(client, tmp_path):
    spec = job_spec("abort", "tests.jobs.train_fns:crashes", tmp_path,
                    config={"rank": 0, "how": "abort", "attempts": [0]}, failure={"max_restarts": 0})
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "FAILED"
    assert job["error"] == f"rank 0 killed by SIGABRT (see trainctl logs {job['id']} --rank 0)"
    text, _ = client.read_logs(job["id"])
    assert "[rank 0] Fatal Python error: Aborted" in text


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_output_written_below_python_reaches_the_job_log(client, tmp_path):
    spec = job_spec("fds", "tests.jobs.train_fns:writes_to_fds", tmp_path)
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    text, _ = client.read_logs(job["id"])
    for rank in (0, 1):
        for line in (f"raw fd 2 from rank {rank}", f"raw fd 1 from rank {rank}", f"libc dprintf rank {rank}",
                     f"python print rank {rank}", "nccl env 1"):
            assert text.count(f"[rank {rank}] {line}\n") == 1, (line, text)  # there, and only once


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_full_checkpoint_storage_fails_at_once_with_one_line(client, tmp_path, tiny_storage):
    spec = job_spec("full", "tests.jobs.train_fns:grows_checkpoints", tmp_path,
                    config={"small": 1000, "big": 1_000_000}, failure={"max_restarts": 3})
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "FAILED"
    assert job["restarts"] == []  # no space came back: a restart could not help
    root = tiny_storage / job["id"]
    assert job["error"].startswith(f"checkpoint save failed: no space left on device in {root} (needs about 4 MB, ")
    assert "\n" not in job["error"] and job["error"].endswith(" free)")
    # partial gone, the first intact (OWNER: which attempt may commit, see CheckpointStore.claim)
    assert sorted(p.name for p in root.iterdir()) == ["OWNER", "checkpoint_000001"]
    assert json.loads((root / "checkpoint_000001" / "manifest.json").read_text())["step"] == 1


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_full_storage_restarts_once_space_has_come_back(client, tmp_path, tiny_storage):
    filler = tiny_storage / "filler"
    filler.write_bytes(b"x" * 1_500_000)  # leaves about 0.6 MB: checkpoint 2 (0.8 MB) does not fit
    spec = job_spec("freed", "tests.jobs.train_fns:grows_checkpoints", tmp_path,
                    config={"small": 1000, "big": 200_000, "filler": str(filler)}, failure={"max_restarts": 1})
    job = client.wait(client.submit(spec), timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    [restart] = job["restarts"]
    assert restart["kind"] == "checkpoint_storage"
    assert restart["cause"].startswith("checkpoint save failed: no space left on device in ")
    assert job["checkpoint"]["step"] == 2
