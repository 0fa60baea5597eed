"""``comfyfleet run``: submit a ComfyUI workflow as a job, follow it, bring its outputs home.

The workflow and its parameters (``--image``, ``--prompt``, ``--set``) are checked here
first, with the functions the control plane applies them with (``workflow.py``), so a
UI-format workflow or a ``--set`` that names no node ends in one line before anything
is uploaded. The job is then submitted (``POST /api/jobs``) and followed over its
server-sent events (``GET /api/jobs/{id}/events``): live on a terminal (the queue
position, the instance, the node running with its steps, the overall percent), plain
lines elsewhere. Its outputs are streamed into ``--out`` and verified by sha256.
Ctrl-C and ``--timeout`` cancel the job before the command exits.

The heavy imports (httpx, rich.live, the workflow functions) wait for the command:
every command of the CLI loads this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Protocol
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from comfyfleet.clikit import console, err_console, friendly
from comfyfleet.clikit import run as run_coroutine
from comfyfleet.commands.fleet import (
    EXIT_CONTROL_PLANE,
    EXIT_FAILED,
    EXIT_TIMEOUT,
    JsonOption,
    ServerOption,
    _duration,
    _size,
)
from comfyfleet.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live

    from comfyfleet.control_client import ControlClient

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_SUCCEEDED",
    "JobRequest",
    "JobStatus",
    "LiveJobDisplay",
    "PlainJobDisplay",
    "RunResult",
    "follow_job",
    "job_status",
    "prepare_job",
    "run",
]

EXIT_SUCCEEDED: Final = 0
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
#: How often the plain display prints the running node's steps.
PLAIN_STEPS_EVERY_S: Final = 2.0


# ---------------------------------------------------------------- the request


@dataclass(frozen=True)
class JobRequest:
    """What ``POST /api/jobs`` is sent: the checked workflow, the files, the parameters."""

    workflow: dict[str, Any]
    inputs: tuple[Path, ...]
    params: dict[str, Any]


def prepare_job(
    workflow_path: Path,
    *,
    images: Sequence[str] = (),
    prompt: str | None = None,
    sets: Sequence[str] = (),
    randomize_seeds: bool = True,
    profile: str | None = None,
    priority: int = 0,
    timeout_s: float | None = None,
    webhook_url: str | None = None,
) -> JobRequest:
    """The job to submit, checked as the control plane will check it.

    The workflow must be ComfyUI's API format; every ``--image`` a readable file (their
    names distinct: an input is stored under its file name); every ``--set`` well formed;
    and the parameters must apply to the workflow, in the control plane's order
    (``apply_parameters``, seeds aside). A ``WorkflowError`` or ``ConfigError`` says what
    is wrong otherwise.
    """
    from comfyfleet.workflow import (
        Override,
        WorkflowError,
        apply_parameters,
        load_api_workflow,
        parse_image_arg,
    )

    workflow = load_api_workflow(workflow_path)
    parsed = [parse_image_arg(text) for text in images]
    names: dict[str, Path] = {}
    for image in parsed:
        if not image.path.is_file():
            why = "is a folder" if image.path.is_dir() else "does not exist"
            raise WorkflowError(f"--image: {image.path} {why}; give the path of an image file")
        other = names.setdefault(image.path.name, image.path)
        if other != image.path:
            raise WorkflowError(
                f"--image {other} and --image {image.path} have the same file name "
                f"{image.path.name!r}, and an input is stored under its file name: "
                "rename one of them"
            )
    overrides = [Override.parse(text) for text in sets]
    apply_parameters(
        workflow,
        prompt=prompt,
        images=[(image.node, image.path.name) for image in parsed],
        overrides=overrides,
        randomize=False,
    )
    if webhook_url is not None:
        parts = urlsplit(webhook_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                "the control plane posts to https:// URLs only: give one like "
                "https://example.com/hooks/comfyfleet",
                source="--webhook",
            )
    params: dict[str, Any] = {
        "images": [{"node": image.node, "name": image.path.name} for image in parsed],
        "set": list(sets),
        "randomize_seeds": randomize_seeds,
        "priority": priority,
    }
    optional = {
        "profile": profile,
        "prompt": prompt,
        "timeout_s": timeout_s,
        "webhook_url": webhook_url,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return JobRequest(workflow, tuple(image.path for image in parsed), params)


# ---------------------------------------------------------------- what a view says


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands, for a person: a headline and the running node's steps."""

    state: str
    #: ``queued (position 2)``, ``running on instance 4``, ``succeeded``...
    headline: str
    #: ``KSampler "Sampler" (node 3)`` while a node runs.
    node: str | None = None
    value: float | None = None
    max: float | None = None
    #: The whole workflow, 0 to 100.
    percent: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    def steps(self) -> str:
        """``KSampler (node 3): step 5/20, 25% overall`` (what is known of it)."""
        parts = []
        if self.value is not None and self.max:
            parts.append(f"step {self.value:g}/{self.max:g}")
        if self.percent is not None:
            parts.append(f"{self.percent:.0f}% overall")
        return (self.node or "") + (": " if self.node and parts else "") + ", ".join(parts)


