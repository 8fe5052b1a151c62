"""A sync attempt still queued for a free worker thread when the kernel cancels it (a sibling failed, the run was
cancelled) is taken off the queue and never called, in a worker process as in the local runtime; one whose
thread runs is waited for, its real outcome reported."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import flowdsl.runtime.execute as execute
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from tests.redis.inproc import serving, worker_here
from tests.runtime.test_under_load import _queued_sync_registry

GROUP = ("flowdsl: 1\nname: q\nsteps:\n  - parallel: g\n    branches:\n      - slow\n"
         "      - queued: {compensate: undo}\n      - boom\n")


def test_a_sync_attempt_still_queued_for_a_thread_when_its_sibling_fails_is_never_called(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "_threads", execute._DaemonThreads(limit=1))  # one thread, held by slow
    registry, calls, _ = _queued_sync_registry()

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            handle = await client.submit(compile_text(GROUP), {})

            async def body() -> Any:
                ended = await client.follow(handle.run_id)
                await asyncio.sleep(0.4)  # (time for a queued job to have been called, had it been left queued)
                return ended

            return await serving([worker_here(url, prefix, registry, concurrency=4)], body)

    result = asyncio.run(main())
    assert calls == ["slow"]
    assert (result.status, result.compensated) == ("failed", [])
    assert {k: v["status"] for k, v in result.steps.items()} == {
        "g": "failed", "slow": "succeeded", "queued": "cancelled", "boom": "failed"}


def test_a_cancel_takes_back_a_queued_sync_attempt_and_waits_for_the_running_one(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run cancelled while ``slow`` holds the one thread and ``queued`` waits for it: ``queued`` is never
    called; ``slow`` runs to its end, is waited for and, having succeeded, undone."""
    monkeypatch.setattr(execute, "_threads", execute._DaemonThreads(limit=1))
    registry, calls, running = _queued_sync_registry()
    plan = compile_text("flowdsl: 1\nname: q\nsteps:\n  - parallel: g\n    branches:\n"
                        "      - slow: {compensate: undo}\n      - queued: {compensate: undo}\n")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            handle = await client.submit(plan, {})

            async def body() -> Any:
                while not running.is_set():
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # (the queued job submitted behind it)
                assert await client.cancel(handle.run_id, "enough") == "requested"
                ended = await client.follow(handle.run_id)
                await asyncio.sleep(0.4)
                return ended

            return await serving([worker_here(url, prefix, registry, concurrency=4)], body)

    result = asyncio.run(main())
    assert calls == ["slow", "undo slow"]
    assert (result.status, result.compensated) == ("cancelled", ["slow"])
    assert result.steps["queued"]["status"] == "cancelled"
