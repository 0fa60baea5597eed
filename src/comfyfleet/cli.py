"""The ``comfyfleet`` command line.

Every command is a thin shell over the library: it loads settings and the
fleet file, calls the provider, and renders the result as a Rich table or as
JSON. A user's mistake (a bad fleet file, a missing key) ends in one red line
and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from comfyfleet import __version__
from comfyfleet.clikit import console, err_console, friendly, run
from comfyfleet.commands import agent as agent_commands
from comfyfleet.commands import dropbox as dropbox_commands
from comfyfleet.commands import fleet as fleet_commands
from comfyfleet.commands import keys as keys_commands
from comfyfleet.commands import manifest as manifest_commands
from comfyfleet.commands import run as run_commands
from comfyfleet.commands.connect import connect
from comfyfleet.commands.serve import serve
from comfyfleet.config import find_fleet_file
from comfyfleet.market import rank_for, rent_best
from comfyfleet.offers import RankedOffer, Ranking
from comfyfleet.profiles import Profile, load_fleet
from comfyfleet.providers.base import Instance
from comfyfleet.providers.vast import VastClient
from comfyfleet.views import instance_row, instances_table, offers_table, ranked_row

app = typer.Typer(
    name="comfyfleet",
    help=(
        "Run ComfyUI on rented Vast.ai GPUs.\n\n"
        "Profiles live in fleet.yaml (see examples/fleet.yaml). The API key comes from "
        "VAST_API_KEY or the official CLI's key file; VAST_URL points at another server, "
        "such as the local simulator started by `comfyfleet sim vast`."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
sim_app = typer.Typer(help="Local simulators that speak the real protocols.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(manifest_commands.app, name="manifest")
app.add_typer(agent_commands.app, name="agent")
agent_commands.app.command("connect")(connect)
app.command("serve")(serve)
app.command("up")(fleet_commands.up)
app.command("monitor")(fleet_commands.monitor)
app.command("pool")(fleet_commands.pool)
app.command("audit")(fleet_commands.audit)
app.command("run")(run_commands.run)
app.add_typer(dropbox_commands.app, name="dropbox")
app.add_typer(keys_commands.app, name="keys")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Fleet file with the profiles. Default: $COMFYFLEET_CONFIG, ./fleet.yaml, "
        "~/.config/comfyfleet/fleet.yaml.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ProfileOption = Annotated[
    str, typer.Option("--profile", "-p", help="Profile name in the fleet file.")
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log every provider call to stderr.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"comfyfleet {__version__}")
        raise typer.Exit()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---------------------------------------------------------------- helpers


def load_profile(config: Path | None, name: str) -> Profile:
    path = find_fleet_file(config)
    return load_fleet(path).get(name)


def make_client() -> VastClient:
    """The Vast.ai client, with the key and URL from the environment (VAST_URL, VAST_API_KEY)."""
    return VastClient.from_env()


# ---------------------------------------------------------------- commands


@app.command()
@friendly
def offers(
    profile: ProfileOption,
    config: ConfigOption = None,
    explain: Annotated[
        bool,
        typer.Option("--explain", help="Also list the rejected offers, each with its reasons."),
    ] = False,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Rows to show.")] = 20,
) -> None:
    """Rank the marketplace's offers for a profile by what a ready instance really costs.

    The cost of an offer is $/h x (boot + download of the profile's models at the
    offer's inet_down + expected use) + inet_down_cost x GB downloaded. The
    cheapest $/h is rarely the cheapest way to a ready ComfyUI.
    """
    prof = load_profile(config, profile)

    async def go() -> Ranking:
        async with make_client() as client:
            return await rank_for(client, prof, explain=explain)

    ranking = run(go())
    rows = [ranked_row(i + 1, item) for i, item in enumerate(ranking.accepted[:limit])]
    rejected: list[dict[str, Any]] = [
        {"offer_id": r.offer.id, "gpu": r.offer.gpu_name, "reasons": list(r.reasons)}
        for r in ranking.rejected
    ]
    if as_json:
        payload: dict[str, Any] = {
            "profile": profile,
            "accepted": len(ranking.accepted),
            "offers": rows,
        }
        if explain:
            payload["rejected"] = rejected
        console.print_json(json.dumps(payload))
        return
    console.print(
        offers_table(
            rows,
            f"Offers for profile '{profile}': {len(ranking.accepted)} pass, "
            f"{len(ranking.rejected)} rejected (showing {len(rows)})",
        )
    )
    if explain and rejected:
        table = Table(title="Rejected offers", header_style="bold yellow", title_justify="left")
        table.add_column("offer", justify="right")
        table.add_column("GPU")
        table.add_column("why")
        for r in rejected:
            table.add_row(str(r["offer_id"]), str(r["gpu"]), "; ".join(r["reasons"]))
        console.print(table)
    if not rows:
        err_console.print("[yellow]No offer passes this profile's requirements.[/]")
        if not explain:
            err_console.print("Run again with --explain to see why each offer was rejected.")


@app.command()
@friendly
def rent(
    profile: ProfileOption,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rent the best-ranked offer for a profile and print the new instance's id.

    The instance carries a unique label (comfyfleet-PROFILE-...), so a create
    whose answer was lost is found and adopted instead of renting twice.
    """
    prof = load_profile(config, profile)

    async def go() -> tuple[RankedOffer, Instance]:
        async with make_client() as client:
            return await rent_best(client, prof, profile)

    chosen, inst = run(go())
    if as_json:
        console.print_json(
            json.dumps({"offer": ranked_row(1, chosen), "instance": instance_row(inst)})
        )
        return
    console.print(
        f"Rented offer {chosen.offer.id} ({chosen.offer.gpu_name}, "
        f"${chosen.offer.dph_total:.3f}/h): instance [bold]{inst.id}[/] label {inst.label}"
    )


@app.command()
@friendly
def instances(as_json: JsonOption = False) -> None:
    """List your instances with their status, ports and status message."""

    async def go() -> list[Instance]:
        async with make_client() as client:
            return await client.list_instances()

    found = run(go())
    if as_json:
        console.print_json(json.dumps([instance_row(i) for i in found]))
        return
    if not found:
        console.print("No instances.")
        return
    console.print(instances_table(found))


@app.command()
@friendly
def show(
    instance_id: Annotated[int, typer.Argument(help="Instance (contract) id.")],
    as_json: JsonOption = False,
) -> None:
    """Show one instance."""

    async def go() -> Instance:
        async with make_client() as client:
            return await client.get_instance(instance_id)

    inst = run(go())
    if as_json:
        console.print_json(inst.model_dump_json())
        return
    console.print(instances_table([inst]))


@app.command()
@friendly
def destroy(
    instance_id: Annotated[int, typer.Argument(help="Instance (contract) id.")],
) -> None:
    """Destroy an instance: it stops billing, and its disk is gone for good."""

    async def go() -> None:
        async with make_client() as client:
            await client.destroy_instance(instance_id)

    run(go())
    console.print(f"Destroyed instance {instance_id}.")


@app.command()
@friendly
def logs(
    instance_id: Annotated[int, typer.Argument(help="Instance (contract) id.")],
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
) -> None:
    """Print an instance's logs (the provider uploads them, then we fetch the file)."""

    async def go() -> str:
        async with make_client() as client:
            return await client.instance_logs(instance_id, tail=tail)

    text = run(go())
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


@app.command()
@friendly
def account(as_json: JsonOption = False) -> None:
    """Show the account behind the API key, with its credit."""

    async def go() -> Any:
        async with make_client() as client:
            return await client.current_user()

    user = run(go())
    if as_json:
        console.print_json(user.model_dump_json())
        return
    console.print(f"user {user.id} {user.email or ''}: credit ${user.credit:.2f}")


@sim_app.command("vast")
@friendly
def sim_vast(
    port: Annotated[
        int, typer.Option("--port", help="Port on 127.0.0.1 (0: any free port).")
    ] = 8765,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the offer catalog.")] = 0,
    offers_count: Annotated[
        int, typer.Option("--offers", min=1, help="Number of offers in the catalog.")
    ] = 400,
    clock_speed: Annotated[
        float,
        typer.Option("--clock-speed", min=0.001, help="Simulated seconds per real second."),
    ] = 1.0,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="The only key accepted. Without it any non-empty key is."),
    ] = None,
    credit: Annotated[float, typer.Option("--credit", help="Starting credit in $.")] = 100.0,
    fault: Annotated[
        list[str] | None,
        typer.Option("--fault", help="Inject a fault (repeatable); see the list below."),
    ] = None,
    run_onstart: Annotated[
        bool,
        typer.Option(
            "--run-onstart",
            help="Run each instance's onstart on this machine once it is running (the real "
            "agent, from this installation); kill it at destroy, stop or offline.",
        ),
    ] = False,
    workspace_root: Annotated[
        Path | None,
        typer.Option(
            "--workspace-root",
            file_okay=False,
            help="With --run-onstart: where instances' workspaces go, one folder per "
            "contract id (default: a temporary folder, removed at exit).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the Vast.ai simulator in the foreground, on 127.0.0.1 only.

    Point comfyfleet (or the official vastai CLI) at it with VAST_URL=http://127.0.0.1:PORT.
    """
    from comfyfleet.sim.vast import SimConfig, serve

    serve(
        SimConfig(
            seed=seed,
            offers=offers_count,
            clock_speed=clock_speed,
            api_key=api_key,
            credit=credit,
            faults=list(fault or []),
            run_onstart=run_onstart,
            workspace_root=workspace_root.expanduser().resolve() if workspace_root else None,
        ),
        port=port,
    )


@sim_app.command(
    "comfy",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def sim_comfy(ctx: typer.Context) -> None:
    """A ComfyUI-compatible server (HTTP + WebSocket) with a few image nodes.

    It takes ComfyUI's own flags (--listen 127.0.0.1 --port 8188 --base-directory DIR ...)
    plus faults for tests (--startup-delay, --crash-after, --fail-start,
    --vram-used-fraction, --missing-nodes). `comfyfleet sim comfy --help` lists them all.
    """
    from comfyfleet.sim.comfy import main as comfy_main

    raise typer.Exit(comfy_main(list(ctx.args)))


@app.command()
@friendly
def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="Fleet file for the demo.")] = Path(
        "examples/fleet.yaml"
    ),
    profile: Annotated[str, typer.Option("--profile", "-p")] = "default",
    seed: Annotated[int, typer.Option("--seed")] = 7,
) -> None:
    """Run the whole flow locally against the embedded simulator: no account, no network."""
    from comfyfleet.demo import run_demo

    run(run_demo(console, config=config, profile_name=profile, seed=seed))


def main() -> None:
    app()


__all__ = ["app", "main"]
