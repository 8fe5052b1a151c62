"""Kernel: ordering, parallel joins, needs DAGs, for_each, when, switch, sub-flows and the data rules."""

from __future__ import annotations

import itertools

import pytest

from flowdsl.kernel import replay
from tests.kernel.plans import plan_files, plan_of, plan_yaml
from tests.kernel.sim import Sim, fail, ok


def dispatch_at(sim: Sim, step: str) -> int:
    return next(d["at"] for d in sim.dispatches if d["step"] == step and d["kind"] != "compensate")


def input_of(sim: Sim, step: str) -> dict:
    return next(d["input"] for d in sim.dispatches if d["step"] == step and d["kind"] != "compensate")


def test_sequence_runs_each_step_after_the_previous_one():
    sim = Sim(plan_of(["a", "b", "c"]), {"a": ok({"x": 1}, after=5), "b": ok({"y": 2}, after=7)},
              input={"start": True}).run()
    assert sim.status == "completed"
    assert sim.dispatched() == ["a", "b", "c"]
    assert [dispatch_at(sim, s) for s in "abc"] == [1000, 1005, 1012]
    assert input_of(sim, "c") == {"start": True, "x": 1, "y": 2}
    assert sim.state["context"] == {"start": True, "x": 1, "y": 2}
    assert sim.commands[-1] == {"op": "finish", "run_id": "r1", "status": "completed", "error": None}


def test_parallel_branches_start_together_and_join_before_what_follows():
    plan = plan_of([{"parallel": "p", "branches": [{"sequence": "s", "steps": ["b1", "b2"]}, "c"]}, "after"])
    sim = Sim(plan, {"b1": ok(after=10), "b2": ok(after=30), "c": ok(after=15)}).run()
    assert sim.status == "completed"
    assert dispatch_at(sim, "b1") == dispatch_at(sim, "c") == 1000
    assert dispatch_at(sim, "b2") == 1010
    assert dispatch_at(sim, "after") == 1040
    assert sim.steps("step_succeeded", kind="parallel") == ["p"]


def test_needs_dag_starts_each_node_when_its_dependencies_are_done():
    plan = plan_of(["fetch", {"fraud": {"needs": ["fetch"]}}, {"stock": {"needs": ["fetch"]}},
                    {"accept": {"needs": ["fraud", "stock"]}}])
    sim = Sim(plan, {"fetch": ok({"order": 1}), "fraud": ok({"fraud": False}, after=50),
                     "stock": ok({"stock": 3}, after=5)}).run()
    assert sim.status == "completed"
    assert dispatch_at(sim, "fraud") == dispatch_at(sim, "stock") == 1010
    assert dispatch_at(sim, "accept") == 1060
    assert input_of(sim, "accept") == {"order": 1, "fraud": False, "stock": 3}
    assert input_of(sim, "stock") == {"order": 1}


def test_needs_empty_list_starts_with_its_sequence():
    plan = plan_of(["a", {"b": {"needs": []}}, "c"])
    sim = Sim(plan, {"a": ok(after=20)}).run()
    assert dispatch_at(sim, "b") == 1000
    assert dispatch_at(sim, "c") == 1010  # after b, its previous node
    assert sim.state["finished_at"] == 1020  # the sequence waits for all its nodes


FOR_EACH = """
flowdsl: 1
name: lines
steps:
  - for_each: charge_lines
    items: "${ order.lines }"
    as: line
    concurrency: 3
    steps:
      - charge_line:
          with: {sku: "${ $line.sku }", position: "${ $index }", order: "${ $input.order.id }"}
      - audit
"""


def test_for_each_binds_the_item_and_index_and_never_exceeds_its_concurrency():
    lines = [{"sku": f"s{i}"} for i in range(7)]
    script = {"charge_line": lambda cmd: ok({"charged": cmd["input"]["sku"]}, after=10 + 7 * cmd["input"]["position"])}
    sim = Sim(plan_yaml(FOR_EACH), script, input={"order": {"id": "o1", "lines": lines}}).run()
    assert sim.status == "completed"
    assert sim.max_in_flight["charge_line"] == 3
    assert input_of(sim, "charge_lines[4]/charge_line") == {"sku": "s4", "position": 4, "order": "o1"}
    assert input_of(sim, "charge_lines[4]/audit") == {"order": {"id": "o1", "lines": lines}, "charged": "s4"}
    assert sim.state["context"]["charge_lines"] == [{"charged": f"s{i}"} for i in range(7)]
    assert sim.steps("step_started", kind="for_each") == ["charge_lines"]
    assert sim.of("step_started", step="charge_lines")[0]["items"] == 7


