"""Wait nodes on the local runtime: signals sent to a run (``LocalRun.signal`` from another task or thread,
``signals=``), timer waits, a wait's deadline, cancelling while a wait waits, and the record of it all replayed
(``show``, ``resume``).

A test waits for the run to wait through its events (an ``asyncio.Event`` or ``threading.Event`` set by
``on_event``), never by sleeping; the only times asserted are lower bounds of timers.
"""

from __future__ import annotations

import asyncio
import io
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.kernel import replay
from flowdsl.runtime.inputs import InputError
from flowdsl.runtime.local import RECORDED_INPUTS, LocalRun, RunAborted, SignalOutcome, run_flow
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import read_record
from flowdsl.runtime.resume import resume_flow
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), then the wait for signal 'paid' (its payload stored as `confirmation`), then b
PAID = ("steps:\n  - conf.a: {{compensate: undo.a}}\n  - wait: paid\n    output: confirmation\n{extra}"
        "  - conf.b\n")


def plan(steps: str | None = None, extra: str = "") -> dict[str, Any]:
    """The flow ``pay``: ``steps``, or :data:`PAID` with ``extra`` options of its wait."""
    return compile_text(HEADER.format(name="pay") + (steps if steps is not None else PAID.format(extra=extra)))


def types(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["step"] if e["step"] is not None else e.get("signal")) for e in events]


def signal_events(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e["type"], e.get("buffered", e.get("reason", e.get("wait")))) for e in events
            if e["type"].startswith("signal_")]


class Waiting:
    """An ``on_event`` hook that tells when wait ``step`` has started (for a task, and for a thread)."""

    def __init__(self, step: str = "paid"):
        self.step = step
        self.started = asyncio.Event()
        self.threaded = threading.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["type"] == "step_started" and event["step"] == self.step:
            self.started.set()
            self.threaded.set()


# --- signals sent while the run goes ----------------------------------------------------------------------------


def test_a_signal_sent_from_another_task_is_taken_by_the_waiting_wait() -> None:
    async def main() -> tuple[Any, SignalOutcome, list[str]]:
        waiting, notices = Waiting(), list[str]()
        run = LocalRun(plan(), {}, record=False, on_event=waiting, on_notice=notices.append)
        task = asyncio.ensure_future(run.run())
        await waiting.started.wait()
        assert run.status == "running" and "paid" in run.state["waits"]
        outcome = await run.signal("paid", {"amount": 42})
        return await task, outcome, notices

    result, outcome, notices = asyncio.run(main())
    assert (outcome.outcome, outcome.wait, outcome.reason, outcome.taken) == ("received", "paid", None, True)
    assert outcome.to_json() == {"run_id": result.run_id, "signal": "paid", "key": None, "outcome": "received",
                                 "wait": "paid", "reason": None, "at": outcome.at}
    assert result.status == "completed"
    assert result.context == {"confirmation": {"amount": 42}}
    assert result.steps["paid"]["kind"] == "wait" and result.steps["paid"]["attempts"] == 0
    assert signal_events(result.events) == [("signal_received", False)]
    said = [n for n in notices if "signal 'paid'" in n]
    assert len(said) == 1 and "with no deadline" in said[0] and "LocalRun.signal('paid', payload)" in said[0]


def test_a_signal_sent_from_another_thread_is_handed_to_the_runs_loop() -> None:
    waiting, outcomes = Waiting(), []
    run = LocalRun(plan(), {}, record=False, on_event=waiting)

    def sender() -> None:
        assert waiting.threaded.wait(10)
        outcomes.append(run.signal("paid", {"by": "webhook"}).result(10))

    thread = threading.Thread(target=sender)
    thread.start()
    result = asyncio.run(run.run())
    thread.join(10)
    assert [o.outcome for o in outcomes] == ["received"]
    assert result.status == "completed" and result.context["confirmation"] == {"by": "webhook"}


