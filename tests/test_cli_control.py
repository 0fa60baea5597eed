"""The user's commands on the control plane (``up``, ``monitor``, ``pool``, ``audit``) and
the events long-poll they follow, against a real served API on loopback.

The control plane is ``create_app`` under uvicorn (``RunningServer``) over a migrated
store. The pool behind it is ``DialHomePool``, a stand-in written here: its prewarm
records each instance as the reconciler records a rental (``requested``, then
``creating`` with a contract id and an agent token) and hands the token to the
test, which then plays the agent over the real agent endpoints: with the
production ``RemoteReporter``, or with plain HTTP calls. The commands run as real
processes (``.venv/bin/comfyfleet``), as a user runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from comfyfleet.agent.remote import RemoteReporter
from comfyfleet.agent.report import Progress
from comfyfleet.api import (
    AgentProfile,
    ApiSettings,
    ComfySpec,
    PoolActionRefused,
    RunningServer,
    UnknownProfile,
    create_app,
)
from comfyfleet.api.events import EventBuffer
from comfyfleet.clock import ManualClock
from comfyfleet.commands.fleet import PlainDisplay, Tally, verdict
from comfyfleet.control_client import InstanceEvents, server_url
from comfyfleet.store import (
    InstanceState,
    Store,
    create_instance,
    get_instance,
    issue_token,
    live_instances,
    transition,
)
from tests.conftest import BIN, run_cli
from tests.test_api import ADMIN_KEY, T0, Rental, free_port

# The store fixtures of the API's tests: SQLite, and PostgreSQL on loopback.

S = InstanceState
CLI = str(BIN / "comfyfleet")


# ------------------------------------------------------------------ the control plane


@dataclass
class DialHomePool:
    """The ``PoolControl`` behind the API here: records rentals, and gives the test their
    agent tokens (``rented``), so that the test can report as each instance's agent."""

    store: Store
    clock: ManualClock
    rented: queue.Queue[Rental] = field(default_factory=queue.Queue)

    async def prewarm(self, profile: str, count: int, *, actor: str) -> list[int]:
        if profile != "sdxl":
            raise UnknownProfile(profile, ["sdxl"])

        def work(session: Any) -> list[Rental]:
            taken = {row.slot for row in live_instances(session, profile=profile)}
            rentals = []
            for slot in [s for s in range(100) if s not in taken][:count]:
                row = create_instance(
                    session,
                    fleet_id="main",
                    profile=profile,
                    slot=slot,
                    provider="vast",
                    now=self.clock.now(),
                    actor=actor,
                    reason=f"prewarm requested by {actor}",
                    dph_total=0.5,
                    gpu_name="RTX 4090",
                )
                transition(
                    session,
                    row,
                    S.CREATING,
                    reason="renting offer 1001",
                    actor="reconciler",
                    now=self.clock.now(),
                )
                row.provider_contract_id = 9000 + row.id
                rentals.append(Rental(row.id, issue_token(session, row)))
            return rentals

        rentals = await self.store.run(work)
        for rental in rentals:
            self.rented.put(rental)
        return [rental.id for rental in rentals]

    async def reprovision(
        self, *, instance_id: int | None, profile: str | None, actor: str
    ) -> list[int]:
        raise PoolActionRefused("reprovision is not part of these tests")

    async def terminate(self, instance_id: int, *, reason: str, actor: str) -> None:
        await self.store.run(
            lambda session: transition(
                session, instance_id, S.DESTROYING, reason=reason, actor=actor, now=self.clock.now()
            )
        )


