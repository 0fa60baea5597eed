"""Shared fixtures: the project's simulators on loopback, and a clean CLI environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_FLEET = REPO / "examples" / "fleet.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no Vast key anywhere: HOME and XDG point at an empty folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAST", "COMFYFLEET")) and k not in {"HOME", "XDG_CONFIG_HOME"}
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        COLUMNS="200",
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``comfyfleet`` command as a user would."""
    return subprocess.run(
        [str(BIN / "comfyfleet"), *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def vast_sim() -> Iterator[object]:
    from comfyfleet.sim.vast import RunningSim, SimConfig

    with RunningSim(SimConfig(seed=11, offers=400, api_key="test-key-123")) as sim:
        yield sim
