"""The machine blocklist: machines that failed us, left out of offer searches for a while.

An entry names the provider's ``machine_id`` (a host's machine, not one rental),
why it was blocked, the instance that failed there, and when the block ends.
Expired entries stay as history until ``purge_expired_blocks`` removes them.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from comfyfleet.store.instances import scrub
from comfyfleet.store.models import BlockedMachineRow

DEFAULT_BLOCK_TTL_S = 24 * 3600.0


def block_machine(
    session: Session,
    machine_id: int,
    *,
    provider: str,
    reason: str,
    now: float,
    ttl: float = DEFAULT_BLOCK_TTL_S,
    instance_id: int | None = None,
) -> BlockedMachineRow:
    """Block ``machine_id`` until ``now + ttl``.

    A machine already blocked keeps one entry: it takes the later expiry and the
    newest reason.
    """
    if ttl <= 0:
        raise ValueError("a block's ttl must be positive")
    active = session.execute(
        select(BlockedMachineRow)
        .where(
            BlockedMachineRow.provider == provider,
            BlockedMachineRow.machine_id == machine_id,
            BlockedMachineRow.expires_at > now,
        )
        .order_by(BlockedMachineRow.expires_at.desc())
        .limit(1)
        .with_for_update()
    ).scalar_one_or_none()
    if active is not None:
        active.expires_at = max(active.expires_at, now + ttl)
        active.reason = scrub(reason)
        if instance_id is not None:
            active.instance_id = instance_id
        session.flush()
        return active
    entry = BlockedMachineRow(
        provider=provider,
        machine_id=machine_id,
        reason=scrub(reason),
        instance_id=instance_id,
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(entry)
    session.flush()
    return entry


def active_blocks(
    session: Session, now: float, *, provider: str | None = None
) -> list[BlockedMachineRow]:
    """The entries in force at ``now``, soonest to expire first."""
    query = select(BlockedMachineRow).where(BlockedMachineRow.expires_at > now)
    if provider is not None:
        query = query.where(BlockedMachineRow.provider == provider)
    order = (BlockedMachineRow.expires_at, BlockedMachineRow.id)
    return list(session.execute(query.order_by(*order)).scalars())


def blocked_machine_ids(session: Session, now: float, *, provider: str) -> set[int]:
    """The machine ids an offer search for ``provider`` leaves out at ``now``."""
    query = select(BlockedMachineRow.machine_id).where(
        BlockedMachineRow.provider == provider, BlockedMachineRow.expires_at > now
    )
    return set(session.execute(query).scalars())


def expire_block(session: Session, machine_id: int, *, provider: str, now: float) -> int:
    """Lift ``machine_id``'s block at ``now`` (an operator's call); how many entries ended."""
    result = session.execute(
        update(BlockedMachineRow)
        .where(
            BlockedMachineRow.provider == provider,
            BlockedMachineRow.machine_id == machine_id,
            BlockedMachineRow.expires_at > now,
        )
        .values(expires_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def purge_expired_blocks(session: Session, before: float) -> int:
    """Delete entries that expired before ``before``; how many went."""
    result = session.execute(
        delete(BlockedMachineRow).where(BlockedMachineRow.expires_at <= before)
    )
    return int(getattr(result, "rowcount", 0) or 0)
