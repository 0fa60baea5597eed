"""``comfyfleet demo``: the whole flow on the embedded defaults, no account, no network.

Everything runs on this machine, through the production code paths:

1. the Vast.ai simulator's marketplace, ranked for the example profile by the cost
   model (the production client and ranking);
2. the control plane as ``comfyfleet serve`` builds it (store, admin API, agent
   endpoints, reconcile loop), its pool set to keep one instance ready;
3. the simulator runs each rented instance's onstart as a real process: the real
   agent dials home, downloads the manifest's models from the file-server
   simulator (standing in for Hugging Face and Civitai) and starts the ComfyUI
   simulator, followed live as ``comfyfleet up --wait`` follows it;
4. a forced failure: the first host's disk fills up extracting the image (seed
   002), so that instance is destroyed, its machine blocklisted and a replacement
   rented, once the destroy is confirmed;
5. a prewarm through the admin API (``POST /api/admin/pool/prewarm``);
6. a job through the whole system: a user key made as ``comfyfleet keys create`` makes
   it, then ``comfyfleet run`` itself (a subprocess, the user's own command) submits a
   text-to-image workflow with a prompt and ``--set`` overrides, follows its queue
   position and sampler steps, and saves the image in ``./demo-output/``, where the demo
   checks its pixel size and sha256 against what the control plane announced;
7. everything destroyed, the dollars spent, and the demo's own wall time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape

from comfyfleet.clock import ScaledClock, SystemClock
from comfyfleet.envvars import environ_set
from comfyfleet.errors import ComfyfleetError
from comfyfleet.market import rank_for
from comfyfleet.offers import usual_pick
from comfyfleet.profiles import Fleet, Profile, load_fleet
from comfyfleet.providers.process import free_loopback_port
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.files import FileServer, RunningFileServer
from comfyfleet.sim.vast import RunningSim, SimConfig
from comfyfleet.views import offers_table, ranked_row

if TYPE_CHECKING:
    from comfyfleet.store.db import Store

DEMO_KEY = "demo-key"
DEMO_ADMIN_KEY = "demo-admin-key-" + "0" * 24
# Simulated seconds per real second: a few minutes of boot pass in seconds.
DEMO_CLOCK_SPEED = 60.0
READY_TIMEOUT_S = 60.0
MiB = 1 << 20
DEMO_CIVITAI_TOKEN = "demo-civitai-token"
#: Where the job's image is saved: relative to the folder the demo runs in.
DEMO_OUTPUT = Path("demo-output")
DEMO_PROMPT = "a lighthouse on a cliff at dusk, warm light in its windows"
# Real seconds per sampling step of the ComfyUI simulator's stand-in KSampler, so that
# the job's steps can be seen going by (the warm-up's 4 steps take 0.4 s).
SAMPLER_STEP_S = 0.1
JOB_TIMEOUT_S = 60.0


async def run_demo(console: Console, *, config: Path, profile_name: str, seed: int) -> None:
    started = time.monotonic()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log keeps the tables on one line each
    chosen = load_fleet(config).get(profile_name)
    sim_config = SimConfig(seed=seed, offers=600, api_key=DEMO_KEY, credit=50.0)
    with (
        tempfile.TemporaryDirectory(prefix="comfyfleet-demo-") as tmp,
        RunningFileServer(FileServer()) as files,
        environ_set({**files.env(), "CIVITAI_TOKEN": DEMO_CIVITAI_TOKEN}),
        _quiet("comfyfleet.pool", "comfyfleet.api"),
    ):
        root = Path(tmp)
        sim_config.run_onstart = True
        sim_config.workspace_root = root / "instances"
        sim_config.host_env = {**files.env(), "COMFY_PORT": "0"}
        with RunningSim(sim_config, clock=ScaledClock(DEMO_CLOCK_SPEED)) as sim:
            console.rule("[bold]comfyfleet demo")
            console.print(
                f"Vast.ai simulator on {sim.url} (clock x{DEMO_CLOCK_SPEED:g}); file-server "
                f"simulator on {files.url} for Hugging Face and Civitai",
                highlight=False,
            )
            async with VastClient(DEMO_KEY, sim.url) as client:
                credit_before = (await client.current_user()).credit
                console.print(f"Account credit ${credit_before:.2f}\n")
                await _rank(console, client, chosen, profile_name, config)
            profile = _demo_profile(chosen, _workspace(files, root))
            await _pool(console, sim, profile, root)
            async with VastClient(DEMO_KEY, sim.url) as client:
                credit_after = (await client.current_user()).credit
                listed = await client.list_instances()
    console.rule("8. What it cost")
    console.print(
        f"Credit ${credit_before:.2f} → ${credit_after:.4f}: "
        f"[bold]${credit_before - credit_after:.4f}[/] spent on simulated GPU time; "
        f"{len(listed)} instance(s) still rented.",
        highlight=False,
    )
    console.rule(f"[bold green]demo finished in {time.monotonic() - started:.1f} s")


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The control plane's own log lines off for the block: the demo shows the same facts."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def _rank(
    console: Console, client: VastClient, profile: Profile, name: str, config: Path
) -> None:
    console.rule(f"1. Rank offers for profile '{name}' from {config}")
    ranking = await rank_for(client, profile, explain=True)
    rows = [ranked_row(i + 1, r) for i, r in enumerate(ranking.accepted[:8])]
    console.print(
        offers_table(rows, f"{len(ranking.accepted)} offers pass, {len(ranking.rejected)} rejected")
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


def _workspace(files: RunningFileServer, root: Path) -> Path:
    """The models on the file server, and the manifest (with its workflow) that names them."""
    srv = files.server
    srv.civitai_tokens.add(DEMO_CIVITAI_TOKEN)
    srv.add_hf_file("stabilityai/sdxl-turbo", "sd_xl_turbo_1.0_fp16.safetensors", 24 * MiB)
    srv.add_hf_file("madebyollin/sdxl-vae-fp16-fix", "sdxl_vae.safetensors", 4 * MiB)
    srv.add_civitai_file(135867, "add-detail-xl.safetensors", 2 * MiB)
    (root / "txt2img.json").write_text(json.dumps(TXT2IMG), encoding="utf-8")
    path = root / "manifest.yaml"
    path.write_text(DEMO_MANIFEST, encoding="utf-8")
    return path


def _demo_profile(profile: Profile, manifest: Path) -> Profile:
    """The example profile, with the demo's manifest, the ComfyUI simulator for ComfyUI
    (its sampler taking ``SAMPLER_STEP_S`` a step), and a pool of one ready instance (two
    at most)."""
    return profile.model_copy(
        update={
            "manifest": str(manifest),
            "manifest_gb": None,
            "manifest_bytes": None,
            "comfy_command": [
                sys.executable,
                "-m",
                "comfyfleet.sim.comfy",
                "--step-seconds",
                str(SAMPLER_STEP_S),
            ],
            "pool": profile.pool.model_copy(
                update={"min_ready": 1, "max_instances": 2, "max_hourly_spend": None}
            ),
        }
    )


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

# The job runs the workflow the instance was warmed with (``TXT2IMG``, as ComfyUI's
# "Export (API)" writes it), given what ``comfyfleet run`` is given besides the workflow:
# a prompt, more steps, and a 768x512 image under a prefix of its own.
JOB_ARGS: tuple[str, ...] = (
    "--prompt",
    DEMO_PROMPT,
    "--set",
    "KSampler.steps=20",
    "--set",
    "EmptyLatentImage.width=768",
    "--set",
    "EmptyLatentImage.height=512",
    "--set",
    "SaveImage.filename_prefix=comfyfleet-demo",
)


# --------------------------------------------------------------------------- the pool


async def _pool(console: Console, sim: RunningSim, profile: Profile, root: Path) -> None:
    from comfyfleet.api.server import RunningServer
    from comfyfleet.api.settings import ApiSettings
    from comfyfleet.commands.fleet import display_for, follow, pool_table
    from comfyfleet.control_client import ControlClient
    from comfyfleet.controlplane import build_control_plane
    from comfyfleet.pool.policy import DEFAULT_POLICY_SETTINGS
    from comfyfleet.store.blocklist import blocked_machine_ids
    from comfyfleet.store.db import Store
    from comfyfleet.store.instances import audit_trail

    name = profile.name  # the profile chosen with --profile
    port = free_loopback_port()
    store = Store.open(f"sqlite:///{root / 'comfyfleet.db'}")
    settings = ApiSettings(
        admin_api_key=SecretStr(DEMO_ADMIN_KEY),
        civitai_token=SecretStr(DEMO_CIVITAI_TOKEN),
        heartbeat_interval_s=2.0,
        data_dir=root / "data",
    )
    # The first host's disk fills up while it extracts the image (seed 002).
    sim.sim.set_faults({"next_instances": ["no_space"]})
    plane = await build_control_plane(
        store,
        fleet=Fleet(profiles={name: profile}),
        control_url=f"http://127.0.0.1:{port}/api",
        clock=SystemClock(),
        api_settings=settings,
        reconciler={
            "fleet_id": "demo",
            "interval_s": 0.5,
            "policy": DEFAULT_POLICY_SETTINGS,
        },
        providers=lambda _name: VastClient(DEMO_KEY, sim.url),
    )
    assert plane.pool is not None
    size = plane.profiles[name].download_bytes
    try:
        with RunningServer(plane.app, port=port) as server:
            console.rule("2. The control plane keeps one instance ready")
            console.print(
                f"comfyfleet serve on {server.url}: pool '{name}' min_ready 1, "
                f"max_instances 2; its manifest downloads {size / 1e6:.1f} MB (from "
                "`manifest check`: offers are ranked with it).",
                highlight=False,
            )
            async with ControlClient(server.url, admin_key=DEMO_ADMIN_KEY) as control:
                first = await _first_rental(control)
                console.rule(f"3. Instance {first}: a forced failure, replaced")
                await _follow(console, control, first, follow, display_for)
                console.print(f"Its audit trail (`comfyfleet audit --instance {first}`):")
                for row in store.run_sync(lambda s: audit_trail(s, first)):
                    reason = row.reason or ""
                    console.print(
                        f"  {row.from_state or '·'} → {row.to_state}: "
                        + (reason if len(reason) <= 110 else reason[:109] + "…"),
                        style="dim",
                        highlight=False,
                        markup=False,
                    )
                blocked = store.run_sync(
                    lambda s: blocked_machine_ids(s, time.time(), provider="vast")
                )
                console.print(
                    f"Machines on the blocklist for 24 h: {sorted(blocked)}; offer searches "
                    "leave them out.",
                    highlight=False,
                )
                replacement = await _next_rental(control, after=first)
                console.rule(f"4. Instance {replacement}: rented in its place, followed to READY")
                await _follow(console, control, replacement, follow, display_for)

                console.rule("5. A prewarm through the admin API")
                (extra,) = await control.prewarm(name, 1)
                console.print(
                    f"POST /api/admin/pool/prewarm {{'profile': '{name}', 'count': 1}} → "
                    f"instance {extra}",
                    highlight=False,
                )
                await _follow(console, control, extra, follow, display_for)
                view = await control.pool(include_ended=True)
                console.print(pool_table(view["instances"]))

                console.rule("6. A job through the whole system")
                await _job(console, store, server.url)

                console.rule("7. Everything destroyed")
                plane.pool.update_profiles(
                    {
                        name: profile.model_copy(
                            update={"pool": profile.pool.model_copy(update={"min_ready": 0})}
                        )
                    }
                )
                console.print(
                    "fleet file edited to min_ready 0 and reloaded (what `kill -HUP` on "
                    "`comfyfleet serve` does), then each instance terminated:",
                    highlight=False,
                )
                live = [i["id"] for i in (await control.pool())["instances"]]
                for instance_id in live:
                    await control.terminate(instance_id, "demo over")
                await _all_destroyed(control, live)
                view = await control.pool(include_ended=True)
                console.print(pool_table(view["instances"]))
                spent = sum(float(i.get("cost_so_far") or 0.0) for i in view["instances"])
                console.print(
                    f"The control plane's estimate: ${spent:.4f} for {len(view['instances'])} "
                    "rentals over real seconds (dph_total x age; the simulator bills on its own "
                    f"clock, x{DEMO_CLOCK_SPEED:g}).",
                    highlight=False,
                )
    finally:
        store.close()


async def _first_rental(control: Any) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        instances = (await control.pool(include_ended=True))["instances"]
        if instances:
            return int(instances[0]["id"])
        await asyncio.sleep(0.1)
    raise ComfyfleetError("the pool rented nothing")


async def _next_rental(control: Any, *, after: int) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ids = [int(i["id"]) for i in (await control.pool())["instances"] if i["id"] > after]
        if ids:
            return ids[0]
        await asyncio.sleep(0.1)
    raise ComfyfleetError("the pool did not replace the failed instance")


async def _follow(
    console: Console, control: Any, instance_id: int, follow: Any, display_for: Any
) -> None:
    display = display_for(console, instance_id)
    try:
        verdict = await follow(control, instance_id, display, timeout_s=READY_TIMEOUT_S)
    finally:
        display.close()
    style = "bold green" if verdict.code == 0 else "bold red"
    console.print(f"[{style}]{verdict.message}[/]", highlight=False)


async def _all_destroyed(control: Any, ids: list[int]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        states = {
            int(i["id"]): i["state"] for i in (await control.pool(include_ended=True))["instances"]
        }
        if all(states.get(i) in ("destroyed", "failed") for i in ids):
            return
        await asyncio.sleep(0.2)
    raise ComfyfleetError("the provider did not confirm every destroy in time")


# --------------------------------------------------------------------------- the job


async def _job(console: Console, store: Store, server_url: str) -> None:
    """A user's key, then ``comfyfleet run`` as the user types it; the saved image checked."""
    from sqlalchemy.orm import Session

    from comfyfleet.control_client import ControlClient
    from comfyfleet.store.apikeys import create_key
    from comfyfleet.store.jobs import job_trail, jobs_for_key

    def make_key(session: Session) -> tuple[int, str, str]:
        row, key = create_key(session, "demo", now=time.time())
        return row.id, row.prefix, key

    key_id, prefix, key = store.run_sync(make_key)
    console.print(
        f"A user key, made as `comfyfleet keys create demo` makes it: API key {key_id}, "
        f"{prefix}… (shown once; the store keeps only its hash). The user's own command "
        "takes it from COMFYFLEET_API_KEY:",
        highlight=False,
        soft_wrap=True,
    )
    workflow = DEMO_OUTPUT / "txt2img_api.json"
    await asyncio.to_thread(_write_workflow, workflow)
    args = ["run", str(workflow), *JOB_ARGS, "--out", str(DEMO_OUTPUT)]
    console.print(
        "$ " + shlex.join(["comfyfleet", *args]),
        style="bold",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    code = await _run_command(args, {"COMFYFLEET_SERVER": server_url, "COMFYFLEET_API_KEY": key})
    if code != 0:
        raise ComfyfleetError(f"`comfyfleet run` exited with status {code}")

    (job_id,) = store.run_sync(lambda s: [row.id for row in jobs_for_key(s, key_id, limit=1)])
    async with ControlClient(server_url, admin_key=None, api_key=key) as user:
        view = await user.job(job_id)
    moves = store.run_sync(lambda s: [row.to_state.value for row in job_trail(s, job_id)])
    timing = view.get("timing") or {}
    console.print(
        f"GET /api/jobs/{job_id} → [bold]{view['state']}[/]: attempt {view['attempts']} of "
        f"{view['max_attempts']} on instance {view['instance_id']}, queued "
        f"{timing.get('queued_s') or 0:.1f} s, ran {timing.get('running_s') or 0:.1f} s, "
        f"${view.get('cost') or 0:.4f}; its trail: {' → '.join(moves)}",
        highlight=False,
        soft_wrap=True,
    )
    if view["state"] != "succeeded" or not view["outputs"]:
        raise ComfyfleetError(f"job {job_id} did not end with an image: {view.get('error')}")
    for output in view["outputs"]:
        path = DEMO_OUTPUT / str(output["name"])
        kind, (width, height), size, digest = await asyncio.to_thread(_image_facts, path)
        if digest != output["sha256"]:
            raise ComfyfleetError(
                f"{path} is not the file job {job_id} made: its sha256 is {digest}, the "
                f"control plane announced {output['sha256']}"
            )
        console.print(
            f"[bold green]Saved {escape(str(path))}[/]: {kind}, {width}x{height} pixels, "
            f"{size:,} bytes, sha256 {digest} (the sha256 the control plane announced)",
            highlight=False,
            soft_wrap=True,
        )


def _write_workflow(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TXT2IMG, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise ComfyfleetError(
            f"cannot write {path}: {error.strerror or error}; run the demo in a folder you "
            "can write to (it saves the job's image in ./demo-output)"
        ) from error


def _comfyfleet() -> list[str]:
    """The ``comfyfleet`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("comfyfleet")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from comfyfleet.cli import main; main()"]


async def _run_command(args: list[str], env: dict[str, str]) -> int:
    """``comfyfleet ARGS`` on the demo's own terminal (or log); its exit status. Past
    ``JOB_TIMEOUT_S`` it gets a Ctrl-C, which cancels its job."""
    sys.stdout.flush()
    process = await asyncio.create_subprocess_exec(*_comfyfleet(), *args, env={**os.environ, **env})
    try:
        return await asyncio.wait_for(process.wait(), JOB_TIMEOUT_S)
    except TimeoutError:
        raise ComfyfleetError(
            f"`comfyfleet {args[0]}` did not finish in {JOB_TIMEOUT_S:g} s"
        ) from None
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()


def _image_facts(path: Path) -> tuple[str, tuple[int, int], int, str]:
    """The image's format, pixel size, bytes and sha256, as read back from the disk."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(path) as image:
        return str(image.format), image.size, len(data), hashlib.sha256(data).hexdigest()
