"""Shared fixtures: the project's simulators on loopback, and a clean CLI environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_FLEET = REPO / "examples" / "fleet.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no Vast key anywhere: HOME and XDG point at an empty folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAST", "COMFYFLEET")) and k not in {"HOME", "XDG_CONFIG_HOME"}
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        COLUMNS="200",
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``comfyfleet`` command as a user would."""
    return subprocess.run(
        [str(BIN / "comfyfleet"), *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def vast_sim() -> Iterator[object]:
    from comfyfleet.sim.vast import RunningSim, SimConfig

    with RunningSim(SimConfig(seed=11, offers=400, api_key="test-key-123")) as sim:
        yield sim


# ------------------------------------------------------------------ the store, twice
#
# ``store`` is a migrated, empty store on SQLite and again on PostgreSQL (the server on
# loopback: COMFYFLEET_TEST_DATABASE_URL or postgresql://postgres@127.0.0.1:5432/test).
# With PostgreSQL down the tests that use it fail and say to start it: never skipped.

PG_URL = os.environ.get("COMFYFLEET_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def shared_pg_schema() -> Iterator[tuple[Any, str, str]]:
    """A PostgreSQL schema migrated once per run (admin engine, schema, url); dropped at the end."""
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from comfyfleet.store.db import migrate, normalize_database_url

    admin = sa.create_engine(normalize_database_url(PG_URL), pool_pre_ping=True)
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except OperationalError as error:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_URL} ({str(error.orig).strip()}): start it "
            "or set COMFYFLEET_TEST_DATABASE_URL; these tests run on SQLite and on "
            "PostgreSQL and are never skipped.",
            pytrace=False,
        )
    schema = f"cf_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = (
        make_url(normalize_database_url(PG_URL))
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        migrate(url)
        yield admin, schema, url
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def shared_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from comfyfleet.store.db import migrate

    path = tmp_path_factory.mktemp("store-template") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def pg_url(shared_pg_schema: tuple[Any, str, str]) -> str:
    """The migrated PostgreSQL schema, emptied: its URL."""
    import sqlalchemy as sa

    from comfyfleet.store.models import Base

    admin, schema, url = shared_pg_schema
    tables = ", ".join(f'"{schema}".{t.name}' for t in Base.metadata.sorted_tables)
    with admin.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return url


def _sqlite_copy(template: Path, folder: Path) -> str:
    import shutil

    path = folder / "store.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A migrated store with no rows: a SQLite file, or the PostgreSQL schema emptied."""
    from comfyfleet.store.db import Store

    if request.param == "sqlite":
        url = _sqlite_copy(request.getfixturevalue("shared_sqlite_template"), tmp_path)
    else:
        url = request.getfixturevalue("pg_url")
    opened = Store.open(url, migrate=False)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, shared_sqlite_template: Path) -> Iterator[Any]:
    """The SQLite store alone, for what does not depend on the database."""
    from comfyfleet.store.db import Store

    opened = Store.open(_sqlite_copy(shared_sqlite_template, tmp_path), migrate=False)
    try:
        yield opened
    finally:
        opened.close()
