"""Kernel: late completions — a success for a compensable step the run recorded as cancelled, failed or timed out
(a worker whose lease had expired finished anyway) ends the run, or makes the ended run, ``needs_intervention``
with the step left to undo by hand (docs/kernel.md, "Late completions")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowdsl.kernel import LATE_REASON, STATE_VERSION, apply, left_to_undo, replay, start_event, start_run, summary
from flowdsl.kernel_saga import AFTER_UNDO_REASON, IN_FLIGHT_REASON, LATE_JOINED_REASON
from tests.kernel.plans import plan_of, plan_yaml
from tests.kernel.sim import Sim, fail, hang, ok

CHARGE = {"charge": {"compensate": "refund"}}


class Driver:
    """Feeds input events one at a time, keeping them (with the ``start`` event) for replay."""

    def __init__(self, plan: dict[str, Any], run_input: dict[str, Any] | None = None, kernel: int = STATE_VERSION):
        self.plan = plan
        self.inputs = [{**start_event("r1", run_input or {}, at=0, seed=7), "kernel": kernel}]
        d = start_run(plan, "r1", run_input or {}, at=0, seed=7, kernel=kernel)
        self.state, self.commands, self.events = d.state, list(d.commands), list(d.events)

    def feed(self, **event: Any) -> list[dict[str, Any]]:
        event.setdefault("at", len(self.inputs) * 10)
        self.inputs.append(event)
        d = apply(self.plan, self.state, event)
        assert json.loads(json.dumps(d.state)) == d.state
        self.commands += d.commands
        self.events += d.events
        return d.events

    def types(self, events: list[dict[str, Any]]) -> list[str]:
        return [e["type"] for e in events]


def _cancelled_charge(run_input: dict[str, Any] | None = None) -> Driver:
    """charge (compensate: refund) -> ship; cancelled while charge runs; the runtime confirms: ``cancelled``."""
    drv = Driver(plan_of([CHARGE, "ship"]), run_input)
    drv.feed(type="cancel_requested", reason="customer cancelled")
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    assert drv.state["status"] == "cancelled" and drv.state["compensated"] == []
    return drv


def test_a_late_success_after_the_run_was_cancelled_makes_it_needs_intervention():
    drv = _cancelled_charge({"order": 7})
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected", "late_completion", "run_finished"]
    rejected, late, finished = events
    assert rejected["reason"] == "run finished"  # as before
    assert late["step"] == "charge" and late["task_id"] == "r1/charge#1" and late["attempt"] == 1
    assert late["idempotency_key"] == "r1/charge" and late["compensation"] == "refund"
    assert late["run_status"] == "cancelled" and late["at"] == events[0]["at"]
    assert finished["status"] == "needs_intervention" and finished["previous_status"] == "cancelled"
    assert finished["compensated"] == [] and finished["error"]["type"] == "Cancelled"
    s = drv.state
    assert s["status"] == "needs_intervention" and s["nodes"]["charge"]["status"] == "cancelled"
    assert [e["step"] for e in s["late_completions"]] == ["charge"]
    [item] = s["intervention"]["steps"]
    assert item["step"] == "charge" and item["worker"] == "refund" and item["status"] == "not_attempted"
    assert item["step_idempotency_key"] == "r1/charge" and item["idempotency_key"] == "r1/charge/compensate"
    assert item["reason"] == LATE_REASON and "lease had expired" in item["reason"]
    assert item["step_result"] == {"charge_id": "ch_1"}
    assert item["input"] == {"order": 7, "charge_id": "ch_1"}  # what the refund would have been given
    assert summary(drv.plan, s)["intervention"] == s["intervention"]
    # a second late success of the same step (another holder of the attempt) is only rejected
    again = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(again) == ["result_rejected"] and len(s["intervention"]["steps"]) == 1
    # replay reproduces the state, the commands and the events exactly
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_a_late_success_after_a_sibling_failed_ends_the_saga_needs_intervention():
    # a, then a parallel: charge (compensable) cancelled as reserve fails; charge's late success arrives while
    # a is being undone: the saga goes on (a is refunded) and the run ends needs_intervention, not compensated
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"parallel": "g", "branches": [CHARGE, "reserve"]}])
    drv = Driver(plan)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={})
    drv.feed(type="task_failed", task_id="r1/reserve#1", error={"type": "OutOfStock", "message": "none left"})
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    assert drv.state["status"] == "compensating"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"paid": True})
    assert drv.types(events) == ["result_rejected", "late_completion"]
    assert events[0]["reason"] == "stale or unknown task" and events[1]["run_status"] == "compensating"
    assert drv.state["status"] == "compensating"  # nothing else changes until the saga is done
    events = drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.types(events) == ["compensation_succeeded", "run_finished"]
    assert events[-1]["status"] == "needs_intervention" and events[-1]["compensated"] == ["a"]
    assert "previous_status" not in events[-1]
    assert [i["step"] for i in drv.state["intervention"]["steps"]] == ["charge"]
    assert drv.state["intervention"]["steps"][0]["reason"] == LATE_REASON
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_under_version_3_a_late_success_while_siblings_are_still_in_flight_ends_needs_intervention():
    plan = plan_of([{"parallel": "g", "branches": [CHARGE, "reserve", "slow"]}])
    drv = Driver(plan, kernel=3)
    drv.feed(type="task_failed", task_id="r1/reserve#1", error={"type": "OutOfStock"})
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    assert drv.state["status"] == "aborting"
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/charge#1", result={})) == [
        "result_rejected",
        "late_completion",
    ]
    events = drv.feed(type="task_cancelled", task_id="r1/slow#1")
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "needs_intervention"
    assert [i["step"] for i in drv.state["intervention"]["steps"]] == ["charge"]


def test_a_late_success_while_siblings_are_still_in_flight_joins_the_saga():
    """Kernel version 4: nothing has been undone yet, so the step is undone with the others (it was left to undo by
    hand, and the steps before it undone beneath it)."""
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"parallel": "g", "branches": [CHARGE, "reserve", "slow"]}])
    drv = Driver(plan, {"order": 7})
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={"a_done": True})
    drv.feed(type="task_failed", task_id="r1/reserve#1", error={"type": "OutOfStock"})
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    assert drv.state["status"] == "aborting"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected", "late_completion"]
    late = events[1]
    assert late["by_hand"] is False and late["reason"] == LATE_JOINED_REASON and late["run_status"] == "aborting"
    assert late["compensation"] == "refund" and late["task_id"] == "r1/charge#1"
    assert drv.state["late_completions"] == [] and drv.state["nodes"]["charge"]["status"] == "cancelled"
    events = drv.feed(type="task_cancelled", task_id="r1/slow#1")  # nothing in flight: the saga begins
    [refund] = [c for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"]
    assert refund["step"] == "charge" and refund["input"] == {"order": 7, "a_done": True, "charge_id": "ch_1"}
    assert drv.types(events)[-1] == "compensation_started"  # undo_a waits for the refund: a came first
    events = drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["charge", "a"]
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    s = drv.state
    assert s["status"] == "compensated" and s["compensated"] == ["charge", "a"] and s["intervention"] is None
    # a second late success of the step (another holder of the attempt) is only rejected
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/charge#1", result={})) == ["result_rejected"]
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_a_timed_out_step_completing_while_a_sibling_runs_is_undone_before_the_step_it_follows():
    """The audit's case: a, then sa (times out, its call completes later) beside sb (still running). sa and sb ran
    side by side, so their undos run together; a's waits for both."""
    plan = plan_of([{"a": {"compensate": "undo_a"}},
                    {"parallel": "p", "branches": [{"sa": {"compensate": "undo_sa", "timeout": "100ms"}},
                                                   {"sb": {"compensate": "undo_sb"}}]}])
    drv = Driver(plan)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={})
    drv.feed(type="timer_fired", timer_id="r1/sa#1@timeout")
    assert drv.state["status"] == "aborting" and drv.state["failed_step"] == "sa"
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/sa#1", result={}))[-1] == "late_completion"
    drv.feed(type="task_succeeded", task_id="r1/sb#1", result={})  # awaited (it answered its cancel too late)
    undos = [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"]
    assert undos == ["sb", "sa"]
    drv.feed(type="task_succeeded", task_id="r1/sa#c1", result={})
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["sb", "sa"]
    drv.feed(type="task_succeeded", task_id="r1/sb#c1", result={})
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    s = drv.state
    assert s["status"] == "compensated" and s["compensated"] == ["sa", "sb", "a"]
    assert s["nodes"]["sa"]["status"] == "failed" and s["error"]["type"] == "StepTimeout"
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_a_late_success_while_compensating_joins_when_nothing_it_follows_is_being_undone():
    # a, then charge (times out) beside b: b is being undone, a waits for it; charge's late success joins, and a
    # now waits for charge's refund as well
    plan = plan_of([{"a": {"compensate": "undo_a"}},
                    {"parallel": "g", "branches": [{"charge": {"compensate": "refund", "timeout": "100ms"}},
                                                   {"b": {"compensate": "undo_b"}}]}])
    drv = Driver(plan)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={})
    drv.feed(type="task_succeeded", task_id="r1/b#1", result={})
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    assert drv.state["status"] == "compensating"
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["b"]
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={})
    assert drv.types(events) == ["result_rejected", "late_completion", "compensation_started"]
    assert events[1]["by_hand"] is False and events[2]["step"] == "charge"
    drv.feed(type="task_succeeded", task_id="r1/b#c1", result={})
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["b", "charge"]
    drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.state["status"] == "compensated" and drv.state["compensated"] == ["b", "charge", "a"]
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_a_late_success_after_a_timeout_that_failed_the_step():
    plan = plan_of([{"charge": {"compensate": "refund", "timeout": "50ms"}}])
    sim = Sim(plan, {"charge": hang()}).run()
    assert sim.status == "failed" and sim.state["nodes"]["charge"]["status"] == "failed"
    d = apply(plan, sim.state, {"type": "task_succeeded", "task_id": "r1/charge#1", "at": 5000, "result": {}})
    assert [e["type"] for e in d.events] == ["result_rejected", "late_completion", "run_finished"]
    assert d.state["status"] == "needs_intervention"
    assert d.events[-1]["previous_status"] == "failed"


