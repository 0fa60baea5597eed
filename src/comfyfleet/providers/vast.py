"""The Vast.ai REST client: typed, async, retried, and careful with the API key.

``VastClient`` speaks the same wire protocol as the official SDK (``vastai``):
the same paths, bodies and query encoding, ``Authorization: Bearer`` auth. On
top of it, it retries what is safe to retry (429, 502, 503, 504, timeouts and
connection errors, with full-jitter exponential backoff), never rents twice
(see ``create_instance``), and turns every refusal into one of the
``comfyfleet.errors`` classes carrying the server's own message.

The API key travels only in the ``Authorization`` header of requests to the
API. It is never put in a URL, a log line, an exception message or ``repr()``.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Self
from urllib.parse import quote_plus, urlsplit

import httpx
import pydantic_core
from pydantic import ValidationError

from comfyfleet import __version__
from comfyfleet.envvars import env_value
from comfyfleet.errors import (
    AuthError,
    ConfigError,
    InstanceNotFound,
    InsufficientCredit,
    MissingAPIKey,
    OfferUnavailable,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from comfyfleet.providers.base import CreateRequest, Instance, Offer, Provider, UserInfo

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_FILTERS",
    "VastClient",
    "gb_to_mb",
    "resolve_api_key",
]

log = logging.getLogger("comfyfleet.vast")

DEFAULT_BASE_URL: Final = "https://console.vast.ai"

# The filters the official SDK's ``search_offers`` adds unless told not to.
DEFAULT_FILTERS: Final[Mapping[str, Mapping[str, bool]]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}

# Transient answers: the request was refused before doing anything (429) or a
# gateway in front of the API failed. The official SDK retries exactly these.
RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})

# Transport failures worth another try. Others (an invalid URL, an unsupported
# scheme) cannot get better by waiting and are raised at once.
_RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

# A Retry-After longer than this is capped: a client that sleeps for an hour
# looks hung. Vast sends no Retry-After today (reference §3).
_RETRY_AFTER_CAP_S: Final = 120.0

# The v1 instance list serves at most 25 rows per page.
V1_PAGE_LIMIT: Final = 25

_KEY_HELP: Final = "export VAST_API_KEY or put the key in ~/.config/vastai/vast_api_key"

_AUTH_HINTS: Final = ("invalid user key", "requires login", "session expired")
_CREDIT_HINTS: Final = ("insufficient credit", "insufficient_credit")
_INSTANCE_GONE_CODES: Final = frozenset({"no_such_instance", "not_found", "invalid_id"})

_API_PREFIX = re.compile(r"/api/v\d+/?$")
_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


def gb_to_mb(gb: float) -> float:
    """Vast's unit for ``gpu_ram``, ``gpu_total_ram`` and ``cpu_ram`` filters.

    Vast measures memory in MB of 1000 (the CLI multiplies GB by 1000), so a
    filter ``{"gpu_ram": {"gte": 16}}`` asks for 16 MB; ``gb_to_mb(16)`` is 16000.
    """
    return float(gb) * 1000.0


# ---------------------------------------------------------------- API key


def _key_files(env: Mapping[str, str], home: Path) -> list[Path]:
    xdg = env_value(env, "XDG_CONFIG_HOME")
    config_home = Path(xdg) if xdg else home / ".config"
    candidates = [config_home / "vastai" / "vast_api_key"]
    fallback = home / ".config" / "vastai" / "vast_api_key"
    if fallback not in candidates:
        candidates.append(fallback)
    candidates.append(home / ".vast_api_key")
    return candidates


def resolve_api_key(env: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """Find the Vast.ai API key the way the official SDK does, plus the seeds' variable.

    In order: ``$VAST_API_KEY``; ``$VASTAI_API_KEY`` (the name the seed scripts
    use); ``$XDG_CONFIG_HOME/vastai/vast_api_key`` (``~/.config/vastai/vast_api_key``
    when XDG_CONFIG_HOME is unset, and as a fallback); the legacy
    ``~/.vast_api_key``. Whitespace around the key is stripped and empty values
    are skipped. ``home`` defaults to ``$HOME`` from ``env``, then the user's home.

    Raises ``MissingAPIKey`` saying where to put one when none is found.
    """
    env = os.environ if env is None else env
    if key := env_value(env, "VAST_API_KEY", "VASTAI_API_KEY"):
        return key
    if home is None:
        home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    files = _key_files(env, home)
    for path in files:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    looked = ", ".join(str(p) for p in files)
    raise MissingAPIKey(
        "VAST_API_KEY is not set: export it or put it in ~/.config/vastai/vast_api_key "
        f"(looked in VAST_API_KEY, VASTAI_API_KEY, {looked})"
    )


class _Secret:
    """Holds the key so that ``repr``, ``vars`` dumps and tracebacks show only stars."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


