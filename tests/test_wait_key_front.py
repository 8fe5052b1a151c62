"""Keyed waits from the spec text to the plan (docs/language.md, "One signal per item: `key:`"; docs/plan.md).

- ``key:`` on a signal wait compiles to the node's ``signal_key``, an expression id, and makes the plan of
  plan_version 4 (a plan without one keeps its version and its bytes); YAML and the text syntax
  (``wait delivered key "${ ... }"``) give the same bytes, ``convert`` round trips, the compiler is deterministic;
- the diagnostics: FD317 for a signal wait in a for_each body with no key (directly, or through a sub-flow), the
  expression checks of ``key`` (FD501, FD502, FD310, FD503, FD504, FD314), FD201 and FD202 (with its hint);
- plancheck: a keyed signal wait is taken, in a for_each or not; a ``signal_key`` on a timer wait, in a plan
  older than 4, or naming no expression is refused, as an unkeyed signal wait in a for_each still is.

The plans are checked as compiled, not run: running them is the kernel's and the runtimes' tests' business.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowdsl.api import compile_spec, plan_bytes
from flowdsl.convert import convert_text
from flowdsl.runtime.plancheck import plan_problem
from flowdsl.textsyntax import parse_flow, to_flow
from tests.test_wait_front import assert_mapping_order_is_ignored, compiled, plan, said

HEAD = "flowdsl: 1\nname: t\n"

#: the design's example: one wait per parcel, keyed by its tracking number
YAML_PARCELS = HEAD + """\
steps:
  - for_each: parcels
    items: "${ order.parcels }"
    as: parcel
    steps:
      - ship_parcel:
          with: {tracking: "${ $parcel.tracking }"}
      - wait: delivered
        key: "${ $parcel.tracking }"
        timeout: 336h
        output: delivery
  - close_order
"""
FLOW_PARCELS = """\
flow t

