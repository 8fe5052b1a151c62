"""``flowdsl runs`` of Redis runs that wait: each running run whose waits wait says what for — the signals by name, a
timer wait as ``timer`` — and when the first of their timers is due, read with the rest of its line from the run's
hash (field ``w``, which the transition that changes what the run waits for writes, and deletes once nothing
waits): no read more per run. A row without the field reads as before."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.listing import RunRow
from flowdsl.runtime.redis import RedisClient, RunInfo, RunWaits
from flowdsl.runtime.redis.keys import WAITS_FIELD
from tests.redis.inproc import serving, worker_here
from tests.redis.test_wait_signals import waits_for, when_waiting
from tests.runtime.conformance import HEADER

#: a signal wait (timeout 1h) beside a timer wait (10 min), then ``b``
BOTH = HEADER.format(name="both") + """steps:
  - parallel: hold
    branches:
      - wait: paid
        timeout: 1h
      - wait: cool
        for: 10m
  - conf.b
"""


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


async def _started(client: RedisClient, run_id: str, wait: str) -> int:
    """When wait ``wait`` of the run started (ms), by its state."""
    record = await client.store.load(run_id)
    assert record is not None
    return int(record.state["nodes"][wait]["started_at"])


def _waits(rows: list[RunInfo]) -> dict[str, RunWaits | None]:
    return {row.run_id: row.waits for row in rows}


async def _field(client: RedisClient, run_id: str) -> bytes | None:
    return await client.store.call("HGET", client.keys.run(run_id), WAITS_FIELD)


@pytest.mark.parametrize("cache_runs", [4096, 0])
def test_a_running_run_that_waits_is_listed_with_what_it_waits_for_and_its_first_deadline(
        url: str, prefix: str, cache_runs: int) -> None:
    """``sig`` waits after ``a`` for ``paid`` with a 30 min timeout (the transition that starts the wait arms a
    timer), ``bare`` for ``paid`` without one (a chained step's transition starts it), ``both`` for ``paid`` and
    for a 10 min timer; with ``cache_runs`` 0 every transition is of a run just loaded. Each line says it from the
    transition that started the wait on; once a wait is over it no longer does, and a run that no longer waits has no
    field left."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(waits_for("30m")), {"script": {}}, run_id="sig")
            await client.submit(compile_text(waits_for()), {"script": {}}, run_id="bare")
            await client.submit(compile_text(BOTH), {"script": {}}, run_id="both")

            async def body() -> Any:
                for run_id in ("sig", "bare"):
                    await when_waiting(client, run_id)
                await when_waiting(client, "both", "cool")
                await when_waiting(client, "both", "paid")
                started = {run_id: await _started(client, run_id, "paid") for run_id in ("sig", "bare", "both")}
                cool = await _started(client, "both", "cool")
                waiting = _waits(await client.runs())
                for run_id in ("sig", "bare", "both"):
                    await client.signal(run_id, "paid", {})
                for run_id in ("sig", "bare"):
                    assert (await client.follow(run_id)).status == "completed"
                after = _waits(await client.runs())
                fields = {run_id: await _field(client, run_id) for run_id in ("sig", "bare")}
                assert await client.cancel("both", "enough") == "requested"
                assert (await client.follow("both")).status == "cancelled"
                return started, cool, waiting, after, fields, _waits(await client.runs()), \
                    await _field(client, "both")

            return await serving([worker_here(url, prefix, cache_runs=cache_runs)], body)

    started, cool, waiting, after, fields, cancelled, left = asyncio.run(main())
    assert waiting == {"sig": RunWaits(("paid",), 0, started["sig"] + 30 * 60_000),
                       "bare": RunWaits(("paid",), 0, None),
                       "both": RunWaits(("paid",), 1, cool + 10 * 60_000)}
    assert started["both"] + 60 * 60_000 > cool + 10 * 60_000  # (the earliest: the timer's)
    assert after == {"sig": None, "bare": None, "both": RunWaits((), 1, cool + 10 * 60_000)}  # (paid received)
    assert fields == {"sig": None, "bare": None}
    assert cancelled == {"sig": None, "bare": None, "both": None} and left is None


def test_the_listing_reads_what_runs_wait_for_with_their_lines_one_hmget_a_run(url: str, prefix: str) -> None:
    """Listing six runs that wait costs what listing them cost before: one HMGET per run (all in one round trip),
    nothing more."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            runs = [f"w{i}" for i in range(6)]

            async def body() -> None:
                for run_id in runs:
                    await client.submit(compile_text(waits_for("30m", first=True)), {"script": {}}, run_id=run_id)
                for run_id in runs:
                    await when_waiting(client, run_id)

            await serving([worker_here(url, prefix)], body)
            before = (await client.redis.info("commandstats")).get("cmdstat_hmget", {}).get("calls", 0)
            rows = await client.runs()
            after = (await client.redis.info("commandstats")).get("cmdstat_hmget", {}).get("calls", 0)
            return rows, after - before

    rows, hmgets = asyncio.run(main())
    assert [row.run_id for row in rows] == [f"w{i}" for i in range(5, -1, -1)]
    assert all(row.status == "running" and row.waits is not None and row.waits.signals == ("paid",) for row in rows)
    assert hmgets == 6


def test_a_row_without_the_field_or_with_one_it_cannot_read_is_listed_as_before(url: str, prefix: str) -> None:
    """A running run whose hash has no ``w`` (written before it existed) or one that is not what the workers write:
    its line says nothing of waits, and its JSON object has the keys of a run that does not wait."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            async def body() -> None:
                await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="old")
                await when_waiting(client, "old")

            await serving([worker_here(url, prefix)], body)
            key = client.keys.run("old")
            found = [(await client.runs())[0]]
            for raw in (None, b"not json", b"[1]", b'{"s": 3}', b'{"t": "1"}', b"{}", b'{"s": [], "d": 5}'):
                if raw is None:
                    await client.store.call("HDEL", key, WAITS_FIELD)
                else:
                    await client.store.call("HSET", key, WAITS_FIELD, raw)
                found.append((await client.runs())[0])
            return found

    first, *rows = asyncio.run(main())
    assert first.waits == RunWaits(("paid",), 0, None) and first.to_json()["waits"] == {
        "signals": ["paid"], "timers": 0, "due_at": None}
    plain = list(RunRow("r", "f", "running", 1, 2, None).to_json())
    for row in rows:
        assert row.status == "running" and row.waits is None and list(row.to_json()) == plain