def test_a_late_success_adds_to_an_intervention_already_recorded():
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"parallel": "g", "branches": [CHARGE, "reserve"]}])
    sim = Sim(plan, {"reserve": fail(after=20), "charge": hang(), "a/compensate": fail("RefundDown")}).run()
    assert sim.status == "needs_intervention"
    assert [i["step"] for i in sim.state["intervention"]["steps"]] == ["a"]
    d = apply(plan, sim.state, {"type": "task_succeeded", "task_id": "r1/charge#1", "at": 9000, "result": {}})
    assert [e["type"] for e in d.events] == ["result_rejected", "late_completion", "run_finished"]
    assert [i["step"] for i in d.state["intervention"]["steps"]] == ["charge", "a"]
    assert (
        d.state["intervention"]["steps"][1]["status"] == "failed"
        and "reason" not in d.state["intervention"]["steps"][1]
    )


def test_a_duplicate_late_success_of_a_step_that_succeeded_is_unchanged():
    plan = plan_of([CHARGE, "ship"])
    sim = Sim(plan, {"ship": fail()}).run()
    assert sim.status == "compensated"
    before = json.loads(json.dumps(sim.state))
    d = apply(plan, sim.state, {"type": "task_succeeded", "task_id": "r1/charge#1", "at": 9000, "result": {}})
    assert [(e["type"], e["reason"]) for e in d.events] == [("result_rejected", "run finished")]
    assert d.commands == []
    after = json.loads(json.dumps(d.state))
    assert after.pop("seq") == before.pop("seq") + 1 and after == before


def test_a_late_success_of_a_step_without_compensation_is_unchanged():
    plan = plan_of(["charge", "ship"])
    d = start_run(plan, "r1", {}, at=0)
    apply(plan, d.state, {"type": "cancel_requested", "at": 1})
    apply(plan, d.state, {"type": "task_cancelled", "task_id": "r1/charge#1", "at": 2})
    assert d.state["status"] == "cancelled"
    before = json.loads(json.dumps(d.state))
    late = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/charge#1", "at": 3, "result": {}})
    assert [(e["type"], e["reason"]) for e in late.events] == [("result_rejected", "run finished")]
    after = json.loads(json.dumps(late.state))
    assert after.pop("seq") == before.pop("seq") + 1 and after == before


