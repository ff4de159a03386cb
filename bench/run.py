"""Livegate benchmarks: direct upstream vs Livegate vs LiteLLM proxy, side by side.

    python bench/run.py            # full run (~35-45 min), then BENCHMARKS.md + bench/plots/
    python bench/run.py --quick    # short smoke run (~8 min)

One run starts a fake OpenAI upstream, Livegate on PostgreSQL + Redis and on the
embedded defaults (SQLite + in-process bus), and LiteLLM proxy (installed into
bench/.venv-litellm on first use), all on loopback; pins the server under test to
core 0 and the load generator + fake upstream to core 1; runs every scenario of
issue 5 in interleaved rounds; checks metering; and rewrites BENCHMARKS.md and the
plots. It never fails on a number: it reports. Raw results go to
bench/results/last-run.json (`--report-only` re-renders from it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import procstat, targets  # noqa: E402
from bench.targets import Proc, Target  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"
REQUIREMENTS = ROOT / "bench" / "requirements.txt"


@dataclass
class Plan:
    rounds: int
    warmup: float  # seconds of each warm-up load
    s1_levels: list[int]
    s1_duration: float
    s2_paced_streams: int  # paced streams at c=1 per round
    s2_duration: float  # each unpaced run
    s3_levels: list[int]
    s3_duration: float
    s3_budget: float  # seconds per target
    s3_baseline_streams: int  # streams per worker at concurrency 1 (the baseline)
    ws_steps: list[int]
    ws_parallel: int
    ws_hold: float
    ws_budget: float
    push_levels: list[int]  # users with a socket each (~3.3 pushes/s per user)
    push_duration: float
    push_rounds: int
    timeout: float = 30.0  # per request
    total_budget: float = 0.0  # seconds for the whole measurement phase


QUICK = Plan(
    rounds=2,
    warmup=1.5,
    s1_levels=[1, 10, 50],
    s1_duration=2.0,
    s2_paced_streams=4,
    s2_duration=2.0,
    s3_levels=[1, 25, 50, 100, 200, 400],
    s3_duration=2.6,
    s3_budget=60,
    s3_baseline_streams=5,
    ws_steps=[5000, 10000],
    ws_parallel=64,
    ws_hold=3.0,
    ws_budget=180,
    push_levels=[30, 300],
    push_duration=8.0,
    push_rounds=3,
    total_budget=30 * 60,
)
FULL = Plan(
    rounds=5,
    warmup=4.0,
    s1_levels=[1, 10, 50],
    s1_duration=8.0,
    s2_paced_streams=12,
    s2_duration=6.0,
    s3_levels=[1, 10, 25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1000],
    s3_duration=8.0,
    s3_budget=240,
    s3_baseline_streams=12,
    ws_steps=[5000, 10000],
    ws_parallel=64,
    ws_hold=30.0,  # past the server's 25 s ping, so the sockets must answer one
    ws_budget=300,
    push_levels=[30, 300],
    push_duration=30.0,
    push_rounds=5,
    total_budget=120 * 60,
)
# Scenario 1b: the non-stream relay for a user on a limited tier.
S1_LIMITED_LEVELS = [1, 50]
PACED_STREAM_SECONDS = 64 * 0.020
PUSH_MODEL = "t20-d300-p100000"
PUSH_STREAM_SECONDS = 20 * 0.300

METHOD = [
    "Fake upstream: `bench/fake_upstream.py` (raw asyncio + httptools on uvloop). The model "
    "name selects the answer: `t16-d0` non-stream 16 tokens; `t64-d20` 64 tokens 20 ms apart; "
    "`t64-d0` / `t256-d0` unpaced; every stream sends a role chunk, the tokens, a finish "
    "chunk, the usage chunk when asked (`include_usage`) and `[DONE]`.",
    "Load generator: `bench/loadgen.py`, closed loop on keep-alive HTTP/1.1 connections "
    "(asyncio + httptools on uvloop), bounded by a duration and a request count, 30 s "
    "timeout per request; tokens are counted in the bytes received.",
    "Livegate: `python -m app serve` (uvicorn, one worker, its defaults), tier `bench` with "
    "no keys (no rate limit, unlimited quotas), `[metering]` defaults, user created with "
    "`python -m app users create --tier bench`, its relay key as Bearer. Fresh database per "
    "run (`livegate_bench` on PostgreSQL 127.0.0.1:5432; a new SQLite file). Scenario 1b: a "
    "second user on tier `bench-limited` (a rate, daily/weekly/monthly request quotas and a "
    "token quota, none reached), its session JWT as Bearer.",
    "LiteLLM proxy: `litellm[proxy]==1.100.5` in `bench/.venv-litellm`, "
    "`litellm --config ... --num_workers 1`, `LITELLM_LOCAL_MODEL_COST_MAP=True`, no "
    "database, no master key, `model_list` entries `openai/<model>` with `api_base` at the "
    "fake upstream.",
    "Pinning: the server under test with `taskset -c 0`, the fake upstream with "
    "`taskset -c 1`, the harness (load generator, WebSocket clients) on core 1 via "
    "`sched_setaffinity`. Every server is idle while another is measured.",
    "Order: targets are interleaved within each round (rotated each round) so drift in "
    "the machine's load hits every target alike; each target is warmed up first.",
]


# --- setup -------------------------------------------------------------------------------


def ensure_requirements(install: bool) -> None:
    missing = []
    for module in ("matplotlib", "httptools", "uvloop"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-r", str(REQUIREMENTS)]
    if not install:
        sys.exit(f"missing {', '.join(missing)}: run `{' '.join(cmd)}`")
    print(f"installing bench requirements ({', '.join(missing)})", flush=True)
    subprocess.run(cmd, check=True, timeout=900)


def raise_fd_limit() -> int:
    """Room for 10k sockets in the harness and (inherited) in each server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 32768:
        with contextlib.suppress(ValueError, OSError):  # raising the hard limit needs root
            resource.setrlimit(resource.RLIMIT_NOFILE, (32768, 32768))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_meta() -> dict[str, Any]:
    # A hypervisor may name every generation alike ("AMD EPYC"): family and model tell
    # runs on different hardware apart.
    cpu: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            break  # the first processor's block is enough
        cpu.setdefault(key.strip(), value.strip())
    cpu_model = cpu.get("model name", "?")
    if "cpu family" in cpu and "model" in cpu:
        cpu_model += f" (family {cpu['cpu family']}, model {cpu['model']})"
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    packages = {}
    for name in (
        "starlette",
        "uvicorn",
        "httpx",
        "SQLAlchemy",
        "asyncpg",
        "aiosqlite",
        "redis",
        "websockets",
        "uvloop",
        "httptools",
        "pydantic",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)

    def sh(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=15, cwd=ROOT)
            return out.stdout.decode().strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = sh(["git", "rev-parse", "--short", "HEAD"]) or "?"
    dirty = sh(["git", "status", "--porcelain", "--", "app"])
    pg = sh([*targets.PG_ADMIN, "-qAtc", "show server_version"]) or "unavailable"
    redis = "unavailable"
    for line in sh(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "info", "server"]).splitlines():
        if line.startswith("redis_version:"):
            redis = line.split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "livegate": f"{commit}{' + uncommitted changes in app/' if dirty else ''}",
        "postgresql": pg,
        "redis": redis,
    }


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    plan: Plan
    mode: str
    run_dir: Path
    skip_litellm: bool
    profile_seconds: float
    fd_limit: int = 0
    procs: list[Proc] = field(default_factory=list)
    res: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def stop(self, proc: Proc | None) -> None:
        if proc is not None:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)


