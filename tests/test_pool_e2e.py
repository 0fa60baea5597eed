"""The whole control plane end to end: rent → provision → READY → destroy, and every fault.

Nothing here is a double. ``sim/vast.py`` rents instances (its clock sped up x20)
and, when one reaches ``running``, runs its onstart script as a real process in a
temporary workspace: the real agent (``comfyfleet agent connect``) dials home to the
control plane built as ``comfyfleet serve`` builds it (``build_control_plane``:
reconcile loop, admin API, agent endpoints), downloads its models from
``sim/files.py`` and starts ``sim/comfy.py`` as its ComfyUI. Every test runs on
SQLite and on PostgreSQL.

The control plane runs on the real clock with its failure policy's limits cut to
seconds (``POLICY``), so that each fault ends in its documented outcome in a few
seconds: the instance destroyed, its machine blocklisted, a replacement ready, the
reason shown by the admin API.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from comfyfleet.api.server import RunningServer
from comfyfleet.api.settings import ApiSettings
from comfyfleet.clock import ScaledClock, SystemClock
from comfyfleet.controlplane import ControlPlane, build_control_plane
from comfyfleet.envvars import environ_set
from comfyfleet.lifecycle import InstanceState
from comfyfleet.pool.policy import PolicySettings
from comfyfleet.profiles import PoolPolicy, parse_fleet
from comfyfleet.providers.process import free_loopback_port
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.files import Fault, FileServer, RunningFileServer
from comfyfleet.sim.vast import RunningSim, SimConfig
from comfyfleet.store.db import Store
from comfyfleet.store.instances import audit_trail
from comfyfleet.store.models import BlockedMachineRow, InstanceRow
from tests.conftest import REPO

S = InstanceState
T = TypeVar("T")
ADMIN_KEY = "admin-" + "k" * 40
SIM_KEY = "sim-key-e2e"
MiB = 1024 * 1024
MODEL = "hf/acme/base/base.safetensors"
COMFY = [sys.executable, "-m", "comfyfleet.sim.comfy"]
# The failure policy with seconds where production has minutes.
POLICY = PolicySettings(
    bad_status_seconds=2.0,
    register_seconds=60.0,
    heartbeat_interval_seconds=1.0,
    missed_heartbeats=3,
    download_stall_seconds=6.0,
    crash_loop_count=3,
    crash_loop_window_seconds=120.0,
)
# Boot on the simulator: about 60 simulated seconds, 3 s of real time.
SIM_SPEED = 20.0
READY_WITHIN = 60.0


@dataclass
class Fleet:
    """One control plane with its pool, over the simulators."""

    store: Store
    sim: RunningSim
    files: RunningFileServer
    server: RunningServer
    plane: ControlPlane
    data_dir: Path

    def rows(self) -> list[InstanceRow]:
        return self.store.run_sync(
            lambda s: list(s.execute(select(InstanceRow).order_by(InstanceRow.id)).scalars())
        )

    def row(self, instance_id: int) -> InstanceRow:
        return next(r for r in self.rows() if r.id == instance_id)

    def blocked(self) -> list[BlockedMachineRow]:
        return self.store.run_sync(lambda s: list(s.execute(select(BlockedMachineRow)).scalars()))

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, self.server.url + path, headers={"x-admin-key": ADMIN_KEY}, timeout=30, **kw
        )

    def pool(self, include_ended: bool = False) -> dict[str, Any]:
        answer = self.admin("GET", "/api/admin/pool", params={"include_ended": include_ended})
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()
        return data

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = READY_WITHIN) -> T:
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                states = [(r.id, r.state.value, r.failure_reason) for r in self.rows()]
                pytest.fail(f"timed out waiting for {what}; instances: {states}")
            time.sleep(0.1)

    def wait_state(
        self, instance_id: int, *states: S, timeout: float = READY_WITHIN
    ) -> InstanceRow:
        def reached() -> InstanceRow | None:
            row = self.row(instance_id)
            return row if row.state in states else None

        return self.wait(
            f"instance {instance_id} to reach {', '.join(s.value for s in states)}",
            reached,
            timeout,
        )

    def agent_pids(self) -> list[int]:
        """The agents this machine runs for the simulator's instances (``agent connect``)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if b"connect" in cmdline and str(self.sim.sim.workspace_root).encode() in environ:
                pids.append(int(entry.name))
        return pids


