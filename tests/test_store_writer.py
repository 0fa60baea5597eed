"""The store's writer thread: SQLite transactions queued together share a commit, and
behave as if each had run alone (``store/writer.py``); a row locked once per transaction
is not read again (``store/locks.py``).

Real SQLite files and the real PostgreSQL server; what is checked is what a caller of
``Store.run`` sees: results, errors, the rows committed, and what each work read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from comfyfleet.errors import StoreError, UnknownInstance
from comfyfleet.store import InstanceRow, InstanceState, Store, create_instance, get_instance
from comfyfleet.store.jobs import get_job, submit_job

NOW = 1_700_000_000.0


def add_instance(session: Session, slot: int) -> int:
    row = create_instance(
        session, fleet_id="f", profile="p", slot=slot, provider="vast", now=NOW, actor="t"
    )
    return row.id


def count_instances(store: Store) -> int:
    return int(
        store.run_sync(lambda s: s.execute(select(func.count()).select_from(InstanceRow)).scalar())
    )


def commits_of(store: Store) -> list[int]:
    """A list that grows by one at each commit on the store's engine."""
    seen: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: seen.append(1))
    return seen


async def queued_together(
    store: Store, works: list[Callable[[Session], Any]], **options: Any
) -> list[Any]:
    """Run ``works`` through ``store.run`` queued behind a work that holds the writer, so
    that they are all waiting when it turns to its queue; their results or errors."""
    gate = threading.Event()
    blocker = asyncio.ensure_future(store.run(lambda _s: gate.wait(10)))
    await asyncio.sleep(0.05)  # the writer holds the blocker
    pending = [asyncio.ensure_future(store.run(work, **options)) for work in works]
    await asyncio.sleep(0.05)  # all queued
    gate.set()
    await blocker
    return await asyncio.gather(*pending, return_exceptions=True)


def test_works_queued_together_share_one_commit_and_each_sees_the_ones_before(
    sqlite_store: Store,
) -> None:
    store = sqlite_store
    commits = commits_of(store)

    def add_then_count(slot: int) -> Callable[[Session], tuple[int, int]]:
        def work(session: Session) -> tuple[int, int]:
            new = add_instance(session, slot)
            seen = session.execute(select(func.count()).select_from(InstanceRow)).scalar()
            return new, int(seen or 0)

        return work

    results = asyncio.run(
        queued_together(store, [add_then_count(n) for n in range(10)], share_commit=True)
    )
    # In order, each one after the others: the n-th saw n+1 rows.
    assert [seen for _, seen in results] == list(range(1, 11))
    assert len({new for new, _ in results}) == 10
    assert count_instances(store) == 10
    # The blocker's own commit, then one for the ten.
    assert len(commits) == 2


def test_without_share_commit_each_work_has_its_own_transaction(sqlite_store: Store) -> None:
    store = sqlite_store
    commits = commits_of(store)
    works = [lambda s, n=n: add_instance(s, n) for n in range(5)]
    asyncio.run(queued_together(store, works))
    assert count_instances(store) == 5
    assert len(commits) == 6


def test_a_failing_work_fails_alone_and_the_others_are_committed(
    sqlite_store: Store,
) -> None:
    store = sqlite_store

    def fails(session: Session) -> None:
        add_instance(session, 99)  # written, then rolled back with its error
        raise StoreError("no such thing")

    works: list[Callable[[Session], Any]] = [lambda s, n=n: add_instance(s, n) for n in range(3)]
    works.insert(1, fails)
    results = asyncio.run(queued_together(store, works, share_commit=True))

    assert isinstance(results[1], StoreError) and str(results[1]) == "no such thing"
    assert all(isinstance(r, int) for i, r in enumerate(results) if i != 1)
    slots = store.run_sync(
        lambda s: sorted(r.slot for r in s.execute(select(InstanceRow)).scalars())
    )
    assert slots == [0, 1, 2]  # slot 99 went with the failing work's error


def test_a_commit_that_fails_fails_no_work_that_could_succeed_alone(
    sqlite_store: Store,
) -> None:
    """Two works that break a constraint only together: the shared commit fails, and each
    then runs alone, the first succeeding and the second failing as it would have."""
    store = sqlite_store
    made = asyncio.run(
        queued_together(
            store, [lambda s: add_instance(s, 7), lambda s: add_instance(s, 7)], share_commit=True
        )
    )
    assert isinstance(made[0], int)
    assert isinstance(made[1], Exception)  # the live slot (p, 7) is taken
    assert count_instances(store) == 1


