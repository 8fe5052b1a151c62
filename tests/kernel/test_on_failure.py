"""Kernel rules 8: a step with ``on_failure: continue`` that fails for good does not fail the run — it is recorded
``failed`` and ``continued``, gives no result, and the run goes on as for a step skipped (docs/kernel.md,
"Failure, cancellation and compensation")."""

from __future__ import annotations

import json

import pytest

from flowdsl.kernel import CONTINUE_RULES, STATE_VERSION, replay, rules_for, start_run, summary
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, hang, ok

GO_ON = {"on_failure": "continue"}


def test_a_step_that_fails_for_good_is_passed_over_and_the_run_completes():
    plan = plan_of(["a", {"tell": {**GO_ON, "retry": 3}}, "c"])
    sim = Sim(plan, {"tell": fail("SmtpDown")}).run()
    assert sim.status == "completed" and sim.state["error"] is None and sim.state["failed_step"] is None
    failed = sim.of("step_failed", step="tell")
    assert len(failed) == 1 and failed[0]["continued"] is True and failed[0]["error"]["type"] == "SmtpDown"
    assert [d["step"] for d in sim.dispatches] == ["a", "tell", "tell", "tell", "c"]
    rows = summary(plan, sim.state)["steps"]
    assert rows["tell"]["status"] == "failed" and rows["tell"]["continued"] is True and rows["tell"]["attempts"] == 3
    assert "continued" not in rows["a"] and rows["c"]["status"] == "succeeded"
    assert plan["plan_version"] == 2 and plan["nodes"]["tell"]["on_failure"] == "continue"


def test_the_run_goes_on_without_its_result_as_after_a_skipped_step():
    plan = plan_of(["a", {"tell": {**GO_ON, "output": "told"}},
                    {"c": {"with": {"told": "${ told }", "a": "${ a }"}}}])
    sim = Sim(plan, {"a": ok({"a": 1}), "tell": fail()}).run()
    c = next(d for d in sim.dispatches if d["step"] == "c")
    assert c["input"] == {"told": None, "a": 1}  # (it wrote nothing: null, as after a skipped step)
    assert sim.status == "completed" and "told" not in sim.state["context"]


def test_steps_that_need_it_and_a_parallel_sibling_go_on():
    plan = plan_of([{"parallel": "p", "branches": [{"x": GO_ON}, "y"]},
                    {"after_x": {"needs": ["p"]}}])
    sim = Sim(plan, {"x": fail(after=5), "y": ok(after=50)}).run()
    assert sim.status == "completed"
    assert sim.steps("step_succeeded") == ["y", "p", "after_x"]
    plan = plan_of(["x", {"tell": {**GO_ON, "needs": ["x"]}}, {"after": {"needs": ["tell"]}}])
    assert Sim(plan, {"tell": fail()}).run().steps("step_succeeded") == ["x", "after"]


def test_in_a_for_each_only_that_runs_step_is_passed_over():
    plan = plan_of([{"for_each": "lines", "items": "${ lines }", "steps": [{"charge": GO_ON}, "log"]}])
    sim = Sim(plan, {"lines[1]/charge": fail()}, input={"lines": [1, 2, 3]}).run()
    assert sim.status == "completed"
    assert sim.steps("step_failed") == ["lines[1]/charge"]
    assert sorted(sim.steps("step_succeeded", kind="task")) == [
        "lines[0]/charge", "lines[0]/log", "lines[1]/log", "lines[2]/charge", "lines[2]/log"]


def test_a_later_failure_undoes_what_completed_and_not_the_step_passed_over():
    plan = plan_of([{"a": {"compensate": "undo_a"}}, {"b": {**GO_ON, "compensate": "undo_b"}},
                    {"c": {"compensate": "undo_c"}}, "d"])
    sim = Sim(plan, {"b": fail(), "d": fail("Boom")}).run()
    assert sim.status == "compensated" and sim.state["failed_step"] == "d"
    assert sim.undone() == ["c", "a"]


def test_a_fail_when_and_a_timeout_are_failures_it_passes_over_too():
    plan = plan_of([{"check": {**GO_ON, "fail_when": "${ bad }"}}, {"slow": {**GO_ON, "timeout": "1s"}}, "z"])
    sim = Sim(plan, {"check": ok({"bad": True}), "slow": hang()}).run()
    assert sim.status == "completed"
    assert [(e["step"], e["error"]["type"]) for e in sim.of("step_failed")] == [("check", "FailWhen"),
                                                                              ("slow", "StepTimeout")]


