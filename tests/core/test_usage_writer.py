"""The group commit of usage rows on real SQLite and PostgreSQL: writes that arrive
together share a transaction, a refused start or a failing write leaves the others
whole, and counters stay equal to the rows across users and instances."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.db import TransactionNeeded
from app.core.errors import QuotaExceeded
from app.core.metering import Admission, Usage, UsageMeter
from app.core.quota import TOKENS, Increment, QuotaSnapshot, read_counter, read_counter_state
from app.core.tables import UsageStatus, usage_logs
from app.core.usage_writer import Counted, UsageWrite
from app.core.webhooks import QuotaWarnings
from tests.core.test_metering import (
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

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


@contextmanager
def counting_commits(engine: AsyncEngine) -> Iterator[list[int]]:
    """Counts the transactions committed on `engine` while the block runs."""
    commits: list[int] = []

    def on_commit(_: object) -> None:
        commits.append(1)

    sa.event.listen(engine.sync_engine, "commit", on_commit)
    try:
        yield commits
    finally:
        sa.event.remove(engine.sync_engine, "commit", on_commit)


async def rows_of(engine: AsyncEngine, user_id: str) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        query = sa.select(usage_logs).where(usage_logs.c.user_id == user_id)
        return list((await conn.execute(query)).all())


async def test_starts_arriving_together_share_a_transaction_and_a_refusal_leaves_nothing(
    env: Env,
):
    metering = env.metering()
    users = [await env.user() for _ in range(3)]

    def admit_unless(refuse: bool) -> Admission:
        async def admit(conn: AsyncConnection, quota: QuotaSnapshot, counted: object) -> None:
            if refuse:
                raise QuotaExceeded("refused by the test")

        return admit

    async def start(i: int) -> UsageMeter | QuotaExceeded:
        try:
            return await metering.begin(
                request(users[i % 3]), prompt_tokens=i + 1, admit=admit_unless(i % 4 == 3)
            )
        except QuotaExceeded as exc:
            return exc

    with counting_commits(env.engine) as commits:
        outcomes = await asyncio.gather(*(start(i) for i in range(24)))
    started = [o for o in outcomes if isinstance(o, UsageMeter)]
    assert len(started) == 18 and len(outcomes) - len(started) == 6
    assert len(commits) < 6, "24 starts arriving together should share transactions"
    for n, user in enumerate(users):
        mine = [i for i in range(24) if i % 3 == n]
        admitted = [i for i in mine if i % 4 != 3]
        rows = await rows_of(env.engine, user)
        assert sorted(r.prompt_tokens for r in rows) == sorted(i + 1 for i in admitted)
        await assert_counter(env.engine, user, sum(i + 1 for i in admitted))
    for meter in started:
        await meter.finish(UsageStatus.COMPLETED)


async def test_a_failing_write_does_not_fail_the_writes_committed_with_it(env: Env):
    metering = env.metering()
    user = await env.user()
    meters = [await metering.begin(request(user), prompt_tokens=1) for _ in range(4)]

    async def broken(conn: AsyncConnection) -> None:
        raise RuntimeError("the event could not be queued")

    def write(meter: UsageMeter, then: object = None) -> UsageWrite:
        row = {"row_id": meter.row_id, "completion_tokens": 5, "total_tokens": 6}
        return UsageWrite(row, user, meter.period, 5, None, then)  # type: ignore[arg-type]

    outcomes = await asyncio.gather(
        *(
            metering.writer.write(write(m, broken if i == 1 else None))
            for i, m in enumerate(meters)
        ),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], RuntimeError)
    assert all(isinstance(o, tuple) for i, o in enumerate(outcomes) if i != 1)
    assert [(await row_of(env.engine, m.row_id)).total_tokens for m in meters] == [6, 1, 6, 6]
    await assert_counter(env.engine, user, 6 * 3 + 1)


@pytest.mark.parametrize("has_webhooks", [True, False], ids=["transactions", "statements"])
async def test_checkpoints_and_ends_of_many_users_on_two_instances_stay_exact(
    env: Env, has_webhooks: bool
):
    """Two instances write counters of the same users at once: no deadlock, no drift.
    Without webhooks, on PostgreSQL, each batch is one statement committing on its own."""
    instances = [env.metering(), env.metering()]
    users = [await env.user() for _ in range(6)]

    async def stream(i: int) -> int:
        metering = instances[i % 2]
        info = dataclasses.replace(request(users[i % len(users)]), has_webhooks=has_webhooks)
        meter = await metering.begin(info, prompt_tokens=2)
        for _ in range(4):
            deliver(meter, 5)  # a checkpoint each time (checkpoint_tokens=5)
            await asyncio.sleep(0)
        status = UsageStatus.COMPLETED if i % 2 else UsageStatus.CANCELLED
        await meter.finish(status)
        return meter.total_tokens

    billed = await asyncio.gather(*(stream(i) for i in range(48)))
    assert billed == [22] * 48
    for user in users:
        rows = await rows_of(env.engine, user)
        assert len(rows) == 8
        assert all(r.status in (UsageStatus.COMPLETED, UsageStatus.CANCELLED) for r in rows)
        await assert_counter(env.engine, user, 8 * 22)
        assert all(r.finished_at is not None for r in rows)


async def test_starts_of_one_user_folded_together_see_the_counter_one_after_another(env: Env):
    """Folded into one change per counter, each start still sees its own step: the
    quota after its prompt and a `seq` of its own, as if they ran one by one."""
    metering = env.metering()
    user = await env.user()
    seen: list[tuple[int, int]] = []

    async def admit(conn: AsyncConnection, quota: QuotaSnapshot, counted: object) -> None:
        seen.append((quota.used, quota.seq))

    prompts = [3, 5, 7, 11, 13]
    meters = await asyncio.gather(
        *(metering.begin(request(user), prompt_tokens=p, admit=admit) for p in prompts)
    )
    used_after = sorted(used for used, _ in seen)
    assert used_after == [sum(prompts[: k + 1]) for k in range(len(prompts))]
    assert len({seq for _, seq in seen}) == len(prompts)
    assert max(seen) == (sum(prompts), max(seq for _, seq in seen))
    await assert_counter(env.engine, user, sum(prompts))
    for meter in meters:
        await meter.finish(UsageStatus.COMPLETED)


async def test_a_limit_that_folded_starts_would_pass_admits_each_as_far_as_it_fits(env: Env):
    metering = env.metering()
    users = [await env.user() for _ in range(2)]
    limit = Increment("requests", "d:test", 1, limit=5)

    async def admit(conn: AsyncConnection, quota: QuotaSnapshot, counted: Counted) -> None:
        if counted[0] is None:
            raise QuotaExceeded("daily request limit reached")

    async def start(user: str) -> UsageMeter | None:
        try:
            return await metering.begin(request(user), prompt_tokens=2, admit=admit, also=[limit])
        except QuotaExceeded:
            return None

    outcomes = await asyncio.gather(*(start(users[i % 2]) for i in range(16)))
    for user in users:
        mine = [m for m in outcomes if m is not None and m.info.user_id == user]
        assert len(mine) == 5
        assert len(await rows_of(env.engine, user)) == 5
        await assert_counter(env.engine, user, 5 * 2)
        async with env.engine.connect() as conn:
            assert await read_counter(conn, user, "requests", "d:test") == 5
        for meter in mine:
            await meter.finish(UsageStatus.COMPLETED)


async def test_a_start_abandoned_while_queued_ends_its_row_billing_nothing(env: Env):
    """A client that leaves while its start waits for the group commit: the start
    still commits with the others, and its row then ends cancelled with nothing billed."""
    metering = env.metering()
    user = await env.user()
    starts = [asyncio.create_task(metering.begin(request(user), prompt_tokens=5)) for _ in range(3)]
    await asyncio.sleep(0)  # all three queued
    starts[1].cancel()
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    for meter in (outcomes[0], outcomes[2]):
        assert isinstance(meter, UsageMeter)
        await meter.finish(UsageStatus.COMPLETED)
    rows = await rows_of(env.engine, user)
    assert sorted((r.status, r.total_tokens) for r in rows) == [
        (UsageStatus.CANCELLED, 0),
        (UsageStatus.COMPLETED, 5),
        (UsageStatus.COMPLETED, 5),
    ]
    await assert_counter(env.engine, user, 10)


async def test_lone_writes_of_a_user_without_webhooks_keep_row_and_counter_together(env: Env):
    """Nothing to queue, so on PostgreSQL each lone write is one statement committing on
    its own: the counter still moves with the row, one step per write."""
    metering = env.metering()
    user = await env.user()
    info = dataclasses.replace(request(user), has_webhooks=False)
    meter = await metering.begin(info, prompt_tokens=2)
    for n in range(1, 4):
        deliver(meter, 5)  # a checkpoint (checkpoint_tokens=5), written before the next
        await wait_row(env.engine, meter.row_id, lambda r, n=n: r.total_tokens == 2 + 5 * n, "")
        await meter._flusher
    await meter.finish(UsageStatus.COMPLETED, usage=Usage(prompt_tokens=3, completion_tokens=20))
    row = await row_of(env.engine, meter.row_id)
    assert (row.status, row.prompt_tokens, row.total_tokens) == (UsageStatus.COMPLETED, 3, 23)
    await assert_counter(env.engine, user, 23)
    async with env.engine.connect() as conn:
        counter = await read_counter_state(conn, user, TOKENS, meter.period)
    assert counter == (23, 5)  # the start, three checkpoints and the end
    assert meter.counted == Usage(3, 20)


@pytest.mark.parametrize("has_webhooks", [True, False])
async def test_a_checkpoint_passing_a_warning_threshold_queues_a_warning_if_the_user_had_webhooks(
    env: Env, has_webhooks: bool
):
    """A user without a webhook when the request started gets no `quota.warning` from
    its writes (as no `ai.task.*` event): their subscribers were looked for then."""
    metering = env.metering(warnings=QuotaWarnings([50]))
    user = await env.user()
    await subscribe_webhook(env, user, "quota.warning")
    info = dataclasses.replace(request(user, token_limit=20), has_webhooks=has_webhooks)
    meter = await metering.begin(info, prompt_tokens=2)
    deliver(meter, 10)  # checkpoints due at 5 and 10 delivered: 12 tokens, past 50 % of 20
    await wait_row(env.engine, meter.row_id, lambda r: r.total_tokens == 12, "12 tokens")
    await meter.finish(UsageStatus.COMPLETED)
    await assert_counter(env.engine, user, 12)
    events = [json.loads(e.payload)["data"] for e in await queued_events(env, user)]
    expected = [{"quota_type": "monthly_tokens", "used": 12, "limit": 20, "percentage": 60}]
    assert [{k: e[k] for k in expected[0]} for e in events] == (expected if has_webhooks else [])


async def test_a_lone_start_refused_by_a_limit_leaves_neither_its_row_nor_its_counts(env: Env):
    """Alone, a start's row goes in by the statement that counts it (on PostgreSQL);
    refused after that, the transaction takes both back."""
    metering = env.metering()
    user = await env.user()
    also = [Increment("requests", "all", 1, limit=1)]
    seen: list[tuple[QuotaSnapshot, object]] = []

    async def admit(conn: AsyncConnection, quota: QuotaSnapshot, counted: Counted) -> None:
        seen.append((quota, counted))
        if counted[0] is None:
            raise QuotaExceeded("request limit reached")

    first = await metering.begin(request(user), prompt_tokens=3, admit=admit, also=also)
    with pytest.raises(QuotaExceeded):
        await metering.begin(request(user), prompt_tokens=4, admit=admit, also=also)
    period = first.period
    assert seen == [
        (QuotaSnapshot(None, 3, period, 1), [(1, 1)]),
        (QuotaSnapshot(None, 7, period, 2), [None]),
    ]
    assert [r.id for r in await rows_of(env.engine, user)] == [first.row_id]
    await assert_counter(env.engine, user, 3)
    async with env.engine.connect() as conn:
        assert await read_counter(conn, user, "requests", "all") == 1
    await first.finish(UsageStatus.COMPLETED)


async def test_a_lone_start_with_a_limit_is_judged_from_its_counts_without_sqlalchemy(env: Env):
    """On PostgreSQL a lone start that a limit may refuse runs on a held connection, and
    its check gets the counts with no connection; on SQLite, SQLAlchemy's transaction."""
    postgres = env.engine.dialect.name == "postgresql"
    metering = env.metering()
    user = await env.user()
    also = [Increment("requests", "all", 1, limit=5)]
    given: list[AsyncConnection | None] = []

    async def admit(conn: AsyncConnection | None, quota: QuotaSnapshot, counted: Counted) -> None:
        given.append(conn)
        if quota.used > 10:
            raise QuotaExceeded("token quota reached")

    with counting_commits(env.engine) as commits:
        first = await metering.begin(request(user), prompt_tokens=4, admit=admit, also=also)
        second = await metering.begin(request(user), prompt_tokens=5, admit=admit, also=also)
        with pytest.raises(QuotaExceeded):
            await metering.begin(request(user), prompt_tokens=6, admit=admit, also=also)
        third = await metering.begin(request(user), prompt_tokens=1, admit=admit, also=also)
    assert commits == ([] if postgres else [1, 1, 1])
    assert len(given) == 4
    assert all((conn is None) is postgres for conn in given)
    assert [(m._snapshot.used, m._snapshot.seq) for m in (first, second, third)] == [
        (4, 1),
        (9, 2),
        (10, 3),
    ]
    rows = await rows_of(env.engine, user)
    assert sorted(r.id for r in rows) == sorted(m.row_id for m in (first, second, third))
    await assert_counter(env.engine, user, 10)
    async with env.engine.connect() as conn:
        assert await read_counter(conn, user, "requests", "all") == 3
    for meter in (first, second, third):
        await meter.finish(UsageStatus.COMPLETED)