# The warm-up: a tiny text-to-image run on the downloaded checkpoint.
WARMUP: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["1", 0],
            "seed": 1,
            "steps": 2,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["4", 0],
            "denoise": 1.0,
        },
    },
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "warm"}},
}


def write_manifest(folder: Path) -> Path:
    """A manifest with a model and a warm-up workflow in a file beside it (the control
    plane inlines it: the agent runs elsewhere)."""
    (folder / "warm.json").write_text(json.dumps(WARMUP))
    path = folder / "manifest.yaml"
    data = {
        "comfyui": {"args": ["--disable-metadata"]},
        "models": [
            {"source": "hf://acme/base/base.safetensors", "dest": "checkpoints", "critical": True}
        ],
        "workflows": [{"file": "warm.json"}],
        "warmup_workflow": "warm.json",
    }
    path.write_text(json.dumps(data))
    return path


def fleet_yaml(
    manifest: Path,
    comfy: list[str],
    *,
    min_ready: int,
    max_instances: int,
    extra: dict[str, Any] | None = None,
) -> str:
    profile: dict[str, Any] = {
        "gpu_names": [],
        "min_vram_gb": 8,
        "min_cuda": 0,
        "disk_gb": 40,
        "max_price": None,
        "min_reliability": 0.0,
        "verified_only": False,
        "min_direct_ports": 0,
        "manifest": str(manifest),
        "comfy_command": comfy,
        "pool": {
            "min_ready": min_ready,
            "max_instances": max_instances,
            "idle_ttl_seconds": 3600,
        },
        **(extra or {}),
    }
    return json.dumps({"profiles": {"sdxl": profile}})


@contextmanager
def running_fleet(
    store: Store,
    tmp_path: Path,
    *,
    min_ready: int = 0,
    max_instances: int = 2,
    comfy: list[str] = COMFY,
    policy: PolicySettings = POLICY,
    profile: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
) -> Iterator[Fleet]:
    """The fleet over the simulators; ``api``: more ``ApiSettings`` fields (for the jobs:
    ``job_lease_ttl_s``, ``max_jobs_per_instance``...)."""
    with RunningFileServer(FileServer()) as files:
        files.server.add_hf_file("acme/base", "base.safetensors", 2 * MiB)
        workspaces = tmp_path / "instances"
        config = SimConfig(
            seed=5,
            offers=300,
            api_key=SIM_KEY,
            credit=50.0,
            run_onstart=True,
            host_env={**files.env(), "COMFY_PORT": "0", "PYTHONPATH": str(REPO / "src")},
            workspace_root=workspaces,
        )
        with RunningSim(config, clock=ScaledClock(SIM_SPEED)) as sim:
            port = free_loopback_port()
            manifest = write_manifest(tmp_path)
            fleet = parse_fleet(
                fleet_yaml(
                    manifest,
                    comfy,
                    min_ready=min_ready,
                    max_instances=max_instances,
                    extra=profile,
                )
            )
            data_dir = tmp_path / "data"
            settings = ApiSettings(
                admin_api_key=SecretStr(ADMIN_KEY),
                heartbeat_interval_s=1.0,
                data_dir=data_dir,
                **(api or {}),
            )

            def provider(name: str) -> VastClient:
                assert name == "vast"
                return VastClient(SIM_KEY, sim.url)

            # The control plane sizes the manifest from the file server.
            with environ_set(files.env()):
                plane = asyncio.run(
                    build_control_plane(
                        store,
                        fleet=fleet,
                        control_url=f"http://127.0.0.1:{port}/api",
                        clock=SystemClock(),
                        api_settings=settings,
                        reconciler={
                            "fleet_id": "e2e",
                            "interval_s": 0.25,
                            "lease_ttl_s": 10.0,
                            "policy": policy,
                        },
                        providers=provider,
                    )
                )
            with RunningServer(plane.app, port=port) as server:
                yield Fleet(store, sim, files, server, plane, data_dir)


def transitions(store: Store, instance_id: int) -> list[tuple[str, str]]:
    rows = store.run_sync(lambda s: audit_trail(s, instance_id))
    return [(r.from_state or "", r.to_state) for r in rows]


