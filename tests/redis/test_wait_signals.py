"""Wait nodes on the Redis runtime: signals sent to runs (the client's ``signal``) and durable timers.

A signal travels as a cancel request does — a message on a stream of its own, read whether or not a worker has a
free slot, applied through the kernel in one transition and acknowledged only then — and is applied once per id:
the transition that applies it records the id in the run's hash and refuses it again. Every run here replays, from
its journal, to the very events the workers journaled (the kernel's decisions, nothing of the runtime's own)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.kernel import replay
from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis import RedisClient, RunNotFound, SignalIdReused, UnknownSignal
from flowdsl.runtime.redis.keys import GROUP
from tests.redis.inproc import serving, until_event, worker_here
from tests.redis.server import RedisServer
from tests.runtime.conformance import HEADER


def waits_for(timeout: str | None = None, first: bool = False) -> str:
    """A flow: ``a`` (undone by ``undo.a``), the wait for signal ``paid`` (its payload under ``payment``), ``b``;
    ``first``: the wait comes first."""
    wait = "  - wait: paid\n" + (f"    timeout: {timeout}\n" if timeout else "") + "    output: payment\n"
    steps = [wait, "  - conf.a: {compensate: undo.a}\n", "  - conf.b\n"] if first else \
        ["  - conf.a: {compensate: undo.a}\n", wait, "  - conf.b\n"]
    return HEADER.format(name="paid") + "steps:\n" + "".join(steps)


TIMER = HEADER.format(name="cool") + "steps:\n  - conf.a\n  - wait: cool\n    for: 1500ms\n  - conf.b\n"


async def when_waiting(client: RedisClient, run_id: str, step: str = "paid") -> None:
    """Until wait ``step`` of the run has started (it waits)."""
    await until_event(client, run_id, "step_started", step)


async def journal_of(client: RedisClient, run_id: str) -> list[dict[bytes, bytes]]:
    return [dict(zip(f[::2], f[1::2], strict=True)) if isinstance(f, list) else f
            for _, f in await client.store.call("XRANGE", client.keys.journal(run_id), "-", "+")]


def replays(plan: dict[str, Any], journal: list[dict[bytes, bytes]]) -> None:
    """The journal's input events replay, through the kernel, to the very events the workers journaled."""
    entries = [f for f in journal if b"in" in f]
    _, _, events = replay(plan, [loads(f[b"in"]) for f in entries])
    assert events == [e for f in entries for e in loads(f[b"ev"])]


def signals_in(journal: list[dict[bytes, bytes]]) -> list[dict[str, Any]]:
    return [e for f in journal if b"in" in f for e in [loads(f[b"in"])] if e["type"] == "signal"]


def test_a_run_waits_for_its_signal_and_goes_on_with_its_payload(url: str, prefix: str) -> None:
    """The wait holds nothing in flight; the signal is received (exit 0 in the CLI), its payload is the wait's
    result; a second one is rejected with the kernel's reason; a name no wait takes, a payload that is not an
    object and a run that does not exist are refused before anything is sent."""
    plan = compile_text(waits_for("30s"))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                leases = await client.store.call("HGETALL", client.keys.tasks(sub.run_id))
                with pytest.raises(UnknownSignal, match=r"takes no signal 'shipped': its waits take 'paid'"):
                    await client.signal(sub.run_id, "shipped")
                with pytest.raises(ValueError, match="not a JSON object"):
                    await client.signal(sub.run_id, "paid", [1])  # type: ignore[arg-type]
                with pytest.raises(RunNotFound):
                    await client.signal("nope", "paid")
                got = await client.signal(sub.run_id, "paid", {"amount": 42})
                result = await client.follow(sub.run_id)
                again = await client.signal(sub.run_id, "paid", {"amount": 1})  # (the run is over: nothing sent)
                return leases, got, result, again

            leases, got, result, again = await serving([worker_here(url, prefix)], body)
            return leases, got, result, again, await journal_of(client, sub.run_id), \
                await client.store.call("XLEN", client.keys.signals)

    leases, got, result, again, journal, left = asyncio.run(main())
    assert not leases  # waiting, the run holds no attempt (no lease to renew: a wait outlasts any lease)
    assert (got.outcome, got.wait, got.reason) == ("received", "paid", None) and got.at is not None
    assert result.status == "completed" and result.context["payment"] == {"amount": 42}
    assert result.steps["paid"]["status"] == "succeeded" and result.steps["b"]["status"] == "succeeded"
    assert (again.outcome, again.reason) == ("rejected", "the run has ended (completed): it waits for nothing more")
    assert [(s["name"], s["payload"]) for s in signals_in(journal)] == [("paid", {"amount": 42})]
    assert left == 0  # acknowledged and deleted
    replays(plan, journal)


