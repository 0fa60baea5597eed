"""Jobs in the store: queued FIFO within a priority, placed under a lease, ended exactly once.

A job goes ``queued → placed → running → succeeded | failed | cancelled``
(ARCHITECTURE.md, "Lifecycle of a job"). Every function takes the caller's
``Session`` and never commits; each move writes a ``job_audit_log`` row in the same
transaction. The rules that keep a job from succeeding twice:

- Each placement draws a new lease id and counts an attempt. The agent reports with
  the lease id (start, progress, renewals, outputs, the result), and the job's row is
  locked while it is checked: a lease that is not the job's current one is refused
  with ``StaleJobLease``, a report on a job that has ended with ``JobAlreadyEnded``.
- A job leaves ``placed`` or ``running`` for ``queued`` when its instance dies
  (``requeue_jobs_of_instance``) or its lease runs out (``expire_leases``); the lease
  is dropped then, so the old agent's reports are refused from that moment. With its
  attempts spent, it fails with the reason instead.
- A lease stays good until it is replaced or the job ends: an agent whose renewal was
  late still completes the job as long as the sweep has not requeued it.

An instance with a leased job is ``busy``: placing a job moves a ``ready`` instance to
``busy``, and the end of its last job moves it back (a ``draining`` instance stays
draining, for the reconciler to destroy once its jobs are done).

Timeouts count from each placement (``deadline_at``); ``fail_timed_out_jobs`` fails the
jobs past theirs, and the agent, refused on its next report, interrupts ComfyUI.
"""

from __future__ import annotations

import contextlib
import hmac
import mimetypes
import re
import secrets
import threading
import uuid
from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session, defer

from comfyfleet.errors import StaleInstanceState, StoreError
from comfyfleet.lifecycle import JOB_TERMINAL_STATES, JOB_TRANSITIONS, InstanceState, JobState
from comfyfleet.store.instances import get_instance, scrub, transition
from comfyfleet.store.locks import already_locked, mark_locked
from comfyfleet.store.models import (
    InstanceRow,
    JobAuditRow,
    JobOutputRow,
    JobRow,
    WebhookDeliveryRow,
)

__all__ = [
    "ACTIVE_JOB_STATES",
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_MAX_ATTEMPTS",
    "IllegalJobTransition",
    "InstanceUnavailable",
    "InvalidOutputName",
    "JobAlreadyEnded",
    "JobConflict",
    "OutputNameTaken",
    "StaleJobLease",
    "UnknownJob",
    "UnknownOutput",
    "active_jobs_of_instance",
    "complete_job",
    "expire_leases",
    "fail_job",
    "fail_jobs_pinned_to_ended_instances",
    "fail_pinned_jobs",
    "fail_timed_out_jobs",
    "finish_cancelled",
    "get_job",
    "get_output",
    "held_job",
    "job_outputs",
    "job_trail",
    "job_view",
    "jobs_for_key",
    "jobs_timed_out",
    "new_job_id",
    "next_jobs_for",
    "place_job",
    "queue_position",
    "queued_counts",
    "record_output",
    "renew_job_lease",
    "report_on_lease",
    "report_progress",
    "request_cancel",
    "requeue_jobs_of_instance",
    "safe_output_name",
    "start_job",
    "submit_job",
    "unpinned_queued_counts",
]

ACTIVE_JOB_STATES: Final = frozenset({JobState.PLACED, JobState.RUNNING})
"""The states in which a job holds a lease on an instance."""

DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_LEASE_TTL_S: Final = 60.0
"""How long a placement's lease lasts without a renewal from the agent."""

WEBHOOK_SECRET_PREFIX: Final = "whsec_"

# Who made a move, in the audit rows.
_USER: Final = "user"
_SCHEDULER: Final = "scheduler"
_AGENT: Final = "agent"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Characters that reorder text on screen: a name could pass for another (``gnp.exe``).
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


# ------------------------------------------------------------------ errors


