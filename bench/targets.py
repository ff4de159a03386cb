"""Starting and stopping what is measured: the fake upstream, the floor relay, Livegate,
LiteLLM.

Every server is a subprocess in its own session (so its whole group can be
signalled), logging to a file under the run directory, pinned with `taskset` when
the machine has two cores, and always stopped by `Proc.stop` (SIGTERM, then
SIGKILL after a bounded wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench import procstat
from bench.loadgen import chat_request

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_VERSION = "1.100.5"
HOST = "127.0.0.1"
PG_ADMIN = ["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "test"]
PG_DB = "livegate_bench"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Every model the scenarios ask for (see fake_upstream.behaviour).
MODELS = ["t16-d0", "t64-d20", "t64-d0", "t256-d0", "t20-d300-p100000"]

SERVER_CORE = 0
CLIENT_CORE = 1


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if pinning_available() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment without anything that would point a server elsewhere."""
    drop = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENVIRONMENT", "LIVEGATE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class Proc:
    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> list[int]:
        return procstat.tree(self.pid) if self.alive else []

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def http_status(port: int, path: str, wait: float = 2.0) -> int | None:
    """The status of one GET, or None if nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), wait)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), wait)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def wait_ready(proc: Proc, port: int, path: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        if await http_status(port, path) is not None:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {within:.0f}s:\n{proc.tail()}")


@dataclass
class Target:
    key: str
    label: str
    port: int = 0
    auth: str | None = None
    proc: Proc | None = None
    available: bool = True
    reason: str | None = None
    tokens_received: int = 0  # every token any client got from this target
    requests_ok: int = 0
    rss_start_kib: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    _requests: dict[tuple[str, bool], bytes] = field(default_factory=dict)

    def request(self, model: str, stream: bool) -> bytes:
        key = (model, stream)
        if key not in self._requests:
            self._requests[key] = chat_request(
                HOST, self.port, self.auth, model, stream, "/v1/chat/completions"
            )
        return self._requests[key]

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc is not None else []

    def unavailable(self, reason: str) -> None:
        self.available = False
        self.reason = reason


# --- the fake upstream ---------------------------------------------------------------


async def start_fake(run_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        "fake upstream",
        [*pin(CLIENT_CORE), sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port)],
        clean_env(),
        run_dir / "fake_upstream.log",
    )
    proc.start()
    await wait_ready(proc, port, "/health", 20)
    return proc, port


async def start_floor(run_dir: Path, fake_port: int) -> tuple[Proc, int]:
    """The floor relay (`floor_relay.py`), pinned like the servers under test."""
    port = free_port()
    proc = Proc(
        "floor relay",
        [
            *pin(SERVER_CORE),
            sys.executable,
            str(BENCH / "floor_relay.py"),
            "--port",
            str(port),
            "--upstream-port",
            str(fake_port),
        ],
        clean_env(),
        run_dir / "floor_relay.log",
    )
    proc.start()
    await wait_ready(proc, port, "/health", 20)
    return proc, port


# --- Livegate ------------------------------------------------------------------------


def livegate_toml(fake_port: int, redis_prefix: str) -> str:
    models = ", ".join(f'"{m}"' for m in MODELS)
    return f"""# Written by bench/run.py for one benchmark run.
[[providers]]
name = "fake"
kind = "openai"
base_url = "http://{HOST}:{fake_port}/v1"
api_key = "sk-bench-fake"
models = [{models}]

[tiers.bench]   # no keys: no rate limit, unlimited quotas

# Every limit checked on every request (rate, request quotas, token quota), none
# reached during a run: the path of a user on a paid or free tier.
[tiers.bench-limited]
requests_per_minute = 100000000
burst = 100000000
daily_requests = 100000000
weekly_requests = 100000000
monthly_requests = 100000000
monthly_tokens = 1000000000000

[metering]      # the defaults, spelt out
checkpoint_tokens = 20
checkpoint_ms = 250
push_interval_ms = 100
heartbeat_seconds = 10