def test_a_stale_attempt_while_a_newer_one_is_in_flight_is_only_kept_on_the_record():
    plan = plan_of(
        [{"charge": {"compensate": "refund", "timeout": "50ms", "retry": {"attempts": 2, "initial": "10ms"}}}, "ship"]
    )
    d = start_run(plan, "r1", {}, at=0)
    apply(plan, d.state, {"type": "timer_fired", "timer_id": "r1/charge#1@timeout", "at": 50})
    retry = next(t for t, v in d.state["timers"].items() if v["purpose"] == "retry")
    apply(plan, d.state, {"type": "timer_fired", "timer_id": retry, "at": 100})
    assert "r1/charge#2" in d.state["tasks"]
    before = json.loads(json.dumps(d.state))
    late = apply(plan, d.state, {"type": "task_succeeded", "task_id": "r1/charge#1", "at": 101, "result": {}})
    assert [(e["type"], e["reason"]) for e in late.events] == [("result_rejected", "stale or unknown task")]
    assert late.commands == []
    after = json.loads(json.dumps(late.state))
    assert after["nodes"]["charge"].pop("late") == {"task_id": "r1/charge#1", "attempt": 1, "result": {}}
    assert after.pop("seq") == before.pop("seq") + 1 and after == before


def test_results_that_are_not_completions_are_unchanged():
    plan = plan_of([{"charge": {"compensate": "refund", "fail_when": "${ declined }"}}, "ship"])
    for task_id, result in (
        ("r1/charge#1", {"declined": True}),  # the step would have failed with it
        ("r1/charge#1", [1, 2]),  # not an object: the attempt would have failed
        ("r1/charge#9", {}),  # no such attempt
        ("r1/charge#c1", {}),  # a compensation's id
        ("other/charge#1", {}),
    ):  # another run's
        drv = _cancelled_charge_of(plan)
        events = drv.feed(type="task_succeeded", task_id=task_id, result=result)
        assert drv.types(events) == ["result_rejected"], task_id
        assert drv.state["status"] == "cancelled" and drv.state["late_completions"] == []


def _cancelled_charge_of(plan: dict[str, Any]) -> Driver:
    drv = Driver(plan)
    drv.feed(type="cancel_requested")
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    return drv


def test_an_ordinary_run_is_unchanged_and_records_no_late_completion():
    sim = Sim(plan_of([CHARGE, "ship"]), {"ship": ok({"s": 1})}).run()
    assert sim.status == "completed" and sim.state["late_completions"] == []
    assert [e for e in sim.events if e["type"] == "late_completion"] == []


def test_a_run_started_before_the_rule_replays_and_goes_on_under_its_old_rules():
    """A record or journal written before late completions existed (its ``start`` event carries no ``kernel``
    version): replaying it gives the decisions it recorded, and it goes on without the rule — else every old
    record with a late result would replay to another end than the one it shows (and fail `show`'s check)."""
    drv = _cancelled_charge()
    old_start = {k: v for k, v in drv.inputs[0].items() if k != "kernel"}
    assert drv.inputs[0]["kernel"] == STATE_VERSION and "kernel" not in old_start
    late = {"type": "task_succeeded", "task_id": "r1/charge#1", "result": {}, "at": 99}
    state, _, events = replay(drv.plan, [old_start, *drv.inputs[1:], late])
    assert state["kernel"] == 1 and "late_completions" not in state
    assert state["status"] == "cancelled" and events[-1]["type"] == "result_rejected"
    state, _, events = replay(drv.plan, [*drv.inputs, late])  # started under version 2 on: the rule holds
    assert state["status"] == "needs_intervention" and events[-1]["type"] == "run_finished"


# --- a late success that arrives before the step's record has ended ------------------------------------------------

RETRIED = {"compensate": "refund", "timeout": "50ms", "retry": {"attempts": 2, "initial": "10ms"}}


def _retry_timer(drv: Driver, step: str) -> str:
    return next(t for t, v in drv.state["timers"].items() if v["purpose"] == "retry" and v["step"] == step)


def _first_success_while_cancelling(kernel: int = STATE_VERSION) -> Driver:
    """charge's attempt #1 times out, #2 is in flight, its sibling fails (charge is being cancelled), and then #1's
    success arrives: rejected as stale, kept on charge's record."""
    drv = Driver(plan_of([{"parallel": "g", "branches": [{"charge": RETRIED}, "reserve"]}]), kernel=kernel)
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="task_failed", task_id="r1/reserve#1", error={"type": "OutOfStock", "message": "x"})
    assert drv.state["nodes"]["charge"]["status"] == "cancelling"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert [(e["type"], e["reason"]) for e in events] == [("result_rejected", "stale or unknown task")]
    assert drv.state["late_completions"] == [] and drv.state["status"] == "aborting"
    return drv


def _first_success_while_waiting_to_retry(kernel: int = STATE_VERSION) -> Driver:
    """charge's attempt #1 times out (retried on StepTimeout only); #1's success arrives while charge waits to retry;
    #2 is dispatched."""
    drv = Driver(plan_of([{"charge": {**RETRIED, "retry": {**RETRIED["retry"], "on": ["StepTimeout"]}}}]), {"o": 1},
                 kernel=kernel)
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    assert drv.state["nodes"]["charge"]["status"] == "retrying"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected"] and drv.state["late_completions"] == []
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    assert "r1/charge#2" in drv.state["tasks"]
    return drv