def test_a_second_signal_for_a_wait_that_has_received_one_is_rejected_with_the_kernels_reason(
        url: str, prefix: str) -> None:
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {"b": {"sleep": 1.0}}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                first = await client.signal(sub.run_id, "paid", {"n": 1})
                second = await client.signal(sub.run_id, "paid", {"n": 2})  # (b runs: the run goes on)
                return first, second, await client.follow(sub.run_id)

            first, second, result = await serving([worker_here(url, prefix)], body)
            return first, second, result, await journal_of(client, sub.run_id)

    first, second, result, journal = asyncio.run(main())
    assert first.outcome == "received" and second.outcome == "rejected"
    assert second.reason == "wait 'paid' has already received signal 'paid'"
    assert result.status == "completed" and result.context["payment"] == {"n": 1}
    assert [s["payload"] for s in signals_in(journal)] == [{"n": 1}, {"n": 2}]  # both journaled, one taken
    replays(plan, journal)


def test_a_signal_sent_before_its_wait_starts_is_kept_and_taken_when_it_starts(url: str, prefix: str) -> None:
    """Sent while ``a`` runs: kept (``buffered``); the wait takes it as it starts, and never waits."""
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {"a": {"sleep": 1.0}}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id, "a")
                kept = await client.signal(sub.run_id, "paid", {"early": True})
                return kept, await client.follow(sub.run_id)

            kept, result = await serving([worker_here(url, prefix)], body)
            return kept, result, await journal_of(client, sub.run_id)

    kept, result, journal = asyncio.run(main())
    assert (kept.outcome, kept.wait) == ("buffered", "paid")
    assert result.status == "completed" and result.context["payment"] == {"early": True}
    received = [e for e in result.events if e["type"] == "signal_received"]
    assert len(received) == 1 and received[0]["buffered"] is True
    replays(plan, journal)


def test_a_signal_sent_before_the_run_started_waits_for_its_start(url: str, prefix: str) -> None:
    """The signal is sent (not waited for) to a run only submitted, whose start waits for the one slot of the
    worker (another run's step holds it): the worker reads the signal at once and holds it, pending, until the run
    has started, then applies it — the wait is the run's first node, so it takes it at once."""
    plan = compile_text(waits_for(first=True))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            busy = await client.submit(compile_text(TIMER), {"script": {"a": {"sleep": 1.0}}})
            worker = worker_here(url, prefix, concurrency=1)

            async def body() -> Any:
                await when_waiting(client, busy.run_id, "a")
                sub = await client.submit(plan, {"script": {}})
                sent = await client.signal(sub.run_id, "paid", {"n": 7}, wait=False)
                await asyncio.sleep(0.3)
                held = await client.store.call("XPENDING", client.keys.signals, GROUP)
                status = (await client.info(sub.run_id)).status
                outcome = await client.signal_outcome(sub.run_id, sent.id)
                return sub, sent, held, status, outcome, await client.follow(sub.run_id)

            sub, sent, held, status, outcome, result = await serving([worker], body)
            return sent, held, status, outcome, result, await journal_of(client, sub.run_id)

    sent, held, status, outcome, result, journal = asyncio.run(main())
    assert sent.outcome == "sent" and status == "submitted" and held[0] == 1  # read, held while the run waits
    assert outcome.outcome == "received" and outcome.id == sent.id
    assert result.status == "completed" and result.context["payment"] == {"n": 7}
    replays(plan, journal)


