"""orchestrator/failure.py: decide() restarts until max_restarts; FATAL never restarts."""

from __future__ import annotations

import pytest

from orchestrator.failure import Decision, Failure, FailureKind, decide

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
