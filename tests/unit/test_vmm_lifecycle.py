"""The VM lifecycle table (kasou.vmm.lifecycle): every state against every transition."""

from __future__ import annotations

import itertools

import pytest

from kasou.errors import LifecycleError
from kasou.vmm.lifecycle import Transition, VmState, next_state

CREATED, RUNNING = VmState.CREATED, VmState.RUNNING
PAUSED, STOPPED = VmState.PAUSED, VmState.STOPPED
START, PAUSE = Transition.START, Transition.PAUSE
RESUME, STOP = Transition.RESUME, Transition.STOP

# Written out from the diagram in DESIGN.md (created -> running <-> paused -> stopped), not read
# from the module, so a change to the table has to change this too.
ALLOWED = {
    (CREATED, START): RUNNING,
    (RUNNING, PAUSE): PAUSED,
    (PAUSED, RESUME): RUNNING,
    (CREATED, STOP): STOPPED,
    (RUNNING, STOP): STOPPED,
    (PAUSED, STOP): STOPPED,
}

# The states each transition may start from, as the error message names them.
FROM = {START: {"created"}, PAUSE: {"running"}, RESUME: {"paused"}}
FROM[STOP] = {"created", "running", "paused"}

EVERY_PAIR = list(itertools.product(VmState, Transition))


def test_the_enums_are_what_the_table_covers() -> None:
    assert len(EVERY_PAIR) == 16
    assert {state.value for state in VmState} == {"created", "running", "paused", "stopped"}


@pytest.mark.parametrize(
    ("current", "transition"), [pair for pair in EVERY_PAIR if pair in ALLOWED]
)
def test_allowed_transitions_lead_to_the_next_state(
    current: VmState, transition: Transition
) -> None:
    assert next_state(current, transition) is ALLOWED[(current, transition)]


@pytest.mark.parametrize(
    ("current", "transition"), [pair for pair in EVERY_PAIR if pair not in ALLOWED]
)
def test_other_transitions_name_current_and_wanted_states(
    current: VmState, transition: Transition
) -> None:
    with pytest.raises(LifecycleError) as caught:
        next_state(current, transition)
    error = caught.value
    assert error.current == current.value
    assert set(error.wanted.split(" or ")) == FROM[transition]
    message = str(error)
    assert message.startswith(f"cannot {transition.value}: the VM is {current.value}")
    for state in FROM[transition]:
        assert state in message


def test_stopped_is_final() -> None:
    for transition in Transition:
        with pytest.raises(LifecycleError, match="the VM is stopped"):
            next_state(STOPPED, transition)


def test_a_full_life() -> None:
    state = CREATED
    for transition in (START, PAUSE, RESUME, PAUSE, RESUME, STOP):
        state = next_state(state, transition)
    assert state is STOPPED