@dataclass
class ControlPlane:
    server: RunningServer
    http: httpx.Client
    store: Store
    clock: ManualClock
    pool: DialHomePool
    env: dict[str, str]

    def agent(self, rental: Rental, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {rental.token}"}
        answer = self.http.request(method, f"/api/agent/{path}", headers=headers, **kw)
        assert answer.status_code == 200, answer.text
        return answer

    def report(self, rental: Rental, *events: dict[str, Any]) -> None:
        self.agent(rental, "POST", "events", json={"instance_id": rental.id, "events": events})

    def events(self, instance_id: int, **params: Any) -> httpx.Response:
        return self.http.get(
            f"/api/instances/{instance_id}/events",
            params=params,
            headers={"x-admin-key": ADMIN_KEY},
        )

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env={**self.env, **env})

    def start_cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [CLI, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def next_rental(self) -> Rental:
        return self.pool.rented.get(timeout=30)


def serve_control_plane(
    store: Store, tmp_path: Path, env: dict[str, str], **settings: Any
) -> Iterator[ControlPlane]:
    clock = ManualClock(start=T0)
    api_settings = ApiSettings(
        admin_api_key=SecretStr(ADMIN_KEY),
        data_dir=tmp_path / "data",
        profiles={"sdxl": AgentProfile(manifest={"models": []}, comfy=ComfySpec())},
        **settings,
    )
    pool = DialHomePool(store, clock)
    app = create_app(store, api_settings, clock=clock, pool=pool)
    with (
        RunningServer(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        cli_env = {
            **env,
            "COMFYFLEET_SERVER": server.url,
            "ADMIN_API_KEY": ADMIN_KEY,
            "DATABASE_URL": str(store.engine.url.render_as_string(hide_password=False)),
        }
        yield ControlPlane(server, http, store, clock, pool, cli_env)


served_plane = contextlib.contextmanager(serve_control_plane)


@pytest.fixture
def plane(sqlite_store: Store, tmp_path: Path, clean_env: dict[str, str]) -> Iterator[ControlPlane]:
    yield from serve_control_plane(sqlite_store, tmp_path, clean_env)


def stage(name: str, reason: str | None = None) -> dict[str, Any]:
    return {"kind": "stage", "at": T0, "stage": name, "reason": reason}


def line(text: str, level: str = "info") -> dict[str, Any]:
    return {"kind": "log", "at": T0, "line": text, "level": level}


def progress(
    done: int, total: int, file: str = "models/checkpoints/sdxl.safetensors"
) -> dict[str, Any]:
    return {
        "kind": "progress",
        "at": T0,
        "done": done,
        "total": total,
        "file": file,
        "file_done": done,
        "file_total": total,
        "bytes_per_s": 5e7,
    }


def read_until(stream: Any, needle: str, timeout: float = 30) -> str:
    """Lines of a process's text ``stream`` up to the one holding ``needle``."""
    seen: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for text in stream:
            seen.append(text)
            if needle in text:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), f"no {needle!r} in {''.join(seen)!r}"
    return "".join(seen)


# ------------------------------------------------------------------ up --wait


async def test_up_wait_follows_the_agent_to_ready_and_exits_0_right_after_the_ready_report(
    plane: ControlPlane,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "up",
        "sdxl",
        "--wait",
        "--timeout",
        "60",
        env=plane.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    rental = await asyncio.to_thread(plane.next_rental)
    seen: list[str] = []

    async def until(needle: str) -> None:
        async with asyncio.timeout(30):
            while not any(needle in text for text in seen):
                text = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
                assert text, f"the command ended before {needle!r}: {''.join(seen)!r}"
                seen.append(text)

    async with RemoteReporter(
        plane.server.api_url, rental.token, rental.id, flush_interval_s=0.02
    ) as remote:
        await remote.register(workspace="/workspace", hostname="gpu-1")
        remote.stage("provisioning")
        remote.log("installing 2 custom nodes")
        remote.stage("downloading")
        for done in (0, 2_000_000_000, 6_900_000_000):
            remote.progress(
                Progress(
                    done=done,
                    total=6_900_000_000,
                    file="models/checkpoints/sdxl.safetensors",
                    file_done=done,
                    file_total=6_900_000_000,
                    bytes_per_s=5e7,
                )
            )
        remote.stage("starting_app")
        remote.stage("warming")
        assert await remote.flush()
        await until("stage warming")  # the command is following: now time the ready report
        reported = time.perf_counter()
        remote.stage("ready")
        assert await remote.flush()
        async with asyncio.timeout(10):
            rest, errors = await proc.communicate()
        exited = time.perf_counter()

    out = "".join(seen) + rest.decode()
    assert proc.returncode == 0, (out, errors.decode())
    assert exited - reported < 1.0, f"the command exited {exited - reported:.2f}s after ready"
    assert f"requested 1 instance of profile sdxl: {rental.id}" in out
    for name in ("provisioning", "downloading", "starting_app", "warming", "ready"):
        assert f"stage {name}" in out
    assert "installing 2 custom nodes" in out
    assert "6.9 GB / 6.9 GB (100%)" in out
    assert "provision log" in out and f"provision_{rental.id}_" in out
    assert f"instance {rental.id} is ready" in out


def test_up_wait_exits_1_with_the_reason_the_agent_gives_for_failing(plane: ControlPlane) -> None:
    proc = plane.start_cli("up", "sdxl", "--wait")
    rental = plane.next_rental()
    plane.agent(rental, "POST", "register", json={"instance_id": rental.id})
    plane.report(rental, stage("provisioning"), progress(10, 100))
    plane.report(rental, line("sha256 mismatch on sdxl.safetensors", "error"))
    plane.report(rental, stage("failed", "hash_mismatch"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert "stage failed: hash_mismatch" in out
    assert "ERROR sha256 mismatch on sdxl.safetensors" in out
    assert f"instance {rental.id} failed: hash_mismatch" in out


def test_up_wait_exits_1_when_the_instance_is_destroyed_without_a_word_from_its_agent(
    plane: ControlPlane,
) -> None:
    proc = plane.start_cli("up", "sdxl", "--wait")
    rental = plane.next_rental()
    read_until(proc.stdout, "stage creating")
    # The pool moves it (here: an admin's terminate) and no agent event follows.
    answer = plane.http.post(
        f"/api/admin/instances/{rental.id}/terminate",
        json={"reason": "no longer needed"},
        headers={"x-admin-key": ADMIN_KEY},
    )
    assert answer.status_code == 200, answer.text
    started = time.perf_counter()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert time.perf_counter() - started < 3.0, out
    assert f"instance {rental.id} is destroying" in out


def test_up_wait_gives_up_with_124_at_its_timeout(plane: ControlPlane) -> None:
    result = plane.cli("up", "sdxl", "--wait", "--timeout", "1")
    assert result.returncode == 124, result
    assert "is not ready after 1s (it is creating)" in result.stdout


def test_up_without_wait_prints_the_ids_and_json_says_the_same(plane: ControlPlane) -> None:
    result = plane.cli("up", "sdxl", "--count", "2")
    assert result.returncode == 0, result
    first, second = plane.next_rental(), plane.next_rental()
    assert f"requested 2 instances of profile sdxl: {first.id}, {second.id}" in result.stdout
    result = plane.cli("up", "sdxl", "--json")
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == {
        "profile": "sdxl",
        "instance_ids": [plane.next_rental().id],
    }


def test_up_of_an_unknown_profile_is_the_servers_refusal_and_exit_3(plane: ControlPlane) -> None:
    result = plane.cli("up", "nope", "--wait")
    assert result.returncode == 3, result
    assert "no profile 'nope' in the fleet file (profiles: sdxl)" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the long-poll


def _timed_get(
    plane: ControlPlane, instance_id: int, **params: Any
) -> tuple[dict[str, Any], float]:
    """The page, and when it arrived."""
    answer = plane.events(instance_id, **params)
    assert answer.status_code == 200, answer.text
    return answer.json(), time.perf_counter()


def test_a_held_events_request_is_answered_by_the_agents_report_not_its_wait(
    store: Store, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with served_plane(store, tmp_path, clean_env) as plane:
        rental = _rent_booting(plane)
        last = plane.events(rental.id).json()["last"]
        got: dict[str, Any] = {}

        def reader() -> None:
            got["page"], got["at"] = _timed_get(plane, rental.id, after=last, wait=10)

        waiting = threading.Thread(target=reader)
        waiting.start()
        time.sleep(0.3)  # the request is held
        assert "page" not in got
        posted = time.perf_counter()
        # A log line changes no state: only the report's wake-up can end the 10 s wait.
        # (How fast: bench/up_overhead.py measures the whole way to `up` exiting.)
        plane.report(rental, line("fetching nodes"))
        waiting.join(10)
        assert got["at"] - posted < 2.0, f"answered {got['at'] - posted:.3f}s after the report"
        page = got["page"]
        assert page["state"] == "booting" and page["last"] == last + 1
        assert [e["line"] for e in page["events"]] == ["fetching nodes"]


def test_a_held_events_request_ends_at_its_wait_or_when_the_state_changes(
    plane: ControlPlane,
) -> None:
    rental = _rent_booting(plane)
    last = plane.events(rental.id).json()["last"]

    started = time.perf_counter()
    page, at = _timed_get(plane, rental.id, after=last, wait=0.6)
    assert 0.55 < at - started < 2.0 and page["events"] == [] and page["state"] == "booting"

    def destroy_later() -> None:
        time.sleep(0.3)
        plane.store.run_sync(
            lambda session: transition(
                session, rental.id, S.DESTROYING, reason="stale", actor="reconciler", now=T0
            )
        )

    mover = threading.Thread(target=destroy_later)
    started = time.perf_counter()
    mover.start()
    page, at = _timed_get(plane, rental.id, after=last, wait=20)
    mover.join()
    assert at - started < 1.5 and page["state"] == "destroying"
    # A reader that last saw it booting hears at once that it is not any more.
    started = time.perf_counter()
    page, at = _timed_get(plane, rental.id, after=last, wait=20, state="booting")
    assert at - started < 0.5 and page["state"] == "destroying"

    # Nothing to wait for: an instance that has ended, or a cursor from before a restart.
    plane.store.run_sync(
        lambda session: transition(
            session, rental.id, S.FAILED, reason="gone", actor="reconciler", now=T0
        )
    )
    started = time.perf_counter()
    page, at = _timed_get(plane, rental.id, after=last, wait=20)
    assert at - started < 1.0 and page["state"] == "failed"
    page, at = _timed_get(plane, rental.id, after=last + 50, wait=20)
    assert at - started < 2.0 and [e["seq"] for e in page["events"]] == list(range(1, last + 1))
    assert plane.events(rental.id, wait=31).status_code == 422
    assert plane.events(999, wait=1).status_code == 404


async def test_the_event_buffer_wakes_a_waiter_from_another_thread() -> None:
    buffer = EventBuffer()
    assert not await buffer.wait(7, 0, 0.05)
    waiting = asyncio.create_task(buffer.wait(7, 0, 10))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await asyncio.to_thread(buffer.append, 7, [{"kind": "log", "line": "x"}])
    assert await waiting and time.perf_counter() - started < 0.1
    assert await buffer.wait(7, 0, 10)  # already there: at once
    assert buffer.last_seq(7) == 1 and buffer.last_seq(8) == 0


# ------------------------------------------------------------------ monitor


def test_monitor_of_a_ready_instance_prints_its_state_and_how_to_reach_it(
    plane: ControlPlane,
) -> None:
    rental = _rent_booting(plane)
    plane.report(rental, stage("provisioning"), stage("starting_app"), stage("ready"))
    _provider_facts(plane, rental.id)
    result = plane.cli("monitor", str(rental.id))
    assert result.returncode == 0, result
    assert "stage ready" in result.stdout and f"instance {rental.id} is ready" in result.stdout
    assert "stage provisioning" not in result.stdout  # no replay for an instance that is done
    assert "ssh: ssh -p 10600 root@ssh5.vast.ai" in result.stdout
    assert "portal: http://203.0.113.9:41201" in result.stdout


def test_monitor_of_an_ended_instance_exits_1_and_of_an_unknown_one_3(
    plane: ControlPlane,
) -> None:
    rental = _rent_booting(plane)
    plane.store.run_sync(
        lambda session: transition(
            session,
            rental.id,
            S.DESTROYING,
            reason="no heartbeat",
            actor="reconciler",
            now=T0,
            failure_reason="heartbeat_lost",
        )
    )
    result = plane.cli("monitor", str(rental.id))
    assert result.returncode == 1, result
    assert f"instance {rental.id} failed: heartbeat_lost" in result.stdout
    result = plane.cli("monitor", "999")
    assert result.returncode == 3, result
    assert "no instance 999 in the store" in result.stderr


def test_monitor_attaches_says_what_it_missed_and_follows_to_ready(
    sqlite_store: Store, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with served_plane(sqlite_store, tmp_path, clean_env, events_per_instance=10) as plane:
        rental = _rent_booting(plane)
        plane.report(rental, stage("provisioning"), *[line(f"line {i}") for i in range(20)])
        proc = plane.start_cli("monitor", str(rental.id))
        head = read_until(proc.stdout, "line 19")
        plane.report(rental, stage("downloading"), progress(50, 100), stage("ready"))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
        assert "12 event(s) before these are no longer kept by the control plane" in head
        assert "stage downloading" in out and "download 50 B / 100 B (50%)" in out


# ------------------------------------------------------------------ admin key, server


def test_a_wrong_admin_key_is_refused_naming_the_header_and_never_showing_the_key(
    plane: ControlPlane,
) -> None:
    wrong = "wrong-admin-key-" + "z" * 24
    for args in (("pool",), ("up", "sdxl", "--wait"), ("monitor", "1")):
        result = plane.cli(*args, ADMIN_API_KEY=wrong)
        assert result.returncode == 2, result
        assert "x-admin-key" in result.stderr and "ADMIN_API_KEY" in result.stderr
        assert wrong not in result.stdout + result.stderr
        assert ADMIN_KEY not in result.stdout + result.stderr
    result = plane.cli("pool", ADMIN_API_KEY="")
    assert result.returncode == 2 and "missing admin key" in result.stderr


def test_without_a_control_plane_the_commands_say_how_to_start_one(
    clean_env: dict[str, str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("pool", "--server", url, env=clean_env)
    assert result.returncode == 3, result
    assert f"no control plane at {url}: start `comfyfleet serve` (or set COMFYFLEET_SERVER)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ pool, audit


def test_pool_lists_the_instance_as_json_and_as_a_table_with_how_to_reach_it(
    plane: ControlPlane,
) -> None:
    rental = _rent_booting(plane)
    _provider_facts(plane, rental.id)
    result = plane.cli("pool", "--json")
    assert result.returncode == 0, result
    view = json.loads(result.stdout)
    (shown,) = view["instances"]
    assert shown["id"] == rental.id and shown["state"] == "booting"
    assert view["burn_dollars_per_hour"] == pytest.approx(0.5)

    result = plane.cli("pool")
    assert result.returncode == 0, result
    assert re.search(rf"│\s+{rental.id} │ sdxl/0\s+│ booting", result.stdout), result.stdout
    wide = plane.cli("pool", "--wide")
    assert wide.returncode == 0, wide
    assert "status message" in wide.stdout and "public ip:ports" in wide.stdout
    assert "burn $0.500/h across 1 live instance" in result.stdout
    assert f"#{rental.id} ssh: ssh -p 10600 root@ssh5.vast.ai" in result.stdout
    assert f"#{rental.id} ComfyUI: http://203.0.113.9:41203" in result.stdout

    plane.store.run_sync(
        lambda session: transition(session, rental.id, S.DESTROYING, reason="t", actor="t", now=T0)
    )
    plane.store.run_sync(
        lambda session: transition(session, rental.id, S.DESTROYED, reason="t", actor="t", now=T0)
    )
    assert json.loads(plane.cli("pool", "--json").stdout)["instances"] == []
    every = json.loads(plane.cli("pool", "--json", "--all").stdout)["instances"]
    assert [i["state"] for i in every] == ["destroyed"]


def test_audit_prints_an_instances_transitions_from_the_store(plane: ControlPlane) -> None:
    rental = _rent_booting(plane)
    other = _rent_booting(plane)
    plane.report(rental, stage("provisioning"), stage("ready"))
    result = plane.cli("audit", "--instance", str(rental.id))
    assert result.returncode == 0, result
    for text in (
        "∅ → requested",
        "requested → creating",
        "creating → booting",
        "booting → provisioning",
        "provisioning → ready",
        "the agent reported ready",
        "2023-11-14T22:13:20+00:00",
    ):
        assert text in result.stdout, text
    rows = json.loads(plane.cli("audit", "--instance", str(rental.id), "--json").stdout)
    assert [(r["from_state"], r["to_state"]) for r in rows][-2:] == [
        ("booting", "provisioning"),
        ("provisioning", "ready"),
    ]
    assert {r["instance_id"] for r in rows} == {rental.id}
    assert rows[-1]["actor"] == "agent"
    newest = json.loads(plane.cli("audit", "--limit", "2", "--json").stdout)
    assert len(newest) == 2 and newest[-1]["to_state"] == "ready"
    assert other.id in {r["instance_id"] for r in json.loads(plane.cli("audit", "--json").stdout)}


# ------------------------------------------------------------------ the pure parts


def test_the_verdict_is_ready_failed_or_not_yet() -> None:
    def page(state: str, reason: str | None = None) -> InstanceEvents:
        return InstanceEvents(7, state, reason, None, 0, 0)

    assert verdict(page("downloading")) is None
    ready = verdict(page("ready"))
    assert ready is not None and ready.code == 0 and ready.message == "instance 7 is ready"
    failed = verdict(page("downloading", "hash_mismatch"))
    assert failed is not None and failed.code == 1 and "hash_mismatch" in failed.message
    gone = verdict(page("destroyed"))
    assert gone is not None and gone.code == 1


def test_the_tally_sums_up_the_download_with_an_eta_and_the_cost() -> None:
    tally = Tally()
    assert tally.add_progress(progress(2_000_000_000, 6_000_000_000)) == (
        "models/checkpoints/sdxl.safetensors"
    )
    assert tally.transfer() == "2.0 GB / 6.0 GB (33%) at 50.0 MB/s, ETA 1m20s"
    assert tally.money() == ""
    tally.cost_so_far, tally.dph_total = 0.0123, 0.5
    assert tally.money() == "$0.0123 so far at $0.500/h"


def test_the_plain_display_prints_progress_at_most_every_few_seconds() -> None:
    from rich.console import Console

    now = [0.0]
    out = Console(record=True, width=200, force_terminal=False)
    display = PlainDisplay(out, progress_every_s=5, clock=lambda: now[0])
    for done in range(0, 90, 10):
        display.progress(progress(done, 100))
        now[0] += 1
    display.progress(progress(100, 100))  # the end is always shown
    lines = [t for t in out.export_text().splitlines() if "download" in t]
    assert len(lines) == 3 and lines[-1].endswith("100 B / 100 B")


def test_the_server_url_comes_from_the_option_then_the_environment() -> None:
    assert server_url(None, {}) == "http://127.0.0.1:8700"
    assert server_url(None, {"COMFYFLEET_SERVER": "http://cp:9000/api/"}) == "http://cp:9000"
    assert server_url("cp:1", {"COMFYFLEET_SERVER": "http://x"}) == "http://cp:1"


# ------------------------------------------------------------------ helpers


def _rent_booting(plane: ControlPlane) -> Rental:
    """An instance prewarmed through the API, whose agent has registered."""
    answer = plane.http.post(
        "/api/admin/pool/prewarm",
        json={"profile": "sdxl", "count": 1},
        headers={"x-admin-key": ADMIN_KEY},
    )
    assert answer.status_code == 200, answer.text
    rental = plane.next_rental()
    plane.agent(rental, "POST", "register", json={"instance_id": rental.id, "hostname": "gpu"})
    return rental


def _provider_facts(plane: ControlPlane, instance_id: int) -> None:
    def work(session: Any) -> None:
        row = get_instance(session, instance_id)
        row.public_ip = "203.0.113.9"
        row.ports = {
            "1111/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41201"}],
            "8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41203"}],
        }
        row.ssh_host, row.ssh_port = "ssh5.vast.ai", 10600

    plane.store.run_sync(work)


def test_the_live_display_shows_a_bar_per_file_the_totals_and_the_log_above() -> None:
    import io

    from rich.console import Console

    from comfyfleet.commands.fleet import LiveDisplay

    out = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    display = LiveDisplay(out, 7)
    display.stage("downloading", None)
    display.log("fetching 2 models", "info")
    display.progress(progress(30_000_000, 100_000_000, file="models/vae/a.safetensors"))
    display.progress(progress(60_000_000, 100_000_000, file="models/loras/b.safetensors"))
    display.cost(0.25, 0.5)
    display.close()
    text = out.export_text()
    assert "stage downloading" in text and "fetching 2 models" in text
    assert "models/vae/a.safetensors" in text and "models/loras/b.safetensors" in text
    assert "60.0 MB / 100.0 MB (60%) at 50.0 MB/s" in text and "$0.2500 so far at $0.500/h" in text
    assert "instance 7 downloading" in text