[server]
redis_prefix = "{redis_prefix}"
"""


@dataclass
class LivegateEnv:
    """What one Livegate deployment (database, bus, config) shares across its instances."""

    name: str
    env: dict[str, str]
    database: str  # "postgresql" | "sqlite"
    sqlite_path: Path | None = None


def pg_reset() -> None:
    for sql in (
        f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)",
        f"CREATE DATABASE {PG_DB}",
    ):
        subprocess.run(
            [*PG_ADMIN, "-v", "ON_ERROR_STOP=1", "-qc", sql],
            check=True,
            capture_output=True,
            timeout=60,
        )


def pg_drop() -> None:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(
            [*PG_ADMIN, "-qc", f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"],
            capture_output=True,
            timeout=60,
        )


def services_available() -> str | None:
    """None if PostgreSQL and Redis answer, else why not."""
    try:
        subprocess.run(
            [*PG_ADMIN, "-qAtc", "select 1"], check=True, capture_output=True, timeout=10
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"PostgreSQL at 127.0.0.1:5432 unavailable ({type(exc).__name__})"
    try:
        with socket.create_connection((HOST, 6379), timeout=3) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return "Redis at 127.0.0.1:6379 did not answer PING"
    except OSError as exc:
        return f"Redis at 127.0.0.1:6379 unavailable ({exc})"
    return None


def livegate_env(run_dir: Path, name: str, fake_port: int, with_services: bool) -> LivegateEnv:
    base = run_dir / name
    base.mkdir(parents=True, exist_ok=True)
    config = base / "livegate.toml"
    config.write_text(livegate_toml(fake_port, f"lgbench-{run_dir.name}-{name}"))
    env = clean_env()
    env.update(
        ENVIRONMENT="development",
        JWT_SECRET=secrets.token_urlsafe(48),
        LIVEGATE_CONFIG=str(config),
        LIVEGATE_DATA_DIR=str(base / "data"),
    )
    if with_services:
        pg_reset()
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{PG_DB}"
        env["REDIS_URL"] = REDIS_URL
        return LivegateEnv(name, env, "postgresql")
    db = base / "livegate.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    env["DATABASE_URL"] = f"sqlite:///{db}"
    return LivegateEnv(name, env, "sqlite", db)


async def start_livegate(lg: LivegateEnv, run_dir: Path, instance: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        f"Livegate {lg.name}/{instance}",
        [
            *pin(SERVER_CORE),
            sys.executable,
            "-m",
            "app",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
        ],
        lg.env,
        run_dir / f"livegate-{lg.name}-{instance}.log",
    )
    proc.start()
    await wait_ready(proc, port, "/v1/models", 90)
    return proc, port


def create_bench_user(lg: LivegateEnv, email: str, tier: str = "bench") -> dict[str, str]:
    """The documented way: `python -m app users create ... --tier bench`."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "users",
            "create",
            "--email",
            email,
            "--password",
            "bench-password-not-secret",
            "--tier",
            tier,
        ],
        env=lg.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return json.loads(out.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def create_many_users(lg: LivegateEnv, count: int, prefix: str) -> list[dict[str, str]]:
    out = subprocess.run(
        [sys.executable, str(BENCH / "mkusers.py"), "--count", str(count), "--prefix", prefix],
        env=lg.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]


def sql_rows(lg: LivegateEnv, query: str) -> list[tuple[str, ...]]:
    """Rows of a read-only query against the deployment's database, as strings."""
    if lg.database == "postgresql":
        out = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                PG_DB,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAt",
                "-F",
                "\t",
                "-c",
                query,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return [tuple(line.split("\t")) for line in out.stdout.decode().splitlines() if line]
    import sqlite3

    assert lg.sqlite_path is not None
    conn = sqlite3.connect(f"file:{lg.sqlite_path}?mode=ro", uri=True, timeout=30)
    try:
        return [tuple("" if v is None else str(v) for v in row) for row in conn.execute(query)]
    finally:
        conn.close()


# --- LiteLLM -------------------------------------------------------------------------


def litellm_installed_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        timeout=60,
    )
    return out.stdout.decode().strip() or None if out.returncode == 0 else None


def ensure_litellm(log: Path) -> str:
    """Install `litellm[proxy]==1.100.5` into its own venv (once); its version, or raise."""
    version = litellm_installed_version()
    if version == LITELLM_VERSION and (LITELLM_VENV / "bin" / "litellm").exists():
        return version
    with log.open("wb") as fh:
        if not (LITELLM_VENV / "bin" / "python").exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(LITELLM_VENV)],
                check=True,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=300,
            )
        result = subprocess.run(
            [
                str(LITELLM_VENV / "bin" / "pip"),
                "install",
                "--disable-pip-version-check",
                f"litellm[proxy]=={LITELLM_VERSION}",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError("pip install failed: " + " | ".join(tail))
    version = litellm_installed_version()
    if version is None:
        raise RuntimeError("litellm installed but cannot be imported")
    return version


def litellm_config(fake_port: int) -> str:
    lines = ["model_list:"]
    for model in MODELS:
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: http://{HOST}:{fake_port}/v1",
            "      api_key: sk-bench-fake",
        ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "general_settings: {}",
    ]
    return "\n".join(lines) + "\n"


async def start_litellm(run_dir: Path, fake_port: int) -> tuple[Proc, int]:
    config = run_dir / "litellm.yaml"
    config.write_text(litellm_config(fake_port))
    port = free_port()
    env = clean_env()
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_MODE="PRODUCTION",  # no .env loading
        DISABLE_SCHEMA_UPDATE="true",
    )
    env.pop("DATABASE_URL", None)
    proc = Proc(
        "LiteLLM",
        [
            *pin(SERVER_CORE),
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env,
        run_dir / "litellm.log",
    )
    proc.start()
    await wait_ready(proc, port, "/health/liveliness", 240)
    return proc, port
