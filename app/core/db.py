"""The async engine, statements run by the driver itself, and schema migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from sqlalchemy import Dialect, TextClause, event, exc, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from app.core import sqlite_connection

if TYPE_CHECKING:
    import asyncpg
    from alembic.config import Config as AlembicConfig

logger = logging.getLogger("livegate.db")

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Connections older than this are closed and replaced (PostgreSQL pool).
POOL_RECYCLE_SECONDS = 1800

# PostgreSQL keeps a plan for a prepared statement after its first runs, made for the
# table's size at the time, until the table is next analyzed. A batch joined on arrays
# whose plan was kept from a young `usage_logs` (a few rows: a new deployment's first
# minute) read the whole table at every batch as it grew, 1.8 ms per batch at 16,000
# rows, where by key it takes 0.1 ms. Planning each run costs about 0.09 ms.
PLAN_EACH_RUN = {"plan_cache_mode": "force_custom_plan"}

# Any fixed number: the lock that serializes migrations of instances starting together.
_PG_MIGRATION_LOCK = 0x6C697665


def async_database_url(url: str) -> str:
    """Accept the usual spellings and pick the async driver for each backend."""
    parsed = make_url(url)
    driver = {
        "sqlite": "sqlite+aiosqlite",
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
    }.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def create_engine(url: str, *, checkpoint_in_background: bool = False) -> AsyncEngine:
    """The engine for `url`. On SQLite, `checkpoint_in_background` leaves the WAL's
    checkpoints to a `WalCheckpointer` (a server's); without one the WAL would grow."""
    url = async_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30, "async_creator_fn": sqlite_connection.connect},
            # A failed statement's error, logged, would otherwise carry the values it
            # was given (password and key hashes, encrypted webhook secrets).
            hide_parameters=True,
        )
        on_connect = (
            _sqlite_on_connect_no_autocheckpoint if checkpoint_in_background else _sqlite_on_connect
        )
        event.listen(engine.sync_engine, "connect", on_connect)
        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path; recycling
    # connections and asyncpg's own errors on a dead one cover the same ground.
    return create_async_engine(
        url,
        pool_size=20,
        max_overflow=30,
        pool_recycle=POOL_RECYCLE_SECONDS,
        hide_parameters=True,  # as for SQLite
    )


def single_reads(engine: AsyncEngine) -> AsyncEngine:
    """The engine (same pool) for reads of one statement on the hot path.

    On PostgreSQL each runs in autocommit: no BEGIN and ROLLBACK round trips around
    it, and a single statement sees one snapshot anyway. SQLite's driver opens no
    transaction for a read in the first place.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


class DriverStatement:
    """A statement for the driver itself to run (see `DriverConnection`).

    SQLAlchemy compiles it, once: its SQL, the order of its parameters and their
    types' bind processing. For the statements of the hot path that commit on their
    own: SQLAlchemy's execution layer, and its `Connection` around a pooled connection,
    cost more CPU than asyncpg's whole work on such a statement (measured here, an
    earlier day: ~500 µs through `connect()` and `execute()`, ~140 µs run by the driver
    on a connection checked out for it).
    """

    def __init__(self, statement: TextClause, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._names: Sequence[str] = compiled.positiontup or ()
        self._processors: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(self._names):
            bind_type = compiled.binds[name].type
            processor = bind_type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors.append((i, processor))

    def arguments(self, params: Mapping[str, object]) -> list[object]:
        """The driver's positional arguments for `params`, bind processing applied."""
        args = [params[name] for name in self._names]
        for i, processor in self._processors:
            args[i] = processor(args[i])
        return args


class TransactionNeeded(Exception):
    """Raised by a check judging a start from its counters alone, with no connection
    to the database (see `DriverConnection.fetch_judged`), when what it found needs one:
    a counter to read for a refusal, an event to queue. The start then runs again in a
    transaction of SQLAlchemy's, where the check has its connection."""


