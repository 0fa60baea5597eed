"""``comfyfleet agent``: what runs on the instance (provisioning, ComfyUI supervision)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from comfyfleet.agent.report import Level, Progress, Stage
from comfyfleet.agent.sources import (
    LINKS_ENV_VAR,
    DropboxLink,
    decode_links_env,
    parse_links_file,
)
from comfyfleet.clikit import console, err_console, friendly, run
from comfyfleet.commands.manifest import human_bytes
from comfyfleet.errors import ConfigError

app = typer.Typer(
    help="The agent that provisions a workspace and runs ComfyUI.", no_args_is_help=True
)

_LEVEL_STYLE: dict[str, str] = {"info": "", "warning": "yellow", "error": "red"}


class ConsoleReporter:
    """The agent's ``Reporter`` in a terminal: stage and log lines, live progress bars.

    Calls come from the download engine's progress thread; Rich's progress is
    thread-safe, and nothing here waits on the download. Without a terminal (a
    pipe, a log file) only the lines are printed.
    """

    def __init__(self, out: Console, *, live: bool) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._bars: RichProgress | None = None
        self._overall: TaskID | None = None
        self._files: dict[str, TaskID] = {}
        if live and out.is_terminal:
            # Speed and time left come from the provisioner's own window: the engine's
            # events arrive in bursts, which Rich's per-update estimate would misread.
            self._bars = RichProgress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[speed]}", markup=False),
                console=out,
                transient=True,
            )

    def __enter__(self) -> ConsoleReporter:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        style = "bold red" if stage == "failed" else "bold cyan"
        text = f"[{style}]stage {stage}[/]"
        self.out.print(text + (f": {reason}" if reason else ""), highlight=False)

    def log(self, line: str, level: Level = "info") -> None:
        self.out.print(line, style=_LEVEL_STYLE.get(level) or None, markup=False, highlight=False)

    def progress(self, progress: Progress) -> None:
        bars = self._bars
        if bars is None:
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
