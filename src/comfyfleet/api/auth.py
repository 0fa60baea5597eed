"""Who may call what: the admin key, and each agent's per-instance token.

The admin key (``ADMIN_API_KEY``) comes in ``x-admin-key``, ``x-admin-api-key`` (the
seeds' header) or ``Authorization: Bearer``. Keys and tokens are compared in
constant time, as SHA-256 digests so that not even their lengths leak, and no
answer, log line or exception ever carries one: a refusal names the header that
was expected, never what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from fastapi import HTTPException, Request, status
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.lifecycle import TOKEN_REVOKED_STATES
from comfyfleet.store.models import InstanceRow
from comfyfleet.store.tokens import hash_token, verify_token

__all__ = [
    "ADMIN_HEADER",
    "ADMIN_HEADERS",
    "admin_key_from",
    "bearer_token",
    "check_admin_key",
    "instance_for_token",
    "token_opens",
]

ADMIN_HEADER: Final = "x-admin-key"
#: Where the admin key is looked for, in order; the first one present is the one checked.
ADMIN_HEADERS: Final = (ADMIN_HEADER, "x-admin-api-key", "authorization")

_EXPECTED: Final = (
    f"send the value of ADMIN_API_KEY in the {ADMIN_HEADER} header "
    "(x-admin-api-key or Authorization: Bearer are accepted too)"
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``, or None."""
    value = request.headers.get("authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def admin_key_from(request: Request) -> tuple[str, str] | None:
    """``(header, key)`` for the first admin header the request carries, or None."""
    for header in ADMIN_HEADERS:
        if header == "authorization":
            token = bearer_token(request)
            if token is not None:
                return "Authorization: Bearer", token
        elif value := request.headers.get(header, "").strip():
            return header, value
    return None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def check_admin_key(request: Request, expected: SecretStr | None) -> None:
    """Raise 401 (or 503 when the server has no key) unless the request carries the admin key."""
    if expected is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the admin API is off: set ADMIN_API_KEY where `comfyfleet serve` runs",
        )
    found = admin_key_from(request)
    if found is None:
        raise _unauthorized(f"missing admin key: {_EXPECTED}")
    header, key = found
    if not hmac.compare_digest(_digest(key), _digest(expected.get_secret_value())):
        raise _unauthorized(f"wrong admin key in {header}: {_EXPECTED}")


def agent_token(request: Request) -> str:
    """The agent's token from ``Authorization: Bearer``; 401 saying how to send it otherwise."""
    token = bearer_token(request)
    if token is None:
        raise _unauthorized(
            "missing agent token: send Authorization: Bearer $COMFYFLEET_TOKEN "
            "(the instance's per-instance token)"
        )
    return token


def token_opens(session: Session, instance_id: int, token: str) -> None:
    """Raise 401 unless ``token`` is instance ``instance_id``'s live token."""
    if not verify_token(session, instance_id, token):
        raise _unauthorized(
            f"the agent token is not valid for instance {instance_id}: it is wrong, revoked "
            "(the instance is being destroyed or has ended) or another instance's"
        )


def instance_for_token(session: Session, token: str) -> int:
    """The live instance whose token ``token`` is (calls that carry no instance id); else 401.

    The lookup is by the token's SHA-256, which tells an attacker nothing about any
    stored hash; the match is then confirmed in constant time by ``verify_token``.
    """
    found = session.execute(
        select(InstanceRow.id).where(
            InstanceRow.agent_token_hash == hash_token(token),
            InstanceRow.state.not_in(sorted(TOKEN_REVOKED_STATES)),
        )
    ).scalar_one_or_none()
    if found is None or not verify_token(session, found, token):
        raise _unauthorized(
            "the agent token is not valid: it is wrong, or revoked (the instance is being "
            "destroyed or has ended)"
        )
    return int(found)