async def test_a_lone_start_whose_check_needs_the_database_is_run_again_with_it(env: Env):
    """A check that cannot judge from the counts alone (a count to read, an event to
    queue) rolls the held connection's transaction back; the start then runs in
    SQLAlchemy's, counted once."""
    postgres = env.engine.dialect.name == "postgresql"
    metering = env.metering()
    user = await env.user()
    also = [Increment("requests", "all", 1, limit=5)]
    seen: list[tuple[bool, QuotaSnapshot, Counted]] = []

    async def admit(conn: AsyncConnection | None, quota: QuotaSnapshot, counted: Counted) -> None:
        seen.append((conn is None, quota, counted))
        if conn is None:
            raise TransactionNeeded
        await read_counter(conn, user, "requests", "all")

    with counting_commits(env.engine) as commits:
        meter = await metering.begin(request(user), prompt_tokens=4, admit=admit, also=also)
    assert commits == [1]
    judged = QuotaSnapshot(None, 4, meter.period, 1), [(1, 1)]
    assert seen == ([(True, *judged)] if postgres else []) + [(False, *judged)]
    assert [r.id for r in await rows_of(env.engine, user)] == [meter.row_id]
    await assert_counter(env.engine, user, 4)
    async with env.engine.connect() as conn:
        assert await read_counter(conn, user, "requests", "all") == 1
    # The held connection was rolled back, not replaced, and takes the next start.
    held = metering.writer._checked_start_connection._held

    async def admit_any(conn: AsyncConnection | None, quota: QuotaSnapshot, counted: Counted):
        pass

    with counting_commits(env.engine) as commits:
        again = await metering.begin(request(user), prompt_tokens=2, admit=admit_any, also=also)
    assert commits == ([] if postgres else [1])
    assert metering.writer._checked_start_connection._held is held
    assert again._snapshot.used == 6
    await meter.finish(UsageStatus.COMPLETED)
    await again.finish(UsageStatus.COMPLETED)


