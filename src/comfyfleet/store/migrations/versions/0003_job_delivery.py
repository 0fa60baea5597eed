"""Jobs reserved to one instance (OnStart), instances that end with their baked job, and
webhook deliveries that survive a restart.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``jobs.pinned_instance_id``: only that instance may take the job (the OnStart job an
instance runs at boot). ``instances.onstart_job_id``: the job an instance was rented
for; the reconciler destroys the instance once that job has ended, whoever is watching.
``webhook_deliveries``: one row per event to deliver, with its attempts and the time of
the next one, so a restart of the control plane loses no delivery.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column(
        "jobs",
        sa.Column(
            "pinned_instance_id",
            sa.Integer(),
            sa.ForeignKey("instances.id", name=op.f("fk_jobs_pinned_instance_id_instances")),
            nullable=True,
        ),
        inline_references=sqlite,
    )
    op.create_index(op.f("ix_jobs_pinned_instance_id"), "jobs", ["pinned_instance_id"])
    op.add_column("instances", sa.Column("onstart_job_id", sa.String(length=36), nullable=True))

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.Double(), nullable=True),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.Column("given_up_at", sa.Double(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("job_id", "event", name=op.f("uq_webhook_deliveries_job_id_event")),
    )
    op.create_index(
        op.f("ix_webhook_deliveries_next_attempt_at"), "webhook_deliveries", ["next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_column("instances", "onstart_job_id")
    op.drop_index(op.f("ix_jobs_pinned_instance_id"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pinned_instance_id")
