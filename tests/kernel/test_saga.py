"""Kernel: compensation order, cancellation of in-flight work, compensation retries, needs_intervention,
user cancellation, the run timeout and sub-flow timeouts."""

from __future__ import annotations

import json

from flowdsl.kernel import replay
from tests.kernel.plans import plan_files, plan_of
from tests.kernel.sim import Sim, fail, hang, ok


def undo(name: str, **more: object) -> dict:
    return {name: {"compensate": f"undo_{name}", **more}}


def comp_at(sim: Sim, step: str) -> int:
    return next(d["at"] for d in sim.dispatches if d["step"] == step and d["kind"] == "compensate")


def test_a_sequence_is_undone_in_reverse_completion_order_one_at_a_time():
    plan = plan_of([undo("a"), undo("b"), "plain", undo("c"), "d"])
    sim = Sim(plan, {"a": ok({"a": 1}), "b": ok({"b": 2}), "c": ok({"c": 3}), "d": fail("Boom")},
              input={"order": 7}).run()
    assert sim.status == "compensated"
    assert sim.undone() == ["c", "b", "a"]
    assert sim.state["compensated"] == ["c", "b", "a"]
    assert [comp_at(sim, s) for s in ("c", "b", "a")] == [1050, 1060, 1070]
    cmd = next(d for d in sim.dispatches if d["step"] == "c" and d["kind"] == "compensate")
    assert cmd["worker"] == "undo_c"
    assert cmd["input"] == {"order": 7, "a": 1, "b": 2, "c": 3}
    assert cmd["idempotency_key"] == "r1/c/compensate" and cmd["task_id"] == "r1/c#c1"
    assert sim.state["error"]["type"] == "Boom"
    finished = sim.of("run_finished")[0]
    assert finished["status"] == "compensated" and finished["compensated"] == ["c", "b", "a"]


def test_nothing_to_undo_ends_failed():
    sim = Sim(plan_of(["a", "b"]), {"b": fail()}).run()
    assert sim.status == "failed"
    assert sim.of("compensation_started") == []


PARALLEL = [
    undo("a"),
    {"parallel": "p", "branches": [{"sequence": "left", "steps": [undo("x1"), undo("x2")]}, undo("y1")]},
    "z",
]


def test_concurrent_branches_are_undone_in_the_reverse_of_their_partial_order():
    script = {"y1": ok(after=25), "z": fail(), "y1/compensate": ok(after=40)}
    sim = Sim(plan_of(PARALLEL), script).run()
    assert sim.status == "compensated"
    # y1 ran alongside x1 and x2: no order between them. x1 completed before x2 started; a before all.
    assert {s: comp_at(sim, s) for s in ("y1", "x2", "x1", "a")} == {"y1": 1045, "x2": 1045, "x1": 1055, "a": 1085}
    first_wave = [d["step"] for d in sim.dispatches if d["kind"] == "compensate" and d["at"] == 1045]
    assert first_wave == ["y1", "x2"]  # dispatched together, latest completion first
    assert sorted(sim.undone()) == ["a", "x1", "x2", "y1"] and sim.undone()[-1] == "a"


def test_in_flight_siblings_are_cancelled_before_anything_is_undone():
    plan = plan_of([{"parallel": "p", "branches": [undo("b"), undo("c"), undo("d")]}])
    sim = Sim(plan, {"b": fail(after=10), "c": hang(), "d": ok(after=5)}).run()
    assert sim.status == "compensated"
    assert {"op": "cancel_task", "run_id": "r1", "task_id": "r1/c#1", "step": "c"} in sim.commands
    assert sim.steps("step_cancelled") == ["c"]
    assert sim.state["nodes"]["c"]["status"] == "cancelled"
    assert comp_at(sim, "d") == 1011  # once c's cancellation is confirmed
    assert sim.undone() == ["d"]


def test_a_sibling_that_finishes_anyway_is_undone_too():
    plan = plan_of([{"parallel": "p", "branches": [undo("b"), undo("c"), undo("d")]}])
    sim = Sim(plan, {"b": fail(after=10), "c": ok({"c": 1}, after=50, cancellable=False), "d": ok(after=5)}).run()
    assert sim.status == "compensated"
    assert sim.state["nodes"]["c"]["status"] == "succeeded"
    assert comp_at(sim, "c") == comp_at(sim, "d") == 1050
    assert sorted(sim.undone()) == ["c", "d"]
    assert sim.dispatched() == ["b", "c", "d"]


