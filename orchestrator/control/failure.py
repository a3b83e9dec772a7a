"""Failure policy: a function from what went wrong to RESTART or FAIL, and the words for it.

Everything here is a pure function of what the supervisor learnt (Ray's error text, the
crash report a dying rank left, kernel counters), so it is tested without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Decision(str, Enum):
    RESTART = "RESTART"
    FAIL = "FAIL"


class FailureKind(str, Enum):
    WORKER_DIED = "worker_died"   # the rank's process vanished (SIGKILL, OOM killer, segfault)
    NODE_LOST = "node_lost"       # the node under the rank went away
    ERROR = "error"               # the training function raised
    FATAL = "fatal"               # NonRetryableError or bad input: restarting cannot help
    STORAGE = "checkpoint_storage"  # a checkpoint could not be written (disk full, not writable)
    HANG = "hang"                 # a rank stopped making progress (stuck collective, deadlock, SIGSTOP)
    SUPERVISOR_LOST = "supervisor_lost"  # the job's supervisor actor died (its node, or a bug of ours)
    HEAD_RESTARTED = "head_restarted"  # the head restarted under a running job (not the job's doing)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    rank: int | None
    message: str
    needed_bytes: int | None = None  # STORAGE: about how much room the checkpoint needs

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the job"
        if self.kind is FailureKind.WORKER_DIED:
            return f"{who} {self.message}"  # "rank 0 killed by SIGSEGV (see trainctl logs ...)"
        if self.kind is FailureKind.STORAGE:
            return self.message  # "checkpoint save failed: ...": the storage is the job's, not a rank's
        if self.kind is FailureKind.HANG:
            return f"hang: {self.message}"  # "hang: rank 1 on node X silent for 300 s in all_reduce (...)"
        return f"{who}: {self.kind.value}: {self.message}"


def classify_exception(cause: BaseException, fatal: tuple[type[BaseException], ...]) -> FailureKind:
    """What a rank's exception means for the job: bad input that a restart cannot fix (`fatal`:
    a user error, bad data, an impossible strategy setup), a storage that refused a checkpoint,
    or an error a restart may get past."""
    from ..runtime.checkpoint import CheckpointWriteError

    if isinstance(cause, CheckpointWriteError):
        return FailureKind.STORAGE
    return FailureKind.FATAL if isinstance(cause, fatal) else FailureKind.ERROR


def decide(failure: Failure, restarts_so_far: int, max_restarts: int,
           storage_ready: bool = False) -> Decision:
    """`storage_ready`: for a STORAGE failure, whether the checkpoint storage can take the
    checkpoint now (space came back, writable again); otherwise a restart would only fail again."""
    if failure.kind is FailureKind.FATAL:
        return Decision.FAIL
    if failure.kind is FailureKind.STORAGE and not storage_ready:
        return Decision.FAIL
    return Decision.RESTART if restarts_so_far < max_restarts else Decision.FAIL


# When several ranks fail together, the one that explains the others: a lost node or a
# dead rank makes its peers' collectives raise (gloo: "Connection closed by peer").
_ROOT_FIRST = [FailureKind.NODE_LOST, FailureKind.STORAGE, FailureKind.FATAL, FailureKind.WORKER_DIED,
               FailureKind.HANG, FailureKind.ERROR, FailureKind.HEAD_RESTARTED]

# Restarts that were not the job's doing do not use up its `failure.max_restarts`.
_NOT_COUNTED = {FailureKind.HEAD_RESTARTED.value}


def counted_restarts(restarts: list) -> int:
    """How many of a job's restarts (record.RestartRecord) count against `failure.max_restarts`."""
    return sum(1 for r in restarts if r.kind not in _NOT_COUNTED)


def root_failure(failures: list[Failure]) -> Failure:
    """The failure to report among those seen together (in arrival order: ties go to the first)."""
    return min(failures, key=lambda f: _ROOT_FIRST.index(f.kind))


_EXIT_TYPE = re.compile(r"Worker exit type: (\w+)")


def ray_exit_type(ray_error: str) -> str | None:
    """Ray's classification of a worker's exit (SYSTEM_ERROR, NODE_OUT_OF_MEMORY, ...)."""
    found = _EXIT_TYPE.search(ray_error)
    return found.group(1) if found else None


# ---- why a rank's process died ---------------------------------------------------------

# faulthandler's first line names the fatal signal it caught ("Fatal Python error: Aborted").
_FAULTHANDLER_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}
_FATAL_LINE = re.compile(r"Fatal Python error: (" + "|".join(map(re.escape, _FAULTHANDLER_SIGNALS)) + r")")
# Ray's memory monitor kills a worker with SIGKILL and says so in the actor's death cause.
_RAY_OOM = re.compile(r"NODE_OUT_OF_MEMORY|running low on memory|OutOfMemoryError", re.IGNORECASE)


@dataclass(frozen=True)
class RankDeath:
    """What is known about a rank's process after it vanished."""
    ray_error: str                    # the text of Ray's ActorDiedError
    crash_text: str = ""              # what the rank wrote to fds 1/2 after its last report
    oom_kills: int | None = None      # the kernel's OOM kills on its node during the attempt
    last_rss_bytes: int | None = None  # the rank's resident memory at its last report


def oom_kills_between(before: int | None, after: int | None) -> int | None:
    """The kernel's OOM kills on a node between two readings of its counter (None: unknown)."""
    return None if before is None or after is None else after - before


def fatal_signal(crash_text: str) -> str | None:
    """The signal faulthandler reported in the rank's last output, e.g. "SIGSEGV"."""
    found = _FATAL_LINE.findall(crash_text)
    return _FAULTHANDLER_SIGNALS[found[-1]] if found else None


def format_bytes(n: float) -> str:
    """2_000_000 -> "2 MB", 35_240_000 -> "35.2 MB" (powers of 1000, as `df -H` counts)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{f'{n:.1f}'.rstrip('0').rstrip('.')} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def death_cause(death: RankDeath) -> str:
    """The words after "rank N": "killed by SIGSEGV", "killed by the kernel's OOM killer ...", ..."""
    memory = f", {format_bytes(death.last_rss_bytes)} resident at its last report" if death.last_rss_bytes else ""
    signal = fatal_signal(death.crash_text)
    if signal is not None:
        return f"killed by {signal}"
    if _RAY_OOM.search(death.ray_error):
        return f"killed by Ray's memory monitor: its node ran low on memory{memory}"
    if death.oom_kills:
        return (f"killed by SIGKILL: the kernel's OOM killer (it killed {death.oom_kills} process(es) "
                f"on its node during this attempt{memory})")
    # No handler runs for SIGKILL and os._exit skips faulthandler: nothing left to read.
    not_oom = "; the kernel's OOM killer did not act" if death.oom_kills == 0 else ""
    return f"died without a crash report (SIGKILL or os._exit{not_oom}{memory})"


def describe_death(death: RankDeath, job_id: str, rank: int) -> str:
    """Failure.message for a WORKER_DIED failure of `rank`."""
    return f"{death_cause(death)} (see trainctl logs {job_id} --rank {rank})"
