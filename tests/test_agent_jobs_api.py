"""The agent's job calls (docs/agent-protocol.md, "Jobs (the agent's side)"), over real sockets.

Each test serves a fresh app with uvicorn on loopback over the store, on SQLite and on
PostgreSQL (``store`` in tests/conftest.py), and plays the agent with plain HTTP calls.
Jobs are recorded with ``store.jobs.submit_job``, as the user's ``POST /api/jobs`` does;
a test route wakes the waiting agents the way that call does after its submit.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import Request

from comfyfleet.api.context import ApiContext
from comfyfleet.lifecycle import InstanceState, JobState
from comfyfleet.outputs import LocalOutputStore
from comfyfleet.scheduler.dispatch import Candidate, choose_job
from comfyfleet.scheduler.signals import profile_key
from comfyfleet.store import Store, get_instance
from comfyfleet.store.jobs import (
    expire_leases,
    get_job,
    job_outputs,
    job_trail,
    request_cancel,
    submit_job,
)
from comfyfleet.store.models import JobRow
from tests.test_api import T0, Api, Rental, rent, served, state_of

S = InstanceState
J = JobState
WORKFLOW: dict[str, Any] = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
MAX_OUTPUT = 64 * 1024
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
IMAGE_SHA = hashlib.sha256(IMAGE).hexdigest()


# ------------------------------------------------------------------ helpers


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[Api]:
    with served(store, tmp_path, settings={"max_output_bytes": MAX_OUTPUT}) as served_api:
        _add_wake_route(served_api)
        yield served_api


def _add_wake_route(api: Api) -> None:
    """``POST /test/wake/{profile}``: what the user's submit does once its job is stored."""

    async def wake(profile: str, request: Request) -> dict[str, bool]:
        ctx: ApiContext = request.app.state.ctx
        ctx.signals.notify(profile_key(profile))
        return {"ok": True}

    api.server.app.add_api_route("/test/wake/{profile}", wake, methods=["POST"])


def submit(
    api: Api,
    *,
    profile: str = "sdxl",
    priority: int = 0,
    pinned: int | None = None,
    inputs: list[dict[str, Any]] | None = None,
    timeout_s: float | None = None,
    max_attempts: int = 3,
) -> str:
    request = {"workflow": WORKFLOW, "inputs": inputs or [], "params": {"prompt": "a cat"}}

    def work(session: Any) -> str:
        return submit_job(
            session,
            profile=profile,
            request=request,
            now=api.clock.now(),
            priority=priority,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            pinned_instance_id=pinned,
        ).id

    return api.store.run_sync(work)


def call(
    api: Api,
    rental: Rental,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    """An agent's call to ``/api/agent/{path}`` with its token (and ``headers``)."""
    sent = {"Authorization": f"Bearer {rental.token}", **(headers or {})}
    return api.http.request(method, f"/api/agent/{path}", headers=sent, **kw)


def job_row(api: Api, job_id: str) -> JobRow:
    return api.store.run_sync(lambda session: get_job(session, job_id))


def take(api: Api, rental: Rental, wait: float = 0) -> dict[str, Any] | None:
    response = call(
        api, rental, "GET", "jobs/next", params={"instance_id": rental.id, "wait": wait}
    )
    assert response.status_code == 200, response.text
    job: dict[str, Any] | None = response.json()["job"]
    return job


def taken(api: Api, rental: Rental) -> dict[str, Any]:
    job = take(api, rental)
    assert job is not None, "expected a job"
    return job


def report(
    api: Api, rental: Rental, job: dict[str, Any], lease: str | None = None, **progress: Any
) -> httpx.Response:
    body = {"lease_id": lease or job["lease_id"], "progress": {"state": "running", **progress}}
    return call(api, rental, "POST", f"jobs/{job['job_id']}/progress", json=body)


def upload(
    api: Api,
    rental: Rental,
    job: dict[str, Any],
    name: str = "ComfyUI_00001_.png",
    data: bytes = IMAGE,
    sha256: str | None = None,
    **kw: Any,
) -> httpx.Response:
    headers = {
        "X-Comfyfleet-Lease": job["lease_id"],
        "X-Comfyfleet-Sha256": sha256 or hashlib.sha256(data).hexdigest(),
    }
    return call(
        api,
        rental,
        "PUT",
        f"jobs/{job['job_id']}/outputs/{quote(name, safe='')}",
        content=data,
        headers=headers,
        **kw,
    )


def output_entry(name: str = "ComfyUI_00001_.png", data: bytes = IMAGE) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "images",
        "node_id": "9",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "content_type": "image/png",
        "temporary": False,
    }