def _assert_late_charge(drv: Driver, events: list[dict[str, Any]], run_input: dict[str, Any], ended: str) -> None:
    """charge's kept success became a late completion as the step ended (``ended``: that event's type): under kernel
    version 3 left to undo by hand, the run ending needs_intervention; under 4 undone in the saga."""
    s = drv.state
    late = events[1]
    assert (late["step"], late["task_id"], late["attempt"]) == ("charge", "r1/charge#1", 1)
    assert late["run_status"] == "aborting" and "late" not in s["nodes"]["charge"]
    if s["kernel"] == 3:
        assert drv.types(events) == [ended, "late_completion", "run_finished"]
        assert s["status"] == "needs_intervention" and events[-1]["status"] == "needs_intervention"
        assert "previous_status" not in events[-1]  # the run ended once, needs_intervention
        assert late["reason"] == LATE_REASON and "by_hand" not in late
        [entry] = s["late_completions"]
        assert entry["task_id"] == "r1/charge#1" and entry["result"] == {"charge_id": "ch_1"}
        [item] = s["intervention"]["steps"]
        assert (item["step"], item["status"], item["reason"]) == ("charge", "not_attempted", LATE_REASON)
        assert item["step_result"] == {"charge_id": "ch_1"} and item["input"] == {**run_input, "charge_id": "ch_1"}
    else:
        assert drv.types(events) == [ended, "late_completion", "compensation_started"]
        assert late["reason"] == LATE_JOINED_REASON and late["by_hand"] is False
        [refund] = [c for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"]
        assert refund["step"] == "charge" and refund["input"] == {**run_input, "charge_id": "ch_1"}
        events = drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
        assert drv.types(events) == ["compensation_succeeded", "run_finished"]
        assert s["status"] == ("cancelled" if s["abort"] == "cancelled" else "compensated")
        assert s["compensated"] == ["charge"] and s["late_completions"] == [] and s["intervention"] is None
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


@pytest.mark.parametrize("kernel", [3, STATE_VERSION])
def test_a_success_of_an_earlier_attempt_while_the_step_is_cancelled_is_a_late_completion_when_it_ends(kernel: int
                                                                                                      ) -> None:
    drv = _first_success_while_cancelling(kernel)
    events = drv.feed(type="task_cancelled", task_id="r1/charge#2")
    assert drv.state["nodes"]["charge"]["status"] == "cancelled"
    _assert_late_charge(drv, events, {}, "step_cancelled")


@pytest.mark.parametrize("kernel", [3, STATE_VERSION])
def test_a_success_of_an_earlier_attempt_while_the_step_is_cancelled_and_the_newer_one_fails(kernel: int) -> None:
    drv = _first_success_while_cancelling(kernel)
    events = drv.feed(type="task_failed", task_id="r1/charge#2", error={"type": "Declined", "message": "x"})
    assert drv.state["nodes"]["charge"]["status"] == "failed"
    _assert_late_charge(drv, events, {}, "step_failed")


@pytest.mark.parametrize("kernel", [3, STATE_VERSION])
def test_a_success_of_an_earlier_attempt_while_waiting_to_retry_is_a_late_completion_when_the_step_fails(kernel: int
                                                                                                        ) -> None:
    drv = _first_success_while_waiting_to_retry(kernel)
    events = drv.feed(type="task_failed", task_id="r1/charge#2", error={"type": "Declined", "message": "dup"})
    assert drv.state["nodes"]["charge"]["status"] == "failed"
    _assert_late_charge(drv, events, {"o": 1}, "step_failed")


@pytest.mark.parametrize("kernel", [3, STATE_VERSION])
def test_a_success_of_an_earlier_attempt_kept_while_waiting_to_retry_when_the_run_is_cancelled(kernel: int) -> None:
    drv = Driver(plan_of([{"charge": RETRIED}]), {"o": 1}, kernel=kernel)
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    events = drv.feed(type="cancel_requested")
    assert drv.state["nodes"]["charge"]["status"] == "cancelled"
    _assert_late_charge(drv, events, {"o": 1}, "step_cancelled")


def test_a_success_of_an_earlier_attempt_then_the_newer_attempt_succeeds_is_undone_normally():
    drv = _first_success_while_cancelling()
    events = drv.feed(type="task_succeeded", task_id="r1/charge#2", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["step_succeeded", "compensation_started"]  # the same effect: undone as usual
    assert "late" not in drv.state["nodes"]["charge"]
    events = drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    assert drv.types(events) == ["compensation_succeeded", "run_finished"]
    assert drv.state["status"] == "compensated" and drv.state["late_completions"] == []
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_success_of_an_earlier_attempt_while_waiting_to_retry_then_the_retry_succeeds_is_unchanged():
    plan = plan_of([{"charge": RETRIED}, "ship"])
    drv = Driver(plan)
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="task_succeeded", task_id="r1/charge#2", result={"charge_id": "ch_1"})
    assert "late" not in drv.state["nodes"]["charge"]
    events = drv.feed(type="task_failed", task_id="r1/ship#1", error={"type": "Down", "message": "x"})
    assert drv.types(events) == ["step_failed", "compensation_started"]  # the run aborts later: a normal undo
    events = drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    assert drv.state["status"] == "compensated" and drv.state["late_completions"] == []
    assert [e for e in drv.events if e["type"] == "late_completion"] == []
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_run_started_before_the_rule_keeps_no_early_success():
    drv = _first_success_while_cancelling()
    old_start = {k: v for k, v in drv.inputs[0].items() if k != "kernel"}
    cancelled = {"type": "task_cancelled", "task_id": "r1/charge#2", "at": 99}
    state, _, events = replay(drv.plan, [old_start, *drv.inputs[1:], cancelled])
    assert "late" not in state["nodes"]["charge"] and state["status"] == "failed"
    assert [e for e in events if e["type"] == "late_completion"] == []


# --- attempts that were never dispatched ----------------------------------------------------------------------------


def test_a_fallback_attempt_that_was_never_dispatched_is_only_rejected():
    plan = plan_of([{"g": {"llm": {"signature": "x -> y"}, "fallback": "fb", "compensate": "undo_g"}}])
    base = Driver(plan)
    base.feed(type="task_failed", task_id="r1/g#1", error={"type": "LLMNotConfigured", "message": "none"})
    base.feed(type="cancel_requested")
    base.feed(type="task_cancelled", task_id="r1/g#f1")
    assert base.state["status"] == "cancelled"
    assert (base.state["nodes"]["g"]["attempts"], base.state["nodes"]["g"]["phase"]) == (2, "fallback")
    for task_id in ("r1/g#f2", "r1/g#2", "r1/g#f0", "r1/g#01"):  # only #1 and #f1 were dispatched
        drv = Driver(plan)
        for event in base.inputs[1:]:
            drv.feed(**event)
        events = drv.feed(type="task_succeeded", task_id=task_id, result={"y": 1})
        assert drv.types(events) == ["result_rejected"], task_id
        assert drv.state["status"] == "cancelled" and drv.state["late_completions"] == []
    for task_id in ("r1/g#1", "r1/g#f1"):  # those were: late completions
        drv = Driver(plan)
        for event in base.inputs[1:]:
            drv.feed(**event)
        events = drv.feed(type="task_succeeded", task_id=task_id, result={"y": 1})
        assert drv.types(events) == ["result_rejected", "late_completion", "run_finished"], task_id


def test_a_main_attempt_beyond_the_main_phase_is_only_rejected():
    # without a fallback phase, no #f<n> exists
    drv = _cancelled_charge()
    events = drv.feed(type="task_succeeded", task_id="r1/charge#f1", result={})
    assert drv.types(events) == ["result_rejected"] and drv.state["late_completions"] == []


# --- what a run stopped at once leaves to undo ---------------------------------------------------------------------


def test_left_to_undo_lists_a_compensable_step_in_flight_after_the_completed_ones():
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"parallel": "g", "branches": [CHARGE, "reserve",
                                                                                   {"b": {"compensate": "undo_b"}}]}])
    drv = Driver(plan, {"o": 1})
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={"a": 1})
    assert [i["step"] for i in left_to_undo(plan, drv.state)] == ["a", "b", "charge"]  # latest started first
    drv.feed(type="cancel_requested")  # charge, reserve and b are being cancelled: a sync worker may not stop
    left = left_to_undo(plan, drv.state)
    assert [(i["step"], i["status"]) for i in left] == [("a", "not_attempted"), ("b", "in_flight"),
                                                        ("charge", "in_flight")]
    charge = left[2]
    assert charge["reason"] == IN_FLIGHT_REASON and "reason" not in left[0]
    assert (charge["worker"], charge["attempts"], charge["last_error"]) == ("refund", 0, None)
    assert charge["idempotency_key"] == "r1/charge/compensate" and charge["step_result"] is None
    assert charge["input"] == {"o": 1, "a": 1}  # the context it saw (its result is not known)
    # once confirmed cancelled, it is no longer listed; a kept early success lists it as completed late
    drv.feed(type="task_cancelled", task_id="r1/charge#1")
    assert [i["step"] for i in left_to_undo(plan, drv.state)] == ["a", "b"]