def test_flowdsl_runs_says_what_each_run_waits_for_in_its_status_and_json_row(url: str, prefix: str) -> None:
    """The table: ``running (paid; due 12-05 18:30:00)`` (local time, as ``submitted``), ``running (paid)`` without
    a deadline, ``running (paid, timer; due …)``; ``--format json``: ``waits`` in the row of a run that waits only."""
    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            async def body() -> Any:
                await client.submit(compile_text(waits_for("30m", first=True)), {"script": {}}, run_id="sig")
                await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="bare")
                await client.submit(compile_text(BOTH), {"script": {}}, run_id="both")
                await client.submit(compile_text(waits_for(first=True)), {"script": {}}, run_id="done")
                for run_id in ("sig", "bare", "done"):
                    await when_waiting(client, run_id)
                await when_waiting(client, "both", "cool")
                await when_waiting(client, "both", "paid")
                await client.signal("done", "paid", {})
                await client.follow("done")
                return {row.run_id: row.waits for row in await client.runs()}

            return await serving([worker_here(url, prefix)], body)

    waits = asyncio.run(main())
    common = ["--redis-url", url, "--prefix", prefix]
    shown = cli("runs", *common)
    assert shown.exit_code == 0, shown.output

    def due(run_id: str) -> str:
        at = waits[run_id]
        assert at is not None and at.due_at is not None
        return time.strftime("%m-%d %H:%M:%S", time.localtime(at.due_at / 1000))

    lines = {line.split()[0]: " ".join(line.split()) for line in shown.stdout.splitlines()[1:]}
    assert f"running (paid; due {due('sig')})" in lines["sig"]
    assert "running (paid) " in lines["bare"] + " "
    assert f"running (paid, timer; due {due('both')})" in lines["both"]
    assert " completed " in lines["done"] and "(" not in lines["done"]
    rows = {row["run_id"]: row for row in json.loads(cli("runs", *common, "--format", "json").stdout)}
    assert rows["sig"]["waits"] == {"signals": ["paid"], "timers": 0, "due_at": waits["sig"].due_at}  # type: ignore
    assert rows["both"]["waits"] == {"signals": ["paid"], "timers": 1, "due_at": waits["both"].due_at}  # type: ignore
    assert rows["bare"]["waits"] == {"signals": ["paid"], "timers": 0, "due_at": None}
    assert "waits" not in rows["done"]
    only = json.loads(cli("runs", *common, "--format", "json", "--status", "running").stdout)
    assert sorted(row["run_id"] for row in only) == ["bare", "both", "sig"]


