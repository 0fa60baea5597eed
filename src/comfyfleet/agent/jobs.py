"""The agent's job runner: one job, run to its end on the instance's local ComfyUI.

``run_job(client, spec, sink, workdir=...)`` uploads the job's inputs (``/upload/image``;
when ComfyUI stores a file under another name because a different one has that name,
the workflow's references are rewritten to the stored name), queues the API-format
workflow, follows it over the WebSocket (``ComfyClient`` reconnects after a drop and
polls ``/history`` and ``/queue`` while the socket is down, so a lost socket never loses
the job), then fetches every output through ``/view`` (images, animated WebP, gifs,
videos, audio, latents: whatever the history lists with a file name; text outputs are
written to ``.txt`` files), hashing each while it streams to a temporary file, and hands
each one to the sink before the single ``finished`` call.

The control plane is behind ``JobSink``: progress snapshots (queue position, the node
running, its step, an overall percent), outputs (a file with its sha256 and size) and the
outcome (``succeeded``, ``failed``, ``cancelled`` or ``timed_out``, with a reason a person
can read: ComfyUI's validation errors one node per line, an execution error with its node
and exception). A cancel (``cancel`` set) or the job's timeout removes the prompt from
ComfyUI's queue or interrupts it, and waits until ComfyUI confirms before finishing.

``ProgressTracker``, ``queue_position`` and ``rewrite_input_references`` are the pure
parts, tested with plain data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from comfyfleet.agent.comfy import (
    ComfyClient,
    OutputFile,
    PromptResult,
    QueuedPrompt,
    describe_validation_error,
    workflow_graph,
)
from comfyfleet.errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyPromptLost,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
    ConfigError,
)

__all__ = [
    "JobOutcome",
    "JobOutput",
    "JobProgress",
    "JobSink",
    "JobSpec",
    "JobState",
    "JobStatus",
    "ProgressTracker",
    "TextOutput",
    "file_chunks",
    "queue_position",
    "rewrite_input_references",
    "run_job",
    "text_outputs",
]

log = logging.getLogger(__name__)

JobStatus = Literal["succeeded", "failed", "cancelled", "timed_out"]
JobState = Literal["uploading", "queued", "running", "collecting"]

DEFAULT_QUEUE_POLL_S: Final = 1.0
DEFAULT_STOP_GRACE_S: Final = 15.0
# Percent shown while ComfyUI still runs: 100 means ComfyUI reported success.
_RUNNING_CAP: Final = 99.0
_INPUT_ANNOTATION: Final = " [input]"


# --------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class JobSpec:
    """One job as the control plane hands it to the agent.

    ``workflow`` is API-format (already parameterized); ``inputs`` maps a file name to its
    bytes or a local file, uploaded as ComfyUI ``input`` files that the workflow names;
    ``timeout_s`` bounds the whole job on this instance (``None``: no deadline).
    """

    job_id: str
    lease_id: str
    workflow: Mapping[str, Any]
    inputs: Mapping[str, bytes | Path] = field(default_factory=dict)
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.job_id or not self.lease_id:
            raise ValueError("a job needs a job_id and a lease_id")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {self.timeout_s}")


@dataclass(frozen=True)
class JobProgress:
    """A snapshot of where a job stands. ``queue_position``: 0 running, 1 runs next...;
    ``value``/``max``: the running node's steps (a sampler's); ``percent``: the whole
    workflow, 100 only once ComfyUI reported success."""

    state: JobState
    percent: float = 0.0
    queue_position: int | None = None
    node_id: str | None = None
    node_type: str | None = None
    node_title: str | None = None
    value: float | None = None
    max: float | None = None
    prompt_id: str | None = None


@dataclass(frozen=True)
class JobOutput:
    """One output handed to the control plane. ``name`` is a base name unique within the
    job; ``kind`` the history key it came under (``images``, ``gifs``, ``audio``,
    ``text``...); ``temporary`` marks ComfyUI ``temp`` files (previews)."""

    name: str
    kind: str
    node_id: str
    sha256: str
    size: int
    content_type: str
    temporary: bool = False


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, as ``finished`` receives it and ``run_job`` returns it.

    ``reason`` is for a person (``None`` on success). ``error`` is a code for the control
    plane: ``workflow``, ``upload``, ``validation``, ``execution``, ``interrupted``,
    ``prompt_lost``, ``comfy_unavailable``, ``comfy_error``, ``output``, ``agent``,
    ``cancelled``, ``timed_out``. ``retryable``: the job itself is not at fault (ComfyUI
    restarted or stopped answering, an output could not be stored), so another attempt
    may succeed.
    """

    status: JobStatus
    reason: str | None = None
    error: str | None = None
    prompt_id: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    outputs: tuple[JobOutput, ...] = ()
    retryable: bool = False
    duration_s: float = 0.0


