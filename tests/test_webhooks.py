"""Webhooks: a signed POST when a job ends, retried with backoff, never to a private address.

A real receiver (``http.server`` on loopback) answers as each test scripts it; the
store is SQLite and PostgreSQL. ``deliver_due`` is called with the ``now`` each test
chooses, which drives the backoff without waiting. The control plane refuses loopback
addresses unless ``allow_loopback`` (``webhook_allow_loopback``, tests only) is set, so
the tests that talk to the receiver set it, and the refusals are tested without it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from comfyfleet.api.webhooks import (
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    DeliveryOutcome,
    WebhookRefused,
    WebhookTarget,
    backoff_s,
    check_webhook_url,
    deliver_due,
    resolve_webhook_target,
    sign,
    verify_signature,
    webhook_transport,
)
from comfyfleet.clock import ManualClock
from comfyfleet.store import (
    JobState,
    Store,
    complete_job,
    create_key,
    fail_job,
    place_job,
    request_cancel,
    submit_job,
)
from comfyfleet.store.models import WebhookDeliveryRow
from tests.test_api import S as InstanceStates
from tests.test_api import rent, served

T0 = 1_700_000_000.0
SECRET = "whsec_" + "k" * 40
RECEIVER_QUERY = "token=receiver-side-secret"


# ------------------------------------------------------------------ a receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next scripted status
    (then 200), and a redirect with a Location to ``/elsewhere``."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/comfy?{RECEIVER_QUERY}"

    def serve(self) -> Iterator[Receiver]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append(Received(self.path, dict(self.headers), body))
                code = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.arrived.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from Receiver().serve()


# ------------------------------------------------------------------ helpers


def deliver(store: Store, now: float, *, allow_loopback: bool = True) -> list[DeliveryOutcome]:
    async def go() -> list[DeliveryOutcome]:
        async with webhook_transport() as transport:
            return await deliver_due(store, now, transport, allow_loopback=allow_loopback)

    return asyncio.run(go())


def cancelled_job(store: Store, url: str, *, now: float = T0) -> str:
    """A job with a webhook, cancelled while queued: its ``job.cancelled`` is due at ``now``."""

    def work(session: Session) -> str:
        job = submit_job(
            session,
            profile="sdxl",
            request={"workflow": {}},
            now=now,
            webhook_url=url,
            webhook_secret=SECRET,
        )
        request_cancel(session, job.id, now)
        return job.id

    return store.run_sync(work)


def deliveries(store: Store, job_id: str) -> list[WebhookDeliveryRow]:
    return list(
        store.run_sync(
            lambda session: (
                session.execute(
                    select(WebhookDeliveryRow).where(WebhookDeliveryRow.job_id == job_id)
                )
                .scalars()
                .all()
            )
        )
    )


# ------------------------------------------------------------------ signatures


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    body = b'{"event":"job.succeeded"}'
    header = sign(SECRET, body, int(T0))
    assert header.startswith(f"t={int(T0)},v1=")
    assert verify_signature(SECRET, header, body, now=T0 + 10)
    assert not verify_signature(SECRET, header, body + b" ", now=T0)
    assert not verify_signature("whsec_other_secret_value", header, body, now=T0)
    assert not verify_signature(SECRET, header, body, tolerance_s=300, now=T0 + 301)
    assert not verify_signature(SECRET, header, body, now=T0 - 301)
    rotated = f"{header},v1={'0' * 64}"
    assert verify_signature(SECRET, rotated, body, now=T0)
    for garbage in ("", "t=abc,v1=00", f"v1={'0' * 64}", f"t={int(T0)}"):
        assert not verify_signature(SECRET, garbage, body, now=T0)


# ------------------------------------------------------------------ the rows


def test_the_end_of_a_job_with_a_webhook_records_its_delivery_in_the_same_transaction(
    store: Store,
) -> None:
    clock = ManualClock(start=T0)
    rental = rent(store, clock, state=InstanceStates.READY)

    def work(session: Session) -> dict[str, str]:
        plain = submit_job(session, profile="sdxl", request={}, now=T0)
        hooked = [
            submit_job(
                session, profile="sdxl", request={}, now=T0, webhook_url="https://example.com/h"
            )
            for _ in range(3)
        ]
        request_cancel(session, plain.id, T0)
        request_cancel(session, hooked[0].id, T0 + 1)
        lease = place_job(session, hooked[1].id, rental.id, T0 + 2)
        complete_job(session, hooked[1].id, lease, {}, T0 + 3)
        lease = place_job(session, hooked[2].id, rental.id, T0 + 4)
        fail_job(session, hooked[2].id, lease, "boom", T0 + 5)
        return {
            "plain": plain.id,
            "cancelled": hooked[0].id,
            "succeeded": hooked[1].id,
            "failed": hooked[2].id,
        }

    ids = store.run_sync(work)
    assert deliveries(store, ids["plain"]) == []
    for state, at in (("cancelled", T0 + 1), ("succeeded", T0 + 3), ("failed", T0 + 5)):
        [row] = deliveries(store, ids[state])
        assert (row.event, row.attempts, row.next_attempt_at) == (f"job.{state}", 0, at)
        assert row.delivered_at is None and row.given_up_at is None


# ------------------------------------------------------------------ delivering


def test_a_delivery_is_signed_with_the_jobs_secret_and_carries_its_view(
    store: Store, receiver: Receiver
) -> None:
    job = cancelled_job(store, receiver.url)
    assert deliver(store, T0 - 1) == []  # not due yet
    [outcome] = deliver(store, T0 + 2)
    assert outcome.delivered and outcome.attempts == 1 and outcome.status == 200
    [request] = receiver.received
    assert request.path == f"/hooks/comfy?{RECEIVER_QUERY}"  # the query string is the receiver's
    payload = json.loads(request.body)
    assert payload["event"] == "job.cancelled"
    assert payload["job"]["id"] == job and payload["job"]["state"] == "cancelled"
    assert SECRET not in request.body.decode()
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Comfyfleet-Event"] == "job.cancelled"
    signature = request.headers[SIGNATURE_HEADER]
    assert signature.startswith(f"t={int(T0 + 2)},")
    assert verify_signature(SECRET, signature, request.body, now=T0 + 2)
    [row] = deliveries(store, job)
    assert row.delivered_at == T0 + 2 and row.next_attempt_at is None
    assert deliver(store, T0 + 10_000) == []  # delivered once


def test_a_failed_delivery_is_retried_with_doubling_backoff_then_delivered(
    store: Store, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    job = cancelled_job(store, receiver.url)
    [first] = deliver(store, T0)
    assert not first.delivered and first.status == 500 and first.next_attempt_at == T0 + 5
    assert "answered HTTP 500" in (first.error or "")
    assert deliver(store, T0 + 4.9) == []
    [second] = deliver(store, T0 + 5)
    assert second.attempts == 2 and second.next_attempt_at == T0 + 5 + 10
    [third] = deliver(store, T0 + 15)
    assert third.delivered and third.attempts == 3
    assert len(receiver.received) == 3
    [row] = deliveries(store, job)
    assert row.last_status == 200 and row.last_error is None


def test_a_delivery_is_given_up_after_eight_failed_attempts(
    store: Store, receiver: Receiver
) -> None:
    receiver.statuses = [500] * 20
    job = cancelled_job(store, receiver.url)
    now = T0
    waits = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        [outcome] = deliver(store, now)
        assert outcome.attempts == attempt and not outcome.delivered
        if attempt < MAX_ATTEMPTS:
            assert not outcome.given_up
            assert outcome.next_attempt_at is not None
            waits.append(outcome.next_attempt_at - now)
            now = outcome.next_attempt_at
    assert waits == [5, 10, 20, 40, 80, 160, 320]
    assert waits == [backoff_s(n) for n in range(1, MAX_ATTEMPTS)]
    assert outcome.given_up and outcome.next_attempt_at is None
    assert deliver(store, now + 1e6) == []
    assert len(receiver.received) == MAX_ATTEMPTS
    [row] = deliveries(store, job)
    assert row.given_up_at == now and row.attempts == MAX_ATTEMPTS
    assert row.last_error is not None and "gave up after 8 attempts" in row.last_error


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    store: Store, receiver: Receiver
) -> None:
    receiver.statuses = [302]
    cancelled_job(store, receiver.url)
    [outcome] = deliver(store, T0)
    assert not outcome.delivered and outcome.status == 302
    assert "redirect" in (outcome.error or "")
    assert [r.path.split("?")[0] for r in receiver.received] == ["/hooks/comfy"]


def test_an_address_that_became_private_is_refused_at_delivery_and_nothing_is_sent(
    store: Store, receiver: Receiver
) -> None:
    # Accepted at submission (as if it were public then); loopback is refused now, as a
    # name that was rebound to an inside address would be.
    job = cancelled_job(store, receiver.url.replace("http://127.0.0.1", "https://127.0.0.1"))
    [outcome] = deliver(store, T0, allow_loopback=False)
    assert not outcome.delivered and outcome.status is None
    assert "refused" in (outcome.error or "") and "loopback" in (outcome.error or "")
    assert receiver.received == []
    [row] = deliveries(store, job)
    assert row.attempts == 1 and row.next_attempt_at == T0 + 5


def test_an_unreachable_receiver_is_a_failed_attempt(store: Store) -> None:
    with socket_closed_port() as port:
        cancelled_job(store, f"http://127.0.0.1:{port}/hook")
        [outcome] = deliver(store, T0)
    assert not outcome.delivered and outcome.status is None
    assert "no answer from 127.0.0.1" in (outcome.error or "")


class socket_closed_port:
    """A port on loopback that nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        pass


