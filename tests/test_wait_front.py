"""The front end of ``wait`` nodes (docs/language.md, "Waiting: signals and timers"): from the spec text to the plan.

- YAML and the text syntax read to the same data and compile to the same bytes; ``convert`` round trips;
- the plan node of each kind of wait, the flow graph (a wait is a vertex), the plan_version (1, 2, 3; 4 with a
  keyed wait, whose front end tests/test_wait_key_front.py tests) and the refusal of a plan below 3 holding a wait
  (flowdsl.runtime.plancheck);
- diagnostics, each with file:line:col: the schema's (FD201, FD202 with its hints, FD302), the model's (FD309,
  FD401), the compiler's (FD316, FD317; ids, needs, FD307, FD314, FD315 and FD504 with waits in them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowdsl.api import compile_loaded, compile_spec, load_text, plan_bytes
from flowdsl.convert import convert_text
from flowdsl.diagnostics import Diagnostic
from flowdsl.runtime.plancheck import PLAN_VERSION, plan_problem
from flowdsl.textsyntax import parse_flow, to_flow

HEAD = "flowdsl: 1\nname: t\n"

#: one of each: a signal wait with a deadline and an output name; a timer; a wait taking a signal named apart
#: from its id, that the run may go on without
YAML_WAITS = HEAD + """\
steps:
  - process_payment:
      compensate: refund_payment
  - wait: payment_confirmed
    timeout: 30m
    output: confirmation
  - wait: cooling_off
    for: 2h
  - wait: approval
    signal: manager_approved
    timeout: 1h
    on_failure: continue
  - ship_order
"""
FLOW_WAITS = """\
flow t

