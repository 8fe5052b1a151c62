"""Worker processes' work done inside the test process: a :class:`RedisWorker` built for a test, and serving
while a test body runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from flowdsl.runtime.redis import RedisWorker, WorkerOptions
from flowdsl.workers import WorkerRegistry
from tests.redis.procs import READERS, anonymous


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
        await stopped(workers, tasks)


async def stopped(workers: Iterable[RedisWorker], tasks: Iterable[asyncio.Future[Any]]) -> list[Any]:
    """Await ``tasks`` (the ``serve()`` of ``workers``, which were asked to stop) while their blocked reads are
    ended early.

    A graceful stop lets each reading loop end at its next turn, so a loop blocked in ``XREADGROUP … BLOCK`` holds
    the stop for up to ``block_ms`` (1 s by default) with nothing to do. ``CLIENT UNBLOCK`` ends such a read as if
    its block had run out (nothing read, nothing lost: the loop then sees the stop, as it would a second later).
    Nothing the workers did before the stop changes, only how soon a stop with nothing left to wait for returns;
    the unblocking is best effort (a server that cannot be reached, or refuses ``CLIENT``, is left to the block)."""
    workers, tasks = list(workers), list(tasks)
    names = {f"{role}{w.name}" for w in workers for role in READERS}
    unblocking = asyncio.create_task(_unblock({w.url for w in workers if anonymous(w.url)}, names, tasks))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # (the poller ends by itself once the tasks are done; never cancelled: a cancellation that lands in a redis-py
        # call can be swallowed by it, and the poller would run on)
        await asyncio.wait({unblocking}, timeout=5)


async def _unblock(urls: set[str], names: set[str], tasks: list[asyncio.Future[Any]]) -> None:
    """Every 50 ms until ``tasks`` are done (a minute at most), ``CLIENT UNBLOCK`` each connection named in
    ``names`` that is blocked, on each server of ``urls``."""
    deadline = time.monotonic() + 60
    clients = []
    for url in urls:
        with contextlib.suppress(Exception):
            clients.append(aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0))
    try:
        while clients and not all(task.done() for task in tasks) and time.monotonic() < deadline:
            for client in list(clients):
                try:
                    for entry in await client.client_list():
                        if entry.get("name") in names and "b" in entry.get("flags", ""):
                            await client.client_unblock(int(entry["id"]))
                except Exception:  # (the server gone, held, or refusing CLIENT: the block is left to run out)
                    clients.remove(client)
                    with contextlib.suppress(Exception):
                        await client.aclose()
            await asyncio.sleep(0.05)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()


async def until_event(client: Any, run_id: str, type_: str, step: str, timeout: float = 20) -> None:
    """Until the run (followed with ``client``, a ``RedisClient``) emits an event ``type_`` about ``step``."""
    seen = asyncio.Event()

    def watch(event: dict[str, Any]) -> None:
        if event["type"] == type_ and event.get("step") == step:
            seen.set()

    follow = asyncio.create_task(client.follow(run_id, on_event=watch))
    try:
        await asyncio.wait_for(seen.wait(), timeout)
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