def test_a_retry_timer_pending_at_failure_is_cancelled():
    plan = plan_of([{"parallel": "p", "branches": [
        {"slow": {"retry": {"attempts": 3, "initial": "1s"}}}, {"bad": {}}]}])
    sim = Sim(plan, {"slow": fail("Flaky", after=1), "bad": fail(after=20)}).run()
    assert sim.status == "failed"
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1/slow#2@retry"} in sim.commands
    assert sim.steps("step_cancelled") == ["slow"]
    assert len([d for d in sim.dispatches if d["step"] == "slow"]) == 1


def test_a_compensation_is_retried_by_its_own_policy():
    plan = plan_of([undo("a"), "b"])
    sim = Sim(plan, {"b": fail(), "a/compensate": [fail("Busy"), fail("Busy"), ok()]}).run()
    assert sim.status == "compensated"
    comps = [d for d in sim.dispatches if d["kind"] == "compensate"]
    assert [(d["task_id"], d["attempt"], d["idempotency_key"]) for d in comps] == [
        ("r1/a#c1", 1, "r1/a/compensate"), ("r1/a#c2", 2, "r1/a/compensate"), ("r1/a#c3", 3, "r1/a/compensate")]
    assert [e["delay_ms"] for e in sim.of("compensation_retrying")] == [100, 200]
    assert sim.state["compensations"]["a"]["attempt"] == 3
    assert sim.state["compensations"]["a"]["error"] is None  # it succeeded in the end (as a step's error)


def test_the_groups_around_a_step_that_failed_for_good_fail_with_their_event():
    plan = plan_of([{"sequence": "outer", "steps": [
        {"parallel": "p", "branches": [undo("x"), {"sequence": "left", "steps": ["y"]}]}]}])
    sim = Sim(plan, {"x": ok(after=5), "y": fail("Boom", "no")}).run()
    assert sim.status == "compensated"
    failed = sim.of("step_failed")
    assert [e["step"] for e in failed] == ["y", "left", "p", "outer"]  # innermost first
    assert all(e["error"] == {"type": "Boom", "message": "no"} for e in failed)
    assert [sim.state["nodes"][k]["status"] for k in ("left", "p", "outer")] == ["failed"] * 3


def test_a_compensation_that_fails_for_good_parks_the_run_with_what_is_left():
    comp_policy = {"worker": "undo_b", "retry": {"attempts": 2, "initial": "10ms"}}
    plan = plan_of([undo("a"), {"b": {"compensate": comp_policy}}, undo("c"), "d"])
    sim = Sim(plan, {"a": ok({"a": 1}), "b": ok({"b": 2}), "d": fail("Boom"),
                     "b/compensate": fail("RefundDown", "gateway down")}, input={"k": 0}).run()
    assert sim.status == "needs_intervention"
    assert sim.undone() == ["c"]
    assert sim.of("compensation_started", step="a") == []  # a had to wait for b, which is not undone
    left = sim.state["intervention"]["steps"]
    assert [(s["step"], s["status"], s["attempts"]) for s in left] == [("b", "failed", 2), ("a", "not_attempted", 0)]
    assert left[0]["last_error"] == {"type": "RefundDown", "message": "gateway down"}
    assert left[0]["idempotency_key"] == "r1/b/compensate" and left[0]["step_idempotency_key"] == "r1/b"
    assert left[0]["input"] == {"k": 0, "a": 1, "b": 2}
    assert left[1]["input"] == {"k": 0, "a": 1} and left[1]["worker"] == "undo_a"
    assert sim.state["error"]["type"] == "Boom"
    assert sim.of("compensation_failed")[0]["step"] == "b"


def test_independent_compensations_still_run_when_one_fails():
    plan = plan_of([{"parallel": "p", "branches": [undo("x"), undo("y")]}, "z"])
    sim = Sim(plan, {"z": fail(), "x/compensate": fail("Down")}).run()
    assert sim.status == "needs_intervention"
    assert sim.undone() == ["y"]
    assert [s["step"] for s in sim.state["intervention"]["steps"]] == ["x"]


