"""Webhooks: a signed POST to the job's ``webhook_url`` when the job ends, retried with backoff.

The end of a job with a webhook writes a ``webhook_deliveries`` row in the transaction
that ends it (``store.jobs``), so a delivery survives a restart. ``deliver_due`` sends the
rows that are due: ``{"event": "job.succeeded", "job": VIEW}`` with

    X-Comfyfleet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

A receiver checks it with ``verify_signature``. A 2xx answer delivers it; anything else
(an error status, a redirect, which is never followed, a timeout, an address refused)
counts an attempt, and the next one comes 5 s later, then 10, 20... until 8 attempts,
after which it is given up (``given_up_at``, ``last_error``). ``run_webhook_loop`` runs
``deliver_due`` every second for the app's lifetime.

The URL is checked when the job is submitted (``check_webhook_url``) and again before
each attempt: https only, and every address its host resolves to must be public (no
loopback, private, link-local, reserved or multicast one), so that a webhook cannot
reach the control plane's own network. The request then goes to the address that was
checked, not to a second resolution of the name (DNS rebinding), with TLS verified for
the name. Neither the secret nor the URL's query string is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet import __version__
from comfyfleet.clock import Clock
from comfyfleet.errors import ComfyfleetError
from comfyfleet.store.db import Store
from comfyfleet.store.instances import scrub
from comfyfleet.store.jobs import job_view
from comfyfleet.store.models import JobRow, WebhookDeliveryRow

__all__ = [
    "DELIVERY_TIMEOUT_S",
    "FIRST_RETRY_S",
    "MAX_ATTEMPTS",
    "SIGNATURE_HEADER",
    "DeliveryOutcome",
    "WebhookRefused",
    "WebhookTarget",
    "backoff_s",
    "check_webhook_url",
    "deliver_due",
    "resolve_webhook_target",
    "run_webhook_loop",
    "sign",
    "verify_signature",
    "webhook_transport",
]

log = logging.getLogger("comfyfleet.webhooks")

SIGNATURE_HEADER: Final = "X-Comfyfleet-Signature"
MAX_ATTEMPTS: Final = 8
FIRST_RETRY_S: Final = 5.0
DELIVERY_TIMEOUT_S: Final = 10.0
#: A claimed delivery is due again after this long: a replica that died while sending it
#: leaves it to another (longer than an attempt can last).
CLAIM_S: Final = 60.0
POLL_S: Final = 1.0
BATCH: Final = 32
#: Attempts in flight at once, from one replica.
CONCURRENCY: Final = 8
DNS_TIMEOUT_S: Final = 5.0
DEFAULT_TOLERANCE_S: Final = 300.0


class WebhookRefused(ComfyfleetError):
    """A webhook URL that comfyfleet will not call; the message says why and what to give."""


# ------------------------------------------------------------------ signatures


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Comfyfleet-Signature`` value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (``X-Comfyfleet-Signature``) signs ``body`` with ``secret``, sent
    within ``tolerance_s`` of ``now`` (default: the wall clock), which refuses a replay
    of an old delivery. Check the raw body, before parsing it as JSON."""
    timestamp: int | None = None
    macs: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            macs.append(value.strip().lower())
    if timestamp is None or not macs:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode("ascii")
    return any(hmac.compare_digest(expected, mac.encode("ascii", "replace")) for mac in macs)


# ------------------------------------------------------------------ where a webhook may go

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _why_refused(address: IPAddress, *, allow_loopback: bool) -> str | None:
    """Why a webhook may not go to ``address``, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            return _why_refused(embedded, allow_loopback=allow_loopback)
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if address.is_unspecified or address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "an address that is not public"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL: where to connect (``address``), and what to call it there."""

    url: SplitResult
    host: str
    port: int
    address: IPAddress

    @property
    def host_is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def pinned_request(self, body: bytes, headers: dict[str, str]) -> httpx.Request:
        """A POST of ``body`` to the checked address, named as the URL's host (Host
        header, TLS server name and certificate check), so no second lookup happens."""
        ip = str(self.address)
        netloc = f"[{ip}]" if self.address.version == 6 else ip
        default_port = 443 if self.url.scheme == "https" else 80
        if self.port != default_port:
            netloc += f":{self.port}"
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default_port:
            host_header += f":{self.port}"
        target = urlunsplit((self.url.scheme, netloc, self.url.path or "/", self.url.query, ""))
        extensions: dict[str, object] = {
            "timeout": {
                "connect": DELIVERY_TIMEOUT_S,
                "read": DELIVERY_TIMEOUT_S,
                "write": DELIVERY_TIMEOUT_S,
                "pool": DELIVERY_TIMEOUT_S,
            }
        }
        if self.url.scheme == "https" and not self.host_is_address:
            extensions["sni_hostname"] = self.host
        return httpx.Request(
            "POST",
            target,
            headers={**headers, "Host": host_header},
            content=body,
            extensions=extensions,
        )


