"""The kernel's straight-line path for plain sequences (``kernel_chain.chain_step``) decides exactly what the
general path decides: the same state, commands and events, byte for byte, over random and hand-picked flows."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowdsl.kernel import Program, apply, start_run
from flowdsl.kernel_chain import chain_step
from tests.kernel.plans import plan_files, plan_of, plan_yaml
from tests.kernel.sim import Sim, fail, hang, ok
from tests.kernel.test_properties import Tree, build, draw_script, trees


def programs(plan: dict[str, Any]) -> tuple[Program, Program]:
    """The plan with its straight-line path, and without it (every event through the general path)."""
    fast, slow = Program(plan), Program(plan)
    slow.chain = {}
    return fast, slow


def transcript(sim: Sim) -> str:
    return json.dumps({"inputs": sim.inputs, "commands": sim.commands, "events": sim.events, "state": sim.state},
                      sort_keys=False)


def same_decisions(plan: dict[str, Any], script: dict[str, Any] | None = None, **options: Any) -> Sim:
    fast, slow = programs(plan)
    one = Sim(fast, script, **options).run()  # type: ignore[arg-type]
    other = Sim(slow, script, **options).run()  # type: ignore[arg-type]
    assert transcript(one) == transcript(other)
    return one


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, data=st.data())
def test_random_flows_decide_the_same_with_and_without_the_straight_line(tree: Tree, data: st.DataObject) -> None:
    tasks: dict[str, bool] = {}
    _, root = build(tree, itertools.count(), tasks)
    plan = plan_of([root])
    results = [None, {"shared": "x"}, "not an object"]
    script = draw_script(tasks, data, lambda step, after: results[after % 3] if after % 4 else {step: after})
    cancel_at = data.draw(st.one_of(st.none(), st.integers(1000, 1100)), label="cancel_at")
    sim = same_decisions(plan, script, cancel_at=cancel_at, reload_state=data.draw(st.booleans()))
    event(f"straight-line steps in the plan: {'some' if Program(plan).chain else 'none'}; {sim.status}")


def test_a_plain_sequence_is_decided_on_the_straight_line(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_of([f"s{i}" for i in range(6)])
    assert Program(plan).chain == {**{f"s{i}": f"s{i + 1}" for i in range(5)}, "s5": ""}
    taken: list[bool] = []
    original = chain_step

    def spy(*args: Any) -> Any:
        decided = original(*args)
        taken.append(decided is not None)
        return decided

    monkeypatch.setattr("flowdsl.kernel.chain_step", spy)  # (apply's name for it)
    assert Sim(Program(plan)).run().status == "completed"  # type: ignore[arg-type]
    assert taken == [True] * 5 + [False]  # the last step closes the run: the general path


def test_what_breaks_the_line_goes_the_general_way() -> None:
    chain = Program(plan_yaml("""
flowdsl: 1
name: t
steps:
  - a
  - b:
      fail_when: "${ bad }"
  - c
  - d:
      when: "${ go }"
  - e:
      output: {x: "${ v }"}
  - f:
      with: {n: "${ n }"}
  - g:
      needs: [a, f]
  - parallel: p
    branches: [h, i]
  - j
""")).chain
    # a is waited for by b and g; b has fail_when and e an output map; c's follower d has when and e's
    # follower f has with; g waits for two steps and starts a group; nothing waits for h, i (in p) or j
    assert chain == {"d": "e", "h": "", "i": "", "j": ""}


CASES = {
    "timeouts": ("""
flowdsl: 1
name: t
defaults: {timeout: 50ms}
steps:
  - a
  - b: {timeout: 20ms, retry: {attempts: 2, initial: 1ms}}
  - c: {compensate: undo_c}
  - d
  - e
""", {"b": [hang(), ok({"b": 1})], "e": fail("Broken")}),
    "for_each bodies": ("""
flowdsl: 1
name: t
input: {type: object}
steps:
  - for_each: lines
    items: "${ $input.lines }"
    concurrency: 2
    steps:
      - x: {compensate: undo_x}
      - y
      - z
  - after
""", {"lines[2]/z": fail("Broken")}),
    "results that are not objects": ("""
flowdsl: 1
name: t
steps: [a, b, c, d]
""", {"b": ok("not an object"), "c": ok(None)}),
    "named outputs": ("""
