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
