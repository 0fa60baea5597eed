"""ComfyUI supervision and the ComfyUI client, against the ComfyUI simulator run as a real process.

The simulator (``python -m comfyfleet.sim.comfy``) stands in for ComfyUI: it
answers the same routes over loopback, and its options make it start slowly,
crash, fail at start, report a full GPU or lack node types. Supervision runs on
a ``ScaledClock`` with its production defaults, so a 15-minute readiness deadline
or a 10 s stop grace takes a twentieth of that in real time (crash loops a fifth).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.agent.comfy import (
    DEFAULT_PORT,
    LOOPBACK,
    ComfyClient,
    ComfyOptions,
    ComfySupervisor,
    CrashLoopDetector,
    PromptResult,
    assess_readiness,
    comfy_command,
    describe_validation_error,
    load_workflow,
    nodes_used_by,
    pid_alive,
    restart_delay,
    terminate_process,
    vram_used_fraction,
    workflow_graph,
    workflow_node_types,
)
from comfyfleet.agent.report import RecordingReporter
from comfyfleet.clock import ManualClock, ScaledClock
from comfyfleet.errors import (
    ComfyExecutionError,
    ComfyFailed,
    ComfyInterrupted,
    ComfyMissingNodes,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
    ConfigError,
)

SIM = (sys.executable, "-m", "comfyfleet.sim.comfy")
SPEED = 20.0
# Crash loops race real process start-ups against the 5-minute window: 60 s real at 5x.
CRASH_SPEED = 5.0

EMPTY_TO_SAVE = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": 16711680},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "warm"}},
}
INVERT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}
FAILING = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {
        "class_type": "SimFail",
        "inputs": {"images": ["1", 0], "message": "deliberate warm-up failure"},
    },
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "never"}},
}


def sleeping(seconds: float, prefix: str = "slow") -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SimSleep",
            "inputs": {"images": ["1", 0], "seconds": seconds, "steps": max(1, int(seconds * 10))},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def sim_processes(marker: str) -> list[int]:
    """Pids of simulator processes whose command line contains ``marker`` (a unique folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ours = "comfyfleet.sim.comfy" in cmdline and any(marker in part for part in cmdline)
        if ours and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def exited_pid() -> int:
    """The pid of a process that has come and gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def read_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_sim(base: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    """Start the simulator as an image would (not the supervisor); wait until it answers."""
    base.mkdir(parents=True, exist_ok=True)
    with (base / "sim.log").open("ab") as log:
        proc = subprocess.Popen(
            [*SIM, "--listen", LOOPBACK, "--port", str(port), "--base-directory", str(base), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the simulator did not start: {(base / 'sim.log').read_text()}")
        time.sleep(0.05)
    return proc


def stop_sim(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def options(tmp_path: Path, *sim_args: str, **kw: Any) -> ComfyOptions:
    """Supervise the simulator with the production defaults, except where ``kw`` says."""
    base = tmp_path / "comfy"
    base.mkdir(exist_ok=True)
    kw.setdefault("port", free_port())
    kw.setdefault("comfy_dir", tmp_path)
    return ComfyOptions(
        command=SIM,
        extra_args=("--base-directory", str(base), *sim_args),
        **kw,
    )


_SUPERVISORS: list[ComfySupervisor] = []


def supervisor(
    tmp_path: Path,
    opts: ComfyOptions,
    reporter: RecordingReporter | None = None,
    speed: float = SPEED,
) -> ComfySupervisor:
    sup = ComfySupervisor(
        tmp_path / "workspace",
        opts,
        reporter=reporter if reporter is not None else RecordingReporter(),
        clock=ScaledClock(speed),
    )
    _SUPERVISORS.append(sup)
    return sup


@pytest.fixture(autouse=True)
async def no_process_left_behind(tmp_path: Path) -> AsyncIterator[None]:
    """A failing test still stops its supervisors and every simulator under its tmp_path."""
    yield
    while _SUPERVISORS:
        await _SUPERVISORS.pop().stop()
    for pid in sim_processes(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def stages(reporter: RecordingReporter) -> list[tuple[str, str | None]]:
    return [(e.stage, e.reason) for e in reporter.events if e.kind == "stage" and e.stage]


async def until(condition: Any, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- pure decisions


def test_workflow_node_types_are_the_class_types_of_an_api_format_workflow() -> None:
    assert workflow_node_types(INVERT) == {"LoadImage", "ImageInvert", "SaveImage"}
    # The body of a POST /prompt works as well.
    assert workflow_node_types({"prompt": EMPTY_TO_SAVE, "client_id": "x"}) == {
        "EmptyImage",
        "SaveImage",
    }


def test_a_ui_format_workflow_is_refused_with_the_way_to_export_it() -> None:
    ui = {"nodes": [{"id": 1, "type": "LoadImage"}], "links": []}
    with pytest.raises(ConfigError, match=r"Export \(API\)"):
        workflow_node_types(ui, name="ui.json")
    with pytest.raises(ConfigError, match="node '7' has no class_type"):
        workflow_graph({"7": {"inputs": {}}})


def test_nodes_used_by_reads_workflow_files_and_mappings(tmp_path: Path) -> None:
    path = tmp_path / "invert.json"
    path.write_text(json.dumps(INVERT))
    assert load_workflow(path) == INVERT
    assert nodes_used_by([path, sleeping(1)]) == {
        "LoadImage",
        "ImageInvert",
        "SaveImage",
        "EmptyImage",
        "SimSleep",
    }
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1, "type": "Note"}], "links": []}))
    with pytest.raises(ConfigError, match=r"ui\.json: this is a UI-format workflow"):
        nodes_used_by([path, ui])
    assert nodes_used_by([path, ui], skip_ui_format=True) == workflow_node_types(INVERT)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        nodes_used_by([tmp_path / "bad.json"])


def stats_with(vram_total: int, vram_free: int) -> dict[str, Any]:
    return {
        "system": {},
        "devices": [
            {"name": "cuda:0", "type": "cuda", "vram_total": vram_total, "vram_free": vram_free}
        ],
    }


def test_readiness_needs_every_node_and_gpu_memory_in_use_below_90_percent() -> None:
    nodes = ["LoadImage", "SaveImage", "ImageInvert"]
    ok = assess_readiness(stats_with(100, 50), nodes, ["LoadImage", "SaveImage"])
    assert ok.ready and ok.problem() is None and ok.vram_used == pytest.approx(0.5)

    missing = assess_readiness(stats_with(100, 50), nodes, ["SaveImage", "KSampler", "Foo"])
    assert not missing.ready
    assert missing.missing_nodes == ("Foo", "KSampler")
    assert "Foo, KSampler" in (missing.problem() or "")

    assert assess_readiness(stats_with(100, 11), nodes, []).ready  # 89% in use
    full = assess_readiness(stats_with(100, 10), nodes, [])  # 90%: not below the limit
    assert not full.ready and "90%" in (full.problem() or "")
    assert assess_readiness(stats_with(100, 10), nodes, [], max_vram_used=None).ready
    assert assess_readiness(stats_with(100, 4), nodes, [], max_vram_used=0.97).ready


def test_vram_in_use_is_the_fullest_device_and_unknown_without_devices() -> None:
    stats = stats_with(100, 80)
    stats["devices"].append({"name": "cuda:1", "vram_total": 200, "vram_free": 20})
    assert vram_used_fraction(stats) == pytest.approx(0.9)
    assert vram_used_fraction({"devices": []}) is None
    assert vram_used_fraction({}) is None


def test_a_crash_loop_is_three_crashes_within_five_minutes_by_default() -> None:
    clock = ManualClock()
    loop = CrashLoopDetector()
    assert (loop.max_crashes, loop.window_s) == (3, 300.0)
    assert not loop.record(clock.now())
    clock.advance(200)
    assert not loop.record(clock.now())
    clock.advance(101)  # the first crash is now 301 s old
    assert not loop.record(clock.now())
    assert loop.recent(clock.now()) == 2
    clock.advance(50)
    assert loop.record(clock.now())

    fast = CrashLoopDetector(max_crashes=2, window_s=10)
    assert not fast.record(0.0)
    assert fast.record(9.9)


def test_restart_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [restart_delay(n, base_s=2.0, cap_s=60.0) for n in range(8)]
    assert delays == [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_comfyui_always_listens_on_loopback_and_manifest_args_cannot_change_it() -> None:
    command = comfy_command(("python", "main.py"), port=DEFAULT_PORT, extra_args=("--fast",))
    assert command == ["python", "main.py", "--listen", "127.0.0.1", "--port", "8188", "--fast"]
    for bad in (("--listen", "0.0.0.0"), ("--listen=0.0.0.0",), ("--port", "9000")):
        with pytest.raises(ConfigError, match=r"always listens on 127\.0\.0\.1"):
            ComfyOptions(extra_args=bad)
    default = ComfyOptions()
    assert default.command == ("python", "main.py")
    assert (default.ready_timeout_s, default.max_vram_used) == (900.0, 0.9)
    assert (default.crash_loop_crashes, default.crash_loop_window_s) == (3, 300.0)


def test_options_refuse_a_bad_attach_url_and_a_ui_format_warmup() -> None:
    with pytest.raises(ConfigError, match="attach URL"):
        ComfyOptions(attach_url="127.0.0.1:18188")
    with pytest.raises(ConfigError, match="Export"):
        ComfyOptions(warmup_workflow={"nodes": [], "links": []})
    opts = ComfyOptions(warmup_workflow=EMPTY_TO_SAVE, required_nodes=frozenset({"KSampler"}))
    assert opts.all_required_nodes == {"KSampler", "EmptyImage", "SaveImage"}


def test_a_refused_workflow_reads_as_one_line_per_node_error() -> None:
    # ComfyUI 0.3.64's answer for a bad combo value (reference, case v4).
    body = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "2": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "upscale_method: 'bogus' not in ['nearest-exact', 'bilinear']",
                        "extra_info": {},
                    }
                ],
                "dependent_outputs": ["3"],
                "class_type": "ImageScale",
            }
        },
    }
    assert describe_validation_error(body) == (
        "ComfyUI refused the workflow: Prompt outputs failed validation\n"
        "  node 2 (ImageScale): Value not in list: "
        "upscale_method: 'bogus' not in ['nearest-exact', 'bilinear']"
    )
    unknown = {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNode does not exist.",
            "details": "Node ID '#1'",
            "extra_info": {},
        },
        "node_errors": {},
    }
    text = describe_validation_error(unknown)
    assert "NoSuchNode does not exist. (Node ID '#1')" in text
    assert "install the custom node" in text


async def test_stop_sends_sigkill_after_the_grace_period_when_sigterm_is_ignored() -> None:
    ignores_sigterm = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    stubborn = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ignores_sigterm,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert stubborn.stdout is not None
    assert await asyncio.wait_for(stubborn.stdout.readline(), 30) == b"up\n"
    began = time.monotonic()
    assert await terminate_process(stubborn.pid, grace_s=0.3) == "killed"
    assert time.monotonic() - began >= 0.3
    assert await asyncio.wait_for(stubborn.wait(), 5) == -signal.SIGKILL

    polite = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", start_new_session=True
    )
    await asyncio.sleep(0.2)
    assert await terminate_process(polite.pid, grace_s=5, child=polite) == "terminated"
    assert polite.returncode == -signal.SIGTERM
    assert await terminate_process(polite.pid) == "gone"
    assert not pid_alive(polite.pid)


# --------------------------------------------------------------------------- the client


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One simulator for the client tests: (its URL, its base directory)."""
    base = tmp_path_factory.mktemp("client-sim")
    port = free_port()
    proc = start_sim(base, port)
    try:
        yield f"http://{LOOPBACK}:{port}", base
    finally:
        stop_sim(proc)


async def test_client_reads_system_stats_and_object_info(sim: tuple[str, Path]) -> None:
    url, _ = sim
    async with ComfyClient(url) as client:
        stats = await client.system_stats()
        assert stats["devices"] and vram_used_fraction(stats) == pytest.approx(0.1, abs=0.01)
        nodes = await client.object_info()
        assert {"LoadImage", "ImageInvert", "ImageScale", "EmptyImage", "SaveImage"} <= set(nodes)
        assert {"PreviewImage", "CLIPTextEncode", "KSampler", "SimSleep", "SimFail"} <= set(nodes)
        assert set(await client.object_info("ImageInvert")) == {"ImageInvert"}
        assert await client.object_info("NoSuchNode") == {}


async def test_client_runs_a_workflow_over_the_websocket_and_downloads_its_output(
    sim: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = sim
    seen: list[dict[str, Any]] = []
    async with ComfyClient(url) as client:
        result = await client.run(
            {
                **EMPTY_TO_SAVE,
                "2": {
                    **EMPTY_TO_SAVE["2"],
                    "inputs": {"images": ["1", 0], "filename_prefix": "client_ws"},
                },
            },
            timeout_s=30,
            on_message=seen.append,
        )
        assert client.websocket_connected
        assert isinstance(result, PromptResult)
        [file] = result.files()
        assert (file.node_id, file.kind, file.type) == ("2", "images", "output")
        assert file.filename.startswith("client_ws")
        png = await client.view(file.filename, subfolder=file.subfolder, type=file.type)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        size = await client.view_to(file, tmp_path / "out.png")
        assert (tmp_path / "out.png").read_bytes() == png and size == len(png)
        history = await client.history(result.prompt_id)
        assert history[result.prompt_id]["status"]["status_str"] == "success"
    kinds = [m["type"] for m in seen]
    assert "execution_start" in kinds and "executed" in kinds
    assert seen[-1]["type"] == "executing"
    assert seen[-1]["data"]["node"] is None and seen[-1]["data"]["prompt_id"] == result.prompt_id


async def test_client_polls_history_when_there_is_no_websocket(sim: tuple[str, Path]) -> None:
    url, _ = sim
    async with ComfyClient(url, use_websocket=False, poll_interval_s=0.05) as client:
        queued = await client.queue_prompt(sleeping(0.3, "polled"))
        assert queued.node_errors == {}
        result = await client.wait(queued.prompt_id, timeout_s=30)
        assert not client.websocket_connected
        assert result.files()[0].filename.startswith("polled")


async def test_client_uploads_an_image_that_a_workflow_then_loads(
    sim: tuple[str, Path], tmp_path: Path
) -> None:
    from PIL import Image

    url, _ = sim
    source = tmp_path / "in.png"
    Image.new("RGB", (4, 2), (0, 0, 100)).save(source)
    async with ComfyClient(url) as client:
        uploaded = await client.upload_image(source, subfolder="jobs", overwrite=True)
        assert (uploaded.name, uploaded.subfolder, uploaded.type) == ("in.png", "jobs", "input")
        workflow = json.loads(json.dumps(INVERT))
        workflow["1"]["inputs"]["image"] = uploaded.load_name
        result = await client.run(workflow, timeout_s=30)
        [file] = result.files()
        out = tmp_path / "inverted.png"
        await client.view_to(file, out)
    with Image.open(out) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (255, 255, 155)


async def test_a_refused_workflow_raises_with_comfyuis_node_errors_for_a_human(
    sim: tuple[str, Path],
) -> None:
    url, _ = sim
    bad = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bogus",
                "width": 16,
                "height": 16,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    async with ComfyClient(url) as client:
        with pytest.raises(ComfyValidationError) as refused:
            await client.queue_prompt(bad)
        assert refused.value.status == 400
        assert refused.value.error_type == "prompt_outputs_failed_validation"
        assert "2" in refused.value.node_errors
        assert "node 2 (ImageScale)" in str(refused.value)
        assert "upscale_method" in str(refused.value) and "bogus" in str(refused.value)

        unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}, **{"2": EMPTY_TO_SAVE["2"]}}
        with pytest.raises(ComfyValidationError, match="NoSuchNode") as refused:
            await client.queue_prompt(unknown)
        assert refused.value.error_type == "invalid_prompt"


