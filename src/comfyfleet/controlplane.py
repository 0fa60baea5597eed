"""The control plane put together: the API over the store, with the warm pool running inside.

``build_control_plane`` is what ``comfyfleet serve``, the demo and the end-to-end
tests run: the fleet file's profiles (with their manifests sized), the agents'
registration answers, one reconciler per provider behind the admin API, and the
reconcile loops started and stopped with the app. Tests and the demo pass their own
clock and provider factory (the simulator); ``serve`` passes the production ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from comfyfleet.errors import ConfigError
from comfyfleet.pool.policy import DEFAULT_POLICY_SETTINGS
from comfyfleet.pool.reconciler import ReconcilerSettings
from comfyfleet.pool.service import (
    PoolService,
    ProviderFactory,
    agent_profiles,
    default_provider_factory,
    load_manifests,
    prepare_profiles,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from comfyfleet.api.metrics import PoolMetrics
    from comfyfleet.api.settings import AgentProfile, ApiSettings
    from comfyfleet.clock import Clock
    from comfyfleet.profiles import Fleet, Profile
    from comfyfleet.store.db import Store

__all__ = ["POLICY_VARIABLES", "ControlPlane", "build_control_plane", "settings_from_env"]

#: The failure policy's limits a ``serve`` takes from the environment (README, "Defaults").
POLICY_VARIABLES: Final = {
    "COMFYFLEET_REGISTER_S": "register_seconds",
    "COMFYFLEET_MISSED_HEARTBEATS": "missed_heartbeats",
    "COMFYFLEET_BAD_STATUS_S": "bad_status_seconds",
    "COMFYFLEET_DOWNLOAD_STALL_S": "download_stall_seconds",
    "COMFYFLEET_CRASH_LOOP_COUNT": "crash_loop_count",
}


def settings_from_env(
    env: Mapping[str, str] | None, *, heartbeat_interval_s: float
) -> dict[str, Any]:
    """``ReconcilerSettings`` fields from the environment: the failure policy's limits
    (``POLICY_VARIABLES``, ``COMFYFLEET_STAGE_DEADLINES`` as ``stage=seconds,...``), the
    blocklist's TTL (``COMFYFLEET_BLOCK_TTL_S``) and the lease's (``COMFYFLEET_LEASE_TTL_S``).
    A value that is not a number is a ``ConfigError`` naming the variable."""
    from comfyfleet.envvars import env_value

    def number(variable: str) -> float | None:
        raw = env_value(env, variable)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"expected a number, got {raw!r}", source=variable) from None
        if not value > 0:
            raise ConfigError(f"expected a number > 0, got {raw!r}", source=variable)
        return value

    policy: dict[str, Any] = {"heartbeat_interval_seconds": heartbeat_interval_s}
    for variable, name in POLICY_VARIABLES.items():
        value = number(variable)
        if value is not None:
            policy[name] = (
                int(value) if name in ("missed_heartbeats", "crash_loop_count") else value
            )
    deadlines = dict(DEFAULT_POLICY_SETTINGS.stage_deadlines)
    raw = env_value(env, "COMFYFLEET_STAGE_DEADLINES")
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        stage, sep, seconds = item.partition("=")
        try:
            if not sep:
                raise ValueError
            deadlines[stage.strip()] = float(seconds)
        except ValueError:
            raise ConfigError(
                f"expected stage=seconds pairs separated by commas, got {item.strip()!r}",
                source="COMFYFLEET_STAGE_DEADLINES",
            ) from None
    policy["stage_deadlines"] = deadlines
    try:
        settings: dict[str, Any] = {
            "policy": dataclasses.replace(DEFAULT_POLICY_SETTINGS, **policy)
        }
    except ValueError as error:
        raise ConfigError(str(error), source="COMFYFLEET_STAGE_DEADLINES") from None
    for variable, name in (
        ("COMFYFLEET_BLOCK_TTL_S", "block_ttl_s"),
        ("COMFYFLEET_LEASE_TTL_S", "lease_ttl_s"),
    ):
        value = number(variable)
        if value is not None:
            settings[name] = value
    return settings


@dataclass
class ControlPlane:
    """The app to serve, and what it runs: the pool (None without a fleet file)."""

    app: FastAPI
    settings: ApiSettings
    metrics: PoolMetrics
    profiles: dict[str, Profile]
    pool: PoolService | None


async def build_control_plane(
    store: Store,
    *,
    fleet: Fleet | None,
    control_url: str | None,
    clock: Clock,
    api_settings: ApiSettings,
    reconciler: Mapping[str, Any] | None = None,
    providers: ProviderFactory = default_provider_factory,
    manifest_overrides: Mapping[str, AgentProfile] | None = None,
    size_manifests: bool = True,
    env: Mapping[str, str] | None = None,
) -> ControlPlane:
    """The control plane over ``store``; with ``fleet``, the pool of its profiles.

    ``control_url`` is the ``COMFYFLEET_URL`` instances dial home to (needed with a
    fleet). ``reconciler`` overrides fields of ``ReconcilerSettings`` (``fleet_id``,
    ``adopt``, ``interval_s``...) over those of ``env`` (``settings_from_env``; default
    ``os.environ``). The failure policy's heartbeat interval is the API's, so that the
    agents' rhythm and the policy's patience agree; so is its jobs per instance, so that
    the pool rents for the queue at the rate the dispatcher places jobs.
    """
    from comfyfleet.api.app import create_app
    from comfyfleet.api.metrics import PoolMetrics

    metrics = PoolMetrics()
    profiles: dict[str, Profile] = {}
    service: PoolService | None = None
    told: dict[str, AgentProfile] = {}
    if fleet is not None:
        if control_url is None:
            raise ValueError("a pool needs the control_url its instances dial home to")
        manifests = load_manifests(fleet)
        profiles = dict(fleet.profiles)
        if size_manifests:
            profiles = await prepare_profiles(profiles, manifests)
        told = agent_profiles(profiles, manifests)
        options: dict[str, Any] = {
            "fleet_id": "main",
            **settings_from_env(env, heartbeat_interval_s=api_settings.heartbeat_interval_s),
            "jobs_per_instance": api_settings.max_jobs_per_instance,
            **(reconciler or {}),
        }
        settings = ReconcilerSettings(control_url=control_url, **options)
        service = PoolService.build(
            store, profiles, settings, clock=clock, metrics=metrics, providers=providers
        )
        source = fleet.source
        if source is not None:

            async def reread() -> dict[str, Profile]:
                from comfyfleet.profiles import load_fleet

                again = load_fleet(Path(source))
                found = dict(again.profiles)
                if size_manifests:
                    found = await prepare_profiles(found, load_manifests(again))
                return found

            service.reloader = reread
    told.update(manifest_overrides or {})
    if told:
        api_settings = api_settings.model_copy(
            update={"profiles": {**api_settings.profiles, **told}}
        )
    app = create_app(
        store,
        api_settings,
        clock=clock,
        pool=service.control if service is not None else None,
        metrics=metrics,
        background=service.run if service is not None else None,
    )
    return ControlPlane(
        app=app, settings=api_settings, metrics=metrics, profiles=profiles, pool=service
    )
