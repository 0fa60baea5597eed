"""``comfyfleet serve``: the control plane (FastAPI under uvicorn) over the migrated store.

The store is SQLite under the data directory, or PostgreSQL with ``DATABASE_URL``;
its migrations run first. Without ``ADMIN_API_KEY`` the server listens on loopback
only: a non-loopback address is refused (exit 2) before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from comfyfleet.clikit import console, friendly
from comfyfleet.errors import ConfigError

if TYPE_CHECKING:
    from comfyfleet.api.settings import AgentProfile, ApiSettings
    from comfyfleet.profiles import Fleet

# The server's imports (FastAPI, uvicorn, SQLAlchemy) wait for ``serve`` itself: every
# other command of the CLI loads this module and must stay quick to start.

__all__ = ["DEFAULT_PORT", "agent_profiles", "check_bind", "public_url", "serve"]

DEFAULT_PORT = 8700


def check_bind(host: str, settings: ApiSettings) -> None:
    """Refuse to listen beyond this machine without an admin key (``ConfigError``: exit 2)."""
    from comfyfleet.api.server import is_loopback

    if settings.admin_api_key is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an admin key: anyone who can reach it "
            "could drive the pool. Set ADMIN_API_KEY (a long random string), or listen on "
            "127.0.0.1",
            source="ADMIN_API_KEY",
        )


def agent_profiles(pairs: list[str]) -> dict[str, AgentProfile]:
    """``PROFILE=MANIFEST`` pairs as what each profile's agents are told at registration."""
    from comfyfleet.api.settings import AgentProfile
    from comfyfleet.manifest import load_manifest

    profiles: dict[str, AgentProfile] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"expected PROFILE=PATH, got {pair!r}", source="--manifest")
        manifest = load_manifest(Path(path.strip()).expanduser()).inlined()
        profiles[name.strip()] = AgentProfile(manifest=manifest.model_dump(mode="json"))
    return profiles


def _fleet(config: Path | None, no_pool: bool) -> Fleet | None:
    """The fleet file the pool runs, or None: ``--no-pool``, or none named and none found."""
    import os

    from comfyfleet.config import find_fleet_file
    from comfyfleet.profiles import load_fleet

    if no_pool:
        return None
    try:
        path = find_fleet_file(config)
    except ConfigError:
        if config is not None or os.environ.get("COMFYFLEET_CONFIG"):
            raise
        return None
    return load_fleet(path)


def public_url(host: str, port: int, given: str | None) -> str:
    """The ``COMFYFLEET_URL`` instances dial home to: ``given``, else this server on loopback."""
    from comfyfleet.agent.bootstrap import check_control_url
    from comfyfleet.api.server import is_loopback

    if given:
        return check_control_url(given)
    if not is_loopback(host):
        raise ConfigError(
            "instances must reach this control plane: set COMFYFLEET_PUBLIC_URL (or "
            "--public-url) to its https:// address ending in /api",
            source="COMFYFLEET_PUBLIC_URL",
        )
    if port == 0:
        raise ConfigError("the pool needs a fixed --port: instances are told where to dial")
    return check_control_url(f"http://{host}:{port}/api")


@friendly
def serve(
    host: Annotated[
        str,
        typer.Option(
            "--host",
            envvar="COMFYFLEET_HOST",
            help="Address to listen on. Anything but loopback needs ADMIN_API_KEY.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option("--port", envvar="COMFYFLEET_PORT", min=0, max=65535, help="TCP port."),
    ] = DEFAULT_PORT,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="The fleet file whose pools to keep. Default: $COMFYFLEET_CONFIG, "
            "./fleet.yaml, ~/.config/comfyfleet/fleet.yaml; none found: no pool.",
            show_default=False,
        ),
    ] = None,
    no_pool: Annotated[
        bool,
        typer.Option("--no-pool", help="Serve the agents and the API only; rent nothing."),
    ] = False,
    public: Annotated[
        str | None,
        typer.Option(
            "--public-url",
            envvar="COMFYFLEET_PUBLIC_URL",
            help="The https://.../api address instances dial home to. Default: this "
            "server, when it listens on loopback.",
            show_default=False,
        ),
    ] = None,
    fleet_id: Annotated[
        str,
        typer.Option(
            "--fleet-id",
            envvar="COMFYFLEET_FLEET_ID",
            help="This fleet's name in the labels (cf-<fleet id>-<instance id>); the orphan "
            "sweep touches no other.",
        ),
    ] = "main",
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="Adopt labelled contracts the store does not know, instead of destroying them.",
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            envvar="COMFYFLEET_RECONCILE_INTERVAL_S",
            min=0.05,
            help="Seconds between reconcile passes (an admin action brings one forward).",
        ),
    ] = 10.0,
    manifest: Annotated[
        list[str] | None,
        typer.Option(
            "--manifest",
            metavar="PROFILE=PATH",
            help="The workspace manifest the agents of PROFILE provision, over the fleet "
            "file's (repeatable).",
        ),
    ] = None,
) -> None:
    """Run the control plane: the warm pool, the agents' endpoints, the admin API, /metrics.

    Migrates the store first (SQLite under the data directory, or DATABASE_URL), then
    keeps each profile's pool of the fleet file (min_ready, max_instances, spend cap,
    idle TTL) on its provider: Vast.ai with VAST_API_KEY (VAST_URL for the simulator),
    or this machine for `provider: local`. Several serve processes may share one
    PostgreSQL: a database lease elects one reconciler per provider. After an edit
    of the fleet file, `kill -HUP <pid>` reloads its pools and requirements (a
    changed manifest reaches the agents after a restart).

    The admin key comes from ADMIN_API_KEY; the source tokens the agents fetch from
    HF_TOKEN, CIVITAI_TOKEN and PROVISION_DROPBOX_LINKS_B64.
    """
    import uvicorn

    from comfyfleet.api.server import uvicorn_config
    from comfyfleet.api.settings import ApiSettings
    from comfyfleet.clikit import run
    from comfyfleet.clock import SystemClock
    from comfyfleet.controlplane import build_control_plane
    from comfyfleet.store.db import Store, describe_url

    settings = ApiSettings.from_env()
    check_bind(host, settings)
    overrides = agent_profiles(list(manifest or []))
    fleet = _fleet(config, no_pool)
    control_url = public_url(host, port, public) if fleet is not None else None
    store = Store.open()
    try:
        plane = run(
            build_control_plane(
                store,
                fleet=fleet,
                control_url=control_url,
                clock=SystemClock(),
                api_settings=settings,
                reconciler={"fleet_id": fleet_id, "adopt": adopt, "interval_s": interval},
                manifest_overrides=overrides,
            )
        )
        pools = (
            ", ".join(
                f"{name} ({p.provider}: min_ready {p.pool.min_ready}, max {p.pool.max_instances})"
                for name, p in plane.profiles.items()
            )
            if plane.pool is not None
            else "off (no fleet file)"
            if not no_pool
            else "off (--no-pool)"
        )
        console.print(
            f"comfyfleet control plane on http://{host}:{port} "
            f"(store {describe_url(store.engine.url)}; admin API "
            f"{'on' if settings.admin_api_key else 'off: ADMIN_API_KEY is not set'})\n"
            f"pools: {pools}",
            highlight=False,
        )
        uvicorn.Server(uvicorn_config(plane.app, host=host, port=port, log_level="info")).run()
    finally:
        store.close()