async def test_a_lone_start_of_a_user_without_webhooks_passing_a_threshold_queues_nothing(
    env: Env,
):
    """Nothing to look for, so on PostgreSQL it stays on the held connection."""
    postgres = env.engine.dialect.name == "postgresql"
    metering = env.metering(warnings=QuotaWarnings([50]))
    user = await env.user()
    await subscribe_webhook(env, user, "quota.warning")  # made after the request read it
    also = [Increment("requests", "all", 1, limit=5)]

    async def admit(conn: AsyncConnection | None, quota: QuotaSnapshot, counted: Counted) -> None:
        pass

    info = dataclasses.replace(request(user, token_limit=20), has_webhooks=False)
    with counting_commits(env.engine) as commits:
        meter = await metering.begin(info, prompt_tokens=12, admit=admit, also=also)
    assert commits == ([] if postgres else [1])
    await assert_counter(env.engine, user, 12)
    assert await queued_events(env, user) == []
    await meter.finish(UsageStatus.COMPLETED)


async def test_a_lone_start_passing_a_warning_threshold_queues_its_warning(env: Env):
    metering = env.metering(warnings=QuotaWarnings([50]))
    user = await env.user()
    await subscribe_webhook(env, user, "quota.warning")
    also = [Increment("requests", "all", 1, limit=5)]

    async def admit(conn: AsyncConnection | None, quota: QuotaSnapshot, counted: Counted) -> None:
        pass

    info = request(user, token_limit=20)
    first = await metering.begin(info, prompt_tokens=6, admit=admit, also=also)
    second = await metering.begin(info, prompt_tokens=6, admit=admit, also=also)
    await assert_counter(env.engine, user, 12)
    events = [json.loads(e.payload)["data"] for e in await queued_events(env, user)]
    assert [(e["quota_type"], e["used"], e["limit"]) for e in events] == [
        ("monthly_tokens", 12, 20)
    ]
    await first.finish(UsageStatus.COMPLETED)
    await second.finish(UsageStatus.COMPLETED)


