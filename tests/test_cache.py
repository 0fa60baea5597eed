"""The dependency cache's decisions, with plain data: what goes, what stays, and why not."""

from __future__ import annotations

import dataclasses
import random

import pytest

from comfyfleet.agent.cache import (
    CacheEntry,
    DependencyCache,
    DynamicPolicy,
    Pin,
    Reservation,
    SpacePlan,
    SpaceRefusal,
    plan_space,
    policy_from_env,
)
from comfyfleet.errors import ConfigError
from comfyfleet.sizes import GB

POLICY = DynamicPolicy(
    enabled=True, min_free_bytes=0, max_dynamic_bytes=10 * GB, eviction_batch_max=20
)
PLENTY = 1000 * GB


def dyn(dep_id: str, size: int, last_used: float, *pins: Pin) -> CacheEntry:
    return CacheEntry(dep_id, size, last_used, static=False, pins=pins)


def static(dep_id: str, size: int, last_used: float = 0.0) -> CacheEntry:
    return CacheEntry(dep_id, size, last_used, static=True)


def plan(decision: SpacePlan | SpaceRefusal) -> SpacePlan:
    assert isinstance(decision, SpacePlan), decision
    return decision


def refusal(decision: SpacePlan | SpaceRefusal) -> SpaceRefusal:
    assert isinstance(decision, SpaceRefusal), decision
    return decision


# -- plan_space -------------------------------------------------------------------


def test_an_item_that_fits_evicts_nothing() -> None:
    entries = [dyn("a", 3 * GB, 1), dyn("b", 3 * GB, 2)]
    decided = plan(plan_space(4 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=10))
    assert decided.batches == ()
    assert decided.freed_bytes == 0
    assert decided.dynamic_after == 10 * GB
    assert decided.cap_left == 0


def test_eviction_takes_the_least_recently_used_first() -> None:
    entries = [dyn("new", 3 * GB, 30), dyn("old", 3 * GB, 10), dyn("mid", 3 * GB, 20)]
    decided = plan(plan_space(4 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=40))
    assert decided.victim_ids == ["old"]
    decided = plan(plan_space(7 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=40))
    assert decided.victim_ids == ["old", "mid"]


def test_entries_used_at_the_same_time_go_in_id_order() -> None:
    entries = [dyn("b", 5 * GB, 1), dyn("a", 5 * GB, 1)]
    decided = plan(plan_space(1 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=2))
    assert decided.victim_ids == ["a"]


def test_eviction_stops_as_soon_as_the_item_fits_even_mid_batch() -> None:
    entries = [dyn(f"d{i}", 1 * GB, i) for i in range(10)]
    policy = dataclasses.replace(POLICY, eviction_batch_max=4)
    decided = plan(plan_space(3 * GB, entries, free_bytes=PLENTY, policy=policy, now=99))
    assert decided.victim_ids == ["d0", "d1", "d2"]
    assert decided.batches == (tuple(entries[:3]),)
    assert decided.cap_left == 0


def test_batches_respect_eviction_batch_max() -> None:
    entries = [dyn(f"d{i:02d}", 1 * GB, i) for i in range(10)]
    policy = dataclasses.replace(POLICY, eviction_batch_max=3)
    decided = plan(plan_space(10 * GB, entries, free_bytes=PLENTY, policy=policy, now=99))
    assert [len(batch) for batch in decided.batches] == [3, 3, 3, 1]
    assert decided.victim_ids == [f"d{i:02d}" for i in range(10)]


def test_statics_are_never_victims_nor_count_against_the_cap() -> None:
    entries = [static("core", 50 * GB), dyn("a", 5 * GB, 5), dyn("b", 5 * GB, 6)]
    decided = plan(plan_space(5 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=10))
    assert decided.victim_ids == ["a"]
    # Short of disk, still only dynamic entries go; the statics stay even if it fails.
    tight = dataclasses.replace(POLICY, min_free_bytes=60 * GB)
    refused = refusal(plan_space(5 * GB, entries, free_bytes=10 * GB, policy=tight, now=10))
    assert refused.freeable_bytes == 10 * GB
    assert "static dependencies and other files" in refused.reason