class UnknownJob(StoreError):
    """No such job, or not one the caller's API key may see (the two read the same)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id}")


class UnknownOutput(StoreError):
    """The job has no output of this name."""

    def __init__(self, job_id: str, name: str):
        self.job_id = job_id
        self.name = name
        super().__init__(f"job {job_id} has no output named {name!r}")


class JobConflict(StoreError):
    """A job is not in a state for the call (the HTTP API answers 409)."""


class StaleJobLease(JobConflict):
    """The lease presented is not the job's current one: the job was placed again (or
    requeued) since. The agent must stop working on it; what it reports is discarded."""

    def __init__(self, job_id: str, state: JobState):
        self.job_id = job_id
        self.state = state
        super().__init__(
            f"job {job_id} is no longer held under the lease presented (it is {state} now: "
            "requeued or placed elsewhere after its instance died or its lease expired); "
            "stop working on it, its result will not be accepted"
        )


class JobAlreadyEnded(JobConflict):
    """The job has ended (``state``); it never ends a second time."""

    def __init__(self, job_id: str, state: JobState):
        self.job_id = job_id
        self.state = state
        super().__init__(f"job {job_id} has already ended: it {state}; it cannot end again")


class IllegalJobTransition(JobConflict):
    """A move the job lifecycle does not allow from the job's current state."""

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState, why: str = ""):
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state
        allowed = ", ".join(sorted(JOB_TRANSITIONS[from_state])) or "nothing (it has ended)"
        super().__init__(
            f"job {job_id} cannot go from {from_state} to {to_state}: "
            + (why or f"from {from_state} it may go to: {allowed}")
        )


class InstanceUnavailable(JobConflict):
    """The instance cannot take the job: wrong profile, not ready, or at its job limit."""

    def __init__(self, instance_id: int, why: str):
        self.instance_id = instance_id
        super().__init__(f"instance {instance_id} cannot take a job: {why}")


class InvalidOutputName(StoreError):
    """An output's name is empty, ``.``/``..``, too long or holds control characters."""


class OutputNameTaken(JobConflict):
    """The job already has an output of this name with other content."""

    def __init__(self, job_id: str, name: str):
        self.job_id = job_id
        self.name = name
        super().__init__(
            f"job {job_id} already has an output named {name!r} with other content: "
            "give each output a distinct base name (fold its subfolder into the name)"
        )


# ------------------------------------------------------------------ ids


