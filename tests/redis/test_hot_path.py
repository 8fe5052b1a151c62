"""The worker's per-step path, made cheaper without changing what it writes or decides: the TRANSITION script's
arguments (one JSON header and the blobs), its call when the server forgot the script, shared plan reads, and the
step context filled in field by field."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from typing import Any

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers)
from flowdsl import compile_text
from flowdsl.runtime import execute as execute_module
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
from flowdsl.runtime.redis.connection import connect
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.store import Clock, Store
from flowdsl.workers import StepContext, StepLogger, WorkerRegistry, worker

SPEC = "flowdsl: 1\nname: m\nworkers: [tests.runtime.workers]\nsteps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"


async def _started(url: str, prefix: str, run_id: str) -> Store:
    """A run started (version 1) by a worker that serves none of its steps, and a store on it."""
    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(SPEC), {}, run_id=run_id)
    await asyncio.wait_for(RedisWorker(url, prefix=prefix, registry=WorkerRegistry(), options=WorkerOptions(
        burst=True, handle_signals=False, llm=False, burst_horizon_s=0)).serve(), 30)
    return Store(connect(url), Keys(prefix))


def test_a_transition_writes_each_field_its_header_and_blobs_say(url: str, prefix: str) -> None:
    keys = Keys(prefix)

    async def main() -> None:
        store = await _started(url, prefix, "hp")
        # a group commit of two input events with a snapshot, an outbox entry, a task queued, a task held by the
        # caller (its message kept) and meta fields (numbers written as their decimal text)
        done = await store.transition(
            "hp", expected=1, token="t1", state=b'{"s":1}', status="running",
            entries=[(b'{"a":1}', b"[1]", None, ""), (b'{"a":2}', b"[2]", None, "")], outbox=b'[{"o":"x"}]',
            task_ops=[("s", "hp/q#1", "q"), ("c", "hp/c#1", "r:tok", b'{"m":1}')],
            meta=[("cc", 2), ("x", "text"), ("big", 1764770000123)])
        assert done.code == 1 and done.version == 3 and done.cancelled_queued == ()
        fields = ("state", "sv", "sj", "v", "lt", "status", "cc", "x", "big")
        run = dict(zip(fields, await store.call("HMGET", keys.run("hp"), *fields), strict=True))
        journal = await store.call("XRANGE", keys.journal("hp"), "-", "+")
        assert run == {"state": b'{"s":1}', "sv": b"3", "sj": journal[-1][0], "v": b"3", "lt": b"t1",
                       "status": b"running", "cc": b"2", "x": b"text", "big": b"1764770000123"}
        assert [entry for _, entry in journal[-2:]] == [{b"v": b"2", b"in": b'{"a":1}', b"ev": b"[1]"},
                                                       {b"v": b"3", b"in": b'{"a":2}', b"ev": b"[2]", b"tk": b"t1"}]
        assert await store.call("HGETALL", keys.tasks("hp")) == {b"hp/a#1": b"q", b"hp/q#1": b"q",
                                                                 b"hp/c#1": b"r:tok"}
        outbox = await store.call("HGETALL", keys.outbox("hp"))
        assert {k: v for k, v in outbox.items() if k != b"1"} == {b"3": b'[{"o":"x"}]', b"s:hp/c#1": b'{"m":1}'}
        # no state, no outbox entry: neither is written; the held task goes with its kept message, the queued one
        # is marked cancelled (and said so); the run's end sets its keys' retention
        end = await store.transition(
            "hp", expected=3, token="t2", state=b"", status="completed", finished=True,
            entries=[(b'{"a":3}', b"[3]", ("hp/c#1", "lease", "tok"), "w1")],
            task_ops=[("d", "hp/c#1", ""), ("x", "hp/q#1", "")], meta=[("finished", 1764770000999)])
        assert end.code == 1 and end.version == 4 and end.cancelled_queued == ("hp/q#1",)
        fields = ("state", "sv", "v", "lt", "status", "finished")
        assert await store.call("HMGET", keys.run("hp"), *fields) == [b'{"s":1}', b"3", b"4", b"t2", b"completed",
                                                                        b"1764770000999"]
        assert await store.call("HGET", keys.tasks("hp"), "hp/q#1") == b"xq"
        assert await store.call("HEXISTS", keys.tasks("hp"), "hp/c#1") == 0
        assert await store.call("HEXISTS", keys.outbox("hp"), "s:hp/c#1") == 0
        assert await store.call("HEXISTS", keys.outbox("hp"), "4") == 0
        assert await store.call("PTTL", keys.journal("hp")) > 0
        # the same transition again (a lost reply retried): recognised by its token, applied once
        again = await store.transition("hp", expected=3, token="t2", state=b"", status="completed",
                                       entries=[(b'{"a":3}', b"[3]", None, "")])
        assert again.code == 4 and again.version == 4
        await store.client.aclose()

    asyncio.run(main())


def test_a_transition_after_the_server_forgot_the_script_is_applied(url: str, prefix: str) -> None:
    async def main() -> None:
        store = await _started(url, prefix, "nf")
        await store.call("SCRIPT", "FLUSH")
        done = await store.transition("nf", expected=1, token="t1", state=b"", status="running",
                                      entries=[(b"{}", b"[]", None, "")])
        assert done.code == 1 and done.version == 2
        await store.client.aclose()

    asyncio.run(main())


def test_concurrent_reads_of_one_plan_share_one_read(url: str, prefix: str) -> None:
    async def main() -> None:
        store = await _started(url, prefix, "p1")
        pid = (await store.call("HGET", Keys(prefix).run("p1"), "pid")).decode()
        reads: list[tuple[Any, ...]] = []
        real = store.call

        def counting(*args: Any) -> Any:
            reads.append(args)
            return real(*args)

        store.call = counting  # type: ignore[method-assign]
        plans = await asyncio.gather(*(store.plan("p1", pid) for _ in range(50)))
        assert len(reads) == 1 and all(p is plans[0] for p in plans) and plans[0]["flow"]["name"] == "m"
        # a read that finds no plan (the run expired) is not the answer of another run's read of the same plan id
        store.plans.clear()
        reads.clear()
        gone, found = await asyncio.gather(store.plan("missing", pid), store.plan("p1", pid))
        assert gone is None and found is not None and found["flow"]["name"] == "m" and len(reads) == 2
        await store.client.aclose()

    asyncio.run(main())


def test_a_step_context_filled_in_field_by_field_is_the_dataclass_one() -> None:
    assert execute_module._FAST_CONTEXT  # (else StepContext changed: update execute._call's fast way)
    registry = WorkerRegistry()
    seen: list[StepContext] = []

    @worker("hp.probe", registry_=registry)
    async def probe(data: dict[str, Any], ctx: StepContext) -> None:
        seen.append(ctx)

    for kind in ("task", "compensate"):
        command = {"op": "dispatch", "run_id": "r1", "task_id": "r1/s#2", "kind": kind, "step": "s", "node": "n",
                   "worker": "hp.probe", "input": {}, "attempt": 2, "idempotency_key": "r1/s", "timeout_ms": None,
                   "llm": None}
        assert asyncio.run(execute_module.execute(command, registry=registry))["type"] == "task_succeeded"
        ctx = seen[-1]
        usual = StepContext("r1", "n", 2, "r1/s", kind == "compensate", logging.getLogger("flowdsl.worker.hp.probe"))
        assert ctx == usual and repr(ctx) == repr(usual) and vars(ctx).keys() == vars(usual).keys()
        assert type(ctx.logger) is StepLogger and ctx.logger.logger is usual.logger.logger
        assert ctx.logger.extra == usual.logger.extra and ctx.logger._ctx is ctx


CHAINED = """flowdsl: 1
name: chained
workers: [tests.runtime.workers]
steps:
  - conf.a
  - conf.b: {timeout: 5s}
  - conf.c
  - parallel: p
    branches: [conf.d, conf.e]
  - conf.f
  - conf.g
