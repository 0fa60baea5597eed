"""A small async client of the control plane's admin API, for ``up``, ``monitor`` and ``pool``.

The server is ``--server``, else ``$COMFYFLEET_SERVER``, else http://127.0.0.1:8700
(what ``comfyfleet serve`` listens on); the admin key is ``$ADMIN_API_KEY``, sent in
``x-admin-key``. Every failure is a ``comfyfleet.errors`` exception that says what
to do: no control plane there (``ControlPlaneUnreachable``), a key it refuses
(``AdminKeyRefused``, a ``ConfigError``), anything else it refuses
(``ControlPlaneError``, with the server's own words). No message ever carries the key.

The jobs API (``comfyfleet run``) is the user's side: its calls carry the user key
``$COMFYFLEET_API_KEY`` (``Authorization: Bearer cf_...``, made by ``comfyfleet keys
create``), else the admin key; ``job_events`` follows a job's server-sent events and
reconnects when the stream drops, and ``download_output`` verifies every output's
sha256 before it gets its name.

    async with ControlClient.from_env(server) as control:
        (instance_id,) = await control.prewarm("sdxl", 1)
        page = await control.events(instance_id, after=0, wait=25)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json as jsonlib
import mimetypes
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final
from urllib.parse import quote

import httpx

from comfyfleet.envvars import env_value
from comfyfleet.errors import ComfyfleetError, ConfigError
from comfyfleet.lifecycle import JOB_TERMINAL_STATES

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_SERVER",
    "JOB_ENDED_STATES",
    "SERVER_ENV",
    "SHA256_HEADER",
    "AdminKeyRefused",
    "ApiKeyMissing",
    "ApiKeyRefused",
    "ControlClient",
    "ControlPlaneError",
    "ControlPlaneUnreachable",
    "DownloadCorrupted",
    "InstanceEvents",
    "ServerSentEvent",
    "SseParser",
    "server_url",
]

DEFAULT_SERVER: Final = "http://127.0.0.1:8700"
SERVER_ENV: Final = "COMFYFLEET_SERVER"
ADMIN_KEY_ENV: Final = "ADMIN_API_KEY"
_ADMIN_HEADER: Final = "x-admin-key"
#: Beyond a long-poll's own ``wait``: how long an answer may take to come back.
_SLACK_S: Final = 10.0
#: The user's key for the jobs API (``comfyfleet keys create``).
API_KEY_ENV: Final = "COMFYFLEET_API_KEY"
SHA256_HEADER: Final = "X-Comfyfleet-Sha256"
JOB_ENDED_STATES: Final = frozenset(state.value for state in JOB_TERMINAL_STATES)
#: A job's event stream silent this long is re-read and re-opened (it may be half dead).
_STREAM_IDLE_S: Final = 60.0
#: How long ``job_events`` keeps trying to reach a control plane that went away.
RECONNECT_FOR_S: Final = 30.0
#: A job's inputs are uploaded, then stored, before the answer: more than a plain call.
_SUBMIT_READ_S: Final = 120.0
#: Writes of a download go to a thread in batches of this size, not chunk by chunk.
_WRITE_BATCH: Final = 1024 * 1024
_KEY_HINT: Final = f"make a key with `comfyfleet keys create NAME` and export it as {API_KEY_ENV}"


class ControlPlaneError(ComfyfleetError):
    """The control plane refused a request; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0):
        self.status = status
        super().__init__(message)


class ControlPlaneUnreachable(ControlPlaneError):
    """Nothing answered at the server's URL (not started, wrong address, or it went away)."""


class AdminKeyRefused(ConfigError):
    """The control plane refused the admin key (401): missing or wrong ``ADMIN_API_KEY``."""


class ApiKeyMissing(ConfigError):
    """Neither a user key (``COMFYFLEET_API_KEY``) nor the admin key is set for the jobs API."""


class ApiKeyRefused(ConfigError):
    """The control plane refused the user key (401): wrong or revoked ``COMFYFLEET_API_KEY``."""


class DownloadCorrupted(ControlPlaneError):
    """An output's bytes do not have the sha256 the control plane announced; nothing kept."""


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a ``text/event-stream``: its type (``message`` unless named), its data."""

    event: str
    data: str
    id: str | None = None


class SseParser:
    """Server-sent events from a stream's lines, as the WHATWG HTML standard reads them.

    ``feed`` takes one line (without its end) and returns the event a blank line
    completes. ``last_id`` and ``retry_ms`` outlive an event, as a reconnect needs them.
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


