"""Jobs in the store, and user API keys, specified once and run on SQLite and PostgreSQL.

A job is queued FIFO within a priority, placed on a ready instance under a new lease,
and ends exactly once: a stale lease (the job was requeued after its instance died,
or its lease expired) is refused, and a job that succeeded never succeeds again, even
when two completions race on two connections.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from comfyfleet.clock import ManualClock
from comfyfleet.errors import StoreError
from comfyfleet.store import (
    BOOT_STAGES,
    KEY_PREFIX,
    ApiKeyRow,
    IllegalJobTransition,
    InstanceRow,
    InstanceState,
    InstanceUnavailable,
    InvalidOutputName,
    JobAlreadyEnded,
    JobOutputRow,
    JobRow,
    JobState,
    OutputNameTaken,
    StaleJobLease,
    Store,
    UnknownApiKey,
    UnknownJob,
    audit_trail,
    complete_job,
    create_instance,
    create_key,
    expire_leases,
    fail_job,
    fail_timed_out_jobs,
    finish_cancelled,
    get_instance,
    get_job,
    get_output,
    job_outputs,
    job_trail,
    job_view,
    jobs_for_key,
    jobs_timed_out,
    list_keys,
    new_job_id,
    next_jobs_for,
    place_job,
    queue_position,
    queued_counts,
    record_output,
    renew_job_lease,
    report_progress,
    request_cancel,
    requeue_jobs_of_instance,
    revoke_key,
    safe_output_name,
    start_job,
    submit_job,
    transition,
    verify_key,
)

J = JobState
S = InstanceState
SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_700_000_000.0)


def ready_instance(
    session: Session, clock: ManualClock, *, slot: int = 0, profile: str = "sdxl"
) -> InstanceRow:
    row = create_instance(
        session,
        fleet_id="main",
        profile=profile,
        slot=slot,
        provider="vast",
        now=clock.now(),
        actor="test",
        dph_total=0.36,
    )
    for stage in BOOT_STAGES:
        transition(session, row, stage, reason=f"to {stage}", actor="test", now=clock.now())
    return row


def submit(session: Session, clock: ManualClock, **extra: Any) -> JobRow:
    options: dict[str, Any] = {"profile": "sdxl", "request": {"workflow": {"3": {}}}}
    options.update(extra)
    return submit_job(session, now=clock.now(), **options)


def in_new_transaction(store: Store, work: Callable[[Session], Any]) -> Any:
    with store.transaction() as session:
        return work(session)


# ------------------------------------------------------------------ the queue


def test_jobs_wait_by_priority_then_in_submission_order(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        # Submitted at one instant: the time-ordered ids keep them in order.
        low = [submit(session, clock).id for _ in range(3)]
        high = [submit(session, clock, priority=5).id for _ in range(2)]
        urgent = submit(session, clock, priority=9).id
        other = submit(session, clock, profile="flux").id
    with store.transaction() as session:
        order = [job.id for job in next_jobs_for(session, "sdxl", limit=10)]
        assert order == [urgent, *high, *low]
        assert [job.id for job in next_jobs_for(session, "sdxl", limit=2, lock=True)] == [
            urgent,
            high[0],
        ]
        assert [job.id for job in next_jobs_for(session, "flux", limit=10)] == [other]
        assert [queue_position(session, job_id) for job_id in order] == [1, 2, 3, 4, 5, 6]
        assert queue_position(session, other) == 1
        assert queued_counts(session) == {"sdxl": 6, "flux": 1}


def test_a_later_submission_waits_behind_an_earlier_one_of_the_same_priority(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        first = submit(session, clock).id
        clock.advance(1)
        second = submit(session, clock).id
        instance = ready_instance(session, clock)
        place_job(session, first, instance.id, clock.now())
    with store.transaction() as session:
        assert queue_position(session, first) is None  # placed: no longer waiting
        assert queue_position(session, second) == 1
        assert [job.id for job in next_jobs_for(session, "sdxl", limit=5)] == [second]


def test_job_ids_are_time_ordered_uuids() -> None:
    ids = [new_job_id(1_800_000_000.0) for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(job_id).version == 7 for job_id in ids)


def test_a_submission_is_checked_and_logged(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        job = submit(session, clock, timeout_s=30, max_attempts=2)
        assert (job.state, job.attempts, job.max_attempts, job.priority) == (J.QUEUED, 0, 2, 0)
        assert [(row.from_state, row.to_state) for row in job_trail(session, job.id)] == [
            (None, J.QUEUED)
        ]
        for bad in ({"max_attempts": 0}, {"timeout_s": 0}, {"profile": ""}):
            with pytest.raises(StoreError, match=r"must|needs"):
                submit(session, clock, **bad)


# ------------------------------------------------------------------ placement and leases


def test_placement_gives_a_fresh_lease_counts_an_attempt_and_makes_the_instance_busy(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock, timeout_s=120).id
    with store.transaction() as session:
        lease = place_job(session, job_id, instance.id, clock.now(), lease_ttl_s=30)
    with store.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.attempts, job.lease_id, job.instance_id) == (
            J.PLACED,
            1,
            lease,
            instance.id,
        )
        assert job.lease_expires_at == clock.now() + 30
        assert job.deadline_at == clock.now() + 120
        assert get_instance(session, instance.id).state is S.BUSY
        assert audit_trail(session, instance.id)[-1].reason == f"job {job_id} placed on it"
        start_job(session, job_id, lease, clock.now())
        start_job(session, job_id, lease, clock.now())  # said twice: harmless
        assert get_job(session, job_id).state is J.RUNNING
    with store.transaction() as session:
        complete_job(session, job_id, lease, {"prompt_id": "p1"}, clock.now())
        assert get_instance(session, instance.id).state is S.READY
        # The next placement of another job draws another lease.
        other = submit(session, clock).id
        assert place_job(session, other, instance.id, clock.now()) != lease


def test_an_instance_takes_only_ready_work_of_its_profile_up_to_its_limit(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        first, second, third = (submit(session, clock).id for _ in range(3))
        flux = submit(session, clock, profile="flux").id
        place_job(session, first, instance.id, clock.now())
        with pytest.raises(InstanceUnavailable, match="at most 1"):
            place_job(session, second, instance.id, clock.now())
        with pytest.raises(InstanceUnavailable, match="profile"):
            place_job(session, flux, instance.id, clock.now())
        with pytest.raises(IllegalJobTransition, match="only a queued job"):
            place_job(session, first, instance.id, clock.now())
        place_job(session, second, instance.id, clock.now(), max_jobs_per_instance=2)
        assert get_instance(session, instance.id).state is S.BUSY
        transition(session, instance.id, S.DRAINING, reason="scale down", actor="t", now=0)
        with pytest.raises(InstanceUnavailable, match="draining"):
            place_job(session, third, instance.id, clock.now())


def test_a_draining_instance_stays_draining_when_its_job_ends(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        lease = place_job(session, job_id, instance.id, clock.now())
        transition(session, instance.id, S.DRAINING, reason="scale down", actor="t", now=0)
        complete_job(session, job_id, lease, {}, clock.now())
        assert get_instance(session, instance.id).state is S.DRAINING


def test_a_stale_lease_cannot_start_complete_record_outputs_report_or_renew(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        first = ready_instance(session, clock, slot=0)
        second = ready_instance(session, clock, slot=1)
        job_id = submit(session, clock).id
        old = place_job(session, job_id, first.id, clock.now())
        requeue_jobs_of_instance(session, first.id, "instance lost", clock.now())
        new = place_job(session, job_id, second.id, clock.now())
    attempts: list[Callable[[Session], Any]] = [
        lambda s: start_job(s, job_id, old, clock.now()),
        lambda s: complete_job(s, job_id, old, {"stale": True}, clock.now()),
        lambda s: fail_job(s, job_id, old, "boom", clock.now()),
        lambda s: record_output(s, job_id, old, "a.png", SHA_A, 1, "image", now=clock.now()),
        lambda s: renew_job_lease(s, job_id, old, clock.now()),
        lambda s: report_progress(s, job_id, old, {"step": 3}, clock.now()),
        lambda s: finish_cancelled(s, job_id, old, clock.now()),
        lambda s: complete_job(s, job_id, "not-a-lease", {}, clock.now()),
        lambda s: complete_job(s, job_id, "lease-ünicode", {}, clock.now()),
    ]
    for attempt in attempts:
        with pytest.raises(StaleJobLease, match="no longer held under the lease presented"):
            in_new_transaction(store, attempt)
    with store.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.lease_id, job.instance_id, job.attempts) == (
            J.PLACED,
            new,
            second.id,
            2,
        )
        assert job.result is None and job_outputs(session, job_id) == []


def test_a_renewed_lease_outlives_its_first_expiry_and_an_expired_one_requeues(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        lease = place_job(session, job_id, instance.id, clock.now(), lease_ttl_s=30)
        start_job(session, job_id, lease, clock.now())
    clock.advance(20)
    with store.transaction() as session:
        renew_job_lease(session, job_id, lease, clock.now(), lease_ttl_s=30)
    clock.advance(20)  # past the first expiry, not the renewed one
    with store.transaction() as session:
        assert expire_leases(session, clock.now()) == []
        assert get_job(session, job_id).state is J.RUNNING
    clock.advance(11)
    with store.transaction() as session:
        [expired] = expire_leases(session, clock.now())
        assert expired.id == job_id
        job = get_job(session, job_id)
        assert (job.state, job.attempts, job.lease_id, job.instance_id) == (J.QUEUED, 1, None, None)
        assert "lease expired" in job_trail(session, job_id)[-1].reason
        # The instance no longer holds a leased job.
        assert get_instance(session, instance.id).state is S.READY
    with pytest.raises(StaleJobLease):
        in_new_transaction(store, lambda s: renew_job_lease(s, job_id, lease, clock.now()))


# ------------------------------------------------------------------ instance death, exactly once


def test_a_dead_instances_job_completes_once_elsewhere_and_never_twice(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        doomed = ready_instance(session, clock, slot=0)
        survivor = ready_instance(session, clock, slot=1)
        job_id = submit(session, clock).id
        old = place_job(session, job_id, doomed.id, clock.now())
        start_job(session, job_id, old, clock.now())
        record_output(session, job_id, old, "half.png", SHA_A, 10, "image", now=clock.now())
    clock.advance(5)
    with store.transaction() as session:
        transition(session, doomed.id, S.DESTROYING, reason="gone", actor="t", now=clock.now())
        [requeued] = requeue_jobs_of_instance(session, doomed.id, "heartbeat lost", clock.now())
        assert requeued.id == job_id
        job = get_job(session, job_id)
        assert (job.state, job.attempts, job.lease_id) == (J.QUEUED, 1, None)
        # The dead attempt's outputs are not the job's.
        assert job_outputs(session, job_id) == []
        assert queue_position(session, job_id) == 1
    with store.transaction() as session:
        new = place_job(session, job_id, survivor.id, clock.now())
        start_job(session, job_id, new, clock.now())
        record_output(session, job_id, new, "final.png", SHA_B, 20, "image", now=clock.now())
    # The dead instance's agent comes back and reports: refused.
    with pytest.raises(StaleJobLease):
        in_new_transaction(store, lambda s: complete_job(s, job_id, old, {"by": "old"}, 0.0))
    with store.transaction() as session:
        done = complete_job(session, job_id, new, {"by": "survivor"}, clock.now())
        assert (done.state, done.attempts, done.result) == (J.SUCCEEDED, 2, {"by": "survivor"})
    with pytest.raises(JobAlreadyEnded, match="already ended: it succeeded"):
        in_new_transaction(store, lambda s: complete_job(s, job_id, new, {"again": 1}, 0.0))
    with pytest.raises(JobAlreadyEnded):
        in_new_transaction(store, lambda s: fail_job(s, job_id, new, "late", 0.0))
    with store.transaction() as session:
        job = get_job(session, job_id)
        assert job.result == {"by": "survivor"}
        trail = [(row.from_state, row.to_state, row.attempt) for row in job_trail(session, job_id)]
        assert trail == [
            (None, J.QUEUED, 0),
            (J.QUEUED, J.PLACED, 1),
            (J.PLACED, J.RUNNING, 1),
            (J.RUNNING, J.QUEUED, 1),
            (J.QUEUED, J.PLACED, 2),
            (J.PLACED, J.RUNNING, 2),
            (J.RUNNING, J.SUCCEEDED, 2),
        ]
        assert [out.name for out in job_outputs(session, job_id)] == ["final.png"]
        assert get_instance(session, survivor.id).state is S.READY
        assert get_instance(session, doomed.id).state is S.DESTROYING


def _placed_job(store: Store, clock: ManualClock) -> tuple[str, str]:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        lease = place_job(session, job_id, instance.id, clock.now())
        start_job(session, job_id, lease, clock.now())
    return job_id, lease


def _other_store(store: Store) -> Store:
    return Store.open(store.engine.url.render_as_string(hide_password=False), migrate=False)


def test_a_completion_waiting_on_another_sees_it_and_is_refused(
    store: Store, clock: ManualClock
) -> None:
    """Two control-plane replicas get the same completion (a retried request): the second
    waits on the first's lock, then finds the job ended."""
    job_id, lease = _placed_job(store, clock)
    other = _other_store(store)
    outcome: list[object] = []

    def second() -> None:
        try:
            with other.transaction() as session:
                complete_job(session, job_id, lease, {"by": "second"}, clock.now())
            outcome.append("succeeded")
        except JobAlreadyEnded as error:
            outcome.append(error)

    try:
        with store.transaction() as session:
            complete_job(session, job_id, lease, {"by": "first"}, clock.now())
            racer = threading.Thread(target=second)
            racer.start()
            time.sleep(0.5)
            assert racer.is_alive(), "the second completion should wait for the first's commit"
        racer.join(timeout=30)
    finally:
        other.close()
    assert len(outcome) == 1 and isinstance(outcome[0], JobAlreadyEnded)
    with store.transaction() as session:
        assert get_job(session, job_id).result == {"by": "first"}
        assert [r.to_state for r in job_trail(session, job_id)].count(J.SUCCEEDED) == 1


