"""The user's commands on the control plane: ``up``, ``monitor``, ``pool`` and ``audit``.

``up`` asks the control plane's pool for instances of a profile and, with ``--wait``,
follows one to READY as ``monitor`` does. ``up --onstart-job JOB.json`` rents an
instance for one job instead (an OnStart rental): it follows the instance to READY,
then the job to its end, and brings the job's outputs and the instance's provision log
home (``--collect``); the control plane destroys the instance once the job has ended.
The events the agent reports are read with a long-poll
(``GET /api/instances/{id}/events?after=N&wait=S``), so a stage shows within
milliseconds of the agent's report. On a terminal the display is
live (the stage, a bar per file downloading, bytes/s, ETA, $ so far, log lines
above it); anywhere else it is plain lines. ``pool`` shows the pool's view;
``audit`` reads the audit trail straight from the store.

The heavy imports (httpx, rich.live, SQLAlchemy) wait for the command that needs
them: every command of the CLI loads this module.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from comfyfleet.clikit import console, err_console, friendly, run
from comfyfleet.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live
    from rich.progress import Progress, TaskID

    from comfyfleet.control_client import ControlClient, InstanceEvents

__all__ = [
    "EXIT_CONTROL_PLANE",
    "EXIT_FAILED",
    "EXIT_READY",
    "EXIT_TIMEOUT",
    "ONSTART_KEYS",
    "OnStartResult",
    "Tally",
    "Verdict",
    "audit",
    "follow",
    "load_onstart_job",
    "monitor",
    "pool",
    "up",
    "verdict",
]

T = TypeVar("T")

EXIT_READY: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
EXIT_CONTROL_PLANE: Final = 3
EXIT_TIMEOUT: Final = 124

READY_STATES: Final = frozenset({"ready", "busy"})
GONE_STATES: Final = frozenset({"draining", "destroying", "destroyed", "failed"})
#: The states an agent reports as stage events: shown from the events, not from the row,
#: which the store commits a moment before the events reach the buffer.
AGENT_STAGES: Final = frozenset({"provisioning", "downloading", "starting_app", "warming"})
#: The longest one long-poll is held by the server.
LONG_POLL_S: Final = 25.0
#: How often the pool's view is read again for the instance's $ so far.
COST_EVERY_S: Final = 5.0
#: How often the plain display prints the download's progress.
PLAIN_PROGRESS_EVERY_S: Final = 5.0
#: How long a follow that saw its instance fail waits for the agent's last events.
LINGER_S: Final = 0.5
#: How long a follow keeps trying to reach a control plane that went away.
RECONNECT_FOR_S: Final = 30.0


# ---------------------------------------------------------------- options

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="COMFYFLEET_SERVER",
        help="The control plane's URL. Default: $COMFYFLEET_SERVER, else http://127.0.0.1:8700.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0,
        metavar="SECONDS",
        help="Give up following after this long (exit 124); 0: never.",
    ),
]


# ---------------------------------------------------------------- the core


@dataclass(frozen=True)
class Verdict:
    """How following an instance ended: the exit status and a line that says why."""

    code: int
    message: str
    state: str
    failure_reason: str | None = None


def verdict(page: InstanceEvents) -> Verdict | None:
    """Whether ``page``'s instance is done with: ready (0), failed or going away (1), or None.

    The agent's failure report comes first: the pool will fail and destroy the
    instance, whatever its state says now.
    """
    who = f"instance {page.instance_id}"
    if page.failure_reason:
        return Verdict(
            EXIT_FAILED, f"{who} failed: {page.failure_reason}", page.state, page.failure_reason
        )
    if page.state in READY_STATES:
        return Verdict(EXIT_READY, f"{who} is {page.state}", page.state)
    if page.state in GONE_STATES:
        return Verdict(EXIT_FAILED, f"{who} is {page.state}", page.state)
    return None


@dataclass
class Tally:
    """What an instance's progress events and the pool's view add up to so far."""

    done: int = 0
    total: int | None = None
    bytes_per_s: float = 0.0
    #: Per file: bytes done and total (None: unknown), in the order they started.
    files: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    cost_so_far: float | None = None
    dph_total: float | None = None

    def add_progress(self, event: dict[str, Any]) -> str | None:
        """Take one ``progress`` event; the file it speaks of, if any."""
        self.done = int(event.get("done") or 0)
        total = event.get("total")
        self.total = None if total is None else int(total)
        self.bytes_per_s = float(event.get("bytes_per_s") or 0.0)
        name = event.get("file")
        if not name:
            return None
        file_total = event.get("file_total")
        self.files[str(name)] = (
            int(event.get("file_done") or 0),
            None if file_total is None else int(file_total),
        )
        return str(name)

    def eta_s(self) -> float | None:
        if self.total is None or self.bytes_per_s <= 0:
            return None
        return max(0.0, self.total - self.done) / self.bytes_per_s

    def transfer(self) -> str:
        """``1.2 GB / 6.9 GB (17%) at 48.0 MB/s, ETA 2m01s``."""
        text = _size(self.done)
        if self.total:
            text += f" / {_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f" at {_size(self.bytes_per_s)}/s"
        eta = self.eta_s()
        if eta is not None and self.total and self.done < self.total:
            text += f", ETA {_duration(eta)}"
        return text

    def money(self) -> str:
        """``$0.0123 so far at $0.500/h`` (empty while the pool's view is not read)."""
        if self.cost_so_far is None:
            return ""
        text = f"${self.cost_so_far:.4f} so far"
        return text + (f" at ${self.dph_total:.3f}/h" if self.dph_total is not None else "")


def _size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


# ---------------------------------------------------------------- displays


class Display(Protocol):
    """Where a follow shows what happens to its instance."""

    tally: Tally

    def stage(self, stage: str, reason: str | None) -> None: ...

    def log(self, line: str, level: str) -> None: ...

    def progress(self, event: dict[str, Any]) -> None: ...

    def cost(self, cost_so_far: float, dph_total: float | None) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """Plain lines for logs and pipes: stages, log lines, progress every few seconds."""

    def __init__(
        self,
        out: Console,
        *,
        prefix: str = "",
        progress_every_s: float = PLAIN_PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.prefix = prefix
        self.progress_every_s = progress_every_s
        self.clock = clock
        self.tally = Tally()
        self._started = clock()
        self._progress_at = float("-inf")

    def _line(self, text: str, style: str | None = None) -> None:
        stamp = f"[{self.clock() - self._started:6.1f}s] "
        self.out.print(
            Text(stamp + self.prefix + text, style=style or ""), soft_wrap=True, highlight=False
        )

    def stage(self, stage: str, reason: str | None) -> None:
        style = "bold red" if stage == "failed" else "bold"
        self._line(f"stage {stage}" + (f": {reason}" if reason else ""), style)

    def log(self, line: str, level: str) -> None:
        if level == "info":
            self._line(f"  {line}")
        else:
            self._line(f"  {level.upper()} {line}", "yellow" if level == "warning" else "red")

    def progress(self, event: dict[str, Any]) -> None:
        name = self.tally.add_progress(event)
        now = self.clock()
        finished = self.tally.total is not None and self.tally.done >= self.tally.total
        if not finished and now - self._progress_at < self.progress_every_s:
            return
        self._progress_at = now
        text = f"download {self.tally.transfer()}"
        if name is not None:
            file_done, file_total = self.tally.files[name]
            text += f"; {name} {_size(file_done)}"
            text += f" / {_size(file_total)}" if file_total else ""
        money = self.tally.money()
        self._line(text + (f"; {money}" if money else ""))

    def cost(self, cost_so_far: float, dph_total: float | None) -> None:
        self.tally.cost_so_far, self.tally.dph_total = cost_so_far, dph_total

    def note(self, text: str) -> None:
        self._line(text, "dim")

    def close(self) -> None:
        return None


class LiveDisplay:
    """A live Rich display: the stage, a bar per file, the totals; log lines scroll above."""

    def __init__(self, out: Console, instance_id: int) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.out = out
        self.instance_id = instance_id
        self.tally = Tally()
        self._stage = "…"
        self._bars: Progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            console=out,
            auto_refresh=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._live: Live = Live(
            get_renderable=self._render, console=out, refresh_per_second=8, transient=False
        )
        self._live.start()

    def _render(self) -> RenderableType:
        from rich.console import Group

        head = Text.assemble((f"instance {self.instance_id} ", "bold"), (self._stage, "bold cyan"))
        parts: list[RenderableType] = [head]
        if self._tasks:
            parts.append(self._bars)
        totals = self.tally.transfer() if self._tasks or self.tally.done else ""
        money = self.tally.money()
        if totals or money:
            parts.append(Text("  " + "; ".join(p for p in (totals, money) if p), style="dim"))
        return Group(*parts)

    def _print(self, text: Text) -> None:
        self._live.console.print(text, soft_wrap=True, highlight=False)

    def stage(self, stage: str, reason: str | None) -> None:
        self._stage = stage + (f": {reason}" if reason else "")
        style = "bold red" if stage == "failed" else "bold"
        self._print(Text(f"stage {self._stage}", style=style))

    def log(self, line: str, level: str) -> None:
        style = {"warning": "yellow", "error": "red"}.get(level, "")
        self._print(Text(line, style=style))

    def progress(self, event: dict[str, Any]) -> None:
        name = self.tally.add_progress(event)
        if name is None:
            return
        done, total = self.tally.files[name]
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = self._bars.add_task(_short(name), total=total)
        self._bars.update(task, completed=done, total=total)

    def cost(self, cost_so_far: float, dph_total: float | None) -> None:
        self.tally.cost_so_far, self.tally.dph_total = cost_so_far, dph_total

    def note(self, text: str) -> None:
        self._print(Text(text, style="dim"))

    def close(self) -> None:
        self._live.stop()


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


# ---------------------------------------------------------------- following


async def follow(
    control: ControlClient,
    instance_id: int,
    display: Display,
    *,
    timeout_s: float | None,
    brief_if_over: bool = False,
) -> Verdict:
    """Show ``instance_id``'s events on ``display`` until it is ready, fails or ends.

    Events are long-polled from the start of the control plane's buffer on, so
    a late attach still shows the stages so far; with ``brief_if_over`` an instance
    that is already done is only named with its state. Returns the ``Verdict``
    (code 124 when ``timeout_s`` passes first).
    """
    from comfyfleet.control_client import ControlPlaneUnreachable

    loop = asyncio.get_running_loop()
    deadline = None if not timeout_s else loop.time() + timeout_s
    after = 0
    shown: str | None = None
    log_file_shown = False
    cost_due = loop.time()
    first = True
    lingered = False
    known: str | None = None
    lost_since: float | None = None
    while True:
        now = loop.time()
        if now >= cost_due:
            cost_due = now + COST_EVERY_S
            await _refresh_cost(control, instance_id, display)
        wait = 0.0 if first else max(0.0, min(LONG_POLL_S, cost_due - now))
        if lingered:
            wait = min(wait, LINGER_S)
        if deadline is not None:
            if deadline <= now:
                return Verdict(
                    EXIT_TIMEOUT,
                    f"instance {instance_id} is not ready after {_duration(timeout_s or 0)} "
                    f"(it is {shown or 'unknown'}): gave up following; it keeps starting",
                    shown or "unknown",
                )
            wait = min(wait, deadline - now)
        try:
            page = await control.events(instance_id, after=after, wait=wait, state=known)
        except ControlPlaneUnreachable as error:
            if lost_since is None:
                lost_since = now
                display.note(f"{error}; trying again for {RECONNECT_FOR_S:.0f}s")
            elif now - lost_since > RECONNECT_FOR_S:
                raise
            await asyncio.sleep(1.0)
            continue
        if lost_since is not None:
            lost_since = None
            display.note("the control plane answers again")
        known = page.state
        over = verdict(page)
        if first and brief_if_over and over is not None:
            display.stage(page.state, page.failure_reason)
            if page.log_file:
                display.note(f"provision log: {page.log_file}")
            return over
        first = False
        if page.log_file and not log_file_shown:
            log_file_shown = True
            display.note(f"provision log (on the control plane's machine): {page.log_file}")
        if page.last < after:
            display.note("the control plane restarted: its event numbers began again")
        if page.missed:
            display.note(
                f"{page.missed} event(s) before these are no longer kept by the control plane "
                "(its buffer is bounded); the provision log has them all"
            )
        for event in page.events:
            kind = event.get("kind")
            if kind == "stage":
                stage, reason = str(event.get("stage")), event.get("reason")
                if stage != shown or reason:
                    display.stage(stage, reason)
                shown = stage
            elif kind == "progress":
                display.progress(event)
            elif kind == "log":
                display.log(str(event.get("line", "")), str(event.get("level") or "info"))
        after = int(page.events[-1]["seq"]) if page.events else page.last
        if (
            page.state != shown
            and shown != "failed"
            and (shown is None or page.state not in AGENT_STAGES)
        ):
            shown = page.state
            display.stage(page.state, None)
        if over is not None and after >= page.last:
            if over.code == EXIT_READY or lingered:
                if over.failure_reason and shown != "failed":
                    display.stage("failed", over.failure_reason)
                return over
            # The agent's last words (its failed stage, the lines after it) reach the
            # buffer a moment after the row: give them that moment.
            lingered = True


async def _refresh_cost(control: ControlClient, instance_id: int, display: Display) -> None:
    view = await control.pool(include_ended=False)
    for instance in view.get("instances", []):
        if instance.get("id") == instance_id:
            display.cost(float(instance.get("cost_so_far") or 0.0), instance.get("dph_total"))
            return


def display_for(out: Console, instance_id: int, *, prefix: str = "") -> Display:
    if out.is_terminal and not prefix:
        return LiveDisplay(out, instance_id)
    return PlainDisplay(out, prefix=prefix)


async def _follow_shown(
    control: ControlClient,
    instance_id: int,
    out: Console,
    *,
    timeout_s: float | None,
    prefix: str = "",
    brief_if_over: bool = False,
) -> Verdict:
    display = display_for(out, instance_id, prefix=prefix)
    try:
        return await follow(
            control, instance_id, display, timeout_s=timeout_s, brief_if_over=brief_if_over
        )
    finally:
        display.close()


def _run_control(coro: Coroutine[Any, Any, T]) -> T:
    """``run(coro)``; the control plane's refusals end in one red line and exit status 3."""
    from comfyfleet.control_client import ControlPlaneError

    try:
        return run(coro)
    except ControlPlaneError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_CONTROL_PLANE) from None


def _finish(result: Verdict, out: Console) -> None:
    style = "bold green" if result.code == EXIT_READY else "bold red"
    out.print(Text(result.message, style=style), soft_wrap=True, highlight=False)


def _connect_lines(instance: dict[str, Any]) -> list[str]:
    """How to reach an instance: its portal, ComfyUI and SSH, as far as they are known."""
    lines = []
    ip, ports = instance.get("public_ip"), instance.get("ports") or {}
    for port, name in (("1111/tcp", "portal"), ("8188/tcp", "ComfyUI")):
        host_port = _host_port(ports, port)
        if ip and host_port:
            lines.append(f"{name}: http://{ip}:{host_port}")
    if instance.get("ssh_host") and instance.get("ssh_port"):
        lines.append(f"ssh: ssh -p {instance['ssh_port']} root@{instance['ssh_host']}")
    return lines


def _host_port(ports: dict[str, Any], port: str) -> str | None:
    mapped = ports.get(port)
    if isinstance(mapped, list) and mapped and isinstance(mapped[0], dict):
        value = mapped[0].get("HostPort")
        return str(value) if value else None
    return str(mapped) if isinstance(mapped, str | int) else None


async def _instance_in_pool(control: ControlClient, instance_id: int) -> dict[str, Any] | None:
    view = await control.pool(include_ended=True)
    for instance in view.get("instances", []):
        if instance.get("id") == instance_id:
            return dict(instance)
    return None


def _worst(codes: list[int]) -> int:
    """One exit status for several instances: a failure beats a timeout beats ready."""
    for code in (EXIT_FAILED, EXIT_TIMEOUT):
        if code in codes:
            return code
    return max(codes, default=EXIT_READY)


# ---------------------------------------------------------------- OnStart rentals

#: The keys of JOB.json (``up --onstart-job``): ``POST /api/jobs``'s JSON body, with files
#: named by path instead of carried in base64.
ONSTART_KEYS: Final = (
    "workflow",
    "inputs",
    "images",
    "prompt",
    "set",
    "randomize_seeds",
    "timeout_s",
)


def load_onstart_job(path: Path) -> dict[str, Any]:
    """JOB.json as the job of an OnStart rental (``POST /api/admin/pool/onstart``).

    ``workflow`` is the API-format workflow, or the path of its JSON file; ``inputs``
    maps each input's name to the path of its file (or lists the paths: each is named
    after its file). Paths are relative to JOB.json's folder. The workflow is checked
    (``workflow.load_api_workflow``) and the inputs read and encoded in base64 here; the
    control plane checks the parameters before it rents anything. A ``ConfigError`` (or
    ``WorkflowError``) says what is wrong, naming the file.
    """
    import base64

    from comfyfleet.workflow import load_api_workflow

    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else None
        raise ConfigError(f"cannot read the job file: {why or error}", source=label) from error
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"the job file is not JSON: {error}", source=label) from None
    if not isinstance(data, dict):
        raise ConfigError('expected a JSON object such as {"workflow": "flow.json"}', source=label)
    unknown = sorted(set(data) - set(ONSTART_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(ONSTART_KEYS)}",
            source=label,
        )
    folder = path.parent
    given = data.get("workflow")
    if isinstance(given, str):
        workflow = load_api_workflow(folder / given)
    elif isinstance(given, dict):
        workflow = load_api_workflow(given, name=f"{label}: workflow")
    else:
        raise ConfigError(
            "give the API-format workflow, or the path of its JSON file (relative to the job "
            "file's folder)",
            source=label,
            field="workflow",
        )
    inputs = data.get("inputs") or {}
    if isinstance(inputs, list) and all(isinstance(item, str) for item in inputs):
        pairs = [(Path(item).name, item) for item in inputs]
    elif isinstance(inputs, dict) and all(isinstance(item, str) for item in inputs.values()):
        pairs = list(inputs.items())
    else:
        raise ConfigError(
            'expected {"name.png": "path/to/file.png", ...} or a list of paths',
            source=label,
            field="inputs",
        )
    encoded: dict[str, str] = {}
    for name, relative in pairs:
        if name in encoded:
            raise ConfigError(
                f"two inputs are named {name!r} (an input is stored under its name): rename one",
                source=label,
                field="inputs",
            )
        file = folder / relative
        try:
            encoded[name] = base64.b64encode(file.read_bytes()).decode("ascii")
        except OSError as error:
            raise ConfigError(
                f"cannot read {file}: {error.strerror or error}", source=label, field="inputs"
            ) from error
    body = {key: value for key, value in data.items() if key not in ("workflow", "inputs")}
    if isinstance(body.get("set"), str):
        body["set"] = [body["set"]]
    body["workflow"] = workflow
    body["inputs"] = encoded
    return body


