"""Rows a transaction has locked already, so that it does not read them again.

``get_instance(..., lock=True)`` and ``get_job(..., lock=True)`` take the row lock
(``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the whole database)
and re-read the row. Once a transaction holds that lock nobody else can change the row
until it commits, and the session's object has every change this transaction made: a
second lock of the same row in the same transaction returns that object without a
query. On the jobs' hot path this spares a re-read per move (the instance is locked by
the agent's call, then by placing the job, then by moving it to busy).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

_LOCKED = "comfyfleet.locked"

R = TypeVar("R")


def already_locked(session: Session, model: type[R], key: Any) -> R | None:
    """The ``model`` row with primary key ``key`` if this transaction locked it and it is
    still in the session; else None (read and lock it)."""
    locked: set[tuple[type[Any], Any]] | None = session.info.get(_LOCKED)
    if not locked or (model, key) not in locked:
        return None
    if session.in_nested_transaction():
        # A savepoint rolled back would leave the object expired: read it again.
        return None
    row: R | None = session.identity_map.get(session.identity_key(model, key))
    return row


def mark_locked(session: Session, model: type[Any], key: Any) -> None:
    """Note that this transaction holds the lock of the ``model`` row ``key``."""
    session.info.setdefault(_LOCKED, set()).add((model, key))


def forget_locks(session: Session) -> None:
    """The transaction ended (or its objects left the session): no row is held any more."""
    session.info.pop(_LOCKED, None)
