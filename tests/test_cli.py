"""`python -m app serve | migrate | users create`, run as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets.sync.client

from app.core.security import Secrets, verify_password

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {"users", "api_keys", "usage_logs", "quota_counters", "instances", "alembic_version"}
CLI_TIMEOUT = 120


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"JWT_SECRET", "LIVEGATE_CONFIG", "ENVIRONMENT", "REDIS_URL", "DATABASE_URL"}
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/cli.db"
    env["LIVEGATE_DATA_DIR"] = str(tmp_path / "data")
    return env


def run_cli(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=cwd or Path(env["LIVEGATE_DATA_DIR"]).parent,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def create_user(env: dict[str, str], email: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "users", "create", "--email", email, "--password", "pw-123456", *extra)


def sqlite_path(env: dict[str, str]) -> str:
    return env["DATABASE_URL"].removeprefix("sqlite:///")


def sqlite_tables(env: dict[str, str]) -> set[str]:
    with sqlite3.connect(sqlite_path(env)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# --- users create -------------------------------------------------------------------


def test_users_create_prints_id_token_and_key(cli_env: dict[str, str]):
    result = run_cli(
        cli_env,
        "users",
        "create",
        "--email",
        "Alice@Example.test",
        "--password",
        "s3cret-pass",
        "--tier",
        "basic",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    created = json.loads(lines[0])
    assert isinstance(created, dict)
    assert {"id", "token", "api_key"} <= set(created)
    assert created["tier"] == "basic"
    assert created["email"] == "alice@example.test"
    assert created["api_key"].startswith("sk-lg-")

    # The token is signed with the development secret persisted under the data dir.
    secret = (Path(cli_env["LIVEGATE_DATA_DIR"]) / "jwt_secret").read_text().strip()
    assert Secrets(secret).verify_token(created["token"]).subject == created["id"]

    with sqlite3.connect(sqlite_path(cli_env)) as db:
        key_rows = db.execute(
            "SELECT user_id, kind, key_ciphertext FROM api_keys WHERE key_hash = ?",
            (hashlib.sha256(created["api_key"].encode()).hexdigest(),),
        ).fetchall()
        user_row = db.execute(
            "SELECT email, tier, role, password_hash FROM users WHERE id = ?", (created["id"],)
        ).fetchone()
    assert [(r[0], r[1]) for r in key_rows] == [(created["id"], "relay")]
    assert created["api_key"] not in key_rows[0][2]
    email, tier, role, password_hash = user_row
    assert (email, tier, role) == ("alice@example.test", "basic", "user")
    assert password_hash.startswith("$argon2id$")
    assert verify_password(password_hash, "s3cret-pass")
    assert not verify_password(password_hash, "wrong")


def test_users_create_defaults_to_the_default_tier(cli_env: dict[str, str]):
    result = create_user(cli_env, "default@example.test")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tier"] == "free"


def test_users_create_role(cli_env: dict[str, str]):
    result = create_user(cli_env, "admin@example.test", "--role", "admin")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["role"] == "admin"
    bad = create_user(cli_env, "root@example.test", "--role", "root")
    assert bad.returncode == 2
    assert "role" in bad.stderr


def test_users_create_accepts_a_tier_from_the_config_file(cli_env: dict[str, str], tmp_path):
    config = tmp_path / "livegate.toml"
    config.write_text("[tiers.gold]\nmonthly_tokens = 5\n")
    cli_env["LIVEGATE_CONFIG"] = str(config)
    result = create_user(cli_env, "gold@example.test", "--tier", "gold")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tier"] == "gold"


@pytest.mark.parametrize("second", ["dup@example.test", "DUP@Example.Test", " dup@example.test "])
def test_duplicate_email_fails_cleanly(cli_env: dict[str, str], second: str):
    first = create_user(cli_env, "dup@example.test")
    assert first.returncode == 0, first.stderr
    again = create_user(cli_env, second)
    assert again.returncode != 0
    assert again.stdout.strip() == ""
    assert "Traceback" not in again.stderr
    assert "exists" in again.stderr and "email" in again.stderr
    with sqlite3.connect(sqlite_path(cli_env)) as db:
        assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1


def test_unknown_tier_exits_2(cli_env: dict[str, str]):
    result = create_user(cli_env, "tier@example.test", "--tier", "platinum")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "platinum" in result.stderr
    assert result.stdout.strip() == ""


def test_invalid_email_fails_cleanly(cli_env: dict[str, str]):
    result = create_user(cli_env, "not-an-email")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "email" in result.stderr


def test_missing_config_file_fails_cleanly(cli_env: dict[str, str], tmp_path: Path):
    cli_env["LIVEGATE_CONFIG"] = str(tmp_path / "missing.toml")
    result = create_user(cli_env, "cfg@example.test")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing.toml" in result.stderr


def test_production_without_secret_fails_cleanly(cli_env: dict[str, str]):
    cli_env["ENVIRONMENT"] = "production"
    result = create_user(cli_env, "prod@example.test")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "JWT_SECRET" in result.stderr
    assert not (Path(cli_env["LIVEGATE_DATA_DIR"]) / "jwt_secret").exists()


def test_production_token_is_signed_with_jwt_secret(cli_env: dict[str, str]):
    secret = "prod-secret-" + "p" * 40
    cli_env["ENVIRONMENT"] = "production"
    cli_env["JWT_SECRET"] = secret
    result = create_user(cli_env, "prod@example.test")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert Secrets(secret).verify_token(created["token"]).subject == created["id"]
    assert not (Path(cli_env["LIVEGATE_DATA_DIR"]) / "jwt_secret").exists()


def test_unreachable_database_fails_without_traceback(cli_env: dict[str, str]):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    cli_env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{closed_port}/nope"
    result = run_cli(cli_env, "migrate")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "database" in result.stderr.lower()


# --- migrate ------------------------------------------------------------------------


def test_migrate_creates_the_tables_on_a_fresh_sqlite_db(cli_env: dict[str, str]):
    assert not Path(sqlite_path(cli_env)).exists()
    result = run_cli(cli_env, "migrate")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sqlite_tables(cli_env) >= TABLES
    # Idempotent: a second run changes nothing and succeeds.
    again = run_cli(cli_env, "migrate")
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(sqlite_path(cli_env)) as db:
        assert len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1


def test_migrate_creates_missing_parent_directories(cli_env: dict[str, str], tmp_path: Path):
    cli_env["DATABASE_URL"] = f"sqlite:///{tmp_path}/deep/er/cli.db"
    result = run_cli(cli_env, "migrate")
    assert result.returncode == 0, result.stderr
    assert sqlite_tables(cli_env) >= TABLES


@pytest.fixture
def fresh_postgres_db(postgres_url: str) -> Iterator[str]:
    """An empty PostgreSQL database of its own (the session database is shared)."""
    name = f"livegate_cli_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def postgres_tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    return {row["table_name"] for row in rows}


def test_migrate_creates_the_tables_on_postgres(cli_env: dict[str, str], fresh_postgres_db: str):
    assert asyncio.run(postgres_tables(fresh_postgres_db)) == set()
    cli_env["DATABASE_URL"] = fresh_postgres_db
    result = run_cli(cli_env, "migrate")
    assert result.returncode == 0, result.stderr
    assert asyncio.run(postgres_tables(fresh_postgres_db)) >= TABLES
    again = run_cli(cli_env, "migrate")
    assert again.returncode == 0, again.stderr

    created = create_user(cli_env, "pg@example.test")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["api_key"].startswith("sk-lg-")


# --- serve --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[httpx.Client]:
    """`python -m app serve` on a free port, logging to `serve.log` in `tmp_path`; a
    client once it answers HTTP."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port), *args],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while True:
                assert proc.poll() is None, f"serve exited early:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"serve never answered:\n{log_path.read_text()}"
                try:
                    http.get("/v1/models")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            yield http
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_answers_v1_models_with_a_key(cli_env: dict[str, str], tmp_path: Path):
    created = create_user(cli_env, "serve@example.test")
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)

    with served(cli_env, tmp_path) as http:
        response = http.get("/v1/models", headers={"Authorization": f"Bearer {account['api_key']}"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list"
        # No provider configured: the built-in echo model answers offline.
        assert [m["id"] for m in body["data"]] == ["echo"]
        assert response.headers.get("x-request-id")

        unauthenticated = http.get("/v1/models")
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"]["type"] == "authentication_error"

        # The JWT from the CLI works against the server: same persisted secret.
        profile = http.get(
            "/api/user/profile", headers={"Authorization": f"Bearer {account['token']}"}
        )
        assert profile.status_code == 200, profile.text
        assert profile.json()["user"]["id"] == account["id"]


def test_serve_migrates_a_fresh_database_before_answering(cli_env: dict[str, str], tmp_path: Path):
    with served(cli_env, tmp_path) as http:
        assert http.get("/v1/models").status_code == 401
    assert sqlite_tables(cli_env) >= TABLES


@pytest.mark.parametrize("access_log", [False, True])
def test_serve_never_logs_a_token_from_a_websocket_url(
    cli_env: dict[str, str], tmp_path: Path, access_log: bool
):
    created = create_user(cli_env, "socket-log@example.test")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    args = ["--access-log"] if access_log else []
    with served(cli_env, tmp_path, *args) as http:
        url = f"{http.base_url}/ws/quota?deviceId=d1&token={token}".replace("http", "ws", 1)
        with websockets.sync.client.connect(url) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "quota"
        http.get("/v1/models", params={"token": token})  # an HTTP line with one too
        # The AnkiLingoFlash OAuth page, given its token in the query.
        http.get("/oauth-redirect", params={"access_token": token})
    log = (tmp_path / "serve.log").read_text()
    assert token not in log
    if access_log:
        assert '"WebSocket /ws/quota?deviceId=d1&token=***" [accepted]' in log
        assert "/v1/models?token=*** HTTP/1.1" in log
        assert "/oauth-redirect?access_token=*** HTTP/1.1" in log
    else:
        assert "WebSocket" not in log and "connection open" not in log


def test_serve_on_an_unreachable_database_exits_without_traceback(cli_env: dict[str, str]):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    cli_env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{closed_port}/nope"
    result = run_cli(cli_env, "serve", "--port", str(free_port()))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "database unavailable" in result.stderr
