"""aiosqlite's connection, with fewer hand-offs to its thread.

aiosqlite runs every call on the connection's own thread: the caller queues it, the
thread runs it and wakes the event loop with the result, two thread switches and a
pass of the GIL each way. Through SQLAlchemy one statement made four such calls (make
a cursor, execute, fetch the rows, close the cursor), and every connection handed
back to the pool a fifth (a rollback, mostly with nothing to undo).

Here a statement takes one: the rows come back with the execute, and the cursor is
made and closed on the caller's thread, as neither touches the database (a cursor is
closed there only once nothing is left to run on the connection's thread; a caller
cancelled while its statement still runs closes it behind that statement). A
rollback with no transaction open and nothing queued stays on the caller's thread.
`transaction` runs a whole transaction in one hand-off, for the driver's own paths.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import aiosqlite
from aiosqlite.context import contextmanager

T = TypeVar("T")


class SqliteCursor(aiosqlite.Cursor):
    """A cursor whose execute brings its rows back with it."""

    _conn: SqliteConnection

    def __init__(self, conn: SqliteConnection, cursor: sqlite3.Cursor) -> None:
        super().__init__(conn, cursor)
        self._rows: deque[Any] | None = None  # fetched with the execute

    def _execute_and_fetch(self, sql: str, parameters: Any) -> deque[Any] | None:
        cursor = self._cursor
        cursor.execute(sql, parameters)
        return deque(cursor.fetchall()) if cursor.description is not None else None

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> SqliteCursor:
        self._rows = None
        self._rows = await self._conn._execute(self._execute_and_fetch, sql, parameters or ())
        return self

    async def fetchone(self) -> Any:
        if self._rows is None:
            return await super().fetchone()
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        if self._rows is None:
            return list(await super().fetchmany(size))
        count = self.arraysize if size is None else size
        return [self._rows.popleft() for _ in range(min(count, len(self._rows)))]

    async def fetchall(self) -> list[Any]:
        if self._rows is None:
            return list(await super().fetchall())
        rows, self._rows = list(self._rows), deque()
        return rows

    async def close(self) -> None:
        self._rows = None
        if self._conn.idle:
            self._cursor.close()
        else:
            await super().close()


class SqliteConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors are `SqliteCursor`s, and whose rollback
    with no transaction open (the pool's, on every connection handed back) is not
    sent to its thread."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        # Calls queued on the connection's thread, and calls it finished: each counter
        # is written by one thread only.
        self._queued = 0
        self._finished = 0

    @property
    def idle(self) -> bool:
        """Whether nothing queued on the connection's thread is left to run."""
        return self._queued == self._finished

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._finished += 1

        self._queued += 1
        return await super()._execute(run)  # type: ignore[no-untyped-call]

    async def rollback(self) -> None:
        if self.idle and not self._conn.in_transaction:
            return
        await super().rollback()

    async def transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """`run` on the connection's thread, in a transaction that commits when it
        returns and rolls back when it raises: one hand-off for all of it."""

        def in_transaction() -> T:
            connection = self._conn
            try:
                result = run(connection)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            return result

        result: T = await self._execute(in_transaction)
        return result

    @contextmanager
    async def cursor(self) -> aiosqlite.Cursor:
        return SqliteCursor(self, self._conn.cursor())


def connect(database: str, **kwargs: Any) -> SqliteConnection:
    """`aiosqlite.connect`, for SQLAlchemy's `async_creator_fn`: the URL's arguments, as
    SQLAlchemy made them for `sqlite3.connect` (`check_same_thread=False` among them,
    which making cursors on the caller's thread needs)."""

    def connector() -> sqlite3.Connection:
        connection: sqlite3.Connection = sqlite3.connect(database, **kwargs)
        return connection

    connection = SqliteConnection(connector, iter_chunk_size=64)
    # As SQLAlchemy does for aiosqlite's own: a connection left open must not keep
    # the process alive.
    connection._thread.daemon = True
    return connection
