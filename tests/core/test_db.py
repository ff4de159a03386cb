"""`single_reads`: hot-path reads without transaction round trips on PostgreSQL, and
the pool they share still hands out transactional connections afterwards.
`DriverConnection`: statements run by asyncpg itself on one held connection, with
SQLAlchemy's bind processing and exceptions, a lost connection taken out of the pool,
and the connection handed back when it gets old or is closed; on SQLite, transactions
run whole on the driver's thread, rolled back when they fail."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core import db
from app.core.db import DriverConnection, DriverStatement, create_engine, single_reads
from app.core.sqlite_connection import SqliteConnection
from app.core.tables import UTCDateTime

TXID = sa.text("SELECT txid_current()")


async def test_single_reads_run_each_statement_in_its_own_transaction(postgres_url: str):
    engine = create_engine(postgres_url)
    try:
        async with single_reads(engine).connect() as conn:
            first = (await conn.execute(TXID)).scalar()
            second = (await conn.execute(TXID)).scalar()
        assert first != second, "no transaction is held open around a single read"
        # The same pooled connection, handed out normally again, opens transactions.
        async with engine.begin() as conn:
            first = (await conn.execute(TXID)).scalar()
            second = (await conn.execute(TXID)).scalar()
        assert first == second
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_single_reads_on_sqlite_is_the_engine_itself(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert single_reads(engine) is engine
    finally:
        await engine.dispose()


async def assert_failed_statements_hide_values(url: str) -> None:
    # Such errors get logged: the values may be password hashes or encrypted secrets.
    engine = create_engine(url)
    secret = f"secret-{uuid.uuid4().hex}"
    try:
        with pytest.raises(sa.exc.DBAPIError) as failed:
            async with engine.connect() as conn:
                await conn.execute(
                    sa.text("SELECT * FROM no_such_table WHERE x = :x"), {"x": secret}
                )
        assert "no_such_table" in str(failed.value)
        assert secret not in str(failed.value)
    finally:
        await engine.dispose()


async def test_a_failed_statement_does_not_carry_its_values_on_sqlite(tmp_path: Path):
    await assert_failed_statements_hide_values(f"sqlite:///{tmp_path / 'x.db'}")


async def test_a_failed_statement_does_not_carry_its_values_on_postgres(postgres_url: str):
    await assert_failed_statements_hide_values(postgres_url)


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE IF EXISTS driven"))
        await conn.execute(sa.text("CREATE TABLE driven (id text PRIMARY KEY, at timestamptz)"))
    try:
        yield engine
    finally:
        await engine.dispose()


INSERT = sa.text("INSERT INTO driven (id, at) VALUES (:id, :at) RETURNING id, at").bindparams(
    sa.bindparam("at", type_=UTCDateTime())
)
PID = sa.text("SELECT pg_backend_pid() AS pid")


@pytest.fixture
async def driver(engine: AsyncEngine) -> AsyncIterator[DriverConnection]:
    connection = DriverConnection(engine)
    try:
        yield connection
    finally:
        await connection.close()


def driven(statement: sa.TextClause, engine: AsyncEngine) -> DriverStatement:
    return DriverStatement(statement, engine.dialect)


async def test_a_driver_statement_commits_alone_with_its_binds_processed(
    engine: AsyncEngine, driver: DriverConnection
):
    statement = driven(INSERT, engine)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    [row] = await driver.fetch(statement, {"id": "a", "at": at})
    assert (row["id"], row["at"]) == ("a", at)
    with pytest.raises(ValueError, match="naive"):  # UTCDateTime's own check
        await driver.fetch(statement, {"id": "b", "at": datetime(2026, 1, 2)})
    async with engine.connect() as conn:  # another connection: committed without a COMMIT
        found = (await conn.execute(sa.text("SELECT id FROM driven"))).scalars().all()
    assert found == ["a"]


async def test_a_failing_driver_statement_is_a_dbapi_error_and_keeps_its_connection(
    engine: AsyncEngine, driver: DriverConnection
):
    statement, pid = driven(INSERT, engine), driven(PID, engine)
    at = datetime.now(UTC)
    [before] = await driver.fetch(pid, {})
    await driver.fetch(statement, {"id": "a", "at": at})
    with pytest.raises(sa.exc.DBAPIError) as refused:
        await driver.fetch(statement, {"id": "a", "at": at})  # the same key again
    assert isinstance(refused.value.orig, asyncpg.UniqueViolationError)
    assert not refused.value.connection_invalidated
    await driver.fetch(statement, {"id": "b", "at": at})
    [after] = await driver.fetch(pid, {})
    assert after["pid"] == before["pid"]  # one connection all along


async def test_the_connection_is_held_between_statements_and_handed_back_on_close(
    engine: AsyncEngine,
):
    pool = engine.pool
    driver = DriverConnection(engine)
    pid = driven(PID, engine)
    [first] = await driver.fetch(pid, {})
    assert pool.checkedout() == 1  # type: ignore[attr-defined]
    # Other work meanwhile gets another connection of the pool.
    async with engine.connect() as conn:
        other = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
    assert other != first["pid"]
    [second] = await driver.fetch(pid, {})
    assert second["pid"] == first["pid"]
    await driver.close()
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    [again] = await driver.fetch(pid, {})  # usable after close: takes one again
    assert pool.checkedout() == 1  # type: ignore[attr-defined]
    assert again["pid"] in (first["pid"], other)  # from the pool, not a new connection
    await driver.close()


async def test_a_held_connection_past_the_recycle_age_goes_back_to_the_pool(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
):
    """So that the pool can recycle it, as it does the connections it keeps."""
    moves: list[str] = []
    sa.event.listen(engine.sync_engine, "checkout", lambda *_: moves.append("out"))
    sa.event.listen(engine.sync_engine, "checkin", lambda *_: moves.append("in"))
    driver = DriverConnection(engine)
    pid = driven(PID, engine)
    try:
        await driver.fetch(pid, {})
        await driver.fetch(pid, {})
        assert moves == ["out"]  # held
        monkeypatch.setattr(db, "POOL_RECYCLE_SECONDS", 0)  # now past the age
        await asyncio.sleep(0.01)
        await driver.fetch(pid, {})
        assert moves == ["out", "in", "out"]
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    finally:
        await driver.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_statements_on_one_driver_connection_wait_for_each_other(
    engine: AsyncEngine, driver: DriverConnection
):
    sleep = driven(sa.text("SELECT pg_sleep(0.05), pg_backend_pid() AS pid"), engine)
    rows = await asyncio.gather(*(driver.fetch(sleep, {}) for _ in range(4)))
    assert len({row["pid"] for [row] in rows}) == 1
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("mid_statement", [False, True])
async def test_a_connection_lost_under_a_driver_statement_leaves_the_pool(
    engine: AsyncEngine, driver: DriverConnection, postgres_url: str, mid_statement: bool
):
    """Lost before the statement (the driver knows it is closed) or while it runs (the
    server's own goodbye, as a PostgreSQL error): invalidated either way, so the next
    statement gets a new connection."""
    statement, pid = driven(INSERT, engine), driven(PID, engine)
    sleep = driven(sa.text("SELECT pg_sleep(30)"), engine)
    [victim] = await driver.fetch(pid, {})  # the held connection
    admin = create_engine(postgres_url)
    try:

        async def terminate(once_sleeping: bool) -> None:
            async with admin.connect() as conn:
                for _ in range(1000 if once_sleeping else 0):
                    if (await conn.execute(SLEEPING, {"pid": victim["pid"]})).first():
                        break
                    await asyncio.sleep(0.01)
                await conn.execute(TERMINATE, {"pid": victim["pid"]})

        with pytest.raises(sa.exc.DBAPIError) as lost:
            if mid_statement:
                sleeping = asyncio.create_task(driver.fetch(sleep, {}))
                await terminate(once_sleeping=True)
                await sleeping
            else:
                await terminate(once_sleeping=False)
                await driver.fetch(statement, {"id": uuid.uuid4().hex, "at": datetime.now(UTC)})
    finally:
        await admin.dispose()
    assert lost.value.connection_invalidated
    [row] = await driver.fetch(statement, {"id": "after", "at": datetime.now(UTC)})
    assert row["id"] == "after"
    [fresh] = await driver.fetch(pid, {})
    assert fresh["pid"] != victim["pid"]


class Refused(Exception):
    pass


async def test_a_judged_statement_commits_unless_its_judge_raises(
    engine: AsyncEngine, driver: DriverConnection
):
    statement, pid = driven(INSERT, engine), driven(PID, engine)
    [held] = await driver.fetch(pid, {})
    seen: list[list[str]] = []

    async def judge(rows: list[asyncpg.Record]) -> str:
        seen.append([row["id"] for row in rows])
        # Inside the transaction: another connection does not see the row yet.
        assert await driven_ids(engine) == []
        if rows[0]["id"] == "refused":
            raise Refused
        return "kept"

    at = datetime.now(UTC)
    with pytest.raises(Refused):
        await driver.fetch_judged(statement, {"id": "refused", "at": at}, judge)
    assert await driven_ids(engine) == []
    assert await driver.fetch_judged(statement, {"id": "kept", "at": at}, judge) == "kept"
    assert seen == [["refused"], ["kept"]]
    assert await driven_ids(engine) == ["kept"]
    [after] = await driver.fetch(pid, {})
    assert after["pid"] == held["pid"]  # a refusal rolls back; the connection stays


async def test_a_connection_lost_before_a_judged_statement_leaves_the_pool(
    engine: AsyncEngine, driver: DriverConnection, postgres_url: str
):
    statement, pid = driven(INSERT, engine), driven(PID, engine)
    [victim] = await driver.fetch(pid, {})
    await terminate_backend(postgres_url, victim["pid"])
    # The driver has read the server's goodbye: the held connection is known closed.
    assert driver._held is not None
    held = driver._held.driver_connection
    for _ in range(500):
        if held.is_closed():
            break
        await asyncio.sleep(0.01)
    assert held.is_closed()

    async def judge(rows: list[asyncpg.Record]) -> str:
        return str(rows[0]["id"])

    at = datetime.now(UTC)
    with pytest.raises(sa.exc.DBAPIError) as lost:
        await driver.fetch_judged(statement, {"id": "lost", "at": at}, judge)
    assert lost.value.connection_invalidated
    assert await driver.fetch_judged(statement, {"id": "after", "at": at}, judge) == "after"
    [fresh] = await driver.fetch(pid, {})
    assert fresh["pid"] != victim["pid"]


SLEEPING = sa.text(
    "SELECT 1 FROM pg_stat_activity WHERE pid = :pid AND query LIKE 'SELECT pg_sleep%'"
)
TERMINATE = sa.text("SELECT pg_terminate_backend(:pid)")


async def terminate_backend(postgres_url: str, pid: int) -> None:
    """End the server's side of a connection, from another one."""
    admin = create_engine(postgres_url)
    try:
        async with admin.connect() as conn:
            await conn.execute(TERMINATE, {"pid": pid})
    finally:
        await admin.dispose()


# A batch of rows updated by key, joined on arrays: the shape of the usage writer's.
UPDATE_BATCH = sa.text(
    "UPDATE driven SET at = d.at FROM unnest(CAST(:ids AS TEXT[]), CAST(:ats AS "
    "TIMESTAMPTZ[])) AS d (id, at) WHERE driven.id = d.id RETURNING driven.id"
).bindparams(
    sa.bindparam("ids", type_=sa.ARRAY(sa.Text())),
    sa.bindparam("ats", type_=sa.ARRAY(UTCDateTime())),
)
# Reported at the end of this statement, not up to a second later.
FLUSH_STATS = sa.text("SELECT pg_stat_force_next_flush()")
SCANS = sa.text("SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'driven'")


async def scans(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:  # a new transaction: a fresh view of the stats
        seq, idx = (await conn.execute(SCANS)).one()
    return seq, idx


async def test_planned_each_run_a_batch_reaches_rows_by_key_after_the_table_grew(
    engine: AsyncEngine,
):
    """PostgreSQL keeps a prepared statement's plan until the table is analyzed again.
    One made while the table held a few rows (a young deployment) must not read the
    whole table once it holds many; the setting does not outlive the hold."""
    driver = DriverConnection(engine, settings=db.PLAN_EACH_RUN)
    update, flush = driven(UPDATE_BATCH, engine), driven(FLUSH_STATS, engine)
    at = datetime.now(UTC)
    try:
        for i in range(3):
            await driver.fetch(driven(INSERT, engine), {"id": f"r{i}", "at": at})
        async with engine.begin() as conn:  # as autovacuum does early in a table's life
            await conn.execute(sa.text("ANALYZE driven"))
        for _ in range(8):  # past the five runs after which a plan would be kept
            await driver.fetch(update, {"ids": ["r0", "r1"], "ats": [at, at]})
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO driven SELECT 'g' || n, now() FROM generate_series(1, 20000) n"
                )
            )
        await driver.fetch(flush, {})  # the driver's statistics so far, reported
        before = await scans(engine)
        rows = await driver.fetch(update, {"ids": ["r1", "r2", "g7"], "ats": [at, at, at]})
        assert sorted(row["id"] for row in rows) == ["g7", "r1", "r2"]
        await driver.fetch(flush, {})
        seq, idx = await scans(engine)
        assert seq == before[0]  # no read of the whole table
        assert idx > before[1]
        [held] = await driver.fetch(driven(PID, engine), {})
    finally:
        await driver.close()
    modes = {}  # of the pool's two connections, the driver's among them
    async with engine.connect() as one, engine.connect() as other:
        for conn in (one, other):
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
            modes[pid] = (await conn.execute(sa.text("SHOW plan_cache_mode"))).scalar()
    assert modes[held["pid"]] == "auto"


