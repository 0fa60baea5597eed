"""``comfyfleet agent``: what runs on the instance (provisioning, ComfyUI supervision)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.progress import BarColumn, DownloadColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from comfyfleet.agent.report import Level, Progress, Stage
from comfyfleet.clikit import console, err_console, friendly, run
from comfyfleet.commands.manifest import human_bytes
from comfyfleet.errors import ConfigError

if TYPE_CHECKING:
    from comfyfleet.agent.comfy import ComfySupervisor
    from comfyfleet.agent.run import AgentResult
    from comfyfleet.agent.sources import DropboxLink

app = typer.Typer(
    help="The agent that provisions a workspace and runs ComfyUI.", no_args_is_help=True
)

_LEVEL_STYLE: dict[str, str] = {"info": "", "warning": "yellow", "error": "red"}


class _LiveView(RichProgress):
    """Progress bars under a header line (the agent's stage), redrawn by Rich's refresh thread."""

    def __init__(self, *columns: Any, header: Callable[[], RenderableType], **kw: Any) -> None:
        self._header = header  # before Progress's own __init__, which renders once
        super().__init__(*columns, **kw)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self._header()
        if self.tasks:
            yield self.make_tasks_table(self.tasks)


def free_port_if_zero(port: int) -> int:
    """``port``, or a port free on 127.0.0.1 now when it is 0 (``COMFY_PORT=0``: agents of
    several instances on one machine, as the simulator and the local provider run them)."""
    from comfyfleet.providers.process import free_loopback_port

    return port or free_loopback_port()


class ConsoleReporter:
    """The agent's ``Reporter`` in a terminal: stage and log lines, live progress bars.

    Calls come from the download engine's progress thread; Rich's progress is
    thread-safe, and nothing here waits on the download. Without a terminal (a
    pipe, a log file) only the lines are printed. ``show_stage`` adds a live line
    above the bars: the current stage, for how long, and a note (ComfyUI's URL at
    ``ready``); the download bars go when the downloads are over.
    """

    def __init__(self, out: Console, *, live: bool, show_stage: bool = False) -> None:
        self.out = out
        self.show_stage = show_stage
        self._lock = threading.Lock()
        self._bars: RichProgress | None = None
        self._overall: TaskID | None = None
        self._files: dict[str, TaskID] = {}
        self._stage: str | None = None
        self._stage_since = time.monotonic()
        self._note = ""
        if live and out.is_terminal:
            # Speed and time left come from the provisioner's own window: the engine's
            # events arrive in bursts, which Rich's per-update estimate would misread.
            columns = (
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[speed]}", markup=False),
            )
            if show_stage:
                # stdout goes above the live view only when it is this terminal too: a piped
                # stdout (ComfyUI's URL for a script) must not land on stderr.
                self._bars = _LiveView(
                    *columns,
                    header=self.header,
                    console=out,
                    transient=True,
                    redirect_stdout=sys.stdout.isatty(),
                )
            else:
                self._bars = RichProgress(*columns, console=out, transient=True)

    def __enter__(self) -> ConsoleReporter:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def note(self, text: str) -> None:
        """A remark shown after the stage in the live line (ComfyUI's URL at ``ready``)."""
        self._note = text

    def header(self) -> RenderableType:
        """The live line: ``stage downloading (0:12)``, with a spinner until ``ready``."""
        stage = self._stage or "starting"
        elapsed = int(time.monotonic() - self._stage_since)
        text = Text.assemble(
            ("stage ", "bold"),
            (stage, "bold red" if stage == "failed" else "bold cyan"),
            f" ({elapsed // 60}:{elapsed % 60:02d})",
        )
        if self._note:
            text.append(f"  {self._note}")
        if stage in ("ready", "failed"):
            return Text.assemble(("✓ " if stage == "ready" else "✗ ", "bold"), text)
        return Spinner("dots", text=text)

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        style = "bold red" if stage == "failed" else "bold cyan"
        text = f"[{style}]stage {stage}[/]"
        self.out.print(text + (f": {reason}" if reason else ""), highlight=False)
        self._stage, self._stage_since, self._note = stage, time.monotonic(), ""
        if self.show_stage and stage != "downloading":
            self._clear_bars()

    def _clear_bars(self) -> None:
        bars = self._bars
        if bars is None:
            return
        with self._lock:
            for task in [*self._files.values(), self._overall]:
                if task is not None:
                    bars.remove_task(task)
            self._files.clear()
            self._overall = None

    def log(self, line: str, level: Level = "info") -> None:
        self.out.print(line, style=_LEVEL_STYLE.get(level) or None, markup=False, highlight=False)

    def progress(self, progress: Progress) -> None:
        bars = self._bars
        if bars is None or (self.show_stage and self._stage != "downloading"):
            return
        with self._lock:
            if self._overall is None:
                self._overall = bars.add_task("all files", total=progress.total or None, speed="")
            bars.update(
                self._overall,
                completed=progress.done,
                total=progress.total or None,
                speed=_speed(progress),
            )
            name = progress.file
            if name is None:
                return
            task = self._files.get(name)
            finished = progress.file_total is not None and progress.file_done >= progress.file_total
            if task is None:
                if finished:
                    return
                task = self._files[name] = bars.add_task(
                    _short(name), total=progress.file_total, speed=""
                )
            bars.update(task, completed=progress.file_done, total=progress.file_total)
            if finished:
                bars.remove_task(task)
                del self._files[name]


def _links(path: Path | None) -> list[DropboxLink]:
    """The Dropbox workspace links: ``--dropbox-links FILE``, else the environment's."""
    # The sources (and aiohttp under them) load with the command, not with every CLI call.
    from comfyfleet.agent.sources import LINKS_ENV_VAR, decode_links_env, parse_links_file

    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the links file: {exc.strerror}", source=str(path)
            ) from None
        return parse_links_file(text, source=str(path))
    encoded = os.environ.get(LINKS_ENV_VAR, "").strip()
    return decode_links_env(encoded) if encoded else []


def _speed(progress: Progress) -> str:
    rate = progress.bytes_per_s
    if rate <= 0:
        return ""
    text = f"{rate / 1e6:.1f} MB/s"
    if progress.total:
        left = max(0.0, (progress.total - progress.done) / rate)
        text += f", {int(left) // 60}:{int(left) % 60:02d} left"
    return text


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


@app.command()
@friendly
def provision(
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="The workspace manifest (YAML).")
    ],
    workspace: Annotated[
        Path,
        typer.Option(
            "--workspace",
            "-w",
            help="The workspace folder (ComfyUI in its ComfyUI/ unless the manifest says "
            "otherwise; provision_errors.log at its top).",
        ),
    ],
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--no-strict",
            help="Fail (exit 1) when a critical item is missing. --no-strict only reports.",
        ),
    ] = True,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=64, help="Files downloaded at once.")
    ] = 4,
    dropbox_links: Annotated[
        Path | None,
        typer.Option(
            "--dropbox-links",
            help="A links file (comfyfleet dropbox links): a Dropbox workspace folder mapped "
            "onto the workspace; a link to a model the manifest names becomes its last "
            "source. Default: $PROVISION_DROPBOX_LINKS_B64 when set.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON (no live progress).")
    ] = False,
) -> None:
    """Provision a workspace: custom nodes, pip packages, models, then validation.

    Models download several at once, each over several connections, resumable and
    verified; a model with several sources falls back to the next when one fails
    for good. Validation reads every file back (size, sha256) and every node's
    commit. Failures are logged to WORKSPACE/provision_errors.log. Exits 1 naming
    each missing critical item (unless --no-strict), 2 for an invalid manifest.
    """
    from comfyfleet.agent.provision import ProvisionOptions
    from comfyfleet.agent.provision import provision as run_provision
    from comfyfleet.manifest import load_manifest

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The reporter prints every line; the agent's own log records would repeat them.
        logging.getLogger("comfyfleet.agent").setLevel(logging.CRITICAL)
    loaded = load_manifest(manifest)
    links = _links(dropbox_links)
    options = ProvisionOptions(strict=strict, concurrency=concurrency, links=links)
    with ConsoleReporter(err_console, live=not as_json) as reporter:
        summary = run(run_provision(loaded, workspace, reporter=reporter, options=options))
    if as_json:
        console.print_json(json.dumps(summary.to_json()))
    else:
        table = Table(title=f"provision of {workspace}", title_justify="left")
        table.add_column("")
        table.add_column("kind")
        table.add_column("item", overflow="fold")
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True, max_width=48, overflow="ellipsis")
        for item in summary.items:
            mark = "[green]✓[/]" if item.ok else ("[red]✗[/]" if item.critical else "[yellow]✗[/]")
            status = item.status if item.ok else f"{item.status}: {item.reason}"
            table.add_row(
                mark, item.kind, item.name, human_bytes(item.size) if item.size else "", status
            )
        console.print(table)
        console.print(summary.lines()[0], highlight=False)
        if summary.failed:
            console.print(f"errors logged to {summary.error_log}", highlight=False)
    summary.raise_for_missing()


