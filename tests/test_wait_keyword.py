"""`wait` is a keyword since waits came (plan_version 3); specs that named a step `wait` keep working.

- YAML: ``- wait: <id>`` is a wait; ``- wait: {options}`` and ``- wait:`` (a mapping, or nothing, as the one key)
  are a step named ``wait``, as before. Any other mapping holding ``wait`` is a wait, whose id must be an id.
- The text syntax: ``step wait ...`` (options, ``{}``, a block, ``null``) is a step named ``wait``; a bare
  ``wait`` among a line of step names, or alone on its line, is FD108 with a hint saying what to write.
- The plans of such specs are byte for byte those the compiler made before waits existed (commit 8b7032f):
  tests/compat/steps_named_wait.plans.json was written by that compiler from :data:`CASES`.

And the messages about waits: a wait statement's FD108 lists a wait's options; FD302 says "a signal name";
``on_failure: continue`` goes on any signal wait (a failing output map is passed over too).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.api import compile_loaded, load_text
from flowdsl.convert import convert_text
from flowdsl.textsyntax import parse_flow

HEAD = "flowdsl: 1\nname: t\n"
H = HEAD + "steps:\n"
BEFORE = Path(__file__).parent / "compat" / "steps_named_wait.plans.json"

#: specs valid before `wait`, `signal` and `for` were keywords, each with a step named by one of them
CASES = {
    "yaml_options": ("spec.yaml", H + "  - a\n  - wait: {worker: foo, retry: 3, timeout: 5s}\n  - b\n"),
    "yaml_null": ("spec.yaml", H + "  - a\n  - wait:\n  - b\n"),
    "yaml_compensate": ("spec.yaml", H + "  - wait: {compensate: x, output: r}\n  - b: {with: {r: '${ r }'}}\n"),
    "yaml_empty": ("spec.yaml", H + "  - wait: {}\n"),
    "yaml_nested": ("spec.yaml", H + "  - parallel: p\n    branches:\n      - wait:\n          worker: w\n"
                    "          on_failure: continue\n      - c\n  - d: {when: '${ x }'}\n"),
    "yaml_needed": ("spec.yaml", H + "  - wait: {when: '${ x }'}\n  - c\n  - e: {needs: [wait]}\n"),
    "flow_options": ("spec.flow", "flow t\nstep a\nstep wait worker foo retry 3 timeout 5s\nstep b\n"),
    "flow_block": ("spec.flow", "flow t\nstep wait {\n  worker foo\n  undo x\n}\n"),
    "flow_empty": ("spec.flow", "flow t\nsequence s {\n  a\n  step wait {}\n}\n"),
    "flow_null": ("spec.flow", "flow t\nstep wait null\n"),
    "flow_bare": ("spec.flow", "flow t\nstep a\nstep wait\n"),
    "flow_signal_and_for": ("spec.flow", "flow t\nstep signal worker w\nstep for timeout 1s\n"),
}


def compiled(text: str, filename: str = "spec.yaml") -> tuple[dict[str, Any] | None, list[str]]:
    result = compile_loaded(load_text(text, filename), filename)
    return result.plan, [d.format() for d in result.diagnostics]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_step_named_wait_compiles_to_the_plan_it_did_before_waits(name: str) -> None:
    filename, text = CASES[name]
    plan, diags = compiled(text, filename)
    assert diags == [] and plan is not None
    assert plan == json.loads(BEFORE.read_text(encoding="utf-8"))[name]
    assert all(node["kind"] != "wait" for node in plan["nodes"].values()) and plan["plan_version"] in (1, 2)


def test_every_case_was_recorded_before_waits() -> None:
    assert sorted(json.loads(BEFORE.read_text(encoding="utf-8"))) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_step_named_wait_is_written_as_a_step_by_both_writers(name: str) -> None:
    filename, text = CASES[name]
    data = load_text(text, filename).data
    flow = convert_text(data, "flow")
    assert parse_flow(flow).data == data, flow
    assert load_text(convert_text(data, "yaml"), "back.yaml").data == data
    assert "\nwait " not in flow and " wait {" not in flow.replace("step wait {", "")


def test_a_yaml_step_named_wait_is_a_step_and_a_wait_is_a_wait() -> None:
    plan, _ = compiled(H + "  - wait: {worker: foo}\n  - wait: w\n  - wait: t\n    for: 1s\n")
    assert plan is not None
    assert {key: node["kind"] for key, node in plan["nodes"].items()} == {"wait": "task", "w": "wait", "t": "wait"}
    assert plan["nodes"]["wait"]["worker"] == "foo" and plan["nodes"]["w"]["signal"] == "w"
    assert compiled(H + "  - wait:\n")[0]["nodes"]["wait"]["worker"] == "wait"  # type: ignore[index]


@pytest.mark.parametrize("steps", ["  - wait:\n    for: 1s\n", "  - wait: {worker: foo}\n    timeout: 5s\n"])
def test_a_wait_whose_id_is_a_mapping_or_nothing_says_how_waits_and_steps_named_wait_are_written(steps: str) -> None:
    """With another key beside it, ``wait`` is a wait (which forgot its id, or a step's options mis-indented)."""
    plan, diags = compiled(H + steps)
    assert plan is None and len(diags) == 1
    assert "FD201: expected an id" in diags[0] and diags[0].endswith(
        "; a wait is written '- wait: <its id>', its options beside 'wait' (a step named 'wait' is a mapping with "
        "that one key, its options under it: '- wait: {worker: ...}')")


def test_a_step_named_wait_gets_a_step_s_fd202() -> None:
    _, diags = compiled(H + "  - wait: {retyr: 3}\n")
    assert diags == ["spec.yaml:4:12: error FD202: unknown field 'retyr' (did you mean 'retry'?); expected one of: "
                     "compensate, description, fail_when, fallback, llm, needs, on_failure, output, retry, timeout, "
                     "when, with, worker"]


STEP_WAIT = "a step whose worker is named 'wait' is written `step wait` on a line of its own, any options after it"


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("sequence s { a wait b }", 2, 16, f"'wait' is a keyword, not a step name here; {STEP_WAIT}"),
    ("sequence s {\n  a\n  wait\n}", 4, 7,
     f"unexpected end of line, expected one of: a name, a string; 'wait' starts a statement: `wait <name>` "
     f"({STEP_WAIT})"),
    ("wait", 2, 5, f"'wait' starts a statement: `wait <name>` ({STEP_WAIT})"),
    ("sequence s { a\n  wait }", 3, 8, f"unexpected '}}', expected one of: a name, a string; 'wait' starts a "
                                       f"statement: `wait <name>` ({STEP_WAIT})"),
    ("step", 2, 5, "unexpected end of line, expected one of: a name, a string; 'step' starts a statement: "
                   "`step <name>`"),
    ("sequence s { a as b }", 2, 16, "'as' is a keyword, not a step name here: a group's options go on its own "
                                     "line, before its '{'; a step whose worker is named 'as' is written `step as` "
                                     "on a line of its own, any options after it"),
])  # fmt: skip
def test_a_bare_wait_where_a_step_name_is_expected_says_what_to_write(text: str, line: int, column: int,
                                                                       message: str) -> None:
    doc = parse_flow(f"flow t\n{text}\n", "bad.flow")
    assert doc.data is None
    (diag,) = doc.diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD108", line, column), diag.format()
    assert message in diag.message, diag.message
    # and what the hint says works
    assert compiled("flow t\nsequence s {\n  a\n  step wait timeout 5s\n}\n", "ok.flow")[1] == []


