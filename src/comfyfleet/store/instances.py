"""Instance records: created before the provider is called, moved only along the lifecycle.

Every function takes the caller's ``Session`` and never commits, so that a
transition, its audit row and the reconciler's epoch check land in one transaction.
The usual order for a rental:

1. ``create_instance`` (state ``requested``, with its label), then commit;
2. ``transition(..., CREATING)``, commit, call the provider with the label;
3. record the contract id and ``transition(..., BOOTING)``, and so on.

A crash anywhere in between leaves a row (or a labelled contract the orphan sweep
finds), never a paid machine nobody knows about.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from comfyfleet.errors import (
    IllegalTransition,
    SlotTaken,
    StaleInstanceState,
    UnknownInstance,
)

# The label helpers live in comfyfleet.labels (the planner reads labels without a
# database); re-exported here as the store's own.
from comfyfleet.labels import LABEL_PREFIX as LABEL_PREFIX
from comfyfleet.labels import check_fleet_id as check_fleet_id
from comfyfleet.labels import instance_id_from_label as instance_id_from_label
from comfyfleet.labels import label_prefix as label_prefix
from comfyfleet.labels import make_label as make_label
from comfyfleet.lifecycle import (
    INSTANCE_TRANSITIONS,
    LIVE_STATES,
    TERMINAL_STATES,
    TOKEN_REVOKED_STATES,
    InstanceState,
)
from comfyfleet.store.locks import already_locked, mark_locked
from comfyfleet.store.models import LIVE_SLOT_INDEX, AuditRow, InstanceRow


@dataclass(frozen=True)
class ProfileUsage:
    """What a profile's live instances (``requested`` through ``destroying``) add up to."""

    count: int
    dph_total: float


_SECRET_PATTERNS = (
    (re.compile(r"\bcft_[A-Za-z0-9_-]+"), "cft_***"),  # an agent token (store.tokens)
    (re.compile(r"\bcf_[A-Za-z0-9_-]{16,}"), "cf_***"),  # a user's API key (store.apikeys)
    (re.compile(r"\bwhsec_[A-Za-z0-9_-]+"), "whsec_***"),  # a webhook's signing secret
    (re.compile(r"(?i)\b(bearer)\s+\S+"), r"\1 ***"),
    (
        re.compile(r"(?i)\b(\w*(?:token|secret|password|passwd|api[_-]?key))(\s*[=:]\s*)[^\s&,;]+"),
        r"\1\2***",
    ),
    (re.compile(r"(?i)\b(https?://)[^/@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)\b(https?://[^\s?#]+)\?[^\s#]*"), r"\1?***"),
)


