"""The ComfyUI simulator against what a ComfyUI client checks, over real loopback sockets.

Expected shapes and message orders are copied from ``shared/reference/comfyui-api.md``
(observed on ComfyUI 0.3.64); the process tests start ``python -m comfyfleet.sim.comfy``
as a supervisor would.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from comfyfleet.sim.comfy import ComfySimConfig, RunningComfySim, main

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "examples" / "workflows"
READY_LINE = re.compile(r"To see the GUI go to: http://127\.0\.0\.1:(\d+)")
CLIENT = "77de5a1b-4139-4962-a0d7-4deda49cab2a"

Msg = dict[str, Any]


# -- fixtures and helpers ----------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (0, 0, 100)) -> bytes:
    img = Image.new("RGB", size, color)
    img.putpixel((5, 7), (10, 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    base = tmp_path / "comfy"
    (base / "input").mkdir(parents=True)
    (base / "input" / "api_test.png").write_bytes(png_bytes())
    ckpt = base / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "v1-5-pruned-emaonly.safetensors").write_bytes(b"\0" * 16)
    return base


@pytest.fixture
def comfy(workspace: Path) -> Iterator[RunningComfySim]:
    with RunningComfySim(ComfySimConfig(base_directory=workspace)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def connect(
    http: aiohttp.ClientSession, comfy: RunningComfySim, client_id: str = CLIENT
) -> aiohttp.ClientWebSocketResponse:
    """Open /ws and read the on-connect ``status`` message."""
    ws = await http.ws_connect(comfy.ws_url(client_id))
    first = await ws.receive_json(timeout=5)
    assert first == {
        "type": "status",
        "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id},
    }
    return ws


async def receive(ws: aiohttp.ClientWebSocketResponse, within_s: float = 10) -> Msg:
    msg = await ws.receive(timeout=within_s)
    if msg.type == aiohttp.WSMsgType.BINARY:
        return {"type": "binary", "data": msg.data}
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    parsed: Msg = json.loads(msg.data)
    return parsed


async def until_done(
    ws: aiohttp.ClientWebSocketResponse, prompt_id: str, within_s: float = 20
) -> list[Msg]:
    """Messages up to and including ``executing`` with node null for ``prompt_id``."""
    msgs: list[Msg] = []
    deadline = time.monotonic() + within_s
    while True:
        m = await receive(ws, max(0.1, deadline - time.monotonic()))
        msgs.append(m)
        if m["type"] == "executing" and m["data"] == {"node": None, "prompt_id": prompt_id}:
            return msgs


async def until_type(ws: aiohttp.ClientWebSocketResponse, type_: str) -> list[Msg]:
    msgs: list[Msg] = []
    while not msgs or msgs[-1]["type"] != type_:
        msgs.append(await receive(ws))
    return msgs


async def drain(ws: aiohttp.ClientWebSocketResponse, quiet_s: float = 0.3) -> list[Msg]:
    msgs: list[Msg] = []
    while True:
        try:
            msgs.append(await receive(ws, quiet_s))
        except TimeoutError:
            return msgs


async def post_prompt(
    http: aiohttp.ClientSession, comfy: RunningComfySim, prompt: Any, **body: Any
) -> tuple[int, Msg]:
    async with http.post(f"{comfy.url}/prompt", json={"prompt": prompt, **body}) as r:
        return r.status, await r.json()


async def queue(
    http: aiohttp.ClientSession, comfy: RunningComfySim, prompt: Any, **body: Any
) -> str:
    status, answer = await post_prompt(http, comfy, prompt, **body)
    assert status == 200, answer
    prompt_id: str = answer["prompt_id"]
    return prompt_id


async def history(http: aiohttp.ClientSession, comfy: RunningComfySim, prompt_id: str) -> Msg:
    async with http.get(f"{comfy.url}/history/{prompt_id}") as r:
        assert r.status == 200
        body: Msg = await r.json()
    return body.get(prompt_id, {})


async def wait_history(
    http: aiohttp.ClientSession, comfy: RunningComfySim, prompt_id: str, within_s: float = 20
) -> Msg:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        item = await history(http, comfy, prompt_id)
        if item:
            return item
        await asyncio.sleep(0.02)
    raise AssertionError(f"{prompt_id} never reached the history")


async def view(http: aiohttp.ClientSession, comfy: RunningComfySim, **params: str) -> bytes:
    async with http.get(f"{comfy.url}/view", params=params) as r:
        assert r.status == 200, (params, r.status)
        return await r.read()


async def upload(
    http: aiohttp.ClientSession,
    comfy: RunningComfySim,
    name: str,
    data: bytes,
    **fields: str,
) -> tuple[int, Any]:
    form = aiohttp.FormData(quote_fields=False)  # the raw file name, as requests sends it
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    async with http.post(f"{comfy.url}/upload/image", data=form) as r:
        return r.status, (await r.json() if r.status == 200 else await r.read())


def types_of(msgs: list[Msg], ignore: tuple[str, ...] = ()) -> list[str]:
    return [m["type"] for m in msgs if m["type"] not in ignore]


def workflow(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return loaded


def invert_prompt(image: str = "api_test.png", prefix: str = "clienttest_invert") -> Msg:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def empty_to_save(color: int = 0, prefix: str = "q", batch: int = 1) -> Msg:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def sleep_prompt(seconds: float, steps: int, color: int = 1, preview: bool = False) -> Msg:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "SimSleep",
            "inputs": {
                "images": ["1", 0],
                "seconds": seconds,
                "steps": steps,
                "send_preview": preview,
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "q"}},
    }


async def assert_outputs_match_disk(
    http: aiohttp.ClientSession, comfy: RunningComfySim, outputs: Msg
) -> list[bytes]:
    """Every file history lists comes back from /view, byte for byte what is on disk."""
    blobs = []
    for ui in outputs.values():
        for kind in ("images", "gifs"):
            for ref in ui.get(kind, []):
                folder = comfy.folders.directory_by_type(ref["type"])
                assert folder is not None
                on_disk = (folder / ref["subfolder"] / ref["filename"]).read_bytes()
                got = await view(
                    http,
                    comfy,
                    filename=ref["filename"],
                    subfolder=ref["subfolder"],
                    type=ref["type"],
                )
                assert got == on_disk
                blobs.append(got)
    return blobs


# -- the process -------------------------------------------------------------------------------


async def start_process(
    workspace: Path, *args: str
) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyfleet.sim.comfy",
        "--listen",
        "127.0.0.1",
        "--port",
        "0",
        "--base-directory",
        str(workspace),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return proc, []


async def ready_port(proc: asyncio.subprocess.Process, lines: list[str], within_s: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        if not raw:
            break
        line = raw.decode()
        lines.append(line)
        if m := READY_LINE.search(line):
            return int(m.group(1))
    raise AssertionError(f"no ready line; stdout so far: {lines}")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.communicate()


async def test_process_prints_comfyuis_ready_line_runs_a_workflow_and_exits_0_on_sigterm(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    proc, lines = await start_process(workspace, "--output-directory", str(workspace / "out"))
    try:
        port = await ready_port(proc, lines, within_s=30)
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/system_stats") as r:
            stats = await r.json()
        device = stats["devices"][0]
        assert set(device) >= {"vram_total", "vram_free", "torch_vram_total", "torch_vram_free"}
        assert device["vram_free"] == device["vram_total"] - int(device["vram_total"] * 0.1)
        assert stats["system"]["comfyui_version"] == "0.3.64"

        ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws?clientId=proc")
        assert (await ws.receive_json(timeout=5))["data"]["sid"] == "proc"
        form = aiohttp.FormData()
        form.add_field("image", png_bytes(), filename="input.png", content_type="image/png")
        async with http.post(f"{base}/upload/image", data=form) as r:
            assert await r.json() == {"name": "input.png", "subfolder": "", "type": "input"}
        async with http.post(
            f"{base}/prompt", json={"prompt": workflow("invert"), "client_id": "proc"}
        ) as r:
            prompt_id = (await r.json())["prompt_id"]
        msgs = await until_done(ws, prompt_id)
        assert "execution_success" in types_of(msgs)
        async with http.get(f"{base}/history/{prompt_id}") as r:
            (ref,) = (await r.json())[prompt_id]["outputs"]["3"]["images"]
        async with http.get(f"{base}/view", params=ref) as r:
            assert r.status == 200 and r.content_type == "image/png"
            assert await r.read() == (workspace / "out" / ref["filename"]).read_bytes()

        # SIGTERM while a prompt runs: a graceful stop, exit code 0.
        async with http.post(
            f"{base}/prompt", json={"prompt": sleep_prompt(60, 600), "client_id": "proc"}
        ) as r:
            assert r.status == 200
        await until_type(ws, "progress")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await ws.close()
    finally:
        await stop_process(proc)


async def test_process_fail_start_exits_1_at_once_with_a_traceback(workspace: Path) -> None:
    proc, _ = await start_process(workspace, "--fail-start")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"Traceback (most recent call last)" in err
    assert b"To see the GUI" not in out


async def test_process_waits_startup_delay_then_crashes_with_code_1_after_crash_after(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    proc, lines = await start_process(workspace, "--startup-delay", "1.0", "--crash-after", "1.0")
    try:
        port = await ready_port(proc, lines, within_s=30)
        listening_at = time.monotonic()
        assert listening_at - started >= 1.0
        async with http.get(f"http://127.0.0.1:{port}/system_stats") as r:
            assert r.status == 200
        assert await asyncio.wait_for(proc.wait(), 15) == 1
        assert time.monotonic() - listening_at >= 0.9
        assert proc.stderr is not None
        assert b"simulated crash" in await proc.stderr.read()
    finally:
        await stop_process(proc)


async def test_process_reports_the_vram_fraction_hides_missing_nodes_and_reads_extra_paths(
    workspace: Path, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    shared = tmp_path / "shared-models"
    (shared / "ckpt").mkdir(parents=True)
    (shared / "ckpt" / "shared.safetensors").write_bytes(b"w")
    (shared / "te").mkdir()
    (shared / "te" / "t5.safetensors").write_bytes(b"w")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "shared:\n"
        "    base_path: shared-models\n"  # relative to the YAML file's folder
        "    checkpoints: ckpt\n"
        "    clip: |\n"
        "        te\n"
        "        missing\n"
    )
    # Real ComfyUI flags from a profile's command line are accepted.
    proc, lines = await start_process(
        workspace,
        "--extra-model-paths-config",
        str(config),
        "--vram-used-fraction",
        "0.95",
        "--missing-nodes",
        "SimSleep,ImageInvert",
        "--use-sage-attention",
        "--lowvram",
        "--fast",
        "fp16_accumulation",
        "--disable-auto-launch",
    )
    try:
        port = await ready_port(proc, lines, within_s=30)
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/system_stats") as r:
            (device,) = (await r.json())["devices"]
        used = 1 - device["vram_free"] / device["vram_total"]
        assert used == pytest.approx(0.95, abs=1e-6)
        async with http.get(f"{base}/object_info") as r:
            info = await r.json()
        assert "SimSleep" not in info and "ImageInvert" not in info
        assert "LoadImage" in info and "SaveImage" in info
        async with http.get(f"{base}/object_info/ImageInvert") as r:
            assert await r.json() == {}
        ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert ckpts == ["shared.safetensors", "v1-5-pruned-emaonly.safetensors"]
        assert info["CLIPLoader"]["input"]["required"]["clip_name"][0] == ["t5.safetensors"]
        async with http.post(f"{base}/prompt", json={"prompt": invert_prompt()}) as r:
            assert r.status == 400
            assert (await r.json())["error"] == {
                "type": "invalid_prompt",
                "message": "Cannot execute because node ImageInvert does not exist.",
                "details": "Node ID '#2'",
                "extra_info": {},
            }
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        await stop_process(proc)


def test_unknown_flags_are_refused_like_comfyui(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-such-flag"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["--listen", "0.0.0.0"]) == 2
    assert "loopback only" in capsys.readouterr().err


# -- information routes ------------------------------------------------------------------------

# Copied from the reference's observed /object_info responses.
REFERENCE_OBJECT_INFO = {
    "ImageInvert": {"input": {"required": {"image": ["IMAGE"]}}, "input_order": {"required": ["image"]}, "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": "ImageInvert", "display_name": "Invert Image", "description": "", "python_module": "nodes", "category": "image", "output_node": False},  # noqa: E501
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {"tooltip": "The images to save."}], "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}, "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]}, "output": [], "output_is_list": [], "output_name": [], "name": "SaveImage", "display_name": "Save Image", "description": "Saves the input images to your ComfyUI output directory.", "python_module": "nodes", "category": "image", "output_node": True},  # noqa: E501
    "EmptyImage": {"input": {"required": {"width": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "height": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}], "color": ["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}]}}, "input_order": {"required": ["width", "height", "batch_size", "color"]}, "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": "EmptyImage", "display_name": "EmptyImage", "description": "", "python_module": "nodes", "category": "image", "output_node": False},  # noqa: E501
    "ImageScale": {"input": {"required": {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]], "width": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}], "height": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}], "crop": [["disabled", "center"]]}}, "input_order": {"required": ["image", "upscale_method", "width", "height", "crop"]}, "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": "ImageScale", "display_name": "Upscale Image", "description": "", "python_module": "nodes", "category": "image/upscaling", "output_node": False},  # noqa: E501
}  # fmt: skip


async def test_object_info_of_stock_image_nodes_is_what_comfyui_publishes(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    for name, expected in REFERENCE_OBJECT_INFO.items():
        async with http.get(f"{comfy.url}/object_info/{name}") as r:
            assert r.content_type == "application/json"
            got = await r.json()
        assert json.dumps(got) == json.dumps({name: expected}), name  # key order too
    async with http.get(f"{comfy.url}/object_info/Nope") as r:
        assert r.status == 200 and await r.json() == {}


async def test_every_node_is_published_in_comfyuis_shape(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{comfy.url}/api/object_info") as r:
        info = await r.json()
    wanted = {
        "LoadImage", "ImageInvert", "ImageScale", "EmptyImage", "SaveImage", "PreviewImage",
        "CLIPTextEncode", "KSampler", "EmptyLatentImage", "VAEDecode", "CheckpointLoaderSimple",
        "LoraLoader", "VAELoader", "CLIPLoader", "UNETLoader", "ControlNetLoader", "SimSleep",
        "SimFail", "SaveAnimatedWEBP", "VHS_VideoCombine", "PreviewAny",
    }  # fmt: skip
    assert wanted <= set(info)
    for name, node in info.items():
        assert node["name"] == name
        assert isinstance(node["input"]["required"], dict)
        assert set(node["input_order"]) == set(node["input"])
        assert len(node["output"]) == len(node["output_name"]) == len(node["output_is_list"])
        assert isinstance(node["output_node"], bool)
        assert {"display_name", "category", "description", "python_module"} <= set(node)
    outputs = {n for n, node in info.items() if node["output_node"]}
    assert outputs == {
        "SaveImage", "PreviewImage", "SaveAnimatedWEBP", "VHS_VideoCombine", "PreviewAny"
    }  # fmt: skip
    assert info["VHS_VideoCombine"]["output_name"] == ["Filenames"]


async def test_system_stats_features_and_models_routes(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    config = ComfySimConfig(base_directory=workspace, vram_used_fraction=0.5, vram_total_bytes=8000)
    with RunningComfySim(config) as comfy:
        async with http.get(f"{comfy.url}/system_stats") as r:
            (device,) = (await r.json())["devices"]
        assert device["vram_total"] == 8000 and device["vram_free"] == 4000
        assert device["torch_vram_total"] == 4000 and device["torch_vram_free"] == 0
        async with http.get(f"{comfy.url}/features") as r:
            assert await r.json() == {
                "supports_preview_metadata": True,
                "max_upload_size": 104857600,
            }
        async with http.get(f"{comfy.url}/models") as r:
            folders = await r.json()
        assert folders[:6] == [
            "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models"
        ]  # fmt: skip
        async with http.get(f"{comfy.url}/models/checkpoints") as r:
            assert await r.json() == ["v1-5-pruned-emaonly.safetensors"]
        for legacy in ("unet", "clip", "bogus"):
            async with http.get(f"{comfy.url}/models/{legacy}") as r:
                assert r.status == 404
        async with http.get(f"{comfy.url}/prompt") as r:
            assert await r.json() == {"exec_info": {"queue_remaining": 0}}


# -- loaders and models ------------------------------------------------------------------------


async def test_loaders_list_the_workspace_model_folders_with_legacy_names_and_subfolders(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    models = workspace / "models"
    for rel in (
        "checkpoints/sdxl/juggernaut.safetensors",
        "checkpoints/readme.txt",
        "loras/detail.safetensors",
        "vae/sdxl_vae.pt",
        "clip/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
        "unet/flux1-dev.sft",
        "unet/flux1-dev-Q4.gguf",
        "diffusion_models/wan2.1.safetensors",
        "controlnet/canny.pth",
        "t2i_adapter/depth.safetensors",
    ):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"weights")
    expected = {
        "CheckpointLoaderSimple": (
            "ckpt_name",
            ["sdxl/juggernaut.safetensors", "v1-5-pruned-emaonly.safetensors"],
        ),
        "LoraLoader": ("lora_name", ["detail.safetensors"]),
        "VAELoader": ("vae_name", ["sdxl_vae.pt"]),
        "CLIPLoader": ("clip_name", ["clip_l.safetensors", "t5xxl_fp16.safetensors"]),
        "UNETLoader": ("unet_name", ["flux1-dev.sft", "wan2.1.safetensors"]),
        "ControlNetLoader": ("control_net_name", ["canny.pth", "depth.safetensors"]),
    }
    with RunningComfySim(ComfySimConfig(base_directory=workspace)) as comfy:
        for node, (input_name, files) in expected.items():
            async with http.get(f"{comfy.url}/object_info/{node}") as r:
                info = (await r.json())[node]
            assert info["input"]["required"][input_name][0] == files, node
        # A model downloaded while the server runs is listed at once.
        (models / "loras" / "late.safetensors").write_bytes(b"weights")
        async with http.get(f"{comfy.url}/object_info/LoraLoader") as r:
            combo = (await r.json())["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert combo == ["detail.safetensors", "late.safetensors"]


async def test_a_model_missing_from_disk_fails_validation_with_value_not_in_list(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    prompt = workflow("txt2img")
    prompt["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
    status, body = await post_prompt(http, comfy, prompt, client_id=CLIENT)
    assert status == 400
    assert body == {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "4": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "ckpt_name: 'sd_xl_base_1.0.safetensors' not in"
                        " ['v1-5-pruned-emaonly.safetensors']",
                        "extra_info": {
                            "input_name": "ckpt_name",
                            "input_config": [
                                ["v1-5-pruned-emaonly.safetensors"],
                                {"tooltip": "The name of the checkpoint (model) to load."},
                            ],
                            "received_value": "sd_xl_base_1.0.safetensors",
                        },
                    }
                ],
                "dependent_outputs": ["9"],
                "class_type": "CheckpointLoaderSimple",
            }
        },
    }


async def test_value_not_in_list_leaves_out_lists_longer_than_20(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    loras = workspace / "models" / "loras"
    loras.mkdir(parents=True)
    for i in range(21):
        (loras / f"l{i:02}.safetensors").write_bytes(b"x")
    prompt = workflow("txt2img")
    prompt["10"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["4", 0],
            "clip": ["4", 1],
            "lora_name": "missing.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["3"]["inputs"]["model"] = ["10", 0]
    with RunningComfySim(ComfySimConfig(base_directory=workspace)) as comfy:
        status, body = await post_prompt(http, comfy, prompt)
    assert status == 400
    (error,) = body["node_errors"]["10"]["errors"]
    assert error["details"] == "lora_name: 'missing.safetensors' not in (list of length 21)"
    assert error["extra_info"]["input_config"] is None


# -- validation --------------------------------------------------------------------------------

EMPTY_8 = {
    "class_type": "EmptyImage",
    "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
}
FAILED = {
    "type": "prompt_outputs_failed_validation",
    "message": "Prompt outputs failed validation",
    "details": "",
    "extra_info": {},
}

# (request prompt, expected 400 body): the reference's observed cases v1-v10.
VALIDATION_CASES: dict[str, tuple[Any, Msg]] = {
    "unknown_class_type": (
        {"1": {"class_type": "NoSuchNode", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}},  # noqa: E501
        {"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}},  # noqa: E501
    ),
    "missing_class_type": (
        {"1": {"inputs": {}}},
        {"error": {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.", "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}},  # noqa: E501
    ),
    "missing_required_input": (
        {"1": EMPTY_8, "2": {"class_type": "ImageInvert", "inputs": {}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}},  # noqa: E501
        {"error": FAILED, "node_errors": {"2": {"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "image", "extra_info": {"input_name": "image"}}], "dependent_outputs": ["3"], "class_type": "ImageInvert"}}},  # noqa: E501
    ),
    "value_not_in_list": (
        {"1": EMPTY_8, "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 16, "height": 16, "crop": "disabled"}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}},  # noqa: E501
        {"error": FAILED, "node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list", "details": "upscale_method: 'bogus' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']", "extra_info": {"input_name": "upscale_method", "input_config": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}], "received_value": "bogus"}}], "dependent_outputs": ["3"], "class_type": "ImageScale"}}},  # noqa: E501
    ),
    "value_bigger_than_max": (
        {"1": {"class_type": "EmptyImage", "inputs": {"width": 100000, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},  # noqa: E501
        {"error": FAILED, "node_errors": {"1": {"errors": [{"type": "value_bigger_than_max", "message": "Value 100000 bigger than max of 16384", "details": "width", "extra_info": {"input_name": "width", "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "received_value": 100000}}], "dependent_outputs": ["2"], "class_type": "EmptyImage"}}},  # noqa: E501
    ),
    "invalid_input_type": (
        {"1": {"class_type": "EmptyImage", "inputs": {"width": "abc", "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},  # noqa: E501
        {"error": FAILED, "node_errors": {"1": {"errors": [{"type": "invalid_input_type", "message": "Failed to convert an input value to a INT value", "details": "width, abc, invalid literal for int() with base 10: 'abc'", "extra_info": {"input_name": "width", "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "received_value": "abc", "exception_message": "invalid literal for int() with base 10: 'abc'"}}], "dependent_outputs": ["2"], "class_type": "EmptyImage"}}},  # noqa: E501
    ),
    "return_type_mismatch": (
        {"1": {"class_type": "LoadImage", "inputs": {"image": "api_test.png"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "x"}}},  # noqa: E501
        {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "Return type mismatch between linked nodes: images, received_type(MASK) mismatch input_type(IMAGE)", "extra_info": {}}, "node_errors": {"2": {"errors": [{"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes", "details": "images, received_type(MASK) mismatch input_type(IMAGE)", "extra_info": {"input_name": "images", "input_config": ["IMAGE", {"tooltip": "The images to save."}], "received_type": "MASK", "linked_node": ["1", 1]}}], "dependent_outputs": ["2"], "class_type": "SaveImage"}}},  # noqa: E501
    ),
    "bad_linked_input": (
        {"1": EMPTY_8, "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}}},  # noqa: E501
        {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "Bad linked input, must be a length-2 list of [node_id, slot_index]: images", "extra_info": {}}, "node_errors": {"2": {"errors": [{"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": "images", "extra_info": {"input_name": "images", "input_config": ["IMAGE", {"tooltip": "The images to save."}], "received_value": ["1"]}}], "dependent_outputs": ["2"], "class_type": "SaveImage"}}},  # noqa: E501
    ),
    "no_outputs": (
        {"1": EMPTY_8},
        {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": {}},  # noqa: E501
    ),
    "load_image_missing_file": (
        {"1": {"class_type": "LoadImage", "inputs": {"image": "does_not_exist.png"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},  # noqa: E501
        {"error": FAILED, "node_errors": {"1": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "image - Invalid image file: does_not_exist.png", "extra_info": {"input_name": "image"}}], "dependent_outputs": ["2"], "class_type": "LoadImage"}}},  # noqa: E501
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
async def test_validation_errors_are_400_in_comfyuis_exact_shape(
    case: str, comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    prompt, expected = VALIDATION_CASES[case]
    async with http.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": CLIENT}) as r:
        assert r.status == 400
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await r.json() == expected


async def test_no_prompt_key_and_malformed_bodies(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{comfy.url}/prompt", json={"client_id": CLIENT}) as r:
        assert r.status == 400
        assert await r.json() == {
            "error": {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            },
            "node_errors": {},
        }
    for raw in (b"{not json", json.dumps({"prompt": [1, 2]}).encode()):
        async with http.post(
            f"{comfy.url}/prompt", data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 500
            assert r.content_type == "text/plain"
            assert "Server got itself in trouble" in await r.text()


async def test_a_link_to_a_missing_node_is_an_exception_during_validation(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    prompt = {
        "2": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "x"}}
    }
    status, body = await post_prompt(http, comfy, prompt)
    assert status == 400
    assert body["error"]["details"] == "Exception when validating node: '99'"
    (error,) = body["node_errors"]["2"]["errors"]
    assert error["type"] == "exception_during_validation"
    assert error["details"] == "'99'"
    assert error["extra_info"]["exception_type"] == "KeyError"
    assert isinstance(error["extra_info"]["traceback"], list)
    assert body["node_errors"]["2"]["dependent_outputs"] == ["2"]


async def test_one_valid_output_is_queued_and_the_invalid_branch_is_reported_and_dropped(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    prompt = {
        **{k: v for k, v in empty_to_save(prefix="partial").items()},
        "3": {"class_type": "ImageInvert", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    status, body = await post_prompt(http, comfy, prompt)
    assert status == 200
    assert body["node_errors"] == {
        "3": {
            "errors": [
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": "image",
                    "extra_info": {"input_name": "image"},
                }
            ],
            "dependent_outputs": ["4"],
            "class_type": "ImageInvert",
        }
    }
    item = await wait_history(http, comfy, body["prompt_id"])
    assert item["prompt"][4] == ["2"]
    assert list(item["outputs"]) == ["2"]


async def test_numbers_count_every_post_front_goes_negative_and_explicit_numbers_are_kept(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    _, first = await post_prompt(http, comfy, empty_to_save(1))
    status, _ = await post_prompt(http, comfy, {"1": EMPTY_8})  # a 400 counts too
    assert status == 400
    _, third = await post_prompt(http, comfy, empty_to_save(2))
    _, front = await post_prompt(http, comfy, empty_to_save(3), front=True)
    _, explicit = await post_prompt(http, comfy, empty_to_save(4), number=42.5)
    _, own_id = await post_prompt(http, comfy, empty_to_save(5), prompt_id="my-own-id-123")
    assert [first["number"], third["number"], front["number"]] == [0, 2, -3]
    assert explicit["number"] == 42.5
    assert own_id == {"prompt_id": "my-own-id-123", "number": 4, "node_errors": {}}
    item = await wait_history(http, comfy, "my-own-id-123")
    assert item["prompt"][:2] == [4, "my-own-id-123"]


# -- execution and the WebSocket ---------------------------------------------------------------

# The reference's observed sequence for LoadImage -> ImageInvert -> SaveImage.
INVERT_SEQUENCE = [
    "status", "status", "execution_start", "execution_cached",
    "progress_state", "executing", "progress_state",
    "progress_state", "executing", "progress_state",
    "progress_state", "executing", "executed", "progress_state",
    "execution_success", "status", "executing",
]  # fmt: skip


async def test_invert_workflow_sends_comfyuis_message_order_and_its_outputs_come_back(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    extra = {"extra_pnginfo": {"workflow": {"id": "wf-123"}}, "my_key": "my_value"}
    prompt_id = await queue(http, comfy, invert_prompt(), client_id=CLIENT, extra_data=extra)
    msgs = await until_done(ws, prompt_id)
    assert types_of(msgs) == INVERT_SEQUENCE
    assert [
        m["data"]["status"]["exec_info"]["queue_remaining"] for m in msgs if m["type"] == "status"
    ] == [1, 1, 0]
    executing = [m["data"] for m in msgs if m["type"] == "executing"]
    assert executing[:3] == [
        {"node": n, "display_node": n, "prompt_id": prompt_id} for n in ("1", "2", "3")
    ]
    assert msgs[3]["data"]["nodes"] == []
    states = [m["data"]["nodes"] for m in msgs if m["type"] == "progress_state"]
    assert states[0] == {
        "1": {
            "value": 0.0, "max": 1.0, "state": "running", "node_id": "1",
            "prompt_id": prompt_id, "display_node_id": "1", "parent_node_id": None,
            "real_node_id": "1",
        }
    }  # fmt: skip
    assert {k: v["state"] for k, v in states[-1].items()} == {
        "1": "finished", "2": "finished", "3": "finished"
    }  # fmt: skip
    expected_output = {
        "images": [{"filename": "clienttest_invert_00001_.png", "subfolder": "", "type": "output"}]
    }
    (executed,) = [m["data"] for m in msgs if m["type"] == "executed"]
    assert executed == {
        "node": "3", "display_node": "3", "output": expected_output, "prompt_id": prompt_id
    }  # fmt: skip

    item = await history(http, comfy, prompt_id)
    assert item["prompt"] == [
        0, prompt_id, invert_prompt(), {**extra, "client_id": CLIENT}, ["3"]
    ]  # fmt: skip
    assert item["outputs"] == {"3": expected_output}
    assert item["status"]["status_str"] == "success" and item["status"]["completed"] is True
    assert [m[0] for m in item["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_success"
    ]  # fmt: skip
    assert item["meta"] == {
        "3": {"node_id": "3", "display_node": "3", "parent_node": None, "real_node_id": "3"}
    }
    (data,) = await assert_outputs_match_disk(http, comfy, item["outputs"])
    with Image.open(io.BytesIO(data)) as out:
        assert out.size == (64, 48)
        assert out.getpixel((5, 7)) == (245, 235, 225)  # 255 - source pixel
        assert out.getpixel((0, 0)) == (255, 255, 155)
        assert json.loads(out.text["prompt"]) == invert_prompt()
        assert json.loads(out.text["workflow"]) == {"id": "wf-123"}
    await ws.close()


async def test_an_identical_prompt_is_served_from_the_cache_until_free(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    first = await queue(http, comfy, invert_prompt(), client_id=CLIENT)
    await until_done(ws, first)
    again = await queue(http, comfy, invert_prompt(), client_id=CLIENT)
    msgs = await until_done(ws, again)
    assert types_of(msgs) == [
        "status", "status", "execution_start", "execution_cached", "executed",
        "progress_state", "execution_success", "status", "executing",
    ]  # fmt: skip
    assert msgs[3]["data"]["nodes"] == ["1", "2", "3"]
    item = await history(http, comfy, again)
    assert item["outputs"]["3"]["images"][0]["filename"] == "clienttest_invert_00001_.png"
    assert sorted(p.name for p in comfy.folders.output.iterdir()) == [
        "clienttest_invert_00001_.png"
    ]

    # A re-uploaded input busts LoadImage's cache (IS_CHANGED hashes the file).
    (comfy.folders.input / "api_test.png").write_bytes(png_bytes(color=(1, 2, 3)))
    changed = await queue(http, comfy, invert_prompt(), client_id=CLIENT)
    msgs = await until_done(ws, changed)
    assert msgs[3]["data"]["nodes"] == []
    assert (await history(http, comfy, changed))["outputs"]["3"]["images"][0]["filename"] == (
        "clienttest_invert_00002_.png"
    )

    async with http.post(f"{comfy.url}/free", json={"free_memory": True}) as r:
        assert r.status == 200 and await r.read() == b""
    freed = await queue(http, comfy, invert_prompt(), client_id=CLIENT)
    msgs = await until_done(ws, freed)
    assert msgs[3]["data"]["nodes"] == []
    assert types_of(msgs).count("executing") == 4
    await ws.close()


async def test_txt2img_is_deterministic_in_seed_and_prompt_and_reports_each_step(
    workspace: Path, http: aiohttp.ClientSession
) -> None:
    config = ComfySimConfig(base_directory=workspace, cache="none")
    with RunningComfySim(config) as comfy:
        ws = await connect(http, comfy)

        async def generate(seed: int, text: str) -> tuple[bytes, list[Msg]]:
            prompt = workflow("txt2img")
            prompt["3"]["inputs"].update(seed=seed, steps=5)
            prompt["5"]["inputs"].update(width=128, height=96)
            prompt["6"]["inputs"]["text"] = text
            prompt_id = await queue(http, comfy, prompt, client_id=CLIENT)
            msgs = await until_done(ws, prompt_id)
            item = await history(http, comfy, prompt_id)
            (data,) = await assert_outputs_match_disk(http, comfy, item["outputs"])
            return data, msgs

        base, msgs = await generate(42, "a lighthouse at dusk")
        progress = [m["data"] for m in msgs if m["type"] == "progress"]
        assert [(p["value"], p["max"], p["node"]) for p in progress] == [
            (i, 5, "3") for i in range(1, 6)
        ]
        sampler_done = next(
            i for i, m in enumerate(msgs) if m["type"] == "executing" and m["data"]["node"] == "8"
        )
        assert all(msgs.index(m) < sampler_done for m in msgs if m["type"] == "progress")
        same, _ = await generate(42, "a lighthouse at dusk")
        other_seed, _ = await generate(43, "a lighthouse at dusk")
        other_text, _ = await generate(42, "a forest at dawn")

        def pixels(data: bytes) -> bytes:
            with Image.open(io.BytesIO(data)) as img:
                assert img.size == (128, 96)
                return img.tobytes()

        assert pixels(same) == pixels(base)
        assert pixels(other_seed) != pixels(base)
        assert pixels(other_text) != pixels(base)
        await ws.close()


async def test_interrupt_stops_only_the_running_prompt_and_the_queue_moves_on(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    slow = await queue(http, comfy, sleep_prompt(30, 300), client_id=CLIENT)
    fast = await queue(http, comfy, empty_to_save(7), client_id=CLIENT)
    await until_type(ws, "progress")
    async with http.get(f"{comfy.url}/queue") as r:
        q = await r.json()
    assert [item[1] for item in q["queue_running"]] == [slow]
    assert [item[1] for item in q["queue_pending"]] == [fast]

    # An interrupt naming a prompt that is not running is ignored.
    async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": fast}) as r:
        assert r.status == 200 and await r.read() == b""
    assert "progress" in types_of(await until_type(ws, "progress"))

    sent = time.monotonic()
    async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": slow}) as r:
        assert r.status == 200
    msgs = await until_done(ws, slow)
    assert time.monotonic() - sent < 2
    tail = [m for m in msgs if m["type"] not in ("progress", "progress_state")][-3:]
    assert types_of(tail) == ["execution_interrupted", "status", "executing"]
    interrupted = tail[0]["data"]
    assert interrupted["prompt_id"] == slow
    assert (interrupted["node_id"], interrupted["node_type"]) == ("2", "SimSleep")
    assert interrupted["executed"] == ["1"]
    assert "execution_success" not in types_of(msgs)

    item = await history(http, comfy, slow)
    assert item["status"]["status_str"] == "error" and item["status"]["completed"] is False
    assert item["status"]["messages"][-1][0] == "execution_interrupted"
    assert item["outputs"] == {}
    assert "execution_success" in types_of(await until_done(ws, fast))
    await ws.close()


async def test_queue_priority_delete_clear_and_global_interrupt(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    a = await queue(http, comfy, sleep_prompt(30, 300), client_id=CLIENT)
    before = await until_type(ws, "progress")
    b = await queue(http, comfy, empty_to_save(2), client_id=CLIENT)
    c = await queue(http, comfy, empty_to_save(3), client_id=CLIENT)
    d = await queue(http, comfy, empty_to_save(4), client_id=CLIENT, front=True)
    async with http.get(f"{comfy.url}/prompt") as r:
        assert await r.json() == {"exec_info": {"queue_remaining": 4}}
    async with http.get(f"{comfy.url}/queue") as r:
        pending = (await r.json())["queue_pending"]
    assert sorted((item[0], item[1]) for item in pending) == [(-3, d), (1, b), (2, c)]
    assert all(len(item) == 5 and item[4] == ["2"] for item in pending)

    async with http.post(f"{comfy.url}/queue", json={"delete": [c, "unknown-id"]}) as r:
        assert r.status == 200 and await r.read() == b""
    async with http.post(f"{comfy.url}/interrupt", data=b"") as r:  # global, empty body
        assert r.status == 200
    msgs = before + await until_done(ws, a) + await until_done(ws, d) + await until_done(ws, b)
    started = [m["data"]["prompt_id"] for m in msgs if m["type"] == "execution_start"]
    assert started == [a, d, b]
    assert await history(http, comfy, c) == {}

    e = await queue(http, comfy, sleep_prompt(30, 300, color=5), client_id=CLIENT)
    await until_type(ws, "progress")
    f = await queue(http, comfy, empty_to_save(6), client_id=CLIENT)
    async with http.post(f"{comfy.url}/queue", json={"clear": True}) as r:
        assert r.status == 200
    async with http.get(f"{comfy.url}/queue") as r:
        q = await r.json()
    assert q["queue_pending"] == [] and [i[1] for i in q["queue_running"]] == [e]
    async with http.post(f"{comfy.url}/interrupt") as r:
        assert r.status == 200
    await until_done(ws, e)
    assert await drain(ws) == []
    assert await history(http, comfy, f) == {}
    await ws.close()


async def test_a_failing_node_reports_execution_error_and_history_keeps_it(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},  # noqa: E501
        "2": {"class_type": "SimFail", "inputs": {"images": ["1", 0], "message": "deliberate failure"}},  # noqa: E501
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "never"}},  # noqa: E501
    }  # fmt: skip
    prompt_id = await queue(http, comfy, prompt, client_id=CLIENT)
    msgs = await until_done(ws, prompt_id)
    assert types_of(msgs, ignore=("progress_state",)) == [
        "status", "status", "execution_start", "execution_cached", "executing", "executing",
        "execution_error", "status", "executing",
    ]  # fmt: skip
    (error,) = [m["data"] for m in msgs if m["type"] == "execution_error"]
    assert {k: error[k] for k in ("prompt_id", "node_id", "node_type", "executed")} == {
        "prompt_id": prompt_id,
        "node_id": "2",
        "node_type": "SimFail",
        "executed": ["1"],
    }
    assert error["exception_message"] == "deliberate failure\n"
    assert error["exception_type"] == "RuntimeError"
    assert error["current_inputs"]["message"] == ["deliberate failure"]
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert sorted(error["current_outputs"]) == ["1", "2", "3"]
    assert isinstance(error["timestamp"], int)

    item = await history(http, comfy, prompt_id)
    assert item["status"]["status_str"] == "error" and item["status"]["completed"] is False
    assert item["status"]["messages"][-1] == ["execution_error", error]
    assert item["outputs"] == {} and item["meta"] == {}
    assert not any(comfy.folders.output.iterdir())
    await ws.close()


async def test_load_image_of_an_uploaded_non_image_fails_at_run_time(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    status, answer = await upload(http, comfy, "bad.png", b"this is not a png", overwrite="true")
    assert (status, answer) == (200, {"name": "bad.png", "subfolder": "", "type": "input"})
    ws = await connect(http, comfy)
    prompt_id = await queue(http, comfy, invert_prompt("bad.png"), client_id=CLIENT)
    msgs = await until_done(ws, prompt_id)
    (error,) = [m["data"] for m in msgs if m["type"] == "execution_error"]
    assert error["node_type"] == "LoadImage" and error["executed"] == []
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["current_inputs"] == {"image": ["bad.png"]}
    await ws.close()


async def test_outputs_of_every_kind_are_listed_and_downloadable(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    # Three different frames: the stand-in sampler draws each seed of the batch apart.
    prompt = workflow("txt2img")
    prompt["3"]["inputs"]["steps"] = 1
    prompt["5"]["inputs"].update(width=32, height=24, batch_size=3)
    del prompt["9"]
    prompt.update({
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["8", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": True, "quality": 80, "method": "default"}},  # noqa: E501
        "10": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["8", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "clips/AnimateDiff", "format": "image/gif", "pingpong": False, "save_output": True}},  # noqa: E501
        "11": {"class_type": "PrimitiveString", "inputs": {"value": "hello"}},
        "12": {"class_type": "PreviewAny", "inputs": {"source": ["11", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "empty"}},  # noqa: E501
    })  # fmt: skip
    ws = await connect(http, comfy)
    prompt_id = await queue(http, comfy, prompt, client_id=CLIENT)
    msgs = await until_done(ws, prompt_id)
    outputs = (await history(http, comfy, prompt_id))["outputs"]
    executed = {m["data"]["node"]: m["data"]["output"] for m in msgs if m["type"] == "executed"}
    assert executed == outputs

    assert outputs["2"] == {
        "images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}],
        "animated": [True],
    }
    (gif,) = outputs["10"]["gifs"]
    assert {k: gif[k] for k in ("filename", "subfolder", "type", "format", "frame_rate")} == {
        "filename": "AnimateDiff_00001.gif",
        "subfolder": "clips",
        "type": "output",
        "format": "image/gif",
        "frame_rate": 8.0,
    }
    assert gif["workflow"] == "AnimateDiff_00001.png"
    assert outputs["12"] == {"text": ["hello"]}
    temps = outputs["13"]["images"]
    assert [t["type"] for t in temps] == ["temp"] * 3
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_0000[123]_\.png( \S+)*", " ".join(
        t["filename"] for t in temps
    ))  # fmt: skip
    assert [i["filename"] for i in outputs["14"]["images"]] == [
        "empty_00001_.png", "empty_00002_.png", "empty_00003_.png"
    ]  # fmt: skip

    blobs = await assert_outputs_match_disk(http, comfy, outputs)
    assert len(blobs) == 8
    async with http.get(
        f"{comfy.url}/view", params={"filename": "anim_00001_.webp", "type": "output"}
    ) as r:
        assert r.content_type == "image/webp"
        with Image.open(io.BytesIO(await r.read())) as webp:
            assert webp.n_frames == 3 and webp.size == (32, 24)
    async with http.get(
        f"{comfy.url}/view",
        params={"filename": "AnimateDiff_00001.gif", "subfolder": "clips", "type": "output"},
    ) as r:
        assert r.content_type == "image/gif"
        with Image.open(io.BytesIO(await r.read())) as clip:
            assert clip.n_frames == 3
    await ws.close()


# -- uploads and downloads ---------------------------------------------------------------------


async def test_upload_image_naming_subfolders_and_refusals(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    original, other = png_bytes(), png_bytes(color=(200, 0, 0))
    assert await upload(http, comfy, "up.png", original) == (
        200, {"name": "up.png", "subfolder": "", "type": "input"}
    )  # fmt: skip
    # Identical bytes under the same name: the existing file is the answer.
    assert (await upload(http, comfy, "up.png", original))[1]["name"] == "up.png"
    assert (await upload(http, comfy, "up.png", other))[1]["name"] == "up (1).png"
    assert (await upload(http, comfy, "up.png", png_bytes(color=(0, 9, 0))))[1]["name"] == (
        "up (2).png"
    )
    assert (await upload(http, comfy, "up.png", other, overwrite="true"))[1]["name"] == "up.png"
    assert (comfy.folders.input / "up.png").read_bytes() == other
    assert await upload(http, comfy, "up.png", original, subfolder="clienttests") == (
        200, {"name": "up.png", "subfolder": "clienttests", "type": "input"}
    )  # fmt: skip
    assert (comfy.folders.input / "clienttests" / "up.png").read_bytes() == original
    assert await upload(http, comfy, "tmp_test.png", original, type="temp") == (
        200, {"name": "tmp_test.png", "subfolder": "", "type": "temp"}
    )  # fmt: skip
    assert (await upload(http, comfy, "../evil.png", original))[0] == 400
    assert (await upload(http, comfy, "evil.png", original, subfolder="../.."))[0] == 400
    async with http.post(f"{comfy.url}/upload/image", data={"overwrite": "true"}) as r:
        assert r.status == 400
    assert not (comfy.folders.base / "evil.png").exists()

    async with http.get(f"{comfy.url}/object_info/LoadImage") as r:
        combo = (await r.json())["LoadImage"]["input"]["required"]["image"]
    assert combo == [
        ["api_test.png", "up (1).png", "up (2).png", "up.png"], {"image_upload": True}
    ]  # fmt: skip
    # LoadImage takes a subfolder path although it is not in the combo list.
    ws = await connect(http, comfy)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "clienttests/up.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 128, "height": 96, "crop": "disabled"}},  # noqa: E501
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "clienttests/scaled"}},  # noqa: E501
    }  # fmt: skip
    prompt_id = await queue(http, comfy, prompt, client_id=CLIENT)
    await until_done(ws, prompt_id)
    outputs = (await history(http, comfy, prompt_id))["outputs"]
    assert outputs["3"]["images"] == [
        {"filename": "scaled_00001_.png", "subfolder": "clienttests", "type": "output"}
    ]
    (data,) = await assert_outputs_match_disk(http, comfy, outputs)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (128, 96)
    await ws.close()


async def test_view_refusals_and_conversions(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    cases = [
        ({}, 404),
        ({"filename": "nope.png", "type": "output"}, 404),
        ({"filename": "../x.png", "type": "output"}, 400),
        ({"filename": "api_test.png", "type": "bogus"}, 400),
        ({"filename": "api_test.png", "type": "input", "subfolder": "../.."}, 403),
    ]
    for params, status in cases:
        async with http.get(f"{comfy.url}/view", params=params) as r:
            assert r.status == status, params
            assert await r.read() == b""
    source = (comfy.folders.input / "api_test.png").read_bytes()
    async with http.get(
        f"{comfy.url}/view", params={"filename": "api_test.png", "type": "input"}
    ) as r:
        assert r.content_type == "image/png"
        assert r.headers["Content-Disposition"] == 'filename="api_test.png"'
        assert await r.read() == source
    assert await view(http, comfy, filename="api_test.png [input]") == source
    async with http.get(
        f"{comfy.url}/view",
        params={"filename": "api_test.png", "type": "input", "preview": "jpeg;50"},
    ) as r:
        assert r.content_type == "image/jpeg"
        assert (await r.read())[:3] == b"\xff\xd8\xff"
    for channel in ("rgb", "a"):
        async with http.get(
            f"{comfy.url}/view",
            params={"filename": "api_test.png", "type": "input", "channel": channel},
        ) as r:
            assert r.content_type == "image/png"
            with Image.open(io.BytesIO(await r.read())) as img:
                assert img.mode == ("RGB" if channel == "rgb" else "RGBA")


async def test_history_paging_delete_and_clear(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ids = [await queue(http, comfy, empty_to_save(i, prefix=f"h{i}")) for i in range(4)]
    await wait_history(http, comfy, ids[-1])
    async with http.get(f"{comfy.url}/history") as r:
        assert list(await r.json()) == ids
    async with http.get(f"{comfy.url}/history", params={"max_items": "2"}) as r:
        assert list(await r.json()) == ids[2:]
    async with http.get(f"{comfy.url}/history", params={"max_items": "2", "offset": "1"}) as r:
        assert list(await r.json()) == ids[1:3]
    async with http.post(f"{comfy.url}/history", json={"delete": [ids[0]]}) as r:
        assert r.status == 200 and await r.read() == b""
    assert await history(http, comfy, ids[0]) == {}
    async with http.post(f"{comfy.url}/history", json={"clear": True}) as r:
        assert r.status == 200
    async with http.get(f"{comfy.url}/history") as r:
        assert await r.json() == {}


# -- WebSocket routing -------------------------------------------------------------------------


async def test_a_reconnecting_socket_gets_status_then_the_running_node_and_the_rest(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    old = await connect(http, comfy)
    prompt_id = await queue(http, comfy, sleep_prompt(1.0, 10), client_id=CLIENT)
    await until_type(old, "progress")
    new = await http.ws_connect(comfy.ws_url(CLIENT))
    assert await receive(new) == {
        "type": "status",
        "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": CLIENT},
    }
    assert await receive(new) == {"type": "executing", "data": {"node": "2"}}
    msgs = await until_done(new, prompt_id)
    assert "execution_success" in types_of(msgs)
    late = await drain(old)
    assert "execution_success" not in types_of(late)
    await old.close()
    await new.close()


async def test_a_dropped_socket_reconnects_and_still_sees_the_prompt_finish(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, comfy)
    prompt_id = await queue(http, comfy, sleep_prompt(0.6, 6), client_id=CLIENT)
    await until_type(ws, "progress")
    assert comfy.drop_websockets() == 1
    closed = await ws.receive(timeout=5)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    again = await http.ws_connect(comfy.ws_url(CLIENT))
    assert (await receive(again))["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert await receive(again) == {"type": "executing", "data": {"node": "2"}}
    assert "execution_success" in types_of(await until_done(again, prompt_id))
    await again.close()


async def test_a_prompt_without_client_id_is_seen_only_as_status_and_progress_state(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    watcher = await connect(http, comfy, "watcher")
    prompt_id = await queue(http, comfy, sleep_prompt(0.2, 2))
    await wait_history(http, comfy, prompt_id)
    seen = await drain(watcher)
    assert set(types_of(seen)) == {"status", "progress_state", "progress"}
    assert all(m["data"]["prompt_id"] == prompt_id for m in seen if m["type"] != "status")
    await watcher.close()


async def test_previews_are_binary_type_1_for_legacy_clients_and_type_4_after_feature_flags(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    legacy = await connect(http, comfy)
    prompt_id = await queue(http, comfy, sleep_prompt(0.1, 2, preview=True), client_id=CLIENT)
    msgs = [m for m in await until_done(legacy, prompt_id) if m["type"] != "progress_state"]
    kinds = types_of(msgs)
    first = kinds.index("progress")
    assert kinds[first : first + 4] == ["progress", "binary", "progress", "binary"]
    frame = msgs[first + 1]["data"]
    assert struct.unpack(">II", frame[:8]) == (1, 1)
    with Image.open(io.BytesIO(frame[8:])) as img:
        assert img.format == "JPEG" and img.size == (64, 48)
    await legacy.close()

    modern = await http.ws_connect(comfy.ws_url("modern"))
    await modern.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    assert (await receive(modern))["type"] == "status"
    assert await receive(modern) == {
        "type": "feature_flags",
        "data": {"supports_preview_metadata": True, "max_upload_size": 104857600},
    }
    prompt_id = await queue(
        http, comfy, sleep_prompt(0.1, 2, color=9, preview=True), client_id="modern"
    )
    msgs = [m for m in await until_done(modern, prompt_id) if m["type"] != "progress_state"]
    kinds = types_of(msgs)
    first = kinds.index("binary")
    assert kinds[first : first + 4] == ["binary", "progress", "binary", "progress"]
    frame = msgs[first]["data"]
    kind, length = struct.unpack(">II", frame[:8])
    assert kind == 4
    meta = json.loads(frame[8 : 8 + length])
    assert meta == {
        "node_id": "2", "prompt_id": prompt_id, "display_node_id": "2",
        "parent_node_id": None, "real_node_id": "2", "image_type": "image/jpeg",
    }  # fmt: skip
    assert frame[8 + length : 8 + length + 2] == b"\xff\xd8"
    await modern.close()


async def test_origin_mismatch_is_refused_and_routes_answer_under_api(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{comfy.url}/queue", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403 and await r.read() == b""
    async with http.get(f"{comfy.url}/queue", headers={"Origin": comfy.url}) as r:
        assert r.status == 200
    async with http.post(
        f"{comfy.url}/api/prompt", json={"prompt": empty_to_save(1, prefix="api")}
    ) as r:
        assert r.status == 200
        prompt_id = (await r.json())["prompt_id"]
    await wait_history(http, comfy, prompt_id)
    async with http.get(f"{comfy.url}/api/history/{prompt_id}") as r:
        assert prompt_id in await r.json()


# -- the example workflows ---------------------------------------------------------------------


async def test_example_workflows_run_on_the_simulator(
    comfy: RunningComfySim, http: aiohttp.ClientSession
) -> None:
    await upload(http, comfy, "input.png", png_bytes())
    sleep = workflow("sleep")
    sleep["2"]["inputs"]["seconds"] = 0.05
    ws = await connect(http, comfy)
    for prompt in (workflow("invert"), workflow("txt2img"), sleep):
        prompt_id = await queue(http, comfy, prompt, client_id=CLIENT)
        msgs = await until_done(ws, prompt_id)
        assert "execution_success" in types_of(msgs), msgs
        outputs = (await history(http, comfy, prompt_id))["outputs"]
        assert len(await assert_outputs_match_disk(http, comfy, outputs)) == 1
    await ws.close()
