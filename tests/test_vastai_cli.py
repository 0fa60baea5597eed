"""The official ``vastai`` CLI (a real subprocess) works against the simulator.

If Vast's own client accepts our answers, the simulator's wire format is right
where it matters: URLs, auth header, the exact Content-Type, the shapes it parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.clock import ManualClock
from comfyfleet.sim.vast import RunningSim, SimConfig

KEY = "cli-test-key"
VASTAI = Path(sys.executable).parent / "vastai"

pytestmark = pytest.mark.skipif(not VASTAI.exists(), reason="the vastai CLI is not installed")


@pytest.fixture
def running() -> Iterator[RunningSim]:
    with RunningSim(SimConfig(seed=21, offers=200, api_key=KEY), clock=ManualClock()) as sim:
        yield sim


@pytest.fixture
def cli_env(tmp_path: Path, running: RunningSim) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "VAST_URL": running.url,
        "VAST_API_KEY": KEY,
        "VASTAI_NO_UPDATE_CHECK": "1",
        "CI": "true",
        "NO_COLOR": "1",
    }


def run_vastai(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(VASTAI), "--raw", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def vastai(env: dict[str, str], *args: str) -> Any:
    """Run ``vastai --raw ...`` and parse the JSON it prints."""
    return json.loads(run_vastai(env, *args))


def test_search_offers_filters_in_gb_and_adds_the_default_filters(
    cli_env: dict[str, str], running: RunningSim
) -> None:
    offers = vastai(cli_env, "search", "offers", "gpu_ram>=16 num_gpus=1")
    assert offers
    for offer in offers:
        assert offer["gpu_ram"] >= 16000 and offer["num_gpus"] == 1
        assert offer["verification"] == "verified" and offer["rentable"] is True
        assert offer["external"] is False
    small = [o for o in running.sim.offers if o["gpu_ram"] < 16000 and o["num_gpus"] == 1]
    assert small, "the catalog must hold offers the filter rejects"


def test_new_search_gpu_name_with_underscores(cli_env: dict[str, str]) -> None:
    offers = vastai(cli_env, "search", "offers", "--new", "gpu_name=RTX_4090", "-o", "dph+")
    assert offers and {o["gpu_name"] for o in offers} == {"RTX 4090"}
    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices)


def test_create_show_destroy_round_trip(cli_env: dict[str, str], running: RunningSim) -> None:
    query = "gpu_ram>=16 num_gpus=1 direct_port_count>=10 disk_space>=50"
    offers = vastai(cli_env, "search", "offers", query)
    offer_id = offers[0]["id"]

    # fmt: off
    created = vastai(
        cli_env,
        "create", "instance", str(offer_id),
        "--image", "vastai/comfyui:@vastai-automatic-tag",
        "--disk", "40", "--jupyter", "--direct",
        "--env", "-p 8188:8188 -e FOO=bar",
        "--label", "cli-test",
    )
    # fmt: on
    assert created["success"] is True and created["ask_id"] == offer_id
    instance_id = created["new_contract"]

    clock = running.sim.clock
    assert isinstance(clock, ManualClock)
    clock.advance(600)

    shown = vastai(cli_env, "show", "instances")
    assert [row["id"] for row in shown] == [instance_id]
    row = shown[0]
    assert row["actual_status"] == "running" and row["label"] == "cli-test"
    assert row["extra_env"]["FOO"] == "bar"  # the CLI turns the pairs into a dict
    assert "-p 8188:8188" in row["extra_env"]
    assert row["image_runtype"] == "jupyter_direc ssh_direc ssh_proxy"
    assert row["ports"]["8188/tcp"][0]["HostPort"].isdigit()
    assert row["disk_space"] == 40

    one = vastai(cli_env, "show", "instance", str(instance_id))
    assert one["id"] == instance_id and one["extra_env"]["FOO"] == "bar"

    # The CLI polls the result_url (the simulator answers 404 twice first).
    logs = run_vastai(cli_env, "logs", str(instance_id))
    assert "success, running vastai/comfyui_v" in logs

    # ``destroy instance`` prints nothing in --raw mode (1.9.1 drops the answer);
    # success is the exit status and the instance being gone.
    output = run_vastai(cli_env, "destroy", "instance", str(instance_id), "-y")
    assert "fail" not in output.lower()
    assert vastai(cli_env, "show", "instances") == []
    assert running.sim.instance_json(instance_id) is None