def test_pinned_entries_are_never_victims() -> None:
    entries = [
        dyn("oldest", 4 * GB, 1, Pin("j-1", 5)),
        dyn("older", 4 * GB, 2),
        dyn("newer", 2 * GB, 3),
    ]
    decided = plan(plan_space(4 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=10))
    assert decided.victim_ids == ["older"]


def test_a_pin_lapses_pin_ttl_seconds_after_it_was_taken() -> None:
    policy = dataclasses.replace(POLICY, pin_ttl_seconds=1800)
    entries = [dyn("flux-dev", 8 * GB, 1, Pin("j-12", 100)), dyn("b", 2 * GB, 2)]
    held = refusal(plan_space(8 * GB, entries, free_bytes=PLENTY, policy=policy, now=1899))
    assert held.pins == {"flux-dev": ("j-12",)}
    lapsed = plan(plan_space(8 * GB, entries, free_bytes=PLENTY, policy=policy, now=1900))
    assert lapsed.victim_ids == ["flux-dev"]


def test_a_refusal_names_the_bytes_needed_the_bytes_freeable_and_the_pins() -> None:
    entries = [
        dyn("flux-dev", 4 * GB, 1, Pin("j-12", 0)),
        dyn("lora-a", 2_100_000_000, 2),
        dyn("sdxl", 1_900_000_000, 3, Pin("j-2", 0), Pin("j-1", 0)),
    ]
    refused = refusal(plan_space(8 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=10))
    assert refused.cause == "no_room"
    assert refused.needed_bytes == 6 * GB
    assert refused.freeable_bytes == 2_100_000_000
    assert refused.pinned_bytes == 5_900_000_000
    assert refused.pins == {"flux-dev": ("j-12",), "sdxl": ("j-1", "j-2")}
    assert refused.reason == (
        "needs 6.0 GB freed for 8.0 GB (dynamic cache 8.0 GB of its 10.0 GB cap), "
        "2.1 GB can be freed; 5.9 GB held by pins: flux-dev (job j-12), sdxl (jobs j-1, j-2)"
    )


def test_a_refusal_lists_a_few_pins_and_counts_the_rest() -> None:
    entries = [dyn(f"m{i}", 1 * GB, i, Pin(f"j-{i}", 0)) for i in range(8)]
    refused = refusal(plan_space(5 * GB, entries, free_bytes=PLENTY, policy=POLICY, now=1))
    assert "m0 (job j-0), m1 (job j-1), m2 (job j-2), m3 (job j-3), m4 (job j-4)" in refused.reason
    assert refused.reason.endswith("and 3 more")
    assert len(refused.pins) == 8


def test_an_item_larger_than_the_whole_cap_is_refused_for_good() -> None:
    refused = refusal(plan_space(11 * GB, [], free_bytes=PLENTY, policy=POLICY, now=0))
    assert refused.cause == "too_large"
    assert refused.reason == (
        "needs 11.0 GB, more than the whole dynamic cache may hold (10.0 GB, "
        "max_dynamic_bytes): raise the cap or make it a static dependency"
    )


def test_with_eviction_disabled_nothing_goes_and_what_does_not_fit_is_refused() -> None:
    policy = dataclasses.replace(POLICY, enabled=False)
    entries = [dyn("a", 6 * GB, 1)]
    fits = plan(plan_space(4 * GB, entries, free_bytes=PLENTY, policy=policy, now=2))
    assert fits.batches == ()
    refused = refusal(plan_space(5 * GB, entries, free_bytes=PLENTY, policy=policy, now=2))
    assert refused.cause == "eviction_disabled"
    assert refused.needed_bytes == 1 * GB
    assert "dynamic eviction is disabled (6.0 GB could be freed)" in refused.reason
    assert "DM_DYNAMIC_EVICTION_ENABLED=1" in refused.reason