# ------------------------------------------------------------------ the flow


def test_rent_provision_ready_then_destroy_on_the_simulator(store: Store, tmp_path: Path) -> None:
    with running_fleet(store, tmp_path) as fleet:
        # The manifest's real size (2 MiB from the file server) replaced the placeholder.
        assert fleet.plane.profiles["sdxl"].download_bytes == 2 * MiB

        answer = fleet.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl"})
        assert answer.status_code == 200, answer.text
        (instance_id,) = answer.json()["instance_ids"]

        ready = fleet.wait_state(instance_id, S.READY, S.FAILED, S.DESTROYED)
        assert ready.state is S.READY, ready.failure_reason
        assert [to for _, to in transitions(store, instance_id)] == [
            "requested",
            "creating",
            "booting",
            "provisioning",
            "downloading",
            "starting_app",
            "warming",
            "ready",
        ]
        contract = ready.provider_contract_id
        assert contract is not None
        workspace = fleet.sim.sim.workspace_root / str(contract)
        model = workspace / "ComfyUI" / "models" / "checkpoints" / "base.safetensors"
        assert model.stat().st_size == 2 * MiB
        (log,) = (fleet.data_dir / "logs").glob(f"provision_{instance_id}_*.log")
        # A report's lines are kept once its moves are committed: a moment after the row.
        fleet.wait(
            "STAGE ready in the provision log", lambda: "STAGE ready" in log.read_text() or None, 10
        )

        view = next(i for i in fleet.pool()["instances"] if i["id"] == instance_id)
        assert view["state"] == "ready" and view["actual_status"] == "running"
        assert view["heartbeat_age_s"] is not None and view["heartbeat_age_s"] < 5
        assert view["dph_total"] > 0
        metrics = httpx.get(fleet.server.url + "/metrics", timeout=10).text
        assert re.search(r'^comfyfleet_instances\{[^}]*state="ready"[^}]*\} 1\.0$', metrics, re.M)
        assert 'comfyfleet_prewarm_attempts_total{profile="sdxl"} 1.0' in metrics
        assert 'comfyfleet_time_to_ready_seconds_count{profile="sdxl"} 1.0' in metrics
        assert len(fleet.agent_pids()) == 1

        done = fleet.admin(
            "POST", f"/api/admin/instances/{instance_id}/terminate", json={"reason": "test over"}
        )
        assert done.status_code == 200, done.text
        gone = fleet.wait_state(instance_id, S.DESTROYED, timeout=30)
        assert gone.ended_at is not None
        assert transitions(store, instance_id)[-2:] == [
            ("ready", "destroying"),
            ("destroying", "destroyed"),
        ]
        fleet.wait("the agent to stop", lambda: not fleet.agent_pids() or None, 15)
        assert not fleet.sim.sim.state()["instances"][0]["exists"]
        # min_ready is 0: nothing is rented in its place.
        time.sleep(1.0)
        assert [r.id for r in fleet.rows()] == [instance_id]


# ------------------------------------------------------------------ faults


def _arm(fleet: Fleet, case: str) -> Callable[[Fleet, int], None] | None:
    """Arm the fault before the first rental; return what to do once it is running."""
    if case in ("no_space", "load_failed", "vanish"):
        fleet.sim.sim.set_faults({"next_instances": [case]})
        return None
    if case == "model_missing":
        fleet.files.server.inject(MODEL, Fault("status", status=404), count=10_000)
        return None
    if case == "download_stalled":
        fleet.files.server.inject(
            MODEL, Fault("stall", after_bytes=1000, stall_s=600), count=10_000
        )
        return None
    if case == "comfy_crash_loop":
        return None  # the ComfyUI command crashes on the first instance (crashing_once)
    if case == "agent_killed":

        def kill(fleet: Fleet, instance_id: int) -> None:
            fleet.wait_state(instance_id, S.READY)
            for pid in fleet.agent_pids():
                os.kill(pid, signal.SIGKILL)

        return kill
    raise AssertionError(case)


FAULTS = {
    "no_space": "no_space",
    "load_failed": "load_failed",
    "vanish": "provider_offline",
    "model_missing": "agent_failed",
    "download_stalled": "download_stalled",
    "agent_killed": "heartbeat_lost",
    "comfy_crash_loop": "comfy_crash_loop",
}


