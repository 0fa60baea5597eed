"""``comfyfleet run`` and the jobs API's client (``ControlClient``'s job methods).

Three layers, each over real sockets:

- the pure parts: the server-sent-events parser, what a job's view says to a person
  (``job_status``), and the local checks a job passes before it is submitted;
- the client against ``ScriptedJobs``, a small FastAPI app written here and served by
  uvicorn on loopback, whose event stream says exactly what a test scripts (comments,
  split data, a connection dropped in the middle, a stream closed early) and which
  records every request it gets: how the key is sent, that nothing is asked before a
  mistake is refused;
- the command, run as a real process (``.venv/bin/comfyfleet run``) against the
  production control plane (``create_app`` under uvicorn over a migrated SQLite store),
  whose job then moves through the store's own transitions as an agent would drive it
  (placed, running with progress, outputs stored by sha256, succeeded or failed), each
  followed by the in-process wake-up the agent routes send.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr

from comfyfleet.api import AgentProfile, ApiSettings, ComfySpec, RunningServer, create_app
from comfyfleet.clock import ManualClock
from comfyfleet.commands.run import JobStatus, job_status, prepare_job
from comfyfleet.control_client import (
    SHA256_HEADER,
    ApiKeyMissing,
    ControlClient,
    ControlPlaneError,
    DownloadCorrupted,
    ServerSentEvent,
    SseParser,
)
from comfyfleet.errors import ConfigError
from comfyfleet.lifecycle import InstanceState
from comfyfleet.scheduler.signals import job_key
from comfyfleet.store import Store
from comfyfleet.store.apikeys import create_key
from comfyfleet.store.jobs import (
    complete_job,
    fail_job,
    fail_timed_out_jobs,
    finish_cancelled,
    get_job,
    job_view,
    jobs_for_key,
    place_job,
    record_output,
    report_progress,
    request_cancel,
    start_job,
)
from comfyfleet.workflow import WorkflowError
from tests.conftest import BIN, REPO, run_cli
from tests.test_api import ADMIN_KEY, T0, rent

WORKFLOWS = REPO / "examples" / "workflows"
INVERT = WORKFLOWS / "invert.json"
TXT2IMG = WORKFLOWS / "txt2img.json"
USER_KEY = "cf_" + "u" * 43
CLI = str(BIN / "comfyfleet")
JOB_ID = "0190f5a2-0000-7000-8000-000000000001"


def ui_workflow() -> dict[str, Any]:
    """What ComfyUI's editor saves (not the API format)."""
    return {
        "last_node_id": 3,
        "last_link_id": 1,
        "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [1, "randomize", 20]}],
        "links": [],
        "version": 0.4,
    }


def view(state: str = "queued", **fields: Any) -> dict[str, Any]:
    """A job's VIEW as ``store.jobs.job_view`` makes it."""
    base: dict[str, Any] = {
        "id": JOB_ID,
        "profile": "sdxl",
        "state": state,
        "priority": 0,
        "queue_position": 1 if state == "queued" else None,
        "attempts": 0 if state == "queued" else 1,
        "max_attempts": 3,
        "timeout_s": None,
        "cancel_requested": False,
        "progress": None,
        "error": None,
        "result": None,
        "instance_id": None if state == "queued" else 4,
        "created_at": 1.0,
        "placed_at": None,
        "started_at": None,
        "finished_at": None,
        "timing": {"queued_s": None, "running_s": None},
        "cost": None,
        "webhook_url": None,
        "outputs": [],
    }
    base.update(fields)
    return base


# ------------------------------------------------------------------ the SSE parser


def feed_all(parser: SseParser, text: str) -> list[ServerSentEvent]:
    events = [parser.feed(line) for line in text.split("\n")]
    return [event for event in events if event is not None]


def test_sse_parser_joins_data_lines_skips_comments_and_keeps_the_last_id() -> None:
    parser = SseParser()
    events = feed_all(
        parser,
        ": keep-alive\n\n"
        'event: job\nid: 7\ndata: {"a":\ndata:  1}\n\n'
        "data:plain\n\n"
        "retry: 1500\nevent: job\n\n"
        "id\ndata\n\n",
    )
    assert events == [
        ServerSentEvent("job", '{"a":\n 1}', "7"),
        ServerSentEvent("message", "plain", "7"),
        # "id" with no colon resets the id; "data" with no colon is one empty line.
        ServerSentEvent("message", "", ""),
    ]
    assert parser.retry_ms == 1500
    assert json.loads(events[0].data) == {"a": 1}