@pytest.mark.parametrize("finished_at, waits", [(None, '{"s":["paid"]}'), (1234, ""), (None, ""), (1234, None)])
def test_a_chained_steps_straight_line_writes_the_field_as_a_transition_does(
        url: str, prefix: str, finished_at: int | None, waits: str | None) -> None:
    """``Store.step`` (a chained step's transition, with the run's end and the ``w`` field or not) sends the very
    TRANSITION arguments ``Store.transition`` sends for it with those meta fields."""
    from flowdsl.runtime.redis.connection import connect
    from flowdsl.runtime.redis.keys import Keys
    from flowdsl.runtime.redis.scripts import Batcher
    from flowdsl.runtime.redis.store import RunRecord, Store

    async def main() -> list[tuple[Any, ...]]:
        client = connect(url)
        store = Store(client, Keys(prefix), batcher=Batcher(client))
        await store.load_scripts()
        sent: list[tuple[Any, ...]] = []
        plain = store.batcher.call

        def call(*args: Any) -> Any:
            sent.append(args)
            return plain(*args)

        store.batcher.call = call  # type: ignore[method-assign]
        record = RunRecord("r", {}, 3, {}, None, born="17")
        entry = (b'{"type":"task_succeeded"}', b"[]", ("r/a#1", "lease", "tok"), "w1")
        await store.step(record, "t1", "running", finished_at, b"", entry, None, waits)
        meta = [*([("finished", finished_at)] if finished_at is not None else []),
                *([(WAITS_FIELD, waits)] if waits is not None else [])]
        await store.transition("r", expected=3, state=b"", token="t1", status="running", entries=[entry],
                               finished=finished_at is not None, task_ops=[("d", "r/a#1", "")], meta=meta,
                               born="17", record=record)
        await client.aclose()
        return sent

    step, general = asyncio.run(main())
    assert step == general


MANY = HEADER.format(name="many") + """steps:
  - parallel: top
    branches:
      - wait: paid
        timeout: 1h
      - for_each: each
        items: "${ items }"
        steps:
          - parallel: pair
            branches:
              - wait: short
                for: 1s
              - wait: long
                for: 3s
"""