for_each parcels items "${ order.parcels }" as parcel {
  step ship_parcel with {tracking: "${ $parcel.tracking }"}
  wait delivered key "${ $parcel.tracking }" timeout 336h output delivery
}
step close_order
"""
#: the start of a for_each over parcels, whose body follows (indented by six)
LOOP = HEAD + "steps:\n  - for_each: parcels\n    items: '${ order.parcels }'\n    as: parcel\n    steps:\n"


# --- the plan ------------------------------------------------------------------------------------------------------


def test_a_keyed_wait_in_a_for_each_compiles_to_a_signal_key() -> None:
    p = plan(YAML_PARCELS)
    assert p["plan_version"] == 4
    node = p["nodes"]["delivered"]
    assert node == {
        "key": "delivered", "id": "delivered", "kind": "wait", "parent": "parcels", "deps": ["ship_parcel"],
        "order": 2, "scope": "parcels", "when": None, "description": None, "spec_path": "/steps/0/steps/1",
        "signal": "delivered", "signal_key": node["signal_key"], "delay_ms": None, "timeout_ms": 336 * 3_600_000,
        "output": {"mode": "name", "name": "delivery"}, "writes": ["delivery"], "stage": 1}  # fmt: skip
    assert p["expressions"][node["signal_key"]] == {"source": "$parcel.tracking", "vars": ["parcel"], "steps": []}
    # (the same expression as the step's with: one entry)
    assert p["nodes"]["ship_parcel"]["with"] == {"tracking": {"$expr": node["signal_key"]}}
    assert plan_problem(p) is None


def test_the_key_s_expression_is_stored_as_when_s_is() -> None:
    """Trimmed, its $steps reads listed; a key outside a for_each (the order's reference) is of plan_version 4 too."""
    p = plan(HEAD + "steps:\n  - fetch\n  - wait: paid\n    key: '${   $steps.fetch.ref & \"-\" & $string(n) }'\n"
             "    when: '${ $steps.fetch.ref }'\n")
    node = p["nodes"]["paid"]
    assert p["plan_version"] == 4 and node["when"] != node["signal_key"]
    assert p["expressions"][node["signal_key"]] == {"source": '$steps.fetch.ref & "-" & $string(n)',
                                                    "vars": ["steps"], "steps": ["fetch"]}


@pytest.mark.parametrize(("steps", "version"), [
    ("  - wait: w\n", 3),
    ("  - wait: w\n    signal: s\n    timeout: 1s\n", 3),
    ("  - wait: w\n    key: '${ ref }'\n", 4),
    ("  - wait: w\n  - wait: t\n    for: 1s\n  - wait: k\n    key: '${ 1 }'\n", 4),
])  # fmt: skip
def test_plan_version_4_only_with_a_keyed_wait(steps: str, version: int) -> None:
    p = plan(HEAD + "steps:\n" + steps)
    assert p["plan_version"] == version
    assert (version == 4) == any("signal_key" in n for n in p["nodes"].values())


def test_yaml_and_text_give_identical_plans() -> None:
    assert plan_bytes(plan(FLOW_PARCELS, "t.flow")) == plan_bytes(plan(YAML_PARCELS))
    assert parse_flow(FLOW_PARCELS, "t.flow").data == yaml.safe_load(YAML_PARCELS)


def test_the_canonical_text_and_convert_both_ways() -> None:
    data = yaml.safe_load(YAML_PARCELS)
    assert to_flow(data) == FLOW_PARCELS
    back = convert_text(parse_flow(FLOW_PARCELS, "t.flow").data, "yaml")
    assert yaml.safe_load(back) == data and convert_text(yaml.safe_load(back), "flow") == FLOW_PARCELS
    # canonical order: key right after signal, in both writers
    wait = {"output": "o", "timeout": "1m", "key": "${ $item.id }", "signal": "s", "wait": "w"}
    written = convert_text({"flowdsl": 1, "name": "t", "steps": [wait]}, "yaml")
    assert written.splitlines()[3:] == ["- wait: w", "  signal: s", "  key: ${ $item.id }", "  timeout: 1m",
                                        "  output: o"]
    assert to_flow({"flowdsl": 1, "name": "t", "steps": [wait]}).splitlines()[2] == \
        'wait w signal s key "${ $item.id }" timeout 1m output o'


def test_key_in_a_block_and_on_the_statement_line_read_alike() -> None:
    block = 'flow t\nfor_each parcels items "${ order.parcels }" as parcel {\n  wait delivered {\n' \
            '    key "${ $parcel.tracking }"\n    timeout 336h\n  }\n}\n'
    line = 'flow t\nfor_each parcels items "${ order.parcels }" as parcel {\n' \
           '  wait delivered timeout 336h key "${ $parcel.tracking }"\n}\n'
    assert plan_bytes(plan(block, "a.flow")) == plan_bytes(plan(line, "b.flow"))


def test_the_plan_does_not_depend_on_the_order_of_mappings() -> None:
    assert_mapping_order_is_ignored(YAML_PARCELS, seed=11)


def test_a_keyed_wait_in_a_sub_flow_used_in_a_for_each(tmp_path: Path) -> None:
    """The sub-flow's wait takes its key from what the sub-flow node's with: passes it."""
    (tmp_path / "approve.yaml").write_text(HEAD + "steps:\n  - ask\n  - wait: approved\n    key: '${ refund_id }'\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - for_each: refunds\n    items: '${ order.refunds }'\n"
                                        "    steps:\n      - flow: approve\n        path: approve.yaml\n"
                                        "        with: {refund_id: '${ $item.id }'}\n")
    result = compile_spec(str(tmp_path / "main.yaml"))
    assert result.diagnostics == [] and result.plan is not None
    node = result.plan["nodes"]["approve/approved"]
    assert (result.plan["plan_version"], node["scope"]) == (4, "approve")
    assert result.plan["expressions"][node["signal_key"]]["source"] == "refund_id"


# --- FD317 --------------------------------------------------------------------------------------------------------


def test_a_signal_wait_in_a_for_each_with_no_key_is_fd317() -> None:
    assert said(LOOP + "      - wait: delivered\n        timeout: 1h\n") == [
        "spec.yaml:8:15: error FD317: 'delivered' waits for signal 'delivered' inside for_each 'parcels' with no "
        "key: a signal wait in a for_each body needs a 'key:' telling which iteration a signal is for, such as "
        "'key: \"${ $parcel.id }\"'; or wait before or after the loop (a timer wait, with 'for', may stay inside)"]
    # in the text syntax, as it writes the option; the variable of the innermost loop
    assert said('flow t\nfor_each a items "${ xs }" {\n  for_each b items "${ $item.ys }" as y {\n'
                "    wait w signal s\n  }\n}\n", "spec.flow") == [
        "spec.flow:4:19: error FD317: 'w' waits for signal 's' inside for_each 'b' with no key: a signal wait in a "
        "for_each body needs a 'key' telling which iteration a signal is for, such as 'key \"${ $y.id }\"'; or wait "
        "before or after the loop (a timer wait, with 'for', may stay inside)"]
    # the fix it says
    assert plan(LOOP + "      - wait: delivered\n        key: '${ $parcel.id }'\n")["plan_version"] == 4


def test_an_unkeyed_wait_of_a_sub_flow_in_a_for_each_is_fd317_at_the_sub_flow_node(tmp_path: Path) -> None:
    (tmp_path / "approve.yaml").write_text(HEAD + "steps:\n  - wait: approved\n")
    main = tmp_path / "main.flow"
    main.write_text('flow m\nfor_each refunds items "${ order.refunds }" {\n  flow approve path approve.yaml\n}\n')
    (diag,) = compile_spec(str(main)).diagnostics
    assert (diag.code, diag.file, diag.line, diag.column) == ("FD317", str(main), 3, 8)
    assert diag.message == (
        "sub-flow 'approve' waits for signal 'approved' (wait 'approved', line 4 of approve.yaml) inside for_each "
        "'refunds' with no key: a signal wait in a for_each body needs a 'key:' telling which iteration a signal is "
        "for: give that wait one in its file, from a value the sub-flow node's 'with' passes it; or wait before or "
        "after the loop, outside the sub-flow")


def test_keyed_or_not_a_signal_goes_to_one_wait_fd316() -> None:
    twice = LOOP + "      - wait: a\n        key: '${ $index }'\n      - wait: b\n        signal: a\n" \
        "        key: '${ $index }'\n"
    assert [d.code for d in compiled(twice)[1]] == ["FD316"]
    assert [d.code for d in compiled(HEAD + "steps:\n  - wait: a\n    key: '${ x }'\n  - wait: b\n    signal: a\n"
                                     )[1]] == ["FD316"]


# --- the key's expression -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [
    ("tracking", "error FD501: 'key' must be one expression written as \"${ ... }\", found 'tracking'"),
    ("'${ a } and ${ b }'", "error FD501: 'key' must be one expression written as \"${ ... }\", found "
                            "'${ a } and ${ b }'"),
    ("'${ $parcel.( }'", "error FD501: in 'key': expected ) before end of expression at character 9 of "
                         "'$parcel.('"),
    ("'${ $parcl.tracking }'", "error FD502: in 'key': undefined variable '$parcl' (did you mean '$parcel'?); "
                               "expected one of $index, $input, $parcel, $run, $steps or a variable bound in the "
                               "expression"),
    ("'${ $context.id }'", "error FD502: in 'key': undefined variable '$context' (it is defined only where a "
                           "step's result is read: fail_when, output, compensate.with)"),
    ("'${ parcel.tracking }'", "warning FD310: in 'key': 'parcel' reads the context's field 'parcel', not the "
                               "loop variable: write '$parcel'"),
    ("'${ $string($random()) }'", "error FD503: in 'key': '$random' is not allowed"),
    ("'${ $steps.delivered.id }'", "error FD504: in 'key': 'delivered' cannot read its own result here"),
    ("5", "error FD201: expected an expression: ${ jsonata }, found 5"),
])  # fmt: skip
def test_a_bad_key_gives_the_usual_expression_diagnostics(key: str, expected: str) -> None:
    (line,) = said(LOOP + f"      - wait: delivered\n        key: {key}\n")
    assert line.startswith(f"spec.yaml:9:14: {expected}"), line


