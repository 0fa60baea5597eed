"""ComfyUI on the instance: a small async API client, and the supervisor that keeps ComfyUI up.

``ComfyClient`` speaks ComfyUI's HTTP and WebSocket API (``/system_stats``,
``/object_info``, ``/prompt``, ``/history``, ``/queue``, ``/view``,
``/upload/image``, ``/interrupt``, ``/free``, ``/ws``). It waits for a workflow on
the WebSocket (``executing`` with ``node: null`` is the end of every prompt) and
falls back to polling ``/history`` when the socket is unavailable, so a lost
socket slows a wait down but never breaks it. Refused workflows raise
``ComfyValidationError`` whose message lists ComfyUI's ``node_errors`` one node
per line.

``ComfySupervisor`` starts ComfyUI (always on 127.0.0.1, its output appended to
a log file, never to a pipe that can fill), waits until it is ready (it answers
``/system_stats``, ``/object_info`` lists every node the workspace's workflows
use, and GPU memory in use is below 90%), runs an optional warm-up workflow once,
restarts ComfyUI when it dies with backoff, and gives up on a crash loop
(3 crashes within 5 minutes: reason ``comfy_crash_loop``). A pid file in the
workspace lets a restarted agent adopt the ComfyUI that is still running instead
of killing it or starting a second one. In attach mode (Vast's ComfyUI template
runs ComfyUI itself on 127.0.0.1:18188) it only waits for readiness and watches;
it never starts or kills anything.

Every wait goes through the injectable ``Clock``; the pure decisions (what a
workflow needs, whether ComfyUI is ready, whether crashes make a loop, how long to
back off) are plain functions tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp

from comfyfleet.agent.report import ErrorLog, Level, NullReporter, Reporter, Stage
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.errors import (
    ComfyError,
    ComfyExecutionError,
    ComfyFailed,
    ComfyHTTPError,
    ComfyInterrupted,
    ComfyMissingNodes,
    ComfyPromptLost,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
    ConfigError,
)

__all__ = [
    "DEFAULT_PORT",
    "LOOPBACK",
    "VAST_TEMPLATE_URL",
    "ComfyClient",
    "ComfyOptions",
    "ComfySupervisor",
    "CrashLoopDetector",
    "OutputFile",
    "PromptResult",
    "QueuedPrompt",
    "Readiness",
    "UploadedFile",
    "assess_readiness",
    "comfy_command",
    "describe_validation_error",
    "is_ui_format",
    "load_workflow",
    "nodes_used_by",
    "pid_alive",
    "restart_delay",
    "terminate_process",
    "vram_used_fraction",
    "workflow_graph",
    "workflow_node_types",
]

JSON = dict[str, Any]
MessageHandler = Callable[[JSON], None]

LOOPBACK: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8188
VAST_TEMPLATE_URL: Final = "http://127.0.0.1:18188"

# Seed 000 waited up to 15 minutes for ComfyUI and refused a GPU more than 90% full.
DEFAULT_READY_TIMEOUT_S: Final = 900.0
DEFAULT_MAX_VRAM_USED: Final = 0.9
DEFAULT_CRASH_LOOP_CRASHES: Final = 3
DEFAULT_CRASH_LOOP_WINDOW_S: Final = 300.0

# Failure reasons the supervisor reports (``Reporter.stage("failed", reason)``).
CRASH_LOOP: Final = "comfy_crash_loop"
WARMUP_FAILED: Final = "warmup_failed"
MISSING_NODES: Final = "comfy_missing_nodes"
GPU_MEMORY_BUSY: Final = "gpu_memory_busy"
NOT_READY: Final = "comfy_not_ready"
PORT_BUSY: Final = "comfy_port_busy"
START_FAILED: Final = "comfy_start_failed"

_LOG_TAIL_LINES: Final = 10


# --------------------------------------------------------------------------- workflows


def workflow_graph(workflow: Mapping[str, Any], *, name: str = "workflow") -> dict[str, Any]:
    """The API-format graph of ``workflow``: the graph itself, or the ``prompt`` of a
    ``POST /prompt`` body. ``name`` (a file name) goes into error messages.

    A UI-format workflow (``nodes`` and ``links`` lists) is refused with a hint: only
    the API format names the node types exactly as ComfyUI runs them.
    """
    graph: Any = workflow
    prompt = workflow.get("prompt")
    if isinstance(prompt, Mapping):
        graph = prompt
    if is_ui_format(graph):
        raise ConfigError(
            "this is a UI-format workflow; save it with ComfyUI's 'Export (API)' and use that file",
            source=name,
        )
    out: dict[str, Any] = {}
    for node_id, node in graph.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            raise ConfigError(
                f"node {node_id!r} has no class_type; expected an API-format workflow "
                '({"<id>": {"class_type": ..., "inputs": {...}}})',
                source=name,
            )
        out[str(node_id)] = dict(node)
    return out


def workflow_node_types(workflow: Mapping[str, Any], *, name: str = "workflow") -> set[str]:
    """The ``class_type`` of every node of an API-format workflow."""
    return {node["class_type"] for node in workflow_graph(workflow, name=name).values()}


def is_ui_format(workflow: Mapping[str, Any]) -> bool:
    """Whether ``workflow`` is in ComfyUI's UI format (``nodes`` and ``links`` lists)."""
    return isinstance(workflow.get("nodes"), list)