def _store(node: dict[str, Any], key: str, result: dict[str, Any]) -> None:
    """Append a round; keep the raw samples of the latest round only."""
    entry = node.setdefault(key, {"rounds": []})
    for old in entry["rounds"]:
        for k in [k for k in old if k.endswith("sample_ms")]:
            del old[k]
    entry["rounds"].append(result)


async def setup_targets(run: Run, fake_port: int, fake: Proc) -> dict[str, Target]:
    ts: dict[str, Target] = {}
    direct = Target("direct", "direct (fake upstream)", fake_port, None, fake)
    direct.extra["description"] = "the fake upstream called directly: the physical limit"
    ts["direct"] = direct
    floor = Target("floor", "floor (bare relay)")
    floor.extra["description"] = (
        "Livegate's HTTP stack and nothing else: uvicorn serving a bare ASGI app that "
        "forwards each request through aiohttp (bench/floor_relay.py)"
    )
    ts["floor"] = floor
    try:
        floor.proc, floor.port = await targets.start_floor(run.run_dir, fake_port)
        run.procs.append(floor.proc)
    except (OSError, RuntimeError) as exc:
        floor.unavailable(f"{type(exc).__name__}: {str(exc)[:300]}")

    services = targets.services_available()
    for key, label, with_services in (
        ("lg_pg", "Livegate (PG+Redis)", True),
        ("lg_sqlite", "Livegate (SQLite)", False),
    ):
        t = Target(key, label)
        t.extra["description"] = (
            "one uvicorn worker on PostgreSQL + Redis, as in production"
            if with_services
            else "one uvicorn worker on the embedded defaults: SQLite + in-process bus"
        )
        ts[key] = t
        if with_services and services:
            t.unavailable(services)
            continue
        try:
            lg = targets.livegate_env(run.run_dir, key, fake_port, with_services)
            user = targets.create_bench_user(lg, f"bench-{key}@example.com")
            limited_user = targets.create_bench_user(
                lg, f"bench-{key}-limited@example.com", tier="bench-limited"
            )
            proc, port = await targets.start_livegate(lg, run.run_dir, "main")
            run.procs.append(proc)
            t.port, t.auth, t.proc = port, user["api_key"], proc
            # The same server, for a user on a limited tier signed in with a JWT.
            limited = Target(
                f"{key}_limited", f"{label}, limited tier", port, limited_user["token"], proc
            )
            t.extra.update(
                user_id=user["id"], env=lg, limited=limited, limited_user_id=limited_user["id"]
            )
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            t.unavailable(f"{type(exc).__name__}: {str(exc)[:300]}")

    lite = Target("litellm", "LiteLLM proxy")
    lite.extra["description"] = (
        "LiteLLM proxy 1.100.5, one uvicorn worker, no database, local cost map"
    )
    ts["litellm"] = lite
    if run.skip_litellm:
        lite.unavailable("skipped with --skip-litellm")
    else:
        try:
            run.log("LiteLLM: checking/installing bench/.venv-litellm ...")
            version = targets.ensure_litellm(run.run_dir / "litellm-install.log")
            run.res["meta"]["litellm"] = version
            proc, port = await targets.start_litellm(run.run_dir, fake_port)
            run.procs.append(proc)
            lite.port, lite.proc = port, proc
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            lite.unavailable(f"{type(exc).__name__}: {str(exc)[:300]}")
    if not lite.available:
        run.res["meta"]["litellm"] = f"unavailable ({lite.reason})"
    return ts


