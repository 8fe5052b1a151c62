"""Dead letters: a stream entry no worker process can handle is set aside, never lost and never retried forever.

An entry that cannot be read (not JSON, not flowdsl's, no run named) is set aside at once; an entry whose handling
fails unexpectedly (here a simulated kernel bug) is handled again after each lease and set aside at
``max_failures`` failures. ``flowdsl dead-letters`` lists them, puts them back (the entry then takes over what
the original held, as after a crash) and deletes them. Before, one unreadable task message stopped every worker
process that read it, one after the other."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient, RunDamaged
from flowdsl.runtime.redis.advance import Advancer, Contended
from flowdsl.runtime.redis.keys import GROUP, Keys
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, stopped, worker_here
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"

#: JSON nested too deep to read (the leading space sends it to the stdlib decoder: RecursionError)
DEEP = b" " + b"[" * 100_000 + b"]" * 100_000
#: entries no worker process can handle, by the stream they are put on (``task`` is conf.a's task stream)
UNREADABLE = [
    ("task", {b"m": b"\xff\x00not json"}, "its 'm' field is not JSON"),
    ("task", {b"m": b"[1, 2]"}, "its 'm' field is not a JSON object"),
    ("task", {b"m": b'{"task_id": "x"}'}, "names no run"),
    ("task", {b"m": b'{"run_id": "a{b}", "task_id": "x"}'}, "its run id is not one"),
    ("task", {b"m": b'{"run_id": "r1"}'}, "names no task"),
    ("task", {b"other": b"field"}, "it has no 'm' field"),
    ("control", {b"c": b"{"}, "its 'c' field is not JSON"),
    ("control", {b"c": b'{"type": "frob", "run_id": "r1"}'}, "its request is of no known type ('frob'"),
    ("control", {b"z": b"1"}, "it has no 'c' field"),
    ("task", {b"m": b'{"run_id": "r1", "task_id": "x"}', b"v": b"\xff"}, "its 'v' field is not a short ASCII text"),
    ("task", {b"m": b'{"run_id": "r1", "task_id": "x"}', b"g": b"\xfe1"}, "its 'g' field is not a short ASCII"),
    ("control", {b"c": b'{"type": "start", "run_id": "r1"}', b"t": b"\xff"}, "its 't' field is not a short ASCII"),
    ("task", {b"m": DEEP}, "its 'm' field is not JSON"),  # (nested too deep for the stdlib decoder)
    ("control", {b"c": DEEP}, "its 'c' field is not JSON"),
]


def _stream(keys: Keys, which: str) -> str:
    return keys.control if which == "control" else keys.queue("conf.a")


def test_unreadable_entries_are_set_aside_at_once_byte_for_byte_and_the_worker_goes_on(url: str, prefix: str) -> None:
    keys = Keys(prefix)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            worker = worker_here(url, prefix, burst=True)
            for which, fields, _ in UNREADABLE:
                await client.redis.xadd(_stream(keys, which), fields)
            sub = await client.submit(compile_text(SAGA), {"script": {}})
            stats = await asyncio.wait_for(worker.serve(), 30)
            pending = [(await client.redis.xpending(_stream(keys, w), GROUP))["pending"] for w in ("task", "control")]
            lengths = [await client.redis.xlen(_stream(keys, w)) for w in ("task", "control")]
            theirs = await client.dead_letters_of(sub.run_id)  # (reads every letter's message, the deep ones too)
            return stats, (await client.info(sub.run_id)).status, await client.dead_letters(), pending, lengths, theirs

    stats, status, letters, pending, lengths, theirs = asyncio.run(main())
    assert theirs == []
    assert stats.failure is None and status == "completed"  # the worker served the run after them all
    assert stats.dead_letters == len(UNREADABLE) == len(letters)
    assert pending == [0, 0] and lengths == [0, 0]  # acknowledged and deleted from their streams
    by_fields = {tuple(sorted(letter.fields.items())): letter for letter in letters}
    for which, fields, reason in UNREADABLE:
        letter = by_fields[tuple(sorted((k.decode(), v) for k, v in fields.items()))]  # the fields, byte for byte
        assert letter.stream == _stream(keys, which) and reason in letter.reason, (letter.reason, reason)
        assert (letter.failures, letter.deliveries, letter.consumer) == (1, 1, stats.name)


def _with_a_bug(failing: str, monkeypatch: pytest.MonkeyPatch, error: Exception | None = None
                ) -> tuple[dict[str, list[str]], dict[str, WorkerRegistry], dict[str, bool]]:
    """Workers ``dl.a``, ``dl.b``, ``dl.undo`` (registries ``a``, ``b``: b's process serves b only) recording the
    idempotency key of every call, and a simulated kernel bug, on while ``bug["on"]``: in the run's start
    (``failing`` "start") or in applying the success of step ``failing``; it raises ``error`` (default: a
    RuntimeError)."""
    calls: dict[str, list[str]] = {"a": [], "b": [], "undo": []}
    bug = {"on": True}
    registries = {"a": WorkerRegistry(), "b": WorkerRegistry()}
    for name in calls:
        async def step(data: dict[str, Any], ctx: Any, name: str = name) -> dict[str, Any]:
            calls[name].append(ctx.idempotency_key)
            return {}
        registries["b" if name == "b" else "a"].register(f"dl.{name}", step)
    original_apply, original_report, original_start = Advancer.apply_event, Advancer.report, Advancer.start

    async def apply_event(self: Advancer, run_id: str, event: dict[str, Any], **kw: Any) -> str:
        if bug["on"] and event["type"] == "task_succeeded" and f"/{failing}#" in event["task_id"]:
            raise error or RuntimeError("simulated kernel bug")
        return await original_apply(self, run_id, event, **kw)

    async def report(self: Advancer, run_id: str, event: dict[str, Any], *args: Any) -> str:  # (its straight line)
        if bug["on"] and event["type"] == "task_succeeded" and f"/{failing}#" in event["task_id"]:
            raise error or RuntimeError("simulated kernel bug")
        return await original_report(self, run_id, event, *args)

    async def start(self: Advancer, run_id: str, **kw: Any) -> str:
        if bug["on"] and failing == "start":
            raise error or RuntimeError("simulated kernel bug")
        return await original_start(self, run_id, **kw)

    monkeypatch.setattr(Advancer, "apply_event", apply_event)
    monkeypatch.setattr(Advancer, "report", report)
    monkeypatch.setattr(Advancer, "start", start)
    return calls, registries, bug


async def _served_by_a_and_b(url: str, prefix: str, registries: dict[str, WorkerRegistry], spec: str,
                             body: Any, *, lease_s: float) -> Any:
    """Submit a run of ``spec`` and ``await body(client, run_id)`` while a's and b's processes serve."""
    workers = [worker_here(url, prefix, registries[n], lease_s=lease_s, max_failures=2) for n in ("a", "b")]
    async with RedisClient(url, prefix=prefix) as client:
        sub = await client.submit(compile_text(spec), {})
        return await serving(workers, lambda: body(client, sub.run_id))


@pytest.mark.parametrize("failing", ["start", "a", "b"])
def test_an_entry_whose_handling_keeps_failing_is_set_aside_and_put_back_it_finishes_its_run(
        url: str, prefix: str, failing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handling fails unexpectedly (a simulated kernel bug) while the bug is on: the run's start; the report of
    step a, which runs under the run's start request; or the report of step b, which another process serves from
    its task stream. The entry is handled again after each lease and set aside at its second failure (step a's
    task is queued on its stream when the start request is taken over after the first failure, as after a
    crash, and fails twice there); the run waits. Put back once the bug is gone, the entry takes over what the
    original held and the run completes. A step ran once per handling, always with its one idempotency key."""
    calls, registries, bug = _with_a_bug(failing, monkeypatch)
    spec = "flowdsl: 1\nname: dl\nsteps: [dl.a, dl.b]\n"

    async def main() -> Any:
        workers = [worker_here(url, prefix, registries[n], lease_s=0.3, max_failures=2) for n in ("a", "b")]
        # step a fails: only a's process serves at first, so it starts the run and runs a under the start request
        first, later = (workers[:1], workers[1:]) if failing == "a" else (workers, [])
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {})

            async def body() -> Any:
                while not (letters := await client.dead_letters()):
                    await asyncio.sleep(0.05)
                stuck = (await client.info(sub.run_id)).status
                status = ["status", sub.run_id, "--redis-url", url, "--prefix", prefix]
                said = await asyncio.to_thread(CliRunner().invoke, app, status)
                told = await asyncio.to_thread(CliRunner().invoke, app, [*status, "--format", "json"])
                assert letters[0].id in said.output and "`flowdsl dead-letters` shows it" in said.output
                assert json.loads(told.stdout)["dead_letters"] == [letters[0].id]
                bug["on"] = False
                await client.requeue_dead_letter(letters[0].id)
                result = await serving(later, lambda: client.follow(sub.run_id))
                told = await asyncio.to_thread(CliRunner().invoke, app, [*status, "--format", "json"])
                assert json.loads(told.stdout)["dead_letters"] == []
                return letters, stuck, result, await client.dead_letters()

            return await serving(first, body), workers

    (letters, stuck, result, after), workers = asyncio.run(main())
    (letter,) = letters
    assert stuck == ("submitted" if failing == "start" else "running")
    assert result.status == "completed" and after == []
    assert letter.reason == "handling it failed: RuntimeError: simulated kernel bug"
    assert (letter.failures, letter.deliveries) == (2, 2)
    keys = Keys(prefix)
    stream, runs = {"start": (keys.control, {"a": 1, "b": 1, "undo": 0}),
                    "a": (keys.queue("dl.a"), {"a": 4, "b": 1, "undo": 0}),
                    "b": (keys.queue("dl.b"), {"a": 1, "b": 3, "undo": 0})}[failing]
    assert letter.stream == stream
    assert {name: len(keys_seen) for name, keys_seen in calls.items()} == runs
    assert all(len(set(keys_seen)) == 1 for keys_seen in calls.values() if keys_seen)  # one idempotency key
    assert sum(w.stats.dead_letters for w in workers) == 1