async def test_starts_with_nothing_to_refuse_arriving_together_see_the_counters_one_by_one(
    env: Env,
):
    """Starts with no limit and nothing to admit go together as one statement on
    PostgreSQL (no transaction), beside starts that have a limit to check; each still
    sees its counters as if the starts ran one by one."""
    metering = env.metering()
    users = [await env.user() for _ in range(3)]
    requests_ = Increment("requests", "all", 1)

    async def admit(conn: AsyncConnection, quota: QuotaSnapshot, counted: Counted) -> None:
        pass

    def start(i: int) -> asyncio.Future[UsageMeter] | asyncio.Task[UsageMeter]:
        checked = i % 5 == 4  # these have something to admit: a transaction
        return asyncio.ensure_future(
            metering.begin(
                request(users[i % 3]),
                prompt_tokens=i + 1,
                admit=admit if checked else None,
                also=[requests_],
            )
        )

    with counting_commits(env.engine) as commits:
        meters = await asyncio.gather(*(start(i) for i in range(15)))
    if env.engine.dialect.name == "postgresql":
        assert len(commits) == 1, "only the starts with something to admit use a transaction"
    for user in users:
        mine = [m for m in meters if m.info.user_id == user]
        rows = await rows_of(env.engine, user)
        assert sorted(r.prompt_tokens for r in rows) == sorted(m.prompt_tokens for m in mine)
        await assert_counter(env.engine, user, sum(m.prompt_tokens for m in mine))
        async with env.engine.connect() as conn:
            assert await read_counter(conn, user, "requests", "all") == 5
            used, seq = await read_counter_state(conn, user, TOKENS, mine[0].period)
        # Each start saw the counter with its own prompt counted and a step of its own.
        seen = sorted((m._snapshot.seq, m._snapshot.used, m.prompt_tokens) for m in mine)
        assert [s for s, _, _ in seen] == list(range(1, 6)) and seq == 5
        assert seen[0][1] == seen[0][2] and seen[-1][1] == used
        for (_, before, _), (_, after, prompt) in itertools.pairwise(seen):
            assert after - before == prompt
    for meter in meters:
        await meter.finish(UsageStatus.COMPLETED)


