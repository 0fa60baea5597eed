"""The Vast.ai simulator runs an instance's onstart as a real local process tree.

Instances are rented with comfyfleet's own ``VastClient`` over loopback HTTP; their
onstart is a small bash script that records what it sees in ``$WORKSPACE`` and starts
two children, one in a session of its own as the agent starts ComfyUI. The simulator's
clock runs 50 times faster than real time: an instance boots in 60 simulated seconds,
1.2 real ones.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from comfyfleet.agent.bootstrap import instance_env, onstart_script
from comfyfleet.agent.comfy import pid_alive
from comfyfleet.api import AgentProfile, ComfySpec
from comfyfleet.clock import ScaledClock
from comfyfleet.providers.base import CreateRequest
from comfyfleet.providers.process import MARK_VAR
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.vast import RunningSim, SimConfig
from comfyfleet.store import InstanceState, Store, get_instance
from tests import test_api
from tests.test_agent_run import SIM_COMMAND, comfy_sims_under
from tests.test_api import served

SPEED = 50.0
HOST_ENV = {"HF_ENDPOINT": "http://127.0.0.1:9/hf", "HOST_ONLY": "from-the-host"}
INSTANCE_ENV = {
    "COMFYFLEET_URL": "http://127.0.0.1:9/api",
    "COMFYFLEET_TOKEN": "cft_not-a-real-token",
    "DM_INSTANCE_ID": "7",
    "SERVER_TYPE": "sdxl",
    "WORKSPACE": "/workspace",
}
# Records its environment, then starts a child and an escaped child (own session, as
# the agent starts ComfyUI), and waits.
ONSTART = """\
echo "onstart: hello from $$"
echo $$ > "$WORKSPACE/onstart.pid"
env > "$WORKSPACE/env.txt"
pwd > "$WORKSPACE/cwd.txt"
sleep 300 &
echo $! > "$WORKSPACE/child.pid"
"$COMFYFLEET_AGENT_PYTHON" -c 'import subprocess; p = subprocess.Popen(["sleep", "301"], \
start_new_session=True); open("escaped.pid", "w").write(str(p.pid))'
echo started > "$WORKSPACE/ready"
wait
"""


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSim]:
    # Secrets of the simulator's own environment that no instance may see.
    monkeypatch.setenv("VAST_API_KEY", "vast-key-of-the-test")
    monkeypatch.setenv("ADMIN_API_KEY", "admin-key-of-the-test")
    config = SimConfig(
        seed=5,
        offers=80,
        jitter=0.0,
        run_onstart=True,
        host_env=dict(HOST_ENV),
        workspace_root=tmp_path / "instances",
        restart_s=15.0,
        vanish_after_s=30.0,
        log_not_ready_polls=0,
        onstart_grace_s=2.0,
    )
    with RunningSim(config, clock=ScaledClock(SPEED)) as running:
        yield running


@pytest.fixture
async def vast(sim: RunningSim) -> AsyncIterator[VastClient]:
    async with VastClient("any-key", sim.url, log_poll_interval=0.01) as client:
        yield client


async def rent(vast: VastClient, script: str = ONSTART) -> int:
    offers = await vast.search_offers(
        {"direct_port_count": {"gte": 1}}, allocated_storage_gb=10, limit=1
    )
    request = CreateRequest(
        image="vastai/comfyui:@vastai-automatic-tag",
        disk_gb=10,
        label="comfyfleet-sdxl-onstart",
        env=INSTANCE_ENV,
        onstart=script,
    )
    return await vast.create_instance(offers[0].id, request)


async def wait_for(what: Callable[[], bool], within_s: float = 8.0) -> None:
    deadline = time.monotonic() + within_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def hellos(logs: str) -> list[str]:
    """The script's own greetings (the log also shows the script's text)."""
    return re.findall(r"^onstart: hello from \d+$", logs, flags=re.MULTILINE)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def pids(workspace: Path) -> list[int]:
    """The script's pid, its child's and its escaped child's."""
    return [
        int((workspace / f"{name}.pid").read_text()) for name in ("onstart", "child", "escaped")
    ]


