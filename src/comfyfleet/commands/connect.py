"""``comfyfleet agent connect``: the agent on a rented instance, dialling home.

The instance's onstart runs it (docs/agent-protocol.md) with only this environment:
``COMFYFLEET_URL`` (or the seeds' ``FCS_API_BASE_URL``), ``COMFYFLEET_TOKEN``,
``DM_INSTANCE_ID``, ``SERVER_TYPE`` and ``WORKSPACE``. It registers, fetches the
source tokens and Dropbox links into its own environment, writes the manifest the
control plane answered into the workspace, and runs the agent (provision, ComfyUI,
warm-up) reporting both to the console and to the control plane; at ``ready`` it
keeps ComfyUI supervised, with heartbeats, and runs the control plane's jobs on it
(``agent/worker.py``: ``COMFYFLEET_JOBS_PER_INSTANCE`` at once, default 1; an OnStart
instance runs its one job) until SIGTERM or SIGINT, which stop the jobs first.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
import yaml

from comfyfleet.agent.remote import AgentAuthError, Registration, RemoteReporter
from comfyfleet.agent.report import FanOut
from comfyfleet.clikit import console, err_console, friendly, run
from comfyfleet.clock import SystemClock
from comfyfleet.commands.agent import AfterReady, free_port_if_zero, run_and_supervise
from comfyfleet.envvars import env_value
from comfyfleet.errors import ConfigError

if TYPE_CHECKING:
    from comfyfleet.agent.comfy import ComfySupervisor
    from comfyfleet.agent.report import Reporter

__all__ = ["MANIFEST_NAME", "InstanceEnv", "connect", "read_instance_env"]

#: Where the manifest from the control plane is written in the workspace.
MANIFEST_NAME: Final = "comfyfleet-manifest.yaml"
#: The workspace folder that holds each running job's inputs and temporary files.
JOBS_DIR: Final = "comfyfleet-jobs"
DEFAULT_WORKSPACE: Final = "/workspace"


@dataclass(frozen=True)
class InstanceEnv:
    url: str
    token: str
    instance_id: int
    profile: str | None
    workspace: Path


def read_instance_env(env: Mapping[str, str] | None = None) -> InstanceEnv:
    """The instance's environment, checked; a ``ConfigError`` names what is missing."""
    url = env_value(env, "COMFYFLEET_URL", "FCS_API_BASE_URL")
    if url is None:
        raise ConfigError(
            "the control plane's URL is not set: the onstart sets COMFYFLEET_URL "
            "(e.g. https://HOST/api; FCS_API_BASE_URL is accepted too)"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError("expected an http(s):// URL ending in /api", source="COMFYFLEET_URL")
    token = env_value(env, "COMFYFLEET_TOKEN")
    if token is None:
        raise ConfigError("this instance's agent token is not set", source="COMFYFLEET_TOKEN")
    raw_id = env_value(env, "DM_INSTANCE_ID")
    if raw_id is None or not raw_id.isdigit():
        raise ConfigError(
            "expected the store's instance id (an integer)"
            if raw_id
            else "the store's instance id is not set",
            source="DM_INSTANCE_ID",
        )
    workspace = Path(env_value(env, "WORKSPACE") or DEFAULT_WORKSPACE).expanduser()
    return InstanceEnv(url, token, int(raw_id), env_value(env, "SERVER_TYPE"), workspace)


@friendly
def connect(
    comfy_command: Annotated[
        str | None,
        typer.Option(
            "--comfy-command",
            envvar="COMFY_COMMAND",
            help="How to start ComfyUI when the control plane does not say: as for 'agent run'.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option(
            "--port",
            envvar="COMFY_PORT",
            min=0,
            max=65535,
            help="ComfyUI's port on 127.0.0.1; 0 picks a free one (several agents on one host).",
        ),
    ] = 8188,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=64, help="Files downloaded at once.")
    ] = 4,
    exit_when_ready: Annotated[
        bool,
        typer.Option(
            "--exit-when-ready",
            help="Exit 0 at ready and leave ComfyUI running (heartbeats stop with the agent).",
        ),
    ] = False,
    jobs: Annotated[
        bool,
        typer.Option(
            "--jobs/--no-jobs",
            help="Run the control plane's jobs once ComfyUI is ready (--no-jobs: only "
            "provision, supervise and report).",
        ),
    ] = True,
) -> None:
    """Dial home: register with the control plane, provision, run ComfyUI, report, heartbeat.

    Reads COMFYFLEET_URL, COMFYFLEET_TOKEN, DM_INSTANCE_ID, SERVER_TYPE and
    WORKSPACE (the instance's onstart sets them). Exits 1 when the run fails or the
    control plane refuses the token, 2 when the environment is incomplete.
    """
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The console reporter prints every line; the agent's own log records would repeat them.
        logging.getLogger("comfyfleet.agent").setLevel(logging.CRITICAL)
    found = read_instance_env()
    code = run(
        _connect(
            found,
            comfy_command=comfy_command,
            port=port,
            concurrency=concurrency,
            exit_when_ready=exit_when_ready,
            jobs=jobs,
        )
    )
    if code:
        raise typer.Exit(code)


