"""The agent dialling home: ``RemoteReporter`` and ``agent connect``, against the real API.

The control plane is ``create_app`` served by uvicorn on 127.0.0.1 over a store on
SQLite and on PostgreSQL (fixtures from ``tests/test_api.py``). ``agent connect``
runs as a real process, as the onstart starts it: it fetches a Civitai token from
the control plane to download from the file-server simulator, and starts the
ComfyUI simulator.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from comfyfleet.agent.remote import AgentAuthError, RemoteReporter
from comfyfleet.agent.report import Progress, Stage
from comfyfleet.api import AgentProfile, ComfySpec
from comfyfleet.clock import ManualClock, SystemClock
from comfyfleet.sim.files import FileServer, RunningFileServer
from comfyfleet.store import InstanceState, Store, audit_trail, get_instance, revoke_token
from tests.conftest import BIN, REPO
from tests.test_agent_run import SIM_COMMAND, comfy_sims_under
from tests.test_api import T0, Api, free_port, rent, serve_app, served

# The store fixtures of the API's tests: the same SQLite and PostgreSQL stores.

S = InstanceState
BOOT: tuple[Stage, ...] = ("provisioning", "downloading", "starting_app", "warming", "ready")


def agent_transitions(store: Store, instance_id: int) -> list[tuple[str, str]]:
    trail = store.run_sync(lambda session: audit_trail(session, instance_id))
    return [(str(a.from_state), str(a.to_state)) for a in trail if a.actor == "agent"]


@pytest.fixture
def slow_api(store: Store, tmp_path: Path) -> Iterator[Api]:
    """A control plane that takes 0.2 s to answer each batch of events."""
    yield from serve_app(store, tmp_path, slow_events_s=0.2)


async def test_stages_arrive_in_order_while_a_slow_control_plane_loses_only_progress(
    slow_api: Api,
) -> None:
    api = slow_api
    rental = rent(api.store, api.clock, state=S.BOOTING)
    remote = RemoteReporter(
        api.server.api_url,
        rental.token,
        rental.id,
        heartbeat_interval_s=60,
        clock=SystemClock(),
        max_buffer=40,
        flush_interval_s=0.02,
    )
    await remote.start()
    fed = {"progress": 0, "slowest": 0.0}

    def download_thread() -> None:
        # As the download engine does: a flood of progress from its own thread.
        for stage in BOOT:
            for i in range(300):
                started = time.perf_counter()
                remote.progress(Progress(done=i, total=300, file="models/a.bin", file_done=i))
                fed["slowest"] = max(fed["slowest"], time.perf_counter() - started)
                fed["progress"] += 1
                if i % 100 == 0:
                    remote.log(f"{stage}: {i}")
            remote.stage(stage)
            time.sleep(0.01)

    feeder = threading.Thread(target=download_thread)
    started = time.perf_counter()
    feeder.start()
    await asyncio.to_thread(feeder.join)
    fed_in = time.perf_counter() - started
    assert await remote.flush(within_s=30)
    await remote.aclose()

    # The caller never waited on the network: 1,500 events went in far faster than the
    # server took for a single batch.
    assert fed["slowest"] < 0.05 and fed_in < 2.0
    assert remote.dropped_progress > 0
    page = api.admin("GET", f"/api/instances/{rental.id}/events", params={"limit": 5000}).json()
    got = page["events"]
    assert [e["stage"] for e in got if e["kind"] == "stage"] == list(BOOT)
    received = sum(1 for e in got if e["kind"] == "progress")
    assert received + remote.dropped_progress == fed["progress"] == 1500
    assert remote.sent == len(got) and remote.rejected == 0
    assert agent_transitions(api.store, rental.id) == [
        ("booting", "provisioning"),
        ("provisioning", "downloading"),
        ("downloading", "starting_app"),
        ("starting_app", "warming"),
        ("warming", "ready"),
    ]


async def test_events_wait_for_a_control_plane_that_is_not_up_yet(
    sqlite_store: Store, tmp_path: Path
) -> None:
    rental = rent(sqlite_store, ManualClock(start=T0), state=S.BOOTING)
    port = free_port()
    remote = RemoteReporter(f"http://127.0.0.1:{port}/api/", rental.token, rental.id, max_buffer=5)
    for stage in BOOT:
        remote.stage(stage)
        for i in range(10):
            remote.progress(Progress(done=i, total=10))
    assert remote.pending == 5  # every stage kept, every progress event dropped
    assert remote.dropped_progress == 50
    await remote.start()
    await asyncio.sleep(0.3)  # a few refused connections
    assert remote.sent == 0 and remote.pending == 5

    with served(sqlite_store, tmp_path, port=port) as api:
        assert await remote.flush(within_s=20)
        assert agent_transitions(api.store, rental.id) == [
            ("booting", "provisioning"),
            ("provisioning", "downloading"),
            ("downloading", "starting_app"),
            ("starting_app", "warming"),
            ("warming", "ready"),
        ]
    await remote.aclose()


async def test_register_answers_the_profiles_manifest_and_secrets_and_heartbeats_follow(
    store: Store, tmp_path: Path
) -> None:
    settings = {
        "heartbeat_interval_s": 0.05,
        "civitai_token": SecretStr("civ-secret"),
        "profiles": {"sdxl": AgentProfile(manifest={"models": []}, comfy=ComfySpec(args=["--x"]))},
    }
    with served(store, tmp_path, settings=settings) as api:
        rental = rent(api.store, api.clock)
        async with RemoteReporter(
            api.server.api_url, rental.token, rental.id, heartbeat_interval_s=60
        ) as remote:
            registration = await remote.register(workspace="/ws", hostname="gpu-1")
            assert registration.manifest == {"models": []}
            assert registration.comfy == {"attach_url": None, "command": None, "args": ["--x"]}
            assert remote.heartbeat_interval_s == 0.05
            assert await remote.fetch_secrets() == {"CIVITAI_TOKEN": "civ-secret"}
            api.clock.advance(100)

            def last_heartbeat() -> float | None:
                return api.store.run_sync(
                    lambda session: get_instance(session, rental.id).last_heartbeat_at
                )

            deadline = time.monotonic() + 10
            while last_heartbeat() != T0 + 100 or remote.heartbeats_sent < 1:
                assert time.monotonic() < deadline, "no heartbeat arrived"
                await asyncio.sleep(0.02)
            assert remote.heartbeats_failed == 0
        row = api.store.run_sync(lambda session: get_instance(session, rental.id))
        assert row.state is S.BOOTING and row.registered_at == T0


async def test_a_revoked_token_stops_the_reporter_and_is_an_error_for_calls(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path) as api:
        rental = rent(api.store, api.clock, state=S.BOOTING)
        api.store.run_sync(lambda session: revoke_token(session, rental.id))
        remote = RemoteReporter(
            api.server.api_url, rental.token, rental.id, heartbeat_interval_s=60
        )
        await remote.start()
        remote.stage("provisioning")
        await remote.flush(within_s=5)
        assert remote.revoked and remote.sent == 0
        remote.stage("downloading")
        assert remote.pending == 0  # nothing is queued for a revoked instance
        with pytest.raises(AgentAuthError, match="refused this instance's token") as caught:
            await remote.register(workspace="/ws")
        assert rental.token not in str(caught.value)
        with pytest.raises(AgentAuthError):
            await remote.fetch_secrets()
        await remote.aclose()


# ------------------------------------------------------------------ agent connect


@pytest.fixture
def files() -> Iterator[RunningFileServer]:
    with RunningFileServer(FileServer()) as running:
        yield running


def test_agent_connect_registers_provisions_with_fetched_secrets_and_reports_to_ready(
    sqlite_store: Store,
    tmp_path: Path,
    files: RunningFileServer,
    clean_env: dict[str, str],
) -> None:
    civitai_token = "civitai-" + "t" * 24
    files.server.civitai_tokens.add(civitai_token)
    files.server.add_civitai_file(135867, "detail.safetensors", 256 * 1024)
    manifest: dict[str, Any] = {
        "comfyui": {"args": ["--disable-metadata"]},
        "models": [{"source": "civitai://135867", "dest": "loras"}],
    }
    settings = {
        "civitai_token": SecretStr(civitai_token),
        "profiles": {"sdxl": AgentProfile(manifest=manifest, comfy=ComfySpec(command=SIM_COMMAND))},
    }
    ws = tmp_path / "ws"
    with served(sqlite_store, tmp_path, settings=settings) as api:
        rental = rent(api.store, api.clock)
        env = {
            **clean_env,
            **files.env(),
            "COMFYFLEET_URL": api.server.api_url,
            "COMFYFLEET_TOKEN": rental.token,
            "DM_INSTANCE_ID": str(rental.id),
            "SERVER_TYPE": "sdxl",
            "WORKSPACE": str(ws),
            "COMFY_PORT": str(free_port()),
        }
        env.pop("CIVITAI_TOKEN", None)
        out, err = tmp_path / "connect.out", tmp_path / "connect.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [str(BIN / "comfyfleet"), "agent", "connect"],
                env=env,
                cwd=REPO,
                stdout=stdout,
                stderr=stderr,
            )
        try:
            deadline = time.monotonic() + 60
            while (
                api.store.run_sync(lambda session: get_instance(session, rental.id).state)
                is not S.READY
            ):
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
            assert agent_transitions(api.store, rental.id) == [
                ("creating", "booting"),
                ("booting", "provisioning"),
                ("provisioning", "downloading"),
                ("downloading", "starting_app"),
                ("starting_app", "ready"),
            ]
            # The Civitai token came from the control plane, not from the environment.
            assert (ws / "ComfyUI" / "models" / "loras" / "detail.safetensors").stat().st_size == (
                256 * 1024
            )
            assert (ws / "comfyfleet-manifest.yaml").is_file()
            (log_file,) = (api.settings.data_dir / "logs").glob(f"provision_{rental.id}_*.log")
            # The report's lines are kept once its moves are committed: the last ones may
            # reach the log a moment after the row says ready.
            text = log_file.read_text()
            while "STAGE ready" not in text and time.monotonic() < deadline + 10:
                time.sleep(0.05)
                text = log_file.read_text()
            assert "STAGE downloading" in text and "STAGE ready" in text
            assert "registered from" in text
            row = api.store.run_sync(lambda session: get_instance(session, rental.id))
            assert row.registered_at is not None and row.progress is not None
            assert proc.poll() is None  # supervising ComfyUI, heartbeating
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            for pid in comfy_sims_under(tmp_path):
                os.kill(pid, signal.SIGKILL)
        output = out.read_text() + err.read_text()
        assert code == 0, output
        assert "Stopped ComfyUI" in output and "ComfyUI is ready at http://127.0.0.1:" in output
        assert rental.token not in output and civitai_token not in output


def test_agent_connect_without_its_environment_says_what_is_missing(
    clean_env: dict[str, str],
) -> None:
    done = subprocess.run(
        [str(BIN / "comfyfleet"), "agent", "connect"],
        env={**clean_env, "COMFYFLEET_URL": "http://127.0.0.1:9/api", "DM_INSTANCE_ID": "3"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "COMFYFLEET_TOKEN" in done.stderr and "Traceback" not in done.stderr