async def test_the_onstart_runs_once_running_with_the_instance_env_and_its_own_workspace(
    sim: RunningSim, vast: VastClient
) -> None:
    contract = await rent(vast)
    workspace = sim.sim.workspace_of(contract)
    statuses: list[str | None] = []
    deadline = time.monotonic() + 8
    while not (workspace / "ready").exists():
        started = (workspace / "onstart.pid").exists()
        status = (await vast.get_instance(contract)).actual_status
        statuses.append(status)
        # A script that has started belongs to a running instance, never an earlier one.
        assert status == "running" or not started
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert {None, "created", "loading"} & set(statuses), "never saw the instance boot"

    env = read_env(workspace / "env.txt")
    assert env["WORKSPACE"] == str(workspace)
    assert (workspace / "cwd.txt").read_text().strip() == str(workspace)
    assert env["COMFYFLEET_AGENT_PYTHON"] == sys.executable
    assert env["HOST_ONLY"] == "from-the-host" and env["HF_ENDPOINT"] == HOST_ENV["HF_ENDPOINT"]
    for key in ("COMFYFLEET_URL", "COMFYFLEET_TOKEN", "DM_INSTANCE_ID", "SERVER_TYPE"):
        assert env[key] == INSTANCE_ENV[key]
    assert env["COMFY_PORT"].isdigit() and MARK_VAR in env
    assert "VAST_API_KEY" not in env and "ADMIN_API_KEY" not in env
    # The instance still shows the environment it was created with.
    assert (await vast.get_instance(contract)).env()["WORKSPACE"] == "/workspace"

    onstart_pid = int((workspace / "onstart.pid").read_text())
    logs = await vast.instance_logs(contract)
    assert hellos(logs) == [f"onstart: hello from {onstart_pid}"]
    assert f"WORKSPACE is {workspace} on this machine (the instance asked for /workspace)" in logs
    assert logs.index("Starting container") < logs.index(hellos(logs)[0])
    last = await vast.instance_logs(contract, tail=1)
    assert last.strip() == f"onstart: hello from {onstart_pid}"

    tree = pids(workspace)
    assert all(pid_alive(pid) for pid in tree)
    await vast.destroy_instance(contract)
    # At once: SIGTERM went out during the DELETE, and all of them obey it.
    await wait_for(lambda: not any(pid_alive(pid) for pid in tree), within_s=1.5)


async def test_an_instance_that_never_runs_never_runs_its_onstart(
    sim: RunningSim, vast: VastClient
) -> None:
    sim.sim.set_faults({"next_instances": ["no_space", "load_failed"]})
    no_space, load_failed = await rent(vast), await rent(vast)
    healthy = await rent(vast)
    await wait_for(lambda: (sim.sim.workspace_of(healthy) / "ready").exists())
    await asyncio.sleep(0.3)  # several more rounds of the watcher
    assert (await vast.get_instance(no_space)).actual_status == "loading"
    assert (await vast.get_instance(load_failed)).actual_status == "load_failed"
    processes = sim.sim.processes
    assert processes is not None
    for contract in (no_space, load_failed):
        assert processes.pid(contract) is None
        assert not (sim.sim.workspace_of(contract) / "onstart.pid").exists()
        assert "comfyfleet runs the onstart" not in await vast.instance_logs(contract)
    assert processes.keys() == [healthy]


async def test_a_stop_kills_the_onstart_and_a_start_runs_it_again(
    sim: RunningSim, vast: VastClient
) -> None:
    contract = await rent(vast)
    workspace = sim.sim.workspace_of(contract)
    await wait_for(lambda: (workspace / "ready").exists())
    first = pids(workspace)
    (workspace / "ready").unlink()

    await vast.stop_instance(contract)
    await wait_for(lambda: not any(pid_alive(pid) for pid in first), within_s=1.5)
    assert (await vast.get_instance(contract)).actual_status == "stopped"
    await asyncio.sleep(0.2)
    assert not (workspace / "ready").exists()  # not while stopped

    await vast.start_instance(contract)
    await wait_for(lambda: (workspace / "ready").exists())
    second = pids(workspace)
    assert set(second).isdisjoint(first) and all(pid_alive(pid) for pid in second)
    logs = await vast.instance_logs(contract)
    assert len(hellos(logs)) == 2
    await vast.destroy_instance(contract)
    await wait_for(lambda: not any(pid_alive(pid) for pid in second), within_s=1.5)


async def test_a_host_that_goes_offline_takes_the_onstart_with_it(
    sim: RunningSim, vast: VastClient
) -> None:
    sim.sim.set_faults({"next_instances": ["vanish"]})
    contract = await rent(vast)
    workspace = sim.sim.workspace_of(contract)
    await wait_for(lambda: (workspace / "ready").exists())
    tree = pids(workspace)
    # vanish_after_s = 30 simulated seconds: 0.6 real ones after running.
    await wait_for(lambda: not any(pid_alive(pid) for pid in tree), within_s=3.0)
    assert (await vast.get_instance(contract)).actual_status == "offline"