def _quiet_agent_logs() -> None:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The reporter prints every line; the agent's own log records would repeat them.
        logging.getLogger("comfyfleet.agent").setLevel(logging.CRITICAL)


@app.command("run")
@friendly
def run_command(
    manifest: Annotated[
        Path, typer.Option("--manifest", "-m", help="The workspace manifest (YAML).")
    ],
    workspace: Annotated[
        Path,
        typer.Option(
            "--workspace",
            "-w",
            help="The workspace folder (ComfyUI in its ComfyUI/ unless the manifest says "
            "otherwise; provision_errors.log, comfyui.log and comfyui.pid at its top).",
        ),
    ],
    comfy_command: Annotated[
        str | None,
        typer.Option(
            "--comfy-command",
            envvar="COMFY_COMMAND",
            help="How to start ComfyUI, run in its folder; --listen 127.0.0.1 --port PORT and "
            "the manifest's comfyui.args are added. Default: 'python main.py' (the manifest's "
            "comfyui.python if it names one). A local run: 'python -m comfyfleet.sim.comfy'.",
            show_default=False,
        ),
    ] = None,
    attach: Annotated[
        str | None,
        typer.Option(
            "--attach",
            envvar="COMFY_URL",
            metavar="URL",
            help="Attach to the ComfyUI the image starts (Vast's ComfyUI template: "
            "http://127.0.0.1:18188) instead of starting one; it is never stopped.",
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
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--no-strict",
            help="Fail without starting ComfyUI when a critical item is missing. --no-strict "
            "starts it anyway.",
        ),
    ] = True,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=64, help="Files downloaded at once.")
    ] = 4,
    dropbox_links: Annotated[
        Path | None,
        typer.Option(
            "--dropbox-links",
            help="A links file (comfyfleet dropbox links) mapped onto the workspace, as for "
            "'agent provision'. Default: $PROVISION_DROPBOX_LINKS_B64 when set.",
            show_default=False,
        ),
    ] = None,
    exit_when_ready: Annotated[
        bool,
        typer.Option(
            "--exit-when-ready",
            help="Exit 0 at ready and leave ComfyUI running; a later 'agent run' adopts it "
            "(comfyui.pid) instead of starting a second one.",
        ),
    ] = False,
) -> None:
    """Provision the workspace, then start ComfyUI and keep it up: the agent's whole run.

    Stages: booting, provisioning, downloading, starting_app, warming (when the
    manifest names a warm-up workflow), ready; or failed with a reason
    (provision_failed, comfy_crash_loop, warmup_failed, comfy_missing_nodes...), also
    logged to WORKSPACE/provision_errors.log. At ready it prints ComfyUI's URL and
    keeps supervising it (restarts after a crash) until Ctrl-C or SIGTERM, which
    stop the ComfyUI it started or adopted, never one it attached to. Exits 1 on a
    failure, 2 for an invalid manifest or option.
    """
    from comfyfleet.agent.provision import ProvisionOptions
    from comfyfleet.agent.run import comfy_options_for, run_agent
    from comfyfleet.manifest import load_manifest

    _quiet_agent_logs()
    loaded = load_manifest(manifest)
    links = _links(dropbox_links)
    overrides: dict[str, Any] = {"port": free_port_if_zero(port)}
    if comfy_command is not None:
        overrides["command"] = comfy_command  # split as a shell would
    if attach is not None:
        overrides["attach_url"] = attach
    comfy_options_for(loaded, workspace, overrides)  # a bad option: exit 2 before anything
    options = ProvisionOptions(strict=strict, concurrency=concurrency, links=links)
    with ConsoleReporter(err_console, live=True, show_stage=True) as reporter:
        code = run(
            run_and_supervise(
                run_agent(
                    loaded,
                    workspace,
                    reporter=reporter,
                    provision_options=options,
                    comfy_options_overrides=overrides,
                ),
                exit_when_ready=exit_when_ready,
                note=reporter.note,
            )
        )
    if code:
        raise typer.Exit(code)