def test_a_wait_whose_signal_does_not_come_in_time_fails_with_wait_timeout_and_the_run_compensates(
        url: str, prefix: str) -> None:
    plan = compile_text(waits_for("400ms"))

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})
            result = await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))
            late = await client.signal(sub.run_id, "paid", {})
            return result, late, await journal_of(client, sub.run_id)

    result, late, journal = asyncio.run(main())
    assert (result.status, result.compensated, result.failed_step) == ("compensated", ["a"], "paid")
    assert result.error["type"] == "WaitTimeout" and "no signal 'paid'" in result.error["message"]
    assert (late.outcome, late.reason) == ("rejected", "the run has ended (compensated): it waits for nothing more")
    assert any(json.loads(f[b"in"]).get("type") == "timer_fired" for f in journal if b"in" in f)
    replays(plan, journal)


def test_a_timer_wait_outlasts_every_lease_and_goes_on_with_nothing_in_flight(url: str, prefix: str) -> None:
    """A 1.5 s wait under a 0.2 s lease: nothing to renew, nothing reclaimed; its timer fires and the run goes
    on."""
    plan = compile_text(TIMER)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})
            worker = worker_here(url, prefix, lease_s=0.2)

            async def body() -> Any:
                await when_waiting(client, sub.run_id, "cool")
                t0 = time.monotonic()
                timers = await client.store.call("ZRANGE", client.keys.timers, 0, -1)
                leases = await client.store.call("HGETALL", client.keys.tasks(sub.run_id))
                result = await client.follow(sub.run_id)
                return timers, leases, result, time.monotonic() - t0

            timers, leases, result, took = await serving([worker], body)
            return timers, leases, result, took, worker.stats, await journal_of(client, sub.run_id)

    timers, leases, result, took, stats, journal = asyncio.run(main())
    assert [t.decode() for t in timers] == [f"t|{result.run_id}|{result.run_id}/cool@wait"] and not leases
    assert result.status == "completed" and result.steps["cool"]["status"] == "succeeded" and took >= 1.0
    assert stats.reclaimed == 0 and stats.timers >= 1
    replays(plan, journal)


def test_a_signal_is_applied_once_however_often_it_is_delivered(url: str, prefix: str, server: RedisServer) -> None:
    """The same signal id three times: sent again by a caller that did not hear back (answered with the first
    one's outcome, nothing sent), and a copy held by a process that died before acknowledging it (as one that
    died between the transition that applied it and the acknowledgement), taken over after the lease: the run
    applies it once; the copy is acknowledged, not applied."""
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {"b": {"sleep": 1.5}}})
            worker = worker_here(url, prefix, lease_s=0.3)

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                born = (await client.store.call("HGET", client.keys.run(sub.run_id), "born")).decode()
                copy = {"type": "signal", "run_id": sub.run_id, "name": "paid", "payload": {"n": 1}, "id": "dup-1",
                        "g": born}
                dead = server.client().pipeline(transaction=True)  # sent and read by a process that then dies
                dead.xadd(client.keys.signals, {"c": json.dumps(copy)})
                dead.xreadgroup(GROUP, "dead-process", {client.keys.signals: ">"}, count=1)
                assert (await asyncio.to_thread(dead.execute))[1][0][1]
                first = await client.signal(sub.run_id, "paid", {"n": 1}, signal_id="dup-1")
                again = await client.signal(sub.run_id, "paid", {"n": 1}, signal_id="dup-1")
                result = await client.follow(sub.run_id)
                for _ in range(100):  # until the dead process's copy is taken over and acknowledged
                    if not await client.store.call("XLEN", client.keys.signals):
                        break
                    await asyncio.sleep(0.05)
                return first, again, result

            first, again, result = await serving([worker], body)
            return first, again, result, worker.stats, await journal_of(client, sub.run_id), \
                await client.store.call("XLEN", client.keys.signals)

    first, again, result, stats, journal, left = asyncio.run(main())
    assert first.outcome == "received" and again == first  # the first one's outcome, and nothing sent again
    assert result.status == "completed" and result.context["payment"] == {"n": 1}
    assert [s["id"] for s in signals_in(journal)] == ["dup-1"]
    assert stats.reclaimed >= 1 and left == 0
    replays(plan, journal)


