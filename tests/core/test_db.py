"""`single_reads`: hot-path reads without transaction round trips on PostgreSQL, and
the pool they share still hands out transactional connections afterwards."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from app.core.db import create_engine, single_reads

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