def race_completions(
    stores: list[Store], job_id: str, leases: list[str], clock: ManualClock
) -> list[object]:
    """Racer ``i`` completes ``job_id`` under ``leases[i]`` on ``stores[i]``, all at once:
    the racer's number when it won, else the error it got."""
    barrier = threading.Barrier(len(stores))
    results: list[object] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        barrier.wait()
        try:
            with stores[i].transaction() as session:
                complete_job(session, job_id, leases[i], {"racer": i}, clock.now())
            result: object = i
        except (JobAlreadyEnded, StaleJobLease) as error:
            result = error
        with lock:
            results.append(result)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.parametrize("racers", [2, 6])
def test_racing_completions_on_separate_connections_succeed_exactly_once(
    store: Store, clock: ManualClock, racers: int
) -> None:
    rounds = 5
    stores = [_other_store(store) for _ in range(racers)]
    try:
        for _ in range(rounds):
            job_id, lease = _placed_job(store, clock)
            with store.transaction() as session:
                # The job's instance dies and it is requeued and placed elsewhere: half the
                # racers hold the stale lease, half the current one.
                old_instance = get_job(session, job_id).instance_id
                assert old_instance is not None
                transition(session, old_instance, S.DESTROYING, reason="x", actor="t", now=0)
                requeue_jobs_of_instance(session, old_instance, "heartbeat lost", clock.now())
                transition(session, old_instance, S.DESTROYED, reason="x", actor="t", now=0)
                clock.advance(1)
                fresh = ready_instance(session, clock, slot=old_instance + 1000)
                current = place_job(session, job_id, fresh.id, clock.now())
            leases = [current if i % 2 == 0 else lease for i in range(racers)]
            results = race_completions(stores, job_id, leases, clock)
            winners = [r for r in results if isinstance(r, int)]
            assert len(winners) == 1, results
            assert winners[0] % 2 == 0  # only a holder of the current lease may win
            assert sum(isinstance(r, StaleJobLease) for r in results) == racers // 2
            with store.transaction() as session:
                job = get_job(session, job_id)
                assert (job.state, job.result) == (J.SUCCEEDED, {"racer": winners[0]})
                trail = [r.to_state for r in job_trail(session, job_id)]
                assert trail.count(J.SUCCEEDED) == 1
    finally:
        for opened in stores:
            opened.close()