def test_a_signal_a_dead_process_had_read_is_taken_over_after_the_lease_and_applied(
        url: str, prefix: str, server: RedisServer) -> None:
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})
            worker = worker_here(url, prefix, lease_s=0.3)

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                born = (await client.store.call("HGET", client.keys.run(sub.run_id), "born")).decode()
                message = {"type": "signal", "run_id": sub.run_id, "name": "paid", "payload": {"n": 3}, "id": "s-1",
                           "g": born}
                dead = server.client().pipeline(transaction=True)
                dead.xadd(client.keys.signals, {"c": json.dumps(message)})
                dead.xreadgroup(GROUP, "dead-process", {client.keys.signals: ">"}, count=1)
                assert (await asyncio.to_thread(dead.execute))[1][0][1]
                return await client.signal_outcome(sub.run_id, "s-1"), await client.follow(sub.run_id)

            outcome, result = await serving([worker], body)
            return outcome, result, worker.stats, await journal_of(client, sub.run_id)

    outcome, result, stats, journal = asyncio.run(main())
    assert outcome.outcome == "received" and stats.reclaimed >= 1
    assert result.status == "completed" and result.context["payment"] == {"n": 3}
    replays(plan, journal)


def test_a_signal_message_that_cannot_be_applied_is_set_aside_as_a_dead_letter(url: str, prefix: str) -> None:
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            bad = {"type": "signal", "run_id": "r-1", "name": "paid", "payload": [1], "id": "x"}
            await client.store.call("XADD", client.keys.signals, "*", "c", json.dumps(bad))

            async def body() -> Any:
                for _ in range(100):
                    letters = await client.dead_letters()
                    if letters:
                        return letters
                    await asyncio.sleep(0.05)
                return []

            return await serving([worker_here(url, prefix)], body)

    letters = asyncio.run(main())
    assert len(letters) == 1 and letters[0].stream.endswith(":signals") and "'payload'" in letters[0].reason


