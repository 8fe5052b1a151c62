"""Signals parked for runs not started yet: a worker process looks for their runs' start once per run, for all of
them together, not once per signal — and a run it starts itself gives its parked signals at once.

A worker with one slot is kept busy by run ``busy`` (its first step sleeps); the runs submitted behind it are not
started (their start requests wait unread), and the signals sent to them are parked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis import RedisClient
from tests.redis.inproc import serving, worker_here
from tests.redis.test_wait_signals import journal_of, waits_for, when_waiting


async def _hmgets(client: RedisClient) -> int:
    """How many HMGET commands the Redis server has run (scripts' included)."""
    stats = await client.redis.info("commandstats")
    return int((stats.get("cmdstat_hmget") or {}).get("calls", 0))


async def _until(predicate: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.02)


def _busy_then(url: str, prefix: str, body: Any, then: Any = None) -> Any:
    """Serve with one worker of one slot, held by run ``busy``; run ``body(client, worker)``, cancel ``busy`` (its
    slot frees: the runs behind it start), run ``then(client)`` if given, and return what ``body`` and ``then``
    returned."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            worker = worker_here(url, prefix, concurrency=1)

            async def serve() -> Any:
                await client.submit(compile_text(waits_for()), {"script": {"a": {"sleep": 8.0}}}, run_id="busy")
                await when_waiting(client, "busy", "a")
                try:
                    got = await body(client, worker)
                finally:
                    await client.cancel("busy", "enough")
                return got, (await then(client) if then is not None else None)

            return await serving([worker], serve)

    return asyncio.run(main())


def test_many_signals_parked_for_one_run_look_for_its_start_together(url: str, prefix: str) -> None:
    """40 signals parked for one run not started: the process looks whether it has started about once a second
    for all of them (one HMGET per round), not about twice a second for each (some 75 HMGETs a second)."""
    async def body(client: RedisClient, worker: Any) -> Any:
        await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="u")
        for i in range(40):
            await client.signal("u", "paid", {"i": i}, wait=False)
        await _until(lambda: len(worker._parked) == 40)
        await asyncio.sleep(1.5)  # (past the first quick looks: each signal's polling was at its slowest)
        before = await _hmgets(client)
        await asyncio.sleep(3.0)
        return await _hmgets(client) - before, len(worker._parked)

    (looks, parked), _ = _busy_then(url, prefix, body)
    assert parked == 40
    assert looks <= 10, looks  # (about 3 rounds in 3 s; a few HMGETs of the process's other loops)


def test_a_run_started_by_the_process_holding_its_parked_signals_gets_them_at_once(url: str, prefix: str) -> None:
    """The process that starts a run wakes the signals it parked for it: each is applied right after the start,
    not at its next look (up to a second later)."""
    runs = [f"u{i}" for i in range(8)]

    async def body(client: RedisClient, worker: Any) -> None:
        for i, run_id in enumerate(runs):
            await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id=run_id)
            await client.signal(run_id, "paid", {"i": i}, wait=False)
        await _until(lambda: len(worker._parked) == len(runs))
        await asyncio.sleep(1.5)  # (past the first quick looks: each signal's polling was at its slowest)

    async def lags(client: RedisClient) -> list[tuple[str, Any, int]]:
        found = []
        for run_id in runs:
            ended = await client.follow(run_id)
            events = [loads(f[b"in"]) for f in await journal_of(client, run_id) if b"in" in f]
            start = next(e["at"] for e in events if e["type"] == "start")
            signal = next(e["at"] for e in events if e["type"] == "signal")
            found.append((ended.status, ended.context.get("payment"), signal - start))
        return found

    _, found = _busy_then(url, prefix, body, lags)
    assert [(status, payment) for status, payment, _ in found] == [("completed", {"i": i}) for i in range(8)]
    assert max(lag for _, _, lag in found) < 300, found  # (ms; a look a second apart made most of them later)


def test_a_process_stopping_leaves_its_parked_signals_pending_for_another(url: str, prefix: str) -> None:
    """A process that stops while it holds signals parked stops at once — they wait for no look — and leaves them
    pending: another process takes them over after the lease and applies them once their runs have started."""
    from tests.redis.inproc import stopped

    runs = [f"u{i}" for i in range(3)]

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            first = worker_here(url, prefix, concurrency=1, lease_s=1.0, grace_s=0.1)
            serving_first = asyncio.create_task(first.serve())
            await client.submit(compile_text(waits_for()), {"script": {"a": {"sleep": 30.0}}}, run_id="busy")
            await when_waiting(client, "busy", "a")
            for i, run_id in enumerate(runs):
                await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id=run_id)
                await client.signal(run_id, "paid", {"i": i}, wait=False)
            await _until(lambda: len(first._parked) == len(runs))
            t0 = time.monotonic()
            first.stop()
            await stopped([first], [serving_first])
            took = time.monotonic() - t0
            pending = (await client.store.call("XPENDING", client.keys.signals, "flowdsl"))[0]
            await client.cancel("busy", "enough")  # (its step, handed back, is another's now)

            async def then() -> Any:
                return [await client.follow(run_id) for run_id in runs]

            ends = await serving([worker_here(url, prefix, lease_s=1.0)], then)
            return took, pending, ends

    took, pending, ends = asyncio.run(main())
    assert took < 2.0 and pending == 3
    assert [r.status for r in ends] == ["completed"] * 3
    assert [r.context["payment"] for r in ends] == [{"i": i} for i in range(3)]
