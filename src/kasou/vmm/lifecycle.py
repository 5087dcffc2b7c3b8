"""A VM's states and the transitions between them, checked in one place.

::

    created --start--> running --pause--> paused
                       running <--resume-- paused
    running | paused --stop--> stopped      (a request, or the guest's own end)
    created --stop--> stopped               (a VM torn down before it ran)
"""

from __future__ import annotations

import enum

from kasou.errors import LifecycleError

__all__ = ["Transition", "VmState", "next_state"]


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Transition(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


_TABLE: dict[tuple[VmState, Transition], VmState] = {
    (VmState.CREATED, Transition.START): VmState.RUNNING,
    (VmState.RUNNING, Transition.PAUSE): VmState.PAUSED,
    (VmState.PAUSED, Transition.RESUME): VmState.RUNNING,
    (VmState.CREATED, Transition.STOP): VmState.STOPPED,
    (VmState.RUNNING, Transition.STOP): VmState.STOPPED,
    (VmState.PAUSED, Transition.STOP): VmState.STOPPED,
}


def next_state(current: VmState, transition: Transition) -> VmState:
    """The state ``transition`` leads to from ``current``, or ``LifecycleError``."""
    try:
        return _TABLE[(current, transition)]
    except KeyError:
        allowed = sorted(state.value for (state, step) in _TABLE if step is transition)
        raise LifecycleError(current.value, " or ".join(allowed), transition.value) from None
