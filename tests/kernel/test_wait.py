"""Kernel rules 9: ``wait`` nodes — a signal sent to the run from outside (kept when it comes early, refused when
nothing can take it), a deadline for it, and durable timers (docs/kernel.md, "Waits")."""

from __future__ import annotations

import copy
import json

import pytest

from flowdsl.kernel import STATE_VERSION, WAIT_RULES, apply, prepare, replay, rules_for, start_run, summary
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, hang, ok

PAID = {"wait": "paid", "timeout": "30s", "output": "payment"}


def test_a_signal_that_comes_while_the_wait_waits_is_its_result_and_the_run_goes_on():
    plan = plan_of(["charge", PAID, {"ship": {"with": {"ref": "${ payment.ref }"}}}])
    sim = Sim(plan, signals=[(5000, "paid", {"ref": "P-1"})]).run()
    assert sim.status == "completed"
    started = sim.of("step_started", step="paid")[0]
    assert started["kind"] == "wait" and started["signal"] == "paid" and started["wait_ms"] == 30_000
    got = sim.of("signal_received")
    assert [(e["step"], e["signal"], e["buffered"], e["sent_at"], e["at"]) for e in got] == [
        ("paid", "paid", False, 5000, 5000)]
    ship = next(d for d in sim.dispatches if d["step"] == "ship")
    assert ship["input"] == {"ref": "P-1"} and ship["at"] == 5000
    assert sim.state["context"]["payment"] == {"ref": "P-1"}
    # the deadline was cancelled when the signal came, and the wait left nothing behind
    assert [c["timer_id"] for c in sim.commands if c["op"] == "cancel_timer"] == ["r1/paid@wait"]
    assert "paid" not in sim.state["waits"] and not sim.state.get("signals")
    row = summary(plan, sim.state)["steps"]["paid"]
    assert row["kind"] == "wait" and row["status"] == "succeeded" and row["signal"] == "paid"
    assert row["attempts"] == 0 and row["started_at"] == 1010 and row["finished_at"] == 5000


def test_a_signal_that_comes_before_its_wait_starts_is_kept_and_taken_when_it_starts():
    plan = plan_of([{"slow": {}}, {"wait": "approval", "signal": "approved"}, "go"])
    sim = Sim(plan, {"slow": ok(after=900)}, signals=[(1200, "approved", {"by": "ann"})]).run()
    assert sim.status == "completed"
    kept = sim.of("signal_buffered")
    assert [(e["signal"], e["wait"], e["step"], e["at"]) for e in kept] == [("approved", "approval", None, 1200)]
    got = sim.of("signal_received")[0]
    assert (got["step"], got["buffered"], got["sent_at"], got["at"]) == ("approval", True, 1200, 1900)
    assert sim.state["context"]["by"] == "ann"  # (merged: the default output rule)
    assert sim.state["signals"] == {}
    assert not any(c["op"] == "schedule_timer" for c in sim.commands)  # no timeout: none was armed


def test_no_signal_within_the_timeout_fails_the_wait_for_good_and_the_run_compensates():
    plan = plan_of([{"charge": {"compensate": "refund"}}, PAID, "ship"])
    sim = Sim(plan).run()
    assert sim.status == "compensated" and sim.state["failed_step"] == "paid"
    assert sim.state["error"] == {"type": "WaitTimeout", "message": "no signal 'paid' came within 30000 ms"}
    failed = sim.of("step_failed", step="paid")[0]
    assert failed["at"] == 1010 + 30_000 and failed["task_id"] is None
    assert sim.undone() == ["charge"] and "ship" not in sim.dispatched()


def test_on_failure_continue_passes_a_wait_that_timed_out_over():
    plan = plan_of([{"wait": "rated", "timeout": "1m", "on_failure": "continue", "output": "rating"},
                    {"thank": {"with": {"rating": "${ rating }"}}}])
    sim = Sim(plan).run()
    assert sim.status == "completed"
    assert sim.of("step_failed", step="rated")[0]["continued"] is True
    assert next(d for d in sim.dispatches if d["step"] == "thank")["input"] == {"rating": None}
    assert summary(plan, sim.state)["steps"]["rated"]["continued"] is True


def test_a_timer_wait_goes_on_after_its_duration_and_adds_nothing():
    plan = plan_of([{"a": {}}, {"wait": "cooling_off", "for": "2h"}, "b"])
    sim = Sim(plan, {"a": ok({"x": 1})}).run()
    assert sim.status == "completed"
    timer = next(c for c in sim.commands if c["op"] == "schedule_timer")
    assert (timer["timer_id"], timer["purpose"], timer["delay_ms"], timer["step"]) == (
        "r1/cooling_off@wait", "wait", 7_200_000, "cooling_off")
    b = next(d for d in sim.dispatches if d["step"] == "b")
    assert b["at"] == 1010 + 7_200_000 and b["input"] == {"x": 1}
    started = sim.of("step_started", step="cooling_off")[0]
    assert started["signal"] is None and started["wait_ms"] == 7_200_000
    assert not sim.of("signal_received")


