"""Following a Redis run past its end: a worker still runs an attempt the run gave up on (it timed out) of a step
with a compensation, so a success would be a late completion. `follow` (and so `run --backend redis`, `status
--follow`) waits for it, at most ``late_grace`` seconds, as the local runtime holds the run's end — the same
answer from both runtimes — and reports it in doubt when the wait ends first.

An in-process worker on the session's private redis-server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

import tests.runtime.workers  # noqa: F401  (registers the conf.* and sync.* workers the local backend runs)
from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.redis import RedisClient
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.redis.procs import WorkerProcs
from tests.runtime.conformance import HEADER

LONE = compile_text("""flowdsl: 1
name: lone
steps:
  - charge: {compensate: refund, timeout: 200ms}
""")
BARE = compile_text("""flowdsl: 1
name: bare
steps:
  - charge: {timeout: 200ms}
""")


def _registry(go: threading.Event, refunds: list[str], *, sync: bool = True) -> WorkerRegistry:
    """A sync charge (a gateway call that cannot be interrupted) that returns once ``go`` is set; or an async one
    that answers its cancel (``sync`` false)."""
    reg = WorkerRegistry()

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        assert go.wait(20)
        return {"charge_id": "ch1"}

    async def charge_async(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(20)
        return {"charge_id": "ch1"}

    async def refund(data: Any, ctx: Any) -> dict[str, Any]:
        refunds.append(ctx.idempotency_key)
        return {}

    reg.register("charge", charge if sync else charge_async)
    reg.register("refund", refund)
    return reg


def _follow(url: str, prefix: str, plan: dict[str, Any], go: threading.Event, release_after: float | None,
            late_grace: float, sync: bool = True, timeout_s: float | None = None
            ) -> tuple[Any, list[str], list[dict[str, Any]], float]:
    """Submit ``plan``, follow it (``late_grace``) while a worker of this process serves, the charge returning
    ``release_after`` seconds after the run's first end (never, when None, while followed). Returns the result,
    the notices, the events and how long following took."""
    refunds: list[str] = []
    took: list[float] = []
    notices: list[str] = []
    events: list[dict[str, Any]] = []

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(plan, {})

            def watch(event: dict[str, Any]) -> None:
                events.append(event)
                if event["type"] == "run_finished" and release_after is not None:
                    threading.Timer(release_after, go.set).start()

            async def body() -> Any:
                t0 = time.monotonic()
                try:
                    return await client.follow(sub.run_id, on_event=watch, on_notice=notices.append,
                                               late_grace=late_grace, timeout_s=timeout_s)
                finally:
                    took.append(time.monotonic() - t0)
                    go.set()  # the worker's thread ends, so the worker can stop
            return await serving([worker_here(url, prefix, _registry(go, refunds, sync=sync))], body)

    result = asyncio.run(main())
    assert not refunds  # a late charge is left to a person, never refunded by the run
    return result, notices, events, took[0]


def test_following_waits_for_a_timed_out_charge_that_succeeds_after_the_run_failed(url: str, prefix: str) -> None:
    go = threading.Event()
    result, notices, events, _ = _follow(url, prefix, LONE, go, release_after=1.2, late_grace=15)
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert [i["step"] for i in result.intervention["steps"]] == ["charge"]
    finished = [(e["status"], e.get("previous_status")) for e in events if e["type"] == "run_finished"]
    assert finished == [("failed", None), ("needs_intervention", "failed")]
    assert any("the run ended failed; waiting up to 15 s for 1 attempt(s)" in n and "charge (attempt 1)" in n
               for n in notices), notices


def test_following_stops_waiting_after_the_late_grace_and_says_the_charge_is_in_doubt(url: str, prefix: str) -> None:
    go = threading.Event()
    result, notices, _, took = _follow(url, prefix, LONE, go, release_after=None, late_grace=0.6)
    assert took < 15
    assert (result.status, result.intervention, result.exit_code) == ("failed", None, 4)
    [item] = result.in_doubt
    assert (item["step"], item["status"], item["worker"]) == ("charge", "in_flight", "refund")
    assert "after 0.6 s, the late_grace" in item["reason"]
    assert any("stopped waiting" in n and "charge" in n for n in notices), notices
    assert result.to_json()["in_doubt"] == result.in_doubt


def test_following_does_not_wait_for_a_step_without_a_compensation(url: str, prefix: str) -> None:
    go = threading.Event()
    result, notices, _, took = _follow(url, prefix, BARE, go, release_after=None, late_grace=15)
    assert took < 10  # not the grace: nothing to wait for
    assert (result.status, result.in_doubt, result.exit_code) == ("failed", [], 1)
    assert not any("waiting" in n for n in notices), notices


def test_following_does_not_wait_for_an_async_charge_that_answers_its_cancel(url: str, prefix: str) -> None:
    """Its cancel is answered at once: the lease kept for it goes with that answer, and nothing is waited for."""
    result, notices, _, took = _follow(url, prefix, LONE, threading.Event(), release_after=None, late_grace=15,
                                       sync=False)
    assert took < 10
    assert (result.status, result.in_doubt, result.exit_code) == ("failed", [], 1)
    assert not any("waiting" in n for n in notices), notices


def test_run_on_redis_reports_the_late_charge_as_the_local_backend_does(url: str, prefix: str,
                                                                        tmp_path: Path) -> None:
    """`flowdsl run --backend redis --late-grace`: the timed-out sync charge succeeds after the run failed — both
    backends report needs_intervention (exit 4) with the charge left to undo, not `failed`."""
    spec = tmp_path / "late.yaml"
    spec.write_text(HEADER.format(name="late") + "steps:\n  - sync.a: {compensate: undo.a, timeout: 300ms}\n")
    script = json.dumps({"a": {"sleep": 1.0}})
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    outs = {}
    try:
        procs.start(1)
        for backend in ("redis", "local"):
            extra = ["--redis-url", url, "--prefix", prefix] if backend == "redis" else ["--no-record"]
            ran = CliRunner().invoke(app, ["run", str(spec), "--backend", backend, *extra, "--set",
                                           f"script={script}", "--format", "json", "--late-grace", "20"])
            assert ran.exit_code == 4, (backend, ran.output)
            outs[backend] = json.loads(ran.stdout)
    finally:
        procs.stop_all()
    for out in outs.values():
        assert (out["status"], out["in_doubt"]) == ("needs_intervention", [])
        assert [i["step"] for i in out["intervention"]["steps"]] == ["a"]
    assert [e["type"] for e in outs["redis"]["events"]] == [e["type"] for e in outs["local"]["events"]]


def test_the_wait_after_the_end_is_bounded_by_the_grace_not_by_the_timeout_for_the_end(url: str, prefix: str) -> None:
    """``timeout_s`` bounds the wait for the run's end; the run ended well within it, so the wait after it is the
    grace's alone (it used to raise TimeoutError, "did not finish within -0 s", once timeout_s had passed)."""
    result, _, _, took = _follow(url, prefix, LONE, threading.Event(), release_after=None, late_grace=4.0,
                                 timeout_s=3.0)
    assert took < 10
    assert (result.status, [i["step"] for i in result.in_doubt], result.exit_code) == ("failed", ["charge"], 4)


