"""orchestrator/control/states.py: the job state machine."""

from __future__ import annotations

from collections import deque
from itertools import pairwise

import pytest

from orchestrator.control.states import TRANSITIONS, IllegalTransition, JobState, check_transition

S = JobState
TERMINAL = {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.STOPPED}
LEGAL = sorted(
    ((old, new) for old, targets in TRANSITIONS.items() for new in targets),
    key=lambda p: (p[0].value, p[1].value),
)
ILLEGAL = sorted(
    ((old, new) for old in S for new in S if new not in TRANSITIONS[old]),
    key=lambda p: (p[0].value, p[1].value),
)


def _id(pair) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_every_state_has_a_transition_entry():
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.value)
def test_terminal_flags(state):
    assert state.terminal is (state in TERMINAL)


def test_resource_holding_states():
    holding = {s for s in S if s.holds_resources}
    assert holding == {S.STARTING, S.RUNNING, S.RESTARTING, S.PREEMPTING, S.POST_TRAINING}
    assert not any(s.holds_resources for s in TERMINAL)


def test_states_are_strings():
    assert S("RUNNING") is S.RUNNING
    assert S.RUNNING == "RUNNING"


@pytest.mark.parametrize("pair", LEGAL, ids=_id)
def test_legal_transition_accepted(pair):
    assert check_transition(*pair) is None


@pytest.mark.parametrize("pair", ILLEGAL, ids=_id)
def test_illegal_transition_rejected(pair):
    with pytest.raises(IllegalTransition) as info:
        check_transition(*pair)
    assert pair[0].value in str(info.value) and pair[1].value in str(info.value)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.SUCCEEDED, S.RUNNING),
        (S.QUEUED, S.RUNNING),
        (S.PENDING, S.RUNNING),
        (S.FAILED, S.QUEUED),
        (S.CANCELLED, S.RUNNING),
        (S.POST_TRAINING, S.RUNNING),
        (S.RUNNING, S.RUNNING),
        (S.RUNNING, S.PENDING),
    ],
    ids=lambda s: s.value,
)
def test_named_illegal_transitions(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_the_designed_happy_path_is_legal():
    path = [
        S.PENDING,
        S.QUEUED,
        S.STARTING,
        S.RUNNING,
        S.RESTARTING,
        S.RUNNING,
        S.PREEMPTING,
        S.QUEUED,
        S.STARTING,
        S.RUNNING,
        S.POST_TRAINING,
        S.SUCCEEDED,
    ]
    for old, new in pairwise(path):
        check_transition(old, new)


def test_a_sweep_may_stop_a_live_trial():
    for state in (S.QUEUED, S.STARTING, S.RUNNING, S.RESTARTING, S.PREEMPTING):
        check_transition(state, S.STOPPED)


@pytest.mark.parametrize(
    "state", sorted(set(S) - TERMINAL, key=lambda s: s.value), ids=lambda s: s.value
)
def test_every_live_state_can_fail_or_be_cancelled(state):
    check_transition(state, S.FAILED)
    check_transition(state, S.CANCELLED)


def test_every_state_reachable_from_pending():
    seen = {S.PENDING}
    todo = deque([S.PENDING])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(S)


@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value), ids=lambda s: s.value)
def test_terminal_states_have_no_exits(state):
    assert TRANSITIONS[state] == set()
    for new in S:
        with pytest.raises(IllegalTransition):
            check_transition(state, new)


def test_non_terminal_states_can_reach_a_terminal_state():
    for start in S:
        seen, todo = {start}, deque([start])
        while todo:
            for nxt in TRANSITIONS[todo.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & TERMINAL, start