def test_an_abort_cancels_a_wait_at_once():
    plan = plan_of([{"reserve": {"compensate": "release"}},
                    {"parallel": "p", "branches": [{"wait": "paid"}, {"check": {}}]}])
    sim = Sim(plan, {"check": fail("Fraud", after=50)}).run()
    assert sim.status == "compensated" and sim.state["failed_step"] == "check"
    cancelled = sim.of("step_cancelled", step="paid")
    assert len(cancelled) == 1 and "signal 'paid'" in cancelled[0]["reason"]
    assert sim.undone() == ["reserve"] and sim.state["waits"] == {}
    assert summary(plan, sim.state)["steps"]["paid"]["status"] == "cancelled"


def test_a_cancel_and_the_run_timeout_stop_a_timer_wait():
    plan = plan_of([{"wait": "hold", "for": "1h"}, "after"])
    sim = Sim(plan, cancel_at=5000).run()
    assert sim.status == "cancelled"
    assert [c["timer_id"] for c in sim.commands if c["op"] == "cancel_timer"] == ["r1/hold@wait"]
    plan = plan_of([{"wait": "hold", "for": "1h"}, "after"], timeout="10s")
    sim = Sim(plan).run()
    assert sim.status == "failed" and sim.state["error"]["type"] == "RunTimeout"
    assert sim.of("step_cancelled", step="hold") and not sim.dispatches


def test_signals_nothing_can_take_are_refused_with_the_reason():
    plan = plan_of([{"wait": "paid"}, {"wait": "later", "signal": "shipped", "when": "${ $input.ship }"}, "end"])
    sim = Sim(plan, {"end": ok(after=500)}, input={"ship": False}, signals=[
        (1100, "paid", {}), (1200, "paid", {}), (1300, "nope", {"x": 1})]).run()
    reasons = [(e["signal"], e["reason"]) for e in sim.of("signal_rejected")]
    assert reasons == [
        ("paid", "wait 'paid' has already received signal 'paid'"),
        ("nope", "no wait of flow 't' takes signal 'nope' (its signals: 'paid', 'shipped')"),
    ]
    assert sim.status == "completed"
    # the run is over: a signal to it changes nothing but the events
    state = copy.deepcopy(sim.state)
    d = apply(plan, sim.state, {"type": "signal", "name": "shipped", "payload": None, "at": 9000})
    assert [e["type"] for e in d.events] == ["signal_rejected"] and not d.commands
    assert "the run has ended (completed)" in d.events[0]["reason"]
    assert {k: v for k, v in d.state.items() if k != "seq"} == {k: v for k, v in state.items() if k != "seq"}


def test_a_second_early_signal_and_one_for_a_skipped_wait_are_refused():
    plan = plan_of([{"slow": {}}, {"wait": "w", "signal": "go", "when": "${ $input.wait }"}, "end"])
    sim = Sim(plan, {"slow": ok(after=500)}, input={"wait": True},
              signals=[(1100, "go", {"n": 1}), (1200, "go", {"n": 2})]).run()
    assert sim.of("signal_rejected")[0]["reason"] == "signal 'go' was already received: it is kept until wait 'w' " \
                                                     "starts"
    assert sim.state["context"]["n"] == 1
    sim = Sim(plan, input={"wait": False}, signals=[(1015, "go", {})]).run()
    assert sim.of("signal_rejected")[0]["reason"] == "wait 'w' is skipped: it takes no signal"


def test_a_signal_is_refused_while_the_run_is_being_stopped():
    plan = plan_of([{"parallel": "p", "branches": [{"wait": "paid"}, {"slow": {"compensate": "undo"}}, "boom"]}])
    sim = Sim(plan, {"boom": fail(after=10), "slow": hang(cancellable=False)}, signals=[(2000, "paid", {})])
    sim.run(limit=50)
    assert sim.state["status"] == "aborting"
    assert sim.of("signal_rejected")[0]["reason"] == "the run is being stopped (aborting): it waits for nothing more"


