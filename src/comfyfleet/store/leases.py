"""Named leases in the database: one holder at a time, an epoch per holding.

The reconciler runs only in the ``serve`` process that holds the ``reconciler``
lease. A holder may stall (a long GC pause, a SIGSTOP) past its lease while
another takes over; when it wakes it must not act on its stale view. So every
takeover increments the lease's epoch, and each of the holder's actions runs
``require_current_epoch`` inside its own transaction: a stale holder's action fails
and rolls back. On PostgreSQL the check takes a share lock on the lease row, so a
takeover waits for the actions already checked to commit.

A holder is a string unique to one process (host, pid and a random part, say).
Times are Unix seconds from the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from comfyfleet.errors import LeaseLost
from comfyfleet.store.models import LeaseRow

RECONCILER_LEASE = "reconciler"


@dataclass(frozen=True)
class Lease:
    """A lease as its holder got it: who, which epoch, until when."""

    name: str
    holder: str
    epoch: int
    expires_at: float


def _locked(session: Session, name: str) -> LeaseRow | None:
    return session.execute(
        select(LeaseRow)
        .where(LeaseRow.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def acquire_lease(
    session: Session, name: str, holder: str, *, now: float, ttl: float
) -> Lease | None:
    """Take lease ``name`` for ``holder`` for ``ttl`` seconds; None while another holds it.

    Taking a free or expired lease starts a new epoch. Asking again while holding it
    extends it within the same epoch.
    """
    if ttl <= 0:
        raise ValueError("a lease's ttl must be positive")
    # Create the row if it is missing, without racing another process doing the same.
    dialect = session.get_bind().dialect.name
    make_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        make_insert(LeaseRow)
        .values(name=name, holder=None, epoch=0, acquired_at=None, expires_at=0.0)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    row = _locked(session, name)
    assert row is not None
    if row.holder is not None and row.expires_at > now and row.holder != holder:
        return None
    if row.holder != holder or row.expires_at <= now:
        row.epoch += 1
        row.holder = holder
        row.acquired_at = now
    row.expires_at = now + ttl
    session.flush()
    return Lease(name=name, holder=holder, epoch=row.epoch, expires_at=row.expires_at)


def renew_lease(session: Session, lease: Lease, *, now: float, ttl: float) -> Lease | None:
    """Extend ``lease`` by ``ttl`` from ``now``; None if it was lost (expired or taken over).

    An expired lease is not renewed even when nobody took it: its holder must
    ``acquire_lease`` again and act in the new epoch.
    """
    row = _locked(session, lease.name)
    if row is None or not _held(row, lease) or row.expires_at <= now:
        return None
    row.expires_at = now + ttl
    session.flush()
    return Lease(name=lease.name, holder=lease.holder, epoch=row.epoch, expires_at=row.expires_at)


def release_lease(session: Session, lease: Lease) -> bool:
    """Give ``lease`` up so that another may take it at once; False if it was not ours."""
    row = _locked(session, lease.name)
    if row is None or not _held(row, lease):
        return False
    row.holder = None
    row.expires_at = 0.0
    session.flush()
    return True


def _held(row: LeaseRow, lease: Lease) -> bool:
    return row.holder == lease.holder and row.epoch == lease.epoch


def current_lease(session: Session, name: str) -> Lease | None:
    """Who holds ``name`` (maybe past its expiry); None if nobody ever did or it was released."""
    row = session.execute(select(LeaseRow).where(LeaseRow.name == name)).scalar_one_or_none()
    if row is None or row.holder is None:
        return None
    return Lease(name=row.name, holder=row.holder, epoch=row.epoch, expires_at=row.expires_at)


def epoch_is_current(session: Session, name: str, epoch: int, *, now: float | None = None) -> bool:
    """Whether ``epoch`` is still lease ``name``'s epoch (and, given ``now``, unexpired).

    Call it inside the transaction of the action it guards: on PostgreSQL it holds a
    share lock on the lease row until that transaction ends, so no takeover commits
    in between.
    """
    row = session.execute(
        select(LeaseRow.epoch, LeaseRow.holder, LeaseRow.expires_at)
        .where(LeaseRow.name == name)
        .with_for_update(read=True)
    ).one_or_none()
    if row is None or row.holder is None or row.epoch != epoch:
        return False
    return now is None or row.expires_at > now


def require_current_epoch(
    session: Session, name: str, epoch: int, *, now: float | None = None
) -> None:
    """``epoch_is_current`` or raise ``LeaseLost`` (which should roll the action back)."""
    if not epoch_is_current(session, name, epoch, now=now):
        raise LeaseLost(name, epoch)
