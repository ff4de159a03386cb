"""`cancel_on_disconnect`: a client leaving cancels the work; a short call is not watched.
`client_gone`: whether a client has left, without waiting."""

from __future__ import annotations

import asyncio
from typing import Any

from app.api.streaming import cancel_on_disconnect, client_gone

WATCH_AFTER = 0.02


class Client:
    """ASGI `receive` of a request whose body was read: it answers `http.disconnect`
    once the client has left, and counts the calls."""

    def __init__(self, *, gone: bool) -> None:
        self.left = asyncio.Event()
        if gone:
            self.left.set()
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


async def test_work_done_before_the_watch_is_due_is_never_watched():
    client = Client(gone=True)

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await cancel_on_disconnect(client.receive, work(), watch_after=WATCH_AFTER) == 7
    await asyncio.sleep(WATCH_AFTER * 3)  # no watch starts late either
    assert client.calls == 0


async def test_a_client_that_left_cancels_work_still_running_when_the_watch_is_due():
    client = Client(gone=True)
    cancelled = False

    async def work() -> int:
        nonlocal cancelled
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return 7

    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await asyncio.wait_for(
        cancel_on_disconnect(client.receive, work(), watch_after=WATCH_AFTER), 5
    )
    assert result is None and cancelled
    assert loop.time() - began >= WATCH_AFTER
    assert client.calls == 1


async def test_a_client_leaving_later_cancels_the_work_then():
    client = Client(gone=False)
    loop = asyncio.get_running_loop()
    loop.call_later(WATCH_AFTER * 3, client.left.set)
    call = cancel_on_disconnect(client.receive, asyncio.Event().wait(), watch_after=WATCH_AFTER)
    assert await asyncio.wait_for(call, 5) is None


async def test_long_work_of_a_client_still_there_keeps_its_result():
    client = Client(gone=False)

    async def work() -> int:
        await asyncio.sleep(WATCH_AFTER * 3)
        return 5

    assert await cancel_on_disconnect(client.receive, work(), watch_after=WATCH_AFTER) == 5
    assert client.calls == 1  # watched from the moment it was due
    # The caller itself was not cancelled along the way.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_client_gone_tells_a_client_that_left_at_once():
    assert client_gone(Client(gone=True).receive)


async def test_client_gone_leaves_a_client_still_there_waiting_for_nothing():
    client = Client(gone=False)
    assert not client_gone(client.receive)
    assert client.calls == 1
    # The receive it began is closed, not left waiting: the event has no waiter, and
    # a receive begun later still hears the client leave.
    assert not client.left._waiters  # type: ignore[attr-defined]
    later = asyncio.ensure_future(client.receive())
    client.left.set()
    assert await asyncio.wait_for(later, 5) == {"type": "http.disconnect"}


async def test_client_gone_is_false_for_a_message_other_than_a_disconnect():
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    assert not client_gone(receive)
