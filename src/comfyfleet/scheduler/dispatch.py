"""Placing a queued job on an instance: the transaction behind the agent's ``next`` call.

``take_next_job`` locks the instance, checks that it may take a job (``ready`` or
``busy``, under its job cap), reads the few candidates the choice needs, lets
``choose_job`` pick one and places it under a new lease with ``store.jobs.place_job``.
The choice is a pure function over ``Candidate`` values (ARCHITECTURE.md's functional
core): first a job reserved to this instance (its OnStart job), then the queue of the
instance's profile, higher priority first, FIFO within one. Candidates are read with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so that two replicas placing at once take two
different jobs; SQLite serializes its writers anyway.

Every query here is on the path of each job (the throughput target is 100 jobs/s on
SQLite for the agent's whole exchange), so the instance is locked once and the job
count is read only when the instance's state does not settle it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from comfyfleet.lifecycle import InstanceState, JobState
from comfyfleet.store.instances import get_instance
from comfyfleet.store.jobs import ACTIVE_JOB_STATES, InstanceUnavailable, place_job
from comfyfleet.store.models import InstanceRow, JobRow

__all__ = [
    "TAKING_STATES",
    "Candidate",
    "Placement",
    "choose_job",
    "instance_key",
    "take_next_job",
]

TAKING_STATES: Final = frozenset({InstanceState.READY, InstanceState.BUSY})
"""The states in which an instance is handed jobs."""


def instance_key(instance_id: int) -> tuple[str, int]:
    """The key an agent's ``next`` also waits on: a job of its own (pinned) or a free slot."""
    return ("instance", instance_id)


@dataclass(frozen=True)
class Candidate:
    """A queued job as the choice sees it."""

    job_id: str
    priority: int
    created_at: float
    #: The instance the job is reserved to (an OnStart job), or None: any of its profile.
    pinned_instance_id: int | None = None


@dataclass(frozen=True)
class Placement:
    """A job placed on an instance: what the agent's JOB answer is made of."""

    job_id: str
    lease_id: str
    attempt: int
    profile: str
    workflow: dict[str, Any]
    #: ``[{"name", "sha256", "size"}]``: the files to upload to ComfyUI before running.
    inputs: list[dict[str, Any]]
    #: What is left of the attempt's timeout (None: none).
    timeout_s: float | None


def _queue_order(candidate: Candidate) -> tuple[int, float, str]:
    # Job ids are time-ordered (UUIDv7): they break ties between equal ``created_at``.
    return (-candidate.priority, candidate.created_at, candidate.job_id)


def choose_job(instance_id: int, candidates: Iterable[Candidate]) -> Candidate | None:
    """The job ``instance_id`` runs next: one reserved to it first, else the head of the
    queue among the jobs reserved to no instance; None when there is neither."""
    pinned: list[Candidate] = []
    free: list[Candidate] = []
    for candidate in candidates:
        if candidate.pinned_instance_id == instance_id:
            pinned.append(candidate)
        elif candidate.pinned_instance_id is None:
            free.append(candidate)
    for group in (pinned, free):
        if group:
            return min(group, key=_queue_order)
    return None


def _candidates(session: Session, instance: InstanceRow, limit: int = 1) -> list[Candidate]:
    """The jobs reserved to the instance, or else the head of its profile's free queue."""
    # By the index on pinned_instance_id alone (a reserved job is rare): the queue's
    # index would have SQLite scan every queued job of the profile to find it.
    reserved = session.execute(
        select(JobRow.id, JobRow.priority, JobRow.created_at, JobRow.profile)
        .where(JobRow.pinned_instance_id == instance.id, JobRow.state == JobState.QUEUED)
        .with_for_update(skip_locked=True)
    ).all()
    found = [
        Candidate(job_id, priority, created_at, instance.id)
        for job_id, priority, created_at, profile in reserved
        if profile == instance.profile
    ]
    if found:
        return found  # a reserved job goes first: the free queue need not be read
    query = (
        select(JobRow.id, JobRow.priority, JobRow.created_at)
        .where(
            JobRow.state == JobState.QUEUED,
            JobRow.profile == instance.profile,
            JobRow.pinned_instance_id.is_(None),
        )
        .order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Candidate(*row) for row in session.execute(query)]


def _inputs(request: dict[str, Any]) -> list[dict[str, Any]]:
    listed = request.get("inputs") or []
    return [
        {"name": str(item["name"]), "sha256": str(item["sha256"]), "size": item.get("size")}
        for item in listed
        if isinstance(item, dict) and item.get("name") and item.get("sha256")
    ]


def take_next_job(
    session: Session,
    instance: InstanceRow | int,
    now: float,
    *,
    lease_ttl_s: float,
    max_jobs_per_instance: int,
) -> Placement | None:
    """Place the next job on ``instance`` under a new lease, in the caller's transaction;
    None when the instance may take no job now or none waits for it.

    ``instance`` is an id, or the row already locked in this transaction (the route
    locked it to check the agent's token). The instance must be ``ready`` or ``busy``
    with fewer than ``max_jobs_per_instance`` jobs placed or running on it.
    """
    row = (
        instance
        if isinstance(instance, InstanceRow)
        else get_instance(session, instance, lock=True)
    )
    if row.state not in TAKING_STATES:
        return None
    # A ready instance holds no job (placing one makes it busy): only a busy one is counted.
    if row.state is InstanceState.BUSY:
        active = session.execute(
            select(func.count())
            .select_from(JobRow)
            .where(JobRow.instance_id == row.id, JobRow.state.in_(sorted(ACTIVE_JOB_STATES)))
        ).scalar_one()
        if active >= max_jobs_per_instance:
            return None
    chosen = choose_job(row.id, _candidates(session, row))
    if chosen is None:
        return None
    try:
        lease_id = place_job(
            session,
            chosen.job_id,
            row.id,
            now,
            lease_ttl_s,
            max_jobs_per_instance=max_jobs_per_instance,
        )
    except InstanceUnavailable:
        # place_job checks before it writes: nothing to undo, the instance just waits.
        return None
    job = session.get_one(JobRow, chosen.job_id)  # loaded, with its request, by place_job
    return Placement(
        job_id=job.id,
        lease_id=lease_id,
        attempt=job.attempts,
        profile=job.profile,
        workflow=dict(job.request.get("workflow") or {}),
        inputs=_inputs(job.request),
        timeout_s=max(job.deadline_at - now, 0.0) if job.deadline_at is not None else None,
    )