step process_payment undo refund_payment
wait payment_confirmed timeout 30m output confirmation
wait cooling_off for 2h
wait approval signal manager_approved timeout 1h on_failure continue
step ship_order
"""


def compiled(text: str, filename: str = "spec.yaml") -> tuple[dict[str, Any] | None, list[Diagnostic]]:
    result = compile_loaded(load_text(text, filename), filename)
    return result.plan, result.diagnostics


def plan(text: str, filename: str = "spec.yaml") -> dict[str, Any]:
    found, diags = compiled(text, filename)
    assert found is not None and diags == [], [d.format() for d in diags]
    return found


def said(text: str, filename: str = "spec.yaml") -> list[str]:
    """Each diagnostic as ``flowdsl validate`` prints it."""
    return [d.format() for d in compiled(text, filename)[1]]


# --- the two syntaxes ---------------------------------------------------------------------------------------------


def test_the_text_syntax_reads_to_the_data_of_the_yaml() -> None:
    doc = parse_flow(FLOW_WAITS, "t.flow")
    assert doc.diagnostics == []
    assert doc.data == yaml.safe_load(YAML_WAITS)
    assert doc.data["steps"][3] == {"wait": "approval", "signal": "manager_approved", "timeout": "1h",
                                    "on_failure": "continue"}


@pytest.mark.parametrize(("yaml_steps", "flow_lines"), [
    ("  - wait: a\n", "wait a"),
    ("  - wait: a\n    for: 90\n", "wait a for 90"),
    ("  - wait: a\n    for: 1m30s\n    description: let the bank settle\n",
     'wait a for 1m30s description "let the bank settle"'),
    ("  - wait: a\n    timeout: 1h\n    output: {who: '${ manager }', at: '${ $context.now }'}\n"
     "    on_failure: compensate\n", 'wait a timeout 1h output {who: "${ manager }", at: "${ $context.now }"} '
                                    "on_failure compensate"),
    ("  - first\n  - second: {needs: []}\n  - wait: a\n    needs: [first, second]\n    when: '${ go }'\n",
     'step first\nstep second needs []\nwait a when "${ go }" needs first, second'),
    ("  - parallel: p\n    branches:\n      - wait: a\n        for: 2h\n      - wait: b\n        signal: s\n",
     "parallel p {\n  wait a for 2h\n  wait b signal s\n}"),
    # an option on the statement's line, the others in its block
    ("  - wait: a\n    signal: s\n    timeout: 5m\n    output: got\n",
     "wait a output got {\n  signal s\n  timeout 5m\n}"),
])  # fmt: skip
def test_yaml_and_text_give_identical_plans(yaml_steps: str, flow_lines: str) -> None:
    from_yaml = plan(HEAD + "steps:\n" + yaml_steps)
    assert plan_bytes(plan(f"flow t\n{flow_lines}\n", "spec.flow")) == plan_bytes(from_yaml)


def test_the_design_s_examples_are_the_canonical_text() -> None:
    assert to_flow(yaml.safe_load(YAML_WAITS)) == FLOW_WAITS
    assert plan_bytes(plan(FLOW_WAITS, "t.flow")) == plan_bytes(plan(YAML_WAITS))


def test_convert_round_trips_both_ways() -> None:
    data = yaml.safe_load(YAML_WAITS)
    flow = convert_text(data, "flow")
    back = convert_text(parse_flow(flow, "t.flow").data, "yaml")
    assert yaml.safe_load(back) == data
    assert convert_text(yaml.safe_load(back), "flow") == flow
    # canonical YAML: the wait keyword first, then its options in the documented order
    written = convert_text({"flowdsl": 1, "name": "t", "steps": [
        {"description": "d", "on_failure": "continue", "output": "o", "timeout": "1m", "signal": "s", "wait": "w"}]},
        "yaml")
    assert written.splitlines()[3:] == ["- wait: w", "  signal: s", "  timeout: 1m", "  output: o",
                                        "  on_failure: continue", "  description: d"]


def test_a_long_wait_is_written_with_its_options_in_a_block() -> None:
    data = {"flowdsl": 1, "name": "t", "steps": [{"wait": "w", "timeout": "30m", "output": "confirmation",
                                                  "description": "the payment provider's webhook, which may be late"}]}
    text = to_flow(data)
    assert text.splitlines()[2:] == ["wait w {", "  timeout 30m", "  output confirmation",
                                     '  description "the payment provider\'s webhook, which may be late"', "}"]
    assert parse_flow(text, "t.flow").data == data


def test_wait_signal_and_for_are_keywords_only_where_they_can_stand() -> None:
    doc = parse_flow("flow t\nstep wait\nstep signal for 2\nsequence s {\n  step for\n}\n", "t.flow")
    assert doc.diagnostics == []
    assert doc.data["steps"] == ["wait", {"signal": {"for": 2}}, {"sequence": "s", "steps": ["for"]}]
    # a step named 'wait' is written with `step`, as for any keyword
    assert to_flow({"flowdsl": 1, "name": "t", "steps": [{"sequence": "s", "steps": ["a", "wait", "signal"]}]}) \
        == "flow t\n\nsequence s {\n  a\n  step wait\n  step signal\n}\n"
    # (as a plain string a step named wait stays a step in YAML)
    assert plan(HEAD + "steps: [wait]\n")["nodes"]["wait"]["kind"] == "task"


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("flow t\nwait\n", 2, 5, "unexpected end of line, expected one of: a name, a string"),
    ("flow t\nwait a signal\n", 2, 14, "unexpected end of line, expected a value"),
    ("flow t\nsequence s { a wait }\n", 2, 16, "'wait' is a keyword, not a step name here; a step whose worker is "
                                               "named 'wait' is written `step wait`"),
    ("flow t\nwait a timout 5m\n", 2, 8, "(did you mean 'timeout'?)"),
    ("flow t\nwait a for 1s for 2s\n", 2, 15, "duplicate option 'for' (first written on line 2)"),
])  # fmt: skip
def test_text_syntax_errors_in_a_wait(text: str, line: int, column: int, message: str) -> None:
    doc = parse_flow(text, "bad.flow")
    assert doc.data is None
    (diag,) = doc.diagnostics
    assert (diag.file, diag.line, diag.column) == ("bad.flow", line, column), diag.format()
    assert diag.code in ("FD104", "FD108") and message in diag.message


# --- the plan -----------------------------------------------------------------------------------------------------


def test_the_plan_nodes_of_the_three_kinds_of_wait() -> None:
    nodes = plan(YAML_WAITS)["nodes"]
    common = {"parent": None, "scope": None, "when": None, "description": None}
    assert nodes["payment_confirmed"] == {
        **common, "key": "payment_confirmed", "id": "payment_confirmed", "kind": "wait", "order": 1,
        "deps": ["process_payment"], "spec_path": "/steps/1", "signal": "payment_confirmed", "delay_ms": None,
        "timeout_ms": 1_800_000, "output": {"mode": "name", "name": "confirmation"}, "writes": ["confirmation"],
        "stage": 1}
    assert nodes["cooling_off"] == {
        **common, "key": "cooling_off", "id": "cooling_off", "kind": "wait", "order": 2,
        "deps": ["payment_confirmed"], "spec_path": "/steps/2", "signal": None, "delay_ms": 7_200_000,
        "timeout_ms": None, "output": {"mode": "merge"}, "writes": [], "stage": 2}
    assert nodes["approval"] == {
        **common, "key": "approval", "id": "approval", "kind": "wait", "order": 3, "deps": ["cooling_off"],
        "spec_path": "/steps/3", "signal": "manager_approved", "delay_ms": None, "timeout_ms": 3_600_000,
        "output": {"mode": "merge"}, "writes": None, "stage": 3, "on_failure": "continue"}  # fmt: skip


def test_a_signal_wait_without_a_timeout_and_on_failure_compensate() -> None:
    nodes = plan(HEAD + "steps:\n  - wait: a\n  - wait: b\n    timeout: 1s\n    on_failure: compensate\n"
                 "    output: {x: '${ y }'}\n")["nodes"]
    assert (nodes["a"]["signal"], nodes["a"]["timeout_ms"], nodes["a"]["writes"]) == ("a", None, None)
    assert "on_failure" not in nodes["b"] and nodes["b"]["writes"] == ["x"]
    assert nodes["b"]["output"]["mode"] == "map"


def test_a_wait_is_a_vertex_of_the_flow_graph() -> None:
    p = plan(HEAD + """\
