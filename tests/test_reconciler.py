"""The reconciler against the Vast simulator and a real store, on SQLite and PostgreSQL.

Each test runs the real ``VastClient`` against ``sim/vast.py`` on loopback, sharing a
``ManualClock`` with the reconciler, so minutes of provider time pass in no time.
The agent does not run here: an instance never registers on its own. Where a test
needs a ready instance it writes what the API would (registration, heartbeats, the
``ready`` stage) through the store, and says so in its name.

PostgreSQL is the server on loopback (``COMFYFLEET_TEST_DATABASE_URL`` or
``postgresql://postgres@127.0.0.1:5432/test``); with it down these tests fail and
say to start it. The last test runs two reconciler processes on one PostgreSQL.
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from comfyfleet.agent.bootstrap import (
    INSTANCE_ENV_VARS,
    check_control_url,
    instance_env,
    onstart_script,
    redact_env,
)
from comfyfleet.api.control import PoolActionRefused, PoolControl, UnknownProfile
from comfyfleet.api.metrics import PoolMetrics
from comfyfleet.clock import ManualClock
from comfyfleet.errors import ConfigError, LeaseLost, ProviderUnavailable, UnknownInstance
from comfyfleet.lifecycle import JobState
from comfyfleet.market import rank_for
from comfyfleet.pool.planner import Adopt, Destroy, DestroyOrphan, Drain, Rent, Replace, ScaleDown
from comfyfleet.pool.reconciler import PassReport, RaisedAlert, Reconciler, ReconcilerSettings
from comfyfleet.pool.runner import ReconcilerLoop
from comfyfleet.profiles import PoolPolicy, Profile
from comfyfleet.providers.base import CreateRequest
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.vast import RunningSim, SimConfig, SimInstance
from comfyfleet.store import (
    InstanceRow,
    InstanceState,
    Store,
    active_blocks,
    audit_trail,
    current_lease,
    find_instance_by_label,
    get_instance,
    transition,
    verify_token,
)
from comfyfleet.store.jobs import (
    complete_job,
    get_job,
    job_trail,
    place_job,
    request_cancel,
    submit_job,
)
from comfyfleet.store.models import JobRow

S = InstanceState
FLEET = "t1"
CONTROL_URL = "http://127.0.0.1:8700/api"
API_KEY = "sim-key-for-the-reconciler"
T0 = 1_700_000_000.0
# The simulator's boot with no jitter: created at 5 s, loading at 15 s, running at 60 s.
RUNNING_AFTER = 60.0


# ------------------------------------------------------------------ the simulator
# (the store, on SQLite and on PostgreSQL: ``store`` and ``pg_url`` in tests/conftest.py)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=T0)


def sim_config() -> SimConfig:
    """The simulator's boot with no jitter (``RUNNING_AFTER``), hosts that vanish at 120 s."""
    return SimConfig(
        seed=5,
        offers=300,
        api_key=API_KEY,
        jitter=0.0,
        scheduling_s=5.0,
        created_s=10.0,
        loading_s=45.0,
        vanish_after_s=120.0,
        gone_after_s=600.0,
    )


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[RunningSim]:
    with RunningSim(sim_config(), clock=clock) as running:
        yield running


async def _no_sleep(_seconds: float) -> None:
    return None


def client(sim: RunningSim, cls: type[VastClient] = VastClient, **kw: Any) -> VastClient:
    options: dict[str, Any] = {"sleep": _no_sleep, "timeout": 10.0, **kw}
    return cls(API_KEY, sim.url, **options)


def profile(name: str = "sdxl", **pool: Any) -> Profile:
    """A profile most of the simulator's offers pass, with a pool policy."""
    return Profile(
        name=name,
        min_vram_gb=16,
        min_cuda=11.0,
        disk_gb=40,
        max_price=5.0,
        min_reliability=0.0,
        verified_only=False,
        manifest_gb=10,
        env={"-p 8188:8188": "1", "HF_TOKEN": "hf_secret_never_in_extra_env"},
        pool=PoolPolicy(**{"min_ready": 1, "max_instances": 2, **pool}),
    )


@asynccontextmanager
async def reconciler(
    store: Store,
    sim: RunningSim,
    clock: ManualClock,
    profiles: dict[str, Profile] | None = None,
    *,
    provider: VastClient | None = None,
    holder: str = "rec-a",
    on_alert: Callable[[RaisedAlert], None] | None = None,
    metrics: PoolMetrics | None = None,
    **settings: Any,
) -> AsyncIterator[Reconciler]:
    vast = provider or client(sim)
    rec = Reconciler(
        store,
        vast,
        profiles or {"sdxl": profile()},
        ReconcilerSettings(fleet_id=FLEET, control_url=CONTROL_URL, **settings),
        clock=clock,
        holder=holder,
        on_alert=on_alert,
        metrics=metrics,
    )
    try:
        yield rec
    finally:
        await vast.aclose()


async def tick(rec: Reconciler) -> PassReport:
    report = await rec.tick()
    assert report is not None, "expected this reconciler to lead"
    return report


def rows(store: Store) -> list[InstanceRow]:
    with store.transaction() as session:
        query = select(InstanceRow).where(InstanceRow.fleet_id == FLEET).order_by(InstanceRow.id)
        return list(session.execute(query).scalars())


def live(store: Store) -> list[InstanceRow]:
    return [r for r in rows(store) if r.state not in (S.DESTROYED, S.FAILED)]


