"""Late answers in the local runtime: a sync worker whose attempt timed out cannot be stopped, so the runtime goes on
waiting for its thread while the run is live and feeds the real answer to the kernel (docs/kernel.md, "Late
completions"); once the run is over, nothing is fed and nothing is left waiting. When the run ends while such a
thread of a compensable step still runs, its end is held for it (``late_grace``): a success turns the run
needs_intervention, and a thread that outlives the wait leaves its step in doubt.

Workers live in a private registry; every wait is bounded, so a hang fails its test instead of stopping the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.local import LATE_GRACE, LocalRun, run_flow
from flowdsl.runtime.record import read_record
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


def test_a_sync_step_that_timed_out_then_succeeded_while_a_sibling_is_awaited_is_undone_first() -> None:
    """charge times out beside slow, which holds on to its cancel; charge's thread returns while the run is still
    aborting (nothing undone yet): charge is undone with the rest, before a — not left to a person, with a undone
    beneath it."""
    plan = compile_text("""flowdsl: 1
name: late_sibling
steps:
  - a: {compensate: undo_a}
  - parallel: g
    branches:
      - charge: {compensate: refund, timeout: 100ms}
      - slow
""")
    go, charged, refunds = threading.Event(), threading.Event(), []
    seen: list[dict[str, Any]] = []

    async def main() -> Any:
        late = asyncio.Event()

        async def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
            refunds.append(ctx.idempotency_key)
            return {}

        async def slow(data: Any, ctx: Any) -> dict[str, Any]:
            try:
                await asyncio.sleep(HUNG)
            except asyncio.CancelledError:
                go.set()  # the charge's thread returns now, while slow has not answered its cancel
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(late.wait(), 2.0)
                raise
            return {}

        def watch(event: dict[str, Any]) -> None:
            seen.append(event)
            if event["type"] == "late_completion":
                late.set()

        registry = _registry(undo_a, go, charged, refunds)
        registry.register("slow", slow)
        run = LocalRun(plan, {}, registry=registry, import_workers=False, record=False, on_event=watch)
        return await asyncio.wait_for(run.run(), HUNG)

    result = asyncio.run(main())
    assert charged.is_set()
    [late] = [e for e in seen if e["type"] == "late_completion"]
    assert late["run_status"] == "aborting" and late["by_hand"] is False
    assert result.status == "compensated" and result.intervention is None, (result.status, result.intervention)
    assert result.compensated == ["charge", "a"]
    assert refunds == [f"{result.run_id}/charge/compensate", f"{result.run_id}/a/compensate"]


def test_another_attempt_of_a_step_whose_late_success_was_undone_is_waited_for() -> None:
    """charge's attempt 1 times out and succeeds while attempt 2 runs; attempt 2 times out too: the step fails, its
    kept success joins the saga and is undone. Attempt 2's thread still runs at the end: under rules 7 its success
    would charge again after the refund (it was not waited for: "the same effect, already undone"), so the run's
    end waits for it, and it is in doubt when the wait ends first."""
    plan = compile_text("""flowdsl: 1
name: late_retry
steps:
  - a: {compensate: undo_a}
  - charge: {compensate: refund, timeout: 100ms, retry: {attempts: 2, initial: 10ms}}
""")
    release, refunds, notices = threading.Event(), [], []

    async def main() -> Any:
        reg = WorkerRegistry()

        async def a(data: Any, ctx: Any) -> dict[str, Any]:
            return {}

        async def undo(data: Any, ctx: Any) -> dict[str, Any]:
            refunds.append(ctx.idempotency_key)
            return {}

        def charge(data: Any, ctx: Any) -> dict[str, Any]:
            if ctx.attempt == 1:
                threading.Event().wait(0.15)  # past its timeout, while attempt 2 runs
            else:
                assert release.wait(HUNG)  # still running when the run ends
            return {"charge_id": "ch1"}

        for name, fn in [("a", a), ("undo_a", undo), ("charge", charge), ("refund", undo)]:
            reg.register(name, fn)
        run = LocalRun(plan, {}, registry=reg, import_workers=False, record=False, late_grace=0.3,
                       on_notice=notices.append)
        return await asyncio.wait_for(run.run(), HUNG / 2)

    try:
        result = asyncio.run(main())
    finally:
        release.set()
    assert result.status == "compensated" and result.compensated == ["charge", "a"], result.status
    assert [(i["step"], i["after_undo"], i["task_ids"]) for i in result.in_doubt] == [
        ("charge", True, [f"{result.run_id}/charge#2"])]
    assert result.exit_code == 4
    assert any("waiting up to 0.3 s for 1 attempt(s)" in n and "charge (attempt 2 timed out)" in n
               for n in notices), notices
    assert refunds == [f"{result.run_id}/charge/compensate", f"{result.run_id}/a/compensate"]


def test_a_sync_step_whose_thread_returns_after_the_wait_changes_nothing_but_is_in_doubt(capsys: Any) -> None:
    """charge times out, a is undone and the run ends compensated; with ``late_grace=0`` the runtime does not wait
    for the charge's thread: the run returns at once with charge in doubt. The thread returns only then: not fed,
    no error, and no task is left waiting for the thread."""
    go, charged, refunds = threading.Event(), threading.Event(), []
    problems: list[dict[str, Any]] = []

    async def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.05)  # the charge's attempt, cancelled while the run is live, goes on waiting
        return {}

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
        run = LocalRun(PLAN, {}, registry=_registry(undo_a, go, charged, refunds), import_workers=False,
                       record=False, late_grace=0)
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
    assert [(i["step"], i["status"], i["task_ids"]) for i in result.in_doubt] == [
        ("charge", "in_flight", [f"{run.run_id}/charge#1"])]
    assert "late_grace is 0" in result.in_doubt[0]["reason"] and result.exit_code == 4
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


# --- the run's end held for a timed-out sync attempt of a compensable step (late_grace) ---------------------------

#: one compensable step whose timeout fails the run with nothing else to undo: the run ends failed at once
LONE = compile_text("""flowdsl: 1
name: lone
steps:
  - charge: {compensate: refund, timeout: 100ms}
""")
#: the same step without a compensation: its late success would change nothing
BARE = compile_text("""flowdsl: 1
name: bare
steps:
  - charge: {timeout: 100ms}
