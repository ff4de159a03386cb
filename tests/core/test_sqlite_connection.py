"""`SqliteConnection`: one hand-off to the connection's thread per statement through
SQLAlchemy, none for the pool's rollback of an idle connection, the rows of a statement
read as the driver's cursor reads them, and a cursor closed or a rollback sent while a
call still runs on the thread queued behind it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.db import create_engine
from app.core.sqlite_connection import SqliteConnection, connect


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)"))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def connection(tmp_path: Path) -> AsyncIterator[SqliteConnection]:
    connection = await connect(str(tmp_path / "raw.db"), check_same_thread=False)
    await connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)")
    await connection.commit()
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_statement_through_sqlalchemy_takes_one_hand_off(engine: AsyncEngine):
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, SqliteConnection)
        before = driver._queued
        async with conn.begin():
            inserted = await conn.execute(
                sa.text("INSERT INTO t (n) VALUES (1), (2), (3) RETURNING n")
            )
            assert sorted(inserted.scalars()) == [1, 2, 3]
            await conn.execute(sa.text("UPDATE t SET n = n * 10 WHERE n > 1"))
            rows = (await conn.execute(sa.text("SELECT n FROM t ORDER BY n"))).scalars()
            assert list(rows) == [1, 20, 30]
        # Three statements and the commit (aiosqlite alone: four calls per statement).
        assert driver._queued - before == 4
    # The pool's rollback of a connection with no transaction open stays here.
    assert driver._queued - before == 4
    assert driver.idle


async def test_the_pool_still_rolls_back_a_transaction_left_open(engine: AsyncEngine):
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, SqliteConnection)
        # Behind SQLAlchemy's back, as a driver-level caller could leave it.
        await driver.execute("INSERT INTO t (n) VALUES (7)")
        assert driver.in_transaction
    assert not driver.in_transaction
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar() == 0


async def test_rows_fetched_with_the_execute_read_as_the_drivers_cursor(
    connection: SqliteConnection,
):
    await connection.executemany("INSERT INTO t (n) VALUES (?)", [(n,) for n in range(5)])
    async with connection.cursor() as cursor:
        await cursor.execute("SELECT n FROM t ORDER BY n")
        assert await cursor.fetchone() == (0,)
        cursor.arraysize = 2
        assert await cursor.fetchmany() == [(1,), (2,)]
        assert await cursor.fetchmany(5) == [(3,), (4,)]
        assert await cursor.fetchone() is None
        assert await cursor.fetchall() == []
        # A statement without rows, then one with: each execute starts afresh.
        await cursor.execute("UPDATE t SET n = n + 1")
        assert cursor.rowcount == 5
        await cursor.execute("SELECT max(n) FROM t")
        assert await cursor.fetchall() == [(5,)]


def blocking_function(connection: SqliteConnection) -> tuple[threading.Event, threading.Event]:
    """A SQL function `hold()` that runs until released: (entered, release)."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> int:
        entered.set()
        release.wait(10)
        return 1

    connection._conn.create_function("hold", 0, hold)
    return entered, release


async def test_a_cursor_closed_while_its_statement_runs_closes_behind_it(
    connection: SqliteConnection,
):
    entered, release = blocking_function(connection)
    cursor = await connection.cursor()
    running = asyncio.create_task(cursor.execute("SELECT hold()"))
    assert await asyncio.to_thread(entered.wait, 10)
    running.cancel()  # the caller gives up; the statement still runs on the thread
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not connection.idle
    # Closed here, the cursor would fail ("recursive use") or cut the statement short.
    closing = asyncio.create_task(cursor.close())
    await asyncio.sleep(0)
    assert not closing.done()
    release.set()
    await closing
    assert connection.idle
    assert await connection.execute_fetchall("SELECT 2") == [(2,)]


async def test_a_rollback_sent_while_calls_are_queued_runs_behind_them(
    connection: SqliteConnection,
):
    entered, release = blocking_function(connection)
    held = asyncio.create_task(connection.execute("SELECT hold()"))
    assert await asyncio.to_thread(entered.wait, 10)
    # Queued behind it: an INSERT, which opens a transaction once it runs.
    inserting = asyncio.create_task(connection.execute("INSERT INTO t (n) VALUES (1)"))
    await asyncio.sleep(0)
    assert not connection.in_transaction  # not yet: the rollback must not be skipped
    rolling_back = asyncio.create_task(connection.rollback())
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(held, inserting, rolling_back)
    assert not connection.in_transaction
    assert await connection.execute_fetchall("SELECT count(*) FROM t") == [(0,)]
