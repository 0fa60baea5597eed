"""What the control plane's HTTP API is configured with: the admin key, the agents' secrets.

``ApiSettings.from_env`` reads the environment the one way comfyfleet does
(``envvars.env_value``: stripped, blank is unset). Secrets are ``SecretStr``: their
``repr`` and ``str`` never show the value, so a settings object can be logged.
What each profile's agent is told at registration (its manifest, how to run
ComfyUI) is not in the environment: ``serve`` fills ``profiles`` from the files it
is given, tests build it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from comfyfleet.envvars import env_value
from comfyfleet.store.db import data_dir

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "AgentProfile",
    "ApiSettings",
    "ComfySpec",
]

DEFAULT_HEARTBEAT_INTERVAL_S: Final = 30.0

#: The variables whose values the agent fetches with ``GET /agent/secrets``, by the name
#: it sets them under on the instance, each with the names it is read from here.
SECRET_VARIABLES: Final[Mapping[str, tuple[str, ...]]] = {
    "HF_TOKEN": ("HF_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "CIVITAI_TOKEN": ("CIVITAI_TOKEN",),
    "PROVISION_DROPBOX_LINKS_B64": ("PROVISION_DROPBOX_LINKS_B64",),
}


class ComfySpec(BaseModel):
    """How the agent runs ComfyUI: attach to the image's own, or start ``command`` + ``args``.

    ``None`` everywhere: the agent's defaults (``python main.py`` in the manifest's
    ComfyUI folder).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attach_url: str | None = None
    command: str | list[str] | None = None
    args: list[str] = Field(default_factory=list)


class AgentProfile(BaseModel):
    """What an agent of one profile is told when it registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The workspace manifest as data (what ``Manifest.model_dump(mode="json")`` gives).
    manifest: dict[str, Any] | None = None
    comfy: ComfySpec = Field(default_factory=ComfySpec)


class ApiSettings(BaseModel):
    """The API's settings; see ``from_env`` for the variables behind them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_api_key: SecretStr | None = None
    hf_token: SecretStr | None = None
    civitai_token: SecretStr | None = None
    dropbox_links_b64: SecretStr | None = None
    heartbeat_interval_s: float = Field(default=DEFAULT_HEARTBEAT_INTERVAL_S, gt=0)
    #: A prebuilt agent wheel to serve; ``None``: build one from the source tree once.
    agent_wheel: Path | None = None
    #: Where ``logs/provision_<id>_<timestamp>.log`` and the built wheel go.
    data_dir: Path = Field(default_factory=lambda: data_dir())
    #: Events kept in memory per instance for ``monitor`` (the oldest go first).
    events_per_instance: int = Field(default=2000, ge=10)
    #: Instances whose events are kept in memory (the least recently reporting go first).
    instances_in_memory: int = Field(default=512, ge=1)
    profiles: dict[str, AgentProfile] = Field(default_factory=dict)
    #: Jobs an instance runs at once (prompts in its ComfyUI's queue).
    max_jobs_per_instance: int = Field(default=1, ge=1, le=64)
    #: How long a job's lease lasts without a report from its agent.
    job_lease_ttl_s: float = Field(default=60.0, gt=0)
    #: Where job inputs and outputs are stored (content-addressed); None: data_dir/outputs.
    outputs_dir: Path | None = None
    #: The largest output (or input) file accepted, in bytes.
    max_output_bytes: int = Field(default=2 << 30, gt=0)
    #: Tests only: let webhooks reach loopback addresses (http allowed too).
    webhook_allow_loopback: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ApiSettings:
        """Settings from ``env`` (default ``os.environ``), then ``overrides``.

        ``ADMIN_API_KEY``; the secrets the agents fetch: ``HF_TOKEN`` (or
        ``HUGGINGFACE_HUB_TOKEN``), ``CIVITAI_TOKEN``, ``PROVISION_DROPBOX_LINKS_B64``;
        ``COMFYFLEET_AGENT_WHEEL`` (a prebuilt wheel), ``COMFYFLEET_HEARTBEAT_S``, the
        data directory (``COMFYFLEET_DATA_DIR``...); for jobs ``COMFYFLEET_JOBS_PER_INSTANCE``,
        ``COMFYFLEET_JOB_LEASE_S``, ``COMFYFLEET_OUTPUTS_DIR``, ``COMFYFLEET_MAX_OUTPUT_BYTES``
        and (tests only) ``COMFYFLEET_WEBHOOK_ALLOW_LOOPBACK``.
        """
        values: dict[str, Any] = {"data_dir": data_dir(env)}
        if key := env_value(env, "ADMIN_API_KEY"):
            values["admin_api_key"] = SecretStr(key)
        for field, variable in (
            ("hf_token", "HF_TOKEN"),
            ("civitai_token", "CIVITAI_TOKEN"),
            ("dropbox_links_b64", "PROVISION_DROPBOX_LINKS_B64"),
        ):
            if value := env_value(env, *SECRET_VARIABLES[variable]):
                values[field] = SecretStr(value)
        if wheel := env_value(env, "COMFYFLEET_AGENT_WHEEL"):
            values["agent_wheel"] = Path(wheel).expanduser()
        if interval := env_value(env, "COMFYFLEET_HEARTBEAT_S"):
            values["heartbeat_interval_s"] = interval
        for field, variable in (
            ("max_jobs_per_instance", "COMFYFLEET_JOBS_PER_INSTANCE"),
            ("job_lease_ttl_s", "COMFYFLEET_JOB_LEASE_S"),
            ("outputs_dir", "COMFYFLEET_OUTPUTS_DIR"),
            ("max_output_bytes", "COMFYFLEET_MAX_OUTPUT_BYTES"),
        ):
            if value := env_value(env, variable):
                values[field] = value
        if env_value(env, "COMFYFLEET_WEBHOOK_ALLOW_LOOPBACK") in ("1", "true", "yes"):
            values["webhook_allow_loopback"] = True
        values.update(overrides)
        return cls.model_validate(values)

    def outputs_root(self) -> Path:
        """Where job inputs and outputs are stored."""
        return self.outputs_dir if self.outputs_dir is not None else self.data_dir / "outputs"

    def agent_secrets(self) -> dict[str, str]:
        """What ``GET /agent/secrets`` answers: only the secrets that are configured."""
        found = {
            "HF_TOKEN": self.hf_token,
            "CIVITAI_TOKEN": self.civitai_token,
            "PROVISION_DROPBOX_LINKS_B64": self.dropbox_links_b64,
        }
        return {name: value.get_secret_value() for name, value in found.items() if value}