def test_a_compensation_input_that_cannot_be_built_needs_intervention():
    plan = plan_of([{"a": {"compensate": {"worker": "undo_a", "with": {"n": "${ $number('x') }"}}}}, "b"])
    sim = Sim(plan, {"b": fail()}).run()
    assert sim.status == "needs_intervention"
    left = sim.state["intervention"]["steps"][0]
    assert left["status"] == "failed" and left["last_error"]["type"] == "ExpressionError"


def test_a_compensation_with_mapping_sees_the_context_and_the_result():
    comp = {"worker": "refund", "with": {"charge": "${ charge_id }", "order": "${ $context.order }",
                                         "raw": "${ $steps.charge.charge_id }", "run": "${ $run.id }"}}
    plan = plan_of([{"charge": {"compensate": comp}}, "ship"])
    sim = Sim(plan, {"charge": ok({"charge_id": "ch_1"}), "ship": fail()}, input={"order": "o9"}).run()
    cmd = next(d for d in sim.dispatches if d["kind"] == "compensate")
    assert cmd["input"] == {"charge": "ch_1", "order": "o9", "raw": "ch_1", "run": "r1"}


def test_a_compensation_gets_the_step_s_contribution_and_reaches_the_raw_result_through_steps():
    """docs/language.md, docs/runtime.md, docs/kernel.md: the contribution by the output rule, not the result."""
    raw = {"charge_id": "ch_1", "total": 5}
    mapped = {"output": {"amount": "${ total }"}}
    inputs = {}
    for name, comp, extra in [("map", "refund", mapped), ("name", "refund", {"output": "ch"}),
                              ("raw", {"worker": "refund", "with": {"charge": "${ $steps.charge.charge_id }",
                                                                    "amount": "${ amount }"}}, mapped)]:
        plan = plan_of([{"charge": {"compensate": comp, **extra}}, "ship"])
        sim = Sim(plan, {"charge": ok(raw), "ship": fail()}, input={"order": "o9"}).run()
        inputs[name] = next(d for d in sim.dispatches if d["kind"] == "compensate")["input"]
    assert inputs == {"map": {"order": "o9", "amount": 5}, "name": {"order": "o9", "ch": raw},
                      "raw": {"charge": "ch_1", "amount": 5}}


def test_for_each_iterations_are_undone_and_sequential_iterations_in_reverse():
    def plan(concurrency: int | None) -> dict:
        loop = {"for_each": "lines", "items": "${ items }", "steps": [undo("charge_line")]}
        if concurrency:
            loop["concurrency"] = concurrency
        return plan_of([loop, "ship"])

    sim = Sim(plan(1), {"ship": fail()}, input={"items": [1, 2, 3]}).run()
    assert sim.undone() == ["lines[2]/charge_line", "lines[1]/charge_line", "lines[0]/charge_line"]
    assert len({comp_at(sim, s) for s in sim.undone()}) == 3
    sim = Sim(plan(None), {"ship": fail()}, input={"items": [1, 2, 3]}).run()
    assert sim.status == "compensated"
    assert {comp_at(sim, s) for s in sim.undone()} == {1020}
    assert sorted(sim.undone()) == ["lines[0]/charge_line", "lines[1]/charge_line", "lines[2]/charge_line"]


def test_sub_flow_steps_are_compensated_with_the_parents(tmp_path):
    main = """
flowdsl: 1
name: main
steps:
  - a: {compensate: undo_a}
  - flow: gift
    path: gift.yaml
  - fails
"""
    gift = """
flowdsl: 1
name: gift
steps:
  - wrap: {compensate: unwrap}
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "gift.yaml": gift})
    sim = Sim(plan, {"fails": fail()}).run()
    assert sim.undone() == ["gift/wrap", "a"]


SUB_MAIN = """
flowdsl: 1
name: main
steps:
  - a: {compensate: undo_a}
  - flow: sub
    path: sub.yaml
  - d
"""
SUB_TIMED = """
flowdsl: 1
name: sub
timeout: {timeout}
steps:
  - b: {{compensate: undo_b}}
  - c
