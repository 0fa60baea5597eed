"""The HTTP bodies of the API (docs/agent-protocol.md for the agent's), as pydantic models.

Agent bodies ignore fields they do not know (a newer agent may send more); a log
line or a reason that is too long is cut, not refused, so that one oversized line
never costs a batch its stage events.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from comfyfleet.agent.report import Level, Stage
from comfyfleet.api.settings import ComfySpec

__all__ = [
    "MAX_BATCH",
    "AgentEvent",
    "EventBatch",
    "EventsPage",
    "HeartbeatRequest",
    "InstanceView",
    "LogEvent",
    "OnStartAnswer",
    "OnStartImage",
    "OnStartJobBody",
    "OnStartRequest",
    "PoolView",
    "PrewarmRequest",
    "ProgressEvent",
    "RegisterAnswer",
    "RegisterRequest",
    "ReprovisionRequest",
    "StageEvent",
    "TerminateRequest",
]

MAX_BATCH: Final = 500
MAX_LINE: Final = 4000
MAX_REASON: Final = 1000


def _cut(value: str | None, limit: int) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[: limit - 1] + "…"


class _AgentBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StageEvent(_AgentBody):
    kind: Literal["stage"]
    at: float
    stage: Stage
    reason: str | None = None

    @field_validator("reason")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return _cut(value, MAX_REASON)


class ProgressEvent(_AgentBody):
    kind: Literal["progress"]
    at: float
    done: int = Field(ge=0)
    total: int | None = Field(default=None, ge=0)
    file: str | None = None
    file_done: int = Field(default=0, ge=0)
    file_total: int | None = Field(default=None, ge=0)
    bytes_per_s: float = Field(default=0.0, ge=0)

    @field_validator("file")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return _cut(value, MAX_REASON)


class LogEvent(_AgentBody):
    kind: Literal["log"]
    at: float
    line: str
    level: Level = "info"

    @field_validator("line")
    @classmethod
    def _short(cls, value: str) -> str:
        return _cut(value, MAX_LINE) or ""


AgentEvent = Annotated[StageEvent | ProgressEvent | LogEvent, Field(discriminator="kind")]


class EventBatch(_AgentBody):
    instance_id: int
    events: list[AgentEvent] = Field(max_length=MAX_BATCH)


class RegisterRequest(_AgentBody):
    instance_id: int
    agent_version: str = Field(default="", max_length=64)
    hostname: str = Field(default="", max_length=255)
    workspace: str = Field(default="", max_length=1024)


class RegisterAnswer(BaseModel):
    heartbeat_interval_s: float
    manifest: dict[str, Any] | None
    comfy: ComfySpec
    #: The job this instance was rented to run (an OnStart instance): it runs that job alone.
    onstart_job_id: str | None = None


class HeartbeatRequest(_AgentBody):
    instance_id: int
    stage: Stage | None = None
    at: float | None = None


# ---------------------------------------------------------------- admin


class PrewarmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, max_length=64)
    count: int = Field(default=1, ge=1, le=100)


class ReprovisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: int | None = None
    profile: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_target(self) -> ReprovisionRequest:
        if (self.instance_id is None) == (self.profile is None):
            raise ValueError("expected instance_id or profile, exactly one of them")
        return self


class TerminateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="terminated by an admin", min_length=1, max_length=MAX_REASON)


class InstanceView(BaseModel):
    """One instance as ``GET /api/admin/pool`` shows it."""

    id: int
    label: str
    profile: str
    slot: int | None
    state: str
    provider: str
    provider_contract_id: int | None
    machine_id: int | None
    gpu_name: str | None
    dph_total: float | None
    actual_status: str | None
    status_msg: str | None
    public_ip: str | None
    ports: dict[str, Any] | None
    ssh_host: str | None
    ssh_port: int | None
    cost_so_far: float
    #: True when ``cost_so_far`` is an estimate (dph_total x age) the ledger has not yet replaced.
    cost_estimated: bool
    failure_reason: str | None
    progress: dict[str, Any] | None
    registered_at: float | None
    last_heartbeat_at: float | None
    heartbeat_age_s: float | None
    stage_entered_at: float
    created_at: float
    ready_at: float | None
    ended_at: float | None


class PoolView(BaseModel):
    at: float
    pool_control: bool
    burn_dollars_per_hour: float
    instances: list[InstanceView]


class EventsPage(BaseModel):
    """``GET /api/instances/{id}/events``: the state, and the events after ``after``."""

    instance_id: int
    state: str
    failure_reason: str | None
    progress: dict[str, Any] | None
    #: The newest sequence number there is: pass it as ``after`` next time.
    last: int
    #: Events after ``after`` that are no longer kept in memory (the buffer is bounded).
    missed: int
    events: list[dict[str, Any]]
    #: The instance's provision log file on the control plane's machine, once it has one.
    log_file: str | None = None


# ------------------------------------------------------------------ OnStart rentals


class OnStartImage(BaseModel):
    """Which LoadImage node of an OnStart job takes which of its inputs."""

    model_config = ConfigDict(extra="forbid")

    node: str | None = Field(
        default=None, description="The node's id, title or class_type; null: the only LoadImage."
    )
    name: str = Field(min_length=1, max_length=255, description="The input's file name.")


class OnStartJobBody(BaseModel):
    """The job of an OnStart rental: ``POST /api/jobs``'s JSON body without what such a
    job cannot choose (its profile is the rental's; one attempt, no priority)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    workflow: dict[str, Any] | str = Field(description="The API-format workflow (or its text).")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="File name to its bytes in base64."
    )
    prompt: str | None = Field(default=None, description="The positive prompt's text.")
    images: list[OnStartImage] | None = Field(
        default=None,
        description="The LoadImage node each input goes to; with one input and none given, "
        "the workflow's only LoadImage.",
    )
    overrides: list[str] = Field(
        default_factory=list,
        alias="set",
        description='NODE.INPUT=VALUE overrides, e.g. ["3.seed=42", "KSampler.steps=30"].',
    )
    randomize_seeds: bool = Field(
        default=True, description="Draw every seed no override set at random."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="The job's timeout in seconds, from its start."
    )


class OnStartRequest(BaseModel):
    """``POST /api/admin/pool/onstart``: rent an instance of ``profile`` for ``job``."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, max_length=64)
    job: OnStartJobBody


class OnStartAnswer(BaseModel):
    """The OnStart rental as recorded: follow the instance, then the job."""

    profile: str
    instance_id: int
    job_id: str