class JobSink(Protocol):
    """What the control plane implements (over HTTP, with the lease) to follow a job.

    ``output`` gets a file at ``path`` that exists until the call returns: stream it from
    there (``file_chunks``). Every ``output`` comes before the one ``finished``. An
    exception from ``output`` fails the job (retryable); one from ``progress`` is logged
    and ignored; one from ``finished`` propagates to ``run_job``'s caller.
    """

    async def progress(self, job_id: str, lease_id: str, event: JobProgress) -> None: ...

    async def output(self, job_id: str, lease_id: str, output: JobOutput, path: Path) -> None: ...

    async def finished(self, job_id: str, lease_id: str, result: JobOutcome) -> None: ...


async def file_chunks(path: Path, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
    """The bytes of ``path`` in chunks, read in a thread: a streamed upload's body."""
    fh = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, chunk_size):
            yield chunk
    finally:
        await asyncio.to_thread(fh.close)


# --------------------------------------------------------------------------- pure parts


def rewrite_input_references(
    graph: Mapping[str, Any], renames: Mapping[str, str]
) -> dict[str, Any]:
    """A copy of ``graph`` whose literal inputs that name an uploaded file (``x.png``, or
    ``x.png [input]``) name the file as ComfyUI stored it (``renames[x.png]``)."""
    out: dict[str, Any] = {}
    for node_id, node in graph.items():
        copied = dict(node)
        inputs = node.get("inputs")
        if isinstance(inputs, Mapping):
            copied["inputs"] = {name: _renamed(value, renames) for name, value in inputs.items()}
        out[node_id] = copied
    return out


def _renamed(value: Any, renames: Mapping[str, str]) -> Any:
    if not isinstance(value, str):
        return value
    if value in renames:
        return renames[value]
    base = value.removesuffix(_INPUT_ANNOTATION)
    if base != value and base in renames:
        return renames[base] + _INPUT_ANNOTATION
    return value


def queue_position(queue: Mapping[str, Any], prompt_id: str) -> int | None:
    """Where ``prompt_id`` stands in a ``GET /queue`` answer: 0 running, 1 next, 2 after
    that...; ``None`` when it is not there. Pending items are in heap order on the wire:
    ComfyUI runs them by ``number``, then prompt id."""

    def entries(key: str) -> list[list[Any]]:
        items = queue.get(key)
        return [e for e in items or [] if isinstance(e, list) and len(e) > 1]

    if any(e[1] == prompt_id for e in entries("queue_running")):
        return 0
    pending = sorted(entries("queue_pending"), key=lambda e: (_number(e[0]), str(e[1])))
    for index, entry in enumerate(pending):
        if entry[1] == prompt_id:
            return index + 1
    return None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


@dataclass(frozen=True)
class TextOutput:
    """A text a node reported (``PreviewAny``'s ``text``), to be handed over as a file."""

    node_id: str
    index: int
    text: str

    @property
    def name(self) -> str:
        return f"text_{self.node_id}_{self.index}.txt"


def text_outputs(outputs: Mapping[str, Any]) -> list[TextOutput]:
    """Every ``text`` entry of a history's ``outputs``, in node order."""
    found = []
    for node_id, kinds in outputs.items():
        entries = kinds.get("text") if isinstance(kinds, Mapping) else None
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            text = entry if isinstance(entry, str) else json.dumps(entry)
            found.append(TextOutput(str(node_id), index, text))
    return found