def test_the_loop_s_variables_are_in_the_key_s_scope_and_only_there() -> None:
    nested = HEAD + ("steps:\n  - for_each: orders\n    items: '${ orders }'\n    as: order\n    steps:\n"
                     "      - for_each: lines\n        items: '${ $order.lines }'\n        steps:\n"
                     "          - wait: checked\n"
                     "            key: '${ $order.id & \"/\" & $index & \"/\" & $item.sku }'\n")
    assert plan(nested)["nodes"]["checked"]["signal_key"]
    (line,) = said(HEAD + "steps:\n  - for_each: l\n    items: '${ xs }'\n    as: x\n    steps: [a]\n"
                   "  - wait: w\n    key: '${ $x.id }'\n")
    assert "error FD502: in 'key': undefined variable '$x' (it is defined only inside for_each 'l')" in line


def test_a_key_reading_what_only_a_node_beside_it_writes_is_fd314() -> None:
    text = HEAD + ("steps:\n  - parallel: p\n    branches:\n      - fetch: {output: ref}\n"
                   "      - wait: paid\n        key: '${ ref }'\n")
    (diag,) = compiled(text)[1]
    assert (diag.code, diag.path, diag.line) == ("FD314", "/steps/0/branches/1/key", 8)


@pytest.mark.parametrize(("text", "filename", "where", "hint"), [
    (HEAD + "steps:\n  - for_each: l\n    items: '${ xs }'\n    key: '${ $item.id }'\n    steps: [a]\n", "spec.yaml",
     "spec.yaml:6:5", "'key' is an option of a signal wait: give it to the wait inside the for_each, to tell which "
                      "iteration a signal is for"),
    (HEAD + "steps:\n  - a: {key: '${ x }'}\n", "spec.yaml", "spec.yaml:4:9",
     "'key' is an option of a signal wait (which of its instances a signal is for)"),
    ('flow t\nstep a key "${ x }"\n', "spec.flow", "spec.flow:2:8",
     "'key' is an option of a signal wait (which of its instances a signal is for)"),
])  # fmt: skip
def test_key_on_a_step_or_a_group_is_fd202_with_a_hint(text: str, filename: str, where: str, hint: str) -> None:
    (line,) = said(text, filename)
    assert line.startswith(f"{where}: error FD202: unknown field 'key'") and line.endswith(hint), line