def test_for_each_over_nothing_succeeds_with_an_empty_list():
    sim = Sim(plan_yaml(FOR_EACH), input={"order": {"id": "o1", "lines": []}}).run()
    assert sim.status == "completed"
    assert sim.dispatched() == []
    assert sim.state["context"]["charge_lines"] == []


def test_nested_for_each_instance_keys_carry_every_index():
    plan = plan_of([{"for_each": "outer", "items": "${ rows }", "steps": [
        {"for_each": "inner", "items": "${ $item }", "as": "cell", "steps": [
            {"cell_step": {"with": {"v": "${ $cell }", "row": "${ $item }"}}}]}]}])
    sim = Sim(plan, input={"rows": [[1, 2], [3]]}).run()
    assert sim.status == "completed"
    assert sorted(sim.dispatched()) == ["outer[0]/inner[0]/cell_step", "outer[0]/inner[1]/cell_step",
                                        "outer[1]/inner[0]/cell_step"]
    assert input_of(sim, "outer[0]/inner[1]/cell_step") == {"v": 2, "row": [1, 2]}
    keys = {d["idempotency_key"] for d in sim.dispatches}
    assert "r1/outer[1]/inner[0]/cell_step" in keys


def test_when_false_skips_the_node_and_its_subtree_and_counts_as_done():
    plan = plan_of(["a", {"sequence": "extra", "when": "${ wants_extra }", "steps": [
        "x", {"parallel": "px", "branches": ["y", "z"]}]}, "b"])
    sim = Sim(plan, input={"wants_extra": False}).run()
    assert sim.status == "completed"
    assert sim.dispatched() == ["a", "b"]
    assert sim.of("step_skipped", step="extra")[0]["reason"] == "when"
    assert {e["step"]: e["reason"] for e in sim.of("step_skipped")} == {
        "extra": "when", "x": "parent", "px": "parent", "y": "parent", "z": "parent"}
    assert Sim(plan, input={"wants_extra": True}).run().dispatched() == ["a", "x", "y", "z", "b"]


def test_a_skipped_step_lets_its_dependents_start():
    plan = plan_of(["a", {"b": {"when": "${ $steps.a.go }"}}, {"c": {"needs": ["b"]}}])
    sim = Sim(plan, {"a": ok({"go": False})}).run()
    assert sim.dispatched() == ["a", "c"]


SWITCH = """
flowdsl: 1
name: ship
steps:
  - switch: shipping
    on: "${ mode }"
    cases:
      express: [ship_express]
      "3": [three]
      "true": [yes_step]
      standard: [ship_standard, track]
    default: [ship_default]
  - done
"""


@pytest.mark.parametrize(("mode", "ran"), [
    ("express", ["ship_express"]),
    ("standard", ["ship_standard", "track"]),
    (3, ["three"]),
    (3.0, ["three"]),
    (True, ["yes_step"]),
    ("other", ["ship_default"]),
])
def test_switch_runs_the_matching_case_and_skips_the_rest(mode, ran):
    sim = Sim(plan_yaml(SWITCH), input={"mode": mode}).run()
    assert sim.status == "completed"
    assert sim.dispatched() == [*ran, "done"]
    every = {"ship_express", "three", "yes_step", "ship_standard", "track", "ship_default"}
    assert set(sim.steps("step_skipped")) == every - set(ran)
    assert all(e["reason"] == "switch" for e in sim.of("step_skipped"))


def test_switch_without_match_or_default_runs_nothing():
    plan = plan_of([{"switch": "s", "on": "${ mode }", "cases": {"a": ["x"]}}, "after"])
    sim = Sim(plan, input={"mode": "b"}).run()
    assert sim.dispatched() == ["after"]
    assert sim.state["nodes"]["s"]["case"] is None and sim.state["nodes"]["s"]["default"] is False


def test_a_missing_switch_value_is_null_matching_a_null_case_else_the_default():
    """docs/language.md: JSONata's undefined is taken as null (the engine answers the same for both)."""
    cases = {"null": ["nothing"], "x": ["ex"]}
    plan = plan_of([{"switch": "s", "on": "${ mode }", "cases": cases, "default": ["other"]}])
    assert Sim(plan, input={}).run().dispatched() == ["nothing"]
    assert Sim(plan, input={"mode": None}).run().dispatched() == ["nothing"]
    plan = plan_of([{"switch": "s", "on": "${ mode }", "cases": {"x": ["ex"]}, "default": ["other"]}])
    assert Sim(plan, input={}).run().dispatched() == ["other"]


GIFT = """
flowdsl: 1
name: gift
input: {type: object, required: [items]}
steps:
  - wrap:
      compensate: unwrap
  - card
"""