class ProgressTracker:
    """Turns one prompt's WebSocket messages into ``JobProgress`` snapshots; no I/O.

    The overall percent counts the graph's nodes that are not served from the cache:
    finished ones, plus the running node's step fraction. It never goes back, and stays
    below 100 until ``done``. ``queued``/``feed`` return a snapshot only when it changed.
    """

    def __init__(self, graph: Mapping[str, Any], prompt_id: str | None = None) -> None:
        self.graph = graph
        self.prompt_id = prompt_id
        self.state: JobState = "queued"
        self.position: int | None = None
        self.cached: set[str] = set()
        self.finished: set[str] = set()
        self.current: str | None = None
        self.value: float | None = None
        self.max: float | None = None
        self.percent = 0.0
        self._last: JobProgress | None = None

    def queued(self, position: int | None) -> JobProgress | None:
        """A ``/queue`` reading; ignored once the prompt runs."""
        if self.state != "queued":
            return None
        if position == 0:
            self.state = "running"
        self.position = position
        return self._changed()

    def feed(self, message: Mapping[str, Any]) -> JobProgress | None:
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, Mapping):
            return None
        if kind == "execution_start":
            self._running()
        elif kind == "execution_cached":
            nodes = data.get("nodes")
            self.cached |= {str(n) for n in nodes} if isinstance(nodes, list) else set()
            self._running()
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                return None
            self._running()
            self._enter(str(node))
        elif kind == "progress":
            self._running()
            node = data.get("node")
            self._enter(str(node) if node is not None else self.current)
            value, total = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(total, int | float):
                self.value, self.max = float(value), float(total)
        elif kind == "progress_state":
            nodes = data.get("nodes")
            for node_id, entry in nodes.items() if isinstance(nodes, Mapping) else ():
                if isinstance(entry, Mapping) and entry.get("state") == "finished":
                    self.finished.add(str(node_id))
        elif kind == "executed":
            node = data.get("node")
            if node is not None:
                self.finished.add(str(node))
        else:
            return None
        return self._changed()

    def done(self) -> JobProgress:
        """ComfyUI reported success: 100%, outputs being collected."""
        self.state = "collecting"
        self.percent = 100.0
        self.current, self.value, self.max = None, None, None
        self._last = self._snapshot()
        return self._last

    def _running(self) -> None:
        if self.state == "queued":
            self.state = "running"
            self.position = 0

    def _enter(self, node: str | None) -> None:
        if node == self.current:
            return
        if self.current is not None:
            self.finished.add(self.current)
        self.current, self.value, self.max = node, None, None

    def _compute_percent(self) -> float:
        counted = [n for n in self.graph if n not in self.cached]
        if not counted:
            return self.percent
        done = sum(1 for n in counted if n in self.finished)
        fraction = 0.0
        current = self.current
        if current in counted and current not in self.finished and self.max:
            fraction = min(1.0, max(0.0, (self.value or 0.0) / self.max))
        share = 100.0 * (done + fraction) / len(counted)
        return max(self.percent, min(_RUNNING_CAP, share))

    def _snapshot(self) -> JobProgress:
        node = self.graph.get(self.current) if self.current is not None else None
        node = node if isinstance(node, Mapping) else {}
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, Mapping) else None
        return JobProgress(
            state=self.state,
            percent=round(self.percent, 1),
            queue_position=self.position,
            node_id=self.current,
            node_type=str(node["class_type"]) if "class_type" in node else None,
            node_title=str(title) if title is not None else None,
            value=self.value,
            max=self.max,
            prompt_id=self.prompt_id,
        )

    def _changed(self) -> JobProgress | None:
        self.percent = self._compute_percent()
        snapshot = self._snapshot()
        if snapshot == self._last:
            return None
        self._last = snapshot
        return snapshot


# --------------------------------------------------------------------------- the runner


class _PartialWorkflow(Exception):
    """ComfyUI queued the prompt but dropped the part of the graph that failed validation."""

    def __init__(self, node_errors: Mapping[str, Any]) -> None:
        self.node_errors = node_errors
        super().__init__("part of the workflow failed validation")


class _HandOverFailed(Exception):
    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        super().__init__(f"could not hand over output {name!r}: {error or type(error).__name__}")


