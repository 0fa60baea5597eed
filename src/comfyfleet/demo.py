"""``comfyfleet demo``: the whole flow on the embedded defaults, no account, no network.

It starts the Vast.ai simulator on loopback, then drives it with the same
client and ranking code that talk to the real marketplace: rank offers for the
example profile, rent the best, follow it to ``running``, read its logs,
destroy it and show what it cost. Later stages (provisioning, pool, jobs) join
this same demo as they land.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rich.console import Console

from comfyfleet.clock import ScaledClock
from comfyfleet.errors import ComfyfleetError
from comfyfleet.market import create_request_for, new_label, rank_for
from comfyfleet.offers import usual_pick
from comfyfleet.profiles import load_fleet
from comfyfleet.providers.vast import VastClient
from comfyfleet.sim.vast import RunningSim, SimConfig
from comfyfleet.views import instances_table, offers_table, ranked_row

DEMO_KEY = "demo-key"
# Simulated seconds per real second: a few minutes of boot pass in seconds.
DEMO_CLOCK_SPEED = 60.0
READY_TIMEOUT_S = 60.0


async def run_demo(console: Console, *, config: Path, profile_name: str, seed: int) -> None:
    profile = load_fleet(config).get(profile_name)
    sim_config = SimConfig(seed=seed, offers=600, api_key=DEMO_KEY, credit=50.0)
    with RunningSim(sim_config, clock=ScaledClock(DEMO_CLOCK_SPEED)) as sim:
        console.rule("[bold]comfyfleet demo")
        console.print(f"Vast.ai simulator listening on {sim.url} (clock x{DEMO_CLOCK_SPEED:g})")
        async with VastClient(DEMO_KEY, sim.url) as client:
            user = await client.current_user()
            credit_before = user.credit
            console.print(f"Account {user.id}: credit ${credit_before:.2f}\n")

            console.rule(f"1. Rank offers for profile '{profile_name}' from {config}")
            ranking = await rank_for(client, profile, explain=True)
            rows = [ranked_row(i + 1, r) for i, r in enumerate(ranking.accepted[:8])]
            console.print(
                offers_table(
                    rows,
                    f"{len(ranking.accepted)} offers pass, {len(ranking.rejected)} rejected",
                )
            )
            if not ranking.accepted:
                raise ComfyfleetError("the simulator's catalog has no offer for this profile")
            best = ranking.accepted[0]
            naive = usual_pick([r.offer for r in ranking.accepted], profile)
            if naive is not None and naive.offer.id != best.offer.id:
                console.print(
                    f"The cheapest $/h offer ({naive.offer.id}, ${naive.offer.dph_total:.3f}/h, "
                    f"{naive.offer.inet_down:.0f} Mb/s) would take "
                    f"{naive.estimate.minutes_to_ready:.0f} min and "
                    f"${naive.estimate.dollars_to_ready:.3f} to get ready; the top pick takes "
                    f"{best.estimate.minutes_to_ready:.0f} min and "
                    f"${best.estimate.dollars_to_ready:.3f}."
                )
            for rejection in ranking.rejected[:3]:
                console.print(
                    f"  rejected {rejection.offer.id} ({rejection.offer.gpu_name}): "
                    + "; ".join(rejection.reasons)
                )

            console.rule(f"2. Rent offer {best.offer.id}")
            label = new_label(profile_name)
            instance_id = await client.create_instance(
                best.offer.id, create_request_for(profile, label)
            )
            console.print(f"Instance {instance_id} created with label {label}")

            console.rule("3. Follow it until it runs")
            deadline = time.monotonic() + READY_TIMEOUT_S
            last = None
            with console.status("waiting for the instance") as status:
                while True:
                    inst = await client.get_instance(instance_id)
                    state = (inst.actual_status, inst.status_msg)
                    if state != last:
                        console.print(
                            f"  status {inst.actual_status or '(none yet)'}: "
                            f"{inst.status_msg or ''}"
                        )
                        last = state
                    status.update(f"instance {instance_id}: {inst.actual_status or 'requested'}")
                    if inst.actual_status == "running":
                        break
                    if time.monotonic() > deadline:
                        await client.destroy_instance(instance_id)
                        raise ComfyfleetError(
                            f"instance {instance_id} did not reach running in time; destroyed it"
                        )
                    await asyncio.sleep(0.25)
            console.print(instances_table([inst]))

            console.rule("4. Its logs")
            text = await client.instance_logs(instance_id, tail=20)
            console.print(text.rstrip() or "(empty)", highlight=False, markup=False)

            console.rule("5. Destroy it")
            await client.destroy_instance(instance_id)
            remaining = [i for i in await client.list_instances() if i.id == instance_id]
            console.print(
                f"Destroyed instance {instance_id}; still listed: {'yes' if remaining else 'no'}"
            )
            user = await client.current_user()
            console.print(
                f"Credit ${user.credit:.4f} (spent ${credit_before - user.credit:.4f} "
                "of simulated time)"
            )
        console.rule("[bold green]demo finished")