#: charge, then a step that fails: the charge's refund (one attempt of 200 ms) times out, the run ends
#: needs_intervention with the charge left to refund by hand (kernel rules version 5: unless the refund then succeeds)
UNDONE = compile_text("""flowdsl: 1
name: undone
steps:
  - charge: {compensate: {worker: refund, timeout: 200ms, retry: 1}}
  - ship
""")


def _follow_refund(url: str, prefix: str, release_after: float | None, late_grace: float
                   ) -> tuple[Any, list[str], list[dict[str, Any]], list[str]]:
    """Submit UNDONE and follow it while a worker of this process serves; its sync refund returns ``release_after``
    seconds after the run's first end (never while followed, when None). The result, notices, events, refunds."""
    go = threading.Event()
    refunds: list[str] = []
    notices: list[str] = []
    events: list[dict[str, Any]] = []
    reg = WorkerRegistry()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {"charge_id": "ch1"}

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError("the carrier is down")

    def refund(data: Any, ctx: Any) -> dict[str, Any]:
        assert go.wait(20)
        refunds.append(ctx.idempotency_key)
        return {}

    for name, fn in [("charge", charge), ("ship", ship), ("refund", refund)]:
        reg.register(name, fn)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(UNDONE, {})

            def watch(event: dict[str, Any]) -> None:
                events.append(event)
                if event["type"] == "run_finished" and release_after is not None:
                    threading.Timer(release_after, go.set).start()

            async def body() -> Any:
                try:
                    return await client.follow(sub.run_id, on_event=watch, on_notice=notices.append,
                                               late_grace=late_grace)
                finally:
                    go.set()  # the worker's thread ends, so the worker can stop
            return await serving([worker_here(url, prefix, reg)], body)

    return asyncio.run(main()), notices, events, refunds