class _IdClock:
    """The last (millisecond, counter) handed out, so ids grow even at the same instant."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms = 0
        self.counter = 0

    def next(self, ms: int) -> tuple[int, int]:
        with self.lock:
            if ms > self.ms:
                self.ms, self.counter = ms, 0
            elif self.counter < 0xFFF:
                self.counter += 1
            else:
                self.ms, self.counter = self.ms + 1, 0
            return self.ms, self.counter


_ids = _IdClock()


def new_job_id(now: float) -> str:
    """A UUIDv7 (RFC 9562) for a job submitted at ``now``.

    Ids sort in submission order, within one process even for jobs submitted at one
    instant (a counter fills the bits under the millisecond): the queue's FIFO order
    breaks ties on ``created_at`` with the id.
    """
    ms, counter = _ids.next(max(int(now * 1000), 0))
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


# ------------------------------------------------------------------ helpers


def _log(
    session: Session,
    job: JobRow,
    from_state: JobState | None,
    to_state: JobState,
    *,
    reason: str,
    actor: str,
    now: float,
) -> None:
    session.add(
        JobAuditRow(
            at=now,
            job_id=job.id,
            from_state=from_state,
            to_state=to_state,
            attempt=job.attempts,
            reason=scrub(reason),
            actor=actor,
        )
    )


def _move(
    session: Session, job: JobRow, to_state: JobState, *, reason: str, actor: str, now: float
) -> None:
    from_state = job.state
    if to_state not in JOB_TRANSITIONS[from_state]:
        raise IllegalJobTransition(job.id, from_state, to_state)
    job.state = to_state
    job.updated_at = now
    _log(session, job, from_state, to_state, reason=reason, actor=actor, now=now)


def _finish(
    session: Session,
    job: JobRow,
    to_state: JobState,
    *,
    reason: str,
    actor: str,
    now: float,
    error: str | None = None,
) -> None:
    _move(session, job, to_state, reason=reason, actor=actor, now=now)
    job.finished_at = now
    job.lease_expires_at = None
    job.deadline_at = None
    if error is not None:
        job.error = scrub(error)
    if job.webhook_url is not None:
        # In the transaction that ends the job: a crash cannot end it without its
        # delivery row (the API's webhook loop sends it, and retries it).
        session.add(
            WebhookDeliveryRow(
                job_id=job.id,
                event=f"job.{to_state.value}",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )


def _active_count(session: Session, instance_id: int) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(JobRow)
            .where(JobRow.instance_id == instance_id, JobRow.state.in_(sorted(ACTIVE_JOB_STATES)))
        ).scalar_one()
    )


def _release_instance(session: Session, instance_id: int | None, job_id: str, now: float) -> None:
    """Back to ``ready`` the ``busy`` instance whose last job just left it."""
    if instance_id is None or _active_count(session, instance_id) > 0:
        return
    # A draining instance stays so (the reconciler destroys it once idle), as does one
    # that is ending.
    with contextlib.suppress(StaleInstanceState):
        transition(
            session,
            instance_id,
            InstanceState.READY,
            reason=f"job {job_id} left it; no job runs on it",
            actor=_SCHEDULER,
            now=now,
            expected_from=InstanceState.BUSY,
        )


def _held(session: Session, job_id: str, lease_id: str) -> JobRow:
    """The job, locked, if ``lease_id`` is its current lease and it has not ended."""
    job = get_job(session, job_id, lock=True, with_request=False)
    current = job.lease_id
    if current is None or not hmac.compare_digest(
        current.encode("utf-8"), lease_id.encode("utf-8")
    ):
        raise StaleJobLease(job_id, job.state)
    if job.state in JOB_TERMINAL_STATES:
        raise JobAlreadyEnded(job_id, job.state)
    return job


def _lock_all(session: Session, *conditions: Any) -> list[JobRow]:
    query = (
        select(JobRow)
        .options(defer(JobRow.request))
        .where(*conditions)
        .order_by(JobRow.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    jobs = list(session.execute(query).scalars())
    for job in jobs:
        mark_locked(session, JobRow, job.id)
    return jobs


def _attempt_ended(
    session: Session, job: JobRow, reason: str, *, actor: str, now: float, release: bool
) -> None:
    """The job's attempt ended without a result: queued again, or, with its attempts spent
    (or a cancel requested), ended."""
    instance_id = job.instance_id
    if job.cancel_requested_at is not None:
        _finish(
            session,
            job,
            JobState.CANCELLED,
            reason=f"cancelled: its attempt ended ({reason})",
            actor=actor,
            now=now,
            error="cancelled at the user's request",
        )
    elif job.attempts >= job.max_attempts:
        error = f"gave up after {job.attempts} attempt(s): {reason}"
        _finish(session, job, JobState.FAILED, reason=error, actor=actor, now=now, error=error)
    else:
        _move(
            session,
            job,
            JobState.QUEUED,
            reason=f"queued again after attempt {job.attempts} of {job.max_attempts}: {reason}",
            actor=actor,
            now=now,
        )
        job.instance_id = None
        job.lease_id = None
        job.lease_expires_at = None
        job.deadline_at = None
        job.placed_at = None
        job.started_at = None
        job.progress = None
        # What the failed attempt uploaded is not the job's: the next attempt makes its own.
        session.execute(delete(JobOutputRow).where(JobOutputRow.job_id == job.id))
        session.flush()
    if release:
        _release_instance(session, instance_id, job.id, now)


# ------------------------------------------------------------------ submitting and reading


def submit_job(
    session: Session,
    *,
    profile: str,
    request: dict[str, Any],
    now: float,
    priority: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeout_s: float | None = None,
    owner_key_id: int | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    job_id: str | None = None,
    pinned_instance_id: int | None = None,
) -> JobRow:
    """Record a job in ``queued``, with its audit row.

    ``request`` is the job as submitted (workflow, inputs, overrides). A job with a
    ``webhook_url`` and no ``webhook_secret`` gets a new secret (``whsec_...``): it is
    on the returned row for the submitter, and in no view. The URL's safety (https, no
    private address) is the API's to check, where it resolves the name.
    ``pinned_instance_id`` reserves the job to that instance (an OnStart job).
    """
    if not profile or len(profile) > 64:
        raise StoreError("a job needs a profile name of 1 to 64 characters")
    if max_attempts < 1:
        raise StoreError("max_attempts must be at least 1")
    if timeout_s is not None and not timeout_s > 0:
        raise StoreError("timeout_s must be positive (or None for no timeout)")
    if webhook_url is not None and len(webhook_url) > 2048:
        raise StoreError("a webhook URL is at most 2048 characters")
    if webhook_secret is not None and not 16 <= len(webhook_secret) <= 128:
        raise StoreError("a webhook secret has 16 to 128 characters")
    if webhook_url is not None and webhook_secret is None:
        webhook_secret = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
    job = JobRow(
        id=job_id or new_job_id(now),
        profile=profile,
        state=JobState.QUEUED,
        request=request,
        attempts=0,
        priority=priority,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        owner_key_id=owner_key_id,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret if webhook_url is not None else None,
        pinned_instance_id=pinned_instance_id,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()  # the audit row refers to it, and the unit of work does not know
    _log(session, job, None, JobState.QUEUED, reason="submitted", actor=_USER, now=now)
    session.flush()
    return job


def get_job(
    session: Session,
    job_id: str,
    *,
    key_id: int | None = None,
    lock: bool = False,
    with_request: bool = True,
) -> JobRow:
    """The job ``job_id``; ``UnknownJob`` when there is none.

    With ``key_id``, only a job that key submitted (another's reads as unknown).
    ``lock=True`` takes the row lock (``FOR UPDATE`` on PostgreSQL) and re-reads it,
    once per transaction (``store/locks.py``).
    ``with_request=False`` leaves the request (workflow and inputs, maybe large) to be
    read when first touched.
    """
    if lock:
        held = already_locked(session, JobRow, job_id)
        if held is not None and (key_id is None or held.owner_key_id == key_id):
            return held
    query = select(JobRow).where(JobRow.id == job_id)
    if not with_request:
        query = query.options(defer(JobRow.request))
    if key_id is not None:
        query = query.where(JobRow.owner_key_id == key_id)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    job = session.execute(query).scalar_one_or_none()
    if job is None:
        raise UnknownJob(job_id)
    if lock:
        mark_locked(session, JobRow, job_id)
    return job


def _queue_order() -> tuple[Any, ...]:
    return (JobRow.priority.desc(), JobRow.created_at, JobRow.id)


def next_jobs_for(
    session: Session, profile: str, limit: int = 1, *, lock: bool = False
) -> list[JobRow]:
    """The next ``limit`` queued jobs of ``profile``: higher priority first, FIFO within one.

    ``lock=True`` locks them and skips the rows another scheduler has locked
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serializes writers anyway).
    """
    query = (
        select(JobRow)
        .where(JobRow.state == JobState.QUEUED, JobRow.profile == profile)
        .order_by(*_queue_order())
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query).scalars())


def queued_counts(session: Session) -> dict[str, int]:
    """Per profile, how many jobs wait in the queue (what scaling up counts)."""
    query = (
        select(JobRow.profile, func.count())
        .where(JobRow.state == JobState.QUEUED)
        .group_by(JobRow.profile)
    )
    return {profile: int(count) for profile, count in session.execute(query)}


def queue_position(session: Session, job: JobRow | str) -> int | None:
    """Where a queued job stands in its profile's queue: 1 is the next to be placed.

    None for a job that is not queued.
    """
    row = get_job(session, job) if isinstance(job, str) else job
    if row.state is not JobState.QUEUED:
        return None
    ahead = session.execute(
        select(func.count())
        .select_from(JobRow)
        .where(
            JobRow.state == JobState.QUEUED,
            JobRow.profile == row.profile,
            or_(
                JobRow.priority > row.priority,
                and_(
                    JobRow.priority == row.priority,
                    or_(
                        JobRow.created_at < row.created_at,
                        and_(JobRow.created_at == row.created_at, JobRow.id < row.id),
                    ),
                ),
            ),
        )
    ).scalar_one()
    return int(ahead) + 1


def active_jobs_of_instance(session: Session, instance_id: int) -> list[JobRow]:
    """The jobs placed or running on ``instance_id``, in placement order."""
    query = (
        select(JobRow)
        .where(JobRow.instance_id == instance_id, JobRow.state.in_(sorted(ACTIVE_JOB_STATES)))
        .order_by(JobRow.placed_at, JobRow.id)
    )
    return list(session.execute(query).scalars())


def jobs_for_key(
    session: Session,
    key_id: int,
    *,
    states: Iterable[JobState] | None = None,
    limit: int = 100,
) -> list[JobRow]:
    """The jobs API key ``key_id`` submitted (and no other), newest first."""
    query = select(JobRow).where(JobRow.owner_key_id == key_id)
    if states is not None:
        query = query.where(JobRow.state.in_(sorted(states)))
    query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def job_trail(session: Session, job_id: str) -> list[JobAuditRow]:
    """The job's audit rows, oldest first."""
    query = select(JobAuditRow).where(JobAuditRow.job_id == job_id).order_by(JobAuditRow.id)
    return list(session.execute(query).scalars())