@pytest.mark.parametrize("seed", range(5))
def test_the_summary_kept_from_the_events_is_the_one_worked_out_from_the_whole_state(seed: int) -> None:
    """A for_each of 30 iterations, each waiting for two timers, beside a signal wait: its timers fire in a random
    order, a few at a time (a group commit), the signal comes at some point. After each batch the summary kept from
    the batch's events alone (:class:`WaitsKept`, as a worker process holds it) is the one worked out from the
    whole state, and says what ``flowdsl status`` says the waits wait for."""
    import random

    from flowdsl.kernel import apply, start_run
    from flowdsl.runtime.redis.run_waits import WaitsKept, read_waits
    from flowdsl.runtime.redis.waiting import waits as status_waits

    rng = random.Random(seed)
    plan = compile_text(MANY)
    at = at_start = 1_764_770_000_000
    decision = start_run(plan, "r", {"items": list(range(30))}, at=at)
    state, kept = decision.state, WaitsKept()
    said = [read_waits(kept.value(plan, state, [decision.events]).encode())]
    while state["status"] == "running":
        batch = []
        fired = [t for t, timer in state["timers"].items() if timer["purpose"] == "wait"]
        rng.shuffle(fired)
        for timer_id in fired[:rng.randint(1, 4)]:
            at += rng.randint(0, 50)
            batch.append(apply(plan, state, {"type": "timer_fired", "timer_id": timer_id, "at": at}).events)
        if "paid" in state.get("waits", {}) and rng.random() < 0.1:
            batch.append(apply(plan, state, {"type": "signal", "name": "paid", "payload": {}, "at": at}).events)
        value = kept.value(plan, state, batch)
        assert value == WaitsKept().value(plan, state, [])
        now = at + 1
        listed = status_waits(plan, state, now)
        got = read_waits(value.encode())
        if not listed:
            assert got is None
            continue
        dues = [now + w.due_in_ms for w in listed if w.due_in_ms is not None]
        assert got == RunWaits(tuple(w.signal for w in listed if w.signal is not None),
                               sum(1 for w in listed if w.signal is None), min(dues) if dues else None)
        said.append(got)
    assert state["status"] == "completed" and said[0] == RunWaits(("paid",), 60, at_start + 1000)
    assert len(said) > 10 and said[-1] is not None and said[-1].timers <= 4


def test_many_waits_taking_one_signal_say_its_name_once() -> None:
    """Waits of a for_each body that take one signal name (told apart by a key): the name is said once, however
    many of them wait, until the last of them has ended; the earliest deadline is theirs."""
    from flowdsl.runtime.redis.run_waits import WaitsKept, read_waits

    plan = {"nodes": {"paid": {"kind": "wait", "signal": "paid", "timeout_ms": 60_000, "order": 2},
                      "cool": {"kind": "wait", "delay_ms": 1_000, "order": 1}}}
    keys = [f"each/{i}/paid" for i in range(500)]
    state: dict[str, Any] = {"waits": {key: {"signal": "paid", "timer": key + "@wait", "key": str(i)}
                                       for i, key in enumerate(keys)},
                             "nodes": {key: {"node": "paid", "started_at": 1000 + i} for i, key in enumerate(keys)}}
    kept = WaitsKept()
    said = [read_waits(kept.value(plan, state, []).encode())]
    for i, key in enumerate(keys):
        del state["waits"][key]
        value = kept.value(plan, state, [[{"type": "signal_received", "step": key, "kind": "wait"},
                                          {"type": "step_succeeded", "step": key, "kind": "wait"}]])
        assert value == WaitsKept().value(plan, state, [])
        said.append(read_waits(value.encode()))
        if i == 10:
            state["waits"]["cool"] = {"signal": None, "timer": "cool@wait"}
            state["nodes"]["cool"] = {"node": "cool", "started_at": 100_000}
            said.append(read_waits(kept.value(plan, state, [[{"type": "step_started", "step": "cool",
                                                              "kind": "wait"}]]).encode()))
    assert said[0] == RunWaits(("paid",), 0, 61_000) and said[1] == RunWaits(("paid",), 0, 61_001)
    assert said[12] == RunWaits(("paid",), 1, 61_011)  # (cool started: a timer, due later than the first paid)
    assert said[-2] == RunWaits(("paid",), 1, 61_499) and said[-1] == RunWaits((), 1, 101_000)
    assert len(kept.value(plan, state, [])) < 40