def load_workflow(path: Path) -> dict[str, Any]:
    """Read a workflow file (JSON object); ``workflow_graph`` checks its format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read workflow: {error}", source=str(path)) from error
    if not isinstance(data, dict):
        raise ConfigError("a workflow must be a JSON object", source=str(path))
    return data


def nodes_used_by(
    workflows: Iterable[Mapping[str, Any] | Path], *, skip_ui_format: bool = False
) -> frozenset[str]:
    """Every node type the workflows (mappings or API-format JSON files) use.

    A UI-format workflow raises ``ConfigError``, or is left out with
    ``skip_ui_format``: its node list also holds frontend-only nodes (notes,
    reroutes, JavaScript-only custom nodes) that ``/object_info`` never lists.
    """
    nodes: set[str] = set()
    for workflow in workflows:
        name = str(workflow) if isinstance(workflow, Path) else "workflow"
        data = load_workflow(workflow) if isinstance(workflow, Path) else workflow
        if skip_ui_format and is_ui_format(data):
            continue
        nodes |= workflow_node_types(data, name=name)
    return frozenset(nodes)


# --------------------------------------------------------------------------- readiness


def vram_used_fraction(system_stats: Mapping[str, Any]) -> float | None:
    """The highest fraction of memory in use over the devices of ``/system_stats``.

    ``None`` when no device reports its memory. With ``--cpu`` ComfyUI reports RAM
    as the device's memory, so a host out of RAM counts as busy too.
    """
    worst: float | None = None
    devices = system_stats.get("devices")
    for device in devices if isinstance(devices, list) else []:
        if not isinstance(device, Mapping):
            continue
        total, free = device.get("vram_total"), device.get("vram_free")
        if not isinstance(total, int | float) or not isinstance(free, int | float) or total <= 0:
            continue
        used = min(1.0, max(0.0, 1.0 - free / total))
        worst = used if worst is None else max(worst, used)
    return worst


@dataclass(frozen=True)
class Readiness:
    """What stands between an answering ComfyUI and ``ready``."""

    missing_nodes: tuple[str, ...] = ()
    vram_used: float | None = None
    max_vram_used: float | None = DEFAULT_MAX_VRAM_USED

    @property
    def vram_too_high(self) -> bool:
        return (
            self.max_vram_used is not None
            and self.vram_used is not None
            and self.vram_used >= self.max_vram_used
        )

    @property
    def ready(self) -> bool:
        return not self.missing_nodes and not self.vram_too_high

    def problem(self) -> str | None:
        """One line saying what is wrong, or ``None`` when ready."""
        parts = []
        if self.missing_nodes:
            parts.append("ComfyUI lacks the node types " + ", ".join(self.missing_nodes))
        if self.vram_too_high and self.vram_used is not None and self.max_vram_used is not None:
            parts.append(
                f"GPU memory in use is {self.vram_used:.0%}, "
                f"not below the limit of {self.max_vram_used:.0%}"
            )
        return "; ".join(parts) or None


def assess_readiness(
    system_stats: Mapping[str, Any],
    available_nodes: Iterable[str],
    required_nodes: Iterable[str],
    *,
    max_vram_used: float | None = DEFAULT_MAX_VRAM_USED,
) -> Readiness:
    """Whether an answering ComfyUI is ready: every required node type is present and
    GPU memory in use is below ``max_vram_used`` (``None``: not checked)."""
    available = set(available_nodes)
    missing = tuple(sorted(set(required_nodes) - available))
    return Readiness(missing, vram_used_fraction(system_stats), max_vram_used)


@dataclass
class CrashLoopDetector:
    """``max_crashes`` crashes within ``window_s`` seconds make a crash loop."""

    max_crashes: int = DEFAULT_CRASH_LOOP_CRASHES
    window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S
    crashes: list[float] = field(default_factory=list)

    def record(self, at: float) -> bool:
        """Record a crash at ``at`` (clock seconds); ``True`` when it completes a loop."""
        self.crashes.append(at)
        self.crashes = [t for t in self.crashes if at - t < self.window_s]
        return len(self.crashes) >= self.max_crashes

    def recent(self, at: float) -> int:
        """Crashes within the window that ends at ``at``."""
        return sum(1 for t in self.crashes if at - t < self.window_s)


def restart_delay(recent_crashes: int, *, base_s: float, cap_s: float) -> float:
    """Exponential backoff before a restart: ``base_s`` after the first crash, doubling."""
    if recent_crashes <= 0:
        return 0.0
    return float(min(cap_s, base_s * 2 ** (recent_crashes - 1)))


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class QueuedPrompt:
    """ComfyUI's answer to ``POST /prompt``. Non-empty ``node_errors``: part of the
    graph failed validation and was dropped while the rest was queued."""

    prompt_id: str
    number: float
    node_errors: JSON


@dataclass(frozen=True)
class OutputFile:
    """One file a workflow wrote, as ``/view`` takes it."""

    node_id: str
    kind: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class PromptResult:
    """A workflow that ran to success: its history ``outputs`` and status ``messages``."""

    prompt_id: str
    outputs: JSON
    messages: list[Any]

    def files(self) -> list[OutputFile]:
        """Every output file (``images``, ``gifs``, ``latents``...), in node order."""
        found = []
        for node_id, kinds in self.outputs.items():
            if not isinstance(kinds, Mapping):
                continue
            for kind, entries in kinds.items():
                for entry in entries if isinstance(entries, list) else []:
                    if isinstance(entry, Mapping) and isinstance(entry.get("filename"), str):
                        found.append(
                            OutputFile(
                                node_id=str(node_id),
                                kind=str(kind),
                                filename=entry["filename"],
                                subfolder=str(entry.get("subfolder") or ""),
                                type=str(entry.get("type") or "output"),
                            )
                        )
        return found


@dataclass(frozen=True)
class UploadedFile:
    """Where ``/upload/image`` stored a file."""

    name: str
    subfolder: str
    type: str

    @property
    def load_name(self) -> str:
        """The value a ``LoadImage`` node's ``image`` input takes for this file."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


def describe_validation_error(body: Mapping[str, Any]) -> str:
    """A human-readable account of ComfyUI's 400 body on ``POST /prompt``: the top
    error, then one line per node error (``node 2 (ImageScale): Value not in list: ...``)."""
    error = body.get("error")
    node_errors = body.get("node_errors")
    node_errors = node_errors if isinstance(node_errors, Mapping) else {}
    if isinstance(error, Mapping):
        message = str(error.get("message") or error.get("type") or "validation failed")
        details = str(error.get("details") or "")
        error_type = str(error.get("type") or "")
    else:
        message, details, error_type = str(error or "validation failed"), "", ""
    head = f"ComfyUI refused the workflow: {message}"
    if details and not node_errors:
        head += f" ({details})"
    lines = [head]
    for node_id in sorted(node_errors, key=_node_order):
        entry = node_errors[node_id]
        if not isinstance(entry, Mapping):
            continue
        class_type = entry.get("class_type") or "?"
        errors = entry.get("errors")
        for item in errors if isinstance(errors, list) else []:
            if not isinstance(item, Mapping):
                continue
            text = str(item.get("message") or item.get("type") or "error")
            if item.get("details"):
                text += f": {item['details']}"
            lines.append(f"  node {node_id} ({class_type}): {text}")
    if error_type == "invalid_prompt" and "does not exist" in message:
        lines.append("  install the custom node that provides it, or fix the class_type")
    return "\n".join(lines)


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (sys.maxsize, node_id)


