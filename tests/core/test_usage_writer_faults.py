"""Usage writes whose COMMIT reached PostgreSQL but whose answer never came back: the
transaction is committed, the writer sees a failure, and the counter must not count
the same tokens twice when the next write (or the retry) goes through."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.db import create_engine
from app.core.metering import Metering, UsageMeter
from app.core.tables import UsageStatus, usage_logs
from app.core.usage_writer import UsageWrite
from tests.conftest import Backend
from tests.core.test_metering import (
    CONFIG,
    Env,
    assert_counter,
    deliver,
    env,
    queued_events,
    request,
    row_of,
    subscribe_webhook,
    wait_row,
)

__all__ = ["env"]  # the fixture, shared with the metering tests

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"  # asyncpg's COMMIT, a simple-protocol query


class CommitAnswerCutter:
    """A TCP proxy in front of PostgreSQL. Once armed, it forwards the next COMMIT, and
    when the server answers it, cuts the connection instead of passing the answer on:
    the transaction is committed and the client cannot know it. With `before_commit`,
    it cuts the connection in place of forwarding that COMMIT: nothing is committed.

    With `statement` set instead, it cuts the answer to the next run of the statement
    whose text starts that way (sent when the statement is prepared, which asyncpg does
    once per connection, and its run names it): for a statement that commits on its
    own, outside any transaction, the same as a lost COMMIT answer."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.armed = False
        self.before_commit = False
        self.statement: bytes | None = None
        self.cut = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        server_in, server_out = await asyncio.open_connection(*self._target)
        committing = asyncio.Event()
        prepared: bytes | None = None  # the name `statement` was just prepared by here

        async def to_server() -> None:
            nonlocal prepared
            while data := await client_in.read(65536):
                if prepared is not None and data.startswith(b"B") and prepared in data:
                    # Its run (a Bind): the driver may have looked up types in between.
                    prepared = None
                    committing.set()
                elif self.statement is not None and self.statement in data:
                    self.statement = None
                    # Parse: "P", its length, then the statement's name.
                    prepared = b"\x00" + data[5 : data.index(b"\x00", 5) + 1]
                elif self.armed and COMMIT in data:
                    self.armed = False
                    if self.before_commit:
                        self.cut += 1
                        client_out.close()
                        server_out.close()
                        return
                    committing.set()
                server_out.write(data)
                await server_out.drain()
            server_out.close()

        async def to_client() -> None:
            # The client sends nothing before the answer to what it sent last, so what
            # the server sends once the COMMIT went is that COMMIT's answer.
            while data := await server_in.read(65536):
                if committing.is_set():
                    self.cut += 1
                    client_out.close()
                    server_out.close()
                    return
                client_out.write(data)
                await client_out.drain()
            client_out.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)


@pytest.fixture
async def cutter(backend: Backend) -> AsyncIterator[tuple[CommitAnswerCutter, AsyncEngine]]:
    """The proxy, and an engine whose connections all go through it."""
    url = make_url(backend.database_url)
    proxy = CommitAnswerCutter(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    engine = create_engine(url.set(port=port).render_as_string(hide_password=False))
    try:
        yield proxy, engine
    finally:
        await engine.dispose()
        await proxy.close()


@pytest.fixture
async def cut_metering(
    env: Env, cutter: tuple[CommitAnswerCutter, AsyncEngine]
) -> AsyncIterator[Metering]:
    """A metering service whose database connections all go through the proxy."""
    metering = Metering(cutter[1], env.publisher, CONFIG)
    try:
        yield metering
    finally:
        await metering.writer.close()  # before the proxy goes


async def flushed(meter: UsageMeter) -> None:
    """Until the meter's checkpoint in flight, if any, has ended (however it ended)."""
    for _ in range(500):
        if meter._flusher is None or meter._flusher.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the checkpoint never ended")


@pytest.mark.parametrize("has_webhooks", [True, False])
async def test_a_checkpoint_committed_unbeknown_is_not_counted_again_by_the_next(
    env: Env,
    cutter: tuple[CommitAnswerCutter, AsyncEngine],
    cut_metering: Metering,
    has_webhooks: bool,
):
    """With webhooks, a checkpoint runs in a transaction (it may have to queue a quota
    warning); without, alone, as one statement that commits on its own."""
    proxy = cutter[0]
    metering = cut_metering
    user = await env.user()
    info = dataclasses.replace(request(user), has_webhooks=has_webhooks)
    meter = await metering.begin(info, prompt_tokens=2)
    if has_webhooks:
        proxy.armed = True
    else:
        proxy.statement = b"WITH updated AS (UPDATE usage_logs"
    deliver(meter, 5)  # a checkpoint: committed, but the meter is told it failed
    await flushed(meter)
    assert proxy.cut == 1
    assert (await row_of(env.engine, meter.row_id)).total_tokens == 7
    await assert_counter(env.engine, user, 7)

    deliver(meter, 5)
    await wait_row(env.engine, meter.row_id, lambda r: r.total_tokens == 12, "12 tokens")
    await flushed(meter)
    await assert_counter(env.engine, user, 12)
    await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 12)


