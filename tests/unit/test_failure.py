"""orchestrator/control/failure.py: decide() restarts until max_restarts; FATAL never restarts; a dead
rank's cause in words; a full checkpoint storage restarts only once it has room again."""

from __future__ import annotations

import pytest

from orchestrator.control.failure import (
    Decision,
    Failure,
    FailureKind,
    RankDeath,
    death_cause,
    decide,
    describe_death,
    fatal_signal,
    format_bytes,
    oom_kills_between,
    ray_exit_type,
    root_failure,
)

RETRYABLE = [FailureKind.WORKER_DIED, FailureKind.NODE_LOST, FailureKind.ERROR]


@pytest.mark.parametrize("kind", RETRYABLE, ids=lambda k: k.value)
def test_restart_until_max_restarts(kind):
    failure = Failure(kind, rank=1, message="boom")
    decisions = [decide(failure, restarts_so_far=n, max_restarts=3) for n in range(6)]
    assert decisions == [Decision.RESTART] * 3 + [Decision.FAIL] * 3


@pytest.mark.parametrize("kind", RETRYABLE, ids=lambda k: k.value)
def test_zero_max_restarts_fails_at_once(kind):
    assert decide(Failure(kind, 0, "x"), 0, 0) is Decision.FAIL


@pytest.mark.parametrize("restarts", [0, 1, 5])
def test_fatal_never_restarts(restarts):
    failure = Failure(FailureKind.FATAL, rank=0, message="bad input")
    assert decide(failure, restarts_so_far=restarts, max_restarts=100) is Decision.FAIL


def test_describe():
    assert (
        Failure(FailureKind.NODE_LOST, 2, "node gone").describe() == "rank 2: node_lost: node gone"
    )
    assert Failure(FailureKind.ERROR, None, "x").describe() == "the job: error: x"


# ---- why a rank died, in words -------------------------------------------------------------

RAY_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: WorkerActor\n"
            "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
            "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file.")
# what faulthandler wrote in a real segfaulting rank (tests/cluster/test_crash_visibility.py makes one)
SEGV_TEXT = ("step 3\nFatal Python error: Segmentation fault\n\nCurrent thread 0x00007f (most recent call first):\n"
             '  File "/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at\n')


@pytest.mark.parametrize("words, signal", [
    ("Segmentation fault", "SIGSEGV"), ("Aborted", "SIGABRT"), ("Bus error", "SIGBUS"),
    ("Floating-point exception", "SIGFPE"), ("Illegal instruction", "SIGILL"),
])
def test_fatal_signal_read_from_faulthandler_text(words, signal):
    assert fatal_signal(f"some output\nFatal Python error: {words}\n\nThread 0x1 ...") == signal


def test_no_signal_without_a_faulthandler_report():
    assert fatal_signal("") is None
    assert fatal_signal("Fatal Python error: init_fs_encoding: failed") is None  # not a signal


def test_segfault_names_the_signal_and_where_to_look():
    message = describe_death(RankDeath(RAY_DIED, SEGV_TEXT, oom_kills=0), "job-1", 0)
    assert message == "killed by SIGSEGV (see trainctl logs job-1 --rank 0)"
    failure = Failure(FailureKind.WORKER_DIED, 0, message)
    assert failure.describe() == "rank 0 killed by SIGSEGV (see trainctl logs job-1 --rank 0)"


def test_kernel_oom_killer_is_named_with_the_last_memory_seen():
    cause = death_cause(RankDeath(RAY_DIED, "", oom_kills=1, last_rss_bytes=3_200_000_000))
    assert cause.startswith("killed by SIGKILL: the kernel's OOM killer")
    assert "3.2 GB resident at its last report" in cause


def test_ray_memory_monitor_kill_is_named():
    text = RAY_DIED.replace("SYSTEM_ERROR", "NODE_OUT_OF_MEMORY")
    cause = death_cause(RankDeath(text, "", oom_kills=0, last_rss_bytes=None))
    assert cause == "killed by Ray's memory monitor: its node ran low on memory"


def test_a_kill_without_a_trace_says_so_and_whether_the_oom_killer_acted():
    assert death_cause(RankDeath(RAY_DIED, "", oom_kills=0)) == \
        "died without a crash report (SIGKILL or os._exit; the kernel's OOM killer did not act)"
    assert death_cause(RankDeath(RAY_DIED, "", oom_kills=None)) == "died without a crash report (SIGKILL or os._exit)"


def test_a_crash_report_wins_over_an_oom_count_of_another_process():
    assert death_cause(RankDeath(RAY_DIED, SEGV_TEXT, oom_kills=2)) == "killed by SIGSEGV"


def test_oom_kills_between_two_readings():
    assert oom_kills_between(3, 5) == 2
    assert oom_kills_between(None, 5) is None and oom_kills_between(3, None) is None


def test_ray_exit_type():
    assert ray_exit_type(RAY_DIED) == "SYSTEM_ERROR"
    assert ray_exit_type("no such words") is None


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (2_000_000, "2 MB"), (35_240_000, "35.2 MB"),
                                     (1_500_000_000, "1.5 GB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_a_dead_rank_explains_its_peers_errors():
    peer = Failure(FailureKind.ERROR, 1, "RuntimeError: Connection closed by peer")
    dead = Failure(FailureKind.WORKER_DIED, 0, "killed by SIGSEGV")
    aborted = Failure(FailureKind.WORKER_DIED, 1, "killed by SIGABRT")
    assert root_failure([peer, dead]) is dead
    assert root_failure([dead, aborted]) is dead  # the same kind: the first seen
    assert root_failure([peer]) is peer
    lost = Failure(FailureKind.NODE_LOST, 1, "node gone")
    assert root_failure([dead, lost]) is lost


# ---- a checkpoint storage that refused a save -------------------------------------------------

def test_storage_failure_restarts_only_when_the_storage_is_ready_again():
    full = Failure(FailureKind.STORAGE, 0, "checkpoint save failed: no space left on device in /x",
                   needed_bytes=10)
    assert full.describe() == "checkpoint save failed: no space left on device in /x"
    assert decide(full, 0, 3, storage_ready=False) is Decision.FAIL
    assert decide(full, 0, 3, storage_ready=True) is Decision.RESTART
    assert decide(full, 3, 3, storage_ready=True) is Decision.FAIL  # still counts against max_restarts


def test_every_restart_or_fail_decision_is_the_failure_policys():
    from orchestrator.control.failure import classify_exception, counted_restarts
    from orchestrator.errors import NonRetryableError
    from orchestrator.runtime.checkpoint import CheckpointWriteError

    fatal = (NonRetryableError,)
    assert classify_exception(NonRetryableError("x"), fatal) is FailureKind.FATAL
    assert classify_exception(RuntimeError("x"), fatal) is FailureKind.ERROR
    assert classify_exception(CheckpointWriteError("no space left on device", "/c", 1, 0), fatal) is FailureKind.STORAGE
    lost = Failure(FailureKind.SUPERVISOR_LOST, None, "the job's supervisor was lost")
    assert decide(lost, 0, 1) is Decision.RESTART and decide(lost, 1, 1) is Decision.FAIL
    from orchestrator.control.record import RestartRecord
    restarts = [RestartRecord(at=0, attempt=i, cause="", kind=k) for i, k in enumerate(("head_restarted", "error", "hang"))]
    assert counted_restarts(restarts) == 2
