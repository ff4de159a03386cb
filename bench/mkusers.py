"""Create many bench users in one go and print `{"id", "token"}` per line.

For the `/ws/quota` scenarios, which need thousands of users: the CLI's
`users create` hashes a password and starts a process per user, far too slow for
10k. This inserts password-less users in bulk through Livegate's own table
definitions and signs their session tokens with the server's secret. It reads the
same environment as `python -m app` (DATABASE_URL, JWT_SECRET, LIVEGATE_CONFIG), and
expects the schema to exist (a server has started, or `python -m app migrate`).

    python bench/mkusers.py --count 10000 --prefix ws --tier bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.core.config import load_settings
from app.core.db import create_engine
from app.core.security import Secrets
from app.core.tables import users


async def create(count: int, prefix: str, tier: str) -> list[dict[str, str]]:
    settings = load_settings()
    if tier not in settings.tiers:
        raise SystemExit(f"unknown tier {tier!r}")
    secrets = Secrets.from_settings(settings)
    engine = create_engine(settings.database_url)
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4().hex,
            "email": f"{prefix}-{i}-{uuid.uuid4().hex[:8]}@bench.invalid",
            "username": None,
            "password_hash": None,
            "tier": tier,
            "role": "user",
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    try:
        async with engine.begin() as conn:
            for start in range(0, len(rows), 500):
                await conn.execute(users.insert(), rows[start : start + 500])
    finally:
        await engine.dispose()
    return [{"id": str(r["id"]), "token": secrets.issue_token(str(r["id"]))} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="ws")
    parser.add_argument("--tier", default="bench")
    args = parser.parse_args()
    out = asyncio.run(create(args.count, args.prefix, args.tier))
    sys.stdout.write("".join(json.dumps(u) + "\n" for u in out))


if __name__ == "__main__":
    main()
