"""Races and edges of the operator's side of the Redis runtime: a resolution against a late answer, duplicate start
requests against runs that ended, expired or were resolved, the tidying rounds of several processes.

In-process workers on the session's private redis-server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.keys import Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here

#: a's undo fails for good; charge times out (200 ms) while its thread runs on: the run ends needs_intervention with
#: charge's attempt in doubt
IN_DOUBT = compile_text("flowdsl: 1\nname: doubt_ni\nsteps:\n  - a: {compensate: {worker: undo_a, retry: 1}}\n"
                        "  - charge: {timeout: 200ms, compensate: undo_charge}\n")


def _doubt_registry(go: threading.Event) -> WorkerRegistry:
    registry = WorkerRegistry()

    def a(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
        raise RuntimeError("the undo service is down")

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        assert go.wait(20)
        if data.get("late") == "fails":
            raise RuntimeError("declined, late")
        return {"charged": True}

    def undo_charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    for fn in (a, undo_a, charge, undo_charge):
        registry.register(fn.__name__, fn)
    return registry


def test_a_late_answer_that_leaves_nothing_new_to_undo_keeps_a_resolved_run_resolved(
        url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Resolved while its attempt in doubt still ran: the attempt's late failure changes nothing (still resolved,
    still expiring, its end time and its end's log line as they were); a late success is something new to undo
    (needs_intervention again, kept with no expiry, logged again)."""
    caplog.set_level(logging.INFO, logger="flowdsl.redis")
    go = threading.Event()
    keys = Keys(prefix)

    async def main() -> dict[str, Any]:
        async with RedisClient(url, prefix=prefix) as client:
            for run_id, late in (("late-fails", "fails"), ("late-succeeds", "succeeds")):
                await client.submit(IN_DOUBT, {"late": late}, run_id=run_id, retention_s=60)

            async def body() -> dict[str, Any]:
                said: dict[str, Any] = {}
                for run_id in ("late-fails", "late-succeeds"):
                    assert (await client.follow(run_id, late_grace=0)).status == "needs_intervention"
                    said[run_id] = {"finished": await client.redis.hget(keys.run(run_id), "finished")}
                    await client.resolve(run_id, "undone by hand")
                go.set()
                for _ in range(400):
                    if not any([await client.redis.exists(keys.tasks(r)) for r in said]):
                        break
                    await asyncio.sleep(0.05)
                for run_id in said:
                    said[run_id].update(status=(await client.info(run_id)).status,
                                        ttl=await client.redis.pttl(keys.run(run_id)),
                                        again=await client.redis.hget(keys.run(run_id), "finished"))
                return said

            try:
                return dict(await serving([worker_here(url, prefix, _doubt_registry(go))], body))
            finally:
                go.set()

    said = asyncio.run(main())
    fails, succeeds = said["late-fails"], said["late-succeeds"]
    assert fails["status"] == "resolved" and 50_000 < fails["ttl"] <= 60_000, fails
    assert fails["again"] == fails["finished"], fails  # (the late failure did not end the run a second time)
    assert succeeds["status"] == "needs_intervention" and succeeds["ttl"] == -1, succeeds
    ends = [(r.run_id, r.status) for r in caplog.records if hasattr(r, "flow") and hasattr(r, "status")]
    assert ends.count(("late-fails", "needs_intervention")) == 1, ends
    assert ends.count(("late-succeeds", "needs_intervention")) == 2, ends


PLAIN = compile_text("flowdsl: 1\nname: plain_r\nsteps:\n  - a: {compensate: undo_charge}\n")


def _plain_registry() -> WorkerRegistry:
    registry = WorkerRegistry()
    registry.register("a", lambda data, ctx: {})
    registry.register("undo_charge", lambda data, ctx: {})
    return registry


