"""Cache-aware placement (scheduler/placement.py), with plain data: where a job that
needs dependencies is reserved, and what must be downloaded there first."""

from __future__ import annotations

import pytest

from comfyfleet.scheduler.placement import InstanceCache, PlacementChoice, choose_instance
from comfyfleet.sizes import GB

SIZES = {"sdxl": 7 * GB, "flux": 24 * GB, "lora": GB // 4, "vae": GB // 3, "cn": 2 * GB}
RATE = 100e6  # bytes a second: 7 GB take 70 s
JOB_S = 20.0


def choose(needs: list[str], *instances: InstanceCache) -> PlacementChoice | None:
    return choose_instance(
        needs, SIZES, list(instances), bytes_per_second=RATE, seconds_per_job=JOB_S
    )


def inst(
    instance_id: int,
    *installed: str,
    idle: bool = True,
    incoming: tuple[str, ...] = (),
    waiting: int = 0,
) -> InstanceCache:
    return InstanceCache(
        instance_id, idle, frozenset(installed), frozenset(incoming), waiting_jobs=waiting
    )


def test_an_idle_instance_that_holds_everything_takes_the_job_with_nothing_to_download() -> None:
    choice = choose(
        ["sdxl", "lora"],
        inst(1, "sdxl"),
        inst(2, "sdxl", "lora", idle=False, waiting=1),
        inst(3, "sdxl", "lora", "vae"),
    )
    assert choice == PlacementChoice(3, (), 0, 0.0)
    assert choice.ready_now


def test_without_such_an_instance_the_one_missing_the_fewest_bytes_is_chosen() -> None:
    choice = choose(["sdxl", "lora", "cn"], inst(1, "lora"), inst(2, "sdxl"), inst(3))
    assert choice is not None
    assert (choice.instance_id, choice.missing) == (2, ("lora", "cn"))
    assert choice.download_bytes == SIZES["lora"] + SIZES["cn"]
    assert choice.estimated_start_s == pytest.approx(choice.download_bytes / RATE)


def test_a_busy_instance_holding_everything_beats_an_idle_one_that_would_download() -> None:
    # One job ahead (20 s) against 7 GB to download (70 s).
    choice = choose(["sdxl"], inst(1), inst(2, "sdxl", idle=False, waiting=1))
    assert choice is not None
    assert (choice.instance_id, choice.missing, choice.estimated_start_s) == (2, (), JOB_S)


def test_a_long_queue_on_the_holder_sends_the_job_where_it_downloads_sooner() -> None:
    # Five jobs ahead (100 s) against 7 GB to download (70 s).
    choice = choose(["sdxl"], inst(1), inst(2, "sdxl", idle=False, waiting=5))
    assert choice is not None
    assert (choice.instance_id, choice.missing) == (1, ("sdxl",))


def test_what_is_already_on_its_way_is_not_downloaded_twice_but_still_awaited() -> None:
    choice = choose(["flux", "vae"], inst(1, "vae"), inst(2, incoming=("flux",)))
    assert choice is not None
    # Instance 2 waits for flux (queued there for another job) and downloads only vae.
    assert (choice.instance_id, choice.missing, choice.download_bytes) == (
        2,
        ("flux", "vae"),
        SIZES["vae"],
    )
    assert not choice.ready_now


def test_ties_go_to_fewer_bytes_then_the_idle_instance_then_the_lowest_id() -> None:
    same = choose(["lora"], inst(7), inst(4), inst(5))
    assert same is not None and same.instance_id == 4
    # Equal estimated start (the busy one waits 20 s, the idle one downloads 20 s' worth):
    # the one with less to download wins.
    rate_s = SIZES["cn"] / RATE
    even = choose_instance(
        ["cn"],
        SIZES,
        [inst(1), inst(2, "cn", idle=False, waiting=1)],
        bytes_per_second=RATE,
        seconds_per_job=rate_s,
    )
    assert even is not None and even.instance_id == 2
    idle_first = choose(["cn"], inst(2, idle=False), inst(3))
    assert idle_first is not None and idle_first.instance_id == 3


def test_a_dependency_named_twice_counts_once_and_an_unknown_size_counts_nothing() -> None:
    choice = choose(["lora", "lora", "mystery"], inst(1))
    assert choice is not None
    assert (choice.missing, choice.download_bytes) == (("lora", "mystery"), SIZES["lora"])


def test_no_candidate_means_no_choice_and_bad_rates_are_refused() -> None:
    assert choose(["sdxl"]) is None
    with pytest.raises(ValueError, match="bytes_per_second"):
        choose_instance(["sdxl"], SIZES, [inst(1)], bytes_per_second=0)
