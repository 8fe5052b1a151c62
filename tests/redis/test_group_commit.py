"""Group commit: the results queued behind one another for a run are written by one transition, each with its
own journal entry and guard; a refused guard or event falls back to one transition each, with the same
outcomes as if they had come alone."""

from __future__ import annotations

import asyncio
from typing import Any

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.kernel import replay
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.runtime.redis.advance import Advancer, Outcome
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.store import Clock, Store

WIDE = """flowdsl: 1
name: wide
workers: [tests.runtime.workers]
steps:
  - for_each: each
    items: "${ $.items }"
    steps:
      - conf.a: {with: {x: "${ $item }"}}
"""


async def _started(url: str, prefix: str, run_id: str, items: int) -> tuple[Advancer, list[dict[str, Any]]]:
    """A started run of WIDE, every item's task held under a lease of its own; the advancer and the tasks."""
    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(WIDE), {"items": list(range(items))}, run_id=run_id)
    store = Store(connect(url), Keys(prefix))
    await store.load_scripts()
    advancer = Advancer(store, Clock())
    assert await advancer.start(run_id) == Outcome.APPLIED
    record = await advancer._record(run_id)
    assert record is not None
    tasks = [{"task_id": task_id, "token": f"1-{n}@q|w|n"} for n, task_id in enumerate(sorted(record.state["tasks"]))]
    for task in tasks:
        assert await store.pickup(run_id, task["task_id"], f"1-{tasks.index(task)}@q", task["token"]) == (1, "")
    return advancer, tasks


async def _report(advancer: Advancer, run_id: str, tasks: list[dict[str, Any]]) -> list[str]:
    """Every task's success reported at once (as the handlers of a busy worker do): the first takes the run's
    lock, the others queue behind it."""
    return list(await asyncio.gather(*(
        advancer.apply_event(run_id, {"type": "task_succeeded", "task_id": t["task_id"], "result": {"n": i}},
                             guard=(t["task_id"], "lease", t["token"]), reporter="w")
        for i, t in enumerate(tasks))))


async def _journal(store: Store, run_id: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await store.call("XRANGE", store.keys.journal(run_id), "-", "+")]


def test_results_queued_for_a_run_are_written_by_one_transition_and_replay_to_the_same_state(
        url: str, prefix: str) -> None:
    async def main() -> None:
        advancer, tasks = await _started(url, prefix, "g1", 5)
        assert await _report(advancer, "g1", tasks) == [Outcome.APPLIED] * 5
        # the first alone (it found the lock free), the four queued behind it together
        assert (advancer.transitions, advancer.grouped) == (3, 4)
        record = await advancer._record("g1")
        assert record is not None and record.state["status"] == "completed" and record.version == 6
        journal = await _journal(advancer.store, "g1")
        assert [int(f[b"v"]) for f in journal] == [1, 2, 3, 4, 5, 6]  # one entry, one version per event
        # the journal replays to the state the process holds, and to the events journaled with each entry
        state, _, events = replay(record.plan, [loads(f[b"in"]) for f in journal])
        assert state == record.state
        assert events == [e for f in journal for e in loads(f[b"ev"])]
        # and a process that loads the run from Redis gets it too
        fresh = Advancer(advancer.store, Clock())
        loaded = await fresh._record("g1")
        assert loaded is not None and loaded.state == record.state and loaded.version == 6
        assert [r["n"] for r in loaded.state["nodes"]["each"]["result"]] == [0, 1, 2, 3, 4]
        await advancer.store.client.aclose()

    asyncio.run(main())


def test_a_lost_lease_among_queued_results_falls_back_to_one_transition_each(url: str, prefix: str) -> None:
    async def main() -> None:
        advancer, tasks = await _started(url, prefix, "g2", 4)
        tasks[2] = {**tasks[2], "token": "1-9@q|other|n"}  # this worker lost that task's lease
        assert await _report(advancer, "g2", tasks) == [Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED,
                                                       Outcome.APPLIED]
        assert advancer.grouped == 0 and advancer.transitions == 4  # start, then the three accepted alone
        journal = await _journal(advancer.store, "g2")
        notes = [loads(f[b"note"]) for f in journal if b"note" in f]
        assert [(n["reason"], n["task_id"], n["worker"]) for n in notes] == [("lease_lost", tasks[2]["task_id"],
                                                                             "w")]
        assert [int(f[b"v"]) for f in journal if b"v" in f] == [1, 2, 3, 4]
        record = await advancer._record("g2")
        assert record is not None and list(record.state["tasks"]) == [tasks[2]["task_id"]]  # still in flight
        await advancer.store.client.aclose()

    asyncio.run(main())


def test_an_event_the_kernel_refuses_among_queued_ones_is_refused_alone(url: str, prefix: str) -> None:
    async def main() -> None:
        advancer, tasks = await _started(url, prefix, "g3", 3)
        reports = [advancer.apply_event("g3", {"type": "task_succeeded", "task_id": t["task_id"], "result": {}},
                                        guard=(t["task_id"], "lease", t["token"]), reporter="w") for t in tasks]
        reports.insert(2, advancer.apply_event("g3", {"type": "no_such_event"}))
        assert await asyncio.gather(*reports) == [Outcome.APPLIED, Outcome.APPLIED, Outcome.INVALID,
                                                  Outcome.APPLIED]
        assert advancer.grouped == 0
        record = await advancer._record("g3")
        assert record is not None and record.state["status"] == "completed"
        await advancer.store.client.aclose()

    asyncio.run(main())


def test_a_wide_for_each_on_one_worker_is_group_committed(url: str, prefix: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(WIDE), {"items": list(range(40))})
            worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(burst=True, handle_signals=False,
                                                                           concurrency=16, lease_s=5))
            stats = await asyncio.wait_for(worker.serve(), 30)
            result = await client.follow(sub.run_id)
        assert result.status == "completed" and stats.tasks == 40
        assert worker.advancer.grouped > 0 and stats.transitions < 41  # 40 results and the start

    asyncio.run(main())


def test_a_transition_drops_only_what_it_both_did_and_undid() -> None:
    """``_unsent``: an attempt dispatched and ended by one transition is never sent, nor its deadline; a timer
    it set and then cleared is dropped, but not one it cleared (armed earlier) and set again, nor a later set."""
    from flowdsl.runtime.redis.advance import _unsent
    from flowdsl.runtime.redis.keys import Keys

    run = "r1"
    deadline = Keys.start_deadline(run, "r1/a#1")
    ops = [{"o": "task", "q": "q", "m": {"task_id": "r1/a#1"}, "v": 1}, {"o": "timer", "k": deadline, "d": 5},
           {"o": "timer", "k": "t1", "d": 5}, {"o": "untimer", "k": "t1"}, {"o": "timer", "k": "t1", "d": 9},
           {"o": "untimer", "k": "t2"}, {"o": "timer", "k": "t2", "d": 7},
           {"o": "cancel", "t": "r1/a#1"}, {"o": "untimer", "k": deadline}]
    task_ops = [("s", "r1/a#1", "q"), ("x", "r1/a#1", ""), ("d", "r1/a#1", ""), ("s", "r1/b#1", "q")]
    kept, kept_tasks = _unsent(run, ops, task_ops)
    assert kept == [{"o": "timer", "k": "t1", "d": 9}, {"o": "untimer", "k": "t2"}, {"o": "timer", "k": "t2", "d": 7}]
    assert kept_tasks == [("s", "r1/b#1", "q")]
    chained = [("c", "r1/c#1", "r:tok", "{}"), ("d", "r1/c#1", "")]  # held by this process: no "task" op
    assert _unsent(run, [], chained) == ([], [])