async def test_a_failing_node_raises_an_execution_error_naming_node_and_message(
    sim: tuple[str, Path],
) -> None:
    url, _ = sim
    async with ComfyClient(url) as client:
        with pytest.raises(ComfyExecutionError) as failed:
            await client.run(FAILING, timeout_s=30)
    error = failed.value
    assert not isinstance(error, ComfyInterrupted)
    assert (error.node_id, error.node_type) == ("2", "SimFail")
    assert error.exception_message == "deliberate warm-up failure"
    assert "node 2 (SimFail)" in str(error) and "deliberate warm-up failure" in str(error)


async def test_interrupt_stops_the_running_prompt(sim: tuple[str, Path]) -> None:
    url, _ = sim
    async with ComfyClient(url) as client:
        queued = await client.queue_prompt(sleeping(20, "interrupted"))
        waiting = asyncio.create_task(client.wait(queued.prompt_id, timeout_s=30))
        await asyncio.sleep(0.3)
        await client.interrupt(queued.prompt_id)
        began = time.monotonic()
        with pytest.raises(ComfyInterrupted) as interrupted:
            await waiting
        assert time.monotonic() - began < 10
        assert interrupted.value.prompt_id == queued.prompt_id
        await client.free(unload_models=True, free_memory=True)


async def test_waiting_gives_up_at_the_deadline_on_the_clock(sim: tuple[str, Path]) -> None:
    url, _ = sim
    async with ComfyClient(url, clock=ScaledClock(100.0)) as client:
        queued = await client.queue_prompt(sleeping(20, "too_slow"))
        began = time.monotonic()
        with pytest.raises(ComfyTimeout, match="did not finish within 100 s"):
            await client.wait(queued.prompt_id, timeout_s=100)
        assert time.monotonic() - began < 5  # 100 s of a 100x clock
        await client.interrupt()