def test_sse_parser_ignores_an_id_holding_nul_and_a_retry_that_is_not_a_number() -> None:
    parser = SseParser()
    assert feed_all(parser, "id: 3\nretry: soon\ndata: x\n\nid: a\0b\ndata: y\n\n") == [
        ServerSentEvent("message", "x", "3"),
        ServerSentEvent("message", "y", "3"),
    ]
    assert parser.retry_ms is None


# ------------------------------------------------------------------ what a view says


def test_job_status_reads_the_queue_position_then_the_instance_and_the_running_node() -> None:
    assert job_status(view("queued", queue_position=3)).headline == "queued (position 3)"
    requeued = job_status(view("queued", queue_position=1, attempts=1))
    assert requeued.headline == "queued (position 1), attempt 2 of 3"
    uploading = view("placed", progress={"state": "uploading", "percent": 0.0})
    assert job_status(uploading).headline == "placed on instance 4: sending the inputs to ComfyUI"
    running = job_status(
        view(
            "running",
            progress={
                "state": "running",
                "percent": 42.5,
                "node_id": "3",
                "node_type": "KSampler",
                "node_title": "Sampler",
                "value": 5,
                "max": 20,
                "prompt_id": "p",
            },
        )
    )
    assert running == JobStatus(
        "running", "running on instance 4", 'KSampler "Sampler" (node 3)', 5.0, 20.0, 42.5
    )
    assert running.steps() == 'KSampler "Sampler" (node 3): step 5/20, 42% overall'
    cancelling = job_status(view("running", cancel_requested=True))
    assert cancelling.headline == "running on instance 4 (cancelling)"
    assert job_status(view("failed", error="boom")).ended


# ------------------------------------------------------------------ local checks


def test_a_job_is_prepared_with_the_parameters_the_control_plane_applies(tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    image.write_bytes(b"\x89PNG fake")
    request = prepare_job(
        INVERT,
        images=[f"Load Image={image}"],
        sets=["Save Image.filename_prefix=mine"],
        randomize_seeds=False,
        profile="sdxl",
        priority=5,
        timeout_s=60.0,
        webhook_url="https://example.com/hook",
    )
    assert request.inputs == (image,)
    assert request.workflow["1"]["class_type"] == "LoadImage"
    assert request.params == {
        "images": [{"node": "Load Image", "name": "face.png"}],
        "set": ["Save Image.filename_prefix=mine"],
        "randomize_seeds": False,
        "priority": 5,
        "profile": "sdxl",
        "timeout_s": 60.0,
        "webhook_url": "https://example.com/hook",
    }


def test_local_checks_refuse_what_the_control_plane_would(tmp_path: Path) -> None:
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps(ui_workflow()))
    with pytest.raises(WorkflowError, match=r"Export \(API\)"):
        prepare_job(ui)
    with pytest.raises(WorkflowError, match="no node 'Nope'"):
        prepare_job(TXT2IMG, sets=["Nope.steps=3"])
    with pytest.raises(WorkflowError, match=r"expected NODE\.INPUT=VALUE"):
        prepare_job(TXT2IMG, sets=["steps"])
    with pytest.raises(WorkflowError, match="does not exist"):
        prepare_job(INVERT, images=[str(tmp_path / "none.png")])
    with pytest.raises(WorkflowError, match="no LoadImage"):
        (tmp_path / "a.png").write_bytes(b"x")
        prepare_job(TXT2IMG, images=[str(tmp_path / "a.png")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.png").write_bytes(b"y")
    with pytest.raises(WorkflowError, match=r"same file name 'a\.png'"):
        prepare_job(INVERT, images=[str(tmp_path / "a.png"), f"1={tmp_path / 'b' / 'a.png'}"])
    with pytest.raises(ConfigError, match="https"):
        prepare_job(TXT2IMG, webhook_url="http://example.com/hook")


# ------------------------------------------------------------------ a scripted server


@dataclass
class ScriptedJobs:
    """The jobs routes, answering what the test scripts, recording what they are asked.

    ``streams`` holds one script per connection to the event stream, in order: each step
    is a view (sent as ``event: job``), a ``str`` sent as it is, or ``DROP`` (the
    connection is cut mid-body). A script that runs out closes the stream cleanly; a
    script that is an ``int`` is answered with that status instead.
    """

    current: dict[str, Any] = field(default_factory=view)
    streams: list[list[Any] | int] = field(default_factory=list)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            with self.lock:
                self.requests.append(
                    (request.method, str(request.url), dict(request.headers.items()))
                )
            return await call_next(request)

        @app.get("/api/jobs/{job_id}")
        async def get_job(job_id: str) -> dict[str, Any]:
            return self.current

        @app.get("/api/jobs/{job_id}/events", response_model=None)
        async def events(job_id: str) -> StreamingResponse | JSONResponse:
            with self.lock:
                script = self.streams.pop(0) if self.streams else []
            if isinstance(script, int):
                return JSONResponse({"detail": f"scripted {script}"}, status_code=script)

            async def body() -> AsyncIterator[bytes]:
                for step in script:
                    if step is DROP:
                        raise ConnectionAbortedError("cut by the test")
                    if isinstance(step, dict):
                        self.current = step
                        yield f"event: job\ndata: {json.dumps(step)}\n\n".encode()
                    else:
                        yield step.encode()
                    await asyncio.sleep(0.01)

            return StreamingResponse(body(), media_type="text/event-stream")

        @app.get("/api/jobs/{job_id}/outputs/{name}")
        async def output(job_id: str, name: str) -> Response:
            data, announced = self.files[name]
            return Response(data, media_type="image/png", headers={SHA256_HEADER: announced})

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def anything(path: str) -> JSONResponse:
            return JSONResponse({"detail": f"nothing at /{path}"}, status_code=404)

        return app


DROP = object()


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedJobs, str]]:
    jobs = ScriptedJobs()
    with RunningServer(jobs.app()) as server:
        yield jobs, server.url


