"""How ``serve`` puts the control plane together: settings, profiles, a reconciler per provider."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyfleet.controlplane import settings_from_env
from comfyfleet.errors import ConfigError
from comfyfleet.pool.policy import DEFAULT_STAGE_DEADLINES
from comfyfleet.pool.reconciler import lease_name_for
from comfyfleet.profiles import load_fleet, parse_fleet


def test_policy_limits_come_from_the_environment_with_the_documented_defaults() -> None:
    defaults = settings_from_env({}, heartbeat_interval_s=30.0)
    policy = defaults["policy"]
    assert policy.register_seconds == 600.0
    assert policy.heartbeat_interval_seconds == 30.0 and policy.missed_heartbeats == 3
    assert policy.bad_status_seconds == 120.0
    assert dict(policy.stage_deadlines) == dict(DEFAULT_STAGE_DEADLINES)
    assert "block_ttl_s" not in defaults  # the reconciler's own default: 24 h

    tuned = settings_from_env(
        {
            "COMFYFLEET_REGISTER_S": "300",
            "COMFYFLEET_MISSED_HEARTBEATS": "5",
            "COMFYFLEET_STAGE_DEADLINES": "downloading=7200, creating=900",
            "COMFYFLEET_BLOCK_TTL_S": "3600",
        },
        heartbeat_interval_s=10.0,
    )
    assert tuned["policy"].register_seconds == 300.0
    assert tuned["policy"].missed_heartbeats == 5
    assert tuned["policy"].stage_deadlines["downloading"] == 7200.0
    assert tuned["policy"].stage_deadlines["creating"] == 900.0
    assert tuned["policy"].stage_deadlines["warming"] == DEFAULT_STAGE_DEADLINES["warming"]
    assert tuned["block_ttl_s"] == 3600.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"COMFYFLEET_REGISTER_S": "ten minutes"}, "COMFYFLEET_REGISTER_S"),
        ({"COMFYFLEET_BLOCK_TTL_S": "-1"}, "COMFYFLEET_BLOCK_TTL_S"),
        ({"COMFYFLEET_STAGE_DEADLINES": "downloading"}, "COMFYFLEET_STAGE_DEADLINES"),
        ({"COMFYFLEET_STAGE_DEADLINES": "dowloading=60"}, "COMFYFLEET_STAGE_DEADLINES"),
    ],
)
def test_a_bad_limit_is_an_error_that_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env, heartbeat_interval_s=30.0)
    assert caught.value.source == named


def test_a_profile_names_its_provider_manifest_and_comfyui(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        json.dumps(
            {
                "defaults": {"max_price": 1.0},
                "profiles": {
                    "rented": {"manifest": "manifests/sdxl.yaml", "require_direct_ports": True},
                    "mine": {
                        "provider": "local",
                        "comfy_url": "http://127.0.0.1:8188",
                        "comfy_command": "python main.py",
                    },
                },
            }
        )
    )
    fleet = load_fleet(fleet_file)
    rented, mine = fleet.profiles["rented"], fleet.profiles["mine"]
    assert rented.provider == "vast" and rented.require_direct_ports
    assert fleet.manifest_path(rented) == tmp_path / "manifests" / "sdxl.yaml"
    assert mine.provider == "local" and fleet.manifest_path(mine) is None
    assert mine.comfy_command == "python main.py"
    assert lease_name_for("vast") == "reconciler"
    assert lease_name_for("local") == "reconciler:local"

    with pytest.raises(ConfigError) as caught:
        parse_fleet(json.dumps({"profiles": {"x": {"provider": "aws"}}}))
    assert "provider" in str(caught.value)
