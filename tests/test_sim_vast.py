"""The Vast.ai simulator speaks the reference's wire protocol, over real loopback HTTP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from comfyfleet.clock import ManualClock
from comfyfleet.providers.base import Instance, Offer
from comfyfleet.sim.vast import (
    NO_SPACE_MSG,
    RATE_LIMIT_TEXT,
    RunningSim,
    SimConfig,
    attempt_fails,
    boot_seconds,
    generate_offers,
    realised_inet_down_mbps,
)

KEY = "sim-test-key"
IMAGE = "vastai/comfyui:@vastai-automatic-tag"
COMFY_ENV = {"-p 8188:8188": "1", "-p 1111:1111": "1", "PROVISIONING_SCRIPT": "https://x/p.sh"}
RUNTYPE = "jupyter_direc ssh_direc ssh_proxy"
# With jitter 0: null for 5 s, created for 10 s, loading for 45 s, running from t=60.
RUNNING_AT = 60.0


@dataclass
class Sim:
    running: RunningSim
    clock: ManualClock
    http: httpx.Client

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def offers(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        response = self.http.post("/api/v0/bundles/", json=query or {})
        assert response.status_code == 200, response.text
        offers: list[dict[str, Any]] = response.json()["offers"]
        return offers

    def roomy_offer(self) -> dict[str, Any]:
        """A rentable offer with enough direct ports and disk for a ComfyUI instance."""
        return self.offers(
            {
                "rentable": {"eq": True},
                "direct_port_count": {"gte": 10},
                "disk_space": {"gte": 100},
                "order": [["dph_total", "asc"]],
                "limit": 1,
            }
        )[0]

    def create(self, offer_id: int | None = None, **body: Any) -> int:
        offer_id = offer_id if offer_id is not None else self.roomy_offer()["id"]
        payload = {"image": IMAGE, "disk": 40, "env": COMFY_ENV, "runtype": RUNTYPE, **body}
        response = self.http.put(f"/api/v0/asks/{offer_id}/", json=payload)
        assert response.status_code == 200, response.text
        contract: int = response.json()["new_contract"]
        return contract

    def instance(self, instance_id: int) -> dict[str, Any]:
        response = self.http.get(f"/api/v0/instances/{instance_id}/")
        assert response.status_code == 200, response.text
        row: dict[str, Any] = response.json()["instances"]
        return row

    def credit(self) -> float:
        credit: float = self.http.get("/api/v0/users/current").json()["credit"]
        return credit

    def faults(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/_sim/faults", json=body)
        assert response.status_code == 200, response.text
        state: dict[str, Any] = response.json()
        return state


def start_sim(**config: Any) -> Iterator[Sim]:
    clock = ManualClock()
    settings = {"seed": 5, "offers": 300, "api_key": KEY, "jitter": 0.0, **config}
    with (
        RunningSim(SimConfig(**settings), clock=clock) as running,
        httpx.Client(
            base_url=running.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        ) as http,
    ):
        yield Sim(running, clock, http)


@pytest.fixture
def sim() -> Iterator[Sim]:
    yield from start_sim()


@pytest.fixture
def poor_sim() -> Iterator[Sim]:
    yield from start_sim(credit=1.0)


# --- search -------------------------------------------------------------------------------


def test_gpu_ram_filter_is_in_megabytes(sim: Sim) -> None:
    everything = sim.offers()
    big = sim.offers({"gpu_ram": {"gte": 16000}})
    assert big and all(o["gpu_ram"] >= 16000 for o in big)
    assert len(big) < len(everything), "the catalog must hold small cards to reject"
    # A raw 16 means 16 MB: every offer passes.
    assert len(sim.offers({"gpu_ram": {"gte": 16}})) == len(everything)


def test_both_search_endpoints_share_one_filter_engine(sim: Sim) -> None:
    query = {"gpu_name": {"in": ["RTX 4090", "RTX 3090"]}, "num_gpus": {"eq": 1}, "limit": 20}
    legacy = sim.offers(query)
    new = sim.http.put("/api/v0/search/asks/", json={"select_cols": ["*"], "q": query})
    assert new.status_code == 200
    assert [o["id"] for o in new.json()["offers"]] == [o["id"] for o in legacy]
    assert legacy and {o["gpu_name"] for o in legacy} <= {"RTX 4090", "RTX 3090"}


def test_geolocation_filters_use_the_country_code_at_the_end(sim: Sim) -> None:
    offers = sim.offers({"geolocation": {"notin": ["CN", "VN", "US"]}})
    assert offers
    assert all(not o["geolocation"].endswith((", CN", ", VN", ", US")) for o in offers)
    us = sim.offers({"geolocation": {"eq": "US"}})
    assert us and all(o["geolocation"].endswith(", US") for o in us)


def test_order_and_limit(sim: Sim) -> None:
    cheapest = sim.offers({"order": [["dph_total", "asc"]], "limit": 5})
    assert len(cheapest) == 5
    prices = [o["dph_total"] for o in cheapest]
    assert prices == sorted(prices)
    assert prices[0] == min(o["dph_total"] for o in sim.offers())
    scores = [o["score"] for o in sim.offers({"limit": 30})]
    assert scores == sorted(scores, reverse=True), "default order is score desc"


def test_allocated_storage_changes_dph_total(sim: Sim) -> None:
    small = sim.offers({"order": [["id", "asc"]], "limit": 1, "allocated_storage": 10})[0]
    large = sim.offers({"order": [["id", "asc"]], "limit": 1, "allocated_storage": 250})[0]
    assert small["id"] == large["id"]
    expected = small["storage_cost"] * 240 / 730
    assert large["dph_total"] - small["dph_total"] == pytest.approx(expected, abs=1e-5)
    assert large["storage_total_cost"] == pytest.approx(small["storage_cost"] * 250 / 730, 1e-4)
    assert large["dph_total"] == pytest.approx(large["dph_base"] + large["storage_total_cost"])
    default = sim.offers({"order": [["id", "asc"]], "limit": 1})[0]
    assert default["storage_total_cost"] == pytest.approx(small["storage_cost"] * 8 / 730, 1e-4)


def test_unknown_fields_and_offer_types_are_accepted(sim: Sim) -> None:
    base = sim.offers({"limit": 10})
    assert sim.offers({"no_such_field": {"eq": 3}, "limit": 10}) == base
    for kind in ("on-demand", "ondemand", "reserved"):
        assert [o["id"] for o in sim.offers({"type": kind, "limit": 10})] == [o["id"] for o in base]
    bids = sim.offers({"type": "bid", "limit": 10})
    for bid in bids:
        assert bid["dph_total"] == pytest.approx(bid["min_bid"] + bid["storage_total_cost"])


def test_offers_parse_into_the_provider_model(sim: Sim) -> None:
    for raw in sim.offers({"limit": 50}):
        offer = Offer.model_validate(raw)
        assert offer.country_code == raw["geolocation"][-2:]
        assert offer.gpu_total_ram == raw["gpu_ram"] * raw["num_gpus"]


def test_invalid_json_body_is_a_400(sim: Sim) -> None:
    response = sim.http.post(
        "/api/v0/bundles/", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["msg"] == "Invalid json body"


# --- wire details and auth ------------------------------------------------------------------


def test_content_type_is_exactly_application_json(sim: Sim) -> None:
    assert sim.http.post("/api/v0/bundles/", json={}).headers["content-type"] == "application/json"
    missing = sim.http.get("/api/v0/instances/424242/")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"


def test_bearer_and_query_keys_are_accepted(sim: Sim) -> None:
    url = sim.running.url
    assert httpx.get(f"{url}/api/v0/instances/", params={"api_key": KEY}).status_code == 200
    bearer = httpx.get(f"{url}/api/v0/instances/", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.json() == {"instances": []}


def test_missing_key_is_403_and_wrong_key_is_401(sim: Sim) -> None:
    url = sim.running.url
    missing = httpx.get(f"{url}/api/v0/instances/")
    assert missing.status_code == 403
    assert missing.json() == {
        "success": False,
        "error": "auth_error",
        "msg": "This action requires login.",
    }
    wrong = httpx.get(f"{url}/api/v0/instances/", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json() == {"success": False, "error": "auth_error", "msg": "Invalid user key"}
    # Search and the user endpoint answer a wrong key with 404, as the spec says.
    search = httpx.post(f"{url}/api/v0/bundles/", json={}, params={"api_key": "nope"})
    assert search.status_code == 404
    assert search.json()["msg"] == "Invalid user key"


def test_without_a_configured_key_any_non_empty_key_is_accepted() -> None:
    for sim in start_sim(api_key=None):
        url = sim.running.url
        ok = httpx.get(f"{url}/api/v0/instances/", headers={"Authorization": "Bearer whatever"})
        assert ok.status_code == 200
        empty = httpx.get(f"{url}/api/v0/instances/", params={"api_key": ""})
        assert empty.status_code == 403


def test_gpu_names_need_no_key(sim: Sim) -> None:
    response = httpx.get(f"{sim.running.url}/api/v0/gpu_names/unique/")
    assert response.status_code == 200
    assert "RTX 4090" in response.json()["gpu_names"]


def test_users_current_answers_with_and_without_slash_and_never_echoes_the_key(sim: Sim) -> None:
    for path in ("/api/v0/users/current", "/api/v0/users/current/"):
        response = sim.http.get(path)
        assert response.status_code == 200
        user = response.json()
        assert user["credit"] == pytest.approx(100.0)
        assert {"id", "email", "username", "balance"} <= set(user)
        assert KEY not in response.text


def test_bodies_on_get_and_delete_and_missing_bodies_are_tolerated(sim: Sim) -> None:
    got = sim.http.request("GET", "/api/v0/instances/", json={"owner": "me"})
    assert got.status_code == 200
    offer_id = sim.roomy_offer()["id"]
    bare = sim.http.put(f"/api/v0/asks/{offer_id}/")
    assert bare.status_code == 400 and bare.json()["error"] == "invalid_args"
    instance_id = sim.create()
    deleted = sim.http.request("DELETE", f"/api/v0/instances/{instance_id}/", content=b"")
    assert deleted.json() == {"success": True}


# --- create -----------------------------------------------------------------------------------


def test_renting_marks_the_offer_rented_and_a_second_rent_is_no_such_ask(sim: Sim) -> None:
    offer_id = sim.roomy_offer()["id"]
    first = sim.http.put(f"/api/v0/asks/{offer_id}/", json={"image": IMAGE, "disk": 40})
    body = first.json()
    assert body["success"] is True and body["ask_id"] == offer_id
    assert isinstance(body["new_contract"], int) and body["instance_api_key"]
    available = sim.offers({"rented": {"eq": False}, "rentable": {"eq": True}})
    assert offer_id not in {o["id"] for o in available}
    second = sim.http.put(f"/api/v0/asks/{offer_id}/", json={"image": IMAGE, "disk": 40})
    assert second.status_code == 404
    assert second.json() == {
        "success": False,
        "error": "invalid_args",
        "msg": f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
        "ask_id": offer_id,
    }


def test_destroying_puts_the_offer_back_on_the_market(sim: Sim) -> None:
    offer_id = sim.roomy_offer()["id"]
    instance_id = sim.create(offer_id)
    sim.http.delete(f"/api/v0/instances/{instance_id}/")
    assert offer_id in {o["id"] for o in sim.offers({"rented": {"eq": False}})}


def test_env_may_be_a_docker_flag_string(sim: Sim) -> None:
    instance_id = sim.create(env="-p 8188:8188 -e FOO=bar -e EMPTY= -h box")
    row = sim.instance(instance_id)
    assert ["FOO", "bar"] in row["extra_env"]
    assert ["-p 8188:8188", "1"] in row["extra_env"]
    assert ["-h", "box"] in row["extra_env"]


def test_insufficient_credit_refuses_the_create(poor_sim: Sim) -> None:
    expensive = poor_sim.offers({"dph_total": {"gt": 2.0}, "limit": 1})[0]
    response = poor_sim.http.put(f"/api/v0/asks/{expensive['id']}/", json={"image": IMAGE})
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": "insufficient_credit",
        "msg": "Insufficient credit",
    }


def test_disk_larger_than_the_offer_has_is_refused(sim: Sim) -> None:
    offer = sim.roomy_offer()
    response = sim.http.put(
        f"/api/v0/asks/{offer['id']}/", json={"image": IMAGE, "disk": offer["disk_space"] + 1}
    )
    assert response.status_code == 400
    assert "Invalid args" in response.json()["msg"]


# --- lifecycle --------------------------------------------------------------------------------


def test_lifecycle_goes_null_created_loading_running_and_maps_ports_only_when_running(
    sim: Sim,
) -> None:
    instance_id = sim.create()
    seen = []
    for step in (1, 5, 10, 30, 15, 1):
        sim.advance(step)
        row = sim.instance(instance_id)
        seen.append(row["actual_status"])
        if row["actual_status"] != "running":
            assert "ports" not in row or not row["ports"]
        assert row["intended_status"] == "running"
    assert seen == [None, "created", "loading", "loading", "running", "running"]
    row = sim.instance(instance_id)
    instance = Instance.model_validate(row)
    assert instance.host_port(8188) is not None
    assert instance.host_port(22) == row["direct_port_start"]
    assert set(row["ports"]) == {"22/tcp", "8080/tcp", "8188/tcp", "1111/tcp"}
    assert row["ports"]["8188/tcp"][0]["HostIp"] == "0.0.0.0"
    assert isinstance(row["ports"]["8188/tcp"][0]["HostPort"], str)
    assert row["direct_port_end"] - row["direct_port_start"] + 1 == row["direct_port_count"]
    assert row["status_msg"].startswith("success, running vastai/comfyui_v")
    assert row["image_uuid"].startswith("vastai/comfyui:v") and "@" not in row["image_uuid"]
    assert row["image_runtype"] == RUNTYPE
    assert isinstance(row["start_date"], float)
    assert row["extra_env"] == [[k, v] for k, v in COMFY_ENV.items()]
    assert row["public_ipaddr"] == "127.0.0.1"
    assert row["cur_state"] == row["next_state"] == "running"


def test_single_instance_is_one_object_under_a_plural_key(sim: Sim) -> None:
    instance_id = sim.create(label="one")
    body = sim.http.get(f"/api/v0/instances/{instance_id}/", params={"owner": "me"}).json()
    assert isinstance(body["instances"], dict)
    assert body["instances"]["id"] == instance_id and body["instances"]["label"] == "one"
    listed = sim.http.get("/api/v0/instances/", params={"owner": "me"}).json()
    assert [i["id"] for i in listed["instances"]] == [instance_id]


def test_destroyed_instance_reads_as_null_and_unknown_one_as_404(sim: Sim) -> None:
    instance_id = sim.create()
    assert sim.http.delete(f"/api/v0/instances/{instance_id}/").json() == {"success": True}
    assert sim.http.get(f"/api/v0/instances/{instance_id}/").json() == {"instances": None}
    again = sim.http.delete(f"/api/v0/instances/{instance_id}/")
    assert again.status_code == 404 and again.json()["error"] == "not_found"
    unknown = sim.http.get("/api/v0/instances/12345/")
    assert unknown.status_code == 404 and unknown.json()["error"] == "no_such_instance"
    assert sim.http.get("/api/v0/instances/").json() == {"instances": []}


def test_stop_keeps_the_instance_and_start_boots_it_again(sim: Sim) -> None:
    instance_id = sim.create()
    sim.advance(RUNNING_AT + 1)
    assert sim.http.put(f"/api/v0/instances/{instance_id}/", json={"state": "stopped"}).json() == {
        "success": True
    }
    row = sim.instance(instance_id)
    assert (row["actual_status"], row["intended_status"], row["cur_state"]) == (
        "stopped",
        "stopped",
        "stopped",
    )
    assert "ports" not in row
    sim.http.put(f"/api/v0/instances/{instance_id}/", json={"state": "running"})
    assert sim.instance(instance_id)["actual_status"] == "loading"
    sim.advance(16)
    assert sim.instance(instance_id)["actual_status"] == "running"


def test_batch_destroy_takes_a_list_of_ids(sim: Sim) -> None:
    offers = sim.offers({"disk_space": {"gte": 50}, "limit": 2})
    ids = [sim.create(o["id"]) for o in offers]
    response = sim.http.request("DELETE", "/api/v0/instances/", json={"instance_ids": ids})
    assert response.json()["success"] is True
    assert sim.http.get("/api/v0/instances/").json() == {"instances": []}


def test_realistic_boot_takes_the_ground_truth_boot_time() -> None:
    for sim in start_sim(realistic_boot=True, seed=9, credit=10_000.0):
        ids = [sim.create(o["id"]) for o in sim.offers({"disk_space": {"gte": 50}, "limit": 5})]
        sim.advance(RUNNING_AT)
        assert all(sim.instance(i)["actual_status"] == "loading" for i in ids)
        sim.advance(7 * 24 * 3600)
        final = {sim.instance(i)["actual_status"] for i in ids}
        assert final <= {"running", "load_failed"} and "running" in final


def test_label_is_set_and_limited(sim: Sim) -> None:
    instance_id = sim.create()
    ok = sim.http.put(f"/api/v0/instances/{instance_id}/", json={"label": "worker-1"})
    assert ok.json() == {"success": True, "msg": f"label for {instance_id} set to 'worker-1'"}
    assert sim.instance(instance_id)["label"] == "worker-1"
    long = sim.http.put(f"/api/v0/instances/{instance_id}/", json={"label": "x" * 1025})
    assert long.status_code == 400 and long.json()["error"] == "label_too_long"


def test_managing_a_destroyed_instance_is_200_with_success_false(sim: Sim) -> None:
    instance_id = sim.create()
    sim.http.delete(f"/api/v0/instances/{instance_id}/")
    response = sim.http.put(f"/api/v0/instances/{instance_id}/", json={"state": "running"})
    assert response.status_code == 200
    assert response.json()["success"] is False and response.json()["msg"]


def test_v1_instances_paginate_with_next_token(sim: Sim) -> None:
    offers = sim.offers({"rentable": {"eq": True}, "disk_space": {"gte": 50}, "limit": 7})
    created = sorted(sim.create(o["id"], label=f"w{i}") for i, o in enumerate(offers))
    seen: list[int] = []
    params: dict[str, str] = {
        "limit": "3",
        "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
        "select_filters": json.dumps({}),
    }
    pages = 0
    while True:
        body = sim.http.get("/api/v1/instances/", params=params).json()
        pages += 1
        assert body["success"] is True and body["total_instances"] == 7
        assert body["instances_found"] == len(body["instances"]) <= 3
        seen += [row["id"] for row in body["instances"]]
        if not body["next_token"]:
            break
        params["after_token"] = body["next_token"]
    assert pages == 3 and seen == created
    assert sum(body["label_counts"].values()) == 7


def test_v1_instances_filter_order_and_refuse_computed_columns(sim: Sim) -> None:
    offers = sim.offers({"disk_space": {"gte": 50}, "limit": 2})
    first, second = (sim.create(o["id"]) for o in offers)
    sim.http.put(f"/api/v0/instances/{first}/", json={"state": "stopped"})
    stopped = sim.http.get(
        "/api/v1/instances/",
        params={"select_filters": json.dumps({"actual_status": {"in": ["stopped"]}})},
    ).json()
    assert [row["id"] for row in stopped["instances"]] == [first]
    desc = sim.http.get(
        "/api/v1/instances/", params={"order_by": json.dumps([{"col": "id", "dir": "desc"}])}
    ).json()
    assert [row["id"] for row in desc["instances"]] == [second, first]
    bad = sim.http.get("/api/v1/instances/", params={"select_filters": '{"dph_total": {"gt": 1}}'})
    assert bad.status_code == 400
    assert bad.json()["msg"] == "Error in query parameters: dph_total is not a valid search key"
    token = sim.http.get("/api/v1/instances/", params={"after_token": "garbage"})
    assert token.status_code == 400 and token.json() == {"error": "invalid_token"}


def test_v1_pages_show_the_same_rows_as_the_v0_listing(sim: Sim) -> None:
    """The v1 listing filters on contract columns and builds whole rows per page only:
    what it shows must be exactly what the v0 listing shows, in every state."""
    offers = sim.offers({"disk_space": {"gte": 50}, "limit": 7})
    ids = [sim.create(o["id"]) for o in offers]
    sim.http.put(f"/api/v0/instances/{ids[0]}/", json={"state": "stopped"})
    sim.http.put(f"/api/v0/instances/{ids[1]}/", json={"label": "renamed"})
    for at in (0, RUNNING_AT + 1):
        sim.advance(at)
        v0 = {row["id"]: row for row in sim.http.get("/api/v0/instances/").json()["instances"]}
        seen: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"limit": "3", **({"after_token": token} if token else {})}
            page = sim.http.get("/api/v1/instances/", params=params).json()
            seen.extend(page["instances"])
            token = page["next_token"]
            if not token:
                break
        assert [row["id"] for row in seen] == sorted(ids)
        for row in seen:
            assert row == v0[row["id"]]


def test_logs_are_polled_404_then_200_without_auth(sim: Sim) -> None:
    instance_id = sim.create(onstart="entrypoint.sh")
    sim.advance(RUNNING_AT + 1)
    answer = sim.http.put(
        f"/api/v0/instances/request_logs/{instance_id}/", json={"tail": "1000"}
    ).json()
    assert answer["success"] is True
    url = answer["result_url"]
    assert url.startswith(sim.running.url + "/_logs/") and url.endswith(".log")
    assert [httpx.get(url).status_code for _ in range(2)] == [404, 404]
    ready = httpx.get(url)
    assert ready.status_code == 200 and ready.headers["content-type"].startswith("text/plain")
    assert "success, running" in ready.text and "entrypoint.sh" in ready.text
    missing = sim.http.put("/api/v0/instances/request_logs/999/", json={})
    assert missing.status_code == 404 and missing.json()["error"] == "invalid_id"


# --- billing ----------------------------------------------------------------------------------


def test_storage_bills_from_creation_and_gpu_time_from_running(sim: Sim) -> None:
    offer = sim.roomy_offer()
    instance_id = sim.create(offer["id"], disk=100)
    storage_per_hour = offer["storage_cost"] * 100 / 730
    sim.advance(RUNNING_AT)  # boot: storage only
    assert sim.credit() == pytest.approx(100 - storage_per_hour * RUNNING_AT / 3600, abs=1e-6)
    sim.advance(3600)  # one running hour
    expected = 100 - storage_per_hour * (RUNNING_AT + 3600) / 3600 - offer["dph_base"]
    assert sim.credit() == pytest.approx(expected, abs=1e-6)
    row = sim.instance(instance_id)
    assert row["dph_total"] == pytest.approx(offer["dph_base"] + storage_per_hour, abs=1e-6)


def test_a_stopped_instance_bills_storage_only(sim: Sim) -> None:
    offer = sim.roomy_offer()
    instance_id = sim.create(offer["id"], disk=100)
    sim.http.put(f"/api/v0/instances/{instance_id}/", json={"state": "stopped"})
    before = sim.credit()
    sim.advance(7200)
    assert before - sim.credit() == pytest.approx(2 * offer["storage_cost"] * 100 / 730, abs=1e-6)


def test_running_out_of_credit_stops_running_instances(poor_sim: Sim) -> None:
    offer = poor_sim.offers(
        {"dph_total": {"gte": 0.3, "lte": 0.9}, "disk_space": {"gte": 50}, "limit": 1}
    )[0]
    instance_id = poor_sim.create(offer["id"])
    poor_sim.advance(5 * 3600)
    row = poor_sim.instance(instance_id)
    assert row["actual_status"] == "stopped" and "credit" in row["status_msg"]
    credit = poor_sim.credit()
    assert credit <= 0
    # Billing stopped the GPU when credit hit zero; only storage went on.
    assert credit > -offer["storage_cost"] * 40 / 730 * 5
    refused = poor_sim.http.put(f"/api/v0/instances/{instance_id}/", json={"state": "running"})
    assert refused.status_code == 200 and refused.json()["success"] is False


# --- faults -----------------------------------------------------------------------------------


def test_rate_limit_storm_answers_plain_text_429_without_retry_after(sim: Sim) -> None:
    sim.faults(rate_limit=2)
    for _ in range(2):
        response = sim.http.get("/api/v0/instances/")
        assert response.status_code == 429
        assert response.text == RATE_LIMIT_TEXT
        assert response.headers["content-type"].startswith("text/plain")
        assert "retry-after" not in response.headers
    assert sim.http.get("/api/v0/instances/").status_code == 200


def test_server_errors_cycle_through_502_503_504(sim: Sim) -> None:
    sim.faults(server_errors=3)
    statuses = [sim.http.get("/api/v0/instances/").status_code for _ in range(4)]
    assert statuses == [502, 503, 504, 200]
    sim.faults(server_errors=1, server_error_status=503)
    assert sim.http.get("/api/v0/instances/").status_code == 503


def test_slow_answers_are_delayed(sim: Sim) -> None:
    sim.faults(delay_s=0.3, delay_requests=1)
    started = time.monotonic()
    assert sim.http.get("/api/v0/instances/").status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    sim.http.get("/api/v0/instances/")
    assert time.monotonic() - started < 0.3


def test_offer_taken_between_search_and_create(sim: Sim) -> None:
    offer_id = sim.roomy_offer()["id"]
    sim.faults(offer_taken=1)
    response = sim.http.put(f"/api/v0/asks/{offer_id}/", json={"image": IMAGE, "disk": 40})
    assert response.status_code == 404 and "no_such_ask" in response.json()["msg"]
    assert offer_id not in {o["id"] for o in sim.offers({"rented": {"eq": False}})}
    sim.create()  # the fault was used up


def test_no_space_fault_sticks_in_loading_with_the_overlayfs_error(sim: Sim) -> None:
    sim.faults(next_instances=["no_space"])
    broken, healthy = sim.create(), sim.create()
    sim.advance(RUNNING_AT * 10)
    row = sim.instance(broken)
    assert row["actual_status"] == "loading"
    assert row["status_msg"].startswith("failed to extract layer (application/vnd.oci.image")
    assert row["status_msg"].endswith("caddy: no space left on device")
    assert "/var/lib/containerd/" in row["status_msg"]
    assert sim.instance(healthy)["actual_status"] == "running"
    assert "{" not in NO_SPACE_MSG.format(digest="0" * 64, digest8="0" * 8, n=1)


def test_load_failed_fault(sim: Sim) -> None:
    sim.faults(next_instances=["load_failed"])
    instance_id = sim.create()
    sim.advance(RUNNING_AT + 1)
    row = sim.instance(instance_id)
    assert row["actual_status"] == "load_failed" and "ports" not in row


def test_no_ports_fault_runs_without_direct_ports(sim: Sim) -> None:
    sim.faults(next_instances=["no_ports"])
    instance_id = sim.create()
    sim.advance(RUNNING_AT + 1)
    row = sim.instance(instance_id)
    assert row["actual_status"] == "running"
    assert row["direct_port_start"] == -1 and row["direct_port_end"] == -1
    assert "ports" not in row


def test_vanishing_host_goes_offline_then_gone(sim: Sim) -> None:
    sim.faults(next_instances=["vanish"])
    instance_id = sim.create()
    sim.advance(RUNNING_AT + 121)
    row = sim.instance(instance_id)
    assert row["actual_status"] == "offline"
    spent = 100 - sim.credit()
    sim.advance(3600)  # offline: no GPU billing; gone after 600 s: nothing at all
    assert 100 - sim.credit() - spent < row["storage_total_cost"]
    assert sim.http.get(f"/api/v0/instances/{instance_id}/").json() == {"instances": None}


def test_faults_can_be_set_at_start_and_cleared(sim: Sim) -> None:
    for started in start_sim(faults=["rate_limit:1", "no_space", "vanish:2"]):
        state = started.faults()
        assert state["rate_limit"] == 1
        assert state["next_instances"] == ["no_space", "vanish", "vanish"]
        assert started.faults(clear=True)["next_instances"] == []
    bad = sim.http.post("/_sim/faults", json={"next_instances": ["meteor"]})
    assert bad.status_code == 400
    assert httpx.post(f"{sim.running.url}/_sim/faults", json={}).status_code == 403


def test_bad_start_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid fault"):
        RunningSim(SimConfig(faults=["meteor"]))


def test_clock_advance_endpoint_and_state_dump(sim: Sim) -> None:
    before = sim.clock.now()
    answer = sim.http.post("/_sim/clock/advance", json={"seconds": 90}).json()
    assert answer["now"] == pytest.approx(before + 90)
    state = sim.http.get("/_sim/state").json()
    assert state["offers"]["total"] == 300 and state["credit"] == pytest.approx(100)


def test_clock_advance_is_refused_on_a_real_clock() -> None:
    with RunningSim(SimConfig(offers=5)) as running:
        response = httpx.post(
            f"{running.url}/_sim/clock/advance",
            json={"seconds": 5},
            headers={"Authorization": "Bearer any"},
        )
        assert response.status_code == 400


# --- market model -----------------------------------------------------------------------------


def test_catalog_is_deterministic_and_varied() -> None:
    big = generate_offers(3, 20_000)
    assert generate_offers(3, 50) == big[:50]
    assert generate_offers(4, 50) != big[:50]
    assert len({o["id"] for o in big}) == len(big)
    names = {o["gpu_name"] for o in big}
    assert {"RTX 3090", "RTX 4090", "RTX 5090", "H100 SXM", "RTX 3060", "RTX 2080 Ti"} <= names
    down = sorted(o["inet_down"] for o in big)
    assert down[0] < 50 and down[-1] > 5000
    free = sum(1 for o in big if o["inet_down_cost"] == 0) / len(big)
    assert 0.25 < free < 0.6
    assert any(o["direct_port_count"] == 0 for o in big)
    assert {"verified", "unverified"} == {o["verification"] for o in big}
    h100 = [o["dph_base"] / o["num_gpus"] for o in big if o["gpu_name"] == "H100 SXM"]
    assert min(h100) >= 1.5 and max(h100) <= 3.0


def test_ground_truth_bandwidth_is_usually_below_advertised() -> None:
    rng = random.Random(1)
    offers = generate_offers(1, 2000)
    ratios = [realised_inet_down_mbps(rng, o) / o["inet_down"] for o in offers]
    ratios.sort()
    assert 0.4 < ratios[len(ratios) // 2] < 0.8
    assert sum(r > 1.0 for r in ratios) / len(ratios) < 0.1
    assert all(boot_seconds(rng, o) > 0 for o in offers[:200])


def test_attempt_fails_with_probability_one_minus_reliability() -> None:
    rng = random.Random(2)
    flaky = {"reliability": 0.8}
    failures = sum(attempt_fails(rng, flaky) for _ in range(20_000))
    assert failures / 20_000 == pytest.approx(0.2, abs=0.015)
    assert not any(attempt_fails(rng, {"reliability": 1.0}) for _ in range(1000))


# --- foreground server ------------------------------------------------------------------------


def test_serve_prints_its_real_port_and_answers() -> None:
    code = (
        "from comfyfleet.sim.vast import SimConfig, serve; "
        "serve(SimConfig(offers=10, api_key='k'), port=0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        prefix = "Vast.ai simulator listening on http://127.0.0.1:"
        assert line.startswith(prefix) and int(line.removeprefix(prefix)) > 0
        url = line.removeprefix("Vast.ai simulator listening on ")
        offers = httpx.post(f"{url}/api/v0/bundles/", json={}, params={"api_key": "k"})
        assert len(offers.json()["offers"]) == 10
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
