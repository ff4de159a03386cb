"""The measurements. Each returns plain dicts (JSON-ready) for one target and round."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import asyncpg

from bench import procstat
from bench.loadgen import HttpConnection, RunResult, chat_request, closed_loop, percentile
from bench.targets import HOST, Target
from bench.wsclient import WsClient, open_many

perf = time.perf_counter
SAMPLE_CAP = 4000  # raw values kept per series for the plots


def ms(values: list[float]) -> list[float]:
    return [v * 1000.0 for v in values]


def pct(values: list[float], q: float) -> float | None:
    return percentile(values, q)


def thin(values: list[float], cap: int = SAMPLE_CAP) -> list[float]:
    if len(values) <= cap:
        return [round(v, 4) for v in values]
    step = len(values) / cap
    return [round(values[int(i * step)], 4) for i in range(cap)]


def _errors(run: RunResult) -> dict[str, object]:
    errs = run.errors
    return {"errors": len(errs), "error_sample": errs[0].error if errs else None}


def _account(target: Target, run: RunResult) -> None:
    target.tokens_received += run.tokens
    target.requests_ok += len(run.ok)


async def nonstream(
    target: Target, concurrency: int, duration: float, max_requests: int, request_timeout: float
) -> dict[str, object]:
    """Scenario 1: non-streamed completions (16 tokens) in a closed loop."""
    pids = target.pids()
    cpu0 = procstat.cpu_seconds(pids)
    with procstat.RssSampler(pids) as rss:
        run = await closed_loop(
            HOST,
            target.port,
            target.request("t16-d0", False),
            concurrency=concurrency,
            duration=duration,
            max_requests=max_requests,
            request_timeout=request_timeout,
        )
    cpu = procstat.cpu_seconds(pids) - cpu0
    _account(target, run)
    lat = ms([r.latency for r in run.ok])
    return {
        "rps": len(run.ok) / run.elapsed,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "n": len(run.ok),
        "cpu_ms_per_req": cpu * 1000 / len(run.ok) if run.ok else None,
        "rss_peak_kib": rss.peak,
        "sample_ms": thin(lat),
        **_errors(run),
    }


async def streams(
    target: Target,
    model: str,
    concurrency: int,
    duration: float,
    max_requests: int,
    request_timeout: float,
    *,
    record_times: bool,
    stagger: float = 0.0,
    keep_samples: bool = True,
) -> dict[str, object]:
    """Scenarios 2 and 3: streamed completions in a closed loop."""
    pids = target.pids()
    cpu0 = procstat.cpu_seconds(pids)
    with procstat.RssSampler(pids) as rss:
        run = await closed_loop(
            HOST,
            target.port,
            target.request(model, True),
            concurrency=concurrency,
            duration=duration,
            max_requests=max_requests,
            request_timeout=request_timeout,
            record_times=record_times,
            stagger=stagger,
        )
    cpu = procstat.cpu_seconds(pids) - cpu0
    _account(target, run)
    ok = run.ok
    ttft = ms([r.ttft for r in ok if r.ttft is not None])
    gaps: list[float] = []
    if record_times:
        for r in ok:
            gaps.extend(r.gaps())
        gaps = ms(gaps)
    tokens = sum(r.tokens for r in ok)
    out: dict[str, object] = {
        "streams_per_s": len(ok) / run.elapsed,
        "tokens_per_s": tokens / run.elapsed,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "itl_mean_ms": sum(gaps) / len(gaps) if gaps else None,
        "n": len(ok),
        "tokens": tokens,
        "cpu_us_per_token": cpu * 1e6 / tokens if tokens else None,
        "rss_peak_kib": rss.peak,
        **_errors(run),
    }
    if keep_samples:
        out["ttft_sample_ms"] = thin(ttft)
        out["itl_sample_ms"] = thin(gaps)
    return out


async def ramp(
    target: Target,
    levels: list[int],
    duration: float,
    request_timeout: float,
    stream_seconds: float,
    max_seconds: float,
    baseline_duration: float = 0.0,
) -> dict[str, Any]:
    """Scenario 3: paced streams at rising concurrency until the gap p99 doubles.

    The baseline is the target's own p99 at the first level; the ramp stops at the
    first level whose p99 is at least twice that, or that has errors on more than
    1 % of streams, or when `max_seconds` have gone by.
    """
    start = perf()
    points: list[dict[str, object]] = []
    baseline: float | None = None
    sustained: int | None = None
    stopped: str = "reached the highest level"
    for i, level in enumerate(levels):
        if perf() - start > max_seconds:
            stopped = "time budget"
            break
        span = max(duration, baseline_duration) if i == 0 else duration
        per_worker = max(1, int(span / stream_seconds) + 1)
        res = await streams(
            target,
            "t64-d20",
            level,
            span,
            level * per_worker,
            request_timeout,
            record_times=True,
            stagger=stream_seconds,
            keep_samples=False,
        )
        p99 = res["itl_p99_ms"]
        n, errors = int(res["n"]), int(res["errors"])  # type: ignore[call-overload]
        point = {
            "concurrency": level,
            "itl_p50_ms": res["itl_p50_ms"],
            "itl_p99_ms": p99,
            "tokens_per_s": res["tokens_per_s"],
            "ttft_p99_ms": res["ttft_p99_ms"],
            "n": n,
            "errors": errors,
            "error_sample": res["error_sample"],
            "rss_peak_kib": res["rss_peak_kib"],
            "cpu_us_per_token": res["cpu_us_per_token"],
        }
        points.append(point)
        if baseline is None:
            baseline = p99 if isinstance(p99, float) else None
            sustained = level if baseline is not None else None
            continue
        failed = errors > 0.01 * max(1, n + errors)
        doubled = not isinstance(p99, float) or p99 >= 2 * baseline
        if failed or doubled:
            stopped = "errors" if failed else "p99 doubled"
            break
        sustained = level
        await asyncio.sleep(0.5)
    return {
        "points": points,
        "baseline_p99_ms": baseline,
        "threshold_ms": 2 * baseline if baseline else None,
        "sustained": sustained,
        "stopped": stopped,
    }


# --- /ws/quota -----------------------------------------------------------------------


async def ws_idle(
    port: int,
    pids: list[int],
    users: list[dict[str, str]],
    steps: list[int],
    *,
    parallel: int,
    settle: float,
    hold: float,
    budget: float,
) -> dict[str, object]:
    """Scenario 4a: idle sockets held by one worker, and its RSS at each step."""
    await asyncio.sleep(settle)
    base = procstat.rss_kib(pids)
    points: list[dict[str, object]] = [{"requested": 0, "held": 0, "rss_kib": base}]
    held: list[WsClient] = []
    deadline = perf() + budget
    errors: list[str] = []
    t0 = perf()
    for step in steps:
        creds = [(u["token"], f"idle{i}") for i, u in enumerate(users[len(held) : step])]
        started = perf()
        ready, errs = await open_many(HOST, port, creds, parallel=parallel, deadline=deadline)
        held.extend(ready)
        errors.extend(errs)
        opened_in = perf() - started
        await asyncio.sleep(settle)
        rss = procstat.rss_kib(pids)
        points.append(
            {
                "requested": step,
                "held": sum(not c.closed for c in held),
                "rss_kib": rss,
                "open_seconds": opened_in,
                "per_conn_kib": (rss - base) / len(held) if held else None,
            }
        )
    await asyncio.sleep(hold)
    alive = sum(not c.closed for c in held)
    rss_after_hold = procstat.rss_kib(pids)
    for c in held:
        c.close()
    await asyncio.sleep(min(5.0, 1.0 + len(held) / 5000))
    return {
        "baseline_kib": base,
        "points": points,
        "alive_after_hold": alive,
        "hold_seconds": hold,
        "rss_after_hold_kib": rss_after_hold,
        "errors": len(errors),
        "error_sample": sorted(set(errors))[:3],
        "seconds": perf() - t0,
    }


@dataclass
class _PushLog:
    msgs: dict[tuple[str, str], list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def on_message(self, client: WsClient, now: float, payload: bytes) -> None:
        if not payload.startswith(b'{"type":"quota"'):
            return
        try:
            used = int(json.loads(payload)["used"])
        except (ValueError, KeyError, TypeError):
            return
        self.msgs[client.tag].append((now, used))  # type: ignore[index]


async def ws_push(
    target: Target,
    instances: dict[str, int],
    users: list[dict[str, str]],
    *,
    model: str,
    stream_seconds: float,
    duration: float,
    parallel: int,
) -> dict[str, object]:
    """Scenario 4b: push latency from a metering checkpoint to the sockets.

    Every user has one socket on each instance in `instances` ("A" first; streams
    run through A). Tokens are paced wider than `checkpoint_ms`, so each delivered
    token triggers a checkpoint whose push carries `used = base + k`: its latency is
    the arrival of that push minus the arrival of token k at the streaming client
    (the moment the relay counted it). `base` is read from the push that the request
    start causes. Users start staggered over one stream's length and run streams
    back to back (with a pause past the push interval) until `duration`.
    """
    log = _PushLog()
    sockets: list[WsClient] = []
    errors: list[str] = []
    for name, port in instances.items():
        creds = [(u["token"], f"push-{name}") for u in users]
        ready, errs = await open_many(
            HOST,
            port,
            creds,
            parallel=parallel,
            deadline=perf() + 60,
            on_message=log.on_message,
        )
        errors.extend(errs)
        sockets.extend(ready)
        for c in ready:
            # (token, instance): the token is in the handshake this client sent.
            token = c.request.split(b"Authorization: Bearer ", 1)[1].split(b"\r\n", 1)[0]
            c.tag = (token.decode(), name)
    # The snapshots that made the sockets ready arrived untagged; only pushes count.
    log.msgs.clear()
    port_a = instances["A"]
    latencies: dict[str, list[float]] = {name: [] for name in instances}
    skipped = 0
    streams_done = 0
    tokens = 0
    stream_errors: list[str] = []
    t_start = perf()
    deadline = t_start + duration

    async def user_loop(i: int, token: str) -> None:
        nonlocal skipped, streams_done, tokens
        await asyncio.sleep(stream_seconds * i / max(1, len(users)))
        try:
            conn = await asyncio.wait_for(HttpConnection.open(HOST, port_a), 10)
        except (OSError, TimeoutError) as exc:
            stream_errors.append(f"connect: {exc}")
            return
        raw = chat_request(HOST, port_a, token, model, True, "/v1/chat/completions")
        try:
            while perf() < deadline:
                marks = {name: len(log.msgs[(token, name)]) for name in instances}
                res = await conn.request(raw, True, stream_seconds * 3 + 10)
                tokens += res.tokens
                if not res.ok:
                    stream_errors.append(str(res.error))
                    if conn.closed:
                        return
                    continue
                streams_done += 1
                await asyncio.sleep(0.35)  # the final push, past the 100 ms coalescing
                times = res.times or []
                for name in instances:
                    msgs = log.msgs[(token, name)][marks[name] :]
                    if not msgs or not times or msgs[0][0] > times[0]:
                        skipped += 1  # no unambiguous start-of-request push
                        continue
                    base = msgs[0][1]
                    for t, used in msgs[1:]:
                        k = used - base
                        if 1 <= k <= len(times):
                            latencies[name].append(t - times[k - 1])
        finally:
            conn.close()

    await asyncio.gather(*(user_loop(i, u["token"]) for i, u in enumerate(users)))
    t_end = perf()
    # The rate once every user is streaming: from one stream's length (the stagger)
    # to the deadline, or the whole run if that window is too short.
    lo, hi = t_start + stream_seconds, deadline
    if hi - lo < 2.0:
        lo, hi = t_start, t_end
    pushes_a = sum(
        1 for (_, name), msgs in log.msgs.items() if name == "A" for t, _ in msgs if lo <= t <= hi
    )
    for c in sockets:
        c.close()
    target.tokens_received += tokens
    out: dict[str, object] = {
        "users": len(users),
        "sockets": len(sockets),
        "socket_errors": len(errors),
        "socket_error_sample": sorted(set(errors))[:3],
        "streams": streams_done,
        "tokens": tokens,
        "stream_errors": len(stream_errors),
        "stream_error_sample": sorted(set(stream_errors))[:3],
        "pushes_per_s": pushes_a / max(1e-9, hi - lo),
        "seconds": t_end - t_start,
        "skipped": skipped,
    }
    for name, values in latencies.items():
        lat = ms(values)
        out[name] = {
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "n": len(lat),
            "sample_ms": thin(lat),
        }
    return out


def push_level(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of `ws_push` at one level: medians (p99: the median of the rounds' p99s,
    with each round's figures kept under `rounds`), sums of counts, merged samples."""
    out: dict[str, Any] = {
        "users": rounds[0]["users"],
        "rounds": rounds,
        "pushes_per_s": statistics.median(r["pushes_per_s"] for r in rounds),
    }
    for count in ("sockets", "socket_errors", "streams", "tokens", "stream_errors", "skipped"):
        out[count] = sum(r[count] for r in rounds)
    for name in ("A", "B"):
        per = [r[name] for r in rounds if name in r]
        if not per:
            continue
        p50s = [x["p50_ms"] for x in per if x["p50_ms"] is not None]
        p99s = [x["p99_ms"] for x in per if x["p99_ms"] is not None]
        maxes = [x["max_ms"] for x in per if x["max_ms"] is not None]
        out[name] = {
            "p50_ms": statistics.median(p50s) if p50s else None,
            "p99_ms": statistics.median(p99s) if p99s else None,
            "max_ms": max(maxes, default=None),
            "n": sum(x["n"] for x in per),
            "sample_ms": thin([v for x in per for v in x["sample_ms"]]),
        }
    return out


class CommitProbe:
    """Times a one-row commit on the deployment's PostgreSQL every `interval` while a
    scenario runs, from the load generator's side.

    Each commit waits for the WAL flush, as a checkpoint's does. When the disk stalls a
    flush, every commit on the server waits with it, whoever makes it: reported next to
    the push latency, this tells the disk's tail from the relay's.
    """

    def __init__(self, dsn: str, interval: float = 0.02) -> None:
        self._dsn = dsn
        self._interval = interval
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.latencies: list[float] = []

    async def __aenter__(self) -> CommitProbe:
        self._conn = await asyncpg.connect(self._dsn)
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit_probe (id bigserial PRIMARY KEY, at float8)"
        )
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()

    async def _run(self) -> None:
        assert self._conn is not None
        while True:
            t0 = perf()
            await self._conn.execute("INSERT INTO bench_commit_probe (at) VALUES ($1)", t0)
            self.latencies.append(perf() - t0)
            await asyncio.sleep(self._interval)

    def summary(self) -> dict[str, object]:
        lat = ms(self.latencies)
        return {
            "n": len(lat),
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "over_50ms": sum(1 for v in lat if v > 50),
        }