def scrub(text: str) -> str:
    """``text`` with what looks like a credential masked (audit reasons, failure reasons).

    Callers should not hand secrets to the store at all; this is the second line.
    """
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def create_instance(
    session: Session,
    *,
    fleet_id: str,
    profile: str,
    slot: int | None,
    provider: str,
    now: float,
    actor: str,
    reason: str = "rental requested",
    offer_id: int | None = None,
    machine_id: int | None = None,
    host_id: int | None = None,
    gpu_name: str | None = None,
    dph_total: float | None = None,
    stage_deadline_at: float | None = None,
    instance_id: int | None = None,
    contract_id: int | None = None,
) -> InstanceRow:
    """Record a rental in ``requested``, with its label and its audit row.

    Commit before calling the provider. Raises ``SlotTaken`` when a live instance
    already holds ``(profile, slot)``, and ``IntegrityError`` when ``instance_id`` or
    ``contract_id`` is taken; either way the caller's transaction stays usable.
    ``instance_id`` and ``contract_id`` record a contract that exists already (an
    orphan adopted under the id its label names).
    """
    check_fleet_id(fleet_id)
    # The label needs the id, which the insert gives: a unique placeholder bridges the
    # two statements, and the row is never seen without its real label.
    row = InstanceRow(
        id=instance_id,
        fleet_id=fleet_id,
        profile=profile,
        slot=slot,
        label=f"{label_prefix(fleet_id)}pending-{uuid.uuid4().hex}",
        state=InstanceState.REQUESTED,
        provider=provider,
        provider_contract_id=contract_id,
        offer_id=offer_id,
        machine_id=machine_id,
        host_id=host_id,
        gpu_name=gpu_name,
        dph_total=dph_total,
        stage_entered_at=now,
        stage_deadline_at=stage_deadline_at,
        cost_so_far=0.0,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as error:
        if _violates(error, LIVE_SLOT_INDEX, ("instances.profile", "instances.slot")):
            raise SlotTaken(profile, slot) from None
        raise
    if instance_id is not None and session.get_bind().dialect.name == "postgresql":
        # The id was given, not drawn: move the sequence past it.
        session.execute(
            text(
                "SELECT setval(pg_get_serial_sequence('instances', 'id'), "
                "(SELECT MAX(id) FROM instances))"
            )
        )
    row.label = make_label(fleet_id, row.id)
    session.add(
        AuditRow(
            at=now,
            instance_id=row.id,
            from_state=None,
            to_state=InstanceState.REQUESTED,
            reason=scrub(reason),
            actor=actor,
        )
    )
    session.flush()
    return row


def _violates(error: IntegrityError, constraint: str, sqlite_columns: tuple[str, ...]) -> bool:
    diag = getattr(error.orig, "diag", None)
    if diag is not None:  # psycopg names the constraint
        return getattr(diag, "constraint_name", None) == constraint
    message = str(error.orig)
    return "UNIQUE constraint failed" in message and all(c in message for c in sqlite_columns)


def get_instance(session: Session, instance_id: int, *, lock: bool = False) -> InstanceRow:
    """The instance ``instance_id``; ``UnknownInstance`` when the store has none.

    ``lock=True`` takes the row lock (``FOR UPDATE`` on PostgreSQL) and re-reads it,
    once per transaction (``store/locks.py``).
    """
    query = select(InstanceRow).where(InstanceRow.id == instance_id)
    if lock:
        held = already_locked(session, InstanceRow, instance_id)
        if held is not None:
            return held
        query = query.with_for_update().execution_options(populate_existing=True)
    row = session.execute(query).scalar_one_or_none()
    if row is None:
        raise UnknownInstance(instance_id)
    if lock:
        mark_locked(session, InstanceRow, instance_id)
    return row


def find_instance_by_label(session: Session, label: str) -> InstanceRow | None:
    return session.execute(
        select(InstanceRow).where(InstanceRow.label == label)
    ).scalar_one_or_none()


def find_instance_by_contract(
    session: Session, provider: str, contract_id: int
) -> InstanceRow | None:
    return session.execute(
        select(InstanceRow).where(
            InstanceRow.provider == provider, InstanceRow.provider_contract_id == contract_id
        )
    ).scalar_one_or_none()


def live_instances(session: Session, *, profile: str | None = None) -> list[InstanceRow]:
    """The instances from ``requested`` through ``destroying``, oldest first."""
    query = select(InstanceRow).where(InstanceRow.state.in_(sorted(LIVE_STATES)))
    if profile is not None:
        query = query.where(InstanceRow.profile == profile)
    return list(session.execute(query.order_by(InstanceRow.id)).scalars())


def live_usage_by_profile(session: Session) -> dict[str, ProfileUsage]:
    """Per profile, the count and total $/h of its live instances: what the caps count.

    A row whose price is not known yet counts at $0/h.
    """
    query = (
        select(
            InstanceRow.profile,
            func.count(InstanceRow.id),
            func.coalesce(func.sum(InstanceRow.dph_total), 0.0),
        )
        .where(InstanceRow.state.in_(sorted(LIVE_STATES)))
        .group_by(InstanceRow.profile)
    )
    return {
        profile: ProfileUsage(count=int(count), dph_total=float(dph or 0.0))
        for profile, count, dph in session.execute(query)
    }


def transition(
    session: Session,
    instance: InstanceRow | int,
    to_state: InstanceState,
    *,
    reason: str,
    actor: str,
    now: float,
    expected_from: InstanceState | None = None,
    failure_reason: str | None = None,
    stage_deadline_at: float | None = None,
) -> AuditRow:
    """Move ``instance`` to ``to_state`` and write the audit row, in the caller's transaction.

    The row is locked and re-read first, so two writers (an agent report and the
    reconciler) take turns and each validates against the state the other left; a
    row object of this session is updated in place (re-read one from another session).
    ``expected_from`` turns the move into a compare-and-set: ``StaleInstanceState`` if
    the row is no longer there. ``IllegalTransition`` for a move the lifecycle does not
    allow. ``stage_deadline_at`` is the new stage's deadline (None: none).

    A row with a provider contract ends (``failed`` or ``destroyed``) only through
    ``destroying``: its slot stays taken until the destroy is confirmed, so a retry can
    never rent a second paid machine for it. Entering ``destroying``, ``destroyed`` or ``failed``
    revokes the agent token.
    """
    instance_id = instance if isinstance(instance, int) else instance.id
    row = get_instance(session, instance_id, lock=True)
    from_state = row.state
    if expected_from is not None and from_state is not expected_from:
        raise StaleInstanceState(instance_id, expected=expected_from, actual=from_state)
    if to_state not in INSTANCE_TRANSITIONS[from_state]:
        raise IllegalTransition(
            instance_id,
            from_state,
            to_state,
            allowed=sorted(INSTANCE_TRANSITIONS[from_state]),
        )
    if (
        to_state in TERMINAL_STATES
        and row.provider_contract_id is not None
        and from_state is not InstanceState.DESTROYING
    ):
        raise IllegalTransition(
            instance_id,
            from_state,
            to_state,
            allowed=sorted(INSTANCE_TRANSITIONS[from_state] - TERMINAL_STATES),
            hint=(
                f"it has provider contract {row.provider_contract_id}: move it to destroying "
                f"(with the failure reason, if any) and to {to_state} once the provider "
                "confirms the destroy"
            ),
        )

    row.state = to_state
    row.updated_at = now
    row.stage_entered_at = now
    row.stage_deadline_at = stage_deadline_at
    if failure_reason is not None:
        row.failure_reason = scrub(failure_reason)
    if to_state is InstanceState.READY and row.ready_at is None:
        row.ready_at = now
    if to_state in TERMINAL_STATES:
        row.ended_at = now
    if to_state in TOKEN_REVOKED_STATES:
        row.agent_token_hash = None
    audit = AuditRow(
        at=now,
        instance_id=instance_id,
        from_state=from_state,
        to_state=to_state,
        reason=scrub(reason),
        actor=actor,
    )
    session.add(audit)
    # Not flushed here: the next query of the transaction, or its commit, writes it with
    # the rest (a flush per move cost a unit of work each on the jobs' hot path).
    return audit


def audit_trail(
    session: Session, instance_id: int | None = None, *, limit: int | None = None
) -> list[AuditRow]:
    """Audit rows in the order they were written: one instance's, or every one.

    With ``limit``, the newest ``limit`` rows (still oldest first).
    """
    query = select(AuditRow)
    if instance_id is not None:
        query = query.where(AuditRow.instance_id == instance_id)
    if limit is None:
        return list(session.execute(query.order_by(AuditRow.id)).scalars())
    newest = list(session.execute(query.order_by(AuditRow.id.desc()).limit(limit)).scalars())
    return newest[::-1]
