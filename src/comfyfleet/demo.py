"""``comfyfleet demo``: the whole flow on the embedded defaults, no account, no network.

It starts the Vast.ai simulator on loopback, then drives it with the same
client and ranking code that talk to the real marketplace: rank offers for the
example profile, rent the best, follow it to ``running``, read its logs,
destroy it and show what it cost. Then it does what the agent does on that
instance: provision a small workspace from a manifest (models from the
file-server simulator's Hugging Face and Civitai, through the production
resolvers and download engine) and start ComfyUI (the ComfyUI simulator, as a
real process) until it is ready, then stop it. Later stages (pool, jobs) join
this same demo as they land.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from comfyfleet.agent.comfy import ComfyClient
from comfyfleet.agent.report import Level, Progress, Stage
from comfyfleet.agent.run import run_agent
from comfyfleet.agent.sources import SourceResolver, SourceSettings
from comfyfleet.clock import ScaledClock
from comfyfleet.errors import ComfyfleetError
from comfyfleet.manifest import load_manifest
from comfyfleet.market import create_request_for, new_label, rank_for
from comfyfleet.offers import usual_pick
from comfyfleet.profiles import load_fleet
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.files import FileServer, RunningFileServer
from comfyfleet.sim.vast import RunningSim, SimConfig
from comfyfleet.views import instances_table, offers_table, ranked_row

DEMO_KEY = "demo-key"
# Simulated seconds per real second: a few minutes of boot pass in seconds.
DEMO_CLOCK_SPEED = 60.0
READY_TIMEOUT_S = 60.0
MiB = 1 << 20
DEMO_CIVITAI_TOKEN = "demo-civitai-token"
# ComfyUI's readiness deadline in the demo: the simulator answers within seconds.
COMFY_READY_TIMEOUT_S = 60.0


async def run_demo(console: Console, *, config: Path, profile_name: str, seed: int) -> None:
    profile = load_fleet(config).get(profile_name)
    sim_config = SimConfig(seed=seed, offers=600, api_key=DEMO_KEY, credit=50.0)
    with RunningSim(sim_config, clock=ScaledClock(DEMO_CLOCK_SPEED)) as sim:
        console.rule("[bold]comfyfleet demo")
        console.print(f"Vast.ai simulator listening on {sim.url} (clock x{DEMO_CLOCK_SPEED:g})")
        async with VastClient(DEMO_KEY, sim.url) as client:
            user = await client.current_user()
            credit_before = user.credit
            console.print(f"Account {user.id}: credit ${credit_before:.2f}\n")

            console.rule(f"1. Rank offers for profile '{profile_name}' from {config}")
            ranking = await rank_for(client, profile, explain=True)
            rows = [ranked_row(i + 1, r) for i, r in enumerate(ranking.accepted[:8])]
            console.print(
                offers_table(
                    rows,
                    f"{len(ranking.accepted)} offers pass, {len(ranking.rejected)} rejected",
                )
            )
            if not ranking.accepted:
                raise ComfyfleetError("the simulator's catalog has no offer for this profile")
            best = ranking.accepted[0]
            naive = usual_pick([r.offer for r in ranking.accepted], profile)
            if naive is not None and naive.offer.id != best.offer.id:
                console.print(
                    f"The cheapest $/h offer ({naive.offer.id}, ${naive.offer.dph_total:.3f}/h, "
                    f"{naive.offer.inet_down:.0f} Mb/s) would take "
                    f"{naive.estimate.minutes_to_ready:.0f} min and "
                    f"${naive.estimate.dollars_to_ready:.3f} to get ready; the top pick takes "
                    f"{best.estimate.minutes_to_ready:.0f} min and "
                    f"${best.estimate.dollars_to_ready:.3f}."
                )
            for rejection in ranking.rejected[:3]:
                console.print(
                    f"  rejected {rejection.offer.id} ({rejection.offer.gpu_name}): "
                    + "; ".join(rejection.reasons)
                )

            console.rule(f"2. Rent offer {best.offer.id}")
            label = new_label(profile_name)
            instance_id = await client.create_instance(
                best.offer.id, create_request_for(profile, label)
            )
            console.print(f"Instance {instance_id} created with label {label}")

            console.rule("3. Follow it until it runs")
            deadline = time.monotonic() + READY_TIMEOUT_S
            last = None
            with console.status("waiting for the instance") as status:
                while True:
                    inst = await client.get_instance(instance_id)
                    state = (inst.actual_status, inst.status_msg)
                    if state != last:
                        console.print(
                            f"  status {inst.actual_status or '(none yet)'}: "
                            f"{inst.status_msg or ''}"
                        )
                        last = state
                    status.update(f"instance {instance_id}: {inst.actual_status or 'requested'}")
                    if inst.actual_status == "running":
                        break
                    if time.monotonic() > deadline:
                        await client.destroy_instance(instance_id)
                        raise ComfyfleetError(
                            f"instance {instance_id} did not reach running in time; destroyed it"
                        )
                    await asyncio.sleep(0.25)
            console.print(instances_table([inst]))

            console.rule("4. Its logs")
            text = await client.instance_logs(instance_id, tail=20)
            console.print(text.rstrip() or "(empty)", highlight=False, markup=False)

            console.rule("5. Destroy it")
            await client.destroy_instance(instance_id)
            remaining = [i for i in await client.list_instances() if i.id == instance_id]
            console.print(
                f"Destroyed instance {instance_id}; still listed: {'yes' if remaining else 'no'}"
            )
            user = await client.current_user()
            console.print(
                f"Credit ${user.credit:.4f} (spent ${credit_before - user.credit:.4f} "
                "of simulated time)"
            )
    await provision_and_start(console)
    console.rule("[bold green]demo finished")


# --------------------------------------------------------------------------- the agent

# A text-to-image workflow (ComfyUI's API format) that loads the three models.
TXT2IMG: dict[str, Any] = {
    "1": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"},
    },
    "2": {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": "add-detail-xl.safetensors",
            "strength_model": 0.7,
            "strength_clip": 0.7,
        },
    },
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["2", 1]}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["2", 0],
            "seed": 42,
            "steps": 4,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    },
    "7": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "demo"}},
}

DEMO_MANIFEST = """\
models:
  - source: hf://stabilityai/sdxl-turbo/sd_xl_turbo_1.0_fp16.safetensors
    dest: checkpoints
  - source: hf://madebyollin/sdxl-vae-fp16-fix/sdxl_vae.safetensors
    dest: vae
  - source: civitai://135867
    dest: loras
    critical: false