@dataclass
class OnStartResult:
    """How ``up --onstart-job`` ended: the exit status, the line that says why, the
    rental, the job as last seen and the files brought home."""

    code: int
    message: str
    instance_id: int | None = None
    job_id: str | None = None
    view: dict[str, Any] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    provision_log: str | None = None

    def payload(self, profile: str) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "profile": profile,
            "instance_id": self.instance_id,
            "job_id": self.job_id,
            "state": None if self.view is None else self.view.get("state"),
            "exit_code": self.code,
            "message": self.message,
            "job": self.view,
            "files": self.files,
            "provision_log": self.provision_log,
        }


async def _onstart(
    control: ControlClient,
    profile: str,
    job: Mapping[str, Any],
    *,
    timeout_s: float | None,
    collect: Path | None,
    out: Console,
) -> OnStartResult:
    """Rent, follow the instance to ready, follow the job to its end, collect."""
    from comfyfleet.commands.run import display_for as job_display_for
    from comfyfleet.commands.run import follow_job

    loop = asyncio.get_running_loop()
    deadline = None if not timeout_s else loop.time() + timeout_s
    answer = await control.rent_for_job(profile, job)
    instance_id, job_id = int(answer["instance_id"]), str(answer["job_id"])
    out.print(
        f"rented instance {instance_id} of profile {escape(profile)} for OnStart job {job_id}; "
        "the control plane destroys it once the job has ended",
        highlight=False,
        soft_wrap=True,
    )
    result = OnStartResult(EXIT_FAILED, "", instance_id, job_id)
    ready = await _follow_shown(control, instance_id, out, timeout_s=timeout_s)
    if ready.code == EXIT_TIMEOUT:
        result.code = EXIT_TIMEOUT
        result.message = (
            f"instance {instance_id} is not ready after {_duration(timeout_s or 0)}: gave up "
            f"following; it runs job {job_id} once ready and is destroyed after it "
            f"(`comfyfleet monitor {instance_id}`)"
        )
        return result
    # A failed instance fails its job (the pool says so on the job): follow it all the
    # same, for the reason. An instance already going may simply be done with the job.
    if ready.code == EXIT_READY or ready.failure_reason:
        _finish(ready, out)
    else:
        out.print(Text(f"{ready.message}; its job says why", style="dim"), soft_wrap=True)
    remaining = None if deadline is None else max(0.1, deadline - loop.time())
    display = job_display_for(out, job_id)
    try:
        how, view = await follow_job(
            control, job_id, display, timeout_s=remaining, stop=asyncio.Event()
        )
    finally:
        display.close()
    result.view = view if view is not None else await control.job(job_id)
    state = str(result.view.get("state"))
    if how == "timeout":
        result.code = EXIT_TIMEOUT
        result.message = (
            f"job {job_id} is {state} after {_duration(timeout_s or 0)}: gave up following; "
            f"instance {instance_id} is destroyed once the job has ended"
        )
    elif state == "succeeded":
        result.code = EXIT_READY
        result.message = f"job {job_id} succeeded on instance {instance_id}"
    else:
        error = str(result.view.get("error") or "").strip() or "no reason given"
        result.message = f"job {job_id} {state}: {error}"
    if collect is not None:
        await _collect(control, result, collect, out)
    return result