async def test_checkpoints_and_ends_arriving_together_move_each_counter_once(env: Env):
    """Writes of users without webhooks, of several kinds (checkpoints, ends) and
    users, submitted together: one statement on PostgreSQL, one transaction run by the
    driver on SQLite (SQLAlchemy commits nothing). Every row takes its own values; each
    user's counter moves once, by the sum."""
    metering = env.metering()
    users = [await env.user() for _ in range(2)]
    quiet = [dataclasses.replace(request(u), has_webhooks=False) for u in users]
    meters = [await metering.begin(quiet[i % 2], prompt_tokens=1) for i in range(5)]
    async with env.engine.connect() as conn:
        before = [await read_counter_state(conn, u, TOKENS, meters[0].period) for u in users]

    def write(i: int, meter: UsageMeter) -> UsageWrite:
        row: dict[str, object] = {
            "row_id": meter.row_id,
            "completion_tokens": i,
            "total_tokens": 1 + i,
        }
        if i % 2:
            row.update(status=UsageStatus.COMPLETED, finish_reason="stop")
        user = meter.info.user_id
        return UsageWrite(row, user, meter.period, i, None, warnings=False)

    with counting_commits(env.engine) as commits:
        outcomes = await asyncio.gather(
            *(metering.writer.write(write(i, m)) for i, m in enumerate(meters))
        )
    assert commits == []
    rows = [await row_of(env.engine, m.row_id) for m in meters]
    assert [(r.completion_tokens, r.total_tokens) for r in rows] == [(i, 1 + i) for i in range(5)]
    assert [r.status for r in rows] == [
        UsageStatus.COMPLETED if i % 2 else UsageStatus.STREAMING for i in range(5)
    ]
    added = [0 + 2 + 4, 1 + 3]  # the deltas of users[0] (rows 0, 2, 4) and users[1]
    after = [(before[n][0] + added[n], before[n][1] + 1) for n in range(2)]
    for n, user in enumerate(users):
        await assert_counter(env.engine, user, after[n][0])
        async with env.engine.connect() as conn:
            assert await read_counter_state(conn, user, TOKENS, meters[0].period) == after[n]
    # Each write learns its user's counter after the batch; one that added nothing, None.
    assert outcomes == [None, *(after[i % 2] for i in range(1, 5))]