def test_left_to_undo_lists_a_step_with_a_kept_early_success_as_completed_late():
    drv = _first_success_while_waiting_to_retry()
    drv.feed(type="task_started", task_id="r1/charge#2")
    [item] = left_to_undo(drv.plan, drv.state)
    assert (item["step"], item["status"], item["reason"]) == ("charge", "not_attempted", LATE_REASON)
    assert item["step_result"] == {"charge_id": "ch_1"} and item["input"] == {"o": 1, "charge_id": "ch_1"}


def _unmapped(kernel: int, attempts: int = 1) -> Driver:
    """a, then b whose worker succeeds but whose output map fails on its result (a charge made, its amount
    unreadable)."""
    b = {"compensate": "undo_b", "output": {"amount": "${ $number(amount) }"}, "retry": {"attempts": attempts}}
    drv = Driver(plan_of([{"a": {"compensate": "undo_a"}}, {"b": b}]), {"order": 7}, kernel=kernel)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={"a_done": True})
    drv.feed(type="task_succeeded", task_id="r1/b#1", result={"charge_id": "ch_1", "amount": "12,50"})
    return drv


def test_a_step_whose_output_map_fails_after_its_worker_succeeded_is_undone() -> None:
    """The worker made its effect; the step failed on its output map. It was left out of the undo while the run
    said `compensated`."""
    drv = _unmapped(STATE_VERSION)
    s = drv.state
    assert s["status"] == "compensating" and s["nodes"]["b"]["status"] == "failed"
    assert s["error"]["type"] == "ExpressionError"
    [late] = [e for e in drv.events if e["type"] == "late_completion"]
    assert late["step"] == "b" and late["by_hand"] is False and "output map failed" in late["reason"]
    undos = [c for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"]
    assert [c["step"] for c in undos] == ["b"]  # b first: a waits for it
    assert undos[0]["input"] == {"order": 7, "a_done": True, "charge_id": "ch_1", "amount": "12,50"}
    drv.feed(type="task_succeeded", task_id="r1/b#c1", result={})
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert s["status"] == "compensated" and s["compensated"] == ["b", "a"]
    state, commands, events = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and events == drv.events


def test_under_version_3_a_step_whose_output_map_failed_is_not_undone() -> None:
    drv = _unmapped(3)
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["a"]
    assert not [e for e in drv.events if e["type"] == "late_completion"]


def test_a_retry_that_succeeds_after_an_output_map_failure_is_undone_once_as_usual() -> None:
    drv = _unmapped(STATE_VERSION, attempts=2)
    assert drv.state["nodes"]["b"]["status"] == "retrying" and "late" in drv.state["nodes"]["b"]
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "b"))
    drv.feed(type="task_succeeded", task_id="r1/b#2", result={"charge_id": "ch_1", "amount": "12.50"})
    rec = drv.state["nodes"]["b"]
    assert rec["status"] == "succeeded" and "late" not in rec and rec["out"] == {"amount": 12.5}


UNDO_RETRIED = {"worker": "undo_a", "timeout": "100ms", "retry": {"attempts": 3, "initial": "10ms"}}


def _undo_timed_out(kernel: int = STATE_VERSION) -> Driver:
    """a (its undo retried, 100 ms per attempt) then b, which fails: a's undo attempt 1 times out."""
    drv = Driver(plan_of([{"a": {"compensate": UNDO_RETRIED}}, "b"]), kernel=kernel)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={})
    drv.feed(type="task_failed", task_id="r1/b#1", error={"type": "Down", "message": "x"})
    drv.feed(type="timer_fired", timer_id="r1/a#c1@timeout")
    assert drv.state["compensations"]["a"]["status"] == "retrying"
    return drv


def test_a_timed_out_undo_attempt_that_succeeds_while_the_undo_waits_to_retry_completes_it() -> None:
    """The success was rejected: a retry ran, and had it failed the record said the undo failed for good."""
    drv = _undo_timed_out()
    events = drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.types(events) == ["result_rejected", "compensation_succeeded", "run_finished"]
    assert events[1]["attempt"] == 1 and events[1]["task_id"] == "r1/a#c1"
    s = drv.state
    assert s["status"] == "compensated" and s["compensated"] == ["a"] and s["timers"] == {}
    assert {"op": "cancel_timer", "timer_id": "r1/a#c2@retry"} in [
        {k: c[k] for k in ("op", "timer_id")} for c in drv.commands if c["op"] == "cancel_timer"]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_timed_out_undo_attempt_that_succeeds_while_a_newer_one_runs_completes_it_and_gives_that_up() -> None:
    drv = _undo_timed_out()
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "a"))
    assert "r1/a#c2" in drv.state["tasks"]
    events = drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.types(events) == ["result_rejected", "compensation_succeeded", "run_finished"]
    assert drv.state["status"] == "compensated" and drv.state["tasks"] == {}
    assert any(c["op"] == "cancel_task" and c["task_id"] == "r1/a#c2" for c in drv.commands)
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/a#c2", result={})) == ["result_rejected"]
    assert drv.state["compensated"] == ["a"]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_under_version_3_a_timed_out_undo_attempt_s_success_is_only_rejected() -> None:
    drv = _undo_timed_out(kernel=3)
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})) == ["result_rejected"]
    assert drv.state["compensations"]["a"]["status"] == "retrying"