async def _collect(
    control: ControlClient, result: OnStartResult, folder: Path, out: Console
) -> None:
    """The job's outputs (verified by sha256) and the instance's provision log, into
    ``folder``; the log whatever became of the job (it says why a job failed)."""
    try:
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the folder: {error.strerror or error}", source=str(folder)
        ) from error
    view = result.view or {}
    if view.get("state") == "succeeded":
        for output in view.get("outputs") or []:
            name = str(output.get("name") or "")
            base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
            if base in ("", ".", "..") or "\0" in base:
                err_console.print(f"[yellow]skipped output {escape(repr(name))}: no file name[/]")
                continue
            dest = folder / base
            size = await control.download_output(
                str(view["id"]), name, dest, sha256=output.get("sha256")
            )
            result.files.append({"name": name, "path": str(dest), "size": size})
            out.print(f"{escape(str(dest))}  {_size(size)}", highlight=False, soft_wrap=True)
    if result.instance_id is None:
        return
    log = await control.provision_log(result.instance_id)
    if log is None:
        out.print(f"[dim]instance {result.instance_id} has no provision log[/]")
        return
    dest = folder / f"provision_{result.instance_id}.log"
    await asyncio.to_thread(dest.write_bytes, log)
    result.provision_log = str(dest)
    out.print(f"{escape(str(dest))}  {_size(len(log))}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- commands


@friendly
def up(
    profile: Annotated[str, typer.Argument(help="Profile name in the control plane's fleet file.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=100, help="Instances.")] = 1,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait", help="Follow the instance(s) to READY, as `monitor` does."
        ),
    ] = False,
    timeout: TimeoutOption = 3600.0,
    server: ServerOption = None,
    as_json: JsonOption = False,
    onstart_job: Annotated[
        Path | None,
        typer.Option(
            "--onstart-job",
            metavar="JOB.json",
            help="Rent the instance for this one job (see OnStart above) and follow it to "
            "the job's end.",
            show_default=False,
        ),
    ] = None,
    collect: Annotated[
        Path | None,
        typer.Option(
            "--collect",
            metavar="DIR",
            help="With --onstart-job: download the job's outputs and the instance's "
            "provision log into DIR (made if missing).",
            show_default=False,
        ),
    ] = None,
    destroy_after: Annotated[
        bool,
        typer.Option(
            "--destroy-after",
            help="With --onstart-job: destroy the instance once its job has ended. Always "
            "so: the control plane does it, whether this command still runs or not; the "
            "flag only says it.",
        ),
    ] = False,
) -> None:
    """Ask the control plane's pool for an instance of PROFILE, and print its id.

    The pool rents the best-ranked offer, the instance's agent dials home and
    provisions the workspace. With --wait, follow it as `monitor` does (live on
    a terminal, plain lines otherwise) until it is ready, fails or is destroyed;
    several instances (--count) are followed side by side in plain lines. With
    --json, stdout holds one JSON document and the progress goes to stderr.

    OnStart (--onstart-job JOB.json): rent one instance for one job. The job is
    reserved to it (no warm instance takes it, and it takes no other job), it
    runs once ComfyUI is ready, and the control plane destroys the instance once
    the job has ended (succeeded, failed, cancelled or timed out), whether this
    command is still there or not: --destroy-after says so, and there is no way
    to keep it. The command follows the instance to ready, then the job to its
    end, and with --collect DIR downloads the job's outputs (checked by sha256)
    and the instance's provision log (provision_ID.log) into DIR. JOB.json is
    the JSON body of POST /api/jobs with files by path, paths relative to
    JOB.json's folder:

      {"workflow": "flow_api.json",           the API-format workflow, or its JSON
       "inputs": {"in.png": "photos/a.png"},  name -> file (or a list of files,
                                              each named after its file)
       "images": [{"node": "12", "name": "in.png"}],  the LoadImage of each input
                                              (one input: the only LoadImage)
       "prompt": "a red fox",  "set": ["3.steps=30"],
       "randomize_seeds": true, "timeout_s": 900}

    Only "workflow" is required. The job has one attempt and the profile's
    caps count the instance; it holds no pool slot and counts towards no
    min_ready. --timeout bounds the whole follow, instance and job; giving up
    (or Ctrl-C) leaves the job to run and the instance to be destroyed after it.

    The control plane is --server, else $COMFYFLEET_SERVER, else
    http://127.0.0.1:8700 (`comfyfleet serve`); the admin key comes from
    $ADMIN_API_KEY and is sent in the x-admin-key header, never printed.

    Exit status: 0 ready (or, without --wait, requested; with --onstart-job,
    the job succeeded); 1 the instance failed, or is being (or was) destroyed
    (with --onstart-job: the job failed or was cancelled); 2 a configuration
    mistake (ADMIN_API_KEY missing or refused, a bad JOB.json); 3 the control
    plane is unreachable or refused the request (an unknown profile, a cap, no
    pool, a workflow it refuses); 124 --timeout passed first; 130 interrupted.
    """
    from comfyfleet.control_client import ControlClient

    out = err_console if as_json else console
    if onstart_job is None:
        if collect is not None or destroy_after:
            raise ConfigError("--collect and --destroy-after go with --onstart-job JOB.json")
    else:
        if count != 1:
            raise ConfigError(
                "--onstart-job rents one instance for its job: leave --count out",
                source="--count",
            )
        onstart_result = _up_onstart(
            profile, onstart_job, timeout_s=timeout, collect=collect, server=server, out=out
        )
        if as_json:
            console.print_json(data=onstart_result.payload(profile))
        else:
            style = "bold green" if onstart_result.code == EXIT_READY else "bold red"
            console.print(Text(onstart_result.message, style=style), soft_wrap=True)
        if onstart_result.code:
            raise typer.Exit(onstart_result.code)
        return

    async def go() -> tuple[list[int], list[Verdict], list[dict[str, Any]]]:
        async with ControlClient.from_env(server) as control:
            ids = await control.prewarm(profile, count)
            if not as_json:
                console.print(
                    f"requested {len(ids)} instance{'s' if len(ids) != 1 else ''} of profile "
                    f"{escape(profile)}: {', '.join(str(i) for i in ids)}",
                    highlight=False,
                )
            if len(ids) < count:
                out.print(
                    f"[yellow]the pool took {len(ids)} of the {count} asked for (its caps)[/]"
                )
            if not wait or not ids:
                return ids, [], []
            several = len(ids) > 1
            results = list(
                await asyncio.gather(
                    *(
                        _follow_shown(
                            control,
                            instance_id,
                            out,
                            timeout_s=timeout,
                            prefix=f"#{instance_id} " if several else "",
                        )
                        for instance_id in ids
                    )
                )
            )
            views = []
            for instance_id, result in zip(ids, results, strict=True):
                if result.code == EXIT_READY:
                    found = await _instance_in_pool(control, instance_id)
                    views.append(found or {"id": instance_id})
            return ids, results, views

    ids, results, views = _run_control(go())
    code = _worst([r.code for r in results])
    if as_json:
        payload: dict[str, Any] = {"profile": profile, "instance_ids": ids}
        if wait:
            payload["instances"] = [
                {
                    "instance_id": i,
                    "state": r.state,
                    "exit_code": r.code,
                    "message": r.message,
                    "failure_reason": r.failure_reason,
                }
                for i, r in zip(ids, results, strict=True)
            ]
            payload["exit_code"] = code
        console.print_json(data=payload)
    else:
        for result in results:
            _finish(result, console)
        for view in views:
            for line in _connect_lines(view):
                console.print(f"  #{view['id']} {line}", highlight=False, soft_wrap=True)
    if code:
        raise typer.Exit(code)


def _up_onstart(
    profile: str,
    job_file: Path,
    *,
    timeout_s: float,
    collect: Path | None,
    server: str | None,
    out: Console,
) -> OnStartResult:
    from comfyfleet.control_client import ADMIN_KEY_ENV, ControlClient, server_url
    from comfyfleet.envvars import env_value

    job = load_onstart_job(job_file)

    async def go() -> OnStartResult:
        # The admin key on every call: the job is the admin's (a user key would not see it).
        async with ControlClient(
            server_url(server), admin_key=env_value(None, ADMIN_KEY_ENV)
        ) as control:
            return await _onstart(
                control, profile, job, timeout_s=timeout_s, collect=collect, out=out
            )

    return _run_control(go())


@friendly
def monitor(
    instance_id: Annotated[
        int, typer.Argument(help="The instance's id (as `up` and `pool` show).")
    ],
    timeout: TimeoutOption = 0.0,
    server: ServerOption = None,
) -> None:
    """Follow an instance that is starting: its stage, downloads, $ so far and log
    lines.

    On a terminal the display is live: the current stage, a progress bar per
    file being downloaded, the overall bytes/s and ETA, the $ spent so far (from
    the pool's view, every few seconds), and the agent's log lines scrolling
    above. Otherwise (a pipe, CI) it prints plain lines: stage changes, log
    lines, and the progress every few seconds. An instance that is already ready
    (or has ended) is named with its state, and the command exits at once.

    The control plane is --server, else $COMFYFLEET_SERVER, else
    http://127.0.0.1:8700 (`comfyfleet serve`); the admin key comes from
    $ADMIN_API_KEY and is sent in the x-admin-key header, never printed.

    Exit status: 0 the instance is ready; 1 it failed, or is being (or was)
    destroyed; 2 a configuration mistake (ADMIN_API_KEY missing or refused); 3
    the control plane is unreachable or refused the request (no such instance);
    124 --timeout passed first; 130 interrupted.
    """
    from comfyfleet.control_client import ControlClient

    async def go() -> tuple[Verdict, dict[str, Any] | None]:
        async with ControlClient.from_env(server) as control:
            result = await _follow_shown(
                control, instance_id, console, timeout_s=timeout, brief_if_over=True
            )
            found = await _instance_in_pool(control, instance_id)
            return result, found

    result, found = _run_control(go())
    _finish(result, console)
    if result.code == EXIT_READY and found is not None:
        for line in _connect_lines(found):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
    if result.code:
        raise typer.Exit(result.code)


@friendly
def pool(
    server: ServerOption = None,
    as_json: JsonOption = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list destroyed and failed instances.")
    ] = False,
    wide: Annotated[
        bool,
        typer.Option("--wide", "-w", help="Also show the provider's status message and ports."),
    ] = False,
) -> None:
    """Show the warm pool: every live instance, its state, cost, heartbeat and
    addresses.

    A table of what GET /api/admin/pool answers (with --json, that answer as
    is), the $/h the live instances burn together, and how to reach each
    instance (its portal, ComfyUI and `ssh -p PORT root@HOST`) once the provider
    has said.

    The control plane is --server, else $COMFYFLEET_SERVER, else
    http://127.0.0.1:8700 (`comfyfleet serve`); the admin key comes from
    $ADMIN_API_KEY and is sent in the x-admin-key header, never printed.

    Exit status: 0 shown; 2 ADMIN_API_KEY missing or refused; 3 the control
    plane is unreachable or refused the request.
    """
    from comfyfleet.control_client import ControlClient

    async def go() -> dict[str, Any]:
        async with ControlClient.from_env(server) as control:
            return await control.pool(include_ended=show_all)

    view = _run_control(go())
    if as_json:
        console.print_json(data=view)
        return
    instances: list[dict[str, Any]] = list(view.get("instances", []))
    if not instances:
        console.print("No instances in the pool.")
    else:
        console.print(pool_table(instances, wide=wide))
    live = sum(1 for i in instances if i.get("state") not in {"destroyed", "failed"})
    console.print(
        f"burn ${float(view.get('burn_dollars_per_hour') or 0.0):.3f}/h across {live} live "
        f"instance{'s' if live != 1 else ''}",
        highlight=False,
    )
    if not view.get("pool_control", True):
        console.print("[yellow]no pool runs in this control plane: `up` and prewarm are refused[/]")
    for instance in instances:
        for line in _connect_lines(instance):
            console.print(f"  #{instance['id']} {line}", highlight=False, soft_wrap=True)