# --- the text syntax ----------------------------------------------------------------------------------------------


def test_key_is_a_keyword_only_where_an_option_can_stand() -> None:
    doc = parse_flow("flow t\nstep key worker w\nwait key key \"${ k }\"\n", "t.flow")
    assert doc.diagnostics == []
    assert doc.data["steps"] == [{"key": {"worker": "w"}}, {"wait": "key", "key": "${ k }"}]
    # in a line of step names it is a step, as it was before `key` was a keyword (and `signal` and `for` too: files
    # written then hold such lines); the writer now puts it on a line of its own
    data = {"flowdsl": 1, "name": "t", "steps": [{"sequence": "s", "steps": ["a", "key", "signal", "for"]}]}
    before = parse_flow("flow t\nsequence s { a key signal for }\n", "old.flow")
    assert before.diagnostics == [] and before.data == data
    assert to_flow(data) == "flow t\n\nsequence s {\n  a\n  step key\n  step signal\n  step for\n}\n"
    assert parse_flow(to_flow(data), "t.flow").data == data
    # other keywords in such a line are still refused: an option written in a group's body
    (diag,) = parse_flow("flow t\nfor_each e items x {\n  as line\n}\n", "bad.flow").diagnostics
    assert diag.code == "FD108" and "'as' is a keyword, not a step name here" in diag.message