def test_a_run_cancelled_while_its_step_is_a_dead_letter_ends_once_the_message_is_put_back(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's cancellation waits for its message (nobody else can confirm it); put back, the message is
    answered cancelled without running the step again, and the run compensates what completed."""
    calls, registries, bug = _with_a_bug("b", monkeypatch)
    spec = "flowdsl: 1\nname: dl\nsteps:\n  - dl.a: {compensate: dl.undo}\n  - dl.b\n"

    async def body(client: RedisClient, run_id: str) -> Any:
        while not (letters := await client.dead_letters()):
            await asyncio.sleep(0.05)
        assert await client.cancel(run_id) == "requested"
        await asyncio.sleep(1.0)  # three leases: nothing answers the cancellation meanwhile
        waiting = (await client.info(run_id)).status
        bug["on"] = False
        await client.requeue_dead_letter(letters[0].id)
        return waiting, await client.follow(run_id)

    waiting, result = asyncio.run(_served_by_a_and_b(url, prefix, registries, spec, body, lease_s=0.3))
    assert waiting == "aborting"
    assert (result.status, result.compensated) == ("cancelled", ["a"])
    assert [len(calls[n]) for n in ("a", "b", "undo")] == [1, 2, 1]


def test_a_storm_of_version_conflicts_is_not_a_failure_of_the_message(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other processes writing the run first, a thousand times in a row (``Contended``), while a worker reports a
    result: the worker keeps the result and reports it again with backoff — the step is not run again, and
    nothing is counted against the message; the run completes once the storm is over."""
    calls, registries, bug = _with_a_bug("b", monkeypatch, Contended("run r: gave up after 1000 version conflicts"))
    spec = "flowdsl: 1\nname: dl\nsteps: [dl.a, dl.b]\n"

    async def body(client: RedisClient, run_id: str) -> Any:
        while not calls["b"]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # five leases of conflicts
        bug["on"] = False
        return await client.follow(run_id), await client.dead_letters()

    result, letters = asyncio.run(_served_by_a_and_b(url, prefix, registries, spec, body, lease_s=0.2))
    assert result.status == "completed" and letters == [] and len(calls["b"]) == 1


def test_a_start_that_meets_a_storm_of_version_conflicts_is_tried_again_uncounted(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, registries, bug = _with_a_bug("start", monkeypatch, Contended("run r: gave up after 1000 version conflicts"))
    spec = "flowdsl: 1\nname: dl\nsteps: [dl.a, dl.b]\n"
    tries: list[str] = []
    original = Advancer.start  # (the bug's): count the tries

    async def start(self: Advancer, run_id: str, **kw: Any) -> str:
        tries.append(run_id)
        return await original(self, run_id, **kw)

    monkeypatch.setattr(Advancer, "start", start)

    async def body(client: RedisClient, run_id: str) -> Any:
        while len(tries) < 4:  # past the threshold of 2, and uncounted
            await asyncio.sleep(0.05)
        bug["on"] = False
        return await client.follow(run_id), await client.dead_letters()

    result, letters = asyncio.run(_served_by_a_and_b(url, prefix, registries, spec, body, lease_s=0.2))
    assert result.status == "completed" and letters == []


def test_the_dead_letters_command_lists_puts_back_and_deletes(url: str, prefix: str) -> None:
    keys = Keys(prefix)

    async def setup() -> list[str]:
        async with RedisClient(url, prefix=prefix) as client:
            for fields in ({b"m": b"nope"}, {b"m": b"[]"}, {b"m": b"{}"}):
                await client.redis.xadd(keys.queue("conf.a"), fields)
            await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 30)
            return [letter.id for letter in await client.dead_letters()]

    ids = asyncio.run(setup())
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["dead-letters", "--redis-url", url, "--prefix", prefix, *args])

    listed = cli()
    assert listed.exit_code == 0 and all(i in listed.output for i in ids)
    assert "its 'm' field is not JSON" in listed.output and "failed 1×" in listed.output
    as_json = json.loads(cli("--format", "json", "-n", "2").stdout)
    assert [d["id"] for d in as_json] == ids[:2] and as_json[0]["fields"] == {"m": "nope"}
    assert as_json[0]["stream"] == keys.queue("conf.a") and as_json[0]["run_id"] is None

    put_back = cli("--retry", ids[0], "--format", "json")
    assert put_back.exit_code == 0
    (done,) = json.loads(put_back.stdout)["requeued"]
    missing = cli("--retry", ids[1], "--retry", "1-1", "--retry", ids[2])
    assert missing.exit_code == 2 and "no dead letter '1-1'" in missing.output
    assert "Traceback" not in missing.output
    deleted = cli("--delete", ids[0])  # put back already: there is no such dead letter any more
    assert deleted.exit_code == 2 and "already put back or deleted" in deleted.output
    bad = cli("--delete", "bogus", "--format", "json")
    assert bad.exit_code == 2 and json.loads(bad.stdout)["error"]["message"].startswith("'bogus' is not a dead")
    assert cli("--retry", ids[2], "--delete", ids[2]).exit_code == 2
    both = cli("--retry", ids[2], "--retry-all")
    assert both.exit_code == 2 and "do not go together" in both.output

    async def check() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            back = await client.redis.xrange(keys.queue("conf.a"))
            return back, [letter.id for letter in await client.dead_letters()]

    back, left = asyncio.run(check())
    # the first two are back on their stream (the one after the unknown id was left alone), each with the
    # original's fields and the trigger it takes over; the third is still a dead letter
    assert back[0][0].decode() == done["entry_id"]
    assert back[0][1] == {b"m": b"nope", b"t": Keys.trigger(keys.queue("conf.a"), as_json[0]["entry_id"]).encode()}
    assert back[1][1][b"m"] == b"[]" and left == [ids[2]]

    async def break_the_stream() -> None:  # the stream the last letter came from is no stream any more
        async with RedisClient(url, prefix=prefix) as client:
            await client.redis.delete(keys.queue("conf.a"))
            await client.redis.set(keys.queue("conf.a"), "not a stream")

    asyncio.run(break_the_stream())
    refused = cli("--retry-all", "--format", "json")
    out = json.loads(refused.stdout)
    assert refused.exit_code == 2 and out["requeued"] == [] and out["error"]["type"] == "RedisError"
    assert "WRONGTYPE" in out["error"]["message"] and "Traceback" not in refused.output
    assert cli("--delete", ids[2]).exit_code == 0 and "no dead letters" in cli().output