def pool_table(instances: list[dict[str, Any]], *, wide: bool = False) -> Any:
    """One line per instance; ``wide`` adds the provider's status message and the
    addresses. Long texts are cut to fit (``--json`` and ``comfyfleet audit`` have them
    whole)."""
    from rich.table import Table

    table = Table(title="Pool", header_style="bold cyan", title_justify="left")
    columns: list[tuple[str, str, int]] = [
        ("id", "right", 3),
        ("profile/slot", "left", 12),
        ("state", "left", 12),
        ("actual", "left", 8),
    ]
    if wide:
        columns.append(("status message", "left", 32))
    columns += [
        ("GPU", "left", 10),
        ("$/h", "right", 5),
        ("$ so far", "right", 8),
        ("heartbeat", "right", 9),
    ]
    if wide:
        columns.append(("public ip:ports", "left", 28))
    columns.append(("failure", "left", 36))
    for header, justify, width in columns:
        table.add_column(
            header,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            overflow="ellipsis",
            max_width=width if header in ("status message", "public ip:ports", "failure") else None,
            min_width=None if header in ("status message", "public ip:ports", "failure") else width,
        )
    for i in instances:
        slot = i.get("slot")
        dph = i.get("dph_total")
        age = i.get("heartbeat_age_s")
        cost = f"{float(i.get('cost_so_far') or 0.0):.4f}"
        ports = ", ".join(
            f"{port.split('/')[0]}→{host}"
            for port in sorted(i.get("ports") or {})
            if (host := _host_port(i.get("ports") or {}, port))
        )
        cells = [
            str(i.get("id")),
            escape(f"{i.get('profile')}/{'-' if slot is None else slot}"),
            _state_markup(str(i.get("state"))),
            escape(str(i.get("actual_status") or "")),
        ]
        if wide:
            cells.append(escape(str(i.get("status_msg") or "")))
        cells += [
            escape(str(i.get("gpu_name") or "")),
            "" if dph is None else f"{float(dph):.3f}",
            ("~" if i.get("cost_estimated") else "") + cost,
            "" if age is None else f"{_duration(float(age))} ago",
        ]
        if wide:
            cells.append(escape(f"{i.get('public_ip') or ''}" + (f": {ports}" if ports else "")))
        cells.append(escape(str(i.get("failure_reason") or "")))
        table.add_row(*cells)
    return table


