"""The ``local`` provider rents this machine: an instance is its onstart, run as a process."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from comfyfleet.agent.comfy import pid_alive
from comfyfleet.errors import ConfigError, InstanceNotFound, OfferUnavailable, ProviderError
from comfyfleet.providers.base import CreateRequest
from comfyfleet.providers.local import (
    LOCAL_CREDIT,
    LocalGpu,
    LocalProvider,
    parse_gpu_query,
)

GPU = LocalGpu(name="RTX 4090", count=1, memory_mb=24564, cuda=12.4)
# Records what it sees, starts a child in a session of its own (as the agent starts
# ComfyUI), says hello and waits.
ONSTART = """\
env > "$WORKSPACE/env.txt"
echo $$ > "$WORKSPACE/onstart.pid"
"$COMFYFLEET_AGENT_PYTHON" -c 'import subprocess; p = subprocess.Popen(["sleep", "301"], \
start_new_session=True); open("escaped.pid", "w").write(str(p.pid))'
echo "local onstart: hello"
echo started > "$WORKSPACE/ready"
sleep 300
"""


@pytest.fixture
async def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalProvider]:
    monkeypatch.setenv("VAST_API_KEY", "vast-key-of-the-test")
    provider = LocalProvider(
        tmp_path / "local",
        slots=2,
        dph_total=0.25,
        gpu=GPU,
        host_env={"HOST_ONLY": "from-the-host"},
        stop_grace_s=2.0,
    )
    async with provider:
        yield provider


def request(label: str, script: str = ONSTART) -> CreateRequest:
    return CreateRequest(
        image="vastai/comfyui:@vastai-automatic-tag",
        disk_gb=40,
        label=label,
        env={"DM_INSTANCE_ID": "3", "WORKSPACE": "/workspace"},
        onstart=script,
    )


async def wait_for(what: Callable[[], bool], within_s: float = 8.0) -> None:
    deadline = time.monotonic() + within_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


async def test_an_instance_runs_its_onstart_here_until_destroyed(local: LocalProvider) -> None:
    offers = await local.search_offers({}, allocated_storage_gb=40)
    assert [o.id for o in offers] == [1, 2]
    assert offers[0].gpu_name == "RTX 4090" and offers[0].gpu_ram == 24564
    assert offers[0].dph_total == 0.25 and offers[0].verified and offers[0].reliability == 1.0
    assert offers[0].direct_port_count == 0 and offers[0].inet_down >= 1000

    contract = await local.create_instance(1, request("comfyfleet-sdxl-a"))
    workspace = local.root / str(contract)
    instance = await local.get_instance(contract)
    assert instance.actual_status == "running" and instance.label == "comfyfleet-sdxl-a"
    assert instance.public_ipaddr == "127.0.0.1" and instance.dph_total == 0.25
    assert instance.machine_id == offers[0].machine_id
    assert instance.env() == {"DM_INSTANCE_ID": "3", "WORKSPACE": "/workspace"}
    await wait_for(lambda: (workspace / "ready").exists())

    env = read_env(workspace / "env.txt")
    assert env["WORKSPACE"] == str(workspace) and env["DM_INSTANCE_ID"] == "3"
    assert env["COMFYFLEET_AGENT_PYTHON"] == sys.executable
    assert env["HOST_ONLY"] == "from-the-host" and env["COMFY_PORT"].isdigit()
    assert "VAST_API_KEY" not in env
    logs = await local.instance_logs(contract)
    assert "local onstart: hello" in logs and "(the instance asked for /workspace)" in logs
    assert (await local.instance_logs(contract, tail=1)).strip() == "local onstart: hello"
    # The slot is taken: one offer left, and renting it again is refused.
    assert [o.id for o in await local.search_offers({}, allocated_storage_gb=40)] == [2]
    with pytest.raises(OfferUnavailable):
        await local.create_instance(1, request("comfyfleet-sdxl-b"))

    tree = [int((workspace / f"{name}.pid").read_text()) for name in ("onstart", "escaped")]
    assert all(map(pid_alive, tree))
    await local.destroy_instance(contract)
    assert not any(map(pid_alive, tree))
    assert not workspace.exists() and (local.root / f"{contract}.log").is_file()
    with pytest.raises(InstanceNotFound):
        await local.get_instance(contract)
    with pytest.raises(InstanceNotFound):
        await local.instance_logs(contract)
    await local.destroy_instance(contract)  # already gone: not an error
    assert await local.list_instances() == []
    assert len(await local.search_offers({}, allocated_storage_gb=40)) == 2


async def test_a_script_that_ends_leaves_an_exited_instance_until_destroyed(
    local: LocalProvider,
) -> None:
    ends = await local.create_instance(1, request("comfyfleet-sdxl-ends", "echo bye; exit 3"))
    runs = await local.create_instance(2, request("comfyfleet-sdxl-runs", "sleep 300"))
    deadline = time.monotonic() + 5
    while (await local.get_instance(ends)).actual_status == "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    listed = {i.label or "": i for i in await local.list_instances()}
    assert sorted(listed) == ["comfyfleet-sdxl-ends", "comfyfleet-sdxl-runs"]
    assert listed["comfyfleet-sdxl-ends"].actual_status == "exited"
    assert listed["comfyfleet-sdxl-ends"].status_msg == "onstart exited with code 3"
    assert listed["comfyfleet-sdxl-runs"].actual_status == "running"
    assert "bye" in await local.instance_logs(ends)
    assert await local.search_offers({}, allocated_storage_gb=40) == []  # an exited one holds
    await local.destroy_instance(ends)
    assert [i.id for i in await local.list_instances()] == [runs]


async def test_leaving_the_provider_stops_every_instance_and_ids_never_repeat(
    tmp_path: Path,
) -> None:
    root = tmp_path / "local"
    async with LocalProvider(root, gpu=GPU, stop_grace_s=1.0) as first:
        contract = await first.create_instance(1, request("comfyfleet-sdxl-a"))
        await wait_for(lambda: (root / str(contract) / "ready").exists())
        pid = int((root / str(contract) / "onstart.pid").read_text())
        escaped = int((root / str(contract) / "escaped.pid").read_text())
    assert not pid_alive(pid) and not pid_alive(escaped)
    with pytest.raises(ProviderError):
        await first.create_instance(1, request("comfyfleet-sdxl-late"))

    async with LocalProvider(root, gpu=GPU) as second:
        assert await second.list_instances() == []  # a new provider knows none
        again = await second.create_instance(1, request("comfyfleet-sdxl-b", "sleep 30"))
        assert again > contract
        await second.destroy_instance(again)
        (root / "next-contract-id").unlink()  # even without its counter: the logs stay
        assert await second.create_instance(1, request("comfyfleet-sdxl-c", "true")) > again


async def test_a_script_deaf_to_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    deaf = """\
trap '' TERM
"$COMFYFLEET_AGENT_PYTHON" -c 'import signal, subprocess, sys; p = subprocess.Popen([sys.\
executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); \
time.sleep(300)"], start_new_session=True); open("escaped.pid", "w").write(str(p.pid))'
echo started > ready
while true; do sleep 0.05; done
"""
    async with LocalProvider(tmp_path / "local", gpu=GPU, stop_grace_s=0.5) as local:
        contract = await local.create_instance(1, request("comfyfleet-sdxl-deaf", deaf))
        workspace = local.root / str(contract)
        await wait_for(lambda: (workspace / "ready").exists())
        escaped = int((workspace / "escaped.pid").read_text())
        started = time.monotonic()
        await local.destroy_instance(contract)
        assert time.monotonic() - started >= 0.5
        assert not pid_alive(escaped)


async def test_refusals_say_why(local: LocalProvider) -> None:
    with pytest.raises(OfferUnavailable, match=r"its offers are 1\.\.2"):
        await local.create_instance(3, request("comfyfleet-sdxl-a"))
    with pytest.raises(ProviderError, match="has none"):
        await local.create_instance(1, request("comfyfleet-sdxl-a", "  "))
    with pytest.raises(InstanceNotFound):
        await local.get_instance(424242)
    user = await local.current_user()
    assert user.credit == LOCAL_CREDIT


def test_nvidia_smi_lines_become_the_offers_gpu() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15\n" * 2
    assert parse_gpu_query(text) == LocalGpu(
        name="NVIDIA H100 80GB HBM3", count=2, memory_mb=81559.0, driver="550.54.15"
    )
    assert parse_gpu_query("") is None
    assert parse_gpu_query("RTX 3090, 24576 MiB\n") == LocalGpu("RTX 3090", 1, 24576.0)


def test_from_env_reads_the_root_the_slots_and_the_price(tmp_path: Path) -> None:
    local = LocalProvider.from_env(
        {"COMFYFLEET_DATA_DIR": str(tmp_path / "data"), "COMFYFLEET_LOCAL_SLOTS": "3"}, gpu=GPU
    )
    assert local.root == (tmp_path / "data" / "local-instances").resolve() and local.slots == 3
    named = LocalProvider.from_env(
        {"COMFYFLEET_LOCAL_ROOT": str(tmp_path / "r"), "COMFYFLEET_LOCAL_DPH": "0.5"}
    )
    assert named.root == (tmp_path / "r").resolve() and named.dph_total == 0.5
    with pytest.raises(ConfigError, match="COMFYFLEET_LOCAL_SLOTS"):
        LocalProvider.from_env({"COMFYFLEET_LOCAL_SLOTS": "many"})
