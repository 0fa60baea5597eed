"""The agent's side of the protocol (docs/agent-protocol.md): a ``Reporter`` that dials home.

``RemoteReporter`` queues stage, progress and log events in a bounded buffer and
sends them to the control plane in batches (at most 500) from a background task,
and sends heartbeats every ``heartbeat_interval_s``. Its ``Reporter`` methods may
be called from any thread (the download engine reports from its own) and never
wait: they take a lock for a few list operations and return.

When the control plane is slow or unreachable the buffer fills up, and room is
made by dropping the oldest progress events (each one a cumulative snapshot that
the next replaces), then the oldest log lines; both are counted
(``dropped_progress``, ``dropped_logs``). Stage events are never dropped: a batch
that failed goes back to the front of the buffer, in order, and is sent again.
A 401 means the token was revoked (the instance is being destroyed): sending
stops and ``revoked`` is set.

    async with RemoteReporter(url, token, instance_id, heartbeat_interval_s=30,
                              clock=SystemClock()) as remote:
        registration = await remote.register(workspace="/workspace")
        secrets = await remote.fetch_secrets()
        ...  # run the agent with ``remote`` as (part of) its reporter
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from comfyfleet import __version__
from comfyfleet.agent.report import Level, Progress, Stage
from comfyfleet.clock import Clock, SystemClock
from comfyfleet.errors import ComfyfleetError

__all__ = [
    "MAX_BATCH",
    "AgentAuthError",
    "ControlPlaneUnavailable",
    "Registration",
    "RemoteReporter",
]

log = logging.getLogger(__name__)

MAX_BATCH: Final = 500
_RETRY_CAP_S: Final = 5.0


class AgentAuthError(ComfyfleetError):
    """The control plane refused the agent's token (wrong, revoked, another instance's)."""


class ControlPlaneUnavailable(ComfyfleetError):
    """The control plane could not be reached, or kept failing, after every retry."""


@dataclass(frozen=True)
class Registration:
    """The control plane's answer to ``register``."""

    heartbeat_interval_s: float
    #: The workspace manifest as data; None when the control plane has none for the profile.
    manifest: dict[str, Any] | None
    #: ``attach_url``, ``command``, ``args``: how to run ComfyUI (None: the agent's defaults).
    comfy: dict[str, Any] = field(default_factory=dict)
    #: An OnStart instance's job: the agent runs it alone, then polls for nothing else.
    onstart_job_id: str | None = None


class _Retryable(Exception):
    pass


