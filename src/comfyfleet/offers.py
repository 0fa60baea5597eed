"""Which offers fit a profile, what each would really cost, and in which order to rent them.

Pure functions over typed values (``Offer``, ``Profile``); no I/O. ``market``
does the searching and renting around them.

* ``search_query`` builds the Vast search for a profile (the server-side half
  of the filter, in Vast's units); ``check`` is the local half and says, for
  every requirement an offer fails, why.
* ``estimate`` is the cost model (issue 2, "Precisions")::

      expected $ = dph_total x (boot s + bytes x 8 / (inet_down x 10^6) + use s) / 3600
                   + inet_down_cost x bytes / 10^9

  ``dph_total`` includes the storage the search priced (``allocated_storage`` =
  the profile's ``disk_gb``); dollars to ready leave the use part out.
* ``rank`` filters and orders a whole search result by expected dollars (ties:
  cheaper $/h, then lower offer id, so the order is total and repeatable);
  ``usual_pick`` is the baseline rule of the seeds: the cheapest $/h that passes.

Units. ``min_vram_gb`` compares with ``gpu_ram`` (MB per GPU) as GB x 1000, the
conversion the official CLI applies to its searches, so the search and the
check agree exactly. Vast reports binary megabytes (a 24 GB card is 24564 or
24576 MB), so a card sold as N GB always passes ``min_vram_gb: N``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from comfyfleet.profiles import GB, Profile
from comfyfleet.providers.base import Offer

__all__ = [
    "CostEstimate",
    "RankedOffer",
    "Ranking",
    "Rejection",
    "allocated_storage_gb",
    "check",
    "estimate",
    "rank",
    "search_query",
    "usual_pick",
]

MB_PER_GB: Final = 1000.0  # Vast's (and its CLI's) conversion for gpu_ram filters
SEARCH_ORDER: Final = [["dph_total", "asc"]]


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """What an offer is expected to cost for a profile (seconds and dollars)."""

    dph: float  # the offer's dph_total, $/h, storage included
    boot_s: float  # the profile's expected boot
    download_s: float  # the profile's bytes at the offer's advertised inet_down
    minutes_to_ready: float  # (boot + download) / 60
    dollars_to_ready: float  # dph x (boot + download) + bandwidth
    bandwidth_dollars: float  # inet_down_cost x GB downloaded
    expected_dollars: float  # dollars_to_ready + dph x use: what the ranking minimises


@dataclass(frozen=True, slots=True)
class RankedOffer:
    """An offer that passes the profile, with its cost estimate."""

    offer: Offer
    estimate: CostEstimate


class Rejection:
    """An offer that fails the profile, with every reason (never empty).

    The reasons are written when first read: a ranking of thousands of offers
    only decides, and ``--explain`` pays for the sentences it shows.
    """

    __slots__ = ("_reasons", "_requirements", "offer")

    def __init__(self, offer: Offer, requirements: _Requirements) -> None:
        self.offer = offer
        self._requirements = requirements
        self._reasons: tuple[str, ...] | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        if self._reasons is None:
            self._reasons = tuple(self._requirements.reasons(self.offer))
        return self._reasons

    def __repr__(self) -> str:
        return f"Rejection(offer={self.offer.id}, reasons={list(self.reasons)!r})"


@dataclass(frozen=True, slots=True)
class Ranking:
    """``accepted``: best first by expected dollars. ``rejected``: in input order."""

    accepted: list[RankedOffer]
    rejected: list[Rejection]

    @property
    def best(self) -> RankedOffer | None:
        return self.accepted[0] if self.accepted else None


# ---------------------------------------------------------------- search


def allocated_storage_gb(profile: Profile) -> float:
    """The ``allocated_storage`` a search must send: the disk the create call will ask for.

    Vast prices ``dph_total`` for this much storage, so the ranking compares
    what the instance will really bill.
    """
    return profile.disk_gb


def search_query(profile: Profile, *, broad: bool = False) -> dict[str, Any]:
    """The Vast search DSL for ``profile`` (the query object of ``POST /bundles/``).

    Memory in MB (GB x 1000), reliability 0-1, regions as 2-letter codes,
    GPU names with spaces. The base filters (rentable, not rented, not external)
    and ``verified`` are always explicit: a client that adds ``verified=true``
    for an absent field would otherwise drop unverified hosts from a profile
    that accepts them. ``broad`` keeps only those base filters (``verified``
    then matches both values), so that ``--explain`` sees the offers the profile
    rejects. The order is cheapest ``dph_total`` first, so that a search cut
    by ``limit`` keeps the cheap end, where the cost model's winner lies: its
    expected dollars are at least ``dph_total`` x (boot + use).
    """
    query: dict[str, Any] = {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "external": {"eq": False},
        "verified": {"eq": True} if profile.verified_only and not broad else {"in": [True, False]},
        "order": [list(o) for o in SEARCH_ORDER],
        "type": "on-demand",
        "allocated_storage": allocated_storage_gb(profile),
    }
    if broad:
        return query
    query["num_gpus"] = {"eq": profile.num_gpus}
    if profile.min_vram_gb > 0:
        query["gpu_ram"] = {"gte": profile.min_vram_gb * MB_PER_GB}
    if profile.min_cuda > 0:
        query["cuda_max_good"] = {"gte": profile.min_cuda}
    query["disk_space"] = {"gte": profile.disk_gb}
    if profile.max_price is not None:
        query["dph_total"] = {"lte": profile.max_price}
    if profile.min_reliability > 0:
        query["reliability"] = {"gte": profile.min_reliability}
    # inet_down 0 means unknown: the cost model cannot rank such an offer.
    query["inet_down"] = (
        {"gte": profile.min_inet_down_mbps} if profile.min_inet_down_mbps > 0 else {"gt": 0}
    )
    if profile.min_inet_up_mbps > 0:
        query["inet_up"] = {"gte": profile.min_inet_up_mbps}
    if profile.min_direct_ports > 0:
        query["direct_port_count"] = {"gte": profile.min_direct_ports}
    excluded = {n.casefold() for n in profile.exclude_gpu_names}
    if profile.gpu_names:
        query["gpu_name"] = {"in": [n for n in profile.gpu_names if n.casefold() not in excluded]}
    elif profile.exclude_gpu_names:
        query["gpu_name"] = {"notin": list(profile.exclude_gpu_names)}
    if profile.regions:
        query["geolocation"] = {"in": list(profile.regions)}
    elif profile.exclude_regions:
        query["geolocation"] = {"notin": list(profile.exclude_regions)}
    return query


# ---------------------------------------------------------------- the filter


_FMAX: Final = sys.float_info.max  # finite ceiling: inf and NaN fail every range test
# The slowest inet_down (Mb/s, 1 bit/s) that still gives a finite download time:
# below ~1e-299 Mb/s bytes x 8 / inet_down overflows, and a free offer's
# 0 $/h x inf is NaN, which would break the ranking's order.
_MIN_INET_DOWN: Final = 1e-6


class _Requirements:
    """A profile's thresholds, precomputed once so that checking an offer is a few compares.

    ``passes`` decides (short-circuit, for ``rank``); ``reasons`` explains (every
    failed requirement, for ``check`` and ``Rejection``). They test the same
    conditions, and a property test holds them to it: an offer passes exactly
    when it has no reason. A requirement the profile leaves at its neutral value
    (no GPU list, no region list, no blocklist, 0 Mb/s up, 0 ports) is not tested.
    """

    __slots__ = (
        "blocked",
        "exclude_gpus",
        "exclude_regions",
        "gpus",
        "gpus_text",
        "max_price",
        "min_cuda",
        "min_disk",
        "min_down",
        "min_ports",
        "min_rel",
        "min_up",
        "min_vram_mb",
        "num_gpus",
        "passes",
        "regions",
        "regions_text",
        "verified_only",
    )

    def __init__(self, profile: Profile, blocked_machines: Collection[int]) -> None:
        self.gpus = frozenset(n.casefold() for n in profile.gpu_names)
        self.gpus_text = ", ".join(profile.gpu_names)
        self.exclude_gpus = frozenset(n.casefold() for n in profile.exclude_gpu_names)
        self.min_vram_mb = profile.min_vram_gb * MB_PER_GB
        self.min_cuda = profile.min_cuda
        self.min_disk = profile.disk_gb
        self.max_price = _FMAX if profile.max_price is None else profile.max_price
        self.min_rel = profile.min_reliability
        self.min_down = profile.min_inet_down_mbps
        self.min_up = profile.min_inet_up_mbps
        self.min_ports = profile.min_direct_ports
        self.verified_only = profile.verified_only
        self.regions = frozenset(profile.regions)
        self.regions_text = ", ".join(profile.regions)
        self.exclude_regions = frozenset(profile.exclude_regions)
        self.num_gpus = profile.num_gpus
        self.blocked = frozenset(blocked_machines)
        self.passes: Callable[[Offer], bool] = self._make_passes()

    def _make_passes(self) -> Callable[[Offer], bool]:
        # Everything in locals (closure cells), the requirements that reject most
        # offers of a broad search first, and no field read for a neutral requirement.
        num_gpus, min_disk, min_rel = self.num_gpus, self.min_disk, self.min_rel
        min_vram_mb, min_cuda, max_price = self.min_vram_mb, self.min_cuda, self.max_price
        min_down, min_up, min_ports = self.min_down, self.min_up, self.min_ports
        verified_only, blocked = self.verified_only, self.blocked
        gpus, exclude_gpus = self.gpus, self.exclude_gpus
        regions, exclude_regions = self.regions, self.exclude_regions
        check_gpu = bool(gpus or exclude_gpus)
        check_region = bool(regions or exclude_regions)

        def passes(o: Offer) -> bool:
            if not (
                o.num_gpus == num_gpus
                and o.disk_space >= min_disk
                and o.reliability >= min_rel
                and (not verified_only or o.verification == "verified")
                and 0.0 <= o.dph_total <= max_price
                and o.gpu_ram >= min_vram_mb
                and o.cuda_max_good >= min_cuda
                and _MIN_INET_DOWN <= o.inet_down <= _FMAX
                and o.inet_down >= min_down
                and 0.0 <= o.inet_down_cost <= _FMAX
                and (not min_ports or o.direct_port_count >= min_ports)
                and (not min_up or o.inet_up >= min_up)
                and o.rentable
                and not o.rented
                and (not blocked or o.machine_id not in blocked)
            ):
                return False
            if check_gpu:
                name = o.gpu_name.casefold()
                if (gpus and name not in gpus) or name in exclude_gpus:
                    return False
            if check_region:
                geo = o.geolocation
                code = geo.rsplit(",", 1)[-1].strip().upper() if geo else ""
                if (regions and code not in regions) or code in exclude_regions:
                    return False
            return True

        return passes

    def reasons(self, o: Offer) -> list[str]:
        """Every requirement ``o`` fails, as a sentence; empty when it passes."""
        out: list[str] = []
        if not o.rentable or o.rented:
            out.append("offer is no longer rentable")
        if self.blocked and o.machine_id in self.blocked:
            out.append(f"machine {o.machine_id} is blocklisted")
        if o.num_gpus != self.num_gpus:
            out.append(f"{o.num_gpus} GPUs, the profile wants {self.num_gpus}")
        if self.gpus or self.exclude_gpus:
            name = o.gpu_name.casefold()
            if self.gpus and name not in self.gpus:
                out.append(f"GPU {o.gpu_name or '(unknown)'} is not one of {self.gpus_text}")
            if name in self.exclude_gpus:
                out.append(f"GPU {o.gpu_name} is excluded")
        if not o.gpu_ram >= self.min_vram_mb:
            out.append(f"VRAM {o.gpu_ram / MB_PER_GB:.1f} GB < {self.min_vram_mb / MB_PER_GB:g} GB")
        if not o.cuda_max_good >= self.min_cuda:
            out.append(f"CUDA {o.cuda_max_good:g} < {self.min_cuda:g}")
        if not o.disk_space >= self.min_disk:
            out.append(f"disk {o.disk_space:.0f} GB < {self.min_disk:g} GB")
        dph = o.dph_total
        if not 0.0 <= dph <= _FMAX:
            out.append(f"price {dph} $/h is not a valid price")
        elif dph > self.max_price:
            out.append(f"price ${dph:.3f}/h > ${self.max_price:g}/h")
        if not o.reliability >= self.min_rel:
            out.append(f"reliability {o.reliability:.3f} < {self.min_rel:g}")
        down = o.inet_down
        if not _MIN_INET_DOWN <= down <= _FMAX:
            out.append(f"inet down {down:g} Mb/s: no download time to estimate")
        elif down < self.min_down:
            out.append(f"inet down {down:.0f} Mb/s < {self.min_down:g} Mb/s")
        if self.min_up and not o.inet_up >= self.min_up:
            out.append(f"inet up {o.inet_up:.0f} Mb/s < {self.min_up:g} Mb/s")
        cost = o.inet_down_cost
        if not 0.0 <= cost <= _FMAX:
            out.append(f"bandwidth price {cost:g} $/GB is not a valid price")
        if self.min_ports and o.direct_port_count < self.min_ports:
            out.append(f"{o.direct_port_count} direct ports < {self.min_ports}")
        if self.verified_only and o.verification != "verified":
            out.append(f"host is {o.verification or 'not verified'}, the profile wants verified")
        if self.regions or self.exclude_regions:
            geo = o.geolocation
            code = geo.rsplit(",", 1)[-1].strip().upper() if geo else ""
            if self.regions and code not in self.regions:
                out.append(f"region {code or '(unknown)'} is not one of {self.regions_text}")
            if code in self.exclude_regions:
                out.append(f"region {code} is excluded")
        return out


def check(offer: Offer, profile: Profile, *, blocked_machines: Collection[int] = ()) -> list[str]:
    """Every requirement of ``profile`` that ``offer`` fails, each as a reason; [] = accepted."""
    return _Requirements(profile, blocked_machines).reasons(offer)


# ---------------------------------------------------------------- the cost model


def estimate(offer: Offer, profile: Profile) -> CostEstimate:
    """The cost model for one offer. ``offer.inet_down`` must be a speed (``check`` says so)."""
    if not offer.inet_down >= _MIN_INET_DOWN:
        raise ValueError(f"offer {offer.id} has no inet_down: its download time is unknown")
    return _estimate(
        offer.dph_total,
        offer.inet_down,
        offer.inet_down_cost,
        profile.boot_seconds,
        profile.use_seconds,
        profile.download_bytes,
    )


def _estimate(
    dph: float, inet_down: float, cost_per_gb: float, boot_s: float, use_s: float, nbytes: int
) -> CostEstimate:
    download_s = nbytes * 8 / (inet_down * 1e6)
    ready_s = boot_s + download_s  # rank() repeats this arithmetic inline; keep them in step
    bandwidth = cost_per_gb * nbytes / GB
    to_ready = dph * ready_s / 3600 + bandwidth
    return CostEstimate(
        dph=dph,
        boot_s=boot_s,
        download_s=download_s,
        minutes_to_ready=ready_s / 60,
        dollars_to_ready=to_ready,
        bandwidth_dollars=bandwidth,
        expected_dollars=to_ready + dph * use_s / 3600,
    )


# ---------------------------------------------------------------- ranking


def rank(
    offers: Iterable[Offer],
    profile: Profile,
    *,
    blocked_machines: Collection[int] = (),
    limit: int | None = None,
) -> Ranking:
    """Split ``offers`` into accepted (cheapest expected dollars first) and rejected (with reasons).

    The order is total: expected dollars, then ``dph_total``, then offer id.
    ``limit`` cuts the accepted list (the rejected one is always complete).
    One pass; the estimate objects are built only for what is returned.
    """
    req = _Requirements(profile, blocked_machines)
    passes = req.passes
    boot_s, use_s, nbytes = profile.boot_seconds, profile.use_seconds, profile.download_bytes
    bits = nbytes * 8
    keyed: list[tuple[float, float, int, int]] = []
    kept: list[Offer] = []
    rejected: list[Rejection] = []
    for o in offers:
        if not passes(o):
            rejected.append(Rejection(o, req))
            continue
        dph = o.dph_total
        # The same operations, in the same order, as _estimate: the sort key is
        # bit for bit the expected_dollars the caller sees.
        expected = (
            dph * (boot_s + bits / (o.inet_down * 1e6)) / 3600 + o.inet_down_cost * nbytes / GB
        ) + dph * use_s / 3600
        # The position makes every key distinct, so offers are never compared.
        keyed.append((expected, dph, o.id, len(kept)))
        kept.append(o)
    keyed.sort()
    if limit is not None:
        keyed = keyed[: max(0, limit)]
    accepted = []
    for _, dph, _, i in keyed:
        o = kept[i]
        accepted.append(
            RankedOffer(o, _estimate(dph, o.inet_down, o.inet_down_cost, boot_s, use_s, nbytes))
        )
    return Ranking(accepted=accepted, rejected=rejected)


def usual_pick(
    offers: Iterable[Offer],
    profile: Profile,
    *,
    blocked_machines: Collection[int] = (),
) -> RankedOffer | None:
    """The seeds' rule, the baseline: the cheapest ``dph_total`` that passes (ties: lower id)."""
    passes = _Requirements(profile, blocked_machines).passes
    best: Offer | None = None
    for o in offers:
        if not passes(o):
            continue
        if best is None or (o.dph_total, o.id) < (best.dph_total, best.id):
            best = o
    if best is None:
        return None
    return RankedOffer(best, estimate(best, profile))
