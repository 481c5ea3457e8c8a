"""bff.proxy.deadlines: one timer for a route's body-less exchanges, each deadline still falling
due as its own ``asyncio.timeout`` would (outcomes only: nothing here asserts how long it took)."""

from __future__ import annotations

import asyncio

import pytest

from bff.proxy.deadlines import Deadlines

SHORT = 0.3  # the route's timeout here: what answers at once is well within it
NEVER = 30.0  # an upstream that would not answer before the test gave up


async def exchange(deadlines: Deadlines, work: float, delay: float = 0.0) -> str:
    """An exchange as ``bff.proxy.forward`` runs a body-less one, taking ``work`` seconds."""
    await asyncio.sleep(delay)
    async with asyncio.Timeout(None) as timeout:
        deadlines.start(timeout)
        try:
            await asyncio.sleep(work)
            return "answered"
        finally:
            deadlines.stop(timeout)


async def test_a_slow_exchange_times_out_and_a_quick_one_never_does() -> None:
    deadlines = Deadlines(SHORT, asyncio.get_running_loop())
    quick, slow = await asyncio.gather(
        exchange(deadlines, 0), exchange(deadlines, NEVER), return_exceptions=True
    )
    assert quick == "answered"
    assert isinstance(slow, TimeoutError)
    assert len(deadlines) == 0


async def test_deadlines_that_begin_later_fall_due_later_each_in_turn() -> None:
    """The timer is armed for the soonest; one started while it runs is re-armed for when the
    earlier ones are gone (answered or timed out)."""
    deadlines = Deadlines(SHORT, asyncio.get_running_loop())
    results = await asyncio.gather(
        exchange(deadlines, 0),  # answered at once: the timer was armed for it
        exchange(deadlines, NEVER, delay=SHORT / 2),
        exchange(deadlines, NEVER, delay=SHORT * 3),  # begins after the others are over
        exchange(deadlines, 0, delay=SHORT * 3),
        return_exceptions=True,
    )
    assert results[0] == "answered"
    assert isinstance(results[1], TimeoutError)
    assert isinstance(results[2], TimeoutError)
    assert results[3] == "answered"
    assert len(deadlines) == 0


async def test_a_cancelled_exchange_is_cancelled_not_timed_out() -> None:
    deadlines = Deadlines(NEVER, asyncio.get_running_loop())
    task = asyncio.create_task(exchange(deadlines, NEVER))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_an_exchange_that_times_out_leaves_the_others_their_time() -> None:
    deadlines = Deadlines(SHORT, asyncio.get_running_loop())
    slow = asyncio.create_task(exchange(deadlines, NEVER))
    await asyncio.sleep(SHORT / 2)
    gone = asyncio.Event()

    async def later() -> str:  # begun half a deadline later, answers once the first timed out
        async with asyncio.Timeout(None) as timeout:
            deadlines.start(timeout)
            try:
                await gone.wait()
                return "answered"
            finally:
                deadlines.stop(timeout)

    other = asyncio.create_task(later())
    with pytest.raises(TimeoutError):
        await slow
    gone.set()
    assert await other == "answered"