class RemoteReporter:
    """Reports to the control plane at ``base_url`` (ending in ``/api``); see the module."""

    def __init__(
        self,
        base_url: str,
        token: str,
        instance_id: int,
        *,
        heartbeat_interval_s: float = 30.0,
        clock: Clock | None = None,
        max_buffer: int = 2000,
        flush_interval_s: float = 0.2,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.instance_id = instance_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock: Clock = clock or SystemClock()
        self.max_buffer = max_buffer
        self.flush_interval_s = flush_interval_s
        self._token = token
        self._timeout_s = timeout_s
        self._transport = transport

        self._queue: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._in_flight = 0
        self._interval_changed: asyncio.Event | None = None
        self.last_stage: Stage | None = None

        #: Events the control plane accepted.
        self.sent = 0
        #: Progress events dropped to make room (a slow or unreachable control plane).
        self.dropped_progress = 0
        #: Log lines dropped to make room (only once no progress event is left to drop).
        self.dropped_logs = 0
        #: Events the control plane refused as invalid (a bug on one side; logged).
        self.rejected = 0
        self.heartbeats_sent = 0
        self.heartbeats_failed = 0
        #: The control plane refused the token: nothing more is sent.
        self.revoked = False

    # ------------------------------------------------------------ Reporter

    def stage(self, stage: Stage, reason: str | None = None) -> None:
        self.last_stage = stage
        self._put({"kind": "stage", "at": self.clock.now(), "stage": stage, "reason": reason})

    def progress(self, progress: Progress) -> None:
        self._put(
            {
                "kind": "progress",
                "at": self.clock.now(),
                "done": progress.done,
                "total": progress.total,
                "file": progress.file,
                "file_done": progress.file_done,
                "file_total": progress.file_total,
                "bytes_per_s": progress.bytes_per_s,
            }
        )

    def log(self, line: str, level: Level = "info") -> None:
        self._put({"kind": "log", "at": self.clock.now(), "line": line, "level": level})

    def _put(self, event: dict[str, Any]) -> None:
        if self.revoked:
            return
        with self._lock:
            if len(self._queue) >= self.max_buffer and not self._make_room(event["kind"]):
                return
            self._queue.append(event)
        if event["kind"] == "stage":
            self._nudge()

    def _make_room(self, kind: str) -> bool:
        """Drop one event to make room for one of ``kind``; False: drop the new one instead.

        Called with the lock held. Progress goes first, then log lines; a stage always
        gets in (the buffer may then hold more than ``max_buffer``, by stages only).
        """
        if self._drop_oldest("progress"):
            self.dropped_progress += 1
            return True
        if kind == "progress":
            self.dropped_progress += 1
            return False
        if self._drop_oldest("log"):
            self.dropped_logs += 1
        return True

    def _drop_oldest(self, kind: str) -> bool:
        for index, queued in enumerate(self._queue):
            if queued["kind"] == kind:
                del self._queue[index]
                return True
        return False

    def _nudge(self) -> None:
        """Wake the sender now (from any thread); it also wakes every ``flush_interval_s``."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or self._wake_pending:
            return
        self._wake_pending = True
        try:
            if _running_loop() is loop:
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has closed: the events stay queued
            self._wake_pending = False

    @property
    def pending(self) -> int:
        """Events queued or being sent."""
        with self._lock:
            return len(self._queue) + self._in_flight

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RemoteReporter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "User-Agent": f"comfyfleet-agent/{__version__}",
                },
                timeout=httpx.Timeout(self._timeout_s, connect=min(self._timeout_s, 10.0)),
                transport=self._transport,
            )
        return self._client

    async def start(self) -> None:
        """Start sending (events queued before are sent first) and heartbeating."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._http()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="comfyfleet-report"),
            asyncio.create_task(self._heartbeat_loop(), name="comfyfleet-heartbeat"),
        ]

    async def flush(self, within_s: float = 10.0) -> bool:
        """Wait until every queued event is sent (True) or ``within_s`` seconds pass (False)."""
        self._nudge()
        deadline = time.monotonic() + within_s
        while self.pending and not self.revoked:
            if time.monotonic() > deadline or not self._tasks or self._tasks[0].done():
                return False
            await asyncio.sleep(0.02)
        return self.pending == 0

    async def aclose(self, flush_within_s: float = 10.0) -> None:
        """Send what is queued (for up to ``flush_within_s`` s), then stop and disconnect."""
        if self._tasks:
            flushed = await self.flush(flush_within_s)
            if not flushed and self.pending:
                log.warning("%d events were not delivered to the control plane", self.pending)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ calls

    async def register(
        self,
        *,
        workspace: str,
        hostname: str | None = None,
        attempts: int = 8,
    ) -> Registration:
        """``POST /agent/register``; the heartbeat interval it answers is used from now on."""
        body = {
            "instance_id": self.instance_id,
            "agent_version": __version__,
            "hostname": hostname or socket.gethostname(),
            "workspace": workspace,
        }
        data = await self._call("POST", "agent/register", json=body, attempts=attempts)
        interval = float(data.get("heartbeat_interval_s") or self.heartbeat_interval_s)
        if interval != self.heartbeat_interval_s:
            self.heartbeat_interval_s = interval
            if self._interval_changed is not None:
                self._interval_changed.set()
        manifest = data.get("manifest")
        comfy = data.get("comfy") or {}
        onstart_job_id = data.get("onstart_job_id")
        return Registration(
            heartbeat_interval_s=interval,
            manifest=manifest if isinstance(manifest, dict) else None,
            comfy=comfy if isinstance(comfy, dict) else {},
            onstart_job_id=onstart_job_id if isinstance(onstart_job_id, str) else None,
        )

    async def fetch_secrets(self, *, attempts: int = 8) -> dict[str, str]:
        """``GET /agent/secrets``: the source tokens and Dropbox links (never log them)."""
        data = await self._call("GET", "agent/secrets", attempts=attempts)
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}

    async def heartbeat(self) -> None:
        """One heartbeat now."""
        body = {"instance_id": self.instance_id, "stage": self.last_stage, "at": self.clock.now()}
        await self._call("POST", "agent/heartbeat", json=body, attempts=1)

    async def _call(
        self, method: str, path: str, *, json: Any = None, attempts: int
    ) -> dict[str, Any]:
        """One JSON call, retried on network errors, 429 and 5xx with a capped backoff."""
        delay = 0.25
        for attempt in range(1, attempts + 1):
            try:
                return await self._once(method, path, json)
            except _Retryable as error:
                if attempt == attempts:
                    raise ControlPlaneUnavailable(
                        f"the control plane at {self.base_url} did not answer {method} "
                        f"/{path} after {attempts} attempts: {error}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_CAP_S)
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, json: Any) -> dict[str, Any]:
        try:
            response = await self._http().request(method, path, json=json)
        except httpx.TransportError as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        if response.status_code == 401:
            self.revoked = True
            raise AgentAuthError(
                f"the control plane refused this instance's token ({_detail(response)}); "
                "the instance is being destroyed, or COMFYFLEET_TOKEN is not its token"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {_detail(response)}")
        if response.status_code >= 400:
            raise ComfyfleetError(
                f"the control plane refused {method} /{path}: HTTP {response.status_code}: "
                f"{_detail(response)}"
            )
        data = response.json()
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------ background

    async def _send_loop(self) -> None:
        assert self._wake is not None
        delay = 0.25
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                self._in_flight = len(batch)
            if not batch:
                if self._closing:
                    return
                self._wake_pending = False
                # ``asyncio.timeout``, not ``wait_for``: on 3.11 ``wait_for`` can swallow a
                # cancellation that arrives as the event is set, and this loop never ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._wake.wait()
                self._wake.clear()
                continue
            try:
                await self._once(
                    "POST", "agent/events", {"instance_id": self.instance_id, "events": batch}
                )
            except _Retryable as error:
                self._give_back(batch)
                log.debug("events not delivered, retrying in %.2f s: %s", delay, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_CAP_S)
                continue
            except AgentAuthError as error:
                log.warning("%s; no more events are sent", error)
                with self._lock:
                    self._queue.clear()
                    self._in_flight = 0
                return
            except Exception as error:  # refused as invalid: sending it again cannot help
                self.rejected += len(batch)
                log.warning("%d events refused by the control plane: %s", len(batch), error)
            else:
                self.sent += len(batch)
            delay = 0.25
            with self._lock:
                self._in_flight = 0

    def _give_back(self, batch: list[dict[str, Any]]) -> None:
        """Put a batch that was not delivered back in front, in order, within the bound."""
        with self._lock:
            self._queue.extendleft(reversed(batch))
            self._in_flight = 0
            while len(self._queue) > self.max_buffer and self._drop_oldest("progress"):
                self.dropped_progress += 1
            while len(self._queue) > self.max_buffer and self._drop_oldest("log"):
                self.dropped_logs += 1

    async def _heartbeat_loop(self) -> None:
        while not self.revoked:
            if not await self._wait_interval():
                continue  # the control plane set another interval: wait that one
            try:
                await self.heartbeat()
            except AgentAuthError as error:
                log.warning("%s; heartbeats stop", error)
                return
            except ComfyfleetError as error:
                self.heartbeats_failed += 1
                log.debug("heartbeat not delivered: %s", error)
            else:
                self.heartbeats_sent += 1

    async def _wait_interval(self) -> bool:
        """Sleep one heartbeat interval (on the clock); False when the interval changed first."""
        changed = self._interval_changed = asyncio.Event()
        sleeping = asyncio.ensure_future(self.clock.sleep(self.heartbeat_interval_s))
        waiting = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({sleeping, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            waiting.cancel()
        return not changed.is_set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.reason_phrase