def job_status(view: Mapping[str, Any]) -> JobStatus:
    """What ``view`` (a job's ``VIEW``) says, as ``JobStatus``; pure."""
    state = str(view.get("state") or "unknown")
    progress = view.get("progress")
    progress = progress if isinstance(progress, Mapping) else {}
    instance = view.get("instance_id")
    on = f" on instance {instance}" if instance is not None else ""
    if state == "queued":
        position = view.get("queue_position")
        headline = f"queued (position {position})" if position else "queued"
        attempts, most = int(view.get("attempts") or 0), view.get("max_attempts")
        if attempts:
            headline += f", attempt {attempts + 1}" + (f" of {most}" if most else "")
    elif state in ("placed", "running"):
        headline = f"{state}{on}"
        phase = progress.get("state")
        if phase == "uploading":
            headline += ": sending the inputs to ComfyUI"
        elif phase == "queued":
            position = progress.get("queue_position")
            headline += ": in ComfyUI's queue" + (f" (position {position})" if position else "")
        elif phase == "collecting":
            headline += ": bringing the outputs back"
    else:
        headline = state
    if view.get("cancel_requested") and state not in ("cancelled", "succeeded", "failed"):
        headline += " (cancelling)"
    running = state == "running" and progress.get("state") in (None, "running")
    node = _node_label(progress) if running else None
    return JobStatus(
        state=state,
        headline=headline,
        node=node,
        value=_number(progress.get("value")) if node else None,
        max=_number(progress.get("max")) if node else None,
        percent=_number(progress.get("percent")) if state in ("placed", "running") else None,
    )


def _node_label(progress: Mapping[str, Any]) -> str | None:
    node_id, node_type, title = (
        progress.get("node_id"),
        progress.get("node_type"),
        progress.get("node_title"),
    )
    if node_id is None and not node_type:
        return None
    name = str(node_type or "node")
    if title and title != node_type:
        name += f' "{title}"'
    return name + (f" (node {node_id})" if node_id is not None else "")


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# ---------------------------------------------------------------- displays