async def test_job_events_survive_a_dropped_stream_and_an_early_close(
    scripted: tuple[ScriptedJobs, str],
) -> None:
    jobs, url = scripted
    placed = view("placed")
    running = view("running", progress={"state": "running", "percent": 50.0})
    succeeded = view("succeeded", finished_at=2.0)
    jobs.streams = [
        [": hello\n\n", view("queued"), "id: 1\n", DROP],
        # Closed early (a proxy's limit): what happened meanwhile comes from GET.
        [placed, running],
        [running, "event: job\n", f"data: {json.dumps(succeeded)[:20]}\n", "data: ", "\n\n"],
    ]
    # The third script's event is broken on purpose: a non-JSON event is an error.
    seen: list[str] = []
    async with ControlClient(url, admin_key=None, api_key=USER_KEY) as control:
        with pytest.raises(ControlPlaneError, match="not a JSON object"):
            async for got in control.job_events(JOB_ID):
                seen.append(got["state"])
    assert seen == ["queued", "placed", "running"]

    jobs.current = view("running")
    jobs.streams = [[running, DROP], [succeeded]]
    states: list[str] = []
    async with ControlClient(url, admin_key=None, api_key=USER_KEY) as control:
        async for got in control.job_events(JOB_ID):
            states.append(got["state"])
    # The same view is never yielded twice in a row; the stream ends with the job.
    assert states == ["running", "succeeded"]
    for _, address, headers in jobs.requests:
        assert USER_KEY not in address
        assert headers.get("authorization") == f"Bearer {USER_KEY}"
        assert "x-admin-key" not in headers


async def test_job_events_reconnect_with_the_last_event_id_and_stop_at_the_end(
    scripted: tuple[ScriptedJobs, str],
) -> None:
    jobs, url = scripted
    jobs.current = view("running")
    jobs.streams = [["id: 41\n", view("running"), DROP], [view("cancelled")]]
    async with ControlClient(url, admin_key="admin-key", api_key=None) as control:
        states = [got["state"] async for got in control.job_events(JOB_ID)]
    assert states == ["running", "cancelled"]
    streams = [headers for _, address, headers in jobs.requests if address.endswith("/events")]
    assert streams[1]["last-event-id"] == "41"
    # Without a user key the admin key is the one sent, in its own header.
    assert all(h.get("x-admin-key") == "admin-key" and "authorization" not in h for h in streams)


