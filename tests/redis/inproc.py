"""Worker processes' work done inside the test process: a :class:`RedisWorker` built for a test, and serving
while a test body runs."""

from __future__ import annotations

import asyncio
from typing import Any

from flowdsl.runtime.redis import RedisWorker, WorkerOptions
from flowdsl.workers import WorkerRegistry


def worker_here(url: str, prefix: str, registry: WorkerRegistry | None = None, **options: Any) -> RedisWorker:
    """A worker of this process (no signal handlers), with ``options`` of :class:`WorkerOptions`."""
    options.setdefault("handle_signals", False)
    return RedisWorker(url, prefix=prefix, registry=registry, options=WorkerOptions(**options))


async def serving(workers: list[RedisWorker], body: Any) -> Any:
    """Run ``body()`` (at most 30 s) while ``workers`` serve; stop them and return what it returned."""
    tasks = [asyncio.create_task(w.serve()) for w in workers]
    try:
        return await asyncio.wait_for(body(), 30)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