def test_the_transition_guard_of_a_signal_writes_it_once_and_never_twice_in_one_group_commit(
        url: str, prefix: str) -> None:
    """Mode ``new``: written only while the run's hash has no ``sig:<id>`` field, which the transition sets to its
    journal entry; refused again alone (code 3, nothing written, nothing journaled) and in a group commit (code 7),
    also when one group commit carries the same id twice."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="g1")
            await serving([worker_here(url, prefix, burst=True)], lambda: when_waiting(client, "g1"))
            store, keys = client.store, client.keys
            record = await store.load("g1")
            assert record is not None
            v = record.version
            base = dict(state=b"", status="running")
            sig = (b'{"type":"signal","name":"paid","payload":{},"id":"x1","at":1}', b"[]", ("sig:x1", "new", ""), "")
            first = await store.transition("g1", expected=v, token="n1", entries=[sig], **base)
            field = await store.call("HGET", keys.run("g1"), "sig:x1")
            again = await store.transition("g1", expected=v + 1, token="n2", entries=[sig], **base)
            other = (sig[0].replace(b"x1", b"x2"), b"[]", ("sig:x2", "new", ""), "")
            grouped = await store.transition("g1", expected=v + 1, token="n3", entries=[other, sig], **base)
            twice = await store.transition("g1", expected=v + 1, token="n4", entries=[other, other], **base)
            journal = await store.call("XRANGE", keys.journal("g1"), "-", "+")
            return first, field, again, grouped, twice, journal, await store.call("HGET", keys.run("g1"), "sig:x2")

    first, field, again, grouped, twice, journal, x2 = asyncio.run(main())
    assert first.code == 1 and field == journal[-1][0]  # the field names the entry that applied it
    assert again.code == 3 and grouped.code == 7 and twice.code == 7 and x2 is None
    assert sum(1 for _, f in journal if b'"id":"x1"' in dict(zip(f[::2], f[1::2], strict=True)).get(b"in", b"")
               ) == 1


def test_a_signal_id_is_one_signals_another_name_or_other_data_under_it_is_refused(url: str, prefix: str) -> None:
    """An id used for ``paid`` {"n": 1} refuses ``shipped`` and ``paid`` {"n": 2}, nothing sent — while the first is
    still pending (no worker yet) and once it is applied; the same signal under it again answers the first one's
    outcome (``{}`` and no payload are the same signal: the kernel takes None as ``{}``)."""
    plan = compile_text(HEADER.format(name="two") + "steps:\n  - wait: paid\n  - wait: shipped\n  - conf.b\n")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(plan, {"script": {}}, run_id="ids")
            sent = await client.signal("ids", "paid", {"n": 1}, signal_id="ID1", wait=False)
            refused = []
            for name, payload in (("shipped", {"n": 1}), ("paid", {"n": 2}), ("paid", None)):
                with pytest.raises(SignalIdReused) as pending:
                    await client.signal("ids", name, payload, signal_id="ID1")
                refused.append(str(pending.value))
            length = await client.store.call("XLEN", client.keys.signals)
            empty = await client.signal("ids", "shipped", None, signal_id="E", wait=False)

            async def body() -> Any:
                first = await client.signal_outcome("ids", sent.id)
                again = await client.signal("ids", "paid", {"n": 1}, signal_id="ID1")
                with pytest.raises(SignalIdReused) as applied:
                    await client.signal("ids", "shipped", {"s": 1}, signal_id="ID1")
                same = await client.signal("ids", "shipped", {}, signal_id="E")
                return first, again, str(applied.value), same, await client.follow("ids")

            first, again, applied, same, result = await serving([worker_here(url, prefix)], body)
            return refused, length, first, again, applied, empty, same, result, \
                await journal_of(client, "ids")

    refused, length, first, again, applied, empty, same, result, journal = asyncio.run(main())
    assert refused[0] == ("signal id 'ID1' was already used for signal 'paid', not 'shipped' (run 'ids'); a new "
                          "signal needs a new id: nothing was sent")
    assert refused[1] == refused[2] == ("signal id 'ID1' was already used for signal 'paid' with other data (run "
                                        "'ids'); a new signal needs a new id: nothing was sent")
    assert length == 1  # nothing sent by the refused ones
    assert first.outcome == "received" and again == first and "already used for signal 'paid'" in applied
    assert same.outcome in ("received", "buffered") and same.id == empty.id  # (applied before or after 'paid')
    assert result.status == "completed" and sorted(s["id"] for s in signals_in(journal)) == ["E", "ID1"]
    replays(plan, journal)


@pytest.mark.parametrize("sid", ['a"b', "c\\d", '\\"', "x{}[]:,"])
def test_a_signal_id_with_json_special_characters_is_followed_to_its_outcome(url: str, prefix: str, sid: str) -> None:
    """``"`` and backslash are allowed in an id (printable ASCII): the journal writes them escaped, and the outcome
    is found all the same — followed live, and asked for again once applied."""
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                got = await client.signal(sub.run_id, "paid", {"q": sid}, signal_id=sid, timeout_s=10)
                return got, await client.signal(sub.run_id, "paid", {"q": sid}, signal_id=sid), \
                    await client.signal_outcome(sub.run_id, sid, timeout_s=10)

            return await serving([worker_here(url, prefix)], body)

    got, again, asked = asyncio.run(main())
    assert (got.outcome, got.id, got.wait) == ("received", sid, "paid") and again == got and asked == got


def test_a_rejected_signal_names_the_wait_it_was_for(url: str, prefix: str) -> None:
    """``wait`` is filled alike for every rejection: by the client (the run had ended) and by the kernel."""
    plan = compile_text(waits_for())

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {"b": {"sleep": 0.5}}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                await client.signal(sub.run_id, "paid", {})
                kernel = await client.signal(sub.run_id, "paid", {})
                await client.follow(sub.run_id)
                return kernel, await client.signal(sub.run_id, "paid", {})

            return await serving([worker_here(url, prefix)], body)

    kernel, ended = asyncio.run(main())
    assert (kernel.outcome, kernel.wait, kernel.reason) == ("rejected", "paid",
                                                            "wait 'paid' has already received signal 'paid'")
    assert (ended.outcome, ended.wait) == ("rejected", "paid") and ended.to_json()["wait"] == "paid"


def _parked_setup(url: str, prefix: str, unstarted: int, check: Any) -> Any:
    """A worker with one slot: run ``w`` waits for ``paid`` (holding no slot), run ``busy`` holds the slot (its
    first step sleeps), and ``unstarted`` runs stay submitted behind it, each sent a signal (not waited for): the
    worker parks them. ``check(client, worker)`` then runs; at the end ``busy`` is cancelled and every run ends."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            worker = worker_here(url, prefix, concurrency=1)

            async def body() -> Any:
                await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="w")
                await when_waiting(client, "w")
                await client.submit(compile_text(waits_for()), {"script": {"a": {"sleep": 8.0}}}, run_id="busy")
                await when_waiting(client, "busy", "a")
                for i in range(unstarted):
                    await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id=f"u{i}")
                    await client.signal(f"u{i}", "paid", {"i": i}, wait=False)
                checked = await check(client, worker)
                assert await client.cancel("busy", "enough") == "requested"
                ends = [await client.follow(run_id) for run_id in ["busy", *(f"u{i}" for i in range(unstarted))]]
                return checked, ends

            return await serving([worker], body)

    return asyncio.run(main())