def test_a_sub_flow_runs_in_its_own_scope_and_returns_its_final_context(tmp_path):
    main = """
flowdsl: 1
name: main
steps:
  - a
  - flow: gift
    path: gift.yaml
    with: {items: "${ order.items }"}
  - after
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "gift.yaml": GIFT})
    sim = Sim(plan, {"a": ok({"secret": 1}), "gift/wrap": ok({"wrapped": True}), "gift/card": ok({"card": "hi"})},
              input={"order": {"items": [1]}}).run()
    assert sim.status == "completed"
    assert input_of(sim, "gift/wrap") == {"items": [1]}
    assert input_of(sim, "gift/card") == {"items": [1], "wrapped": True}
    assert input_of(sim, "after")["gift"] == {"items": [1], "wrapped": True, "card": "hi"}
    assert sim.state["context"] == {"order": {"items": [1]}, "secret": 1,
                                    "gift": {"items": [1], "wrapped": True, "card": "hi"}}


#: a compensable step, then the sub-flow GIFT given ``with: {<key>: "${ order.items }"}``
UNDO_THEN_GIFT = """
flowdsl: 1
name: main
steps:
  - a:
      compensate: undo_a
  - flow: gift
    path: gift.yaml
    with: {KEY: "${ order.items }"}
"""


def test_a_sub_flow_input_that_breaks_its_schema_fails_the_flow_node(tmp_path):
    plan = plan_files(tmp_path, {"main.yaml": UNDO_THEN_GIFT.replace("KEY", "things"), "gift.yaml": GIFT})
    sim = Sim(plan, input={"order": {"items": [1]}}).run()
    assert sim.status == "compensated"
    assert sim.state["failed_step"] == "gift"
    assert sim.state["error"]["type"] == "InputInvalid"
    assert "'items' is a required property" in sim.state["error"]["message"]
    assert sim.undone() == ["a"]


def test_a_schema_whose_reference_does_not_resolve_fails_the_node_and_fetches_nothing(tmp_path):
    """A compiled plan has no such schema (FD206), but a plan may come from elsewhere: the kernel stays pure
    (no fetch) and the node fails with a message, never an exception out of ``apply``."""
    plan = plan_files(tmp_path, {"main.yaml": UNDO_THEN_GIFT.replace("KEY", "items"), "gift.yaml": GIFT})
    plan["nodes"]["gift"]["input_schema"] = {"$ref": "https://example.com/elsewhere.json"}
    sim = Sim(plan, input={"order": {"items": [1]}}).run()
    assert (sim.status, sim.state["error"]["type"], sim.undone()) == ("compensated", "InputInvalid", ["a"])
    assert "'https://example.com/elsewhere.json' cannot be resolved" in sim.state["error"]["message"]


def test_a_sub_flow_inside_a_for_each_gets_one_instance_per_iteration(tmp_path):
    main = """
flowdsl: 1
name: main
steps:
  - for_each: boxes
    items: "${ boxes }"
    steps:
      - flow: gift
        path: gift.yaml
        with: {items: ["${ $item }"]}
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "gift.yaml": GIFT})
    sim = Sim(plan, input={"boxes": ["x", "y"]}).run()
    assert sim.status == "completed"
    assert sorted(sim.dispatched()) == ["boxes[0]/gift/card", "boxes[0]/gift/wrap", "boxes[1]/gift/card",
                                        "boxes[1]/gift/wrap"]
    assert sim.state["context"]["boxes"] == [{"gift": {"items": ["x"]}}, {"gift": {"items": ["y"]}}]


def test_parallel_branches_see_only_what_they_depend_on():
    plan = plan_of(["a", {"parallel": "p", "branches": [{"sequence": "s", "steps": ["b1", "b2"]}, "c"]}, "d"])
    sim = Sim(plan, {"a": ok({"a": 1}), "b1": ok({"b1": 1}, after=1), "b2": ok({"b2": 1}), "c": ok({"c": 1},
                                                                                                    after=50)}).run()
    assert input_of(sim, "b2") == {"a": 1, "b1": 1}
    assert input_of(sim, "c") == {"a": 1}
    assert input_of(sim, "d") == {"a": 1, "b1": 1, "b2": 1, "c": 1}


@pytest.mark.parametrize("durations", list(itertools.permutations([5, 20, 40])))
def test_the_merge_rule_applies_contributions_in_plan_order_whatever_the_timing(durations):
    plan = plan_of([{"parallel": "p", "branches": ["b1", "b2", "b3"]}, "after"])
    script = {name: ok({"shared": name, name: True}, after=t) for name, t in zip(("b1", "b2", "b3"), durations,
                                                                                 strict=True)}
    sim = Sim(plan, script).run()
    assert sim.state["context"] == {"shared": "b3", "b1": True, "b2": True, "b3": True}
    assert input_of(sim, "after") == sim.state["context"]