@pytest.mark.parametrize("warnings", [True, False], ids=["transaction", "statement"])
async def test_a_batch_committed_unbeknown_is_retried_without_counting_it_twice(
    env: Env,
    cutter: tuple[CommitAnswerCutter, AsyncEngine],
    cut_metering: Metering,
    warnings: bool,
):
    """With warnings to check, the batch is a transaction; without, one statement that
    commits on its own."""
    proxy = cutter[0]
    metering = cut_metering
    user = await env.user()
    meters = [await metering.begin(request(user), prompt_tokens=1) for _ in range(3)]

    def write(meter: UsageMeter) -> UsageWrite:
        row = {"row_id": meter.row_id, "completion_tokens": 5, "total_tokens": 6}
        return UsageWrite(row, user, meter.period, 5, None, warnings=warnings)

    if warnings:
        proxy.armed = True
    else:
        proxy.statement = b"WITH updated_0 AS (UPDATE usage_logs"
    # Submitted together: one commit, whose answer is lost; each is then retried
    # alone, and each retry must find its row already written.
    outcomes = await asyncio.gather(*(metering.writer.write(write(m)) for m in meters))
    assert proxy.cut == 1
    assert all(o is None for o in outcomes), "the retries added nothing"
    assert [(await row_of(env.engine, m.row_id)).total_tokens for m in meters] == [6, 6, 6]
    await assert_counter(env.engine, user, 3 * 6)


async def test_an_end_committed_unbeknown_is_retried_and_its_task_event_queued_once(
    env: Env, cutter: tuple[CommitAnswerCutter, AsyncEngine], cut_metering: Metering
):
    proxy = cutter[0]
    metering = cut_metering
    user = await env.user()
    await subscribe_webhook(env, user, "ai.task.completed")
    meter = await metering.begin(request(user), prompt_tokens=2)
    deliver(meter, 3)  # no checkpoint yet (checkpoint_tokens=5)
    proxy.armed = True
    await meter.finish(UsageStatus.COMPLETED)  # the first attempt "fails"; the retry ends it
    assert proxy.cut == 1
    row = await row_of(env.engine, meter.row_id)
    assert (row.status, row.total_tokens) == (UsageStatus.COMPLETED, 5)
    await assert_counter(env.engine, user, 5)
    events = await queued_events(env, user)
    expected = [(f"evt_{meter.row_id}_completed", "ai.task.completed")]
    assert [(e.event_id, e.event) for e in events] == expected


@pytest.mark.parametrize(
    ("token_limit", "starts"),
    [(1000, 1), (None, 1), (None, 3)],
    ids=["transaction", "statement", "batch statement"],
)
async def test_a_start_committed_unbeknown_ends_its_row_billing_nothing(
    env: Env,
    cutter: tuple[CommitAnswerCutter, AsyncEngine],
    cut_metering: Metering,
    token_limit: int | None,
    starts: int,
):
    """With a limit to check, the start commits in a transaction; without, alone, as one
    statement that commits on its own, and with others arriving together, as one
    statement for all."""
    proxy = cutter[0]
    metering = cut_metering
    user = await env.user()
    infos = [request(user, token_limit=token_limit) for _ in range(starts)]
    if token_limit is not None:
        proxy.armed = True
    elif starts == 1:
        proxy.statement = b"WITH inserted AS (INSERT INTO usage_logs"
    else:
        proxy.statement = b"WITH inserted_0 AS (INSERT INTO usage_logs"
    outcomes = await asyncio.gather(
        *(metering.begin(info, prompt_tokens=4) for info in infos), return_exceptions=True
    )
    assert all(isinstance(o, sa.exc.DBAPIError) for o in outcomes)
    assert proxy.cut == 1
    await metering.close()  # waits for the clean-up, which runs in the background
    async with env.engine.connect() as conn:
        query = sa.select(usage_logs).where(
            usage_logs.c.request_id.in_([info.request_id for info in infos])
        )
        rows = (await conn.execute(query)).all()
    assert [(row.status, row.total_tokens) for row in rows] == [(UsageStatus.ERROR, 0)] * starts
    await assert_counter(env.engine, user, 0)


async def test_a_start_never_committed_leaves_nothing_and_takes_nothing_back(
    env: Env, cutter: tuple[CommitAnswerCutter, AsyncEngine], cut_metering: Metering
):
    proxy = cutter[0]
    metering = cut_metering
    user = await env.user()
    first = await metering.begin(request(user), prompt_tokens=3)
    await first.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 3)
    info = request(user, token_limit=1000)  # a limit to check: a transaction to cut
    proxy.armed, proxy.before_commit = True, True
    with pytest.raises(sa.exc.DBAPIError):
        await metering.begin(info, prompt_tokens=4)
    assert proxy.cut == 1
    await metering.close()  # waits for the clean-up, which runs in the background
    async with env.engine.connect() as conn:
        query = sa.select(usage_logs).where(usage_logs.c.request_id == info.request_id)
        assert (await conn.execute(query)).all() == []
    await assert_counter(env.engine, user, 3)