async def _until(predicate: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.02)


def test_signals_parked_for_runs_not_started_keep_neither_cancels_nor_other_signals_from_being_read(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """More signals parked (waiting for their runs' start) than the signals handled at a time (2 here, 64 in
    production): a signal to a run that waits is still read and applied at once, and so is a cancel request; once
    the runs start, each parked signal is applied."""
    monkeypatch.setattr("flowdsl.runtime.redis.reading._CANCELS_PER_READ", 2)

    async def check(client: RedisClient, worker: Any) -> Any:
        await _until(lambda: len(worker._parked) == 5)
        t0 = time.monotonic()
        got = await client.signal("w", "paid", {"now": True}, timeout_s=5)
        return len(worker._parked), len(worker._signalling), got, time.monotonic() - t0

    (parked, applying, got, took), ends = _parked_setup(url, prefix, 5, check)
    assert parked == 5 and applying == 0 and got.outcome == "received" and took < 1.5
    assert ends[0].status == "cancelled"
    assert [r.status for r in ends[1:]] == ["completed"] * 5
    assert [r.context["payment"] for r in ends[1:]] == [{"i": i} for i in range(5)]


def test_a_process_holding_as_many_parked_signals_as_it_keeps_reads_no_more_and_says_so_once(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With the bound of parked signals (3 here, 4,096 in production) reached, the signals stream is not read —
    the others wait in it, unread — and the log says so once; they are read and applied once the runs start."""
    monkeypatch.setattr("flowdsl.runtime.redis.reading._CANCELS_PER_READ", 2)
    monkeypatch.setattr("flowdsl.runtime.redis.reading._PARKED_SIGNALS", 3)
    caplog.set_level("WARNING", logger="flowdsl.redis")

    async def check(client: RedisClient, worker: Any) -> Any:
        await _until(lambda: len(worker._parked) == 3)
        await asyncio.sleep(0.5)
        return len(worker._parked), (await client.store.call("XPENDING", client.keys.signals, GROUP))[0], \
            await client.store.call("XLEN", client.keys.signals)

    (parked, pending, length), ends = _parked_setup(url, prefix, 5, check)
    assert (parked, pending, length) == (3, 3, 5)
    assert [r.status for r in ends[1:]] == ["completed"] * 5
    said = [r.getMessage() for r in caplog.records if "signals for runs not started yet" in r.getMessage()]
    assert len(said) == 1 and "holds 3 signals for runs not started yet, as many as it keeps" in said[0]


def test_a_signal_for_another_generation_of_an_existing_run_is_dropped_saying_so_not_expired(
        url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A signal whose ``g`` is not the run's generation (sent to an earlier run of the id, expired since) is only
    acknowledged — logged as sent to another run of that id, not as one for a run that no longer exists; a signal
    for a run gone is logged as that."""
    plan = compile_text(waits_for())
    caplog.set_level("WARNING", logger="flowdsl.redis")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {"script": {}})

            async def body() -> Any:
                await when_waiting(client, sub.run_id)
                for run_id, generation in ((sub.run_id, "123"), ("gone-1", "")):
                    message = {"type": "signal", "run_id": run_id, "name": "paid", "payload": {}, "id": "s",
                               "g": generation}
                    await client.store.call("XADD", client.keys.signals, "*", "c", json.dumps(message))
                for _ in range(100):
                    if not await client.store.call("XLEN", client.keys.signals):
                        break
                    await asyncio.sleep(0.05)
                return (await client.info(sub.run_id)).status

            return await serving([worker_here(url, prefix)], body)

    status = asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert status == "running" and len(said) == 2, said
    other = next(m for m in said if "run gone-1" not in m)
    assert "dropped: it was sent to another run of that id (its generation 123; the run's is" in other
    assert "(expired)" not in other
    assert "run gone-1 dropped: the run it was sent to no longer exists (expired)" in \
        next(m for m in said if "run gone-1" in m)