class DriverConnection:
    """A connection of the engine's pool, held for the driver to run statements on, one
    batch at a time: `fetch` on PostgreSQL, `transaction` on SQLite.

    Checking a connection out of SQLAlchemy's pool and back in costs a greenlet each
    way and the pool's bookkeeping: a one-row SELECT took ~200 µs of CPU here with
    them and ~70 µs on a connection held. A group commit runs its statements one
    after another, so each holds a connection between them instead. Held or idle in
    the pool, the connection stays open all the same; it goes back once older than
    the pool's recycle age (to be replaced) and on `close`. The driver's errors come
    out as SQLAlchemy's `DBAPIError`, as from any other statement, and a connection
    lost or left in an unknown state is invalidated, as SQLAlchemy would, so the next
    call takes a new one.

    Calls on one `DriverConnection` wait for each other (asyncpg runs one statement at
    a time on a connection; SQLite one transaction).

    On PostgreSQL, `settings` are the session's while the connection is held (such as
    `PLAN_EACH_RUN`), reset before it goes back to the pool.
    """

    def __init__(self, engine: AsyncEngine, *, settings: Mapping[str, str] | None = None) -> None:
        self._driver_error: type[Exception]
        if engine.dialect.name == "postgresql":
            # Here, not at the top: a server on SQLite never loads asyncpg (~3 MiB).
            from asyncpg import PostgresError

            self._driver_error = PostgresError
        else:
            self._driver_error = sqlite3.Error
        self._engine = engine
        self._settings = dict(settings or {}) if engine.dialect.name == "postgresql" else {}
        self._lock = asyncio.Lock()
        self._held: PoolProxiedConnection | None = None
        self._held_since = 0.0

    async def fetch(
        self, statement: DriverStatement, params: Mapping[str, object]
    ) -> list[asyncpg.Record]:
        """PostgreSQL: run `statement` with `params`, committing on its own (no
        transaction is opened); the rows it returned."""
        args = statement.arguments(params)
        async with self._lock:
            connection = await self._connection()
            driver = connection.driver_connection
            assert driver is not None  # a connection checked out of the pool
            try:
                rows: list[asyncpg.Record] = await driver.fetch(statement.sql, *args)
            except self._driver_error as error:
                # The statement's own (the connection is fine: no transaction to
                # abort), or the server's goodbye.
                lost = driver.is_closed()
                if lost:
                    await self._invalidate()
                raise exc.DBAPIError(
                    statement.sql, None, error, connection_invalidated=lost
                ) from error
            except BaseException as error:
                # Lost, broken, or cancelled mid-statement: the connection's state is unknown.
                await self._lost(statement.sql, error)
            return rows

    async def fetch_judged(
        self,
        statement: DriverStatement,
        params: Mapping[str, object],
        judge: Callable[[list[asyncpg.Record]], Awaitable[T]],
    ) -> T:
        """PostgreSQL: run `statement` with `params` in a transaction, and commit it
        unless `judge`, given the rows the statement returned, raises; what `judge`
        returned. The transaction is rolled back when `judge` raises, and its error
        goes to the caller as it is (unless the ROLLBACK fails). Three round trips
        (BEGIN, the statement, COMMIT) and none of SQLAlchemy's Python around them.

        When the driver fails, the connection is invalidated: the server rolls back a
        transaction left open, and a COMMIT whose answer was lost may have been done
        all the same (the caller must treat the outcome as unknown).
        """
        args = statement.arguments(params)
        async with self._lock:
            connection = await self._connection()
            driver = connection.driver_connection
            assert driver is not None  # a connection checked out of the pool
            try:
                # Inside: `transaction()` itself refuses a connection found closed.
                transaction = driver.transaction()
                await transaction.start()
                rows: list[asyncpg.Record] = await driver.fetch(statement.sql, *args)
            except BaseException as error:
                await self._lost(statement.sql, error)
            try:
                verdict = await judge(rows)
            except BaseException as judged:
                try:
                    await transaction.rollback()
                except BaseException as error:
                    # Not the judge's error: a caller that would run the work again
                    # could wait on the locks of a session the server has yet to end.
                    await self._lost("ROLLBACK", error)
                raise judged
            try:
                await transaction.commit()
            except BaseException as error:
                await self._lost("COMMIT", error)
            return verdict

    async def _lost(self, sql: str, error: BaseException) -> NoReturn:
        """Invalidate the connection after `error` left it in a state unknown, and
        raise: `error` as SQLAlchemy's `DBAPIError`, or a cancellation as it is."""
        await self._invalidate()
        if isinstance(error, Exception):
            raise exc.DBAPIError(sql, None, error, connection_invalidated=True) from error
        raise error

    async def transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite: `run` on the connection's own thread, in a transaction that commits
        when it returns and rolls back when it raises; what it returned. One hand-off
        to that thread for all of it, where SQLAlchemy takes one per statement and
        more Python around each than SQLite's own work on it."""
        async with self._lock:
            connection = await self._connection()
            driver = connection.driver_connection
            assert isinstance(driver, sqlite_connection.SqliteConnection)
            try:
                return await driver.transaction(run)
            except self._driver_error as error:
                # Rolled back, unless the connection itself is gone. (`is_disconnect`
                # is typed for SQLAlchemy's DBAPI protocol, which sqlite3 predates.)
                lost = self._engine.dialect.is_disconnect(cast(Any, error), None, None)
                if lost:
                    await self._invalidate()
                raise exc.DBAPIError(
                    "(a transaction run by the driver)", None, error, connection_invalidated=lost
                ) from error
            except asyncio.CancelledError:
                # The transaction ends on its thread all the same, unbeknown to us.
                await self._invalidate()
                raise

    async def close(self) -> None:
        """Hand the connection back to the pool (it may be used again afterwards)."""
        async with self._lock:
            await self._release()

    async def _connection(self) -> PoolProxiedConnection:
        now = asyncio.get_running_loop().time()
        if self._held is not None and now - self._held_since > POOL_RECYCLE_SECONDS:
            await self._release()  # the pool recycles it
        if self._held is None:
            held = await self._engine.raw_connection()
            if self._settings:
                sets = (f"SET {name} = {value}" for name, value in self._settings.items())
                await self._set(held, "; ".join(sets))
            self._held, self._held_since = held, now
        return self._held

    async def _release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self._settings:
            try:
                await self._set(held, "; ".join(f"RESET {name}" for name in self._settings))
            except exc.DBAPIError:
                return  # closed, not back in the pool: nothing more to do
        await greenlet_spawn(held.close)  # back to the pool

    @staticmethod
    async def _set(held: PoolProxiedConnection, statement: str) -> None:
        """Run `statement` (a setting) on `held`. If it fails, the connection is closed
        rather than put back in the pool with settings unknown."""
        driver = cast("asyncpg.Connection", held.driver_connection)
        try:
            await driver.execute(statement)
        except BaseException as error:
            await greenlet_spawn(held.invalidate)
            if isinstance(error, Exception):
                raise exc.DBAPIError(statement, None, error, connection_invalidated=True) from error
            raise

    async def _invalidate(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await greenlet_spawn(held.invalidate)


# How long an SQLite statement waits for a lock (a writer for the one before it).
BUSY_TIMEOUT_MS = 30_000
# How long the checkpointer's closing pass waits for the writer and for readers: it
# holds the write lock while it waits for readers, so this bounds what writers wait.
RESTART_WAIT_MS = 10


def _sqlite_on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # WAL lets readers run beside the one writer; busy_timeout makes writers queue
    # instead of failing with "database is locked" under concurrent streams.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_connect_no_autocheckpoint(
    dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry
) -> None:
    _sqlite_on_connect(dbapi_conn, record)
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


