"""A small async client of the control plane's admin API, for ``up``, ``monitor`` and ``pool``.

The server is ``--server``, else ``$COMFYFLEET_SERVER``, else http://127.0.0.1:8700
(what ``comfyfleet serve`` listens on); the admin key is ``$ADMIN_API_KEY``, sent in
``x-admin-key``. Every failure is a ``comfyfleet.errors`` exception that says what
to do: no control plane there (``ControlPlaneUnreachable``), a key it refuses
(``AdminKeyRefused``, a ``ConfigError``), anything else it refuses
(``ControlPlaneError``, with the server's own words). No message ever carries the key.

    async with ControlClient.from_env(server) as control:
        (instance_id,) = await control.prewarm("sdxl", 1)
        page = await control.events(instance_id, after=0, wait=25)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import httpx

from comfyfleet.envvars import env_value
from comfyfleet.errors import ComfyfleetError, ConfigError

__all__ = [
    "DEFAULT_SERVER",
    "SERVER_ENV",
    "AdminKeyRefused",
    "ControlClient",
    "ControlPlaneError",
    "ControlPlaneUnreachable",
    "InstanceEvents",
    "server_url",
]

DEFAULT_SERVER: Final = "http://127.0.0.1:8700"
SERVER_ENV: Final = "COMFYFLEET_SERVER"
ADMIN_KEY_ENV: Final = "ADMIN_API_KEY"
_ADMIN_HEADER: Final = "x-admin-key"
#: Beyond a long-poll's own ``wait``: how long an answer may take to come back.
_SLACK_S: Final = 10.0


class ControlPlaneError(ComfyfleetError):
    """The control plane refused a request; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0):
        self.status = status
        super().__init__(message)


class ControlPlaneUnreachable(ControlPlaneError):
    """Nothing answered at the server's URL (not started, wrong address, or it went away)."""


class AdminKeyRefused(ConfigError):
    """The control plane refused the admin key (401): missing or wrong ``ADMIN_API_KEY``."""


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
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = server_url(base_url)
        self.timeout_s = timeout_s
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
        key from ``$ADMIN_API_KEY`` (without one the server answers what it expects)."""
        return cls(server_url(server, env), admin_key=env_value(env, ADMIN_KEY_ENV))

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

    # ------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        read_s: float | None = None,
    ) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if read_s is not None:
            options["timeout"] = httpx.Timeout(read_s, connect=5.0)
        try:
            response = await self._http.request(method, path, json=json, params=params, **options)
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
        if response.status_code == 401:
            raise AdminKeyRefused(_detail(response), source=ADMIN_KEY_ENV)
        if response.status_code >= 400:
            raise ControlPlaneError(
                f"the control plane refused {method} {path} ({response.status_code}): "
                f"{_detail(response)}",
                status=response.status_code,
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