@pytest.mark.parametrize("kernel", [3, STATE_VERSION])
def test_a_late_success_whose_output_map_fails_is_a_late_completion_all_the_same(kernel: int) -> None:
    """On time such a success is undone (its effect stands); late it was only rejected, the run staying failed with
    the charge made."""
    charge = {"compensate": "refund", "timeout": "50ms", "output": {"amount": "${ $number(amount) }"}}
    drv = Driver(plan_of([{"charge": charge}]), kernel=kernel)
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    assert drv.state["status"] == "failed"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1", "amount": "12,50"})
    if kernel == 3:
        assert drv.types(events) == ["result_rejected"] and drv.state["status"] == "failed"
        return
    assert drv.types(events) == ["result_rejected", "late_completion", "run_finished"]
    assert drv.state["status"] == "needs_intervention"
    [item] = drv.state["intervention"]["steps"]
    assert item["step"] == "charge" and item["step_result"] == {"charge_id": "ch_1", "amount": "12,50"}
    assert item["input"] == {"charge_id": "ch_1", "amount": "12,50"}  # the context plus the raw result
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


UNDO_ONCE = {"worker": "undo_a", "timeout": "100ms", "retry": 1}


def _undo_failed_for_good(kernel: int = STATE_VERSION, cancel: bool = False) -> Driver:
    """a (its undo: one attempt of 100 ms) then b, which fails (or the run is cancelled while b runs): a's undo
    times out, once and for good: the run ends ``needs_intervention`` with a left to undo by hand."""
    drv = Driver(plan_of([{"a": {"compensate": UNDO_ONCE}}, "b"]), kernel=kernel)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={"charge_id": "ch_1"})
    if cancel:
        drv.feed(type="cancel_requested", reason="customer cancelled")
        drv.feed(type="task_cancelled", task_id="r1/b#1")
    else:
        drv.feed(type="task_failed", task_id="r1/b#1", error={"type": "Down", "message": "x"})
    drv.feed(type="timer_fired", timer_id="r1/a#c1@timeout")
    assert drv.state["status"] == "needs_intervention"
    assert [(i["step"], i["status"]) for i in drv.state["intervention"]["steps"]] == [("a", "failed")]
    return drv


@pytest.mark.parametrize("cancel", [False, True], ids=["failed", "cancelled"])
def test_a_timed_out_undo_that_succeeds_after_the_run_ended_needs_intervention_takes_the_step_off_the_list(
        cancel: bool) -> None:
    """The undo's attempt went on after its timeout and refunded: the run said to refund by hand — a second
    refund. Now the run ends as its saga would have (``compensated``, or ``cancelled``), said again."""
    drv = _undo_failed_for_good(cancel=cancel)
    events = drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.types(events) == ["result_rejected", "compensation_succeeded", "run_finished"]
    undone, finished = events[1:]
    assert (undone["step"], undone["attempt"], undone["task_id"], undone["after_failure"]) == ("a", 1, "r1/a#c1", True)
    ended = "cancelled" if cancel else "compensated"
    assert finished["status"] == ended and finished["previous_status"] == "needs_intervention"
    assert finished["compensated"] == ["a"] and finished.get("step") == (None if cancel else "b")
    s = drv.state
    assert s["status"] == ended and s["intervention"] is None and s["compensated"] == ["a"]
    assert s["compensations"]["a"]["status"] == "done" and s["compensations"]["a"]["error"] is None
    assert s["error"]["type"] == ("Cancelled" if cancel else "Down")
    assert summary(drv.plan, s)["status"] == ended
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})) == ["result_rejected"]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_timed_out_undo_that_succeeds_after_the_end_leaves_the_steps_it_held_back_listed() -> None:
    """p, then q (both undone), then r fails: q's undo fails for good, so p's is never run. q's undo then
    succeeds: q leaves the list; p stays (the run starts nothing after its end), and so does the status."""
    drv = Driver(plan_of([{"p": {"compensate": "undo_p"}}, {"q": {"compensate": UNDO_ONCE}}, "r"]))
    drv.feed(type="task_succeeded", task_id="r1/p#1", result={})
    drv.feed(type="task_succeeded", task_id="r1/q#1", result={})
    drv.feed(type="task_failed", task_id="r1/r#1", error={"type": "Down", "message": "x"})
    drv.feed(type="timer_fired", timer_id="r1/q#c1@timeout")
    assert [(i["step"], i["status"]) for i in drv.state["intervention"]["steps"]] == [
        ("q", "failed"), ("p", "not_attempted")]
    events = drv.feed(type="task_succeeded", task_id="r1/q#c1", result={})
    assert drv.types(events) == ["result_rejected", "compensation_succeeded"]
    s = drv.state
    assert s["status"] == "needs_intervention" and s["compensated"] == ["q"]
    assert [(i["step"], i["status"]) for i in s["intervention"]["steps"]] == [("p", "not_attempted")]
    assert not any(c["op"] == "dispatch" and c["kind"] == "compensate" and c["step"] == "p" for c in drv.commands)
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_timed_out_undo_that_succeeds_while_others_are_undone_releases_the_undos_it_held_back() -> None:
    """The same, while the run is still compensating (a parallel branch's undo runs): the undo the failed one
    held back is started, and the run ends ``compensated``."""
    plan = plan_yaml("""
flowdsl: 1
name: t
steps:
  - p: {worker: w, compensate: undo_p}
  - parallel: g
    branches:
      - q: {worker: w, compensate: {worker: undo_q, timeout: 100ms, retry: 1}}
      - s: {worker: w, compensate: undo_s}
  - r: {worker: w}
""")
    drv = Driver(plan)
    drv.feed(type="task_succeeded", task_id="r1/p#1", result={})
    drv.feed(type="task_succeeded", task_id="r1/q#1", result={})
    drv.feed(type="task_succeeded", task_id="r1/s#1", result={})
    drv.feed(type="task_failed", task_id="r1/r#1", error={"type": "Down", "message": "x"})
    drv.feed(type="timer_fired", timer_id="r1/q#c1@timeout")  # q's undo fails for good; s's still runs
    assert drv.state["status"] == "compensating" and drv.state["compensations"]["q"]["status"] == "failed"
    events = drv.feed(type="task_succeeded", task_id="r1/q#c1", result={})
    assert drv.types(events) == ["result_rejected", "compensation_succeeded"]
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/s#c1", result={})) == [
        "compensation_succeeded", "compensation_started"]  # p's undo: held back by q's, now free
    events = drv.feed(type="task_succeeded", task_id="r1/p#c1", result={})
    assert drv.types(events) == ["compensation_succeeded", "run_finished"]
    assert drv.state["status"] == "compensated" and drv.state["compensated"] == ["q", "s", "p"]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_under_version_4_a_timed_out_undo_s_success_after_it_failed_for_good_is_only_rejected() -> None:
    drv = _undo_failed_for_good(kernel=4)
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})) == ["result_rejected"]
    assert drv.state["status"] == "needs_intervention" and drv.state["intervention"]["steps"][0]["step"] == "a"