def _alive(run: Run, t: Target) -> bool:
    if t.available and t.proc is not None and not t.proc.alive:
        t.unavailable(f"process died during the run:\n{t.proc.tail(5)}")
        run.notes.append(f"{t.label} stopped during the run; later figures are missing.")
    return t.available


async def measure_http(run: Run, ts: dict[str, Target]) -> None:
    from bench import scenarios

    plan, res = run.plan, run.res
    active = [t for t in ts.values() if t.available]
    s5 = res.setdefault("s5", {})
    for t in active:
        s5[t.key] = {"start_kib": procstat.rss_kib(t.pids())}
    run.log("warm-up")
    for t in active:
        await scenarios.nonstream(t, 10, plan.warmup, 100_000, plan.timeout)
        if isinstance(limited := t.extra.get("limited"), Target):
            await scenarios.nonstream(limited, 10, plan.warmup, 100_000, plan.timeout)
        await scenarios.streams(
            t, "t64-d0", 10, plan.warmup, 100_000, plan.timeout, record_times=False
        )
    await asyncio.sleep(2)
    for t in active:
        s5[t.key]["idle_kib"] = procstat.rss_kib(t.pids())
        s5[t.key]["load_peak_kib"] = 0

    def peak(t: Target, r: dict[str, Any]) -> None:
        s5[t.key]["load_peak_kib"] = max(s5[t.key]["load_peak_kib"], int(r["rss_peak_kib"]))

    for rnd in range(plan.rounds):
        order = [t for t in active[rnd % len(active) :] + active[: rnd % len(active)]]
        run.log(f"round {rnd + 1}/{plan.rounds}: {', '.join(t.key for t in order)}")
        for c in plan.s1_levels:
            for t in order:
                if not _alive(run, t):
                    continue
                r = await scenarios.nonstream(
                    t, c, plan.s1_duration, int(plan.s1_duration * 20_000), plan.timeout
                )
                _store(res.setdefault("s1", {}).setdefault(str(c), {}), t.key, r)
                if c == max(plan.s1_levels):
                    peak(t, r)
        for c in S1_LIMITED_LEVELS:
            for t in order:
                limited = t.extra.get("limited")
                if not isinstance(limited, Target) or not _alive(run, t):
                    continue
                r = await scenarios.nonstream(
                    limited, c, plan.s1_duration, int(plan.s1_duration * 20_000), plan.timeout
                )
                _store(res.setdefault("s1_limited", {}).setdefault(str(c), {}), t.key, r)
        for t in order:
            if not _alive(run, t):
                continue
            r = await scenarios.streams(
                t,
                "t64-d20",
                1,
                plan.s2_paced_streams * PACED_STREAM_SECONDS * 3,
                plan.s2_paced_streams,
                plan.timeout,
                record_times=True,
            )
            _store(res.setdefault("s2", {}).setdefault("paced_c1", {}), t.key, r)
        for name, model, c in (
            ("unpaced64_c1", "t64-d0", 1),
            ("unpaced64", "t64-d0", 50),
            ("unpaced256", "t256-d0", 10),
        ):
            for t in order:
                if not _alive(run, t):
                    continue
                r = await scenarios.streams(
                    t,
                    model,
                    c,
                    plan.s2_duration,
                    int(plan.s2_duration * 10_000),
                    plan.timeout,
                    record_times=False,
                )
                _store(res.setdefault("s2", {}).setdefault(name, {}), t.key, r)
                if c > 1:
                    peak(t, r)

    if run.profile_seconds > 0:
        await profile(run, ts)

    run.log("scenario 3: concurrent paced streams")
    for t in active:
        if t.key == "floor" or not _alive(run, t):
            continue
        run.log(f"  ramp {t.key}")
        ramp = await scenarios.ramp(
            t,
            plan.s3_levels,
            plan.s3_duration,
            plan.timeout,
            PACED_STREAM_SECONDS,
            plan.s3_budget,
            baseline_duration=plan.s3_baseline_streams * PACED_STREAM_SECONDS,
        )
        res.setdefault("s3", {})[t.key] = ramp
        for p in ramp["points"]:
            s5[t.key].setdefault("ramp_peak_kib", 0)
            s5[t.key]["ramp_peak_kib"] = max(s5[t.key]["ramp_peak_kib"], p["rss_peak_kib"])


