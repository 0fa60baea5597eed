"""The reconcile planner alone: one ``plan`` over 1,000 instances across 20 profiles.

The world is what a busy fleet looks like: per profile 50 instances (ready ones, some
idle past the TTL, busy, booting, downloading, draining, destroying, failed, a
rental in flight), the provider's listing of every contract plus orphans and other
fleets' contracts, and 200 rows destroyed earlier. The planner is timed alone (no
store, no provider): the median of ``BENCH_PLANNER_RUNS`` passes (default 50) after
a warm-up. The failure policy over the same 1,000 instances is printed beside it.
Target (issue 4): the planner under 50 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Final

from comfyfleet.pool.planner import ObservedInstance, ProviderContract, make_label, plan
from comfyfleet.pool.policy import (
    OK,
    Brakes,
    InstanceFacts,
    State,
    Verdict,
    assess,
    fleet_brakes,
)
from comfyfleet.profiles import PoolPolicy

TARGET_MS: Final = 50.0
RUNS: Final = int(os.environ.get("BENCH_PLANNER_RUNS", "50"))
PROFILES: Final = 20
PER_PROFILE: Final = 50
NOW: Final = 1_700_000_000.0
FLEET: Final = "bench"

# The states of one profile's 50 instances.
MIX: Final[list[State]] = (
    ["ready"] * 27
    + ["busy"] * 12
    + ["booting"] * 2
    + ["provisioning", "downloading", "downloading", "starting_app", "warming"]
    + ["draining", "destroying", "destroying", "requested"]
)
FAILED: Final = Verdict.fail("load_failed", 'the provider says "pull access denied"')


def world() -> tuple[dict[str, PoolPolicy], list[ObservedInstance], list[ProviderContract]]:
    desired: dict[str, PoolPolicy] = {}
    rows: list[ObservedInstance] = []
    contracts: list[ProviderContract] = []
    next_id = 1
    for p in range(PROFILES):
        name = f"profile{p:02d}"
        # Even profiles are short of min_ready (they rent), odd ones have idle extras.
        desired[name] = PoolPolicy(
            min_ready=38 if p % 2 == 0 else 20,
            max_instances=60,
            max_hourly_spend=60.0,
            idle_ttl_seconds=900,
        )
        assert len(MIX) == PER_PROFILE
        for slot, state in enumerate(MIX):
            instance_id = next_id
            next_id += 1
            contract_id = None if state == "requested" else 10_000_000 + instance_id
            rows.append(
                ObservedInstance(
                    id=instance_id,
                    profile=name,
                    slot=slot,
                    state=state,
                    state_since=NOW - (5 if state == "requested" else 60 * (slot + 1)),
                    dph_total=0.4 + 0.01 * slot,
                    contract_id=contract_id,
                    machine_id=50_000 + instance_id,
                    verdict=FAILED if slot in (3, 30) else OK,
                    idle_since=NOW - 2000 if slot % 5 == 0 else NOW - 30,
                    running_jobs=1 if state == "draining" else 0,
                )
            )
            if contract_id is not None:
                label = make_label(FLEET, instance_id)
                contracts.append(ProviderContract(contract_id, label, 0.5, name, "running"))
        for _ in range(10):  # rows destroyed earlier
            rows.append(ObservedInstance(next_id, name, 0, "destroyed", NOW - 86400))
            next_id += 1
    for i in range(20):  # orphans of this fleet, and contracts of another fleet
        contracts.append(ProviderContract(20_000_000 + i, make_label(FLEET, 900_000 + i), 0.5))
        contracts.append(ProviderContract(30_000_000 + i, f"cf-other-{i}", 0.5))
    return desired, rows, contracts


def facts_of(rows: list[ObservedInstance]) -> list[InstanceFacts]:
    return [
        InstanceFacts(
            state=r.state,
            state_since=r.state_since,
            control_plane_started_at=NOW - 86400,
            actual_status="running",
            actual_status_since=NOW - 3600,
            status_msg="",
            running_since=NOW - 3600,
            direct_port_start=-1,
            registered_at=NOW - 3500,
            last_heartbeat=NOW - 10,
            download_progress_at=NOW - 5,
        )
        for r in rows
        if r.state != "destroyed"
    ]


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    desired, rows, contracts = world()
    live = sum(1 for r in rows if r.state != "destroyed")
    rental_dph = {name: 0.5 for name in desired}
    brakes = Brakes()

    def one_pass() -> None:
        plan(
            desired,
            rows,
            NOW,
            fleet_id=FLEET,
            contracts=contracts,
            rental_dph=rental_dph,
            brakes=brakes,
        )

    actions = plan(desired, rows, NOW, fleet_id=FLEET, contracts=contracts, rental_dph=rental_dph)
    kinds: dict[str, int] = {}
    for action in actions:
        kinds[type(action).__name__] = kinds.get(type(action).__name__, 0) + 1
    print(
        f"world: {live} live instances across {len(desired)} profiles, {len(rows) - live} "
        f"destroyed rows, {len(contracts)} listed contracts"
    )
    print("actions: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))

    facts = facts_of(rows)

    def judge() -> None:
        for f in facts:
            assess(f, NOW)
        fleet_brakes(facts, NOW)

    print(f"failure policy over {len(facts)} instances: {median_ms(judge, RUNS):.2f} ms (median)")
    ms = median_ms(one_pass, RUNS)
    print(f"planner: median of {RUNS} passes")
    print(f"bench planner: {ms:.2f} ms (target < {TARGET_MS:.0f})")
    return 0 if ms < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
