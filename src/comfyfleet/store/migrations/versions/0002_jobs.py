"""Jobs on the pool: priorities, attempts, timeouts, job leases, cancel requests, webhooks,
progress; user API keys; a job's outputs and its transition log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The new ``jobs`` columns are added in place (no table copy on SQLite): their server
defaults are plain literals, and SQLite gets the owner's foreign key written inline,
which it accepts on ``ADD COLUMN`` for a column that defaults to NULL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATES = ("queued", "placed", "running", "succeeded", "failed", "cancelled")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _states(name: str) -> sa.Enum:
    return sa.Enum(*JOB_STATES, name=name, native_enum=False, create_constraint=False, length=20)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=80), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )

    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("jobs", sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    op.add_column(
        "jobs", sa.Column("max_attempts", sa.Integer(), server_default="3", nullable=False)
    )
    for name in ("timeout_s", "deadline_at", "lease_expires_at", "cancel_requested_at"):
        op.add_column("jobs", sa.Column(name, sa.Double(), nullable=True))
    op.add_column(
        "jobs",
        sa.Column(
            "owner_key_id",
            sa.Integer(),
            sa.ForeignKey("api_keys.id", name=op.f("fk_jobs_owner_key_id_api_keys")),
            nullable=True,
        ),
        inline_references=sqlite,
    )
    op.add_column("jobs", sa.Column("webhook_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_secret", sa.String(length=128), nullable=True))
    op.add_column("jobs", sa.Column("progress", sa.JSON(), nullable=True))
    op.create_index(op.f("ix_jobs_owner_key_id"), "jobs", ["owner_key_id"])
    op.create_index("ix_jobs_queue", "jobs", ["state", "profile", "priority", "created_at"])

    op.create_table(
        "job_audit_log",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("from_state", _states("job_state"), nullable=True),
        sa.Column("to_state", _states("job_state"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_audit_log_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_audit_log")),
    )
    op.create_index(op.f("ix_job_audit_log_job_id"), "job_audit_log", ["job_id"])

    op.create_table(
        "job_outputs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("content_type", sa.String(length=127), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_outputs_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_outputs")),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_job_outputs_job_id_name")),
    )
    op.create_index(op.f("ix_job_outputs_sha256"), "job_outputs", ["sha256"])


def downgrade() -> None:
    op.drop_table("job_outputs")
    op.drop_table("job_audit_log")
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.drop_index(op.f("ix_jobs_owner_key_id"), table_name="jobs")
    # SQLite drops a column with a foreign key only by copying the table.
    with op.batch_alter_table("jobs") as batch:
        if op.get_bind().dialect.name != "sqlite":
            batch.drop_constraint(op.f("fk_jobs_owner_key_id_api_keys"), type_="foreignkey")
        for name in (
            "progress",
            "webhook_secret",
            "webhook_url",
            "owner_key_id",
            "cancel_requested_at",
            "lease_expires_at",
            "deadline_at",
            "timeout_s",
            "max_attempts",
            "priority",
        ):
            batch.drop_column(name)
    op.drop_table("api_keys")
