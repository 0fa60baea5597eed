"""Settings that come from the environment, and where the fleet file lives.

One settings object (pydantic-settings) for everything read from environment
variables; ``fleet.yaml`` (profiles) is loaded by ``comfyfleet.profiles``. The
Vast.ai API key is resolved by ``comfyfleet.providers.vast.resolve_api_key``,
which knows the official CLI's key files too.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from comfyfleet.errors import ConfigError

DEFAULT_VAST_URL = "https://console.vast.ai"


class Settings(BaseSettings):
    """Environment variables comfyfleet reads (names are case-insensitive)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    vast_url: str = Field(default=DEFAULT_VAST_URL, validation_alias="VAST_URL")
    config: Path | None = Field(default=None, validation_alias="COMFYFLEET_CONFIG")


def fleet_file_candidates(home: Path | None = None) -> list[Path]:
    """Where a fleet file is looked for when none is named, in order."""
    home = home or Path.home()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    config_home = Path(xdg) if xdg else home / ".config"
    return [Path("fleet.yaml"), config_home / "comfyfleet" / "fleet.yaml"]


def find_fleet_file(explicit: Path | None, settings: Settings | None = None) -> Path:
    """The fleet file to load: ``--config``, then ``$COMFYFLEET_CONFIG``, then the defaults."""
    settings = settings or Settings()
    for chosen, origin in ((explicit, "--config"), (settings.config, "COMFYFLEET_CONFIG")):
        if chosen is not None:
            if not chosen.is_file():
                raise ConfigError(f"no such file (named by {origin})", source=str(chosen))
            return chosen
    for candidate in fleet_file_candidates():
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no fleet file found: copy examples/fleet.yaml to ./fleet.yaml, "
        "or pass --config FILE, or set COMFYFLEET_CONFIG"
    )