def finish(
    api: Api,
    rental: Rental,
    job: dict[str, Any],
    status: str = "succeeded",
    *,
    lease: str | None = None,
    outputs: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> httpx.Response:
    body = {
        "lease_id": lease or job["lease_id"],
        "status": status,
        "prompt_id": "p-1",
        "duration_s": 1.5,
        "outputs": outputs or [],
        **fields,
    }
    return call(api, rental, "POST", f"jobs/{job['job_id']}/finish", json=body)


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]


def outputs_store(api: Api) -> LocalOutputStore:
    return LocalOutputStore(api.settings.outputs_root())


# ------------------------------------------------------------------ the choice, as plain data


def test_the_choice_takes_a_reserved_job_first_then_priority_then_fifo() -> None:
    queue = [
        Candidate("a", 0, T0 + 1),
        Candidate("b", 5, T0 + 3),
        Candidate("c", 5, T0 + 2),
        Candidate("d", 9, T0, pinned_instance_id=8),
    ]
    assert choose_job(7, queue) == Candidate("c", 5, T0 + 2)
    assert choose_job(8, queue) == Candidate("d", 9, T0, pinned_instance_id=8)
    assert choose_job(7, [Candidate("e", 0, T0, pinned_instance_id=7), *queue]).job_id == "e"
    assert choose_job(7, [Candidate("d", 9, T0, pinned_instance_id=8)]) is None
    assert choose_job(7, []) is None


# ------------------------------------------------------------------ next