def test_the_free_disk_floor_holds_without_a_cap() -> None:
    policy = DynamicPolicy(enabled=True, min_free_bytes=10 * GB, max_dynamic_bytes=None)
    entries = [dyn("a", 3 * GB, 1), dyn("b", 3 * GB, 2), dyn("c", 3 * GB, 3)]
    decided = plan(plan_space(5 * GB, entries, free_bytes=11 * GB, policy=policy, now=5))
    assert decided.victim_ids == ["a", "b"]
    assert decided.free_after == 12 * GB
    assert decided.cap_left is None
    refused = refusal(plan_space(5 * GB, entries, free_bytes=4 * GB, policy=policy, now=5))
    assert refused.needed_bytes == 11 * GB
    assert "4.0 GB free disk, 10.0 GB to be kept free" in refused.reason


def test_a_static_download_may_evict_dynamic_entries_for_disk_but_ignores_the_cap() -> None:
    policy = dataclasses.replace(POLICY, min_free_bytes=5 * GB)
    entries = [dyn("a", 4 * GB, 1), dyn("b", 4 * GB, 2)]
    decided = plan(
        plan_space(20 * GB, entries, free_bytes=24 * GB, policy=policy, now=3, static=True)
    )
    assert decided.victim_ids == ["a"]
    assert decided.dynamic_after == 4 * GB


def test_downloads_in_flight_count_against_the_cap_and_the_disk() -> None:
    policy = dataclasses.replace(POLICY, min_free_bytes=1 * GB)
    entries = [dyn("a", 2 * GB, 1), dyn("b", 2 * GB, 2)]
    flight = [Reservation("x", 5 * GB)]
    decided = plan(
        plan_space(2 * GB, entries, free_bytes=PLENTY, policy=policy, now=3, reservations=flight)
    )
    assert decided.victim_ids == ["a"]
    # Disk: 7 GB free, 5 GB still to be written by x: a 2 GB item over a 1 GB floor
    # needs 1 GB back.
    static_flight = [Reservation("x", 5 * GB, static=True)]
    decided = plan(
        plan_space(
            2 * GB, entries, free_bytes=7 * GB, policy=policy, now=3, reservations=static_flight
        )
    )
    assert decided.victim_ids == ["a"]


def test_what_a_download_has_already_allocated_is_not_counted_twice() -> None:
    policy = dataclasses.replace(POLICY, min_free_bytes=1 * GB, max_dynamic_bytes=None)
    entries = [dyn("a", 2 * GB, 1)]
    allocated = [Reservation("x", 5 * GB, allocated=5 * GB)]
    decided = plan(
        plan_space(2 * GB, entries, free_bytes=3 * GB, policy=policy, now=3, reservations=allocated)
    )
    assert decided.batches == ()
    assert decided.free_after == 1 * GB


def test_size_zero_brings_an_over_full_cache_back_within_its_cap() -> None:
    entries = [dyn("a", 6 * GB, 1), dyn("b", 6 * GB, 2)]
    decided = plan(plan_space(0, entries, free_bytes=PLENTY, policy=POLICY, now=3))
    assert decided.victim_ids == ["a"]


def test_plan_space_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError, match="size"):
        plan_space(-1, [], free_bytes=PLENTY, policy=POLICY, now=0)
    with pytest.raises(ValueError, match="free_bytes"):
        plan_space(1, [], free_bytes=-1, policy=POLICY, now=0)


# -- the policy ----------------------------------------------------------------


