"""What a crash, a lost reply or a stale delivery leaves behind is finished, never lost or applied twice:
a timer that fires after its transition was written, a transition whose reply was lost (retried with its
token after another process wrote), a start whose reply was lost."""

from __future__ import annotations

import asyncio
import contextlib

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.advance import Advancer, Outcome
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import Keys, TimerMember
from flowdsl.runtime.redis.store import Clock, Store

SEQ = "flowdsl: 1\nname: seq\nworkers: [tests.runtime.workers]\nsteps: [conf.a, conf.b]\n"


async def _store(url: str, prefix: str) -> Store:
    store = Store(connect(url), Keys(prefix))
    await store.load_scripts()
    return store


async def _submitted(url: str, prefix: str, run_id: str) -> None:
    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(SEQ), {}, run_id=run_id)


def test_a_timer_that_fires_after_its_transition_was_written_is_skipped_at_once(url: str, prefix: str) -> None:
    """A stale fire (the process that fired it died after writing, before acknowledging) is skipped after one
    fresh read of the run — not re-read a thousand times and left claimed."""
    async def main() -> tuple[str, int]:
        await _submitted(url, prefix, "t1")
        store = await _store(url, prefix)
        advancer = Advancer(store, Clock())
        assert await advancer.start("t1") == Outcome.APPLIED  # its state is now cached here
        loads = 0
        real_load = store.load

        async def counting_load(run_id: str):  # type: ignore[no-untyped-def]
            nonlocal loads
            loads += 1
            return await real_load(run_id)

        store.load = counting_load  # type: ignore[method-assign]
        outcome = await asyncio.wait_for(advancer.fire(TimerMember("t", "t1", "t1/conf.a#1@gone")), 10)
        return outcome, loads

    outcome, loads = asyncio.run(main())
    assert outcome == Outcome.SKIPPED and loads == 1


def test_a_transition_retried_after_a_lost_reply_is_found_written_even_after_others_wrote(
        url: str, prefix: str) -> None:
    """The retry of a transition (same token) whose reply was lost: applied already (code 4), whether or not
    another process wrote after it — never a conflict that would apply its event a second time; the same for
    the transition that creates the run (never "the run exists")."""
    async def main() -> list[tuple[int, int]]:
        store = await _store(url, prefix)
        write = dict(state=b"{}", entries=[(b"{}", b"[]", None, "")], status="running")
        said = []
        said.append((await store.transition("tk", expected=0, token="create", **write))[:2])
        said.append((await store.transition("tk", expected=0, token="create", **write))[:2])  # reply lost
        said.append((await store.transition("tk", expected=1, token="mine", **write))[:2])
        said.append((await store.transition("tk", expected=2, token="theirs", **write))[:2])
        said.append((await store.transition("tk", expected=1, token="mine", **write))[:2])  # reply lost
        said.append((await store.transition("tk", expected=0, token="create", **write))[:2])
        said.append((await store.transition("tk", expected=1, token="never", **write))[:2])
        said.append((await store.transition("tk", expected=0, token="other-create", **write))[:2])
        return said

    assert asyncio.run(main()) == [(1, 1), (4, 1), (1, 2), (1, 3), (4, 3), (4, 3), (2, 3), (6, 3)]


def test_a_stopping_worker_leaves_a_delivery_it_took_over_pending_for_another(prefix: str) -> None:
    """A delivery taken over from a process that may have died needs its recovery (RECOVER, the outbox) before
    anything else: a worker that is stopping does not hand it back (that would acknowledge it unrecovered and
    strand its run) but leaves it pending, for another process to take over after the lease."""
    from flowdsl.runtime.redis import RedisWorker, WorkerOptions

    async def main() -> list[str]:
        worker = RedisWorker("unix:///nowhere.sock", prefix=prefix, options=WorkerOptions(handle_signals=False))
        worker._slots = asyncio.Semaphore(1)
        worker._stopping = True
        done: list[str] = []

        async def hand_back(held: object) -> None:
            done.append(f"handed back {held.entry_id}")  # type: ignore[attr-defined]

        worker._hand_back = hand_back  # type: ignore[method-assign]
        for entry_id, taken_over in (("1-0", True), ("2-0", False)):
            held = worker._hold("s", entry_id, {"run_id": "r", "task_id": f"r/a#{entry_id}"}, None, "")
            await worker._task(held, taken_over)
        return done

    assert asyncio.run(main()) == ["handed back 2-0"]


