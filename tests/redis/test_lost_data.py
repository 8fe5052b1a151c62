"""Redis losing its data while workers serve (a restart without persistence, a FLUSHALL): the consumer groups
are gone with the streams, and every loop that touches them must make them again, not stop the process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from tests.redis.inproc import worker_here
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"


async def _forget_everything(client: RedisClient, prefix: str) -> int:
    """Delete every key under ``prefix``: what a restart without persistence leaves of this deployment."""
    keys = [k async for k in client.redis.scan_iter(match=f"{{{prefix}}}*")]
    keys += [k async for k in client.redis.scan_iter(match=f"{prefix}*")]
    return int(await client.redis.delete(*keys)) if keys else 0


def test_a_serving_worker_survives_redis_losing_its_data_and_serves_new_runs(url: str, prefix: str) -> None:
    """It stopped (exit 1) when its reclaimer met ``NOGROUP`` before the reader had made the groups again."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            worker = worker_here(url, prefix, lease_s=0.4, block_ms=200)
            serving = asyncio.create_task(worker.serve())
            try:
                first = await client.submit(compile_text(SAGA), {"script": {}})
                assert (await client.follow(first.run_id, timeout_s=20)).status == "completed"
                for _ in range(3):  # several rounds of every loop (the reclaimer's is 0.1 s) without the groups
                    assert await _forget_everything(client, prefix) > 0
                    await asyncio.sleep(0.6)
                    assert not serving.done(), serving.result()
                second = await client.submit(compile_text(SAGA), {"script": {}})
                ended = await client.follow(second.run_id, timeout_s=20)
                return ended.status, serving.done()
            finally:
                worker.stop()
                await asyncio.wait_for(serving, 30)

    assert asyncio.run(main()) == ("completed", False)


def test_a_worker_survives_a_restart_of_redis_without_persistence(tmp_path: Path) -> None:
    """After the restart every loop meets ``NOGROUP``; the reclaimer, the first to, stopped the process (exit 1)
    before the reader had made the groups again."""
    server = RedisServer(extra_args=("--appendonly", "no")).start()
    prefix = "lost"

    async def main() -> Any:
        async with RedisClient(server.url, prefix=prefix) as client:
            worker = worker_here(server.url, prefix, lease_s=0.4, block_ms=200)
            serving = asyncio.create_task(worker.serve())
            try:
                first = await client.submit(compile_text(SAGA), {"script": {}})
                assert (await client.follow(first.run_id, timeout_s=20)).status == "completed"
                await asyncio.to_thread(server.kill)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(server.start)
                await asyncio.sleep(2.0)  # the reclaimer runs every 0.1 s
                assert not serving.done(), serving.result()
                second = await client.submit(compile_text(SAGA), {"script": {}})
                return (await client.follow(second.run_id, timeout_s=20)).status
            finally:
                worker.stop()
                await asyncio.wait_for(serving, 30)

    try:
        assert asyncio.run(main()) == "completed"
    finally:
        server.cleanup()