async def test_job_events_wait_out_a_503_but_not_a_refusal(
    scripted: tuple[ScriptedJobs, str],
) -> None:
    jobs, url = scripted
    jobs.current = view("running")
    jobs.streams = [503, [view("running"), DROP], 404]
    states: list[str] = []
    async with ControlClient(url, admin_key=None, api_key=USER_KEY) as control:
        with pytest.raises(ControlPlaneError, match=r"\(404\): scripted 404") as refused:
            async for got in control.job_events(JOB_ID):
                states.append(got["state"])
    assert refused.value.status == 404
    assert states == ["running"]


async def test_an_output_is_kept_only_with_the_sha256_announced(
    scripted: tuple[ScriptedJobs, str], tmp_path: Path
) -> None:
    jobs, url = scripted
    data = bytes(range(256)) * 5000
    digest = hashlib.sha256(data).hexdigest()
    jobs.files = {"a b.png": (data, digest), "bad.png": (data, "0" * 64)}
    async with ControlClient(url, admin_key=None, api_key=USER_KEY) as control:
        size = await control.download_output(JOB_ID, "a b.png", tmp_path / "a b.png", sha256=digest)
        assert size == len(data)
        assert (tmp_path / "a b.png").read_bytes() == data
        with pytest.raises(DownloadCorrupted, match="X-Comfyfleet-Sha256"):
            await control.download_output(JOB_ID, "bad.png", tmp_path / "bad.png")
        with pytest.raises(DownloadCorrupted, match="the job's view"):
            await control.download_output(JOB_ID, "a b.png", tmp_path / "c.png", sha256="1" * 64)
    assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == ["a b.png"]


async def test_the_jobs_api_needs_a_key_and_says_how_to_make_one(
    scripted: tuple[ScriptedJobs, str],
) -> None:
    _, url = scripted
    async with ControlClient(url, admin_key=None, api_key=None) as control:
        with pytest.raises(ApiKeyMissing, match="comfyfleet keys create NAME"):
            await control.job(JOB_ID)


# ------------------------------------------------------------------ the command, locally


@pytest.fixture
def recorder(
    scripted: tuple[ScriptedJobs, str], clean_env: dict[str, str]
) -> tuple[ScriptedJobs, dict[str, str]]:
    jobs, url = scripted
    return jobs, {**clean_env, "COMFYFLEET_SERVER": url, "COMFYFLEET_API_KEY": USER_KEY}