def _parse(url: str, *, allow_loopback: bool) -> tuple[SplitResult, str, int]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise WebhookRefused(f"the webhook URL is not a valid URL ({error})") from None
    schemes = ("https", "http") if allow_loopback else ("https",)
    if parts.scheme not in schemes:
        raise WebhookRefused(
            "a webhook URL must start with https:// (the job's result travels in it)"
        )
    if not parts.hostname:
        raise WebhookRefused("the webhook URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(
            "a webhook URL may not carry a user name or password: the signature header "
            "authenticates the call, so check it with the job's webhook secret instead"
        )
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts, parts.hostname, port


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT_S
        )
    except (OSError, TimeoutError, UnicodeError) as error:
        raise WebhookRefused(
            f"the webhook host {host!r} does not resolve ({type(error).__name__}): "
            "check the name, or give one that resolves to a public address"
        ) from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonical, sockaddr in found:
        # An IPv6 address may carry a zone (``fe80::1%eth0``), which ipaddress refuses.
        text = str(sockaddr[0]).split("%", 1)[0]
        address = ipaddress.ip_address(text)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise WebhookRefused(f"the webhook host {host!r} resolves to no address")
    return addresses


async def resolve_webhook_target(url: str, *, allow_loopback: bool = False) -> WebhookTarget:
    """Check ``url`` and resolve its host; ``WebhookRefused`` unless it is https and every
    address it resolves to is public (``allow_loopback``, for tests: http and loopback
    addresses too). The target is the first address found."""
    parts, host, port = _parse(url, allow_loopback=allow_loopback)
    addresses = await _resolve(host, port)
    for address in addresses:
        why = _why_refused(address, allow_loopback=allow_loopback)
        if why is not None:
            named = "" if str(address) == host else f" resolves to {address}, which"
            raise WebhookRefused(
                f"the webhook host {host!r}{named} is {why}: webhooks go only to public "
                "addresses; give a URL reachable from the internet"
            )
    return WebhookTarget(parts, host, port, addresses[0])


async def check_webhook_url(url: str, *, allow_loopback: bool = False) -> None:
    """``WebhookRefused`` for a URL a webhook may not go to (see ``resolve_webhook_target``)."""
    await resolve_webhook_target(url, allow_loopback=allow_loopback)


# ------------------------------------------------------------------ delivering


def backoff_s(attempts: int) -> float:
    """How long after its ``attempts``-th failed attempt a delivery is tried again."""
    return float(FIRST_RETRY_S * 2 ** max(attempts - 1, 0))