steps:
  - start
  - parallel: p
    branches:
      - wait: cool
        for: 1h
      - sequence: s
        steps: [a, b]
  - wait: go
    needs: [p]
  - done
""")
    assert p["stages"] == [["start"], ["cool", "a"], ["b"], ["go"], ["done"]]
    assert p["critical_path"] == ["start", "a", "b", "go", "done"]
    assert ["cool", "p:end"] in p["edges"] and ["p:start", "cool"] in p["edges"] and ["go", "done"] in p["edges"]
    assert (p["nodes"]["cool"]["stage"], p["nodes"]["go"]["stage"]) == (1, 3)
    assert p["nodes"]["go"]["deps"] == ["p"] and p["nodes"]["cool"]["parent"] == "p"


def test_a_wait_inside_a_sub_flow_is_keyed_under_its_use(tmp_path: Path) -> None:
    (tmp_path / "sub.yaml").write_text(HEAD + "steps:\n  - wait: approved\n    timeout: 1h\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - flow: review\n    path: sub.yaml\n  - after\n")
    result = compile_spec(str(tmp_path / "main.yaml"))
    assert result.diagnostics == [] and result.plan is not None
    node = result.plan["nodes"]["review/approved"]
    assert (node["kind"], node["signal"], node["scope"], node["parent"]) == ("wait", "approved", "review", "review")
    assert result.plan["plan_version"] == 3


@pytest.mark.parametrize(("steps", "version"), [
    ("  - a\n  - b\n", 1),
    ("  - a: {on_failure: compensate}\n", 1),
    ("  - a: {on_failure: continue}\n", 2),
    ("  - a\n  - wait: w\n    for: 1s\n", 3),
    ("  - a: {on_failure: continue}\n  - wait: w\n", 3),
    ("  - wait: w\n    timeout: 1s\n    on_failure: continue\n", 3),
    ("  - wait: w\n    key: '${ order.ref }'\n", 4),
    ("  - wait: w\n  - for_each: l\n    items: '${ xs }'\n    steps:\n      - wait: v\n"
     "        key: '${ $index }'\n", 4),
])  # fmt: skip
def test_the_plan_is_of_the_oldest_plan_version_that_holds_it(steps: str, version: int) -> None:
    assert plan(HEAD + "steps:\n" + steps)["plan_version"] == version


def test_the_plans_of_waits_do_not_depend_on_the_order_of_mappings() -> None:
    assert_mapping_order_is_ignored(YAML_WAITS, seed=7)


def assert_mapping_order_is_ignored(text: str, seed: int) -> None:
    """The plan of the YAML spec ``text`` is the same bytes twice, and with its mappings' keys shuffled."""
    data = yaml.safe_load(text)
    expected = plan_bytes(plan(text))
    assert plan_bytes(plan(text)) == expected  # twice
    rng = random.Random(seed)

    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            keys = list(value)
            rng.shuffle(keys)
            return {k: shuffled(value[k]) for k in keys}
        return [shuffled(v) for v in value] if isinstance(value, list) else value

    for _ in range(5):
        again = shuffled(data)
        assert again == data
        assert plan_bytes(plan(yaml.safe_dump(again, sort_keys=False))) == expected


