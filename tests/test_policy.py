"""The failure policy and the fleet brakes, rule by rule, with plain data and no server."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from comfyfleet.pool.policy import (
    AGENT_FAILED,
    AGENT_NEVER_REGISTERED,
    COMFY_CRASH_LOOP,
    DEFAULT_STAGE_DEADLINES,
    DOWNLOAD_STALLED,
    HEARTBEAT_LOST,
    LOAD_FAILED,
    NO_SPACE,
    OK,
    PORTS_UNMAPPED,
    WARMUP_FAILED,
    InstanceFacts,
    PolicySettings,
    RentalRecord,
    Verdict,
    assess,
    fleet_brakes,
    ports_mapped,
)

NOW = 1_700_000_000.0
LONG_AGO = NOW - 7 * 86400  # the control plane has been up for a week
SEED_002_NO_SPACE = (
    "failed to extract layer (application/vnd.oci.image.layer.v1.tar+gzip sha256:4f1e) to "
    'overlayfs as "extract-123": write /var/lib/containerd/io.containerd.snapshotter.v1.'
    "overlayfs/snapshots/42/fs/usr/bin/caddy: no space left on device"
)


def facts(**changes: Any) -> InstanceFacts:
    """A healthy instance that has just entered ``booting``, the provider saying running."""
    base = InstanceFacts(
        state="booting",
        state_since=NOW,
        control_plane_started_at=LONG_AGO,
        actual_status="running",
        actual_status_since=NOW,
        running_since=NOW,
    )
    return dataclasses.replace(base, **changes)


def registered(**changes: Any) -> InstanceFacts:
    """A ready instance whose agent registered an hour ago and sends heartbeats."""
    base = facts(
        state="ready",
        state_since=NOW - 600,
        running_since=NOW - 3600,
        registered_at=NOW - 3500,
        last_heartbeat=NOW,
        direct_port_start=40000,
    )
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- healthy


def test_a_healthy_booting_instance_is_ok() -> None:
    assert assess(facts(), NOW) == OK
    assert assess(facts(), NOW).ok


def test_a_healthy_ready_instance_is_ok_for_ever() -> None:
    assert assess(registered(state_since=NOW - 30 * 86400), NOW) == OK


@pytest.mark.parametrize("state", ["destroying", "destroyed", "failed"])
def test_an_instance_already_on_its_way_out_is_not_judged_again(state: str) -> None:
    gone = facts(state=state, status_msg=SEED_002_NO_SPACE, warmup_ok=False)
    assert assess(gone, NOW) == OK


# ---------------------------------------------------------------- provider status


def test_no_space_left_on_device_fails_at_once_and_quotes_the_provider() -> None:
    verdict = assess(facts(state="creating", status_msg=SEED_002_NO_SPACE), NOW)
    assert verdict.failed
    assert verdict.reason == NO_SPACE
    assert "caddy: no space left on device" in verdict.message
    assert "disk_gb" in verdict.message


def test_no_space_is_matched_whatever_the_case() -> None:
    verdict = assess(facts(status_msg="Write failed: No Space Left On Device"), NOW)
    assert verdict.reason == NO_SPACE


def test_a_long_status_message_is_quoted_by_its_end_where_the_cause_is() -> None:
    message = "x" * 5000 + " no space left on device"
    verdict = assess(facts(status_msg=message), NOW)
    assert verdict.message.count("x") < 300
    assert "no space left on device" in verdict.message


@pytest.mark.parametrize(("held", "failed"), [(119, False), (120, False), (121, True)])
def test_load_failed_fails_after_more_than_120_seconds(held: float, failed: bool) -> None:
    observed = facts(
        actual_status="load_failed",
        actual_status_since=NOW - held,
        status_msg="Error response from daemon: pull access denied",
    )
    verdict = assess(observed, NOW)
    assert verdict.failed is failed
    if failed:
        assert verdict.reason == LOAD_FAILED
        assert "pull access denied" in verdict.message
        assert "121 s" in verdict.message


@pytest.mark.parametrize("status", ["exited", "offline", "unknown"])
def test_exited_offline_and_unknown_fail_like_load_failed(status: str) -> None:
    held = facts(actual_status=status, actual_status_since=NOW - 121)
    assert assess(held, NOW).reason == f"provider_{status}"
    brief = facts(actual_status=status, actual_status_since=NOW - 119)
    assert assess(brief, NOW) == OK


@pytest.mark.parametrize("status", ["running", "loading", "created", None])
def test_other_provider_statuses_are_not_failures_however_long(status: str | None) -> None:
    observed = facts(state="creating", actual_status=status, actual_status_since=NOW - 1000)
    assert assess(observed, NOW) == OK


def test_a_bad_status_seen_before_a_restart_is_timed_from_the_restart() -> None:
    observed = facts(
        actual_status="load_failed",
        actual_status_since=NOW - 3600,
        control_plane_started_at=NOW - 60,
    )
    assert assess(observed, NOW) == OK
    assert assess(observed, NOW - 60 + 121).reason == LOAD_FAILED


def test_the_bad_status_limit_and_list_are_settings() -> None:
    settings = PolicySettings(bad_status_seconds=30, bad_statuses=frozenset({"stopped"}))
    stopped = facts(actual_status="stopped", actual_status_since=NOW - 31)
    assert assess(stopped, NOW, settings).reason == "provider_stopped"
    failed = facts(actual_status="load_failed", actual_status_since=NOW - 3000)
    assert assess(failed, NOW, settings) == OK


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize(("since_running", "failed"), [(599, False), (600, False), (601, True)])
def test_the_agent_must_register_within_600_seconds_of_running(
    since_running: float, failed: bool
) -> None:
    observed = facts(running_since=NOW - since_running, state_since=NOW - since_running)
    verdict = assess(observed, NOW)
    assert verdict.failed is failed
    if failed:
        assert verdict.reason == AGENT_NEVER_REGISTERED


def test_a_registered_agent_is_not_late() -> None:
    observed = facts(running_since=NOW - 5000, registered_at=NOW - 4900, last_heartbeat=NOW)
    assert assess(observed, NOW) == OK


def test_the_registration_clock_waits_for_the_provider_to_say_running() -> None:
    observed = facts(state="creating", state_since=NOW - 900, running_since=None)
    assert assess(observed, NOW) == OK


def test_the_registration_clock_starts_again_when_the_control_plane_restarts() -> None:
    # The agent could not register while the control plane was down.
    observed = facts(running_since=NOW - 5000, control_plane_started_at=NOW - 100)
    assert assess(observed, NOW) == OK
    assert assess(observed, NOW - 100 + 601).reason == AGENT_NEVER_REGISTERED


def test_a_late_registration_quotes_the_provider_status_message() -> None:
    observed = facts(running_since=NOW - 700, status_msg="Container exited with code 1")
    verdict = assess(observed, NOW)
    assert verdict.reason == AGENT_NEVER_REGISTERED
    assert "Container exited with code 1" in verdict.message


# ---------------------------------------------------------------- direct ports


def test_unmapped_ports_are_not_a_failure_when_the_agent_dials_home() -> None:
    observed = registered(direct_port_start=-1, require_direct_ports=False)
    assert assess(observed, NOW) == OK


@pytest.mark.parametrize(("since_running", "failed"), [(599, False), (601, True)])
def test_unmapped_ports_fail_at_the_boot_deadline_when_the_profile_requires_them(
    since_running: float, failed: bool
) -> None:
    observed = facts(
        state="provisioning",
        running_since=NOW - since_running,
        registered_at=NOW - 60,
        last_heartbeat=NOW,
        direct_port_start=-1,
        require_direct_ports=True,
    )
    verdict = assess(observed, NOW)
    assert verdict.failed is failed
    if failed:
        assert verdict.reason == PORTS_UNMAPPED
        assert "require_direct_ports" in verdict.message


def test_mapped_ports_satisfy_a_profile_that_requires_them() -> None:
    observed = registered(direct_port_start=40000, require_direct_ports=True)
    assert assess(observed, NOW) == OK


def test_ports_are_mapped_only_with_a_positive_start() -> None:
    assert ports_mapped(40000)
    assert not ports_mapped(-1)
    assert not ports_mapped(None)
    assert not ports_mapped(0)


# ---------------------------------------------------------------- heartbeats


@pytest.mark.parametrize(("silence", "failed"), [(89, False), (90, False), (91, True)])
def test_three_missed_heartbeats_of_30_seconds_lose_the_agent(silence: float, failed: bool) -> None:
    verdict = assess(registered(last_heartbeat=NOW - silence), NOW)
    assert verdict.failed is failed
    if failed:
        assert verdict.reason == HEARTBEAT_LOST
        assert "91 s" in verdict.message


def test_the_registration_counts_as_the_first_heartbeat() -> None:
    observed = registered(registered_at=NOW - 80, last_heartbeat=None)
    assert assess(observed, NOW) == OK
    assert assess(observed, NOW + 11).reason == HEARTBEAT_LOST


def test_no_heartbeat_is_expected_before_the_agent_registers() -> None:
    observed = facts(state="booting", running_since=NOW - 300, last_heartbeat=None)
    assert assess(observed, NOW) == OK


def test_no_death_spiral_heartbeat_clocks_start_when_the_control_plane_starts() -> None:
    # The control plane was down for an hour: every agent looks silent for an hour.
    restarted = NOW - 10
    observed = registered(last_heartbeat=NOW - 3600, control_plane_started_at=restarted)
    assert assess(observed, NOW) == OK
    assert assess(observed, restarted + 90) == OK
    assert assess(observed, restarted + 91).reason == HEARTBEAT_LOST


def test_the_heartbeat_interval_and_misses_are_settings() -> None:
    settings = PolicySettings(heartbeat_interval_seconds=10, missed_heartbeats=2)
    assert settings.heartbeat_timeout_seconds == 20
    assert assess(registered(last_heartbeat=NOW - 21), NOW, settings).reason == HEARTBEAT_LOST
    assert assess(registered(last_heartbeat=NOW - 19), NOW, settings) == OK


# ---------------------------------------------------------------- downloads


def downloading(**changes: Any) -> InstanceFacts:
    return registered(**{"state": "downloading", "state_since": NOW - 1000, **changes})


@pytest.mark.parametrize(("quiet", "failed"), [(299, False), (300, False), (301, True)])
def test_downloads_that_make_no_progress_for_300_seconds_have_stalled(
    quiet: float, failed: bool
) -> None:
    observed = downloading(download_bytes=12_500_000_000, download_progress_at=NOW - quiet)
    verdict = assess(observed, NOW)
    assert verdict.failed is failed
    if failed:
        assert verdict.reason == DOWNLOAD_STALLED
        assert "12.50 GB" in verdict.message


def test_a_download_that_never_started_is_stalled_from_the_start_of_the_stage() -> None:
    assert assess(downloading(download_progress_at=None), NOW).reason == DOWNLOAD_STALLED
    fresh = downloading(state_since=NOW - 200, download_progress_at=None)
    assert assess(fresh, NOW) == OK


def test_progress_from_an_earlier_stage_does_not_count_against_the_download() -> None:
    observed = downloading(state_since=NOW - 10, download_progress_at=NOW - 5000)
    assert assess(observed, NOW) == OK


def test_stall_is_judged_only_while_downloading() -> None:
    observed = registered(state="starting_app", download_progress_at=NOW - 5000)
    assert assess(observed, NOW) == OK


def test_the_stall_clock_starts_again_when_the_control_plane_restarts() -> None:
    observed = downloading(download_progress_at=NOW - 5000, control_plane_started_at=NOW - 30)
    assert assess(observed, NOW) == OK


# ---------------------------------------------------------------- ComfyUI and warm-up


def test_three_comfy_crashes_within_ten_minutes_are_a_crash_loop() -> None:
    crashes = (NOW - 500, NOW - 200, NOW - 1)
    verdict = assess(registered(state="starting_app", comfy_crashes=crashes), NOW)
    assert verdict.reason == COMFY_CRASH_LOOP
    assert "3 times" in verdict.message


def test_crashes_spread_wider_than_the_window_are_not_a_loop() -> None:
    crashes = (NOW - 601, NOW - 200, NOW - 1)
    assert assess(registered(comfy_crashes=crashes), NOW) == OK
    assert assess(registered(comfy_crashes=crashes[1:]), NOW) == OK


def test_a_failed_warm_up_is_a_failure() -> None:
    observed = registered(state="warming", warmup_ok=False, warmup_error="CUDA out of memory")
    verdict = assess(observed, NOW)
    assert verdict.reason == WARMUP_FAILED
    assert "CUDA out of memory" in verdict.message


@pytest.mark.parametrize("result", [None, True])
def test_a_warm_up_not_run_yet_or_passed_is_fine(result: bool | None) -> None:
    assert assess(registered(state="warming", warmup_ok=result), NOW) == OK


def test_a_failure_the_agent_reports_is_a_failure() -> None:
    observed = registered(state="downloading", agent_failure="sha256 mismatch for sdxl.safetensors")
    verdict = assess(observed, NOW)
    assert verdict.reason == AGENT_FAILED
    assert "sha256 mismatch" in verdict.message


# ---------------------------------------------------------------- stage deadlines


@pytest.mark.parametrize("stage", sorted(DEFAULT_STAGE_DEADLINES))
def test_each_stage_fails_when_it_overruns_its_default_deadline(stage: str) -> None:
    deadline = DEFAULT_STAGE_DEADLINES[stage]
    # Progress and heartbeats are fresh: only the deadline can fire.
    base = registered(state=stage, download_progress_at=NOW, running_since=None)
    assert assess(dataclasses.replace(base, state_since=NOW - deadline + 1), NOW) == OK
    verdict = assess(dataclasses.replace(base, state_since=NOW - deadline - 1), NOW)
    assert verdict.reason == f"stage_deadline:{stage}"
    assert stage in verdict.message


@pytest.mark.parametrize("stage", ["ready", "busy"])
def test_ready_and_busy_have_no_deadline(stage: str) -> None:
    assert assess(registered(state=stage, state_since=NOW - 90 * 86400), NOW) == OK


def test_stage_deadlines_are_configurable() -> None:
    settings = PolicySettings(stage_deadlines={**DEFAULT_STAGE_DEADLINES, "starting_app": 60})
    observed = registered(state="starting_app", state_since=NOW - 61)
    assert assess(observed, NOW, settings).reason == "stage_deadline:starting_app"
    assert assess(observed, NOW) == OK


def test_a_stage_without_a_configured_deadline_has_none() -> None:
    settings = PolicySettings(stage_deadlines={})
    observed = registered(state="provisioning", state_since=NOW - 86400)
    assert assess(observed, NOW, settings) == OK


def test_the_settings_keep_their_own_copy_of_the_deadlines() -> None:
    deadlines = {"warming": 10.0}
    settings = PolicySettings(stage_deadlines=deadlines)
    deadlines["warming"] = 1e9
    assert settings.stage_deadlines["warming"] == 10.0


def test_a_stage_deadline_is_timed_from_the_restart_after_an_outage() -> None:
    observed = registered(
        state="provisioning", state_since=NOW - 7200, control_plane_started_at=NOW - 60
    )
    assert assess(observed, NOW) == OK


@pytest.mark.parametrize(
    "changes",
    [
        {"stage_deadlines": {"booting_up": 10}},
        {"stage_deadlines": {"booting": 0}},
        {"register_seconds": 0},
        {"missed_heartbeats": 0},
    ],
)
def test_nonsensical_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PolicySettings(**changes)


# ---------------------------------------------------------------- precedence


def test_the_most_specific_cause_is_reported_when_several_rules_fire() -> None:
    # A full disk also keeps the agent from registering: the disk is the cause.
    observed = facts(
        running_since=NOW - 3000,
        state_since=NOW - 3000,
        actual_status="load_failed",
        actual_status_since=NOW - 3000,
        status_msg=SEED_002_NO_SPACE,
    )
    assert assess(observed, NOW).reason == NO_SPACE
    without_disk_message = dataclasses.replace(observed, status_msg="pull failed")
    assert assess(without_disk_message, NOW).reason == LOAD_FAILED


def test_a_verdict_says_whether_it_failed() -> None:
    verdict = Verdict.fail("no_space", "disk full")
    assert verdict.failed and not verdict.ok
    assert (verdict.reason, verdict.message) == ("no_space", "disk full")
    assert OK.ok and OK.reason is None


# ---------------------------------------------------------------- fleet brakes


def fleet(silent: int, talking: int, **changes: Any) -> list[InstanceFacts]:
    return [registered(last_heartbeat=NOW - 200, **changes) for _ in range(silent)] + [
        registered(last_heartbeat=NOW - 5, **changes) for _ in range(talking)
    ]


def test_a_healthy_fleet_keeps_renting() -> None:
    brakes = fleet_brakes(fleet(0, 5), NOW, credit=100.0, next_rental_cost=2.0)
    assert not brakes.stop_renting
    assert not brakes.hold_heartbeat_failures
    assert brakes.brakes == ()


def test_renting_stops_when_more_than_half_the_instances_miss_heartbeats_at_once() -> None:
    brakes = fleet_brakes(fleet(3, 2), NOW)
    assert brakes.stop_renting
    assert brakes.hold_heartbeat_failures
    (brake,) = brakes.brakes
    assert brake.code == "heartbeat_mass_loss"
    assert "3 of 5" in brake.message


def test_exactly_half_the_instances_silent_is_not_a_mass_loss() -> None:
    assert not fleet_brakes(fleet(2, 2), NOW).stop_renting


def test_one_silent_instance_alone_is_replaced_not_a_mass_loss() -> None:
    assert not fleet_brakes(fleet(1, 0), NOW).stop_renting
    assert fleet_brakes(fleet(2, 0), NOW).stop_renting


def test_instances_that_do_not_heartbeat_yet_do_not_dilute_the_mass_loss() -> None:
    booting = [facts() for _ in range(10)]
    assert fleet_brakes([*fleet(2, 1), *booting], NOW).stop_renting


def test_no_mass_loss_right_after_a_control_plane_restart() -> None:
    everyone_silent = fleet(5, 0, control_plane_started_at=NOW - 20)
    assert not fleet_brakes(everyone_silent, NOW).stop_renting


def never(at: float) -> RentalRecord:
    return RentalRecord(rented_at=at, registered=False, ended=True)


def test_renting_stops_after_three_rentals_in_a_row_never_registered() -> None:
    rentals = [RentalRecord(NOW - 9000, True, True), never(NOW - 3000), never(NOW - 2000)]
    assert not fleet_brakes([], NOW, rentals=rentals).stop_renting
    brakes = fleet_brakes([], NOW, rentals=[*rentals, never(NOW - 1000)])
    assert brakes.stop_renting
    assert not brakes.hold_heartbeat_failures
    assert [b.code for b in brakes.brakes] == ["never_registered"]
    assert "COMFYFLEET_URL" in brakes.brakes[0].message


def test_a_registered_rental_breaks_the_streak_whatever_the_list_order() -> None:
    rentals = [never(NOW - 3000), RentalRecord(NOW - 100, True, False), never(NOW - 2000)]
    assert not fleet_brakes([], NOW, rentals=[*rentals, never(NOW - 4000)]).stop_renting


def test_a_rental_still_booting_neither_counts_nor_breaks_the_streak() -> None:
    pending = RentalRecord(NOW - 10, registered=False, ended=False)
    rentals = [never(NOW - 3000), never(NOW - 2000), pending]
    assert not fleet_brakes([], NOW, rentals=rentals).stop_renting
    assert fleet_brakes([], NOW, rentals=[*rentals, never(NOW - 1000)]).stop_renting


@pytest.mark.parametrize(
    ("credit", "cost", "stops"),
    [(1.99, 2.0, True), (2.0, 2.0, False), (0.0, 0.0, True), (-3.0, 0.0, True), (None, 9.0, False)],
)
def test_renting_stops_when_credit_is_below_what_the_next_rental_needs(
    credit: float | None, cost: float, stops: bool
) -> None:
    brakes = fleet_brakes([], NOW, credit=credit, next_rental_cost=cost)
    assert brakes.stop_renting is stops
    if stops:
        assert brakes.brakes[0].code == "credit_low"
        assert "add credit" in brakes.brakes[0].message


def test_every_brake_that_holds_is_reported() -> None:
    rentals = [never(NOW - 3), never(NOW - 2), never(NOW - 1)]
    brakes = fleet_brakes(fleet(3, 0), NOW, rentals=rentals, credit=0.5, next_rental_cost=1.0)
    assert [b.code for b in brakes.brakes] == [
        "heartbeat_mass_loss",
        "never_registered",
        "credit_low",
    ]