async def profile(run: Run, ts: dict[str, Target]) -> None:
    """py-spy on one Livegate under a mixed load (non-stream and unpaced streams, c=50)."""
    from bench import scenarios

    t = next((ts[k] for k in ("lg_pg", "lg_sqlite") if ts[k].available), None)
    pyspy = shutil.which("py-spy")
    if t is None or not pyspy or t.proc is None:
        run.notes.append("profile requested but py-spy or Livegate unavailable")
        return
    secs = run.profile_seconds
    raw = run.run_dir / f"profile-{t.key}.txt"
    run.log(f"profiling {t.key} for {secs:.0f}s with py-spy")
    spy = await asyncio.create_subprocess_exec(
        *[
            pyspy,
            "record",
            "--pid",
            str(t.proc.pid),
            "--duration",
            str(int(secs)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)
        await scenarios.nonstream(t, 50, secs / 2, 10**6, run.plan.timeout)
        await scenarios.streams(
            t, "t64-d0", 50, secs / 2, 10**6, run.plan.timeout, record_times=False
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(spy.wait(), 60)
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    if not raw.exists():
        run.notes.append("py-spy produced no profile (ptrace not permitted?)")
        return
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0

    def function(frame: str) -> tuple[str, bool]:
        """`name (file:line)` → `name (file)`, and whether it is Livegate's code."""
        name, _, where = frame.partition(" (")
        path = where.rstrip(")").rsplit(":", 1)[0].replace(str(ROOT) + "/", "")
        return f"{name} ({path})", path.startswith("app/") or "/app/" in path

    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_c[frames[-1][0]] += n
        for f in {f for f, ours in frames if ours}:
            if not f.startswith(("<module>", "main ", "serve ")):
                incl[f] += n

    def short(f: str) -> str:
        return f

    run.res["profile"] = {
        "target": t.label,
        "seconds": secs,
        "load": "non-stream c=50 then 64-token unpaced streams c=50",
        "samples": total,
        "self": [(short(f), 100 * n / total) for f, n in self_c.most_common(20)] if total else [],
        "app_inclusive": [(short(f), 100 * n / total) for f, n in incl.most_common(25)]
        if total
        else [],
        "raw": str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw),
    }


def _streaming_rows(lg: targets.LivegateEnv, where: str) -> int:
    rows = targets.sql_rows(
        lg, f"select count(*) from usage_logs where status = 'streaming' and {where}"
    )
    return int(rows[0][0]) if rows else 0


async def metering_check(
    run: Run, lg: targets.LivegateEnv, what: str, user_ids: list[str], client_tokens: int
) -> dict[str, Any]:
    ids = ",".join(f"'{u}'" for u in user_ids)
    where = f"user_id in ({ids})"
    for _ in range(60):  # finalizing is asynchronous: give it up to 30 s
        if _streaming_rows(lg, where) == 0:
            break
        await asyncio.sleep(0.5)
    rows = targets.sql_rows(
        lg,
        "select status, count(*), coalesce(sum(completion_tokens), 0), "
        f"coalesce(sum(total_tokens), 0) from usage_logs where {where} group by status",
    )
    by_status = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}
    counter = targets.sql_rows(
        lg,
        f"select coalesce(sum(used), 0) from quota_counters where metric = 'tokens' and {where}",
    )
    counter_used = int(counter[0][0]) if counter else 0
    completed = by_status.get("completed", (0, 0, 0))
    total_tokens = sum(v[2] for v in by_status.values())
    return {
        "what": what,
        "client_tokens": client_tokens,
        "completed_rows": completed[0],
        "completed_tokens": completed[1],
        "other_rows": ", ".join(
            f"{s}: {v[0]} rows, {v[1]} tokens" for s, v in by_status.items() if s != "completed"
        ),
        "difference": completed[1] - client_tokens,
        "counter": counter_used,
        "counter_matches": counter_used == total_tokens,
    }


async def measure_ws(run: Run, ts: dict[str, Target], fake_port: int) -> None:
    """Scenario 4 on fresh instances of each Livegate deployment."""
    from bench import scenarios

    plan = run.plan
    s4 = run.res.setdefault("s4", {"idle": {}, "push": {}})
    for key in ("lg_pg", "lg_sqlite"):
        main = ts[key]
        lg: targets.LivegateEnv | None = main.extra.get("env")  # type: ignore[assignment]
        if lg is None or not main.available:
            continue
        run.log(f"scenario 4 ({key}): creating users")
        n_idle = max(plan.ws_steps)
        try:
            users = targets.create_many_users(lg, n_idle + max(plan.push_levels), f"ws-{key}")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            run.notes.append(f"{main.label}: could not create the WebSocket users: {exc}")
            continue
        idle_users, push_users = users[:n_idle], users[n_idle:]
        a: Proc | None = None
        b: Proc | None = None
        try:
            a, port_a = await targets.start_livegate(lg, run.run_dir, "wsA")
            run.procs.append(a)
            run.log(f"scenario 4 ({key}): {', '.join(map(str, plan.ws_steps))} idle sockets")
            s4["idle"][key] = await scenarios.ws_idle(
                port_a,
                a.pids(),
                idle_users,
                plan.ws_steps,
                parallel=plan.ws_parallel,
                settle=2.0,
                hold=plan.ws_hold,
                budget=plan.ws_budget,
            )
            if not a.alive:
                raise RuntimeError(f"instance A died holding sockets:\n{a.tail(5)}")
            # The push test on a fresh instance again, so the idle sockets' memory and
            # their teardown do not weigh on it.
            run.stop(a)
            a, port_a = await targets.start_livegate(lg, run.run_dir, "pushA")
            run.procs.append(a)
            instances = {"A": port_a}
            if lg.database == "postgresql":
                b, port_b = await targets.start_livegate(lg, run.run_dir, "pushB")
                run.procs.append(b)
                instances["B"] = port_b
            counter = Target(f"{key}_push", "push streams", port_a)
            levels = s4["push"].setdefault(key, [])
            for n in plan.push_levels:
                rounds = []
                for r in range(plan.push_rounds):
                    run.log(
                        f"scenario 4 ({key}): push latency, {n} users, "
                        f"round {r + 1}/{plan.push_rounds}"
                    )
                    async with contextlib.AsyncExitStack() as stack:
                        probe = None
                        if lg.database == "postgresql":
                            probe = await stack.enter_async_context(
                                scenarios.CommitProbe(lg.env["DATABASE_URL"])
                            )
                        result = await scenarios.ws_push(
                            counter,
                            instances,
                            push_users[:n],
                            model=PUSH_MODEL,
                            stream_seconds=PUSH_STREAM_SECONDS,
                            duration=plan.push_duration,
                            parallel=plan.ws_parallel,
                        )
                    if probe is not None:
                        result["db_commit"] = probe.summary()
                    rounds.append(result)
                    await asyncio.sleep(1)
                levels.append(scenarios.push_level(rounds))
            check = await metering_check(
                run,
                lg,
                "ws push streams",
                [u["id"] for u in push_users],
                counter.tokens_received,
            )
            run.res.setdefault("metering", {}).setdefault(key, []).append(check)
        except (OSError, RuntimeError, subprocess.SubprocessError, TimeoutError) as exc:
            run.notes.append(f"{main.label}: scenario 4 incomplete: {type(exc).__name__}: {exc}")
        finally:
            run.stop(a)
            run.stop(b)


async def main_async(run: Run) -> None:
    res = run.res
    res["plan"] = asdict(run.plan)
    started = time.time()
    res["meta"] = {
        **machine_meta(),
        "mode": run.mode,
        "rounds": run.plan.rounds,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
        "fd_limit": run.fd_limit,
        "method": METHOD,
        "warnings": [],
    }
    pinned = targets.pinning_available()
    res["meta"]["pinning"] = (
        "server under test on core 0 (taskset -c 0); load generator and fake upstream on core 1"
        if pinned
        else "none (taskset missing or fewer than 2 cores): every process shares every core"
    )
    if pinned:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {targets.CLIENT_CORE})
    run.log(f"run directory {run.run_dir}")
    fake, fake_port = await targets.start_fake(run.run_dir)
    run.procs.append(fake)
    ts = await setup_targets(run, fake_port, fake)
    res["targets"] = {
        k: {
            "label": t.label,
            "available": t.available,
            "reason": t.reason,
            "description": t.extra.get("description", ""),
        }
        for k, t in ts.items()
    }
    for k, t in ts.items():
        run.log(f"{k}: {'ready on port ' + str(t.port) if t.available else t.reason}")
    try:
        async with asyncio.timeout(run.plan.total_budget):
            await measure_http(run, ts)
            for key in ("lg_pg", "lg_sqlite"):
                t = ts[key]
                lg = t.extra.get("env")
                limited = t.extra.get("limited")
                if (
                    t.available
                    and isinstance(lg, targets.LivegateEnv)
                    and isinstance(limited, Target)
                ):
                    check = await metering_check(
                        run,
                        lg,
                        "HTTP scenarios 1-3",
                        [str(t.extra["user_id"]), str(t.extra["limited_user_id"])],
                        t.tokens_received + limited.tokens_received,
                    )
                    res.setdefault("metering", {}).setdefault(key, []).append(check)
            # The HTTP targets are done: stop them so scenario 4 has core 0 to itself.
            for t in ts.values():
                if t.key != "direct":
                    run.stop(t.proc)
            await measure_ws(run, ts, fake_port)
    except TimeoutError:
        run.notes.append(
            f"the run hit its time budget ({run.plan.total_budget:.0f} s); later scenarios "
            "are missing"
        )
    for k, t in ts.items():
        res["targets"][k].update(available=t.available, reason=t.reason)
    res["meta"]["loadavg_end"] = loadavg()
    res["meta"]["seconds"] = time.time() - started