def test_a_success_of_an_undo_attempt_never_dispatched_is_only_rejected() -> None:
    drv = _undo_failed_for_good()
    for task_id in ("r1/a#c2", "r1/a#c01", "r1/a#c0"):
        assert drv.types(drv.feed(type="task_succeeded", task_id=task_id, result={})) == ["result_rejected"]
    assert drv.state["status"] == "needs_intervention"


# --- a step that completed again after its undo had begun (kernel version 7) --------------------------------------

#: charge's attempt 1 times out, its retry succeeds; ship then fails and the saga undoes charge, then a
RETRIED_ON_TIMEOUT = {"compensate": "refund", "timeout": "50ms",
                      "retry": {"attempts": 2, "initial": "10ms", "on": ["StepTimeout"]}}


def _retried_then_undone(kernel: int = STATE_VERSION, *, until: str = "end") -> Driver:
    """a, then charge (attempt 1 times out, attempt 2 succeeds), then ship, which fails: charge is refunded, then a
    undone. ``until``: ``retried`` (charge succeeded, ship runs), ``refunding`` (charge's refund in flight),
    ``refunded`` (charge refunded, a's undo in flight) or ``end`` (the run ended ``compensated``)."""
    drv = Driver(plan_of([{"a": {"compensate": "undo_a"}}, {"charge": RETRIED_ON_TIMEOUT}, "ship"]), {"o": 1},
                 kernel=kernel)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={"a": 1})
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="task_succeeded", task_id="r1/charge#2", result={"charge_id": "ch_2"})
    if until == "retried":
        return drv
    drv.feed(type="task_failed", task_id="r1/ship#1", error={"type": "NoCarrier", "message": "x"})
    assert [c["step"] for c in drv.commands if c["op"] == "dispatch" and c["kind"] == "compensate"] == ["charge"]
    if until == "refunding":
        return drv
    drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    if until == "refunded":
        return drv
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.state["status"] == "compensated" and drv.state["compensated"] == ["charge", "a"]
    return drv


def test_a_timed_out_attempt_that_succeeds_after_the_step_was_undone_makes_the_run_needs_intervention() -> None:
    """The audit's case: the charge's first attempt (a sync worker's thread) went on past its timeout and charged
    after the refund: the run said `compensated`, the only trace a `result_rejected`."""
    drv = _retried_then_undone()
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected", "late_completion", "run_finished"]
    rejected, late, finished = events
    assert rejected["reason"] == "run finished"
    assert (late["step"], late["task_id"], late["attempt"], late["run_status"]) == (
        "charge", "r1/charge#1", 1, "compensated")
    assert late["by_hand"] is True and late["after_undo"] is True and late["compensation"] == "refund"
    assert late["reason"] == AFTER_UNDO_REASON.format(attempt=1) and "attempt 1's result" in late["reason"]
    assert (finished["status"], finished["previous_status"]) == ("needs_intervention", "compensated")
    assert finished["compensated"] == ["charge", "a"]
    s = drv.state
    assert s["status"] == "needs_intervention" and s["compensated"] == ["charge", "a"]
    assert s["nodes"]["charge"]["status"] == "succeeded" and s["compensations"]["charge"]["status"] == "done"
    [entry] = s["late_completions"]
    assert (entry["step"], entry["task_id"], entry["after_undo"]) == ("charge", "r1/charge#1", True)
    [item] = s["intervention"]["steps"]
    assert (item["step"], item["worker"], item["status"], item["after_undo"]) == (
        "charge", "refund", "not_attempted", True)
    assert "completed again after it was undone (attempt 1's result" in item["reason"]
    assert "repeated by hand" in item["reason"]
    assert (item["step_idempotency_key"], item["idempotency_key"]) == ("r1/charge", "r1/charge/compensate")
    assert item["step_result"] == {"charge_id": "ch_1"} and item["input"] == {"o": 1, "a": 1, "charge_id": "ch_1"}
    assert summary(drv.plan, s)["intervention"] == s["intervention"]
    # the same step completing yet again (another attempt, a duplicate) is only rejected
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/charge#1", result={})) == ["result_rejected"]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


@pytest.mark.parametrize("until", ["refunding", "refunded"])
def test_a_timed_out_attempt_that_succeeds_while_the_undo_runs_ends_the_saga_needs_intervention(until: str) -> None:
    """The success arrives while the step's undo is in flight (it may land before the refund or after), or after it
    while the saga goes on: the saga goes on unchanged and ends needs_intervention, the step listed again."""
    drv = _retried_then_undone(until=until)
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected", "late_completion"]
    assert events[1]["after_undo"] is True and events[1]["run_status"] == "compensating"
    assert drv.state["status"] == "compensating"
    if until == "refunding":
        drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    events = drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.types(events) == ["compensation_succeeded", "run_finished"]
    assert events[-1]["status"] == "needs_intervention" and "previous_status" not in events[-1]
    s = drv.state
    assert s["compensated"] == ["charge", "a"]
    assert [(i["step"], i.get("after_undo")) for i in s["intervention"]["steps"]] == [("charge", True)]
    state, commands, replayed = replay(drv.plan, drv.inputs)
    assert state == drv.state and commands == drv.commands and replayed == drv.events