def webhook_transport() -> httpx.AsyncHTTPTransport:
    """The transport deliveries go through: no proxy from the environment (it would make
    the address check moot), no kept-alive connection (each delivery is its own TLS
    session to the address checked for it), no retry (the backoff is the store's).

    A transport, not a client: a client logs each request's URL, query string included,
    and follows redirects when asked; deliveries do neither."""
    return httpx.AsyncHTTPTransport(
        retries=0, limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    )


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt gave: ``delivered``, or failed (``given_up`` after the last one)."""

    delivery_id: int
    job_id: str
    event: str
    attempts: int
    delivered: bool
    given_up: bool
    status: int | None
    error: str | None
    next_attempt_at: float | None


@dataclass(frozen=True)
class _Claimed:
    id: int
    job_id: str
    event: str
    url: str
    secret: str
    body: bytes


def _claim(session: Session, now: float, limit: int) -> list[_Claimed]:
    rows = session.execute(
        select(WebhookDeliveryRow)
        .where(
            WebhookDeliveryRow.next_attempt_at <= now,
            WebhookDeliveryRow.delivered_at.is_(None),
            WebhookDeliveryRow.given_up_at.is_(None),
        )
        .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).scalars()
    claimed = []
    for row in rows:
        job = session.get(JobRow, row.job_id)
        if job is None or job.webhook_url is None or job.webhook_secret is None:
            row.next_attempt_at = None
            row.given_up_at = now
            row.last_error = "the job has no webhook any more"
            continue
        # Taken for this attempt: another replica skips it until the attempt is recorded
        # (or, if this one dies sending it, until CLAIM_S has passed).
        row.next_attempt_at = now + CLAIM_S
        view = job_view(session, job, now=now)
        body = json.dumps({"event": row.event, "job": view}, separators=(",", ":"))
        claimed.append(
            _Claimed(
                row.id, row.job_id, row.event, job.webhook_url, job.webhook_secret, body.encode()
            )
        )
    session.flush()
    return claimed


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return scrub(f"{type(error).__name__}: {text}" if text else type(error).__name__)[:500]


async def _attempt(
    transport: httpx.AsyncBaseTransport, claimed: _Claimed, now: float, *, allow_loopback: bool
) -> tuple[int | None, str | None]:
    """One attempt: (the HTTP status, or None; None on success, else why it failed)."""
    try:
        target = await resolve_webhook_target(claimed.url, allow_loopback=allow_loopback)
    except WebhookRefused as error:
        return None, f"refused: {error}"
    timestamp = int(now)
    request = target.pinned_request(
        claimed.body,
        {
            "Content-Type": "application/json",
            "User-Agent": f"comfyfleet-webhooks/{__version__}",
            SIGNATURE_HEADER: sign(claimed.secret, claimed.body, timestamp),
            "X-Comfyfleet-Event": claimed.event,
            "X-Comfyfleet-Delivery": str(claimed.id),
        },
    )
    try:
        response = await transport.handle_async_request(request)
        # The answer's body is not read: only its status counts, and a large one costs nothing.
        await response.aclose()
    except (httpx.HTTPError, OSError) as error:
        return None, f"no answer from {target.host}: {_describe(error)}"
    status = response.status_code
    if 200 <= status < 300:
        return status, None
    if 300 <= status < 400:
        return status, (
            f"{target.host} answered HTTP {status}, a redirect: webhooks follow none, "
            "give the final URL"
        )
    return status, f"{target.host} answered HTTP {status}"


def _record(
    session: Session, claimed: _Claimed, now: float, status: int | None, error: str | None
) -> DeliveryOutcome:
    row = session.get(WebhookDeliveryRow, claimed.id, with_for_update=True)
    assert row is not None, "a delivery row is never deleted"
    row.attempts += 1
    row.last_status = status
    if error is None:
        row.delivered_at = now
        row.next_attempt_at = None
        row.last_error = None
    elif row.attempts >= MAX_ATTEMPTS:
        row.given_up_at = now
        row.next_attempt_at = None
        row.last_error = f"gave up after {row.attempts} attempts; the last: {error}"
    else:
        row.next_attempt_at = now + backoff_s(row.attempts)
        row.last_error = error
    session.flush()
    return DeliveryOutcome(
        delivery_id=row.id,
        job_id=row.job_id,
        event=row.event,
        attempts=row.attempts,
        delivered=row.delivered_at is not None,
        given_up=row.given_up_at is not None,
        status=status,
        error=row.last_error,
        next_attempt_at=row.next_attempt_at,
    )


async def deliver_due(
    store: Store,
    now: float,
    http: httpx.AsyncBaseTransport,
    *,
    allow_loopback: bool = False,
    limit: int = BATCH,
) -> list[DeliveryOutcome]:
    """Attempt every delivery due at ``now`` (at most ``limit``), at ``CONCURRENCY`` at
    once, through ``http`` (``webhook_transport()``); what each attempt gave.

    ``now`` stamps the signature and schedules the retries, so tests drive the backoff
    by the ``now`` they pass.
    """
    claimed = await store.run(lambda session: _claim(session, now, limit))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: _Claimed) -> DeliveryOutcome:
        async with gate:
            status, error = await _attempt(http, item, now, allow_loopback=allow_loopback)
        outcome = await store.run(lambda session: _record(session, item, now, status, error))
        if outcome.delivered:
            log.info("webhook %s of job %s delivered", item.event, item.job_id)
        elif outcome.given_up:
            log.warning(
                "webhook %s of job %s given up after %d attempts: %s",
                item.event,
                item.job_id,
                outcome.attempts,
                error,
            )
        else:
            log.info(
                "webhook %s of job %s failed (attempt %d, retried in %gs): %s",
                item.event,
                item.job_id,
                outcome.attempts,
                backoff_s(outcome.attempts),
                error,
            )
        return outcome

    results: Sequence[DeliveryOutcome] = await asyncio.gather(*(one(item) for item in claimed))
    return list(results)


async def run_webhook_loop(
    store: Store,
    clock: Clock,
    stop: asyncio.Event,
    *,
    allow_loopback: bool = False,
    poll_s: float = POLL_S,
) -> None:
    """Deliver due webhooks every ``poll_s`` seconds until ``stop`` is set.

    It waits in real time, whatever ``clock`` (a manual clock in tests would otherwise be
    run forward), and reads the time from ``clock``. At ``stop`` an attempt in flight is
    abandoned: its row is due again once its claim lapses.
    """
    transport = webhook_transport()
    try:
        while not stop.is_set():
            work = asyncio.create_task(
                deliver_due(store, clock.now(), transport, allow_loopback=allow_loopback)
            )
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                stopping.cancel()
                return
            stopping.cancel()
            try:
                work.result()
            except Exception:
                log.exception("delivering webhooks failed; trying again in %gs", poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
    finally:
        await transport.aclose()
