"""The offer ranking: the requirements filter, the search it sends, and the cost model.

Plain data in, plain data out: offers and profiles are built here, no server runs
(the simulator's search engine is called as a function to hold ``search_query``
to the same answer as the local filter).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyfleet.offers import (
    Rejection,
    check,
    estimate,
    rank,
    search_query,
    usual_pick,
)
from comfyfleet.profiles import GB, Profile, load_fleet
from comfyfleet.providers.base import Offer
from comfyfleet.sim.vast import (
    CATALOG_EPOCH,
    generate_offers,
    price_offer,
    rental_attempt,
    search_offers,
)
from tests.conftest import EXAMPLE_FLEET

# An offer that every profile built by ``profile()`` accepts.
GOOD: dict[str, Any] = {
    "id": 1,
    "machine_id": 101,
    "num_gpus": 1,
    "gpu_name": "RTX 4090",
    "gpu_ram": 24564,  # MB: a card sold as 24 GB
    "cuda_max_good": 12.4,
    "disk_space": 500.0,
    "dph_total": 0.5,
    "reliability": 0.99,
    "inet_down": 800.0,
    "inet_up": 400.0,
    "inet_down_cost": 0.002,  # $/GB: $2/TB
    "direct_port_count": 100,
    "verification": "verified",
    "geolocation": "Texas, US",
    "rentable": True,
    "rented": False,
}


def offer(**changes: Any) -> Offer:
    return Offer(**{**GOOD, **changes})


def profile(**changes: Any) -> Profile:
    """The seeds' requirements (``Profile``'s defaults) and a 50 GB manifest."""
    return Profile(**{"manifest_gb": 50, **changes})


def ids(offers: list[Any]) -> list[int]:
    return [getattr(o, "offer", o).id for o in offers]


# --- the requirements filter ------------------------------------------------------------------


def test_the_reference_offer_passes_the_reference_profile() -> None:
    assert check(offer(), profile()) == []
    ranking = rank([offer()], profile())
    assert ids(ranking.accepted) == [1] and ranking.rejected == []


@pytest.mark.parametrize(
    ("requirements", "changes", "reason"),
    [
        (
            {"gpu_names": ["RTX 5090", "H100 SXM"]},
            {},
            "GPU RTX 4090 is not one of RTX 5090, H100 SXM",
        ),
        ({"exclude_gpu_names": ["rtx_4090"]}, {}, "GPU RTX 4090 is excluded"),
        ({"min_vram_gb": 32}, {}, "VRAM 24.6 GB < 32 GB"),
        ({}, {"gpu_ram": 12288}, "VRAM 12.3 GB < 16 GB"),
        ({}, {"cuda_max_good": 11.8}, "CUDA 11.8 < 12"),
        ({}, {"disk_space": 200.0}, "disk 200 GB < 250 GB"),
        ({}, {"dph_total": 3.5}, "price $3.500/h > $3/h"),
        ({}, {"dph_total": -0.1}, "price -0.1 $/h is not a valid price"),
        ({}, {"reliability": 0.9}, "reliability 0.900 < 0.95"),
        ({"min_inet_down_mbps": 1000}, {}, "inet down 800 Mb/s < 1000 Mb/s"),
        ({}, {"inet_down": 0.0}, "inet down 0 Mb/s: no download time to estimate"),
        ({"min_inet_up_mbps": 500}, {}, "inet up 400 Mb/s < 500 Mb/s"),
        ({}, {"inet_down_cost": -1.0}, "bandwidth price -1 $/GB is not a valid price"),
        ({"min_direct_ports": 1}, {"direct_port_count": 0}, "0 direct ports < 1"),
        ({}, {"verification": "unverified"}, "host is unverified, the profile wants verified"),
        ({}, {"verification": None}, "host is not verified, the profile wants verified"),
        ({"regions": ["DE", "NL"]}, {}, "region US is not one of DE, NL"),
        ({"regions": ["US"]}, {"geolocation": None}, "region (unknown) is not one of US"),
        (
            {"exclude_regions": ["cn", "VN"]},
            {"geolocation": "Guangdong, CN"},
            "region CN is excluded",
        ),
        ({}, {"num_gpus": 2}, "2 GPUs, the profile wants 1"),
        ({}, {"rented": True}, "offer is no longer rentable"),
        ({}, {"rentable": False}, "offer is no longer rentable"),
    ],
)
def test_each_requirement_rejects_with_its_reason(
    requirements: dict[str, Any], changes: dict[str, Any], reason: str
) -> None:
    failing, wanted = offer(**changes), profile(**requirements)
    assert check(failing, wanted) == [reason]
    ranking = rank([failing], wanted)
    assert ranking.accepted == []
    assert [(r.offer.id, r.reasons) for r in ranking.rejected] == [(1, (reason,))]


@pytest.mark.parametrize(
    ("requirements", "changes"),
    [
        ({"min_vram_gb": 16}, {"gpu_ram": 16000}),  # GB x 1000, the CLI's conversion
        ({"min_vram_gb": 24}, {"gpu_ram": 24564}),  # a "24 GB" card passes 24
        ({"min_cuda": 12.4}, {}),
        ({"disk_gb": 500}, {}),
        ({"max_price": 0.5}, {}),
        ({"max_price": None}, {"dph_total": 40.0}),
        ({"min_reliability": 0.99}, {}),
        ({"min_inet_down_mbps": 800}, {}),
        ({"min_inet_up_mbps": 400}, {}),
        ({"min_direct_ports": 100}, {}),
        ({"verified_only": False}, {"verification": "unverified"}),
        ({"gpu_names": ["rtx_4090"]}, {}),
        ({"regions": ["us"]}, {}),
        ({"exclude_regions": ["CN"]}, {"geolocation": None}),
        ({"num_gpus": 2}, {"num_gpus": 2}),
    ],
)
def test_an_offer_exactly_at_a_threshold_passes(
    requirements: dict[str, Any], changes: dict[str, Any]
) -> None:
    assert check(offer(**changes), profile(**requirements)) == []


def test_an_offer_failing_several_requirements_gets_every_reason() -> None:
    bad = offer(gpu_ram=12288, dph_total=4.0, geolocation="Hanoi, VN", direct_port_count=0)
    reasons = check(bad, profile(exclude_regions=["VN"], min_direct_ports=1))
    assert reasons == [
        "VRAM 12.3 GB < 16 GB",
        "price $4.000/h > $3/h",
        "0 direct ports < 1",
        "region VN is excluded",
    ]
    (rejection,) = rank([bad], profile(exclude_regions=["VN"], min_direct_ports=1)).rejected
    assert list(rejection.reasons) == reasons
    assert "VRAM 12.3 GB < 16 GB" in repr(rejection)


def test_blocklisted_machines_are_rejected_and_never_picked() -> None:
    cheap = offer(id=1, machine_id=7, dph_total=0.2)
    dear = offer(id=2, machine_id=8, dph_total=0.9)
    ranking = rank([cheap, dear], profile(), blocked_machines={7})
    assert ids(ranking.accepted) == [2]
    assert ranking.rejected[0].reasons == ("machine 7 is blocklisted",)
    assert check(cheap, profile(), blocked_machines=[7]) == ["machine 7 is blocklisted"]
    picked = usual_pick([cheap, dear], profile(), blocked_machines={7})
    assert picked is not None and picked.offer.id == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"dph_total": math.nan},
        {"dph_total": math.inf},
        {"inet_down": math.nan},
        {"inet_down": math.inf},
        {"inet_down": 1e-300},  # bytes x 8 / inet_down overflows; 0 $/h x inf would be NaN
        {"inet_down_cost": math.nan},
        {"inet_down_cost": math.inf},
        {"reliability": math.nan},
        {"gpu_ram": math.nan},
        {"disk_space": math.nan},
        {"cuda_max_good": math.nan},
    ],
)
def test_nonsense_numbers_are_rejected_not_ranked(changes: dict[str, Any]) -> None:
    odd = offer(**{"dph_total": 0.0, **changes})
    reasons = check(odd, profile(max_price=None))
    assert len(reasons) == 1
    assert rank([odd], profile(max_price=None)).accepted == []


# --- the search -------------------------------------------------------------------------------


def test_search_query_uses_vast_units_and_prices_the_profile_disk() -> None:
    q = search_query(profile(min_direct_ports=1, exclude_regions=["CN", "VN"]))
    assert q["gpu_ram"] == {"gte": 16_000}  # MB: GB x 1000
    assert q["allocated_storage"] == 250  # so dph_total includes the disk we will rent
    assert q["disk_space"] == {"gte": 250}
    assert q["dph_total"] == {"lte": 3.0}
    assert q["reliability"] == {"gte": 0.95}
    assert q["cuda_max_good"] == {"gte": 12}
    assert q["direct_port_count"] == {"gte": 1}
    assert q["num_gpus"] == {"eq": 1}
    assert q["verified"] == {"eq": True}
    assert q["geolocation"] == {"notin": ["CN", "VN"]}
    assert q["inet_down"] == {"gt": 0}  # unknown speed: no download time to rank by
    assert (q["rentable"], q["rented"], q["external"]) == (
        {"eq": True},
        {"eq": False},
        {"eq": False},
    )
    assert q["order"] == [["dph_total", "asc"]]
    assert q["type"] == "on-demand"


def test_search_query_names_the_gpus_and_regions_to_include() -> None:
    q = search_query(
        profile(
            gpu_names=["RTX 4090", "RTX_5090"],
            regions=["us", "DE"],
            min_inet_down_mbps=500,
            min_inet_up_mbps=100,
            max_price=None,
            verified_only=False,
            disk_gb=120,
        )
    )
    assert q["gpu_name"] == {"in": ["RTX 4090", "RTX 5090"]}
    assert q["geolocation"] == {"in": ["US", "DE"]}
    assert q["inet_down"] == {"gte": 500}
    assert q["inet_up"] == {"gte": 100}
    assert "dph_total" not in q
    assert q["verified"] == {"in": [True, False]}
    assert q["allocated_storage"] == q["disk_space"]["gte"] == 120


def test_broad_search_keeps_only_the_base_filters_and_the_disk_price() -> None:
    q = search_query(profile(exclude_regions=["CN"]), broad=True)
    assert q["allocated_storage"] == 250
    assert q["verified"] == {"in": [True, False]}
    for field in ("gpu_ram", "dph_total", "reliability", "geolocation", "num_gpus", "disk_space"):
        assert field not in q


@pytest.mark.parametrize(
    "requirements",
    [
        {},
        {"min_direct_ports": 1, "exclude_regions": ["CN", "VN"], "min_inet_down_mbps": 100},
        {"exclude_gpu_names": ["RTX 3060", "RTX_2080_Ti"], "min_vram_gb": 24, "max_price": 1.0},
        {"gpu_names": ["rtx 4090", "H100 SXM"], "regions": ["US", "DE"], "verified_only": False},
        {"min_inet_up_mbps": 300, "num_gpus": 2, "min_cuda": 12.8, "disk_gb": 600},
    ],
)
def test_the_server_search_and_the_local_check_agree_on_the_simulated_catalog(
    requirements: dict[str, Any],
) -> None:
    wanted = profile(**requirements)
    catalog = generate_offers(5, 3000)
    found = {row["id"] for row in search_offers(catalog, search_query(wanted), now=CATALOG_EPOCH)}
    passing = {
        row["id"]
        for row in catalog
        if not row["external"]  # a base filter of every search, not a profile requirement
        and check(Offer.model_validate(price_offer(dict(row), wanted.disk_gb)), wanted) == []
    }
    assert found == passing
    assert len(found) >= 5


# --- the cost model ---------------------------------------------------------------------------


def test_expected_dollars_are_the_issue_formula() -> None:
    # 50 GB at 800 Mb/s: 50e9 x 8 / 800e6 = 500 s; 300 s boot, 600 s use, $2/TB.
    cost = estimate(offer(), profile(boot_seconds=300, use_seconds=600))
    assert cost.dph == 0.5
    assert cost.download_s == 500
    assert cost.boot_s == 300
    assert cost.minutes_to_ready == pytest.approx(800 / 60)
    assert cost.bandwidth_dollars == pytest.approx(0.10)
    assert cost.dollars_to_ready == pytest.approx(0.5 * 800 / 3600 + 0.10)
    assert cost.expected_dollars == pytest.approx(0.5 * 1400 / 3600 + 0.10)  # $0.2944


def test_manifest_bytes_drive_the_download_time() -> None:
    cost = estimate(offer(inet_down=100.0), profile(manifest_gb=None, manifest_bytes=12_500_000))
    assert cost.download_s == pytest.approx(1.0)  # 100 Mb at 100 Mb/s
    assert estimate(offer(), profile(manifest_gb=0)).bandwidth_dollars == 0


def test_estimate_refuses_an_offer_without_a_download_speed() -> None:
    with pytest.raises(ValueError, match="no inet_down"):
        estimate(offer(inet_down=0.0), profile())


def test_offer_ranking_prefers_fast_download_when_models_are_large() -> None:
    slow_cheap = offer(id=1, machine_id=1, dph_total=0.30, inet_down=50.0, inet_down_cost=0.0)
    fast_dear = offer(id=2, machine_id=2, dph_total=0.60, inet_down=2000.0, inet_down_cost=0.0)
    assert ids(rank([slow_cheap, fast_dear], profile(manifest_gb=50)).accepted) == [2, 1]
    assert ids(rank([slow_cheap, fast_dear], profile(manifest_gb=0)).accepted) == [1, 2]
    usual = usual_pick([slow_cheap, fast_dear], profile(manifest_gb=50))
    assert usual is not None and usual.offer.id == 1  # the rule the ranking improves on


def test_offer_ranking_avoids_pricey_bandwidth_when_models_are_large() -> None:
    priced = offer(id=1, machine_id=1, dph_total=0.40, inet_down_cost=0.05)  # $50/TB
    free = offer(id=2, machine_id=2, dph_total=0.45, inet_down_cost=0.0)
    best = rank([priced, free], profile(manifest_gb=50)).best
    assert best is not None and best.offer.id == 2
    assert best.estimate.bandwidth_dollars == 0
    assert ids(rank([priced, free], profile(manifest_gb=0)).accepted) == [1, 2]


def test_equal_expected_dollars_order_by_price_then_id() -> None:
    # No boot, download or use: every free-bandwidth offer is expected to cost $0.
    free_time = profile(manifest_gb=0, boot_seconds=0, use_seconds=0)
    offers = [
        offer(id=3, machine_id=3, dph_total=0.5, inet_down_cost=0.0),
        offer(id=1, machine_id=1, dph_total=0.7, inet_down_cost=0.0),
        offer(id=2, machine_id=2, dph_total=0.5, inet_down_cost=0.0),
    ]
    ranking = rank(offers, free_time)
    assert [r.estimate.expected_dollars for r in ranking.accepted] == [0, 0, 0]
    assert ids(ranking.accepted) == [2, 3, 1]


def test_limit_cuts_the_accepted_list_but_keeps_every_rejection() -> None:
    offers = [offer(id=i, machine_id=i, dph_total=0.1 * i) for i in range(1, 6)]
    offers.append(offer(id=9, machine_id=9, rented=True))
    assert ids(rank(offers, profile(), limit=2).accepted) == [1, 2]
    for limit in (0, -3):
        ranking = rank(offers, profile(), limit=limit)
        assert ranking.accepted == [] and ranking.best is None
        assert ids(ranking.rejected) == [9]


def test_nothing_passes_nothing_is_picked() -> None:
    ranking = rank([offer(rented=True)], profile())
    assert ranking.best is None and ranking.accepted == []
    assert usual_pick([offer(rented=True)], profile()) is None
    assert rank([], profile()).best is None


def test_example_profile_ranks_the_simulated_catalog_by_expected_dollars() -> None:
    default = load_fleet(EXAMPLE_FLEET).get("default")
    catalog = generate_offers(11, 2000)
    offers = [Offer.model_validate(price_offer(row, default.disk_gb)) for row in catalog]
    ranking = rank(offers, default)
    assert len(ranking.accepted) > 10 and len(ranking.rejected) > 100
    for item in ranking.accepted:
        o = item.offer
        assert o.gpu_ram >= 16_000 and o.cuda_max_good >= 12 and o.disk_space >= 250
        assert o.dph_total <= 3 and o.reliability >= 0.95 and o.direct_port_count >= 1
        assert o.country_code not in {"CN", "VN"} and o.gpu_name not in {"RTX 3060"}
    usual = usual_pick(offers, default)
    best = ranking.best
    assert usual is not None and best is not None
    assert usual.offer.dph_total == min(r.offer.dph_total for r in ranking.accepted)
    assert best.estimate.expected_dollars <= usual.estimate.expected_dollars


# --- the ground truth the benchmark scores the ranking with ------------------------------------


def test_a_ground_truth_rental_bills_storage_while_booting_and_everything_once_running() -> None:
    row = price_offer(dict(generate_offers(1, 1)[0]), 250)
    storage, dph, per_gb = row["storage_total_cost"], row["dph_total"], row["inet_down_cost"]
    assert 0 < storage < dph

    ready = rental_attempt(random.Random(4), {**row, "reliability": 1.0}, 50 * GB, 600)
    assert not ready.failed and ready.boot_s > 0
    assert ready.dollars == pytest.approx(
        (storage * ready.boot_s + dph * (ready.download_s + 600)) / 3600 + per_gb * 50
    )
    realised_mbps = 50 * GB * 8 / ready.download_s / 1e6
    assert realised_mbps <= row["inet_down"] * 1.05  # never much above the advertised speed

    failed = rental_attempt(random.Random(4), {**row, "reliability": 0.0}, 50 * GB, 600)
    assert failed.failed and failed.download_s == 0
    assert failed.boot_s == ready.boot_s  # the same draws, up to the failure
    assert failed.dollars == pytest.approx(storage * failed.boot_s / 3600)


# --- properties of the ordering ---------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([0.0, -1.0, math.nan, math.inf, 5e-324])


def some(finite: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    """Mostly plausible values, sometimes nonsense (which the filter must reject)."""
    return st.one_of(finite, finite, finite, ODD_NUMBERS)


OFFER_FIELDS = st.fixed_dictionaries(
    {
        "machine_id": st.integers(1, 30),
        "num_gpus": st.sampled_from([1, 1, 1, 2]),
        "gpu_name": st.sampled_from(["RTX 4090", "RTX 3060", "rtx 3090", "H100 SXM", ""]),
        "gpu_ram": st.sampled_from([12288.0, 15999.0, 16000.0, 24564.0, 81559.0]),
        "cuda_max_good": st.sampled_from([11.8, 12.0, 12.8]),
        "disk_space": st.floats(100, 1000),
        "dph_total": some(st.floats(0, 4)),
        "reliability": st.floats(0.9, 1.0),
        "inet_down": some(st.floats(1, 10_000)),
        "inet_up": st.floats(1, 5_000),
        "inet_down_cost": some(st.floats(0, 0.1)),
        "direct_port_count": st.integers(0, 3),
        "verification": st.sampled_from(["verified", "verified", "unverified", None]),
        "geolocation": st.sampled_from(["Texas, US", "Bavaria, DE", "Guangdong, CN", None]),
        "rented": st.sampled_from([False, False, False, True]),
    }
)


@st.composite
def offer_lists(draw: st.DrawFn, max_size: int = 25) -> list[Offer]:
    fields = draw(st.lists(OFFER_FIELDS, max_size=max_size))
    offer_ids = draw(
        st.lists(st.integers(1, 10**8), min_size=len(fields), max_size=len(fields), unique=True)
    )
    return [Offer(id=i, **f) for i, f in zip(offer_ids, fields, strict=True)]


PROFILES = st.builds(
    Profile,
    manifest_gb=st.one_of(st.just(0.0), st.floats(0, 200)),
    boot_seconds=st.floats(0, 1200),
    use_seconds=st.floats(0, 7200),
    max_price=st.sampled_from([3.0, 1.0, None]),
    min_inet_down_mbps=st.sampled_from([0.0, 100.0]),
    min_direct_ports=st.sampled_from([0, 1]),
    exclude_regions=st.sampled_from([[], ["CN"]]),
    exclude_gpu_names=st.sampled_from([[], ["RTX 3060"]]),
    verified_only=st.booleans(),
)

# Ways to make any offer fail the profile.
BREAKERS = st.sampled_from(
    [
        {"rented": True},
        {"num_gpus": 3},
        {"dph_total": math.nan},
        {"reliability": 0.1},
        {"inet_down": 0.0},
        {"gpu_ram": 100.0},
        {"cuda_max_good": 9.0},
        {"disk_space": 1.0},
    ]
)


@settings(deadline=None)
@given(offers=offer_lists(), wanted=PROFILES)
def test_ranking_is_sorted_by_expected_dollars_and_accounts_for_every_offer(
    offers: list[Offer], wanted: Profile
) -> None:
    ranking = rank(iter(offers), wanted)
    dollars = [r.estimate.expected_dollars for r in ranking.accepted]
    assert dollars == sorted(dollars)
    assert all(math.isfinite(d) and d >= 0 for d in dollars)
    # Accepted exactly when check finds nothing; each rejection carries check's reasons.
    assert sorted(ids(ranking.accepted)) == sorted(o.id for o in offers if not check(o, wanted))
    assert ids(ranking.rejected) == [o.id for o in offers if check(o, wanted)]
    for rejection in ranking.rejected:
        assert isinstance(rejection, Rejection)
        assert list(rejection.reasons) == check(rejection.offer, wanted) != []
    # The ranking's estimates are the cost model's, bit for bit.
    for item in ranking.accepted:
        assert item.estimate == estimate(item.offer, wanted)


@settings(deadline=None)
@given(offers=offer_lists(), wanted=PROFILES, data=st.data())
def test_the_ranking_does_not_depend_on_input_order(
    offers: list[Offer], wanted: Profile, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(offers))
    assert ids(rank(shuffled, wanted).accepted) == ids(rank(offers, wanted).accepted)


@settings(deadline=None)
@given(
    offers=offer_lists(),
    extra=OFFER_FIELDS,
    breaker=BREAKERS,
    wanted=PROFILES,
    data=st.data(),
)
def test_adding_a_rejected_offer_never_changes_the_accepted_order(
    offers: list[Offer],
    extra: dict[str, Any],
    breaker: dict[str, Any],
    wanted: Profile,
    data: st.DataObject,
) -> None:
    rejected = Offer(**{**extra, **breaker, "id": 10**9})
    assert check(rejected, wanted) != []
    where = data.draw(st.integers(0, len(offers)))
    more = [*offers[:where], rejected, *offers[where:]]
    before, after = rank(offers, wanted), rank(more, wanted)
    assert ids(after.accepted) == ids(before.accepted)
    assert [r.estimate for r in after.accepted] == [r.estimate for r in before.accepted]
    assert 10**9 in ids(after.rejected)


@settings(deadline=None)
@given(
    offers=offer_lists(max_size=10),
    dph=st.floats(0, 3),
    inet_down=st.floats(1, 10_000),
    cost=st.floats(0, 0.1),
    dearer=st.floats(1e-6, 2.0),
    slower=st.floats(1.0001, 100.0),
    pricier=st.floats(1e-6, 0.1),
    wanted=PROFILES,
    data=st.data(),
)
def test_a_dominated_offer_never_ranks_above_its_dominator(
    offers: list[Offer],
    dph: float,
    inet_down: float,
    cost: float,
    dearer: float,
    slower: float,
    pricier: float,
    wanted: Profile,
    data: st.DataObject,
) -> None:
    # b costs more per hour, downloads slower and charges more per GB than a.
    open_profile = wanted.model_copy(update={"max_price": None, "min_inet_down_mbps": 0.0})
    a = offer(id=10**9, dph_total=dph, inet_down=inet_down, inet_down_cost=cost)
    b = offer(
        id=10**9 + 1,
        dph_total=dph + dearer,
        inet_down=inet_down / slower,
        inet_down_cost=cost + pricier,
    )
    assert check(a, open_profile) == check(b, open_profile) == []
    pair = data.draw(st.permutations([a, b]))
    where = data.draw(st.integers(0, len(offers)))
    order = ids(rank([*offers[:where], *pair, *offers[where:]], open_profile).accepted)
    assert order.index(a.id) < order.index(b.id)
    assert estimate(a, open_profile).expected_dollars <= estimate(b, open_profile).expected_dollars


@settings(deadline=None)
@given(offers=offer_lists(), wanted=PROFILES, limit=st.integers(-2, 30))
def test_limit_returns_a_prefix_of_the_full_ranking(
    offers: list[Offer], wanted: Profile, limit: int
) -> None:
    full, cut = rank(offers, wanted), rank(offers, wanted, limit=limit)
    assert cut.accepted == full.accepted[: max(0, limit)]
    assert ids(cut.rejected) == ids(full.rejected)


@settings(deadline=None)
@given(offers=offer_lists(), wanted=PROFILES)
def test_usual_pick_is_the_cheapest_per_hour_and_never_cheaper_by_the_model(
    offers: list[Offer], wanted: Profile
) -> None:
    ranking = rank(offers, wanted)
    usual = usual_pick(offers, wanted)
    if not ranking.accepted:
        assert usual is None
        return
    assert usual is not None and ranking.best is not None
    cheapest = min((r.offer.dph_total, r.offer.id) for r in ranking.accepted)
    assert (usual.offer.dph_total, usual.offer.id) == cheapest
    assert ranking.best.estimate.expected_dollars <= usual.estimate.expected_dollars


@given(
    dph=st.floats(0, 50),
    inet_down=st.floats(0.1, 100_000),
    cost=st.floats(0, 1),
    manifest_gb=st.floats(0, 10_000),
    boot=st.floats(0, 3600),
    use=st.floats(0, 86_400),
)
def test_estimate_matches_the_formula_for_any_plausible_numbers(
    dph: float, inet_down: float, cost: float, manifest_gb: float, boot: float, use: float
) -> None:
    wanted = profile(manifest_gb=manifest_gb, boot_seconds=boot, use_seconds=use)
    nbytes = wanted.download_bytes
    formula = dph * (boot + nbytes * 8 / (inet_down * 1e6) + use) / 3600 + cost * nbytes / GB
    got = estimate(offer(dph_total=dph, inet_down=inet_down, inet_down_cost=cost), wanted)
    assert got.expected_dollars == pytest.approx(formula, rel=1e-9, abs=1e-12)
