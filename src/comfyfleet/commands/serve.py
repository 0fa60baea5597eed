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

# The server's imports (FastAPI, uvicorn, SQLAlchemy) wait for ``serve`` itself: every
# other command of the CLI loads this module and must stay quick to start.

__all__ = ["DEFAULT_PORT", "agent_profiles", "check_bind", "serve"]

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
        manifest = load_manifest(Path(path.strip()).expanduser())
        profiles[name.strip()] = AgentProfile(manifest=manifest.model_dump(mode="json"))
    return profiles


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
    manifest: Annotated[
        list[str] | None,
        typer.Option(
            "--manifest",
            metavar="PROFILE=PATH",
            help="The workspace manifest the agents of PROFILE provision (repeatable).",
        ),
    ] = None,
) -> None:
    """Run the control plane: the agents dial home here; the admin API and /metrics.

    Migrates the store first (SQLite under the data directory, or DATABASE_URL).
    The admin key comes from ADMIN_API_KEY; the source tokens the agents fetch from
    HF_TOKEN, CIVITAI_TOKEN and PROVISION_DROPBOX_LINKS_B64.
    """
    import uvicorn

    from comfyfleet.api.app import create_app
    from comfyfleet.api.server import uvicorn_config
    from comfyfleet.api.settings import ApiSettings
    from comfyfleet.clock import SystemClock
    from comfyfleet.store.db import Store, describe_url

    settings = ApiSettings.from_env(profiles=agent_profiles(list(manifest or [])))
    check_bind(host, settings)
    store = Store.open()
    try:
        app = create_app(store, settings, clock=SystemClock(), pool=None)
        console.print(
            f"comfyfleet control plane on http://{host}:{port} "
            f"(store {describe_url(store.engine.url)}; admin API "
            f"{'on' if settings.admin_api_key else 'off: ADMIN_API_KEY is not set'})",
            highlight=False,
        )
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="info")).run()
    finally:
        store.close()
