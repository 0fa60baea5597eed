"""The jobs API, the user's side (docs/agent-protocol.md, "Jobs (the user's side)").

The real app, served by uvicorn on loopback over a store on SQLite and on PostgreSQL
(``serve_app`` in tests/test_api.py). Keys are made with ``store.apikeys.create_key``; a
job's placement, outputs and end are driven with the ``store.jobs`` functions the agent
routes use, so that what a user sees is tested without an agent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from comfyfleet.api import AgentProfile
from comfyfleet.api import jobs as jobs_api
from comfyfleet.api.multipart import MultipartError, MultipartReader, PartTooLarge, boundary_of
from comfyfleet.scheduler.signals import job_key, profile_key
from comfyfleet.store import (
    JobState,
    Store,
    complete_job,
    create_key,
    get_job,
    place_job,
    record_output,
    request_cancel,
    revoke_key,
    start_job,
)
from tests.test_api import ADMIN_KEY, Api, rent, served
from tests.test_api import S as InstanceStates

PNG = bytes.fromhex("89504e470d0a1a0a") + bytes(range(256)) * 8


def node(class_type: str, title: str | None = None, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}


WORKFLOW: dict[str, Any] = {
    "1": node("LoadImage", "Reference", image="placeholder.png"),
    "3": node(
        "KSampler",
        seed=1,
        steps=20,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=0.6,
        model=["4", 0],
        positive=["6", 0],
        negative=["7", 0],
        latent_image=["5", 0],
    ),
    "4": node("CheckpointLoaderSimple", ckpt_name="sd15.safetensors"),
    "5": node("VAEEncode", pixels=["1", 0], vae=["4", 2]),
    "6": node("CLIPTextEncode", "Positive", text="a cat", clip=["4", 1]),
    "7": node("CLIPTextEncode", "Negative", text="blurry", clip=["4", 1]),
    "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
    "9": node("SaveImage", filename_prefix="out", images=["8", 0]),
}

UI_FORMAT: dict[str, Any] = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [1, "randomize", 20]}],
    "links": [[1, 4, 0, 3, 0, "MODEL"]],
    "version": 0.4,
}


# ------------------------------------------------------------------ helpers


@pytest.fixture
def api(store: Store, tmp_path: Path) -> Iterator[Api]:
    with served(store, tmp_path) as running:
        yield running


def new_key(store: Store, name: str = "alice") -> tuple[int, str]:
    def work(session: Session) -> tuple[int, str]:
        row, key = create_key(session, name, now=time.time())
        return row.id, key

    return store.run_sync(work)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit_multipart(
    api: Api,
    key: str,
    *,
    workflow: Any = WORKFLOW,
    inputs: dict[str, bytes] | None = None,
    params: dict[str, Any] | None = None,
) -> httpx.Response:
    files: list[tuple[str, Any]] = [("workflow", ("wf.json", json.dumps(workflow).encode()))]
    for name, content in (inputs or {}).items():
        files.append(("input", (name, content, "image/png")))
    form = {"params": json.dumps(params)} if params is not None else None
    return api.http.post("/api/jobs", headers=bearer(key), files=files, data=form)


def submit_json(api: Api, key: str, **body: Any) -> httpx.Response:
    body.setdefault("workflow", WORKFLOW)
    return api.http.post("/api/jobs", headers=bearer(key), json=body)


def stored(api: Api, job_id: str) -> Any:
    return api.store.run_sync(lambda session: get_job(session, job_id))


def ctx_of(api: Api) -> Any:
    return api.server.app.state.ctx


def put_blob(api: Api, data: bytes) -> str:
    blob = asyncio.run(ctx_of(api).outputs.put_stream(io.BytesIO(data)))
    return str(blob.sha256)


def place(api: Api, job_id: str) -> str:
    rental = rent(api.store, api.clock, state=InstanceStates.READY)
    return api.store.run_sync(
        lambda session: place_job(session, job_id, rental.id, api.clock.now())
    )


# ------------------------------------------------------------------ submitting


def test_a_multipart_submission_stores_its_input_and_queues_the_final_workflow(api: Api) -> None:
    key_id, key = new_key(api.store)
    answer = submit_multipart(
        api,
        key,
        inputs={"photos/in.png": PNG},
        params={"prompt": "a dog on a beach", "set": ["KSampler.steps=30"], "priority": 2},
    )
    assert answer.status_code == 201, answer.text
    view = answer.json()
    assert view["state"] == "queued" and view["queue_position"] == 1
    assert view["profile"] == "sdxl"  # the only profile served: no need to name it
    assert view["priority"] == 2 and view["attempts"] == 0 and view["max_attempts"] == 3
    assert view["outputs"] == [] and view["webhook_url"] is None
    assert "webhook_secret" not in view and "request" not in view and "lease_id" not in view

    row = stored(api, view["id"])
    assert row.owner_key_id == key_id
    digest = hashlib.sha256(PNG).hexdigest()
    assert row.request["inputs"] == [{"name": "in.png", "sha256": digest, "size": len(PNG)}]
    workflow = row.request["workflow"]
    assert workflow["1"]["inputs"]["image"] == "in.png"  # the only LoadImage takes the input
    assert workflow["6"]["inputs"]["text"] == "a dog on a beach"
    assert workflow["7"]["inputs"]["text"] == "blurry"
    assert workflow["3"]["inputs"]["steps"] == 30
    [seed] = row.request["params"]["seeds"]
    assert seed["node_id"] == "3" and workflow["3"]["inputs"]["seed"] == seed["seed"]
    assert row.request["params"]["set"] == ["KSampler.steps=30"]
    assert ctx_of(api).outputs.path(digest).read_bytes() == PNG


def test_a_json_submission_takes_base64_inputs_and_names_its_image_node(api: Api) -> None:
    _, key = new_key(api.store)
    answer = submit_json(
        api,
        key,
        inputs={"../../etc/ref.png": base64.b64encode(PNG).decode()},
        images=[{"node": "Reference", "name": "ref.png"}],
        set=["3.seed=42", "Negative.text=ugly"],
        randomize_seeds=False,
        timeout_s=90,
        max_attempts=2,
    )
    assert answer.status_code == 201, answer.text
    view = answer.json()
    assert view["timeout_s"] == 90 and view["max_attempts"] == 2
    row = stored(api, view["id"])
    assert row.request["inputs"][0]["name"] == "ref.png"  # reduced to its base name
    assert row.request["workflow"]["1"]["inputs"]["image"] == "ref.png"
    assert row.request["workflow"]["3"]["inputs"]["seed"] == 42
    assert row.request["workflow"]["7"]["inputs"]["text"] == "ugly"
    assert row.request["params"]["seeds"] == []


def test_a_webhook_secret_is_made_and_shown_once_and_the_url_query_stays_hidden(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path, settings={"webhook_allow_loopback": True}) as api:
        _, key = new_key(api.store)
        url = "http://127.0.0.1:9/hook?token=receiver-side-secret"
        answer = submit_json(api, key, webhook_url=url)
        assert answer.status_code == 201, answer.text
        made = answer.json()["webhook_secret"]
        assert made.startswith("whsec_")
        assert answer.json()["webhook_url"] == "http://127.0.0.1:9/hook?***"
        again = api.http.get(f"/api/jobs/{answer.json()['id']}", headers=bearer(key))
        assert made not in again.text and "receiver-side-secret" not in again.text

        given = submit_json(api, key, webhook_url=url, webhook_secret="s" * 32)
        assert given.status_code == 201 and "webhook_secret" not in given.json()
        assert stored(api, given.json()["id"]).webhook_secret == "s" * 32


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://example.com/hook", "https://"),
        ("https://10.0.0.1/hook", "private"),
        ("https://169.254.169.254/latest", "link-local"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://user:pw@example.com/hook", "user name or password"),
    ],
)
def test_a_webhook_url_to_a_private_network_is_refused_at_submission(
    api: Api, url: str, why: str
) -> None:
    _, key = new_key(api.store)
    answer = submit_json(api, key, webhook_url=url)
    assert answer.status_code == 422, answer.text
    assert why in answer.json()["detail"]
    assert "pw@" not in answer.text


def test_a_ui_format_workflow_is_refused_with_how_to_export_the_api_format(api: Api) -> None:
    _, key = new_key(api.store)
    for answer in (
        submit_multipart(api, key, workflow=UI_FORMAT),
        submit_json(api, key, workflow=UI_FORMAT),
    ):
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "UI-format" in detail and "Export (API)" in detail
    assert api.http.get("/api/jobs", headers=bearer(key)).json() == {"jobs": []}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("KSampler.stepz=30", "has no input 'stepz'; did you mean 'steps'"),
        ("Upscaler.scale=2", "no node 'Upscaler'"),
        ("steps30", "expected NODE.INPUT=VALUE"),
        ("3.model=4", "is connected to node 4"),
    ],
)
def test_a_bad_set_is_refused_naming_the_node_and_the_input(
    api: Api, override: str, expected: str
) -> None:
    _, key = new_key(api.store)
    answer = submit_multipart(api, key, params={"set": [override]})
    assert answer.status_code == 422, answer.text
    assert expected in answer.json()["detail"]


def test_an_unknown_profile_is_refused_listing_the_profiles_served(
    store: Store, tmp_path: Path
) -> None:
    profiles = {"sdxl": AgentProfile(), "flux": AgentProfile()}
    with served(store, tmp_path, settings={"profiles": profiles}) as api:
        _, key = new_key(api.store)
        unknown = submit_json(api, key, profile="sd3")
        assert unknown.status_code == 422
        assert "unknown profile 'sd3'" in unknown.json()["detail"]
        assert "flux, sdxl" in unknown.json()["detail"]
        unnamed = submit_json(api, key)
        assert unnamed.status_code == 422
        assert "say which profile" in unnamed.json()["detail"]
        assert submit_json(api, key, profile="flux").json()["profile"] == "flux"


def test_parameters_that_do_not_fit_are_refused_with_the_reason(
    store: Store, tmp_path: Path
) -> None:
    with served(store, tmp_path, settings={"max_output_bytes": 1000}) as api:
        _, key = new_key(api.store)
        cases = [
            (submit_json(api, key, colour="red"), 422, "colour"),
            (submit_json(api, key, max_attempts=0), 422, "max_attempts"),
            (submit_multipart(api, key, params={"images": "x"}), 422, "images"),
            (
                submit_json(api, key, inputs={"a.png": "not base64!"}),
                422,
                "not base64",
            ),
            (
                submit_json(api, key, inputs={"a.png": "AA=="}, images=[{"name": "b.png"}]),
                422,
                "not one of the inputs sent: a.png",
            ),
            (submit_multipart(api, key, inputs={"big.png": PNG}), 413, "larger than the cap"),
            (
                api.http.post("/api/jobs", headers=bearer(key), content=b"x"),
                415,
                "multipart/form-data",
            ),
        ]
        for answer, code, expected in cases:
            assert answer.status_code == code, answer.text
            assert expected in answer.json()["detail"], answer.text


def test_a_submission_wakes_the_agents_waiting_for_its_profile_at_once(api: Api) -> None:
    ctx = ctx_of(api)

    async def wait_for_work() -> dict[str, bool]:
        # What the agents' ``next`` does while the queue is empty.
        return {"woken": await ctx.signals.wait([profile_key("sdxl")], 30)}

    api.server.app.add_api_route("/test/wait", wait_for_work, methods=["GET"])
    answer: dict[str, Any] = {}
    waiter = threading.Thread(
        target=lambda: answer.update(httpx.get(f"{api.url}/test/wait", timeout=60).json())
    )
    waiter.start()
    deadline = time.monotonic() + 10
    while ctx.signals.waiting(profile_key("sdxl")) == 0:
        assert time.monotonic() < deadline, "the waiter never started waiting"
        time.sleep(0.01)
    _, key = new_key(api.store)
    assert submit_json(api, key).status_code == 201
    waiter.join(10)
    assert answer == {"woken": True}


def test_one_input_and_several_load_image_nodes_asks_which_takes_it(api: Api) -> None:
    _, key = new_key(api.store)
    two = {**WORKFLOW, "2": node("LoadImage", "Mask", image="m.png")}
    answer = submit_multipart(api, key, workflow=two, inputs={"in.png": PNG})
    assert answer.status_code == 422
    assert "2 LoadImage nodes" in answer.json()["detail"]
    assert '"images"' in answer.json()["detail"]


# ------------------------------------------------------------------ who sees what


def test_a_key_sees_only_its_own_jobs_and_the_admin_key_sees_every_job(api: Api) -> None:
    _, alice = new_key(api.store, "alice")
    _, bob = new_key(api.store, "bob")
    mine = submit_json(api, alice).json()["id"]
    theirs = submit_json(api, bob).json()["id"]

    for method, path in [
        ("GET", f"/api/jobs/{mine}"),
        ("DELETE", f"/api/jobs/{mine}"),
        ("GET", f"/api/jobs/{mine}/outputs/out.png"),
        ("GET", f"/api/jobs/{mine}/events"),
    ]:
        answer = api.http.request(method, path, headers=bearer(bob))
        assert answer.status_code == 404, (path, answer.text)
        assert f"no job {mine}" in answer.json()["detail"]
    assert stored(api, mine).state is JobState.QUEUED

    listed = api.http.get("/api/jobs", headers=bearer(bob)).json()["jobs"]
    assert [job["id"] for job in listed] == [theirs]
    everyone = api.admin("GET", "/api/jobs").json()["jobs"]
    assert [job["id"] for job in everyone] == [theirs, mine]  # newest first
    assert api.admin("GET", f"/api/jobs/{mine}").json()["id"] == mine
    as_bearer = api.http.get(f"/api/jobs/{mine}", headers=bearer(ADMIN_KEY))
    assert as_bearer.status_code == 200


def test_the_list_filters_by_state_and_limit(api: Api) -> None:
    _, key = new_key(api.store)
    ids = [submit_json(api, key).json()["id"] for _ in range(3)]
    assert api.http.delete(f"/api/jobs/{ids[0]}", headers=bearer(key)).status_code == 202

    def listed(query: str) -> list[str]:
        answer = api.http.get(f"/api/jobs{query}", headers=bearer(key))
        assert answer.status_code == 200, answer.text
        return [job["id"] for job in answer.json()["jobs"]]

    assert listed("") == ids[::-1]
    assert listed("?state=queued") == [ids[2], ids[1]]
    assert listed("?state=cancelled&state=failed") == [ids[0]]
    assert listed("?limit=1") == [ids[2]]
    assert api.http.get("/api/jobs?state=lost", headers=bearer(key)).status_code == 422


def test_a_missing_wrong_or_revoked_key_gets_401_and_no_key_is_ever_echoed(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key_id, key = new_key(api.store)
    job = submit_json(api, key).json()["id"]
    wrong = "cf_" + "w" * 43
    for headers in [{}, bearer(wrong), bearer("not-a-key"), {"Authorization": f"Basic {key}"}]:
        for method, path in [("GET", "/api/jobs"), ("GET", f"/api/jobs/{job}")]:
            answer = api.http.request(method, path, headers=headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert "comfyfleet keys create" in answer.json()["detail"]
            assert answer.headers["www-authenticate"] == "Bearer"
            assert wrong not in answer.text and key not in answer.text
    refused = api.http.post("/api/jobs", headers=bearer(wrong), json={"workflow": WORKFLOW})
    assert refused.status_code == 401

    in_url = api.http.get(f"/api/jobs?key={key}")
    assert in_url.status_code == 400 and key not in in_url.text
    assert "Authorization header, never in the URL" in in_url.json()["detail"]

    api.store.run_sync(lambda session: revoke_key(session, key_id, now=time.time()))
    revoked = api.http.get(f"/api/jobs/{job}", headers=bearer(key))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    # The test's own client logs the URL it was told to call; the server logs no key.
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    )
    assert key not in logged and wrong not in logged


# ------------------------------------------------------------------ cancelling


def test_cancelling_a_queued_job_ends_it_and_a_finished_one_is_a_conflict(api: Api) -> None:
    _, key = new_key(api.store)
    queued = submit_json(api, key).json()["id"]
    answer = api.http.delete(f"/api/jobs/{queued}", headers=bearer(key))
    assert answer.status_code == 202, answer.text
    assert answer.json()["state"] == "cancelled" and answer.json()["cancel_requested"] is True
    assert api.http.delete(f"/api/jobs/{queued}", headers=bearer(key)).status_code == 202

    running = submit_json(api, key).json()["id"]
    place(api, running)
    marked = api.http.delete(f"/api/jobs/{running}", headers=bearer(key))
    assert marked.status_code == 202
    assert marked.json()["state"] == "placed" and marked.json()["cancel_requested"] is True

    done = submit_json(api, key).json()["id"]
    lease = place_on_new_instance(api, done)
    api.store.run_sync(lambda session: complete_job(session, done, lease, {}, api.clock.now()))
    conflict = api.http.delete(f"/api/jobs/{done}", headers=bearer(key))
    assert conflict.status_code == 409
    assert "already ended: it succeeded" in conflict.json()["detail"]


def place_on_new_instance(api: Api, job_id: str) -> str:
    rental = rent(api.store, api.clock, state=InstanceStates.READY, slot=None)
    return api.store.run_sync(
        lambda session: place_job(session, job_id, rental.id, api.clock.now())
    )


# ------------------------------------------------------------------ outputs


def test_an_output_downloads_byte_for_byte_with_its_hash_type_and_safe_name(api: Api) -> None:
    _, key = new_key(api.store)
    job = submit_json(api, key).json()["id"]
    lease = place(api, job)
    data = bytes(range(256)) * 4096 + b"tail"
    digest = put_blob(api, data)
    name = 'café "1".png'

    def finish(session: Session) -> None:
        now = api.clock.now()
        record_output(session, job, lease, name, digest, len(data), "images", now=now)
        complete_job(session, job, lease, {"prompt_id": "p1"}, now)

    api.store.run_sync(finish)
    view = api.http.get(f"/api/jobs/{job}", headers=bearer(key)).json()
    assert view["state"] == "succeeded"
    assert view["outputs"] == [
        {
            "name": name,
            "sha256": digest,
            "size": len(data),
            "kind": "images",
            "content_type": "image/png",
        }
    ]
    answer = api.http.get(f"/api/jobs/{job}/outputs/{name}", headers=bearer(key))
    assert answer.status_code == 200, answer.text
    assert answer.content == data
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-comfyfleet-sha256"] == digest
    assert answer.headers["x-content-type-options"] == "nosniff"
    disposition = answer.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="caf_ _1_.png"')
    assert "filename*=UTF-8''caf%C3%A9%20%221%22.png" in disposition

    missing = api.http.get(f"/api/jobs/{job}/outputs/other.png", headers=bearer(key))
    assert missing.status_code == 404 and "no output named 'other.png'" in missing.text


# ------------------------------------------------------------------ following


class EventReader(threading.Thread):
    """Reads ``GET /api/jobs/{id}/events`` into a queue: ``(event, data)``, comments as
    ``(":", text)``, and ``("end", None)`` when the stream closes."""

    def __init__(self, api: Api, job_id: str, key: str):
        super().__init__(daemon=True)
        self.url = f"{api.url}/api/jobs/{job_id}/events"
        self.headers = bearer(key)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.response_headers: dict[str, str] = {}

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=60) as http,
                http.stream("GET", self.url, headers=self.headers) as response,
            ):
                self.response_headers = dict(response.headers)
                event = ""
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.events.put((":", line))
                    elif line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        self.events.put((event, json.loads(line.removeprefix("data: "))))
        finally:
            self.events.put(("end", None))

    def next(self, timeout: float = 10) -> tuple[str, Any]:
        return self.events.get(timeout=timeout)

    def next_job(self, timeout: float = 10) -> dict[str, Any]:
        while True:
            kind, data = self.next(timeout)
            if kind == "job":
                return dict(data)
            assert kind == ":", (kind, data)


def poke_route(api: Api) -> None:
    """``POST /test/poke/{job}``: the app's own ``ctx.signals.notify`` on its event loop, as
    the agent routes call it when they change a job."""
    ctx = ctx_of(api)

    async def poke(job_id: str) -> dict[str, bool]:
        ctx.signals.notify(job_key(job_id))
        return {"ok": True}

    api.server.app.add_api_route("/test/poke/{job_id}", poke, methods=["POST"])


def test_events_stream_the_view_at_once_and_at_each_change_until_the_end(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic re-read: only the wake-up moves the stream, which proves it is heard.
    monkeypatch.setattr(jobs_api, "EVENTS_POLL_S", 60.0)
    poke_route(api)
    _, key = new_key(api.store)
    job = submit_json(api, key).json()["id"]
    reader = EventReader(api, job, key)
    reader.start()
    first = reader.next_job()
    assert first["id"] == job and first["state"] == "queued" and first["queue_position"] == 1
    assert reader.response_headers["content-type"].startswith("text/event-stream")

    lease = place(api, job)
    api.http.post(f"/test/poke/{job}")
    assert reader.next_job()["state"] == "placed"

    def run_and_finish(session: Session) -> None:
        start_job(session, job, lease, api.clock.now())
        complete_job(session, job, lease, {"prompt_id": "p"}, api.clock.now())

    api.store.run_sync(run_and_finish)
    api.http.post(f"/test/poke/{job}")
    last = reader.next_job()
    assert last["state"] == "succeeded" and last["finished_at"] is not None
    assert reader.next() == ("end", None)
    reader.join(5)


def test_events_see_a_change_made_elsewhere_and_keep_an_idle_stream_alive(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_api, "EVENTS_POLL_S", 0.2)
    monkeypatch.setattr(jobs_api, "KEEPALIVE_S", 0.3)
    _, key = new_key(api.store)
    job = submit_json(api, key).json()["id"]
    reader = EventReader(api, job, key)
    reader.start()
    assert reader.next_job()["state"] == "queued"
    assert reader.next() == (":", ": keep-alive")
    # As another replica would: a change in the store, and no signal in this process.
    api.store.run_sync(lambda session: request_cancel(session, job, api.clock.now()))
    assert reader.next_job()["state"] == "cancelled"
    assert reader.next() == ("end", None)


def test_events_of_a_job_that_has_ended_send_its_view_once_and_close(api: Api) -> None:
    _, key = new_key(api.store)
    job = submit_json(api, key).json()["id"]
    api.http.delete(f"/api/jobs/{job}", headers=bearer(key))
    reader = EventReader(api, job, key)
    reader.start()
    assert reader.next_job()["state"] == "cancelled"
    assert reader.next() == ("end", None)


def test_the_openapi_document_describes_the_jobs_routes(api: Api) -> None:
    document = api.http.get("/openapi.json").json()
    submit = document["paths"]["/api/jobs"]["post"]
    assert set(submit["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    as_json = submit["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(as_json)  # the ImageTarget definition is in place
    assert as_json["properties"]["images"]["anyOf"][0]["items"]["required"] == ["name"]
    assert "set" in as_json["properties"] and "webhook_url" in as_json["properties"]
    assert "/api/jobs/{job_id}/events" in document["paths"]
    assert "/api/jobs/{job_id}/outputs/{name}" in document["paths"]


# ------------------------------------------------------------------ the multipart reader

BOUNDARY = "----cf-boundary-42"
# Content that holds a CRLF, dashes and most of the boundary, but not the delimiter.
TRICKY = b"line one\r\n--" + BOUNDARY[:-1].encode() + b"\r\n\r\n--\r\nend"


def form_body(*, epilogue: bytes = b"\r\nignored epilogue") -> bytes:
    delimiter = b"--" + BOUNDARY.encode()
    return b"".join(
        [
            b"a preamble nobody reads\r\n",
            delimiter + b"\r\n",
            b'Content-Disposition: form-data; name="params"\r\n\r\n',
            b'{"prompt": "x"}\r\n',
            delimiter + b"  \r\n",  # transport padding after a delimiter is allowed
            b'Content-Disposition: form-data; name="input"; filename="caf\xc3\xa9.png"\r\n',
            b"Content-Type: image/png\r\n\r\n",
            TRICKY + b"\r\n",
            delimiter + b"\r\n",
            b'Content-Disposition: form-data; name="skipped"\r\n\r\n',
            b"never read\r\n",
            delimiter + b"--",
            epilogue,
        ]
    )


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_form(data: bytes, size: int) -> list[tuple[str, str | None, str | None, bytes]]:
    reader = MultipartReader(
        chunked(data, size), boundary_of(f"multipart/form-data; boundary={BOUNDARY}")
    )
    found = []
    async for part in reader.parts():
        if part.name == "skipped":
            found.append((part.name, None, None, b""))
            continue
        found.append((part.name, part.filename, part.content_type, await part.read(limit=4096)))
    return found


@pytest.mark.parametrize("size", [1, 2, 5, 17, 64, 1 << 20])
async def test_the_multipart_reader_finds_each_part_however_the_body_is_cut(size: int) -> None:
    assert await read_form(form_body(), size) == [
        ("params", None, None, b'{"prompt": "x"}'),
        ("input", "café.png", "image/png", TRICKY),
        ("skipped", None, None, b""),
    ]


@pytest.mark.parametrize(
    "body, expected",
    [
        (form_body()[:-40], "cut short"),
        (form_body(epilogue=b"")[:-2], "closing boundary"),
        (b"no boundary anywhere", "holds no part"),
        (b"--" + BOUNDARY.encode() + b"\r\nX-Other: 1\r\n\r\nbody\r\n", "Content-Disposition"),
        (b"--" + BOUNDARY.encode() + b"junk\r\n", "stray characters"),
    ],
)
async def test_a_malformed_multipart_body_is_refused_with_what_is_wrong(
    body: bytes, expected: str
) -> None:
    with pytest.raises(MultipartError) as refused:
        await read_form(body, 7)
    assert expected in str(refused.value)


async def test_a_multipart_field_read_into_memory_is_capped() -> None:
    reader = MultipartReader(chunked(form_body(), 3), BOUNDARY.encode())
    async for part in reader.parts():
        with pytest.raises(PartTooLarge):
            await part.read(limit=4)
        break
    with pytest.raises(MultipartError, match="boundary"):
        boundary_of("multipart/form-data")
    with pytest.raises(MultipartError, match="expected multipart/form-data"):
        boundary_of("application/json")