"""


class _Ticking(Clock):
    """A clock that says the same times in every run of a test: 1 ms later at each reading."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 1_764_770_000_000

    def now(self) -> int:
        self.t += 1
        return self.t


async def _drive(url: str, prefix: str, straight: bool, wire: bool = True) -> tuple[list[list[bytes]], dict[str, Any]]:
    """Run CHAINED to its end with made-up results, reported through ``Advancer.report`` (``straight``) or
    ``apply_event``: every TRANSITION call's arguments (the prefix replaced) and what the run's keys hold after.
    ``wire``: on the lean connection (its calls packed by Store), else on redis-py's pipelines (packed there)."""
    from flowdsl.runtime.redis.advance import Advancer, Chain, Outcome
    from flowdsl.runtime.redis.scripts import TRANSITION, Batcher
    from flowdsl.runtime.redis.wire import WireConnection, _PyReader, entry_fields

    async with RedisClient(url, prefix=prefix) as client:
        await client.submit(compile_text(CHAINED), {}, run_id="hc")
    keys = Keys(prefix)
    redis_client = connect(url)
    store = Store(redis_client, keys, batcher=Batcher(redis_client, wire=WireConnection(url) if wire else None))
    await store.load_scripts()
    sha = hashlib.sha1(TRANSITION.encode()).hexdigest().encode()
    born = await store.call("HGET", keys.run("hc"), "born")  # (the submission's generation: its time)
    calls: list[list[bytes]] = []
    straight_line: list[bytes] = []  # (Store.step's calls: their input events)
    plain, packed = store.batcher.call, store.batcher.call_packed

    def normal(args: list[bytes]) -> None:
        if args[:2] == [b"EVALSHA", sha]:
            calls.append([a.replace(prefix.encode(), b"<p>").replace(born, b"<born>") for a in args])

    def call(*args: Any) -> Any:
        normal([a if isinstance(a, bytes) else str(a).encode() for a in args])
        return plain(*args)

    def call_packed(raw: bytes) -> Any:
        reader = _PyReader()
        reader.feed(raw)
        normal(reader.gets())
        return packed(raw)

    step = store.step

    def stepped(*args: Any) -> Any:
        straight_line.append(args[5][0])  # (its input event)
        return step(*args)

    store.batcher.call, store.batcher.call_packed = call, call_packed  # type: ignore[method-assign]
    store.step = stepped  # type: ignore[method-assign]
    advancer = Advancer(store, _Ticking())
    advancer._tokens = iter(f"tk{n}" for n in itertools.count())
    ack = [store.ack_op(keys.queue("conf.x"), "1-1", "w1")]
    tokens = iter(f"lease{n}" for n in itertools.count())
    chain = Chain(next(tokens), lambda command: command["worker"] != "conf.e")
    assert await advancer.start("hc", chain=chain) == Outcome.APPLIED
    held = [(chain.command, chain.token)]
    other = Advancer(store, _Ticking())  # another process, writing the run behind the first one's back
    other._tokens = iter(f"other{n}" for n in itertools.count())
    while held:
        command, token = held.pop(0)
        assert command is not None
        event = {"type": "task_succeeded", "task_id": command["task_id"], "result": {"n": command["node"]}}
        if command["node"] == "f":  # a version conflict: the cached state is behind
            assert await other.apply_event("hc", {"type": "task_started", "task_id": command["task_id"]}) == \
                Outcome.APPLIED
        if command["node"] == "e":  # a lease lost: rejected, and the cached state dropped
            bad = ("hc/e#1", "lease", "someone-else")
            if straight:
                outcome = await advancer.report("hc", dict(event), bad, "w1", ack, Chain("x", lambda c: True))
            else:
                outcome = await advancer.apply_event("hc", dict(event), guard=bad, reporter="w1", ack=ack,
                                                     chain=Chain("x", lambda c: True))
            assert outcome == Outcome.REJECTED
        chain = Chain(next(tokens), lambda command: command["worker"] != "conf.e")
        guard = (command["task_id"], "lease", token)
        if straight:
            outcome = await advancer.report("hc", event, guard, "w1", ack, chain)
        else:
            outcome = await advancer.apply_event("hc", event, guard=guard, reporter="w1", ack=ack, chain=chain)
        assert outcome == Outcome.APPLIED
        if chain.command is not None:
            held.append((chain.command, chain.token))
        if command["node"] == "d":  # e was queued: take it as a worker would
            tasks = entry_fields(await store.call("HGETALL", keys.tasks("hc")))
            assert tasks.get(b"hc/e#1") == b"q"
            e_token = next(tokens)
            assert (await store.pickup("hc", "hc/e#1", "2-1@x", e_token))[0] == 1
            messages = await store.call("XRANGE", keys.queue("conf.e"), "-", "+")
            held.append((loads(entry_fields(messages[-1][1])[b"m"]), e_token))
    assert await store.call("HGET", keys.run("hc"), "status") == b"completed"
    run = entry_fields(await store.call("HGETALL", keys.run("hc")))
    run.pop(b"sj")  # (a stream entry id: a time)
    for name in (b"born", b"submitted"):
        run.pop(name)
    written = {"run": run, "tasks": entry_fields(await store.call("HGETALL", keys.tasks("hc"))),
               "outbox": entry_fields(await store.call("HGETALL", keys.outbox("hc"))),
               "journal": [entry_fields(fields)  # (redis-py's pipelines answer a dict, the lean connection a list)
                           for _, fields in await store.call("XRANGE", keys.journal("hc"), "-", "+")]}
    await redis_client.aclose()
    # the straight line took d (nothing dispatched), e (its lease lost), f (a conflict: then the general way) and
    # g (the run's end); a, b and c dispatched more than one task or set a timer
    assert [raw.split(b'"task_id":"')[1][:6] for raw in straight_line] == \
        ([b"hc/d#1", b"hc/e#1", b"hc/f#1", b"hc/g#1"] if straight else [])
    return calls, written


