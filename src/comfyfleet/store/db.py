"""Where the store lives, how to connect to it, and migrating it at start.

SQLite by default, a file under the data directory (``$COMFYFLEET_DATA_DIR``, else
``$XDG_DATA_HOME/comfyfleet``, else ``~/.local/share/comfyfleet``); PostgreSQL when
``DATABASE_URL`` is set (``postgres://`` and ``postgresql://`` both go through
psycopg 3). The schema is Alembic's, shipped in ``comfyfleet/store/migrations`` and
applied by ``migrate`` when the control plane starts.

Every SQLite transaction begins with ``BEGIN IMMEDIATE``: writers queue up on the
database lock (for up to 30 s) instead of failing half-way with "database is locked",
and transactions are serializable, as the lease and the slot rules assume. Within one
process the transactions on a SQLite file also take turns on a lock of the store's
(``Store.transaction``), and ``Store.run`` hands them to one writer thread
(``store/writer.py``), where those that queue up together may share a commit: SQLite has
one writer, and a transaction that found the database lock taken would sleep in
SQLite's busy handler (1 ms, then 2, 5... up to 100 ms, never woken when the lock
frees) holding a thread meanwhile. Commits are durable (``synchronous = FULL``): a
crash loses no transaction that was answered.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from comfyfleet.envvars import env_value
from comfyfleet.errors import ConfigError, StoreError, StoreUnavailable
from comfyfleet.store.writer import StoreWriter

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where it is used: it doubles the import time of the store, and
# most processes (the CLI reading the store) never migrate.

T = TypeVar("T")

DB_FILENAME = "comfyfleet.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
# Serializes concurrent ``migrate`` calls on one PostgreSQL database (two ``serve`` starting).
_MIGRATE_LOCK_KEY = 0x636F6D6679666C74  # "comfyflt"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory for comfyfleet's state (the SQLite store among it)."""
    if explicit := env_value(env, "COMFYFLEET_DATA_DIR"):
        return Path(explicit).expanduser()
    if xdg := env_value(env, "XDG_DATA_HOME"):
        return Path(xdg).expanduser() / "comfyfleet"
    home = env_value(env, "HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "comfyfleet"


def normalize_database_url(url: str) -> str:
    """``url`` with PostgreSQL mapped to psycopg 3; a scheme we do not support is refused.

    The message never repeats the URL: it may hold a password.
    """
    url = url.strip()
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("postgresql+", "sqlite:", "sqlite+")):
        return url
    raise ConfigError(
        "not a database URL comfyfleet supports: use postgresql://USER@HOST/DB "
        "(postgres:// is accepted too) or sqlite:///PATH",
        source="DATABASE_URL",
    )


def database_url(env: Mapping[str, str] | None = None) -> str:
    """The store's URL: ``$DATABASE_URL``, or the SQLite file under the data directory."""
    if explicit := env_value(env, "DATABASE_URL"):
        return normalize_database_url(explicit)
    return f"sqlite:///{data_dir(env) / DB_FILENAME}"


def describe_url(url: str | URL) -> str:
    """``url`` fit to show: the password is masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def create_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (default: ``database_url()``), set up for the store.

    For a SQLite file, its directory is created (mode 0700) when missing.
    """
    parsed = make_url(normalize_database_url(url) if url is not None else database_url())
    if parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return _sqlite_engine(parsed, echo=echo)
    return sa.create_engine(_with_idle_limit(parsed), echo=echo, pool_pre_ping=True)


#: PostgreSQL ends a session idle inside a transaction for this long (unless the URL's
#: ``options`` say otherwise): a process stopped mid-transaction, such as a stalled
#: reconciler holding its lease's lock, cannot hold the other replicas back for longer.
PG_IDLE_IN_TRANSACTION_MS: Final = 60_000


def _with_idle_limit(url: URL) -> URL:
    if url.get_backend_name() != "postgresql":
        return url
    options = url.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    if "idle_in_transaction_session_timeout" in options:
        return url
    limit = f"-cidle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_MS}"
    return url.update_query_dict({"options": f"{options} {limit}".strip()})