def test_a_job_that_spent_its_attempts_fails_with_the_reason(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        job_id = submit(session, clock, max_attempts=2).id
    for slot, reason in enumerate(["heartbeat lost", "provider says exited"]):
        with store.transaction() as session:
            instance = ready_instance(session, clock, slot=slot)
            place_job(session, job_id, instance.id, clock.now())
            transition(session, instance, S.DESTROYING, reason="x", actor="t", now=clock.now())
            requeue_jobs_of_instance(session, instance.id, reason, clock.now())
    with store.transaction() as session:
        job = get_job(session, job_id)
        assert (job.state, job.attempts) == (J.FAILED, 2)
        assert job.error == "gave up after 2 attempt(s): provider says exited"
        assert job.finished_at == clock.now()
        assert next_jobs_for(session, "sdxl") == []


def test_an_agent_may_hand_a_job_back_for_another_attempt(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock, max_attempts=2).id
        lease = place_job(session, job_id, instance.id, clock.now())
        fail_job(session, job_id, lease, "ComfyUI crashed", clock.now(), retry=True)
        assert get_job(session, job_id).state is J.QUEUED
        assert get_instance(session, instance.id).state is S.READY
        lease = place_job(session, job_id, instance.id, clock.now())
        fail_job(session, job_id, lease, "ComfyUI crashed", clock.now(), retry=True)
        job = get_job(session, job_id)
        assert (job.state, job.error) == (J.FAILED, "gave up after 2 attempt(s): ComfyUI crashed")


def test_a_workflow_error_fails_the_job_at_once_with_comfyuis_words(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        lease = place_job(session, job_id, instance.id, clock.now())
        fail_job(session, job_id, lease, "node 3 (KSampler): steps: expected int", clock.now())
        job = get_job(session, job_id)
        assert (job.state, job.attempts) == (J.FAILED, 1)
        assert job.error == "node 3 (KSampler): steps: expected int"
        assert get_instance(session, instance.id).state is S.READY


# ------------------------------------------------------------------ cancel and timeouts


def test_cancelling_a_queued_job_ends_it_at_once(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        job_id = submit(session, clock).id
        job = request_cancel(session, job_id, clock.now())
        assert (job.state, job.finished_at) == (J.CANCELLED, clock.now())
        assert request_cancel(session, job_id, clock.now()).state is J.CANCELLED  # again: same
        assert next_jobs_for(session, "sdxl") == []


def test_cancelling_a_running_job_asks_its_agent_to_interrupt_it(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        lease = place_job(session, job_id, instance.id, clock.now())
        start_job(session, job_id, lease, clock.now())
        with pytest.raises(IllegalJobTransition, match="no cancel was requested"):
            finish_cancelled(session, job_id, lease, clock.now())
    with store.transaction() as session:
        job = request_cancel(session, job_id, clock.now())
        assert (job.state, job.cancel_requested_at) == (J.RUNNING, clock.now())
        # The agent learns of it on its next renewal, interrupts ComfyUI and says so.
        assert renew_job_lease(session, job_id, lease, clock.now()).cancel_requested_at
        finish_cancelled(session, job_id, lease, clock.now())
        job = get_job(session, job_id)
        assert job.state is J.CANCELLED
        assert get_instance(session, instance.id).state is S.READY
        assert [r.reason for r in job_trail(session, job_id)][-2:] == [
            "cancel requested: its agent interrupts it",
            "interrupted and cancelled",
        ]


def test_a_job_whose_cancel_was_requested_is_not_queued_again(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job_id = submit(session, clock).id
        place_job(session, job_id, instance.id, clock.now(), lease_ttl_s=10)
        request_cancel(session, job_id, clock.now())
    clock.advance(11)
    with store.transaction() as session:
        expire_leases(session, clock.now())
        assert get_job(session, job_id).state is J.CANCELLED


def test_a_finished_job_cannot_be_cancelled(store: Store, clock: ManualClock) -> None:
    job_id, lease = _placed_job(store, clock)
    with store.transaction() as session:
        complete_job(session, job_id, lease, {}, clock.now())
        with pytest.raises(JobAlreadyEnded):
            request_cancel(session, job_id, clock.now())


def test_a_job_past_its_timeout_fails_with_the_reason(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        slow = submit(session, clock, timeout_s=60).id
        lease = place_job(session, slow, instance.id, clock.now(), lease_ttl_s=600)
        start_job(session, slow, lease, clock.now())
    clock.advance(59)
    with store.transaction() as session:
        assert jobs_timed_out(session, clock.now()) == []
        assert fail_timed_out_jobs(session, clock.now()) == []
    clock.advance(2)
    with store.transaction() as session:
        assert [job.id for job in jobs_timed_out(session, clock.now())] == [slow]
        [failed] = fail_timed_out_jobs(session, clock.now())
        assert (failed.id, failed.instance_id) == (slow, instance.id)  # whom to interrupt
        job = get_job(session, slow)
        assert (job.state, job.error) == (J.FAILED, "timed out: it ran past its timeout of 60 s")
        assert get_instance(session, instance.id).state is S.READY
    # The agent, still working, is refused on its next report and interrupts.
    with pytest.raises(JobAlreadyEnded):
        in_new_transaction(store, lambda s: renew_job_lease(s, slow, lease, clock.now()))


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("ComfyUI_00001_.png", "ComfyUI_00001_.png"),
        ("sub/folder/clip.mp4", "clip.mp4"),
        ("C:\\out\\a.webp", "a.webp"),
        ("/abs/path/notes.txt", "notes.txt"),
        ("..\\..\\win.ini", "win.ini"),
        (" spaced.png ", "spaced.png"),
        ("été.png", "été.png"),
    ],
)
def test_output_names_are_reduced_to_base_names(given: str, expected: str) -> None:
    assert safe_output_name(given) == expected


@pytest.mark.parametrize(
    "given",
    ["", "   ", ".", "..", "a/..", "dir/", "a\x00b.png", "line\nbreak.png", "x\u202egnp.exe"],
)
def test_output_names_without_a_file_name_or_with_control_characters_are_refused(
    given: str,
) -> None:
    with pytest.raises(InvalidOutputName):
        safe_output_name(given)


def test_outputs_are_recorded_under_the_current_lease_by_base_name(
    store: Store, clock: ManualClock
) -> None:
    job_id, lease = _placed_job(store, clock)
    with store.transaction() as session:
        row = record_output(
            session, job_id, lease, "../../etc/passwd", SHA_A.upper(), 5, "text", now=clock.now()
        )
        assert (row.name, row.sha256, row.content_type) == (
            "passwd",
            SHA_A,
            "application/octet-stream",
        )
        image = record_output(
            session, job_id, lease, "out/a.png", SHA_B, 7, "image", now=clock.now()
        )
        assert image.content_type == "image/png"
        # A retried upload of the same file is harmless; other content under that name is not.
        again = record_output(session, job_id, lease, "a.png", SHA_B, 7, "image", now=clock.now())
        assert again.id == image.id
        with pytest.raises(OutputNameTaken):
            record_output(session, job_id, lease, "b/a.png", SHA_A, 7, "image", now=clock.now())
        with pytest.raises(InvalidOutputName):
            record_output(session, job_id, lease, "../", SHA_A, 1, "image", now=clock.now())
        with pytest.raises(Exception, match="sha256"):
            record_output(session, job_id, lease, "c.png", "abc", 1, "image", now=clock.now())
        assert [o.name for o in job_outputs(session, job_id)] == ["passwd", "a.png"]
        assert get_output(session, job_id, "a.png").sha256 == SHA_B


# ------------------------------------------------------------------ API keys


def test_a_key_is_shown_once_stored_hashed_and_verified(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        row, key = create_key(session, "ci", now=clock.now())
        assert key.startswith(KEY_PREFIX) and len(key) > 40
        assert row.prefix == key[:11] and row.name == "ci"
        key_id = row.id
    with store.engine.connect() as connection:
        dump = repr(connection.execute(sa.text("SELECT * FROM api_keys")).all())
    assert key not in dump and key[11:] not in dump and key[-20:] not in dump
    clock.advance(5)
    with store.transaction() as session:
        found = verify_key(session, key, now=clock.now())
        assert found is not None and found.id == key_id
        assert found.last_used_at == clock.now()
        clock.advance(10)
        assert verify_key(session, key, now=clock.now()) is not None
        assert get_key_last_used(session, key_id) == clock.now() - 10  # at most once a minute


def get_key_last_used(session: Session, key_id: int) -> float | None:
    row = session.get(ApiKeyRow, key_id)
    assert row is not None
    return row.last_used_at


def test_a_wrong_or_revoked_key_is_refused(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        row, key = create_key(session, "laptop", now=clock.now())
        _, other_key = create_key(session, "ci", now=clock.now())
        assert verify_key(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert verify_key(session, "") is None
        assert verify_key(session, "cft_" + key[3:]) is None
        revoke_key(session, row.id, now=clock.now())
        revoke_key(session, row.id, now=clock.now() + 1)  # twice: the first time stays
        assert verify_key(session, key) is None
        assert verify_key(session, other_key) is not None
        assert [k.name for k in list_keys(session)] == ["laptop", "ci"]
        assert [k.name for k in list_keys(session, include_revoked=False)] == ["ci"]
        assert list_keys(session)[0].revoked_at == clock.now()
        with pytest.raises(UnknownApiKey):
            revoke_key(session, 999, now=clock.now())


def test_a_key_sees_only_its_own_jobs(store: Store, clock: ManualClock) -> None:
    with store.transaction() as session:
        mine, _ = create_key(session, "mine", now=clock.now())
        theirs, _ = create_key(session, "theirs", now=clock.now())
        my_jobs = [submit(session, clock, owner_key_id=mine.id).id for _ in range(3)]
        their_job = submit(session, clock, owner_key_id=theirs.id).id
        submit(session, clock)  # the admin's, with no key
    with store.transaction() as session:
        assert [job.id for job in jobs_for_key(session, mine.id)] == my_jobs[::-1]
        assert [job.id for job in jobs_for_key(session, theirs.id)] == [their_job]
        assert jobs_for_key(session, mine.id, states=[J.SUCCEEDED]) == []
        assert get_job(session, my_jobs[0], key_id=mine.id).id == my_jobs[0]
        with pytest.raises(UnknownJob):
            get_job(session, their_job, key_id=mine.id)
        with pytest.raises(UnknownJob):
            request_cancel(session, their_job, clock.now(), key_id=mine.id)
        with pytest.raises(UnknownJob):
            get_output(session, their_job, "x.png", key_id=mine.id)
        assert get_job(session, their_job).state is J.QUEUED


# ------------------------------------------------------------------ the view


def test_a_jobs_view_shows_progress_timing_and_outputs_and_no_secret(
    store: Store, clock: ManualClock
) -> None:
    with store.transaction() as session:
        instance = ready_instance(session, clock)
        job = submit(
            session,
            clock,
            request={"workflow": {"9": {"inputs": {"api_key": "sk-node-secret"}}}},
            webhook_url="https://hooks.example.com/done?token=abc123",
        )
        secret = job.webhook_secret
        assert secret is not None and secret.startswith("whsec_")
        view = job_view(session, job, now=clock.now())
        assert (view["state"], view["queue_position"]) == ("queued", 1)
        clock.advance(3)
        lease = place_job(session, job.id, instance.id, clock.now())
        start_job(session, job.id, lease, clock.now())
        report_progress(session, job.id, lease, {"node": "3", "step": 5, "of": 20}, clock.now())
        record_output(session, job.id, lease, "a.png", SHA_A, 9, "image", now=clock.now())
        clock.advance(100)
        complete_job(session, job.id, lease, {"prompt_id": "p"}, clock.now())
        view = job_view(session, job.id)
    assert view["state"] == "succeeded" and view["queue_position"] is None
    assert view["progress"] == {"node": "3", "step": 5, "of": 20}
    assert view["timing"] == {"queued_s": 3.0, "running_s": 100.0}
    assert view["cost"] == pytest.approx(0.36 * 100 / 3600)
    assert view["outputs"] == [
        {"name": "a.png", "sha256": SHA_A, "size": 9, "kind": "image", "content_type": "image/png"}
    ]
    assert view["webhook_url"].startswith("https://hooks.example.com/done?")
    text = repr(view)
    for hidden in (secret, lease, "sk-node-secret", "abc123"):
        assert hidden not in text


def test_no_job_output_row_is_left_without_its_job(store: Store, clock: ManualClock) -> None:
    job_id, lease = _placed_job(store, clock)
    with store.transaction() as session:
        record_output(session, job_id, lease, "a.png", SHA_A, 1, "image", now=clock.now())
    with pytest.raises(sa.exc.IntegrityError), store.transaction() as session:
        session.add(
            JobOutputRow(
                job_id="no-such-job",
                name="x.png",
                sha256=SHA_A,
                size=1,
                kind="image",
                content_type="image/png",
                created_at=0.0,
            )
        )
        session.flush()
    with pytest.raises(sa.exc.IntegrityError), store.transaction() as session:
        session.add(
            JobOutputRow(
                job_id=job_id,
                name="a.png",
                sha256=SHA_B,
                size=1,
                kind="image",
                content_type="image/png",
                created_at=0.0,
            )
        )
        session.flush()