def test_a_second_signal_and_one_sent_after_the_end_are_rejected_saying_why(tmp_path: Path) -> None:
    async def main() -> tuple[Any, list[SignalOutcome]]:
        waiting = Waiting()
        run = LocalRun(plan(), {}, runs_dir=tmp_path, run_id="twice", on_event=waiting)
        task = asyncio.ensure_future(run.run())
        await waiting.started.wait()
        first, second = run.signal("paid"), run.signal("paid", {"again": True})
        result = await task
        return result, [await first, await second, await run.signal("paid")]

    result, (first, second, late) = asyncio.run(main())
    assert (first.outcome, second.outcome, late.outcome) == ("received", "rejected", "rejected")
    assert second.reason == "wait 'paid' has already received signal 'paid'" and second.wait is None
    assert late.reason == "the run has ended (completed): it waits for nothing more" and late.at is None
    assert result.context["confirmation"] == {}  # (no payload: {})
    header, lines = read_record(tmp_path / "twice.jsonl")  # the one sent after the end never reached the run
    assert [e["payload"] for e in lines if e["type"] == "signal"] == [None, {"again": True}]
    from rich.console import Console

    from flowdsl.runtime.timeline import print_timeline

    console = Console(file=io.StringIO(), width=200)
    print_timeline(result_from_record(header, lines), lines, console)
    shown = console.file.getvalue()
    assert "✉ signal 'paid' received by wait 'paid'\n" in shown
    assert "✉ signal 'paid' rejected: wait 'paid' has already received signal 'paid'" in shown


# --- signals sent as the run starts: kept until their wait starts --------------------------------------------------


@pytest.mark.parametrize("signals", [{"paid": {"ok": True}}, [("paid", {"ok": True})]])
def test_signals_given_to_the_run_are_kept_until_their_wait_starts(signals: Any) -> None:
    result = asyncio.run(run_flow(plan(), {}, record=False, signals=signals))
    assert result.status == "completed" and result.context["confirmation"] == {"ok": True}
    assert signal_events(result.events) == [("signal_buffered", "paid"), ("signal_received", True)]
    said = types(result.events)  # first of all, right after the run started: before a's answer
    assert said.index(("signal_buffered", "paid")) < said.index(("step_succeeded", "a"))
    received = next(e for e in result.events if e["type"] == "signal_received")
    assert received["sent_at"] <= received["at"] and received["step"] == "paid"


def test_a_signal_sent_before_the_run_starts_is_held_and_goes_first() -> None:
    run = LocalRun(plan(), {}, record=False, signals=["paid"])
    held = run.signal("paid", {"second": True})  # (held: the run has not started)
    assert not held.done()
    result = asyncio.run(run.run())
    assert held.result(0) == SignalOutcome(run.run_id, "paid", "rejected", reason="signal 'paid' was already "
                                           "received: it is kept until wait 'paid' starts", at=held.result(0).at)
    assert result.context["confirmation"] == {}


def test_signals_held_when_the_run_never_starts_are_rejected() -> None:
    run = LocalRun(plan(), {}, record=False)
    sent = run.signal("paid")
    run.abort("changed my mind")
    with pytest.raises(RunAborted):
        asyncio.run(run.run())
    assert sent.result(0) == SignalOutcome(run.run_id, "paid", "rejected", reason="the run did not start")
    assert run.signal("paid").result(0).outcome == "rejected"


