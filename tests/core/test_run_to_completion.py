"""`run_to_completion`: a clean-up step outlives the cancellation of its caller."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from app.core.metering import run_to_completion


class Step:
    """A step that takes a few loop turns, and says whether it got to its end."""

    def __init__(self, turns: int = 20) -> None:
        self.turns = turns
        self.started = asyncio.Event()
        self.finished = False

    async def __call__(self) -> None:
        self.started.set()
        for _ in range(self.turns):
            await asyncio.sleep(0)
        self.finished = True


async def test_the_step_runs_to_its_end_and_then_the_caller_sees_its_cancellation() -> None:
    step = Step()
    caller = asyncio.create_task(run_to_completion(step))
    await step.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert step.finished


async def test_a_step_cancelled_again_and_again_by_anyio_still_ends() -> None:
    # sse-starlette's task groups: a cancelled scope re-sends its cancellation on
    # every turn of the loop until the task leaves the scope.
    step = Step(turns=200)
    async with anyio.create_task_group() as group:

        async def member() -> None:
            await run_to_completion(step)

        group.start_soon(member)
        await step.started.wait()
        group.cancel_scope.cancel()
    assert step.finished


async def test_a_failing_step_raises_its_error_to_a_caller_that_was_not_cancelled() -> None:
    async def failing() -> None:
        await asyncio.sleep(0)
        raise LookupError("gone")

    with pytest.raises(LookupError):
        await run_to_completion(failing)


async def test_an_uncancelled_caller_waits_for_the_step() -> None:
    step = Step()
    await run_to_completion(step)
    assert step.finished
