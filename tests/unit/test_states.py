import itertools

import pytest

from leasesched.states import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    TaskStatus,
    Transition,
    allowed,
    quarantined_status,
    target,
)


@pytest.mark.parametrize("transition", list(Transition))
def test_every_transition_is_defined(transition: Transition) -> None:
    sources, to = TRANSITIONS[transition]
    assert sources, transition
    assert isinstance(to, TaskStatus)


@pytest.mark.parametrize("transition,status", list(itertools.product(Transition, TaskStatus)))
def test_target_raises_exactly_for_illegal_sources(transition: Transition, status: TaskStatus) -> None:
    sources, to = TRANSITIONS[transition]
    if status in sources:
        assert target(transition, status) == to
        assert allowed(transition, status)
    else:
        with pytest.raises(IllegalTransition) as err:
            target(transition, status)
        assert status.value in str(err.value)
        assert not allowed(transition, status)


def test_terminal_states_have_no_automatic_way_out() -> None:
    """Only a person leaves a terminal state: the operator's retry (on the task's version)."""
    for transition, (sources, _) in TRANSITIONS.items():
        if transition == Transition.OPERATOR_RETRY:
            assert sources == {TaskStatus.FAILED, TaskStatus.CANCELLED}
            continue
        assert not (sources & TERMINAL), f"{transition} leaves a terminal state"


def test_operator_transitions() -> None:
    assert target(Transition.OPERATOR_RETRY, TaskStatus.FAILED) == TaskStatus.SCHEDULED
    assert target(Transition.OPERATOR_RETRY, TaskStatus.CANCELLED) == TaskStatus.SCHEDULED
    assert not allowed(Transition.OPERATOR_RETRY, TaskStatus.SUCCEEDED)  # a success is never run again
    assert target(Transition.RESUME, TaskStatus.SCHEDULED) == TaskStatus.SCHEDULED
    assert target(Transition.MARK_FAILED, TaskStatus.SCHEDULED) == TaskStatus.FAILED
    assert not allowed(Transition.MARK_FAILED, TaskStatus.RUNNING)  # a running task is terminated instead
    assert target(Transition.TERMINATE, TaskStatus.RUNNING) == TaskStatus.FAILED
    assert not allowed(Transition.TERMINATE, TaskStatus.SCHEDULED)


def test_expected_graph() -> None:
    assert target(Transition.CLAIM, TaskStatus.SCHEDULED) == TaskStatus.RUNNING
    assert target(Transition.COMPLETE, TaskStatus.RUNNING) == TaskStatus.SUCCEEDED
    assert target(Transition.RETRY, TaskStatus.RUNNING) == TaskStatus.SCHEDULED
    assert target(Transition.LEASE_EXPIRED_RETRY, TaskStatus.RUNNING) == TaskStatus.SCHEDULED
    assert target(Transition.CANCEL, TaskStatus.SCHEDULED) == TaskStatus.CANCELLED
    assert target(Transition.CANCEL_ACK, TaskStatus.RUNNING) == TaskStatus.CANCELLED
    with pytest.raises(IllegalTransition):
        target(Transition.CANCEL, TaskStatus.RUNNING)  # running tasks get a cancel *request*
    with pytest.raises(IllegalTransition):
        target(Transition.CLAIM, TaskStatus.RUNNING)


def test_quarantine_fails_live_tasks_and_keeps_terminal_ones() -> None:
    assert target(Transition.QUARANTINE, TaskStatus.SCHEDULED) == TaskStatus.FAILED
    assert target(Transition.QUARANTINE, TaskStatus.RUNNING) == TaskStatus.FAILED
    assert quarantined_status(TaskStatus.SCHEDULED) == TaskStatus.FAILED
    assert quarantined_status(TaskStatus.RUNNING) == TaskStatus.FAILED
    assert quarantined_status(None) == TaskStatus.FAILED  # the stored status itself is unreadable
    for status in TERMINAL:
        assert not allowed(Transition.QUARANTINE, status)
        assert quarantined_status(status) == status  # only its bad columns are repaired