def _describe_execution_error(prompt_id: str, data: Mapping[str, Any]) -> str:
    node = data.get("node_id")
    node_type = data.get("node_type") or "?"
    exc_type = data.get("exception_type") or "error"
    exc_msg = str(data.get("exception_message") or "").strip()
    where = f"node {node} ({node_type})" if node is not None else "the workflow"
    return f"ComfyUI failed running {where} of prompt {prompt_id}: {exc_type}: {exc_msg}"


def _result_from_history(prompt_id: str, item: Mapping[str, Any], url: str) -> PromptResult:
    status = item.get("status")
    status = status if isinstance(status, Mapping) else {}
    messages = status.get("messages")
    messages = messages if isinstance(messages, list) else []
    outputs = item.get("outputs")
    outputs = dict(outputs) if isinstance(outputs, Mapping) else {}
    if status.get("status_str", "success") == "success":
        return PromptResult(prompt_id, outputs, messages)
    for message in reversed(messages):
        if not (isinstance(message, list) and len(message) == 2):
            continue
        kind, data = message
        data = data if isinstance(data, Mapping) else {}
        fields: dict[str, Any] = {
            "prompt_id": prompt_id,
            "node_id": None if data.get("node_id") is None else str(data["node_id"]),
            "node_type": data.get("node_type"),
            "url": url,
        }
        if kind == "execution_interrupted":
            raise ComfyInterrupted(f"prompt {prompt_id} was interrupted", **fields)
        if kind == "execution_error":
            raise ComfyExecutionError(
                _describe_execution_error(prompt_id, data),
                exception_type=data.get("exception_type"),
                exception_message=str(data.get("exception_message") or "").strip(),
                **fields,
            )
    raise ComfyExecutionError(
        f"ComfyUI reports prompt {prompt_id} as {status.get('status_str')!r} without an error",
        prompt_id=prompt_id,
        url=url,
    )


_DISCONNECTED: Final[JSON] = {"type": "_disconnected", "data": {}}
# How long a finished prompt's last WebSocket messages may trail its history entry.
_END_GRACE_S: Final = 1.0


def _is_end(message: Mapping[str, Any], prompt_id: str) -> bool:
    data = message.get("data")
    if not isinstance(data, Mapping) or data.get("prompt_id") != prompt_id:
        return False
    kind = message.get("type")
    if kind == "executing":
        return data.get("node") is None
    return kind in ("execution_error", "execution_interrupted")


