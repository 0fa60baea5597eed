"""The agent's whole run: provision a workspace, then start ComfyUI and keep it ready.

``comfyfleet agent run`` runs as a real process, as on an instance: models come
from the file-server simulator (Hugging Face, Civitai and Dropbox routes, through
the production resolvers), and ComfyUI is the ComfyUI simulator started by the
agent (``COMFY_COMMAND`` / ``--comfy-command``) in the workspace's ComfyUI folder,
whose loaders list the files the agent downloaded. Every process a test starts is
killed at its end, even when it fails.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from comfyfleet.agent.comfy import ComfyClient, pid_alive
from comfyfleet.agent.provision import ProvisionOptions
from comfyfleet.agent.report import ERROR_LOG_NAME, Progress, RecordingReporter
from comfyfleet.agent.run import run_agent
from comfyfleet.agent.sources import SourceResolver, SourceSettings
from comfyfleet.commands.agent import ConsoleReporter
from comfyfleet.manifest import load_manifest
from comfyfleet.sim.files import FileServer, RunningFileServer
from tests.conftest import BIN, REPO

MiB = 1 << 20
CIVITAI_TOKEN = "civitai-test-token"
SIM_COMMAND = f"{sys.executable} -m comfyfleet.sim.comfy"
READY = re.compile(r"ComfyUI is ready at (http://127\.0\.0\.1:\d+)")
DROPBOX_TE = "/Workspace/ComfyUI/models/text_encoders/t5_small.safetensors"

TXT2IMG = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
    "2": {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": "detail.safetensors",
            "strength_model": 0.8,
            "strength_clip": 0.8,
        },
    },
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 1]}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["2", 0],
            "seed": 7,
            "steps": 2,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    },
    "7": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "warm"}},
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


# -- processes: whatever a test starts, it stops -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def comfy_sims_under(root: Path) -> list[int]:
    """Pids of ComfyUI simulators running in a folder under ``root`` (their ComfyUI folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        ours = b"comfyfleet.sim.comfy" in cmdline and cwd.startswith(str(root))
        if ours and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


class Agents:
    """``comfyfleet agent run`` processes, their output in files (no pipe can fill)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        out = (self.tmp_path / f"{name}.out").open("wb")
        err = (self.tmp_path / f"{name}.err").open("wb")
        with out, err:
            proc = subprocess.Popen(
                [str(BIN / "comfyfleet"), "agent", "run", *args],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> tuple[str, str]:
        out = (self.tmp_path / f"{name}.out").read_text(errors="replace")
        return out, (self.tmp_path / f"{name}.err").read_text(errors="replace")

    def run(self, *args: str, name: str, timeout: float = 90) -> tuple[int, str, str]:
        proc = self.start(*args, name=name)
        code = proc.wait(timeout)
        return (code, *self.output(name))

    def wait_ready(self, proc: subprocess.Popen[bytes], name: str, within_s: float = 90) -> str:
        """ComfyUI's URL, once the agent prints it."""
        deadline = time.monotonic() + within_s
        while True:
            out, err = self.output(name)
            if found := READY.search(out):
                return found.group(1)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no ready line (exit {proc.poll()}):\n{out}\n{err}")
            time.sleep(0.1)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def fs() -> Iterator[RunningFileServer]:
    with RunningFileServer(FileServer()) as running:
        running.server.civitai_tokens.add(CIVITAI_TOKEN)
        yield running


@pytest.fixture
def agents(tmp_path: Path, clean_env: dict[str, str], fs: RunningFileServer) -> Iterator[Agents]:
    env = {**clean_env, **fs.env(), "CIVITAI_TOKEN": CIVITAI_TOKEN}
    running = Agents(tmp_path, env)
    try:
        yield running
    finally:
        running.kill_all()
        for pid in comfy_sims_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def no_comfyui_left_behind(tmp_path: Path) -> Iterator[None]:
    yield
    for pid in comfy_sims_under(tmp_path):
        os.kill(pid, signal.SIGKILL)


# -- the workspace -------------------------------------------------------------------


def add_models(fs: RunningFileServer) -> dict[str, Any]:
    """Four small models on three hosts: Hugging Face, Civitai, a Dropbox shared link."""
    srv = fs.server
    files = {
        "ckpt": srv.add_hf_file("acme/base", "base.safetensors", 2 * MiB),
        "vae": srv.add_hf_file("acme/base", "vae/vae.safetensors", MiB),
        "lora": srv.add_civitai_file(135867, "detail.safetensors", MiB // 2),
        "te": srv.add_dropbox_file(DROPBOX_TE, MiB // 2),
    }
    files["te_link"] = srv.share_dropbox_path(DROPBOX_TE)
    return files


def write_manifest(
    folder: Path,
    models: list[dict[str, Any]],
    workflows: dict[str, dict[str, Any]],
    warmup: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, graph in workflows.items():
        (folder / name).write_text(json.dumps(graph))
    data: dict[str, Any] = {
        "comfyui": {"args": ["--disable-metadata"]},
        "models": models,
        "workflows": [{"file": name} for name in workflows],
    }
    if warmup is not None:
        data["warmup_workflow"] = warmup
    path = folder / "manifest.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def four_models(files: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"source": "hf://acme/base/base.safetensors", "dest": "checkpoints"},
        {"source": "hf://acme/base/vae/vae.safetensors", "dest": "vae"},
        {"source": "civitai://135867", "dest": "loras"},
        {"source": files["te_link"], "dest": "text_encoders"},
    ]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def stage_lines(err: str) -> list[str]:
    return re.findall(r"^stage (\w+)", err, flags=re.MULTILINE)


def pid_file(workspace: Path) -> int:
    return int(json.loads((workspace / "comfyui.pid").read_text())["pid"])


# -- the command ---------------------------------------------------------------------


def test_agent_run_provisions_starts_comfyui_with_the_models_and_stops_it_on_sigterm(
    agents: Agents, fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    manifest = write_manifest(
        tmp_path / "m", four_models(files), {"txt2img.json": TXT2IMG}, warmup="txt2img.json"
    )
    ws = tmp_path / "ws"
    agents.env["COMFY_COMMAND"] = SIM_COMMAND
    port = free_port()
    proc = agents.start(
        "--manifest", str(manifest), "--workspace", str(ws), "--port", str(port), name="run"
    )
    url = agents.wait_ready(proc, "run")
    assert url == f"http://127.0.0.1:{port}"
    _, err = agents.output("run")
    assert stage_lines(err) == [
        "booting",
        "provisioning",
        "downloading",
        "starting_app",
        "warming",
        "ready",
    ]
    assert "5 succeeded, 0 failed" in err  # four models and the workflow
    assert "warm-up done" in err

    assert get_json(f"{url}/system_stats")["system"]["comfyui_version"]
    info = get_json(f"{url}/object_info")
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "base.safetensors"
    ]
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == ["detail.safetensors"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["vae.safetensors"]
    assert info["CLIPLoader"]["input"]["required"]["clip_name"][0] == ["t5_small.safetensors"]
    # The warm-up ran the workflow: the loaders opened the downloaded files.
    assert list((ws / "ComfyUI" / "output").glob("warm*.png"))

    comfy_pid = pid_file(ws)
    cmdline = Path(f"/proc/{comfy_pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[-4:-1] == ["--port", str(port), "--disable-metadata"]  # the manifest's args
    assert comfy_sims_under(tmp_path) == [comfy_pid]
    assert proc.poll() is None  # supervising in the foreground

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    out, err = agents.output("run")
    assert f"Stopped ComfyUI (pid {comfy_pid})" in out
    assert not pid_alive(comfy_pid)
    assert not (ws / "comfyui.pid").exists()
    assert not (ws / ERROR_LOG_NAME).exists()


def test_a_missing_critical_model_fails_the_run_naming_it_and_comfyui_never_starts(
    agents: Agents, fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    models = [
        *four_models(files)[:2],
        {"source": "civitai://404404", "dest": "loras", "name": "gone.safetensors"},
    ]
    manifest = write_manifest(tmp_path / "m", models, {"txt2img.json": TXT2IMG})
    ws = tmp_path / "ws"
    code, out, err = agents.run(
        "--manifest",
        str(manifest),
        "--workspace",
        str(ws),
        "--comfy-command",
        SIM_COMMAND,
        "--port",
        str(free_port()),
        name="missing",
    )
    assert code == 1, out + err
    assert "Traceback" not in err
    assert stage_lines(err) == ["booting", "provisioning", "downloading", "failed"]
    assert "stage failed: provision_failed" in err
    assert "error: failed (provision_failed): provision failed: 1 critical item missing: " in err
    assert "ComfyUI/models/loras/gone.safetensors" in err.split("error: failed")[-1]
    assert "ComfyUI was not started" in err
    assert "ComfyUI is ready" not in out
    assert not (ws / "comfyui.log").exists() and not (ws / "comfyui.pid").exists()
    assert comfy_sims_under(tmp_path) == []
    log = (ws / ERROR_LOG_NAME).read_text()
    assert "VALIDATION FAILED ComfyUI/models/loras/gone.safetensors" in log
    assert " AGENT FAILED provision_failed: provision failed: 1 critical item missing" in log


def test_a_second_run_adopts_the_comfyui_the_first_left_running(
    agents: Agents, fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    manifest = write_manifest(tmp_path / "m", four_models(files)[:2], {"txt2img.json": TXT2IMG})
    ws = tmp_path / "ws"
    port = str(free_port())
    args = ("--manifest", str(manifest), "--workspace", str(ws), "--port", port)
    first = agents.run(*args, "--comfy-command", SIM_COMMAND, "--exit-when-ready", name="first")
    code, out, err = first
    assert code == 0, out + err
    comfy_pid = pid_file(ws)
    assert f"ComfyUI keeps running (pid {comfy_pid})" in out
    assert pid_alive(comfy_pid) and comfy_sims_under(tmp_path) == [comfy_pid]
    assert "downloaded: ComfyUI/models/checkpoints/base.safetensors" in err

    code, out, err = agents.run(
        *args, "--comfy-command", SIM_COMMAND, "--exit-when-ready", name="second"
    )
    assert code == 0, out + err
    assert f"adopted the running ComfyUI (pid {comfy_pid}, answering)" in err
    assert "started ComfyUI" not in err
    assert "downloaded:" not in err  # the files in place were verified, not fetched again
    assert READY.search(out) and f"(pid {comfy_pid})" in out
    assert pid_file(ws) == comfy_pid and comfy_sims_under(tmp_path) == [comfy_pid]


def test_sigterm_before_ready_stops_the_comfyui_being_started_and_exits_130(
    agents: Agents, fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    manifest = write_manifest(tmp_path / "m", four_models(files)[:1], {})
    ws = tmp_path / "ws"
    slow = f"{SIM_COMMAND} --startup-delay 60"
    args = ("--manifest", str(manifest), "--workspace", str(ws), "--port", str(free_port()))
    proc = agents.start(*args, "--comfy-command", slow, name="slow")
    deadline = time.monotonic() + 60
    while not (ws / "comfyui.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, agents.output("slow")
        time.sleep(0.1)
    comfy_pid = pid_file(ws)
    assert pid_alive(comfy_pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    out, err = agents.output("slow")
    assert stage_lines(err)[-1] == "starting_app"
    assert "interrupted before ComfyUI was ready" in err
    assert f"stopped ComfyUI (pid {comfy_pid}, terminated)" in err
    assert not pid_alive(comfy_pid) and not (ws / "comfyui.pid").exists()
    assert "ComfyUI is ready" not in out


# -- run_agent in-process (ComfyUI still a real process) -----------------------------


async def test_a_failing_warm_up_fails_the_run_with_warmup_failed_and_stops_comfyui(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    manifest = load_manifest(
        write_manifest(
            tmp_path / "m", four_models(files)[:1], {"fail.json": FAILING}, warmup="fail.json"
        )
    )
    ws = tmp_path / "ws"
    reporter = RecordingReporter()
    result = await run_agent(
        manifest,
        ws,
        reporter=reporter,
        resolver=SourceResolver(SourceSettings.from_env(fs.env())),
        comfy_options_overrides={
            "command": (sys.executable, "-m", "comfyfleet.sim.comfy"),
            "port": free_port(),
            "poll_interval_s": 0.2,
        },
    )
    assert not result.ok and result.reason == "warmup_failed"
    assert result.message is not None and "deliberate warm-up failure" in result.message
    stages = [(e.stage, e.reason) for e in reporter.events if e.kind == "stage"]
    assert stages == [
        ("booting", None),
        ("provisioning", None),
        ("downloading", None),
        ("starting_app", None),
        ("warming", None),
        ("failed", "warmup_failed"),
    ]
    assert result.supervisor is not None and result.supervisor.pid is None
    assert comfy_sims_under(tmp_path) == []
    [line] = (ws / ERROR_LOG_NAME).read_text().splitlines()
    assert " COMFYUI FAILED warmup_failed: the warm-up workflow failed: " in line
    with pytest.raises(Exception, match="warmup_failed: the warm-up workflow failed"):
        result.raise_for_failure()


async def test_comfyui_must_list_the_node_types_of_the_api_workflows_not_the_ui_ones(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    # A UI-format workflow's node list holds frontend-only nodes /object_info never lists.
    ui_format = {"nodes": [{"id": 1, "type": "Note"}, {"id": 2, "type": "Reroute"}], "links": []}
    workflows = {"txt2img.json": TXT2IMG, "notes.json": ui_format}
    manifest = load_manifest(write_manifest(tmp_path / "m", [], workflows))
    reporter = RecordingReporter()
    result = await run_agent(
        manifest,
        tmp_path / "ws",
        reporter=reporter,
        comfy_options_overrides={
            "command": (*SIM_COMMAND.split(), "--missing-nodes", "LoraLoader"),
            "port": free_port(),
            "poll_interval_s": 0.2,
            "nodes_grace_s": 0.0,
        },
    )
    assert not result.ok and result.reason == "comfy_missing_nodes"
    assert result.message is not None
    assert "lacks the node types LoraLoader that the workspace's workflows use" in result.message
    assert reporter.stages[-1] == "failed"
    assert comfy_sims_under(tmp_path) == []


async def test_not_strict_starts_comfyui_without_a_missing_critical_model(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    files = add_models(fs)
    models = [
        *four_models(files)[:1],
        {"source": "civitai://404404", "dest": "loras", "name": "gone.safetensors"},
    ]
    manifest = load_manifest(write_manifest(tmp_path / "m", models, {}))
    reporter = RecordingReporter()
    result = await run_agent(
        manifest,
        tmp_path / "ws",
        reporter=reporter,
        resolver=SourceResolver(SourceSettings.from_env(fs.env())),
        provision_options=ProvisionOptions(strict=False),
        comfy_options_overrides={"command": tuple(SIM_COMMAND.split()), "port": free_port()},
    )
    try:
        assert result.ok, result.message
        assert result.summary is not None and result.summary.ok  # not strict: ok anyway
        assert [i.name for i in result.summary.missing_critical] == [
            "ComfyUI/models/loras/gone.safetensors"
        ]
        assert reporter.stages[-1] == "ready" and "failed" not in reporter.stages
        assert (
            "not strict: starting ComfyUI without ComfyUI/models/loras/gone.safetensors"
            in reporter.lines
        )
    finally:
        assert result.supervisor is not None
        await result.supervisor.stop()


async def test_attach_mode_waits_for_the_images_comfyui_and_never_stops_it(
    fs: RunningFileServer, tmp_path: Path
) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m", [], {"txt2img.json": TXT2IMG}))
    port = free_port()
    image_comfy = tmp_path / "image" / "ComfyUI"
    image_comfy.mkdir(parents=True)
    command = [*SIM_COMMAND.split(), "--listen", "127.0.0.1", "--port", str(port)]
    sim = await asyncio.create_subprocess_exec(
        *command,
        "--startup-delay",
        "0.5",
        cwd=image_comfy,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        reporter = RecordingReporter()
        result = await run_agent(
            manifest,
            tmp_path / "ws",
            reporter=reporter,
            comfy_options_overrides={
                "attach_url": f"http://127.0.0.1:{port}",
                "poll_interval_s": 0.2,
            },
        )
        assert result.ok, result.message
        assert result.url == f"http://127.0.0.1:{port}" and result.comfy_pid is None
        assert reporter.stages == ["booting", "provisioning", "starting_app", "ready"]
        assert result.supervisor is not None
        await result.supervisor.stop()
        assert sim.returncode is None  # not the agent's to stop
        async with ComfyClient(result.url) as client:
            assert (await client.system_stats())["devices"]
    finally:
        sim.kill()
        await sim.wait()


def test_a_bad_attach_url_is_refused_before_anything_with_exit_2(
    agents: Agents, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "m", [], {})
    ws = tmp_path / "ws"
    args = ("--manifest", str(manifest), "--workspace", str(ws), "--attach", "ftp://x")
    code, _, err = agents.run(*args, name="bad")
    assert code == 2
    assert "attach URL 'ftp://x' is not an http(s) URL" in err
    assert not ws.exists()


def test_the_live_view_shows_the_stage_then_comfyuis_url() -> None:
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    reporter = ConsoleReporter(out, live=True, show_stage=True)
    reporter.stage("downloading")
    reporter.progress(Progress(done=MiB, total=4 * MiB, bytes_per_s=2e6))
    out.print(reporter.header())
    assert reporter._bars is not None and len(reporter._bars.tasks) == 1  # "all files"
    reporter.stage("ready")
    reporter.note("ComfyUI at http://127.0.0.1:8188")
    out.print(reporter.header())
    assert reporter._bars.tasks == []  # the download bars go with the downloads
    text = buffer.getvalue()
    assert "stage downloading (0:00)" in text
    assert "✓ stage ready (0:00)  ComfyUI at http://127.0.0.1:8188" in text
