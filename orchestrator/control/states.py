"""The job state machine: every state, whether it is terminal, and the legal moves."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    PREEMPTING = "PREEMPTING"  # asked to checkpoint now and give its resources back
    POST_TRAINING = "POST_TRAINING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    STOPPED = "STOPPED"  # ended early by its sweep (a pruned trial); not a failure

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.STOPPED)

    @property
    def holds_resources(self) -> bool:
        return self in (JobState.STARTING, JobState.RUNNING, JobState.RESTARTING, JobState.PREEMPTING,
                        JobState.POST_TRAINING)


_END = {JobState.FAILED, JobState.CANCELLED, JobState.STOPPED}
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.PENDING: {JobState.QUEUED} | _END,
    JobState.QUEUED: {JobState.STARTING} | _END,
    JobState.STARTING: {JobState.RUNNING, JobState.RESTARTING, JobState.QUEUED} | _END,
    JobState.RUNNING: {JobState.RESTARTING, JobState.PREEMPTING, JobState.POST_TRAINING,
                       JobState.SUCCEEDED} | _END,
    # QUEUED: the head restarted; the job waits for a new reservation
    JobState.RESTARTING: {JobState.RUNNING, JobState.STARTING, JobState.QUEUED, JobState.PREEMPTING} | _END,
    # QUEUED: its just-in-time checkpoint is saved (or the grace ran out), its resources freed;
    # RESTARTING: a rank failed meanwhile, which the attempt loop handles as any failure, or an
    # elastic job continues at another size; SUCCEEDED/POST_TRAINING: it finished before its save
    JobState.PREEMPTING: {JobState.QUEUED, JobState.RESTARTING, JobState.SUCCEEDED,
                          JobState.POST_TRAINING} | _END,
    # RESTARTING: the supervisor was lost mid-stage; a new one resumes from the final checkpoint
    JobState.POST_TRAINING: {JobState.SUCCEEDED, JobState.RESTARTING} | _END,
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
    JobState.STOPPED: set(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a job cannot go from {old.value} to {new.value}")