"""


def test_a_sub_flow_s_timeout_fails_its_node_cancels_its_attempts_and_compensates(tmp_path):
    plan = plan_files(tmp_path, {"main.yaml": SUB_MAIN, "sub.yaml": SUB_TIMED.format(timeout="100ms")})
    assert plan["nodes"]["sub"]["timeout_ms"] == 100
    sim = Sim(plan, {"sub/c": hang()}).run()
    armed = [c for c in sim.commands if c["op"] == "schedule_timer"]
    assert armed == [{"op": "schedule_timer", "run_id": "r1", "timer_id": "r1/sub@timeout", "delay_ms": 100,
                      "due_at": 1110, "purpose": "flow_timeout", "step": "sub"}]  # from when the sub-flow began
    assert sim.status == "compensated"
    err = {"type": "SubflowTimeout", "message": "the sub-flow 'sub' did not finish within 100 ms"}
    assert sim.state["error"] == err and sim.state["failed_step"] == "sub"
    assert [(e["step"], e["error"], e["task_id"]) for e in sim.of("step_failed")] == [("sub", err, None)]
    assert {"op": "cancel_task", "run_id": "r1", "task_id": "r1/sub/c#1", "step": "sub/c"} in sim.commands
    assert sim.steps("step_cancelled") == ["sub/c"]
    assert sim.undone() == ["sub/b", "a"]  # the sub-flow's own completed steps too
    assert "d" not in sim.dispatched()
    assert sim.state["nodes"]["sub"]["status"] == "failed" and sim.state["finished_at"] == 1131


def test_a_flow_node_s_own_timeout_overrides_the_sub_flow_file_s(tmp_path):
    main = SUB_MAIN.replace("    path: sub.yaml\n", "    path: sub.yaml\n    timeout: 100ms\n")
    plan = plan_files(tmp_path, {"main.yaml": main, "sub.yaml": SUB_TIMED.format(timeout="1h")})
    assert plan["nodes"]["sub"]["timeout_ms"] == 100
    sim = Sim(plan, {"sub/c": hang()}).run()
    assert [(c["timer_id"], c["delay_ms"]) for c in sim.commands if c["op"] == "schedule_timer"] == [
        ("r1/sub@timeout", 100)]
    assert sim.status == "compensated" and sim.state["failed_step"] == "sub"
    assert sim.state["error"] == {"type": "SubflowTimeout",
                                  "message": "the sub-flow 'sub' did not finish within 100 ms"}
    assert sim.undone() == ["sub/b", "a"]
    # and a longer one than the file's is kept too: the file's 100ms no longer bounds the node
    main = SUB_MAIN.replace("    path: sub.yaml\n", "    path: sub.yaml\n    timeout: 1h\n")
    plan = plan_files(tmp_path, {"main.yaml": main, "sub.yaml": SUB_TIMED.format(timeout="100ms")})
    sim = Sim(plan, {"sub/c": ok(after=300)}).run()
    assert sim.status == "completed"
    assert [c["delay_ms"] for c in sim.commands if c["op"] == "schedule_timer"] == [3_600_000]


def test_a_sub_flow_that_finishes_in_time_cancels_its_timer(tmp_path):
    plan = plan_files(tmp_path, {"main.yaml": SUB_MAIN, "sub.yaml": SUB_TIMED.format(timeout="1h")})
    sim = Sim(plan).run()
    assert sim.status == "completed"
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1/sub@timeout"} in sim.commands
    assert sim.state["timers"] == {}


def test_each_sub_flow_instance_has_its_own_timer(tmp_path):
    main = """
flowdsl: 1
name: main
steps:
  - for_each: fe
    items: "${ items }"
    steps:
      - flow: sub
        path: sub.yaml
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "sub.yaml": SUB_TIMED.format(timeout="100ms")})
    sim = Sim(plan, {"fe[1]/sub/c": hang()}, input={"items": [1, 2]}).run()
    assert [c["timer_id"] for c in sim.commands if c["op"] == "schedule_timer"] == [
        "r1/fe[0]/sub@timeout", "r1/fe[1]/sub@timeout"]
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1/fe[0]/sub@timeout"} in sim.commands
    assert sim.status == "compensated" and sim.state["failed_step"] == "fe[1]/sub"
    assert sim.state["error"]["type"] == "SubflowTimeout"
    assert sorted(sim.undone()) == ["fe[0]/sub/b", "fe[1]/sub/b"]


