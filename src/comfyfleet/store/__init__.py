"""The control plane's store: instances, their audit trail, leases, the blocklist, jobs.

SQLAlchemy 2 models over SQLite (the default, a file in the data directory) or
PostgreSQL (``DATABASE_URL``), with Alembic migrations shipped in the package and
run by ``migrate`` at start. Repositories are plain functions over a ``Session``
that never commit; ``Store.transaction()`` (sync) and ``Store.run()`` (async, on a
worker thread) give them one transaction each.

    store = Store.open()                      # migrates
    with store.transaction() as session:
        row = create_instance(session, fleet_id="main", profile="sdxl", slot=0,
                              provider="vast", now=clock.now(), actor="reconciler")
    # ... only now call the provider, with row.label
"""

from comfyfleet.lifecycle import (
    BOOT_STAGES,
    INSTANCE_TRANSITIONS,
    JOB_TERMINAL_STATES,
    JOB_TRANSITIONS,
    LIVE_STATES,
    TERMINAL_STATES,
    InstanceState,
    JobState,
    can_transition,
    can_transition_job,
)
from comfyfleet.store.blocklist import (
    DEFAULT_BLOCK_TTL_S,
    active_blocks,
    block_machine,
    blocked_machine_ids,
    expire_block,
    purge_expired_blocks,
)
from comfyfleet.store.db import (
    Store,
    alembic_config,
    create_engine,
    data_dir,
    database_url,
    describe_url,
    head_revision,
    migrate,
    normalize_database_url,
    schema_revision,
)
from comfyfleet.store.instances import (
    ProfileUsage,
    audit_trail,
    check_fleet_id,
    create_instance,
    find_instance_by_contract,
    find_instance_by_label,
    get_instance,
    instance_id_from_label,
    label_prefix,
    live_instances,
    live_usage_by_profile,
    make_label,
    scrub,
    transition,
)
from comfyfleet.store.leases import (
    RECONCILER_LEASE,
    Lease,
    acquire_lease,
    current_lease,
    epoch_is_current,
    release_lease,
    renew_lease,
    require_current_epoch,
)
from comfyfleet.store.models import (
    AuditRow,
    Base,
    BlockedMachineRow,
    InstanceRow,
    JobRow,
    LeaseRow,
)
from comfyfleet.store.tokens import hash_token, issue_token, revoke_token, verify_token

__all__ = [
    "BOOT_STAGES",
    "DEFAULT_BLOCK_TTL_S",
    "INSTANCE_TRANSITIONS",
    "JOB_TERMINAL_STATES",
    "JOB_TRANSITIONS",
    "LIVE_STATES",
    "RECONCILER_LEASE",
    "TERMINAL_STATES",
    "AuditRow",
    "Base",
    "BlockedMachineRow",
    "InstanceRow",
    "InstanceState",
    "JobRow",
    "JobState",
    "Lease",
    "LeaseRow",
    "ProfileUsage",
    "Store",
    "acquire_lease",
    "active_blocks",
    "alembic_config",
    "audit_trail",
    "block_machine",
    "blocked_machine_ids",
    "can_transition",
    "can_transition_job",
    "check_fleet_id",
    "create_engine",
    "create_instance",
    "current_lease",
    "data_dir",
    "database_url",
    "describe_url",
    "epoch_is_current",
    "expire_block",
    "find_instance_by_contract",
    "find_instance_by_label",
    "get_instance",
    "hash_token",
    "head_revision",
    "instance_id_from_label",
    "issue_token",
    "label_prefix",
    "live_instances",
    "live_usage_by_profile",
    "make_label",
    "migrate",
    "normalize_database_url",
    "purge_expired_blocks",
    "release_lease",
    "renew_lease",
    "require_current_epoch",
    "revoke_token",
    "schema_revision",
    "scrub",
    "transition",
    "verify_token",
]