def test_a_server_refusing_work_for_a_while_makes_no_dead_letter_and_stops_no_loop(prefix: str) -> None:
    """Out of memory (``maxmemory`` reached, ``noeviction``), Redis refuses writes — as a read-only replica after
    a failover does: handlers, heartbeats and the timer loop meet ``OOM`` for a while (a retry timer falls due
    meanwhile). None of it is the messages' fault: nothing is set aside, no loop stops, and once memory is
    back the run completes."""
    server = RedisServer().start()
    try:
        spec = HEADER.format(name="oom") + "steps:\n  - conf.a: {retry: {attempts: 2, initial: 300ms}}\n  - conf.b\n"
        script = {"a": [{"raise": "Flaky"}, {}]}
        admin = server.client()

        async def main() -> Any:
            worker = worker_here(server.url, prefix, lease_s=0.3, max_failures=1)
            async with RedisClient(server.url, prefix=prefix) as client:
                sub = await client.submit(compile_text(spec), {"script": script})

                async def body() -> Any:
                    while "step_retrying" not in [e["type"] for e in (await client.result(sub.run_id))[1].events]:
                        await asyncio.sleep(0.02)
                    admin.config_set("maxmemory-policy", "noeviction")
                    admin.config_set("maxmemory", 1)  # every write refused from here on
                    await asyncio.sleep(1.5)  # the retry timer falls due; five leases pass
                    admin.config_set("maxmemory", 0)
                    return await client.follow(sub.run_id), await client.dead_letters()

                return await serving([worker], body), worker

        (result, letters), worker = asyncio.run(main())
        assert result.status == "completed" and result.steps["a"]["attempts"] == 2
        assert letters == [] and worker.stats.failure is None and worker.stats.dead_letters == 0
        assert admin.info("errorstats")["errorstat_OOM"]["count"] > 0  # the refusals did happen
    finally:
        server.cleanup()