def test_following_waits_for_a_timed_out_refund_that_succeeds_after_the_run_ended(url: str, prefix: str) -> None:
    """The undo failed for good at its timeout, but its attempt went on and refunded: the run ends compensated (it
    said to refund by hand — a second refund), as the local runtime says."""
    result, notices, events, refunds = _follow_refund(url, prefix, release_after=1.0, late_grace=15)
    assert len(refunds) == 1
    assert (result.status, result.intervention, result.in_doubt, result.compensated) == (
        "compensated", None, [], ["charge"])
    finished = [(e["status"], e.get("previous_status")) for e in events if e["type"] == "run_finished"]
    assert finished == [("needs_intervention", None), ("compensated", "needs_intervention")]
    assert any("charge (undo attempt 1)" in n and "if an undo completed, its step is undone" in n
               for n in notices), notices


def test_following_stops_waiting_for_a_refund_after_the_late_grace_and_says_it_may_be_done(url: str,
                                                                                          prefix: str) -> None:
    result, notices, _, _ = _follow_refund(url, prefix, release_after=None, late_grace=0.6)
    assert (result.status, result.exit_code) == ("needs_intervention", 4)
    assert any("whether the undo of charge (refund) ran is unknown" in n for n in notices), notices
    assert not any("undo it by hand if it did" in n for n in notices), notices
    assert [i["step"] for i in result.intervention["steps"]] == ["charge"]
    [item] = result.in_doubt
    assert (item["step"], item["undo_in_doubt"]) == ("charge", True) and "may be undone already" in item["reason"]


#: reserve's attempt 1 times out (its sync thread runs on), attempt 2 succeeds, ship fails: the saga releases the
#: reservation, then cancels the flight — and attempt 1 may still reserve after that (kernel rules version 7)
REDONE = compile_text("""flowdsl: 1
name: redone
steps:
  - book_flight: {compensate: cancel_flight}
  - reserve:
      timeout: 200ms
      retry: {attempts: 2, initial: 10ms, on: [StepTimeout]}
      compensate: release
  - ship
""")