def _state_markup(state: str) -> str:
    style = (
        "green"
        if state in READY_STATES
        else "red"
        if state in {"failed", "destroying", "destroyed"}
        else "yellow"
    )
    return f"[{style}]{escape(state)}[/]"


@friendly
def audit(
    instance: Annotated[
        int | None, typer.Option("--instance", "-i", help="Only this instance's transitions.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="The newest N rows (oldest first).")
    ] = 100,
    as_json: JsonOption = False,
) -> None:
    """Print the audit trail: every move of every instance, when, why and by whom.

    Read straight from the control plane's store (no server needed): SQLite
    under the data directory ($COMFYFLEET_DATA_DIR, else
    $XDG_DATA_HOME/comfyfleet, else ~/.local/share/comfyfleet), or PostgreSQL
    when $DATABASE_URL is set. The store is migrated first if it is behind.

    Exit status: 0 printed; 1 the store cannot be opened; 2 DATABASE_URL is not
    a database URL comfyfleet supports.
    """
    from comfyfleet.store.db import Store
    from comfyfleet.store.instances import audit_trail

    store = Store.open(migrate=True)
    try:
        rows: list[dict[str, Any]] = store.run_sync(
            lambda session: [
                {
                    "at": row.at,
                    "time": datetime.fromtimestamp(row.at, UTC).isoformat(timespec="seconds"),
                    "instance_id": row.instance_id,
                    "from_state": None if row.from_state is None else str(row.from_state),
                    "to_state": str(row.to_state),
                    "actor": row.actor,
                    "reason": row.reason,
                }
                for row in audit_trail(session, instance, limit=limit)
            ]
        )
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(
            "No audit rows" + (f" for instance {instance}." if instance is not None else ".")
        )
        return
    from rich.table import Table

    title = "Audit trail" + (f" of instance {instance}" if instance is not None else "")
    table = Table(title=title, header_style="bold cyan", title_justify="left")
    for header in ("time (UTC)", "instance", "from → to", "actor", "reason"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            row["time"],
            str(row["instance_id"]),
            f"{row['from_state'] or '∅'} → {row['to_state']}",
            escape(row["actor"]),
            escape(row["reason"]),
        )
    console.print(table)