def test_policy_from_env_overrides_the_profile_with_the_seeds_variables() -> None:
    env = {
        "DM_DYNAMIC_EVICTION_ENABLED": "true",
        "DM_DYNAMIC_MIN_FREE_BYTES": "10GB",
        "DM_DYNAMIC_MAX_BYTES": "1.5GiB",
        "DM_EVICTION_BATCH_MAX": "7",
        "DM_PIN_TTL_SECONDS": "60",
    }
    assert policy_from_env(DynamicPolicy(), env) == DynamicPolicy(
        enabled=True,
        min_free_bytes=10 * GB,
        max_dynamic_bytes=1_610_612_736,
        eviction_batch_max=7,
        pin_ttl_seconds=60.0,
    )


def test_policy_from_env_keeps_the_profile_where_variables_are_unset_or_blank() -> None:
    base = DynamicPolicy(enabled=True, min_free_bytes=3, max_dynamic_bytes=4)
    assert policy_from_env(base, {}) == base
    assert policy_from_env(base, {"DM_DYNAMIC_MAX_BYTES": "  ", "DM_PIN_TTL_SECONDS": ""}) == base
    assert DynamicPolicy().pin_ttl_seconds == 1800
    assert DynamicPolicy().eviction_batch_max == 20


@pytest.mark.parametrize("text", ["0", "none", "Unlimited"])
def test_policy_from_env_reads_a_zero_cap_as_no_cap_as_the_seed_did(text: str) -> None:
    base = DynamicPolicy(max_dynamic_bytes=5 * GB)
    assert policy_from_env(base, {"DM_DYNAMIC_MAX_BYTES": text}).max_dynamic_bytes is None


