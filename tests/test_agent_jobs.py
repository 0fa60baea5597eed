"""The agent's job runner against the ComfyUI simulator on loopback.

Most tests share one simulator process (``python -m comfyfleet.sim.comfy``, its stand-in
sampler taking ``--step-seconds`` per step); the WebSocket-drop test runs the simulator
in a background thread (``RunningComfySim``), whose ``drop_websockets()`` closes every
socket as a network blip would. The control plane is stood in for by ``RecordingSink``,
which keeps what the runner reports, in order, and copies every output as it is handed
over.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfyfleet.agent.comfy import LOOPBACK, ComfyClient
from comfyfleet.agent.jobs import (
    JobOutcome,
    JobOutput,
    JobProgress,
    JobSpec,
    ProgressTracker,
    file_chunks,
    queue_position,
    rewrite_input_references,
    run_job,
    text_outputs,
)
from comfyfleet.sim.comfy import ComfySimConfig, RunningComfySim
from comfyfleet.sim.comfy_nodes import Folders

REPO = Path(__file__).resolve().parent.parent
SIM = (sys.executable, "-m", "comfyfleet.sim.comfy")
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


# --------------------------------------------------------------------------- the stand-in


@dataclass
class RecordingSink:
    """The test's stand-in for the control plane: everything reported, in order.

    Outputs are read back while ``output`` runs (the file is the runner's temporary one
    and is gone afterwards), through ``file_chunks`` as an HTTP upload would stream it.
    """

    log: list[tuple[str, Any]] = field(default_factory=list)
    leases: set[tuple[str, str]] = field(default_factory=set)
    blobs: dict[str, bytes] = field(default_factory=dict)

    async def progress(self, job_id: str, lease_id: str, event: JobProgress) -> None:
        self.leases.add((job_id, lease_id))
        self.log.append(("progress", event))

    async def output(self, job_id: str, lease_id: str, output: JobOutput, path: Path) -> None:
        self.leases.add((job_id, lease_id))
        data = b"".join([chunk async for chunk in file_chunks(path, chunk_size=4096)])
        assert output.name not in self.blobs, f"{output.name} handed over twice"
        self.blobs[output.name] = data
        self.log.append(("output", output))

    async def finished(self, job_id: str, lease_id: str, result: JobOutcome) -> None:
        self.leases.add((job_id, lease_id))
        self.log.append(("finished", result))

    @property
    def progress_events(self) -> list[JobProgress]:
        return [e for kind, e in self.log if kind == "progress"]

    @property
    def outputs(self) -> list[JobOutput]:
        return [e for kind, e in self.log if kind == "output"]

    def assert_finished_once_after_every_output(self, outcome: JobOutcome) -> None:
        kinds = [kind for kind, _ in self.log]
        assert kinds.count("finished") == 1
        assert kinds[-1] == "finished" and self.log[-1][1] == outcome
        assert tuple(self.outputs) == outcome.outputs


# --------------------------------------------------------------------------- simulators


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def workspace(base: Path) -> Path:
    """A ComfyUI base folder with the checkpoint the txt2img workflow loads."""
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / CHECKPOINT).write_bytes(b"\0" * 16)
    return base


@dataclass
class Sim:
    url: str
    folders: Folders


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """One simulator process for the module; its sampler takes 20 ms a step."""
    base = workspace(tmp_path_factory.mktemp("jobs-sim") / "comfy")
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


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(sim.url, timeout_s=10) as comfy:
        yield comfy


# --------------------------------------------------------------------------- workflows


def txt2img(prefix: str, *, seed: int, steps: int = 10, size: int = 64) -> dict[str, Any]:
    """The example txt2img workflow, smaller and with its own file prefix."""
    graph: dict[str, Any] = json.loads((REPO / "examples/workflows/txt2img.json").read_text())
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    graph["5"]["inputs"].update(width=size, height=size)
    graph["9"]["inputs"]["filename_prefix"] = prefix
    return graph


def sleeping(seconds: float, prefix: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SimSleep",
            "inputs": {"images": ["1", 0], "seconds": seconds, "steps": int(seconds * 10)},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec(workflow: dict[str, Any], **kw: Any) -> JobSpec:
    kw.setdefault("job_id", "job-1")
    kw.setdefault("lease_id", "lease-1")
    return JobSpec(workflow=workflow, **kw)


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def until(condition: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def assert_handed_over_as_comfyui_wrote_them(
    client: ComfyClient, folders: Folders, sink: RecordingSink, outcome: JobOutcome
) -> None:
    """Every output file in the history came back byte for byte: as /view serves it and as
    ComfyUI wrote it to disk, with the sha256 and size the runner reported."""
    assert outcome.prompt_id is not None
    item = (await client.history(outcome.prompt_id))[outcome.prompt_id]
    by_name = {o.name: o for o in outcome.outputs}
    for node_id, kinds in item["outputs"].items():
        for kind, entries in kinds.items():
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                folder = folders.directory_by_type(entry["type"])
                assert folder is not None
                on_disk = (folder / entry["subfolder"] / entry["filename"]).read_bytes()
                served = await client.view(
                    entry["filename"], subfolder=entry["subfolder"], type=entry["type"]
                )
                output = by_name[entry["filename"]]
                assert (output.node_id, output.kind) == (node_id, kind)
                assert sink.blobs[output.name] == served == on_disk
                assert output.sha256 == sha256(on_disk) and output.size == len(on_disk)


# --------------------------------------------------------------------------- pure parts


def test_progress_counts_the_nodes_that_run_and_the_samplers_steps() -> None:
    graph = txt2img("p", seed=1, steps=4)  # 7 nodes
    tracker = ProgressTracker(graph, "pid")
    assert tracker.queued(2) == JobProgress(state="queued", queue_position=2, prompt_id="pid")
    assert tracker.queued(2) is None  # nothing new
    tracker.feed({"type": "execution_start", "data": {"prompt_id": "pid"}})
    tracker.feed({"type": "execution_cached", "data": {"nodes": ["4", "6", "7"]}})
    event = tracker.feed({"type": "executing", "data": {"node": "5", "prompt_id": "pid"}})
    assert event is not None and (event.state, event.queue_position) == ("running", 0)
    assert (event.node_id, event.node_type, event.percent) == ("5", "EmptyLatentImage", 0.0)
    tracker.feed({"type": "executing", "data": {"node": "3", "prompt_id": "pid"}})
    event = tracker.feed({"type": "progress", "data": {"value": 2, "max": 4, "node": "3"}})
    # 4 nodes run (3 cached): node 5 done, half of the sampler.
    assert event is not None and event.percent == pytest.approx(37.5)
    assert (event.node_title, event.value, event.max) == ("KSampler", 2.0, 4.0)
    # A status message and a queue reading once it runs change nothing.
    assert tracker.feed({"type": "status", "data": {"status": {}}}) is None
    assert tracker.queued(1) is None
    finished = {n: {"state": "finished"} for n in ("3", "5", "8", "9")}
    event = tracker.feed({"type": "progress_state", "data": {"nodes": finished}})
    assert event is not None and event.percent == 99.0  # 100 only once ComfyUI says so
    assert tracker.done() == JobProgress(
        state="collecting", percent=100.0, queue_position=0, prompt_id="pid"
    )


def test_queue_position_is_zero_running_then_by_number_not_heap_order() -> None:
    queue = {
        "queue_running": [[0, "a", {}, {}, []]],
        "queue_pending": [[-5, "front", {}, {}, []], [9, "late", {}, {}, []], [3, "b", {}, {}, []]],
    }
    assert [queue_position(queue, p) for p in ("a", "front", "b", "late", "gone")] == [
        0,
        1,
        2,
        3,
        None,
    ]


def test_renamed_uploads_are_rewritten_in_literal_inputs_only() -> None:
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "in.png [input]"}},
        "3": {"class_type": "X", "inputs": {"a": ["1", 0], "b": "other.png", "c": 3}},
    }
    out = rewrite_input_references(graph, {"in.png": "in (1).png"})
    assert out["1"]["inputs"]["image"] == "in (1).png"
    assert out["2"]["inputs"]["image"] == "in (1).png [input]"
    assert out["3"]["inputs"] == {"a": ["1", 0], "b": "other.png", "c": 3}
    assert graph["1"]["inputs"]["image"] == "in.png"  # the job's own workflow is left alone


def test_text_outputs_are_every_text_entry_in_node_order() -> None:
    outputs = {
        "4": {"text": ["hello", {"k": 1}]},
        "5": {"images": [{"filename": "a.png"}], "animated": [True]},
        "6": {"text": ["bye"]},
    }
    assert [(t.name, t.text) for t in text_outputs(outputs)] == [
        ("text_4_0.txt", "hello"),
        ("text_4_1.txt", '{"k": 1}'),
        ("text_6_0.txt", "bye"),
    ]


# --------------------------------------------------------------------------- jobs that succeed


async def test_a_txt2img_job_hands_over_its_image_byte_identical_to_what_comfyui_wrote(
    sim: Sim, client: ComfyClient, tmp_path: Path
) -> None:
    sink = RecordingSink()
    job = spec(txt2img("job_txt2img", seed=11), job_id="job-t2i", lease_id="lease-7")
    outcome = await run_job(client, job, sink, workdir=tmp_path / "work")

    assert outcome.status == "succeeded", outcome.reason
    assert outcome.reason is None and outcome.error is None
    [image] = outcome.outputs
    assert image.name.startswith("job_txt2img_") and image.name.endswith(".png")
    assert (image.kind, image.node_id, image.content_type) == ("images", "9", "image/png")
    assert not image.temporary
    assert sink.blobs[image.name].startswith(b"\x89PNG\r\n\x1a\n")
    await assert_handed_over_as_comfyui_wrote_them(client, sim.folders, sink, outcome)
    sink.assert_finished_once_after_every_output(outcome)
    assert sink.leases == {("job-t2i", "lease-7")}

    events = sink.progress_events
    steps = [(e.value, e.max) for e in events if e.node_type == "KSampler" and e.max]
    assert steps[-1] == (10.0, 10.0)
    percents = [e.percent for e in events]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert events[-1].state == "collecting" and events[-1].prompt_id == outcome.prompt_id
    assert leftovers(tmp_path / "work") == []  # temporary files are gone


async def test_an_img2img_job_uploads_its_input_and_follows_comfyuis_rename(
    sim: Sim, client: ComfyClient, tmp_path: Path
) -> None:
    # Another file already has the name: ComfyUI keeps both and names ours "photo (1).png".
    (sim.folders.input / "photo.png").write_bytes(png((0, 0, 255)))
    red = png((255, 0, 0))
    graph = txt2img("job_img2img", seed=12, steps=4)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["11", 0], denoise=0.6)
    graph["12"] = {"class_type": "ImageInvert", "inputs": {"image": ["10", 0]}}
    graph["13"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["12", 0], "filename_prefix": "job_inverted"},
    }
    sink = RecordingSink()
    job = spec(graph, inputs={"photo.png": red})
    outcome = await run_job(client, job, sink, workdir=tmp_path)

    assert outcome.status == "succeeded", outcome.reason
    assert (sim.folders.input / "photo (1).png").read_bytes() == red
    assert outcome.prompt_id is not None
    ran = (await client.history(outcome.prompt_id))[outcome.prompt_id]["prompt"][2]
    assert ran["10"]["inputs"]["image"] == "photo (1).png"
    assert [(o.node_id, o.kind) for o in outcome.outputs] == [("9", "images"), ("13", "images")]
    inverted = next(o for o in outcome.outputs if o.node_id == "13")
    with Image.open(io.BytesIO(sink.blobs[inverted.name])) as image:
        assert image.size == (8, 4) and image.convert("RGB").getpixel((0, 0)) == (0, 255, 255)
    with Image.open(io.BytesIO(sink.blobs[outcome.outputs[0].name])) as image:
        assert image.size == (8, 4)  # the sampler worked on the uploaded picture's latent
    await assert_handed_over_as_comfyui_wrote_them(client, sim.folders, sink, outcome)
    assert sink.progress_events[0] == JobProgress(state="uploading")


async def test_a_workflow_with_several_output_nodes_hands_over_every_output(
    sim: Sim, client: ComfyClient, tmp_path: Path
) -> None:
    frames = {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 8, "batch_size": 3, "color": 0x123456},
    }
    graph = {
        "1": frames,
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "multi"},
        },
        "3": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "multi_anim",
                "fps": 6.0,
                "lossless": True,
                "quality": 80,
                "method": "fastest",
            },
        },
        "4": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["1", 0],
                "frame_rate": 8,
                "loop_count": 0,
                "filename_prefix": "multi_gif",
                "format": "image/gif",
                "pingpong": False,
                "save_output": True,
            },
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "6": {"class_type": "PrimitiveString", "inputs": {"value": "hello from the job"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
    }
    sink = RecordingSink()
    outcome = await run_job(client, spec(graph), sink, workdir=tmp_path)

    assert outcome.status == "succeeded", outcome.reason
    kinds = sorted((o.node_id, o.kind, o.content_type, o.temporary) for o in outcome.outputs)
    assert kinds == [
        *[("2", "images", "image/png", False)] * 3,
        ("3", "images", "image/webp", False),
        ("4", "gifs", "image/gif", False),
        *[("5", "images", "image/png", True)] * 3,
        ("7", "text", "text/plain; charset=utf-8", False),
    ]
    assert len({o.name for o in outcome.outputs}) == 9
    await assert_handed_over_as_comfyui_wrote_them(client, sim.folders, sink, outcome)
    [text] = [o for o in outcome.outputs if o.kind == "text"]
    assert sink.blobs[text.name] == b"hello from the job"
    assert text.sha256 == sha256(b"hello from the job") and text.size == 18
    webp = next(o for o in outcome.outputs if o.node_id == "3")
    with Image.open(io.BytesIO(sink.blobs[webp.name])) as image:
        assert image.format == "WEBP"
    sink.assert_finished_once_after_every_output(outcome)


async def test_a_websocket_dropped_mid_job_reconnects_and_the_job_completes_at_100_percent(
    tmp_path: Path,
) -> None:
    config = ComfySimConfig(base_directory=workspace(tmp_path / "comfy"), step_seconds=0.1)
    with RunningComfySim(config) as comfy:
        async with ComfyClient(comfy.url, timeout_s=10) as client:
            sink = RecordingSink()
            job = asyncio.create_task(
                run_job(client, spec(txt2img("dropped", seed=13, steps=20)), sink, workdir=tmp_path)
            )

            def sampling_at(step: float) -> bool:
                return any((e.value or 0) >= step for e in sink.progress_events) or job.done()

            await until(lambda: sampling_at(4))
            dropped_after = len(sink.log)
            assert await asyncio.to_thread(comfy.drop_websockets) == 1
            outcome = await asyncio.wait_for(job, 10)

            assert outcome.status == "succeeded", outcome.reason
            assert client.websocket_connected  # it reconnected
            late = [e for kind, e in sink.log[dropped_after:] if kind == "progress"]
            late_steps = [e.value for e in late if e.value]
            assert late_steps and max(late_steps) == 20.0  # live progress after the drop
            assert sink.progress_events[-1].percent == 100.0
            await assert_handed_over_as_comfyui_wrote_them(client, comfy.folders, sink, outcome)
            sink.assert_finished_once_after_every_output(outcome)


async def test_without_a_websocket_the_job_completes_by_polling_history_and_queue(
    sim: Sim, tmp_path: Path
) -> None:
    sink = RecordingSink()
    async with ComfyClient(sim.url, use_websocket=False, poll_interval_s=0.05) as client:
        job = spec(txt2img("polled", seed=14, steps=5))
        outcome = await run_job(client, job, sink, workdir=tmp_path, queue_poll_s=0.05)
        assert outcome.status == "succeeded", outcome.reason
        assert not client.websocket_connected
        await assert_handed_over_as_comfyui_wrote_them(client, sim.folders, sink, outcome)
    assert sink.progress_events[-1].percent == 100.0


# --------------------------------------------------------------------------- jobs that stop


async def interrupted_at(client: ComfyClient, prompt_id: str) -> dict[str, Any]:
    item = (await client.history(prompt_id))[prompt_id]
    kind, data = item["status"]["messages"][-1]
    assert kind == "execution_interrupted"
    assert item["status"]["status_str"] == "error"
    return dict(data)


async def test_cancel_interrupts_the_running_prompt_and_the_job_ends_cancelled(
    client: ComfyClient, tmp_path: Path
) -> None:
    sink = RecordingSink()
    cancel = asyncio.Event()
    job = asyncio.create_task(
        run_job(client, spec(sleeping(20, "cancelled")), sink, cancel=cancel, workdir=tmp_path)
    )
    await until(lambda: any(e.node_type == "SimSleep" and e.value for e in sink.progress_events))
    began = time.monotonic()
    cancel.set()
    outcome = await asyncio.wait_for(job, 10)

    assert time.monotonic() - began < 5
    assert (outcome.status, outcome.error, outcome.outputs) == ("cancelled", "cancelled", ())
    assert outcome.prompt_id is not None
    assert outcome.reason == (
        f"cancelled while running; ComfyUI interrupted prompt {outcome.prompt_id} "
        "at node 2 (SimSleep)"
    )
    assert (await interrupted_at(client, outcome.prompt_id))["node_id"] == "2"
    sink.assert_finished_once_after_every_output(outcome)
    assert leftovers(tmp_path) == []


async def test_cancelling_a_job_still_in_comfyuis_queue_removes_it_before_it_runs(
    client: ComfyClient, tmp_path: Path
) -> None:
    blocker = await client.queue_prompt(sleeping(20, "blocker"))
    try:
        sink = RecordingSink()
        cancel = asyncio.Event()
        job = asyncio.create_task(
            run_job(
                client,
                spec(sleeping(1, "never_ran")),
                sink,
                cancel=cancel,
                workdir=tmp_path,
                queue_poll_s=0.05,
            )
        )
        await until(lambda: any(e.queue_position == 1 for e in sink.progress_events))
        assert sink.progress_events[0].state == "queued"
        cancel.set()
        outcome = await asyncio.wait_for(job, 10)

        assert outcome.status == "cancelled" and outcome.prompt_id is not None
        assert outcome.reason == (
            "cancelled while waiting in ComfyUI's queue; "
            f"prompt {outcome.prompt_id} was removed from ComfyUI's queue before it ran"
        )
        assert await client.history(outcome.prompt_id) == {}
        assert queue_position(await client.queue(), outcome.prompt_id) is None
        assert queue_position(await client.queue(), blocker.prompt_id) == 0  # untouched
    finally:
        await client.interrupt(blocker.prompt_id)


async def test_a_job_past_its_timeout_is_interrupted_and_ends_timed_out(
    client: ComfyClient, tmp_path: Path
) -> None:
    sink = RecordingSink()
    began = time.monotonic()
    outcome = await run_job(
        client, spec(sleeping(20, "too_slow"), timeout_s=0.5), sink, workdir=tmp_path
    )
    assert time.monotonic() - began < 5
    assert (outcome.status, outcome.error) == ("timed_out", "timed_out")
    assert outcome.reason is not None and outcome.prompt_id is not None
    assert outcome.reason.startswith("the job ran past its timeout of 0.5 s while running; ")
    assert outcome.reason.endswith(
        "interrupted prompt " + outcome.prompt_id + " at node 2 (SimSleep)"
    )
    await interrupted_at(client, outcome.prompt_id)
    sink.assert_finished_once_after_every_output(outcome)


async def test_a_job_cancelled_before_it_starts_never_reaches_comfyui(
    client: ComfyClient, tmp_path: Path
) -> None:
    cancel = asyncio.Event()
    cancel.set()
    sink = RecordingSink()
    outcome = await run_job(client, spec(sleeping(1, "x")), sink, cancel=cancel, workdir=tmp_path)
    assert (outcome.status, outcome.prompt_id) == ("cancelled", None)
    assert [kind for kind, _ in sink.log] == ["finished"]


# --------------------------------------------------------------------------- jobs that fail


async def test_a_refused_workflow_fails_with_comfyuis_reason_naming_node_and_input(
    client: ComfyClient, tmp_path: Path
) -> None:
    bad_combo = sleeping(1, "refused")
    bad_combo["2"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["1", 0],
            "upscale_method": "bogus",
            "width": 16,
            "height": 16,
            "crop": "disabled",
        },
    }
    sink = RecordingSink()
    outcome = await run_job(client, spec(bad_combo), sink, workdir=tmp_path)
    assert (outcome.status, outcome.error, outcome.prompt_id) == ("failed", "validation", None)
    assert outcome.reason is not None
    assert outcome.reason.splitlines() == [
        "ComfyUI refused the workflow: Prompt outputs failed validation",
        "  node 2 (ImageScale): Value not in list: upscale_method: 'bogus' not in "
        "['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']",
    ]
    sink.assert_finished_once_after_every_output(outcome)

    too_wide = sleeping(1, "refused")
    too_wide["1"]["inputs"]["width"] = 100000
    outcome = await run_job(client, spec(too_wide), RecordingSink(), workdir=tmp_path)
    assert outcome.status == "failed" and outcome.reason is not None
    assert "node 1 (EmptyImage): Value 100000 bigger than max of 16384: width" in outcome.reason


async def test_a_workflow_comfyui_runs_only_in_part_fails_and_is_stopped(
    client: ComfyClient, tmp_path: Path
) -> None:
    graph = sleeping(20, "partial")
    graph["4"] = {"class_type": "ImageInvert", "inputs": {}}
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
    outcome = await run_job(client, spec(graph), RecordingSink(), workdir=tmp_path)
    assert (outcome.status, outcome.error) == ("failed", "validation")
    assert outcome.reason is not None and outcome.prompt_id is not None
    assert "node 4 (ImageInvert): Required input is missing: image" in outcome.reason
    assert f"interrupted prompt {outcome.prompt_id}" in outcome.reason
    await interrupted_at(client, outcome.prompt_id)


async def test_a_failing_node_fails_the_job_with_its_node_class_and_exception(
    client: ComfyClient, tmp_path: Path
) -> None:
    graph = sleeping(0.1, "never")
    graph["2"] = {
        "class_type": "SimFail",
        "inputs": {"images": ["1", 0], "message": "out of cheese"},
    }
    sink = RecordingSink()
    outcome = await run_job(client, spec(graph), sink, workdir=tmp_path)
    assert (outcome.status, outcome.error) == ("failed", "execution")
    assert (outcome.node_id, outcome.node_type, outcome.retryable) == ("2", "SimFail", False)
    assert outcome.reason == (
        f"ComfyUI failed running node 2 (SimFail) of prompt {outcome.prompt_id}: "
        "RuntimeError: out of cheese"
    )
    sink.assert_finished_once_after_every_output(outcome)


async def test_a_ui_format_workflow_or_a_bad_input_name_fails_before_comfyui_is_asked(
    client: ComfyClient, tmp_path: Path
) -> None:
    ui = {"nodes": [{"id": 1, "type": "LoadImage"}], "links": []}
    outcome = await run_job(client, spec(ui), RecordingSink(), workdir=tmp_path)
    assert (outcome.status, outcome.error) == ("failed", "workflow")
    assert "Export (API)" in (outcome.reason or "")

    job = spec(sleeping(1, "x"), inputs={"../evil.png": b"x"})
    outcome = await run_job(client, job, RecordingSink(), workdir=tmp_path)
    assert (outcome.status, outcome.error) == ("failed", "workflow")
    assert "must be a plain file name" in (outcome.reason or "")