async def test_a_client_of_a_comfyui_that_is_not_there_says_so() -> None:
    async with ComfyClient(f"http://{LOOPBACK}:{free_port()}", timeout_s=2) as client:
        with pytest.raises(ComfyUnavailable, match="did not answer GET /system_stats"):
            await client.system_stats()


# --------------------------------------------------------------------------- supervision


async def test_supervisor_starts_comfyui_on_loopback_waits_until_ready_and_stops_it(
    tmp_path: Path,
) -> None:
    reporter = RecordingReporter()
    opts = options(tmp_path, "--startup-delay", "0.5", required_nodes=nodes_used_by([INVERT]))
    sup = supervisor(tmp_path, opts, reporter)
    await sup.start()
    try:
        assert sup.state == "ready" and sup.url == f"http://127.0.0.1:{opts.port}"
        pid = sup.pid
        assert pid is not None and pid_alive(pid)
        cmdline = read_cmdline(pid)
        assert cmdline[cmdline.index("--listen") + 1] == "127.0.0.1"
        record = json.loads(sup.pid_path.read_text())
        assert record["pid"] == pid and record["url"] == sup.url
        async with sup.client() as client:
            assert (await client.system_stats())["devices"]
        assert stages(reporter) == [("starting_app", None), ("ready", None)]
        assert any("ComfyUI is ready" in line for line in reporter.lines)
    finally:
        await sup.stop()
    assert sup.state == "stopped"
    assert not pid_alive(pid)
    assert not sup.pid_path.exists()
    log = sup.log_path.read_text()
    assert "comfyfleet starts ComfyUI" in log
    assert f"To see the GUI go to: http://127.0.0.1:{opts.port}" in log