def test_neither_the_secret_nor_the_query_string_is_ever_logged(
    store: Store, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.statuses = [500, 302]
    cancelled_job(store, receiver.url)
    now = T0
    for _ in range(3):
        for outcome in deliver(store, now):
            now = outcome.next_attempt_at or now
    cancelled_job(store, receiver.url.replace("http://", "https://"), now=now)
    deliver(store, now, allow_loopback=False)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "job.cancelled" in logged  # the deliveries were logged...
    assert SECRET not in logged and "receiver-side-secret" not in logged  # ...without them
    assert SECRET[len("whsec_") :] not in logged


# ------------------------------------------------------------------ where a webhook may go


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://example.com/hook", "must start with https://"),
        ("ftp://example.com/hook", "must start with https://"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://127.9.9.9:8443/hook", "loopback"),
        ("https://localhost/hook", "loopback"),
        ("https://[::1]/hook", "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://10.0.0.1/hook", "private"),
        ("https://192.168.1.20/hook", "private"),
        ("https://172.16.0.5/hook", "private"),
        ("https://[fd00::1]/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[fe80::1]/hook", "link-local"),
        ("https://0.0.0.0/hook", "reserved"),
        ("https://224.0.0.1/hook", "multicast"),
        ("https://100.64.0.1/hook", "not public"),
        ("https:///hook", "no host name"),
        ("https://a:b@example.com/hook", "user name or password"),
        ("https://example.com:99999/hook", "not a valid URL"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_a_webhook_url_that_is_not_https_to_a_public_address_is_refused(url: str, why: str) -> None:
    with pytest.raises(WebhookRefused) as refused:
        asyncio.run(check_webhook_url(url, allow_loopback=False))
    assert why in str(refused.value)
    assert "a:b@" not in str(refused.value)


def test_the_test_flag_allows_http_and_loopback_and_nothing_else() -> None:
    for url in ("http://127.0.0.1:8000/h", "https://localhost/h", "http://[::1]:9/h"):
        asyncio.run(check_webhook_url(url, allow_loopback=True))
    for url in ("http://10.0.0.1/h", "https://169.254.169.254/h", "ftp://127.0.0.1/h"):
        with pytest.raises(WebhookRefused):
            asyncio.run(check_webhook_url(url, allow_loopback=True))


def test_a_public_address_is_accepted_and_the_request_goes_to_the_address_checked() -> None:
    target = asyncio.run(resolve_webhook_target("https://93.184.216.34/h"))
    assert str(target.address) == "93.184.216.34"
    named = WebhookTarget(
        urlsplit("https://hooks.example.com:8443/in/comfy?team=7#frag"),
        "hooks.example.com",
        8443,
        ipaddress.ip_address("93.184.216.34"),
    )
    request = named.pinned_request(b"{}", {"X-Test": "1"})
    assert str(request.url) == "https://93.184.216.34:8443/in/comfy?team=7"
    assert request.headers["Host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.method == "POST" and request.headers["X-Test"] == "1"
    six = WebhookTarget(
        urlsplit("https://h.example/x"), "h.example", 443, ipaddress.ip_address("2606:4700::1")
    )
    assert str(six.pinned_request(b"", {}).url) == "https://[2606:4700::1]/x"


# ------------------------------------------------------------------ through the app


def test_the_app_delivers_a_jobs_webhook_when_it_ends(
    store: Store, tmp_path: Path, receiver: Receiver
) -> None:
    with served(store, tmp_path, settings={"webhook_allow_loopback": True}) as api:
        _, key = store.run_sync(lambda session: create_key(session, "hooks", now=time.time()))
        headers = {"Authorization": f"Bearer {key}"}
        workflow = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
        answer = api.http.post(
            "/api/jobs", headers=headers, json={"workflow": workflow, "webhook_url": receiver.url}
        )
        assert answer.status_code == 201, answer.text
        secret = answer.json()["webhook_secret"]
        job = answer.json()["id"]
        assert api.http.delete(f"/api/jobs/{job}", headers=headers).status_code == 202
        assert receiver.arrived.wait(15), "the app's webhook loop delivered nothing"
    [request] = receiver.received
    assert json.loads(request.body)["event"] == "job.cancelled"
    assert json.loads(request.body)["job"]["state"] == JobState.CANCELLED.value
    assert verify_signature(secret, request.headers[SIGNATURE_HEADER], request.body, now=T0)