def test_duplicate_start_requests_recreate_no_expired_run_and_restart_no_resolved_one(url: str, prefix: str) -> None:
    """A start request that arrives after its run expired, or after its run ended needs_intervention and was
    resolved, is acknowledged and writes nothing; the upkeep of several processes sending a lost run's start request
    again at once starts it once."""
    keys = Keys(prefix)
    go = threading.Event()
    go.set()

    async def main() -> dict[str, Any]:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(PLAIN, {}, run_id="gone-1", retention_s=60)
            await client.submit(IN_DOUBT, {"late": "fails"}, run_id="res-1", retention_s=60)
            # a lost start request, met by two processes tidying at once (its submission ten minutes old)
            await client.submit(PLAIN, {}, run_id="lost-x", retention_s=60)
            await client.redis.xtrim(keys.control, maxlen=0)
            await client.submit(PLAIN, {}, run_id="gone-1", retention_s=60)  # (not started: its request again)
            await client.submit(IN_DOUBT, {"late": "fails"}, run_id="res-1", retention_s=60)
            await client.redis.hset(keys.run("lost-x"), "submitted", 1)

            async def first() -> None:
                assert (await client.follow("gone-1")).status == "completed"
                assert (await client.follow("res-1")).status == "needs_intervention"

            await serving([worker_here(url, prefix, _doubt_registry(go))], first)
            await client.resolve("res-1", "done")
            res_before = await client.redis.hgetall(keys.run("res-1"))
            for key in keys.run_keys("gone-1"):  # (its retention, cut short)
                await client.redis.pexpire(key, 1)
            for _ in range(100):
                if not await client.redis.exists(keys.run("gone-1")):
                    break
                await asyncio.sleep(0.05)
            for run_id in ("gone-1", "res-1"):
                await client.store.send_start(run_id)
            workers = [worker_here(url, prefix, _doubt_registry(go), lease_s=0.1, tidy_s=0.05) for _ in range(3)]

            async def second() -> None:
                assert (await client.follow("lost-x")).status == "completed"
                await asyncio.sleep(0.5)  # (more rounds: the run has started, nothing more is sent)

            await serving(workers, second)
            _, journal = await client.result("lost-x")
            return {"gone": [await client.redis.exists(k) for k in keys.run_keys("gone-1")],
                    "gone_listed": await client.redis.zscore(keys.runs, "gone-1"),
                    "res": (res_before, await client.redis.hgetall(keys.run("res-1")),
                            (await client.info("res-1")).status),
                    "starts": [e["type"] for e in journal.inputs].count("start"),
                    "resent": sum(w.stats.starts_resent for w in workers),
                    "left": (await client.redis.xlen(keys.control), await client.dead_letters())}

    got = asyncio.run(main())
    assert got["gone"] == [0, 0, 0, 0] and got["gone_listed"] is None, got
    before, after, status = got["res"]
    assert before == after and status == "resolved"
    assert got["starts"] == 1 and 1 <= got["resent"] <= 3, got
    assert got["left"] == (0, []), got


def test_a_start_request_waiting_for_good_does_not_make_every_round_read_the_streams(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose start request is a dead letter (it waits for a person) stays not started: a process's tidying
    rounds read the control stream and the dead letters for it once, then again only every tenth round."""
    from flowdsl.runtime.redis import upkeep
    from flowdsl.runtime.redis.store import Store

    keys = Keys(prefix)
    looks: list[bool] = []
    rounds: list[int] = []
    real_look, real_tidy = Store.start_requests, upkeep.Upkeep._tidy

    async def look(self: Store, dead: bool = False, limit: int = 10_000) -> Any:
        looks.append(dead)
        return await real_look(self, dead, limit)

    async def tidy(self: Any, cursor: int) -> int:
        rounds.append(cursor)
        return await real_tidy(self, cursor)

    monkeypatch.setattr(Store, "start_requests", look)
    monkeypatch.setattr(upkeep.Upkeep, "_tidy", tidy)

    async def main() -> str:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(PLAIN, {}, run_id="parked-1")
            await client.redis.hset(keys.run("parked-1"), "submitted", 1)
            (entry_id, fields), = await client.redis.xrange(keys.control)
            await client.redis.xdel(keys.control, entry_id)
            await client.redis.xadd(keys.dead, {"stream": keys.control, "id": entry_id, "reason": "r",
                                                "f:c": fields[b"c"]})
            worker = worker_here(url, prefix, _plain_registry(), lease_s=0.1, tidy_s=0.02)

            async def body() -> None:
                for _ in range(400):
                    if len(rounds) >= 25:
                        return
                    await asyncio.sleep(0.02)

            await serving([worker], body)
            return (await client.info("parked-1")).status

    assert asyncio.run(main()) == "submitted"
    assert len(rounds) >= 25
    assert looks.count(False) <= 1 + len(rounds) // 10, (len(looks), len(rounds))


def test_deleting_every_dead_letter_goes_page_by_page_and_leaves_those_set_aside_meanwhile(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = Keys(prefix)
    pages: list[list[str]] = []

    async def main() -> tuple[list[str], list[str], list[str], list[str]]:
        async with RedisClient(url, prefix=prefix) as client:
            ids = [(await client.redis.xadd(keys.dead, {"stream": keys.control, "id": "1-0", "reason": "r",
                                                        "f:c": "x" * 1000})).decode() for _ in range(7)]
            real = client.delete_dead_letters
            added: list[str] = []

            async def deleting(batch: list[str]) -> list[str]:
                pages.append(batch)
                if len(pages) == 1:  # meanwhile: one more set aside, and one deleted by someone else
                    added.append((await client.redis.xadd(keys.dead, {"stream": keys.control, "id": "2-0",
                                                                      "reason": "r", "f:c": "y"})).decode())
                    await client.redis.xdel(keys.dead, ids[1])  # (in this page)
                return await real(batch)

            monkeypatch.setattr(client, "delete_dead_letters", deleting)
            deleted, skipped = await client.delete_all_dead_letters(page=2)
            return ids, deleted, skipped, [letter.id for letter in await client.dead_letters(limit=None)] + added

    ids, deleted, skipped, left = asyncio.run(main())
    assert max(len(p) for p in pages) == 2 and len(pages) == 4
    assert deleted == [d for d in ids if d != ids[1]] and skipped == [ids[1]]
    assert left[0] == left[1]  # only the dead letter set aside meanwhile is left
