"""Late answers in the local runtime: a sync worker whose attempt timed out cannot be stopped, so the runtime goes on
waiting for its thread while the run is live and feeds the real answer to the kernel (docs/kernel.md, "Late
completions"); once the run is over, nothing is fed and nothing is left waiting.

Workers live in a private registry; every wait is bounded, so a hang fails its test instead of stopping the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from flowdsl import compile_text
from flowdsl.runtime.local import LocalRun
from flowdsl.workers import WorkerRegistry

#: seconds a run (or a wait inside a worker) may take before a test calls it hung
HUNG = 10.0

PLAN = compile_text("""flowdsl: 1
name: late
steps:
  - a: {compensate: undo_a}
  - charge: {compensate: refund, timeout: 100ms}
""")


def _registry(undo_a: Any, go: threading.Event, charged: threading.Event, refunds: list[str]) -> WorkerRegistry:
    reg = WorkerRegistry()

    async def a(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    def charge(data: Any, ctx: Any) -> dict[str, Any]:  # sync: a gateway call that cannot be interrupted
        assert go.wait(HUNG)
        charged.set()
        return {"charge_id": "ch1"}

    async def refund(data: Any, ctx: Any) -> dict[str, Any]:
        refunds.append(ctx.idempotency_key)
        return {}

    for name, fn in [("a", a), ("undo_a", undo_a), ("charge", charge), ("refund", refund)]:
        reg.register(name, fn)
    return reg


def test_a_sync_step_that_timed_out_then_succeeded_while_the_run_compensates_needs_intervention() -> None:
    """charge times out (its thread runs on); while a is being undone the thread returns: a late completion."""
    go, charged, refunds = threading.Event(), threading.Event(), []
    seen: list[dict[str, Any]] = []

    async def main() -> Any:
        late = asyncio.Event()

        async def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
            go.set()  # the charge's thread returns now, while the run still compensates
            with contextlib.suppress(TimeoutError):  # bounded: without the late answer, the run ends compensated
                await asyncio.wait_for(late.wait(), 2.0)
            return {}

        def watch(event: dict[str, Any]) -> None:
            seen.append(event)
            if event["type"] == "late_completion":
                late.set()

        run = LocalRun(PLAN, {}, registry=_registry(undo_a, go, charged, refunds), import_workers=False,
                       record=False, on_event=watch)
        return await asyncio.wait_for(run.run(), HUNG)

    result = asyncio.run(main())
    assert charged.is_set()
    assert result.status == "needs_intervention", result.status
    assert [item["step"] for item in result.intervention["steps"]] == ["charge"]
    assert result.intervention["steps"][0]["step_result"] == {"charge_id": "ch1"}
    types = [e["type"] for e in seen]
    assert "step_timed_out" in types and "late_completion" in types
    assert types.index("result_rejected") == types.index("late_completion") - 1
    assert refunds == []  # the kernel leaves the late charge to a person: it is listed, not undone


def test_a_sync_step_whose_thread_returns_after_its_run_ended_changes_nothing(capsys: Any) -> None:
    """charge times out, a is undone and the run ends compensated; only then does the thread return: not fed,
    no error, and no task is left waiting for the thread."""
    go, charged, refunds = threading.Event(), threading.Event(), []
    problems: list[dict[str, Any]] = []

    async def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.05)  # the charge's attempt, cancelled while the run is live, goes on waiting
        return {}

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
        run = LocalRun(PLAN, {}, registry=_registry(undo_a, go, charged, refunds), import_workers=False,
                       record=False)
        result = await asyncio.wait_for(run.run(), HUNG)
        events = list(run.events)
        await asyncio.sleep(0.05)
        lingering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        go.set()  # the thread returns after the run ended
        assert await asyncio.to_thread(charged.wait, HUNG)
        await asyncio.sleep(0.2)  # time for its answer to come back, were it fed
        return result, events, run, lingering

    result, events, run, lingering = asyncio.run(main())
    assert (result.status, result.compensated, result.intervention) == ("compensated", ["a"], None)
    assert result.steps["charge"]["status"] == "failed"
    assert run.events == events and run.status == "compensated"  # nothing was fed after the end
    assert lingering == [] and problems == [] and refunds == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "exception" not in err.lower()


def test_the_wait_for_a_timed_out_thread_is_the_runtimes_not_the_workers_own() -> None:
    """The runtime keeps waiting for its own timed-out sync attempts; a sync worker that itself runs a worker
    through ``execute`` under a timeout of its own gets that timeout — the runtime's waiting does not leak into
    the worker's thread."""
    import time

    from flowdsl.runtime.execute import execute

    reg = WorkerRegistry()

    def inner(data: Any, ctx: Any) -> dict[str, Any]:
        time.sleep(0.8)
        return {}

    def outer(data: Any, ctx: Any) -> dict[str, Any]:
        command = {"op": "dispatch", "run_id": "x", "task_id": "x/s#1", "kind": "task", "step": "s", "node": "s",
                   "worker": "inner", "input": {}, "attempt": 1, "idempotency_key": "x/s", "timeout_ms": None,
                   "llm": None}
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            asyncio.run(asyncio.wait_for(execute(command, registry=reg), 0.1))
        return {"waited": time.monotonic() - t0}

    reg.register("inner", inner)
    reg.register("outer", outer)
    plan = compile_text("flowdsl: 1\nname: nested\nsteps:\n  - o: {worker: outer}\n")
    result = asyncio.run(asyncio.wait_for(LocalRun(plan, {}, registry=reg, record=False,
                                                   import_workers=False).run(), HUNG))
    assert result.status == "completed" and result.context["waited"] < 0.6, result.context
