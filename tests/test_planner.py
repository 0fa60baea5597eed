"""The reconcile planner: scenarios with plain data, then its invariants as properties.

The properties run the planner on generated worlds, take its actions the way the
reconcile loop does (``take`` below), and check what must always hold: never over
a cap, never two live instances in one slot, nothing new to do on a second pass,
and ``min_ready`` reached whenever the caps allow it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyfleet.pool.planner import (
    Abandon,
    Action,
    Adopt,
    Alert,
    Destroy,
    DestroyOrphan,
    Drain,
    ObservedInstance,
    PlannerSettings,
    ProviderContract,
    Rent,
    Replace,
    ScaleDown,
    changes_state,
    make_label,
    parse_label,
    plan,
)
from comfyfleet.pool.policy import HEARTBEAT_LOST, OK, STATES, Brake, Brakes, Verdict
from comfyfleet.profiles import PoolPolicy

NOW = 1_700_000_000.0
FLEET = "f1"
LOAD_FAILED = Verdict.fail("load_failed", 'the provider says "pull access denied"')
SILENT = Verdict.fail(HEARTBEAT_LOST, "no heartbeat from the agent for 95 s")
STOP = Brakes((Brake("credit_low", "the account has $0.10 of credit"),))


def pool(min_ready: int = 0, max_instances: int = 1, **more: Any) -> PoolPolicy:
    return PoolPolicy(min_ready=min_ready, max_instances=max_instances, **more)


def row(
    id: int, state: str = "ready", slot: int | None = 0, profile: str = "sdxl", **more: Any
) -> ObservedInstance:
    """A row of the store; by default with a contract id derived from its id."""
    fields: dict[str, Any] = {
        "state_since": NOW - 60,
        "dph_total": 0.5,
        "contract_id": None if state == "requested" else 1000 + id,
    }
    fields.update(more)
    return ObservedInstance(id=id, profile=profile, slot=slot, state=state, **fields)  # type: ignore[arg-type]


def listed(r: ObservedInstance) -> ProviderContract:
    assert r.contract_id is not None
    return ProviderContract(r.contract_id, make_label(FLEET, r.id), r.dph_total, r.profile)


def run(
    desired: Mapping[str, PoolPolicy], observed: Sequence[ObservedInstance], **more: Any
) -> list[Action]:
    return plan(desired, observed, NOW, fleet_id=FLEET, **more)


def kinds(actions: Sequence[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


# ---------------------------------------------------------------- renting


def test_an_empty_pool_rents_up_to_min_ready_in_the_lowest_slots() -> None:
    assert run({"sdxl": pool(2, 3)}, []) == [Rent("sdxl", 0), Rent("sdxl", 1)]


def test_a_pool_at_min_ready_needs_nothing() -> None:
    rows = [row(1, slot=0), row(2, "booting", slot=1)]
    assert run({"sdxl": pool(2, 3)}, rows) == []


def test_the_lowest_free_slot_is_rented_first() -> None:
    rows = [row(1, "busy", slot=0), row(2, "busy", slot=2)]
    assert run({"sdxl": pool(2, 5)}, rows) == [Rent("sdxl", 1), Rent("sdxl", 3)]


def test_busy_and_draining_instances_do_not_count_as_ready() -> None:
    rows = [row(1, "busy", slot=0), row(2, "draining", slot=1, running_jobs=1)]
    assert run({"sdxl": pool(1, 3)}, rows) == [Rent("sdxl", 2)]


def test_renting_never_exceeds_max_instances() -> None:
    rows = [row(1, "busy", slot=0), row(2, "busy", slot=1)]
    assert run({"sdxl": pool(2, 3)}, rows) == [Rent("sdxl", 2)]
    assert run({"sdxl": pool(2, 2)}, rows) == []


def test_renting_never_exceeds_the_hourly_spend_cap() -> None:
    rows = [row(1, "busy", slot=0, dph_total=0.3)]
    # 0.3 + 0.4 fits under 1.0; a second 0.4 would not.
    actions = run({"sdxl": pool(3, 5, max_hourly_spend=1.0)}, rows, rental_dph={"sdxl": 0.4})
    assert actions == [Rent("sdxl", 1, max_dph=pytest.approx(0.7))]


def test_each_rent_carries_the_most_its_offer_may_cost_to_stay_under_the_cap() -> None:
    rows = [row(1, "busy", slot=0, dph_total=0.3)]
    actions = run({"sdxl": pool(3, 5, max_hourly_spend=2.0)}, rows, rental_dph={"sdxl": 0.4})
    assert [a.slot for a in actions if isinstance(a, Rent)] == [1, 2, 3]
    caps = [a.max_dph for a in actions if isinstance(a, Rent)]
    assert caps == [0.4, 0.4, pytest.approx(0.9)]
    assert 0.3 + sum(c for c in caps if c is not None) == pytest.approx(2.0)


def test_with_a_spend_cap_and_no_price_estimate_one_rental_takes_the_headroom() -> None:
    rows = [row(1, "busy", slot=0, dph_total=0.5)]
    actions = run({"sdxl": pool(3, 5, max_hourly_spend=2.0)}, rows)
    assert actions == [Rent("sdxl", 1, max_dph=1.5)]


def test_without_a_spend_cap_rents_carry_no_price_limit() -> None:
    assert run({"sdxl": pool(1, 1)}, [], rental_dph={"sdxl": 9.0}) == [Rent("sdxl", 0)]


def test_caps_count_every_instance_from_requested_through_destroying() -> None:
    rows = [
        row(1, "requested", slot=0, state_since=NOW - 5),
        row(2, "destroying", slot=1),
        row(3, "ready", slot=2, verdict=LOAD_FAILED),
        row(4, "draining", slot=3, running_jobs=1),
    ]
    actions = run({"sdxl": pool(3, 4)}, rows)
    assert kinds(actions) == ["Replace"]  # and no rent: four instances are paid for


def test_terminal_rows_hold_no_slot_and_count_against_no_cap() -> None:
    rows = [row(1, "failed", slot=0, verdict=LOAD_FAILED), row(2, "destroyed", slot=1)]
    assert run({"sdxl": pool(2, 2)}, rows) == [Rent("sdxl", 0), Rent("sdxl", 1)]


# ---------------------------------------------------------------- failures


def test_a_failed_instance_is_replaced_only_after_the_provider_confirms_its_destroy() -> None:
    desired = {"sdxl": pool(1, 1)}
    failed = row(1, "ready", machine_id=77, verdict=LOAD_FAILED)
    (replace,) = run(desired, [failed])
    assert replace == Replace(
        1, failed.contract_id, "sdxl", 0, 77, "load_failed", LOAD_FAILED.message
    )

    # The store keeps the row in destroying until the provider confirms, then failed.
    destroying = dataclasses.replace(failed, state="destroying", state_since=NOW, verdict=OK)
    assert run(desired, [destroying]) == []

    confirmed = dataclasses.replace(destroying, state="failed")
    assert run(desired, [confirmed]) == [Rent("sdxl", 0)]


def test_a_replacement_may_use_another_slot_when_the_caps_allow() -> None:
    actions = run({"sdxl": pool(1, 2)}, [row(1, verdict=LOAD_FAILED)])
    assert kinds(actions) == ["Replace", "Rent"]
    assert actions[1] == Rent("sdxl", 1)


def test_a_busy_instance_that_fails_is_replaced_too() -> None:
    (replace, rent) = run({"sdxl": pool(1, 2)}, [row(1, "busy", verdict=SILENT, machine_id=5)])
    assert isinstance(replace, Replace)
    assert (replace.reason, replace.machine_id) == (HEARTBEAT_LOST, 5)
    assert rent == Rent("sdxl", 1)


@pytest.mark.parametrize(("waited", "alerts"), [(599, 0), (601, 1)])
def test_a_destroy_unconfirmed_after_ten_minutes_raises_an_alert_and_blocks_its_slot(
    waited: float, alerts: int
) -> None:
    rows = [row(1, "destroying", state_since=NOW - waited)]
    actions = run({"sdxl": pool(1, 2)}, rows)
    assert actions[0] == Rent("sdxl", 1)
    assert len(actions) == 1 + alerts
    if alerts:
        alert = actions[1]
        assert isinstance(alert, Alert)
        assert alert.key == "destroy_unconfirmed:1"
        assert alert.instance_id == 1


def test_the_destroy_alert_wait_is_a_setting() -> None:
    rows = [row(1, "destroying", state_since=NOW - 61)]
    actions = run({}, rows, settings=PlannerSettings(destroy_alert_seconds=60))
    assert kinds(actions) == ["Alert"]


# ---------------------------------------------------------------- scaling down


def test_idle_instances_past_the_ttl_scale_down_to_min_ready_highest_slot_first() -> None:
    rows = [row(x, slot=i, state_since=NOW - 1000) for i, x in enumerate((1, 2, 3))]
    actions = run({"sdxl": pool(1, 3, idle_ttl_seconds=900)}, rows)
    assert kinds(actions) == ["ScaleDown", "ScaleDown"]
    assert [a.slot for a in actions if isinstance(a, ScaleDown)] == [2, 1]
    assert all(isinstance(a, ScaleDown) and a.idle_seconds == 1000 for a in actions)


def test_instances_idle_for_less_than_the_ttl_stay() -> None:
    rows = [row(1, slot=0), row(2, slot=1, idle_since=NOW - 899, state_since=NOW - 5000)]
    assert run({"sdxl": pool(1, 3, idle_ttl_seconds=900)}, rows) == []


def test_scale_down_keeps_min_ready_instances_that_are_ready_now() -> None:
    # One ready (idle long) and one still booting: the ready one is what the pool has.
    rows = [row(1, slot=0, state_since=NOW - 5000), row(2, "booting", slot=1)]
    assert run({"sdxl": pool(1, 2, idle_ttl_seconds=60)}, rows) == []


def test_lowering_max_instances_destroys_the_extra_least_advanced_first_never_busy() -> None:
    rows = [
        row(1, "busy", slot=0),
        row(2, slot=1),
        row(3, "downloading", slot=2),
        row(4, slot=3),
    ]
    actions = run({"sdxl": pool(0, 2)}, rows)
    assert [(a.instance_id, a.reason) for a in actions if isinstance(a, Destroy)] == [
        (3, "over_max_instances"),
        (4, "over_max_instances"),
    ]


def test_lowering_the_spend_cap_destroys_until_under_it() -> None:
    rows = [row(x, slot=i, dph_total=1.0) for i, x in enumerate((1, 2, 3))]
    actions = run({"sdxl": pool(0, 3, max_hourly_spend=1.5)}, rows)
    assert [(a.instance_id, a.reason) for a in actions if isinstance(a, Destroy)] == [
        (3, "over_spend_cap"),
        (2, "over_spend_cap"),
    ]


def test_a_profile_removed_from_the_fleet_is_destroyed_once_its_jobs_are_done() -> None:
    rows = [row(1, slot=0), row(2, "busy", slot=1), row(3, slot=2, verdict=LOAD_FAILED)]
    actions = run({}, rows)
    assert kinds(actions) == ["Destroy", "Drain", "Replace"]
    assert isinstance(actions[0], Destroy) and actions[0].reason == "profile_removed"
    # The busy one takes no new job and is destroyed once its job has ended.
    assert actions[1] == Drain(2, "sdxl", 1, "profile_removed", actions[1].message)
    assert run({}, [row(2, "draining", slot=1, running_jobs=1)]) == []
    (drained,) = run({}, [row(2, "draining", slot=1, running_jobs=0)])
    assert isinstance(drained, Destroy) and drained.reason == "drained"


def test_a_draining_instance_is_destroyed_when_its_last_job_ends() -> None:
    assert run({"sdxl": pool(0, 1)}, [row(1, "draining", running_jobs=1)]) == []
    (destroy,) = run({"sdxl": pool(0, 1)}, [row(1, "draining", running_jobs=0)])
    assert isinstance(destroy, Destroy) and destroy.reason == "drained"


def test_lowering_max_instances_below_the_busy_ones_drains_the_highest_slot() -> None:
    rows = [row(1, "busy", slot=0, running_jobs=1), row(2, "busy", slot=1, running_jobs=1)]
    actions = run({"sdxl": pool(0, 1)}, rows)
    assert actions == [Drain(2, "sdxl", 1, "over_max_instances", actions[0].message)]
    assert "finishes its jobs" in actions[0].message
    # Draining, it no longer counts among those that stay: nothing more is cut.
    rows[1] = row(2, "draining", slot=1, running_jobs=1)
    assert run({"sdxl": pool(0, 1)}, rows) == []


# ---------------------------------------------------------------- queue depth


def test_queued_jobs_rent_beyond_min_ready_up_to_max_instances() -> None:
    assert run({"sdxl": pool(1, 3)}, [], queued={"sdxl": 2}) == [
        Rent("sdxl", 0),
        Rent("sdxl", 1),
    ]
    # Five waiting, three at most: the caps hold as they do for min_ready.
    assert run({"sdxl": pool(0, 3)}, [], queued={"sdxl": 5}) == [
        Rent("sdxl", 0),
        Rent("sdxl", 1),
        Rent("sdxl", 2),
    ]


def test_queued_jobs_are_covered_first_by_idle_and_booting_instances() -> None:
    rows = [row(1, slot=0), row(2, "downloading", slot=1)]
    assert run({"sdxl": pool(0, 4)}, rows, queued={"sdxl": 2}) == []
    assert run({"sdxl": pool(0, 4)}, rows, queued={"sdxl": 3}) == [Rent("sdxl", 2)]


def test_busy_instances_cover_no_queued_job_at_one_job_each_but_do_with_more() -> None:
    rows = [row(1, "busy", slot=0, running_jobs=1)]
    assert run({"sdxl": pool(0, 3)}, rows, queued={"sdxl": 1}) == [Rent("sdxl", 1)]
    # At two jobs per instance, the busy one takes the waiting job.
    assert run({"sdxl": pool(0, 3)}, rows, queued={"sdxl": 1}, jobs_per_instance=2) == []
    # Three more: one on the busy one, two on one new instance.
    actions = run({"sdxl": pool(0, 3)}, rows, queued={"sdxl": 3}, jobs_per_instance=2)
    assert actions == [Rent("sdxl", 1)]


def test_queued_jobs_rent_within_the_spend_cap() -> None:
    actions = run(
        {"sdxl": pool(0, 5, max_hourly_spend=1.0)},
        [],
        queued={"sdxl": 4},
        rental_dph={"sdxl": 0.4},
    )
    assert [a.slot for a in actions if isinstance(a, Rent)] == [0, 1]


def test_queued_jobs_of_another_profile_rent_nothing_here() -> None:
    assert run({"sdxl": pool(0, 2)}, [], queued={"flux": 3}) == []


def test_idle_instances_are_kept_while_jobs_wait() -> None:
    rows = [row(x, slot=i, state_since=NOW - 1000) for i, x in enumerate((1, 2, 3))]
    desired = {"sdxl": pool(1, 3, idle_ttl_seconds=900)}
    assert run(desired, rows, queued={"sdxl": 1}) == []
    assert kinds(run(desired, rows, queued={})) == ["ScaleDown", "ScaleDown"]


def test_brakes_stop_renting_for_queued_jobs_and_say_why() -> None:
    actions = run({"sdxl": pool(0, 2)}, [], queued={"sdxl": 1}, brakes=STOP)
    assert kinds(actions) == ["Alert"]


# ---------------------------------------------------------------- OnStart instances


def onstart(id: int, state: str = "ready", job_state: str | None = "queued", **more: Any) -> Any:
    return row(id, state, slot=None, onstart_job=f"job-{id}", onstart_job_state=job_state, **more)


def test_an_onstart_instance_counts_in_the_caps_but_never_towards_min_ready() -> None:
    rows = [onstart(1, "booting")]
    assert run({"sdxl": pool(1, 2)}, rows) == [Rent("sdxl", 0)]
    assert run({"sdxl": pool(1, 1)}, rows) == []  # no room left beside it


def test_an_onstart_instance_is_never_scaled_down_or_cut_while_its_job_is_active() -> None:
    for job_state in ("queued", "placed", "running"):
        state = "ready" if job_state == "queued" else "busy"
        rows = [onstart(1, state, job_state, state_since=NOW - 300, running_jobs=1)]
        assert run({"sdxl": pool(0, 2, idle_ttl_seconds=0)}, rows) == []
        assert run({"sdxl": pool(0, 0)}, rows) == []  # over the caps: still kept
        assert run({}, rows) == []  # even with its profile gone


@pytest.mark.parametrize(
    ("job_state", "reason"),
    [("succeeded", "onstart_done"), ("failed", "onstart_failed"), ("cancelled", "onstart_failed")],
)
def test_an_onstart_instance_is_destroyed_once_its_job_has_ended(
    job_state: str, reason: str
) -> None:
    (destroy,) = run({"sdxl": pool(0, 2)}, [onstart(1, "ready", job_state)])
    assert destroy == Destroy(1, 1001, "sdxl", None, reason, f"its OnStart job job-1 {job_state}")
    assert not any(isinstance(a, Replace) for a in run({}, [onstart(1, "ready", job_state)]))


def test_an_onstart_instance_whose_agent_never_takes_its_job_is_destroyed() -> None:
    fresh = onstart(1, "ready", "queued", state_since=NOW - 599)
    assert run({"sdxl": pool(0, 2)}, [fresh]) == []
    stale = onstart(1, "ready", "queued", state_since=NOW - 601)
    (destroy,) = run({"sdxl": pool(0, 2)}, [stale])
    assert isinstance(destroy, Destroy) and destroy.reason == "onstart_unclaimed"


def test_an_onstart_rental_whose_job_was_cancelled_before_it_was_made_is_abandoned() -> None:
    (abandon,) = run({"sdxl": pool(0, 2)}, [onstart(1, "requested", "cancelled")])
    assert isinstance(abandon, Abandon) and "cancelled" in abandon.message
    assert run({"sdxl": pool(0, 2)}, [onstart(1, "requested", "queued")]) == []


def test_a_failed_onstart_instance_is_replaced_as_any_failure_in_no_slot() -> None:
    (replace,) = run({"sdxl": pool(0, 2)}, [onstart(1, "downloading", verdict=LOAD_FAILED)])
    assert isinstance(replace, Replace) and replace.slot is None


# ---------------------------------------------------------------- the orphan sweep


def test_an_orphan_of_this_fleet_is_destroyed() -> None:
    orphan = ProviderContract(5, "cf-f1-909", 0.7, "sdxl")
    (action,) = run({"sdxl": pool(0, 1)}, [], contracts=[orphan])
    assert action == DestroyOrphan(5, "cf-f1-909", "orphan", action.message)  # type: ignore[union-attr]


def test_contracts_of_other_fleets_and_unlabelled_ones_are_never_touched() -> None:
    contracts = [
        ProviderContract(1, "cf-f1x-a"),
        ProviderContract(2, "cf-f1-eu-7"),  # fleet "f1-eu", instance 7
        ProviderContract(3, None),
        ProviderContract(4, "comfyui by hand"),
        ProviderContract(5, "cf-f1-"),
        ProviderContract(6, "cf-f1-web"),  # not an instance id: not ours
    ]
    assert run({"sdxl": pool(0, 1)}, [], contracts=contracts) == []
    assert run({"sdxl": pool(0, 1)}, [], contracts=contracts, adopt=True) == []


def test_with_adopt_an_orphan_is_adopted_in_the_lowest_free_slot_and_counts() -> None:
    orphan = ProviderContract(5, "cf-f1-909", 0.7, "sdxl")
    rows = [row(1, slot=0)]
    actions = run({"sdxl": pool(2, 3)}, rows, contracts=[listed(rows[0]), orphan], adopt=True)
    assert actions == [Adopt(909, 5, "sdxl", 1, 0.7, new=True)]


def test_with_adopt_an_orphan_beyond_the_caps_is_destroyed() -> None:
    orphan = ProviderContract(5, "cf-f1-909", 0.7, "sdxl")
    rows = [row(1, slot=0)]
    (action,) = run({"sdxl": pool(1, 1)}, rows, contracts=[orphan], adopt=True)
    assert isinstance(action, DestroyOrphan) and action.reason == "orphan_over_capacity"


def test_with_adopt_an_orphan_of_an_unknown_profile_is_destroyed() -> None:
    orphan = ProviderContract(5, "cf-f1-909", 0.7, None)
    (action,) = run({"sdxl": pool(0, 2)}, [], contracts=[orphan], adopt=True)
    assert isinstance(action, DestroyOrphan) and action.reason == "orphan"


def test_a_requested_row_whose_label_shows_up_is_adopted_not_destroyed() -> None:
    requested = row(11, "requested", state_since=NOW - 20)
    contract = ProviderContract(42, make_label(FLEET, 11), 0.5, "sdxl", "loading")
    actions = run({"sdxl": pool(1, 1)}, [requested], contracts=[contract])
    assert actions == [Adopt(11, 42, "sdxl", 0, 0.5, new=False)]


def test_a_second_contract_for_the_same_row_is_destroyed() -> None:
    requested = row(11, "requested", state_since=NOW - 20)
    twins = [ProviderContract(c, make_label(FLEET, 11), 0.5) for c in (43, 42)]
    actions = run({"sdxl": pool(1, 1)}, [requested], contracts=twins)
    assert kinds(actions) == ["DestroyOrphan", "Adopt"]
    assert isinstance(actions[0], DestroyOrphan)
    assert (actions[0].contract_id, actions[0].reason) == (43, "duplicate_contract")
    assert isinstance(actions[1], Adopt) and actions[1].contract_id == 42

    known = row(1)
    duplicate = ProviderContract(7, make_label(FLEET, 1))
    actions = run({"sdxl": pool(1, 1)}, [known], contracts=[listed(known), duplicate])
    assert [(a.contract_id, a.reason) for a in actions if isinstance(a, DestroyOrphan)] == [
        (7, "duplicate_contract")
    ]


@pytest.mark.parametrize(("waited", "abandoned"), [(299, False), (301, True)])
def test_a_requested_row_whose_contract_never_appears_is_abandoned_and_its_slot_rented(
    waited: float, abandoned: bool
) -> None:
    requested = row(11, "requested", state_since=NOW - waited)
    actions = run({"sdxl": pool(1, 1)}, [requested])
    if abandoned:
        assert kinds(actions) == ["Abandon", "Rent"]
        assert actions[1] == Rent("sdxl", 0)
    else:
        assert actions == []


def test_a_contract_listed_after_its_row_was_destroyed_is_destroyed_again() -> None:
    gone = row(1, "destroyed")
    (action,) = run({"sdxl": pool(0, 1)}, [gone], contracts=[listed(gone)])
    assert isinstance(action, DestroyOrphan) and action.reason == "listed_after_destroy"


@pytest.mark.parametrize(("waited", "alerts"), [(100, 0), (601, 1)])
def test_an_orphan_destroy_in_flight_is_not_repeated_but_alerts_after_ten_minutes(
    waited: float, alerts: int
) -> None:
    orphan = ProviderContract(5, "cf-f1-909")
    actions = run({}, [], contracts=[orphan], orphan_destroys={5: NOW - waited})
    assert kinds(actions) == ["Alert"] * alerts


# ---------------------------------------------------------------- brakes


def test_brakes_stop_renting_and_say_why_but_failed_instances_are_still_destroyed() -> None:
    rows = [row(1, verdict=LOAD_FAILED)]
    actions = run({"sdxl": pool(2, 4)}, rows, brakes=STOP)
    assert kinds(actions) == ["Replace", "Alert"]
    alert = actions[1]
    assert isinstance(alert, Alert) and alert.key == "renting_stopped:credit_low"
    assert "$0.10" in alert.message


def test_brakes_raise_no_alert_when_nothing_needed_renting() -> None:
    assert run({"sdxl": pool(1, 1)}, [row(1)], brakes=STOP) == []


def test_a_mass_heartbeat_loss_holds_heartbeat_failures_but_not_others() -> None:
    mass_loss = Brakes((Brake("heartbeat_mass_loss", "3 of 4 ..."),), hold_heartbeat_failures=True)
    rows = [row(1, slot=0, verdict=SILENT), row(2, slot=1, verdict=LOAD_FAILED)]
    actions = run({"sdxl": pool(2, 2)}, rows, brakes=mass_loss)
    assert [(type(a).__name__, getattr(a, "instance_id", None)) for a in actions] == [
        ("Replace", 2),
        ("Alert", None),
    ]
    without = run({"sdxl": pool(2, 2)}, rows)
    assert kinds(without) == ["Replace", "Replace"]


# ---------------------------------------------------------------- labels


def test_labels_name_the_fleet_and_the_instance() -> None:
    assert make_label("prod", 42) == "cf-prod-42"
    assert parse_label("cf-prod-42", "prod") == 42
    assert parse_label("cf-prod-eu-42", "prod") is None
    assert parse_label("cf-prod-eu-42", "prod-eu") == 42
    assert parse_label("cf-prod-web", "prod") is None
    assert parse_label("cf-prod-", "prod") is None
    assert parse_label(None, "prod") is None
    with pytest.raises(ValueError):
        make_label("prod", -1)
    with pytest.raises(ValueError):
        make_label("", 1)


def test_actions_other_than_alerts_change_the_world() -> None:
    assert changes_state(Rent("sdxl", 0))
    assert not changes_state(Alert("k", "m"))


# ---------------------------------------------------------------- properties


@dataclasses.dataclass(frozen=True)
class World:
    desired: dict[str, PoolPolicy]
    rows: tuple[ObservedInstance, ...]
    contracts: tuple[ProviderContract, ...]
    rental_dph: dict[str, float]
    adopt: bool
    brakes: Brakes | None
    orphan_destroys: dict[int, float]
    queued: dict[str, int] = dataclasses.field(default_factory=dict)

    def plan(self) -> list[Action]:
        return plan(
            self.desired,
            self.rows,
            NOW,
            fleet_id=FLEET,
            contracts=self.contracts,
            rental_dph=self.rental_dph,
            brakes=self.brakes,
            adopt=self.adopt,
            orphan_destroys=self.orphan_destroys,
            queued=self.queued,
        )


PRE_READY_OR_READY = frozenset(STATES[: STATES.index("ready") + 1])
TERMINAL = frozenset({"destroyed", "failed"})
LIVE_STATES = [s for s in STATES if s not in TERMINAL]
PRICES = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75])
POLICIES = st.builds(
    # min_ready close to max_instances: pools that want to rent are the interesting ones.
    lambda most, gap, cap, ttl: pool(
        max(0, most - gap), most, max_hourly_spend=cap, idle_ttl_seconds=ttl
    ),
    st.integers(0, 6),
    st.integers(0, 3),
    st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]),
    st.sampled_from([0.0, 300.0, 900.0]),
)
# An OnStart row's job state (None: a pool row), the pool rows far more often.
ONSTART = st.sampled_from([None] * 8 + ["queued", "running", "succeeded", "failed"])
# One row: state, age, $/h, verdict, idle for, running jobs, listed, a duplicate contract.
ROWS = st.tuples(
    # Every live state, the common ones more often.
    st.sampled_from([*LIVE_STATES, "ready", "ready", "destroying"]),
    st.sampled_from([0, 100, 400, 700, 2000]),
    PRICES,
    st.sampled_from([OK, OK, OK, OK, LOAD_FAILED, SILENT]),
    st.sampled_from([0, 400, 1000]),
    st.integers(0, 1),
    st.booleans(),
    st.integers(0, 9).map(lambda n: n == 0),
)
BRAKES = st.sampled_from(
    [None, None, STOP, Brakes((Brake("heartbeat_mass_loss", "m"),), hold_heartbeat_failures=True)]
)


@st.composite
def worlds(draw: st.DrawFn, with_brakes: bool = True) -> World:
    ids = itertools.count(1)
    contract_ids = itertools.count(100)
    names = ["a", "b", "c"][: draw(st.integers(1, 3))]
    desired = {name: draw(POLICIES) for name in names}
    rows: list[ObservedInstance] = []
    contracts: list[ProviderContract] = []
    for name in [*names, "retired"]:
        for slot in sorted(draw(st.sets(st.integers(0, 5), max_size=4))):
            state, age, dph, verdict, idle, jobs, is_listed, duplicate = draw(ROWS)
            job_state = draw(ONSTART)
            instance_id = next(ids)
            r = ObservedInstance(
                id=instance_id,
                profile=name,
                # An OnStart instance holds no slot.
                slot=slot if job_state is None else None,
                state=state,
                state_since=NOW - age,
                dph_total=dph,
                contract_id=None if state == "requested" else next(contract_ids),
                verdict=OK if state == "requested" else verdict,
                idle_since=NOW - idle,
                running_jobs=1 if state == "busy" else jobs if state == "draining" else 0,
                onstart_job=None if job_state is None else f"job-{instance_id}",
                onstart_job_state=job_state,
            )
            rows.append(r)
            label = make_label(FLEET, r.id)
            if is_listed:
                contract_id = next(contract_ids) if r.contract_id is None else r.contract_id
                contracts.append(ProviderContract(contract_id, label, dph, name))
            if duplicate:
                contracts.append(ProviderContract(next(contract_ids), label, dph, name))
        # Terminal rows, whose slots may have been rented again; some still listed.
        ends = st.tuples(st.integers(0, 6), st.sampled_from(sorted(TERMINAL)), st.booleans())
        for slot, state, still_listed in draw(st.lists(ends, max_size=2)):
            gone = ObservedInstance(next(ids), name, slot, state, NOW, 1.0, next(contract_ids))
            rows.append(gone)
            if still_listed and draw(st.integers(0, 3)) == 0:
                contracts.append(
                    ProviderContract(gone.contract_id or 0, make_label(FLEET, gone.id))
                )
    orphan_destroys: dict[int, float] = {}
    orphans = st.tuples(st.sampled_from([*names, "retired", None]), PRICES, st.booleans())
    for profile, dph, being_destroyed in draw(st.lists(orphans, max_size=3)):
        orphan = ProviderContract(next(contract_ids), make_label(FLEET, next(ids)), dph, profile)
        contracts.append(orphan)
        if being_destroyed:
            orphan_destroys[orphan.id] = NOW - 30
    for _ in range(draw(st.integers(0, 2))):
        contracts.append(ProviderContract(next(contract_ids), f"cf-other-{next(ids)}", 1.0, "a"))
    rental_dph = {n: draw(PRICES) for n in names if draw(st.booleans())}
    brakes = draw(BRAKES) if with_brakes else None
    queued = {n: draw(st.sampled_from([0, 0, 1, 3, 9])) for n in [*names, "retired"]}
    return World(
        desired,
        tuple(rows),
        tuple(contracts),
        rental_dph,
        draw(st.booleans()),
        brakes,
        orphan_destroys,
        queued,
    )


def take(world: World, actions: Sequence[Action]) -> World:
    """What the reconcile loop leaves in the store after taking ``actions``, the provider
    not having confirmed any destroy yet, each rental at the worst price it allows."""
    rows = {r.id: r for r in world.rows}
    orphan_destroys = dict(world.orphan_destroys)
    new_ids = itertools.count(1_000_000)
    for action in actions:
        if isinstance(action, Rent):
            price = action.max_dph
            if price is None:
                price = world.rental_dph.get(action.profile, 0.0)
            r = ObservedInstance(
                next(new_ids), action.profile, action.slot, "requested", NOW, price
            )
            rows[r.id] = r
        elif isinstance(action, Adopt) and action.new:
            rows[action.instance_id] = ObservedInstance(
                action.instance_id,
                action.profile,
                action.slot,
                "creating",
                NOW,
                action.dph_total,
                action.contract_id,
            )
        elif isinstance(action, Adopt):
            old = rows[action.instance_id]
            state = "creating" if old.state == "requested" else old.state
            rows[old.id] = dataclasses.replace(old, state=state, contract_id=action.contract_id)
        elif isinstance(action, Replace | ScaleDown | Destroy):
            old = rows[action.instance_id]
            rows[old.id] = dataclasses.replace(
                old,
                state="destroying",
                state_since=NOW,
                verdict=OK,
                contract_id=action.contract_id,
            )
        elif isinstance(action, Drain):
            old = rows[action.instance_id]
            rows[old.id] = dataclasses.replace(
                old, state="draining", state_since=NOW, running_jobs=max(1, old.running_jobs)
            )
        elif isinstance(action, Abandon):
            rows[action.instance_id] = dataclasses.replace(
                rows[action.instance_id], state="destroyed"
            )
        elif isinstance(action, DestroyOrphan):
            orphan_destroys[action.contract_id] = NOW
    return dataclasses.replace(world, rows=tuple(rows.values()), orphan_destroys=orphan_destroys)


def totals(world: World, profile: str) -> tuple[int, float]:
    """What the caps count: every row not terminal, at its $/h."""
    live = [r for r in world.rows if r.profile == profile and r.state not in TERMINAL]
    return len(live), sum(r.dph_total for r in live)


def toward_ready(world: World, profile: str) -> int:
    return sum(
        1
        for r in world.rows
        if r.profile == profile
        and r.onstart_job is None
        and r.state in PRE_READY_OR_READY
        and (r.state == "requested" or r.verdict.ok)
    )


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(worlds())
def test_property_a_plan_never_takes_a_pool_over_its_caps(world: World) -> None:
    actions = world.plan()
    after = take(world, actions)
    for name, policy in world.desired.items():
        count_before, spend_before = totals(world, name)
        count, spend = totals(after, name)
        assert count <= max(policy.max_instances, count_before)
        cap = policy.max_hourly_spend
        if cap is not None:
            assert spend <= max(cap, spend_before) + 1e-6
        grew = any(
            isinstance(a, Rent | Adopt) and a.profile == name and (isinstance(a, Rent) or a.new)
            for a in actions
        )
        if grew:
            assert count <= policy.max_instances
            assert cap is None or spend <= cap + 1e-6
        estimate = world.rental_dph.get(name)
        for rent in (a for a in actions if isinstance(a, Rent) and a.profile == name):
            # A rental is planned only where an offer at the expected price fits.
            if cap is None:
                assert rent.max_dph is None
            else:
                assert rent.max_dph is not None and rent.max_dph > -1e-9
                assert estimate is None or rent.max_dph >= estimate - 1e-9


@PROPERTY
@given(worlds())
def test_property_never_two_live_instances_in_one_slot(world: World) -> None:
    after = take(world, world.plan())
    held = [
        (r.profile, r.slot) for r in after.rows if r.state not in TERMINAL and r.slot is not None
    ]
    assert len(held) == len(set(held))


@PROPERTY
@given(worlds())
def test_property_planning_again_after_the_actions_finds_nothing_new_to_do(world: World) -> None:
    first = world.plan()
    second = take(world, first).plan()
    assert [a for a in second if changes_state(a)] == []
    # Alerts are level-triggered: the second pass raises no alert the first did not.
    assert {a.key for a in second if isinstance(a, Alert)} <= {
        a.key for a in first if isinstance(a, Alert)
    }


@PROPERTY
@given(worlds(with_brakes=False))
def test_property_min_ready_and_the_queue_are_served_whenever_the_caps_allow(
    world: World,
) -> None:
    after = take(world, world.plan())
    for name, policy in world.desired.items():
        # Busy instances run one job each here: every waiting job wants an instance.
        if toward_ready(after, name) >= max(policy.min_ready, world.queued.get(name, 0)):
            continue
        count, spend = totals(after, name)
        cap = policy.max_hourly_spend
        estimate = world.rental_dph.get(name)
        room_for_one = count + 1 <= policy.max_instances and (
            cap is None
            or (spend + estimate <= cap + 1e-9 if estimate is not None else spend < cap - 1e-9)
        )
        assert not room_for_one, f"{name}: short of min_ready with room for another"


@PROPERTY
@given(worlds())
def test_property_only_failed_instances_and_this_fleets_contracts_are_touched(
    world: World,
) -> None:
    rows = {r.id: r for r in world.rows}
    ours = {c.id for c in world.contracts if parse_label(c.label, FLEET) is not None}
    actions = world.plan()
    # One action per instance and per contract in a pass: never "adopt" and "destroy" both.
    instances = [a.instance_id for a in actions if changes_state(a) and hasattr(a, "instance_id")]
    assert len(instances) == len(set(instances))
    contracts = [a.contract_id for a in actions if changes_state(a) and hasattr(a, "contract_id")]
    contracts = [c for c in contracts if c is not None]
    assert len(contracts) == len(set(contracts))
    for action in actions:
        if isinstance(action, Replace):
            r = rows[action.instance_id]
            assert r.verdict.failed and r.state not in TERMINAL
        if isinstance(action, ScaleDown | Destroy) and action.instance_id in rows:
            r = rows[action.instance_id]
            if r.onstart_job is not None:
                # Only its job's end (or its agent's silence about it) ends an OnStart one.
                assert isinstance(action, Destroy) and action.reason.startswith("onstart_")
            else:
                # Nothing destroyed holds a job: busy ones are drained first.
                assert r.state != "busy" and not (r.state == "draining" and r.running_jobs)
        if isinstance(action, ScaleDown):
            assert world.queued.get(action.profile, 0) == 0
        if isinstance(action, DestroyOrphan | Adopt):
            assert action.contract_id in ours
        if isinstance(action, Rent):
            assert world.brakes is None or not world.brakes.stop_renting