@pytest.mark.parametrize(
    ("text", "enabled"), [("1", True), ("ON", True), ("0", False), ("no", False)]
)
def test_policy_from_env_reads_yes_and_no(text: str, enabled: bool) -> None:
    base = DynamicPolicy(enabled=not enabled)
    assert policy_from_env(base, {"DM_DYNAMIC_EVICTION_ENABLED": text}).enabled is enabled


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("DM_DYNAMIC_EVICTION_ENABLED", "maybe", "write 1 (or true)"),
        ("DM_DYNAMIC_MIN_FREE_BYTES", "ten gigs", "e.g. 10GB"),
        ("DM_DYNAMIC_MIN_FREE_BYTES", "-1GB", "cannot be negative"),
        ("DM_DYNAMIC_MAX_BYTES", "50 GBs", "unknown unit"),
        ("DM_EVICTION_BATCH_MAX", "0", "at least 1"),
        ("DM_EVICTION_BATCH_MAX", "2.5", "at least 1"),
        ("DM_PIN_TTL_SECONDS", "soon", "e.g. 1800"),
        ("DM_PIN_TTL_SECONDS", "-5", "positive"),
        ("DM_PIN_TTL_SECONDS", "nan", "positive"),
    ],
)
def test_policy_from_env_names_the_variable_it_cannot_read(
    name: str, value: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        policy_from_env(DynamicPolicy(), {name: value})
    assert caught.value.source == name
    assert str(caught.value).startswith(f"{name}: ")
    assert repr(value) in str(caught.value)
    assert hint in str(caught.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"min_free_bytes": -1},
        {"max_dynamic_bytes": -1},
        {"eviction_batch_max": 0},
        {"pin_ttl_seconds": 0},
    ],
)
def test_a_policy_refuses_values_that_make_no_sense(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DynamicPolicy(**changes)  # type: ignore[arg-type]


# -- DependencyCache --------------------------------------------------------------


def test_reserve_takes_the_victims_out_at_once_and_commit_installs_the_item() -> None:
    cache = DependencyCache(POLICY, [dyn("a", 4 * GB, 1), dyn("b", 4 * GB, 2)])
    reservation = cache.reserve("c", 5 * GB, free_bytes=PLENTY, now=10)
    assert isinstance(reservation, Reservation)
    assert reservation.plan is not None
    assert reservation.plan.victim_ids == ["a"]
    assert cache.dynamic_ids() == ["b"]
    assert cache.cache_bytes == 4 * GB
    assert cache.reserved_bytes == 5 * GB
    # A second download cannot count a's bytes again: b must go now.
    second = cache.reserve("d", 2 * GB, free_bytes=PLENTY, now=11)
    assert isinstance(second, Reservation)
    assert second.plan is not None and second.plan.victim_ids == ["b"]
    entry = cache.commit(reservation, now=12)
    assert entry == CacheEntry("c", 5 * GB, 12)
    assert cache.dynamic_ids() == ["c"]
    assert cache.reserved_bytes == 2 * GB


def test_release_gives_the_room_back_and_the_victims_stay_gone() -> None:
    cache = DependencyCache(POLICY, [dyn("a", 8 * GB, 1)])
    reservation = cache.reserve("big", 9 * GB, free_bytes=PLENTY, now=2)
    assert isinstance(reservation, Reservation)
    assert cache.release(reservation) is True
    assert cache.release(reservation) is False
    assert cache.reserved_bytes == 0
    assert cache.dynamic_ids() == []
    with pytest.raises(KeyError):
        cache.commit(reservation, now=3)


def test_reserve_refuses_with_the_reason_and_changes_nothing() -> None:
    cache = DependencyCache(POLICY, [dyn("flux-dev", 8 * GB, 1)])
    cache.pin("flux-dev", "j-12", now=5)
    refused = cache.reserve("x", 6 * GB, free_bytes=PLENTY, now=6)
    assert isinstance(refused, SpaceRefusal)
    assert "flux-dev (job j-12)" in refused.reason
    assert cache.dynamic_ids() == ["flux-dev"]
    assert cache.reservations() == []


def test_reserving_what_is_installed_or_in_flight_is_a_mistake() -> None:
    cache = DependencyCache(POLICY, [dyn("a", 1, 1)])
    with pytest.raises(ValueError, match="installed already"):
        cache.reserve("a", 1, free_bytes=PLENTY, now=2)
    assert isinstance(cache.reserve("b", 1, free_bytes=PLENTY, now=2), Reservation)
    with pytest.raises(ValueError, match="being downloaded"):
        cache.reserve("b", 1, free_bytes=PLENTY, now=2)
    with pytest.raises(ValueError, match="being downloaded"):
        cache.add("b", 1, now=2)


def test_touch_moves_an_entry_to_the_back_of_the_eviction_line() -> None:
    cache = DependencyCache(POLICY, [dyn("a", 5 * GB, 1), dyn("b", 5 * GB, 2)])
    assert cache.touch("a", now=3) is True
    assert cache.touch("missing", now=3) is False
    reservation = cache.reserve("c", 1 * GB, free_bytes=PLENTY, now=4)
    assert isinstance(reservation, Reservation) and reservation.plan is not None
    assert reservation.plan.victim_ids == ["b"]


def test_a_pin_taken_before_the_download_holds_once_it_is_installed() -> None:
    cache = DependencyCache(POLICY)
    cache.pin("flux-dev", "j-1", now=0)
    reservation = cache.reserve("flux-dev", 6 * GB, free_bytes=PLENTY, now=1)
    assert isinstance(reservation, Reservation)
    assert cache.commit(reservation, now=2).pins == (Pin("j-1", 0),)
    assert isinstance(cache.reserve("other", 6 * GB, free_bytes=PLENTY, now=3), SpaceRefusal)
    assert cache.unpin_job("j-1") == ["flux-dev"]
    assert isinstance(cache.reserve("other", 6 * GB, free_bytes=PLENTY, now=3), Reservation)


def test_pins_end_with_their_job_or_their_ttl_and_renew_when_taken_again() -> None:
    cache = DependencyCache(dataclasses.replace(POLICY, pin_ttl_seconds=100))
    cache.pin("a", "j-1", now=0)
    cache.pin("a", "j-2", now=0)
    cache.pin("b", "j-1", now=0)
    assert cache.unpin("a", "j-2") is True
    assert cache.unpin("a", "j-2") is False
    assert cache.pins(now=50) == {"a": ("j-1",), "b": ("j-1",)}
    cache.pin("b", "j-1", now=60)  # renewed
    assert cache.pins(now=120) == {"b": ("j-1",)}
    cache.expire_pins(now=200)
    assert cache.pins(now=0) == {}


def test_evict_refuses_statics_pinned_and_unknown_entries_all_or_nothing() -> None:
    cache = DependencyCache(
        POLICY, [static("core", 1), dyn("a", 1, 1), dyn("b", 1, 1, Pin("j-9", 0))]
    )
    with pytest.raises(ValueError, match="never evicted"):
        cache.evict(["a", "core"], now=1)
    with pytest.raises(ValueError, match=r"b \(job j-9\)"):
        cache.evict(["a", "b"], now=1)
    with pytest.raises(ValueError, match="not installed"):
        cache.evict(["a", "zzz"], now=1)
    assert cache.dynamic_ids() == ["a", "b"]
    assert [entry.dep_id for entry in cache.evict(["a"], now=1)] == ["a"]
    assert [entry.dep_id for entry in cache.evict(["b"], now=10_000)] == ["b"]


def test_the_cache_reports_installed_ids_and_bytes_and_restores_from_its_entries() -> None:
    cache = DependencyCache(POLICY)
    cache.add("core", 7, now=1, static=True)
    cache.add("lora", 3, now=2)
    cache.add("vae", 2, now=3)
    cache.pin("vae", "j-1", now=4)
    assert cache.static_ids() == ["core"]
    assert cache.dynamic_ids() == ["lora", "vae"]
    assert (cache.cache_bytes, cache.static_bytes) == (5, 7)
    restored = DependencyCache(POLICY, cache.entries())
    assert restored.entries() == cache.entries()
    assert restored.pins(now=5) == {"vae": ("j-1",)}
    assert cache.forget("lora") == CacheEntry("lora", 3, 2)
    assert cache.forget("lora") is None


def test_set_allocated_keeps_a_preallocated_download_from_counting_twice() -> None:
    policy = DynamicPolicy(enabled=True, min_free_bytes=1 * GB)
    cache = DependencyCache(policy, [dyn("a", 2 * GB, 1)])
    assert isinstance(cache.reserve("x", 5 * GB, free_bytes=8 * GB, now=2), Reservation)
    # The engine preallocated x: free disk went from 8 GB to 3 GB.
    cache.set_allocated("x", 5 * GB)
    second = cache.reserve("y", 2 * GB, free_bytes=3 * GB, now=3)
    assert isinstance(second, Reservation) and second.plan is not None
    assert second.plan.batches == ()
    with pytest.raises(ValueError, match="between 0 and"):
        cache.set_allocated("x", 6 * GB)


# -- the invariants, over many random sequences --------------------------------


def _is_pinned(entry: CacheEntry, now: float, ttl: float) -> bool:
    return bool(entry.live_pins(now, ttl))


def _fits(
    policy: DynamicPolicy,
    size: int,
    is_static: bool,
    dynamic_bytes: int,
    reserved_dynamic: int,
    free: int,
    pending: int,
) -> bool:
    cap = policy.max_dynamic_bytes
    if not is_static and cap is not None and dynamic_bytes + reserved_dynamic + size > cap:
        return False
    return free - pending - size >= policy.min_free_bytes


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_never_exceed_the_bounds_nor_evict_pinned_or_static(seed: int) -> None:
    rng = random.Random(seed)
    unit = 100 * 2**20
    disk_total = rng.randint(100, 400) * unit
    other_files = rng.randint(0, 20) * unit
    policy = DynamicPolicy(
        enabled=rng.random() < 0.9,
        min_free_bytes=rng.randint(0, 30) * unit,
        max_dynamic_bytes=rng.choice([None, rng.randint(20, 200) * unit]),
        eviction_batch_max=rng.randint(1, 4),
        pin_ttl_seconds=rng.choice([50.0, 500.0]),
    )
    ttl = policy.pin_ttl_seconds
    cache = DependencyCache(policy)
    ids = [f"dep-{i:02d}" for i in range(30)]
    jobs = [f"j-{i}" for i in range(6)]
    pending: dict[str, Reservation] = {}
    statics_seen: set[str] = set()
    now = 0.0

    def free_disk() -> int:
        on_disk = sum(entry.size for entry in cache.entries())
        allocated = sum(r.allocated for r in cache.reservations())
        return disk_total - other_files - on_disk - allocated

    for _step in range(300):
        now += rng.choice([0.0, 1.0, 7.0, 40.0])
        before = {entry.dep_id: entry for entry in cache.entries()}
        op = rng.random()
        if op < 0.35:
            free_ids = [i for i in ids if i not in before and i not in pending]
            if not free_ids:
                continue
            dep_id = rng.choice(free_ids)
            is_static = rng.random() < 0.1
            size = rng.randint(0, 60) * unit
            dynamic_bytes = cache.cache_bytes
            reserved_dynamic = cache.reserved_bytes
            free = free_disk()
            pending_disk = sum(r.pending_disk_bytes for r in cache.reservations())
            decided = cache.reserve(dep_id, size, free_bytes=free, now=now, static=is_static)
            if isinstance(decided, SpaceRefusal):
                assert set(cache.dynamic_ids()) | set(cache.static_ids()) == set(before)
                assert decided.reason
                continue
            assert decided.plan is not None
            victims = decided.plan.victims
            assert all(len(batch) <= policy.eviction_batch_max for batch in decided.plan.batches)
            for victim in victims:
                assert not victim.static
                assert not _is_pinned(victim, now, ttl)
            if not policy.enabled:
                assert victims == ()
            if victims:
                # Least recently used first, and every unpinned dynamic entry left is newer.
                keys = [(v.last_used, v.dep_id) for v in victims]
                assert keys == sorted(keys)
                for entry in cache.entries():
                    if not entry.static and not _is_pinned(entry, now, ttl):
                        assert (entry.last_used, entry.dep_id) > keys[-1]
                # No more than needed: without the last victim the item would not fit.
                freed_but_last = sum(v.size for v in victims[:-1])
                assert not _fits(
                    policy,
                    size,
                    is_static,
                    dynamic_bytes - freed_but_last,
                    reserved_dynamic,
                    free + freed_but_last,
                    pending_disk,
                )
            if rng.random() < 0.5:
                cache.set_allocated(dep_id, size)  # the engine preallocates
            pending[dep_id] = decided
        elif op < 0.55 and pending:
            dep_id = rng.choice(sorted(pending))
            reservation = pending.pop(dep_id)
            if rng.random() < 0.8:
                cache.commit(reservation, now=now)
            else:
                cache.release(reservation)
        elif op < 0.7 and before:
            cache.touch(rng.choice(sorted(before)), now=now)
        elif op < 0.85:
            cache.pin(rng.choice(ids), rng.choice(jobs), now=now)
        elif op < 0.95:
            cache.unpin(rng.choice(ids), rng.choice(jobs))
        else:
            cache.unpin_job(rng.choice(jobs))

        after = {entry.dep_id: entry for entry in cache.entries()}
        statics_seen |= {dep_id for dep_id, entry in after.items() if entry.static}
        assert statics_seen <= set(after), "a static dependency went"
        for dep_id, entry in before.items():
            if _is_pinned(entry, now, ttl):
                assert dep_id in after, f"pinned {dep_id} went"
        if policy.max_dynamic_bytes is not None:
            assert cache.cache_bytes + cache.reserved_bytes <= policy.max_dynamic_bytes
        still_to_write = sum(r.pending_disk_bytes for r in cache.reservations())
        assert free_disk() - still_to_write >= policy.min_free_bytes
