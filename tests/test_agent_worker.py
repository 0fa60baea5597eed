"""The agent's job loop (``agent/worker.py``) against the real control plane and ComfyUI.

The control plane is the production app (``create_app`` over a migrated store) served
by uvicorn on loopback, with one instance recorded ``ready`` and its agent token; jobs are
put in its store with ``submit_job`` (inputs in its output store) and its agents woken as
a submit wakes them. ComfyUI is the simulator process (``python -m comfyfleet.sim.comfy``,
its stand-in sampler 20 ms a step). The worker runs in the test's event loop with a real
``JobsClient`` and ``ComfyClient``.

The client's own rules (retries, the 409 and 401 mapping, a corrupt input fetched again)
are tested first against ``httpx.MockTransport``: a control plane that answers 503 on
demand, or a body with the wrong hash, is nothing the real app can be made to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from pydantic import SecretStr

from comfyfleet.agent.comfy import LOOPBACK, ComfyClient, QueuedPrompt
from comfyfleet.agent.jobs import JobOutcome, JobOutput, JobProgress
from comfyfleet.agent.remote import AgentAuthError, ControlPlaneUnavailable
from comfyfleet.agent.report import RecordingReporter
from comfyfleet.agent.worker import (
    LEASE_HEADER,
    AgentJob,
    HttpJobSink,
    JobInput,
    JobsClient,
    JobWorker,
    LeaseLost,
    jobs_per_instance,
)
from comfyfleet.api import AgentProfile, ApiSettings, ComfySpec, RunningServer, create_app
from comfyfleet.clock import ManualClock
from comfyfleet.errors import ConfigError
from comfyfleet.lifecycle import InstanceState, JobState
from comfyfleet.scheduler.signals import profile_key
from comfyfleet.sim.comfy_nodes import Folders
from comfyfleet.store import Store, get_instance
from comfyfleet.store.jobs import (
    expire_leases,
    get_job,
    job_outputs,
    job_trail,
    request_cancel,
    submit_job,
)
from tests.conftest import BIN
from tests.test_agent_run import SIM_COMMAND, comfy_sims_under
from tests.test_api import ADMIN_KEY, T0, rent

REPO = Path(__file__).resolve().parent.parent
SIM = (sys.executable, "-m", "comfyfleet.sim.comfy")
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PROFILE = "sdxl"
ENDED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# --------------------------------------------------------------------------- workflows


def txt2img(prefix: str, *, seed: int, steps: int = 6, size: int = 64) -> dict[str, Any]:
    graph: dict[str, Any] = json.loads((REPO / "examples/workflows/txt2img.json").read_text())
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    graph["5"]["inputs"].update(width=size, height=size)
    graph["9"]["inputs"]["filename_prefix"] = prefix
    return graph


def img2img(prefix: str, image: str) -> dict[str, Any]:
    """txt2img on an uploaded picture's latent, and the picture inverted as a second output."""
    graph = txt2img(prefix, seed=5, steps=4)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
    graph["12"] = {"class_type": "ImageInvert", "inputs": {"image": ["10", 0]}}
    graph["13"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["12", 0], "filename_prefix": prefix + "_inverted"},
    }
    return graph