@dataclass(frozen=True)
class InstanceEvents:
    """One answer of ``GET /api/instances/{id}/events`` (the API's ``EventsPage``)."""

    instance_id: int
    state: str
    failure_reason: str | None
    progress: dict[str, Any] | None
    #: The newest sequence number there is.
    last: int
    #: Events after ``after`` the control plane no longer keeps (its buffer is bounded).
    missed: int
    events: list[dict[str, Any]] = field(default_factory=list)
    log_file: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceEvents:
        return cls(
            instance_id=int(data["instance_id"]),
            state=str(data["state"]),
            failure_reason=data.get("failure_reason"),
            progress=data.get("progress"),
            last=int(data.get("last") or 0),
            missed=int(data.get("missed") or 0),
            events=list(data.get("events") or []),
            log_file=data.get("log_file"),
        )


def server_url(server: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The control plane's base URL (no trailing ``/`` or ``/api``): ``server``, else
    ``$COMFYFLEET_SERVER``, else ``DEFAULT_SERVER``."""
    url = (server or "").strip() or env_value(env, SERVER_ENV) or DEFAULT_SERVER
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def _detail(response: httpx.Response) -> str:
    """The server's ``detail``, as one line (FastAPI's validation errors joined)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return str(detail) if detail else response.reason_phrase