class _Listener:
    """One ``/ws`` connection per client: ComfyUI keeps one socket per ``clientId``."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, dispatch: Callable[[JSON], None]
    ) -> None:
        self._ws = ws
        self._dispatch = dispatch
        self.alive = True
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    # Binary frames are previews; errors and closes end the loop.
                    if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
                    continue
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self._dispatch(message)
        except (aiohttp.ClientError, OSError):
            pass
        finally:
            self.alive = False
            self._dispatch(_DISCONNECTED)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self._ws.close()


class ComfyClient:
    """An async client for one ComfyUI server.

    ``client_id`` registers the WebSocket and goes with every prompt, so the
    per-prompt events reach this client. ``timeout_s`` bounds each HTTP request;
    waits for workflows have their own deadline. ``poll_interval_s`` paces
    ``/history`` polling when there is no WebSocket, ``ws_poll_interval_s`` the
    safety poll while there is one. ``use_websocket=False`` polls only.
    """

    def __init__(
        self,
        url: str = f"http://{LOOPBACK}:{DEFAULT_PORT}",
        *,
        client_id: str | None = None,
        timeout_s: float = 30.0,
        poll_interval_s: float = 0.5,
        ws_poll_interval_s: float = 5.0,
        use_websocket: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.client_id = client_id or str(uuid.uuid4())
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.ws_poll_interval_s = ws_poll_interval_s
        self.use_websocket = use_websocket
        self.clock: Clock = clock or SystemClock()
        self._session: aiohttp.ClientSession | None = None
        self._listener: _Listener | None = None
        self._ws_retry_at = float("-inf")
        self._subscribers: dict[str, list[asyncio.Queue[JSON]]] = {}

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def websocket_connected(self) -> bool:
        return self._listener is not None and self._listener.alive

    # -- plumbing

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s)

    def _unavailable(self, what: str, error: BaseException) -> ComfyUnavailable:
        reason = str(error) or type(error).__name__
        return ComfyUnavailable(
            f"ComfyUI at {self.url} did not answer {what}: {reason}", url=self.url
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        data: aiohttp.FormData | None = None,
    ) -> tuple[int, bytes]:
        try:
            async with self._http().request(
                method,
                self.url + path,
                json=json_body,
                params=params,
                data=data,
                timeout=self._timeout(),
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise self._unavailable(f"{method} {path}", error) from error

    def _http_error(self, method: str, path: str, status: int, body: bytes) -> ComfyHTTPError:
        text = body.decode("utf-8", "replace").strip().replace("\n", " ")[:300]
        return ComfyHTTPError(
            f"ComfyUI answered HTTP {status} to {method} {path}" + (f": {text}" if text else ""),
            status=status,
            url=self.url,
        )

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        status, body = await self._call(method, path, **kw)
        if status != 200:
            raise self._http_error(method, path, status, body)
        try:
            return json.loads(body)
        except ValueError as error:
            raise ComfyHTTPError(
                f"ComfyUI answered {method} {path} with a body that is not JSON",
                status=status,
                url=self.url,
            ) from error

    async def _empty(self, method: str, path: str, **kw: Any) -> None:
        status, body = await self._call(method, path, **kw)
        if status != 200:
            raise self._http_error(method, path, status, body)

    # -- information

    async def system_stats(self) -> JSON:
        """``GET /system_stats``: versions, RAM, and each device's memory."""
        data = await self._json("GET", "/system_stats")
        return data if isinstance(data, dict) else {}

    async def object_info(self, node_type: str | None = None) -> JSON:
        """``GET /object_info`` (every node type), or ``/object_info/{node_type}``
        (``{}`` when ComfyUI does not know it)."""
        path = "/object_info" if node_type is None else f"/object_info/{node_type}"
        data = await self._json("GET", path)
        return data if isinstance(data, dict) else {}

    async def queue(self) -> JSON:
        """``GET /queue``: ``queue_running`` and ``queue_pending`` (heap order, not run order)."""
        data = await self._json("GET", "/queue")
        return data if isinstance(data, dict) else {}

    async def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> JSON:
        """``GET /history[/{prompt_id}]``: finished prompts only (``{}`` while one runs)."""
        path = "/history" if prompt_id is None else f"/history/{prompt_id}"
        params = {"max_items": str(max_items)} if max_items is not None else None
        data = await self._json("GET", path, params=params)
        return data if isinstance(data, dict) else {}

    # -- running workflows

    async def queue_prompt(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        extra_data: Mapping[str, Any] | None = None,
        front: bool = False,
    ) -> QueuedPrompt:
        """``POST /prompt`` with this client's ``client_id``.

        Raises ``ComfyValidationError`` (its message lists the node errors) when
        ComfyUI refuses the workflow.
        """
        body: JSON = {"prompt": workflow_graph(workflow), "client_id": self.client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front:
            body["front"] = True
        status, raw = await self._call("POST", "/prompt", json_body=body)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if status == 200 and isinstance(data, dict) and isinstance(data.get("prompt_id"), str):
            node_errors = data.get("node_errors")
            return QueuedPrompt(
                prompt_id=data["prompt_id"],
                number=float(data.get("number") or 0),
                node_errors=node_errors if isinstance(node_errors, dict) else {},
            )
        if status == 400 and isinstance(data, dict) and "error" in data:
            error = data["error"]
            node_errors = data.get("node_errors")
            raise ComfyValidationError(
                describe_validation_error(data),
                error_type=str(error.get("type") if isinstance(error, Mapping) else error),
                node_errors=node_errors if isinstance(node_errors, dict) else {},
                status=status,
                url=self.url,
            )
        raise self._http_error("POST", "/prompt", status, raw)

    async def wait(
        self,
        prompt_id: str,
        *,
        timeout_s: float | None = None,
        on_message: MessageHandler | None = None,
    ) -> PromptResult:
        """Wait until ``prompt_id`` has finished and return its outputs.

        Raises ``ComfyExecutionError`` (``ComfyInterrupted``) when it failed,
        ``ComfyPromptLost`` when it vanished from the queue without a history
        entry, ``ComfyTimeout`` after ``timeout_s`` (``None``: no deadline).
        ``on_message`` gets this prompt's WebSocket messages (progress...).
        """
        inbox = self._subscribe(prompt_id)
        try:
            return await self._wait(prompt_id, inbox, timeout_s, on_message)
        finally:
            self._unsubscribe(prompt_id, inbox)

    async def run(
        self,
        workflow: Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        extra_data: Mapping[str, Any] | None = None,
        on_message: MessageHandler | None = None,
        prompt_id: str | None = None,
        on_queued: Callable[[QueuedPrompt], None] | None = None,
    ) -> PromptResult:
        """Queue ``workflow`` and wait for it (``queue_prompt`` then ``wait``).

        The prompt id is chosen here (a UUID, which every ComfyUI version accepts),
        or by the caller (``prompt_id``, a UUID too, so that it can stop the prompt
        before this returns), so that the WebSocket subscription exists before the
        prompt is queued and no message is missed. ``on_queued`` gets ComfyUI's answer
        as soon as the prompt is queued; an exception it raises leaves the prompt
        queued and propagates.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        inbox = self._subscribe(prompt_id)
        try:
            await self._ensure_listener()
            queued = await self.queue_prompt(workflow, prompt_id=prompt_id, extra_data=extra_data)
            if queued.prompt_id != prompt_id:
                self._unsubscribe(prompt_id, inbox)
                prompt_id = queued.prompt_id
                inbox = self._subscribe(prompt_id)
            if on_queued is not None:
                on_queued(queued)
            return await self._wait(prompt_id, inbox, timeout_s, on_message)
        finally:
            self._unsubscribe(prompt_id, inbox)

    def _subscribe(self, prompt_id: str) -> asyncio.Queue[JSON]:
        inbox: asyncio.Queue[JSON] = asyncio.Queue()
        self._subscribers.setdefault(prompt_id, []).append(inbox)
        return inbox

    def _unsubscribe(self, prompt_id: str, inbox: asyncio.Queue[JSON]) -> None:
        inboxes = self._subscribers.get(prompt_id, [])
        if inbox in inboxes:
            inboxes.remove(inbox)
        if not inboxes:
            self._subscribers.pop(prompt_id, None)

    def _dispatch(self, message: JSON) -> None:
        if message is _DISCONNECTED:
            for inboxes in self._subscribers.values():
                for inbox in inboxes:
                    inbox.put_nowait(message)
            return
        data = message.get("data")
        prompt_id = data.get("prompt_id") if isinstance(data, Mapping) else None
        if isinstance(prompt_id, str):
            for inbox in self._subscribers.get(prompt_id, []):
                inbox.put_nowait(message)

    async def _ensure_listener(self) -> bool:
        """Connect the WebSocket if it is not; ``False`` when it cannot be (poll instead)."""
        if not self.use_websocket:
            return False
        if self._listener is not None and self._listener.alive:
            return True
        if self.clock.now() < self._ws_retry_at:
            return False
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        try:
            async with asyncio.timeout(self.timeout_s):
                ws = await self._http().ws_connect(
                    self.url + "/ws", params={"clientId": self.client_id}, heartbeat=20.0
                )
        except (aiohttp.ClientError, TimeoutError, OSError):
            self._ws_retry_at = self.clock.now() + self.ws_poll_interval_s
            return False
        self._listener = _Listener(ws, self._dispatch)
        return True

    async def _wait(
        self,
        prompt_id: str,
        inbox: asyncio.Queue[JSON],
        timeout_s: float | None,
        on_message: MessageHandler | None,
    ) -> PromptResult:
        deadline = None if timeout_s is None else self.clock.now() + timeout_s
        ended = False
        while True:
            connected = await self._ensure_listener()
            result = await self._finished(prompt_id)
            if result is not None:
                # ComfyUI sends the end message right after it writes the history: let
                # ``on_message`` see the whole stream before the result is returned.
                if connected and not ended and on_message is not None:
                    await self._next_end(prompt_id, inbox, _END_GRACE_S, on_message)
                while not inbox.empty():
                    message = inbox.get_nowait()
                    if on_message is not None and message is not _DISCONNECTED:
                        on_message(message)
                return result
            interval = self.ws_poll_interval_s if connected else self.poll_interval_s
            if deadline is not None:
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    raise ComfyTimeout(
                        f"prompt {prompt_id} did not finish within {timeout_s:g} s", url=self.url
                    )
                interval = min(interval, remaining)
            ended = await self._next_end(prompt_id, inbox, interval, on_message)

    async def _finished(self, prompt_id: str) -> PromptResult | None:
        """The result once ``prompt_id`` is in the history; ``None`` while it is queued."""
        item = (await self.history(prompt_id)).get(prompt_id)
        if isinstance(item, Mapping):
            return _result_from_history(prompt_id, item, self.url)
        queue = await self.queue()
        for key in ("queue_running", "queue_pending"):
            for entry in queue.get(key) or []:
                if isinstance(entry, list) and len(entry) > 1 and entry[1] == prompt_id:
                    return None
        # It may have moved from the queue to the history between the two reads.
        item = (await self.history(prompt_id)).get(prompt_id)
        if isinstance(item, Mapping):
            return _result_from_history(prompt_id, item, self.url)
        raise ComfyPromptLost(
            f"prompt {prompt_id} is neither queued, running nor in ComfyUI's history: "
            "it was deleted from the queue, or ComfyUI restarted",
            url=self.url,
        )

    async def _next_end(
        self,
        prompt_id: str,
        inbox: asyncio.Queue[JSON],
        seconds: float,
        on_message: MessageHandler | None,
    ) -> bool:
        """Pass messages to ``on_message`` until the prompt's end (``True``), a disconnect,
        or ``seconds``."""
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            while True:
                getter = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait({getter, timer}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return False
                message = getter.result()
                if message is _DISCONNECTED:
                    return False
                if on_message is not None:
                    on_message(message)
                if _is_end(message, prompt_id):
                    return True
        finally:
            timer.cancel()

    # -- files and control

    async def view(self, filename: str, *, subfolder: str = "", type: str = "output") -> bytes:
        """``GET /view``: the bytes of an output (or input, temp) file."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        status, body = await self._call("GET", "/view", params=params)
        if status == 404:
            raise ComfyHTTPError(
                f"ComfyUI has no {type} file {filename!r} in subfolder {subfolder!r}",
                status=404,
                url=self.url,
            )
        if status != 200:
            raise self._http_error("GET", "/view", status, body)
        return body

    async def view_to(
        self, file: OutputFile, dest: Path, *, on_chunk: Callable[[bytes], object] | None = None
    ) -> int:
        """Stream an output file to ``dest`` (written in a thread); returns its size.

        ``on_chunk`` (a hash's ``update``, say) gets every chunk in order, in the
        writing thread, so that hashing a large file never blocks the event loop.
        """
        params = {"filename": file.filename, "subfolder": file.subfolder, "type": file.type}
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s
        )
        size = 0

        def write(fh: Any, chunk: bytes) -> None:
            fh.write(chunk)
            if on_chunk is not None:
                on_chunk(chunk)

        try:
            async with self._http().get(
                self.url + "/view", params=params, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise self._http_error("GET", "/view", response.status, await response.read())
                fh = await asyncio.to_thread(dest.open, "wb")
                try:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        await asyncio.to_thread(write, fh, chunk)
                        size += len(chunk)
                finally:
                    await asyncio.to_thread(fh.close)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._unavailable("GET /view", error) from error
        return size

    async def upload_image(
        self,
        image: bytes | Path,
        *,
        name: str | None = None,
        subfolder: str = "",
        type: str = "input",
        overwrite: bool = False,
    ) -> UploadedFile:
        """``POST /upload/image``. ``name`` defaults to the file's name; ComfyUI may rename
        it (``x (1).png``) when a different file already has it, unless ``overwrite``."""
        if isinstance(image, Path):
            data = await asyncio.to_thread(image.read_bytes)
            name = name or image.name
        else:
            data = image
        if not name:
            raise ValueError("upload_image needs a name for bytes")
        form = aiohttp.FormData()
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        form.add_field("image", data, filename=name, content_type=content_type)
        form.add_field("type", type)
        form.add_field("subfolder", subfolder)
        if overwrite:
            form.add_field("overwrite", "true")
        answer = await self._json("POST", "/upload/image", data=form)
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise ComfyHTTPError(
                "ComfyUI answered POST /upload/image without a file name", status=200, url=self.url
            )
        return UploadedFile(
            name=answer["name"],
            subfolder=str(answer.get("subfolder") or ""),
            type=str(answer.get("type") or type),
        )

    async def delete_queued(self, *prompt_ids: str) -> None:
        """``POST /queue {"delete": [...]}``: drop prompts that have not started yet
        (a running one is untouched: ``interrupt`` it); unknown ids are ignored."""
        await self._empty("POST", "/queue", json_body={"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop ``prompt_id`` if it is the one running
        (``None``: whatever runs)."""
        await self._empty(
            "POST", "/interrupt", json_body={"prompt_id": prompt_id} if prompt_id else {}
        )

    async def free(self, *, unload_models: bool = False, free_memory: bool = True) -> None:
        """``POST /free``: applied by ComfyUI after the current prompt."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        await self._empty("POST", "/free", json_body=body)


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]]


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal ``pid``'s process group when it leads one (ComfyUI's own children go too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


async def _gone_within(
    pid: int, seconds: float, clock: Clock, child: asyncio.subprocess.Process | None
) -> bool:
    deadline = clock.now() + seconds
    while True:
        if (child.returncode is not None) if child is not None else not pid_alive(pid):
            return True
        if child is not None and not pid_alive(pid):
            return True
        remaining = deadline - clock.now()
        if remaining <= 0:
            return False
        await clock.sleep(min(0.05, remaining))


async def terminate_process(
    pid: int,
    *,
    grace_s: float = 10.0,
    clock: Clock | None = None,
    child: asyncio.subprocess.Process | None = None,
) -> Literal["gone", "terminated", "killed"]:
    """SIGTERM ``pid`` (its group if it leads one), then SIGKILL after ``grace_s``."""
    clock = clock or SystemClock()
    if not pid_alive(pid):
        return "gone"
    _signal(pid, signal.SIGTERM)
    if await _gone_within(pid, grace_s, clock, child):
        return "terminated"
    _signal(pid, signal.SIGKILL)
    await _gone_within(pid, max(5.0, grace_s), clock, child)
    return "killed"


# --------------------------------------------------------------------------- supervisor


_REFUSED_ARGS: Final = ("--listen", "--port")


def comfy_command(
    command: Sequence[str], *, port: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """The full command line: ``command`` + ``--listen 127.0.0.1 --port PORT`` + ``extra_args``.

    ``extra_args`` (the manifest's ComfyUI arguments) may not choose the address or
    port: ComfyUI listens on loopback only, and the port is the supervisor's.
    """
    if not command:
        raise ConfigError("the ComfyUI command is empty", field="comfy.command")
    for arg in extra_args:
        if arg.split("=", 1)[0] in _REFUSED_ARGS:
            raise ConfigError(
                f"{arg!r} is not allowed in ComfyUI's arguments: ComfyUI always listens on "
                f"{LOOPBACK}, and the port is set with the supervisor's port option",
                field="comfy.args",
            )
    return [*command, "--listen", LOOPBACK, "--port", str(port), *extra_args]


@dataclass(frozen=True)
class ComfyOptions:
    """How ComfyUI is started, judged ready and supervised. Every default can be changed.

    ``command`` runs in ``comfy_dir`` (default ``WORKSPACE/ComfyUI``); the supervisor
    adds ``--listen 127.0.0.1 --port PORT`` and then ``extra_args`` (from the
    manifest). ``attach_url`` switches to attach mode: nothing is started or killed.
    ``required_nodes`` are the node types the workspace's workflows use
    (``nodes_used_by``); the warm-up workflow's are added to them.
    """

    command: tuple[str, ...] = ("python", "main.py")
    comfy_dir: Path | None = None
    port: int = DEFAULT_PORT
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    attach_url: str | None = None
    required_nodes: frozenset[str] = frozenset()
    warmup_workflow: Mapping[str, Any] | None = None
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    # After ComfyUI first answers, how long missing node types may take to appear.
    nodes_grace_s: float = 60.0
    poll_interval_s: float = 1.0
    request_timeout_s: float = 10.0
    max_vram_used: float | None = DEFAULT_MAX_VRAM_USED
    crash_loop_crashes: int = DEFAULT_CRASH_LOOP_CRASHES
    crash_loop_window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    health_interval_s: float = 5.0
    # An attached ComfyUI that misses this many health checks in a row is down.
    attach_down_after: int = 3
    warmup_timeout_s: float = 600.0
    stop_grace_s: float = 10.0
    log_name: str = "comfyui.log"
    pid_name: str = "comfyui.pid"
    log_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        comfy_command(self.command, port=self.port, extra_args=self.extra_args)
        if self.attach_url is not None:
            parts = urlsplit(self.attach_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"attach URL {self.attach_url!r} is not an http(s) URL "
                    f"(Vast's ComfyUI template: {VAST_TEMPLATE_URL})",
                    field="comfy.attach_url",
                )
        if self.warmup_workflow is not None:
            workflow_graph(self.warmup_workflow, name="warmup_workflow")
        if self.crash_loop_crashes < 1 or self.crash_loop_window_s <= 0:
            raise ConfigError("a crash loop needs at least 1 crash in a positive window")
        if self.max_vram_used is not None and not 0 < self.max_vram_used <= 1:
            raise ConfigError("max_vram_used is a fraction in (0, 1]", field="max_vram_used")

    @property
    def all_required_nodes(self) -> frozenset[str]:
        if self.warmup_workflow is None:
            return self.required_nodes
        return self.required_nodes | workflow_node_types(self.warmup_workflow)


@dataclass(frozen=True)
class _PidRecord:
    pid: int
    url: str
    cmdline: list[str]
    started_at: float


class _Exited(Exception):
    """ComfyUI's process ended (or an attached ComfyUI stopped answering)."""


SupervisorState = Literal["idle", "starting", "warming", "ready", "failed", "stopped"]


class ComfySupervisor:
    """Starts (or adopts, or attaches to) ComfyUI and keeps it ready.

    ``start()`` returns once ComfyUI is ready (and warmed up), or raises
    ``ComfyFailed`` whose ``reason`` is also reported as the ``failed`` stage.
    Supervision goes on in the background: a crash is logged and restarted
    (stage ``starting_app`` again, then ``ready``) until a crash loop. ``wait()``
    returns when supervision ends (raising the failure, if any). ``stop()`` ends
    a ComfyUI this agent started (SIGTERM, SIGKILL after ``stop_grace_s``);
    ``detach()`` leaves it running for the next agent to adopt. After a failure the
    supervisor stops the ComfyUI it started, and writes a ``COMFYUI FAILED`` line to
    the workspace's ``provision_errors.log``. Attach mode never stops anything.
    """

    def __init__(
        self,
        workspace: Path,
        options: ComfyOptions | None = None,
        *,
        reporter: Reporter | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.workspace = workspace
        self.options = options or ComfyOptions()
        self.reporter: Reporter = reporter or NullReporter()
        self.clock: Clock = clock or SystemClock()
        self.log_path = workspace / self.options.log_name
        self.pid_path = workspace / self.options.pid_name
        self.comfy_dir = self.options.comfy_dir or workspace / "ComfyUI"
        self.attached = self.options.attach_url is not None
        self.url = (self.options.attach_url or f"http://{LOOPBACK}:{self.options.port}").rstrip("/")
        self.state: SupervisorState = "idle"
        self.failure: ComfyFailed | None = None
        self.adopted = False
        self.starts = 0
        self.crashes = 0
        self._pid: int | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._child_exit: asyncio.Future[int] | None = None
        self._client: ComfyClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    # -- public

    @property
    def pid(self) -> int | None:
        """ComfyUI's pid while this supervisor has one (never in attach mode)."""
        return self._pid

    def client(self, **kw: Any) -> ComfyClient:
        """A new ``ComfyClient`` for this ComfyUI (the caller closes it)."""
        kw.setdefault("clock", self.clock)
        return ComfyClient(self.url, **kw)

    async def start(self) -> None:
        """Start supervising and return once ComfyUI is ready; raises ``ComfyFailed``."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="comfy-supervisor")
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Return when ComfyUI is ready; raise ``ComfyFailed`` if supervision failed."""
        if self._task is None:
            raise ComfyError("the supervisor has not been started", url=self.url)
        ready: asyncio.Future[Any] = asyncio.ensure_future(self._ready.wait())
        waiting: set[asyncio.Future[Any]] = {ready, self._task}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._ready.is_set():
            return
        await self._raise_outcome()
        raise ComfyError("supervision ended before ComfyUI was ready", url=self.url)

    async def wait(self) -> None:
        """Block while supervising; raise ``ComfyFailed`` when supervision gives up."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)
        await self._raise_outcome()

    async def stop(self) -> None:
        """End supervision and stop the ComfyUI this agent started or adopted."""
        await self._end_task()
        await self._kill_owned()
        await self._close_client()
        if self.state != "failed":
            self.state = "stopped"

    async def detach(self) -> None:
        """End supervision and leave ComfyUI running, its pid file in place."""
        await self._end_task()
        await self._close_client()
        if self._child_exit is not None:
            self._child_exit.cancel()
        self._pid, self._child, self._child_exit = None, None, None
        if self.state != "failed":
            self.state = "stopped"

    async def __aenter__(self) -> ComfySupervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- supervision loop

    async def _supervise(self) -> None:
        options = self.options
        loop = CrashLoopDetector(options.crash_loop_crashes, options.crash_loop_window_s)
        warmed = options.warmup_workflow is None
        first = True
        try:
            while True:
                self._enter("starting", "starting_app")
                if self.attached:
                    self._log(f"attaching to ComfyUI at {self.url} (it is started by the image)")
                elif not (first and await self._adopt()):
                    await self._launch()
                first = False
                try:
                    await self._await_ready()
                    if not warmed:
                        self._enter("warming", "warming")
                        await self._warm_up()
                        warmed = True
                    self._enter("ready", "ready")
                    self._ready.set()
                    ended = await self._watch()
                except _Exited as exited:
                    ended = str(exited)
                self._ready.clear()
                self.state = "starting"
                await self._forget_dead()
                self.crashes += 1
                now = self.clock.now()
                tail = await asyncio.to_thread(self._log_tail)
                if loop.record(now):
                    for line in tail:
                        self._log(f"comfyui.log: {line}", "error")
                    raise ComfyFailed(
                        CRASH_LOOP,
                        f"ComfyUI {ended}: {len(loop.crashes)} crashes within "
                        f"{options.crash_loop_window_s:g} s, giving up (log: {self.log_path})",
                        url=self.url,
                    )
                delay = restart_delay(
                    loop.recent(now),
                    base_s=options.restart_backoff_s,
                    cap_s=options.restart_backoff_max_s,
                )
                for line in tail:
                    self._log(f"comfyui.log: {line}", "warning")
                action = "waiting for it to come back" if self.attached else "restarting it"
                self._log(
                    f"ComfyUI {ended} ({len(loop.crashes)} crashes within "
                    f"{options.crash_loop_window_s:g} s; {options.crash_loop_crashes} make a "
                    f"crash loop); {action} in {delay:g} s",
                    "warning",
                )
                await self.clock.sleep(delay)
        except ComfyFailed as failure:
            self.failure = failure
            self.state = "failed"
            self._log(f"ComfyUI failed ({failure.reason}): {failure}", "error")
            one_line = " | ".join(line.strip() for line in str(failure).splitlines())
            await asyncio.to_thread(
                ErrorLog(self.workspace).write, "COMFYUI FAILED", failure.reason, one_line
            )
            await self._kill_owned()
            await self._close_client()
            self.reporter.stage("failed", failure.reason)
        finally:
            self._ready.clear()

    def _enter(self, state: SupervisorState, stage: Stage) -> None:
        self.state = state
        self.reporter.stage(stage)

    def _log(self, line: str, level: Level = "info") -> None:
        self.reporter.log(line, level)

    def _api(self) -> ComfyClient:
        if self._client is None:
            self._client = ComfyClient(
                self.url,
                timeout_s=self.options.request_timeout_s,
                poll_interval_s=self.options.poll_interval_s,
                clock=self.clock,
            )
        return self._client

    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _end_task(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ready.clear()

    async def _raise_outcome(self) -> None:
        if self.failure is not None:
            raise self.failure
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error

    # -- start, adopt

    async def _adopt(self) -> bool:
        """Adopt the ComfyUI a previous agent started, when its pid file says it still runs."""
        record = await asyncio.to_thread(self._read_pid_file)
        if record is None:
            return False
        alive = pid_alive(record.pid)
        cmdline = _proc_cmdline(record.pid) if alive else None
        same = None if cmdline is None else cmdline == record.cmdline
        answers = alive and same is not False and await self._answers(record.url)
        if alive and (answers or same):
            self._pid, self._child, self._child_exit = record.pid, None, None
            self.adopted = True
            self.url = record.url.rstrip("/")
            await self._close_client()
            state = "answering" if answers else "not answering yet"
            self._log(f"adopted the running ComfyUI (pid {record.pid}, {state}) at {self.url}")
            return True
        why = "is gone" if not alive else "is another program now"
        self._log(f"stale ComfyUI pid file: pid {record.pid} {why}; starting ComfyUI", "warning")
        await asyncio.to_thread(self.pid_path.unlink, missing_ok=True)
        return False

    async def _launch(self) -> None:
        options = self.options
        self.url = f"http://{LOOPBACK}:{options.port}"
        await self._close_client()
        if await _port_in_use(options.port):
            raise ComfyFailed(
                PORT_BUSY,
                f"{LOOPBACK}:{options.port} is already in use by a process this agent did not "
                "start: stop it, choose another port, or attach to it (attach_url)",
                url=self.url,
            )
        command = comfy_command(options.command, port=options.port, extra_args=options.extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **options.env}
        log = await asyncio.to_thread(self._open_log, command)
        try:
            child = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.comfy_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session: ComfyUI outlives the agent, and a stop reaches its children.
                start_new_session=True,
            )
        except OSError as error:
            raise ComfyFailed(
                START_FAILED,
                f"cannot start ComfyUI with {shlex.join(command)} in {self.comfy_dir}: "
                f"{error.strerror or error}",
                url=self.url,
            ) from error
        finally:
            log.close()
        self.starts += 1
        self._pid, self._child, self.adopted = child.pid, child, False
        self._child_exit = asyncio.ensure_future(child.wait())
        record = _PidRecord(child.pid, self.url, command, self.clock.now())
        await asyncio.to_thread(self._write_pid_file, record)
        self._log(f"started ComfyUI (pid {child.pid}): {shlex.join(command)}; log {self.log_path}")

    def _open_log(self, command: list[str]) -> Any:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > self.options.log_max_bytes:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        fh = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fh.write(f"\n=== {stamp} comfyfleet starts ComfyUI: {shlex.join(command)}\n".encode())
        fh.flush()
        return fh

    def _write_pid_file(self, record: _PidRecord) -> None:
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_path.with_name(self.pid_path.name + ".tmp")
        payload = {
            "pid": record.pid,
            "url": record.url,
            "cmdline": record.cmdline,
            "started_at": record.started_at,
        }
        tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
        tmp.replace(self.pid_path)

    def _read_pid_file(self) -> _PidRecord | None:
        try:
            data = json.loads(self.pid_path.read_text(encoding="utf-8"))
            return _PidRecord(
                pid=int(data["pid"]),
                url=str(data["url"]),
                cmdline=[str(a) for a in data.get("cmdline") or []],
                started_at=float(data.get("started_at") or 0),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self.pid_path.unlink(missing_ok=True)
            return None

    def _log_tail(self) -> list[str]:
        if self.attached:
            return []
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-_LOG_TAIL_LINES:]

    # -- process state

    def _exit_reason(self) -> str | None:
        """How ComfyUI's process ended, or ``None`` while it runs (always ``None`` attached)."""
        if self._child is not None:
            code = self._child.returncode
            if code is None:
                return None
            return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if self._pid is not None and not pid_alive(self._pid):
            return f"is gone (pid {self._pid})"
        return None

    async def _sleep_or_exit(self, seconds: float) -> str | None:
        """Wait ``seconds``; return early with the exit reason if ComfyUI's process ends."""
        if self._child_exit is not None:
            timer: asyncio.Future[Any] = asyncio.ensure_future(self.clock.sleep(seconds))
            waiting: set[asyncio.Future[Any]] = {self._child_exit, timer}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            return self._exit_reason()
        if self._pid is None:
            await self.clock.sleep(seconds)
            return None
        deadline = self.clock.now() + seconds
        while (reason := self._exit_reason()) is None:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return None
            await self.clock.sleep(min(remaining, 0.25))
        return reason

    async def _answers(self, url: str | None = None) -> bool:
        client = self._api() if url is None else ComfyClient(url, timeout_s=5.0, clock=self.clock)
        try:
            await client.system_stats()
            return True
        except ComfyError:
            return False
        finally:
            if url is not None:
                await client.close()

    async def _forget_dead(self) -> None:
        """After a crash: drop the dead process and its pid file."""
        if self._pid is not None and not self.attached:
            await asyncio.to_thread(self.pid_path.unlink, missing_ok=True)
        self._pid, self._child, self._child_exit = None, None, None
        await self._close_client()

    async def _kill_owned(self) -> None:
        if self.attached or self._pid is None:
            return
        pid, child = self._pid, self._child
        outcome = await terminate_process(
            pid, grace_s=self.options.stop_grace_s, clock=self.clock, child=child
        )
        if outcome != "gone":
            self._log(f"stopped ComfyUI (pid {pid}, {outcome})")
        await asyncio.to_thread(self.pid_path.unlink, missing_ok=True)
        self._pid, self._child, self._child_exit = None, None, None

    # -- readiness, warm-up, watch

    async def _await_ready(self) -> None:
        options = self.options
        required = options.all_required_nodes
        client = self._api()
        started = self.clock.now()
        deadline = started + options.ready_timeout_s
        first_answer: float | None = None
        problem = f"ComfyUI does not answer at {self.url}"
        readiness: Readiness | None = None
        reported: str | None = None
        while True:
            if (ended := self._exit_reason()) is not None:
                raise _Exited(ended)
            try:
                stats = await client.system_stats()
                if first_answer is None:
                    first_answer = self.clock.now()
                    self._log(f"ComfyUI answers after {first_answer - started:.1f} s")
                nodes = (await client.object_info()).keys() if required else ()
            except ComfyError as error:
                # The last answer's readiness still names the cause, should time run out.
                problem = f"ComfyUI does not answer yet: {error}"
            else:
                readiness = assess_readiness(
                    stats, nodes, required, max_vram_used=options.max_vram_used
                )
                if readiness.ready:
                    used = readiness.vram_used
                    memory = "" if used is None else f", GPU memory in use {used:.0%}"
                    self._log(f"ComfyUI is ready at {self.url}{memory}")
                    return
                problem = readiness.problem() or problem
                if problem != reported:
                    self._log(f"ComfyUI is not ready: {problem}", "warning")
                    reported = problem
                if (
                    readiness.missing_nodes
                    and self.clock.now() - first_answer >= options.nodes_grace_s
                ):
                    raise self._missing(readiness.missing_nodes)
            now = self.clock.now()
            if now >= deadline:
                raise self._not_ready(readiness, problem)
            if ended := await self._sleep_or_exit(min(options.poll_interval_s, deadline - now)):
                raise _Exited(ended)

    def _missing(self, nodes: Sequence[str]) -> ComfyMissingNodes:
        return ComfyMissingNodes(
            list(nodes),
            f"ComfyUI at {self.url} lacks the node types {', '.join(nodes)} that the "
            "workspace's workflows use: install the custom nodes that provide them "
            "(check comfyui.log for custom nodes that failed to import)",
            url=self.url,
        )

    def _not_ready(self, readiness: Readiness | None, problem: str) -> ComfyFailed:
        timeout = f"{self.options.ready_timeout_s:g} s"
        if readiness is not None and readiness.missing_nodes:
            return self._missing(readiness.missing_nodes)
        if readiness is not None and readiness.vram_too_high:
            return ComfyFailed(
                GPU_MEMORY_BUSY,
                f"ComfyUI was not ready within {timeout}: {problem} "
                "(another process may hold the GPU)",
                url=self.url,
            )
        return ComfyFailed(
            NOT_READY, f"ComfyUI was not ready within {timeout}: {problem}", url=self.url
        )

    async def _warm_up(self) -> None:
        workflow = self.options.warmup_workflow
        assert workflow is not None
        self._log("warming up: running the warm-up workflow once")
        started = self.clock.now()
        try:
            result = await self._api().run(workflow, timeout_s=self.options.warmup_timeout_s)
        except ComfyError as error:
            if (ended := self._exit_reason()) is not None:
                raise _Exited(ended) from error
            raise ComfyFailed(
                WARMUP_FAILED, f"the warm-up workflow failed: {error}", url=self.url
            ) from error
        took = self.clock.now() - started
        self._log(f"warm-up done in {took:.1f} s ({len(result.files())} output files)")

    async def _watch(self) -> str:
        """Wait while ComfyUI runs; return how it ended."""
        options = self.options
        misses = 0
        while True:
            if (ended := await self._sleep_or_exit(options.health_interval_s)) is not None:
                return ended
            if not self.attached:
                continue
            if await self._answers():
                misses = 0
                continue
            misses += 1
            if misses >= options.attach_down_after:
                return f"stopped answering at {self.url}"


async def _port_in_use(port: int) -> bool:
    try:
        async with asyncio.timeout(2.0):
            _, writer = await asyncio.open_connection(LOOPBACK, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