def test_a_timer_that_is_not_one_is_dropped_and_said(url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(prefix)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.redis.zadd(keys.timers, {"garbage": 0, "t|no-timer-id": 0})
            stats = await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 30)
            return stats, await client.redis.zcard(keys.timers), await client.redis.zcard(keys.timers_claimed)

    stats, left, claimed = asyncio.run(main())
    assert stats.failure is None and (left, claimed) == (0, 0)
    said = [r.getMessage() for r in caplog.records if "not a timer member" in r.getMessage()]
    assert len(said) == 2 and "'garbage'" in said[0] + said[1]


def test_an_entry_is_set_aside_or_counted_only_while_it_is_pending_with_the_caller(url: str, prefix: str) -> None:
    """A process that failed on an entry (and was paused before it said so) finds it taken over by another, or
    handled and acknowledged by another: it sets nothing aside and counts nothing."""
    keys = Keys(prefix)
    stream = keys.queue("conf.a")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            r = client.redis
            await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            ids = [(await r.xadd(stream, {b"m": b"x"})).decode() for _ in range(3)]
            await r.xreadgroup(GROUP, "A", {stream: ">"}, count=3)
            await r.xclaim(stream, GROUP, "B", 0, [ids[0]])  # taken over
            await r.xack(stream, GROUP, ids[1])  # handled by another
            await r.xdel(stream, ids[1])
            store = client.store
            codes = [await store.dead_letter(stream, i, "A", {b"m": b"x"}, reason="r", trigger=f"T{n}", threshold=t)
                     for n, i in enumerate(ids[:2]) for t in (0, 3)]
            counted = await store.dead_letter(stream, ids[2], "A", {b"m": b"x"}, reason="r", trigger="T2",
                                              threshold=3, remember_ms=5_000_000)
            counters = [await r.exists(keys.failures(f"T{n}")) for n in range(2)]
            return codes, counted, counters, await r.pttl(keys.failures("T2")), await client.dead_letters()

    codes, counted, counters, ttl, letters = asyncio.run(main())
    assert [c[0] for c in codes] == [2, 2, 2, 2] and counters == [0, 0] and letters == []
    assert counted[:2] == (0, 1) and 4_900_000 < ttl <= 5_000_000  # counted, kept that long after the failure