def test_steps_binding_reads_earlier_results_even_from_inside_a_for_each():
    plan = plan_of([{"quote": {"output": "q"}},
                    {"for_each": "each", "items": "${ things }", "steps": [
                        {"use": {"with": {"price": "${ $steps.quote.price }", "thing": "${ $item }"},
                                 "when": "${ $steps.quote.price > 1 }"}}]}])
    sim = Sim(plan, {"quote": ok({"price": 5})}, input={"things": ["x"]}).run()
    assert input_of(sim, "each[0]/use") == {"price": 5, "thing": "x"}
    assert sim.state["context"]["q"] == {"price": 5}


@pytest.mark.parametrize("kernel", [5, 6])
def test_steps_binding_reads_a_for_each_s_and_a_sub_flow_s_result_since_version_6(tmp_path, kernel):
    """The compiler lets ``$steps.<id>`` name a for_each or a sub-flow node (their results: the list of the
    iterations' contributions, the sub-flow's final context); under version 5 they read null, as recorded."""
    main = """
flowdsl: 1
name: main
steps:
  - for_each: lines
    items: "${ [1, 2] }"
    output: kept
    steps:
      - dbl: {with: {x: "${ $item }"}}
  - flow: gift
    path: gift.yaml
    with: {items: [1]}
  - echo:
      with:
        lines: "${ $steps.lines }"
        looked: "${ $lookup($steps, 'lines') }"
        gift: "${ $steps.gift.card }"
"""
    plan = plan_files(tmp_path, {"main.yaml": main, "gift.yaml": GIFT})
    script = {"dbl": lambda cmd: ok({"y": cmd["input"]["x"] * 2}), "gift/card": ok({"card": "hi"})}
    sim = Sim(plan, script, kernel=kernel).run()
    assert sim.status == "completed"
    lines = [{"y": 2}, {"y": 4}]
    assert sim.state["context"]["kept"] == lines
    expected = {"lines": lines, "looked": lines, "gift": "hi"} if kernel >= 6 else \
        {"lines": None, "looked": None, "gift": None}
    assert input_of(sim, "echo") == expected
    state, commands, events = replay(plan, sim.inputs)  # a run recorded under either version replays as it ran
    assert (state, commands, events) == (sim.state, sim.commands, sim.events)


def test_output_rules_name_and_map():
    plan = plan_of([{"a": {"output": "payment"}},
                    {"b": {"output": {"total": "${ amount * 2 }", "seen": "${ $context.payment.id }"}}}])
    sim = Sim(plan, {"a": ok({"id": "p1"}), "b": ok({"amount": 21})}).run()
    assert sim.state["context"] == {"payment": {"id": "p1"}, "total": 42, "seen": "p1"}


def test_fail_when_sees_the_result_and_the_context():
    plan = plan_of([{"check": {"fail_when": "${ level < $context.minimum }"}}, "after"])
    assert Sim(plan, {"check": ok({"level": 5})}, input={"minimum": 3}).run().status == "completed"
    sim = Sim(plan, {"check": ok({"level": 1})}, input={"minimum": 3}).run()
    assert sim.status == "failed"
    assert sim.state["error"] == {"type": "FailWhen", "message": "fail_when holds: level < $context.minimum"}


def test_a_with_expression_that_cannot_be_evaluated_fails_the_step():
    plan = plan_of(["a", {"b": {"with": {"n": "${ $number('x') }"}}}])
    sim = Sim(plan).run()
    assert sim.status == "failed"
    assert sim.state["failed_step"] == "b"
    assert sim.state["error"]["type"] == "ExpressionError"


def test_a_regular_expression_backtracking_on_the_input_fails_the_step_instead_of_holding_the_run():
    plan = plan_of(["a", {"b": {"when": "${ $contains(note, /^(a|aa)+$/) }"}}])
    sim = Sim(plan, input={"note": "a" * 80 + "!"}).run()
    assert sim.status == "failed"
    assert sim.state["failed_step"] == "b"
    assert sim.state["error"]["type"] == "ExpressionError"
    assert "took longer than 100 ms" in sim.state["error"]["message"]


def test_the_run_input_is_checked_against_the_input_schema():
    plan = plan_of(["a"], input={"type": "object", "required": ["order"]})
    sim = Sim(plan, input={"nope": 1}).run()
    assert sim.status == "failed"
    assert sim.state["error"]["type"] == "InputInvalid"
    assert sim.dispatched() == []
    assert [e["type"] for e in sim.events] == ["run_started", "run_finished"]


def test_a_failing_worker_fails_the_run():
    sim = Sim(plan_of(["a", "b", "c"]), {"b": fail("Boom", "it broke")}).run()
    assert sim.status == "failed"
    assert sim.state["error"] == {"type": "Boom", "message": "it broke"}
    assert sim.dispatched() == ["a", "b"]
    assert sim.of("run_finished")[0]["step"] == "b"
