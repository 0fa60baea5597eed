"""The control plane's store, specified once and run on SQLite and on PostgreSQL.

PostgreSQL is the server on loopback (``postgresql://postgres@127.0.0.1:5432/test``,
or ``COMFYFLEET_TEST_DATABASE_URL``). A run migrates a fresh schema there, empties
it before each test and drops it at the end; the migration tests get empty schemas
of their own. These tests are never skipped: with PostgreSQL down they fail and say
to start it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from comfyfleet.clock import ManualClock
from comfyfleet.errors import (
    ConfigError,
    IllegalTransition,
    LeaseLost,
    SlotTaken,
    StaleInstanceState,
    StoreError,
    StoreUnavailable,
    UnknownInstance,
)
from comfyfleet.store import (
    BOOT_STAGES,
    INSTANCE_TRANSITIONS,
    JOB_TRANSITIONS,
    LIVE_STATES,
    TERMINAL_STATES,
    AuditRow,
    Base,
    InstanceRow,
    InstanceState,
    JobRow,
    JobState,
    Store,
    acquire_lease,
    active_blocks,
    audit_trail,
    block_machine,
    blocked_machine_ids,
    can_transition,
    create_engine,
    create_instance,
    current_lease,
    data_dir,
    database_url,
    epoch_is_current,
    expire_block,
    find_instance_by_label,
    get_instance,
    hash_token,
    head_revision,
    instance_id_from_label,
    issue_token,
    live_instances,
    live_usage_by_profile,
    make_label,
    migrate,
    normalize_database_url,
    purge_expired_blocks,
    release_lease,
    renew_lease,
    require_current_epoch,
    revoke_token,
    schema_revision,
    transition,
    verify_token,
)

S = InstanceState
PG_URL = os.environ.get("COMFYFLEET_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
FLEET = "main"
TABLES = {"instances", "audit_log", "machine_blocklist", "leases", "jobs"}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    """An engine on the PostgreSQL test database; the run fails if it cannot connect."""
    engine = sa.create_engine(normalize_database_url(PG_URL), pool_pre_ping=True)
    problem = None
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except OperationalError as error:
        problem = str(error.orig).strip()
    if problem is not None:
        engine.dispose()
        where = make_url(normalize_database_url(PG_URL)).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL is not reachable at {where} ({problem}). "
            "Start it (for example `service postgresql start`) or point "
            "COMFYFLEET_TEST_DATABASE_URL at one: the store's tests run on SQLite and on "
            "PostgreSQL and are never skipped.",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def _pg_schema_url(admin: sa.Engine) -> tuple[str, str]:
    """A new, empty schema in the test database, and a URL whose search_path is it."""
    schema = f"cf_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(normalize_database_url(PG_URL)).update_query_dict(
        {"options": f"-csearch_path={schema}"}
    )
    return schema, url.render_as_string(hide_password=False)


def _drop_schema(admin: sa.Engine, schema: str) -> None:
    with admin.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: a new SQLite file, or a new PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    admin: sa.Engine = request.getfixturevalue("pg_admin")
    schema, url = _pg_schema_url(admin)
    try:
        yield url
    finally:
        _drop_schema(admin, schema)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per run; each test gets a copy."""
    path = tmp_path_factory.mktemp("store") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_migrated(pg_admin: sa.Engine) -> Iterator[tuple[str, str]]:
    """A PostgreSQL schema migrated once per run, dropped at the end: (schema, url)."""
    schema, url = _pg_schema_url(pg_admin)
    try:
        migrate(url)
        yield schema, url
    finally:
        _drop_schema(pg_admin, schema)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a migrated database with no rows in it."""
    if backend == "sqlite":
        path = tmp_path / "store.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    admin: sa.Engine = request.getfixturevalue("pg_admin")
    schema, url = request.getfixturevalue("pg_migrated")
    tables = ", ".join(f'"{schema}".{table}' for table in sorted(TABLES))
    with admin.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return str(url)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = Store.open(store_url)  # migrating a migrated store is a no-op
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_700_000_000.0)


def rent(
    session: Session,
    clock: ManualClock,
    *,
    profile: str = "sdxl",
    slot: int | None = 0,
    **extra: Any,
) -> InstanceRow:
    return create_instance(
        session,
        fleet_id=FLEET,
        profile=profile,
        slot=slot,
        provider="vast",
        now=clock.now(),
        actor="test",
        **extra,
    )


def walk(session: Session, row: InstanceRow, clock: ManualClock, *states: InstanceState) -> None:
    for state in states:
        clock.advance(1)
        transition(session, row, state, reason=f"to {state}", actor="test", now=clock.now())


def all_rows(session: Session) -> list[tuple[str, tuple[Any, ...]]]:
    rows = [
        (table.name, tuple(row))
        for table in Base.metadata.sorted_tables
        for row in session.execute(sa.select(table))
    ]
    versions = session.execute(sa.text("SELECT * FROM alembic_version"))
    return rows + [("alembic_version", tuple(row)) for row in versions]


# ------------------------------------------------------------------ migrations


def test_migrations_build_the_schema_on_an_empty_database(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        assert schema_revision(engine) is None
        assert not TABLES & set(sa.inspect(engine).get_table_names())
        migrate(empty_url)
        assert schema_revision(engine) == head_revision()
        assert set(sa.inspect(engine).get_table_names()) >= TABLES | {"alembic_version"}
        migrate(engine)  # again: a no-op
        assert schema_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_the_live_slot_index_is_partial_on_both_backends(store: Store) -> None:
    indexes = {ix["name"]: ix for ix in sa.inspect(store.engine).get_indexes("instances")}
    live_slot = indexes["uq_instances_live_slot"]
    assert live_slot["unique"]
    assert live_slot["column_names"] == ["profile", "slot"]
    where = live_slot.get("dialect_options", {}).get(f"{store.dialect}_where")
    assert where is not None and "destroyed" in str(where) and "failed" in str(where)


def test_a_store_from_a_newer_comfyfleet_is_refused_with_a_reason(empty_url: str) -> None:
    migrate(empty_url)
    engine = create_engine(empty_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d'"))
        with pytest.raises(StoreError, match="newer comfyfleet"):
            migrate(engine)
    finally:
        engine.dispose()


def test_two_processes_migrating_at_once_both_succeed(empty_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def start() -> None:
        try:
            barrier.wait()
            migrate(empty_url)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = create_engine(empty_url)
    try:
        assert schema_revision(engine) == head_revision()
    finally:
        engine.dispose()


# ------------------------------------------------------------------ instances and lifecycle


def test_a_rental_is_recorded_in_requested_with_its_label_before_any_provider_call(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock, offer_id=42, machine_id=7, dph_total=0.45)
        instance_id = row.id
    with store.transaction() as session:
        row = get_instance(session, instance_id)
        assert row.state is S.REQUESTED
        assert row.label == f"cf-{FLEET}-{instance_id}" == make_label(FLEET, instance_id)
        assert find_instance_by_label(session, row.label) is row
        assert (row.offer_id, row.machine_id, row.dph_total) == (42, 7, 0.45)
        assert row.provider_contract_id is None
        [created] = audit_trail(session, instance_id)
        assert (created.from_state, created.to_state, created.actor) == (None, S.REQUESTED, "test")
        assert created.at == clock.now()


def test_labels_are_unique_and_parse_back_to_their_instance(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        rows = [rent(session, clock, slot=slot) for slot in range(5)]
    labels = [row.label for row in rows]
    assert len(set(labels)) == 5
    assert [instance_id_from_label(label, FLEET) for label in labels] == [r.id for r in rows]
    assert instance_id_from_label("cf-main-x-3", FLEET) is None
    assert instance_id_from_label("cf-main-3", "other") is None
    assert instance_id_from_label("cf-main-x-3", "main-x") == 3
    assert instance_id_from_label(None, FLEET) is None
    with pytest.raises(ConfigError, match="fleet id"), store.transaction() as session:
        create_instance(
            session,
            fleet_id="Bad Fleet",
            profile="p",
            slot=None,
            provider="vast",
            now=clock.now(),
            actor="test",
        )


def test_each_transition_writes_an_audit_row_in_the_same_transaction(
    store: Store, clock: ManualClock
) -> None:
    path = [
        S.CREATING,
        S.BOOTING,
        S.PROVISIONING,
        S.DOWNLOADING,
        S.STARTING_APP,
        S.WARMING,
        S.READY,
        S.BUSY,
        S.READY,
        S.DRAINING,
        S.DESTROYING,
        S.DESTROYED,
    ]
    with store.transaction() as session:
        row = rent(session, clock)
        instance_id = row.id
    for state in path:
        with store.transaction() as session:
            clock.advance(10)
            audit = transition(
                session,
                instance_id,
                state,
                reason=f"reached {state}",
                actor="agent",
                now=clock.now(),
                stage_deadline_at=clock.now() + 600,
            )
            assert audit.to_state is state
    with store.transaction() as session:
        trail = audit_trail(session, instance_id)
        row = get_instance(session, instance_id)
    assert [(a.from_state, a.to_state) for a in trail] == list(
        zip([None, S.REQUESTED, *path[:-1]], [S.REQUESTED, *path], strict=True)
    )
    assert [a.reason for a in trail[1:]] == [f"reached {state}" for state in path]
    assert all(a.actor == "agent" for a in trail[1:])
    assert [a.at for a in trail] == sorted(a.at for a in trail)
    assert row.state is S.DESTROYED
    assert row.ready_at == trail[7].at  # the first time it was ready
    assert row.ended_at == row.stage_entered_at == clock.now()
    assert row.stage_deadline_at == clock.now() + 600


def test_a_failed_transition_rolls_back_with_its_audit_row(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance_id = rent(session, clock).id
    with pytest.raises(RuntimeError), store.transaction() as session:
        transition(session, instance_id, S.CREATING, reason="x", actor="t", now=clock.now())
        raise RuntimeError("the provider call blew up before commit")
    with store.transaction() as session:
        assert get_instance(session, instance_id).state is S.REQUESTED
        assert len(audit_trail(session, instance_id)) == 1


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), S.READY),  # requested must go through creating
        ((), S.REQUESTED),  # no move to the same state
        ((S.CREATING, S.BOOTING, S.PROVISIONING), S.BOOTING),  # boot stages only go forward
        ((S.CREATING, S.BOOTING, S.READY), S.PROVISIONING),
        ((S.CREATING, S.BOOTING), S.BUSY),  # busy only from ready
        ((S.CREATING, S.BOOTING), S.DRAINING),
        ((S.CREATING, S.BOOTING, S.READY, S.DRAINING), S.READY),
        ((S.CREATING, S.DESTROYING), S.READY),
        ((S.CREATING, S.DESTROYING, S.DESTROYED), S.DESTROYING),  # terminal
        ((S.CREATING, S.DESTROYING, S.DESTROYED), S.FAILED),
        ((S.FAILED,), S.DESTROYING),
        ((S.CREATING, S.BOOTING, S.READY), S.DESTROYED),  # destroyed only via destroying
    ],
)
def test_illegal_transitions_are_refused_and_change_nothing(
    store: Store, clock: ManualClock, path: tuple[InstanceState, ...], illegal: InstanceState
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        walk(session, row, clock, *path)
        instance_id, state_before = row.id, row.state
    with store.transaction() as session:
        with pytest.raises(IllegalTransition) as refused:
            transition(session, instance_id, illegal, reason="no", actor="t", now=clock.now())
        assert get_instance(session, instance_id).state is state_before
        assert len(audit_trail(session, instance_id)) == 1 + len(path)
    error = refused.value
    assert (error.from_state, error.to_state) == (str(state_before), str(illegal))
    assert f"cannot go from {state_before} to {illegal}" in str(error)
    assert f"instance {instance_id}" in str(error)


def test_an_instance_with_a_contract_fails_only_through_destroying(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        walk(session, row, clock, S.CREATING)
        row.provider_contract_id = 30519173
        walk(session, row, clock, S.BOOTING)
        instance_id = row.id
    with store.transaction() as session:
        with pytest.raises(IllegalTransition, match="destroying"):
            transition(session, instance_id, S.FAILED, reason="x", actor="t", now=clock.now())
        # The slot stays held while the destroy is pending.
        with pytest.raises(SlotTaken):
            rent(session, clock)
    with store.transaction() as session:
        transition(
            session,
            instance_id,
            S.DESTROYING,
            reason="status_msg: no space left on device",
            actor="policy",
            now=clock.now(),
            failure_reason="no_space_left",
        )
        with pytest.raises(SlotTaken):
            rent(session, clock)
        transition(
            session,
            instance_id,
            S.FAILED,
            reason="destroy confirmed",
            actor="reconciler",
            now=clock.now(),
        )
        retry = rent(session, clock)
        row = get_instance(session, instance_id)
    assert row.state is S.FAILED and row.failure_reason == "no_space_left"
    assert retry.slot == 0 and retry.state is S.REQUESTED


def test_a_rental_that_never_got_a_contract_may_fail_at_once(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        walk(session, row, clock, S.CREATING)
        transition(
            session,
            row,
            S.FAILED,
            reason="offer taken",
            actor="reconciler",
            now=clock.now(),
            failure_reason="no_such_ask",
        )
        assert row.state is S.FAILED and row.ended_at == clock.now()


def test_an_abandoned_rental_ends_at_once_unless_a_contract_showed_up(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        abandoned = rent(session, clock, slot=0)
        walk(session, abandoned, clock, S.DESTROYED)  # never reached the provider
        assert abandoned.ended_at == clock.now()
        adopted = rent(session, clock, slot=0)  # the slot is free again
        adopted.provider_contract_id = 30518793  # its create call's answer was lost
        with pytest.raises(IllegalTransition, match="contract 30518793"):
            walk(session, adopted, clock, S.DESTROYED)
        walk(session, adopted, clock, S.DESTROYING, S.DESTROYED)


def test_expected_from_makes_a_transition_a_compare_and_set(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        walk(session, row, clock, S.CREATING, S.BOOTING)
        instance_id = row.id
    with store.transaction() as session:
        with pytest.raises(StaleInstanceState, match="is booting, not creating"):
            transition(
                session,
                instance_id,
                S.DESTROYING,
                reason="x",
                actor="t",
                now=clock.now(),
                expected_from=S.CREATING,
            )
        transition(
            session,
            instance_id,
            S.PROVISIONING,
            reason="x",
            actor="t",
            now=clock.now(),
            expected_from=S.BOOTING,
        )


def test_unknown_instances_are_named(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session, pytest.raises(UnknownInstance, match="no instance 999"):
        transition(session, 999, S.CREATING, reason="x", actor="t", now=clock.now())


def test_reasons_are_scrubbed_of_anything_that_looks_like_a_secret(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock, reason="requested with api_key=abc123 by admin")
        transition(
            session,
            row,
            S.CREATING,
            actor="t",
            now=clock.now(),
            reason="GET https://user:pw@files.example/m.safetensors?token=s3cr3t failed; "
            "Authorization: Bearer eyJhbGciOi; agent said cft_Zm9vYmFyYmF6; user key "
            "cf_dXNlcmtleXVzZXJrZXl1c2Vy, webhook signed with whsec_c2lnbmluZw",
        )
        text = " ".join(a.reason for a in audit_trail(session, row.id))
    for secret in (
        "abc123",
        "s3cr3t",
        "eyJhbGciOi",
        "user:pw",
        "Zm9vYmFyYmF6",
        "dXNlcmtleXVzZXJrZXl1c2Vy",
        "c2lnbmluZw",
    ):
        assert secret not in text
    assert "https://***@files.example/m.safetensors?***" in text


# ------------------------------------------------------------------ the slot index


def test_the_live_slot_index_rejects_a_second_rental_until_the_first_has_ended(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        first = rent(session, clock, slot=0)
        with pytest.raises(SlotTaken, match="slot 0 of profile 'sdxl'"):
            rent(session, clock, slot=0)
        # The refusal leaves the transaction usable: other slots and profiles are free.
        other_slot = rent(session, clock, slot=1)
        other_profile = rent(session, clock, profile="flux", slot=0)
        adhoc = [rent(session, clock, slot=None) for _ in range(2)]  # no slot, no limit
        walk(session, first, clock, S.CREATING, S.BOOTING, S.READY, S.DRAINING, S.DESTROYING)
        with pytest.raises(SlotTaken):
            rent(session, clock, slot=0)  # destroying still bills
        walk(session, first, clock, S.DESTROYED)
        second = rent(session, clock, slot=0)
        walk(session, second, clock, S.CREATING, S.FAILED)
        third = rent(session, clock, slot=0)
    assert len({first.id, second.id, third.id, other_slot.id, other_profile.id}) == 5
    assert all(row.slot is None for row in adhoc)
    with store.transaction() as session:
        rows = session.execute(
            sa.select(InstanceRow).where(InstanceRow.profile == "sdxl", InstanceRow.slot == 0)
        ).scalars()
        assert sorted((r.id, r.state) for r in rows) == [
            (first.id, S.DESTROYED),
            (second.id, S.FAILED),
            (third.id, S.REQUESTED),
        ]


def test_the_database_itself_refuses_a_second_live_row_for_a_slot(
    store: Store, clock: ManualClock
) -> None:
    """Not the repository's check: the partial unique index, with a raw insert."""
    values = dict(
        fleet_id=FLEET,
        profile="sdxl",
        slot=3,
        provider="vast",
        stage_entered_at=0.0,
        created_at=0.0,
        updated_at=0.0,
    )
    with store.engine.begin() as connection:
        insert = sa.insert(InstanceRow.__table__)
        connection.execute(insert, [{**values, "label": "a", "state": "destroyed"}])
        connection.execute(insert, [{**values, "label": "b", "state": "failed"}])
        connection.execute(insert, [{**values, "label": "c", "state": "ready"}])
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(insert, [{**values, "label": "d", "state": "requested"}])