@pytest.mark.parametrize("message", [
    "OOM command not allowed when used memory > 'maxmemory'. script: 33838f, on @user_script:61.",
    "ERR Error running script (call to f_2ccf43): @user_script:30: @user_script: 30: -OOM command not allowed "
    "when used memory > 'maxmemory'.",  # Redis 6: a refusal met inside a script
    "ERR Error running script (call to f_1): @user_script:9: -READONLY You can't write against a read only replica.",
    "READONLY You can't write against a read only replica.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
])
def test_redis_refusing_work_for_now_is_told_apart_from_a_failure(message: str) -> None:
    from flowdsl.runtime.redis.connection import server_unwell
    from flowdsl.runtime.redis.wire import _error

    assert server_unwell(_error(message))
    assert server_unwell(redis.ResponseError(message))


@pytest.mark.parametrize("message", [
    "ERR Error running script (call to f_1): @user_script:1: Script attempted to access nonexistent global variable",
    "BUSYGROUP Consumer Group name already exists",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR unknown command -OOM",
])
def test_other_redis_errors_are_failures(message: str) -> None:
    from flowdsl.runtime.redis.connection import server_unwell
    from flowdsl.runtime.redis.wire import _error

    assert not server_unwell(_error(message)) and not server_unwell(redis.ResponseError(message))