def test_next_places_the_queued_job_under_a_lease_and_makes_the_instance_busy(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    inputs = [{"name": "in.png", "sha256": IMAGE_SHA, "size": len(IMAGE)}]
    job_id = submit(api, inputs=inputs, timeout_s=600)

    job = taken(api, rental)

    assert job["job_id"] == job_id
    assert job["attempt"] == 1
    assert job["lease_ttl_s"] == 60.0 and job["renew_every_s"] == 20.0
    assert job["timeout_s"] == 600.0
    assert job["workflow"] == WORKFLOW
    assert job["inputs"] == inputs
    row = job_row(api, job_id)
    assert (row.state, row.lease_id, row.instance_id, row.attempts) == (
        J.PLACED,
        job["lease_id"],
        rental.id,
        1,
    )
    assert row.lease_expires_at == T0 + 60
    assert state_of(api.store, rental.id) is S.BUSY
    heartbeat = api.store.run_sync(lambda s: get_instance(s, rental.id).last_heartbeat_at)
    assert heartbeat == T0
    # Placed once: the instance is at its cap of one job, and nothing else is queued.
    assert take(api, rental) is None


def test_next_hands_out_the_highest_priority_first_and_fifo_within_one(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path, settings={"max_jobs_per_instance": 8}) as api:
        rental = rent(api.store, api.clock, state=S.READY)
        low_1 = submit(api)
        high_1 = submit(api, priority=5)
        low_2 = submit(api)
        api.clock.advance(1)
        high_2 = submit(api, priority=5)
        other_profile = submit(api, profile="flux")

        order = [taken(api, rental)["job_id"] for _ in range(4)]

        assert order == [high_1, high_2, low_1, low_2]
        assert take(api, rental) is None
        assert job_row(api, other_profile).state is J.QUEUED


def test_a_pinned_job_goes_to_its_own_instance_only_and_before_the_queue(api: Api) -> None:
    first = rent(api.store, api.clock, state=S.READY, slot=0)
    second = rent(api.store, api.clock, state=S.READY, slot=1)
    free_job = submit(api, priority=10)
    pinned_job = submit(api, pinned=second.id)
    later_free_job = submit(api, priority=10)

    assert taken(api, first)["job_id"] == free_job  # not the one reserved to `second`
    assert taken(api, second)["job_id"] == pinned_job  # before a higher priority
    assert job_row(api, later_free_job).state is J.QUEUED


def test_an_instance_that_is_not_ready_or_at_its_cap_is_handed_nothing(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path, settings={"max_jobs_per_instance": 2}) as api:
        warming = rent(api.store, api.clock, state=S.WARMING, slot=0)
        ready = rent(api.store, api.clock, state=S.READY, slot=1)
        jobs = [submit(api) for _ in range(3)]

        assert take(api, warming) is None
        assert taken(api, ready)["job_id"] == jobs[0]
        assert taken(api, ready)["job_id"] == jobs[1]
        assert take(api, ready) is None  # two placed: at its cap
        assert job_row(api, jobs[2]).state is J.QUEUED


def test_a_long_poll_answers_soon_after_a_submit_wakes_it(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    answer: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        answer["job"] = take(api, rental, wait=20)
        answer["after_s"] = time.monotonic() - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.3)
    job_id = submit(api)
    submitted = time.monotonic()
    assert api.http.post("/test/wake/sdxl").status_code == 200
    waiter.join(10)

    assert not waiter.is_alive()
    assert answer["job"] is not None and answer["job"]["job_id"] == job_id
    assert answer["after_s"] < 10, "it waited for its whole wait instead of being woken"
    assert time.monotonic() - submitted < 5


def test_a_long_poll_reads_the_queue_again_for_jobs_submitted_elsewhere(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["job"] = take(api, rental, wait=20)

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.2)
    job_id = submit(api)  # no wake-up: another replica's submit
    waiter.join(10)

    assert not waiter.is_alive()
    assert answer["job"] is not None and answer["job"]["job_id"] == job_id


def test_an_empty_queue_answers_null_once_the_wait_is_over(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    started = time.monotonic()
    assert take(api, rental, wait=0.3) is None
    assert time.monotonic() - started >= 0.3
    too_long = call(api, rental, "GET", "jobs/next", params={"instance_id": rental.id, "wait": 31})
    assert too_long.status_code == 422


# ------------------------------------------------------------------ progress and renewals


def test_progress_with_a_prompt_id_starts_the_job_and_answers_a_cancel_request(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    job_id = submit(api)
    job = taken(api, rental)

    api.clock.advance(10)
    queued = report(api, rental, job, state="queued", queue_position=1)
    assert queued.json() == {"cancel_requested": False, "lease_expires_at": T0 + 70}
    assert job_row(api, job_id).state is J.PLACED

    running = report(api, rental, job, prompt_id="p-1", node_id="3", value=4, max=20)
    assert running.status_code == 200
    row = job_row(api, job_id)
    assert row.state is J.RUNNING and row.started_at == T0 + 10
    assert row.progress is not None and row.progress["prompt_id"] == "p-1"
    assert row.progress["value"] == 4

    api.store.run_sync(lambda session: request_cancel(session, job_id, api.clock.now()))
    api.clock.advance(5)
    renewed = call(api, rental, "POST", f"jobs/{job_id}/renew", json={"lease_id": job["lease_id"]})
    assert renewed.json() == {"cancel_requested": True, "lease_expires_at": T0 + 75}
    assert report(api, rental, job, prompt_id="p-1").json()["cancel_requested"] is True

    cancelled = finish(api, rental, job, "cancelled", reason="interrupted")
    assert cancelled.json() == {"job_id": job_id, "state": "cancelled"}
    assert state_of(api.store, rental.id) is S.READY


# ------------------------------------------------------------------ outputs


def test_an_output_is_kept_only_when_its_bytes_have_the_announced_sha256(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    submit(api)
    job = taken(api, rental)
    blobs = outputs_store(api)

    wrong = upload(api, rental, job, sha256="0" * 64)
    refused(wrong, 422, "sha256_mismatch")
    assert not blobs.path(IMAGE_SHA).exists()
    assert not list(blobs.tmp_dir.glob("*.part"))

    stored = upload(api, rental, job, name="sub/../dir/out.png")
    assert stored.status_code == 201, stored.text
    assert stored.json() == {"name": "out.png", "sha256": IMAGE_SHA, "size": len(IMAGE)}
    assert blobs.path(IMAGE_SHA).read_bytes() == IMAGE


def test_an_output_over_the_cap_is_refused_with_413_and_not_kept(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    submit(api)
    job = taken(api, rental)
    big = b"x" * (MAX_OUTPUT + 1)
    blobs = outputs_store(api)

    refused(upload(api, rental, job, data=big), 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is met while streaming
        yield big[:MAX_OUTPUT]
        yield big[MAX_OUTPUT:]

    headers = {"X-Comfyfleet-Lease": job["lease_id"], "X-Comfyfleet-Sha256": "1" * 64}
    streamed = call(
        api,
        rental,
        "PUT",
        f"jobs/{job['job_id']}/outputs/big.bin",
        content=chunks(),
        headers=headers,
    )
    refused(streamed, 413, "too_large")
    assert not blobs.path(hashlib.sha256(big).hexdigest()).exists()
    assert not list(blobs.tmp_dir.glob("*.part"))


# ------------------------------------------------------------------ finish


def test_finish_records_the_outputs_with_the_success_and_frees_the_instance(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    job_id = submit(api)
    job = taken(api, rental)
    assert report(api, rental, job, prompt_id="p-1").status_code == 200
    assert upload(api, rental, job).status_code == 201

    api.clock.advance(3)
    done = finish(api, rental, job, outputs=[output_entry()])

    assert done.status_code == 200, done.text
    assert done.json() == {"job_id": job_id, "state": "succeeded"}
    row = job_row(api, job_id)
    assert row.state is J.SUCCEEDED and row.finished_at == T0 + 3
    assert row.result is not None
    assert row.result["prompt_id"] == "p-1" and row.result["duration_s"] == 1.5
    assert [out["name"] for out in row.result["outputs"]] == ["ComfyUI_00001_.png"]
    outputs = api.store.run_sync(lambda session: job_outputs(session, job_id))
    assert [(o.name, o.sha256, o.size, o.kind, o.content_type) for o in outputs] == [
        ("ComfyUI_00001_.png", IMAGE_SHA, len(IMAGE), "images", "image/png")
    ]
    assert state_of(api.store, rental.id) is S.READY

    refused(finish(api, rental, job, outputs=[output_entry()]), 409, "ended")
    refused(report(api, rental, job), 409, "ended")


def test_finish_refuses_an_output_that_was_not_uploaded(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    job_id = submit(api)
    job = taken(api, rental)
    assert upload(api, rental, job).status_code == 201

    missing = output_entry("never.png", b"never uploaded")
    refused(finish(api, rental, job, outputs=[output_entry(), missing]), 422, "output_missing")
    wrong_size = {**output_entry(), "size": len(IMAGE) + 1}
    refused(finish(api, rental, job, outputs=[wrong_size]), 422, "output_missing")

    row = job_row(api, job_id)
    assert row.state is J.PLACED  # nothing of the refused FINISH was kept
    assert api.store.run_sync(lambda session: job_outputs(session, job_id)) == []
    assert finish(api, rental, job, outputs=[output_entry()]).json()["state"] == "succeeded"


def test_a_retryable_failure_queues_the_job_again_with_an_attempt_spent(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    job_id = submit(api, max_attempts=2)
    job = taken(api, rental)

    again = finish(
        api,
        rental,
        job,
        "failed",
        reason="ComfyUI stopped answering",
        error="comfy_unavailable",
        retryable=True,
    )
    assert again.json() == {"job_id": job_id, "state": "queued"}
    row = job_row(api, job_id)
    assert (row.state, row.attempts, row.instance_id, row.lease_id) == (J.QUEUED, 1, None, None)
    assert state_of(api.store, rental.id) is S.READY

    second = taken(api, rental)
    assert second["job_id"] == job_id and second["attempt"] == 2
    assert second["lease_id"] != job["lease_id"]
    last = finish(api, rental, second, "failed", reason="stopped again", retryable=True)
    assert last.json()["state"] == "failed"  # its attempts are spent
    assert "stopped again" in (job_row(api, job_id).error or "")


def test_a_workflow_failure_a_timeout_and_an_unrequested_cancel_end_as_the_protocol_says(
    api: Api,
) -> None:
    rental = rent(api.store, api.clock, state=S.READY)

    failed_id = submit(api)
    job = taken(api, rental)
    answer = finish(
        api,
        rental,
        job,
        "failed",
        reason="CUDA out of memory",
        error="execution",
        node_id="3",
        node_type="KSampler",
    )
    assert answer.json()["state"] == "failed"
    assert job_row(api, failed_id).error == "execution: CUDA out of memory (node 3, KSampler)"

    timed_out_id = submit(api)
    job = taken(api, rental)
    assert finish(api, rental, job, "timed_out", reason="ran past 600 s").json()["state"] == (
        "failed"
    )
    assert "timed out" in (job_row(api, timed_out_id).error or "")

    stopping_id = submit(api)
    job = taken(api, rental)
    # Cancelled with no cancel requested: the agent is stopping; the job runs elsewhere.
    assert finish(api, rental, job, "cancelled").json()["state"] == "queued"
    assert job_row(api, stopping_id).attempts == 1


def test_a_report_under_a_lease_that_expired_is_refused_as_stale(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    job_id = submit(api)
    old = taken(api, rental)

    api.clock.advance(61)
    api.store.run_sync(lambda session: expire_leases(session, api.clock.now()))
    assert job_row(api, job_id).state is J.QUEUED

    refused(report(api, rental, old), 409, "stale_lease")
    refused(upload(api, rental, old), 409, "stale_lease")
    new = taken(api, rental)
    assert new["attempt"] == 2
    refused(finish(api, rental, old), 409, "stale_lease")
    assert finish(api, rental, new).json()["state"] == "succeeded"
    moves = [(t.from_state, t.to_state) for t in api.store.run_sync(lambda s: job_trail(s, job_id))]
    assert moves.count((J.PLACED, J.QUEUED)) == 1
    assert moves[-1] == (J.RUNNING, J.SUCCEEDED)


# ------------------------------------------------------------------ who may call


def test_only_the_instance_the_job_is_on_may_report_on_it(api: Api) -> None:
    owner = rent(api.store, api.clock, state=S.READY, slot=0)
    other = rent(api.store, api.clock, state=S.READY, slot=1)
    job_id = submit(api)
    job = taken(api, owner)
    stranger = Rental(owner.id, "cft_" + "x" * 43)

    refused(report(api, other, job), 404, "unknown_job")
    refused(upload(api, other, job), 404, "unknown_job")
    refused(finish(api, other, job), 404, "unknown_job")
    for response in (
        report(api, stranger, job),
        finish(api, stranger, job),
        call(api, other, "GET", "jobs/next", params={"instance_id": owner.id}),
        api.http.get("/api/agent/jobs/next", params={"instance_id": owner.id}),
    ):
        assert response.status_code == 401, response.text
        assert "cft_" not in response.text
    refused(report(api, owner, {**job, "job_id": "no-such-job"}), 404, "unknown_job")

    row = job_row(api, job_id)
    assert (row.state, row.instance_id) == (J.PLACED, owner.id)
    assert finish(api, owner, job).json()["state"] == "succeeded"


def test_inputs_are_served_to_the_job_under_its_current_lease(api: Api) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    blob = asyncio.run(outputs_store(api).put_stream(io.BytesIO(IMAGE)))
    submit(api, inputs=[{"name": "in.png", "sha256": blob.sha256, "size": blob.size}])
    job = taken(api, rental)
    path = f"jobs/{job['job_id']}/inputs/in.png"

    fetched = call(api, rental, "GET", path, headers={"X-Comfyfleet-Lease": job["lease_id"]})
    assert fetched.status_code == 200, fetched.text
    assert fetched.content == IMAGE
    assert fetched.headers["X-Comfyfleet-Sha256"] == IMAGE_SHA

    assert call(api, rental, "GET", path).status_code == 422  # no lease
    refused(call(api, rental, "GET", path, headers={"X-Comfyfleet-Lease": "x"}), 409, "stale_lease")
    unknown = call(
        api,
        rental,
        "GET",
        f"jobs/{job['job_id']}/inputs/other.png",
        headers={"X-Comfyfleet-Lease": job["lease_id"]},
    )
    refused(unknown, 404, "unknown_input")


def test_an_onstart_instance_is_told_its_job_at_registration_and_handed_it_first(
    api: Api,
) -> None:
    rental = rent(api.store, api.clock, state=S.READY)
    queued_first = submit(api, priority=50)
    onstart = submit(api, pinned=rental.id)

    def mark(session: Any) -> None:
        get_instance(session, rental.id).onstart_job_id = onstart

    api.store.run_sync(mark)
    registered = call(api, rental, "POST", "register", json={"instance_id": rental.id})
    assert registered.json()["onstart_job_id"] == onstart

    assert taken(api, rental)["job_id"] == onstart
    assert job_row(api, queued_first).state is J.QUEUED