flowdsl: 1
name: t
steps:
  - a: {output: first}
  - b
  - c: {output: third}
  - d
""", {"a": ok({"v": 1}), "c": ok({"v": 3})}),
    # an empty result leaves its successor the step's own context (shared, not copied): later steps still add
    "empty results between others": ("""
flowdsl: 1
name: t
steps: [a, b, c, d, e, f]
""", {"a": ok({}), "b": ok({"v": 1}), "c": ok({}), "d": ok(None), "e": ok({"v": 2, "w": 3})}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_flows_decide_the_same(name: str) -> None:
    text, script = CASES[name]
    same_decisions(plan_yaml(text), script, input={"lines": [1, 2, 3, 4]})


def test_sub_flow_bodies_decide_the_same(tmp_path: Path) -> None:
    plan = plan_files(tmp_path, {
        "main.yaml": "flowdsl: 1\nname: m\nsteps:\n  - flow: gift\n    path: gift.yaml\n  - done\n",
        "gift.yaml": "flowdsl: 1\nname: gift\nsteps: [wrap, tag, ship]\n",
    })
    assert Program(plan).chain
    same_decisions(plan, {"gift/tag": ok({"tagged": True})})


def test_meta_of_an_answer_goes_into_its_event_on_the_straight_line() -> None:
    plan = plan_of(["a", "b", "c"])
    outputs = []
    for program in programs(plan):
        d = start_run(program, "r", {}, at=1)
        task = d.commands[0]["task_id"]
        d = apply(program, d.state, {"type": "task_succeeded", "task_id": task, "at": 2, "result": {"k": 1},
                                     "meta": {"llm": {"model": "m"}}})
        outputs.append(json.dumps([d.state, d.commands, d.events]))
        assert d.events[0]["meta"] == {"llm": {"model": "m"}} and "meta" not in d.events[1]
    assert outputs[0] == outputs[1]


def guarded_flow(when: bool) -> dict[str, Any]:
    """Steps of every kind of container, each with a ``when`` that holds, or none."""
    def step(name: str, **options: Any) -> Any:
        if when:
            options["when"] = "${ true }"
        return {name: options} if options else name

    return plan_of([
        step("a"),
        step("b", timeout="20ms", retry={"attempts": 2, "initial": "1ms"}),
        {"parallel": "p", "branches": [step("c"), {"sequence": "s", "steps": [step("d"), step("e")]}]},
        {"for_each": "lines", "items": "${ $input.lines }", "steps": [step("f"), step("g", compensate="undo_g")]},
        step("gen", llm={"signature": "name -> greeting", "instructions": "Greet."}, fallback="template_greeting"),
        step("h"),
    ], input={"type": "object"})


@pytest.mark.parametrize("script", [
    {},
    {"b": [hang(), ok({"b": 1})], "gen": fail("LLMNotConfigured", "no LM"), "e": ok({"e": 2})},
    {"lines[1]/g": ok({"g": 1}), "h": fail("Broken")},
], ids=["all succeed", "retries and a fallback", "a failure undone"])
def test_steps_started_from_their_templates_decide_as_those_with_a_when(script: dict[str, Any]) -> None:
    """A step with no ``when`` starts from its templates (``kernel_program.StepTemplates``), on the straight line
    or not; one with a ``when`` that holds gets its record built field by field and is never on the straight
    line: the same decisions, byte for byte."""
    plain, guarded = guarded_flow(when=False), guarded_flow(when=True)
    assert any(Program(plain).chain.values()) and not any(Program(guarded).chain.values())  # (no step starts another)
    run_input = {"lines": [1, 2], "name": "Ann"}
    assert transcript(Sim(plain, script, input=run_input).run()) == \
        transcript(Sim(guarded, script, input=run_input).run())


def test_the_contexts_kept_per_run_stay_bounded() -> None:
    from flowdsl.kernel_core import _RECENT, RunState

    plan = plan_of([f"s{i}" for i in range(5 * _RECENT)])
    sim = Sim(plan, {f"s{i}": ok({f"v{i}": i}) for i in range(5 * _RECENT)}).run()
    assert sim.status == "completed"
    assert isinstance(sim.state, RunState) and _RECENT <= len(sim.state.contexts.recent) <= 2 * _RECENT
    last = sim.dispatches[-1]["input"]
    assert list(last) == [f"v{i}" for i in range(5 * _RECENT - 1)]