def warnings_for(res: dict[str, Any]) -> list[str]:
    meta = res["meta"]
    out = []
    if meta.get("mode") == "quick":
        out.append(
            "quick mode: short runs and few rounds; the figures are indicative only, "
            "`python bench/run.py` (full mode) is the reference."
        )
    la = max(meta.get("loadavg_start", 0), meta.get("loadavg_end", 0))
    if la > 0.7:
        out.append(
            f"the machine was not quiet (1-minute load average up to {la:.2f} outside the "
            "benchmark's own processes at start/end): other work shared the two cores, so "
            "absolute figures are noisy; ratios within a round are more robust."
        )
    if "none" in str(meta.get("pinning", "")):
        out.append("no CPU pinning: server and load generator competed for the same cores.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (~8 min)")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument(
        "--profile",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sample Livegate with py-spy under load for this long "
        "(default 10 quick / 20 full when py-spy is installed; 0: off)",
    )
    parser.add_argument("--no-install", action="store_true", help="never pip install anything")
    parser.add_argument("--keep-db", action="store_true", help="keep the livegate_bench database")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render BENCHMARKS.md and plots from bench/results/last-run.json",
    )
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    ensure_requirements(not args.no_install)
    from bench import report

    RESULTS.mkdir(parents=True, exist_ok=True)
    last = RESULTS / "last-run.json"
    if args.report_only:
        res = json.loads(last.read_text())
        report.write(res, Path(args.output))
        print(f"wrote {args.output}")
        return

    fd_limit = raise_fd_limit()
    if WORK.exists():  # keep the logs of the last few runs only
        for old in sorted(p for p in WORK.iterdir() if p.is_dir())[:-3]:
            shutil.rmtree(old, ignore_errors=True)
    run_dir = WORK / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(
        plan=QUICK if args.quick else FULL,
        mode="quick" if args.quick else "full",
        run_dir=run_dir,
        skip_litellm=args.skip_litellm or False,
        profile_seconds=args.profile
        if args.profile is not None
        else (0.0 if not shutil.which("py-spy") else 10.0 if args.quick else 20.0),
        fd_limit=fd_limit,
    )
    if args.no_install and targets.litellm_installed_version() != targets.LITELLM_VERSION:
        run.skip_litellm = True

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    interrupted = failed = False
    try:
        try:
            import uvloop

            uvloop.run(main_async(run))
        except ImportError:
            asyncio.run(main_async(run))
    except KeyboardInterrupt:
        interrupted = True
        run.notes.append("the run was interrupted; the report is partial")
    except Exception as exc:  # a harness bug must still leave a (partial) report
        import traceback

        traceback.print_exc()
        failed = True
        run.notes.append(f"the harness failed: {type(exc).__name__}: {exc}; the report is partial")
    finally:
        run.stop_all()
        if not args.keep_db:
            targets.pg_drop()
    res = run.res
    if "meta" not in res:
        sys.exit("interrupted before anything was measured")
    res.setdefault("meta", {}).setdefault("loadavg_end", loadavg())
    res["meta"]["warnings"] = warnings_for(res)
    res["notes"] = run.notes
    last.write_text(json.dumps(res, indent=1, default=str))
    report.write(res, Path(args.output))
    print(f"wrote {args.output} and bench/plots/ (raw results: {last.relative_to(ROOT)})")
    if interrupted:
        sys.exit(130)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