async def test_leaving_the_simulator_kills_every_onstart_and_removes_its_temporary_root() -> None:
    config = SimConfig(seed=5, offers=40, jitter=0.0, run_onstart=True, onstart_grace_s=1.0)
    with RunningSim(config, clock=ScaledClock(SPEED)) as running:
        sim = running.sim
        offer = next(o for o in sim.offers if o["rentable"] and o["disk_space"] >= 10)
        body = {"image": "img", "disk": 10, "env": {}, "onstart": ONSTART}
        contract = sim.create_instance(offer["id"], body)["new_contract"]
        root = sim.workspace_root
        workspace = sim.workspace_of(contract)
        await wait_for(lambda: (workspace / "ready").exists())
        tree = pids(workspace)
    assert not any(pid_alive(pid) for pid in tree)
    assert not root.exists()


async def test_without_run_onstart_nothing_runs(tmp_path: Path) -> None:
    config = SimConfig(seed=5, offers=40, jitter=0.0, workspace_root=tmp_path / "instances")
    with RunningSim(config, clock=ScaledClock(SPEED * 10)) as running:
        sim = running.sim
        offer = next(o for o in sim.offers if o["rentable"] and o["disk_space"] >= 10)
        body = {"image": "img", "disk": 10, "env": {}, "onstart": ONSTART}
        contract = sim.create_instance(offer["id"], body)["new_contract"]

        def running_now() -> bool:
            return (sim.instance_json(contract) or {}).get("actual_status") == "running"

        await wait_for(running_now)
        await asyncio.sleep(0.2)
        assert sim.processes is None
    assert not (tmp_path / "instances").exists()


# ------------------------------------------------------------------ the real agent

# The store and control-plane fixtures of the API's tests.


async def test_the_real_agent_reaches_ready_from_the_onstart_and_destroy_kills_its_comfyui(
    sqlite_store: Store, tmp_path: Path
) -> None:
    settings = {
        "profiles": {"sdxl": AgentProfile(manifest={}, comfy=ComfySpec(command=SIM_COMMAND))}
    }
    config = SimConfig(
        seed=5,
        offers=40,
        jitter=0.0,
        run_onstart=True,
        workspace_root=tmp_path / "instances",
        onstart_grace_s=3.0,
        log_not_ready_polls=0,
    )
    with (
        served(sqlite_store, tmp_path, settings=settings) as api,
        RunningSim(config, clock=ScaledClock(SPEED * 4)) as sim,
    ):
        rental = test_api.rent(api.store, api.clock)
        request = CreateRequest(
            image="vastai/comfyui:@vastai-automatic-tag",
            disk_gb=10,
            label="comfyfleet-sdxl-agent",
            env=instance_env(
                control_url=api.server.api_url,
                token=rental.token,
                instance_id=rental.id,
                profile="sdxl",
            ),
            # The image would ship ComfyUI's folder; the agent starts ComfyUI in it.
            onstart='mkdir -p "$WORKSPACE/ComfyUI"\n' + onstart_script(),
        )
        async with VastClient("any-key", sim.url, log_poll_interval=0.01) as vast:
            offer = (await vast.search_offers({}, allocated_storage_gb=10, limit=1))[0]
            contract = await vast.create_instance(offer.id, request)
            workspace = sim.sim.workspace_of(contract)

            def state() -> InstanceState:
                return api.store.run_sync(lambda session: get_instance(session, rental.id).state)

            processes = sim.sim.processes
            assert processes is not None
            deadline = time.monotonic() + 30
            while state() is not InstanceState.READY:
                ended = processes.exit_code(contract) is not None
                assert not ended and time.monotonic() < deadline, processes.log_tail(contract)
                await asyncio.sleep(0.05)
            comfys = comfy_sims_under(workspace)
            assert comfys, await vast.instance_logs(contract)
            agent = processes.pid(contract)
            assert agent is not None and pid_alive(agent)
            assert "ComfyUI is ready at http://127.0.0.1:" in await vast.instance_logs(contract)

            await vast.destroy_instance(contract)
            await wait_for(lambda: not any(map(pid_alive, [agent, *comfys])), within_s=5.0)
            assert comfy_sims_under(workspace) == []
