"""Hang detection (pure: times are passed in) and stack dumps of real processes with py-spy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cluster.stacks import dump_local, parse_main_thread, parse_processes, stack_dump
from orchestrator.control.hang import HangWatch

from ..helpers import wait_for


def _steady(watch: HangWatch, ranks, until: float, every: float = 1.0, start: float = 10.0) -> None:
    t = start
    while t <= until:
        for r in ranks:
            watch.on_progress(r, t)
        t += every


def test_a_rank_that_stops_reporting_is_caught_within_the_learned_threshold():
    watch = HangWatch(world_size=2, started_at=0.0)
    _steady(watch, [0, 1], until=100.0)            # a report a second on both ranks
    _steady(watch, [0], until=200.0, start=101.0)  # rank 1 goes quiet after t=100
    for t in range(101, 200):
        watch.on_heartbeat(1, float(t))            # its process is alive: a stuck training thread
    assert watch.threshold_s() == 60.0             # the floor: 5 x a 1 s cadence is less
    assert watch.hung(159.0) == []
    [silence] = watch.hung(161.0)
    assert silence.rank == 1 and not silence.frozen and silence.silent_s == pytest.approx(61.0)


def test_the_threshold_follows_the_jobs_own_cadence_and_is_capped_at_five_minutes():
    watch = HangWatch(world_size=1, started_at=0.0)
    for t in (10.0, 20.0, 30.0, 130.0, 140.0):  # an evaluation pass of 100 s between reports
        watch.on_progress(0, t)
    for t in range(141, 450):
        watch.on_heartbeat(0, float(t))
    assert watch.threshold_s() == 300.0            # 5 x 100 s, capped
    assert watch.hung(140.0 + 299) == []
    assert [s.rank for s in watch.hung(140.0 + 301)] == [0]
    assert HangWatch(1, 0.0, timeout_s=42.0).threshold_s() == 42.0  # failure.hang_timeout_s wins


def test_a_slow_first_step_is_not_a_hang():
    watch = HangWatch(world_size=1, started_at=0.0)
    watch.on_heartbeat(0, 1.0)
    for t in range(2, 1700, 5):
        watch.on_heartbeat(0, float(t))
    assert watch.hung(1700.0) == []                # 28 minutes without a first report: starting up
    assert [s.rank for s in HangWatch(1, 0.0).hung(1801.0)] == [0]


def test_a_long_checkpoint_save_is_not_a_hang_but_a_frozen_process_is():
    watch = HangWatch(world_size=2, started_at=0.0)
    _steady(watch, [0, 1], until=50.0)
    watch.on_busy(0, 50.5, busy=True)              # rank 0 saves for 10 minutes
    for t in range(51, 650):
        watch.on_heartbeat(0, float(t))
        watch.on_progress(1, float(t))
    assert watch.hung(650.0) == []
    watch.on_busy(0, 650.0, busy=False)
    assert watch.threshold_s() == 60.0             # the save did not teach it a 10-minute cadence
    _steady(watch, [0], until=770.0, start=651.0)
    # rank 1 was SIGSTOPped at 649: no heartbeat, no progress since
    silences = watch.hung(649.0 + 121.0)
    assert [(s.rank, s.frozen) for s in silences] == [(1, True)]


def test_a_peer_that_got_one_more_step_in_is_named_with_the_frozen_rank():
    watch = HangWatch(world_size=3, started_at=0.0, timeout_s=4.0)
    _steady(watch, [0, 1, 2], until=10.0)
    watch.on_progress(0, 10.8)                     # its last step came in just after rank 1 froze
    for t in (11.0, 12.0, 13.0, 14.0, 15.0):
        watch.on_heartbeat(0, t)                   # rank 0 then waits in rank 1's collective
        watch.on_progress(2, t)                    # rank 2 is not held up (it is not named)
    silences = watch.hung(14.5)
    assert [(s.rank, s.frozen) for s in silences] == [(1, True), (0, False)]
    assert silences[1].silent_s == pytest.approx(3.7)


SCRIPT = textwrap.dedent('''
    import time

    def all_reduce():
        time.sleep(600)

    def train():
        all_reduce()

    print("ready", flush=True)
    train()
''')


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frozen", [False, True])
def test_py_spy_reads_the_stack_of_a_blocked_or_frozen_process(tmp_path, frozen):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        in_sleep = lambda: (d := dump_local(proc.pid)).summary() == "in all_reduce (train.py:5)" and d  # noqa: E731
        dump = wait_for(in_sleep, 20, what="the process to be in its sleep")
        if frozen:  # stopped where it sits: py-spy reads the memory of a stopped process too
            os.kill(proc.pid, signal.SIGSTOP)
            dump = wait_for(lambda: (d := dump_local(proc.pid)).main_thread and d, 20, what="a stack")
        assert [f.function for f in dump.main_thread][:3] == ["all_reduce", "train", "<module>"]
        assert dump.summary() == "in all_reduce (train.py:5)"
    finally:
        proc.kill()
        proc.wait()


def test_the_users_frame_is_named_under_library_frames():
    text = textwrap.dedent('''\
        Process 7: python
        Python v3.11.7

        Thread 7 (idle): "MainThread"
            wait (/x/site-packages/torch/distributed/distributed_c10d.py:2501)
            all_reduce (/x/site-packages/torch/distributed/c10d_logger.py:81)
            train (/work/job/train.py:42)
        Thread 8 (idle): "trainctl-reporter"
            wait (threading.py:331)
    ''')
    frames = parse_main_thread(text)
    assert [f.function for f in frames] == ["wait", "all_reduce", "train"]
    from cluster.stacks import StackDump

    assert StackDump(7, text, frames).summary() == "in wait (train.py:42)"


# `py-spy dump --nonblocking --full-filenames --subprocesses --pid 1543` (py-spy 0.4.3), captured
# from a real tree: a rank-like parent (1543, with a reporter thread) running SCRIPT under the
# real orchestrator/runtime/script_guard.py (1547), whose keeper is 1548 and the script 1549.
SUBPROCESSES_DUMP = """\
Process 1543: /work/main/.venv/bin/python actor.py
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)