def test_a_sub_flow_timer_is_cancelled_when_the_run_aborts_for_another_reason(tmp_path):
    main = """
flowdsl: 1
name: main
steps:
  - parallel: p
    branches:
      - flow: sub
        path: sub.yaml
      - bad
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "sub.yaml": SUB_TIMED.format(timeout="100ms")})
    # c ignores its cancellation and finishes long after the sub-flow's timeout would have fired
    sim = Sim(plan, {"bad": fail("Boom", after=50), "sub/c": ok(after=300, cancellable=False)}).run()
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1/sub@timeout"} in sim.commands
    assert sim.status == "compensated" and sim.state["error"]["type"] == "Boom"
    assert sim.state["failed_step"] == "bad"
    assert sorted(sim.undone()) == ["sub/b"]


def test_a_sub_flow_timeout_replays_to_the_same_decisions(tmp_path):
    plan = plan_files(tmp_path, {"main.yaml": SUB_MAIN, "sub.yaml": SUB_TIMED.format(timeout="100ms")})
    sim = Sim(plan, {"sub/c": hang()}, report_started=True).run()
    state, commands, events = replay(plan, json.loads(json.dumps(sim.inputs)))
    assert commands == sim.commands and events == sim.events
    assert json.dumps(state, sort_keys=True) == json.dumps(sim.state, sort_keys=True)


def test_cancel_cancels_in_flight_work_and_undoes_what_completed():
    plan = plan_of([undo("a"), undo("b"), "c"])
    sim = Sim(plan, {"b": hang()}, cancel_at=1015).run()
    assert sim.status == "cancelled"
    assert sim.state["error"] == {"type": "Cancelled", "message": "user asked"}
    assert sim.steps("step_cancelled") == ["b"]
    assert sim.undone() == ["a"]
    assert comp_at(sim, "a") == 1016


def test_cancel_with_nothing_to_undo_and_cancel_after_the_end():
    sim = Sim(plan_of(["a"]), {"a": hang()}, cancel_at=1005).run()
    assert sim.status == "cancelled"
    assert sim.of("compensation_started") == []
    done = Sim(plan_of(["a"]), cancel_at=5000).run()
    assert done.status == "completed"
    assert done.inputs[-1]["type"] == "cancel_requested"
    assert done.events[-1]["type"] == "run_finished"


def test_a_cancelled_run_whose_compensation_fails_needs_intervention():
    plan = plan_of([{"a": {"compensate": {"worker": "undo_a", "retry": {"attempts": 1}}}}, "b"])
    sim = Sim(plan, {"b": hang(), "a/compensate": fail()}, cancel_at=1015).run()
    assert sim.status == "needs_intervention"


def test_cancel_during_compensation_is_ignored():
    plan = plan_of([undo("a"), "b"])
    sim = Sim(plan, {"b": fail(), "a/compensate": ok(after=100)}, cancel_at=1050).run()
    assert sim.status == "compensated"


def test_the_run_timeout_cancels_and_compensates():
    plan = plan_of([undo("a"), "b"], timeout="100ms")
    sim = Sim(plan, {"b": hang()}).run()
    assert sim.status == "compensated"
    assert sim.state["error"]["type"] == "RunTimeout"
    assert sim.state["finished_at"] == 1111  # b cancelled at 1101, a undone in 10 ms
    scheduled = next(c for c in sim.commands if c["op"] == "schedule_timer")
    assert scheduled == {"op": "schedule_timer", "run_id": "r1", "timer_id": "r1@timeout", "delay_ms": 100,
                         "due_at": 1100, "purpose": "run_timeout", "step": None}
    plain = Sim(plan_of(["a", "b"], timeout="100ms"), {"b": hang()}).run()
    assert plain.status == "failed" and plain.state["error"]["type"] == "RunTimeout"


def test_the_run_timeout_timer_is_cancelled_when_the_run_ends():
    sim = Sim(plan_of(["a"], timeout="1h")).run()
    assert sim.status == "completed"
    assert {"op": "cancel_timer", "run_id": "r1", "timer_id": "r1@timeout"} in sim.commands
