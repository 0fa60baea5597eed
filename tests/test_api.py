"""The control plane's HTTP API, over real sockets, on SQLite and on PostgreSQL.

Each test serves a fresh ``create_app`` with uvicorn on 127.0.0.1 (any free port)
over a migrated store: a SQLite file, or a PostgreSQL schema on loopback
(``postgresql://postgres@127.0.0.1:5432/test``, or ``COMFYFLEET_TEST_DATABASE_URL``)
emptied before each test. With PostgreSQL down the tests fail and say so; they are
never skipped. The admin actions go to ``RecordingPool``, a stand-in written here
to test the HTTP layer only; the real ``PoolControl`` is the reconciler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from comfyfleet.api import (
    SHA256_HEADER,
    AgentProfile,
    AgentWheel,
    ApiSettings,
    ComfySpec,
    PoolActionRefused,
    PoolMetrics,
    RunningServer,
    UnknownProfile,
    create_app,
    is_loopback,
    onstart_script,
)
from comfyfleet.clock import ManualClock
from comfyfleet.errors import UnknownInstance
from comfyfleet.store import (
    InstanceState,
    Store,
    audit_trail,
    create_instance,
    get_instance,
    issue_token,
    live_instances,
    revoke_token,
    transition,
)
from tests.conftest import BIN, REPO

S = InstanceState
ADMIN_KEY = "admin-key-" + "x" * 32
T0 = 1_700_000_000.0


# ------------------------------------------------------------------ rentals
# (the store, on SQLite and on PostgreSQL: ``store`` and ``sqlite_store`` in tests/conftest.py)


@dataclass
class Rental:
    id: int
    token: str


def rent(
    store: Store,
    clock: ManualClock,
    *,
    profile: str = "sdxl",
    slot: int | None = 0,
    state: InstanceState = S.CREATING,
    dph_total: float = 0.5,
    contract: int | None = None,
) -> Rental:
    """An instance recorded and moved to ``state`` (via ``creating``), with its agent token."""

    def work(session: Any) -> Rental:
        row = create_instance(
            session,
            fleet_id="main",
            profile=profile,
            slot=slot,
            provider="vast",
            now=clock.now(),
            actor="test",
            dph_total=dph_total,
        )
        transition(session, row, S.CREATING, reason="renting", actor="test", now=clock.now())
        row.provider_contract_id = contract if contract is not None else 9000 + row.id
        if state is not S.CREATING:
            transition(session, row, state, reason="test", actor="test", now=clock.now())
        return Rental(row.id, issue_token(session, row))

    return store.run_sync(work)


# ------------------------------------------------------------------ the app


@dataclass
class RecordingPool:
    """A stand-in ``PoolControl`` that only records calls (and rows), to test the HTTP layer.

    It is not the pool: the reconciler implements ``PoolControl`` for real.
    """

    store: Store
    clock: ManualClock
    metrics: PoolMetrics | None = None
    profiles: tuple[str, ...] = ("sdxl",)
    refuse: str | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def prewarm(self, profile: str, count: int, *, actor: str) -> list[int]:
        self.calls.append(("prewarm", profile, count, actor))
        if profile not in self.profiles:
            raise UnknownProfile(profile, list(self.profiles))
        if self.refuse:
            raise PoolActionRefused(self.refuse)

        def work(session: Any) -> list[int]:
            taken = {row.slot for row in live_instances(session, profile=profile)}
            slots = [s for s in range(100) if s not in taken][:count]
            return [
                create_instance(
                    session,
                    fleet_id="main",
                    profile=profile,
                    slot=slot,
                    provider="vast",
                    now=self.clock.now(),
                    actor=actor,
                    reason="prewarm",
                ).id
                for slot in slots
            ]

        ids = await self.store.run(work)
        if self.metrics is not None:
            for _ in ids:
                self.metrics.prewarm_attempt(profile)
        return ids

    async def reprovision(
        self, *, instance_id: int | None, profile: str | None, actor: str
    ) -> list[int]:
        self.calls.append(("reprovision", instance_id, profile, actor))
        if instance_id is not None:
            await self.store.run(lambda session: get_instance(session, instance_id))
            return [instance_id]
        return []

    async def terminate(self, instance_id: int, *, reason: str, actor: str) -> None:
        self.calls.append(("terminate", instance_id, reason, actor))

        def work(session: Any) -> None:
            transition(
                session, instance_id, S.DESTROYING, reason=reason, actor=actor, now=self.clock.now()
            )

        await self.store.run(work)


@dataclass
class Api:
    server: RunningServer
    http: httpx.Client
    store: Store
    clock: ManualClock
    settings: ApiSettings
    metrics: PoolMetrics
    pool: RecordingPool | None

    @property
    def url(self) -> str:
        return self.server.url

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"x-admin-key": ADMIN_KEY}, **kw)

    def agent(self, rental: Rental, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {rental.token}"}
        return self.http.request(method, f"/api/agent/{path}", headers=headers, **kw)

    def events(self, rental: Rental, *events: dict[str, Any]) -> httpx.Response:
        body = {"instance_id": rental.id, "events": list(events)}
        return self.agent(rental, "POST", "events", json=body)

    def metric(self, name: str, **labels: str) -> float:
        text = self.http.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise AssertionError(f"no sample {name} {labels} in /metrics")


def serve_app(
    store: Store,
    tmp_path: Path,
    *,
    with_pool: bool = True,
    settings: dict[str, Any] | None = None,
    wheel: AgentWheel | None = None,
    port: int = 0,
    slow_events_s: float = 0.0,
) -> Iterator[Api]:
    """A fresh app over ``store`` on 127.0.0.1:``port``; ``slow_events_s`` delays every
    ``POST /api/agent/events`` (a control plane that cannot keep up)."""
    clock = ManualClock(start=T0)
    options: dict[str, Any] = {
        "admin_api_key": SecretStr(ADMIN_KEY),
        "data_dir": tmp_path / "data",
        "profiles": {
            "sdxl": AgentProfile(
                manifest={"models": []}, comfy=ComfySpec(attach_url="http://127.0.0.1:18188")
            )
        },
    }
    options.update(settings or {})
    api_settings = ApiSettings(**options)
    metrics = PoolMetrics()
    pool = RecordingPool(store, clock, metrics) if with_pool else None
    app = create_app(store, api_settings, clock=clock, pool=pool, metrics=metrics, wheel=wheel)
    if slow_events_s:

        @app.middleware("http")
        async def slow(request: Request, call_next: Any) -> Any:
            if request.url.path == "/api/agent/events":
                await asyncio.sleep(slow_events_s)
            return await call_next(request)

    with (
        RunningServer(app, port=port) as server,
        httpx.Client(base_url=server.url, timeout=20) as http,
    ):
        yield Api(server, http, store, clock, api_settings, metrics, pool)


served = contextlib.contextmanager(serve_app)
"""``serve_app`` as a context manager: ``with served(store, tmp_path) as api: ...``."""


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[Api]:
    yield from serve_app(store, tmp_path)


def stage(name: str, at: float = T0, reason: str | None = None) -> dict[str, Any]:
    return {"kind": "stage", "at": at, "stage": name, "reason": reason}


def progress(done: int, total: int, at: float = T0, file: str = "models/x.bin") -> dict[str, Any]:
    return {
        "kind": "progress",
        "at": at,
        "done": done,
        "total": total,
        "file": file,
        "file_done": done,
        "file_total": total,
        "bytes_per_s": 1e6,
    }


def line(text: str, at: float = T0, level: str = "info") -> dict[str, Any]:
    return {"kind": "log", "at": at, "line": text, "level": level}


def state_of(store: Store, instance_id: int) -> InstanceState:
    return store.run_sync(lambda session: get_instance(session, instance_id).state)


# ------------------------------------------------------------------ admin auth


@pytest.mark.parametrize(
    "headers",
    [
        {"x-admin-key": ADMIN_KEY},
        {"x-admin-api-key": ADMIN_KEY},
        {"Authorization": f"Bearer {ADMIN_KEY}"},
    ],
    ids=["x-admin-key", "x-admin-api-key", "bearer"],
)
def test_the_admin_key_is_accepted_in_each_header_form(api: Api, headers: dict[str, str]) -> None:
    rent(api.store, api.clock)
    answer = api.http.get("/api/admin/pool", headers=headers)
    assert answer.status_code == 200, answer.text
    assert [i["profile"] for i in answer.json()["instances"]] == ["sdxl"]


def test_a_wrong_or_missing_admin_key_gets_401_naming_the_header_and_never_echoes_it(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-" + "y" * 30
    attempts = [
        ("GET", "/api/admin/pool", {}),
        ("GET", "/api/admin/pool", {"x-admin-key": wrong}),
        ("GET", "/api/admin/pool", {"x-admin-api-key": wrong}),
        ("GET", "/api/admin/pool", {"Authorization": f"Bearer {wrong}"}),
        ("GET", "/api/admin/pool", {"Authorization": f"Basic {wrong}"}),
        ("GET", "/api/admin/pool", {"x-admin-key": ADMIN_KEY[:-1]}),
        ("POST", "/api/admin/pool/prewarm", {"x-admin-key": wrong}),
        ("GET", "/api/instances/1/events", {"x-admin-key": wrong}),
    ]
    for method, path, headers in attempts:
        answer = api.http.request(method, path, headers=headers, json={"profile": "sdxl"})
        assert answer.status_code == 401, (headers, answer.text)
        detail = answer.json()["detail"]
        assert "x-admin-key" in detail
        assert wrong not in answer.text and ADMIN_KEY not in answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
    assert (
        "wrong admin key in x-admin-api-key"
        in api.http.get("/api/admin/pool", headers={"x-admin-api-key": wrong}).json()["detail"]
    )
    assert "missing admin key" in api.http.get("/api/admin/pool").json()["detail"]
    assert api.pool is not None and api.pool.calls == []
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert wrong not in logged and ADMIN_KEY not in logged


def test_the_admin_api_is_off_when_the_server_has_no_key(
    sqlite_store: Store, tmp_path: Path
) -> None:
    with served(sqlite_store, tmp_path, settings={"admin_api_key": None}) as api:
        answer = api.http.get("/api/admin/pool", headers={"x-admin-key": "anything"})
        assert answer.status_code == 503
        assert "ADMIN_API_KEY" in answer.json()["detail"]


# ------------------------------------------------------------------ agent tokens


def test_an_agent_token_opens_only_its_own_instance_and_nothing_once_revoked(api: Api) -> None:
    first = rent(api.store, api.clock, slot=0)
    second = rent(api.store, api.clock, slot=1)
    body = {"instance_id": first.id, "hostname": "h", "workspace": "/w"}
    assert api.agent(first, "POST", "register", json=body).status_code == 200

    crossed = api.agent(second, "POST", "register", json=body)
    assert crossed.status_code == 401
    assert f"not valid for instance {first.id}" in crossed.json()["detail"]
    assert second.token not in crossed.text and first.token not in crossed.text
    assert api.events(Rental(first.id, second.token), stage("provisioning")).status_code == 401
    hb = {"instance_id": first.id}
    assert api.agent(second, "POST", "heartbeat", json=hb).status_code == 401
    assert api.http.post("/api/agent/heartbeat", json=hb).status_code == 401  # no token
    assert api.agent(Rental(first.id, "cft_made_up"), "GET", "secrets").status_code == 401

    api.store.run_sync(lambda session: revoke_token(session, first.id))
    for method, path, kw in [
        ("POST", "register", {"json": body}),
        ("POST", "heartbeat", {"json": hb}),
        ("POST", "events", {"json": {"instance_id": first.id, "events": []}}),
        ("GET", "secrets", {}),
        ("GET", "wheel", {}),
    ]:
        answer = api.agent(first, method, path, **kw)
        assert answer.status_code == 401, (path, answer.text)
        assert first.token not in answer.text
    assert api.agent(second, "POST", "heartbeat", json={"instance_id": second.id}).is_success


def test_destroying_an_instance_closes_the_api_to_its_agent(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING)
    assert api.events(rental, stage("provisioning")).is_success
    admin = api.admin("POST", f"/api/admin/instances/{rental.id}/terminate", json={"reason": "bye"})
    assert admin.json() == {"instance_id": rental.id, "state": "destroying"}
    assert api.events(rental, stage("downloading")).status_code == 401
    assert state_of(api.store, rental.id) is S.DESTROYING


# ------------------------------------------------------------------ the agent's reports


def test_register_then_stage_events_move_the_instance_with_an_audit_row_each(api: Api) -> None:
    rental = rent(api.store, api.clock)
    api.clock.advance(5)
    answer = api.agent(
        rental,
        "POST",
        "register",
        json={"instance_id": rental.id, "agent_version": "0.1.0", "hostname": "gpu-7"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "heartbeat_interval_s": 30.0,
        "manifest": {"models": []},
        "comfy": {"attach_url": "http://127.0.0.1:18188", "command": None, "args": []},
        "onstart_job_id": None,
    }
    row = api.store.run_sync(lambda session: get_instance(session, rental.id))
    assert row.state is S.BOOTING
    assert row.registered_at == row.last_heartbeat_at == T0 + 5

    api.clock.advance(1)
    batch = [
        stage("provisioning"),
        line("cloning nodes"),
        stage("downloading"),
        progress(10, 100),
        progress(60, 100),
        stage("starting_app"),
        stage("starting_app"),  # a batch sent twice moves nothing twice
        stage("warming"),
        stage("ready"),
        stage("booting"),  # backwards: not applied, said so
    ]
    answer = api.events(rental, *batch)
    assert answer.json() == {"accepted": len(batch)}
    row = api.store.run_sync(lambda session: get_instance(session, rental.id))
    assert row.state is S.READY and row.ready_at == T0 + 6
    assert row.progress is not None and row.progress["done"] == 60
    assert row.progress["advanced_at"] == T0 + 6

    trail = api.store.run_sync(lambda session: audit_trail(session, rental.id))
    agent_rows = [(a.from_state, a.to_state) for a in trail if a.actor == "agent"]
    assert agent_rows == [
        (S.CREATING, S.BOOTING),
        (S.BOOTING, S.PROVISIONING),
        (S.PROVISIONING, S.DOWNLOADING),
        (S.DOWNLOADING, S.STARTING_APP),
        (S.STARTING_APP, S.WARMING),
        (S.WARMING, S.READY),
    ]
    assert "registered from gpu-7" in trail[2].reason

    page = api.admin("GET", f"/api/instances/{rental.id}/events").json()
    assert page["state"] == "ready"
    notes = [e["line"] for e in page["events"] if e["kind"] == "log"]
    assert any("stage booting not applied" in n for n in notes)


def test_a_failed_report_records_the_reason_for_the_pool_and_keeps_the_token(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.DOWNLOADING)
    reason = "provision_failed"
    answer = api.events(
        rental, stage("failed", reason=reason), line("AGENT FAILED ...", level="error")
    )
    assert answer.is_success
    row = api.store.run_sync(lambda session: get_instance(session, rental.id))
    # The instance has a contract: the pool destroys it; the agent may still send its last lines.
    assert row.state is S.DOWNLOADING and row.failure_reason == reason
    assert api.events(rental, line("the last words")).is_success


def test_heartbeats_are_recorded_at_the_control_planes_time(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING)
    api.clock.advance(42)
    answer = api.agent(
        rental, "POST", "heartbeat", json={"instance_id": rental.id, "stage": "booting", "at": 1.0}
    )
    assert answer.json() == {"ok": True}
    row = api.store.run_sync(lambda session: get_instance(session, rental.id))
    assert row.last_heartbeat_at == T0 + 42


def test_a_batch_is_limited_to_500_events_and_bad_events_are_refused(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING)
    assert api.events(rental, *[line(str(i)) for i in range(501)]).status_code == 422
    assert api.events(rental, {"kind": "stage", "at": T0, "stage": "exploded"}).status_code == 422
    long_line = api.events(rental, line("x" * 100_000))
    assert long_line.is_success  # cut, not refused: a batch never loses its stages to one line
    page = api.admin("GET", f"/api/instances/{rental.id}/events").json()
    assert len(page["events"][-1]["line"]) == 4000


def test_the_provision_log_file_grows_as_events_arrive(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING)
    logs = api.settings.data_dir / "logs"
    assert api.events(
        rental, stage("provisioning", at=T0 + 1), line("hf_token=abc123 ok")
    ).is_success
    files = list(logs.glob(f"provision_{rental.id}_*.log"))
    assert len(files) == 1
    assert re.fullmatch(rf"provision_{rental.id}_\d{{8}}T\d{{6}}Z\.log", files[0].name)
    first = files[0].read_text()
    assert "STAGE provisioning" in first
    assert "hf_token=***" in first and "abc123" not in first  # scrubbed

    batch = [progress(i * 10_000_000, 100_000_000, at=T0 + 2 + i * 0.1) for i in range(11)]
    assert api.events(rental, stage("downloading", at=T0 + 2), *batch).is_success
    text = files[0].read_text()
    assert text.startswith(first)
    assert "STAGE downloading" in text
    # Progress is thinned (one line per 5 s of the agent's time) but the end is always written.
    progress_lines = [ln for ln in text.splitlines() if " PROGRESS " in ln]
    assert [ln.split(" PROGRESS ")[1][:19] for ln in progress_lines] == [
        "0.0 MB / 100.0 MB a",
        "100.0 MB / 100.0 MB",
    ]


# ------------------------------------------------------------------ monitor


def test_monitor_reads_the_events_after_a_sequence_number(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING)
    api.events(rental, stage("provisioning"), line("a"), line("b"))
    page = api.admin("GET", f"/api/instances/{rental.id}/events").json()
    assert [e["seq"] for e in page["events"]] == [1, 2, 3]
    assert page["last"] == 3 and page["missed"] == 0 and page["state"] == "provisioning"

    api.events(rental, stage("downloading"), progress(5, 10))
    page = api.admin("GET", f"/api/instances/{rental.id}/events", params={"after": 3}).json()
    assert [(e["seq"], e["kind"]) for e in page["events"]] == [(4, "stage"), (5, "progress")]
    assert page["progress"]["done"] == 5
    assert api.admin("GET", "/api/instances/999/events").status_code == 404


def test_the_event_buffer_is_bounded_and_says_how_many_were_missed(
    sqlite_store: Store, tmp_path: Path
) -> None:
    with served(sqlite_store, tmp_path, settings={"events_per_instance": 10}) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        api.events(rental, *[line(f"line {i}") for i in range(25)])
        page = api.admin("GET", f"/api/instances/{rental.id}/events").json()
        assert [e["seq"] for e in page["events"]] == list(range(16, 26))
        assert page["missed"] == 15 and page["last"] == 25


# ------------------------------------------------------------------ the pool


def test_the_pool_view_shows_each_live_instance_with_cost_and_heartbeat(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.BOOTING, dph_total=0.72)

    def provider_facts(session: Any) -> None:
        row = get_instance(session, rental.id)
        row.public_ip, row.ports = "203.0.113.9", {"8188/tcp": [{"HostPort": "41234"}]}
        row.status_msg, row.actual_status = "running", "running"

    api.store.run_sync(provider_facts)
    api.agent(rental, "POST", "heartbeat", json={"instance_id": rental.id})
    gone = rent(api.store, api.clock, slot=1, state=S.BOOTING)
    api.store.run_sync(
        lambda session: transition(
            session, gone.id, S.DESTROYING, reason="t", actor="test", now=api.clock.now()
        )
    )
    api.store.run_sync(
        lambda session: transition(
            session, gone.id, S.DESTROYED, reason="t", actor="test", now=api.clock.now()
        )
    )
    api.clock.advance(3600)

    view = api.admin("GET", "/api/admin/pool").json()
    assert view["pool_control"] is True
    assert view["burn_dollars_per_hour"] == pytest.approx(0.72)
    (shown,) = view["instances"]
    assert shown["id"] == rental.id and shown["state"] == "booting"
    assert shown["public_ip"] == "203.0.113.9" and shown["status_msg"] == "running"
    assert shown["ports"] == {"8188/tcp": [{"HostPort": "41234"}]}
    assert shown["cost_so_far"] == pytest.approx(0.72) and shown["cost_estimated"] is True
    assert shown["last_heartbeat_at"] == T0 and shown["heartbeat_age_s"] == 3600
    assert shown["label"] == f"cf-main-{rental.id}"
    every = api.admin("GET", "/api/admin/pool", params={"include_ended": True}).json()
    assert [i["state"] for i in every["instances"]] == ["booting", "destroyed"]


def test_admin_actions_go_to_the_pool_control(api: Api) -> None:
    pool = api.pool
    assert pool is not None
    answer = api.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl", "count": 2})
    assert answer.status_code == 200, answer.text
    ids = answer.json()["instance_ids"]
    assert answer.json() == {"profile": "sdxl", "requested": 2, "instance_ids": ids}
    assert len(ids) == 2 and pool.calls[0] == ("prewarm", "sdxl", 2, "admin")
    assert api.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl"}).is_success

    missing = api.admin("POST", "/api/admin/pool/prewarm", json={"profile": "flux"})
    assert missing.status_code == 404 and "no profile 'flux'" in missing.json()["detail"]
    pool.refuse = "max_instances (3) reached for sdxl"
    refused = api.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl"})
    assert refused.status_code == 409 and "max_instances" in refused.json()["detail"]
    assert api.admin("POST", "/api/admin/pool/prewarm", json={"count": 1}).status_code == 422

    again = api.admin("POST", "/api/admin/pool/reprovision", json={"instance_id": ids[0]})
    assert again.json() == {"instance_ids": [ids[0]]}
    assert api.admin("POST", "/api/admin/pool/reprovision", json={"profile": "sdxl"}).is_success
    both = api.admin("POST", "/api/admin/pool/reprovision", json={"profile": "x", "instance_id": 1})
    assert both.status_code == 422
    unknown = api.admin("POST", "/api/admin/pool/reprovision", json={"instance_id": 999})
    assert unknown.status_code == 404

    # A contract-less requested row goes to destroying through the stand-in: the state is answered.
    done = api.admin("POST", f"/api/admin/instances/{ids[1]}/terminate")
    assert done.json() == {"instance_id": ids[1], "state": "destroying"}
    assert pool.calls[-1] == ("terminate", ids[1], "terminated by an admin", "admin")


def test_without_a_pool_the_actions_answer_503_and_the_view_still_works(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path, with_pool=False) as api:
        for path, body in [
            ("/api/admin/pool/prewarm", {"profile": "sdxl"}),
            ("/api/admin/pool/reprovision", {"profile": "sdxl"}),
            ("/api/admin/instances/1/terminate", None),
        ]:
            answer = api.admin("POST", path, json=body)
            assert answer.status_code == 503
            assert "no pool runs" in answer.json()["detail"]
        view = api.admin("GET", "/api/admin/pool").json()
        assert view["pool_control"] is False and view["instances"] == []


# ------------------------------------------------------------------ metrics


def test_metrics_count_instances_burn_readiness_prewarms_and_silent_agents(api: Api) -> None:
    first = rent(api.store, api.clock, slot=0, dph_total=0.5)
    second = rent(api.store, api.clock, slot=1, dph_total=0.25, state=S.BOOTING)
    api.agent(first, "POST", "register", json={"instance_id": first.id})
    api.agent(second, "POST", "register", json={"instance_id": second.id})
    assert api.metric("comfyfleet_instances", state="booting") == 2
    assert api.metric("comfyfleet_burn_dollars_per_hour") == pytest.approx(0.75)

    def silent_since_long_ago(session: Any) -> None:
        get_instance(session, second.id).last_heartbeat_at = T0 - 1000

    api.store.run_sync(silent_since_long_ago)
    # Silence from before the control plane started is not held against an agent.
    assert api.metric("comfyfleet_instances_missing_heartbeats") == 0

    api.clock.advance(120)
    api.events(first, stage("starting_app"), stage("ready"), progress(1, 2), line("x"))
    assert api.metric("comfyfleet_instances", state="ready") == 1
    assert api.metric("comfyfleet_instances", state="booting") == 1
    assert api.metric("comfyfleet_time_to_ready_seconds_count", profile="sdxl") == 1
    assert api.metric("comfyfleet_time_to_ready_seconds_sum", profile="sdxl") == 120
    assert api.metric("comfyfleet_time_to_ready_seconds_bucket", profile="sdxl", le="180.0") == 1
    assert api.metric("comfyfleet_time_to_ready_seconds_bucket", profile="sdxl", le="60.0") == 0
    assert api.metric("comfyfleet_agent_events_total", kind="stage") == 2
    # The second agent has said nothing for 120 s, four 30 s beats.
    assert api.metric("comfyfleet_instances_missing_heartbeats") == 1

    api.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl", "count": 2})
    assert api.metric("comfyfleet_prewarm_attempts_total", profile="sdxl") == 2
    api.metrics.prewarm_success("sdxl")
    api.metrics.prewarm_failure("sdxl", "no_space")
    api.metrics.heartbeat_lost("sdxl")
    assert api.metric("comfyfleet_prewarm_successes_total", profile="sdxl") == 1
    assert api.metric("comfyfleet_prewarm_failures_total", profile="sdxl", reason="no_space") == 1
    assert api.metric("comfyfleet_heartbeats_lost_total", profile="sdxl") == 1
    assert api.metric("comfyfleet_burn_dollars_per_hour") == pytest.approx(0.75)  # no price yet


def test_each_app_has_its_own_metrics(sqlite_store: Store, tmp_path: Path) -> None:
    with served(sqlite_store, tmp_path / "a") as one:
        one.metrics.prewarm_attempt("sdxl")
        with served(sqlite_store, tmp_path / "b") as other:
            assert "comfyfleet_prewarm_attempts_total{" not in other.http.get("/metrics").text
        assert one.metric("comfyfleet_prewarm_attempts_total", profile="sdxl") == 1


# ------------------------------------------------------------------ secrets, wheel, onstart


def test_secrets_answer_only_what_is_configured_and_are_never_logged(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hf, links = "hf_" + "s" * 30, "bGlua3M="
    options = {"hf_token": SecretStr(hf), "dropbox_links_b64": SecretStr(links)}
    with served(store, tmp_path, settings=options) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        answer = api.agent(rental, "GET", "secrets")
        assert answer.json() == {"HF_TOKEN": hf, "PROVISION_DROPBOX_LINKS_B64": links}
        assert answer.headers["cache-control"] == "no-store"
        assert hf not in repr(api.settings) and hf not in str(api.settings)
    assert hf not in "\n".join(record.getMessage() for record in caplog.records)


def test_settings_come_from_the_environment() -> None:
    env = {
        "ADMIN_API_KEY": " k ",
        "HUGGINGFACE_HUB_TOKEN": "hf",
        "CIVITAI_TOKEN": "",
        "COMFYFLEET_DATA_DIR": "/tmp/cf-data",
        "COMFYFLEET_HEARTBEAT_S": "5",
    }
    settings = ApiSettings.from_env(env)
    assert settings.admin_api_key is not None and settings.admin_api_key.get_secret_value() == "k"
    assert settings.agent_secrets() == {"HF_TOKEN": "hf"}
    assert settings.data_dir == Path("/tmp/cf-data") and settings.heartbeat_interval_s == 5.0


def test_the_agent_wheel_is_built_once_from_the_source_tree_with_its_sha256(
    sqlite_store: Store, tmp_path: Path
) -> None:
    with served(sqlite_store, tmp_path) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        first = api.agent(rental, "GET", "wheel")
        assert first.status_code == 200, first.text
        digest = first.headers[SHA256_HEADER.lower()]
        assert hashlib.sha256(first.content).hexdigest() == digest
        assert first.content[:2] == b"PK"  # a zip
        assert "comfyfleet-0.1.0-py3-none-any.whl" in first.headers["content-disposition"]
        built = list((api.settings.data_dir / "agent-wheel").glob("*.whl"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        assert api.agent(rental, "GET", "wheel").headers[SHA256_HEADER.lower()] == digest
        assert built[0].stat().st_mtime_ns == mtime  # not built again
        assert api.http.get("/api/agent/wheel").status_code == 401


def test_a_configured_wheel_is_served_as_is_and_a_missing_one_is_a_503(
    sqlite_store: Store, tmp_path: Path
) -> None:
    wheel = tmp_path / "comfyfleet-9.9.9-py3-none-any.whl"
    wheel.write_bytes(b"PK fake wheel")
    with served(sqlite_store, tmp_path, settings={"agent_wheel": wheel}) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        answer = api.agent(rental, "GET", "wheel")
        assert answer.content == b"PK fake wheel"
        assert answer.headers[SHA256_HEADER.lower()] == hashlib.sha256(b"PK fake wheel").hexdigest()
    missing = AgentWheel(path=tmp_path / "nope.whl", build_dir=tmp_path / "b")
    with served(sqlite_store, tmp_path / "2", wheel=missing) as api:
        rental = rent(api.store, api.clock, slot=5, state=S.BOOTING)
        answer = api.agent(rental, "GET", "wheel")
        assert answer.status_code == 503 and "COMFYFLEET_AGENT_WHEEL" in answer.json()["detail"]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_the_onstart_script_fetches_checks_installs_and_connects_without_showing_the_token(
    sqlite_store: Store, tmp_path: Path
) -> None:
    wheel = tmp_path / "comfyfleet-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK wheel bytes")
    with served(sqlite_store, tmp_path, settings={"agent_wheel": wheel}) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        fakes, ws = tmp_path / "bin", tmp_path / "ws"
        (ws / ".comfyfleet" / "bin").mkdir(parents=True)
        fakes.mkdir()
        _stub(fakes / "python3", "exit 0\n")  # the venv exists already
        _stub(ws / ".comfyfleet" / "bin" / "pip", 'echo "pip $*" >> "$WORKSPACE/calls"\n')
        _stub(
            ws / ".comfyfleet" / "bin" / "comfyfleet",
            'echo "comfyfleet $* $DM_INSTANCE_ID" >> "$WORKSPACE/calls"\n',
        )
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        env = {
            "PATH": f"{fakes}:/usr/bin:/bin",
            "TMPDIR": str(scratch),
            "COMFYFLEET_URL": api.server.api_url,
            "COMFYFLEET_TOKEN": rental.token,
            "DM_INSTANCE_ID": str(rental.id),
            "WORKSPACE": str(ws),
        }
        script = onstart_script()
        assert rental.token not in script
        done = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        pip, connect = (ws / "calls").read_text().splitlines()
        assert re.fullmatch(
            rf"pip install --quiet {scratch}/tmp\.\w+/comfyfleet-0\.1\.0-py3-none-any\.whl", pip
        )
        assert connect == f"comfyfleet agent connect {rental.id}"
        assert list(scratch.iterdir()) == []  # the wheel and the token's curl file are gone

        # A wheel whose bytes do not match the header is never installed.
        (ws / "calls").unlink()
        bad = {**env, "COMFYFLEET_URL": api.server.api_url}
        wheel.write_bytes(b"PK tampered")  # the served sha256 is the one computed first
        done = subprocess.run(
            ["bash", "-c", script], env=bad, capture_output=True, text=True, timeout=30
        )
        assert done.returncode != 0 and not (ws / "calls").exists()
        assert list(scratch.iterdir()) == []

        plain = {**env, "COMFYFLEET_URL": "http://203.0.113.1:8700/api"}
        done = subprocess.run(
            ["bash", "-c", script], env=plain, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1 and "must be https://" in done.stderr


# ------------------------------------------------------------------ serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_loopback_addresses_are_told_apart() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.9", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.com"]))


def test_serve_refuses_a_public_address_without_an_admin_key(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in clean_env.items() if k not in {"ADMIN_API_KEY", "DATABASE_URL"}}
    env["COMFYFLEET_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [str(BIN / "comfyfleet"), "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on 0.0.0.0 without an admin key" in done.stderr
    assert "ADMIN_API_KEY" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was touched


def test_serve_migrates_the_store_and_answers_on_loopback(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**clean_env, "COMFYFLEET_DATA_DIR": str(tmp_path / "data"), "ADMIN_API_KEY": ADMIN_KEY}
    env.pop("DATABASE_URL", None)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("models: []\n")
    proc = subprocess.Popen(
        [str(BIN / "comfyfleet"), "serve", "--port", str(port), "--manifest", f"sdxl={manifest}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert health.json() == {"ok": True, "version": "0.1.0", "store": "sqlite"}
        assert (tmp_path / "data" / "comfyfleet.db").is_file()
        pool = httpx.get(
            f"http://127.0.0.1:{port}/api/admin/pool", headers={"x-admin-key": ADMIN_KEY}
        )
        assert pool.json()["instances"] == [] and pool.json()["pool_control"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
    # uvicorn ends on the signal it was stopped with, after its graceful shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output and ADMIN_KEY not in output


def test_unknown_instances_in_the_pool_control_are_404(api: Api) -> None:
    async def gone(*_: Any, **__: Any) -> None:
        raise UnknownInstance(77)

    assert api.pool is not None
    api.pool.terminate = gone  # type: ignore[method-assign]
    answer = api.admin("POST", "/api/admin/instances/77/terminate")
    assert answer.status_code == 404 and "no instance 77" in answer.json()["detail"]