def contracts(sim: RunningSim, clock: ManualClock) -> list[SimInstance]:
    """The simulator's contracts that exist now (destroyed and vanished ones left out)."""
    now = clock.now()
    return sorted((i for i in sim.sim.instances.values() if i.exists(now)), key=lambda i: i.id)


def trail(store: Store, instance_id: int) -> list[tuple[str | None, str, str]]:
    with store.transaction() as session:
        return [
            (str(a.from_state) if a.from_state else None, str(a.to_state), a.reason)
            for a in audit_trail(session, instance_id)
        ]


def register_and_report_ready_as_the_api_would(
    store: Store, clock: ManualClock, *instance_ids: int
) -> None:
    """What the API writes when an agent registers, beats and reports ``ready``."""
    now = clock.now()
    with store.transaction() as session:
        for instance_id in instance_ids:
            row = get_instance(session, instance_id, lock=True)
            row.registered_at = row.registered_at or now
            row.last_heartbeat_at = now
            if row.state is not S.READY:
                transition(session, row, S.READY, reason="agent: ready", actor="agent", now=now)


def heartbeat_as_the_api_would(store: Store, clock: ManualClock, *instance_ids: int) -> None:
    with store.transaction() as session:
        for instance_id in instance_ids:
            get_instance(session, instance_id, lock=True).last_heartbeat_at = clock.now()