# ------------------------------------------------------------------ the scheduler's moves


def place_job(
    session: Session,
    job_id: str,
    instance_id: int,
    now: float,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    *,
    max_jobs_per_instance: int = 1,
) -> str:
    """Place queued job ``job_id`` on ``instance_id`` under a new lease; the lease id.

    Counts an attempt, starts the attempt's timeout, and moves a ``ready`` instance to
    ``busy``. The instance must run the job's profile, be ``ready`` or ``busy``, and
    hold fewer than ``max_jobs_per_instance`` jobs (``InstanceUnavailable``).
    """
    if lease_ttl_s <= 0:
        raise ValueError("a lease's ttl must be positive")
    job = get_job(session, job_id, lock=True)
    if job.state is not JobState.QUEUED:
        raise IllegalJobTransition(
            job_id, job.state, JobState.PLACED, "only a queued job is placed"
        )
    instance = get_instance(session, instance_id, lock=True)
    if instance.profile != job.profile:
        raise InstanceUnavailable(
            instance_id, f"it runs profile {instance.profile!r}, the job needs {job.profile!r}"
        )
    if instance.state not in (InstanceState.READY, InstanceState.BUSY):
        raise InstanceUnavailable(instance_id, f"it is {instance.state}, not ready")
    # A ready instance holds no job (placing one makes it busy): only a busy one is counted.
    running = _active_count(session, instance_id) if instance.state is InstanceState.BUSY else 0
    if running >= max_jobs_per_instance:
        raise InstanceUnavailable(
            instance_id, f"it holds {running} job(s) already, at most {max_jobs_per_instance}"
        )
    lease_id = str(uuid.uuid4())
    job.attempts += 1
    job.instance_id = instance_id
    job.lease_id = lease_id
    job.lease_expires_at = now + lease_ttl_s
    job.placed_at = now
    job.started_at = None
    job.progress = None
    job.deadline_at = now + job.timeout_s if job.timeout_s is not None else None
    _move(
        session,
        job,
        JobState.PLACED,
        reason=f"placed on instance {instance_id} (attempt {job.attempts} of {job.max_attempts})",
        actor=_SCHEDULER,
        now=now,
    )
    if instance.state is InstanceState.READY:
        transition(
            session,
            instance,
            InstanceState.BUSY,
            reason=f"job {job_id} placed on it",
            actor=_SCHEDULER,
            now=now,
            expected_from=InstanceState.READY,
        )
    return lease_id


