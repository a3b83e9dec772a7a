"""Script jobs (`command:`) without a cluster: the torchrun environment, the guard that keeps no
orphan alive, SIGTERM-then-SIGKILL, orchestrator.report over the socket, and run_rank running a
real script in a process that plays the rank's actor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster.layout import lay_out_ranks
from cluster.workers import rank_env
from orchestrator.runtime.script import (
    ReportServer,
    ScriptMonitor,
    ScriptProcess,
    exit_message,
    expand_args,
    last_lines,
    progress_signal,
    report_socket_path,
    resolve_argv,
    script_env,
)

from ..helpers import REPO, pid_alive, wait_for

pytestmark = pytest.mark.timeout(60)

TORCHRUN_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                 "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"}


def test_a_rank_gets_every_variable_torchrun_sets():
    slots = lay_out_ranks([("n0", "10.0.0.1"), ("n0", "10.0.0.1"), ("n1", "10.0.0.2"), ("n1", "10.0.0.2")])
    slot = slots[3]
    base = rank_env(slot, 4, "10.0.0.1", 29400)
    env = script_env(base, job_id="j-1", attempt=2, max_restarts=3, checkpoint_dir="/runs/j-1/script",
                     report_socket="/tmp/s.sock", cpus_per_worker=2.0)
    assert TORCHRUN_VARS <= set(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["GROUP_RANK"], env["ROLE_RANK"]) == ("3", "1", "1", "3")
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["ROLE_WORLD_SIZE"], env["GROUP_WORLD_SIZE"]) == ("4", "2", "4", "2")
    assert env["ROLE_NAME"] == "default"
    assert (env["TORCHELASTIC_RESTART_COUNT"], env["TORCHELASTIC_MAX_RESTARTS"], env["TORCHELASTIC_RUN_ID"]) == ("2", "3", "j-1")
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["TRAINCTL_CHECKPOINT_DIR"] == "/runs/j-1/script"


def test_the_job_env_keeps_its_own_thread_count_and_the_agent_store_is_off():
    env = script_env({"OMP_NUM_THREADS": "7", "TORCHELASTIC_USE_AGENT_STORE": "True", "PYTHONPATH": "/a"},
                     job_id="j", attempt=0, max_restarts=0, checkpoint_dir="/c", report_socket="/s",
                     cpus_per_worker=1, package_root="/pkg")
    assert env["OMP_NUM_THREADS"] == "7"
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env  # rank 0 hosts the store, as env:// expects
    assert env["PYTHONPATH"] == os.pathsep.join(["/a", "/pkg"])


def test_python_is_the_workers_interpreter_and_trainctl_variables_expand():
    assert resolve_argv(["python", "train.py"], python="/venv/bin/python") == ["/venv/bin/python", "train.py"]
    assert resolve_argv(["./run.sh", "python"], python="/venv/bin/python") == ["./run.sh", "python"]
    env = {"TRAINCTL_CHECKPOINT_DIR": "/runs/j/script", "HOME": "/root"}
    assert expand_args(["--snapshot", "$TRAINCTL_CHECKPOINT_DIR/s.pt", "${TRAINCTL_CHECKPOINT_DIR}", "$HOME", "$5"], env) == \
        ["--snapshot", "/runs/j/script/s.pt", "/runs/j/script", "$HOME", "$5"]


def test_exit_message_names_the_code_or_the_signal_and_the_last_lines():
    assert exit_message(["python", "t.py"], 1, ["Traceback", "", "ValueError: boom"]) == \
        "`python t.py` exited with code 1; its last lines: Traceback | ValueError: boom"
    assert exit_message(["python", "t.py"], -9, []) == "`python t.py` was killed by SIGKILL; it printed nothing"


def test_last_lines_skip_trainctls_own(tmp_path):
    spool = tmp_path / "rank0.out"
    spool.write_text("one\n[trainctl] note\ntwo\n\nthree\n")
    assert last_lines(spool, 2) == ["two", "three"]
    assert last_lines(tmp_path / "missing") == []


@pytest.mark.parametrize("timeout, reported, expected", [
    (None, False, "alive"), (120.0, False, "output"), (None, True, "reports"), (120.0, True, "reports")])
def test_what_counts_as_a_scripts_progress(timeout, reported, expected):
    assert progress_signal(timeout, reported) == expected


def test_the_stack_dump_knows_the_script_guard_as_a_wrapper():
    """cluster/stacks.py cannot import the guard's name (imports point downward): it is spelled
    there; a hang's stack speaks for the script under it only while the two agree."""
    from cluster.stacks import WRAPPERS
    from orchestrator.runtime.script import GUARD

    assert any(mark in str(GUARD) for mark in WRAPPERS)