""")


def _charging(go: threading.Event, returned: threading.Event, *, fail: bool = False) -> WorkerRegistry:
    """A sync charge that blocks until ``go``, then succeeds (or fails), setting ``returned`` as its thread ends."""
    reg = WorkerRegistry()

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        try:
            assert go.wait(HUNG)
            if fail:
                raise ConnectionError("the gateway refused the charge")
            return {"charge_id": "ch1"}
        finally:
            returned.set()

    async def refund(data: Any, ctx: Any) -> dict[str, Any]:
        raise AssertionError("a late charge is left to a person, never refunded by the run")

    reg.register("charge", charge)
    reg.register("refund", refund)
    return reg


def _release_on_end(go: threading.Event) -> Callable[[dict[str, Any]], None]:
    """An on_event hook letting the charge's thread return once the run has ended (its first run_finished)."""
    def watch(event: dict[str, Any]) -> None:
        if event["type"] == "run_finished":
            go.set()
    return watch


def _show_json(path: Path) -> dict[str, Any]:
    from typer.testing import CliRunner

    from flowdsl.cli import app

    shown = CliRunner().invoke(app, ["show", str(path), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    return dict(json.loads(shown.stdout))


def test_a_timed_out_sync_charge_that_succeeds_after_the_run_failed_makes_it_needs_intervention(
        tmp_path: Path) -> None:
    """The charge's timeout fails the run, nothing else to undo: the run ends failed. Its thread succeeds only
    after that: the runtime held the run's end for it and fed the success, a late completion — the run turns
    needs_intervention listing the charge, and its record replays through `flowdsl show`."""
    go, returned = threading.Event(), threading.Event()
    notices: list[str] = []
    result = asyncio.run(asyncio.wait_for(run_flow(
        LONE, {}, run_id="held1", runs_dir=tmp_path, registry=_charging(go, returned), import_workers=False,
        on_event=_release_on_end(go), on_notice=notices.append, late_grace=HUNG), HUNG))
    assert returned.is_set()
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    left = result.intervention["steps"]
    assert [(i["step"], i["worker"], i["step_result"]) for i in left] == [("charge", "refund", {"charge_id": "ch1"})]
    finished = [(e["status"], e.get("previous_status")) for e in result.events if e["type"] == "run_finished"]
    assert finished == [("failed", None), ("needs_intervention", "failed")]
    types = [e["type"] for e in result.events]
    assert types[types.index("run_finished"):] == ["run_finished", "result_rejected", "late_completion",
                                                   "run_finished"]
    assert any("waiting up to 10 s for 1 attempt(s)" in n and "charge (attempt 1 timed out)" in n for n in notices)
    # the record: the wait, the late answer fed as an input event, the wait's end
    path = tmp_path / "held1.jsonl"
    _, lines = read_record(path)
    kinds = [e["type"] for e in lines]
    assert kinds.index("run_finished") < kinds.index("runtime_waiting") < kinds.index("task_succeeded") \
        < kinds.index("runtime_waited")
    waited = lines[-1]
    assert (waited["type"], waited["reason"], waited["unanswered"]) == (
        "runtime_waited", "every attempt waited for answered", [])
    shown = _show_json(path)  # replayed through the kernel, every line explained
    assert (shown["status"], shown["in_doubt"], shown["intervention"]) == ("needs_intervention", [],
                                                                           result.intervention)


def test_the_summary_of_a_late_charge_left_by_hand_says_how_a_timeout_makes_one(tmp_path: Path) -> None:
    """A step left to undo by hand because its attempt outlasted its timeout gets a hint: that is what made it."""
    import io

    from rich.console import Console

    from flowdsl.runtime.summary import print_summary

    go, returned = threading.Event(), threading.Event()
    result = asyncio.run(asyncio.wait_for(run_flow(
        LONE, {}, run_id="held-hint", runs_dir=tmp_path, registry=_charging(go, returned), import_workers=False,
        on_event=_release_on_end(go), late_grace=HUNG), HUNG))
    assert result.status == "needs_intervention"
    assert "an attempt that had timed out" in result.intervention["steps"][0]["reason"]
    out = io.StringIO()
    print_summary(result, Console(file=out, width=300, highlight=False))
    said = out.getvalue()
    assert "left to undo by hand" in said
    assert "hint: charge completed after its `timeout`: a worker that outlasts it still makes its effect; give the " \
        "step a timeout longer than its worker takes, or make the worker stop within it" in said, said


def test_a_timed_out_sync_charge_that_fails_after_the_run_failed_leaves_it_failed_and_ends_the_wait(
        tmp_path: Path) -> None:
    """The late answer is a failure: rejected, the run stays failed, and the wait ends with that answer — not at
    its bound (10 s here, which would fail the test by HUNG)."""
    go, returned = threading.Event(), threading.Event()
    result = asyncio.run(asyncio.wait_for(run_flow(
        LONE, {}, run_id="held2", runs_dir=tmp_path, registry=_charging(go, returned, fail=True),
        import_workers=False, on_event=_release_on_end(go), late_grace=HUNG), HUNG))
    assert (result.status, result.intervention, result.in_doubt, result.exit_code) == ("failed", None, [], 1)
    types = [e["type"] for e in result.events]
    assert types[types.index("run_finished"):] == ["run_finished", "result_rejected"]
    _, lines = read_record(tmp_path / "held2.jsonl")
    kinds = [e["type"] for e in lines]
    assert kinds.index("runtime_waiting") < kinds.index("task_failed") < kinds.index("runtime_waited")
    assert lines[-1]["reason"] == "every attempt waited for answered"  # it answered: the bound did not pass
    assert _show_json(tmp_path / "held2.jsonl")["status"] == "failed"


def test_a_timed_out_sync_charge_that_outlives_the_wait_is_in_doubt(tmp_path: Path) -> None:
    """The bound passes with the charge's thread still running: the run keeps the kernel's status (failed), but
    does not say nothing is left to undo — the charge is in doubt (result, JSON, summary, exit code 4, the record
    and `flowdsl show`); its later answer is not fed."""
    import io

    from rich.console import Console

    from flowdsl.runtime.rebuild import result_from_record
    from flowdsl.runtime.summary import print_summary
    from flowdsl.runtime.timeline import record_end_note

    go, returned = threading.Event(), threading.Event()

    async def main() -> Any:
        run = LocalRun(LONE, {}, run_id="held3", runs_dir=tmp_path, registry=_charging(go, returned),
                       import_workers=False, late_grace=0.2)
        result = await asyncio.wait_for(run.run(), HUNG)
        assert not returned.is_set()  # the thread still runs
        kept = (list(run.events), (tmp_path / "held3.jsonl").read_bytes())
        go.set()
        assert await asyncio.to_thread(returned.wait, HUNG)
        await asyncio.sleep(0.1)  # time for its answer to come back, were it fed
        assert (list(run.events), (tmp_path / "held3.jsonl").read_bytes()) == kept
        return result

    result = asyncio.run(main())
    assert (result.status, result.intervention, result.exit_code) == ("failed", None, 4)
    [item] = result.in_doubt
    assert (item["step"], item["status"], item["worker"], item["idempotency_key"], item["task_ids"]) == (
        "charge", "in_flight", "refund", "held3/charge/compensate", ["held3/charge#1"])
    assert "attempt 1 of the step (it timed out)" in item["reason"] and "after 0.2 s" in item["reason"]
    assert result.to_json()["in_doubt"] == result.in_doubt
    out = io.StringIO()
    print_summary(result, Console(file=out, width=300, highlight=False))
    text = out.getvalue()
    assert "outcome unknown" in text and "charge: refund was not run" in text and "nothing needed undoing" not in text
    path = tmp_path / "held3.jsonl"
    _, lines = read_record(path)
    assert [e["type"] for e in lines[-2:]] == ["runtime_waiting", "runtime_waited"]
    assert lines[-1]["unanswered"] == [{"task_id": "held3/charge#1", "step": "charge", "attempt": 1}]
    assert _show_json(path)["in_doubt"] == result.in_doubt
    # a record that ends during the wait (its process was killed): the attempt is in doubt, and the note says why
    header, cut = read_record(path)
    cut = cut[:-1]
    shown = result_from_record(header, cut, path)
    assert [i["step"] for i in shown.in_doubt] == ["charge"] and "its process stopped" in shown.in_doubt[0]["reason"]
    assert "the record ends while the runtime waited" in (record_end_note(shown, cut) or "")


def test_a_timed_out_sync_step_without_a_compensation_is_not_waited_for(tmp_path: Path) -> None:
    """Its late success would change nothing: the run returns with the thread still running, writes no wait, and
    has nothing in doubt."""
    go, returned = threading.Event(), threading.Event()
    reg = WorkerRegistry()

    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        try:
            assert go.wait(HUNG)
            return {}
        finally:
            returned.set()

    reg.register("charge", charge)
    try:
        result = asyncio.run(asyncio.wait_for(run_flow(
            BARE, {}, run_id="bare1", runs_dir=tmp_path, registry=reg, import_workers=False, late_grace=HUNG), HUNG))
        assert not returned.is_set()  # it returned before the thread did: it did not wait for it
    finally:
        go.set()
    assert (result.status, result.in_doubt, result.exit_code) == ("failed", [], 1)
    _, lines = read_record(tmp_path / "bare1.jsonl")
    assert lines[-1]["type"] == "run_finished" and not any(e["type"].startswith("runtime_") for e in lines)


def test_cancel_during_the_wait_stops_waiting_and_leaves_the_step_in_doubt() -> None:
    go, returned = threading.Event(), threading.Event()

    async def main() -> Any:
        run: LocalRun

        def notice(text: str) -> None:
            if text.startswith("the run ended failed; waiting up to"):
                asyncio.get_running_loop().call_soon(run.cancel, "enough")

        run = LocalRun(LONE, {}, registry=_charging(go, returned), import_workers=False, record=False,
                       on_notice=notice, late_grace=HUNG)
        return await asyncio.wait_for(run.run(), HUNG)

    try:
        result = asyncio.run(main())
        assert not returned.is_set()
    finally:
        go.set()
    assert result.status == "failed" and [i["step"] for i in result.in_doubt] == ["charge"]
    assert "(cancelled: enough)" in result.in_doubt[0]["reason"]


def _flowdsl_run_waiting(tmp_path: Path, signals: list[signal.Signals], *args: str,
                         env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`flowdsl run --format json` of one compensable sync step that hangs past its timeout, in a process of its
    own: once the run waits for the step's thread (its record has ``runtime_waiting``), send ``signals`` (50 ms
    apart) and return its exit code, stdout and stderr."""
    import subprocess
    import sys
    import time

    from tests.runtime.conformance import HEADER

    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "wait.yaml"
    spec.write_text(HEADER.format(name="wait") + "steps:\n  - sync.b: {compensate: undo.b, timeout: 100ms}\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(spec), "--format", "json",
         "--set", 'script={"b": {"hang": true}}', "--runs-dir", str(tmp_path), "--run-id", "w1", *args],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    record = tmp_path / "w1.jsonl"
    deadline = time.monotonic() + 30
    try:
        while '"runtime_waiting"' not in (record.read_text() if record.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not begin its wait"
            time.sleep(0.02)
        for n, sig in enumerate(signals):
            if n:
                time.sleep(0.05)
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # (ours, by its PID)
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.parametrize(("sig", "label"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_stop_signal_during_the_wait_stops_waiting_in_flowdsl_run(tmp_path: Path, sig: signal.Signals,
                                                                      label: str) -> None:
    """`flowdsl run` (late_grace from $FLOWDSL_LATE_GRACE): the run ended failed and waits for the charge's thread;
    the first stop signal ends the wait: exit 4, the charge in doubt, said on stderr."""
    code, out, err = _flowdsl_run_waiting(tmp_path, [sig], env={"FLOWDSL_LATE_GRACE": "60"})
    assert code == 4, err
    result = json.loads(out)
    assert result["status"] == "failed" and [i["step"] for i in result["in_doubt"]] == ["b"]
    assert f"({label} stopped the wait)" in result["in_doubt"][0]["reason"]
    assert "no longer waiting for the attempts the run gave up on" in err and "Traceback" not in err


def test_late_grace_is_checked() -> None:
    reg = WorkerRegistry()
    reg.register("charge", lambda data, ctx: {})
    reg.register("refund", lambda data, ctx: {})
    for bad, error in [(-1, ValueError), (float("nan"), ValueError), ("5", TypeError), (True, TypeError)]:
        with pytest.raises(error, match="late_grace"):
            LocalRun(LONE, {}, registry=reg, import_workers=False, record=False, late_grace=bad)
    assert LocalRun(LONE, {}, registry=reg, import_workers=False, record=False).late_grace == LATE_GRACE
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWDSL_LATE_GRACE", "2.5")
        assert LocalRun(LONE, {}, registry=reg, import_workers=False, record=False).late_grace == 2.5
        mp.setenv("FLOWDSL_LATE_GRACE", "soon")
        with pytest.raises(ValueError, match=r"\$FLOWDSL_LATE_GRACE"):
            LocalRun(LONE, {}, registry=reg, import_workers=False, record=False)


def test_flowdsl_run_takes_late_grace_as_an_option(tmp_path: Path) -> None:
    """`--late-grace SECONDS` (over $FLOWDSL_LATE_GRACE): the charge's thread outlives it → exit 4, in doubt;
    a value out of range is a usage error."""
    import subprocess
    import sys

    from tests.runtime.conformance import HEADER

    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "grace.yaml"
    spec.write_text(HEADER.format(name="grace") + "steps:\n  - sync.b: {compensate: undo.b, timeout: 100ms}\n")
    env = {**os.environ, "PYTHONPATH": str(root), "FLOWDSL_LATE_GRACE": "600"}

    def flowdsl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from flowdsl.cli import main; main()", "run", str(spec),
                               "--no-record", "--set", 'script={"b": {"hang": true}}', *args],
                              cwd=root, env=env, capture_output=True, text=True, timeout=60)

    done = flowdsl("--late-grace", "0.3", "--format", "json")
    assert done.returncode == 4, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "failed" and [i["step"] for i in result["in_doubt"]] == ["b"]
    assert "after 0.3 s, the late_grace" in result["in_doubt"][0]["reason"]
    refused = flowdsl("--late-grace", "-1")
    assert refused.returncode == 2 and "Invalid value for '--late-grace'" in refused.stderr


# --- after review: a run stopped at once, SIGHUP during the wait, attempts never called, malformed records ----------


def test_a_run_stopped_at_once_lists_a_timed_out_sync_charge_still_running_in_doubt(tmp_path: Path) -> None:
    """abort() (a second Ctrl-C) while the run undoes ``a`` and the charge's thread, timed out, still runs: nothing
    will hear that thread, so the charge is in doubt — in RunAborted's result, the runtime_aborted line and
    `flowdsl show` — besides ``a`` left to undo."""
    from flowdsl.runtime.local import RunAborted

    go, returned = threading.Event(), threading.Event()
    reg = _charging(go, returned)
    undoing = asyncio.Event()

    async def a(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    async def undo_a(data: Any, ctx: Any) -> dict[str, Any]:
        undoing.set()
        await asyncio.sleep(HUNG)
        return {}

    reg.register("a", a)
    reg.register("undo_a", undo_a)

    async def main() -> Any:
        run = LocalRun(PLAN, {}, run_id="stop1", runs_dir=tmp_path, registry=reg, import_workers=False,
                       late_grace=HUNG)
        task = asyncio.ensure_future(run.run())
        await asyncio.wait_for(undoing.wait(), HUNG)
        run.abort("a second Ctrl-C")
        with pytest.raises(RunAborted) as caught:
            await asyncio.wait_for(task, HUNG)
        return caught.value.result

    try:
        result = asyncio.run(main())
    finally:
        go.set()
    assert [(i["step"], i["status"]) for i in result.intervention["steps"]] == [("a", "in_flight")]
    (item,) = result.in_doubt
    assert (item["step"], item["worker"], item["task_ids"]) == ("charge", "refund", ["stop1/charge#1"])
    assert "when the run was stopped at once (a second Ctrl-C)" in item["reason"]
    _, lines = read_record(tmp_path / "stop1.jsonl")
    assert lines[-1]["type"] == "runtime_aborted"
    assert lines[-1]["unanswered"] == [{"task_id": "stop1/charge#1", "step": "charge", "attempt": 1}]
    assert _show_json(tmp_path / "stop1.jsonl")["in_doubt"] == result.in_doubt


def test_an_attempt_still_queued_for_a_thread_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread for sync workers, two runs: run 1's charge times out still queued behind run 2's — its worker is
    never called, so run 1 ends failed at once, nothing announced, nothing in doubt; run 2's charge, called, is."""
    import flowdsl.runtime.execute as execute

    monkeypatch.setattr(execute, "_threads", execute._DaemonThreads(limit=1))  # a pool of its own: one thread
    go, returned = threading.Event(), threading.Event()
    notices: dict[str, list[str]] = {"q0": [], "q1": []}

    async def main() -> list[Any]:
        runs = [LocalRun(LONE, {}, run_id=rid, record=False, registry=_charging(go, returned), import_workers=False,
                         late_grace=0.3, on_notice=notices[rid].append) for rid in ("q0", "q1")]
        return list(await asyncio.wait_for(asyncio.gather(*(r.run() for r in runs)), HUNG))

    try:
        first, second = asyncio.run(main())
    finally:
        go.set()
    assert (first.status, first.exit_code, [i["step"] for i in first.in_doubt]) == ("failed", 4, ["charge"])
    assert (second.status, second.exit_code, second.in_doubt) == ("failed", 1, [])
    assert notices["q1"] == [] and any("waiting up to 0.3 s" in n for n in notices["q0"])


@pytest.mark.parametrize(("edit", "said"), [
    (lambda lines: lines[-1].update(unanswered=5), "its 'unanswered' is not a list of the attempts"),
    (lambda lines: lines.insert(2, lines.pop(next(i for i, e in enumerate(lines) if e["type"] == "runtime_waiting"))),
     "a 'runtime_waiting' line comes once, after the run's end"),
    (lambda lines: lines.pop(next(i for i, e in enumerate(lines) if e["type"] == "runtime_waiting")),
     "a 'runtime_waited' line follows a 'runtime_waiting' one"),
])
def test_show_refuses_a_runtime_line_out_of_shape_or_place_naming_it(tmp_path: Path, edit: Any, said: str) -> None:
    from typer.testing import CliRunner

    from flowdsl.cli import app

    go, returned = threading.Event(), threading.Event()
    try:
        asyncio.run(asyncio.wait_for(run_flow(LONE, {}, run_id="bad", runs_dir=tmp_path, late_grace=0.1,
                                              registry=_charging(go, returned), import_workers=False), HUNG))
    finally:
        go.set()
    path = tmp_path / "bad.jsonl"
    header, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    edit(lines)
    path.write_text("".join(json.dumps(e) + "\n" for e in [header, *lines]))
    for fmt in ("text", "json"):
        shown = CliRunner().invoke(app, ["show", str(path), "--format", fmt])
        assert shown.exit_code == 2 and said in shown.output and f"{path}:" in shown.output, shown.output
        assert "Traceback" not in shown.output


def test_a_hangup_during_the_wait_does_not_stop_it(tmp_path: Path) -> None:
    """Two SIGHUPs (a closing terminal) while `flowdsl run` waits for the charge's thread: it says it waits on,
    and ends at the bound — exit 4, the charge in doubt — instead of dying of the second hangup."""
    code, out, err = _flowdsl_run_waiting(tmp_path, [signal.SIGHUP, signal.SIGHUP], "--late-grace", "2")
    assert code == 4, err
    (item,) = json.loads(out)["in_doubt"]
    assert "(after 2 s, the late_grace)" in item["reason"]
    assert err.count("still waiting for the attempts the run gave up on") == 2


# --- the run's end held for a timed-out async attempt that ignores its cancel -------------------------------------


def _stubborn(go: asyncio.Event | None, answered: list[str], *, ignores: bool = True) -> WorkerRegistry:
    """An async charge that outlives its timeout: it swallows its cancel (``ignores``) and succeeds once ``go`` is
    set (at once when None); or, when it does not ignore it, the well-behaved kind, it answers the cancel."""
    reg = WorkerRegistry()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        try:
            await asyncio.sleep(HUNG)
        except asyncio.CancelledError:
            if not ignores:
                answered.append("cancelled")
                raise
        if go is not None:
            await asyncio.wait_for(go.wait(), HUNG)
        answered.append("charged")
        return {"charge_id": "ch1"}

    async def refund(data: Any, ctx: Any) -> dict[str, Any]:
        raise AssertionError("a late charge is left to a person, never refunded by the run")

    reg.register("charge", charge)
    reg.register("refund", refund)
    return reg


def test_a_timed_out_async_charge_that_ignores_its_cancel_and_succeeds_late_makes_the_run_needs_intervention(
        tmp_path: Path) -> None:
    """As for a sync thread: the run's end is held for the attempt, and its late success is fed — the run turns
    needs_intervention, as the Redis runtime makes it (a late answer is never dropped)."""
    answered: list[str] = []
    notices: list[str] = []

    async def main() -> Any:
        go = asyncio.Event()

        def watch(event: dict[str, Any]) -> None:
            if event["type"] == "run_finished":
                asyncio.get_running_loop().call_later(0.3, go.set)  # past the quiet settle: the wait is said
        return await asyncio.wait_for(run_flow(
            LONE, {}, run_id="async1", runs_dir=tmp_path, registry=_stubborn(go, answered), import_workers=False,
            on_event=watch, on_notice=notices.append, late_grace=HUNG), HUNG)

    result = asyncio.run(main())
    assert answered == ["charged"]
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert [i["step"] for i in result.intervention["steps"]] == ["charge"]
    assert any("waiting up to 10 s for 1 attempt(s)" in n and "ignores its cancel" in n for n in notices), notices
    path = tmp_path / "async1.jsonl"
    _, lines = read_record(path)
    kinds = [e["type"] for e in lines]
    assert kinds.index("run_finished") < kinds.index("runtime_waiting") < kinds.index("task_succeeded") \
        < kinds.index("runtime_waited")
    shown = _show_json(path)
    assert (shown["status"], shown["intervention"]) == ("needs_intervention", result.intervention)


def test_a_timed_out_async_charge_that_ignores_its_cancel_past_the_wait_is_in_doubt(tmp_path: Path) -> None:
    answered: list[str] = []

    async def main() -> Any:
        go = asyncio.Event()
        try:
            return await asyncio.wait_for(run_flow(
                LONE, {}, run_id="async2", runs_dir=tmp_path, registry=_stubborn(go, answered),
                import_workers=False, late_grace=0.3), HUNG)
        finally:
            go.set()

    result = asyncio.run(main())
    assert (result.status, result.exit_code) == ("failed", 4)
    [item] = result.in_doubt
    assert item["step"] == "charge" and "after 0.3 s" in item["reason"]
    assert _show_json(tmp_path / "async2.jsonl")["in_doubt"] == result.in_doubt


def test_a_timed_out_async_charge_that_answers_its_cancel_ends_the_run_quietly(tmp_path: Path) -> None:
    """The common case: the cancel lands at once and is answered — no wait is said or recorded, nothing in doubt."""
    answered: list[str] = []
    notices: list[str] = []
    result = asyncio.run(asyncio.wait_for(run_flow(
        LONE, {}, run_id="async3", runs_dir=tmp_path, registry=_stubborn(None, answered, ignores=False),
        import_workers=False, on_notice=notices.append, late_grace=HUNG), HUNG))
    assert answered == ["cancelled"]
    assert (result.status, result.in_doubt, result.exit_code) == ("failed", [], 1)
    assert not any("waiting" in n for n in notices), notices
    _, lines = read_record(tmp_path / "async3.jsonl")
    assert not any(e["type"].startswith("runtime_") for e in lines)
    # its cancel's answer is fed as every answer is, and rejected, as on Redis
    assert [e["type"] for e in lines[-3:]] == ["run_finished", "task_cancelled", "result_rejected"]


def test_an_async_charge_that_ignores_its_cancel_and_answers_at_once_is_fed_without_a_said_wait(
        tmp_path: Path) -> None:
    """Its late success comes within the quiet settle: fed (needs_intervention), with no wait to say."""
    answered: list[str] = []
    notices: list[str] = []
    result = asyncio.run(asyncio.wait_for(run_flow(
        LONE, {}, run_id="async4", runs_dir=tmp_path, registry=_stubborn(None, answered), import_workers=False,
        on_notice=notices.append, late_grace=HUNG), HUNG))
    assert answered == ["charged"]
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert not any("waiting" in n for n in notices), notices
    path = tmp_path / "async4.jsonl"
    _, lines = read_record(path)
    assert not any(e["type"].startswith("runtime_") for e in lines)
    assert _show_json(path)["status"] == "needs_intervention"


# --- the run's end held for a timed-out sync undo attempt (kernel rules version 5) ---------------------------------

#: charge, then a step that fails: the charge's refund (one attempt of 100 ms) times out, the run ends
#: needs_intervention with the charge left to refund by hand
UNDONE = compile_text("""flowdsl: 1
name: undone
steps:
  - charge: {compensate: {worker: refund, timeout: 100ms, retry: 1}}
  - ship
""")


def _refunding(go: threading.Event, returned: threading.Event, refunds: list[str]) -> WorkerRegistry:
    """charge succeeds, ship fails, and a sync refund blocks until ``go``, then succeeds (``returned`` set as its
    thread ends)."""
    reg = WorkerRegistry()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {"charge_id": "ch1"}

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError("the carrier is down")

    def refund(data: Any, ctx: Any) -> dict[str, Any]:  # sync: a gateway call that cannot be interrupted
        try:
            assert go.wait(HUNG)
            refunds.append(ctx.idempotency_key)
            return {}
        finally:
            returned.set()

    for name, fn in [("charge", charge), ("ship", ship), ("refund", refund)]:
        reg.register(name, fn)
    return reg


def test_a_timed_out_sync_refund_that_succeeds_after_the_run_ended_takes_the_charge_off_the_list(
        tmp_path: Path) -> None:
    """The refund's timeout fails the undo for good: the run ends needs_intervention, telling a person to refund the
    charge. Its thread refunds only after that: the runtime held the run's end for it (it used to end the process,
    the thread cut mid-call, and a person then refunded a second time) and fed the success — the charge is undone,
    the run compensated, and its record replays through `flowdsl show`."""
    go, returned, refunds = threading.Event(), threading.Event(), []
    notices: list[str] = []
    result = asyncio.run(asyncio.wait_for(run_flow(
        UNDONE, {}, run_id="undo1", runs_dir=tmp_path, registry=_refunding(go, returned, refunds),
        import_workers=False, on_event=_release_on_end(go), on_notice=notices.append, late_grace=HUNG), HUNG))
    assert returned.is_set() and refunds == ["undo1/charge/compensate"]
    assert (result.status, result.intervention, result.in_doubt, result.exit_code) == ("compensated", None, [], 1)
    assert result.compensated == ["charge"]
    finished = [(e["status"], e.get("previous_status")) for e in result.events if e["type"] == "run_finished"]
    assert finished == [("needs_intervention", None), ("compensated", "needs_intervention")]
    assert any("charge (undo attempt 1 timed out)" in n and "if an undo completed, its step is undone" in n
               for n in notices), notices
    _, lines = read_record(tmp_path / "undo1.jsonl")
    assert lines[-1]["reason"] == "every attempt waited for answered"
    shown = _show_json(tmp_path / "undo1.jsonl")
    assert (shown["status"], shown["compensated"], shown["intervention"]) == ("compensated", ["charge"], None)


def test_a_timed_out_sync_refund_that_outlives_the_wait_is_in_doubt(tmp_path: Path) -> None:
    """The bound passes with the refund's thread still running: the run stays needs_intervention with the charge
    listed, and says the refund may have been done — check before refunding by hand."""
    import io

    from rich.console import Console

    from flowdsl.runtime.summary import print_summary

    go, returned, refunds = threading.Event(), threading.Event(), []
    notices: list[str] = []

    async def main() -> Any:
        run = LocalRun(UNDONE, {}, run_id="undo2", runs_dir=tmp_path, registry=_refunding(go, returned, refunds),
                       import_workers=False, late_grace=0.2, on_notice=notices.append)
        result = await asyncio.wait_for(run.run(), HUNG)
        go.set()
        assert await asyncio.to_thread(returned.wait, HUNG)
        return result

    result = asyncio.run(main())
    assert (result.status, result.exit_code) == ("needs_intervention", 4)
    assert [i["step"] for i in result.intervention["steps"]] == ["charge"]
    [item] = result.in_doubt
    assert (item["step"], item["worker"], item["undo_in_doubt"], item["task_ids"]) == (
        "charge", "refund", True, ["undo2/charge#c1"])
    assert "undo attempt 1 of the step (it timed out)" in item["reason"] and "may be undone already" in item["reason"]
    out = io.StringIO()
    print_summary(result, Console(file=out, width=300, highlight=False))
    text = out.getvalue()
    assert "outcome unknown: check whether each took effect:" in text and "may be undone already" in text
    assert "charge: refund failed (×1) — StepTimeout" in text and "(its undo may have run: see below)" in text
    said = notices[-1]  # never "undo it by hand if it did": that is the second refund
    assert said.startswith("stopped waiting") and "whether the undo of charge (refund) ran is unknown" in said
    assert "undo it by hand if it did" not in said
    assert _show_json(tmp_path / "undo2.jsonl")["in_doubt"] == result.in_doubt


def test_only_rules_5_wait_for_a_timed_out_refund() -> None:
    """Rules 4 reject an undo's success once it failed for good: nothing to wait for, nothing in doubt."""
    from flowdsl.runtime.late import in_doubt_items, may_answer_late

    go, returned, refunds = threading.Event(), threading.Event(), []
    try:
        result = asyncio.run(asyncio.wait_for(run_flow(
            UNDONE, {}, record=False, registry=_refunding(go, returned, refunds), import_workers=False,
            late_grace=0), HUNG))
    finally:
        go.set()
    assert result.status == "needs_intervention" and [i["step"] for i in result.in_doubt] == ["charge"]
    attempt = {"task_id": f"{result.run_id}/charge#c1", "step": "charge", "attempt": 1}
    older = {**result.state, "kernel": 4}
    assert may_answer_late(UNDONE, result.state, attempt) and not may_answer_late(UNDONE, older, attempt)
    assert in_doubt_items(UNDONE, older, [attempt], "now", result.events) == []
    assert may_answer_late(UNDONE, result.state, attempt, any_end=True)  # stopped at once: still listed failed
    running = {**result.state, "compensations": {"charge": {**result.state["compensations"]["charge"],
                                                            "status": "running"}}}
    assert not may_answer_late(UNDONE, running, attempt, any_end=True)  # (its undo listed in flight already)


def test_flowdsl_run_returns_once_the_wait_ends_though_a_worker_ignores_every_cancel(tmp_path: Path) -> None:
    """`late_grace` bounds the wait for an attempt the run gave up on — but asyncio.run then waited for every task
    to finish, so `flowdsl.run()` (and `flowdsl run`) returned only when the stubborn worker did (8.7 s for a
    1 s late_grace). Now such a task gets a moment to answer its cancel, and is left behind."""
    import time

    from flowdsl.runtime.local import run

    reg = WorkerRegistry()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        until = time.monotonic() + HUNG
        while time.monotonic() < until:  # every cancel swallowed
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(until - time.monotonic())
        return {"charge_id": "ch1"}

    reg.register("charge", charge)
    reg.register("refund", lambda data, ctx: {})
    t0 = time.monotonic()
    result = run(LONE, {}, run_id="stubborn", runs_dir=tmp_path, registry=reg, import_workers=False,
                 late_grace=0.2, handle_sigint=False)
    assert time.monotonic() - t0 < HUNG / 2
    assert (result.status, [i["step"] for i in result.in_doubt]) == ("failed", ["charge"])


def test_flowdsl_run_exits_once_the_wait_ends_though_a_worker_ignores_every_cancel(tmp_path: Path) -> None:
    """The command too: it exited only when the stubborn worker returned (asyncio.run waited for it)."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "stubborn.py").write_text(textwrap.dedent('''
        import asyncio, contextlib, time
        from flowdsl import worker

        @worker("stub.charge")
        async def charge(data, ctx):
            until = time.monotonic() + 60
            while time.monotonic() < until:  # every cancel swallowed
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(until - time.monotonic())
            return {}

        @worker("stub.refund")
        async def refund(data, ctx):
            return {}
        '''))
    spec = tmp_path / "stub.yaml"
    spec.write_text("flowdsl: 1\nname: stub\nworkers: [stubborn]\n"
                    "steps:\n  - stub.charge: {compensate: stub.refund, timeout: 100ms}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(root), str(tmp_path)))}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flowdsl", "run", str(spec), "--no-record", "--late-grace", "0.3",
                           "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30, done.stderr
    assert done.returncode == 4, done.stderr
    assert [i["step"] for i in json.loads(done.stdout)["in_doubt"]] == ["charge"]


def test_a_run_stopped_at_once_while_a_timed_out_refund_still_runs_says_the_charge_may_be_undone(
        tmp_path: Path) -> None:
    """The refund failed for good at its timeout, its thread still running, when the run is stopped at once (a
    second Ctrl-C) while another undo runs: the charge was listed to refund by hand with nothing in doubt — a
    second refund, if the thread's went through."""
    from flowdsl.runtime.local import RunAborted
    from flowdsl.runtime.rebuild import result_from_record

    plan = compile_text("""flowdsl: 1
name: ab
steps:
  - parallel: g
    branches:
      - charge: {compensate: {worker: refund, timeout: 100ms, retry: 1}}
      - other: {compensate: undo_other}
  - ship
""")
    go = threading.Event()
    reg = WorkerRegistry()

    async def charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {"charge_id": "ch1"}

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError("the carrier is down")

    def refund(data: Any, ctx: Any) -> dict[str, Any]:  # sync: it cannot be interrupted
        go.wait(HUNG)
        return {}

    async def undo_other(data: Any, ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(HUNG)
        return {}

    for name, fn in [("charge", charge), ("other", charge), ("ship", ship), ("refund", refund),
                     ("undo_other", undo_other)]:
        reg.register(name, fn)

    async def main() -> Any:
        events: list[dict[str, Any]] = []
        run = LocalRun(plan, {}, run_id="ab1", runs_dir=tmp_path, registry=reg, import_workers=False,
                       on_event=events.append)
        task = asyncio.create_task(run.run())
        async with asyncio.timeout(HUNG):
            while not any(e["type"] == "compensation_failed" for e in events):
                await asyncio.sleep(0.01)
        run.abort("a second Ctrl-C")
        with pytest.raises(RunAborted) as stopped:
            await task
        return stopped.value.result

    try:
        result = asyncio.run(main())
    finally:
        go.set()
    assert [(i["step"], i["status"]) for i in result.intervention["steps"]] == [
        ("other", "in_flight"), ("charge", "failed")]
    [item] = result.in_doubt
    assert (item["step"], item["undo_in_doubt"], item["task_ids"]) == ("charge", True, ["ab1/charge#c1"])
    assert "may be undone already" in item["reason"] and "stopped at once" in item["reason"]
    header, lines = read_record(tmp_path / "ab1.jsonl")  # the record says the same
    assert [i["step"] for i in result_from_record(header, lines, tmp_path / "ab1.jsonl").in_doubt] == ["charge"]


# --- a timed-out attempt that succeeds after its step, which a retry completed, was undone (kernel rules 7) ---------

#: the audit's flow: reserve's attempt 1 times out (its sync thread runs on), attempt 2 succeeds, ship fails, and the
#: saga undoes reserve, then the flight
REDONE = compile_text("""flowdsl: 1
name: redone
steps:
  - book_flight: {compensate: cancel_flight}
  - reserve:
      timeout: 100ms
      retry: {attempts: 2, initial: 10ms, on: [StepTimeout]}
      compensate: release
  - ship
""")


def _reserving(go: threading.Event, returned: threading.Event, releases: list[str], *,
               cancel_flight: Any = None, ship: Any = None) -> WorkerRegistry:
    """book_flight; a sync reserve whose first call blocks until ``go`` (setting ``returned`` as it returns) and whose
    retry returns at once; a sync release recording its idempotency key; ship raising."""
    reg = WorkerRegistry()

    async def book_flight(data: Any, ctx: Any) -> dict[str, Any]:
        return {"flight_id": "F1"}

    async def undo_flight(data: Any, ctx: Any) -> dict[str, Any]:
        return {}

    def reserve(data: Any, ctx: Any) -> dict[str, Any]:  # sync: a call that cannot be interrupted
        if ctx.attempt == 1:
            try:
                assert go.wait(HUNG)
            finally:
                returned.set()
        return {"reservation": f"R{ctx.attempt}"}

    def release(data: Any, ctx: Any) -> dict[str, Any]:
        releases.append(ctx.idempotency_key)
        return {}

    async def failing_ship(data: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError("the carrier is down")

    for name, fn in [("book_flight", book_flight), ("cancel_flight", cancel_flight or undo_flight),
                     ("reserve", reserve), ("release", release), ("ship", ship or failing_ship)]:
        reg.register(name, fn)
    return reg


def test_a_timed_out_sync_attempt_that_succeeds_after_its_step_was_undone_makes_the_run_needs_intervention(
        tmp_path: Path) -> None:
    """The audit's case: reserve's first attempt went on past its timeout and reserved after the release — the run
    said `compensated` (exit 1, nothing in doubt), the only trace a `result_rejected`. The runtime now holds the
    run's end for that attempt and feeds its success: the reservation stands again, so the run turns
    needs_intervention, listing reserve to release again by hand, and its record replays through `flowdsl show`."""
    go, returned, releases = threading.Event(), threading.Event(), []
    notices: list[str] = []
    result = asyncio.run(asyncio.wait_for(run_flow(
        REDONE, {}, run_id="redone1", runs_dir=tmp_path, registry=_reserving(go, returned, releases),
        import_workers=False, on_event=_release_on_end(go), on_notice=notices.append, late_grace=HUNG), HUNG))
    assert returned.is_set() and releases == ["redone1/reserve/compensate"]  # undone once, by the run
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert result.compensated == ["reserve", "book_flight"]
    [item] = result.intervention["steps"]
    assert (item["step"], item["worker"], item["after_undo"]) == ("reserve", "release", True)
    assert (item["step_idempotency_key"], item["idempotency_key"]) == ("redone1/reserve", "redone1/reserve/compensate")
    assert "completed again after it was undone (attempt 1's result" in item["reason"]
    assert item["step_result"] == {"reservation": "R1"}
    finished = [(e["status"], e.get("previous_status")) for e in result.events if e["type"] == "run_finished"]
    assert finished == [("compensated", None), ("needs_intervention", "compensated")]
    [late] = [e for e in result.events if e["type"] == "late_completion"]
    assert (late["step"], late["task_id"], late["after_undo"]) == ("reserve", "redone1/reserve#1", True)
    assert any("the run ended compensated; waiting up to 10 s for 1 attempt(s)" in n
               and "reserve (attempt 1 timed out)" in n for n in notices), notices
    _, lines = read_record(tmp_path / "redone1.jsonl")
    kinds = [e["type"] for e in lines]
    assert kinds.index("run_finished") < kinds.index("runtime_waiting") < len(kinds) - 1 - kinds[::-1].index(
        "task_succeeded") < kinds.index("runtime_waited")
    shown = _show_json(tmp_path / "redone1.jsonl")
    assert (shown["status"], shown["in_doubt"], shown["intervention"]) == ("needs_intervention", [],
                                                                           result.intervention)


def test_a_timed_out_sync_attempt_that_succeeds_while_the_saga_still_runs_ends_it_needs_intervention() -> None:
    """The same success while the flight is still being cancelled (reserve's release done): the saga goes on, and
    ends needs_intervention at once — no second end."""
    go, returned, releases = threading.Event(), threading.Event(), []

    async def main() -> Any:
        late = asyncio.Event()

        async def cancel_flight(data: Any, ctx: Any) -> dict[str, Any]:
            go.set()  # reserve's first thread returns now, while the run still compensates
            with contextlib.suppress(TimeoutError):  # bounded: without the late answer, the run ends compensated
                await asyncio.wait_for(late.wait(), 2.0)
            return {}

        def watch(event: dict[str, Any]) -> None:
            if event["type"] == "late_completion":
                late.set()

        run = LocalRun(REDONE, {}, registry=_reserving(go, returned, releases, cancel_flight=cancel_flight),
                       import_workers=False, record=False, on_event=watch)
        return await asyncio.wait_for(run.run(), HUNG)

    result = asyncio.run(main())
    assert (result.status, result.in_doubt, result.exit_code) == ("needs_intervention", [], 4)
    assert [(i["step"], i.get("after_undo")) for i in result.intervention["steps"]] == [("reserve", True)]
    assert [e["status"] for e in result.events if e["type"] == "run_finished"] == ["needs_intervention"]
    assert len(releases) == 1


def test_a_timed_out_sync_attempt_still_running_after_its_step_was_undone_is_in_doubt(tmp_path: Path) -> None:
    """The bound passes with reserve's first thread still running: the run stays compensated, but the reservation
    may stand again — in doubt (exit 4), said so in the summary and in `flowdsl show`."""
    import io

    from rich.console import Console

    from flowdsl.runtime.summary import print_summary

    go, returned, releases = threading.Event(), threading.Event(), []
    try:
        result = asyncio.run(asyncio.wait_for(run_flow(
            REDONE, {}, run_id="redone2", runs_dir=tmp_path, registry=_reserving(go, returned, releases),
            import_workers=False, late_grace=0.2), HUNG))
        assert not returned.is_set()
    finally:
        go.set()
    assert (result.status, result.intervention, result.exit_code) == ("compensated", None, 4)
    [item] = result.in_doubt
    assert (item["step"], item["status"], item["after_undo"], item["task_ids"]) == (
        "reserve", "in_flight", True, ["redone2/reserve#1"])
    assert "may have completed the step again after the step was undone" in item["reason"]
    assert "after 0.2 s, the late_grace" in item["reason"] and item["step_result"] is None
    assert item["input"] == {"flight_id": "F1", "reservation": "R2"}  # what its release was given
    out = io.StringIO()
    print_summary(result, Console(file=out, width=300, highlight=False))
    text = out.getvalue()
    assert "outcome unknown" in text and "reserve: release ran before that" in text
    assert _show_json(tmp_path / "redone2.jsonl")["in_doubt"] == result.in_doubt


def test_a_timed_out_sync_attempt_that_succeeds_before_its_step_is_undone_changes_nothing() -> None:
    """Its success comes while ship runs, before anything is undone: the same effect as the retry's (one idempotency
    key), undone by the release — the run ends compensated, nothing waited for."""
    go, returned, releases = threading.Event(), threading.Event(), []

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        go.set()
        assert await asyncio.to_thread(returned.wait, HUNG)
        await asyncio.sleep(0.1)  # its answer fed first
        raise ConnectionError("the carrier is down")

    result = asyncio.run(asyncio.wait_for(run_flow(
        REDONE, {}, record=False, registry=_reserving(go, returned, releases, ship=ship), import_workers=False,
        late_grace=HUNG), HUNG))
    assert (result.status, result.intervention, result.in_doubt, result.exit_code) == ("compensated", None, [], 1)
    assert [e["task_id"] for e in result.events if e["type"] == "result_rejected"] == [f"{result.run_id}/reserve#1"]
    assert len(releases) == 1


def test_only_rules_7_wait_for_an_attempt_of_a_step_whose_undo_began() -> None:
    """Under rules 6 a success of reserve's first attempt after the release is only rejected: nothing to wait for,
    nothing in doubt; under 7 it is a late completion — until the step has one, and not before its undo began."""
    from flowdsl.runtime.late import in_doubt_items, may_answer_late

    go, returned, releases = threading.Event(), threading.Event(), []
    try:
        result = asyncio.run(asyncio.wait_for(run_flow(
            REDONE, {}, record=False, registry=_reserving(go, returned, releases), import_workers=False,
            late_grace=0), HUNG))
    finally:
        go.set()
    assert result.status == "compensated" and [i["step"] for i in result.in_doubt] == ["reserve"]
    attempt = {"task_id": f"{result.run_id}/reserve#1", "step": "reserve", "attempt": 1}
    older = {**result.state, "kernel": 6}
    assert may_answer_late(REDONE, result.state, attempt) and not may_answer_late(REDONE, older, attempt)
    assert in_doubt_items(REDONE, older, [attempt], "now", result.events) == []
    assert may_answer_late(REDONE, result.state, attempt, any_end=True)
    pending = {**result.state, "compensations": {**result.state["compensations"], "reserve": {
        **result.state["compensations"]["reserve"], "status": "pending", "attempt": 0}}}
    assert not may_answer_late(REDONE, pending, attempt) and not may_answer_late(REDONE, pending, attempt,
                                                                                 any_end=True)
    recorded = {**result.state, "late_completions": [{"step": "reserve"}]}
    assert not may_answer_late(REDONE, recorded, attempt)


def test_a_run_that_completed_does_not_wait_for_a_step_it_passed_over() -> None:
    """``on_failure: continue`` (rules 8): charge times out and is passed over, the run completes; its thread is still
    running, but a success of it would change nothing (the run wanted its effect), so the runtime does not hold the
    run's end for it, and nothing is in doubt — unlike a compensable step of a run that compensated."""
    plan = compile_text(textwrap.dedent("""\
        flowdsl: 1
        name: passed_over
        steps:
          - charge: {timeout: 100ms, compensate: refund, on_failure: continue}
          - ship
        """))
    go, charged, refunds = threading.Event(), threading.Event(), []

    async def ship(data: Any, ctx: Any) -> dict[str, Any]:
        return {"shipped": True}

    registry = _registry(lambda data, ctx: {}, go, charged, refunds)
    registry.register("ship", ship)

    async def main() -> Any:
        run = LocalRun(plan, {}, registry=registry, import_workers=False, record=False, late_grace=30)
        return await asyncio.wait_for(run.run(), 10)

    try:
        result = asyncio.run(main())
    finally:
        go.set()  # (the charge's thread returns now, after the run)
    assert result.status == "completed" and result.exit_code == 0 and result.in_doubt == []
    assert result.steps["charge"]["continued"] is True and result.steps["charge"]["error"]["type"] == "StepTimeout"
    assert result.wall_ms is not None and result.wall_ms < 5_000 and refunds == []