def test_a_worker_starting_while_redis_refuses_work_waits_it_out(prefix: str) -> None:
    """Started while Redis is out of memory, a worker is not refused as misconfigured (exit 2: its supervisor
    would give up on it): it waits with backoff, and serves once memory is back."""
    server = RedisServer().start()
    try:
        admin = server.client()

        async def main() -> Any:
            async with RedisClient(server.url, prefix=prefix) as client:
                sub = await client.submit(compile_text(SAGA), {"script": {}})
                admin.config_set("maxmemory-policy", "noeviction")
                admin.config_set("maxmemory", 1)
                worker = worker_here(server.url, prefix)
                serving_task = asyncio.create_task(worker.serve())
                await asyncio.sleep(1.0)
                waited = not serving_task.done()
                admin.config_set("maxmemory", 0)
                try:
                    result = await asyncio.wait_for(client.follow(sub.run_id), 30)
                finally:
                    worker.stop()
                    [stats] = await stopped([worker], [serving_task])
                return waited, result, stats

        waited, result, stats = asyncio.run(main())
        assert waited and result.status == "completed" and stats.failure is None
        assert admin.info("errorstats")["errorstat_OOM"]["count"] > 0  # it was refused meanwhile
    finally:
        server.cleanup()


def test_a_result_redis_refuses_for_now_is_reported_once_it_takes_it_never_dropped(prefix: str) -> None:
    """The step's success is in hand when Redis starts refusing writes (out of memory): the worker keeps it and
    reports it again until Redis takes it. Dropped, the step would be run again after the lease — and a cancel
    meanwhile cancels that second attempt, leaving the first one's effect standing with nothing to undo it
    (found by the chaos soak). Here the run is cancelled as memory comes back: the reservation is undone."""
    server = RedisServer().start()
    try:
        admin = server.client()
        registry = WorkerRegistry()
        calls: list[str] = []
        returned = asyncio.Event()

        async def reserve(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
            calls.append(ctx.idempotency_key)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # from here on, every write is refused
            returned.set()
            return {"reservation": "r1"}

        async def release(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
            calls.append(ctx.idempotency_key)
            return {}

        async def ship(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
            await asyncio.sleep(30)
            return {}

        for name, fn in (("reserve", reserve), ("release", release), ("ship", ship)):
            registry.register(name, fn)
        spec = "flowdsl: 1\nname: oom\nsteps:\n  - reserve: {compensate: release}\n  - ship\n"

        async def main() -> Any:
            worker = worker_here(server.url, prefix, registry, lease_s=0.3)
            async with RedisClient(server.url, prefix=prefix) as client:
                sub = await client.submit(compile_text(spec), {})

                async def body() -> Any:
                    await asyncio.wait_for(returned.wait(), 10)
                    await asyncio.sleep(1.0)  # three leases of refused writes
                    admin.config_set("maxmemory", 0)
                    await client.cancel(sub.run_id)
                    return await client.follow(sub.run_id)

                return await serving([worker], body)

        result = asyncio.run(main())
        assert (result.status, result.compensated) == ("cancelled", ["reserve"])
        assert calls == [f"{result.run_id}/reserve", f"{result.run_id}/reserve/compensate"]  # reserve ran once
        assert admin.info("errorstats")["errorstat_OOM"]["count"] > 0
    finally:
        server.cleanup()


def test_an_entry_put_back_keeps_its_fields_byte_for_byte_and_is_set_aside_again_alike(url: str, prefix: str) -> None:
    """A put-back entry whose ``t`` is itself unreadable keeps that ``t`` (it is not replaced by a readable one that
    would let the entry through), and one put back twice keeps the trigger of the first put-back."""
    keys = Keys(prefix)
    stream = keys.queue("conf.a")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.redis.xadd(stream, {b"m": b'{"run_id": "r1", "task_id": "r1/a#1"}', b"t": b"\xff"})
            await client.redis.xadd(stream, {b"m": b"nope"})
            rounds = []
            for _ in range(3):
                await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 30)
                letters = await client.dead_letters()
                rounds.append([(letter.fields, letter.reason) for letter in letters])
                for letter in letters:
                    await client.requeue_dead_letter(letter.id)
            return rounds

    first, second, third = asyncio.run(main())
    assert first[0] == ({"m": b'{"run_id": "r1", "task_id": "r1/a#1"}', "t": b"\xff"},
                        "its 't' field is not a short ASCII text")
    assert second[0] == third[0] == first[0]  # set aside again, alike
    trigger = second[1][0]["t"]
    assert first[1][0] == {"m": b"nope"} and second[1][0] == third[1][0] == {"m": b"nope", "t": trigger}


def test_retry_all_puts_back_every_dead_letter_and_odd_field_names_stay_apart(url: str, prefix: str) -> None:
    keys = Keys(prefix)

    async def setup() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            for n in range(120):
                await client.redis.xadd(keys.queue("conf.a"), {b"m": b"x%d" % n})
            await client.redis.xadd(keys.queue("conf.a"), {b"\xff": b"1", b"\xfe": b"2"})  # names not UTF-8
            await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 60)

    asyncio.run(setup())
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["dead-letters", "--redis-url", url, "--prefix", prefix, "--format", "json", *args])

    assert len(json.loads(cli().stdout)) == 100  # a listing shows 100 unless told
    listed = json.loads(cli("-n", "1000").stdout)
    assert len(listed) == 121 and listed[-1]["fields"] == {"\\xff": "1", "\\xfe": "2"}  # both names, apart
    put_back = cli("--retry-all")
    assert put_back.exit_code == 0 and len(json.loads(put_back.stdout)["requeued"]) == 121
    assert json.loads(cli().stdout) == []