class WalCheckpointer:
    """Checkpoints an SQLite database's WAL in the background, off the writers' path.

    By default SQLite checkpoints on the commit that takes the WAL past 1,000 pages,
    and that commit waits for the copy and its fsync: 20-30 ms here, a spike in every
    write queued behind it. A server's engine turns that off
    (`create_engine(..., checkpoint_in_background=True)`) and runs this every
    `interval`, in two passes:

    - PASSIVE copies what the WAL holds into the database. No writer waits for it,
      but writes keep coming meanwhile, so it hardly ever finds the WAL all copied
      when it ends. Only then may a writer start the WAL over from its beginning;
      without that the WAL grows by every page written.
    - RESTART copies the few pages written meanwhile, waits for readers to leave the
      WAL, and lets the next writer start it over. Writers wait for it, so it waits
      for others at most `RESTART_WAIT_MS`; if that is not enough it gives up, to try
      again next time. Once the WAL holds more than `max_pages` (restarts kept giving
      up), TRUNCATE does the same and also gives the file's space back.

    Measured at ~1,000 quota pushes a second: the WAL grew ~2,300 pages a second with
    PASSIVE alone, and its TRUNCATE every ~9 s held the writers 30-50 ms; the RESTART
    pass holds them 1-2 ms. Closing the last connection checkpoints what is left, as
    always.
    """

    def __init__(self, engine: AsyncEngine, interval: float = 1.0, max_pages: int = 16_384) -> None:
        self._engine = engine
        self._interval = interval
        self._max_pages = max_pages
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sqlite-wal-checkpoints")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def checkpoint(self) -> tuple[int, int]:
        """One checkpoint: the pages the WAL held at its PASSIVE pass, and how many of
        them that pass copied into the database."""
        async with self._engine.connect() as conn:
            wal_pages, copied = await _wal_checkpoint(conn, "PASSIVE")
            if wal_pages:
                closing = "TRUNCATE" if wal_pages > self._max_pages else "RESTART"
                try:
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                    await _wal_checkpoint(conn, closing)
                    await conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                except BaseException:
                    # Not back into the pool with a wait too short for its next users.
                    await conn.invalidate()
                    raise
        return wal_pages, copied

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.checkpoint()
            except Exception:
                logger.warning("WAL checkpoint failed; retrying", exc_info=True)


async def _wal_checkpoint(conn: AsyncConnection, mode: str) -> tuple[int, int]:
    """`PRAGMA wal_checkpoint(mode)`: the pages in the WAL, and how many of them are
    copied (a pass that gave up waiting has copied what it could)."""
    result = await conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})")
    _busy, wal_pages, copied = (int(value) for value in result.one())
    return wal_pages, copied


def _alembic_config(connection: Connection) -> AlembicConfig:
    # Imported here: a server that migrates in a child process never loads alembic.
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    from alembic import command

    command.upgrade(_alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    command.downgrade(_alembic_config(connection), revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema up to `revision`; safe to run from several instances at once."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


def dialect_insert(engine_or_conn: Any) -> Any:
    """The dialect's INSERT, which offers `on_conflict_do_update`."""
    if engine_or_conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert
