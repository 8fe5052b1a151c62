"""The Redis runtime across a bad network: a deadline passed in transit, a connection that freezes, a connection
reset after a relay, and what a worker says of its rejected results and of Redis coming back.

Workers run in this process (``worker_here``); those that must meet a broken network reach the test's
redis-server through :class:`~tests.redis.netproxy.FaultProxy` (frozen or reset connections, real sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.redis.netproxy import FaultProxy
from tests.redis.server import RedisServer

HEAD = "flowdsl: 1\nname: {name}\n"


def registry(**workers: Any) -> WorkerRegistry:
    """A registry of ``workers`` (``net_a=fn`` registers ``net.a``)."""
    found = WorkerRegistry()
    for name, fn in workers.items():
        found.register(name.replace("_", ".", 1), fn)
    return found


async def done(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {}


async def until(check: Any, timeout: float, what: str) -> None:
    """Wait until ``await check()`` is true (every 20 ms), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --- F1: an attempt whose timeout passed before any worker picked it up is not run --------------------------------


def test_an_attempt_picked_up_after_its_timeout_is_not_run_and_its_timer_times_it_out(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A step's timeout counts from its dispatch (the wait in its stream and the round trips to Redis included):
    an attempt read after its deadline, before its timeout timer has been fired, is not started — run, it could
    only make an effect (a charge) the run is bound to record as timed out, a late completion left to undo by hand.
    PICKUP compares the attempt's deadline with the server's clock; the timer then times it out as usual."""
    spec = HEAD.format(name="expired") + (
        "steps:\n  - a: {worker: net.a, compensate: net.undo_a}\n  - b: {worker: net.b, timeout: 300ms}\n")
    calls: list[str] = []

    async def charge(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(f"{ctx.idempotency_key}#{ctx.attempt}")
        return {"charged": True}

    async def no_timers() -> None:
        """(This test's first two workers fire no timer: the deadline passes while nobody times the attempt out.)"""

    first = registry(net_a=done, net_undo_a=done)
    late = registry(net_b=charge)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(compile_text(spec), {})).run_id
            starter = worker_here(url, prefix, registry=first, burst=True, burst_horizon_s=0)
            monkeypatch.setattr(starter, "_timers", no_timers)
            await asyncio.wait_for(starter.serve(), 30)  # runs a, queues b (its deadline 300 ms on) and exits
            queue = client.keys.queue("net.b")
            assert await client.store.call("XLEN", queue) == 1
            await asyncio.sleep(0.5)  # the deadline passes while the message waits (a backlog, a slow network)
            taker = worker_here(url, prefix, registry=late)
            monkeypatch.setattr(taker, "_timers", no_timers)

            async def handled() -> bool:
                return taker.stats.expired + taker.stats.tasks > 0 and not taker._held

            await serving([taker], lambda: until(handled, 10, "the late message handled"))
            left = await client.store.call("XLEN", queue)
            timer = worker_here(url, prefix, registry=first)  # fires the attempt's timeout; the run compensates
            result = await serving([timer], lambda: client.follow(run_id))
            # nothing left in flight: the attempt's lease and its deadline (d:<task id>) went with its timeout
            assert await client.store.call("HGETALL", client.keys.tasks(run_id)) in ([], {})
            return taker.stats, left, result

    with caplog.at_level(logging.INFO, logger="flowdsl.redis"):
        stats, left, result = asyncio.run(main())
    assert calls == []  # never charged
    assert (stats.expired, stats.tasks, left) == (1, 0, 0)  # the message read, acknowledged, its attempt not run
    assert (result.status, result.compensated, result.failed_step) == ("compensated", ["a"], "b")
    assert result.error["type"] == "StepTimeout"
    (line,) = said(caplog, "not started: its step's timeout had passed")
    assert "before it was picked up" in line and "/b#1" in line


# --- F3: a command connection that freezes (no reset) is given up, and the worker goes on -------------------------


def test_a_worker_whose_command_connection_freezes_gives_it_up_and_goes_on(
        server: RedisServer, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The worker's command connections stop forwarding anything, their sockets open (a lost NAT entry, a
    firewall failover: no reset ever comes), while new connections work. With nothing received for the reply
    deadline (the lease, at least 2 s) while replies are awaited, the connection is closed, the commands waiting
    on it fail and are tried again on a new one; the worker says so once, reads no new work meanwhile, says when
    Redis answers again, and runs the next run at once. (Before: it waited on the frozen socket for ever.)"""
    spec = HEAD.format(name="frozen") + "steps:\n  - a: {worker: net.a}\n  - b: {worker: net.b}\n"

    async def main() -> Any:
        async with FaultProxy(server.socket, tmp_path) as proxy, RedisClient(server.url, prefix=prefix) as client:
            worker = worker_here(proxy.url, prefix, registry=registry(net_a=done, net_b=done), lease_s=1.0)

            async def body() -> Any:
                first = await client.submit(compile_text(spec), {})
                assert (await client.follow(first.run_id)).status == "completed"
                frozen = proxy.freeze(b"flowdsl-worker:")  # the lean command connection and redis-py's
                t0 = time.monotonic()
                second = await client.submit(compile_text(spec), {})
                result = await asyncio.wait_for(client.follow(second.run_id), 8)
                return frozen, result, time.monotonic() - t0

            return await serving([worker], body)

    with caplog.at_level(logging.INFO, logger="flowdsl.redis"):
        frozen, result, took = asyncio.run(main())
    assert frozen >= 2 and result.status == "completed"
    assert took < 6  # the reply deadline (2 s), a check's quarter, and the retries
    (gone,) = said(caplog, "on the command connection while")
    assert "presumed dead" in gone and "no new work is read until Redis answers" in gone
    assert len(said(caplog, "Redis answers again on the command connection")) == 1


def test_a_reading_loop_says_when_redis_is_unreachable_and_when_it_is_reachable_again(
        server: RedisServer, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read that fails on a lost connection is said once, naming what the loop reads, and so is the first read
    that works again — else a log could not tell whether, or when, the process recovered."""
    spec = HEAD.format(name="reread") + "steps:\n  - a: {worker: net.a}\n"

    async def main() -> Any:
        async with FaultProxy(server.socket, tmp_path) as proxy, RedisClient(server.url, prefix=prefix) as client:
            worker = worker_here(proxy.url, prefix, registry=registry(net_a=done), lease_s=1.0)
            proxy.reset_on(b"XREADGROUP", b"{" + prefix.encode() + b"}:control", count=1)

            async def body() -> Any:
                await until(lambda: _true(proxy.resets), 10, "the task reader's connection reset")
                return await client.follow((await client.submit(compile_text(spec), {})).run_id)

            return await serving([worker], body)

    with caplog.at_level(logging.INFO, logger="flowdsl.redis"):
        result = asyncio.run(main())
    assert result.status == "completed"
    (lost,) = said(caplog, "Redis unreachable while reading tasks and start requests")
    (back,) = said(caplog, "Redis reachable again: reading tasks and start requests")
    assert "reconnecting with backoff" in lost and "after" in back


async def _true(value: Any) -> bool:
    return bool(value)


# --- F2: an outbox entry relayed, whose drop was lost with its connection, is dropped all the same ----------------


def test_an_outbox_entry_whose_drop_is_lost_with_its_connection_is_dropped_again(
        server: RedisServer, prefix: str, tmp_path: Path) -> None:
    """A relayed outbox entry is dropped without waiting for the reply; when the connection is reset just as the
    drop is sent, the drop is sent again on a new connection, so a finished run keeps no outbox entry (one left
    would be relayed again by every later recovery of the run: duplicate messages, stale timers)."""
    # each transition sets or clears a timeout timer: an outbox entry per transition, relayed, then dropped
    spec = HEAD.format(name="dropped") + "steps:\n" + "".join(f"  - {s}: {{worker: net.{s}, timeout: 10s}}\n"
                                                             for s in "abc")
    outbox_drop = (b"HDEL", b":outbox")

    async def main() -> Any:
        async with FaultProxy(server.socket, tmp_path) as proxy, RedisClient(server.url, prefix=prefix) as client:
            worker = worker_here(proxy.url, prefix, registry=registry(net_a=done, net_b=done, net_c=done))
            proxy.reset_on(*outbox_drop, count=3)
            run_id = (await client.submit(compile_text(spec), {})).run_id
            key = Keys(prefix).outbox(run_id)

            async def body() -> Any:
                result = await client.follow(run_id)

                async def empty() -> bool:
                    return not await client.store.call("EXISTS", key)

                with contextlib.suppress(AssertionError):  # (said by the assertion below, with what was left)
                    await until(empty, 5, "the run's outbox emptied")
                # (and nothing in flight: each attempt's lease and deadline went with its answer)
                assert await client.store.call("HGETALL", Keys(prefix).tasks(run_id)) in ([], {})
                return result, await client.store.call("HKEYS", key)

            result, left = await serving([worker], body)
            return result, left, proxy.resets

    result, left, resets = asyncio.run(main())
    assert result.status == "completed" and resets == 3  # three drops were lost with their connection
    assert left == []  # ... and sent again


# --- F4: what a worker says of its rejected results ---------------------------------------------------------------


def test_a_result_the_run_rejects_because_its_attempt_timed_out_is_counted_and_said(
        url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A sync step that outlives its timeout (its thread cannot be stopped) reports its success after the run
    gave up on the attempt: the kernel records ``result_rejected``. The worker counts it with the results its lease
    guard rejected (the exit line's "late result(s) rejected") and says why — before, it said nothing and counted
    0."""
    spec = HEAD.format(name="outlived") + (
        "steps:\n  - a: {worker: net.a, compensate: net.undo_a}\n  - b: {worker: net.b, timeout: 200ms}\n")

    def slow(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        time.sleep(0.6)
        return {}

    worker = worker_here(url, prefix, registry=registry(net_a=done, net_undo_a=done, net_b=slow))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(compile_text(spec), {})).run_id

            async def body() -> Any:
                result = await client.follow(run_id, late_grace=5)
                await until(lambda: _true(worker.stats.rejected), 5, "the late success reported")
                return result

            return await serving([worker], body)

    with caplog.at_level(logging.WARNING, logger="flowdsl.redis"):
        result = asyncio.run(main())
    assert (result.status, result.error["type"]) == ("compensated", "StepTimeout")
    assert worker.stats.rejected == 1
    (line,) = said(caplog, "(task_succeeded) rejected")
    assert "/b#1" in line and "its attempt was no longer in flight (it had timed out" in line


def test_a_result_rejected_for_a_lost_lease_is_said_once_and_never_announced_after_the_fact(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another process takes a running step's entry over; the step then ends and its result is rejected by the
    lease guard while a heartbeat's read of the leases is in flight. The worker says "result … rejected: its lease
    had been lost" — and the heartbeat, reading the lost lease after that, does not go on to announce "lease …
    lost; its result will be rejected" (the future tense, after the fact)."""
    spec = HEAD.format(name="stolen") + "steps:\n  - a: {worker: net.a}\n"
    running, release = asyncio.Event(), asyncio.Event()

    async def step(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        running.set()
        await release.wait()
        return {}

    worker = worker_here(url, prefix, registry=registry(net_a=step), lease_s=0.6)
    other = "r:elsewhere|another-process|n"

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(compile_text(spec), {})).run_id

            async def body() -> Any:
                await running.wait()
                leases = worker.store.leases

                async def slow_leases(held: list[tuple[str, str]]) -> list[str]:
                    values = await leases(held)
                    if other in values:  # the step's result is reported, and rejected, while this read is out
                        release.set()
                        await until(lambda: _true(worker.stats.rejected), 5, "the result rejected")
                    return values

                monkeypatch.setattr(worker.store, "leases", slow_leases)
                await client.store.call("HSET", Keys(prefix).tasks(run_id), f"{run_id}/a#1", other)
                await until(lambda: _true(worker.stats.rejected and not worker._held), 5, "the result rejected")
                await asyncio.sleep(0.3)  # (a heartbeat more)

            return await serving([worker], body)

    with caplog.at_level(logging.WARNING, logger="flowdsl.redis"):
        asyncio.run(main())
    assert len(said(caplog, "rejected: its lease had been lost")) == 1
    assert said(caplog, "lost (another process took its entry over); its result will be rejected") == []