def requeue_jobs_of_instance(
    session: Session, instance_id: int, reason: str, now: float
) -> list[JobRow]:
    """The instance died: its placed and running jobs go back to the queue, and those
    that have spent their attempts fail with ``reason``. Their leases end at once.

    The instance itself is left as it is: call this in the transaction that moves it to
    ``destroying`` or ``failed``.
    """
    jobs = _lock_all(
        session,
        JobRow.instance_id == instance_id,
        JobRow.state.in_(sorted(ACTIVE_JOB_STATES)),
    )
    for job in jobs:
        _attempt_ended(session, job, reason, actor=_SCHEDULER, now=now, release=False)
    session.flush()
    return jobs


def expire_leases(session: Session, now: float) -> list[JobRow]:
    """Requeue (or fail, with their attempts spent) the jobs whose lease ran out by ``now``.

    Their instances count as free of them: a ``busy`` instance left with no job goes back
    to ``ready`` (the reconciler's heartbeat rules fail an instance that is really gone).
    """
    jobs = _lock_all(
        session,
        JobRow.state.in_(sorted(ACTIVE_JOB_STATES)),
        JobRow.lease_expires_at <= now,
    )
    expired = []
    for job in jobs:
        # Renewed between the read and the lock? Then it is not expired.
        if job.lease_expires_at is None or job.lease_expires_at > now:
            continue
        _attempt_ended(
            session,
            job,
            "its lease expired: the instance stopped reporting on it",
            actor=_SCHEDULER,
            now=now,
            release=True,
        )
        expired.append(job)
    session.flush()
    return expired


def jobs_timed_out(session: Session, now: float) -> list[JobRow]:
    """The placed and running jobs past their timeout at ``now`` (read only)."""
    query = (
        select(JobRow)
        .where(JobRow.state.in_(sorted(ACTIVE_JOB_STATES)), JobRow.deadline_at <= now)
        .order_by(JobRow.deadline_at, JobRow.id)
    )
    return list(session.execute(query).scalars())


def fail_timed_out_jobs(session: Session, now: float) -> list[JobRow]:
    """Fail the jobs past their timeout, with the reason; the failed rows.

    Their instances are freed; the caller tells each (``instance_id``) to interrupt
    ComfyUI, and the agent, refused on its next report, does so too.
    """
    jobs = _lock_all(
        session, JobRow.state.in_(sorted(ACTIVE_JOB_STATES)), JobRow.deadline_at <= now
    )
    failed = []
    for job in jobs:
        if job.deadline_at is None or job.deadline_at > now:
            continue
        error = f"timed out: it ran past its timeout of {job.timeout_s:g} s"
        _finish(session, job, JobState.FAILED, reason=error, actor=_SCHEDULER, now=now, error=error)
        _release_instance(session, job.instance_id, job.id, now)
        failed.append(job)
    session.flush()
    return failed


def unpinned_queued_counts(session: Session) -> dict[str, int]:
    """Per profile, the queued jobs reserved to no instance: what the pool rents for.

    An OnStart job is left out: its instance is rented for it, and no other runs it.
    """
    query = (
        select(JobRow.profile, func.count())
        .where(JobRow.state == JobState.QUEUED, JobRow.pinned_instance_id.is_(None))
        .group_by(JobRow.profile)
    )
    return {profile: int(count) for profile, count in session.execute(query)}