workflows:
  - file: txt2img.json
warmup_workflow: txt2img.json
"""


class _StageReporter:
    """The agent's stages with the time since boot, and its log lines, dimmed."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        style = "bold red" if stage == "failed" else "bold cyan"
        at = time.monotonic() - self.t0
        suffix = f": {reason}" if reason else ""
        self.console.print(f"[{style}]{stage:<12}[/] +{at:4.1f} s{suffix}", highlight=False)

    def progress(self, progress: Progress) -> None:
        pass

    def log(self, line: str, level: Level = "info") -> None:
        style = {"warning": "yellow", "error": "red"}.get(level, "dim")
        self.console.print(f"  {line}", style=style, markup=False, highlight=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def provision_and_start(console: Console) -> None:
    """Provision a tiny workspace and bring ComfyUI (the simulator) up, then stop it."""
    console.rule("6. Provision a workspace and start ComfyUI")
    with (
        RunningFileServer(FileServer()) as files,
        tempfile.TemporaryDirectory(prefix="comfyfleet-demo-") as tmp,
    ):
        srv = files.server
        srv.civitai_tokens.add(DEMO_CIVITAI_TOKEN)
        srv.add_hf_file("stabilityai/sdxl-turbo", "sd_xl_turbo_1.0_fp16.safetensors", 3 * MiB)
        srv.add_hf_file("madebyollin/sdxl-vae-fp16-fix", "sdxl_vae.safetensors", MiB)
        srv.add_civitai_file(135867, "add-detail-xl.safetensors", MiB // 2)
        root = Path(tmp)
        (root / "txt2img.json").write_text(json.dumps(TXT2IMG), encoding="utf-8")
        (root / "manifest.yaml").write_text(DEMO_MANIFEST, encoding="utf-8")
        manifest = load_manifest(root / "manifest.yaml")
        workspace = root / "workspace"
        console.print(
            f"File-server simulator on {files.url} stands in for Hugging Face and Civitai; "
            f"the manifest:",
            highlight=False,
        )
        console.print(DEMO_MANIFEST.rstrip(), markup=False, highlight=False)
        settings = SourceSettings.from_env({**files.env(), "CIVITAI_TOKEN": DEMO_CIVITAI_TOKEN})
        async with SourceResolver(settings) as resolver:
            result = await run_agent(
                manifest,
                workspace,
                reporter=_StageReporter(console),
                resolver=resolver,
                comfy_options_overrides={
                    # The ComfyUI simulator stands in for ComfyUI's main.py.
                    "command": (sys.executable, "-m", "comfyfleet.sim.comfy"),
                    "port": _free_port(),
                    "poll_interval_s": 0.2,
                    "ready_timeout_s": COMFY_READY_TIMEOUT_S,
                    "stop_grace_s": 5.0,
                },
            )
        supervisor = result.supervisor
        try:
            if not result.ok or supervisor is None:
                raise ComfyfleetError(f"the agent failed ({result.reason}): {result.message}")
            pid = supervisor.pid
            console.print(
                f"[bold green]READY[/] ComfyUI at {result.url} (pid {pid}), "
                f"{result.elapsed_s:.1f} s after boot",
                highlight=False,
            )
            async with ComfyClient(str(result.url)) as client:
                info = await client.object_info("CheckpointLoaderSimple")
            listed = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
            console.print(f"Its checkpoint loader lists: {', '.join(listed)}", highlight=False)
        finally:
            if supervisor is not None:
                await supervisor.stop()  # its reporter says "stopped ComfyUI (pid N, ...)"
