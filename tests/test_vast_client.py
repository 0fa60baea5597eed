"""The Vast.ai client as a specification: what it sends, what it survives, what it raises.

Most tests talk over loopback HTTP to the project's Vast.ai simulator
(``comfyfleet.sim.vast``). A few wire details the simulator cannot show (a
``Retry-After`` header, which Vast never sends; the exact bytes of a query
string) use ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
import pytest

from comfyfleet.clock import ManualClock
from comfyfleet.errors import (
    AuthError,
    InstanceNotFound,
    InsufficientCredit,
    MissingAPIKey,
    OfferUnavailable,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from comfyfleet.providers.base import CreateRequest, Offer
from comfyfleet.providers.vast import VastClient, gb_to_mb, resolve_api_key
from comfyfleet.sim.vast import RunningSim, SimConfig

KEY = "sk-test-0123456789abcdef"


class Sleeps:
    """An injected sleep that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ---------------------------------------------------------------- API key


def test_api_key_comes_from_vast_api_key_first(tmp_path: Path) -> None:
    (tmp_path / ".vast_api_key").write_text("legacy\n")
    env = {"VAST_API_KEY": "  primary \n", "VASTAI_API_KEY": "seed"}
    assert resolve_api_key(env, tmp_path) == "primary"


def test_api_key_falls_back_to_the_seeds_variable(tmp_path: Path) -> None:
    assert resolve_api_key({"VASTAI_API_KEY": "seed"}, tmp_path) == "seed"


def test_api_key_is_read_from_the_xdg_key_file_then_the_legacy_file(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "vastai").mkdir(parents=True)
    (xdg / "vastai" / "vast_api_key").write_text("from-xdg\n")
    (tmp_path / ".vast_api_key").write_text("legacy\n")
    assert resolve_api_key({"XDG_CONFIG_HOME": str(xdg)}, tmp_path) == "from-xdg"
    assert resolve_api_key({}, tmp_path) == "legacy"
    (tmp_path / ".config" / "vastai").mkdir(parents=True)
    (tmp_path / ".config" / "vastai" / "vast_api_key").write_text(" dotconfig ")
    assert resolve_api_key({}, tmp_path) == "dotconfig"


def test_missing_api_key_says_where_to_put_one(tmp_path: Path) -> None:
    with pytest.raises(MissingAPIKey) as caught:
        resolve_api_key({"VAST_API_KEY": "   "}, tmp_path)
    message = str(caught.value)
    assert "VAST_API_KEY is not set" in message
    assert "~/.config/vastai/vast_api_key" in message
    with pytest.raises(MissingAPIKey):
        VastClient.from_env({"HOME": str(tmp_path)})


def test_from_env_reads_the_url_and_key_and_repr_hides_the_key(tmp_path: Path) -> None:
    client = VastClient.from_env(
        {"VAST_API_KEY": KEY, "VAST_URL": "http://127.0.0.1:9/api/v0/"}, tmp_path
    )
    assert client.base_url == "http://127.0.0.1:9"
    assert KEY not in repr(client)
    assert KEY not in str(vars(client))


def test_gpu_ram_filters_are_in_mb() -> None:
    assert gb_to_mb(16) == 16000.0


# ---------------------------------------------------------------- wire details (MockTransport)


def _mock_client(handler: Any, sleeps: Sleeps | None = None, **kw: Any) -> VastClient:
    return VastClient(
        KEY,
        "http://vast.test",
        transport=httpx.MockTransport(handler),
        sleep=sleeps or Sleeps(),
        **kw,
    )


async def test_list_query_args_are_json_then_url_quoted_and_the_key_only_in_the_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/instances/":
            return httpx.Response(200, json={"success": True, "instances": [], "next_token": None})
        if request.url.path.startswith("/api/v0/instances/request_logs/"):
            return httpx.Response(200, json={"success": True, "result_url": "http://s3.test/x.log"})
        return httpx.Response(200, text="log line\n")

    async with _mock_client(handler) as client:
        assert await client.list_instances() == []
        assert await client.instance_logs(7, tail=50) == "log line\n"

    listing, logs_request, download = seen
    raw_query = listing.url.query.decode()
    assert raw_query == (
        "select_filters=%7B%7D"
        "&order_by=%5B%7B%22col%22%3A+%22id%22%2C+%22dir%22%3A+%22asc%22%7D%5D"
        "&limit=25"
    )
    assert dict(parse_qsl(raw_query))["order_by"] == '[{"col": "id", "dir": "asc"}]'
    assert listing.headers["Authorization"] == f"Bearer {KEY}"
    assert listing.content == b""
    assert json.loads(logs_request.content) == {"tail": "50"}
    assert "Authorization" not in download.headers
    for request in seen:
        assert KEY not in str(request.url)