class ControlClient:
    """The admin API of the control plane at ``base_url``; an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        admin_key: str | None,
        api_key: str | None = None,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = server_url(base_url)
        self.timeout_s = timeout_s
        # The jobs API takes the user's key; the admin key only where no user key is set.
        self._api_key = api_key
        self._admin_key = admin_key
        headers = {_ADMIN_HEADER: admin_key} if admin_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_env(
        cls, server: str | None = None, env: Mapping[str, str] | None = None
    ) -> ControlClient:
        """The client for ``server`` (``--server``), else ``$COMFYFLEET_SERVER``, with the
        key from ``$ADMIN_API_KEY`` (without one the server answers what it expects) and,
        for the jobs API, the user key from ``$COMFYFLEET_API_KEY``."""
        return cls(
            server_url(server, env),
            admin_key=env_value(env, ADMIN_KEY_ENV),
            api_key=env_value(env, API_KEY_ENV),
        )

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ the API

    async def prewarm(self, profile: str, count: int = 1) -> list[int]:
        """Ask the pool for ``count`` more instances of ``profile``; the ids it recorded."""
        body = await self._call(
            "POST", "/api/admin/pool/prewarm", json={"profile": profile, "count": count}
        )
        return [int(i) for i in body.get("instance_ids", [])]

    async def pool(self, *, include_ended: bool = False) -> dict[str, Any]:
        """``GET /api/admin/pool`` as the server answers it (``PoolView``)."""
        params = {"include_ended": "true"} if include_ended else None
        return await self._call("GET", "/api/admin/pool", params=params)

    async def terminate(self, instance_id: int, reason: str | None = None) -> str:
        """Destroy ``instance_id``; the state the server answers (``destroying``...)."""
        body = await self._call(
            "POST",
            f"/api/admin/instances/{instance_id}/terminate",
            json={"reason": reason} if reason else None,
        )
        return str(body.get("state", ""))

    async def events(
        self, instance_id: int, *, after: int = 0, wait: float = 0.0, state: str | None = None
    ) -> InstanceEvents:
        """The instance's state and its events after ``after``; ``wait`` > 0 long-polls
        (the server holds the answer up to that many seconds, at most 30, unless the
        instance is no longer in ``state``, the state the caller last saw)."""
        params: dict[str, Any] = {"after": max(0, after)}
        if wait > 0:
            params["wait"] = round(min(wait, 30.0), 3)
            if state:
                params["state"] = state
        body = await self._call(
            "GET",
            f"/api/instances/{instance_id}/events",
            params=params,
            read_s=self.timeout_s + max(0.0, wait),
        )
        return InstanceEvents.from_json(body)

    async def rent_for_job(self, profile: str, job: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/admin/pool/onstart``: rent an instance of ``profile`` for ``job`` (the
        JSON body of ``POST /api/jobs``, inputs in base64, without a profile); the answer's
        ``instance_id`` and ``job_id``. The control plane destroys the instance once the job
        has ended."""
        return await self._call(
            "POST",
            "/api/admin/pool/onstart",
            json={"profile": profile, "job": dict(job)},
            read_s=max(self.timeout_s, _SUBMIT_READ_S),
        )

    async def provision_log(self, instance_id: int) -> bytes | None:
        """``GET /api/instances/{id}/log``: the instance's provision log as the control plane
        keeps it; None while its agent has reported nothing."""
        try:
            response = await self._request("GET", f"/api/instances/{instance_id}/log")
        except ControlPlaneError as error:
            if error.status == 404 and "no provision log" in str(error):
                return None
            raise
        return response.content

    # ------------------------------------------------------------ jobs (the user's side)

    def job_key_source(self) -> str:
        """The variable whose key the jobs API calls carry: ``COMFYFLEET_API_KEY``, else
        ``ADMIN_API_KEY``; ``ApiKeyMissing`` (saying how to make one) when neither is set."""
        if self._api_key:
            return API_KEY_ENV
        if self._admin_key:
            return ADMIN_KEY_ENV
        raise ApiKeyMissing(
            f"no API key for the jobs API: {_KEY_HINT} (or set {ADMIN_KEY_ENV})",
            source=API_KEY_ENV,
        )

    async def submit_job(
        self, workflow: Mapping[str, Any], inputs: Sequence[Path], params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``POST /api/jobs``: the API-format ``workflow``, each of ``inputs`` uploaded under
        its file name, and ``params`` (``profile``, ``prompt``, ``images``, ``set``...); the
        job's view (with ``webhook_secret`` when the server made one)."""
        self.job_key_source()
        files: list[tuple[str, tuple[str, bytes | IO[bytes], str]]] = [
            ("workflow", ("workflow.json", jsonlib.dumps(workflow).encode(), "application/json"))
        ]
        with contextlib.ExitStack() as opened:
            for path in inputs:
                try:
                    handle = opened.enter_context(path.open("rb"))
                except OSError as error:
                    raise ConfigError(
                        f"cannot read the input: {error.strerror or error}", source=str(path)
                    ) from error
                kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                files.append(("input", (path.name, handle, kind)))
            return await self._call(
                "POST",
                "/api/jobs",
                files=files,
                data={"params": jsonlib.dumps(params)},
                read_s=max(self.timeout_s, _SUBMIT_READ_S),
                jobs=True,
            )

    async def job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}``: the job's view."""
        return await self._call("GET", _job_path(job_id), jobs=True)

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        """``DELETE /api/jobs/{id}``: cancelled at once if queued, else its agent is told to
        interrupt it (``cancel_requested``); the view."""
        return await self._call("DELETE", _job_path(job_id), jobs=True)

    async def job_events(
        self, job_id: str, *, reconnect_for_s: float = RECONNECT_FOR_S
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The job's views as they change, from ``GET /api/jobs/{id}/events``, until it ends.

        A stream that drops, goes silent for a minute or closes early is followed by a
        ``GET /api/jobs/{id}`` (what changed meanwhile is not lost) and opened again,
        with a growing pause; a control plane unreachable for ``reconnect_for_s`` raises
        ``ControlPlaneUnreachable``. The same view is never yielded twice in a row. The
        key travels in a header, never in the URL.
        """
        loop = asyncio.get_running_loop()
        path = f"{_job_path(job_id)}/events"
        parser = SseParser()
        last: dict[str, Any] | None = None
        lost_since: float | None = None
        pause = 0.25
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if parser.last_id:
                headers["Last-Event-ID"] = parser.last_id
            try:
                response = await self._request(
                    "GET", path, jobs=True, stream=True, read_s=_STREAM_IDLE_S, headers=headers
                )
                try:
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None or event.event not in ("job", "message"):
                            continue
                        view = _json_object(event.data, f"{self.base_url}{path}")
                        lost_since, pause = None, 0.25
                        if view != last:
                            last = view
                            yield view
                        if view.get("state") in JOB_ENDED_STATES:
                            return
                finally:
                    await response.aclose()
                # The stream closed before the job ended: a proxy's limit, a restart.
                view = await self.job(job_id)
            except (ControlPlaneError, httpx.TransportError) as error:
                # Gone for a moment (a restart, or a proxy in front answering 502-504) is
                # waited out; a refusal (404, 401...) is not.
                refused = isinstance(error, ControlPlaneError) and not (
                    isinstance(error, ControlPlaneUnreachable) or error.status >= 500
                )
                if refused:
                    raise
                now = loop.time()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since > reconnect_for_s:
                    if isinstance(error, ControlPlaneError):
                        raise
                    raise ControlPlaneUnreachable(
                        f"lost the control plane at {self.base_url} while following job "
                        f"{job_id} ({type(error).__name__}): is `comfyfleet serve` running?"
                    ) from error
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            lost_since = None
            if view != last:
                last = view
                yield view
            if view.get("state") in JOB_ENDED_STATES:
                return
            await asyncio.sleep(max(pause, (parser.retry_ms or 0) / 1000))
            pause = min(pause * 2, 5.0)

    async def download_output(
        self, job_id: str, name: str, dest: Path, *, sha256: str | None = None
    ) -> int:
        """Stream output ``name`` of ``job_id`` to ``dest``; its size in bytes.

        The bytes go to ``dest`` + ``.part`` and are hashed on the way; the file is
        renamed to ``dest`` only when its sha256 is the one the answer announces
        (``X-Comfyfleet-Sha256``) and ``sha256`` (the job view's), else it is removed and
        ``DownloadCorrupted`` raised. Disk writes go to a thread.
        """
        path = f"{_job_path(job_id)}/outputs/{quote(name, safe='')}"
        part = dest.with_name(dest.name + ".part")
        response = await self._request("GET", path, jobs=True, stream=True, read_s=_STREAM_IDLE_S)
        digest = hashlib.sha256()
        size = 0
        try:
            handle = await asyncio.to_thread(part.open, "wb")
            try:
                batch = bytearray()
                try:
                    async for chunk in response.aiter_bytes():
                        batch += chunk
                        size += len(chunk)
                        if len(batch) >= _WRITE_BATCH:
                            await asyncio.to_thread(_write, handle, digest, bytes(batch))
                            batch.clear()
                except httpx.TransportError as error:
                    raise ControlPlaneUnreachable(
                        f"lost the control plane at {self.base_url} while downloading {name!r} "
                        f"({type(error).__name__}); nothing was kept, download it again"
                    ) from error
                await asyncio.to_thread(_write, handle, digest, bytes(batch))
                await asyncio.to_thread(_sync, handle)
            finally:
                await asyncio.to_thread(handle.close)
            actual = digest.hexdigest()
            for source, expected in (
                (SHA256_HEADER, response.headers.get(SHA256_HEADER)),
                ("the job's view", sha256),
            ):
                if expected and expected.strip().lower() != actual:
                    raise DownloadCorrupted(
                        f"output {name!r} of job {job_id} arrived with sha256 {actual}, not "
                        f"{expected.strip().lower()} ({source}); it was not kept, download "
                        "it again"
                    )
            await asyncio.to_thread(os.replace, part, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        finally:
            await response.aclose()
        return size

    # ------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        read_s: float | None = None,
        files: Any = None,
        data: Mapping[str, Any] | None = None,
        jobs: bool = False,
    ) -> dict[str, Any]:
        response = await self._request(
            method,
            path,
            json=json,
            params=params,
            read_s=read_s,
            files=files,
            data=data,
            jobs=jobs,
        )
        try:
            body = response.json()
        except ValueError:
            raise ControlPlaneError(
                f"{self.base_url} answered {method} {path} with something that is not JSON: "
                "is it a comfyfleet control plane?",
                status=response.status_code,
            ) from None
        if not isinstance(body, dict):
            raise ControlPlaneError(
                f"{self.base_url} answered {method} {path} with unexpected JSON",
                status=response.status_code,
            )
        return body

    async def _request(
        self,
        method: str,
        path: str,
        *,
        read_s: float | None = None,
        jobs: bool = False,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        **content: Any,
    ) -> httpx.Response:
        """Send one request; every failure as a ``comfyfleet.errors`` exception. ``jobs``
        swaps in the jobs API's key; ``stream`` leaves the body to be read (and closed)."""
        timeout = httpx.Timeout(read_s, connect=5.0) if read_s is not None else None
        request = self._http.build_request(
            method,
            path,
            headers=headers,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            **content,
        )
        if jobs and self.job_key_source() == API_KEY_ENV:
            request.headers.pop(_ADMIN_HEADER, None)
            request.headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            response = await self._http.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise ControlPlaneUnreachable(
                f"no control plane at {self.base_url}: start `comfyfleet serve` "
                f"(or set {SERVER_ENV})"
            ) from error
        except httpx.TimeoutException as error:
            raise ControlPlaneUnreachable(
                f"the control plane at {self.base_url} did not answer {method} {path} in time"
            ) from error
        except httpx.TransportError as error:
            raise ControlPlaneUnreachable(
                f"lost the control plane at {self.base_url} ({type(error).__name__}): is "
                "`comfyfleet serve` still running?"
            ) from error
        if response.status_code < 400:
            return response
        if stream:
            try:
                await response.aread()
            except httpx.TransportError:
                pass
            finally:
                await response.aclose()
        if response.status_code == 401:
            if jobs and self._api_key:
                raise ApiKeyRefused(f"{_detail(response)}; {_KEY_HINT}", source=API_KEY_ENV)
            raise AdminKeyRefused(_detail(response), source=ADMIN_KEY_ENV)
        raise ControlPlaneError(
            f"the control plane refused {method} {path} ({response.status_code}): "
            f"{_detail(response)}",
            status=response.status_code,
        )


def _job_path(job_id: str) -> str:
    return f"/api/jobs/{quote(job_id, safe='')}"


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        body = jsonlib.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ControlPlaneError(
            f"{where} sent an event that is not a JSON object: is it a comfyfleet control plane?"
        )
    return body


def _write(handle: IO[bytes], digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    handle.write(data)


def _sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())