def sleeping(seconds: float, prefix: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SimSleep",
            "inputs": {"images": ["1", 0], "seconds": seconds, "steps": int(seconds * 20)},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def instant(prefix: str, color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def eventually(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- ComfyUI


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Sim:
    url: str
    folders: Folders


@pytest.fixture(scope="module")
def comfy_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """One ComfyUI simulator process for the module; its sampler takes 20 ms a step."""
    base = tmp_path_factory.mktemp("worker-sim") / "comfy"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).write_bytes(b"\0" * 16)
    port = free_port()
    args = ("--listen", LOOPBACK, "--port", str(port), "--base-directory", str(base))
    with (base / "sim.log").open("ab") as out:
        proc = subprocess.Popen(
            [*SIM, *args, "--step-seconds", "0.02"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not start: {(base / 'sim.log').read_text()}")
            time.sleep(0.05)
        yield Sim(f"http://{LOOPBACK}:{port}", Folders.create(base))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class TimedComfy(ComfyClient):
    """A ``ComfyClient`` that notes when each prompt is posted (``time.monotonic()``)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.posted: list[float] = []

    async def queue_prompt(self, workflow: Any, **kw: Any) -> QueuedPrompt:
        self.posted.append(time.monotonic())
        return await super().queue_prompt(workflow, **kw)


async def history_of(comfy: ComfyClient, prefix: str) -> list[dict[str, Any]]:
    """The history entries of the prompts whose SaveImage used ``prefix``, oldest first."""
    found = []
    for item in (await comfy.history()).values():
        graph = item["prompt"][2]
        prefixes = {n["inputs"].get("filename_prefix") for n in graph.values()}
        if prefix in prefixes:
            found.append(item)
    return sorted(found, key=lambda item: item["prompt"][0])


def interrupted(item: dict[str, Any]) -> bool:
    return any(m[0] == "execution_interrupted" for m in item["status"]["messages"])


# --------------------------------------------------------------------------- the control plane


@dataclass
class Plane:
    """The control plane served on loopback, one ready instance, and its event loop."""

    server: RunningServer
    app: FastAPI
    store: Store
    clock: ManualClock
    loop: asyncio.AbstractEventLoop
    instance_id: int
    token: str

    @property
    def url(self) -> str:
        return self.server.api_url

    async def submit(
        self,
        workflow: dict[str, Any],
        *,
        inputs: dict[str, bytes] | None = None,
        max_attempts: int = 3,
        pinned: bool = False,
        wake: bool = True,
    ) -> str:
        """Queue a job as the user API does: its inputs in the output store, then a wake-up."""
        ctx = self.app.state.ctx
        described = []
        for name, data in (inputs or {}).items():
            blob = await ctx.outputs.put_stream(_once(data))
            described.append({"name": name, "sha256": blob.sha256, "size": blob.size})
        request = {"workflow": workflow, "inputs": described, "params": {}}

        def work(session: Any) -> str:
            pin: dict[str, Any] = {"pinned_instance_id": self.instance_id} if pinned else {}
            job = submit_job(
                session,
                profile=PROFILE,
                request=request,
                now=self.clock.now(),
                max_attempts=max_attempts,
                **pin,
            )
            return str(job.id)

        job_id = await asyncio.to_thread(self.store.run_sync, work)
        if wake:
            # JobSignals lives on the server's loop: the wake-up is handed to it.
            self.loop.call_soon_threadsafe(ctx.signals.notify, profile_key(PROFILE))
        return job_id

    async def run(self, work: Callable[[Any], Any]) -> Any:
        return await asyncio.to_thread(self.store.run_sync, work)

    async def job(self, job_id: str) -> dict[str, Any]:
        def read(session: Any) -> dict[str, Any]:
            row = get_job(session, job_id)
            return {
                "state": row.state,
                "attempts": row.attempts,
                "error": row.error,
                "result": row.result,
                "instance_id": row.instance_id,
                "lease_id": row.lease_id,
                "progress": row.progress,
            }

        return dict(await self.run(read))

    async def until(
        self, job_id: str, check: Callable[[dict[str, Any]], bool], within_s: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            job = await self.job(job_id)
            if check(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} never got there; it is {job}")
            await asyncio.sleep(0.02)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


@contextlib.contextmanager
def serve_plane(
    store: Store,
    tmp_path: Path,
    *,
    comfy: ComfySpec | None = None,
    state: InstanceState = InstanceState.READY,
) -> Iterator[Plane]:
    """The app on loopback and one instance in ``state``; ``comfy`` tells its agent how to
    run ComfyUI (for ``agent connect``)."""
    clock = ManualClock(start=T0)
    settings = ApiSettings(
        admin_api_key=SecretStr(ADMIN_KEY),
        data_dir=tmp_path / "data",
        profiles={
            PROFILE: AgentProfile(
                manifest={"models": []},
                comfy=comfy or ComfySpec(attach_url="http://127.0.0.1:18188"),
            )
        },
    )
    loop_seen: list[asyncio.AbstractEventLoop] = []

    async def note_loop(stop: asyncio.Event) -> None:
        loop_seen.append(asyncio.get_running_loop())
        await stop.wait()

    app = create_app(store, settings, clock=clock, pool=None, background=note_loop)
    rental = rent(store, clock, profile=PROFILE, state=state)
    with RunningServer(app) as server:
        assert loop_seen, "the app's background work did not start"
        yield Plane(server, app, store, clock, loop_seen[0], rental.id, rental.token)


@pytest.fixture
def plane(sqlite_store: Store, tmp_path: Path) -> Iterator[Plane]:
    with serve_plane(sqlite_store, tmp_path) as served:
        yield served


@dataclass
class Agent:
    """A worker and its clients, running in the test's loop until ``stop``."""

    worker: JobWorker
    jobs: JobsClient
    comfy: TimedComfy
    reporter: RecordingReporter
    stop: asyncio.Event
    task: asyncio.Task[None]
    received: list[AgentJob] = field(default_factory=list)

    async def stopped(self, within_s: float = 15.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, within_s)


class NotingJobsClient(JobsClient):
    """A ``JobsClient`` that keeps every job ``next`` handed out (with its arrival time)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.received: list[AgentJob] = []

    async def next(self, wait_s: float = 20.0) -> AgentJob | None:
        job = await super().next(wait_s)
        if job is not None:
            self.received.append(job)
        return job


@contextlib.asynccontextmanager
async def agent(plane: Plane, sim: Sim, tmp_path: Path, **options: Any) -> AsyncIterator[Agent]:
    reporter = RecordingReporter()
    stop = asyncio.Event()
    async with (
        NotingJobsClient(plane.url, plane.token, plane.instance_id) as jobs,
        TimedComfy(sim.url, timeout_s=10) as comfy,
    ):
        options.setdefault("stop_grace_s", 10.0)
        worker = JobWorker(jobs, comfy, workdir=tmp_path / "work", reporter=reporter, **options)
        task = asyncio.create_task(worker.run(stop))
        running = Agent(worker, jobs, comfy, reporter, stop, task, jobs.received)
        try:
            yield running
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)


# --------------------------------------------------------------------------- the client's rules


def mock_client(
    handler: Callable[[httpx.Request], Any], **kw: Any
) -> tuple[JobsClient, ManualClock]:
    clock = ManualClock()
    client = JobsClient(
        "http://plane.test/api",
        "cft_token",
        12,
        clock=clock,
        transport=httpx.MockTransport(handler),
        **kw,
    )
    return client, clock


JOB = {
    "job_id": "job-1",
    "lease_id": "lease-1",
    "attempt": 1,
    "lease_ttl_s": 60.0,
    "renew_every_s": 20.0,
    "timeout_s": None,
    "workflow": {"1": {"class_type": "X", "inputs": {}}},
    "inputs": [],
}


async def test_next_is_retried_through_503s_and_connection_errors_then_parsed() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "restarting"})
        return httpx.Response(200, json={"job": JOB})

    client, clock = mock_client(handler)
    async with client:
        job = await client.next(20)
    assert job is not None and (job.job_id, job.lease_id, job.renew_every_s) == (
        "job-1",
        "lease-1",
        20.0,
    )
    assert job.received_at > 0
    assert [str(r.url) for r in calls] == [
        "http://plane.test/api/agent/jobs/next?instance_id=12&wait=20"
    ] * 3
    assert all(r.headers["authorization"] == "Bearer cft_token" for r in calls)
    assert clock.now() == pytest.approx(ManualClock().now() + 0.75)  # 0.25 + 0.5 backed off


async def test_a_409_is_lease_lost_with_its_code_and_a_401_is_an_auth_error() -> None:
    answers = iter(
        [
            httpx.Response(409, json={"detail": "the job has ended", "code": "ended"}),
            httpx.Response(409, json={"detail": {"detail": "not yours", "code": "stale_lease"}}),
            httpx.Response(404, json={"detail": "no such job"}),
            httpx.Response(401, json={"detail": "revoked"}),
        ]
    )
    client, _ = mock_client(lambda request: next(answers))
    progress = JobProgress(state="running", percent=10.0)
    async with client:
        with pytest.raises(LeaseLost) as ended:
            await client.renew("job-1", "lease-1")
        with pytest.raises(LeaseLost) as stale:
            await client.progress("job-1", "lease-1", progress)
        with pytest.raises(LeaseLost) as unknown:
            await client.renew("job-1", "lease-1")
        with pytest.raises(AgentAuthError, match="refused this instance's token"):
            await client.renew("job-1", "lease-1")
    assert (ended.value.code, stale.value.code, unknown.value.code) == (
        "ended",
        "stale_lease",
        "unknown",
    )
    assert not ended.value.after_retry


async def test_a_finish_whose_first_answer_was_lost_counts_the_ended_refusal_as_delivered() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(409, json={"detail": "ended already", "code": "ended"})

    client, _ = mock_client(handler)
    output = JobOutput("a.png", "images", "9", "ab" * 32, 3, "image/png")
    outcome = JobOutcome(status="succeeded", prompt_id="p", outputs=(output,), duration_s=1.5)
    async with client:
        assert await client.finish("job-1", "lease-1", outcome) == "succeeded"
    assert (
        bodies[0]
        == bodies[1]
        == {
            "lease_id": "lease-1",
            "status": "succeeded",
            "reason": None,
            "error": None,
            "retryable": False,
            "prompt_id": "p",
            "node_id": None,
            "node_type": None,
            "duration_s": 1.5,
            "outputs": [
                {
                    "name": "a.png",
                    "kind": "images",
                    "node_id": "9",
                    "sha256": "ab" * 32,
                    "size": 3,
                    "content_type": "image/png",
                    "temporary": False,
                }
            ],
        }
    )


async def test_an_input_with_the_wrong_hash_is_fetched_again_and_never_left_half_written(
    tmp_path: Path,
) -> None:
    good = b"the input's bytes" * 1000
    served: list[bytes] = [good[:-1] + b"!", good]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, content=served.pop(0), headers={"X-Comfyfleet-Sha256": sha256(good)}
        )

    job = AgentJob.from_json(
        {**JOB, "inputs": [{"name": "in.png", "sha256": sha256(good), "size": len(good)}]}
    )
    client, _ = mock_client(handler)
    async with client:
        size = await client.fetch_input(job, "in.png", tmp_path / "in.png")
    assert size == len(good) and (tmp_path / "in.png").read_bytes() == good
    assert [r.headers[LEASE_HEADER] for r in seen] == ["lease-1", "lease-1"]
    assert str(seen[0].url) == "http://plane.test/api/agent/jobs/job-1/inputs/in.png"
    assert names(tmp_path) == ["in.png"]

    # Corrupt every time: it gives up, and nothing is left behind.
    served[:] = [b"x" * len(good)] * 3
    client, _ = mock_client(handler, attempts=3)
    async with client:
        with pytest.raises(ControlPlaneUnavailable, match="arrived with sha256"):
            await client.fetch_input(job, "in.png", tmp_path / "again.png")
    assert names(tmp_path) == ["in.png"]


async def test_an_output_is_streamed_with_its_hash_and_lease_and_retried_whole(
    tmp_path: Path,
) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "out.png"
    path.write_bytes(data)
    received: list[tuple[dict[str, str], bytes]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        received.append((dict(request.headers), body))
        if len(received) == 1:
            return httpx.Response(500, json={"detail": "disk full"})
        return httpx.Response(
            201, json={"name": "out.png", "sha256": sha256(body), "size": len(body)}
        )

    client, _ = mock_client(handler)
    async with client:
        receipt = await client.upload_output(
            "job-1", "lease-1", "out.png", path, sha256(data), len(data)
        )
    assert (receipt.name, receipt.sha256, receipt.size) == ("out.png", sha256(data), len(data))
    assert [body for _, body in received] == [data, data]
    headers = received[1][0]
    assert headers["x-comfyfleet-lease"] == "lease-1"
    assert headers["x-comfyfleet-sha256"] == sha256(data)
    assert headers["content-length"] == str(len(data))


async def test_the_sink_cancels_on_request_and_refuses_to_report_once_the_lease_is_lost(
    tmp_path: Path,
) -> None:
    answers: list[httpx.Response] = [
        httpx.Response(200, json={"cancel_requested": False, "lease_expires_at": 1.0}),
        httpx.Response(200, json={"cancel_requested": True, "lease_expires_at": 2.0}),
        httpx.Response(409, json={"detail": "requeued", "code": "stale_lease"}),
    ]
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return answers.pop(0)

    client, _ = mock_client(handler)
    cancel = asyncio.Event()
    sink = HttpJobSink(client, cancel)
    event = JobProgress(state="running", prompt_id="p")
    async with client:
        await sink.progress("job-1", "lease-1", event)
        assert not cancel.is_set()
        await sink.progress("job-1", "lease-1", event)
        assert cancel.is_set() and sink.cancel_requested
        with pytest.raises(LeaseLost):
            await sink.progress("job-1", "lease-1", event)
        assert sink.lost_event.is_set()
        with pytest.raises(LeaseLost):
            await sink.finished("job-1", "lease-1", JobOutcome(status="cancelled"))
    assert sent == ["/api/agent/jobs/job-1/progress"] * 3  # nothing after the refusal


def test_jobs_per_instance_comes_from_the_environment() -> None:
    assert jobs_per_instance({}) == 1
    assert jobs_per_instance({"COMFYFLEET_JOBS_PER_INSTANCE": " 3 "}) == 3
    for bad in ("0", "two", "65"):
        with pytest.raises(ConfigError, match="COMFYFLEET_JOBS_PER_INSTANCE"):
            jobs_per_instance({"COMFYFLEET_JOBS_PER_INSTANCE": bad})


def test_a_job_names_its_inputs_and_a_missing_field_is_refused() -> None:
    job = AgentJob.from_json(
        {**JOB, "inputs": [{"name": "a.png", "sha256": "AB" * 32, "size": 5}], "timeout_s": 9}
    )
    assert job.inputs == (JobInput("a.png", "ab" * 32, 5),) and job.timeout_s == 9.0
    with pytest.raises(Exception, match="cannot read"):
        AgentJob.from_json({k: v for k, v in JOB.items() if k != "lease_id"})


# --------------------------------------------------------------------------- against the real app


async def test_a_submitted_job_runs_and_succeeds_with_outputs_byte_identical_to_comfyuis(
    store: Store, comfy_sim: Sim, tmp_path: Path
) -> None:
    red = png((255, 0, 0))
    prefix = f"worker_ok_{store.dialect}"
    with serve_plane(store, tmp_path) as plane:
        async with agent(plane, comfy_sim, tmp_path) as running:
            job_id = await plane.submit(img2img(prefix, "photo.png"), inputs={"photo.png": red})
            job = await plane.until(job_id, lambda j: j["state"] in ENDED)
            assert job["state"] is JobState.SUCCEEDED, job["error"]
            await eventually(lambda: job_id in running.worker.ended)
            assert running.worker.ended == {job_id: "succeeded"}

            outputs = await plane.run(
                lambda session: [
                    (o.name, o.sha256, o.size, o.kind) for o in job_outputs(session, job_id)
                ]
            )
            [item] = await history_of(running.comfy, prefix)
            served = {}
            for kinds in item["outputs"].values():
                for entry in kinds.get("images", []):
                    served[entry["filename"]] = await running.comfy.view(
                        entry["filename"], subfolder=entry["subfolder"], type=entry["type"]
                    )
            assert len(served) == 2
            assert sorted(name for name, *_ in outputs) == sorted(served)
            ctx = plane.app.state.ctx
            for name, digest, size, kind in outputs:
                stored = ctx.outputs.path(digest).read_bytes()
                assert stored == served[name] and (digest, size, kind) == (
                    sha256(stored),
                    len(stored),
                    "images",
                )
            # The uploaded input is what ComfyUI loaded.
            assert (comfy_sim.folders.input / "photo.png").read_bytes() == red
            assert (job["result"] or {}).get("prompt_id") == item["prompt"][1]
        lines = running.reporter.lines
        assert any(f"job {job_id}: started" in line for line in lines)
        assert any(f"job {job_id}: succeeded" in line for line in lines)
        assert names(tmp_path / "work") == []  # the job's files are gone


async def test_a_cancel_requested_mid_run_interrupts_comfyui_and_ends_the_job_cancelled(
    plane: Plane, comfy_sim: Sim, tmp_path: Path
) -> None:
    async with agent(plane, comfy_sim, tmp_path) as running:
        job_id = await plane.submit(sleeping(10, "worker_cancel"))
        await plane.until(job_id, lambda j: j["state"] is JobState.RUNNING)
        asked = time.monotonic()
        await plane.run(lambda session: request_cancel(session, job_id, plane.clock.now()))
        job = await plane.until(job_id, lambda j: j["state"] in ENDED)
        took = time.monotonic() - asked
        assert job["state"] is JobState.CANCELLED
        assert took < 3.0  # told by the next progress answer, not the 20 s renewal
        [item] = await history_of(running.comfy, "worker_cancel")
        assert interrupted(item)
        await eventually(lambda: job_id in running.worker.ended)
        assert running.worker.ended == {job_id: "cancelled"}


async def test_a_lost_lease_makes_the_worker_abandon_the_job_and_report_nothing_of_it(
    plane: Plane, comfy_sim: Sim, tmp_path: Path
) -> None:
    async with agent(plane, comfy_sim, tmp_path) as running:
        job_id = await plane.submit(sleeping(2.0, "worker_lost"), max_attempts=2)
        await plane.until(job_id, lambda j: j["state"] is JobState.RUNNING)
        # The control plane gives up on this attempt (as its sweep does after silence).
        await plane.run(lambda session: expire_leases(session, plane.clock.now() + 3600))
        # The worker stops it at once, then takes the job's next attempt and runs it.
        job = await plane.until(job_id, lambda j: j["state"] in ENDED)
        assert job["state"] is JobState.SUCCEEDED and job["attempts"] == 2
        await eventually(lambda: job_id in running.worker.ended)
        assert list(running.worker.abandoned) == [job_id]
        assert running.worker.ended == {job_id: "succeeded"}
        history = await history_of(running.comfy, "worker_lost")
        assert [interrupted(item) for item in history] == [True, False]

        trail = await plane.run(
            lambda session: [(a.to_state, a.actor, a.reason) for a in job_trail(session, job_id)]
        )
        # Attempt 1: placed, started, expired; nothing the agent said about it afterwards.
        moves = [(str(state), actor) for state, actor, _ in trail]
        assert moves == [
            ("queued", "user"),
            ("placed", "scheduler"),
            ("running", "agent"),
            ("queued", "scheduler"),
            ("placed", "scheduler"),
            ("running", "agent"),
            ("succeeded", "agent"),
        ]
    assert any("abandoned" in line for line in running.reporter.lines)


async def test_stopping_the_worker_mid_job_hands_the_job_back_to_the_queue(
    plane: Plane, comfy_sim: Sim, tmp_path: Path
) -> None:
    async with agent(plane, comfy_sim, tmp_path) as running:
        job_id = await plane.submit(sleeping(10, "worker_stop"))
        await plane.until(job_id, lambda j: j["state"] is JobState.RUNNING)
        began = time.monotonic()
        await running.stopped()
        assert time.monotonic() - began < 3.0
        job = await plane.job(job_id)
        assert job["state"] is JobState.QUEUED and job["attempts"] == 1
        assert job["instance_id"] is None and job["lease_id"] is None
        [item] = await history_of(running.comfy, "worker_stop")
        assert interrupted(item)
        # No more jobs are taken once stopped.
        other = await plane.submit(instant("worker_after_stop", 1))
        await asyncio.sleep(0.3)
        assert (await plane.job(other))["state"] is JobState.QUEUED


async def test_an_onstart_worker_runs_only_its_pinned_job_and_returns(
    plane: Plane, comfy_sim: Sim, tmp_path: Path
) -> None:
    older = await plane.submit(instant("worker_not_mine", 2), wake=False)
    pinned = await plane.submit(instant("worker_onstart", 3), pinned=True, wake=False)
    async with agent(plane, comfy_sim, tmp_path, onstart_job_id=pinned) as running:
        await asyncio.wait_for(running.task, 20)  # returns by itself
        assert [job.job_id for job in running.received] == [pinned]
    assert (await plane.job(pinned))["state"] is JobState.SUCCEEDED
    assert (await plane.job(older))["state"] is JobState.QUEUED


async def test_the_agent_posts_the_prompt_within_a_few_ms_of_the_answer_to_next(
    plane: Plane, comfy_sim: Sim, tmp_path: Path
) -> None:
    overheads = []
    async with agent(plane, comfy_sim, tmp_path) as running:
        for n in range(15):
            job_id = await plane.submit(instant(f"worker_fast_{n}", n))
            await plane.until(job_id, lambda j: j["state"] in ENDED)
            [handed] = [job for job in running.received if job.job_id == job_id]
            overheads.append(running.comfy.posted[-1] - handed.received_at)
    ms = sorted(1000 * o for o in overheads)
    print(
        f"\nagent overhead, next answered -> POST /prompt: first {1000 * overheads[0]:.2f} ms, "
        f"median {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms over {len(ms)} jobs"
    )
    assert statistics.median(ms) < 20.0


# --------------------------------------------------------------------------- agent connect


@contextlib.contextmanager
def connected_agent(plane: Plane, tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Any]:
    """``comfyfleet agent connect`` as the onstart runs it, with the simulator as ComfyUI;
    waits until the instance is ready. Yields the process; its output is in tmp_path."""
    env = {
        **clean_env,
        "COMFYFLEET_URL": plane.url,
        "COMFYFLEET_TOKEN": plane.token,
        "DM_INSTANCE_ID": str(plane.instance_id),
        "SERVER_TYPE": PROFILE,
        "WORKSPACE": str(tmp_path / "ws"),
        "COMFY_PORT": str(free_port()),
    }
    (tmp_path / "ws" / "ComfyUI").mkdir(parents=True)  # where the simulator runs
    err = tmp_path / "connect.err"
    with (tmp_path / "connect.out").open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(BIN / "comfyfleet"), "agent", "connect"],
            env=env,
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while (
            plane.store.run_sync(lambda session: get_instance(session, plane.instance_id).state)
            is not InstanceState.READY
        ):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            for pid in comfy_sims_under(tmp_path):
                os.kill(pid, signal.SIGKILL)


def output_of(tmp_path: Path) -> str:
    return (tmp_path / "connect.out").read_text() + (tmp_path / "connect.err").read_text()


async def test_agent_connect_runs_jobs_once_ready_and_hands_the_running_one_back_at_sigterm(
    sqlite_store: Store, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    comfy = ComfySpec(command=SIM_COMMAND)
    with (
        serve_plane(sqlite_store, tmp_path, comfy=comfy, state=InstanceState.CREATING) as plane,
        connected_agent(plane, tmp_path, clean_env) as proc,
    ):
        done = await plane.submit(instant("connect_done", 7))
        assert (await plane.until(done, lambda j: j["state"] in ENDED))["state"] is (
            JobState.SUCCEEDED
        )
        running = await plane.submit(sleeping(30, "connect_running"))
        await plane.until(running, lambda j: j["state"] is JobState.RUNNING)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        job = await plane.job(running)
    output = output_of(tmp_path)
    assert code == 0, output
    # Handed back before ComfyUI was stopped: queued again, its attempt spent.
    assert job["state"] is JobState.QUEUED and job["attempts"] == 1, output
    assert f"job {done}: succeeded" in output
    assert f"job {running}: cancelled" in output
    assert "Stopped ComfyUI" in output
    lines = (tmp_path / "connect.err").read_text()  # the agent's lines, in order
    assert lines.index(f"job {running}: cancelled") < lines.index("stopped ComfyUI (pid")
    assert plane.token not in output


async def test_agent_connect_on_an_onstart_instance_runs_its_job_and_polls_for_no_other(
    sqlite_store: Store, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    comfy = ComfySpec(command=SIM_COMMAND)
    with serve_plane(sqlite_store, tmp_path, comfy=comfy, state=InstanceState.CREATING) as plane:
        pinned = await plane.submit(instant("connect_onstart", 9), pinned=True, wake=False)

        def mark(session: Any) -> None:
            get_instance(session, plane.instance_id).onstart_job_id = pinned

        await plane.run(mark)
        with connected_agent(plane, tmp_path, clean_env):
            job = await plane.until(pinned, lambda j: j["state"] in ENDED, within_s=30)
            assert job["state"] is JobState.SUCCEEDED, job["error"]
            other = await plane.submit(instant("connect_not_onstart", 10))
            await asyncio.sleep(1.5)  # more than the control plane's re-read period
            assert (await plane.job(other))["state"] is JobState.QUEUED
    assert f"job {pinned}: succeeded" in output_of(tmp_path)
