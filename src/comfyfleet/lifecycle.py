"""The lifecycles of an instance and of a job: their states and the legal moves.

Pure data and functions, no database (importing it never loads SQLAlchemy): the
store validates every transition with them, and the reconcile planner, the failure
policy and the agent's stage reports name their states after them.

An instance moves ``requested → creating → booting → provisioning → downloading →
starting_app → warming → ready ⇄ busy → draining → destroying → destroyed``, and to
``failed`` from any state before ``destroyed`` (ARCHITECTURE.md). Two rules refine
the picture:

- Along the boot stages (``creating`` to ``ready``) an instance may move forward past
  a stage, never back: an agent with nothing to download goes from ``provisioning``
  to ``starting_app``, and a control plane that restarts finds agents further on than
  its rows say (reconciliation is level-triggered). ``requested`` (the record made
  before the provider is called) moves on to ``creating``, or straight to
  ``destroyed`` when the rental is abandoned before any contract exists.
- ``destroying`` can be entered from every live state (an admin terminate, a scale
  down, a failure that must first be destroyed), and ends in ``destroyed``, or in
  ``failed`` when the instance is destroyed because it failed. The store lets a row
  that has a provider contract reach ``failed`` only through ``destroying``.

``destroyed`` and ``failed`` are terminal: nothing bills for such a row, its slot is
free and it counts against no cap.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

__all__ = [
    "BOOT_STAGES",
    "INSTANCE_STATE_NAMES",
    "INSTANCE_TRANSITIONS",
    "JOB_TERMINAL_STATES",
    "JOB_TRANSITIONS",
    "LIVE_STATES",
    "TERMINAL_STATES",
    "TOKEN_REVOKED_STATES",
    "InstanceState",
    "InstanceStateName",
    "JobState",
    "can_transition",
    "can_transition_job",
]


class InstanceState(StrEnum):
    REQUESTED = "requested"
    CREATING = "creating"
    BOOTING = "booting"
    PROVISIONING = "provisioning"
    DOWNLOADING = "downloading"
    STARTING_APP = "starting_app"
    WARMING = "warming"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"


InstanceStateName = Literal[
    "requested",
    "creating",
    "booting",
    "provisioning",
    "downloading",
    "starting_app",
    "warming",
    "ready",
    "busy",
    "draining",
    "destroying",
    "destroyed",
    "failed",
]
"""``InstanceState``'s values as a type, in the same order, for code that handles the
states as plain strings (the pool's planner and policy). A type checker cannot derive
it from the enum; ``tests/test_lifecycle.py`` checks that the two agree."""
INSTANCE_STATE_NAMES: tuple[InstanceStateName, ...] = get_args(InstanceStateName)


class JobState(StrEnum):
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


BOOT_STAGES: tuple[InstanceState, ...] = (
    InstanceState.CREATING,
    InstanceState.BOOTING,
    InstanceState.PROVISIONING,
    InstanceState.DOWNLOADING,
    InstanceState.STARTING_APP,
    InstanceState.WARMING,
    InstanceState.READY,
)
"""The stages an instance goes through to become ready, in order."""

TERMINAL_STATES: frozenset[InstanceState] = frozenset(
    {InstanceState.DESTROYED, InstanceState.FAILED}
)
LIVE_STATES: frozenset[InstanceState] = frozenset(InstanceState) - TERMINAL_STATES
"""Every state from ``requested`` through ``destroying``: what the caps and slots count."""

TOKEN_REVOKED_STATES: frozenset[InstanceState] = frozenset(
    {InstanceState.DESTROYING, InstanceState.DESTROYED, InstanceState.FAILED}
)
"""Entering one of these revokes the instance's agent token."""


def _instance_transitions() -> dict[InstanceState, frozenset[InstanceState]]:
    s = InstanceState
    moves: dict[InstanceState, set[InstanceState]] = {state: set() for state in s}
    moves[s.REQUESTED].update({s.CREATING, s.DESTROYED})
    for i, stage in enumerate(BOOT_STAGES[:-1]):
        moves[stage].update(BOOT_STAGES[i + 1 :])
    moves[s.READY].update({s.BUSY, s.DRAINING})
    moves[s.BUSY].update({s.READY, s.DRAINING})
    for state in LIVE_STATES:
        if state is not s.DESTROYING:
            moves[state].update({s.DESTROYING, s.FAILED})
    moves[s.DESTROYING].update({s.DESTROYED, s.FAILED})
    return {state: frozenset(targets) for state, targets in moves.items()}


INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = _instance_transitions()
"""For each instance state, the states it may move to."""

JOB_TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
)

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PLACED, JobState.FAILED, JobState.CANCELLED}),
    # Back to ``queued`` when the instance dies under the job (a new attempt, a new lease).
    JobState.PLACED: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
"""For each job state, the states it may move to."""


def can_transition(from_state: InstanceState, to_state: InstanceState) -> bool:
    """Whether an instance may move from ``from_state`` to ``to_state``."""
    return to_state in INSTANCE_TRANSITIONS[from_state]


def can_transition_job(from_state: JobState, to_state: JobState) -> bool:
    """Whether a job may move from ``from_state`` to ``to_state``."""
    return to_state in JOB_TRANSITIONS[from_state]