Thread 1543 (idle): "MainThread"
    Popen._try_wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:2004)
    Popen._wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:2046)
    Popen.wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:1264)
    wait_script (/tmp/spy/actor.py:8)
    <module> (/tmp/spy/actor.py:9)
Thread 1545 (idle): "trainctl-reporter"
    reporter (/tmp/spy/actor.py:4)
    Thread.run (/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py:982)
    Thread._bootstrap_inner (/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py:1045)
    Thread._bootstrap (/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py:1002)

--------------------------------------------------------------------------------

--------------------------------------------------------------------------------

--------------------------------------------------------------------------------
Process 1547: /work/main/.venv/bin/python -I -S /work/main/orchestrator/runtime/script_guard.py 1543 /work/main/.venv/bin/python train.py
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)
Parent Process 1543: /work/main/.venv/bin/python actor.py

Thread 1547 (idle): "MainThread"
    Popen._try_wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:2004)
    Popen._wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:2046)
    Popen.wait (/root/.pyenv/versions/3.11.7/lib/python3.11/subprocess.py:1264)
    main (/work/main/orchestrator/runtime/script_guard.py:76)
    <module> (/work/main/orchestrator/runtime/script_guard.py:90)

--------------------------------------------------------------------------------
Process 1549: /work/main/.venv/bin/python train.py
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)
Parent Process 1547: /work/main/.venv/bin/python -I -S /work/main/orchestrator/runtime/script_guard.py 1543 /work/main/.venv/bin/python train.py

Thread 1549 (idle)
    all_reduce (/tmp/spy/train.py:4)
    train (/tmp/spy/train.py:7)
    <module> (/tmp/spy/train.py:10)

--------------------------------------------------------------------------------
Process 1548: /work/main/.venv/bin/python -I -S /work/main/orchestrator/runtime/script_guard.py 1543 /work/main/.venv/bin/python train.py
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)
Parent Process 1547: /work/main/.venv/bin/python -I -S /work/main/orchestrator/runtime/script_guard.py 1543 /work/main/.venv/bin/python train.py

Thread 1548 (idle): "MainThread"
    _fork_keeper (/work/main/orchestrator/runtime/script_guard.py:54)
    main (/work/main/orchestrator/runtime/script_guard.py:66)
    <module> (/work/main/orchestrator/runtime/script_guard.py:90)