def test_a_wait_statement_s_fd108_lists_key_among_its_options() -> None:
    (diag,) = parse_flow("flow t\nwait a b\n", "bad.flow").diagnostics
    assert "an option of a wait (signal, key, timeout, for, output, on_failure, when, needs, description)" in \
        diag.message


def test_key_without_its_value_is_fd108() -> None:
    (diag,) = parse_flow("flow t\nwait a key\n", "bad.flow").diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD108", 2, 11)
    assert "expected a value" in diag.message


# --- plancheck ----------------------------------------------------------------------------------------------------


def keyed_plan() -> dict[str, Any]:
    """A plan with a keyed wait in a for_each (``delivered``), a timer (``t``) and an unkeyed signal wait (``w``)."""
    p = plan(YAML_PARCELS.replace("  - close_order\n", "  - wait: t\n    for: 1s\n  - wait: w\n"))
    return json.loads(json.dumps(p))


def test_plancheck_takes_a_keyed_signal_wait_in_a_for_each_and_outside() -> None:
    p = keyed_plan()
    assert plan_problem(p) is None
    p["nodes"]["w"]["signal_key"] = p["nodes"]["delivered"]["signal_key"]
    assert plan_problem(p) is None


#: (what is changed, the problem plancheck says)
REFUSED: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("signal_key on a timer", lambda p: p["nodes"]["t"].update(signal_key=p["nodes"]["delivered"]["signal_key"]),
     "'nodes/t/signal_key': '%s' is not of type 'null' (a timer wait, one with a delay_ms, has no deadline, no key, "
     "no payload to place and no on_failure: FD309)"),
    ("an unkeyed signal wait in a for_each", lambda p: p["nodes"]["delivered"].pop("signal_key"),
     "'nodes/delivered/signal': plan node 'delivered' waits for signal 'delivered' inside for_each 'parcels' with "
     "no 'signal_key' (which iteration would a signal be for?): FD317"),
    ("a plan of version 3", lambda p: p.update(plan_version=3),
     "'nodes/delivered' has 'signal_key', which plan_version 4 brought: the plan's plan_version must be 4"),
    ("a key naming no expression", lambda p: p["nodes"]["w"].update(signal_key="x000000000000"),
     "'nodes/w/signal_key' names the expression 'x000000000000', which is not in 'expressions'"),
    ("a key that is no expression id", lambda p: p["nodes"]["w"].update(signal_key="${ id }"),
     "'nodes/w/signal_key': '${ id }' does not match"),
    ("a null key", lambda p: p["nodes"]["w"].update(signal_key=None),
     "'nodes/w/signal_key': None is not of type 'string'"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "change", "problem"), REFUSED, ids=[r[0] for r in REFUSED])
def test_plancheck_refuses_a_key_where_it_cannot_be(what: str, change: Callable[[dict[str, Any]], object],
                                                    problem: str) -> None:
    p = keyed_plan()
    change(p)
    said = plan_problem(p)
    expected = problem % p["nodes"]["delivered"].get("signal_key") if "%s" in problem else problem
    assert said is not None and said.startswith(expected), said


def test_the_quick_check_and_the_whole_schema_agree_on_keys() -> None:
    from flowdsl.runtime.plancheck import _well_shaped
    from tests.test_plan_schema import _whole_schema

    for key, change in (("t", {"signal_key": "x000000000000"}), ("t", {"signal_key": None}),
                        ("w", {"signal_key": None}), ("w", {"signal_key": 5}), ("w", {"signal_key": "nope"}),
                        ("delivered", {})):
        p = keyed_plan()
        p["nodes"][key].update(change)
        valid, problem = _whole_schema(p)
        assert _well_shaped(p) == valid, (key, change)
        assert plan_problem(p) == problem, (key, change)
