"""``comfyfleet dropbox``: share a Dropbox workspace folder with instances."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from comfyfleet.clikit import console, err_console, friendly

app = typer.Typer(help="Dropbox workspace transfer.", no_args_is_help=True)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} B"


@app.command("links")
@friendly
def links(
    folder: Annotated[
        str,
        typer.Argument(
            help="The Dropbox folder to share, e.g. /YourModels.",
            envvar="DROPBOX_FOLDER",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The links file to write; its base64 form goes to the same name + .b64.",
        ),
    ] = Path("dropbox_links.txt"),
    prefix: Annotated[
        str,
        typer.Option(
            "--prefix",
            help="Put the files under this path of the workspace (e.g. models/loras).",
        ),
    ] = "",
) -> None:
    """Share every file under FOLDER and write the links that rebuild it in a workspace.

    Lists the folder recursively with the Dropbox SDK, creates a shared link for each
    file (or reuses the existing one) and writes the links file: one line per file,
    its path below FOLDER (the path in the workspace), its direct link, size and
    content hash. The base64 form of that file travels to an instance in
    PROVISION_DROPBOX_LINKS_B64.

    Needs DROPBOX_TOKEN, an access token of a Dropbox app with the scopes
    files.metadata.read, sharing.read and sharing.write. DROPBOX_API_URL points
    the SDK at another server (the simulator).
    """
    from comfyfleet.agent.sources import LINKS_ENV_VAR
    from comfyfleet.dropbox import DropboxFile, share_folder_to_files, token_from_env

    token_from_env()  # before any output: a missing token is one line, nothing else
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"sharing {folder}", total=None)

        def step(done: int, total: int, f: DropboxFile) -> None:
            bar.update(task, completed=done, total=total, description=str(f.relative))

        written = share_folder_to_files(folder, out, prefix=prefix, progress=step)
    console.print(
        f"Shared {written.links} file{'s' if written.links != 1 else ''} "
        f"({_human(written.total_bytes)}) from {folder}.",
        highlight=False,
    )
    console.print(f"Links file: {written.path}", highlight=False, soft_wrap=True)
    console.print(
        f"Base64 form ({written.b64_chars} characters): {written.b64_path}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f'Pass it to an instance: export {LINKS_ENV_VAR}="$(cat {written.b64_path})"',
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    if not written.fits_in_env:
        err_console.print(
            f"[yellow]warning:[/] the base64 form is {written.b64_chars} characters, more "
            "than one environment variable can hold on Linux (128 KiB): ship the links "
            "file itself, or share fewer files per folder",
            highlight=False,
            soft_wrap=True,
        )