def test_an_output_map_over_the_payload_and_steps_reading_it():
    plan = plan_of([{"wait": "paid", "output": {"amount": "${ total * 100 }"}},
                    {"book": {"with": {"cents": "${ amount }", "raw": "${ $steps.paid.total }"}}}])
    sim = Sim(plan, signals=[(2000, "paid", {"total": 2.5})]).run()
    assert next(d for d in sim.dispatches if d["step"] == "book")["input"] == {"cents": 250, "raw": 2.5}
    assert sim.state["context"] == {"amount": 250}
    plan = plan_of([{"wait": "paid", "output": {"amount": "${ $number(total) }"}}, "book"])
    sim = Sim(plan, signals=[(2000, "paid", {"total": "abc"})]).run()
    assert sim.status == "failed" and sim.state["error"]["type"] == "ExpressionError"
    assert sim.state["error"]["message"].startswith("in 'output.amount': ")


def test_a_wait_in_a_sub_flow_takes_its_signal(tmp_path):
    from tests.kernel.plans import plan_files
    plan = plan_files(tmp_path, {
        "main.yaml": "flowdsl: 1\nname: main\nsteps:\n  - a\n  - flow: gift\n    path: gift.yaml\n  - b\n",
        "gift.yaml": "flowdsl: 1\nname: gift\nsteps:\n  - wrap\n  - wait: wrapped\n    output: wrapping\n"})
    sim = Sim(plan, signals=[(3000, "wrapped", {"paper": "red"})]).run()
    assert sim.status == "completed"
    assert sim.of("signal_received")[0]["step"] == "gift/wrapped"
    assert sim.state["context"]["gift"] == {"wrapping": {"paper": "red"}}


def test_replay_gives_the_same_decisions_with_signals_and_timers():
    plan = plan_of([{"charge": {"compensate": "refund"}}, {"wait": "hold", "for": "5s"},
                    {"parallel": "p", "branches": [PAID, {"wait": "late", "timeout": "1m", "on_failure": "continue"}]},
                    "ship"])
    sim = Sim(plan, signals=[(1500, "paid", {"ref": 1}), (1600, "paid", {}), (1700, "zzz", {})],
              reload_state=True).run()
    assert sim.status == "completed"
    state, commands, events = replay(plan, sim.inputs)
    assert json.dumps(events) == json.dumps(sim.events) and json.dumps(commands) == json.dumps(sim.commands)
    assert state == sim.state


def test_rules_9_and_the_plan_version():
    plan = plan_of([{"wait": "paid"}])
    assert plan["plan_version"] == 3 and WAIT_RULES == 9 and STATE_VERSION >= 9
    assert rules_for(plan, 7) == 9 and rules_for(plan_of(["a"]), 7) == 7
    with pytest.raises(ValueError, match="node 'paid' is a wait, which kernel rules 9 brought"):
        start_run(plan, "r1", {}, at=1, kernel=8)


def test_malformed_signal_events_are_refused_and_change_nothing():
    plan = plan_of([{"wait": "paid"}])
    d = start_run(plan, "r1", {}, at=1)
    before = json.dumps(d.state)
    for bad, message in [({"payload": {}}, "needs a 'name'"), ({"name": "paid", "payload": [1]}, "JSON object"),
                         ({"name": 3}, "needs a 'name'")]:
        with pytest.raises(ValueError, match=message):
            apply(plan, d.state, {"type": "signal", "at": 2, **bad})
        assert json.dumps(d.state) == before


def test_a_hand_made_plan_that_the_compiler_would_refuse_is_refused():
    plan = copy.deepcopy(plan_of([{"wait": "a", "signal": "s"}, {"wait": "b", "signal": "t"}]))
    plan["nodes"]["b"]["signal"] = "s"
    with pytest.raises(ValueError, match="plan nodes 'a' and 'b' both wait for signal 's'"):
        prepare(plan)
    plan = copy.deepcopy(plan_of([{"for_each": "each", "items": "${ xs }", "steps": [{"wait": "w", "for": "1s"}]}]))
    plan["nodes"]["each/w" if "each/w" in plan["nodes"] else "w"].update(signal="s", delay_ms=None)
    with pytest.raises(ValueError, match="waits for signal 's' inside for_each 'each'"):
        prepare(plan)


def test_a_timer_wait_in_a_for_each_runs_once_per_iteration():
    plan = plan_of([{"for_each": "each", "items": "${ xs }", "steps": [{"wait": "pause", "for": "1s"}, "work"]}])
    sim = Sim(plan, input={"xs": [1, 2]}).run()
    assert sim.status == "completed"
    assert sorted(c["timer_id"] for c in sim.commands if c["op"] == "schedule_timer") == [
        "r1/each[0]/pause@wait", "r1/each[1]/pause@wait"]
    assert [d["at"] for d in sim.dispatches if d["node"] == "work"] == [2000, 2000]