async def test_starts_with_nothing_to_refuse_go_together_without_sqlalchemy(env: Env):
    """Alone, starts with no limit and nothing to admit are run by the driver: one
    statement on PostgreSQL, one transaction on SQLite. Each sees its counters as if
    they ran one by one."""
    metering = env.metering()
    users = [await env.user() for _ in range(3)]
    with counting_commits(env.engine) as commits:
        meters = await asyncio.gather(
            *(metering.begin(request(users[i % 3]), prompt_tokens=i + 1) for i in range(12))
        )
    assert commits == []
    for user in users:
        mine = [m for m in meters if m.info.user_id == user]
        rows = await rows_of(env.engine, user)
        assert sorted(r.prompt_tokens for r in rows) == sorted(m.prompt_tokens for m in mine)
        await assert_counter(env.engine, user, sum(m.prompt_tokens for m in mine))
        seen = sorted((m._snapshot.seq, m._snapshot.used, m.prompt_tokens) for m in mine)
        assert [s for s, _, _ in seen] == [1, 2, 3, 4]
        for (_, before, _), (_, after, prompt) in itertools.pairwise([(0, 0, 0), *seen]):
            assert after - before == prompt
    for meter in meters:
        await meter.finish(UsageStatus.COMPLETED)


async def test_a_lone_write_to_a_row_that_does_not_exist_moves_no_counter(env: Env):
    """A counter stays the sum of the rows: a write of a user without webhooks whose
    row was never written (its start lost) adds nothing, on either database."""
    metering = env.metering()
    user = await env.user()
    meter = await metering.begin(
        dataclasses.replace(request(user), has_webhooks=False), prompt_tokens=2
    )
    async with env.engine.connect() as conn:
        before = await read_counter_state(conn, user, TOKENS, meter.period)
    row = {"row_id": "never-written", "completion_tokens": 9, "total_tokens": 9}
    ghost = UsageWrite(row, user, meter.period, 9, None, warnings=False)
    assert await metering.writer.write(ghost) is None
    async with env.engine.connect() as conn:
        assert await read_counter_state(conn, user, TOKENS, meter.period) == before
    await meter.finish(UsageStatus.COMPLETED, usage=Usage(prompt_tokens=2, completion_tokens=3))
    await assert_counter(env.engine, user, 5)


@pytest.mark.parametrize("billed", [0, -2], ids=["nothing more", "less"])
async def test_a_lone_end_adding_nothing_or_taking_back_keeps_row_and_counter_together(
    env: Env, billed: int
):
    """An end that adds nothing leaves the counter as it is, one step and all; one
    that bills less than its checkpoints did (the upstream's own count) takes back."""
    metering = env.metering()
    user = await env.user()
    info = dataclasses.replace(request(user), has_webhooks=False)
    meter = await metering.begin(info, prompt_tokens=2)
    deliver(meter, 5)  # a checkpoint: 7 tokens
    await wait_row(env.engine, meter.row_id, lambda r: r.total_tokens == 7, "7 tokens")
    await meter._flusher
    async with env.engine.connect() as conn:
        before = await read_counter_state(conn, user, TOKENS, meter.period)
    usage = Usage(prompt_tokens=2 + billed, completion_tokens=5)
    await meter.finish(UsageStatus.COMPLETED, usage=usage)
    row = await row_of(env.engine, meter.row_id)
    assert (row.status, row.total_tokens) == (UsageStatus.COMPLETED, 7 + billed)
    await assert_counter(env.engine, user, 7 + billed)
    async with env.engine.connect() as conn:
        after = await read_counter_state(conn, user, TOKENS, meter.period)
    assert after == (before if billed == 0 else (7 + billed, before[1] + 1))