async def test_a_missing_node_fails_with_a_message_naming_the_node(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    opts = options(
        tmp_path,
        "--missing-nodes",
        "ImageInvert",
        required_nodes=nodes_used_by([INVERT]),
        nodes_grace_s=20,
    )
    sup = supervisor(tmp_path, opts, reporter)
    with pytest.raises(ComfyMissingNodes) as failed:
        await sup.start()
    assert failed.value.reason == "comfy_missing_nodes"
    assert failed.value.nodes == ["ImageInvert"]
    assert "lacks the node types ImageInvert" in str(failed.value)
    assert stages(reporter)[-1] == ("failed", "comfy_missing_nodes")
    assert sup.state == "failed" and sup.pid is None
    assert sim_processes(str(tmp_path)) == []
    await sup.stop()


async def test_a_gpu_with_too_much_memory_in_use_is_never_ready(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    opts = options(tmp_path, "--vram-used-fraction", "0.95", ready_timeout_s=120)
    sup = supervisor(tmp_path, opts, reporter)
    with pytest.raises(ComfyFailed) as failed:
        await sup.start()
    assert failed.value.reason == "gpu_memory_busy"
    assert "95%" in str(failed.value) and "90%" in str(failed.value)
    assert "ready" not in [stage for stage, _ in stages(reporter)]
    assert stages(reporter)[-1] == ("failed", "gpu_memory_busy")
    assert sim_processes(str(tmp_path)) == []


async def test_a_crashed_comfyui_is_restarted(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    sup = supervisor(tmp_path, options(tmp_path), reporter)
    await sup.start()
    try:
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: sup.state == "ready" and sup.pid not in (None, first))
        assert sup.crashes == 1 and sup.starts == 2
        assert stages(reporter) == [
            ("starting_app", None),
            ("ready", None),
            ("starting_app", None),
            ("ready", None),
        ]
        assert any("killed by signal 9" in line and "restarting" in line for line in reporter.lines)
        assert sim_processes(str(tmp_path)) == [sup.pid]
    finally:
        await sup.stop()


async def test_three_crashes_within_five_minutes_are_a_crash_loop(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    sup = supervisor(
        tmp_path, options(tmp_path, "--crash-after", "0.5"), reporter, speed=CRASH_SPEED
    )
    await sup.start()  # it does become ready before each crash
    with pytest.raises(ComfyFailed) as failed:
        await sup.wait()
    assert failed.value.reason == "comfy_crash_loop"
    assert "3 crashes within 300 s" in str(failed.value)
    assert sup.starts == 3 and sup.crashes == 3
    assert [s for s, _ in stages(reporter)].count("ready") == 3
    assert stages(reporter)[-1] == ("failed", "comfy_crash_loop")
    assert not sup.pid_path.exists()
    [line] = (sup.workspace / "provision_errors.log").read_text().splitlines()
    assert " COMFYUI FAILED comfy_crash_loop: ComfyUI exited with code 1" in line


async def test_a_comfyui_that_dies_at_start_ends_in_a_crash_loop_with_its_log(
    tmp_path: Path,
) -> None:
    reporter = RecordingReporter()
    sup = supervisor(tmp_path, options(tmp_path, "--fail-start"), reporter, speed=CRASH_SPEED)
    with pytest.raises(ComfyFailed) as failed:
        await sup.start()
    assert failed.value.reason == "comfy_crash_loop"
    assert "exited with code 1" in str(failed.value)
    assert sup.starts == 3
    assert "ready" not in [stage for stage, _ in stages(reporter)]
    assert any(line.startswith("comfyui.log: ") for line in reporter.lines)
    assert sup.log_path.read_text().count("comfyfleet starts ComfyUI") == 3


async def test_the_warm_up_workflow_runs_once_before_ready(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    sup = supervisor(tmp_path, options(tmp_path, warmup_workflow=EMPTY_TO_SAVE), reporter)
    await sup.start()
    try:
        assert stages(reporter) == [("starting_app", None), ("warming", None), ("ready", None)]
        assert any(line.startswith("warm-up done") for line in reporter.lines)
        outputs = list((tmp_path / "comfy" / "output").rglob("warm*.png"))
        assert len(outputs) == 1
    finally:
        await sup.stop()


async def test_a_failing_warm_up_fails_the_instance_with_warmup_failed(tmp_path: Path) -> None:
    reporter = RecordingReporter()
    sup = supervisor(tmp_path, options(tmp_path, warmup_workflow=FAILING), reporter)
    with pytest.raises(ComfyFailed) as failed:
        await sup.start()
    assert failed.value.reason == "warmup_failed"
    assert "deliberate warm-up failure" in str(failed.value)
    assert stages(reporter) == [
        ("starting_app", None),
        ("warming", None),
        ("failed", "warmup_failed"),
    ]
    assert sim_processes(str(tmp_path)) == []


AGENT = """
import asyncio, json, sys
from pathlib import Path
from comfyfleet.agent.comfy import ComfyOptions, ComfySupervisor

async def main():
    spec = json.loads(sys.argv[2])
    options = ComfyOptions(
        command=tuple(spec["command"]), comfy_dir=Path(spec["comfy_dir"]),
        port=spec["port"], extra_args=tuple(spec["extra_args"]),
    )
    supervisor = ComfySupervisor(Path(sys.argv[1]), options)
    await supervisor.start()
    print("READY", supervisor.pid, flush=True)
    await supervisor.wait()

asyncio.run(main())
"""


async def test_a_restarted_agent_adopts_the_running_comfyui_without_a_second_one(
    tmp_path: Path,
) -> None:
    opts = options(tmp_path)
    spec = {
        "command": list(opts.command),
        "comfy_dir": str(opts.comfy_dir),
        "port": opts.port,
        "extra_args": list(opts.extra_args),
    }
    workspace = tmp_path / "workspace"
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT,
        str(workspace),
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 60)
        word, pid_text = line.decode().split()
        assert word == "READY"
        comfy_pid = int(pid_text)
    finally:
        agent.kill()  # the agent dies hard; ComfyUI, in its own session, lives on
        await agent.wait()
    await asyncio.sleep(0.3)
    assert pid_alive(comfy_pid) and answers(opts.port)

    reporter = RecordingReporter()
    sup = supervisor(tmp_path, opts, reporter)
    await sup.start()
    try:
        assert sup.adopted and sup.pid == comfy_pid and sup.starts == 0
        assert sim_processes(str(tmp_path)) == [comfy_pid]
        assert any(
            f"adopted the running ComfyUI (pid {comfy_pid}, answering)" in line
            for line in reporter.lines
        )
        # An adopted ComfyUI is supervised like its own: a crash is restarted.
        os.kill(comfy_pid, signal.SIGKILL)
        await until(lambda: sup.state == "ready" and sup.pid not in (None, comfy_pid))
        assert sup.starts == 1 and sim_processes(str(tmp_path)) == [sup.pid]
    finally:
        await sup.stop()
    assert sim_processes(str(tmp_path)) == []


async def test_detach_leaves_comfyui_running_for_the_next_supervisor(tmp_path: Path) -> None:
    opts = options(tmp_path)
    first = supervisor(tmp_path, opts)
    await first.start()
    pid = first.pid
    await first.detach()
    assert pid is not None and pid_alive(pid) and first.pid_path.exists()

    second = supervisor(tmp_path, opts)
    await second.start()
    try:
        assert second.adopted and second.pid == pid
        assert sim_processes(str(tmp_path)) == [pid]
    finally:
        await second.stop()
    assert not pid_alive(pid)


async def test_a_stale_pid_file_is_replaced_by_a_fresh_start(tmp_path: Path) -> None:
    dead_pid = await asyncio.to_thread(exited_pid)
    opts = options(tmp_path)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "comfyui.pid").write_text(
        json.dumps(
            {
                "pid": dead_pid,
                "url": f"http://127.0.0.1:{opts.port}",
                "cmdline": [],
                "started_at": 0,
            }
        )
    )
    reporter = RecordingReporter()
    sup = supervisor(tmp_path, opts, reporter)
    await sup.start()
    try:
        assert not sup.adopted and sup.starts == 1 and sup.pid != dead_pid
        assert any("stale ComfyUI pid file" in line for line in reporter.lines)
        assert json.loads(sup.pid_path.read_text())["pid"] == sup.pid
    finally:
        await sup.stop()


async def test_a_port_taken_by_a_comfyui_this_agent_did_not_start_is_refused(
    tmp_path: Path,
) -> None:
    port = free_port()
    other = start_sim(tmp_path / "other", port)
    try:
        sup = supervisor(tmp_path, options(tmp_path, port=port))
        with pytest.raises(ComfyFailed) as failed:
            await sup.start()
        assert failed.value.reason == "comfy_port_busy"
        assert "attach" in str(failed.value)
        assert other.poll() is None  # never touched
    finally:
        stop_sim(other)


async def test_a_comfyui_folder_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    opts = options(tmp_path, comfy_dir=tmp_path / "no-such-dir")
    sup = supervisor(tmp_path, opts)
    with pytest.raises(ComfyFailed) as failed:
        await sup.start()
    assert failed.value.reason == "comfy_start_failed"
    assert "no-such-dir" in str(failed.value)
    assert sup.starts == 0


async def test_attach_mode_waits_for_the_images_comfyui_and_never_kills_it(tmp_path: Path) -> None:
    port = free_port()
    base = tmp_path / "image-comfy"
    reporter = RecordingReporter()
    opts = ComfyOptions(
        attach_url=f"http://127.0.0.1:{port}",
        required_nodes=frozenset({"SaveImage"}),
        attach_down_after=2,
    )
    sup = ComfySupervisor(tmp_path / "workspace", opts, reporter=reporter, clock=ScaledClock(SPEED))
    _SUPERVISORS.append(sup)
    starting = asyncio.create_task(sup.start())
    await asyncio.sleep(0.5)
    assert not starting.done()  # nothing answers yet, and nothing was started
    assert sim_processes(str(base)) == []
    image = start_sim(base, port)
    try:
        await asyncio.wait_for(starting, 30)
        assert sup.state == "ready" and sup.pid is None
        # The image's ComfyUI goes away and comes back (its own supervisor restarts it).
        stop_sim(image)
        await until(lambda: sup.state == "starting")
        image = start_sim(base, port)
        await until(lambda: sup.state == "ready")
        assert [s for s, _ in stages(reporter)] == [
            "starting_app",
            "ready",
            "starting_app",
            "ready",
        ]
        await sup.stop()
        assert image.poll() is None  # stopping the supervisor leaves it running
        assert answers(port)
    finally:
        stop_sim(image)
    assert not (tmp_path / "workspace" / "comfyui.pid").exists()
    assert not (tmp_path / "workspace" / "comfyui.log").exists()


async def test_attach_mode_gives_up_at_the_readiness_deadline(tmp_path: Path) -> None:
    port = free_port()
    opts = ComfyOptions(attach_url=f"http://127.0.0.1:{port}", ready_timeout_s=30)
    reporter = RecordingReporter()
    sup = ComfySupervisor(tmp_path, opts, reporter=reporter, clock=ScaledClock(100))
    _SUPERVISORS.append(sup)
    with pytest.raises(ComfyFailed) as failed:
        await sup.start()
    assert failed.value.reason == "comfy_not_ready"
    assert "not ready within 30 s" in str(failed.value)
    assert stages(reporter) == [("starting_app", None), ("failed", "comfy_not_ready")]
