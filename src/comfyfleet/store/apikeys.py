"""User API keys: made by ``comfyfleet keys create``, shown once, kept as a hash, revocable.

They are separate from the admin key (``ADMIN_API_KEY``) and from the agents' tokens:
a user key submits and follows jobs, and sees only the jobs it submitted. A key is
``cf_`` and 256 random bits, so, as for agent tokens (``store.tokens``), a plain SHA-256
is the right hash, and it is compared in constant time. The store keeps the hash and
the key's first characters (``prefix``), by which a user recognises it in a listing;
the key itself is returned once by ``create_key`` and never written anywhere else.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.errors import StoreError
from comfyfleet.store.models import ApiKeyRow
from comfyfleet.store.tokens import hash_token

KEY_PREFIX: Final = "cf_"
"""Every user API key starts so; secret scanners and humans can tell what leaked."""

SHOWN_PREFIX_LENGTH: Final = len(KEY_PREFIX) + 8
"""How much of a key its listing shows: ``cf_`` and 8 characters (48 of its 256 bits)."""

LAST_USED_RESOLUTION_S: Final = 60.0
"""``last_used_at`` is rewritten at most this often: a busy key does not write on each call."""

# Compared against when no key matches, so that a miss costs what a hit does.
_NO_KEY: Final = hash_token("")


class UnknownApiKey(StoreError):
    """The store has no API key with this id."""

    def __init__(self, key_id: int):
        self.key_id = key_id
        super().__init__(f"no API key {key_id}: `comfyfleet keys list` shows the keys there are")


def create_key(session: Session, name: str, *, now: float) -> tuple[ApiKeyRow, str]:
    """A new key named ``name``: its row, and the key itself, which is never shown again."""
    name = name.strip()
    if not name or len(name) > 64:
        raise StoreError("an API key needs a name of 1 to 64 characters (who or what uses it)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKeyRow(
        name=name,
        prefix=key[:SHOWN_PREFIX_LENGTH],
        key_hash=hash_token(key),
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, key


def verify_key(session: Session, presented: str, *, now: float | None = None) -> ApiKeyRow | None:
    """The live key ``presented`` is, or None (unknown or revoked); never logs it.

    Given ``now``, records the use in ``last_used_at`` (at most once a minute).
    """
    digest = hash_token(presented)
    row = session.execute(
        select(ApiKeyRow).where(ApiKeyRow.key_hash == digest)
    ).scalar_one_or_none()
    stored = row.key_hash if row is not None else _NO_KEY
    matches = hmac.compare_digest(digest.encode(), stored.encode())
    if row is None or not matches or row.revoked_at is not None:
        return None
    if now is not None and (
        row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION_S
    ):
        row.last_used_at = now
        session.flush()
    return row


def get_key(session: Session, key_id: int) -> ApiKeyRow:
    """The key ``key_id`` (revoked or not); ``UnknownApiKey`` when there is none."""
    row = session.get(ApiKeyRow, key_id)
    if row is None:
        raise UnknownApiKey(key_id)
    return row


def revoke_key(session: Session, key_id: int, *, now: float) -> ApiKeyRow:
    """Revoke key ``key_id``: nothing it presents is accepted any more. Revoking twice is
    harmless (the first time is kept)."""
    row = get_key(session, key_id)
    if row.revoked_at is None:
        row.revoked_at = now
        session.flush()
    return row


def list_keys(session: Session, *, include_revoked: bool = True) -> list[ApiKeyRow]:
    """The keys, oldest first."""
    query = select(ApiKeyRow)
    if not include_revoked:
        query = query.where(ApiKeyRow.revoked_at.is_(None))
    return list(session.execute(query.order_by(ApiKeyRow.id)).scalars())