def fail_pinned_jobs(session: Session, instance_id: int, error: str, now: float) -> list[JobRow]:
    """End every job reserved to ``instance_id`` that has not ended (its OnStart job): the
    instance failed or is being destroyed, and no other instance may run it. Failed with
    ``error`` (cancelled, when a cancel was requested); the ended rows.

    Call it in the transaction that moves the instance to ``destroying`` (or ends it),
    before ``requeue_jobs_of_instance``, which would queue the job again for nobody.
    """
    jobs = _lock_all(
        session,
        JobRow.pinned_instance_id == instance_id,
        JobRow.state.not_in(sorted(JOB_TERMINAL_STATES)),
    )
    for job in jobs:
        if job.cancel_requested_at is not None:
            _finish(
                session,
                job,
                JobState.CANCELLED,
                reason=f"cancelled: {error}",
                actor=_SCHEDULER,
                now=now,
                error="cancelled at the user's request",
            )
        else:
            _finish(
                session, job, JobState.FAILED, reason=error, actor=_SCHEDULER, now=now, error=error
            )
    session.flush()
    return jobs


def fail_jobs_pinned_to_ended_instances(session: Session, now: float) -> list[JobRow]:
    """Fail the jobs that have not ended and are reserved to an instance that is
    ``destroying``, ``destroyed`` or ``failed``, whoever moved it there: the sweep behind
    ``fail_pinned_jobs``. The reason names the instance and its failure, if any."""
    gone = (InstanceState.DESTROYING, InstanceState.DESTROYED, InstanceState.FAILED)
    query = (
        select(InstanceRow.id, InstanceRow.failure_reason)
        .join(JobRow, JobRow.pinned_instance_id == InstanceRow.id)
        .where(
            InstanceRow.state.in_(sorted(gone)),
            JobRow.state.not_in(sorted(JOB_TERMINAL_STATES)),
        )
        .distinct()
        .order_by(InstanceRow.id)
    )
    ended: list[JobRow] = []
    for instance_id, failure in list(session.execute(query)):
        if failure:
            error = f"its OnStart instance {instance_id} failed: {failure}"
        else:
            error = f"its OnStart instance {instance_id} was destroyed before the job ended"
        ended.extend(fail_pinned_jobs(session, instance_id, error, now))
    return ended


def request_cancel(
    session: Session, job_id: str, now: float, *, key_id: int | None = None
) -> JobRow:
    """Cancel ``job_id``: a queued job is cancelled at once; a placed or running one is
    marked (``cancel_requested_at``) for its agent to interrupt and ``finish_cancelled``.

    Cancelling a cancelled job changes nothing; a job that succeeded or failed raises
    ``JobAlreadyEnded``. With ``key_id``, only that key's job (``UnknownJob`` otherwise).
    """
    job = get_job(session, job_id, key_id=key_id, lock=True)
    if job.state is JobState.CANCELLED:
        return job
    if job.state in JOB_TERMINAL_STATES:
        raise JobAlreadyEnded(job_id, job.state)
    if job.state is JobState.QUEUED:
        job.cancel_requested_at = now
        _finish(
            session,
            job,
            JobState.CANCELLED,
            reason="cancelled while queued",
            actor=_USER,
            now=now,
            error="cancelled at the user's request",
        )
        session.flush()
        return job
    if job.cancel_requested_at is None:
        job.cancel_requested_at = now
        job.updated_at = now
        _log(
            session,
            job,
            job.state,
            job.state,
            reason="cancel requested: its agent interrupts it",
            actor=_USER,
            now=now,
        )
        session.flush()
    return job


# ------------------------------------------------------------------ the agent's reports


def start_job(session: Session, job_id: str, lease_id: str, now: float) -> JobRow:
    """The agent started the job (its prompt is posted): ``placed`` to ``running``.

    Saying so twice under the same lease is harmless.
    """
    job = _held(session, job_id, lease_id)
    if job.state is JobState.PLACED:
        job.started_at = now
        _move(session, job, JobState.RUNNING, reason="started", actor=_AGENT, now=now)
        session.flush()
    return job


def renew_job_lease(
    session: Session,
    job_id: str,
    lease_id: str,
    now: float,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
) -> JobRow:
    """Extend the lease to ``now + lease_ttl_s``. The row tells the agent whether a
    cancel was requested (``cancel_requested_at``)."""
    if lease_ttl_s <= 0:
        raise ValueError("a lease's ttl must be positive")
    job = _held(session, job_id, lease_id)
    job.lease_expires_at = now + lease_ttl_s
    session.flush()
    return job


