"""The warm start's zygote and rank host (cluster/rank_host.py, orchestrator/runtime/zygote.py),
without a Ray cluster: the host's logic (RankHostCore) runs in this process, its zygote is the
real one (it imports torch), the ranks are real forks of it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import zipfile

import pytest

from cluster.rank_host import (
    RankHostCore,
    RankLaunch,
    child_env,
    unpack_package,
    warm_start_blocker,
)
from cluster.wire import RankOutcome
from cluster.workers import split_bundle_gpus
from orchestrator.control.failure import RankDeath, death_cause
from orchestrator.control.supervisor import call_payload, describe_exit, outcome_exit
from orchestrator.runtime.worker_entry import RankTask
from tests import zygote_ranks
from tests.helpers import pid_alive, wait_for

pytestmark = pytest.mark.timeout(240)


class _Pushes:
    """Stands in for the job's SupervisorRef: `ref.push.remote(rank, events)`, awaited by the host."""

    def __init__(self):
        self.got: list[tuple[int, list]] = []
        self.push = self

    def remote(self, rank, events):
        self.got.append((rank, events))

        async def reply():
            return {"command": "noted", "rank": rank}
        return reply()


class _HostThread:
    """A RankHostCore on an event loop of its own thread, as the actor would run it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.host = self.call(self._make())

    async def _make(self):
        return RankHostCore("orchestrator.runtime.zygote")

    def call(self, coro, timeout=180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def launch(self, fn, *args, env=None, package=None, relay_to=None) -> tuple[int, str, object]:
        token = os.urandom(6).hex()
        pid = self.call(self.host.spawn([RankLaunch(token, env or {}, 1)], package))[0]
        payload, found = call_payload(fn, args)
        future = asyncio.run_coroutine_threadsafe(self.host.run(token, payload, relay_to or found, 0), self.loop)
        return pid, token, future

    def close(self):
        async def stop():
            zygote = self.host.zygote
            if zygote is not None and zygote.returncode is None:
                zygote.stdin.close()  # as when the host goes: the zygote exits
                await zygote.wait()
            self.host._server.close()
            await asyncio.sleep(0.1)  # its reader sees the end
        self.call(stop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def host():
    h = _HostThread()
    yield h
    h.close()


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def test_a_rank_is_a_fork_of_the_zygote_with_the_jobs_env_and_working_dir(host, tmp_path, monkeypatch):
    monkeypatch.setattr("cluster.rank_host._gcs_package", lambda uri: _zip({"job_code.py": "X = 1\n"}))
    monkeypatch.setattr("cluster.rank_host.package_cache", lambda: tmp_path)
    pid, _, future = host.launch(zygote_ranks.where_am_i, "JOB_VAR", env={"JOB_VAR": "from-spec"},
                                 package="gcs://_ray_pkg_abc123.zip")
    outcome: RankOutcome = future.result(120)
    seen = outcome_exit(outcome).value
    info = host.call(host.host.zygote_info())
    assert seen["pid"] == pid and seen["ppid"] == info["pid"]   # forked by the zygote, not a new interpreter
    assert seen["pgid"] == pid                                  # its own process group (killed as one)
    assert seen["cwd"] == str(tmp_path / "_ray_pkg_abc123")     # the job's unpacked working_dir
    assert (tmp_path / "_ray_pkg_abc123" / "job_code.py").read_text() == "X = 1\n"
    assert seen["env"] == "from-spec"
    assert outcome.exit_status == 0


def test_no_state_carries_from_one_rank_process_to_the_next(host):
    first = outcome_exit(host.launch(zygote_ranks.set_mark, "job-1")[2].result(120)).value
    second = outcome_exit(host.launch(zygote_ranks.read_mark)[2].result(120)).value
    assert first is None and second is None


def test_a_rank_killed_by_sigsegv_reports_the_signal(host):
    outcome = host.launch(zygote_ranks.segfault)[2].result(120)
    assert outcome.ok is None and outcome.exit_status == -signal.SIGSEGV
    died = outcome_exit(outcome).died
    assert "killed by SIGSEGV" in died
    # with faulthandler's report in the spool (as run_rank's capture leaves it), failure.py's words:
    assert death_cause(RankDeath(died, "Fatal Python error: Segmentation fault\n")) == "killed by SIGSEGV"


def test_a_rank_exception_comes_back_as_itself(host):
    exit_ = outcome_exit(host.launch(zygote_ranks.raises)[2].result(120))
    assert isinstance(exit_.error, ValueError) and "bad input in the rank" in str(exit_.error)


def test_the_rank_dies_with_its_host_connection(host):
    pid, token, future = host.launch(zygote_ranks.sleeps)
    wait_for(lambda: host.host.children[token].connected.is_set(), 60, what="the rank connected")
    assert pid_alive(pid)
    host.loop.call_soon_threadsafe(host.host.children[token].writer.close)  # as if the host died
    wait_for(lambda: not pid_alive(pid), 30, what="the rank killed itself")
    outcome = future.result(60)
    assert outcome.ok is None and outcome.exit_status == -signal.SIGKILL


def test_reports_are_relayed_to_the_supervisor_and_the_reply_comes_back(host):
    pushes = _Pushes()
    task = RankTask(job_id="j", spec={}, attempt=3, checkpoint_root="/tmp", resume_path=None, supervisor=pushes)
    replies = outcome_exit(host.launch(zygote_ranks.push_and_read, task)[2].result(120)).value
    assert replies == [{"command": "noted", "rank": 3}]
    assert pushes.got == [(3, [("metric", 1.0, {"loss": 0.5})])]


# ---- pure decisions ------------------------------------------------------------------------

def test_warm_start_blocker():
    assert warm_start_blocker({"OMP_NUM_THREADS": "2", "MY_FLAG": "1", "PYTHONPATH": "x"}, None) is None
    assert warm_start_blocker({}, "0") == "TRAINCTL_WARM_START=0"
    assert warm_start_blocker({}, "1") is None
    reason = warm_start_blocker({"LD_PRELOAD": "libtcmalloc.so", "OMP_PROC_BIND": "close"}, None)
    assert "LD_PRELOAD" in reason and "OMP_PROC_BIND" in reason


def test_split_bundle_gpus():
    assert split_bundle_gpus([], 2, 0) == [[], []]
    assert split_bundle_gpus(["3", "1"], 2, 1) == [["1"], ["3"]]
    assert split_bundle_gpus(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    assert split_bundle_gpus(["5"], 2, 0.5) == [["5"], ["5"]]
    assert split_bundle_gpus(["0", "1"], 4, 0.5) == [["0"], ["0"], ["1"], ["1"]]


def test_describe_exit():
    assert describe_exit(RankOutcome(7, None, exit_status=-9)) == "the rank process (pid 7) was killed by SIGKILL"
    assert describe_exit(RankOutcome(7, None, exit_status=3)) == \
        "the rank process (pid 7) exited with code 3 without a result"
    assert "its zygote exited" in describe_exit(RankOutcome(7, None, note="its zygote exited"))


def test_unpack_package_once_per_content_hash(tmp_path):
    calls = []
    data = _zip({"a/b.py": "B = 2\n"})
    first = unpack_package("gcs://_ray_pkg_ff.zip", lambda uri: calls.append(uri) or data, tmp_path)
    again = unpack_package("gcs://_ray_pkg_ff.zip", lambda uri: calls.append(uri) or data, tmp_path)
    assert first == again == tmp_path / "_ray_pkg_ff" and (first / "a" / "b.py").exists()
    assert calls == ["gcs://_ray_pkg_ff.zip"]


def test_child_env_gives_pythonpath_as_rays_working_dir_does():
    env = child_env({"PATH": "/bin", "PYTHONPATH": "/node"}, {"PYTHONPATH": "/job", "X": "1"}, "/wd")
    assert env == {"PATH": "/bin", "PYTHONPATH": os.pathsep.join(["/wd", "/job", "/node"]), "X": "1"}
    assert child_env({"PATH": "/bin"}, {}, None) == {"PATH": "/bin"}


def test_the_reporter_pushes_through_ray_or_through_the_host_relay():
    from orchestrator.control.supervisor import SupervisorRef
    from orchestrator.runtime.reporting import RayPushChannel, push_channel
    from orchestrator.runtime.zygote import HostRelay

    ref = SupervisorRef(host=object(), job_id="j")  # answers every attribute, `replies` too
    assert isinstance(push_channel(ref), RayPushChannel) and push_channel(ref).supervisor is ref
    relay = HostRelay.__new__(HostRelay)
    assert push_channel(relay) is relay and push_channel(None) is None
