"""How long ranking a large search result takes: ``offers.rank`` over 20,000 offers.

The offers are the simulator's catalog (``sim.vast.generate_offers``, seed 7),
priced for the profile's ``allocated_storage`` as a search would price them and
validated into typed ``Offer`` values once, outside the timing. The profile is
the example fleet's ``default`` (VRAM >= 16 GB, CUDA >= 12, <= $3/h, reliability
>= 0.95, excluded regions and GPUs...), so most offers are rejected and the rest
are estimated and sorted: the work of ``comfyfleet offers`` on a broad search.

Baseline, measured in the same run on the same offers: ``offers.usual_pick``,
the seeds' rule (one pass of the same filter, keeping the cheapest $/h). The
ratio says what the cost model and the full ordering add to filtering alone.
Each is timed ``RUNS`` times; the medians are printed. ``BENCH_OFFERS_N`` and
``BENCH_OFFERS_RUNS`` change the sizes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from comfyfleet.offers import rank, usual_pick
from comfyfleet.profiles import load_fleet
from comfyfleet.providers.base import Offer
from comfyfleet.sim.vast import generate_offers, price_offer

REPO = Path(__file__).resolve().parent.parent
N = int(os.environ.get("BENCH_OFFERS_N", "20000"))
RUNS = int(os.environ.get("BENCH_OFFERS_RUNS", "15"))
TARGET_MS = 100.0


def median_ms(work: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def main() -> int:
    profile = load_fleet(REPO / "examples" / "fleet.yaml").get("default")
    offers = [
        Offer.model_validate(price_offer(row, profile.disk_gb)) for row in generate_offers(7, N)
    ]
    ranking = rank(offers, profile)
    if not ranking.accepted:
        print("no offer passes the profile: nothing to rank", file=sys.stderr)
        return 1
    rank(offers, profile)  # warm-up
    ranking_ms = median_ms(lambda: rank(offers, profile))
    usual_ms = median_ms(lambda: usual_pick(offers, profile))
    print(
        f"{N} offers, profile 'default': {len(ranking.accepted)} pass, "
        f"{len(ranking.rejected)} rejected; median of {RUNS} runs"
    )
    print(f"  usual rule (filter + cheapest $/h): {usual_ms:.1f} ms")
    print(
        f"  rank (filter + cost model + order): {ranking_ms:.1f} ms ({ranking_ms / usual_ms:.1f}x)"
    )
    print(f"bench offers-ranking: {ranking_ms:.1f} ms (target < {TARGET_MS:g})")
    return 0 if ranking_ms < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