def report_progress(
    session: Session, job_id: str, lease_id: str, progress: dict[str, Any], now: float
) -> JobRow:
    """Record the agent's latest progress report (it replaces the previous one)."""
    job = _held(session, job_id, lease_id)
    job.progress = progress
    job.updated_at = now
    session.flush()
    return job


def held_job(session: Session, job_id: str, lease_id: str) -> JobRow:
    """The job, locked, if ``lease_id`` is its current lease and it has not ended.

    ``StaleJobLease`` or ``JobAlreadyEnded`` otherwise (``UnknownJob`` for no such job);
    the request is read only when touched. For a call that must see the job before it
    moves it (whose instance it is on, whether a cancel was requested).
    """
    return _held(session, job_id, lease_id)


def report_on_lease(
    session: Session,
    job_id: str,
    lease_id: str,
    now: float,
    *,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    progress: dict[str, Any] | None = None,
) -> JobRow:
    """One report of the agent's under its lease, with one row lock: the lease extended to
    ``now + lease_ttl_s``, ``progress`` kept when given, and a ``placed`` job whose
    progress carries a ``prompt_id`` (its prompt is in ComfyUI's queue) moved to
    ``running``. The row tells the agent whether a cancel was requested."""
    if lease_ttl_s <= 0:
        raise ValueError("a lease's ttl must be positive")
    job = _held(session, job_id, lease_id)
    job.lease_expires_at = now + lease_ttl_s
    if progress is not None:
        job.progress = progress
        job.updated_at = now
        if progress.get("prompt_id") and job.state is JobState.PLACED:
            job.started_at = now
            _move(session, job, JobState.RUNNING, reason="started", actor=_AGENT, now=now)
    return job


def complete_job(
    session: Session, job_id: str, lease_id: str, result: dict[str, Any], now: float
) -> JobRow:
    """The job succeeded under ``lease_id``, with ``result``: this happens once per job.

    ``StaleJobLease`` for a lease that is not the job's current one, ``JobAlreadyEnded``
    for a second report of the end. A ``placed`` job whose start report was lost passes
    through ``running``. A cancel that came too late does not stop a success.
    """
    job = _held(session, job_id, lease_id)
    if job.state is JobState.PLACED:
        job.started_at = now
        _move(session, job, JobState.RUNNING, reason="started", actor=_AGENT, now=now)
    job.result = result
    _finish(session, job, JobState.SUCCEEDED, reason="succeeded", actor=_AGENT, now=now)
    _release_instance(session, job.instance_id, job.id, now)
    return job


def fail_job(
    session: Session, job_id: str, lease_id: str, error: str, now: float, *, retry: bool = False
) -> JobRow:
    """The job failed under ``lease_id`` with ``error`` (ComfyUI's own message).

    ``retry=True`` (the instance, not the workflow, was at fault) queues it again while
    it has attempts left.
    """
    job = _held(session, job_id, lease_id)
    if retry:
        _attempt_ended(session, job, error, actor=_AGENT, now=now, release=True)
        session.flush()
        return job
    _finish(
        session, job, JobState.FAILED, reason=f"failed: {error}", actor=_AGENT, now=now, error=error
    )
    _release_instance(session, job.instance_id, job.id, now)
    session.flush()
    return job


def finish_cancelled(session: Session, job_id: str, lease_id: str, now: float) -> JobRow:
    """The agent interrupted the job whose cancel was requested: it ends ``cancelled``."""
    job = _held(session, job_id, lease_id)
    if job.cancel_requested_at is None:
        raise IllegalJobTransition(
            job_id,
            job.state,
            JobState.CANCELLED,
            "no cancel was requested: report its failure or its result",
        )
    _finish(
        session,
        job,
        JobState.CANCELLED,
        reason="interrupted and cancelled",
        actor=_AGENT,
        now=now,
        error="cancelled at the user's request",
    )
    _release_instance(session, job.instance_id, job.id, now)
    session.flush()
    return job


# ------------------------------------------------------------------ outputs


def safe_output_name(name: str) -> str:
    """``name`` reduced to a base name: no folder, no ``..``, no control character.

    ``../../etc/passwd`` gives ``passwd``, ``C:\\out\\a.png`` gives ``a.png``; an empty
    name, ``.``, ``..``, a name over 255 bytes or one with a control or bidirectional
    formatting character is refused (``InvalidOutputName``).
    """
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in _BIDI_CONTROLS for c in name):
        raise InvalidOutputName(
            "an output name may not hold control or bidirectional formatting characters"
        )
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if base in ("", ".", ".."):
        raise InvalidOutputName(f"output name {name!r} has no file name in it")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in base) or len(base.encode("utf-8")) > 255:
        raise InvalidOutputName("an output name is at most 255 bytes of valid UTF-8")
    return base


