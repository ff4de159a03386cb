"""`python -m app serve | migrate | users create`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import subprocess
import sys

from sqlalchemy.exc import SQLAlchemyError

from app.core.config import ConfigError, Settings, load_settings
from app.core.db import create_engine, migrate
from app.core.errors import ApiError
from app.core.security import Secrets
from app.core.users import ROLES, create_user, get_or_create_relay_key


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Livegate")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs per request)"
    )

    commands.add_parser("migrate", help="bring the database schema up to date")

    users = commands.add_parser("users", help="manage users")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    create = user_commands.add_parser("create", help="create a user; prints id, token, api_key")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True)
    create.add_argument("--tier", default=None)
    create.add_argument("--role", default="user", choices=ROLES)
    return parser


# A credential in a logged query string (browsers put their token in the URL of
# `/ws/quota`, an OAuth return brings a code or a token, and uvicorn logs paths with
# their query).
_QUERY_CREDENTIAL = re.compile(
    r"([?&](?:token|access_token|refresh_token|id_token|code)=)[^&\s\"]*", re.IGNORECASE
)


class _ConnectionLogFilter(logging.Filter):
    """Redacts credentials from uvicorn's per-connection lines; without access logs,
    drops the lines uvicorn and websockets write for every WebSocket too."""

    def __init__(self, access_log: bool) -> None:
        super().__init__()
        self.access_log = access_log

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        per_socket = message.startswith("connection ") or '"WebSocket ' in message
        if per_socket and not self.access_log:
            return False
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY_CREDENTIAL.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def serve(settings: Settings, host: str, port: int, access_log: bool = False) -> int:
    """Migrate, then serve until stopped; the exit status."""
    # The migration runs in a child process (it prints its own error, if any), so the
    # server never loads alembic: ~10 MiB less resident memory for its whole life.
    migrated = subprocess.run([sys.executable, "-m", "app", "migrate"], stdout=subprocess.DEVNULL)
    if migrated.returncode != 0:
        return migrated.returncode

    import uvicorn

    from app.api.http_protocol import HttpProtocol
    from app.main import create_app

    connection_lines = _ConnectionLogFilter(access_log)
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(connection_lines)

    uvicorn.run(
        create_app(settings, tune_gc=True, run_migrations=False),
        host=host,
        port=port,
        http=HttpProtocol,  # each response's head goes out with its body
        ws_max_size=64 * 1024,  # quota sockets only ever receive pings
        ws_per_message_deflate=False,  # small JSON frames: compression costs more than it saves
        timeout_graceful_shutdown=30,
        proxy_headers=False,
        server_header=False,
        access_log=access_log,
    )
    return 0


async def _migrate(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


async def _create_user(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    tier = args.tier or settings.server.default_tier
    if tier not in settings.tiers:
        raise ConfigError(f"unknown tier {tier!r}; configured: {', '.join(settings.tiers)}")
    engine = create_engine(settings.database_url)
    try:
        await migrate(engine)
        secrets = Secrets.from_settings(settings)
        user = await create_user(
            engine, email=args.email, password=args.password, tier=tier, role=args.role
        )
        api_key = await get_or_create_relay_key(engine, secrets, user.id)
        return {
            "id": user.id,
            "email": user.email,
            "tier": user.tier,
            "role": user.role,
            "token": secrets.issue_token(user.id),
            "api_key": api_key,
        }
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # httpx logs every upstream request at INFO: a line per relayed call on the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        if args.command == "serve":
            return serve(settings, args.host, args.port, args.access_log)
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
            print("database is up to date")
        elif args.command == "users":
            print(json.dumps(asyncio.run(_create_user(settings, args))))
    except (ConfigError, ApiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SQLAlchemyError) as exc:
        # An unreachable or broken database: one clear line, not a traceback.
        reason = getattr(exc, "orig", None) or exc
        print(f"error: database unavailable: {type(reason).__name__}: {reason}", file=sys.stderr)
        return 1
    return 0