def test_a_ui_format_workflow_exits_2_before_any_request(
    recorder: tuple[ScriptedJobs, dict[str, str]], tmp_path: Path
) -> None:
    jobs, env = recorder
    ui = tmp_path / "saved.json"
    ui.write_text(json.dumps(ui_workflow()))
    done = run_cli("run", str(ui), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {ui}: this is a UI-format workflow")
    assert "Export (API)" in lines[0]
    for args, says in (
        (["run", str(tmp_path / "missing.json")], "cannot read the workflow"),
        (["run", str(TXT2IMG), "--set", "KSampler.stepz=30"], "did you mean 'steps'"),
        (["run", str(INVERT), "--image", str(tmp_path / "none.png")], "does not exist"),
        (["run", str(TXT2IMG), "--set", "KSampler.steps"], "expected NODE.INPUT=VALUE"),
    ):
        done = run_cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
        assert says in done.stderr
    assert jobs.requests == []


def test_no_key_exits_2_with_how_to_make_one_before_any_request(
    recorder: tuple[ScriptedJobs, dict[str, str]],
) -> None:
    jobs, env = recorder
    env = {k: v for k, v in env.items() if k not in ("COMFYFLEET_API_KEY", "ADMIN_API_KEY")}
    done = run_cli("run", str(TXT2IMG), env=env)
    assert done.returncode == 2, done.stderr
    assert "comfyfleet keys create NAME" in done.stderr
    assert "export it as COMFYFLEET_API_KEY" in done.stderr
    assert jobs.requests == []


def test_an_unreachable_control_plane_exits_3(clean_env: dict[str, str]) -> None:
    from comfyfleet.providers.process import free_loopback_port

    env = {
        **clean_env,
        "COMFYFLEET_SERVER": f"http://127.0.0.1:{free_loopback_port()}",
        "COMFYFLEET_API_KEY": USER_KEY,
    }
    done = run_cli("run", str(TXT2IMG), env=env)
    assert done.returncode == 3, done.stderr
    assert "no control plane at" in done.stderr


def test_help_teaches_examples_the_key_and_the_exit_codes(clean_env: dict[str, str]) -> None:
    done = run_cli("run", "--help", env=clean_env)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for needle in (
        "comfyfleet run img2img.json --image photo.png",
        "COMFYFLEET_API_KEY",
        "comfyfleet keys create NAME",
        "124 --timeout",
        "130 Ctrl-C",
        "--seed-fixed",
    ):
        assert needle in text, needle


def test_the_plain_display_prints_each_change_and_the_steps_every_few_seconds() -> None:
    from io import StringIO

    from rich.console import Console

    from comfyfleet.commands.run import PlainJobDisplay

    now = [0.0]
    out = StringIO()
    display = PlainJobDisplay(
        Console(file=out, width=200, no_color=True), steps_every_s=2.0, clock=lambda: now[0]
    )

    def running(value: int, node: str = "3") -> dict[str, Any]:
        progress = {"state": "running", "percent": value * 5.0, "node_id": node}
        return view(
            "running", progress={**progress, "node_type": "KSampler", "value": value, "max": 20}
        )

    display.show(view("queued", queue_position=2))
    display.show(view("queued", queue_position=1))
    display.show(view("placed"))
    for second, value in ((1.0, 1), (1.5, 2), (3.5, 3), (3.6, 4)):
        now[0] = second
        display.show(running(value))
    now[0] = 3.7
    display.show(running(1, node="8"))
    display.show(view("succeeded"))
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "queued (position 2)",
        "queued (position 1)",
        "placed on instance 4",
        "running on instance 4",
        "  KSampler (node 3): step 1/20, 5% overall",
        "  KSampler (node 3): step 3/20, 15% overall",
        "  KSampler (node 8): step 1/20, 5% overall",
    ]


def test_the_live_display_draws_the_overall_and_the_step_bars() -> None:
    from io import StringIO

    from rich.console import Console

    from comfyfleet.commands.run import LiveJobDisplay

    out = StringIO()
    console = Console(file=out, width=120, force_terminal=True, no_color=True)
    display = LiveJobDisplay(console, JOB_ID)
    try:
        display.show(view("queued", queue_position=2))
        progress = {
            "state": "running",
            "percent": 25.0,
            "node_id": "3",
            "node_type": "KSampler",
            "node_title": "Sampler",
            "value": 5,
            "max": 20,
        }
        display.show(view("running", progress=progress))
        plain = Console(file=StringIO(), width=120, color_system=None)
        with plain.capture() as captured:
            plain.print(display._render())
    finally:
        display.close()
    drawn = captured.get()
    assert f"job {JOB_ID} running on instance 4" in drawn
    assert "overall" in drawn and "25%" in drawn
    assert 'KSampler "Sampler" (node 3)' in drawn and "5/20" in drawn
    assert "queued (position 2)" in out.getvalue()


# ------------------------------------------------------------------ the command, end to end


