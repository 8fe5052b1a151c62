"""The heartbeat says Redis is reachable again only once a command of its own has reached it: a process that
holds nothing renews no lease (it sends nothing for that), which said "reachable again" while Redis was down."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.redis.inproc import worker_here
from tests.redis.server import RedisServer

AGAIN = "heartbeat: Redis reachable again"


def test_an_idle_process_says_redis_is_reachable_again_only_once_it_is(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer().start()
    worker = worker_here(server.url, "hb", llm=False, lease_s=0.3, block_ms=100)

    async def main() -> tuple[list[str], list[str]]:
        serving = asyncio.create_task(worker.serve())
        try:
            client = server.client()
            beats: set[bytes] = set()
            while len(beats) < 3:  # serving, its heartbeat rewriting its liveness record (every 0.1 s)
                record = client.hget("{hb}:workers", worker.name)
                if record is not None:
                    beats.add(record)
                await asyncio.sleep(0.02)
            client.close()
            await asyncio.to_thread(server.kill)
            down = time.monotonic()
            while time.monotonic() - down < 1.0:  # ten beats of an idle process, Redis gone
                await asyncio.sleep(0.05)
            while_down = [r.getMessage() for r in caplog.records if r.name == "flowdsl.redis"]
            await asyncio.to_thread(server.start)
            deadline = time.monotonic() + 20
            while not any(AGAIN in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return while_down, [r.getMessage() for r in caplog.records if r.name == "flowdsl.redis"]
        finally:
            worker.stop()
            await asyncio.wait_for(serving, 30)

    try:
        with caplog.at_level(logging.INFO, logger="flowdsl.redis"):
            while_down, every = asyncio.run(main())
    finally:
        server.cleanup()
    assert any("heartbeat failed" in m for m in while_down), while_down
    assert not any(AGAIN in m for m in while_down), while_down
    assert any(AGAIN in m for m in every[len(while_down):]), every