def crashing_once(tmp_path: Path) -> list[str]:
    """A ComfyUI that dies as it starts, every time, on the first instance only (so that
    its replacement comes up): a crash loop before any warm-up can run."""
    script = tmp_path / "comfy-crashing-once.sh"
    marks = tmp_path / "crash-marks"
    script.write_text(
        "#!/bin/bash\n"
        f'mkdir -p "{marks}"\n'
        f'if mkdir "{marks}/first" 2>/dev/null; then echo "$WORKSPACE" > "{marks}/first/ws"; fi\n'
        f'if [ "$(cat "{marks}/first/ws")" = "$WORKSPACE" ]; then\n'
        '  echo "RuntimeError: CUDA error: an illegal memory access was encountered" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {sys.executable} -m comfyfleet.sim.comfy "$@"\n'
    )
    script.chmod(0o755)
    return [str(script)]


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_each_fault_ends_destroyed_blocklisted_and_replaced_with_its_reason(
    store: Store, tmp_path: Path, case: str
) -> None:
    comfy = crashing_once(tmp_path) if case == "comfy_crash_loop" else COMFY
    with running_fleet(store, tmp_path, min_ready=1, max_instances=1, comfy=comfy) as fleet:
        after_running = _arm(fleet, case)
        first = fleet.wait("the first rental", lambda: fleet.rows() or None)[0].id
        if after_running is not None:
            after_running(fleet, first)
        failed = fleet.wait_state(first, S.FAILED, S.DESTROYED, timeout=90)
        assert failed.state is S.FAILED
        assert failed.failure_reason is not None and FAULTS[case] in failed.failure_reason
        fleet.files.server.clear_faults()

        # The machine is blocklisted with the reason, for 24 hours by default.
        (block,) = [b for b in fleet.blocked() if b.machine_id == failed.machine_id]
        assert FAULTS[case] in block.reason
        # Only after the destroy was confirmed did the slot rent again.
        replacement = fleet.wait(
            "a replacement", lambda: [r for r in fleet.rows() if r.id != first] or None
        )[0]
        assert replacement.created_at >= failed.ended_at
        assert replacement.machine_id != failed.machine_id or replacement.machine_id is None
        ready = fleet.wait_state(replacement.id, S.READY, S.FAILED)
        assert ready.state is S.READY, ready.failure_reason
        assert ready.machine_id != failed.machine_id
        # The reason is shown by the admin API.
        ended = {i["id"]: i for i in fleet.pool(include_ended=True)["instances"]}
        assert FAULTS[case] in (ended[first]["failure_reason"] or "")
        contracts = [i for i in fleet.sim.sim.state()["instances"] if i["exists"]]
        assert len(contracts) == 1  # never two paid instances for the one slot


@pytest.mark.parametrize("required", [False, True])
def test_unmapped_ports_fail_only_a_profile_that_requires_them(
    store: Store, tmp_path: Path, required: bool
) -> None:
    """The agent dials home, so an offer whose ports are not mapped (direct_port_start -1)
    serves as well as any; a profile with ``require_direct_ports`` fails it at the
    registration deadline instead."""
    import dataclasses

    policy = dataclasses.replace(POLICY, register_seconds=8.0)
    with running_fleet(
        store,
        tmp_path,
        policy=policy,
        profile={"require_direct_ports": required},
    ) as fleet:
        fleet.sim.sim.set_faults({"next_instances": ["no_ports"]})
        answer = fleet.admin("POST", "/api/admin/pool/prewarm", json={"profile": "sdxl"})
        (instance_id,) = answer.json()["instance_ids"]
        if not required:
            ended = fleet.wait_state(instance_id, S.READY, S.FAILED, timeout=READY_WITHIN)
            assert ended.state is S.READY, ended.failure_reason
            assert ended.ports in (None, {})
            time.sleep(policy.register_seconds)  # past the deadline: still fine
            assert fleet.row(instance_id).state is S.READY
        else:
            # It may reach ready first: the rule fires at the registration deadline.
            ended = fleet.wait_state(instance_id, S.FAILED, S.DESTROYED, timeout=READY_WITHIN)
            assert ended.state is S.FAILED
            assert (ended.failure_reason or "").startswith("ports_unmapped"), ended.failure_reason
            assert [b.machine_id for b in fleet.blocked()] == [ended.machine_id]


