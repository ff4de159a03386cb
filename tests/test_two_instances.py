"""Two `python -m app serve` processes sharing PostgreSQL and Redis, as in production."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from tests.conftest import FAKE_MODEL, REDIS_URL
from tests.fake_upstream import FakeUpstream


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def instance_env(
    tmp_path: Path, postgres_url: str, redis_prefix: str, fake_upstream: FakeUpstream
) -> dict[str, str]:
    config = tmp_path / "livegate.toml"
    config.write_text(
        f"""
[[providers]]
name = "fake"
base_url = "{fake_upstream.base_url}"
api_key = "sk-upstream"
models = ["{FAKE_MODEL}"]

[tiers.tiny]
monthly_tokens = 40

[metering]
checkpoint_tokens = 5
checkpoint_ms = 10000
push_interval_ms = 0

[server]
redis_prefix = "{redis_prefix}-pair"
"""
    )
    return {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "REDIS_URL": REDIS_URL,
        "JWT_SECRET": "two-instance-secret-" + "y" * 32,
        "LIVEGATE_CONFIG": str(config),
        "LIVEGATE_DATA_DIR": str(tmp_path / "data"),
    }


async def run_cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def start_instance(
    env: dict[str, str], http: httpx.AsyncClient
) -> tuple[asyncio.subprocess.Process, str]:
    """A `serve` process answering on a port of its own, and its URL.

    A port found free may be taken before the server binds it (it migrates first):
    the server then exits, and starts again on another.
    """
    for _ in range(3):
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            "--port",
            str(port),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            if proc.returncode is not None:
                break
            try:
                if (await http.get(f"{url}/v1/models")).status_code == 401:
                    return proc, url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        else:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"instance at {url} did not start")
        await proc.wait()
    raise AssertionError("no instance started in three attempts")


@pytest.fixture
async def two_instances(instance_env: dict[str, str]) -> AsyncIterator[tuple[str, str]]:
    """Started one after the other: the first holds its port when the second's is
    chosen, so the two never share one."""
    procs, urls = [], []
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(2):
                proc, url = await start_instance(instance_env, http)
                procs.append(proc)
                urls.append(url)
        assert all(proc.returncode is None for proc in procs), "an instance stopped"
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


async def test_quota_change_on_a_reaches_socket_on_b(
    instance_env: dict[str, str], two_instances: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    url_a, url_b = two_instances
    account = json.loads(
        await run_cli(
            instance_env,
            "users",
            "create",
            "--email",
            "pair@example.test",
            "--password",
            "pw-123456",
        )
    )
    fake_upstream.script.tokens = 30
    # The upstream pauses after 10 tokens, so a tick must arrive while the stream is open.
    fake_upstream.script.hold_after = 10
    ws_b = url_b.replace("http", "ws") + "/ws/quota?deviceId=phone"
    auth = {"Authorization": f"Bearer {account['token']}"}
    async with connect(ws_b, additional_headers=auth) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "quota" and first["used"] == 0

        client = openai.AsyncOpenAI(
            base_url=f"{url_a}/v1", api_key=account["api_key"], max_retries=0
        )

        async def chat() -> int:
            stream = await client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return len([c async for c in stream if c.choices and c.choices[0].delta.content])

        chatting = asyncio.create_task(chat())
        seen = []
        async with asyncio.timeout(10):
            # Tokens are flowing on A; B must see them before the stream ends.
            while not seen or seen[-1]["used"] < 10:
                message = json.loads(await ws.recv())
                if message["type"] == "quota":
                    seen.append(message)
        assert not chatting.done()
        fake_upstream.release.set()
        assert await chatting == 30

        async with httpx.AsyncClient() as http:
            final = (
                await http.get(
                    f"{url_a}/api/usage/quota",
                    headers={"Authorization": f"Bearer {account['token']}"},
                )
            ).json()
        assert final["used"] == 11 + 30  # the fake upstream's usage, billed on completion

        async with asyncio.timeout(10):
            while seen[-1]["used"] != final["used"]:
                message = json.loads(await ws.recv())
                if message["type"] == "quota":
                    seen.append(message)
        assert [m["seq"] for m in seen] == sorted({m["seq"] for m in seen})
        assert seen[-1]["remaining"] == final["remaining"]


async def test_a_tier_moved_on_b_holds_for_a_stream_open_on_a(
    instance_env: dict[str, str], two_instances: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    url_a, url_b = two_instances
    user, admin = [
        json.loads(
            await run_cli(
                instance_env, "users", "create", "--email", email, "--password", "pw-123456", *extra
            )
        )
        for email, extra in (
            ("tiny@example.test", ("--tier", "tiny")),
            ("admin@example.test", ("--role", "admin")),
        )
    ]
    fake_upstream.script.tokens = 60
    fake_upstream.script.hold_after = 20  # with the prompt's estimate: within 40
    auth = {"Authorization": f"Bearer {user['token']}"}
    quota_a, quota_b = (
        url.replace("http", "ws") + "/ws/quota?deviceId=phone" for url in (url_a, url_b)
    )
    async with (
        connect(quota_a, additional_headers=auth) as ws_a,
        connect(quota_b, additional_headers=auth) as ws,
    ):
        first = json.loads(await ws.recv())
        assert (first["total"], first["unlimited"]) == (40, False)
        client = openai.AsyncOpenAI(base_url=f"{url_a}/v1", api_key=user["api_key"], max_retries=0)

        async def chat() -> tuple[int, str | None]:
            stream = await client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = [c async for c in stream if c.choices]
            tokens = len([c for c in chunks if c.choices[0].delta.content])
            return tokens, chunks[-1].choices[0].finish_reason

        chatting = asyncio.create_task(chat())
        seen = [first]
        async with asyncio.timeout(10):
            while seen[-1]["used"] < 20:  # the checkpoint of the 20 tokens before the hold
                seen.append(json.loads(await ws.recv()))
            async with httpx.AsyncClient(base_url=url_b) as http:
                moved = await http.patch(
                    f"/api/admin/users/{user['id']}",
                    json={"tier": "enterprise"},
                    headers={"Authorization": f"Bearer {admin['token']}"},
                )
            assert moved.status_code == 200, moved.text
            while not seen[-1]["unlimited"]:
                seen.append(json.loads(await ws.recv()))
            # A's socket hears of the move after A's metering did (one Redis batch, in
            # order), so once it has, the stream on A holds the new limit.
            while not json.loads(await ws_a.recv()).get("unlimited"):
                pass
            fake_upstream.release.set()
            # The stream on A goes past the tiny tier's limit to its end ...
            assert await chatting == (60, "stop")
            # ... and every push after the move, the last one included, says unlimited.
            while seen[-1]["used"] < 11 + 60:
                seen.append(json.loads(await ws.recv()))
        moved_at = next(i for i, m in enumerate(seen) if m["unlimited"])
        assert all(m["unlimited"] and m["total"] == 2**53 - 1 for m in seen[moved_at:]), seen