def test_a_result_is_handed_back_only_once_committed(sqlite_store: Store) -> None:
    """What a work returned is on disk when its caller gets it: another connection (a
    second process's) reads it then."""
    store = sqlite_store
    other = Store.open(str(store.engine.url), migrate=False)
    try:

        async def go() -> list[bool]:
            seen = []
            for slot in range(5):
                instance_id = await store.run(
                    lambda s, n=slot: add_instance(s, n), share_commit=True
                )
                found = other.run_sync(lambda s, i=instance_id: s.get(InstanceRow, i) is not None)
                seen.append(found)
            return seen

        assert asyncio.run(go()) == [True] * 5
    finally:
        other.close()


def test_a_work_runs_in_its_callers_context(sqlite_store: Store) -> None:
    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")

    async def call(name: str) -> str:
        who.set(name)
        return await sqlite_store.run(lambda _s: who.get(), share_commit=True)

    async def both() -> list[str]:
        return list(await asyncio.gather(call("alice"), call("bob")))

    assert asyncio.run(both()) == ["alice", "bob"]


def test_a_work_whose_caller_gave_up_does_not_run(sqlite_store: Store) -> None:
    store = sqlite_store

    async def go() -> None:
        gate = threading.Event()
        blocker = asyncio.ensure_future(store.run(lambda _s: gate.wait(10)))
        await asyncio.sleep(0.05)
        abandoned = asyncio.ensure_future(store.run(lambda s: add_instance(s, 1)))
        kept = asyncio.ensure_future(store.run(lambda s: add_instance(s, 2)))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned  # its call is withdrawn from the writer's queue by now
        gate.set()
        await blocker
        await kept

    asyncio.run(go())
    slots = store.run_sync(lambda s: [r.slot for r in s.execute(select(InstanceRow)).scalars()])
    assert slots == [2]


def test_closing_the_store_stops_its_writer(sqlite_store: Store) -> None:
    asyncio.run(sqlite_store.run(lambda s: add_instance(s, 1), share_commit=True))
    writers = [t for t in threading.enumerate() if t.name == "comfyfleet-store"]
    assert writers
    sqlite_store.close()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in writers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in writers)


# ------------------------------------------------------------------ locks


def selects_of(store: Store) -> list[str]:
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", note)
    return seen


def test_a_row_locked_once_is_not_read_again_in_the_same_transaction(store: Store) -> None:
    instance_id = store.run_sync(lambda s: add_instance(s, 1))
    selects = selects_of(store)

    def work(session: Session) -> tuple[InstanceState, int]:
        first = get_instance(session, instance_id, lock=True)
        first.state = InstanceState.CREATING  # changed in this transaction, not flushed
        again = get_instance(session, instance_id, lock=True)
        assert again is first
        return again.state, len(selects)

    state, reads = store.run_sync(work)
    assert (state, reads) == (InstanceState.CREATING, 1)

    # A new transaction reads it again, as it is now.
    def later(session: Session) -> InstanceState:
        return get_instance(session, instance_id, lock=True).state

    assert store.run_sync(later) is InstanceState.CREATING
    assert len(selects) == 2


def test_a_row_read_without_the_lock_is_read_again_to_lock_it(store: Store) -> None:
    instance_id = store.run_sync(lambda s: add_instance(s, 1))
    selects = selects_of(store)

    def work(session: Session) -> None:
        read = get_instance(session, instance_id)
        locked = get_instance(session, instance_id, lock=True)
        again = get_instance(session, instance_id, lock=True)
        assert read is locked is again

    store.run_sync(work)
    assert len(selects) == 2


def test_a_locked_job_of_another_key_still_reads_as_unknown(store: Store) -> None:
    job_id = store.run_sync(
        lambda s: submit_job(s, profile="p", request={}, now=NOW, owner_key_id=None).id
    )

    def work(session: Session) -> None:
        get_job(session, job_id, lock=True)
        get_job(session, job_id, lock=True, key_id=12345)

    with pytest.raises(StoreError, match=job_id):
        store.run_sync(work)


def test_an_unknown_instance_is_still_unknown_when_locked(store: Store) -> None:
    with pytest.raises(UnknownInstance):
        store.run_sync(lambda s: get_instance(s, 424242, lock=True))