# --- plancheck ----------------------------------------------------------------------------------------------------


def test_plancheck_reads_plan_version_4_and_refuses_a_wait_in_a_plan_older_than_3() -> None:
    assert PLAN_VERSION == 4
    good = plan(YAML_WAITS)
    assert plan_problem(good) is None
    for older in (1, 2):
        damaged = {**json.loads(json.dumps(good)), "plan_version": older}
        assert plan_problem(damaged) == ("'nodes/payment_confirmed' is a wait node, which plan_version 3 brought: "
                                         "the plan's plan_version must be 3")
    damaged = json.loads(json.dumps(good))
    damaged["plan_version"] = 5
    assert plan_problem(damaged) == "'plan_version' must be 1 to 4, found 5"
    assert plan_problem(plan(HEAD + "steps:\n  - a: {on_failure: continue}\n")) is None  # (version 2 still reads)


@pytest.mark.parametrize(("change", "found"), [({"signal": None}, "neither"), ({"delay_ms": 5}, "both")])
def test_plancheck_refuses_a_wait_that_is_neither_or_both_kinds(change: dict[str, Any], found: str) -> None:
    damaged = json.loads(json.dumps(plan(YAML_WAITS)))
    damaged["nodes"]["approval"].update(change)
    assert plan_problem(damaged) == (f"'nodes/approval' must have either a 'signal' (a signal wait) or a 'delay_ms' "
                                     f"(a timer wait), found {found}")


def test_plancheck_refuses_a_wait_node_of_the_wrong_shape() -> None:
    damaged = json.loads(json.dumps(plan(YAML_WAITS)))
    damaged["nodes"]["cooling_off"]["retry"] = {}
    assert plan_problem(damaged) is not None and "retry" in plan_problem(damaged)  # type: ignore[operator]
    del damaged["nodes"]["cooling_off"]["retry"]
    damaged["nodes"]["cooling_off"]["delay_ms"] = 0
    assert "nodes/cooling_off/delay_ms" in (plan_problem(damaged) or "")


# --- diagnostics: the schema and the model ------------------------------------------------------------------------

WAIT_FIELDS = "description, for, key, needs, on_failure, output, signal, timeout, wait, when"


@pytest.mark.parametrize(("option", "hint"), [
    ("compensate: undo_it", "; a wait changes nothing, so there is nothing to undo"),
    ("retry: 3", "; a wait is not retried: give it a longer 'timeout'"),
    ("worker: w", "; a wait runs no worker: that is an option of steps"),
    ("fail_when: '${ x }'", "; a wait runs no worker: that is an option of steps"),  # (no "did you mean 'when'")
    ("with: {a: 1}", "; a wait runs no worker: that is an option of steps"),  # (nor 'wait')
    ("delay: 2h", "; a timer wait is written with 'for' and its duration"),
    ("timout: 2h", " (did you mean 'timeout'?)"),
])  # fmt: skip
def test_an_option_a_wait_does_not_have_is_fd202(option: str, hint: str) -> None:
    key = option.split(":")[0]
    meant, hint = (hint, "") if hint.startswith(" (did") else ("", hint)
    assert said(HEAD + f"steps:\n  - wait: w\n    timeout: 1m\n    {option}\n") == [
        f"spec.yaml:6:5: error FD202: unknown field '{key}'{meant}; expected one of: {WAIT_FIELDS}{hint}"]


def test_fd202_in_the_text_syntax_points_at_the_option() -> None:
    """And names it as the text syntax writes it (`undo`), listing the options a wait statement can be written
    with (not its keyword `wait`)."""
    written = WAIT_FIELDS.replace(" wait,", "")
    for text in ("flow t\nwait w timeout 1m undo u\n", "flow t\nwait w timeout 1m compensate u\n"):
        assert said(text, "spec.flow") == [
            f"spec.flow:2:19: error FD202: unknown field 'undo'; expected one of: {written}; a wait changes "
            "nothing, so there is nothing to undo"]
    assert said("flow t\nwait w {\n  retry 3\n}\n", "spec.flow") == [
        f"spec.flow:3:3: error FD202: unknown field 'retry'; expected one of: {written}; a wait is not retried: give "
        "it a longer 'timeout'"]


