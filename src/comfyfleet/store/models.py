"""The control plane's tables, as SQLAlchemy 2 typed models.

Times are Unix seconds (``float``), as ``comfyfleet.clock.Clock.now()`` gives them:
the store never reads the wall clock itself, so tests and the simulator drive it
with a ``ManualClock`` or a ``ScaledClock``. Money is dollars, ``dph_total`` is $/h.

States are stored as their lowercase names in a ``VARCHAR`` with a ``CHECK``
constraint (not a PostgreSQL enum type), so the same migrations run on SQLite and
PostgreSQL and a new state is a plain constraint change.

No column ever holds a secret in clear: an agent token and a user's API key are kept
as their hashes only. The one exception is ``jobs.webhook_secret``: the control plane
signs each webhook delivery with it (HMAC), so it must be readable; no view, log line or
audit reason ever shows it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from comfyfleet.lifecycle import TERMINAL_STATES, InstanceState, JobState

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LIVE_SLOT_INDEX = "uq_instances_live_slot"
"""The partial unique index on (profile, slot) over the rows that are not terminal."""

LIVE_ROW_PREDICATE = "state NOT IN ({})".format(
    ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))
)
"""SQL that is true for an instance row that may still bill (shared with the migration)."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it as a class attribute)
        float: Double(),
        dict[str, Any]: JSON(),
    }


# An autoincrementing 64-bit key on PostgreSQL that stays SQLite's rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _state_type(enum: type[InstanceState] | type[JobState], name: str, *, check: bool) -> Enum:
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=check,
        length=20,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class InstanceRow(Base):
    """One rental, from the record made before the provider is called to its end."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("provider", "provider_contract_id"),
        Index(
            LIVE_SLOT_INDEX,
            "profile",
            "slot",
            unique=True,
            sqlite_where=text(LIVE_ROW_PREDICATE),
            postgresql_where=text(LIVE_ROW_PREDICATE),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet_id: Mapped[str] = mapped_column(String(32))
    profile: Mapped[str] = mapped_column(String(64), index=True)
    # None for an instance outside the pool's slots (an ad-hoc ``up``, an adoption).
    slot: Mapped[int | None]
    label: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[InstanceState] = mapped_column(
        _state_type(InstanceState, "instance_state", check=True), index=True
    )

    provider: Mapped[str] = mapped_column(String(32))
    provider_contract_id: Mapped[int | None] = mapped_column(BigInteger)
    offer_id: Mapped[int | None] = mapped_column(BigInteger)
    machine_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    host_id: Mapped[int | None] = mapped_column(BigInteger)
    gpu_name: Mapped[str | None] = mapped_column(String(64))
    dph_total: Mapped[float | None]

    # What the provider last said: Vast's ``actual_status`` and since when, ``status_msg``.
    actual_status: Mapped[str | None] = mapped_column(String(32))
    actual_status_since: Mapped[float | None]
    status_msg: Mapped[str | None] = mapped_column(Text)
    public_ip: Mapped[str | None] = mapped_column(String(64))
    ports: Mapped[dict[str, Any] | None]
    ssh_host: Mapped[str | None] = mapped_column(String(255))
    ssh_port: Mapped[int | None]

    failure_reason: Mapped[str | None] = mapped_column(Text)
    agent_token_hash: Mapped[str | None] = mapped_column(String(80))
    registered_at: Mapped[float | None]
    last_heartbeat_at: Mapped[float | None]
    # The agent's last progress report (files, bytes, rates), for ``up --wait`` and the pool view.
    progress: Mapped[dict[str, Any] | None]

    stage_entered_at: Mapped[float]
    stage_deadline_at: Mapped[float | None]
    cost_so_far: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    created_at: Mapped[float]
    updated_at: Mapped[float]
    ready_at: Mapped[float | None]
    ended_at: Mapped[float | None]
    # Added by migration 0003: the job this instance was rented to run at boot (OnStart);
    # the reconciler destroys the instance once that job has ended.
    onstart_job_id: Mapped[str | None] = mapped_column(String(36))

    def __repr__(self) -> str:
        return f"InstanceRow(id={self.id!r}, label={self.label!r}, state={self.state!r})"


class AuditRow(Base):
    """One instance transition: when, from what, to what, why and by whom."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    # None on the row that records the instance's creation.
    from_state: Mapped[InstanceState | None] = mapped_column(
        _state_type(InstanceState, "instance_state", check=False)
    )
    to_state: Mapped[InstanceState] = mapped_column(
        _state_type(InstanceState, "instance_state", check=False)
    )
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))

    def __repr__(self) -> str:
        return (
            f"AuditRow(instance_id={self.instance_id!r}, {self.from_state!s}"
            f" -> {self.to_state!s}, reason={self.reason!r})"
        )