def test_the_straight_line_of_a_reported_result_writes_what_the_general_way_writes(url: str) -> None:
    """Advancer.report (the chained step's straight line: Store.step, packed here) and apply_event (the general
    way: Store.transition, packed by hiredis) send the same TRANSITION arguments, byte for byte, and leave the same
    data — across chained steps, steps with a timer, a parallel group (one branch queued), a lost lease, a version
    conflict and the run's end."""
    straight, general = asyncio.run(_drive(url, "hpx", True)), asyncio.run(_drive(url, "hpy", False))
    assert len(straight[0]) == len(general[0]) >= 10
    assert straight[0] == general[0]
    assert straight[1]["run"] == general[1]["run"] and straight[1]["journal"] == general[1]["journal"]
    assert straight[1] == general[1]


def test_a_transition_packed_for_the_lean_connection_is_what_redis_py_sends(url: str) -> None:
    """On the lean connection Store packs TRANSITION calls itself (the run's start, the general way, the straight
    line): the same arguments, byte for byte, as redis-py's pipelines send, and the same data written."""
    packed, plain = asyncio.run(_drive(url, "hpw", True)), asyncio.run(_drive(url, "hpv", True, wire=False))
    assert len(packed[0]) == len(plain[0]) >= 10
    assert packed == plain
