"""The initial schema: instances, audit log, machine blocklist, leases, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

A migration is a snapshot: it spells its states and types out rather than importing
them from ``comfyfleet.store.models``, which will move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INSTANCE_STATES = (
    "requested",
    "creating",
    "booting",
    "provisioning",
    "downloading",
    "starting_app",
    "warming",
    "ready",
    "busy",
    "draining",
    "destroying",
    "destroyed",
    "failed",
)
JOB_STATES = ("queued", "placed", "running", "succeeded", "failed", "cancelled")
LIVE_ROW = sa.text("state NOT IN ('destroyed', 'failed')")


def _states(values: Sequence[str], name: str, *, check: bool) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=check, length=20)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fleet_id", sa.String(length=32), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("state", _states(INSTANCE_STATES, "instance_state", check=True), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("provider_contract_id", sa.BigInteger(), nullable=True),
        sa.Column("offer_id", sa.BigInteger(), nullable=True),
        sa.Column("machine_id", sa.BigInteger(), nullable=True),
        sa.Column("host_id", sa.BigInteger(), nullable=True),
        sa.Column("gpu_name", sa.String(length=64), nullable=True),
        sa.Column("dph_total", sa.Double(), nullable=True),
        sa.Column("actual_status", sa.String(length=32), nullable=True),
        sa.Column("actual_status_since", sa.Double(), nullable=True),
        sa.Column("status_msg", sa.Text(), nullable=True),
        sa.Column("public_ip", sa.String(length=64), nullable=True),
        sa.Column("ports", sa.JSON(), nullable=True),
        sa.Column("ssh_host", sa.String(length=255), nullable=True),
        sa.Column("ssh_port", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("agent_token_hash", sa.String(length=80), nullable=True),
        sa.Column("registered_at", sa.Double(), nullable=True),
        sa.Column("last_heartbeat_at", sa.Double(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("stage_entered_at", sa.Double(), nullable=False),
        sa.Column("stage_deadline_at", sa.Double(), nullable=True),
        sa.Column("cost_so_far", sa.Double(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("ready_at", sa.Double(), nullable=True),
        sa.Column("ended_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("label", name=op.f("uq_instances_label")),
        sa.UniqueConstraint(
            "provider",
            "provider_contract_id",
            name=op.f("uq_instances_provider_provider_contract_id"),
        ),
    )
    op.create_index(op.f("ix_instances_machine_id"), "instances", ["machine_id"])
    op.create_index(op.f("ix_instances_profile"), "instances", ["profile"])
    op.create_index(op.f("ix_instances_state"), "instances", ["state"])
    # Two rentals for one slot can never both be recorded while either may bill.
    op.create_index(
        "uq_instances_live_slot",
        "instances",
        ["profile", "slot"],
        unique=True,
        sqlite_where=LIVE_ROW,
        postgresql_where=LIVE_ROW,
    )

    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", sa.Double(), nullable=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )

    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("from_state", _states(INSTANCE_STATES, "instance_state", check=False)),
        sa.Column(
            "to_state", _states(INSTANCE_STATES, "instance_state", check=False), nullable=False
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_audit_log_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_instance_id"), "audit_log", ["instance_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("state", _states(JOB_STATES, "job_state", check=True), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_id", sa.String(length=36), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("placed_at", sa.Double(), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_jobs_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_instance_id"), "jobs", ["instance_id"])
    op.create_index(op.f("ix_jobs_state_created_at"), "jobs", ["state", "created_at"])

    op.create_table(
        "machine_blocklist",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("machine_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_machine_blocklist_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_machine_blocklist")),
    )
    op.create_index(op.f("ix_machine_blocklist_expires_at"), "machine_blocklist", ["expires_at"])
    op.create_index(
        op.f("ix_machine_blocklist_provider_machine_id"),
        "machine_blocklist",
        ["provider", "machine_id"],
    )


def downgrade() -> None:
    op.drop_table("machine_blocklist")
    op.drop_table("jobs")
    op.drop_table("audit_log")
    op.drop_table("leases")
    op.drop_table("instances")
