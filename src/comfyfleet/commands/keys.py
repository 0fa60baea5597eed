"""``comfyfleet keys``: the user API keys of the jobs API (create, list, revoke).

A key (``cf_...``) lets its holder submit jobs to ``/api/jobs`` and see only the jobs it
submitted. The commands open the control plane's store directly, as ``audit`` does (no
server needed): SQLite under the data directory, or PostgreSQL when ``DATABASE_URL`` is
set. The store keeps each key's hash and first characters only, so ``create`` shows the
key once, and nothing can show it again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from comfyfleet.clikit import console, err_console, friendly

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from comfyfleet.store.models import ApiKeyRow

__all__ = ["app"]

T = TypeVar("T")

app = typer.Typer(
    help="User API keys for the jobs API (/api/jobs): create, list, revoke.\n\n"
    "They are kept in the control plane's store (SQLite under $COMFYFLEET_DATA_DIR, or "
    "$DATABASE_URL): run these where `comfyfleet serve` runs, or with its DATABASE_URL.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _in_store(work: Callable[[Session], T]) -> T:
    """``work`` in one transaction of the store (migrated first if it is behind)."""
    from comfyfleet.store.db import Store

    store = Store.open(migrate=True)
    try:
        return store.run_sync(work)
    finally:
        store.close()


def _now() -> float:
    from comfyfleet.clock import SystemClock

    return SystemClock().now()


def _time(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _row(row: ApiKeyRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": _time(row.created_at),
        "last_used_at": _time(row.last_used_at),
        "revoked_at": _time(row.revoked_at),
    }


@app.command("create")
@friendly
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key (1 to 64 characters).")],
    as_json: JsonOption = False,
) -> None:
    """Make a new key and print it: it is shown this once, never again.

    The key goes to stdout alone (KEY=$(comfyfleet keys create ci)); what it is for goes
    to stderr. Send it as `Authorization: Bearer <key>`.
    """
    from comfyfleet.store.apikeys import create_key

    now = _now()

    def work(session: Session) -> tuple[dict[str, Any], str]:
        row, key = create_key(session, name, now=now)
        return _row(row), key

    shown, key = _in_store(work)
    if as_json:
        console.print_json(json.dumps({**shown, "key": key}))
    else:
        err_console.print(
            f"Created API key {shown['id']} ({escape(shown['name'])}), prefix {shown['prefix']}:",
            highlight=False,
        )
        sys.stdout.write(key + "\n")
        sys.stdout.flush()
    err_console.print(
        "[bold yellow]This key is not shown again:[/] comfyfleet keeps only its hash. Store "
        f"it now; if it is lost, revoke it (`comfyfleet keys revoke {shown['id']}`) and "
        "create another.",
        highlight=False,
        soft_wrap=True,
    )


@app.command("list")
@friendly
def list_(
    include_revoked: Annotated[
        bool, typer.Option("--revoked/--no-revoked", help="Show the revoked keys too.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """List the keys: id, name, prefix, when made, last used, revoked (never the key)."""
    from comfyfleet.store.apikeys import list_keys

    rows = _in_store(
        lambda session: [_row(r) for r in list_keys(session, include_revoked=include_revoked)]
    )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("No API keys. Make one with `comfyfleet keys create NAME`.")
        return
    from rich.table import Table

    table = Table(title="API keys", header_style="bold cyan", title_justify="left")
    for header in ("id", "name", "prefix", "created (UTC)", "last used (UTC)", "revoked (UTC)"):
        table.add_column(header, justify="right" if header == "id" else "left")
    for row in rows:
        table.add_row(
            str(row["id"]),
            escape(row["name"]),
            row["prefix"] + "…",
            row["created_at"],
            row["last_used_at"] or "never",
            row["revoked_at"] or "",
            style="dim" if row["revoked_at"] else None,
        )
    console.print(table)


@app.command("revoke")
@friendly
def revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (`comfyfleet keys list`).")],
) -> None:
    """Revoke a key: the API refuses it from now on. Its jobs stay, and keep running."""
    from comfyfleet.store.apikeys import revoke_key

    now = _now()

    def work(session: Session) -> tuple[dict[str, Any], bool]:
        row = revoke_key(session, key_id, now=now)
        return _row(row), row.revoked_at == now

    shown, just_now = _in_store(work)
    what = f"API key {shown['id']} ({escape(shown['name'])}, {shown['prefix']}…)"
    if just_now:
        console.print(f"Revoked {what}: the API refuses it from now on.", highlight=False)
    else:
        console.print(f"{what} was already revoked at {shown['revoked_at']}.", highlight=False)
