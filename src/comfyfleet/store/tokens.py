"""Per-instance agent tokens: handed out once, kept as a hash, checked in constant time.

A token is 256 random bits, so a plain SHA-256 is the right hash (a slow password
hash adds nothing against a search space of 2^256). The store keeps only
``sha256:<hex>`` in ``instances.agent_token_hash``; the token itself goes into the
instance's environment and nowhere else. A token opens only its own instance's row,
and entering ``destroying``, ``destroyed`` or ``failed`` revokes it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.errors import StoreError
from comfyfleet.lifecycle import TOKEN_REVOKED_STATES
from comfyfleet.store.instances import get_instance
from comfyfleet.store.models import InstanceRow

TOKEN_PREFIX = "cft_"
"""Every agent token starts so; secret scanners and humans can tell what leaked."""

_HASH_SCHEME = "sha256:"
# Compared against when the instance has no token, so that a miss costs what a hit does.
_NO_TOKEN = _HASH_SCHEME + "0" * 64


def hash_token(token: str) -> str:
    """The form a token is stored in."""
    return _HASH_SCHEME + hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(session: Session, instance: InstanceRow | int) -> str:
    """A new token for ``instance``, returned this once; it replaces any earlier one."""
    instance_id = instance if isinstance(instance, int) else instance.id
    row = get_instance(session, instance_id, lock=True)
    if row.state in TOKEN_REVOKED_STATES:
        raise StoreError(
            f"instance {instance_id} is {row.state}: an instance that is being destroyed "
            "or has ended gets no agent token"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row.agent_token_hash = hash_token(token)
    session.flush()
    return token


def verify_token(session: Session, instance_id: int, token: str) -> bool:
    """Whether ``token`` is the live token of instance ``instance_id`` (and of no other)."""
    found = session.execute(
        select(InstanceRow.agent_token_hash, InstanceRow.state).where(InstanceRow.id == instance_id)
    ).one_or_none()
    stored, state = found if found is not None else (None, None)
    live = stored is not None and state not in TOKEN_REVOKED_STATES
    matches = hmac.compare_digest(
        hash_token(token).encode(), (stored if live and stored else _NO_TOKEN).encode()
    )
    return matches and live


def revoke_token(session: Session, instance: InstanceRow | int) -> None:
    """Forget ``instance``'s token: nothing it presents is accepted any more."""
    instance_id = instance if isinstance(instance, int) else instance.id
    row = get_instance(session, instance_id, lock=True)
    row.agent_token_hash = None
    session.flush()
