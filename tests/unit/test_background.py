"""bff.background: work a caller's cancellation must not stop (a refresh under the lock)."""

from __future__ import annotations

import asyncio
import gc

from bff.background import Background


async def test_a_task_outlives_its_cancelled_caller_and_is_kept_until_it_ends() -> None:
    background = Background()
    release = asyncio.Event()
    done: list[str] = []

    async def work() -> str:
        await release.wait()
        done.append("finished")
        return "token"

    task = background.spawn(work())
    caller = asyncio.ensure_future(asyncio.shield(task))
    await asyncio.sleep(0)
    caller.cancel()  # the request that started it went away
    del task
    gc.collect()  # asyncio holds tasks weakly: only Background keeps this one alive
    assert len(background) == 1
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert done == ["finished"] and len(background) == 0


async def test_a_failure_nobody_awaits_is_retrieved_not_reported() -> None:
    background = Background()
    reported: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))

    async def fails() -> None:
        raise RuntimeError("the OP went away")

    background.spawn(fails())
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    assert len(background) == 0 and reported == []
