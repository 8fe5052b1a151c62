"""A deployment over time: run ids used again after their run expired, the run index and the worker records
kept no longer than what they list, outbox entries relayed once, settings of a resubmission compared."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.codec import dumps
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.client import RunIdTaken
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import GROUP
from flowdsl.runtime.redis.store import Clock, Store
from flowdsl.workers import StepContext, WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.runtime.conformance import HEADER

#: one step only a process registering ``ghost.x`` serves
GHOST = HEADER.format(name="ghost") + "steps:\n  - ghost.x\n"




async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_a_run_id_used_again_after_its_run_expired_runs_on_its_own_input(url: str, prefix: str) -> None:
    """The first run's attempt fails at its schedule-to-start deadline, its message still in the stream of a
    worker nobody serves; the run expires. The same id submitted again with another input: the process that
    serves ``ghost.x`` meets the old message first (before the new run's, queued by a process that does not
    serve it) and must drop it, not run it as the new run's attempt."""
    seen: list[Any] = []
    ghosts = WorkerRegistry()

    async def ghost(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        seen.append(data["tag"])
        return {"saw": data["tag"]}

    ghosts.register("ghost.x", ghost)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            plan = compile_text(GHOST)
            first = await client.submit(plan, {"tag": "old"}, run_id="again-1", schedule_timeout_s=0.2,
                                        retention_s=1)
            old = await serving([worker_here(url, prefix)], lambda: client.follow(first.run_id))
            assert await client.store.call("XLEN", client.keys.queue("ghost.x")) == 1  # the old message

            async def expired() -> bool:
                return not await client.store.call("EXISTS", client.keys.run("again-1"))
            await _until(expired)
            again = await client.submit(plan, {"tag": "new"}, run_id="again-1")
            assert again.created

            async def queued() -> bool:  # started by a process that does not serve ghost.x: its task is queued
                return await client.store.call("XLEN", client.keys.queue("ghost.x")) == 2
            await serving([worker_here(url, prefix)], lambda: _until(queued))
            new = await serving([worker_here(url, prefix, registry=ghosts)], lambda: client.follow("again-1"))
            left = await client.store.call("XLEN", client.keys.queue("ghost.x"))
            return old, new, left

    old, new, left = asyncio.run(main())
    assert old.status == "failed" and old.error["type"] == "ScheduleToStartTimeout"
    assert new.status == "completed" and new.context["saw"] == "new"
    assert seen == ["new"]  # the old message was dropped, never run
    assert left == 0  # acknowledged and deleted, both


def test_the_run_index_lists_a_run_id_used_again_by_its_new_submission(url: str, prefix: str) -> None:
    async def main() -> tuple[float, float, list[str]]:
        async with RedisClient(url, prefix=prefix) as client:
            plan = compile_text(GHOST)
            await client.submit(plan, {"tag": "a"}, run_id="listed-1", retention_s=1)
            first = float(await client.store.call("ZSCORE", client.keys.runs, "listed-1"))
            # as if the run had ended and expired
            await client.store.call("DEL", client.keys.run("listed-1"))
            await asyncio.sleep(0.01)
            await client.submit(plan, {"tag": "b"}, run_id="listed-1")
            second = float(await client.store.call("ZSCORE", client.keys.runs, "listed-1"))
            return first, second, [r.run_id for r in await client.runs()]

    first, second, listed = asyncio.run(main())
    assert second > first and listed == ["listed-1"]


def test_a_resubmission_under_a_run_id_with_other_settings_is_refused(url: str, prefix: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            plan = compile_text(GHOST)
            await client.submit(plan, {"tag": "a"}, run_id="same-1", retention_s=60)
            assert not (await client.submit(plan, {"tag": "a"}, run_id="same-1", retention_s=60)).created
            with pytest.raises(RunIdTaken, match="another retention"):
                await client.submit(plan, {"tag": "a"}, run_id="same-1", retention_s=120)
            with pytest.raises(RunIdTaken, match="another seed"):
                await client.submit(plan, {"tag": "a"}, run_id="same-1", retention_s=60, seed=7)

    asyncio.run(main())


def test_unlisting_removes_an_index_entry_only_while_its_score_is_unchanged(url: str, prefix: str) -> None:
    async def main() -> list[Any]:
        async with RedisClient(url, prefix=prefix) as client:
            store, idx = client.store, client.keys.runs
            await store.call("ZADD", idx, 5, "r1", 7, "r2")
            removed = await store.unlist([(b"r1", b"4"), (b"r2", b"7"), (b"r3", b"1")])
            return [removed, await store.call("ZRANGE", idx, 0, -1)]

    assert asyncio.run(main()) == [1, [b"r1"]]


async def _tidying_worker(url: str, prefix: str, **options: Any) -> Any:
    """A worker object connected enough to run its tidying rounds (``_tidy``) by hand, not serving."""
    worker = worker_here(url, prefix, **options)
    worker.client = connect(url)
    worker.store = Store(worker.client, worker.keys)
    worker.clock = Clock()
    await worker.clock.sync(worker.client)
    return worker


def test_tidying_drops_expired_runs_from_the_index_and_forgets_silent_worker_processes(url: str,
                                                                                        prefix: str) -> None:
    """Nobody lists the runs, workers die without a word: what a transition cannot touch (shared keys) is
    tidied by the worker processes themselves. Entries still holding work are kept."""
    worker_name: list[str] = []

    async def main() -> dict[str, Any]:
        worker = await _tidying_worker(url, prefix, lease_s=0.1, forget_s=0.5)  # forgets after 10 leases: 1 s
        worker_name.append(worker.name)
        store, keys = worker.store, worker.keys
        try:
            await store.call("HSET", keys.run("alive-1"), "submitted", 1)
            await store.call("ZADD", keys.runs, *[x for i in range(450) for x in (i, f"gone-{i}")], 1000, "alive-1")
            for stream in worker.streams:
                await store.call("XGROUP", "CREATE", stream, GROUP, "$", "MKSTREAM")
            await store.call("XGROUP", "CREATECONSUMER", keys.control, GROUP, "idle-one")
            await store.call("XGROUP", "CREATECONSUMER", keys.control, GROUP, worker.name)
            await store.call("XADD", keys.control, "*", "c", "{}")
            await store.call("XREADGROUP", "GROUP", GROUP, "holder", "COUNT", 1, "STREAMS", keys.control, ">")
            await store.call("HSET", keys.workers, "dead", dumps({"seen": worker.clock.now() - 5000}),
                             "broken", b"{")
            await asyncio.sleep(1.1)
            await store.call("HSET", keys.workers, "live", dumps({"seen": worker.clock.now() - 500}))
            cursor = await worker._tidy(0)  # one round: the three pages (of 200) of these 451 runs
            consumers = {c["name"].decode() for c in await worker.client.xinfo_consumers(keys.control, GROUP)}
            return {"cursor": cursor, "index": await store.call("ZRANGE", keys.runs, 0, -1),
                    "workers": sorted(await worker.client.hkeys(keys.workers)), "consumers": consumers}
        finally:
            await worker.client.aclose()

    got = asyncio.run(main())
    assert got["index"] == [b"alive-1"] and got["cursor"] == 0
    assert got["workers"] == [b"live"]
    assert got["consumers"] == {"holder", worker_name[0]}  # the holder keeps its entry; this process its name


def test_one_tidying_round_drops_every_expired_run_at_the_front_of_the_index_however_many(url: str,
                                                                                          prefix: str) -> None:
    """Runs ending faster than 2,000 a minute per process: the pages that are mostly expired runs cost nothing
    against a round's budget, so the index does not grow without end; runs still kept are walked ten pages
    (2,000 runs) a round, as before."""
    async def main() -> tuple[int, int, int, int]:
        worker = await _tidying_worker(url, prefix)
        store, keys = worker.store, worker.keys
        try:
            for stream in worker.streams:
                await store.call("XGROUP", "CREATE", stream, GROUP, "$", "MKSTREAM")
            kept = [f"kept-{i}" for i in range(2500)]
            for i in range(0, len(kept), 500):
                await asyncio.gather(*(store.call("HSET", keys.run(r), "submitted", 1) for r in kept[i:i + 500]))
            await store.call("ZADD", keys.runs, *[x for i in range(5000) for x in (i, f"gone-{i}")])
            await store.call("ZADD", keys.runs, *[x for i, r in enumerate(kept) for x in (10_000 + i, r)])
            cursor = await worker._tidy(0)
            first = (cursor, await store.call("ZCARD", keys.runs))
            cursor = await worker._tidy(cursor)
            return (*first, cursor, await store.call("ZCARD", keys.runs))
        finally:
            await worker.client.aclose()

    # round one: the 25 expired pages from the oldest, the first page of runs kept (where that walk stops), then
    # 10 pages of runs kept from there; round two: the oldest page, then the last 300 kept, the end
    assert asyncio.run(main()) == (2200, 2500, 0, 2500)


def test_runs_expiring_behind_a_round_that_stops_short_of_the_end_are_dropped_by_the_next(url: str,
                                                                                          prefix: str) -> None:
    """More runs kept than a round walks, and more submitted each round: the cursor trailed the end of the index
    forever, never back to its oldest runs, which expired behind it and stayed listed without bound (a soak test
    saw 22,000 of them at 40 runs/s). Each round first walks from the oldest while pages are mostly expired."""
    async def main() -> tuple[int, list[bytes]]:
        worker = await _tidying_worker(url, prefix)
        store, keys = worker.store, worker.keys
        try:
            kept = [f"kept-{i}" for i in range(2400)]
            for i in range(0, len(kept), 500):
                await asyncio.gather(*(store.call("HSET", keys.run(r), "submitted", 1) for r in kept[i:i + 500]))
            await store.call("ZADD", keys.runs, *[x for i in range(300) for x in (i, f"gone-{i}")])
            await store.call("ZADD", keys.runs, *[x for i, r in enumerate(kept) for x in (10_000 + i, r)])
            await worker._tidy(400)  # the last round stopped among the runs kept, past the ones now expired
            return await store.call("ZCARD", keys.runs), await store.call("ZRANGE", keys.runs, 0, 0)
        finally:
            await worker.client.aclose()

    assert asyncio.run(main()) == (2400, [b"kept-0"])


def test_runs_expiring_behind_runs_that_do_not_expire_are_dropped_within_ten_rounds(url: str,
                                                                                    prefix: str) -> None:
    """Runs that never expire (submitted, never started) at the front of the index stop the walk from the oldest,
    and the index grows by more than ten pages a round: each round also walks as many runs as were listed since
    the last, so the cursor gains on the end and goes round, and the runs expired behind the front are dropped
    (they stayed listed)."""
    async def main() -> int:
        worker = await _tidying_worker(url, prefix)
        store, keys = worker.store, worker.keys

        async def listed(names: list[str], first: int, kept: bool = True) -> None:
            for i in range(0, len(names), 500):
                if kept:
                    await asyncio.gather(*(store.call("HSET", keys.run(r), "submitted", 1) for r in names[i:i + 500]))
            await store.call("ZADD", keys.runs, *[x for i, r in enumerate(names) for x in (first + i, r)])

        try:
            await listed([f"waiting-{i}" for i in range(400)], 0)
            await listed([f"gone-{i}" for i in range(300)], 1000, kept=False)
            await listed([f"kept-{i}" for i in range(2400)], 10_000)
            cursor = 700  # the last round stopped among the runs kept, past the ones now expired
            for n in range(1, 11):  # each round, more runs than ten pages arrive
                cursor = await worker._tidy(cursor)
                await listed([f"new-{n}-{i}" for i in range(2200)], 100_000 * n)
            return len(await store.call("ZRANGEBYSCORE", keys.runs, 1000, 1299))
        finally:
            await worker.client.aclose()

    assert asyncio.run(main()) == 0


def test_a_relayed_dispatch_leaves_nothing_to_relay_again(url: str, prefix: str) -> None:
    """A task nobody picks up: its outbox entry goes once its message is queued, so a process that takes the
    run over later (recovery) does not queue the message again — else every recovery would add a copy."""
    async def main() -> tuple[int, list[Any], int]:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(GHOST), {"tag": "a"}, run_id="relayed-1")

            async def queued() -> bool:
                return await client.store.call("XLEN", client.keys.queue("ghost.x")) == 1
            await serving([worker_here(url, prefix)], lambda: _until(queued))
            outbox = await client.store.call("HLEN", client.keys.outbox("relayed-1"))
            left = await client.store.outbox("relayed-1")  # what a recovering process would relay
            return outbox, left, await client.store.call("XLEN", client.keys.queue("ghost.x"))

    assert asyncio.run(main()) == (0, [], 1)


def test_the_generation_is_compared_for_equality_not_as_a_clock(url: str, prefix: str) -> None:
    """A run's generation is the server clock at its submission; on a cluster the streams live on another
    node, whose clock may be behind. A message of the run is never taken for an older one: the generation it
    carries is compared for equality (here: a run stamped a minute in the future, parallel branches queued
    through their streams)."""
    spec = HEADER.format(name="par") + "steps:\n  - parallel: p\n    branches: [conf.a, conf.b, conf.c]\n"

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {"script": {}}, run_id="ahead-1")
            key = client.keys.run(sub.run_id)
            await client.store.call("HSET", key, "born", int(await client.store.call("HGET", key, "born")) + 60_000)
            return await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "completed"