def _sqlite_engine(url: URL, *, echo: bool) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    options: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    }
    if in_memory:
        # One shared connection, or every checkout would see its own empty database.
        options["poolclass"] = StaticPool
    engine = sa.create_engine(url, echo=echo, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3's own transaction handling is switched off so that SQLAlchemy's
        # BEGIN (below) governs: real transactions, savepoints, transactional DDL.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                _use_wal(cursor)
                # SQLite's default, said out loud: WAL mode would allow NORMAL, which
                # may lose the last commits to a power cut.
                cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL (readers never wait on the writer); it sticks to the file.

    The switch needs the database to itself and SQLite answers "locked" at once,
    without the busy timeout, when another connection is open: wait for our turn.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for the shipped migrations (no ``alembic.ini`` needed).

    New revisions are made with it too:
    ``alembic.command.revision(alembic_config(url), "what changed", autogenerate=True)``.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates ``%``; a URL-encoded password holds some.
        config.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision the shipped migrations know."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the shipped migrations have no head revision"
    return head


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(target: str | Engine | None = None) -> None:
    """Bring the store's schema to the newest revision; a no-op when it is there already.

    ``target`` is a URL, an engine, or None for ``database_url()``. Safe to call from
    several processes at once: on PostgreSQL they take turns on an advisory lock, on
    SQLite on the database lock.
    """
    from alembic import command
    from alembic.util import CommandError

    engine = target if isinstance(target, Engine) else create_engine(target)
    try:
        with _unavailable_as_store_error(engine), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK_KEY}
                )
            config = alembic_config()
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, "head")
            except CommandError as error:
                # Typically a store migrated by a newer comfyfleet than this one.
                raise StoreError(
                    f"cannot migrate the store at {describe_url(engine.url)}: {error}; "
                    "if a newer comfyfleet migrated it, run that version"
                ) from error
    finally:
        if engine is not target:
            engine.dispose()


_run_migrations = migrate  # ``Store.open`` has a parameter of that name


@contextmanager
def _unavailable_as_store_error(engine: Engine) -> Iterator[None]:
    try:
        yield
    except OperationalError as error:
        where = describe_url(engine.url)
        hint = (
            "start PostgreSQL or fix DATABASE_URL"
            if engine.dialect.name == "postgresql"
            else "check that the data directory (COMFYFLEET_DATA_DIR) is writable"
        )
        detail = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise StoreUnavailable(f"cannot use the store at {where}: {detail}; {hint}") from error


_sqlite_turns: dict[str, threading.RLock] = {}
_sqlite_turns_guard = threading.Lock()


def _turns_for(engine: Engine) -> threading.RLock | None:
    """The lock the transactions on ``engine``'s SQLite file take turns on in this process
    (one per file, shared by every store open on it); None for PostgreSQL, where rows,
    not the database, are locked. Reentrant: a transaction opened inside another (on a
    second connection) waits on SQLite's lock, as it did before, rather than here."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if database in (None, "", ":memory:"):
        return threading.RLock()  # one connection, this store's own
    key = str(Path(database).resolve())
    with _sqlite_turns_guard:
        return _sqlite_turns.setdefault(key, threading.RLock())


class Store:
    """The store: an engine, sessions on it, and transactions for sync and async code.

    Repositories (``comfyfleet.store.instances`` and friends) take a ``Session`` and
    never commit: the caller's transaction decides what is written together.
    Sessions keep objects usable after commit (``expire_on_commit=False``), so a row
    read in a transaction can be handed to the rest of the program.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._turns = _turns_for(engine)
        self._writer: StoreWriter | None = None
        self._writer_guard = threading.Lock()

    @classmethod
    def open(cls, url: str | None = None, *, migrate: bool = True, echo: bool = False) -> Store:
        """Connect to ``url`` (default ``database_url()``) and, unless told not to, migrate."""
        engine = create_engine(url, echo=echo)
        if migrate:
            try:
                _run_migrations(engine)
            except BaseException:
                engine.dispose()
                raise
        return cls(engine)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back on error.

        Keep it short and never call a provider inside it: on SQLite it holds the
        database's write lock (and this process's turn on it).
        """
        if self._turns is None:
            with self.sessions.begin() as session:
                yield session
            return
        with self._turns, self.sessions.begin() as session:
            yield session

    def run_sync(self, work: Callable[[Session], T]) -> T:
        """``work(session)`` in one transaction; its return value."""
        with self.transaction() as session:
            return work(session)

    async def run(self, work: Callable[[Session], T], *, share_commit: bool = False) -> T:
        """``work(session)`` in one transaction, on a worker thread: the event loop never blocks.

        On SQLite the thread is the store's one writer thread: the transactions queue up
        for it and run back to back, and the default executor's threads stay free for
        file work (output uploads) instead of waiting on the database lock. With
        ``share_commit``, ``work`` may share its transaction and its commit with the
        others that queued up at the same time (``store/writer.py``); it must then have
        no effect outside its session, for it may run a second time. On PostgreSQL
        every work has a transaction of its own, on a thread of the default executor.
        """
        if self._turns is None:
            return await asyncio.to_thread(self.run_sync, work)
        future = self._writer_thread().submit(work, shared=share_commit)
        result: T = await asyncio.wrap_future(future)
        return result

    def _writer_thread(self) -> StoreWriter:
        with self._writer_guard:
            if self._writer is None:
                self._writer = StoreWriter(self.transaction, name="comfyfleet-store")
            return self._writer

    def close(self) -> None:
        with self._writer_guard:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self.engine.dispose()