def test_while_the_run_aborts_a_failure_of_it_is_not_passed_over():
    plan = plan_of([{"parallel": "p", "branches": ["boom", {"tell": GO_ON}]}])
    sim = Sim(plan, {"boom": fail("Boom", after=5), "tell": fail(after=20, cancellable=False)}).run()
    assert sim.status == "failed" and sim.state["failed_step"] == "boom"
    assert not any(e.get("continued") for e in sim.events)


def test_a_late_success_of_a_step_passed_over_joins_the_saga():
    """A timed-out attempt of a compensable step passed over succeeds while the run goes on: its effect stands
    (no person is needed while the run completes), and it is undone with the rest when the run compensates."""
    plan = plan_of([{"pay": {**GO_ON, "timeout": "1s", "compensate": "refund"}}, "ship", "tell"])
    late = ok({"charge": "c1"}, after=1500, cancellable=False)
    sim = Sim(plan, {"pay": late, "ship": ok(after=2000)}).run()
    assert sim.status == "completed" and sim.state["intervention"] is None
    (event,) = sim.of("late_completion")
    assert event["by_hand"] is False and "on_failure: continue" in event["reason"]
    sim = Sim(plan, {"pay": late, "ship": ok(after=2000), "tell": fail("Boom")}).run()
    assert sim.status == "compensated" and sim.undone() == ["pay"]


def test_rules_before_8_never_start_such_a_plan_and_a_run_replays():
    plan = plan_of(["a", {"b": GO_ON}])
    with pytest.raises(ValueError, match=rf"on_failure: continue', which kernel rules {CONTINUE_RULES} brought; "
                                         r"the run was to start under rules 7"):
        start_run(plan, "r", {}, at=0, kernel=7)
    sim = Sim(plan, {"b": fail()}, reload_state=True).run()
    state, _, events = replay(plan, sim.inputs)
    assert json.dumps(state, sort_keys=True) == json.dumps(sim.state, sort_keys=True)
    assert events == sim.events


def test_a_plan_without_it_stays_plan_version_1_and_compensate_is_the_default():
    assert plan_of(["a", "b"])["plan_version"] == 1
    plan = plan_of(["a", {"b": {"on_failure": "compensate"}}])
    assert plan["plan_version"] == 1 and "on_failure" not in plan["nodes"]["b"]
    assert Sim(plan, {"b": fail()}).run().status == "failed"


def test_a_late_success_after_the_run_completed_leaves_it_completed():
    """The run wanted the step's effect: a success of its timed-out attempt once the run has completed changes
    nothing — said (``late_completion``, ``by_hand: false``), never made ``needs_intervention``; whether it lands
    just before or just after the run's end, the run ends the same."""
    plan = plan_of([{"pay": {**GO_ON, "timeout": "1s", "compensate": "refund"}}, "ship"])
    for ship_takes in (100, 3000):  # the late success lands after / before the run's end
        sim = Sim(plan, {"pay": ok({"charge": "c1"}, after=2500, cancellable=False), "ship": ok(after=ship_takes)}
                  ).run()
        assert sim.status == "completed" and sim.state["intervention"] is None, ship_takes
        assert len(sim.of("run_finished")) == 1 and sim.of("run_finished")[0]["status"] == "completed"
        (event,) = sim.of("late_completion")
        assert event["by_hand"] is False
        row = summary(plan, sim.state)["steps"]["pay"]
        assert row["continued"] is True and row["completed_late"] is True


def test_a_step_passed_over_that_completes_late_is_undone_after_the_steps_that_followed_it():
    """Every plan dependency is a precedence of the undos: ``ship`` started after ``pay`` was passed over, so
    ``unship`` runs before ``refund``, even though ``pay``'s late success landed while ``ship`` ran."""
    plan = plan_of([{"pay": {**GO_ON, "timeout": "1s", "compensate": "refund"}},
                    {"ship": {"compensate": "unship"}}, "tell"])
    sim = Sim(plan, {"pay": ok({"c": 1}, after=1800, cancellable=False), "ship": ok(after=1500),
                     "tell": fail("Boom")}).run()
    assert sim.status == "compensated" and sim.undone() == ["ship", "pay"]
    refund = next(d for d in sim.dispatches if d["kind"] == "compensate" and d["step"] == "pay")
    unshipped = sim.of("compensation_succeeded", step="ship")[0]
    assert refund["at"] >= unshipped["at"]


def test_a_pinned_runtime_starts_a_plan_that_needs_rules_8_under_them():
    assert rules_for(plan_of(["a"]), None) == STATE_VERSION and rules_for(plan_of(["a"]), 5) == 5
    assert rules_for(plan_of([{"a": GO_ON}]), 5) == CONTINUE_RULES