"""


def test_a_script_jobs_stack_speaks_for_the_script_not_the_rank_or_its_guard():
    processes = parse_processes(SUBPROCESSES_DUMP)
    assert [(p.pid, p.parent) for p in processes] == [(1543, None), (1547, 1543), (1549, 1547), (1548, 1547)]
    assert [p.wrapper() for p in processes] == [False, True, False, True]
    assert [f.function for f in processes[0].main_thread][:3] == ["Popen._try_wait", "Popen._wait", "Popen.wait"]
    dump = stack_dump(1543, SUBPROCESSES_DUMP)
    assert dump.main_pid == 1549  # the script: neither the rank waiting for it nor guard and keeper
    assert [f.function for f in dump.main_thread] == ["all_reduce", "train", "<module>"]
    assert dump.summary() == "in all_reduce (train.py:4)" and dump.in_collective()
    # an entrypoint job's rank: no wrapper below it, its own main thread speaks
    rank_only = SUBPROCESSES_DUMP.split("\n----")[0]
    assert stack_dump(1543, rank_only).main_pid == 1543
    assert stack_dump(1543, rank_only).summary() == "in Popen._try_wait (actor.py:8)"


RANK_LIKE = textwrap.dedent('''
    import os, subprocess, sys, threading, time
    threading.Thread(target=lambda: time.sleep(600), name="trainctl-reporter", daemon=True).start()
    guard, script = sys.argv[1:3]
    child = subprocess.Popen([sys.executable, "-I", "-S", guard, str(os.getpid()), sys.executable, script],
                             start_new_session=True)
    child.wait()
''')


@pytest.mark.timeout(60)
def test_the_dump_of_a_rank_that_runs_a_script_reads_the_scripts_stack(tmp_path):
    """A real tree, as a script job's rank has it: rank -> script_guard.py -> the script."""
    from orchestrator.runtime.script import GUARD

    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "rank.py").write_text(RANK_LIKE)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(GUARD), str(tmp_path / "train.py")],
                            stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    dump = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        dump = wait_for(lambda: (d := dump_local(proc.pid)).summary() == "in all_reduce (train.py:5)" and d, 20,
                        what="the script's frame in the rank's dump")
        assert dump.pid == proc.pid and dump.main_pid != proc.pid
        assert f"Process {proc.pid}: " in dump.text and f"Process {dump.main_pid}: " in dump.text
        assert "script_guard.py" in dump.text  # the whole tree is in the log, the guard too
    finally:
        proc.kill()  # the guard then kills its group, the script with it
        proc.wait()
        if dump is not None and dump.main_pid:
            wait_for(lambda: _gone(dump.main_pid), 20, what="the script gone with its rank")


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---- end to end: real ranks on the shared 2-node cluster ----------------------------------------

def _hang_job(tmp_path, name, fn, **config):
    from ..helpers import job_spec

    return job_spec(name, f"tests.jobs.hang_fns:{fn}", tmp_path, config={"steps": 30, **config},
                    failure={"max_restarts": 2, "hang_timeout_s": 4})


@pytest.mark.cluster
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fn, frozen", [("sleeps_forever_on_attempt_0", False), ("freezes_on_attempt_0", True)])
def test_a_hung_rank_is_named_with_its_frame_its_stack_logged_and_the_job_restarts(client, tmp_path, fn, frozen):
    job = client.wait(client.submit(_hang_job(tmp_path, f"hang-{'frozen' if frozen else 'stuck'}", fn, hang_at=8)),
                      timeout_s=180)
    assert job["state"] == "SUCCEEDED", job.get("error")
    [restart] = job["restarts"]
    assert restart["kind"] == "hang"
    cause = restart["cause"]
    node = next(p for p in job["placement"] if p["rank"] == 1)["node_ip"]
    assert cause.startswith(f"hang: rank 1 {'frozen (no heartbeat)' if frozen else 'silent'} for ")
    assert f"on node {node} (" in cause
    if not frozen:  # the frame it sits in, named from py-spy's stack
        assert f"on node {node} (" in cause and "in stuck_in_user_code (hang_fns.py:28); also rank 0" in cause, cause
    else:
        assert "in freezes_on_attempt_0.<locals>.body (hang_fns.py:35)" in cause, cause
    assert "also rank 0 silent" in cause and "in all_reduce (hang_fns.py:14)" in cause  # its peer waits
    text, _ = client.read_logs(job["id"])
    assert "[trainctl] rank 0 stack (py-spy" in text and "[trainctl] rank 1 stack (py-spy" in text
    assert "[rank 0]     all_reduce" in text  # the healthy peer waits in the collective
    assert job["checkpoint"]["step"] == 30


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_slow_first_step_and_a_slow_checkpoint_are_not_hangs(client, tmp_path):
    spec = _hang_job(tmp_path, "slow-not-hung", "slow_first_step_and_slow_save", slow_s=10, steps=8)
    job = client.wait(client.submit(spec), timeout_s=180)  # hang_timeout_s is 4; both take 10 s
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["restarts"] == []


def test_a_rank_over_one_and_a_half_times_the_median_step_is_named_as_a_straggler():
    from orchestrator.client.render import health_line
    from orchestrator.monitoring.telemetry import health
    from tests.helpers import job_record

    placement = [{"rank": r, "node_ip": f"10.0.0.{r}", "node_id": f"n{r}", "pid": r} for r in range(3)]
    job = job_record(placement=placement)

    def ranks(*step_s):
        return {"ranks": {str(r): {"recent_step_s": s} for r, s in enumerate(step_s)}}

    slow = health(job, ranks(0.10, 0.11, 0.20), now=0.0)
    assert slow["straggler"] == {"rank": 2, "node": "10.0.0.2", "step_s": 0.20, "ratio": pytest.approx(0.20 / 0.11)}
    assert "straggler: rank 2 on 10.0.0.2 (1.8x the median step)" in health_line({"health": slow})
    assert health(job, ranks(0.10, 0.11, 0.15), now=0.0)["straggler"] is None  # 1.36x: within noise
    assert health(job, ranks(0.10), now=0.0)["straggler"] is None