def _comfy_overrides(
    registration: Registration, comfy_command: str | None, port: int
) -> dict[str, Any]:
    spec = registration.comfy
    overrides: dict[str, Any] = {"port": free_port_if_zero(port)}
    command = spec.get("command") or comfy_command
    if command:
        overrides["command"] = command  # a string is split as a shell would
    if spec.get("attach_url"):
        overrides["attach_url"] = spec["attach_url"]
    if spec.get("args"):
        overrides["extra_args"] = tuple(str(arg) for arg in spec["args"])
    return overrides


async def _connect(
    found: InstanceEnv,
    *,
    comfy_command: str | None,
    port: int,
    concurrency: int,
    exit_when_ready: bool,
    jobs: bool = True,
) -> int:
    from comfyfleet.agent.provision import ProvisionOptions
    from comfyfleet.agent.run import CONFIG_INVALID, run_agent
    from comfyfleet.agent.sources import LINKS_ENV_VAR, decode_links_env
    from comfyfleet.agent.worker import jobs_per_instance
    from comfyfleet.commands.agent import ConsoleReporter
    from comfyfleet.manifest import load_manifest

    remote = RemoteReporter(found.url, found.token, found.instance_id, clock=SystemClock())
    await remote.start()
    try:
        try:
            registration = await remote.register(workspace=str(found.workspace))
            secrets = await remote.fetch_secrets()
        except AgentAuthError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            return 1
        os.environ.update(secrets)
        console.print(
            f"registered instance {found.instance_id} (profile {found.profile or '?'}) with "
            f"{found.url}; heartbeats every {registration.heartbeat_interval_s:g} s",
            highlight=False,
        )
        with ConsoleReporter(err_console, live=True, show_stage=True) as shown:
            reporter = FanOut(shown, remote)
            try:
                if registration.manifest is None:
                    raise ConfigError(
                        f"the control plane has no manifest for profile {found.profile or '?'}"
                    )
                path = await asyncio.to_thread(
                    _write_manifest, found.workspace, registration.manifest
                )
                manifest = load_manifest(path)
                encoded = os.environ.get(LINKS_ENV_VAR, "").strip()
                links = decode_links_env(encoded) if encoded else []
                slots = jobs_per_instance()
            except ConfigError as error:
                reporter.stage("failed", CONFIG_INVALID)
                reporter.log(f"AGENT FAILED ({CONFIG_INVALID}): {error}", "error")
                return 2
            return await run_and_supervise(
                run_agent(
                    manifest,
                    found.workspace,
                    reporter=reporter,
                    provision_options=ProvisionOptions(concurrency=concurrency, links=links),
                    comfy_options_overrides=_comfy_overrides(registration, comfy_command, port),
                ),
                exit_when_ready=exit_when_ready,
                after_ready=_job_runner(found, registration, slots, reporter) if jobs else None,
            )
    finally:
        await remote.aclose(flush_within_s=15.0)
        if remote.dropped_progress or remote.dropped_logs:
            err_console.print(
                f"[yellow]not sent to the control plane: {remote.dropped_progress} progress "
                f"events, {remote.dropped_logs} log lines[/]",
                highlight=False,
            )


def _job_runner(
    found: InstanceEnv, registration: Registration, slots: int, reporter: Reporter
) -> AfterReady:
    """The job worker, run beside supervision once ComfyUI is ready."""

    async def run_jobs(supervisor: ComfySupervisor, stop: asyncio.Event) -> None:
        from comfyfleet.agent.worker import JobsClient, JobWorker

        async with (
            JobsClient(found.url, found.token, found.instance_id) as client,
            supervisor.client() as comfy,
        ):
            worker = JobWorker(
                client,
                comfy,
                slots=slots,
                workdir=found.workspace / JOBS_DIR,
                reporter=reporter,
                onstart_job_id=registration.onstart_job_id,
            )
            await worker.run(stop)

    return run_jobs


def _write_manifest(workspace: Path, manifest: dict[str, Any]) -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    path = workspace / MANIFEST_NAME
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path