@dataclass
class CliRun:
    """``comfyfleet run`` as a running process, its output read line by line as it comes."""

    process: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, lines in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, *, stream: str = "stdout", timeout: float = 30.0) -> str:
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if text in line:
                    return line
            if self.process.poll() is not None and not any(text in line for line in lines):
                time.sleep(0.2)  # the pump may still hold the last lines
                if not any(text in line for line in lines):
                    break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} in {stream}: {lines!r} (stderr: {self.stderr!r})")

    def finish(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        time.sleep(0.1)
        return code

    @property
    def out(self) -> str:
        return "\n".join(self.stdout)

    @property
    def err(self) -> str:
        return "\n".join(self.stderr)


@dataclass
class JobsPlane:
    """The production control plane on loopback, one ready instance of profile ``sdxl``,
    and a user key; the test moves jobs as that instance's agent would, in the store."""

    url: str
    store: Store
    clock: ManualClock
    ctx: Any
    loop: asyncio.AbstractEventLoop
    instance_id: int
    key_id: int
    env: dict[str, str]
    #: Where the command runs: ``./outputs/<job id>`` is under it.
    workdir: Path

    def wake(self, job_id: str) -> None:
        # What the agent routes do after each report: the followers look again at once.
        self.loop.call_soon_threadsafe(self.ctx.signals.notify, job_key(job_id))

    def move(self, job_id: str, work: Callable[[Any, float], Any]) -> Any:
        result = self.store.run_sync(lambda session: work(session, self.clock.now()))
        self.wake(job_id)
        return result

    def start(self, *args: str, **env: str) -> CliRun:
        return CliRun(
            subprocess.Popen(
                [CLI, *args],
                env={**self.env, **env},
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    def submitted_job(self, timeout: float = 30.0) -> str:
        """The id of the job the key submitted (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.store.run_sync(lambda s: [r.id for r in jobs_for_key(s, self.key_id)])
            if rows:
                return str(rows[0])
            time.sleep(0.05)
        raise AssertionError("no job was submitted")

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.store.run_sync(lambda s: job_view(s, job_id, now=self.clock.now())))

    def request(self, job_id: str) -> dict[str, Any]:
        return dict(self.store.run_sync(lambda s: get_job(s, job_id).request))

    def place(self, job_id: str) -> str:
        lease = self.move(job_id, lambda s, now: place_job(s, job_id, self.instance_id, now))
        return str(lease)

    def run(self, job_id: str, lease: str, **progress: Any) -> None:
        def work(session: Any, now: float) -> None:
            start_job(session, job_id, lease, now)
            if progress:
                report_progress(session, job_id, lease, progress, now)

        self.move(job_id, work)

    def output(self, job_id: str, lease: str, name: str, data: bytes, kind: str) -> None:
        digest = hashlib.sha256(data).hexdigest()
        stored = asyncio.run_coroutine_threadsafe(
            self.ctx.outputs.put_stream(io.BytesIO(data), expected_sha256=digest), self.loop
        ).result(30)
        assert stored.sha256 == digest
        self.move(
            job_id,
            lambda s, now: record_output(s, job_id, lease, name, digest, len(data), kind, now=now),
        )


@pytest.fixture
def plane(sqlite_store: Store, tmp_path: Path, clean_env: dict[str, str]) -> Iterator[JobsPlane]:
    clock = ManualClock(start=T0)
    settings = ApiSettings(
        admin_api_key=SecretStr(ADMIN_KEY),
        data_dir=tmp_path / "data",
        profiles={"sdxl": AgentProfile(manifest={"models": []}, comfy=ComfySpec())},
    )
    app = create_app(sqlite_store, settings, clock=clock, pool=None)
    loops: list[asyncio.AbstractEventLoop] = []

    @app.middleware("http")
    async def server_loop(request: Request, call_next: Any) -> Any:
        if not loops:
            loops.append(asyncio.get_running_loop())
        return await call_next(request)

    instance = rent(sqlite_store, clock, state=InstanceState.READY)
    key_id, key = sqlite_store.run_sync(
        lambda session: (lambda made: (made[0].id, made[1]))(
            create_key(session, "tests", now=clock.now())
        )
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    with RunningServer(app) as server:
        assert httpx.get(f"{server.url}/api/health", timeout=10).status_code == 200
        yield JobsPlane(
            url=server.url,
            store=sqlite_store,
            clock=clock,
            ctx=app.state.ctx,
            loop=loops[0],
            instance_id=instance.id,
            key_id=key_id,
            env={**clean_env, "COMFYFLEET_SERVER": server.url, "COMFYFLEET_API_KEY": key},
            workdir=workdir,
        )


def test_a_job_that_succeeds_brings_every_output_home_byte_identical_and_exits_0(
    plane: JobsPlane, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(os.urandom(200_000))
    image = os.urandom(3 * 1024 * 1024 + 17)  # more than one write batch
    text = b"a lighthouse at dusk\n"
    out = tmp_path / "results"
    cli = plane.start("run", str(INVERT), "--image", str(photo), "--out", str(out))
    job_id = plane.submitted_job()
    cli.wait_for(f"submitted job {job_id} (profile sdxl, queued (position 1))")
    cli.wait_for("queued (position 1)")
    # What was uploaded is the job's input, wired into the only LoadImage.
    request = plane.request(job_id)
    assert request["inputs"] == [
        {
            "name": "photo.png",
            "sha256": hashlib.sha256(photo.read_bytes()).hexdigest(),
            "size": 200_000,
        }
    ]
    assert request["workflow"]["1"]["inputs"]["image"] == "photo.png"

    lease = plane.place(job_id)
    cli.wait_for(f"placed on instance {plane.instance_id}")
    plane.run(
        job_id,
        lease,
        state="running",
        percent=40.0,
        node_id="2",
        node_type="ImageInvert",
        node_title="Invert Image",
        value=3,
        max=10,
        prompt_id="p-1",
    )
    cli.wait_for(f"running on instance {plane.instance_id}")
    cli.wait_for('ImageInvert "Invert Image" (node 2): step 3/10, 40% overall')
    plane.output(job_id, lease, "invert_00001_.png", image, "images")
    plane.output(job_id, lease, "node3_text_1.txt", text, "text")
    plane.move(job_id, lambda s, now: complete_job(s, job_id, lease, {"prompt_id": "p-1"}, now))

    assert cli.finish() == 0, cli.err
    assert (out / "invert_00001_.png").read_bytes() == image
    assert (out / "node3_text_1.txt").read_bytes() == text
    assert sorted(p.name for p in out.iterdir()) == ["invert_00001_.png", "node3_text_1.txt"]
    assert f"job {job_id} succeeded" in cli.out
    assert f"{out / 'invert_00001_.png'}  3.1 MB" in cli.out
    assert f"{out / 'node3_text_1.txt'}  21 B" in cli.out
    assert cli.err == ""


def test_a_failed_job_exits_1_with_comfyuis_reason_made_readable(plane: JobsPlane) -> None:
    reason = (
        "ComfyUI refused the workflow: Prompt outputs failed validation\n"
        "node 3 (KSampler) input 'steps': 0 is below the minimum 1"
    )
    cli = plane.start("run", str(TXT2IMG), "--prompt", "a red fox", "--set", "KSampler.steps=0")
    job_id = plane.submitted_job()
    workflow = plane.request(job_id)["workflow"]
    assert workflow["6"]["inputs"]["text"] == "a red fox"
    assert workflow["3"]["inputs"]["steps"] == 0
    lease = plane.place(job_id)
    plane.move(job_id, lambda s, now: fail_job(s, job_id, lease, reason, now))
    assert cli.finish() == 1, cli.err
    assert f"job {job_id} failed: ComfyUI refused the workflow" in cli.err
    assert "node 3 (KSampler) input 'steps': 0 is below the minimum 1" in cli.err
    assert not (plane.workdir / "outputs").exists()


def test_a_job_cancelled_elsewhere_exits_1_saying_so(plane: JobsPlane) -> None:
    cli = plane.start("run", str(TXT2IMG))
    job_id = plane.submitted_job()
    cli.wait_for("queued (position 1)")
    plane.move(job_id, lambda s, now: request_cancel(s, job_id, now))
    assert cli.finish() == 1
    assert f"job {job_id} was cancelled" in cli.err


def test_timeout_exits_124_and_cancels_the_queued_job(plane: JobsPlane) -> None:
    cli = plane.start("run", str(TXT2IMG), "--timeout", "1.5")
    job_id = plane.submitted_job()
    assert cli.finish() == 124, cli.err
    assert f"timed out after 2s: cancelled job {job_id}" in cli.err
    ended = plane.job(job_id)
    assert ended["state"] == "cancelled"
    assert ended["timeout_s"] == 1.5


def test_timeout_of_a_running_job_asks_its_agent_to_stop_and_it_ends_cancelled(
    plane: JobsPlane,
) -> None:
    cli = plane.start("run", str(TXT2IMG), "--timeout", "2")
    job_id = plane.submitted_job()
    lease = plane.place(job_id)
    plane.run(job_id, lease, state="running", percent=10.0, prompt_id="p")
    assert cli.finish() == 124, cli.err
    assert f"asked to cancel job {job_id}; its instance interrupts it" in cli.err
    assert plane.job(job_id)["cancel_requested"] is True
    # The agent sees cancel_requested on its next report, interrupts ComfyUI, says so.
    plane.move(job_id, lambda s, now: finish_cancelled(s, job_id, lease, now))
    assert plane.job(job_id)["state"] == "cancelled"


def test_a_job_the_control_plane_timed_out_exits_124(plane: JobsPlane) -> None:
    cli = plane.start("run", str(TXT2IMG), "--timeout", "300")
    job_id = plane.submitted_job()
    lease = plane.place(job_id)
    plane.run(job_id, lease, state="running", percent=10.0, prompt_id="p")
    cli.wait_for("running on instance")
    plane.clock.advance(301)
    plane.move(job_id, lambda s, now: fail_timed_out_jobs(s, now))
    assert cli.finish() == 124, cli.err
    assert f"job {job_id} failed: timed out: it ran past its timeout of 300 s" in cli.err


def test_ctrl_c_cancels_the_job_and_exits_130(plane: JobsPlane) -> None:
    cli = plane.start("run", str(TXT2IMG))
    job_id = plane.submitted_job()
    cli.wait_for("queued (position 1)")
    cli.process.send_signal(signal.SIGINT)
    assert cli.finish() == 130, cli.err
    assert f"interrupted: cancelled job {job_id}" in cli.err
    assert plane.job(job_id)["state"] == "cancelled"


def test_json_prints_one_document_with_the_final_view_and_the_local_files(
    plane: JobsPlane, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    cli = plane.start("run", str(TXT2IMG), "--json", "-p", "sdxl")
    job_id = plane.submitted_job()
    lease = plane.place(job_id)
    plane.run(job_id, lease)
    plane.output(job_id, lease, "ComfyUI_00001_.webp", data, "images")
    plane.move(job_id, lambda s, now: complete_job(s, job_id, lease, {}, now))
    assert cli.finish() == 0, cli.err
    document = json.loads(cli.out)
    assert set(document) == {"job", "out_dir", "files", "exit_code", "message"}
    assert document["exit_code"] == 0
    # By default the outputs go to ./outputs/<job id>.
    assert document["out_dir"] == f"outputs/{job_id}"
    assert document["job"]["id"] == job_id
    assert document["job"]["state"] == "succeeded"
    assert document["files"] == [
        {
            "name": "ComfyUI_00001_.webp",
            "path": f"outputs/{job_id}/ComfyUI_00001_.webp",
            "size": 5000,
            "sha256": hashlib.sha256(data).hexdigest(),
            "kind": "images",
            "content_type": "image/webp",
        }
    ]
    assert (plane.workdir / document["files"][0]["path"]).read_bytes() == data
    assert f"submitted job {job_id}" in cli.err


def test_no_wait_submits_prints_the_id_and_leaves_the_job_queued(plane: JobsPlane) -> None:
    done = run_cli("run", str(TXT2IMG), "--no-wait", "--priority", "7", env=plane.env)
    assert done.returncode == 0, done.stderr
    job_id = plane.submitted_job()
    assert f"submitted job {job_id}" in done.stdout
    queued = plane.job(job_id)
    assert (queued["state"], queued["priority"]) == ("queued", 7)


def test_refusals_exit_2_for_the_key_and_3_for_the_control_plane(plane: JobsPlane) -> None:
    wrong = run_cli("run", str(TXT2IMG), env={**plane.env, "COMFYFLEET_API_KEY": "cf_" + "x" * 43})
    assert wrong.returncode == 2, wrong.stderr
    assert "COMFYFLEET_API_KEY" in wrong.stderr and "comfyfleet keys create NAME" in wrong.stderr
    unknown = run_cli("run", str(TXT2IMG), "--profile", "flux", env=plane.env)
    assert unknown.returncode == 3, unknown.stderr
    assert "unknown profile 'flux': this control plane serves sdxl" in unknown.stderr