class BlockedMachineRow(Base):
    """A machine that offer searches leave out until ``expires_at``, and why."""

    __tablename__ = "machine_blocklist"
    __table_args__ = (Index(None, "provider", "machine_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    machine_id: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    created_at: Mapped[float]
    expires_at: Mapped[float] = mapped_column(index=True)


class LeaseRow(Base):
    """A named lease (the reconciler's): who holds it, until when, in which epoch."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    acquired_at: Mapped[float | None]
    expires_at: Mapped[float]


JOB_QUEUE_INDEX = "ix_jobs_queue"
"""The index ``next_jobs_for`` reads the queue in: per state and profile, in FIFO order."""


class ApiKeyRow(Base):
    """A user's API key: its name, the prefix users recognise it by, and its hash only."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    # The key's first characters (``cf_`` and a few more), shown in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(80), unique=True)
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]
    last_used_at: Mapped[float | None]

    def __repr__(self) -> str:
        return f"ApiKeyRow(id={self.id!r}, name={self.name!r}, prefix={self.prefix!r})"


class JobRow(Base):
    """A generation job: queued, placed on an instance under a lease id, run, ended."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "state", "created_at"),
        Index(JOB_QUEUE_INDEX, "state", "profile", "priority", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    profile: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(_state_type(JobState, "job_state", check=True))
    # The job as submitted (workflow, inputs, overrides) and what it produced.
    request: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # New at each placement; the agent reports with it, and a stale one is refused.
    lease_id: Mapped[str | None] = mapped_column(String(36))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float]
    updated_at: Mapped[float]
    placed_at: Mapped[float | None]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]

    # Added by migration 0002.
    # Higher first; FIFO (``created_at``, then the time-ordered ``id``) within a priority.
    priority: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(default=3, server_default=text("3"))
    # Per attempt, from its placement; ``deadline_at`` is the current attempt's end.
    timeout_s: Mapped[float | None]
    deadline_at: Mapped[float | None]
    lease_expires_at: Mapped[float | None]
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    cancel_requested_at: Mapped[float | None]
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Readable on purpose (it signs the deliveries); never part of a view.
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    # The agent's last progress report (node, step, of steps...).
    progress: Mapped[dict[str, Any] | None]
    # Added by migration 0003: only this instance may take the job (an OnStart job).
    pinned_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)

    def __repr__(self) -> str:
        return f"JobRow(id={self.id!r}, profile={self.profile!r}, state={self.state!r})"


class JobAuditRow(Base):
    """One job transition (or a cancel request): when, from what, to what, why, by whom."""

    __tablename__ = "job_audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[float]
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    # None on the row that records the submission.
    from_state: Mapped[JobState | None] = mapped_column(
        _state_type(JobState, "job_state", check=False)
    )
    to_state: Mapped[JobState] = mapped_column(_state_type(JobState, "job_state", check=False))
    # The job's attempt count when it happened.
    attempt: Mapped[int]
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))

    def __repr__(self) -> str:
        return (
            f"JobAuditRow(job_id={self.job_id!r}, {self.from_state!s} -> {self.to_state!s}, "
            f"reason={self.reason!r})"
        )


class WebhookDeliveryRow(Base):
    """One webhook event to deliver for a job (``job.succeeded``...), until it is delivered
    or given up: kept in the store so that a restart loses no delivery."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "event"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    event: Mapped[str] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # None once delivered or given up: nothing more to do.
    next_attempt_at: Mapped[float | None] = mapped_column(index=True)
    delivered_at: Mapped[float | None]
    given_up_at: Mapped[float | None]
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float]

    def __repr__(self) -> str:
        return f"WebhookDeliveryRow(job_id={self.job_id!r}, event={self.event!r})"


class JobOutputRow(Base):
    """A file a job produced: its base name within the job, and the blob it is stored as."""

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # image, video, gif, audio, text, file...
    kind: Mapped[str] = mapped_column(String(32))
    content_type: Mapped[str] = mapped_column(String(127))
    created_at: Mapped[float]

    def __repr__(self) -> str:
        return f"JobOutputRow(job_id={self.job_id!r}, name={self.name!r}, size={self.size!r})"
