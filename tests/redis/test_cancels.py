"""Cancel requests of started runs travel on a stream of their own, which a worker reads whether or not it has
a free slot: on the control stream, behind start requests and read only with a slot free, a cancel reached a run
of a busy worker after the run had completed (its client told "requested")."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import GROUP
from tests.redis.inproc import serving, stopped, until_event, worker_here
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n  - conf.c\n"


async def _when_running(client: RedisClient, run_id: str, step: str) -> None:
    """Wait until ``step`` of the run is scheduled (its chain runs it at once)."""
    await until_event(client, run_id, "step_scheduled", step)


def test_a_cancel_reaches_a_run_of_a_worker_whose_slots_are_all_taken(url: str, prefix: str) -> None:
    """One slot, taken by the run's chain (a 2 s step), a second run's start request waiting for it: the cancel
    is applied while the step runs, and the run ends cancelled, its first step undone."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            busy = await client.submit(compile_text(SAGA), {"script": {"b": {"sleep": 2.0}}})
            queued = await client.submit(compile_text(SAGA), {"script": {}})

            async def body() -> Any:
                await _when_running(client, busy.run_id, "b")
                asked = time.monotonic()
                assert await client.cancel(busy.run_id, "too slow") == "requested"
                ended = await client.follow(busy.run_id)
                took = time.monotonic() - asked
                return ended, took, await client.follow(queued.run_id)

            return await serving([worker_here(url, prefix, concurrency=1)], body)

    ended, took, other = asyncio.run(main())
    assert (ended.status, ended.compensated, ended.error["message"]) == ("cancelled", ["a"], "too slow")
    assert ended.steps["c"]["status"] != "succeeded" and took < 1.8  # not after the 2 s step ran out
    assert ended.steps["b"]["status"] != "succeeded"  # (cut short, however slow the machine)
    assert other.status == "completed"


def test_a_cancel_request_on_the_control_stream_of_an_older_client_is_still_applied(url: str,
                                                                                      prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {"b": {"hang": True}}})

            async def body() -> Any:
                await _when_running(client, sub.run_id, "b")
                born = await client.store.call("HGET", client.keys.run(sub.run_id), "born")
                request = {"type": "cancel", "run_id": sub.run_id, "reason": "old client", "g": born.decode()}
                await client.store.call("XADD", client.keys.control, "*", "c", json.dumps(request))
                return await client.follow(sub.run_id)

            return await serving([worker_here(url, prefix)], body)

    result = asyncio.run(main())
    assert (result.status, result.compensated, result.error["message"]) == ("cancelled", ["a"], "old client")


def test_a_cancel_request_a_dead_process_had_read_is_taken_over_after_the_lease(url: str, prefix: str,
                                                                                  server: RedisServer) -> None:
    """A process read the request and died before applying it: the entry, pending under its name, is taken
    over after the lease — by a worker with no free slot too."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {"b": {"sleep": 3.0}}})
            worker = worker_here(url, prefix, concurrency=1, lease_s=0.5)

            async def body() -> Any:
                await _when_running(client, sub.run_id, "b")
                born = await client.store.call("HGET", client.keys.run(sub.run_id), "born")
                request = {"type": "cancel", "run_id": sub.run_id, "reason": "taken over", "g": born.decode()}
                # the request sent and read by the dead process at once (one transaction), so the live worker
                # never reads it as new; nobody acknowledges it
                dead = server.client().pipeline(transaction=True)
                dead.xadd(client.keys.cancels, {"c": json.dumps(request)})
                dead.xreadgroup(GROUP, "dead-process", {client.keys.cancels: ">"}, count=1)
                assert (await asyncio.to_thread(dead.execute))[1][0][1]
                return await client.follow(sub.run_id)

            return await serving([worker], body), worker.stats.reclaimed

    (result, reclaimed) = asyncio.run(main())
    assert (result.status, result.error["message"]) == ("cancelled", "taken over") and reclaimed >= 1
    assert result.steps["c"]["status"] != "succeeded"


def test_cancel_requests_in_flight_are_bounded(url: str, prefix: str) -> None:
    """The loop reading cancel requests read 64 more whatever it was handling: a burst of requests became as
    many handlers at once (and ids renewed by every heartbeat)."""
    async def main() -> int:
        worker = worker_here(url, prefix, concurrency=1)
        serving_task = asyncio.create_task(worker.serve())
        peak = 0
        try:
            while not hasattr(worker, "advancer"):
                await asyncio.sleep(0.01)
            real = worker.advancer.apply_event

            async def slow(*args: Any, **kwargs: Any) -> str:  # (a Redis under load)
                await asyncio.sleep(0.5)
                return await real(*args, **kwargs)

            worker.advancer.apply_event = slow  # type: ignore[method-assign]
            sender = connect(url)
            try:
                for i in range(300):
                    request = {"type": "cancel", "run_id": f"nope-{i}", "reason": "x", "g": ""}
                    await sender.xadd(worker.keys.cancels, {"c": json.dumps(request)})
            finally:
                await sender.aclose()
            for _ in range(40):
                peak = max(peak, len(worker._cancelling))
                await asyncio.sleep(0.025)
        finally:
            worker.stop()
            await asyncio.wait_for(stopped([worker], [serving_task]), 30)
        return peak

    assert 0 < asyncio.run(main()) <= 64