class JobDisplay(Protocol):
    """Where following a job shows it."""

    def show(self, view: Mapping[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class PlainJobDisplay:
    """Plain lines for logs and pipes: each change of state, the running node's steps
    when the node changes and every few seconds."""

    def __init__(
        self,
        out: Console,
        *,
        steps_every_s: float = PLAIN_STEPS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.steps_every_s = steps_every_s
        self.clock = clock
        self._started = clock()
        self._headline: str | None = None
        self._node: str | None = None
        self._steps: str | None = None
        self._steps_at = float("-inf")

    def _line(self, text: str, style: str = "") -> None:
        stamp = f"[{self.clock() - self._started:6.1f}s] "
        self.out.print(Text(stamp + text, style=style), soft_wrap=True, highlight=False)

    def show(self, view: Mapping[str, Any]) -> None:
        status = job_status(view)
        if status.ended:
            return
        if status.headline != self._headline:
            self._headline = status.headline
            self._line(status.headline, "bold")
        steps = status.steps() if status.node else None
        if steps is None or steps == self._steps:
            return
        now = self.clock()
        if status.node == self._node and now - self._steps_at < self.steps_every_s:
            return
        self._node, self._steps, self._steps_at = status.node, steps, now
        self._line(f"  {steps}")

    def note(self, text: str) -> None:
        self._line(text, "dim")

    def close(self) -> None:
        return None


class LiveJobDisplay:
    """A live Rich display: the job's headline and elapsed time, the overall percent and
    the running node's step bar; each change of state stays printed above it."""

    def __init__(self, out: Console, job_id: str) -> None:
        from rich.live import Live

        self.out = out
        self.job_id = job_id
        self._started = time.monotonic()
        self._status = JobStatus("submitted", "submitted")
        self._live: Live = Live(
            get_renderable=self._render, console=out, refresh_per_second=8, transient=True
        )
        self._live.start()

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        status = self._status
        elapsed = _duration(time.monotonic() - self._started)
        head = Text.assemble(
            (f"job {self.job_id} ", "bold"), (status.headline, "bold cyan"), (f"  {elapsed}", "dim")
        )
        if status.percent is None and status.node is None:
            return head
        bars = Table.grid(padding=(0, 1))
        bars.add_column(no_wrap=True, max_width=48, overflow="ellipsis")
        bars.add_column(width=40)
        bars.add_column(justify="right", no_wrap=True)
        if status.percent is not None:
            bars.add_row(
                "  overall",
                ProgressBar(total=100, completed=min(status.percent, 100), width=40),
                f"{status.percent:3.0f}%",
            )
        if status.node is not None:
            total = status.max or None
            done = status.value or 0
            bars.add_row(
                f"  {status.node}",
                ProgressBar(total=total, completed=done, width=40),
                f"{done:g}/{total:g}" if total else "",
            )
        return Group(head, bars)

    def show(self, view: Mapping[str, Any]) -> None:
        status = job_status(view)
        if status.headline != self._status.headline and not status.ended:
            self._live.console.print(Text(status.headline, style="bold"), highlight=False)
        self._status = status
        self._live.refresh()

    def note(self, text: str) -> None:
        self._live.console.print(Text(text, style="dim"), soft_wrap=True, highlight=False)

    def close(self) -> None:
        self._live.stop()


def display_for(out: Console, job_id: str) -> JobDisplay:
    return LiveJobDisplay(out, job_id) if out.is_terminal else PlainJobDisplay(out)


# ---------------------------------------------------------------- following


class _Interrupts:
    """Ctrl-C while a job is followed: the first asks for a cancel (the follow stops and
    the job is cancelled); any other, or one outside the follow, stops at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.armed = True

    def __call__(self) -> None:
        if self.armed and not self.event.is_set():
            self.event.set()
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self)
        except (NotImplementedError, RuntimeError):
            # No loop signal handlers here (Windows): Ctrl-C stops without a cancel.
            yield self
            return
        try:
            yield self
        finally:
            loop.remove_signal_handler(signal.SIGINT)


async def follow_job(
    control: ControlClient,
    job_id: str,
    display: JobDisplay,
    *,
    timeout_s: float | None,
    stop: asyncio.Event,
) -> tuple[str, dict[str, Any] | None]:
    """Show ``job_id``'s views on ``display`` until it ends, ``timeout_s`` passes or
    ``stop`` is set: ``("ended" | "timeout" | "interrupted", the last view seen)``."""
    last: dict[str, Any] | None = None

    async def views() -> None:
        nonlocal last
        async with contextlib.aclosing(control.job_events(job_id)) as events:
            async for view in events:
                last = view
                display.show(view)

    following = asyncio.create_task(views())
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {following, stopped}, timeout=timeout_s or None, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopped.cancel()
        if not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
    if following in done:
        following.result()
        return "ended", last
    return ("interrupted" if stopped in done else "timeout"), last


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    """How a run ended: the exit status, the line that says so, the job as last seen and
    the files written."""

    code: int
    message: str
    view: dict[str, Any] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    webhook_secret: str | None = None

    def payload(self) -> dict[str, Any]:
        """The ``--json`` document."""
        body: dict[str, Any] = {
            "job": self.view,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "files": self.files,
            "exit_code": self.code,
            "message": self.message,
        }
        if self.webhook_secret is not None:
            body["webhook_secret"] = self.webhook_secret
        return body


def _local_name(name: str) -> str | None:
    """``name`` as a file name in ``--out``; None for a name that could leave the folder."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return None if base in ("", ".", "..") or "\0" in base else base


async def _cancel(
    control: ControlClient, job_id: str, why: str
) -> tuple[str, dict[str, Any] | None]:
    from comfyfleet.control_client import ControlPlaneError

    try:
        view = await control.cancel_job(job_id)
    except ControlPlaneError as error:
        return f"{why}; job {job_id} could not be cancelled: {error}", None
    if view.get("state") == "cancelled":
        return f"{why}: cancelled job {job_id}", view
    if view.get("state") in ("succeeded", "failed"):
        return f"{why}; job {job_id} had already {view['state']}", view
    return f"{why}: asked to cancel job {job_id}; its instance interrupts it", view


async def _download_all(
    control: ControlClient, view: Mapping[str, Any], out_dir: Path, shown: Console | None
) -> list[dict[str, Any]]:
    outputs = [o for o in view.get("outputs") or [] if isinstance(o, Mapping)]
    try:
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the output folder: {error.strerror or error}", source=str(out_dir)
        ) from error
    files = []
    for output in outputs:
        name = str(output.get("name") or "")
        local = _local_name(name)
        if local is None:
            err_console.print(f"[yellow]skipped output {escape(repr(name))}: not a file name[/]")
            continue
        dest = out_dir / local
        size = await control.download_output(
            str(view["id"]), name, dest, sha256=output.get("sha256")
        )
        files.append(
            {
                "name": name,
                "path": str(dest),
                "size": size,
                "sha256": output.get("sha256"),
                "kind": output.get("kind"),
                "content_type": output.get("content_type"),
            }
        )
        if shown is not None:
            shown.print(f"{escape(str(dest))}  {_size(size)}", highlight=False, soft_wrap=True)
    return files


def _ended(view: dict[str, Any]) -> RunResult:
    job_id, state = view.get("id"), view.get("state")
    error = str(view.get("error") or "").strip()
    if state == "succeeded":
        timing = view.get("timing") or {}
        ran = timing.get("running_s") if isinstance(timing, Mapping) else None
        where = f" on instance {view['instance_id']}" if view.get("instance_id") else ""
        took = f" in {_duration(float(ran))}" if isinstance(ran, int | float) else ""
        cost = f" (${float(view['cost']):.4f})" if view.get("cost") is not None else ""
        return RunResult(EXIT_SUCCEEDED, f"job {job_id} succeeded{took}{where}{cost}", view)
    if state == "cancelled":
        return RunResult(EXIT_FAILED, f"job {job_id} was cancelled", view)
    code = EXIT_TIMEOUT if error.startswith("timed out") else EXIT_FAILED
    return RunResult(code, f"job {job_id} failed: {error or 'no reason given'}", view)


@dataclass
class _Known:
    """What a run knew when the control plane failed it: the job, and how it had ended."""

    job_id: str | None = None
    state: str | None = None


async def _submit_and_follow(
    request: JobRequest,
    *,
    server: str | None,
    wait: bool,
    timeout_s: float | None,
    out_dir: Path | None,
    out: Console,
    as_json: bool,
    known: _Known,
) -> RunResult:
    from comfyfleet.control_client import ControlClient, ControlPlaneError

    interrupts = _Interrupts()
    with interrupts.installed():
        async with ControlClient.from_env(server) as control:
            control.job_key_source()
            view = await control.submit_job(request.workflow, request.inputs, request.params)
            if not view.get("id"):
                raise ControlPlaneError(
                    f"{control.base_url} accepted the job without giving its id: is it a "
                    "comfyfleet control plane?"
                )
            job_id = known.job_id = str(view["id"])
            secret = view.pop("webhook_secret", None)
            status = job_status(view)
            if as_json:
                err_console.print(f"submitted job {job_id}", highlight=False)
            else:
                console.print(
                    Text.assemble(
                        ("submitted job ", ""),
                        (job_id, "bold"),
                        (f" (profile {view.get('profile')}, {status.headline})", ""),
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
                if secret:
                    console.print(
                        f"webhook secret (shown once, verifies X-Comfyfleet-Signature): {secret}",
                        highlight=False,
                        soft_wrap=True,
                    )
            if not wait:
                return RunResult(EXIT_SUCCEEDED, f"submitted job {job_id}", view, [], None, secret)
            how, last = "interrupted", view
            if not interrupts.event.is_set():
                display = display_for(out, job_id)
                try:
                    how, seen = await follow_job(
                        control, job_id, display, timeout_s=timeout_s, stop=interrupts.event
                    )
                finally:
                    display.close()
                last = seen or last
            interrupts.armed = False
            if how == "interrupted":
                message, cancelled = await _cancel(control, job_id, "interrupted")
                return RunResult(EXIT_INTERRUPTED, message, cancelled or last, [], None, secret)
            if how == "timeout":
                message, cancelled = await _cancel(
                    control, job_id, f"timed out after {_duration(timeout_s or 0)}"
                )
                return RunResult(EXIT_TIMEOUT, message, cancelled or last, [], None, secret)
            assert last is not None
            known.state = str(last.get("state"))
            result = _ended(last)
            result.webhook_secret = secret
            if result.code == EXIT_SUCCEEDED:
                if not as_json:
                    console.print(Text(result.message, style="bold green"), highlight=False)
                result.out_dir = out_dir or Path("outputs") / job_id
                result.files = await _download_all(
                    control, last, result.out_dir, None if as_json else console
                )
                if not result.files and not as_json:
                    console.print("the job has no outputs", style="yellow")
            return result


# ---------------------------------------------------------------- the command

ImageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--image",
        "-i",
        metavar="[NODE=]PATH",
        help="An image to upload into a LoadImage node (repeatable). NODE (an id or a title) "
        "says which; without it the workflow's only LoadImage takes it.",
        show_default=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="NODE.INPUT=VALUE",
        help="Set a node's input (repeatable); NODE is an id, class_type or title, VALUE is "
        "JSON when it parses (30, 7.5, true), else text. Wins over --prompt.",
        show_default=False,
    ),
]


@friendly
def run(
    workflow: Annotated[
        Path,
        typer.Argument(
            help="The workflow in ComfyUI's API format (Workflow > Export (API)).",
            show_default=False,
        ),
    ],
    image: ImageOption = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            metavar="TEXT",
            help="The positive prompt, set on the text encoder that feeds the sampler.",
            show_default=False,
        ),
    ] = None,
    set_: SetOption = None,
    random_seeds: Annotated[
        bool,
        typer.Option(
            "--random-seeds/--seed-fixed",
            help="Draw a new seed for every sampler (but those set with --set), or keep "
            "the workflow's.",
        ),
    ] = True,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            help="The profile whose instances run it (optional when the fleet has one).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Where the outputs go. Default: ./outputs/<job id>.",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[
        int, typer.Option("--priority", metavar="N", help="Higher runs sooner.")
    ] = 0,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0,
            metavar="SECONDS",
            help="Cancel the job and exit 124 if it has not ended after this long; the "
            "control plane enforces it too, on each attempt from its placement on an "
            "instance. 0: no limit.",
        ),
    ] = 0.0,
    webhook: Annotated[
        str | None,
        typer.Option(
            "--webhook",
            metavar="URL",
            help="An https URL the control plane POSTs the job's end to, signed.",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Follow the job and fetch its outputs."),
    ] = True,
    as_json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Run a ComfyUI workflow on the fleet and download its outputs.

    The workflow is checked here first (API format, --image files, --set
    addresses), then submitted to the control plane's queue; the job id is
    printed and the job followed live: its queue position, the instance it
    runs on, the node running with its steps and the overall percent (plain
    lines when the output is not a terminal). On success every output
    (images, videos, gifs, text...) is streamed into --out, verified by
    sha256, and listed with its size. Ctrl-C cancels the job. With --json,
    stdout holds one JSON document: the job's final view, the local files,
    the exit status; the progress goes to stderr.

    [bold]Examples[/]

    comfyfleet run flux.json --prompt "a lighthouse at dusk"

    comfyfleet run img2img.json --image photo.png --set KSampler.denoise=0.6 -o out/

    comfyfleet run two_inputs.json --image 10=face.png --image "Pose image=pose.png"

    comfyfleet run sdxl.json --set 3.seed=42 --set KSampler.steps=30 --timeout 600

    comfyfleet run sdxl.json --no-wait --json

    [bold]Key and server[/]

    The key is $COMFYFLEET_API_KEY (a user key, cf_..., made by `comfyfleet
    keys create NAME`), sent as Authorization: Bearer and never printed; where
    it is not set, $ADMIN_API_KEY is used. The control plane is --server, else
    $COMFYFLEET_SERVER, else http://127.0.0.1:8700.

    [bold]Exit status[/]

    0 the job succeeded and its outputs are saved (with --no-wait: submitted);
    1 the job failed (ComfyUI's reason is printed) or was cancelled; 2 a
    mistake found before submitting (a UI-format workflow, a missing file, a
    bad --set or --image, no key or a refused one); 3 the control plane is
    unreachable or refused the job (an unknown profile...); 124 --timeout
    passed (the job is cancelled), or the control plane timed the job out;
    130 Ctrl-C (the job is cancelled).
    """
    from comfyfleet.control_client import ControlPlaneError

    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError("is a file, not a folder for the outputs", source=f"--out {out}")
    request = prepare_job(
        workflow,
        images=image or [],
        prompt=prompt,
        sets=set_ or [],
        randomize_seeds=random_seeds,
        profile=profile,
        priority=priority,
        timeout_s=timeout or None,
        webhook_url=webhook,
    )
    shown = err_console if as_json else console
    known = _Known()
    try:
        result = run_coroutine(
            _submit_and_follow(
                request,
                server=server,
                wait=wait,
                timeout_s=timeout or None,
                out_dir=out,
                out=shown,
                as_json=as_json,
                known=known,
            )
        )
    except ControlPlaneError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        if known.state == "succeeded":
            err_console.print(
                f"job {known.job_id} succeeded; its outputs stay on the control plane "
                f"(GET /api/jobs/{known.job_id}/outputs/NAME)",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
        elif known.job_id is not None:
            err_console.print(
                f"job {known.job_id} was submitted before this; it goes on without this command",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_CONTROL_PLANE) from None
    if as_json:
        console.print_json(data=result.payload())
    elif result.code != EXIT_SUCCEEDED:
        err_console.print(Text(result.message, style="bold red"), soft_wrap=True, highlight=False)
    if result.code:
        raise typer.Exit(result.code)