class _ProgressPump:
    """Sends progress snapshots one at a time; a slow sink gets the latest, not a backlog."""

    def __init__(self, send: Callable[[JobProgress], Awaitable[None]]) -> None:
        self._send = send
        self._latest: JobProgress | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def push(self, event: JobProgress | None) -> None:
        if event is not None and not self._closing:
            self._latest = event
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            event, self._latest = self._latest, None
            if event is not None:
                try:
                    await self._send(event)
                except Exception as error:  # progress is advisory: the job goes on
                    log.warning("progress report failed: %s", error)
            if self._closing and self._latest is None:
                return

    async def close(self) -> None:
        """Deliver the latest snapshot, then stop."""
        self._closing = True
        self._wake.set()
        await self._task

    async def abandon(self) -> None:
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def run_job(
    client: ComfyClient,
    spec: JobSpec,
    sink: JobSink,
    *,
    cancel: asyncio.Event | None = None,
    workdir: Path,
    queue_poll_s: float = DEFAULT_QUEUE_POLL_S,
    stop_grace_s: float = DEFAULT_STOP_GRACE_S,
) -> JobOutcome:
    """Run ``spec`` on the ComfyUI behind ``client`` and report it to ``sink``.

    Returns the outcome that ``sink.finished`` received (exactly once). Setting
    ``cancel`` stops the job: the prompt leaves ComfyUI's queue, or is interrupted, and
    the job ends ``cancelled``; past ``spec.timeout_s`` (on the client's clock) the same
    happens and it ends ``timed_out``. Temporary files live under ``workdir`` and are
    removed at the end. ``queue_poll_s`` paces queue-position reads while the prompt
    waits; ``stop_grace_s`` bounds the wait for ComfyUI to confirm a stop. If the task
    running this is cancelled, the prompt is stopped and nothing is reported: the lease
    runs out and the control plane decides.
    """
    run = _JobRun(client, spec, sink, workdir, queue_poll_s, stop_grace_s)
    return await run.execute(cancel)