async def test_retry_after_is_honoured_when_a_server_sends_it() -> None:
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "7"}, text="busy"),
            httpx.Response(200, json={"id": 1, "credit": 5.0, "api_key": KEY}),
        ]
    )
    sleeps = Sleeps()
    async with _mock_client(lambda request: next(answers), sleeps) as client:
        user = await client.current_user()
    assert sleeps.delays == [7.0]
    assert user.credit == 5.0
    assert KEY not in user.model_dump_json()


async def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    sleeps = Sleeps()
    client = _mock_client(
        lambda request: httpx.Response(502, text="bad gateway"),
        sleeps,
        max_attempts=8,
        backoff_base=1.0,
        backoff_max=5.0,
    )
    async with client:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.current_user()
    assert caught.value.status == 502
    assert "after 8 attempts" in str(caught.value)
    ceilings = [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert len(sleeps.delays) == len(ceilings)
    assert all(0.0 <= d <= c for d, c in zip(sleeps.delays, ceilings, strict=True))


async def test_one_instance_answer_is_an_object_but_a_list_or_null_is_tolerated() -> None:
    bodies = iter(
        [
            {"instances": [{"id": 3, "label": "a"}, {"id": 4, "label": "b"}]},
            {"instances": None},
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(bodies))

    async with _mock_client(handler) as client:
        assert (await client.get_instance(4)).label == "b"
        with pytest.raises(InstanceNotFound):
            await client.get_instance(4)


@pytest.mark.parametrize(
    ("status", "body", "expected", "server_words"),
    [
        (
            401,
            {"success": False, "error": "auth_error", "msg": "Invalid user key"},
            AuthError,
            "Invalid user key",
        ),
        (
            403,
            {"success": False, "error": "auth_error", "msg": "This action requires login."},
            AuthError,
            "requires login",
        ),
        (404, {"msg": "Session expired. Please log in again."}, AuthError, "Session expired"),
        (
            404,
            {
                "success": False,
                "error": "invalid_args",
                "msg": "error 404/3603: no_such_ask Instance type by id 9 is not available.",
            },
            OfferUnavailable,
            "not available",
        ),
        (
            410,
            {"success": False, "error": "no_such_ask", "msg": "error 410/3907: gone"},
            OfferUnavailable,
            "410/3907",
        ),
        (
            411,
            {"success": False, "msg": "Insufficient credit"},
            InsufficientCredit,
            "Insufficient credit",
        ),
        (402, {"detail": "pay up"}, InsufficientCredit, "pay up"),
        (
            400,
            {"success": False, "error": "insufficient_credit", "msg": "Not enough"},
            InsufficientCredit,
            "Not enough",
        ),
        (
            200,
            {"success": False, "error": "label_too_long", "msg": "Please limit label length"},
            ProviderError,
            "Please limit label length",
        ),
        (400, {"error": "invalid_request", "message": "bad filter"}, ProviderError, "bad filter"),
        (418, "I'm a teapot", ProviderError, "teapot"),
        (500, {"success": False, "msg": "internal"}, ProviderUnavailable, "internal"),
    ],
)
async def test_error_bodies_of_the_reference_map_to_one_error_class_each(
    status: int, body: Any, expected: type[ProviderError], server_words: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    async with _mock_client(handler) as client:
        with pytest.raises(ProviderError) as caught:
            await client.search_offers({}, allocated_storage_gb=10)
    assert type(caught.value) is expected
    assert caught.value.status == status
    assert server_words in str(caught.value)
    assert KEY not in str(caught.value)


# ---------------------------------------------------------------- against the simulator


@dataclass
class Exchange:
    method: str
    path: str
    outcome: str  # the HTTP status, or what the network did to it
    authorized: bool


Fate = Literal["lose_answer", "answer_502", "drop", "hold"]


class Wire(httpx.AsyncBaseTransport):
    """The real loopback transport, recording every exchange, and able to lose answers.

    Fates for the next request matching (method, path prefix):

    * ``lose_answer``: the server handles it, the answer never arrives (read timeout);
    * ``answer_502``: the server handles it, a gateway answers 502 instead;
    * ``drop``: the request never reaches the server (connection error);
    * ``hold``: the request is held back (the client sees a read timeout) and
      reaches the server just before the next request to the same path.
    """

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[Exchange] = []
        self._fates: list[tuple[str, str, Fate]] = []
        self._held: list[httpx.Request] = []

    def next(self, method: str, path_prefix: str, fate: Fate) -> None:
        self._fates.append((method, path_prefix, fate))

    def calls(self, method: str, path_prefix: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == method and e.path.startswith(path_prefix)]

    def _record(self, request: httpx.Request, outcome: str) -> None:
        self.exchanges.append(
            Exchange(
                request.method,
                request.url.path,
                outcome,
                "authorization" in request.headers,
            )
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for held in [r for r in self._held if r.url.path == request.url.path]:
            self._held.remove(held)
            late = await self._inner.handle_async_request(held)
            await late.aread()
            self._record(held, f"{late.status_code} (held, answer lost)")
        fate = None
        for i, (method, prefix, wanted) in enumerate(self._fates):
            if request.method == method and request.url.path.startswith(prefix):
                fate = wanted
                del self._fates[i]
                break
        if fate == "drop":
            self._record(request, "dropped")
            raise httpx.ConnectError("connection reset (test network)", request=request)
        if fate == "hold":
            self._held.append(request)
            raise httpx.ReadTimeout("no answer (test network)", request=request)
        response = await self._inner.handle_async_request(request)
        if fate in ("lose_answer", "answer_502"):
            await response.aread()
            self._record(request, f"{response.status_code} (answer lost)")
            if fate == "lose_answer":
                raise httpx.ReadTimeout("no answer (test network)", request=request)
            return httpx.Response(502, text="<html><title>502 Bad Gateway</title></html>")
        self._record(request, str(response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _sim_config(**overrides: Any) -> SimConfig:
    return SimConfig(**{"seed": 1, "offers": 400, "api_key": KEY, "credit": 100.0, **overrides})


@pytest.fixture
def sim() -> Iterator[RunningSim]:
    with RunningSim(_sim_config(), clock=ManualClock()) as running:
        yield running


def control(sim: RunningSim, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The simulator's own control endpoints (faults, clock)."""
    answer = httpx.post(
        f"{sim.url}/_sim/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def client_for(
    sim: RunningSim, wire: Wire | None = None, sleeps: Sleeps | None = None, **kw: Any
) -> VastClient:
    return VastClient(
        kw.pop("api_key", KEY),
        sim.url,
        transport=wire or Wire(),
        sleep=sleeps or Sleeps(),
        **kw,
    )


def comfy_request(label: str | None = None) -> CreateRequest:
    return CreateRequest(
        image="vastai/comfyui:@vastai-automatic-tag",
        disk_gb=40,
        label=label or f"comfyfleet-test-{uuid.uuid4().hex[:10]}",
        env={"-p 8188:8188": "1", "PROVISIONING_SCRIPT": "https://example.invalid/p.sh"},
        onstart="entrypoint.sh",
        runtype="jupyter_direc ssh_direc ssh_proxy",
    )


async def cheapest(client: VastClient, n: int = 1) -> list[Offer]:
    offers = await client.search_offers(
        {
            "gpu_ram": {"gte": gb_to_mb(16)},
            "direct_port_count": {"gte": 8},
            "disk_space": {"gte": 40},
        },
        allocated_storage_gb=40,
        order=[["dph_total", "asc"]],
        limit=n,
    )
    assert len(offers) == n
    return offers


async def test_both_search_endpoints_apply_the_dsl_with_gpu_ram_in_mb(sim: RunningSim) -> None:
    query = {"gpu_ram": {"gte": gb_to_mb(24)}, "num_gpus": {"eq": 1}}
    async with client_for(sim) as client:
        legacy = await client.search_offers(query, allocated_storage_gb=40, limit=30)
        new = await client.search_offers(query, allocated_storage_gb=40, limit=30, new_search=True)
        raw_mb = await client.search_offers(
            {"gpu_ram": {"gte": 24}}, allocated_storage_gb=40, limit=1000
        )
        wide = await client.search_offers(
            {"gpu_ram": {"gte": 24000}}, allocated_storage_gb=40, limit=1000
        )
        small_disk = await client.search_offers(query, allocated_storage_gb=10, limit=30)
        fast_first = await client.search_offers(
            query, allocated_storage_gb=40, order=[["inet_down", "desc"]], limit=30
        )
        everything = await client.search_offers(
            {}, allocated_storage_gb=40, limit=1000, default_filters=False
        )

    assert legacy and [o.id for o in legacy] == [o.id for o in new]
    assert len(legacy) <= 30
    for offer in legacy:
        assert offer.gpu_ram >= 24000 and offer.num_gpus == 1
        assert offer.verified and offer.rentable and not offer.rented
    # A raw filter of 24 means 24 MB: it matches every GPU, a superset of 24 GB.
    assert len(raw_mb) > len(wide)
    # dph_total includes the allocated storage.
    by_id = {o.id: o for o in small_disk}
    for offer in legacy:
        if offer.id in by_id:
            assert offer.dph_total > by_id[offer.id].dph_total
    speeds = [o.inet_down for o in fast_first]
    assert speeds == sorted(speeds, reverse=True)
    # Without the default filters, unverified offers show up too.
    assert any(not o.verified for o in everything)


async def test_an_instance_lives_from_create_to_destroy(sim: RunningSim) -> None:
    wire = Wire()
    request = comfy_request()
    async with client_for(sim, wire) as client:
        (offer,) = await cheapest(client)
        instance_id = await client.create_instance(offer.id, request)

        fresh = await client.get_instance(instance_id)
        assert fresh.id == instance_id and fresh.label == request.label
        assert fresh.actual_status is None and fresh.ports is None
        assert fresh.env()["PROVISIONING_SCRIPT"] == "https://example.invalid/p.sh"
        assert fresh.disk_space == 40

        control(sim, "clock/advance", {"seconds": 300})
        running = await client.get_instance(instance_id)
        assert running.actual_status == "running"
        assert running.host_port(8188) is not None

        assert [i.id for i in await client.list_instances()] == [instance_id]
        assert [i.id for i in await client.list_instances_v0()] == [instance_id]
        assert (await client.find_by_label(request.label)) is not None
        assert await client.find_by_label("no-such-label") is None

        await client.label_instance(instance_id, "renamed")
        assert (await client.get_instance(instance_id)).label == "renamed"

        await client.stop_instance(instance_id)
        assert (await client.get_instance(instance_id)).actual_status == "stopped"
        await client.start_instance(instance_id)
        assert (await client.get_instance(instance_id)).intended_status == "running"
        control(sim, "clock/advance", {"seconds": 120})
        assert (await client.get_instance(instance_id)).actual_status == "running"

        text = await client.instance_logs(instance_id, tail=100)
        assert f"Contract {instance_id} accepted" in text
        assert "Running onstart: entrypoint.sh" in text

        await client.destroy_instance(instance_id)
        with pytest.raises(InstanceNotFound):
            await client.get_instance(instance_id)
        await client.destroy_instance(instance_id)  # already gone: still success
        assert await client.list_instances() == []

    polls = wire.calls("GET", "/_logs/")
    assert len(polls) == 3  # the simulator's upload is "not finished" twice
    assert [p.outcome for p in polls] == ["404", "404", "200"]
    assert not any(p.authorized for p in polls), "the log URL must not get the key"
    assert all(e.authorized for e in wire.exchanges if e.path.startswith("/api/"))


async def test_instance_lists_follow_next_token_across_pages(sim: RunningSim) -> None:
    wire = Wire()
    async with client_for(sim, wire) as client:
        offers = await cheapest(client, 7)
        made = [await client.create_instance(o.id, comfy_request()) for o in offers]
        paged = await client.list_instances(page_limit=3)
        v0 = await client.list_instances_v0()
        default_pages = await client.list_instances()

    assert [i.id for i in paged] == sorted(made)
    assert sorted(i.id for i in v0) == sorted(made)
    assert [i.id for i in default_pages] == sorted(made)
    assert len(wire.calls("GET", "/api/v1/instances/")) == 3 + 1


async def test_a_429_storm_is_ridden_out_with_jittered_backoff(sim: RunningSim) -> None:
    wire, sleeps = Wire(), Sleeps()
    control(sim, "faults", {"rate_limit": 4})
    async with client_for(sim, wire, sleeps, backoff_base=0.5, backoff_max=3.0) as client:
        offers = await client.search_offers({}, allocated_storage_gb=10, limit=5)
    assert len(offers) == 5
    assert [e.outcome for e in wire.exchanges] == ["429"] * 4 + ["200"]
    assert len(sleeps.delays) == 4
    for delay, ceiling in zip(sleeps.delays, [0.5, 1.0, 2.0, 3.0], strict=True):
        assert 0.0 <= delay <= ceiling


async def test_5xx_bursts_are_retried(sim: RunningSim) -> None:
    wire = Wire()
    control(sim, "faults", {"server_errors": 3})
    async with client_for(sim, wire) as client:
        assert (await client.current_user()).credit == 100.0
    assert [e.outcome for e in wire.exchanges] == ["502", "503", "504", "200"]


async def test_rate_limiting_that_outlasts_the_attempts_is_rate_limited(sim: RunningSim) -> None:
    wire = Wire()
    control(sim, "faults", {"rate_limit": 10})
    async with client_for(sim, wire, max_attempts=3) as client:
        with pytest.raises(RateLimited) as caught:
            await client.list_instances()
    assert caught.value.status == 429
    assert "API requests too frequent" in str(caught.value)
    assert len(wire.exchanges) == 3


async def test_a_server_that_keeps_failing_is_unavailable(sim: RunningSim) -> None:
    control(sim, "faults", {"server_errors": 10, "server_error_status": 503})
    async with client_for(sim, max_attempts=4) as client:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.list_instances_v0()
    assert caught.value.status == 503
    assert "Service Temporarily Unavailable" in str(caught.value)
    assert "after 4 attempts" in str(caught.value)


async def test_a_server_that_cannot_be_reached_is_unavailable() -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    async with VastClient(KEY, f"http://127.0.0.1:{port}", sleep=sleeps, max_attempts=3) as client:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.current_user()
    assert caught.value.status == 0
    assert "after 3 attempts" in str(caught.value)
    assert len(sleeps.delays) == 2


async def test_an_offer_rented_between_search_and_create_is_unavailable(sim: RunningSim) -> None:
    wire = Wire()
    async with client_for(sim, wire) as client:
        (offer,) = await cheapest(client)
        control(sim, "faults", {"offer_taken": 1})
        with pytest.raises(OfferUnavailable) as caught:
            await client.create_instance(offer.id, comfy_request())
        assert await client.list_instances() == []
        again = await client.search_offers(
            {"id": {"eq": offer.id}}, allocated_storage_gb=40, limit=5
        )
    assert caught.value.status == 404
    assert "no_such_ask" in str(caught.value)
    assert len(wire.calls("PUT", "/api/v0/asks/")) == 1, "no_such_ask is never retried"
    assert again == []


@pytest.mark.parametrize("fate", ["lose_answer", "answer_502"])
async def test_a_create_whose_answer_is_lost_adopts_the_instance(
    sim: RunningSim, fate: Fate
) -> None:
    wire = Wire()
    request = comfy_request()
    async with client_for(sim, wire) as client:
        (offer,) = await cheapest(client)
        wire.next("PUT", "/api/v0/asks/", fate)
        instance_id = await client.create_instance(offer.id, request)
        instances = await client.list_instances()
    assert [(i.id, i.label) for i in instances] == [(instance_id, request.label)]
    assert len(wire.calls("PUT", "/api/v0/asks/")) == 1, "adopted, not rented again"


async def test_a_create_still_running_when_retried_is_adopted_after_no_such_ask(
    sim: RunningSim,
) -> None:
    wire = Wire()
    request = comfy_request()
    async with client_for(sim, wire) as client:
        (offer,) = await cheapest(client)
        wire.next("PUT", "/api/v0/asks/", "hold")
        instance_id = await client.create_instance(offer.id, request)
        instances = await client.list_instances()
    assert [(i.id, i.label) for i in instances] == [(instance_id, request.label)]
    creates = [e.outcome for e in wire.calls("PUT", "/api/v0/asks/")]
    assert creates == ["200 (held, answer lost)", "404"]


async def test_a_create_that_never_arrived_is_sent_again_once(sim: RunningSim) -> None:
    wire = Wire()
    async with client_for(sim, wire) as client:
        (offer,) = await cheapest(client)
        wire.next("PUT", "/api/v0/asks/", "drop")
        instance_id = await client.create_instance(offer.id, comfy_request())
        assert [i.id for i in await client.list_instances()] == [instance_id]
    outcomes = [e.outcome for e in wire.calls("PUT", "/api/v0/asks/")]
    assert outcomes == ["dropped", "200"]


async def test_a_slow_create_with_a_short_timeout_rents_exactly_once(sim: RunningSim) -> None:
    async with client_for(sim, timeout=0.3) as client:
        (offer,) = await cheapest(client)
        control(sim, "faults", {"delay_s": 1.0, "delay_requests": 1})
        instance_id = await client.create_instance(offer.id, comfy_request())
        instances = await client.list_instances()
    assert [i.id for i in instances] == [instance_id]


async def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key(sim: RunningSim) -> None:
    wrong = "wrong-key-7f3a9c2e5b"
    async with client_for(sim, api_key=wrong) as client:
        with pytest.raises(AuthError) as on_search:  # the spec's 404 "Invalid user key"
            await client.search_offers({}, allocated_storage_gb=10)
        with pytest.raises(AuthError) as on_list:  # 401 elsewhere
            await client.list_instances()
    for caught in (on_search, on_list):
        message = str(caught.value)
        assert wrong not in message and wrong not in repr(caught.value)
        assert "Invalid user key" in message
        assert "VAST_API_KEY" in message
    assert on_search.value.status == 404 and on_list.value.status == 401


async def test_too_little_credit_to_rent_is_insufficient_credit() -> None:
    with RunningSim(_sim_config(credit=0.001), clock=ManualClock()) as poor:
        async with client_for(poor) as client:
            (offer,) = await cheapest(client)
            with pytest.raises(InsufficientCredit) as caught:
                await client.create_instance(offer.id, comfy_request())
            assert await client.list_instances() == []
    assert "Insufficient credit" in str(caught.value)


async def test_200_with_success_false_is_an_error_with_the_servers_msg() -> None:
    with RunningSim(_sim_config(credit=1.0), clock=ManualClock()) as sim:
        async with client_for(sim) as client:
            first, second = await cheapest(client, 2)
            kept = await client.create_instance(first.id, comfy_request())
            gone = await client.create_instance(second.id, comfy_request())
            await client.destroy_instance(gone)
            with pytest.raises(InstanceNotFound) as changed_gone:
                await client.label_instance(gone, "too late")

            control(sim, "clock/advance", {"seconds": 3 * 24 * 3600})  # credit runs out
            assert (await client.get_instance(kept)).actual_status == "stopped"
            assert (await client.current_user()).credit <= 0
            with pytest.raises(InsufficientCredit) as restart:
                await client.start_instance(kept)

    assert changed_gone.value.status == 200
    assert "is destroyed and cannot be changed" in str(changed_gone.value)
    assert restart.value.status == 200 and restart.value.code == "missing_billing"
    assert "add credit to start this instance" in str(restart.value)


async def test_the_key_never_reaches_a_log_line_or_an_error(
    sim: RunningSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    control(sim, "faults", {"rate_limit": 2, "server_errors": 2})
    async with client_for(sim) as client:
        (offer,) = await cheapest(client)
        instance_id = await client.create_instance(offer.id, comfy_request())
        await client.instance_logs(instance_id)
        for call in (
            client.get_instance(123),
            client.destroy_instance(-1),
            client.create_instance(offer.id, comfy_request()),
            client.label_instance(123, "x"),
        ):
            try:
                await call
            except ProviderError as error:
                errors.append(error)
        logged = caplog.text
        assert repr(client) and KEY not in repr(client)
    async with client_for(sim, api_key=KEY + "-revoked") as stale:
        try:
            await stale.list_instances()
        except ProviderError as refused:
            errors.append(refused)

    assert len(errors) == 4  # destroying a missing instance is no error
    assert "comfyfleet.vast" in logged and "/api/v0/asks/" in logged
    assert KEY not in logged and "Bearer" not in logged
    for raised in errors:
        assert KEY not in str(raised) and KEY not in repr(raised)