def _follow_reserve(url: str, prefix: str, release_after: float | None, late_grace: float, rules: int | None = None
                    ) -> tuple[Any, list[str], list[dict[str, Any]], list[str]]:
    """Submit REDONE and follow it while a worker of this process serves (starting runs under ``rules``); reserve's
    first (sync) attempt returns ``release_after`` seconds after the run's first end (never while followed, when
    None). The result, notices, events and the releases made."""
    go = threading.Event()
    releases: list[str] = []
    notices: list[str] = []
    events: list[dict[str, Any]] = []
    reg = WorkerRegistry()

    async def book_flight(data: Any, ctx: Any) -> dict[str, Any]:
        return {"flight_id": "F1"}

    async def cancel_flight(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    def reserve(data: Any, ctx: Any) -> dict[str, Any]:  # sync: a call that cannot be interrupted
        if ctx.attempt == 1:
            assert go.wait(20)
        return {"reservation": f"R{ctx.attempt}"}

    def release(data: Any, ctx: Any) -> dict[str, Any]:
        releases.append(ctx.idempotency_key)
        return {}

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError("the carrier is down")

    for name, fn in [("book_flight", book_flight), ("cancel_flight", cancel_flight), ("reserve", reserve),
                     ("release", release), ("ship", ship)]:
        reg.register(name, fn)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(REDONE, {})

            def watch(event: dict[str, Any]) -> None:
                events.append(event)
                if event["type"] == "run_finished" and release_after is not None:
                    threading.Timer(release_after, go.set).start()

            async def body() -> Any:
                try:
                    return await client.follow(sub.run_id, on_event=watch, on_notice=notices.append,
                                               late_grace=late_grace)
                finally:
                    go.set()  # the worker's thread ends, so the worker can stop
            return await serving([worker_here(url, prefix, reg, rules=rules)], body)

    return asyncio.run(main()), notices, events, releases


def test_following_waits_for_a_timed_out_attempt_that_succeeds_after_its_step_was_undone(url: str,
                                                                                        prefix: str) -> None:
    """The audit's case on Redis: the run ended compensated, then reserve's first attempt reserved — it said
    `compensated`, exit 1. Following now waits for that attempt, and the run turns needs_intervention, reserve listed
    to release again by hand, as the local runtime says."""
    result, notices, events, releases = _follow_reserve(url, prefix, release_after=1.0, late_grace=15)
    assert len(releases) == 1  # the run's own release, before the reservation stood again
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert result.compensated == ["reserve", "book_flight"]
    [item] = result.intervention["steps"]
    assert (item["step"], item["worker"], item["after_undo"], item["step_result"]) == (
        "reserve", "release", True, {"reservation": "R1"})
    assert "completed again after it was undone (attempt 1's result" in item["reason"]
    assert item["step_idempotency_key"] == f"{result.run_id}/reserve"
    finished = [(e["status"], e.get("previous_status")) for e in events if e["type"] == "run_finished"]
    assert finished == [("compensated", None), ("needs_intervention", "compensated")]
    assert any("the run ended compensated; waiting up to 15 s for 1 attempt(s)" in n and "reserve (attempt 1)" in n
               for n in notices), notices


def test_following_stops_waiting_for_it_after_the_late_grace_and_says_the_step_is_in_doubt(url: str,
                                                                                         prefix: str) -> None:
    result, notices, _, _ = _follow_reserve(url, prefix, release_after=None, late_grace=0.6)
    assert (result.status, result.intervention, result.exit_code) == ("compensated", None, 4)
    [item] = result.in_doubt
    assert (item["step"], item["status"], item["after_undo"]) == ("reserve", "in_flight", True)
    assert "may have completed the step again after the step was undone" in item["reason"]
    assert any("stopped waiting" in n and "reserve" in n for n in notices), notices


def test_run_on_redis_reports_a_step_completed_again_after_its_undo_as_the_local_backend_does(
        url: str, prefix: str, tmp_path: Path) -> None:
    """`flowdsl run` on both backends (worker processes on Redis): b's first attempt, a sync thread, sleeps past its
    timeout and succeeds after the retry's success was undone — needs_intervention, exit 4, b left to undo again."""
    spec = tmp_path / "redone.yaml"
    spec.write_text(HEADER.format(name="redone") + "steps:\n  - conf.a: {compensate: undo.a}\n"
                    "  - sync.b:\n      timeout: 200ms\n      retry: {attempts: 2, initial: 10ms, on: [StepTimeout]}\n"
                    "      compensate: undo.b\n  - conf.c\n")
    script = json.dumps({"b": [{"sleep": 1.0}, {}], "c": {"raise": "ValueError"}})
    procs = WorkerProcs(url, prefix, ["tests.runtime.workers"])
    outs = {}
    try:
        procs.start(1)
        for backend in ("redis", "local"):
            extra = ["--redis-url", url, "--prefix", prefix] if backend == "redis" else ["--no-record"]
            ran = CliRunner().invoke(app, ["run", str(spec), "--backend", backend, *extra, "--set",
                                           f"script={script}", "--format", "json", "--late-grace", "20"])
            assert ran.exit_code == 4, (backend, ran.output)
            outs[backend] = json.loads(ran.stdout)
    finally:
        procs.stop_all()
    for out in outs.values():
        assert (out["status"], out["in_doubt"], out["compensated"]) == ("needs_intervention", [], ["b", "a"])
        assert [(i["step"], i["after_undo"]) for i in out["intervention"]["steps"]] == [("b", True)]
    assert [e["type"] for e in outs["redis"]["events"]] == [e["type"] for e in outs["local"]["events"]]


def test_a_run_under_rules_6_is_not_waited_for_after_its_step_was_undone(url: str, prefix: str) -> None:
    """A worker told rules 6 (a rolling upgrade's first step) starts the run under them: a success of reserve's first
    attempt after the release changes nothing there, so following does not wait for it — as such a run always did."""
    t0 = time.monotonic()
    result, notices, _, _ = _follow_reserve(url, prefix, release_after=None, late_grace=15, rules=6)
    assert time.monotonic() - t0 < 10  # not the grace: nothing to wait for
    assert (result.state["kernel"], result.status, result.in_doubt, result.exit_code) == (6, "compensated", [], 1)
    assert not any("waiting" in n for n in notices), notices