class _JobRun:
    def __init__(
        self,
        client: ComfyClient,
        spec: JobSpec,
        sink: JobSink,
        workdir: Path,
        queue_poll_s: float,
        stop_grace_s: float,
    ) -> None:
        self.client = client
        self.spec = spec
        self.sink = sink
        self.clock = client.clock
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", spec.job_id)[:64]
        self.dir = workdir / f"job-{safe_id}-{uuid.uuid4().hex[:8]}"
        self.queue_poll_s = queue_poll_s
        self.stop_grace_s = stop_grace_s
        self.phase = "starting"
        self.prompt_id: str | None = None
        self.posting = False
        self.queued = asyncio.Event()
        self.outputs: list[JobOutput] = []
        self.tracker: ProgressTracker | None = None
        self.pump = _ProgressPump(self._send_progress)
        self.started = self.clock.now()
        self.reported = False

    async def _send_progress(self, event: JobProgress) -> None:
        await self.sink.progress(self.spec.job_id, self.spec.lease_id, event)

    # -- the whole run, with cancel and timeout

    async def execute(self, cancel: asyncio.Event | None) -> JobOutcome:
        if cancel is not None and cancel.is_set():
            return await self._finish(self._outcome("cancelled", "cancelled before it started"))
        work = asyncio.create_task(self._work())
        stoppers: dict[asyncio.Task[Any], JobStatus] = {}
        if cancel is not None:
            stoppers[asyncio.create_task(cancel.wait())] = "cancelled"
        if self.spec.timeout_s is not None:
            stoppers[asyncio.create_task(self.clock.sleep(self.spec.timeout_s))] = "timed_out"
        try:
            done, _ = await asyncio.wait({work, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                outcome = work.result()
            else:
                status = next(stoppers[t] for t in done if t in stoppers)
                outcome = await self._stop(work, status)
        except asyncio.CancelledError:
            await self._abandon(work)
            raise
        finally:
            for task in stoppers:
                task.cancel()
        try:
            return await self._finish(outcome)
        finally:
            await asyncio.to_thread(shutil.rmtree, self.dir, ignore_errors=True)

    async def _stop(self, work: asyncio.Task[JobOutcome], status: JobStatus) -> JobOutcome:
        phase = self.phase
        if self.posting and not self.queued.is_set() and not work.done():
            # A POST /prompt in flight may still land: let it, so that the prompt is
            # stopped for sure rather than left to run unobserved.
            landed = asyncio.create_task(self.queued.wait())
            await asyncio.wait(
                {work, landed},
                timeout=self.client.timeout_s + 1.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
            landed.cancel()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        note = await self._stop_prompt()
        if status == "cancelled":
            reason = f"cancelled while {phase}"
        else:
            reason = f"the job ran past its timeout of {self.spec.timeout_s:g} s while {phase}"
        return self._outcome(status, reason + note, error=status)

    async def _stop_prompt(self) -> str:
        """Take the prompt out of ComfyUI's queue or interrupt it; say how it went."""
        prompt_id = self.prompt_id
        if prompt_id is None or not self.queued.is_set():
            return ""
        try:
            # Deleting first: a prompt that starts between the two calls is still interrupted.
            await self.client.delete_queued(prompt_id)
            await self.client.interrupt(prompt_id)
        except ComfyError as error:
            return f"; could not reach ComfyUI to stop prompt {prompt_id}: {error}"
        try:
            await self.client.wait(prompt_id, timeout_s=self.stop_grace_s)
        except ComfyInterrupted as stopped:
            return f"; ComfyUI interrupted prompt {prompt_id} at {_where(stopped)}"
        except ComfyPromptLost:
            return f"; prompt {prompt_id} was removed from ComfyUI's queue before it ran"
        except ComfyTimeout:
            return f"; ComfyUI did not stop prompt {prompt_id} within {self.stop_grace_s:g} s"
        except ComfyExecutionError as failed:
            return f"; prompt {prompt_id} failed meanwhile at {_where(failed)}"
        except ComfyError as error:
            return f"; could not confirm that ComfyUI stopped prompt {prompt_id}: {error}"
        return f"; prompt {prompt_id} had already finished in ComfyUI"

    async def _abandon(self, work: asyncio.Task[JobOutcome]) -> None:
        """The caller gave up on the job: stop the prompt, report nothing."""
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        await self.pump.abandon()
        if self.prompt_id is not None and self.queued.is_set():
            with contextlib.suppress(ComfyError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.client.delete_queued(self.prompt_id)
                    await self.client.interrupt(self.prompt_id)
        await asyncio.to_thread(shutil.rmtree, self.dir, ignore_errors=True)

    async def _finish(self, outcome: JobOutcome) -> JobOutcome:
        if self.reported:
            raise RuntimeError(f"job {self.spec.job_id} was already reported finished")
        self.reported = True
        await self.pump.close()
        await self.sink.finished(self.spec.job_id, self.spec.lease_id, outcome)
        return outcome

    def _outcome(self, status: JobStatus, reason: str | None = None, **kw: Any) -> JobOutcome:
        return JobOutcome(
            status=status,
            reason=reason,
            prompt_id=self.prompt_id if self.queued.is_set() else None,
            outputs=tuple(self.outputs),
            duration_s=max(0.0, self.clock.now() - self.started),
            **kw,
        )

    # -- the work: upload, run, collect

    async def _work(self) -> JobOutcome:
        try:
            graph = workflow_graph(self.spec.workflow, name=f"job {self.spec.job_id}")
            await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
            renames = await self._upload_inputs()
            graph = rewrite_input_references(graph, renames)
            result = await self._run_prompt(graph)
            self.phase = "collecting outputs"
            assert self.tracker is not None
            self.pump.push(self.tracker.done())
            await self._collect(result)
        except ConfigError as error:
            return self._outcome("failed", str(error), error="workflow")
        except ComfyValidationError as refused:
            return self._outcome("failed", str(refused), error="validation")
        except _PartialWorkflow as partial:
            note = await self._stop_prompt()
            body = {"error": {"message": str(partial)}, "node_errors": partial.node_errors}
            reason = describe_validation_error(body) + (f"\n  ({note[2:]})" if note else "")
            return self._outcome("failed", reason, error="validation")
        except ComfyInterrupted as stopped:
            reason = (
                f"ComfyUI interrupted prompt {stopped.prompt_id} at {_where(stopped)}, "
                "and this runner did not ask it to (another client's /interrupt?)"
            )
            return self._outcome(
                "failed", reason, error="interrupted", retryable=True, **_node(stopped)
            )
        except ComfyExecutionError as failed:
            return self._outcome("failed", str(failed), error="execution", **_node(failed))
        except ComfyPromptLost as lost:
            return self._outcome("failed", str(lost), error="prompt_lost", retryable=True)
        except ComfyUnavailable as down:
            reason = f"{down} (while {self.phase})"
            return self._outcome("failed", reason, error="comfy_unavailable", retryable=True)
        except ComfyError as error:
            code = "upload" if self.phase == "uploading inputs" else "comfy_error"
            return self._outcome("failed", f"{error} (while {self.phase})", error=code)
        except _HandOverFailed as error:
            return self._outcome("failed", str(error), error="output", retryable=True)
        except OSError as error:
            reason = f"the agent failed while {self.phase}: {error}"
            return self._outcome("failed", reason, error="agent", retryable=True)
        return self._outcome("succeeded")

    async def _upload_inputs(self) -> dict[str, str]:
        """Upload every input; the names ComfyUI stored under another name."""
        if not self.spec.inputs:
            return {}
        self.phase = "uploading inputs"
        self.pump.push(JobProgress(state="uploading"))
        renames = {}
        for name, data in self.spec.inputs.items():
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise ConfigError(
                    f"input file name {name!r} must be a plain file name (no folders)",
                    source=f"job {self.spec.job_id}",
                )
            try:
                stored = await self.client.upload_image(data, name=name, type="input")
            except OSError as error:
                raise ConfigError(
                    f"cannot read input {name!r}: {error.strerror or error}",
                    source=f"job {self.spec.job_id}",
                ) from error
            if stored.load_name != name:
                renames[name] = stored.load_name
        return renames

    async def _run_prompt(self, graph: dict[str, Any]) -> PromptResult:
        self.phase = "queueing the workflow"
        prompt_id = str(uuid.uuid4())
        tracker = self.tracker = ProgressTracker(graph, prompt_id)

        def on_queued(queued: QueuedPrompt) -> None:
            self.prompt_id = tracker.prompt_id = queued.prompt_id
            self.queued.set()
            self.phase = "waiting in ComfyUI's queue"
            if queued.node_errors:
                raise _PartialWorkflow(queued.node_errors)

        def on_message(message: dict[str, Any]) -> None:
            event = tracker.feed(message)
            if tracker.state == "running":
                self.phase = "running"
            self.pump.push(event)

        watcher = asyncio.create_task(self._watch_queue(tracker))
        self.prompt_id, self.posting = prompt_id, True
        try:
            return await self.client.run(
                graph, prompt_id=prompt_id, on_queued=on_queued, on_message=on_message
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_queue(self, tracker: ProgressTracker) -> None:
        """Report the prompt's place in ComfyUI's queue until it starts."""
        await self.queued.wait()
        while tracker.state == "queued":
            assert self.prompt_id is not None
            try:
                queue = await self.client.queue()
            except ComfyError:
                queue = None
            if queue is not None:
                self.pump.push(tracker.queued(queue_position(queue, self.prompt_id)))
                if tracker.position == 0:
                    self.phase = "running"
            await self.clock.sleep(self.queue_poll_s)

    async def _collect(self, result: PromptResult) -> None:
        """Fetch every output and hand each over, one at a time (one temporary file)."""
        taken: set[str] = set()
        seen: set[tuple[str, str, str]] = set()
        for file in result.files():
            key = (file.type, file.subfolder, file.filename)
            if key in seen:
                continue
            seen.add(key)
            name = _unique_name(Path(file.filename).name, taken)
            path = self.dir / f"output-{len(self.outputs)}"
            digest = hashlib.sha256()
            size = await self.client.view_to(file, path, on_chunk=digest.update)
            await self._hand_over(_output_for(file, name, digest.hexdigest(), size), path)
        for text in text_outputs(result.outputs):
            name = _unique_name(text.name, taken)
            path = self.dir / f"output-{len(self.outputs)}"
            sha256, size = await asyncio.to_thread(_write_text, path, text.text)
            output = JobOutput(
                name=name,
                kind="text",
                node_id=text.node_id,
                sha256=sha256,
                size=size,
                content_type="text/plain; charset=utf-8",
            )
            await self._hand_over(output, path)

    async def _hand_over(self, output: JobOutput, path: Path) -> None:
        try:
            await self.sink.output(self.spec.job_id, self.spec.lease_id, output, path)
        except Exception as error:
            raise _HandOverFailed(output.name, error) from error
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        self.outputs.append(output)


def _where(error: ComfyExecutionError) -> str:
    if error.node_id is None:
        return "the workflow"
    return f"node {error.node_id} ({error.node_type or '?'})"


def _node(error: ComfyExecutionError) -> dict[str, Any]:
    return {"node_id": error.node_id, "node_type": error.node_type}


def _output_for(file: OutputFile, name: str, sha256: str, size: int) -> JobOutput:
    return JobOutput(
        name=name,
        kind=file.kind,
        node_id=file.node_id,
        sha256=sha256,
        size=size,
        content_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
        temporary=file.type == "temp",
    )


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem_2.ext``, ``stem_3.ext``... when the job already has it."""
    name = name or "output"
    candidate, number = name, 1
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    while candidate in taken:
        number += 1
        candidate = f"{stem}_{number}{dot}{ext}"
    taken.add(candidate)
    return candidate


def _write_text(path: Path, text: str) -> tuple[str, int]:
    data = text.encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data)