WAIT_OPTIONS = "an option of a wait (signal, key, timeout, for, output, on_failure, when, needs, description)"


@pytest.mark.parametrize(("text", "column", "found"), [
    ("wait a b", 8, "'b'"),
    ("wait a timeout 1h retyr 3", 19, "'retyr'"),  # (no "did you mean 'retry'": a wait has none)
    ("wait a; wait b", 7, "character ';'"),
])
def test_a_wait_statement_s_fd108_lists_a_wait_s_options(text: str, column: int, found: str) -> None:
    (diag,) = parse_flow(f"flow t\n{text}\n", "bad.flow").diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD108", 2, column)
    assert diag.message == f"unexpected {found}, expected one of: {WAIT_OPTIONS}, '{{', end of input, end of line"


def test_fd108_in_a_wait_s_block_lists_a_wait_s_options_and_other_statements_their_own() -> None:
    (diag,) = parse_flow("flow t\nwait a {\n  for 1s\n  b c\n}\n", "bad.flow").diagnostics
    assert diag.message == f"unexpected 'b', expected one of: {WAIT_OPTIONS}, '}}', end of line"
    (diag,) = parse_flow("flow t\nwait a for 1s\nstep b c\n", "bad.flow").diagnostics
    assert "an option (undo, with, output, when, needs, ...)" in diag.message
    (diag,) = parse_flow("flow t\nwait a timeout 1h x\n", "bad.flow").diagnostics  # (`timeout` starts no statement)
    assert WAIT_OPTIONS in diag.message


def test_a_signal_name_too_long_is_said_to_be_a_signal_name() -> None:
    _, diags = compiled(H + "  - wait: a\n    signal: " + "s" * 65 + "\n")
    assert diags == [f"spec.yaml:5:13: error FD302: invalid signal name '{'s' * 65}': it has 65 characters; a signal "
                     "name has at most 64"]


# --- on_failure on a signal wait -----------------------------------------------------------------------------------


@pytest.mark.parametrize("filename, text", [
    ("spec.yaml", H + "  - wait: s\n    output: {v: '${ $.n * 2 }'}\n    on_failure: continue\n  - after\n"),
    ("spec.flow", 'flow t\nwait s output {v: "${ $.n * 2 }"} on_failure continue\nstep after\n'),
])
def test_on_failure_continue_goes_on_a_signal_wait_without_a_timeout(filename: str, text: str) -> None:
    """Its output map (or its when:) may fail: on_failure: continue passes the wait over then, as for a step."""
    from flowdsl.runtime.local import run_flow
    from flowdsl.workers import WorkerRegistry

    plan, diags = compiled(text, filename)
    assert diags == [] and plan is not None
    assert plan["nodes"]["s"]["on_failure"] == "continue" and plan["nodes"]["s"]["timeout_ms"] is None
    registry = WorkerRegistry()
    registry.register("after", lambda data, ctx: {"ok": True})
    result = asyncio.run(run_flow(plan, {}, record=False, signals={"s": {"n": "x"}}, import_workers=False,
                                  registry=registry))
    assert result.status == "completed"
    assert (result.steps["s"]["status"], result.steps["s"]["error"]["type"]) == ("failed", "ExpressionError")
    assert result.steps["after"]["status"] == "succeeded"
    # without it, the same failure fails the run
    failing = compile_text(H + "  - wait: s\n    output: {v: '${ $.n * 2 }'}\n  - after\n")
    result = asyncio.run(run_flow(failing, {}, record=False, signals={"s": {"n": "x"}}, import_workers=False,
                                  registry=registry))
    assert result.status == "failed" and result.steps["after"]["status"] == "pending"
