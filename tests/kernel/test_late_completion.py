"""Kernel: late completions — a success for a compensable step the run recorded as cancelled, failed or timed out
(a worker whose lease had expired finished anyway) ends the run, or makes the ended run, ``needs_intervention``
with the step left to undo by hand (docs/kernel.md, "Late completions")."""

from __future__ import annotations

import json
from typing import Any

from flowdsl.kernel import LATE_REASON, apply, replay, start_event, start_run, summary
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, hang, ok

CHARGE = {"charge": {"compensate": "refund"}}


class Driver:
    """Feeds input events one at a time, keeping them (with the ``start`` event) for replay."""

    def __init__(self, plan: dict[str, Any], run_input: dict[str, Any] | None = None):
        self.plan = plan
        self.inputs = [start_event("r1", run_input or {}, at=0, seed=7)]
        d = start_run(plan, "r1", run_input or {}, at=0, seed=7)
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


def test_a_late_success_while_siblings_are_still_in_flight_ends_needs_intervention_not_failed():
    plan = plan_of([{"parallel": "g", "branches": [CHARGE, "reserve", "slow"]}])
    drv = Driver(plan)
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


def test_a_stale_attempt_while_a_newer_one_is_in_flight_is_unchanged():
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
    after = json.loads(json.dumps(late.state))
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
    assert drv.inputs[0]["kernel"] == 2 and "kernel" not in old_start
    late = {"type": "task_succeeded", "task_id": "r1/charge#1", "result": {}, "at": 99}
    state, _, events = replay(drv.plan, [old_start, *drv.inputs[1:], late])
    assert state["kernel"] == 1 and "late_completions" not in state
    assert state["status"] == "cancelled" and events[-1]["type"] == "result_rejected"
    state, _, events = replay(drv.plan, [*drv.inputs, late])  # started under version 2: the rule holds
    assert state["status"] == "needs_intervention" and events[-1]["type"] == "run_finished"