#: Work that runs beside supervision once ComfyUI is ready (``agent connect``'s job
#: worker): given the supervisor and the event set at SIGINT/SIGTERM, and awaited before
#: ComfyUI is stopped.
AfterReady = Callable[["ComfySupervisor", asyncio.Event], Coroutine[Any, Any, None]]


async def run_and_supervise(
    agent_run: Coroutine[Any, Any, AgentResult],
    *,
    exit_when_ready: bool,
    note: Callable[[str], None] | None = None,
    after_ready: AfterReady | None = None,
) -> int:
    """Await the agent's run (``run_agent``), then supervise ComfyUI in the foreground
    until SIGINT/SIGTERM; returns the exit status. ``agent run`` and ``agent connect``
    both end here. ``after_ready`` runs beside supervision (not with ``exit_when_ready``);
    if it fails, ComfyUI is stopped and the exit status is 1."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stop = asyncio.Event()
    state = {"ready": False, "cancelled": False}

    def on_signal(signum: signal.Signals) -> None:
        if state["ready"]:
            stop.set()
        elif not state["cancelled"]:
            # Before ready: end the run; it stops the ComfyUI it started on the way out.
            state["cancelled"] = True
            err_console.print(f"[yellow]{signum.name}: stopping[/]", highlight=False)
            main.cancel()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            result = await agent_run
        except asyncio.CancelledError:
            if not state["cancelled"]:
                raise
            main.uncancel()
            err_console.print("[yellow]interrupted before ComfyUI was ready[/]")
            return 130
        if not result.ok or result.supervisor is None:
            err_console.print(
                f"[bold red]error:[/] failed ({result.reason}): {result.message}",
                highlight=False,
                soft_wrap=True,
            )
            return 1
        supervisor = result.supervisor
        state["ready"] = True
        console.print(f"ComfyUI is ready at {result.url}", highlight=False)
        if exit_when_ready:
            pid = supervisor.pid
            await supervisor.detach()
            if supervisor.attached:
                console.print(f"Left the attached ComfyUI at {result.url} running", highlight=False)
            else:
                console.print(
                    f"ComfyUI keeps running (pid {pid}); a later 'comfyfleet agent run' adopts it",
                    highlight=False,
                )
            return 0
        how = "attached" if supervisor.attached else f"pid {supervisor.pid}"
        if note is not None:
            note(f"ComfyUI at {result.url} ({how}); Ctrl-C stops supervision")
        return await _supervise(supervisor, stop, after_ready)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _after_ready(work: AfterReady, supervisor: ComfySupervisor, stop: asyncio.Event) -> bool:
    """Run ``work``; on a failure say so and set ``stop``. False when it failed."""
    try:
        await work(supervisor, stop)
    except Exception as error:
        err_console.print(
            f"[bold red]error:[/] {error or type(error).__name__}", highlight=False, soft_wrap=True
        )
        stop.set()
        return False
    return True


async def _supervise(
    supervisor: ComfySupervisor, stop: asyncio.Event, after_ready: AfterReady | None = None
) -> int:
    """Keep supervising until ``stop`` is set (then stop ComfyUI) or supervision gives up."""
    from comfyfleet.errors import ComfyfleetError

    beside = (
        asyncio.ensure_future(_after_ready(after_ready, supervisor, stop))
        if after_ready is not None
        else None
    )
    waiting = asyncio.ensure_future(supervisor.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    beside_ok = True
    if beside is not None:
        # Stopping: the work winds down (running jobs reported) while ComfyUI still runs.
        # Supervision gave up: ComfyUI is gone, there is nothing to wind down.
        if not stop.is_set():
            beside.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            beside_ok = await beside
    if stop.is_set():
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, ComfyfleetError):
            await waiting
        pid = supervisor.pid
        await supervisor.stop()
        if supervisor.attached:
            console.print(
                "Stopped supervising; the attached ComfyUI keeps running", highlight=False
            )
        else:
            console.print(f"Stopped ComfyUI (pid {pid})", highlight=False)
        return 0 if beside_ok else 1
    try:
        waiting.result()
    except ComfyfleetError as error:
        reason = getattr(error, "reason", "agent_error")
        err_console.print(
            f"[bold red]error:[/] failed ({reason}): {error}", highlight=False, soft_wrap=True
        )
        return 1
    err_console.print("[bold red]error:[/] supervision ended", highlight=False)
    return 1