def test_a_crash_before_the_cancellations_of_queued_tasks_are_answered_leaves_them_to_the_taker(
        url: str, prefix: str) -> None:
    """A cancel whose transition marked a queued task cancelled (nobody else will answer it): a process dying
    after relaying that transition but before answering keeps the outbox entry, so the process that takes the
    trigger over answers it and the run ends."""
    async def main() -> tuple[bool, str]:
        await _submitted(url, prefix, "c1")
        store = await _store(url, prefix)
        advancer = Advancer(store, Clock())
        assert await advancer.start("c1") == Outcome.APPLIED  # conf.a is queued: no worker has it
        real = advancer.apply_event

        async def dies_before_answering(run_id: str, event: dict, **kw: object) -> str:  # type: ignore[type-arg]
            if event["type"] == "task_cancelled":
                raise RuntimeError("the process died here")
            return await real(run_id, event, **kw)  # type: ignore[arg-type]

        advancer.apply_event = dies_before_answering  # type: ignore[method-assign]
        with contextlib.suppress(RuntimeError):
            await advancer.apply_event("c1", {"type": "cancel_requested", "reason": "stop"})
        left = bool(await store.call("HLEN", store.keys.outbox("c1")))
        taker = Advancer(store, Clock())
        await taker.recover("c1")
        record = await taker._record("c1")
        assert record is not None
        return left, record.state["status"]

    assert asyncio.run(main()) == (True, "cancelled")


def test_heartbeats_keep_an_entry_whose_task_result_was_just_written(url: str, prefix: str) -> None:
    """Between a chain's transition (the old task gone, the next one held under the same entry) and the moment
    the process takes note of the next task, the entry's task has no lease: the heartbeat still renews the
    entry (it is this process's until acknowledged), so a stalled relay cannot let it be taken over."""
    from flowdsl.runtime.redis import RedisWorker, WorkerOptions
    from flowdsl.runtime.redis.keys import GROUP

    async def main() -> list[str]:
        keys = Keys(prefix)
        client = connect(url)
        stream = keys.queue("w")
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        entry_id = (await client.xadd(stream, {"m": "{}"})).decode()
        await client.xreadgroup(GROUP, "someone", {stream: ">"})  # pending, held by "someone" so far
        worker = RedisWorker(url, prefix=prefix, options=WorkerOptions(handle_signals=False))
        worker.client = client
        worker.store = Store(client, keys)
        held = worker._hold(stream, entry_id, {"run_id": "r", "task_id": "r/a#1"}, None, "")
        held.picked = True  # its task "r/a#1" has no lease: its result was just written
        await worker._renew()
        owners = [p["consumer"].decode() for p in await client.xpending_range(stream, GROUP, "-", "+", 10)]
        await client.aclose()
        return [o == worker.name for o in owners]

    assert asyncio.run(main()) == [True]


def test_a_state_cached_from_an_expired_run_never_overwrites_a_new_run_of_the_same_id(url: str,
                                                                                     prefix: str) -> None:
    """A process kept the state of a run that then expired elsewhere; the id was submitted again and the new
    run reached the same version. Its next event for the run was applied to the old state and written over the
    new run (the version matched): the new run then waited forever for tasks already answered, with no expiry
    (a soak test found such runs). The generation is checked with the version: a conflict, the run loaded
    again."""
    keys = Keys(prefix)

    async def main() -> tuple[int, int]:
        store = await _store(url, prefix)
        await _submitted(url, prefix, "again")
        stale = Advancer(store, Clock())
        assert await stale.start("again") == Outcome.APPLIED  # version 1, cached here
        old = await store.call("HGET", keys.run("again"), "born")
        await store.call("DEL", *keys.run_keys("again"))  # expired (as its retention ends it)
        await asyncio.sleep(0.01)  # (a generation is the submission's millisecond)
        await _submitted(url, prefix, "again")
        assert await Advancer(store, Clock()).start("again") == Outcome.APPLIED  # the new run: version 1 too
        new = await store.call("HGET", keys.run("again"), "born")
        assert new != old
        event = {"type": "task_succeeded", "task_id": "again/conf.a#1", "result": {}}
        assert await stale.apply_event("again", event) == Outcome.APPLIED
        record = await Advancer(store, Clock())._record("again")
        assert record is not None
        return record.state["started_at"], int(new)

    started_at, born = asyncio.run(main())
    assert started_at >= born  # the new run's state, not the expired one's
