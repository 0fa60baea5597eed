"""``comfyfleet keys create|list|revoke``, run as a user runs them, on SQLite and PostgreSQL.

The command opens the store named by ``DATABASE_URL`` (the test's store); what it made is
checked with ``store.apikeys`` and against the jobs API served over the same store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from sqlalchemy.orm import Session

from comfyfleet.store import Store, verify_key
from tests.conftest import run_cli
from tests.test_api import served


def env_for(store: Store, clean_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    url = store.engine.url.render_as_string(hide_password=False)
    return {**clean_env, "DATABASE_URL": url, "COMFYFLEET_DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def env(store: Store, clean_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    yield env_for(store, clean_env, tmp_path)


@pytest.fixture
def sqlite_env(
    sqlite_store: Store, clean_env: dict[str, str], tmp_path: Path
) -> Iterator[dict[str, str]]:
    # What does not depend on the database runs once: each command costs a process.
    yield env_for(sqlite_store, clean_env, tmp_path)


def keys(env: dict[str, str], *args: str) -> CompletedProcess[str]:
    return run_cli("keys", *args, env=env)


def created(env: dict[str, str], name: str) -> str:
    result = keys(env, "create", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def verified_name(store: Store, key: str) -> str | None:
    def check(session: Session) -> str | None:
        row = verify_key(session, key, now=time.time())
        return None if row is None else str(row.name)

    return store.run_sync(check)


def test_create_prints_the_key_once_with_a_warning_and_the_key_verifies(
    store: Store, env: dict[str, str]
) -> None:
    result = keys(env, "create", "render bot")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("cf_") and len(key) > 40
    assert "\n" not in key  # the key alone on stdout: KEY=$(comfyfleet keys create NAME)
    assert "not shown again" in result.stderr
    assert "comfyfleet keys revoke 1" in result.stderr
    assert key not in result.stderr
    assert verified_name(store, key) == "render bot"

    as_json = keys(env, "create", "ci", "--json")
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["id"] == 2 and shown["name"] == "ci" and shown["key"].startswith(shown["prefix"])
    assert verified_name(store, shown["key"]) == "ci"


def test_list_shows_each_key_by_its_prefix_and_never_the_key(
    store: Store, env: dict[str, str]
) -> None:
    first, second = created(env, "alice"), created(env, "bob")
    verified_name(store, first)  # a use, recorded as last used

    table = keys(env, "list")
    assert table.returncode == 0, table.stderr
    for header in ("id", "name", "prefix", "created", "last used", "revoked"):
        assert header in table.stdout
    assert first[:11] in table.stdout and second[:11] in table.stdout
    assert first not in table.stdout and second not in table.stdout
    assert "never" in table.stdout  # bob's key was never used

    rows = json.loads(keys(env, "list", "--json").stdout)
    assert [(r["id"], r["name"], r["prefix"]) for r in rows] == [
        (1, "alice", first[:11]),
        (2, "bob", second[:11]),
    ]
    assert rows[0]["last_used_at"] is not None and rows[1]["last_used_at"] is None
    assert all(r["revoked_at"] is None for r in rows)
    assert "key" not in rows[0]


def test_a_revoked_key_is_refused_by_the_store_and_the_api(
    store: Store, env: dict[str, str], tmp_path: Path
) -> None:
    key = created(env, "alice")
    other = created(env, "bob")
    with served(store, tmp_path) as api:
        headers = {"Authorization": f"Bearer {key}"}
        assert api.http.get("/api/jobs", headers=headers).status_code == 200

        revoked = keys(env, "revoke", "1")
        assert revoked.returncode == 0, revoked.stderr
        assert "Revoked API key 1 (alice" in revoked.stdout
        assert verified_name(store, key) is None
        assert verified_name(store, other) == "bob"
        assert api.http.get("/api/jobs", headers=headers).status_code == 401

    again = keys(env, "revoke", "1")
    assert again.returncode == 0 and "already revoked" in again.stdout
    rows = json.loads(keys(env, "list", "--json").stdout)
    assert rows[0]["revoked_at"] is not None and rows[1]["revoked_at"] is None
    live = json.loads(keys(env, "list", "--no-revoked", "--json").stdout)
    assert [r["name"] for r in live] == ["bob"]


def test_mistakes_end_in_one_line_that_says_what_to_do(sqlite_env: dict[str, str]) -> None:
    env = sqlite_env
    empty = keys(env, "list")
    assert empty.returncode == 0 and "comfyfleet keys create NAME" in empty.stdout
    unknown = keys(env, "revoke", "99")
    assert unknown.returncode == 1
    assert "no API key 99" in unknown.stderr and "comfyfleet keys list" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    blank = keys(env, "create", "   ")
    assert blank.returncode == 1
    assert "1 to 64 characters" in blank.stderr and "Traceback" not in blank.stderr
    assert blank.stdout == ""