# --- a run whose stored data is damaged -------------------------------------------------------------------


def _completed_run(url: str, prefix: str) -> str:
    async def main() -> str:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SAGA), {"script": {}})
            await asyncio.wait_for(worker_here(url, prefix, burst=True).serve(), 30)
            return sub.run_id

    return asyncio.run(main())


def test_status_of_a_run_whose_state_is_damaged_names_it_and_its_dead_letters(url: str, prefix: str,
                                                                             server: RedisServer) -> None:
    """Before: `error: unexpected end of data: line 1 column 11 (char 10)` (a "UsageError" in JSON), naming no
    run, key or field, and not the dead letters the damage made (docs/runtime.md names damaged data as their
    cause and `flowdsl status RUN_ID` as where they are named)."""
    keys = Keys(prefix)
    run_id = _completed_run(url, prefix)
    admin = server.client()
    try:
        admin.hset(keys.run(run_id), "state", '{"status":')
        born = admin.hget(keys.run(run_id), "born").decode()
        admin.xadd(keys.control, {"c": json.dumps({"type": "cancel", "run_id": run_id, "reason": "x", "g": born})})
    finally:
        admin.close()

    async def handle() -> Any:  # the cancel request needs the run's state: its handling fails, once is enough
        return await asyncio.wait_for(worker_here(url, prefix, burst=True, max_failures=1).serve(), 30)

    assert asyncio.run(handle()).dead_letters == 1
    damaged = (f"run '{run_id}' is damaged in Redis: the field 'state' of the key '{keys.run(run_id)}' is not valid "
               "JSON (")

    async def letters() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            return await client.dead_letters_of(run_id)

    (letter,) = asyncio.run(letters())
    assert f"handling it failed: RunDamaged: {damaged}" in letter.reason

    runner = CliRunner()
    text = runner.invoke(app, ["status", run_id, "--redis-url", url, "--prefix", prefix])
    assert text.exit_code == 2 and "Traceback" not in text.output
    lines = [" ".join(line.split()) for line in text.stderr.splitlines()]
    assert lines[0].startswith(f"error: {damaged}") and lines[0].endswith(")")
    assert " ".join(lines[1:]) == (f"note: 1 message(s) of this run were set aside as dead letters ({letter.id}): "
                                   "once the run's data is repaired, `flowdsl dead-letters --retry ID` puts it back")
    as_json = runner.invoke(app, ["status", run_id, "--redis-url", url, "--prefix", prefix, "--format", "json"])
    out = json.loads(as_json.stdout)
    assert as_json.exit_code == 2 and out["status"] == "error" and out["run_id"] == run_id
    assert out["error"]["type"] == "RunDamaged" and out["error"]["message"].startswith(damaged)
    assert out["dead_letters"] == [letter.id]
    followed = runner.invoke(app, ["status", run_id, "--follow", "--redis-url", url, "--prefix", prefix, "-f", "json"])
    out = json.loads(followed.stdout)
    assert followed.exit_code == 2 and out["error"]["type"] == "RunDamaged" and out["dead_letters"] == [letter.id]