@pytest.mark.parametrize(("yaml_text", "flow_text", "expected"), [
    ("  - wait: w\n    for: 2h\n    signal: s\n", "wait w for 2h signal s",
     [("signal", "'signal' does not go with 'for': a wait with 'for' is a timer, which waits for its duration and "
                 "takes no signal (to wait for a signal, leave 'for' out)")]),
    ("  - wait: w\n    for: 2h\n    key: '${ ref }'\n", 'wait w for 2h key "${ ref }"',
     [("key", "'key' does not go with 'for': a timer wait takes no signal, so it has no instances for a signal to "
              "tell apart ('key' is a signal wait's option)")]),
    ("  - wait: w\n    for: 2h\n    timeout: 3h\n    output: o\n", "wait w for 2h timeout 3h output o",
     [("timeout", "'timeout' does not go with 'for': a timer wait ends when its duration is over ('timeout' is a "
                  "signal wait's deadline)"),
      ("output", "'output' does not go with 'for': a timer wait's result is {}, with nothing to store ('output' "
                 "places a signal's payload)")]),
    ("  - wait: w\n    for: 2h\n    on_failure: compensate\n", "wait w for 2h on_failure compensate",
     [("on_failure", "'on_failure' does not go with 'for': a timer wait has no timeout and no output map to fail "
                     "('on_failure' is a signal wait's option; a timer wait whose 'when:' cannot be evaluated fails "
                     "the run)")]),
])  # fmt: skip
def test_options_that_do_not_go_together_are_fd309_in_both_syntaxes(yaml_text: str, flow_text: str,
                                                                    expected: list[tuple[str, str]]) -> None:
    yaml_diags = compiled(HEAD + "steps:\n" + yaml_text)[1]
    flow_diags = compiled(f"flow t\n{flow_text}\n", "spec.flow")[1]
    for diags in (yaml_diags, flow_diags):
        assert [(d.code, d.path, d.message) for d in diags] == [("FD309", f"/steps/0/{k}", m) for k, m in expected]
    yaml_lines = yaml_text.splitlines()
    for d, (key, _) in zip(yaml_diags, expected, strict=True):  # at the option's value, in YAML
        row = next(i for i, text in enumerate(yaml_lines) if text.strip().startswith(key + ":"))
        assert (d.line, d.column) == (row + 4, yaml_lines[row].index(":") + 3)
    for d, (key, _) in zip(flow_diags, expected, strict=True):  # and in the text syntax
        assert (d.line, d.column) == (2, flow_text.index(f" {key} ") + len(key) + 3)


@pytest.mark.parametrize(("yaml_text", "flow_text", "code", "where", "message"), [
    ("  - wait: w\n    for: 1x\n", "wait w for 1x", "FD401", ((5, 10), (2, 12)), "'1x' is not a duration"),
    ("  - wait: w\n    timeout: -5s\n", "wait w timeout -5s", "FD401", ((5, 14), (2, 16)),
     "a duration must be positive, found '-5s'"),
    ("  - wait: w\n    signal: no-dashes\n", 'wait w signal "no-dashes"', "FD302", ((5, 13), (2, 15)),
     "invalid signal name 'no-dashes': signal names are written as ids: letters, digits and '_', starting with a "
     "letter or '_', at most 64 characters"),
    ("  - wait: my-wait\n", '"wait" "my-wait"', "FD302", ((4, 11), None),
     "invalid id 'my-wait': ids are letters"),
    ("  - wait: w\n    signal: true\n", "wait w signal true", "FD201", ((5, 13), (2, 15)),
     "expected a signal name (letters, digits and _, starting with a letter or _, as an id), found 'true'"),
    ("  - wait: w\n    for: [1]\n", "wait w for [1]", "FD201", ((5, 10), (2, 12)),
     "expected a duration: 250ms, 10s, 5m, 2h, 1m30s, or a number of seconds, found a list"),
    ("  - wait: w\n    on_failure: skip\n", "wait w on_failure skip", "FD201", ((5, 17), (2, 19)),
     "expected one of \"compensate\", \"continue\", found \"skip\""),
])  # fmt: skip
def test_bad_values_say_where_they_are(yaml_text: str, flow_text: str, code: str,
                                       where: tuple[tuple[int, int], tuple[int, int] | None], message: str) -> None:
    cases = [(HEAD + "steps:\n" + yaml_text, "spec.yaml", where[0])]
    if where[1] is not None:
        cases.append((f"flow t\n{flow_text}\n", "spec.flow", where[1]))
    for text, filename, (line, column) in cases:
        diags = compiled(text, filename)[1]
        assert [(d.code, d.file, d.line, d.column) for d in diags] == [(code, filename, line, column)], \
            [d.format() for d in diags]
        assert message in diags[0].message