def test_a_timed_out_attempt_that_succeeds_before_the_undo_began_still_changes_nothing() -> None:
    """Its step's retry succeeded with the same idempotency key: the same effect, undone with the step's."""
    drv = _retried_then_undone(until="retried")
    before = json.loads(json.dumps(drv.state))
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert [(e["type"], e["reason"]) for e in events] == [("result_rejected", "stale or unknown task")]
    after = json.loads(json.dumps(drv.state))
    assert after.pop("seq") == before.pop("seq") + 1 and after == before
    drv.feed(type="task_failed", task_id="r1/ship#1", error={"type": "NoCarrier", "message": "x"})
    drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    drv.feed(type="task_succeeded", task_id="r1/a#c1", result={})
    assert drv.state["status"] == "compensated" and drv.state["late_completions"] == []


def test_a_timed_out_attempt_that_succeeds_while_its_undo_waits_for_others_changes_nothing() -> None:
    """charge beside b, then ship fails: b's undo runs, charge's waits (``pending``: not begun) — the success is the
    same effect as the retry's, and is undone by the refund to come."""
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"charge": RETRIED_ON_TIMEOUT}, {"b": {"compensate": "undo_b"}},
                    "ship"])
    drv = Driver(plan)
    drv.feed(type="task_succeeded", task_id="r1/a#1", result={})
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="task_succeeded", task_id="r1/charge#2", result={})
    drv.feed(type="task_succeeded", task_id="r1/b#1", result={})
    drv.feed(type="task_failed", task_id="r1/ship#1", error={"type": "NoCarrier", "message": "x"})
    assert drv.state["compensations"]["charge"]["status"] == "pending"
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/charge#1", result={})) == ["result_rejected"]
    for task_id in ("r1/b#c1", "r1/charge#c1", "r1/a#c1"):
        drv.feed(type="task_succeeded", task_id=task_id, result={})
    assert drv.state["status"] == "compensated" and drv.state["late_completions"] == []


def test_the_attempt_that_succeeded_answering_again_after_its_undo_is_only_rejected() -> None:
    """A duplicate answer of the attempt the step succeeded with is no attempt the run gave up on (unchanged)."""
    drv = _retried_then_undone()
    assert drv.types(drv.feed(type="task_succeeded", task_id="r1/charge#2", result={})) == ["result_rejected"]
    assert drv.state["status"] == "compensated"


def test_a_result_the_step_would_fail_with_after_its_undo_changes_nothing() -> None:
    charge = {**RETRIED_ON_TIMEOUT, "fail_when": "${ declined }"}
    drv = Driver(plan_of([{"charge": charge}, "ship"]))
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="task_succeeded", task_id="r1/charge#2", result={})
    drv.feed(type="task_failed", task_id="r1/ship#1", error={"type": "NoCarrier", "message": "x"})
    drv.feed(type="task_succeeded", task_id="r1/charge#c1", result={})
    assert drv.state["status"] == "compensated"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"declined": True})
    assert drv.types(events) == ["result_rejected"] and drv.state["status"] == "compensated"
    events = drv.feed(type="task_failed", task_id="r1/charge#1", error={"type": "Down", "message": "x"})
    assert drv.types(events) == ["result_rejected"] and drv.state["status"] == "compensated"


def test_another_attempt_succeeding_after_a_late_success_joined_the_saga_and_was_undone() -> None:
    """charge's attempts 1 and 2 both time out (the step fails); attempt 1's success joins the saga and is refunded;
    attempt 2's success comes after the refund began: the charge stands again."""
    drv = Driver(plan_of([{"charge": RETRIED_ON_TIMEOUT}]), {"o": 1})
    drv.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv.feed(type="timer_fired", timer_id=_retry_timer(drv, "charge"))
    drv.feed(type="timer_fired", timer_id="r1/charge#2@timeout")
    assert drv.state["status"] == "failed"
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected", "late_completion", "run_finished"]  # by hand: the run had ended
    drv2 = Driver(drv.plan, {"o": 1})  # the same, but attempt 1 succeeds while the run is still aborting
    drv2.feed(type="timer_fired", timer_id="r1/charge#1@timeout")
    drv2.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})  # kept: waiting to retry
    drv2.feed(type="timer_fired", timer_id=_retry_timer(drv2, "charge"))
    events = drv2.feed(type="timer_fired", timer_id="r1/charge#2@timeout")
    assert drv2.types(events)[-2:] == ["late_completion", "compensation_started"]  # joined the saga
    assert drv2.types(drv2.feed(type="task_succeeded", task_id="r1/charge#c1", result={}))[-1] == "run_finished"
    assert drv2.state["status"] == "compensated" and "late_undo" in drv2.state["nodes"]["charge"]
    assert drv2.types(drv2.feed(type="task_succeeded", task_id="r1/charge#1", result={})) == ["result_rejected"]
    events = drv2.feed(type="task_succeeded", task_id="r1/charge#2", result={"charge_id": "ch_2"})
    assert drv2.types(events) == ["result_rejected", "late_completion", "run_finished"]
    assert events[1]["after_undo"] is True and events[1]["attempt"] == 2
    [item] = drv2.state["intervention"]["steps"]
    assert item["step_result"] == {"charge_id": "ch_2"} and "attempt 2's result" in item["reason"]
    state, commands, replayed = replay(drv2.plan, drv2.inputs)
    assert state == drv2.state and commands == drv2.commands and replayed == drv2.events


@pytest.mark.parametrize("kernel", [4, 5, 6])
def test_under_older_rules_a_success_after_the_undo_is_only_rejected(kernel: int) -> None:
    drv = _retried_then_undone(kernel)
    events = drv.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert drv.types(events) == ["result_rejected"]
    assert drv.state["status"] == "compensated" and drv.state["late_completions"] == []


def test_a_record_made_under_rules_6_replays_to_its_decisions_and_under_7_to_the_new_ones() -> None:
    """The same input events: a record whose start says rules 6 replays as it was recorded (compensated, the late
    success only rejected); under rules 7 they end needs_intervention."""
    old = _retried_then_undone(6)
    old.feed(type="task_succeeded", task_id="r1/charge#1", result={"charge_id": "ch_1"})
    assert old.inputs[0]["kernel"] == 6
    state, commands, replayed = replay(old.plan, old.inputs)
    assert (state, commands, replayed) == (old.state, old.commands, old.events)
    assert state["status"] == "compensated" and state["kernel"] == 6
    assert [e["type"] for e in replayed][-2:] == ["run_finished", "result_rejected"]
    state, _, replayed = replay(old.plan, [{**old.inputs[0], "kernel": STATE_VERSION}, *old.inputs[1:]])
    assert state["status"] == "needs_intervention" and replayed[-1]["previous_status"] == "compensated"