# ------------------------------------------------------------------ the local provider


@pytest.mark.parametrize("comfy", ["started", "attached"])
def test_a_local_profile_runs_the_agent_here_to_ready_and_stops_it(
    store: Store, tmp_path: Path, comfy: str
) -> None:
    """``provider: local`` rents this machine: the agent runs as a local process in its own
    workspace, with a ComfyUI it starts, or one already running that it attaches to."""
    import subprocess

    from comfyfleet.providers.local import LocalProvider

    own: subprocess.Popen[bytes] | None = None
    own_workspace: Path | None = None
    profile: dict[str, Any] = {
        "provider": "local",
        "min_vram_gb": 0,
        "min_cuda": 0,
        "disk_gb": 8,
        "max_price": None,
        "min_direct_ports": 0,
        "manifest": str(write_manifest(tmp_path)),
        "pool": {"min_ready": 1, "max_instances": 1},
    }
    if comfy == "attached":
        port = free_loopback_port()
        # The user's own ComfyUI, installed in a folder of theirs, which the instance
        # provisions (COMFYFLEET_LOCAL_WORKSPACE): its warm-up finds the model there.
        own_workspace = tmp_path / "mine"
        base = own_workspace / "ComfyUI"
        (base / "models" / "checkpoints").mkdir(parents=True)
        own = subprocess.Popen(
            [*COMFY, "--port", str(port), "--base-directory", str(base)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        profile["comfy_url"] = f"http://127.0.0.1:{port}"
    else:
        profile["comfy_command"] = COMFY
    try:
        with RunningFileServer(FileServer()) as files:
            files.server.add_hf_file("acme/base", "base.safetensors", 2 * MiB)
            root = tmp_path / "local"
            provider = LocalProvider(
                root, host_env=files.env(), stop_grace_s=3.0, workspace=own_workspace
            )
            port = free_loopback_port()
            data_dir = tmp_path / "data"
            with environ_set(files.env()):
                plane = asyncio.run(
                    build_control_plane(
                        store,
                        fleet=parse_fleet(json.dumps({"profiles": {"mine": profile}})),
                        control_url=f"http://127.0.0.1:{port}/api",
                        clock=SystemClock(),
                        api_settings=ApiSettings(
                            admin_api_key=SecretStr(ADMIN_KEY),
                            heartbeat_interval_s=1.0,
                            data_dir=data_dir,
                        ),
                        reconciler={"fleet_id": "here", "interval_s": 0.25, "policy": POLICY},
                        providers=lambda name: provider,
                    )
                )
            with RunningServer(plane.app, port=port) as server:
                headers = {"x-admin-key": ADMIN_KEY}

                def rows() -> list[InstanceRow]:
                    return store.run_sync(lambda s: list(s.execute(select(InstanceRow)).scalars()))

                deadline = time.monotonic() + READY_WITHIN
                while not any(r.state is S.READY for r in rows()):
                    assert time.monotonic() < deadline, [
                        (r.id, r.state, r.failure_reason) for r in rows()
                    ]
                    assert not any(r.state is S.FAILED for r in rows()), rows()[0].failure_reason
                    time.sleep(0.1)
                (row,) = rows()
                assert row.provider == "local" and row.dph_total == 0.0
                contract = row.provider_contract_id
                log = (root / f"{contract}.log").read_text()
                if comfy == "attached":
                    assert "attach" in log.lower() and profile["comfy_url"] in log, log
                else:
                    assert "started ComfyUI" in log, log
                workspace = own_workspace or root / str(contract)
                model = workspace / "ComfyUI" / "models" / "checkpoints"
                assert (model / "base.safetensors").stat().st_size == 2 * MiB

                plane.pool.update_profiles(  # type: ignore[union-attr]
                    {
                        "mine": plane.profiles["mine"].model_copy(
                            update={"pool": PoolPolicy(min_ready=0, max_instances=1)}
                        )
                    }
                )
                answer = httpx.post(
                    f"{server.url}/api/admin/instances/{row.id}/terminate",
                    headers=headers,
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
                deadline = time.monotonic() + 30
                while rows()[0].state is not S.DESTROYED:
                    assert time.monotonic() < deadline, rows()[0].state
                    time.sleep(0.1)
                # A rented folder goes with its instance; the user's own folder stays.
                assert workspace.exists() is (own_workspace is not None)
        if own is not None:
            assert own.poll() is None  # an attached ComfyUI is never stopped
    finally:
        if own is not None:
            own.terminate()
            own.wait(10)


# ------------------------------------------------------------------ two serve processes


def test_two_serve_processes_on_postgresql_rent_once_per_slot_and_take_over(
    pg_url: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """Two ``comfyfleet serve`` on one PostgreSQL: one leads (the database lease), the pool
    is rented once per slot; killed, the leader is replaced by the other, which keeps the
    pool whole, still once per slot."""
    import subprocess

    from comfyfleet.store.leases import RECONCILER_LEASE
    from comfyfleet.store.models import LeaseRow
    from tests.conftest import BIN

    fleet_file = tmp_path / "fleet.yaml"
    profile = json.loads(fleet_yaml(write_manifest(tmp_path), COMFY, min_ready=3, max_instances=3))
    del profile["profiles"]["sdxl"]["manifest"]  # nothing to size: no agent runs here
    fleet_file.write_text(json.dumps(profile))
    store = Store.open(pg_url, migrate=False)
    with RunningSim(SimConfig(seed=4, offers=300, api_key=SIM_KEY)) as sim:
        servers: list[tuple[subprocess.Popen[bytes], str]] = []
        try:
            for n in range(2):
                port = free_loopback_port()
                env = {
                    **clean_env,
                    "DATABASE_URL": pg_url,
                    "VAST_URL": sim.url,
                    "VAST_API_KEY": SIM_KEY,
                    "ADMIN_API_KEY": ADMIN_KEY,
                    "COMFYFLEET_DATA_DIR": str(tmp_path / f"data{n}"),
                    "COMFYFLEET_RECONCILE_INTERVAL_S": "0.2",
                    "COMFYFLEET_LEASE_TTL_S": "3",
                }
                log = (tmp_path / f"serve{n}.log").open("wb")
                proc = subprocess.Popen(
                    [str(BIN / "comfyfleet"), "serve", "-c", str(fleet_file), "--port", str(port)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                servers.append((proc, f"http://127.0.0.1:{port}"))

            def live_contracts() -> list[dict[str, Any]]:
                return [i for i in sim.sim.state()["instances"] if i["exists"]]

            def live_rows() -> list[InstanceRow]:
                return [
                    r
                    for r in store.run_sync(
                        lambda s: list(s.execute(select(InstanceRow)).scalars())
                    )
                    if r.state not in (S.DESTROYED, S.FAILED)
                ]

            deadline = time.monotonic() + 60
            while len(live_contracts()) < 3:
                assert time.monotonic() < deadline, (tmp_path / "serve0.log").read_text()
                time.sleep(0.2)
            time.sleep(2.0)  # passes of both processes: nothing more is rented
            assert len(live_contracts()) == 3
            assert sorted(r.slot for r in live_rows()) == [0, 1, 2]

            holder = store.run_sync(lambda s: s.get(LeaseRow, RECONCILER_LEASE).holder)
            leader = next(p for p, _ in servers if f":{p.pid}:" in holder)
            survivor_url = next(u for p, u in servers if p is not leader)
            leader.kill()
            leader.wait(10)

            victim = live_rows()[0]
            answer = httpx.post(
                f"{survivor_url}/api/admin/instances/{victim.id}/terminate",
                headers={"x-admin-key": ADMIN_KEY},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            deadline = time.monotonic() + 60
            while not (len(live_rows()) == 3 and all(r.id != victim.id for r in live_rows())):
                assert time.monotonic() < deadline, [(r.id, r.state) for r in live_rows()]
                assert len(live_contracts()) <= 3
                time.sleep(0.2)
            time.sleep(1.0)
            assert len(live_contracts()) == 3
            assert sorted(r.slot for r in live_rows()) == [0, 1, 2]
            taken = store.run_sync(lambda s: s.get(LeaseRow, RECONCILER_LEASE).holder)
            assert f":{leader.pid}:" not in taken
        finally:
            for proc, _ in servers:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
            store.close()