# ---------------------------------------------------------------- wire helpers


def _encode_query(params: Mapping[str, Any]) -> str:
    """Query args as the SDK builds them: strings as they are, anything else as JSON."""
    return "&".join(
        f"{name}={quote_plus(value if isinstance(value, str) else json.dumps(value))}"
        for name, value in params.items()
    )


def _drop_nulls(row: Mapping[str, Any]) -> dict[str, Any]:
    # Vast sends null for many numeric fields it has no value for; the models'
    # defaults stand in for them.
    return {k: v for k, v in row.items() if v is not None}


def _short_url(url: str) -> str:
    """A URL for a log line: no query string (S3 pre-signed URLs carry signatures)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _server_message(payload: Any, text: str) -> str:
    if isinstance(payload, dict):
        for field in ("msg", "message", "detail", "error"):
            value = payload.get(field)
            if isinstance(value, str) and value.strip():
                return value.strip()
            if value is not None and not isinstance(value, bool | str):
                return json.dumps(value)
    stripped = text.strip()
    if stripped.startswith("<"):
        # An HTML error page from a gateway (nginx): its title says it all.
        title = _HTML_TITLE.search(stripped)
        stripped = title.group(1).strip() if title else _HTML_TAG.sub(" ", stripped)
        stripped = " ".join(stripped.split())
    return stripped[:500] if stripped else "(no detail message supplied)"


def _server_code(payload: Any) -> str | None:
    if isinstance(payload, dict):
        code = payload.get("error")
        if isinstance(code, str) and code:
            return code
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP_S)


_Kind = Literal["generic", "instance", "create"]


# ---------------------------------------------------------------- the client


class VastClient:
    """An async client for the Vast.ai REST API (or the local simulator).

    Use it as an async context manager, or call ``aclose()``::

        async with VastClient.from_env() as vast:
            offers = await vast.search_offers(query, allocated_storage_gb=40)

    ``max_attempts`` bounds every call (first try included). Between attempts it
    sleeps a random time in ``[0, min(backoff_max, backoff_base * 2**n)]`` (full
    jitter), or the server's ``Retry-After`` when one is sent. ``sleep`` replaces
    ``asyncio.sleep`` (tests pass a no-op); ``transport`` replaces httpx's.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = f"comfyfleet/{__version__}",
        log_poll_interval: float = 0.3,
        log_poll_attempts: int = 30,
        rng: random.Random | None = None,
    ):
        if not api_key or not api_key.strip():
            raise MissingAPIKey(
                "VAST_API_KEY is not set: export it or put it in ~/.config/vastai/vast_api_key"
            )
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._key = _Secret(api_key.strip())
        self.base_url = _normalise_base_url(base_url)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.log_poll_interval = log_poll_interval
        self.log_poll_attempts = log_poll_attempts
        self._sleep: Callable[[float], Awaitable[None]] = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        # No default Authorization header: it is added per API request, so the
        # log download (an S3 URL in production) never carries the key.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers={"User-Agent": user_agent, "Accept": "application/json"},
            follow_redirects=False,
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        home: Path | None = None,
        **kw: Any,
    ) -> VastClient:
        """A client with the key from ``resolve_api_key`` and the URL from ``$VAST_URL``."""
        env = os.environ if env is None else env
        api_key = resolve_api_key(env, home)
        base_url = kw.pop("base_url", None) or env_value(env, "VAST_URL") or DEFAULT_BASE_URL
        return cls(api_key, base_url, **kw)

    def __repr__(self) -> str:
        return f"VastClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
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

    # ------------------------------------------------------------ offers

    async def search_offers(
        self,
        query: dict[str, Any],
        *,
        allocated_storage_gb: float,
        limit: int | None = None,
        order: list[Any] | None = None,
        new_search: bool = False,
        default_filters: bool = True,
    ) -> list[Offer]:
        """Offers matching ``query`` (Vast's search DSL), priced for ``allocated_storage_gb``.

        ``query`` maps a field to ``{op: value}`` with op in eq, neq, gt, gte, lt,
        lte, in, notin; memory fields are in MB (see ``gb_to_mb``). Like the
        SDK, this adds ``verified/external/rentable/rented`` filters for the
        fields the query leaves out (``default_filters=False`` turns that off),
        ``order`` (default ``[["score", "desc"]]``), ``type: "on-demand"``
        unless the query names a type, ``limit`` and ``allocated_storage``.

        ``new_search`` uses ``PUT /api/v0/search/asks/`` instead of the legacy
        ``POST /api/v0/bundles/``. An offer the client cannot read is skipped
        with a warning rather than failing the whole search.
        """
        q: dict[str, Any] = (
            {k: dict(v) for k, v in DEFAULT_FILTERS.items()} if default_filters else {}
        )
        q.update(copy.deepcopy(query))
        if order is not None:
            q["order"] = order
        elif "order" not in q:
            q["order"] = [["score", "desc"]]
        offer_type = q.get("type") or "on-demand"
        q["type"] = "bid" if offer_type == "interruptible" else offer_type
        if limit is not None:
            q["limit"] = int(limit)
        q["allocated_storage"] = float(allocated_storage_gb)

        if new_search:
            data = await self._call(
                "PUT", "/api/v0/search/asks/", body={"select_cols": ["*"], "q": q}
            )
        else:
            data = await self._call("POST", "/api/v0/bundles/", body=q)
        rows = data.get("offers")
        if not isinstance(rows, list):
            raise ProviderError("Vast.ai answered a search without an offers list", status=200)
        offers: list[Offer] = []
        for row in rows:
            try:
                offers.append(Offer.model_validate(_drop_nulls(row)))
            except (ValidationError, AttributeError, TypeError) as error:
                log.warning("skipped an offer the client cannot read: %s", _first_line(error))
        return offers

    # ------------------------------------------------------------ create

    async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
        """Rent offer ``offer_id`` and return the new instance (contract) id.

        Never rents twice. A create is not retried blindly: when its answer is
        lost (a timeout, a connection error, or a 5xx, any of which may come
        after the server made the contract), the client waits a moment for a
        request that may still be running, lists the instances and adopts the
        one carrying ``request.label``, returning its id; nothing else is sent
        before that lookup. Only when there is none does it try again, up to
        ``max_attempts`` in all. A ``no_such_ask`` on the first attempt raises
        ``OfferUnavailable`` at once; after a lost attempt it may mean our own
        lost request took the offer, so the label is looked up first.

        A 429 is retried without a lookup (the server refused the request
        before doing anything). Labels must be unique per request for the
        adoption to be sound; with an empty label a lost answer is raised as
        ``ProviderUnavailable`` instead of risking a second rental.
        """
        path = f"/api/v0/asks/{int(offer_id)}/"
        body = _create_body(request)
        label = request.label
        lost_before = False
        last_error: ProviderError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                await self._sleep(self._backoff(attempt - 1))
            try:
                data = await self._call(
                    "PUT", path, body=body, kind="create", attempts=1, attempt_no=attempt
                )
            except RateLimited as error:
                last_error = error
                continue
            except ProviderUnavailable as error:
                last_error = error
                if not label:
                    raise ProviderUnavailable(
                        f"creating an instance on offer {offer_id} got no answer "
                        f"({error.message}); the request has no label, so it was not "
                        "retried: check `show instances` before renting again",
                        status=error.status,
                        code=error.code,
                    ) from error
                # The lost request may still be running at the server: give it a
                # moment (the backoff ceiling, no jitter) before looking for it.
                await self._sleep(self._backoff_ceiling(attempt))
                adopted = await self._adopt(offer_id, label, error)
                if adopted is not None:
                    return adopted
                lost_before = True
                continue
            except OfferUnavailable as error:
                if lost_before:
                    adopted = await self._adopt(offer_id, label, error)
                    if adopted is not None:
                        return adopted
                raise
            new_contract = data.get("new_contract")
            if isinstance(new_contract, bool) or not isinstance(new_contract, int | str):
                raise ProviderError(
                    f"Vast.ai accepted the rental of offer {offer_id} but sent no new_contract "
                    f"id; look for the instance labelled {label!r}",
                    status=200,
                )
            try:
                return int(new_contract)
            except ValueError:
                raise ProviderError(
                    f"Vast.ai sent a new_contract that is not an id: {new_contract!r}", status=200
                ) from None
        assert last_error is not None
        if isinstance(last_error, RateLimited):
            raise last_error
        raise ProviderUnavailable(
            f"creating an instance on offer {offer_id} failed {self.max_attempts} times and no "
            f"instance labelled {label!r} exists: {last_error.message}",
            status=last_error.status,
            code=last_error.code,
        ) from last_error

    async def _adopt(self, offer_id: int, label: str, cause: ProviderError) -> int | None:
        """The id of the instance labelled ``label``, if the lost create made one."""
        try:
            found = await self.find_by_label(label)
        except ProviderError as error:
            raise ProviderUnavailable(
                f"creating an instance on offer {offer_id} got no answer ({cause.message}) and "
                f"the instance list could not be read ({error.message}): an instance labelled "
                f"{label!r} may exist",
                status=error.status,
                code=error.code,
            ) from error
        if found is None:
            log.info("create on offer %s: no instance labelled %s yet", offer_id, label)
            return None
        log.warning(
            "create on offer %s: answer lost (%s); adopted instance %s labelled %s",
            offer_id,
            cause.status or "no answer",
            found.id,
            label,
        )
        return found.id

    # ------------------------------------------------------------ instances

    async def get_instance(self, instance_id: int) -> Instance:
        """One instance (``GET /api/v0/instances/{id}/``); ``InstanceNotFound`` when gone."""
        data = await self._call(
            "GET",
            f"/api/v0/instances/{int(instance_id)}/",
            params={"owner": "me"},
            kind="instance",
        )
        row = data.get("instances")
        if isinstance(row, list):  # tolerated: the key is plural on the wire
            row = next((r for r in row if isinstance(r, dict) and r.get("id") == instance_id), None)
        if not isinstance(row, dict):
            raise InstanceNotFound(
                f"instance {instance_id} not found", status=200, code="not_found"
            )
        return _instance(row)

    async def list_instances(
        self,
        *,
        select_filters: Mapping[str, Any] | None = None,
        page_limit: int = V1_PAGE_LIMIT,
    ) -> list[Instance]:
        """Every instance of the account, following ``GET /api/v1/instances/`` pages.

        Pages are ordered by id and requested ``page_limit`` rows at a time (Vast
        caps this at 25); ``next_token`` is sent back as ``after_token`` until
        the server returns none.
        """
        params: dict[str, Any] = {
            "select_filters": dict(select_filters or {}),
            "order_by": [{"col": "id", "dir": "asc"}],
            "limit": int(page_limit),
        }
        rows: list[Instance] = []
        seen_tokens: set[str] = set()
        while True:
            data = await self._call("GET", "/api/v1/instances/", params=params)
            page = data.get("instances") or []
            if not isinstance(page, list):
                raise ProviderError("Vast.ai answered an instance list without a list", status=200)
            rows.extend(_instance(row) for row in page)
            token = data.get("next_token")
            if not token:
                return rows
            token = str(token)
            if token in seen_tokens:
                raise ProviderError(
                    "Vast.ai returned the same next_token twice while listing instances",
                    status=200,
                    code="invalid_token",
                )
            seen_tokens.add(token)
            params["after_token"] = token

    async def list_instances_v0(self) -> list[Instance]:
        """Every instance, from the legacy unpaginated ``GET /api/v0/instances/?owner=me``."""
        data = await self._call("GET", "/api/v0/instances/", params={"owner": "me"})
        page = data.get("instances") or []
        if not isinstance(page, list):
            raise ProviderError("Vast.ai answered an instance list without a list", status=200)
        return [_instance(row) for row in page]

    async def find_by_label(self, label: str) -> Instance | None:
        """The instance labelled exactly ``label``, or None.

        comfyfleet gives every contract a unique label; should two carry the
        same one, the oldest (lowest id) is returned and a warning logged.
        """
        matches = [i for i in await self.list_instances() if i.label == label]
        if not matches:
            return None
        matches.sort(key=lambda i: i.id)
        if len(matches) > 1:
            log.warning(
                "%d instances carry label %s: %s",
                len(matches),
                label,
                ", ".join(str(i.id) for i in matches),
            )
        return matches[0]

    async def start_instance(self, instance_id: int) -> None:
        await self._manage(instance_id, {"state": "running"})

    async def stop_instance(self, instance_id: int) -> None:
        """Stop an instance: the GPU is released, the disk (and its billing) stays."""
        await self._manage(instance_id, {"state": "stopped"})

    async def label_instance(self, instance_id: int, label: str) -> None:
        await self._manage(instance_id, {"label": label})

    async def _manage(self, instance_id: int, body: dict[str, Any]) -> None:
        await self._call(
            "PUT", f"/api/v0/instances/{int(instance_id)}/", body=body, kind="instance"
        )

    async def destroy_instance(self, instance_id: int) -> None:
        """Destroy an instance (its disk is gone for good). Idempotent.

        An instance that is already gone (404 ``not_found``/``no_such_instance``)
        counts as destroyed: what the caller wants, no contract billing, holds.
        This also makes a retried DELETE whose first answer was lost succeed.
        Use ``get_instance`` to tell "destroyed now" from "never existed".
        """
        try:
            await self._call(
                "DELETE", f"/api/v0/instances/{int(instance_id)}/", body={}, kind="instance"
            )
        except InstanceNotFound:
            log.info("destroy instance %s: already gone", instance_id)

    async def instance_logs(self, instance_id: int, *, tail: int | None = None) -> str:
        """The instance's container log, as text.

        ``PUT /api/v0/instances/request_logs/{id}/`` asks Vast to upload the
        log and answers with a ``result_url``; that URL (S3 in production) is
        then fetched with a plain GET without the Authorization header, every
        ``log_poll_interval`` seconds up to ``log_poll_attempts`` times, until
        it answers 200. No ``result_url`` raises ``ProviderError`` with the
        server's ``msg``; a log that never appears raises ``ProviderUnavailable``.
        """
        body: dict[str, Any] = {}
        if tail is not None:
            body["tail"] = str(int(tail))
        data = await self._call(
            "PUT", f"/api/v0/instances/request_logs/{int(instance_id)}/", body=body, kind="instance"
        )
        result_url = data.get("result_url")
        if not isinstance(result_url, str) or not result_url:
            raise ProviderError(
                f"Vast.ai gave no log for instance {instance_id}: {_server_message(data, '')}",
                status=200,
                code=_server_code(data),
            )
        where = _short_url(result_url)
        last = "no answer"
        for attempt in range(1, self.log_poll_attempts + 1):
            await self._sleep(self.log_poll_interval)
            try:
                response = await self._http.get(result_url)
            except httpx.TransportError as error:
                last = type(error).__name__
                log.debug("GET %s -> %s (log poll %d)", where, last, attempt)
                continue
            log.debug("GET %s -> %d (log poll %d)", where, response.status_code, attempt)
            if response.status_code == 200:
                return response.text
            last = f"HTTP {response.status_code}"
        raise ProviderUnavailable(
            f"the log of instance {instance_id} was not ready after {self.log_poll_attempts} "
            f"polls of {where} ({last})",
            status=0,
        )

    # ------------------------------------------------------------ account

    async def current_user(self) -> UserInfo:
        """The account behind the key (``credit`` is the spendable balance in $)."""
        data = await self._call("GET", "/api/v0/users/current")
        data.pop("api_key", None)
        data.pop("success", None)
        try:
            return UserInfo.model_validate(_drop_nulls(data))
        except ValidationError as error:
            raise ProviderError(
                f"Vast.ai answered users/current with an unreadable account: {_first_line(error)}",
                status=200,
            ) from None

    # ------------------------------------------------------------ transport

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        kind: _Kind = "generic",
        attempts: int | None = None,
        attempt_no: int | None = None,
    ) -> dict[str, Any]:
        """One API call, retried as allowed; the decoded JSON object of a success."""
        url = self.base_url + path
        if params:
            url += "?" + _encode_query(params)
        if body is None and method != "GET":
            body = {}
        total = attempts or self.max_attempts
        for attempt in range(1, total + 1):
            label = attempt_no or attempt
            started = time.monotonic()
            try:
                response = await self._http.request(
                    method,
                    url,
                    json=body,
                    headers={"Authorization": f"Bearer {self._key.reveal()}"},
                )
            except _RETRYABLE_TRANSPORT as error:
                log.debug(
                    "%s %s -> %s (attempt %d, %.3fs)",
                    method,
                    path,
                    type(error).__name__,
                    label,
                    time.monotonic() - started,
                )
                if attempt == total:
                    raise ProviderUnavailable(
                        self._redact(
                            f"Vast.ai did not answer {method} {path} after {total} attempt"
                            f"{'s' if total > 1 else ''}: {type(error).__name__}"
                            + (f": {error}" if str(error) else "")
                        ),
                        status=0,
                    ) from None
                await self._sleep(self._backoff(attempt))
                continue
            except httpx.HTTPError as error:
                raise ProviderError(
                    self._redact(f"{method} {path} could not be sent: {error}"), status=0
                ) from None
            log.debug(
                "%s %s -> %d (attempt %d, %.3fs)",
                method,
                path,
                response.status_code,
                label,
                time.monotonic() - started,
            )
            if response.status_code in RETRYABLE_STATUS and attempt < total:
                delay = _retry_after(response)
                await self._sleep(self._backoff(attempt) if delay is None else delay)
                continue
            return self._decode(method, path, response, kind=kind, attempts=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff_ceiling(self, attempt: int) -> float:
        return max(0.0, min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1)))

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(backoff_max, backoff_base * 2**(attempt-1))]."""
        return self._rng.uniform(0.0, self._backoff_ceiling(attempt))

    def _decode(
        self, method: str, path: str, response: httpx.Response, *, kind: _Kind, attempts: int
    ) -> dict[str, Any]:
        status = response.status_code
        content = response.content
        try:
            # The values json.loads gives, parsed ~2.5x faster: an instance page is
            # ~85 KB, mostly floats, and a listing reads one per 25 instances.
            payload: Any = pydantic_core.from_json(content) if content.strip() else None
        except ValueError:
            payload = None
        failed = status >= 300 or (isinstance(payload, dict) and payload.get("success") is False)
        if failed:
            self._raise_for(
                method, path, status, payload, response.text, kind=kind, attempts=attempts
            )
        if not isinstance(payload, dict):
            raise ProviderError(
                self._redact(
                    f"Vast.ai answered {method} {path} with HTTP {status} and no JSON object: "
                    f"{response.text.strip()[:200]}"
                ),
                status=status,
            )
        return payload

    def _raise_for(
        self,
        method: str,
        path: str,
        status: int,
        payload: Any,
        text: str,
        *,
        kind: _Kind,
        attempts: int,
    ) -> NoReturn:
        code = _server_code(payload)
        msg = self._redact(_server_message(payload, text))
        haystack = f"{code or ''} {msg}".lower()
        where = f"{method} {path}"
        tag = f"HTTP {status}" + (f" {code}" if code else "")

        if (
            status == 401
            or code == "auth_error"
            or (status in (403, 404) and any(h in haystack for h in _AUTH_HINTS))
        ):
            raise AuthError(
                f"Vast.ai refused the API key ({tag}: {msg}); {_KEY_HELP}",
                status=status,
                code=code,
            )
        if "no_such_ask" in haystack:
            raise OfferUnavailable(
                f"the offer is no longer available ({tag}: {msg})", status=status, code=code
            )
        if status in (402, 411) or any(h in haystack for h in _CREDIT_HINTS):
            raise InsufficientCredit(
                f"not enough credit on the Vast.ai account ({tag}: {msg})",
                status=status,
                code=code,
            )
        if status == 429 or code == "rate_limit_exceeded":
            raise RateLimited(
                f"Vast.ai kept rate-limiting {where} after {attempts} attempt"
                f"{'s' if attempts > 1 else ''} ({tag}: {msg})",
                status=status,
                code=code,
            )
        if kind == "instance" and (code in _INSTANCE_GONE_CODES or status == 404):
            raise InstanceNotFound(f"{msg} ({tag}; {where})", status=status, code=code)
        if status >= 500:
            raise ProviderUnavailable(
                f"Vast.ai failed {where} after {attempts} attempt"
                f"{'s' if attempts > 1 else ''} ({tag}: {msg})",
                status=status,
                code=code,
            )
        raise ProviderError(f"Vast.ai refused {where} ({tag}): {msg}", status=status, code=code)

    def _redact(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, "***") if key else text


# ---------------------------------------------------------------- module helpers


def _normalise_base_url(base_url: str) -> str:
    """The bare origin: a trailing slash or ``/api/v0`` (a common mistake) is dropped."""
    url = base_url.strip().rstrip("/")
    url = _API_PREFIX.sub("", url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"the Vast.ai URL must start with http:// or https://: {base_url!r}", source="VAST_URL"
        )
    return url


def _create_body(request: CreateRequest) -> dict[str, Any]:
    """The body of ``PUT /api/v0/asks/{id}/``, shaped as the official SDK sends it."""
    body: dict[str, Any] = {
        "client_id": "me",
        "image": request.image,
        "env": dict(request.env),
        "price": request.price,
        "disk": request.disk_gb,
        "label": request.label,
        "extra": None,
        "onstart": request.onstart,
        "image_login": None,
        "python_utf8": False,
        "lang_utf8": False,
        "use_jupyter_lab": False,
        "jupyter_dir": None,
        "force": False,
        "cancel_unavail": False,
        "template_hash_id": None,
        "user": None,
    }
    if request.runtype:
        body["runtype"] = request.runtype
    if request.args is not None:
        body["args"] = list(request.args)
    return body


def _instance(row: Any) -> Instance:
    if not isinstance(row, dict):
        raise ProviderError(f"Vast.ai sent an instance that is not an object: {row!r}"[:300])
    try:
        return Instance.model_validate(_drop_nulls(row))
    except ValidationError as error:
        raise ProviderError(
            f"Vast.ai sent instance {row.get('id')!r} in a shape the client cannot read: "
            f"{_first_line(error)}",
            status=200,
        ) from None


def _first_line(error: Exception) -> str:
    lines = str(error).splitlines()
    return " ".join(lines[:3]) if lines else type(error).__name__


if TYPE_CHECKING:

    def _is_a_provider(client: VastClient) -> Provider:
        """mypy proves here that ``VastClient`` satisfies ``base.Provider``."""
        return client