async def eventually(what: str, done: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    for _ in itertools.count():
        if done():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def free_offer(sim: RunningSim, disk: float = 40) -> int:
    return next(
        o["id"]
        for o in sim.sim.offers
        if o["rentable"] and not o["rented"] and o["disk_space"] >= disk
    )


def rent_behind_our_back(sim: RunningSim, label: str | None, server_type: str = "sdxl") -> int:
    body = {"image": "vastai/comfyui", "disk": 40, "label": label, "env": {}}
    if server_type:
        body["env"] = {"SERVER_TYPE": server_type}
    return int(sim.sim.create_instance(free_offer(sim), body)["new_contract"])


# ------------------------------------------------------------------ renting


async def test_the_pool_rents_up_to_min_ready_recording_each_row_before_calling_the_provider(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    seen: list[tuple[InstanceState, CreateRequest]] = []

    class Watching(VastClient):
        async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
            with store.transaction() as session:
                row = find_instance_by_label(session, request.label)
                assert row is not None, "the provider was called before the row was recorded"
                seen.append((row.state, request))
            return await super().create_instance(offer_id, request)

    async with reconciler(
        store,
        sim,
        clock,
        {"sdxl": profile(min_ready=2, max_instances=3)},
        provider=client(sim, Watching),
    ) as rec:
        report = await tick(rec)

        assert len(report.rented) == 2 and not report.errors
        created = live(store)
        assert [(r.state, r.slot, r.label) for r in created] == [
            (S.CREATING, 0, f"cf-{FLEET}-{created[0].id}"),
            (S.CREATING, 1, f"cf-{FLEET}-{created[1].id}"),
        ]
        assert [state for state, _ in seen] == [S.REQUESTED, S.REQUESTED]
        listed = contracts(sim, clock)
        assert sorted(c.id for c in listed) == sorted(r.provider_contract_id for r in created)
        assert {c.label for c in listed} == {r.label for r in created}

        # The environment holds the agent's five variables (and docker options), no secret.
        tokens = [request.env["COMFYFLEET_TOKEN"] for _, request in seen]
        for i, (row, (_, request)) in enumerate(zip(created, seen, strict=True)):
            env = request.env
            assert set(env) == {*INSTANCE_ENV_VARS, "-p 8188:8188"}
            assert "HF_TOKEN" not in env
            assert env["DM_INSTANCE_ID"] == str(row.id)
            assert env["SERVER_TYPE"] == "sdxl"
            assert env["COMFYFLEET_URL"] == CONTROL_URL
            assert request.onstart == onstart_script()
            with store.transaction() as session:
                assert verify_token(session, row.id, tokens[i])
                assert not verify_token(session, row.id, tokens[1 - i])  # its own token only
        assert trail(store, created[0].id)[:2] == [
            (None, "requested", "pool sdxl: renting slot 0 to keep min_ready"),
            ("requested", "creating", trail(store, created[0].id)[1][2]),
        ]

        # The containers run: creating -> booting; nothing more is rented.
        clock.advance(RUNNING_AFTER + 1)
        report = await tick(rec)
        assert {r.state for r in live(store)} == {S.BOOTING}
        assert {r.actual_status for r in live(store)} == {"running"}
        assert not any(isinstance(a, Rent) for a in report.actions)

        register_and_report_ready_as_the_api_would(store, clock, *(r.id for r in created))
        report = await tick(rec)
        assert not report.actions and not report.rented
        assert len(contracts(sim, clock)) == 2


# ------------------------------------------------------------------ failures


async def test_no_space_left_on_device_is_destroyed_blocklisted_and_replaced_with_the_reason(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    sim.sim.set_faults({"next_instances": ["no_space"]})
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        await tick(rec)
        (first,) = live(store)
        clock.advance(16)  # loading, with containerd's "no space left on device"
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Replace]
        (failed,) = rows(store)
        assert failed.state is S.DESTROYING
        assert "no space left on device" in (failed.failure_reason or "")
        assert contracts(sim, clock) == []  # destroyed at once
        with store.transaction() as session:
            (block,) = active_blocks(session, clock.now())
        assert block.machine_id == first.machine_id and "no_space" in block.reason
        assert block.expires_at == pytest.approx(clock.now() + 24 * 3600)

        # The listing confirms the destroy: failed, and only now is the slot rented again.
        report = await tick(rec)
        old, new = rows(store)
        assert old.state is S.FAILED and old.id == first.id
        assert new.state is S.CREATING and new.slot == first.slot
        assert new.machine_id != first.machine_id
        assert [t[1] for t in trail(store, old.id)] == [
            "requested",
            "creating",
            "destroying",
            "failed",
        ]
        assert "no_space" in trail(store, old.id)[2][2]
        assert [c.id for c in contracts(sim, clock)] == [new.provider_contract_id]


async def test_load_failed_for_more_than_120_s_is_destroyed_blocklisted_and_replaced(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    sim.sim.set_faults({"next_instances": ["load_failed"]})
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        await tick(rec)
        clock.advance(RUNNING_AFTER + 1)
        await tick(rec)
        assert live(store)[0].actual_status == "load_failed"
        clock.advance(120)  # exactly the limit: not yet
        report = await tick(rec)
        assert not report.actions and live(store)[0].state is S.CREATING
        clock.advance(1)
        report = await tick(rec)
        (replace,) = report.actions
        assert isinstance(replace, Replace) and replace.reason == "load_failed"
        await tick(rec)
        old, new = rows(store)
        assert old.state is S.FAILED and "load_failed" in (old.failure_reason or "")
        assert new.state is S.CREATING and new.machine_id != old.machine_id
        with store.transaction() as session:
            assert [b.machine_id for b in active_blocks(session, clock.now())] == [old.machine_id]


async def test_a_vanished_host_is_destroyed_blocklisted_and_replaced(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    sim.sim.set_faults({"next_instances": ["vanish"]})
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        await tick(rec)
        clock.advance(RUNNING_AFTER + 1)
        await tick(rec)
        clock.advance(120)  # the host goes offline 120 s after running
        await tick(rec)
        assert live(store)[0].actual_status == "offline"
        clock.advance(121)
        report = await tick(rec)
        assert [a.reason for a in report.actions if isinstance(a, Replace)] == ["provider_offline"]
        await tick(rec)
        old, new = rows(store)
        assert old.state is S.FAILED and "offline" in (old.failure_reason or "")
        assert new.state is S.CREATING
        with store.transaction() as session:
            assert [b.machine_id for b in active_blocks(session, clock.now())] == [old.machine_id]


async def test_unmapped_ports_are_no_failure_for_an_agent_that_registered_as_the_api_would(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    sim.sim.set_faults({"next_instances": ["no_ports"]})
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        await tick(rec)
        clock.advance(RUNNING_AFTER + 1)
        await tick(rec)
        (row,) = live(store)
        register_and_report_ready_as_the_api_would(store, clock, row.id)
        for _ in range(8):  # past the 600 s registration deadline: the agent dials home
            clock.advance(85)
            heartbeat_as_the_api_would(store, clock, row.id)
            assert not (await tick(rec)).actions
        (inst,) = contracts(sim, clock)
        assert inst.direct_port_start == -1
        assert live(store)[0].state is S.READY


async def test_an_agent_failure_written_as_the_api_would_is_destroyed_blocklisted_and_counted(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    metrics = PoolMetrics()

    def counted(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"comfyfleet_{name}_total", labels)

    fleet = {"sdxl": profile(min_ready=1, max_instances=1)}
    async with reconciler(store, sim, clock, fleet, metrics=metrics) as rec:
        await tick(rec)
        (row,) = live(store)
        with store.transaction() as session:  # the agent's "failed" stage, as the API keeps it
            get_instance(session, row.id, lock=True).failure_reason = "provision_failed"
        report = await tick(rec)
        assert [(a.reason, a.message) for a in report.actions if isinstance(a, Replace)] == [
            ("agent_failed", "the agent reported a failure: provision_failed")
        ]
        await tick(rec)
        old, new = rows(store)
        assert old.state is S.FAILED and new.state is S.CREATING
        with store.transaction() as session:
            assert [b.machine_id for b in active_blocks(session, clock.now())] == [old.machine_id]
        assert counted("prewarm_attempts", profile="sdxl") == 2
        assert counted("prewarm_failures", profile="sdxl", reason="agent_failed") == 1

        register_and_report_ready_as_the_api_would(store, clock, new.id)
        await tick(rec)
        await tick(rec)
        assert counted("prewarm_successes", profile="sdxl") == 1


# ------------------------------------------------------------------ lost answers


async def test_a_create_whose_answer_is_lost_after_the_sim_made_it_is_adopted_not_rented_twice(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    class LosesTheFirstAnswer(VastClient):
        lost = 0

        async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
            contract = await super().create_instance(offer_id, request)
            if self.lost == 0:
                self.lost += 1
                raise TimeoutError("the create call timed out")
            return contract

    async with reconciler(store, sim, clock, provider=client(sim, LosesTheFirstAnswer)) as rec:
        report = await tick(rec)
        (row,) = live(store)
        assert row.state is S.REQUESTED and row.provider_contract_id is None
        assert any("answer lost" in e for e in report.errors)
        (made,) = contracts(sim, clock)
        assert made.label == row.label

        clock.advance(5)
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Adopt]
        (row,) = live(store)
        assert row.state is S.CREATING and row.provider_contract_id == made.id
        assert "adopted" in trail(store, row.id)[-1][2]
        assert len(sim.sim.instances) == 1  # one rental for the slot, ever
        assert not (await tick(rec)).actions


async def test_a_create_refused_by_a_sim_fault_is_retried_by_the_client_and_rents_once(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    class FaultOnCreate(VastClient):
        async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
            sim.sim.set_faults({"server_errors": 1})  # a 502 from the gateway, then ok
            return await super().create_instance(offer_id, request)

    async with reconciler(store, sim, clock, provider=client(sim, FaultOnCreate)) as rec:
        report = await tick(rec)
        assert not report.errors
        (row,) = live(store)
        assert row.state is S.CREATING
        assert [c.id for c in contracts(sim, clock)] == [row.provider_contract_id]
        assert len(sim.sim.instances) == 1


async def test_a_rental_that_never_reached_the_provider_is_abandoned_after_the_grace(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    class NeverReachesTheFirstTime(VastClient):
        calls = 0

        async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
            self.calls += 1
            if self.calls == 1:
                raise ProviderUnavailable("connection refused", status=0)
            return await super().create_instance(offer_id, request)

    async with reconciler(store, sim, clock, provider=client(sim, NeverReachesTheFirstTime)) as rec:
        await tick(rec)
        (first,) = live(store)
        assert first.state is S.REQUESTED
        clock.advance(200)
        report = await tick(rec)
        assert not report.actions and live(store)[0].id == first.id  # the slot stays held
        clock.advance(101)  # past the 300 s grace: it never reached the provider
        await tick(rec)
        old, new = rows(store)
        assert (
            old.state is S.DESTROYED and "never reached the provider" in trail(store, old.id)[-1][2]
        )
        assert new.state is S.CREATING and new.slot == old.slot
        assert [c.id for c in contracts(sim, clock)] == [new.provider_contract_id]


# ------------------------------------------------------------------ the orphan sweep


async def test_the_orphan_sweep_destroys_our_prefixed_contract_and_leaves_the_others_alone(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    ours = rent_behind_our_back(sim, f"cf-{FLEET}-900")
    others = [
        rent_behind_our_back(sim, "cf-other-5"),
        rent_behind_our_back(sim, f"cf-{FLEET}x-3"),
        rent_behind_our_back(sim, None, server_type=""),
        rent_behind_our_back(sim, "somebody's box"),
    ]
    async with reconciler(store, sim, clock, {"sdxl": profile(min_ready=0)}) as rec:
        report = await tick(rec)
        assert [(type(a), getattr(a, "contract_id", None)) for a in report.actions] == [
            (DestroyOrphan, ours)
        ]
        assert sorted(c.id for c in contracts(sim, clock)) == sorted(others)
        assert rows(store) == []
        assert not (await tick(rec)).actions


async def test_with_adopt_an_orphan_of_a_known_profile_is_adopted_under_its_own_id(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    orphan = rent_behind_our_back(sim, f"cf-{FLEET}-900")
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=2)}, adopt=True
    ) as rec:
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Adopt]
        (row,) = live(store)
        assert (row.id, row.label, row.provider_contract_id) == (900, f"cf-{FLEET}-900", orphan)
        assert row.state is S.CREATING and row.slot == 0
        assert "adopted orphan" in trail(store, 900)[0][2]
        # New rows still get fresh ids (PostgreSQL's sequence moved past the adopted one).
        (extra,) = await rec.prewarm("sdxl", 1, actor="admin")
        assert extra > 900


# ------------------------------------------------------------------ caps and brakes


async def test_max_instances_and_the_spend_cap_hold_and_prewarm_beyond_them_is_refused(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with client(sim) as vast:
        ranking = await rank_for(vast, profile())
    assert ranking.best is not None
    price = ranking.best.offer.dph_total
    fleet = {
        "capped": profile("capped", min_ready=3, max_instances=3, max_hourly_spend=1.5 * price),
        "counted": profile("counted", min_ready=2, max_instances=2),
    }
    async with reconciler(store, sim, clock, fleet) as rec:
        await tick(rec)
        await tick(rec)
        by_profile: dict[str, list[InstanceRow]] = {}
        for row in live(store):
            by_profile.setdefault(row.profile, []).append(row)
        assert len(by_profile["counted"]) == 2
        assert len(by_profile["capped"]) == 1
        assert sum(r.dph_total or 0 for r in by_profile["capped"]) <= 1.5 * price + 1e-9
        for name in fleet:
            with pytest.raises(PoolActionRefused, match="caps"):
                await rec.prewarm(name, 1, actor="admin")
        with pytest.raises(UnknownProfile):
            await rec.prewarm("nope", 1, actor="admin")
        assert len(contracts(sim, clock)) == 3


async def test_too_little_credit_stops_renting_with_the_reason_kept_and_alerted_once(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    heard: list[RaisedAlert] = []
    sim.sim.credit = 0.001
    async with reconciler(store, sim, clock, on_alert=heard.append) as rec:
        for _ in range(3):
            report = await tick(rec)
            clock.advance(10)
        assert rows(store) == [] and contracts(sim, clock) == []
        assert [b.code for b in report.brakes.brakes] == ["credit_low"]
        status = rec.status()
        assert status["renting_stopped"] and "$0.00 of credit" in status["brakes"][0]["message"]
        assert [a.key for a in heard] == ["renting_stopped:credit_low"]
        assert rec.alerts()[0].passes == 3
        with pytest.raises(PoolActionRefused, match="renting is stopped"):
            await rec.prewarm("sdxl", 1, actor="admin")

        sim.sim.credit = 100.0
        report = await tick(rec)
        assert not report.brakes.stop_renting and rec.alerts() == []
        assert len(live(store)) == 1


async def test_a_destroy_never_confirmed_raises_one_alert_and_keeps_its_slot_blocked(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    class IgnoresDestroys(VastClient):
        async def destroy_instance(self, instance_id: int) -> None:
            return None

    heard: list[RaisedAlert] = []
    async with reconciler(
        store,
        sim,
        clock,
        {"sdxl": profile(min_ready=1, max_instances=1)},
        provider=client(sim, IgnoresDestroys),
        on_alert=heard.append,
    ) as rec:
        await tick(rec)
        (row,) = live(store)
        await rec.terminate(row.id, reason="operator: terminate", actor="admin")
        assert live(store)[0].state is S.DESTROYING
        for _ in range(3):
            clock.advance(301)
            report = await tick(rec)
            assert not any(isinstance(a, Rent) for a in report.actions)
        assert [a.key for a in heard] == [f"destroy_unconfirmed:{row.id}"]
        assert len(contracts(sim, clock)) == 1 and len(rows(store)) == 1


# ------------------------------------------------------------------ the lease


async def test_a_leader_that_stalls_mid_rental_cannot_record_and_the_new_leader_adopts(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(store, sim, clock, holder="rec-b") as other:

        class StallsInsideTheCreate(VastClient):
            async def create_instance(self, offer_id: int, request: CreateRequest) -> int:
                clock.advance(31)  # past the lease: another process takes over meanwhile
                assert await other.tick() is not None
                return await super().create_instance(offer_id, request)

        async with reconciler(
            store, sim, clock, provider=client(sim, StallsInsideTheCreate)
        ) as stalled:
            assert await stalled.tick() is None  # its pass stops at the epoch check
            assert not stalled.is_leader
            (row,) = live(store)
            assert row.state is S.REQUESTED  # it could not record the contract

            report = await tick(other)
            assert [type(a) for a in report.actions] == [Adopt]
            (row,) = live(store)
            assert row.state is S.CREATING
            assert len(sim.sim.instances) == 1
            assert await stalled.tick() is None  # a follower now
            with pytest.raises(LeaseLost):
                await stalled.reconcile_once()


async def test_the_loop_holds_the_lease_takes_passes_and_releases_it_when_stopped(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(store, sim, clock, interval_s=10.0) as rec:
        loop = ReconcilerLoop(rec)
        running = asyncio.create_task(loop.run())
        await eventually("three passes", lambda: loop.passes >= 3)
        with store.transaction() as session:
            lease = current_lease(session, "reconciler")
        assert lease is not None and lease.holder == "rec-a"
        loop.stop()
        await asyncio.wait_for(running, 10)
        assert loop.passes >= 3 and loop.failures == 0
        assert len(live(store)) == 1
        with store.transaction() as session:
            assert current_lease(session, "reconciler") is None


# ------------------------------------------------------------------ PoolControl


async def test_prewarm_rents_beyond_min_ready_at_once_and_idle_extras_scale_down_after_the_ttl(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=1, max_instances=3, idle_ttl_seconds=300)}
    async with reconciler(store, sim, clock, fleet, interval_s=1e6) as rec:
        assert isinstance(rec, PoolControl)
        await tick(rec)
        loop = ReconcilerLoop(rec)
        running = asyncio.create_task(loop.run())
        try:
            ids = await rec.prewarm("sdxl", 1, actor="admin")
            assert len(ids) == 1 and next(r for r in rows(store) if r.id == ids[0]).slot == 1
            await eventually(
                "the prewarm rented", lambda: all(r.state is not S.REQUESTED for r in live(store))
            )
        finally:
            loop.stop()
            await running
        first, extra = live(store)
        assert extra.id == ids[0] and extra.provider_contract_id is not None
        assert trail(store, extra.id)[0][2] == "prewarm requested by admin"
        assert len(contracts(sim, clock)) == 2

        # Both ready (written as the API would); idle past the TTL, the extra goes.
        register_and_report_ready_as_the_api_would(store, clock, first.id, extra.id)
        await tick(rec)
        clock.advance(301)
        heartbeat_as_the_api_would(store, clock, first.id, extra.id)
        await tick(rec)
        heartbeat_as_the_api_would(store, clock, first.id)
        await tick(rec)
        assert [(r.id, r.state) for r in rows(store)] == [
            (first.id, S.READY),
            (extra.id, S.DESTROYED),
        ]
        assert [c.id for c in contracts(sim, clock)] == [first.provider_contract_id]


async def test_reprovision_and_terminate_destroy_without_blocklisting_and_the_pool_refills(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        await tick(rec)
        (first,) = live(store)
        assert await rec.reprovision(instance_id=first.id, actor="admin") == [first.id]
        assert trail(store, first.id)[-1][1:] == ("destroying", "reprovision requested by admin")
        await tick(rec)
        old, new = rows(store)
        assert old.state is S.DESTROYED and new.state is S.CREATING and new.slot == 0
        with store.transaction() as session:
            assert active_blocks(session, clock.now()) == []

        await rec.terminate(new.id, reason="operator: not needed", actor="admin")
        await rec.terminate(new.id, reason="operator: not needed", actor="admin")  # idempotent
        with pytest.raises(UnknownInstance):
            await rec.terminate(12345, reason="x", actor="admin")
        with pytest.raises(UnknownProfile):
            await rec.reprovision(profile="nope", actor="admin")
        await tick(rec)
        assert [r.state for r in rows(store)][:2] == [S.DESTROYED, S.DESTROYED]
        assert len(live(store)) == 1  # below min_ready: refilled


# ------------------------------------------------------------------ jobs
# Jobs are written as the API and the dispatcher would (submit, place, finish): the
# agent does not run here.


def submit_as_the_api_would(
    store: Store, clock: ManualClock, count: int = 1, **options: Any
) -> list[str]:
    with store.transaction() as session:
        return [
            submit_job(
                session, profile="sdxl", request={"workflow": {}}, now=clock.now(), **options
            ).id
            for _ in range(count)
        ]


def place_as_the_dispatcher_would(
    store: Store, clock: ManualClock, job_id: str, instance_id: int, **options: Any
) -> str:
    with store.transaction() as session:
        return place_job(session, job_id, instance_id, clock.now(), **options)


def job_row(store: Store, job_id: str) -> JobRow:
    with store.transaction() as session:
        return get_job(session, job_id)


async def ready_instance(rec: Reconciler, store: Store, clock: ManualClock) -> InstanceRow:
    """One rental of the pool, rented and reported ready as the API would."""
    await tick(rec)
    (row,) = live(store)
    clock.advance(RUNNING_AFTER + 1)
    await tick(rec)
    register_and_report_ready_as_the_api_would(store, clock, row.id)
    return live(store)[0]


async def test_each_pass_requeues_jobs_whose_lease_ran_out_and_fails_those_past_their_timeout(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        row = await ready_instance(rec, store, clock)
        (slow,) = submit_as_the_api_would(store, clock, timeout_s=30)
        (silent,) = submit_as_the_api_would(store, clock)
        for job_id in (slow, silent):
            place_as_the_dispatcher_would(store, clock, job_id, row.id, max_jobs_per_instance=2)
        assert live(store)[0].state is S.BUSY

        clock.advance(31)
        heartbeat_as_the_api_would(store, clock, row.id)
        report = await tick(rec)
        assert report.ended_jobs == (slow,) and report.requeued_jobs == ()
        failed = job_row(store, slow)
        assert failed.state is JobState.FAILED
        assert failed.error == "timed out: it ran past its timeout of 30 s"
        assert live(store)[0].state is S.BUSY  # the silent one still holds it

        clock.advance(30)  # 61 s since the placement: the silent one's lease ran out
        heartbeat_as_the_api_would(store, clock, row.id)
        report = await tick(rec)
        assert report.requeued_jobs == (silent,) and report.ended_jobs == ()
        again = job_row(store, silent)
        assert (again.state, again.attempts, again.instance_id) == (JobState.QUEUED, 1, None)
        assert live(store)[0].state is S.READY
        # The waiting job counts in the queue; the idle instance covers it: nothing rented.
        assert report.queued == {"sdxl": 1}
        assert not any(isinstance(a, Rent) for a in report.actions)
        assert len(contracts(sim, clock)) == 1


async def test_queued_jobs_rent_beyond_min_ready_and_idle_instances_stay_while_jobs_wait(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    fleet = {"sdxl": profile(min_ready=0, max_instances=3, idle_ttl_seconds=300)}
    async with reconciler(store, sim, clock, fleet) as rec:
        assert (await tick(rec)).rented == ()
        jobs = submit_as_the_api_would(store, clock, 2)
        report = await tick(rec)
        assert report.queued == {"sdxl": 2} and len(report.rented) == 2
        first, second = live(store)
        assert trail(store, first.id)[0][2] == (
            "pool sdxl: renting slot 0 for 2 waiting job(s) (min_ready 0)"
        )
        # A job reserved to an instance (OnStart) is not the pool's to rent for.
        with store.transaction() as session:
            submit_job(
                session,
                profile="sdxl",
                request={"workflow": {}},
                now=clock.now(),
                pinned_instance_id=first.id,
            )
        assert (await tick(rec)).queued == {"sdxl": 2}

        clock.advance(RUNNING_AFTER + 1)
        await tick(rec)
        register_and_report_ready_as_the_api_would(store, clock, first.id, second.id)
        clock.advance(301)
        heartbeat_as_the_api_would(store, clock, first.id, second.id)
        report = await tick(rec)
        assert not report.actions  # idle past the TTL, but jobs wait: both stay
        assert [r.state for r in live(store)] == [S.READY, S.READY]

        with store.transaction() as session:
            for job_id in jobs:
                request_cancel(session, job_id, clock.now())
        heartbeat_as_the_api_would(store, clock, first.id, second.id)
        report = await tick(rec)
        assert sorted(a.instance_id for a in report.actions if isinstance(a, ScaleDown)) == [
            first.id,
            second.id,
        ]


async def test_an_instance_that_fails_under_a_job_queues_it_again_as_it_goes(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        row = await ready_instance(rec, store, clock)
        (job_id,) = submit_as_the_api_would(store, clock)
        place_as_the_dispatcher_would(store, clock, job_id, row.id)
        with store.transaction() as session:  # the agent's "failed" stage, as the API keeps it
            get_instance(session, row.id, lock=True).failure_reason = "comfy_crash_loop"
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Replace]
        assert report.requeued_jobs == (job_id,)
        assert live(store)[0].state is S.DESTROYING
        again = job_row(store, job_id)
        assert (again.state, again.attempts, again.lease_id) == (JobState.QUEUED, 1, None)
        with store.transaction() as session:
            reason = job_trail(session, job_id)[-1].reason
            moved_at = audit_trail(session, row.id)[-1].at
            requeued_at = job_trail(session, job_id)[-1].at
        assert f"its instance {row.id} failed: agent_failed" in reason
        assert requeued_at == moved_at  # one transaction, one instant


async def test_reprovision_drains_a_busy_instance_and_destroys_it_once_its_job_has_ended(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=2)}
    ) as rec:
        row = await ready_instance(rec, store, clock)
        (job_id,) = submit_as_the_api_would(store, clock)
        lease = place_as_the_dispatcher_would(store, clock, job_id, row.id)

        assert await rec.reprovision(instance_id=row.id, actor="admin") == [row.id]
        assert live(store)[0].state is S.DRAINING
        assert trail(store, row.id)[-1][1:] == ("draining", "reprovision requested by admin")
        assert job_row(store, job_id).state is JobState.PLACED  # its job runs on
        assert await rec.reprovision(instance_id=row.id, actor="admin") == [row.id]

        # Draining, it counts towards no min_ready: a fresh one is rented beside it.
        heartbeat_as_the_api_would(store, clock, row.id)
        report = await tick(rec)
        assert [type(a) for a in report.actions] == [Rent]
        assert live(store)[0].state is S.DRAINING

        with store.transaction() as session:
            complete_job(session, job_id, lease, {"outputs": []}, clock.now())
        assert live(store)[0].state is S.DRAINING  # it stays draining: no new job
        report = await tick(rec)
        assert [(a.instance_id, a.reason) for a in report.actions if isinstance(a, Destroy)] == [
            (row.id, "drained")
        ]
        assert job_row(store, job_id).state is JobState.SUCCEEDED


async def test_a_busy_instance_of_a_profile_that_left_the_fleet_is_drained_then_destroyed(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        row = await ready_instance(rec, store, clock)
        (job_id,) = submit_as_the_api_would(store, clock, timeout_s=60)
        place_as_the_dispatcher_would(store, clock, job_id, row.id)
        rec.profiles = {}
        report = await tick(rec)
        assert [(type(a), getattr(a, "reason", None)) for a in report.actions] == [
            (Drain, "profile_removed")
        ]
        assert live(store)[0].state is S.DRAINING
        assert not (await tick(rec)).actions

        clock.advance(61)  # its job times out: the sweep ends it, the pass destroys it
        heartbeat_as_the_api_would(store, clock, row.id)
        report = await tick(rec)
        assert report.ended_jobs == (job_id,)
        assert [(type(a), getattr(a, "reason", None)) for a in report.actions] == [
            (Destroy, "drained")
        ]


async def test_an_admin_terminate_of_a_busy_instance_is_at_once_and_queues_its_job_again(
    store: Store, sim: RunningSim, clock: ManualClock
) -> None:
    async with reconciler(
        store, sim, clock, {"sdxl": profile(min_ready=1, max_instances=1)}
    ) as rec:
        row = await ready_instance(rec, store, clock)
        (job_id,) = submit_as_the_api_would(store, clock)
        place_as_the_dispatcher_would(store, clock, job_id, row.id)
        await rec.terminate(row.id, reason="operator: wrong GPU", actor="admin")
        assert live(store)[0].state is S.DESTROYING
        assert contracts(sim, clock) == []
        again = job_row(store, job_id)
        assert (again.state, again.attempts) == (JobState.QUEUED, 1)
        with store.transaction() as session:
            assert (
                f"its instance {row.id} was destroyed: operator: wrong GPU"
                in job_trail(session, job_id)[-1].reason
            )


# ------------------------------------------------------------------ the instance's bootstrap


def test_the_instance_environment_is_the_five_variables_and_only_https_or_loopback() -> None:
    env = instance_env(control_url=CONTROL_URL + "/", token="cft_x", instance_id=7, profile="sdxl")
    assert env == {
        "COMFYFLEET_URL": CONTROL_URL,
        "COMFYFLEET_TOKEN": "cft_x",
        "DM_INSTANCE_ID": "7",
        "SERVER_TYPE": "sdxl",
        "WORKSPACE": "/workspace",
    }
    assert redact_env(env)["COMFYFLEET_TOKEN"] == "***"
    assert check_control_url("https://fleet.example.com/api") == "https://fleet.example.com/api"
    for bad in ("http://fleet.example.com/api", "https://fleet.example.com", "ftp://x/api"):
        with pytest.raises(ConfigError):
            check_control_url(bad)


def _run_onstart(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "onstart.sh"
    script.write_text(onstart_script())
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "WORKSPACE": str(tmp_path / "ws")}
    return subprocess.run(
        ["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def test_the_onstart_script_refuses_plain_http_to_a_remote_control_plane(tmp_path: Path) -> None:
    done = _run_onstart(
        {"COMFYFLEET_URL": "http://fleet.example.com/api", "COMFYFLEET_TOKEN": "cft_x"}, tmp_path
    )
    assert done.returncode == 1 and "must be https://" in done.stderr


def test_the_onstart_script_refuses_a_wheel_that_does_not_match_its_sha256(tmp_path: Path) -> None:
    got: list[str | None] = []

    class Wheel(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            got.append(self.headers.get("Authorization"))
            body = b"not the wheel you are looking for"
            self.send_response(200)
            self.send_header("X-Comfyfleet-Sha256", "0" * 64)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Wheel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        done = _run_onstart({"COMFYFLEET_URL": url, "COMFYFLEET_TOKEN": "cft_secret"}, tmp_path)
    finally:
        server.shutdown()
    assert done.returncode == 1 and "does not match its sha256" in done.stderr
    assert got == ["Bearer cft_secret"]
    assert not (tmp_path / "ws" / ".comfyfleet").exists()  # nothing installed


def test_the_onstart_script_runs_a_local_agent_with_comfyfleet_agent_python(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "args: $1 $3 $4"\necho "url: $COMFYFLEET_URL"\n')
    fake.chmod(0o755)
    done = _run_onstart(
        {
            "FCS_API_BASE_URL": CONTROL_URL,
            "COMFYFLEET_TOKEN": "cft_x",
            "COMFYFLEET_AGENT_PYTHON": str(fake),
        },
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["args: -c agent connect", f"url: {CONTROL_URL}"]


# ------------------------------------------------------------------ two processes


def _with_idle_transaction_timeout(url: str) -> str:
    """``url`` whose sessions PostgreSQL ends after 1 s idle inside a transaction.

    A leader stopped inside a transaction holds the share lock of its epoch check on
    the lease row, and a takeover waits for it (``store.leases``); PostgreSQL ends such
    a session, so a stopped leader cannot hold the others back for longer than that.
    """
    parsed = make_url(url)
    options = parsed.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    return parsed.update_query_dict(
        {"options": f"{options} -cidle_in_transaction_session_timeout=1000".strip()}
    ).render_as_string(hide_password=False)


def test_two_reconciler_processes_on_postgresql_rent_once_per_slot_when_the_leader_stalls(
    pg_url: str, tmp_path: Path
) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "profiles:\n"
        "  sdxl:\n"
        "    min_vram_gb: 16\n    min_cuda: 11\n    disk_gb: 40\n    max_price: 5\n"
        "    min_reliability: 0\n    verified_only: false\n    manifest_gb: 10\n"
        "    pool: {min_ready: 4, max_instances: 4}\n"
    )
    fleet_id = "tp"
    config = SimConfig(
        seed=3, offers=200, api_key=API_KEY, scheduling_s=0.5, created_s=0.5, loading_s=1.0
    )
    store = Store.open(pg_url, migrate=False)
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: dict[str, Path] = {}
    try:
        with RunningSim(config) as running:
            running.sim.set_faults({"delay_s": 0.25})  # every call slow: a pass takes seconds
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("VAST", "COMFYFLEET"))},
                "DATABASE_URL": _with_idle_transaction_timeout(pg_url),
                "VAST_URL": running.url,
                "VAST_API_KEY": API_KEY,
                "COMFYFLEET_CONFIG": str(fleet_file),
                "COMFYFLEET_FLEET_ID": fleet_id,
                "COMFYFLEET_URL": CONTROL_URL,
                "COMFYFLEET_LEASE_TTL_S": "2",
                "COMFYFLEET_RECONCILE_INTERVAL_S": "0.2",
                "COMFYFLEET_REQUESTED_GRACE_S": "4",
                "PYTHONUNBUFFERED": "1",
            }

            def start(holder: str) -> None:
                logs[holder] = tmp_path / f"{holder}.log"
                procs[holder] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "comfyfleet.pool.reconciler",
                        "--loop",
                        "--holder",
                        holder,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=logs[holder].open("w"),
                    text=True,
                )

            def holder() -> str | None:
                with store.transaction() as session:
                    lease = current_lease(session, "reconciler")
                    return lease.holder if lease is not None else None

            def ours() -> list[InstanceRow]:
                with store.transaction() as session:
                    query = select(InstanceRow).where(InstanceRow.fleet_id == fleet_id)
                    return list(session.execute(query.order_by(InstanceRow.id)).scalars())

            def wait(what: str, done: Callable[[], bool], seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while not done():
                    if time.monotonic() > deadline:
                        tails = {h: p.read_text()[-3000:] for h, p in logs.items()}
                        pytest.fail(f"timed out waiting for {what}; logs: {tails}")
                    time.sleep(0.02)

            start("A")
            wait("A to lead", lambda: holder() == "A", 30)
            start("B")
            # Stop the leader in the middle of its first pass, once it has recorded a rental.
            wait("A's first rental", lambda: len(ours()) >= 1, 30)
            procs["A"].send_signal(signal.SIGSTOP)
            try:
                wait("B to take over", lambda: holder() == "B", 30)
                time.sleep(1.0)  # B acts while A is stopped
            finally:
                procs["A"].send_signal(signal.SIGCONT)

            def settled() -> bool:
                live_rows = [r for r in ours() if r.state not in (S.DESTROYED, S.FAILED)]
                now = running.sim.now()
                listed = [
                    i
                    for i in running.sim.instances.values()
                    if i.exists(now) and (i.label or "").startswith(f"cf-{fleet_id}-")
                ]
                return (
                    len(live_rows) == 4
                    and all(r.provider_contract_id is not None for r in live_rows)
                    and len(listed) == 4
                )

            wait("one contract per slot", settled, 60)
            time.sleep(1.0)  # a few more passes: still settled
            assert settled()
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                assert proc.wait(timeout=30) == 0, logs[name].read_text()[-3000:]

            now = running.sim.now()
            listed = [
                i
                for i in running.sim.instances.values()
                if i.exists(now) and (i.label or "").startswith(f"cf-{fleet_id}-")
            ]
            by_id = {r.id: r for r in ours()}
            slots = sorted(by_id[int(str(i.label).rsplit("-", 1)[1])].slot or 0 for i in listed)
            assert slots == [0, 1, 2, 3]  # one rental per slot
            for inst in listed:
                row = by_id[int(str(inst.label).rsplit("-", 1)[1])]
                assert row.provider_contract_id == inst.id
            assert holder() is None  # both released the lease on SIGTERM
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        store.close()