def test_report_socket_path_is_short_for_a_long_job_id():
    assert len(report_socket_path("x" * 63 + "-20261201-abcdef", 127, 99)) < 100


# ---- the process and its guard -------------------------------------------------------------

SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); " \
          "print('ready', flush=True); time.sleep(600)"


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_killing_the_actor_kills_the_script_and_what_it_started(tmp_path):
    # A process plays the rank's actor: it starts the script (which starts a child of its own),
    # then is SIGKILLed as ray.kill does. Nothing of the script may survive it.
    actor_code = textwrap.dedent(f"""
        import os, sys, time
        from orchestrator.runtime.script import ScriptProcess
        p = ScriptProcess.start([sys.executable, "-c", {SLEEPER!r}], cwd=".", env=dict(os.environ))
        print(p.pid, flush=True)
        p.wait()
    """)
    actor = subprocess.Popen([sys.executable, "-c", actor_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        guard = int(actor.stdout.readline())
        script_tree = wait_for(lambda: (d := _descendants(guard)) and len(d) >= 2 and d, 30, what="script and its child")
        actor.kill()
        actor.wait(10)
        for pid in [guard, *script_tree]:
            wait_for(lambda pid=pid: not pid_alive(pid) or _zombie(pid), 10, what=f"pid {pid} gone")
    finally:
        actor.kill()


def test_when_ray_kills_the_guard_itself_the_script_and_its_children_die_too(tmp_path):
    # Ray's raylet SIGKILLs a dead worker's direct children: the guard is one, the script is not.
    proc = ScriptProcess.start([sys.executable, "-c", SLEEPER], cwd=".", env=dict(os.environ))
    try:
        script = wait_for(lambda: (p := proc.script_pid()) != proc.pid and p, 20, what="script started")
        wait_for(lambda: _descendants(script), 30, what="the script's own child")
        tree = _descendants(proc.pid)  # the script, its child (and the guard's keeper)
        assert script in tree
        os.kill(proc.pid, signal.SIGKILL)
        for pid in tree:
            wait_for(lambda pid=pid: not pid_alive(pid) or _zombie(pid), 10, what=f"pid {pid} gone")
    finally:
        proc.kill()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_terminate_sends_sigterm_then_waits_for_the_script(tmp_path):
    saved = tmp_path / "saved"
    code = ("import signal, sys, time, pathlib\n"
            "def save(*a):\n"
            f"    pathlib.Path({str(saved)!r}).write_text('jit'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, save)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = ScriptProcess.start([sys.executable, "-c", code], cwd=str(tmp_path), env=dict(os.environ))
    wait_for(lambda: proc.script_pid() != proc.pid and _handles_sigterm(proc.script_pid()), 20, what="handler set")
    assert proc.terminate(grace_s=20) == 0
    assert saved.read_text() == "jit" and proc.terminate_requested


def _handles_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_terminate_kills_a_script_that_ignores_sigterm_after_the_grace(tmp_path):
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
    proc = ScriptProcess.start([sys.executable, "-c", code], cwd=str(tmp_path), env=dict(os.environ))
    wait_for(lambda: proc.script_pid() != proc.pid, 20, what="script started")
    time.sleep(0.5)  # the SIG_IGN line runs right after start; a SIGTERM before it would end the test early
    started = time.monotonic()
    assert proc.terminate(grace_s=1.0) == -signal.SIGKILL
    assert 0.9 < time.monotonic() - started < 10


def test_running_is_false_for_a_stopped_script(tmp_path):
    proc = ScriptProcess.start([sys.executable, "-c", "import time; time.sleep(600)"], cwd=str(tmp_path),
                               env=dict(os.environ))
    try:
        pid = wait_for(lambda: (p := proc.script_pid()) != proc.pid and p, 20, what="script started")
        assert proc.running()
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: not proc.running(), 10, what="seen as stopped")
        os.kill(pid, signal.SIGCONT)
        wait_for(proc.running, 10, what="seen as running again")
    finally:
        proc.kill()


# ---- orchestrator.report ---------------------------------------------------------------------

def test_report_reaches_the_rank_over_the_socket(tmp_path):
    path = str(tmp_path / "r.sock")
    server = ReportServer(path)
    try:
        code = ("import orchestrator\n"
                "for step in range(1, 4):\n"
                "    orchestrator.report({'loss': 1.0 / step, 'step': step, 'note': 'x'})\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "TRAINCTL_REPORT_SOCKET": path},
                              timeout=30, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        got: list[dict] = []
        wait_for(lambda: got.extend(server.poll()) or len(got) == 3, 10, what="three reports")
        assert got[-1] == {"loss": pytest.approx(1 / 3), "step": 3, "note": "x"}
    finally:
        server.close()
    assert not os.path.exists(path)


def test_report_is_a_no_op_outside_trainctl(monkeypatch):
    import orchestrator

    monkeypatch.delenv("TRAINCTL_REPORT_SOCKET", raising=False)
    assert orchestrator.report({"loss": 1.0}) is None


def test_report_survives_a_rank_that_went_away(monkeypatch, tmp_path):
    import orchestrator
    from orchestrator.runtime import script_report

    monkeypatch.setenv("TRAINCTL_REPORT_SOCKET", str(tmp_path / "gone.sock"))
    monkeypatch.setattr(script_report, "_sock", None)
    monkeypatch.setattr(script_report, "_broken", False)
    orchestrator.report({"loss": 1.0})  # nobody listens: no exception


class _Collecting:
    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.rss: list[int] = []

    def emit(self, kind, payload):
        if kind == "rss":  # the memory sample, once a second: see its own test
            self.rss.append(payload)
        else:
            self.events.append((kind, payload))


class _Server:
    def __init__(self, batches):
        self.batches = list(batches)

    def poll(self):
        return self.batches.pop(0) if self.batches else []


class _Alive:
    pid = os.getpid()  # the "guard": this test process

    def __init__(self):
        self.alive = True

    def running(self):
        return self.alive


def test_monitor_counts_steps_like_ctx_report_and_sets_the_total(tmp_path):
    reporter = _Collecting()
    monitor = ScriptMonitor(reporter, _Server([[{"total_steps": 50}, {"loss": 2.0}, {"loss": 1.5}, {"loss": 1.0, "step": 10}]]),
                            _Alive(), tmp_path / "spool", None)
    monitor()
    metrics = [p for k, p in reporter.events if k == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 10]
    assert ("total_steps", 50) in reporter.events
    assert monitor.reported


def test_monitor_liveness_counts_only_while_the_script_runs_and_before_it_reports(tmp_path):
    reporter, process = _Collecting(), _Alive()
    monitor = ScriptMonitor(reporter, _Server([[], [], [{"loss": 1.0}]]), process, tmp_path / "spool", None,
                            alive_every_s=0.0)
    monitor()
    assert [k for k, _ in reporter.events] == ["progress"]
    process.alive = False  # stopped: no progress from liveness
    monitor()
    assert [k for k, _ in reporter.events] == ["progress"]
    process.alive = True
    monitor()  # it reported: from now on only its reports are progress
    monitor()
    assert [k for k, _ in reporter.events] == ["progress", "metrics"]


def test_monitor_samples_the_memory_of_the_actor_and_the_script_together(tmp_path):
    from orchestrator.runtime.reporting import resident_bytes

    reporter = _Collecting()
    monitor = ScriptMonitor(reporter, _Server([]), _Alive(), tmp_path / "spool", None)
    monitor()
    monitor()  # within the second: no second sample
    assert len(reporter.rss) == 1
    assert reporter.rss[0] >= 2 * resident_bytes() * 0.9  # this process counted as actor and as "script"


def test_monitor_with_a_hang_timeout_counts_output_as_progress(tmp_path):
    spool = tmp_path / "spool"
    spool.write_text("")
    reporter = _Collecting()
    monitor = ScriptMonitor(reporter, _Server([]), _Alive(), spool, 60.0)
    monitor()
    assert reporter.events == []  # alive but silent: not progress when the user set a hang timeout
    spool.write_text("epoch 1\n")
    monitor()
    assert [k for k, _ in reporter.events] == ["progress"]


# ---- run_rank on a script, in a process that plays the actor ----------------------------------

ACTOR = textwrap.dedent("""
    import json, os, sys
    import ray
    # the pushes' replies are plain values here, not ObjectRefs
    ray.get = lambda refs, timeout=None: refs
    ray.wait = lambda refs, num_returns=1, timeout=None: (refs, [])
    from orchestrator.runtime.reporting import Reporter
    from orchestrator.runtime.worker_entry import RankTask, run_rank

    class Push:
        def __init__(self):
            self.events = []
        def remote(self, rank, events):
            self.events += [(kind, payload) for kind, _, payload in events]
            when = os.environ.get("PREEMPT_WHEN")  # a line of output after which the supervisor preempts
            if when and any(kind == "output" and when in p["lines"] for kind, p in self.events):
                return {"checkpoint_now": True}
            return None

    class Supervisor:
        push = Push()

    spec, root, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"})
    task = RankTask(job_id="scriptjob", spec=spec, attempt=1, checkpoint_root=root, resume_path=None,
                    supervisor=Supervisor())
    try:
        result, error = run_rank(task), None
    except Exception as exc:
        result, error = None, {"type": type(exc).__name__, "message": str(exc), "exit_code": getattr(exc, "exit_code", None)}
    events = [(k, p) for k, p in Supervisor.push.events if k in ("metrics", "output", "progress", "total_steps")]
    json.dump({"result": result, "error": error, "events": events}, open(out, "w"))
""")


def _run_script_rank(tmp_path, script: str, *args: str, env: dict | None = None, **fields) -> dict:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "train.py").write_text(textwrap.dedent(script))
    spec = {"name": "s", "command": ["python", "train.py", *args], "working_dir": str(work), **fields}
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", ACTOR, json.dumps(spec), str(tmp_path / "runs" / "scriptjob"), str(out)],
                          cwd=work, capture_output=True, text=True, timeout=120,  # torch and ray load: slow on a busy box
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def _lines(found: dict) -> list[str]:
    return [line for kind, p in found["events"] if kind == "output" for line in p["lines"]]


@pytest.mark.timeout(150)
def test_a_script_runs_in_the_working_dir_with_the_torchrun_env_and_reports(tmp_path):
    found = _run_script_rank(tmp_path, """
        import os, sys
        import orchestrator
        print("cwd", os.getcwd())
        print("args", sys.argv[1:])
        print("env", os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["TRAINCTL_CHECKPOINT_DIR"])
        orchestrator.report({"loss": 0.5, "step": 7})
    """, "--lr", "0.1", "--out", "$TRAINCTL_CHECKPOINT_DIR/x")
    assert found["error"] is None and found["result"]["exit_code"] == 0 and found["result"]["step"] == 7
    lines = _lines(found)
    ckpt = str(tmp_path / "runs" / "scriptjob" / "script")
    assert f"cwd {tmp_path / 'work'}" in lines
    assert f"args ['--lr', '0.1', '--out', '{ckpt}/x']" in lines
    assert f"env 0 1 {ckpt}" in lines
    assert os.path.isdir(ckpt)
    assert [p for k, p in found["events"] if k == "metrics"] == [{"loss": 0.5, "step": 7}]


@pytest.mark.timeout(150)
def test_a_failing_script_raises_with_its_exit_code_and_last_lines(tmp_path):
    found = _run_script_rank(tmp_path, """
        import sys
        print("epoch 1 done", flush=True)
        print("ValueError: the data ran out", file=sys.stderr)
        sys.exit(3)
    """)
    assert found["error"]["type"] == "ScriptFailed" and found["error"]["exit_code"] == 3
    assert found["error"]["message"] == \
        "`python train.py` exited with code 3; its last lines: epoch 1 done | ValueError: the data ran out"


@pytest.mark.timeout(150)
def test_a_preempted_script_gets_sigterm_saves_and_the_rank_ends_preempted(tmp_path):
    found = _run_script_rank(tmp_path, """
        import signal, sys, time
        def save(signum, frame):
            print("saved at SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        print("ready", flush=True)
        time.sleep(600)
    """, env={"PREEMPT_WHEN": "ready"}, preemption={"grace_s": 20})
    assert found["error"] is None, found["error"]
    assert found["result"]["preempted"] is True and found["result"]["exit_code"] == 0
    assert "saved at SIGTERM" in _lines(found)