@pytest.mark.parametrize(("where", "said"), [
    ("plan", "the field 'plan' of the key '{run}' is not a JSON object"),
    ("ev", "the field 'ev' of the entry {entry} of the key '{journal}' is not valid JSON ("),
    ("in", "the field 'in' of the entry {entry} of the key '{journal}' is not valid JSON ("),
    ("v", "the field 'v' of the key '{run}' is not a number (b'x')"),
])
def test_status_of_a_run_damaged_elsewhere_names_the_key_and_field(url: str, prefix: str, server: RedisServer,
                                                                   where: str, said: str) -> None:
    keys = Keys(prefix)
    run_id = _completed_run(url, prefix)
    admin = server.client()
    try:
        entry = admin.xrange(keys.journal(run_id))[-1][0].decode()
        if where == "plan":
            admin.hset(keys.run(run_id), "plan", "[1, 2]")
        elif where == "v":
            admin.hset(keys.run(run_id), "v", "x")
        else:  # one journal entry, as a fresh one written in its place (XADD cannot rewrite an entry)
            fields = admin.xrange(keys.journal(run_id), entry, entry)[0][1]
            admin.xdel(keys.journal(run_id), entry)
            fields[where.encode()] = b"{not json"
            entry = admin.xadd(keys.journal(run_id), fields).decode()
            admin.hset(keys.run(run_id), "sv", 0)  # (so that loading replays it)
    finally:
        admin.close()
    r = CliRunner().invoke(app, ["status", run_id, "--redis-url", url, "--prefix", prefix])
    expected = said.format(run=keys.run(run_id), journal=keys.journal(run_id), entry=entry)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert " ".join(r.stderr.split()).startswith(f"error: run '{run_id}' is damaged in Redis: {expected}"), r.stderr


def test_reading_a_run_whose_journal_is_damaged_from_python_names_the_entry(url: str, prefix: str,
                                                                           server: RedisServer) -> None:
    """``RedisClient.result`` and ``follow`` read the journal themselves: a damaged entry is a RunDamaged naming
    it, as ``flowdsl status`` says, not the decoder's bare message."""
    keys = Keys(prefix)
    run_id = _completed_run(url, prefix)
    admin = server.client()
    try:
        entry = admin.xrange(keys.journal(run_id))[-1][0].decode()
        fields = admin.xrange(keys.journal(run_id), entry, entry)[0][1]
        admin.xdel(keys.journal(run_id), entry)
        fields[b"ev"] = b"{not json"
        entry = admin.xadd(keys.journal(run_id), fields).decode()
    finally:
        admin.close()

    async def main() -> list[str]:
        said = []
        async with RedisClient(url, prefix=prefix) as client:
            for read in (client.result(run_id), client.follow(run_id)):
                with pytest.raises(RunDamaged) as caught:
                    await read
                said.append(str(caught.value))
        return said

    expected = (f"run '{run_id}' is damaged in Redis: the field 'ev' of the entry {entry} of the key "
                f"'{keys.journal(run_id)}' is not valid JSON (")
    assert all(s.startswith(expected) for s in asyncio.run(main()))
