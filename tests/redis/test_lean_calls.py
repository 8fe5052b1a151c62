"""The Redis worker's per-run and per-reply paths, made cheaper without changing what is sent or written: the calls
made once per run packed as RESP by the store (a run's keys, its submission read, the acknowledgement that ends it),
the transition script's usual answer (the new version alone), a reply's waiter woken as the reply is read, and the
per-run lock's free path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.advance import _NO_WAITERS, _release, _RunLock, _Waiters
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import GROUP, Keys
from flowdsl.runtime.redis.scripts import RELAY, TRANSITION, Batcher, Script
from flowdsl.runtime.redis.store import _ACK, _SUBMISSION, Store, TransitionResult, _transition_result
from flowdsl.runtime.redis.wire import WireConnection, _Protocol, _PyReader, pack

SPEC = "flowdsl: 1\nname: lean\nworkers: [tests.runtime.workers]\nsteps:\n  - conf.a\n"


def _store(url: str, prefix: str) -> Store:
    """A store on the lean connection (its calls packed by the store itself where it packs them)."""
    client = connect(url)
    return Store(client, Keys(prefix), batcher=Batcher(client, wire=WireConnection(url)))


async def _close(store: Store) -> None:
    if store.batcher.wire is not None:
        await store.batcher.wire.aclose()
    await store.client.aclose()


@pytest.mark.parametrize("prefix_, run_id", [("flowdsl", "r1"), ("a.b:c-d_9", "x" * 128), ("p", "i:9.z-Y_")])
def test_the_calls_packed_once_per_run_are_what_the_general_way_packs(prefix_: str, run_id: str) -> None:
    """A run's TRANSITION keys, its submission read and a lone acknowledgement: the bytes the wire packs from the
    arguments the general way passes."""
    keys = Keys(prefix_)
    store = Store(connect("redis://localhost:1/0"), keys)
    transition = pack(("EVALSHA", Script("t", TRANSITION).sha, 4, *keys.run_keys(run_id)))
    assert b"*7\r\n" + store.packed(None, run_id) == transition
    assert store._submission.pack(run_id) == pack(("HMGET", keys.run(run_id), *_SUBMISSION))
    for stream, entry_id, consumer in [(keys.control, "1796441648937-0", "vm:1:ab"),
                                       (keys.queue("conf.a"), "1-12", "host%d:7:%s|x")]:
        packed = _ACK % (len(stream), stream.encode(), len(entry_id), entry_id.encode(), len(consumer),
                         consumer.encode())
        assert packed == pack(("EVALSHA", Script("r", RELAY).sha, 1, stream, GROUP, "a", 1,
                                               entry_id, consumer))


def test_a_submission_is_read_alike_packed_or_not(url: str, prefix: str) -> None:
    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(SPEC), {"n": 1}, run_id="s1", seed=7)
        lean = _store(url, prefix)
        plain = Store(connect(url), Keys(prefix))
        read = await lean.submission("s1")
        assert read is not None and read["input"] == {"n": 1} and read["seed"] == 7 and not read["started"]
        assert read == await plain.submission("s1")
        assert await lean.submission("nope") is None
        await _close(lean)
        await _close(plain)

    asyncio.run(main())


def test_an_acknowledgement_alone_is_sent_packed_and_acknowledges_the_entry(url: str, prefix: str) -> None:
    """Store.relay of one acknowledgement (a run's end) sends the RELAY call the general way sends, packed by the
    store: the entry is acknowledged and deleted — also after the server forgot the script."""
    keys = Keys(prefix)

    async def main() -> None:
        store = _store(url, prefix)
        sent: list[bytes] = []
        packed = store.batcher.call_packed

        def call_packed(raw: bytes) -> Any:
            sent.append(raw)
            return packed(raw)

        store.batcher.call_packed = call_packed  # type: ignore[method-assign]
        await store.call("XGROUP", "CREATE", keys.control, GROUP, "0", "MKSTREAM")
        for flush in (False, True):
            entry_id = (await store.call("XADD", keys.control, "*", "c", "x")).decode()
            await store.call("XREADGROUP", "GROUP", GROUP, "w1", "COUNT", 1, "STREAMS", keys.control, ">")
            if flush:
                await store.call("SCRIPT", "FLUSH")
            await store.relay("run", None, [store.ack_op(keys.control, entry_id, "w1")])
            reader = _PyReader()
            reader.feed(sent[-1])
            assert reader.gets() == [b"EVALSHA", Script("r", RELAY).sha.encode(), b"1", keys.control.encode(),
                                     GROUP.encode(), b"a", b"1", entry_id.encode(), b"w1"]
            assert await store.call("XLEN", keys.control) == 0
            assert (await store.call("XPENDING", keys.control, GROUP))[0] == 0
        await _close(store)

    asyncio.run(main())


def test_the_transition_script_answers_the_version_alone_when_it_says_nothing_more(url: str, prefix: str) -> None:
    keys = Keys(prefix)

    async def main() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(SPEC), {}, run_id="tv")
        store = Store(connect(url), keys)
        base: dict[str, Any] = {"state": b"{}", "status": "running", "entries": [(b"{}", b"[]", None, "")]}
        created = await store.transition("tv", expected=0, token="t0", **base)
        assert created == TransitionResult(1, 1)  # (creating the run: the full answer, its held cancels read)
        sha = Script("t", TRANSITION).sha
        usual = await store.call("EVALSHA", sha, 4, *keys.run_keys("tv"),
                                 b'[1,"t1","running",false,false,false,1,"","","","",1,"s","tv/q#1","q",0,""]',
                                 b"{}", b"[]")
        assert usual == 2 and _transition_result(usual) == TransitionResult(1, 2)
        cancelled = await store.transition("tv", expected=2, token="t2", state=b"", status="running",
                                           entries=[(b"{}", b"[]", None, "")], task_ops=[("x", "tv/q#1", "")])
        assert cancelled == TransitionResult(1, 3, cancelled_queued=("tv/q#1",))
        await _close(store)

    asyncio.run(main())


def _replies(protocol: _Protocol, *replies: bytes) -> None:
    protocol.data_received(b"".join(replies))


def test_a_reply_wakes_the_task_awaiting_it_as_it_is_read() -> None:
    """The task awaiting a reply runs on while data_received reads it (no turn of the loop); a future with more
    callbacks than its one waiter is resolved as asyncio does; read inside a task, every reply is; a callback that
    fails is reported to the loop's exception handler and the replies after it are read."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        woken: list[Any] = []

        async def waiter(future: asyncio.Future[Any]) -> None:
            woken.append(await future)

        first, second = loop.create_future(), loop.create_future()
        tasks = [asyncio.ensure_future(waiter(first)), asyncio.ensure_future(waiter(second))]
        await asyncio.sleep(0)  # (both wait now)
        later: list[Any] = []
        second.add_done_callback(later.append)  # a second callback: the usual way for this one
        protocol.waiting.extend([(first, True), (second, True)])
        loop.call_soon(_replies, protocol, b":1\r\n", b":2\r\n")
        await asyncio.sleep(0)  # (one turn: the replies are read)
        assert woken == [1] and not later  # the first waiter ran as its reply was read; the second not yet
        await asyncio.gather(*tasks)
        assert woken == [1, 2] and later == [second]

        inside = loop.create_future()  # read inside a task (a test, say): resolved the usual way
        task = asyncio.ensure_future(waiter(inside))
        await asyncio.sleep(0)
        protocol.waiting.append((inside, True))
        _replies(protocol, b"$1\r\nx\r\n")
        assert woken == [1, 2] and not task.done()
        await task
        assert woken == [1, 2, b"x"]

        said: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: said.append(context))
        failing, after = loop.create_future(), loop.create_future()
        failing.add_done_callback(lambda _: 1 / 0)
        protocol.waiting.extend([(failing, True), (after, True)])
        loop.call_soon(_replies, protocol, b":3\r\n", b":4\r\n")
        assert await after == 4 and failing.result() == 3
        assert len(said) == 1 and isinstance(said[0]["exception"], ZeroDivisionError)

    asyncio.run(main())


def test_a_run_lock_held_with_nobody_waiting_makes_a_queue_for_its_first_waiter() -> None:
    """The free path takes a run's lock with a shared, unchangeable marker (no queue made); the first waiter makes
    the queue; the lock passes to the waiters in order, and goes with the last."""

    async def main() -> None:
        table: dict[str, _Waiters] = {"r": _NO_WAITERS}  # (as Advancer.report takes it)
        order: list[int] = []

        async def take(n: int) -> None:
            async with _RunLock(table, "r"):
                order.append(n)

        waiting = [asyncio.ensure_future(take(n)) for n in (1, 2)]
        await asyncio.sleep(0)
        assert table["r"] is not _NO_WAITERS and len(table["r"]) == 2 and len(_NO_WAITERS) == 0
        _release(table, "r")
        await asyncio.gather(*waiting)
        assert order == [1, 2] and "r" not in table
        await _RunLock(table, "r").__aenter__()
        assert table["r"] is _NO_WAITERS
        _release(table, "r")
        assert table == {}

    asyncio.run(main())