def record_output(
    session: Session,
    job_id: str,
    lease_id: str,
    name: str,
    sha256: str,
    size: int,
    kind: str,
    *,
    now: float,
    content_type: str | None = None,
) -> JobOutputRow:
    """Record an output the agent uploaded under the job's current lease (stored already
    by its ``sha256``). ``name`` is reduced to a base name (``safe_output_name``).

    Recording the same name with the same content again is harmless (a retried upload);
    with other content it is ``OutputNameTaken``. ``content_type`` defaults to a guess
    from the name. An attempt's outputs are dropped when the job is queued again.
    """
    base = safe_output_name(name)
    digest = sha256.lower()
    if not _SHA256.fullmatch(digest):
        raise StoreError("an output's sha256 is 64 hexadecimal digits")
    if size < 0:
        raise StoreError("an output's size cannot be negative")
    if not _KIND.fullmatch(kind):
        raise StoreError(f"output kind {kind!r} is not a short lowercase word (image, video...)")
    job = _held(session, job_id, lease_id)
    existing = session.execute(
        select(JobOutputRow).where(JobOutputRow.job_id == job.id, JobOutputRow.name == base)
    ).scalar_one_or_none()
    if existing is not None:
        if existing.sha256 == digest and existing.size == size:
            return existing
        raise OutputNameTaken(job.id, base)
    guessed = mimetypes.guess_type(base, strict=False)[0]
    row = JobOutputRow(
        job_id=job.id,
        name=base,
        sha256=digest,
        size=size,
        kind=kind,
        content_type=(content_type or guessed or "application/octet-stream")[:127],
        created_at=now,
    )
    session.add(row)
    return row


def job_outputs(session: Session, job_id: str) -> list[JobOutputRow]:
    """The job's outputs, in the order they were recorded."""
    query = select(JobOutputRow).where(JobOutputRow.job_id == job_id).order_by(JobOutputRow.id)
    return list(session.execute(query).scalars())


def get_output(
    session: Session, job_id: str, name: str, *, key_id: int | None = None
) -> JobOutputRow:
    """The output ``name`` of ``job_id`` (with ``key_id``: only of that key's job)."""
    job = get_job(session, job_id, key_id=key_id)
    row = session.execute(
        select(JobOutputRow).where(JobOutputRow.job_id == job.id, JobOutputRow.name == name)
    ).scalar_one_or_none()
    if row is None:
        raise UnknownOutput(job_id, name)
    return row


# ------------------------------------------------------------------ the user's view


def job_view(session: Session, job: JobRow | str, *, now: float | None = None) -> dict[str, Any]:
    """What a user may see of a job: state, queue position, progress, timing, cost,
    outputs. Never the lease id, the request (its workflow may carry a custom node's
    key), the webhook secret, or the webhook URL's query string.

    Timing and cost of a job that has not ended need ``now``; the cost is the current
    attempt's time on its instance at the instance's price.
    """
    row = get_job(session, job) if isinstance(job, str) else job
    end = row.finished_at if row.finished_at is not None else now
    waited = None
    if row.placed_at is not None:
        waited = row.placed_at - row.created_at
    elif end is not None:
        waited = end - row.created_at
    ran = end - row.started_at if row.started_at is not None and end is not None else None
    cost = None
    if row.instance_id is not None and row.placed_at is not None and end is not None:
        price = session.execute(
            select(InstanceRow.dph_total).where(InstanceRow.id == row.instance_id)
        ).scalar_one_or_none()
        if price is not None:
            cost = round(price * max(end - row.placed_at, 0.0) / 3600.0, 6)
    return {
        "id": row.id,
        "profile": row.profile,
        "state": row.state.value,
        "priority": row.priority,
        "queue_position": queue_position(session, row),
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "timeout_s": row.timeout_s,
        "cancel_requested": row.cancel_requested_at is not None,
        "progress": row.progress,
        "error": row.error,
        "result": row.result,
        "instance_id": row.instance_id,
        "created_at": row.created_at,
        "placed_at": row.placed_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "timing": {"queued_s": waited, "running_s": ran},
        "cost": cost,
        "webhook_url": scrub(row.webhook_url) if row.webhook_url is not None else None,
        "outputs": [
            {
                "name": out.name,
                "sha256": out.sha256,
                "size": out.size,
                "kind": out.kind,
                "content_type": out.content_type,
            }
            for out in job_outputs(session, row.id)
        ],
    }