def test_a_wait_s_bad_timeout_is_set_aside_and_the_rest_checked() -> None:
    diags = compiled(HEAD + "steps:\n  - wait: w\n    timeout: [1]\n    when: '${ $nope }'\n")[1]
    assert [(d.code, d.line) for d in diags] == [("FD201", 5), ("FD502", 6)]
    # nothing is said of what was set aside, nor of the on_failure beside it
    for text, filename in ((HEAD + "steps:\n  - wait: w\n    timeout: [1]\n    on_failure: continue\n", "spec.yaml"),
                           ("flow t\nwait w timeout [1] on_failure continue\n", "spec.flow")):
        assert [d.code for d in compiled(text, filename)[1]] == ["FD201"]


# --- diagnostics: the compiler ------------------------------------------------------------------------------------


def test_a_signal_taken_by_two_waits_is_fd316_at_the_second() -> None:
    assert said(HEAD + "steps:\n  - wait: a\n  - wait: b\n    signal: a\n  - wait: c\n    for: 1s\n"
                "  - wait: d\n    for: 1s\n") == [
        "spec.yaml:6:13: error FD316: signal 'a' is waited for by 'a' (line 4) and by 'b': a signal goes to one "
        "wait; give one of them 'signal: <another name>'"]
    assert said("flow t\nwait x signal s\nwait s\n", "spec.flow") == [
        "spec.flow:3:6: error FD316: signal 's' is waited for by 'x' (line 2) and by 's': a signal goes to one "
        "wait; give one of them 'signal <another name>'"]


def test_two_waits_in_two_cases_of_a_switch_take_one_signal_each() -> None:
    text = HEAD + ("steps:\n  - switch: s\n    on: '${ kind }'\n    cases:\n      a: [{wait: x}]\n"
                   "      b: [{wait: y, signal: x}]\n")
    assert [d.code for d in compiled(text)[1]] == ["FD316"]


def test_a_sub_flow_that_waits_used_twice_is_fd316_at_its_second_use(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "approve.yaml").write_text(HEAD + "steps:\n  - ask\n  - wait: approved\n")
    (tmp_path / "mid.yaml").write_text(HEAD + "steps:\n  - flow: inner\n    path: lib/approve.yaml\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - flow: a\n    path: mid.yaml\n  - flow: b\n"
                                        "    path: mid.yaml\n")
    (diag,) = compile_spec(str(tmp_path / "main.yaml")).diagnostics
    assert (diag.code, diag.file, diag.line, diag.column) == ("FD316", str(tmp_path / "main.yaml"), 6, 11)
    assert diag.message == (
        "signal 'approved' is waited for by 'a/inner/approved' and by 'b/inner/approved': both are the wait "
        "'approved' (line 5 of lib/approve.yaml), reached through two uses of sub-flow 'mid.yaml', 'a' (line 4) "
        "and 'b'; a signal goes to one wait, so a sub-flow that waits for a signal can be used once in a flow")


def test_a_sub_flow_s_wait_and_one_of_the_flow_s_take_one_signal(tmp_path: Path) -> None:
    (tmp_path / "sub.yaml").write_text(HEAD + "steps:\n  - wait: approved\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - flow: a\n    path: sub.yaml\n  - wait: again\n"
                                        "    signal: approved\n")
    (diag,) = compile_spec(str(tmp_path / "main.yaml")).diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD316", 7, 13)
    assert diag.message.startswith("signal 'approved' is waited for by 'a/approved' (line 4 of sub.yaml) and by "
                                   "'again'")