async def test_a_held_connection_with_settings_lost_is_closed_not_pooled(
    engine: AsyncEngine, postgres_url: str
):
    """Its settings cannot be reset: on close it leaves the pool, and nothing raises."""
    driver = DriverConnection(engine, settings=db.PLAN_EACH_RUN)
    [held] = await driver.fetch(driven(PID, engine), {})
    await terminate_backend(postgres_url, held["pid"])
    await driver.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
    assert pid != held["pid"]


# --- SQLite: WAL checkpoints off the writers' path ---------------------------------------


async def autocheckpoint(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one())


async def write_pages(engine: AsyncEngine, rows: int) -> None:
    """Enough rows of 1 KiB to fill about `rows / 4` pages of the WAL."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS filler (pad TEXT)")
        await conn.exec_driver_sql(
            "INSERT INTO filler (pad) VALUES (?)", [("x" * 1024,) for _ in range(rows)]
        )


async def test_a_server_engine_leaves_checkpoints_to_the_checkpointer(tmp_path: Path):
    default = create_engine(f"sqlite:///{tmp_path}/default.db")
    server = create_engine(f"sqlite:///{tmp_path}/server.db", checkpoint_in_background=True)
    try:
        assert await autocheckpoint(default) == 1000  # SQLite's own default
        assert await autocheckpoint(server) == 0
        # Past SQLite's 1,000 pages, no commit checkpointed: the WAL keeps them all.
        await write_pages(server, 6000)
        wal = tmp_path / "server.db-wal"
        assert wal.stat().st_size > 1000 * 4096
    finally:
        await default.dispose()
        await server.dispose()


async def filler_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.exec_driver_sql("SELECT count(*) FROM filler")).scalar_one())


async def test_under_steady_writes_each_checkpoint_starts_the_wal_over(tmp_path: Path):
    """A writer that commits every millisecond: a PASSIVE pass alone hardly ever finds
    the WAL all copied when it ends, so no write may start it over, and it grows by
    every page written. The closing pass lets the writer start it over."""
    engine = create_engine(f"sqlite:///{tmp_path}/server.db", checkpoint_in_background=True)
    checkpoints = db.WalCheckpointer(engine)
    await write_pages(engine, 4)
    stop = threading.Event()
    transactions = 0
    rows = [("x" * 1024,)] * 16  # 16 KiB a transaction: four pages at least

    def write_steadily() -> None:
        nonlocal transactions
        writer = sqlite3.connect(tmp_path / "server.db", isolation_level=None)
        writer.execute(f"PRAGMA busy_timeout={db.BUSY_TIMEOUT_MS}")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        try:
            while not stop.is_set():
                writer.execute("BEGIN")
                writer.executemany("INSERT INTO filler (pad) VALUES (?)", rows)
                writer.execute("COMMIT")
                transactions += 1
                time.sleep(0.001)
        finally:
            writer.close()

    thread = threading.Thread(target=write_steadily)
    thread.start()
    try:
        for _ in range(8):
            await asyncio.sleep(0.15)
            await checkpoints.checkpoint()
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    try:
        # Never started over, the WAL would hold every page written: all of the rows.
        wal = (tmp_path / "server.db-wal").stat().st_size
        assert 0 < wal < transactions * len(rows) * 1024 / 2
        assert await filler_rows(engine) == 4 + len(rows) * transactions
    finally:
        await checkpoints.close()
        await engine.dispose()


async def test_the_checkpointer_truncates_a_wal_past_max_pages(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path}/server.db", checkpoint_in_background=True)
    checkpoints = db.WalCheckpointer(engine, max_pages=100)
    try:
        await write_pages(engine, 2000)
        pages, copied = await checkpoints.checkpoint()
        assert pages > 100 and copied == pages
        assert (tmp_path / "server.db-wal").stat().st_size == 0
        assert await filler_rows(engine) == 2000
    finally:
        await checkpoints.close()
        await engine.dispose()


async def test_a_reader_of_an_old_snapshot_holds_the_checkpointer_only_briefly(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path}/server.db", checkpoint_in_background=True)
    checkpoints = db.WalCheckpointer(engine)
    await write_pages(engine, 40)
    reader = sqlite3.connect(tmp_path / "server.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM filler").fetchone() == (40,)
        await write_pages(engine, 400)
        # The closing pass cannot restart a WAL the reader still reads. It gives up
        # after `RESTART_WAIT_MS`, where the pool's busy timeout would hold every
        # writer behind it for 30 s.
        pages, copied = await asyncio.wait_for(checkpoints.checkpoint(), 5)
        assert pages > 100 and copied < pages
        await write_pages(engine, 4)
        async with engine.connect() as conn:
            timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
        assert timeout == db.BUSY_TIMEOUT_MS
        assert reader.execute("SELECT count(*) FROM filler").fetchone() == (40,)
        reader.execute("COMMIT")
        assert await filler_rows(engine) == 444
    finally:
        reader.close()
        await checkpoints.close()
        await engine.dispose()


async def test_the_checkpointer_runs_on_its_own_and_stops_on_close(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path}/server.db", checkpoint_in_background=True)
    checkpoints = db.WalCheckpointer(engine, interval=0.01, max_pages=100)
    try:
        await write_pages(engine, 2000)
        wal = tmp_path / "server.db-wal"
        checkpoints.start()
        # PASSIVE, then TRUNCATE. A file has no event to wait on; no deadline of ours.
        while wal.stat().st_size > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await checkpoints.close()
        await write_pages(engine, 2000)
        await asyncio.sleep(0.05)  # five intervals: nothing runs any more
        assert wal.stat().st_size > 100 * 4096
    finally:
        await checkpoints.close()
        await engine.dispose()


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'driven.db'}")
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE driven (id TEXT PRIMARY KEY, at TEXT)"))
    try:
        yield engine
    finally:
        await engine.dispose()


async def driven_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:  # another connection: only what was committed
        return list((await conn.execute(sa.text("SELECT id FROM driven ORDER BY id"))).scalars())


async def test_a_driver_transaction_on_sqlite_commits_in_one_hand_off(sqlite_engine: AsyncEngine):
    driver = DriverConnection(sqlite_engine)
    statement = driven(INSERT, sqlite_engine)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def insert(connection: sqlite3.Connection) -> list[tuple[str, str]]:
        rows = connection.execute(statement.sql, statement.arguments({"id": "a", "at": at}))
        connection.execute("INSERT INTO driven (id) VALUES ('b')")
        return list(rows)

    try:
        assert await driver.transaction(insert) == [("a", "2026-01-02 03:04:05.000000")]
        held = driver._held
        assert held is not None
        sqlite = held.driver_connection
        assert isinstance(sqlite, SqliteConnection)
        before = sqlite._queued
        await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('c')"))
        assert sqlite._queued - before == 1  # statement, commit and all
        assert not sqlite.in_transaction
        assert await driven_ids(sqlite_engine) == ["a", "b", "c"]
    finally:
        await driver.close()
    assert sqlite_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failing_driver_transaction_on_sqlite_rolls_back_and_keeps_its_connection(
    sqlite_engine: AsyncEngine,
):
    driver = DriverConnection(sqlite_engine)

    def insert_twice(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO driven (id) VALUES ('x')")
        connection.execute("INSERT INTO driven (id) VALUES ('x')")

    def insert_then_fail(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO driven (id) VALUES ('y')")
        raise RuntimeError("the caller's own")

    try:
        with pytest.raises(sa.exc.DBAPIError) as refused:
            await driver.transaction(insert_twice)
        assert isinstance(refused.value.orig, sqlite3.IntegrityError)
        assert not refused.value.connection_invalidated
        held = driver._held
        with pytest.raises(RuntimeError, match="the caller's own"):
            await driver.transaction(insert_then_fail)
        assert driver._held is held  # one connection all along
        assert held is not None and not held.driver_connection.in_transaction
        await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('z')"))
        assert await driven_ids(sqlite_engine) == ["z"]
    finally:
        await driver.close()


async def test_a_driver_transaction_on_sqlite_cancelled_midway_leaves_the_pool(
    sqlite_engine: AsyncEngine,
):
    """Its caller cannot know how it ended: the connection is invalidated, so the next
    transaction takes a new one; the one cancelled still ends on its thread."""
    driver = DriverConnection(sqlite_engine)
    entered, release = threading.Event(), threading.Event()

    def held_up(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO driven (id) VALUES ('slow')")
        entered.set()
        release.wait(10)

    try:
        running = asyncio.create_task(driver.transaction(held_up))
        assert await asyncio.to_thread(entered.wait, 10)
        first = driver._held
        running.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert driver._held is None
        await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('next')"))
        assert driver._held is not first
        assert await driven_ids(sqlite_engine) == ["next", "slow"]
    finally:
        await driver.close()


async def test_a_driver_transaction_on_a_closed_sqlite_connection_takes_a_new_one(
    sqlite_engine: AsyncEngine,
):
    driver = DriverConnection(sqlite_engine)
    try:
        await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('a')"))
        held = driver._held
        assert held is not None and isinstance(held.driver_connection, SqliteConnection)
        held.driver_connection._conn.close()  # gone under the driver, as a lost file would be
        with pytest.raises(sa.exc.DBAPIError) as lost:
            await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('b')"))
        assert isinstance(lost.value.orig, sqlite3.ProgrammingError)
        assert lost.value.connection_invalidated
        assert driver._held is None
        await driver.transaction(lambda c: c.execute("INSERT INTO driven (id) VALUES ('c')"))
        assert await driven_ids(sqlite_engine) == ["a", "c"]
    finally:
        await driver.close()