def test_a_signal_is_checked_before_it_reaches_the_run() -> None:
    run = LocalRun(plan(), {}, record=False)
    with pytest.raises(ValueError, match=r"^no wait of flow 'pay' takes signal 'payd': its signals are 'paid'$"):
        run.signal("payd")
    with pytest.raises(TypeError, match=r"the payload of signal 'paid' must be a JSON object .* got list"):
        run.signal("paid", [1])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="the payload of signal 'paid' is not a JSON object: at /x: nan is not"):
        run.signal("paid", {"x": float("nan")})
    with pytest.raises(TypeError, match="a signal's name must be a string; got int"):
        run.signal(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signal 'paid' is given twice"):
        LocalRun(plan(), {}, record=False, signals=[("paid", None), "paid"])
    with pytest.raises(TypeError, match="signals must be a mapping"):
        LocalRun(plan(), {}, record=False, signals="paid")
    with pytest.raises(TypeError, match="a name, a \\(name, payload\\) pair or a \\(name, payload, key\\) triple; "
                                        "got tuple of 4 items"):
        LocalRun(plan(), {}, record=False, signals=[("paid", None, 1, 2)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^wait 'paid' takes signal 'paid' without a key"):
        LocalRun(plan(), {}, record=False, signals=[("paid", None, 1)])
    plain = compile_text(HEADER.format(name="plain") + "steps:\n  - conf.a\n")
    with pytest.raises(ValueError, match="no wait of flow 'plain' takes signal 'paid': the flow waits for no signal"):
        LocalRun(plain, {}, record=False, signals={"paid": None})
    payload = {"nested": {"n": 1}}
    run = LocalRun(plan(), {}, record=False, signals={"paid": payload})
    payload["nested"]["n"] = 2  # the run keeps its own copy
    assert asyncio.run(run.run()).context["confirmation"] == {"nested": {"n": 1}}


# --- timers and deadlines ----------------------------------------------------------------------------------------


def test_a_timer_wait_goes_on_after_its_delay() -> None:
    timer = plan("steps:\n  - conf.a\n  - wait: cool\n    for: 60ms\n  - conf.b\n")
    result = asyncio.run(run_flow(timer, {}, record=False))
    assert result.status == "completed"
    row = result.steps["cool"]
    assert row["status"] == "succeeded" and row["finished_at"] - row["started_at"] >= 50
    assert [s for s, _ in types(result.events)].count("timer_fired") == 0  # (input events are not emitted)
    assert "cool" in result.to_json()["timing"]["critical_path"]
    assert result.to_json()["steps"]["cool"] | {"started_at": 0, "finished_at": 0} == {
        "status": "succeeded", "attempts": 0, "started_at": 0, "finished_at": 0, "error": None, "kind": "wait",
        "node": "cool", "signal": None, "key": None, "wait_ms": 60}


def test_a_wait_whose_deadline_passes_fails_with_wait_timeout_and_the_run_compensates() -> None:
    notices: list[str] = []
    result = asyncio.run(run_flow(plan(extra="    timeout: 60ms\n"), {}, record=False, on_notice=notices.append))
    assert (result.status, result.failed_step, result.compensated) == ("compensated", "paid", ["a"])
    assert result.error == {"type": "WaitTimeout", "message": "no signal 'paid' came within 60 ms"}
    assert result.steps["b"]["status"] == "pending"
    assert any("up to 60ms: then it fails with WaitTimeout" in n for n in notices)
    from rich.console import Console

    from flowdsl.runtime.summary import print_summary

    console = Console(file=io.StringIO(), width=200)
    print_summary(result, console)
    text = console.file.getvalue()
    assert "pay" in text and "compensated at paid — WaitTimeout: no signal 'paid' came within 60ms" in text
    assert "failed ⚐" in text and "waits ⚐:\n  paid: signal 'paid', up to 60ms\n" in text


def test_a_wait_with_on_failure_continue_is_passed_over_at_its_deadline() -> None:
    result = asyncio.run(run_flow(plan(extra="    timeout: 50ms\n    on_failure: continue\n"), {}, record=False))
    assert result.status == "completed" and result.steps["paid"].get("continued")
    assert result.context.get("confirmation") is None


# --- stopping while a wait waits --------------------------------------------------------------------------------


def test_a_run_cancelled_while_its_wait_waits_cancels_the_wait_and_undoes_what_completed() -> None:
    async def main() -> tuple[Any, SignalOutcome]:
        waiting = Waiting()
        run = LocalRun(plan(), {}, record=False, on_event=waiting)
        task = asyncio.ensure_future(run.run())
        await waiting.started.wait()
        run.cancel("the customer left")
        late = run.signal("paid")
        return await task, await late

    result, late = asyncio.run(main())
    assert (result.status, result.compensated) == ("cancelled", ["a"])
    cancelled = next(e for e in result.events if e["type"] == "step_cancelled")
    assert cancelled["step"] == "paid" and "while the wait waited for signal 'paid'" in cancelled["reason"]
    assert late.outcome == "rejected" and late.reason is not None and "the run" in late.reason


# --- the record: replayed by show and resume ----------------------------------------------------------------------


def test_the_record_holds_the_signals_and_replays_to_the_same_decisions(tmp_path: Path) -> None:
    flow = plan("steps:\n  - wait: early\n    for: 20ms\n  - conf.a\n  - wait: paid\n  - conf.b\n")
    result = asyncio.run(run_flow(flow, {}, runs_dir=tmp_path, run_id="rec", signals={"paid": {"n": 1}}))
    header, lines = read_record(tmp_path / "rec.jsonl")
    inputs = [e for e in lines if e["type"] in RECORDED_INPUTS]
    assert [e["type"] for e in inputs].count("signal") == 1
    state, _, emitted = replay(header["plan"], inputs)  # type: ignore[index]
    assert emitted == result.events and state["status"] == "completed"
    again = result_from_record(header, lines)
    assert (again.status, again.context, again.steps) == (result.status, result.context, result.steps)


def test_a_run_stopped_while_its_wait_waits_is_resumed_with_the_signal(tmp_path: Path) -> None:
    flow = plan()

    async def stopped() -> None:
        run: LocalRun

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "step_started" and event["step"] == "paid":
                asyncio.get_running_loop().call_soon(run.abort, "stopped by the test")

        run = LocalRun(flow, {}, runs_dir=tmp_path, run_id="res", on_event=on_event)
        with pytest.raises(RunAborted):
            await run.run()

    asyncio.run(stopped())
    shown = result_from_record(*read_record(tmp_path / "res.jsonl")).to_json()
    assert shown["steps"]["paid"]["status"] == "waiting" and shown["steps"]["paid"]["signal"] == "paid"
    notices: list[str] = []
    result = asyncio.run(resume_flow("res", runs_dir=tmp_path, force=True, signals={"paid": {"late": 1}},
                                     on_notice=notices.append))
    assert (result.status, result.context["confirmation"]) == ("completed", {"late": 1})
    assert signal_events(result.events) == [("signal_received", False)]
    assert not any("waits for signal" in n for n in notices)  # (the signal it waited for came with the resume)
    header, lines = read_record(tmp_path / "res.jsonl")
    state, _, emitted = replay(header["plan"], [e for e in lines if e["type"] in RECORDED_INPUTS])  # type: ignore
    assert state["status"] == "completed" and emitted == result.events


def stopped_waiting(flow: dict[str, Any], runs: Path, run_id: str) -> None:
    """Run ``flow`` until its wait ``paid`` starts, then stop it at once: its record is left to resume."""

    async def stopped() -> None:
        run: LocalRun

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "step_started" and event["step"] == "paid":
                asyncio.get_running_loop().call_soon(run.abort, "stopped by the test")

        run = LocalRun(flow, {}, runs_dir=runs, run_id=run_id, on_event=on_event)
        with pytest.raises(RunAborted):
            await run.run()

    asyncio.run(stopped())


def test_a_deadline_that_passed_while_the_run_stood_fires_before_a_signal_sent_at_the_resume(tmp_path: Path) -> None:
    import time

    flow = plan(extra="    timeout: 80ms\n")
    stopped_waiting(flow, tmp_path, "late")
    time.sleep(0.15)  # the wait's deadline passes while no process runs the run
    notices: list[str] = []
    result = asyncio.run(resume_flow("late", runs_dir=tmp_path, force=True, signals={"paid": {"late": 1}},
                                     on_notice=notices.append))
    assert result.status == "compensated" and result.compensated == ["a"]
    assert result.steps["paid"]["status"] == "failed" and result.error is not None
    assert result.error["type"] == "WaitTimeout"
    # the deadline first (in the record too), then the signal, which nothing takes any more
    after = [e for e in result.events if e["type"] in ("step_failed", "signal_rejected", "signal_received")]
    assert [e["type"] for e in after] == ["step_failed", "signal_rejected"]
    assert "compensating" in after[1]["reason"]
    assert not any("waits for signal" in n for n in notices)  # (it was over before the resume said anything)
    header, lines = read_record(tmp_path / "late.jsonl")
    inputs = [e for e in lines if e["type"] in RECORDED_INPUTS]
    resumed = [e["type"] for e in inputs[[e["type"] for e in inputs].index("start") + 1:]][-4:]
    assert "timer_fired" in resumed and resumed.index("timer_fired") < resumed.index("signal")
    state, _, emitted = replay(header["plan"], inputs)  # type: ignore[index]
    assert state["status"] == "compensated" and emitted == result.events


def test_timers_overdue_at_the_resume_fire_in_the_order_they_fell_due(tmp_path: Path) -> None:
    import time

    flow = plan("steps:\n  - conf.a: {compensate: undo.a}\n  - parallel: both\n    branches:\n      - wait: paid\n"
                "        timeout: 90ms\n        on_failure: continue\n      - wait: cool\n        for: 60ms\n"
                "  - conf.b\n")
    stopped_waiting(flow, tmp_path, "order")
    time.sleep(0.15)
    result = asyncio.run(resume_flow("order", runs_dir=tmp_path, force=True, signals=["paid"]))
    assert result.status == "completed"
    ended = [e["step"] for e in result.events if e["type"] in ("step_succeeded", "step_failed")
             and e["step"] in ("paid", "cool")]
    assert ended == ["cool", "paid"] and result.steps["paid"]["status"] == "failed"
    assert [e["type"] for e in result.events if e["type"].startswith("signal_")] == ["signal_rejected"]


# --- what the live view says --------------------------------------------------------------------------------------


def test_the_live_view_shows_a_waiting_wait_and_says_the_signal_events() -> None:
    from rich.console import Console

    from flowdsl.runtime.timeline import LiveView

    flow = plan(extra="    timeout: 30s\n")
    lines = LiveView(flow, mode="lines", console=Console(file=io.StringIO(), width=200))
    table = LiveView(flow, mode="live", console=Console(file=io.StringIO(), width=200))
    rendered: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        lines.on_event(event)
        table.on_event(event)
        if event["type"] == "step_started" and event["step"] == "paid":
            out = Console(file=io.StringIO(), width=200)
            out.print(table._render())
            rendered.append(out.file.getvalue())

    async def main() -> Any:
        run = LocalRun(flow, {}, record=False, on_event=on_event)
        task = asyncio.ensure_future(run.run())
        while not rendered:
            await asyncio.sleep(0.005)
        run.signal("paid", {"ok": 1})
        return await task

    assert asyncio.run(main()).status == "completed"
    assert "⚐ paid  waiting" in rendered[0] and "signal 'paid', up to 30s" in rendered[0]
    said = lines.console.file.getvalue()
    assert "⚐ paid waits for signal 'paid' (up to 30s)" in said
    assert "✉ signal 'paid' received by wait 'paid'" in said and "✓ paid" in said


def test_a_resumed_run_says_which_signal_its_wait_waits_for(tmp_path: Path) -> None:
    from flowdsl.runtime.resume import prepare_resumption

    flow = plan(extra="    timeout: 30s\n")

    async def stopped() -> None:
        run: LocalRun

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "step_started" and event["step"] == "paid":
                asyncio.get_running_loop().call_soon(run.abort, "stopped by the test")

        run = LocalRun(flow, {}, runs_dir=tmp_path, run_id="said", on_event=on_event)
        with pytest.raises(RunAborted):
            await run.run()

    asyncio.run(stopped())
    resumption = prepare_resumption(tmp_path / "said.jsonl", force=True)
    assert resumption.dispatches == [] and [t["purpose"] for t in resumption.timers] == ["wait_timeout"]
    notices: list[str] = []

    def on_notice(text: str) -> None:
        notices.append(text)
        if "waits for signal 'paid'" in text:
            asyncio.get_running_loop().call_soon(run.signal, "paid", {"at_last": True})

    run = LocalRun(resumption.plan, resumption.run_input, run_id="said", resumption=resumption, on_notice=on_notice)
    result = asyncio.run(run.run())
    assert result.status == "completed" and result.context["confirmation"] == {"at_last": True}
    assert sum("the run waits for signal 'paid' (up to 30s" in n for n in notices) == 1
    # (the command that resumes this run, with its records directory: one that can be run as it is shown)
    assert any(f"or, when it is resumed, from `flowdsl resume said --runs-dir {tmp_path} --signal paid=JSON`" in n
               for n in notices), notices


@pytest.mark.skipif(not hasattr(signal, "SIGQUIT"), reason="no SIGQUIT here")
@pytest.mark.parametrize("quit_handler", [signal.SIG_DFL, signal.SIG_IGN])
def test_the_waiting_notice_says_how_to_stop_the_process_and_keep_the_run(tmp_path: Path, quit_handler: Any) -> None:
    from flowdsl.runtime.summary import show_command

    notices: list[str] = []

    async def main() -> Any:
        run = LocalRun(plan(), {}, runs_dir=tmp_path, run_id="q", handle_sigint=True, on_notice=notices.append,
                       on_event=waiting)
        task = asyncio.ensure_future(run.run())
        await waiting.started.wait()
        run.signal("paid")
        return await task

    waiting = Waiting()
    before = signal.signal(signal.SIGQUIT, quit_handler)
    try:
        assert asyncio.run(main()).status == "completed"
    finally:
        signal.signal(signal.SIGQUIT, before)
    (said,) = [n for n in notices if "the run waits for signal 'paid'" in n]
    resume = show_command(tmp_path / "q.jsonl").replace("flowdsl show", "flowdsl resume")
    assert said.endswith("or, when it starts, from `flowdsl run --signal paid=JSON`; Ctrl-C cancels the run" + (
        f" (Ctrl-\\ ends this process and leaves the run to `{resume} --signal paid=JSON`)"
        if quit_handler is signal.SIG_DFL else "")), said


def test_a_wait_whose_signal_is_on_its_way_as_it_starts_is_not_said_to_wait() -> None:
    first = plan("steps:\n  - wait: paid\n  - conf.b\n")
    notices: list[str] = []
    result = asyncio.run(run_flow(first, {}, record=False, signals=["paid"], on_notice=notices.append))
    assert result.status == "completed" and signal_events(result.events) == [("signal_received", False)]
    assert not any("waits for signal" in n for n in notices)