@pytest.mark.parametrize("racers", [2, 8])
def test_racers_recording_a_rental_for_one_slot_leave_exactly_one_row(
    store: Store, clock: ManualClock, racers: int
) -> None:
    rounds = 10
    outcomes: dict[int, list[object]] = {slot: [] for slot in range(rounds)}
    lock = threading.Lock()

    def race(slot: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            with store.transaction() as session:
                row = rent(session, clock, slot=slot)
                outcome: object = row.id
        except SlotTaken as error:
            outcome = error
        with lock:
            outcomes[slot].append(outcome)

    for slot in range(rounds):
        barrier = threading.Barrier(racers)
        threads = [threading.Thread(target=race, args=(slot, barrier)) for _ in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    for slot, results in outcomes.items():
        winners = [r for r in results if isinstance(r, int)]
        assert len(winners) == 1, (slot, results)
        assert sum(isinstance(r, SlotTaken) for r in results) == racers - 1
    with store.transaction() as session:
        live = live_instances(session, profile="sdxl")
        assert sorted(row.slot or 0 for row in live) == list(range(rounds))
        assert len(audit_trail(session)) == rounds


RENT_IN_A_PROCESS = """
import sys
from comfyfleet.errors import SlotTaken
from comfyfleet.store import Store, create_instance

store = Store.open(sys.argv[1], migrate=False)
with store.engine.connect():
    pass  # connected before the start signal, so the race is on the insert
print("ready", flush=True)
sys.stdin.readline()
try:
    with store.transaction() as session:
        create_instance(session, fleet_id="main", profile="sdxl", slot=5, provider="vast",
                        now=0.0, actor=sys.argv[2])
    print("won", flush=True)
except SlotTaken:
    print("refused", flush=True)
store.close()
"""


def test_two_processes_recording_a_rental_for_one_slot_leave_exactly_one_row(
    store: Store, store_url: str
) -> None:
    """Two ``serve`` processes, each with its own engine and connection pool."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RENT_IN_A_PROCESS, store_url, f"serve-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert outcomes == ["refused", "won"]
    assert [process.returncode for process in processes] == [0, 0]
    with store.transaction() as session:
        [row] = live_instances(session)
        [created] = audit_trail(session)
    assert row.slot == 5 and created.instance_id == row.id
    assert created.actor in {"serve-0", "serve-1"}


# ------------------------------------------------------------------ caps


def test_caps_count_every_live_instance_at_its_price(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        prices = iter([0.5, 0.25, 1.0, 2.0, 4.0, 8.0])
        requested = rent(session, clock, slot=0, dph_total=next(prices))
        booting = rent(session, clock, slot=1, dph_total=next(prices))
        walk(session, booting, clock, S.CREATING, S.BOOTING)
        destroying = rent(session, clock, slot=2, dph_total=next(prices))
        walk(session, destroying, clock, S.CREATING, S.DESTROYING)
        destroyed = rent(session, clock, slot=3, dph_total=next(prices))
        walk(session, destroyed, clock, S.CREATING, S.DESTROYING, S.DESTROYED)
        failed = rent(session, clock, slot=4, dph_total=next(prices))
        walk(session, failed, clock, S.CREATING, S.FAILED)
        rent(session, clock, profile="flux", slot=0, dph_total=next(prices))
        rent(session, clock, profile="flux", slot=1)  # price not known yet
        usage = live_usage_by_profile(session)
        live = live_instances(session, profile="sdxl")
    assert usage["sdxl"].count == 3 and usage["sdxl"].dph_total == pytest.approx(1.75)
    assert usage["flux"].count == 2 and usage["flux"].dph_total == pytest.approx(8.0)
    assert [row.id for row in live] == [requested.id, booting.id, destroying.id]
    assert {state for state in S if state not in TERMINAL_STATES} == LIVE_STATES


# ------------------------------------------------------------------ leases


def test_a_lease_has_one_holder_until_it_expires(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        a = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert a is not None and a.epoch == 1
        assert acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=30) is None
        clock.advance(20)
        renewed = renew_lease(session, a, now=clock.now(), ttl=30)
        assert renewed is not None and renewed.epoch == 1
        assert renewed.expires_at == clock.now() + 30
        again = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert again is not None and again.epoch == 1  # asking again while holding: same epoch
        clock.advance(25)  # past a's first expiry, within the renewal
        assert acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=30) is None
        assert epoch_is_current(session, "reconciler", 1, now=clock.now())
        holder = current_lease(session, "reconciler")
        assert holder is not None and holder.holder == "serve-a"


def test_a_takeover_bumps_the_epoch_and_the_old_epoch_is_no_longer_current(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        a = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert a is not None
    clock.advance(31)  # serve-a stalls past its lease (SIGSTOP)
    with store.transaction() as session:
        b = acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=30)
        assert b is not None and b.epoch == a.epoch + 1
    with store.transaction() as session:  # serve-a wakes up
        assert not epoch_is_current(session, "reconciler", a.epoch)
        assert epoch_is_current(session, "reconciler", b.epoch)
        assert renew_lease(session, a, now=clock.now(), ttl=30) is None
        assert not release_lease(session, a)
        with pytest.raises(LeaseLost, match="epoch 1"):
            require_current_epoch(session, "reconciler", a.epoch)
        require_current_epoch(session, "reconciler", b.epoch, now=clock.now())


def test_an_action_under_a_stale_epoch_is_rolled_back(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        a = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert a is not None
    clock.advance(60)
    with store.transaction() as session:
        assert acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=30)
    with pytest.raises(LeaseLost), store.transaction() as session:
        # serve-a records its rental first, then checks: the check still undoes it.
        rent(session, clock)
        require_current_epoch(session, "reconciler", a.epoch)
    with store.transaction() as session:
        assert live_instances(session) == []
        assert audit_trail(session) == []


def test_an_expired_lease_is_not_renewed_and_a_release_frees_it_at_once(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        a = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert a is not None
        clock.advance(30)
        assert renew_lease(session, a, now=clock.now(), ttl=30) is None
        assert epoch_is_current(session, "reconciler", a.epoch)  # nobody took it yet
        assert not epoch_is_current(session, "reconciler", a.epoch, now=clock.now())
        a2 = acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
        assert a2 is not None and a2.epoch == a.epoch + 1  # a new holding, a new epoch
        assert release_lease(session, a2)
        assert not epoch_is_current(session, "reconciler", a2.epoch)
        assert current_lease(session, "reconciler") is None
        b = acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=30)
        assert b is not None and b.epoch == a2.epoch + 1
        with pytest.raises(ValueError):
            acquire_lease(session, "reconciler", "serve-b", now=clock.now(), ttl=0)


def test_racers_for_a_free_lease_leave_exactly_one_holder(store: Store, clock: ManualClock) -> None:
    racers = 6
    barrier = threading.Barrier(racers)
    won: list[str] = []
    errors: list[BaseException] = []

    def race(holder: str) -> None:
        barrier.wait()
        try:
            with store.transaction() as session:
                if acquire_lease(session, "reconciler", holder, now=clock.now(), ttl=30):
                    won.append(holder)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=race, args=(f"serve-{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(won) == 1
    with store.transaction() as session:
        lease = current_lease(session, "reconciler")
        assert lease is not None and lease.holder == won[0] and lease.epoch == 1


# ------------------------------------------------------------------ blocklist


def test_blocked_machines_are_listed_until_their_block_expires(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    with store.transaction() as session:
        origin = rent(session, clock)
        block_machine(
            session,
            7,
            provider="vast",
            reason="no space left on device",
            now=now,
            ttl=3600,
            instance_id=origin.id,
        )
        block_machine(session, 8, provider="vast", reason="load_failed", now=now, ttl=60)
        block_machine(session, 7, provider="sim", reason="other provider", now=now, ttl=60)
        assert blocked_machine_ids(session, now, provider="vast") == {7, 8}
        assert blocked_machine_ids(session, now, provider="sim") == {7}
        entries = active_blocks(session, now, provider="vast")
        assert [(e.machine_id, e.reason) for e in entries] == [
            (8, "load_failed"),
            (7, "no space left on device"),
        ]
        assert entries[1].instance_id == origin.id
        assert entries[1].expires_at == now + 3600
        assert len(active_blocks(session, now)) == 3
        # Past machine 8's expiry it is offered again; 7 is still blocked.
        assert blocked_machine_ids(session, now + 61, provider="vast") == {7}
        assert blocked_machine_ids(session, now + 3601, provider="vast") == set()


def test_blocking_a_blocked_machine_extends_its_one_entry(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    with store.transaction() as session:
        block_machine(session, 7, provider="vast", reason="first", now=now, ttl=3600)
        block_machine(session, 7, provider="vast", reason="second", now=now + 10, ttl=7200)
        block_machine(session, 7, provider="vast", reason="third", now=now + 20, ttl=1)
        [entry] = active_blocks(session, now + 20)
        assert entry.expires_at == now + 10 + 7200
        assert entry.reason == "third"


def test_a_block_can_be_lifted_and_old_entries_purged(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    with store.transaction() as session:
        block_machine(session, 7, provider="vast", reason="x", now=now, ttl=3600)
        block_machine(session, 8, provider="vast", reason="y", now=now, ttl=60)
        assert expire_block(session, 7, provider="vast", now=now + 1) == 1
        assert blocked_machine_ids(session, now + 1, provider="vast") == {8}
        assert expire_block(session, 7, provider="vast", now=now + 1) == 0
        assert purge_expired_blocks(session, before=now + 1) == 1
        assert purge_expired_blocks(session, before=now + 100) == 1
        assert active_blocks(session, now - 1_000) == []


# ------------------------------------------------------------------ agent tokens


def test_tokens_are_returned_once_stored_hashed_and_verified(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        token = issue_token(session, row)
        instance_id = row.id
    with store.transaction() as session:
        stored = get_instance(session, instance_id).agent_token_hash
        assert stored == hash_token(token) and token not in (stored or "")
        assert stored is not None and stored.startswith("sha256:")
        assert token.startswith("cft_") and len(token) > 40
        assert verify_token(session, instance_id, token)
        assert not verify_token(session, instance_id, token[:-1])
        assert not verify_token(session, instance_id, "")
        assert not verify_token(session, 12345, token)


def test_a_token_works_only_for_its_own_instance(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        a, b = rent(session, clock, slot=0), rent(session, clock, slot=1)
        token_a, token_b = issue_token(session, a), issue_token(session, b)
        assert token_a != token_b
        assert verify_token(session, a.id, token_a) and verify_token(session, b.id, token_b)
        assert not verify_token(session, a.id, token_b)
        assert not verify_token(session, b.id, token_a)


def test_a_new_token_replaces_the_old_and_revoking_ends_both(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        old = issue_token(session, row)
        new = issue_token(session, row.id)
        assert not verify_token(session, row.id, old)
        assert verify_token(session, row.id, new)
        revoke_token(session, row)
        assert not verify_token(session, row.id, new)
        assert row.agent_token_hash is None


@pytest.mark.parametrize("end", [(S.DESTROYING,), (S.DESTROYING, S.DESTROYED), (S.FAILED,)])
def test_destroying_an_instance_revokes_its_token(
    store: Store, clock: ManualClock, end: tuple[InstanceState, ...]
) -> None:
    with store.transaction() as session:
        row = rent(session, clock)
        walk(session, row, clock, S.CREATING)
        token = issue_token(session, row)
        assert verify_token(session, row.id, token)
        walk(session, row, clock, *end)
        assert not verify_token(session, row.id, token)
        with pytest.raises(StoreError, match="gets no agent token"):
            issue_token(session, row)


def test_no_table_holds_a_plain_token(store: Store, clock: ManualClock) -> None:
    tokens = []
    with store.transaction() as session:
        for slot in range(3):
            row = rent(session, clock, slot=slot)
            tokens.append(issue_token(session, row))
            walk(session, row, clock, S.CREATING, S.BOOTING)
        block_machine(session, 1, provider="vast", reason="x", now=clock.now())
        acquire_lease(session, "reconciler", "serve-a", now=clock.now(), ttl=30)
    with store.transaction() as session:
        rows = all_rows(session)
        hashes = {r.agent_token_hash for r in live_instances(session)}
    assert {table for table, _ in rows} >= TABLES - {"jobs"}
    dump = repr(rows)
    for token in tokens:
        assert token not in dump
        assert token.removeprefix("cft_") not in dump
        assert token.removeprefix("cft_")[:16] not in dump
    assert hashes == {hash_token(token) for token in tokens}


# ------------------------------------------------------------------ jobs, async, audit listing


def test_the_jobs_table_records_a_job_and_its_lease(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        instance = rent(session, clock)
        job = JobRow(
            id=str(uuid.uuid4()),
            profile="sdxl",
            state=JobState.QUEUED,
            request={"workflow": "txt2img", "set": {"KSampler.seed": 1}},
            created_at=clock.now(),
            updated_at=clock.now(),
        )
        session.add(job)
        session.flush()
        job.state, job.instance_id, job.lease_id = JobState.PLACED, instance.id, "lease-1"
        job.attempts += 1
        job_id = job.id
    with store.transaction() as session:
        stored = session.get(JobRow, job_id)
        assert stored is not None
        assert (stored.state, stored.attempts, stored.lease_id) == (JobState.PLACED, 1, "lease-1")
        assert stored.request["set"] == {"KSampler.seed": 1}
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE jobs SET state = 'lost' WHERE id = :id"), {"id": job_id})


async def test_the_store_runs_repository_work_off_the_event_loop(
    store: Store, clock: ManualClock
) -> None:
    loop_thread = threading.get_ident()

    def work(session: Session) -> tuple[int, int]:
        row = rent(session, clock)
        return row.id, threading.get_ident()

    results = await asyncio.gather(*(store.run(work) for _ in range(1)))
    [(instance_id, worker_thread)] = results
    assert worker_thread != loop_thread
    trail = await store.run(lambda session: audit_trail(session, instance_id))
    assert [a.to_state for a in trail] == [S.REQUESTED]


def test_the_audit_trail_lists_one_instance_or_all_in_order(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        a, b = rent(session, clock, slot=0), rent(session, clock, slot=1)
        walk(session, a, clock, S.CREATING)
        walk(session, b, clock, S.CREATING, S.BOOTING)
        walk(session, a, clock, S.BOOTING)
    with store.transaction() as session:
        everything = audit_trail(session)
        assert [(r.instance_id, r.to_state) for r in everything] == [
            (a.id, S.REQUESTED),
            (b.id, S.REQUESTED),
            (a.id, S.CREATING),
            (b.id, S.CREATING),
            (b.id, S.BOOTING),
            (a.id, S.BOOTING),
        ]
        assert [r.to_state for r in audit_trail(session, a.id)] == [
            S.REQUESTED,
            S.CREATING,
            S.BOOTING,
        ]
        assert [r.to_state for r in audit_trail(session, b.id, limit=2)] == [
            S.CREATING,
            S.BOOTING,
        ]
        assert isinstance(everything[0], AuditRow)


# ------------------------------------------------------------------ the lifecycle table


def test_every_live_state_can_be_destroyed_and_can_fail() -> None:
    for state in LIVE_STATES - {S.DESTROYING}:
        assert can_transition(state, S.DESTROYING), state
    for state in LIVE_STATES:
        assert can_transition(state, S.FAILED), state
    for state in TERMINAL_STATES:
        assert INSTANCE_TRANSITIONS[state] == frozenset()


def test_the_boot_stages_only_move_forward() -> None:
    stages = BOOT_STAGES
    for i, earlier in enumerate(stages):
        for later in stages[i + 1 :]:
            assert can_transition(earlier, later)
            assert not can_transition(later, earlier)
    assert INSTANCE_TRANSITIONS[S.REQUESTED] == {S.CREATING, S.DESTROYING, S.DESTROYED, S.FAILED}


def test_jobs_end_once_and_requeue_only_from_placed_or_running() -> None:
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        assert JOB_TRANSITIONS[state] == frozenset()
    assert {s for s, moves in JOB_TRANSITIONS.items() if JobState.QUEUED in moves} == {
        JobState.PLACED,
        JobState.RUNNING,
    }


# ------------------------------------------------------------------ where the store lives


def test_the_default_store_is_a_sqlite_file_in_the_data_directory(tmp_path: Path) -> None:
    assert data_dir({"COMFYFLEET_DATA_DIR": str(tmp_path / "d")}) == tmp_path / "d"
    assert data_dir({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/x/comfyfleet")
    assert data_dir({"HOME": "/h"}) == Path("/h/.local/share/comfyfleet")
    env = {"COMFYFLEET_DATA_DIR": str(tmp_path / "deep" / "data"), "DATABASE_URL": " "}
    url = database_url(env)
    assert url == f"sqlite:///{tmp_path / 'deep' / 'data' / 'comfyfleet.db'}"
    opened = Store.open(url)
    try:
        assert opened.dialect == "sqlite"
        assert (tmp_path / "deep" / "data" / "comfyfleet.db").is_file()
    finally:
        opened.close()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/fleet", "postgresql+psycopg://u:p@db:5432/fleet"),
        (
            "postgresql://u@db/fleet?sslmode=require",
            "postgresql+psycopg://u@db/fleet?sslmode=require",
        ),
        ("postgresql+psycopg://u@db/fleet", "postgresql+psycopg://u@db/fleet"),
        ("sqlite:////var/lib/cf.db", "sqlite:////var/lib/cf.db"),
    ],
)
def test_database_url_maps_postgres_to_psycopg_3(given: str, expected: str) -> None:
    assert database_url({"DATABASE_URL": given}) == expected


def test_an_unsupported_database_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as refused:
        database_url({"DATABASE_URL": "mysql://root:hunter2@db/fleet"})
    assert "hunter2" not in str(refused.value)


def test_an_unreachable_postgresql_says_to_start_it_and_hides_the_password() -> None:
    with pytest.raises(StoreUnavailable, match="start PostgreSQL") as refused:
        Store.open("postgresql://postgres:hunter2@127.0.0.1:1/test?connect_timeout=2")
    assert "hunter2" not in str(refused.value)


def test_the_migrations_ship_inside_the_package() -> None:
    import comfyfleet.store as package

    migrations = Path(package.__file__).parent / "migrations"
    assert (migrations / "env.py").is_file()
    assert (migrations / "script.py.mako").is_file()
    assert sorted(p.name for p in (migrations / "versions").glob("*.py")) == [
        "0001_initial.py",
        "0002_jobs.py",
        "0003_job_delivery.py",
    ]


def test_a_postgresql_session_idle_inside_a_transaction_is_ended_after_a_minute(
    pg_url: str,
) -> None:
    """A replica stopped mid-transaction (SIGSTOP, a debugger) cannot hold the others'
    locks for ever: the store asks PostgreSQL to end such a session after 60 s, unless the
    URL sets its own limit."""
    own = Store.open(pg_url, migrate=False)
    try:
        with own.engine.connect() as connection:
            shown = connection.execute(sa.text("SHOW idle_in_transaction_session_timeout"))
            assert shown.scalar_one() == "1min"
    finally:
        own.close()
    options = f"{make_url(pg_url).query['options']} -cidle_in_transaction_session_timeout=5000"
    mine = make_url(pg_url).update_query_dict({"options": options})
    chosen = Store.open(mine.render_as_string(hide_password=False), migrate=False)
    try:
        with chosen.engine.connect() as connection:
            shown = connection.execute(sa.text("SHOW idle_in_transaction_session_timeout"))
            assert shown.scalar_one() == "5s"
    finally:
        chosen.close()