def test_fd316_is_said_in_the_file_where_the_two_waits_meet(tmp_path: Path) -> None:
    """Not in a sub-flow file that is fine on its own (and may be used by other flows): at the sub-flow node of the
    file that holds both waits, whichever comes first in the plan."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "approve.yaml").write_text(HEAD + "steps:\n  - ask\n  - wait: approved\n")
    (tmp_path / "lib" / "other.yaml").write_text(HEAD + "steps:\n  - wait: second\n    signal: approved\n")
    (tmp_path / "lib" / "mid.yaml").write_text(HEAD + "steps:\n  - flow: inner\n    path: approve.yaml\n")
    main = tmp_path / "main.yaml"

    def fd316(steps: str) -> tuple[str | None, int | None, str]:
        main.write_text(HEAD + "steps:\n" + steps)
        (diag,) = compile_spec(str(main)).diagnostics
        assert diag.code == "FD316"
        return diag.file, diag.line, diag.message

    # the flow's own wait first, the sub-flow's second
    assert fd316("  - wait: approved\n  - flow: a\n    path: lib/approve.yaml\n") == (str(main), 5, (
        "sub-flow 'a' waits for signal 'approved' (wait 'approved', line 5 of lib/approve.yaml), which 'approved' "
        "(line 4) waits for too: a signal goes to one wait; give 'approved' 'signal: <another name>'"))
    # and through a sub-flow of a sub-flow
    assert fd316("  - wait: x\n    signal: approved\n  - flow: m\n    path: lib/mid.yaml\n")[:2] == (str(main), 6)
    # two sub-flow files that wait for one signal
    assert fd316("  - flow: a\n    path: lib/approve.yaml\n  - flow: b\n    path: lib/other.yaml\n") == (
        str(main), 6, "sub-flow 'b' waits for signal 'approved' (wait 'second', line 4 of lib/other.yaml), which "
        "'a/approved' (line 5 of lib/approve.yaml, through sub-flow 'a') waits for too: a signal goes to one wait; "
        "give one of the two waits another signal name in its own file, or use one of the sub-flows only")
    # one file reached twice, directly and through another
    assert fd316("  - flow: a\n    path: lib/approve.yaml\n  - flow: m\n    path: lib/mid.yaml\n") == (
        str(main), 6, "signal 'approved' is waited for by 'a/approved' and by 'm/inner/approved': both are the wait "
        "'approved' (line 5 of lib/approve.yaml), reached through 'a' (line 4) and 'm'; a signal goes to one wait, so "
        "a sub-flow that waits for a signal can be used once in a flow")


def test_a_signal_wait_in_a_for_each_is_fd317_a_timer_is_not() -> None:
    text = HEAD + ("steps:\n  - for_each: lines\n    items: '${ lines }'\n    steps:\n      - wait: pause\n"
                   "        for: 1s\n      - sequence: s\n        steps:\n          - wait: checked\n")
    assert said(text) == [
        "spec.yaml:11:19: error FD317: 'checked' waits for signal 'checked' inside for_each 'lines' with no key: a "
        "signal wait in a for_each body needs a 'key:' telling which iteration a signal is for, such as "
        "'key: \"${ $item.id }\"'; or wait before or after the loop (a timer wait, with 'for', may stay inside)"]


def test_a_sub_flow_that_waits_inside_a_for_each_is_fd317_at_the_sub_flow_node(tmp_path: Path) -> None:
    (tmp_path / "sub.yaml").write_text(HEAD + "steps:\n  - wait: one\n    for: 1s\n  - wait: approved\n"
                                       "    signal: ok\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - for_each: each\n    items: '${ rows }'\n    steps:\n"
                                        "      - flow: review\n        path: sub.yaml\n")
    (diag,) = compile_spec(str(tmp_path / "main.yaml")).diagnostics
    assert (diag.code, diag.file, diag.line, diag.column) == ("FD317", str(tmp_path / "main.yaml"), 7, 15)
    assert diag.message.startswith("sub-flow 'review' waits for signal 'ok' (wait 'approved', line 6 of sub.yaml) "
                                   "inside for_each 'each'")
    # on its own the sub-flow is fine
    assert compile_spec(str(tmp_path / "sub.yaml")).diagnostics == []


def test_a_for_each_inside_a_sub_flow_is_said_in_the_sub_flow(tmp_path: Path) -> None:
    (tmp_path / "sub.yaml").write_text(HEAD + "steps:\n  - for_each: each\n    items: '${ rows }'\n    steps:\n"
                                       "      - wait: w\n")
    (tmp_path / "main.yaml").write_text(HEAD + "steps:\n  - flow: a\n    path: sub.yaml\n")
    (diag,) = compile_spec(str(tmp_path / "main.yaml")).diagnostics
    assert (diag.code, diag.file, diag.line) == ("FD317", str(tmp_path / "sub.yaml"), 7)


def test_ids_and_needs_count_waits() -> None:
    assert said(HEAD + "steps:\n  - approval\n  - wait: approval\n") == [
        "spec.yaml:5:5: error FD301: duplicate id 'approval' (first used on line 4); give one of them another id "
        "(for a wait: 'wait: <id>', with 'signal: approval' to keep waiting for the signal 'approval')"]
    assert said(HEAD + "steps:\n  - wait: approval\n  - approval\n")[0].endswith("(for a step: '<id>: {worker: ...}')")
    assert said("flow t\nstep approval\nwait approval signal ok\n", "spec.flow") == [
        "spec.flow:3:1: error FD301: duplicate id 'approval' (first used on line 2); give one of them another id "
        "(for a wait: 'wait <id>')"]
    assert said(HEAD + "steps:\n  - approval\n  - wait: approval\n    for: 1s\n")[0].endswith(
        "(for a wait: 'wait: <id>')")
    (message,) = said(HEAD + "steps:\n  - wait: approval\n  - ship: {needs: [aproval]}\n")
    assert "'ship' needs 'aproval', which is not a step or group (did you mean 'approval'?)" in message
    assert plan(HEAD + "steps:\n  - wait: approval\n  - other: {needs: []}\n  - ship: {needs: [approval, other]}\n"
                )["nodes"]["ship"]["deps"] == ["approval", "other"]


def test_a_wait_s_result_is_read_as_a_step_s() -> None:
    text = HEAD + "steps:\n  - wait: approval\n  - ship: {with: {by: '${ $steps.approval.manager }'}}\n"
    assert plan(text)["expressions"]
    beside = HEAD + ("steps:\n  - parallel: p\n    branches:\n      - wait: approval\n"
                     "      - ship: {with: {by: '${ $steps.approval.manager }'}}\n")
    (message,) = said(beside)
    assert "error FD504: in 'with.by': '$steps.approval' reads step 'approval', which does not always finish" in message


def test_reads_of_what_waits_write() -> None:
    # a wait with `output: name` writes that name: read beside it, FD314; written beside it too, FD307
    beside = HEAD + ("steps:\n  - parallel: p\n    branches:\n      - wait: approval\n        output: decision\n"
                     "      - ship: {with: {d: '${ decision }'}}\n")
    assert [d.code for d in compiled(beside)[1]] == ["FD314"]
    both = HEAD + ("steps:\n  - parallel: p\n    branches:\n      - wait: approval\n        output: decision\n"
                   "      - decide: {output: decision}\n")
    assert [d.code for d in compiled(both)[1]] == ["FD307"]
    # merged (its keys unknown) or a timer (it writes nothing): nothing said
    for wait in ("      - wait: approval\n", "      - wait: pause\n        for: 1s\n"):
        text = HEAD + ("steps:\n  - parallel: p\n    branches:\n" + wait +
                       "      - decide: {output: decision}\n  - ship: {with: {d: '${ decision }'}}\n")
        assert compiled(text)[1] == []


def test_a_wait_the_run_may_go_on_without_is_fd315_for_a_read_after_it() -> None:
    text = HEAD + ("steps:\n  - wait: approval\n    timeout: 1h\n    on_failure: continue\n    output: decision\n"
                   "  - ship: {with: {d: '${ decision }'}}\n")
    found, diags = compiled(text)
    assert found is not None and [d.code for d in diags] == ["FD315"]
    assert diags[0].message.startswith("in 'with.d': 'decision' is written before 'ship' only by 'approval', which "
                                       "the run goes on without when it fails (on_failure: continue)")


def test_a_wait_s_expressions_are_checked() -> None:
    (message,) = said(HEAD + "steps:\n  - wait: w\n    when: '${ $order.total > 1 }'\n")
    assert "error FD502: in 'when': undefined variable '$order'" in message
    (message,) = said(HEAD + "steps:\n  - wait: w\n    output: {x: '${ $contxt.a }'}\n")
    assert "undefined variable '$contxt' (did you mean '$context'?)" in message
    assert plan(HEAD + "steps:\n  - wait: w\n    output: {x: '${ $context.a + y }'}\n")["nodes"]["w"]["writes"] == ["x"]
