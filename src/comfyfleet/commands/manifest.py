"""``comfyfleet manifest``: check a workspace manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from comfyfleet.clikit import console, err_console, friendly, run

app = typer.Typer(help="Workspace manifests: what a ComfyUI workspace holds.", no_args_is_help=True)


def human_bytes(n: int | None) -> str:
    """``6.46 GB``: decimal units, as download sizes are quoted."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns


@app.command()
@friendly
def check(
    file: Annotated[Path, typer.Argument(help="The manifest (YAML).", show_default=False)],
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace",
            "-w",
            help="Also check this workspace: symlinks, and files already in place "
            "(not counted in the total to download).",
            show_default=False,
        ),
    ] = None,
    no_resolve: Annotated[
        bool,
        typer.Option("--no-resolve", help="Only validate the file; ask no server anything."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Validate a manifest, resolve missing sizes and hashes from the sources, print the total.

    Sizes and sha256 come from Hugging Face's headers, Civitai's model-version API
    and the other sources' answers; nothing is downloaded. Exits 2 for an invalid
    manifest and 1 when a critical model has no source that resolves.
    """
    from comfyfleet.agent.provision import check_manifest
    from comfyfleet.manifest import load_manifest

    manifest = load_manifest(file)
    result = run(check_manifest(manifest, workspace=workspace, resolve=not no_resolve))
    if as_json:
        console.print_json(json.dumps({"manifest": str(file), **result.to_json()}))
    else:
        table = Table(title=f"{file}: {len(result.models)} models", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("target", overflow="fold")
        table.add_column("size", justify="right")
        table.add_column("sha256")
        table.add_column("critical")
        table.add_column("sources", overflow="fold")
        for m in result.models:
            size = human_bytes(m.size) + (" (source)" if m.size_from == "source" else "")
            sha = "?" if m.sha256 is None else m.sha256[:12] + "…"
            if m.sha256_from == "source":
                sha += " (source)"
            sources = []
            for s in m.sources:
                if not result.resolved:
                    sources.append(s.source)
                elif s.ok:
                    sources.append(f"[green]✓[/] {s.source}")
                else:
                    sources.append(f"[red]✗[/] {s.source}: {s.reason}")
            target = m.target or "?"
            if m.present:
                target += " [dim](present)[/]"
            table.add_row(
                str(m.index),
                target,
                size,
                sha,
                "yes" if m.critical else "no",
                "\n".join(sources),
            )
        console.print(table)
        unknown = len(result.unknown_sizes)
        line = (
            f"total to download: {human_bytes(result.to_download_bytes)} "
            f"({result.to_download_bytes} bytes) for {len(result.models)} models"
        )
        if result.to_download_bytes != result.total_bytes:
            line += f" (all models: {human_bytes(result.total_bytes)})"
        if unknown:
            line += f"; {unknown} size{'s' if unknown != 1 else ''} unknown"
        console.print(line, highlight=False)
        console.print(
            f"{result.custom_nodes} custom node{'s' if result.custom_nodes != 1 else ''}, "
            f"{len(manifest.workflows)} workflow{'s' if len(manifest.workflows) != 1 else ''}, "
            f"{len(manifest.pip)} extra pip package{'s' if len(manifest.pip) != 1 else ''}",
            highlight=False,
        )
    bad = result.unresolvable
    for m in bad:
        tag = "critical" if m.critical else "non-critical"
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in m.sources)
        err_console.print(
            f"[yellow]warning:[/] no source resolves for {tag} model {m.target or m.index}: "
            f"{reasons}",
            highlight=False,
            soft_wrap=True,
        )
    if not result.ok:
        names = ", ".join(str(m.target or f"models[{m.index}]") for m in bad if m.critical)
        err_console.print(f"[bold red]error:[/] critical models cannot be resolved: {names}")
        raise typer.Exit(1)