def test_a_cancel_request_of_another_generation_of_the_run_id_cancels_nothing(url: str, prefix: str) -> None:
    """A cancel request still unread when its run expired must not cancel the next run of that id: it carries
    the generation it was asked for (a request of this one, sent by ``client.cancel``, does cancel)."""
    slow = HEADER.format(name="slow") + "steps:\n  - conf.a\n"

    async def main() -> tuple[str, str]:
        async with RedisClient(url, prefix=prefix) as client:
            plan = compile_text(slow)
            stale = await client.submit(plan, {"script": {"a": {"sleep": 0.5}}}, run_id="gen-1")
            await client.store.call("XADD", client.keys.control, "*", "c",
                                    dumps({"type": "cancel", "run_id": stale.run_id, "reason": "old", "g": "1"}))
            kept = await serving([worker_here(url, prefix)], lambda: client.follow(stale.run_id))
            mine = await client.submit(plan, {"script": {"a": {"sleep": 2}}}, run_id="gen-2")

            async def cancel_then_follow() -> Any:
                while (await client.info(mine.run_id)).status == "submitted":
                    await asyncio.sleep(0.05)
                assert await client.cancel(mine.run_id) == "requested"
                return await client.follow(mine.run_id)
            cancelled = await serving([worker_here(url, prefix)], cancel_then_follow)
            return kept.status, cancelled.status

    assert asyncio.run(main()) == ("completed", "cancelled")
