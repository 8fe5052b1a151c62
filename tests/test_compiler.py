"""Unit tests of the front end's model, checks and compiler (docs/language.md, docs/plan.md).

Each test compiles a small spec written here; the conformance cases in specs/conformance/ cover
the same ground end to end with golden files (tests/test_conformance.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowdsl.api import CompileResult, compile_spec, compile_text, plan_bytes
from flowdsl.diagnostics import SpecError
from flowdsl.model import MAX_DURATION_MS, parse_duration

Spec = Callable[..., CompileResult]


HEAD = "flowdsl: 1\nname: t\n"


def source(text: str) -> str:
    """``text`` dedented (after the HEAD lines, when it starts with them)."""
    if text.startswith(HEAD):
        return HEAD + textwrap.dedent(text[len(HEAD):])
    return textwrap.dedent(text)


@pytest.fixture
def spec(tmp_path: Path) -> Spec:
    """Write YAML (dedented) to ``<tmp>/<name>`` and compile it."""

    def run(text: str, name: str = "spec.yaml", **kwargs: Any) -> CompileResult:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source(text), encoding="utf-8")
        return compile_spec(str(path), **kwargs)

    return run


def plan(text: str) -> dict[str, Any]:
    return compile_text(source(text))


def errors(text: str) -> list[tuple[str, int | None, str]]:
    """(code, line, message) of every diagnostic of a spec that does not compile."""
    with pytest.raises(SpecError) as info:
        compile_text(source(text))
    return [(d.code, d.line, d.message) for d in info.value.diagnostics]


def only(text: str, code: str) -> str:
    """The message of the one diagnostic the spec gives, which must have ``code``."""
    diags = errors(text)
    assert [c for c, _, _ in diags] == [code], diags
    return diags[0][2]


# --- durations and the model -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ms"), [
    ("250ms", 250), ("10s", 10_000), ("5m", 300_000), ("2h", 7_200_000), ("1m30s", 90_000),
    ("1h2m", 3_720_000), ("1.5s", 1500), ("2.5ms", 2), (45, 45_000), (2.5, 2500), ("1h2m3s4ms", 3_723_004),
    ("2s500ms", 2500), (1e3, 1_000_000), ("1ms", 1),
])
def test_parse_duration(text: Any, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(("text", "message"), [
    ("10 minutes", "'10 minutes' is not a duration; expected a number with a unit"),
    ("10", "'10' is text, not a number; expected a number with a unit"),
    ("s", "'s' is not a duration"),
    ("", "is not a duration"),
    ("0s", "a duration must be positive, found '0s'"),
    ("0.4ms", "'0.4ms' is less than 1ms once rounded to whole milliseconds; durations are counted in "
              "milliseconds, and the shortest is 1ms"),
    ("0.5ms", "'0.5ms' is less than 1ms once rounded"),
    (0.0001, "'0.0001' is less than 1ms once rounded"),
    (-3, "a duration must be positive, found '-3'"),
    ("-5s", "a duration must be positive, found '-5s'"),
    ("-1m30s", "a duration must be positive, found '-1m30s'"),
    (True, "expected a duration like 10s, found true"),
    (float("nan"), "'nan' is not a finite number of seconds"),
    # each unit at most once, largest first, no spaces
    ("1h1h", "'1h1h' has the unit 'h' twice"),
    ("1ms1ms", "'1ms1ms' has the unit 'ms' twice"),
    ("1s30m", "'1s30m' has its units out of order ('m' after 's')"),
    ("1ms1s", "'1ms1s' has its units out of order ('s' after 'ms')"),
    ("10 s", "'10 s' has spaces; a duration is written without spaces: '10s'"),
    ("1m 30s", "'1m 30s' has spaces; a duration is written without spaces: '1m30s'"),
    (" 10s", "' 10s' has spaces"),
    ("30", "'30' is text, not a number"),
    ("1e3", "'1e3' is not a duration"),
    ("1_000", "'1_000' is not a duration"),
    ("1:30", "'1:30' is not a duration"),
    ("31d", "is not a duration"),
    ("1d", "'1d' is not a duration; expected a number with a unit: 250ms, 10s, 5m, 2h, or several units, largest "
     "first and each once: 1m30s (write '24h')"),
    ("2sec", "(write '2s')"), ("1.5 hours", "(write '1.5h')"), ("3 mins", "(write '3m')"), ("1week", "(write '168h')"),
    ("250millis", "(write '250ms')"),
    (f"{MAX_DURATION_MS // 3_600_000 + 1}h", "longer than the maximum of 30 days"),
    # however large: never an OverflowError (1e306 s is infinity in ms; an int of 401 digits is no float)
    (1e306, "'1e+306' is longer than the maximum of 30 days"),
    (1.7976931348623157e308, "is longer than the maximum of 30 days"),
    (10**400, "'1000000000000000000000000000000000000...' is longer than the maximum of 30 days"),
    (-(10**400), "a duration must be positive, found '-100000000000000000000000000000000000...'"),
    ("9" * 400 + "s", "is longer than the maximum of 30 days"),
    ("9" * 400 + "ms", "is longer than the maximum of 30 days"),
    (MAX_DURATION_MS / 1000 + 0.001, "is longer than the maximum of 30 days"),
])
def test_parse_duration_rejects(text: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert message in str(info.value)


def test_the_longest_duration_is_thirty_days() -> None:
    assert parse_duration(MAX_DURATION_MS // 1000) == parse_duration("720h") == MAX_DURATION_MS


def test_step_ids_come_from_the_worker_name_or_the_key() -> None:
    p = plan(HEAD + """\
        steps:
          - orders.checkout.validate_items
          - charge_deposit: {worker: payments.charge}
          - charge_rest: {worker: payments.charge}
          - plain
        """)
    assert p["root"] == ["validate_items", "charge_deposit", "charge_rest", "plain"]
    workers = {k: n["worker"] for k, n in p["nodes"].items()}
    assert workers == {"validate_items": "orders.checkout.validate_items", "charge_deposit": "payments.charge",
                       "charge_rest": "payments.charge", "plain": "plain"}


def test_a_dotted_key_with_an_explicit_worker_is_not_an_id() -> None:
    message = only(HEAD + "steps:\n  - payments.charge: {worker: payments.charge}\n", "FD302")
    assert "'payments.charge' is used as a step id" in message and "ids cannot contain dots" in message


# --- keys, parents, deps, order, scope ---------------------------------------------------------


NESTED = HEAD + """\
    steps:
      - start
      - parallel: both
        branches:
          - sequence: left
            steps: [l1, l2]
          - right
      - for_each: each
        items: "${ xs }"
        steps: [body1, body2]
      - switch: pick
        on: "${ kind }"
        cases:
          b: [case_b]
          a: [case_a1, case_a2]
        default: [other]
      - finish
    """


def test_parents_deps_order_and_scope() -> None:
    nodes = plan(NESTED)["nodes"]
    summary = {k: (n["parent"], n["deps"], n["order"], n["scope"], n["spec_path"]) for k, n in nodes.items()}
    assert summary == {
        "start": (None, [], 0, None, "/steps/0"),
        "both": (None, ["start"], 1, None, "/steps/1"),
        "left": ("both", [], 2, None, "/steps/1/branches/0"),
        "l1": ("left", [], 3, None, "/steps/1/branches/0/steps/0"),
        "l2": ("left", ["l1"], 4, None, "/steps/1/branches/0/steps/1"),
        "right": ("both", [], 5, None, "/steps/1/branches/1"),
        "each": (None, ["both"], 6, None, "/steps/2"),
        "body1": ("each", [], 7, "each", "/steps/2/steps/0"),
        "body2": ("each", ["body1"], 8, "each", "/steps/2/steps/1"),
        "pick": (None, ["each"], 9, None, "/steps/3"),
        "case_a1": ("pick", [], 10, None, "/steps/3/cases/a/0"),
        "case_a2": ("pick", ["case_a1"], 11, None, "/steps/3/cases/a/1"),
        "case_b": ("pick", [], 12, None, "/steps/3/cases/b/0"),
        "other": ("pick", [], 13, None, "/steps/3/default/0"),
        "finish": (None, ["pick"], 14, None, "/steps/4"),
    }
    assert all(n["key"] == k for k, n in nodes.items())


def test_group_fields() -> None:
    nodes = plan(NESTED)["nodes"]
    assert nodes["both"]["children"] == ["left", "right"]
    assert nodes["left"]["children"] == ["l1", "l2"]
    assert (nodes["each"]["children"], nodes["each"]["as"], nodes["each"]["concurrency"]) == (
        ["body1", "body2"], "item", None)
    assert nodes["each"]["output"] == {"mode": "name", "name": "each"}
    assert nodes["pick"]["cases"] == [{"match": "a", "children": ["case_a1", "case_a2"]},
                                      {"match": "b", "children": ["case_b"]}]
    assert nodes["pick"]["default"] == ["other"]
    assert {k for k, n in nodes.items() if n["kind"] == "task"} == {
        "start", "l1", "l2", "right", "body1", "body2", "case_a1", "case_a2", "case_b", "other", "finish"}


def test_needs_replaces_the_previous_node() -> None:
    nodes = plan(HEAD + """\
        steps:
          - a
          - b: {needs: [a]}
          - c: {needs: []}
          - d: {needs: [c, b]}
          - e
        """)["nodes"]
    assert {k: n["deps"] for k, n in nodes.items()} == {"a": [], "b": ["a"], "c": [], "d": ["b", "c"], "e": ["d"]}


def test_switch_labels_are_strings_as_written() -> None:
    nodes = plan(HEAD + """\
        steps:
          - switch: s
            on: "${ n }"
            cases:
              10: [ten]
              2: [two]
              true: [yes_]
              off: [no_]
        """)["nodes"]
    assert [c["match"] for c in nodes["s"]["cases"]] == ["10", "2", "off", "true"]
    assert nodes["s"]["default"] is None


# --- sub-flows ------------------------------------------------------------------------------------


SUB = """\
    flowdsl: 1
    name: wrap_gift
    workers: [gifts.workers]
    input: {type: object, required: [items]}
    steps:
      - choose_paper
      - wrap:
          needs: [choose_paper]
          with: {paper: "${ $steps.choose_paper.paper }"}
      - finish
    """


def test_sub_flow_keys_scope_and_fields(spec: Spec) -> None:
    spec(SUB, "lib/wrap.yaml")
    result = spec(HEAD + """\
        workers: [shop.workers]
        steps:
          - finish
          - flow: gift
            path: lib/wrap.yaml
            with: {items: "${ cart }"}
          - flow: gift2
            path: lib/wrap.yaml
            output: second
        """)
    assert result.diagnostics == []
    p = result.plan
    assert p["root"] == ["finish", "gift", "gift2"]
    gift = p["nodes"]["gift"]
    assert gift["children"] == ["gift/choose_paper", "gift/wrap", "gift/finish"]
    assert (gift["flow_name"], gift["path"], gift["input_schema"]) == (
        "wrap_gift", "lib/wrap.yaml", {"type": "object", "required": ["items"]})
    assert gift["output"] == {"mode": "name", "name": "gift"}
    assert p["nodes"]["gift2"]["output"] == {"mode": "name", "name": "second"}
    inner = p["nodes"]["gift/wrap"]
    assert (inner["id"], inner["parent"], inner["scope"], inner["deps"]) == (
        "wrap", "gift", "gift", ["gift/choose_paper"])
    assert p["nodes"]["gift2/finish"]["deps"] == ["gift2/wrap"]
    assert p["flow"]["workers"] == ["shop.workers", "gifts.workers"]
    # the sub-flow's ids are its own: 'finish' in both files is no duplicate
    assert {"finish", "gift/finish", "gift2/finish"} <= set(p["nodes"])
    assert result.source_map["gift/wrap"]["file"].endswith("lib/wrap.yaml")
    assert result.source_map["gift/wrap"]["line"] == 7


GROUP_OUTPUTS = HEAD + """\
    steps:
      - for_each: lines
        items: "${ order.lines }"
        output: {line_count: "${ $count($) }", skus: "${ $.shipped.sku }"}
        steps:
          - ship_t3: {with: {sku: "${ $item }"}, output: shipped}
      - flow: pay
        path: lib/pay.yaml
        with: {amount: "${ line_count * 10 }"}
        output: {charged: "${ charge.amount }", lines_seen: "${ $context.line_count }"}
      - flow: pay_again
        path: lib/pay.yaml
        with: {amount: 1}
    """


def test_a_for_each_and_a_sub_flow_map_their_results_with_an_output_mapping(spec: Spec) -> None:
    """As for a step: ``$`` is the node's result (the loop's list of its iterations' contributions, the sub-flow's
    final context) and ``$context`` the context it saw; only the mapped keys enter the context. Without
    ``output:`` the result is stored under the node's id."""
    import flowdsl

    spec("flowdsl: 1\nname: pay\nsteps:\n  - charge_t3: {output: charge}\n", "lib/pay.yaml")
    result = spec(GROUP_OUTPUTS)
    assert result.diagnostics == [] and result.plan is not None
    nodes = result.plan["nodes"]
    assert [sorted(nodes[k]["output"]["map"]) for k in ("lines", "pay")] == [["line_count", "skus"],
                                                                             ["charged", "lines_seen"]]
    assert nodes["pay_again"]["output"] == {"mode": "name", "name": "pay_again"}

    @flowdsl.worker("ship_t3")
    def ship(data: Any, ctx: Any) -> dict[str, Any]:
        return {"sku": data["sku"]}

    @flowdsl.worker("charge_t3")
    def charge(data: Any, ctx: Any) -> dict[str, Any]:
        return {"amount": data["amount"]}

    try:
        run = flowdsl.run(result.plan, {"order": {"lines": ["a", "b"]}}, record=False)
    finally:
        flowdsl.registry.unregister("ship_t3")
        flowdsl.registry.unregister("charge_t3")
    assert run.status == "completed"
    assert run.context == {"order": {"lines": ["a", "b"]}, "line_count": 2, "skus": ["a", "b"], "charged": 20,
                           "lines_seen": 2, "pay_again": {"amount": 1, "charge": {"amount": 1}}}


def test_a_for_each_s_and_a_sub_flow_s_output_mapping_is_checked_as_a_step_s(spec: Spec) -> None:
    spec("flowdsl: 1\nname: pay\nsteps:\n  - charge_t3: {output: charge}\n", "lib/pay.yaml")
    result = spec(HEAD + """\
        steps:
          - parallel: both
            branches:
              - for_each: lines
                items: "${ order.lines }"
                output: {total: "${ $sum($.price) }", item: "${ $item }"}
                steps: [price]
              - flow: pay
                path: lib/pay.yaml
                output: {total: "${ charge.amount }", broken: "${ charge. }"}
        """)
    found = sorted((d.code, d.path) for d in result.diagnostics)
    assert found == [("FD307", "/steps/0/branches/1"), ("FD501", "/steps/0/branches/1/output/broken"),
                     ("FD502", "/steps/0/branches/0/output/item")]
    assert "'pay' and 'lines' may run at the same time and both write 'total'" in next(
        d.message for d in result.diagnostics if d.code == "FD307")


def test_errors_inside_a_sub_flow_are_reported_in_its_file(spec: Spec) -> None:
    spec(HEAD + "steps:\n  - a:\n      timeout: soon\n", "lib/bad.yaml")
    result = spec(HEAD + "steps:\n  - flow: f\n    path: lib/bad.yaml\n")
    assert [(Path(d.file or "").name, d.code, d.line) for d in result.diagnostics] == [("bad.yaml", "FD401", 5)]
    assert result.plan is None


def test_sub_flow_with_a_schema_error_is_fd308_too(spec: Spec) -> None:
    spec("flowdsl: 1\nsteps: [a]\n", "lib/noname.yaml")
    result = spec(HEAD + "steps:\n  - flow: f\n    path: lib/noname.yaml\n")
    codes = sorted((Path(d.file or "").name, d.code) for d in result.diagnostics)
    assert codes == [("noname.yaml", "FD201"), ("spec.yaml", "FD308")]
    fd308 = next(d for d in result.diagnostics if d.code == "FD308")
    assert "sub-flow 'lib/noname.yaml' cannot be loaded: missing required field 'name'" in fd308.message


def test_missing_sub_flow_is_fd308_not_a_usage_error(spec: Spec) -> None:
    result = spec(HEAD + "steps:\n  - flow: f\n    path: nowhere.yaml\n")
    assert [(d.code, d.line) for d in result.diagnostics] == [("FD308", 5)]
    assert "cannot read file" in result.diagnostics[0].message


def test_sub_flow_including_itself(spec: Spec) -> None:
    result = spec(HEAD + "steps:\n  - flow: again\n    path: spec.yaml\n")
    (d,) = result.diagnostics
    assert d.code == "FD308" and d.message == "sub-flow 'spec.yaml' includes itself: spec.yaml → spec.yaml"


def test_a_flow_node_s_timeout_overrides_the_sub_flow_file_s_in_both_syntaxes(spec: Spec) -> None:
    spec(SUB.replace("    steps:", "    timeout: 1m\n    steps:"), "lib/wrap.yaml")
    yaml = spec(HEAD + """\
        steps:
          - flow: short
            path: lib/wrap.yaml
            timeout: 1.5s
          - flow: plain
            path: lib/wrap.yaml
          - flow: long
            path: lib/wrap.yaml
            timeout: 2h
        """)
    flow = spec("""\
        flow t
        flow short path lib/wrap.yaml timeout 1.5s
        flow plain path lib/wrap.yaml
        flow long {
          path lib/wrap.yaml
          timeout 2h
        }
        """, "spec.flow")
    for result in (yaml, flow):
        assert result.plan is not None, result.diagnostics
        assert [result.plan["nodes"][k]["timeout_ms"] for k in ("short", "plain", "long")] == [
            1500, 60_000, 7_200_000]
    assert yaml.plan is not None and flow.plan is not None
    assert plan_bytes(yaml.plan) == plan_bytes(flow.plan)


def test_a_flow_node_without_a_timeout_anywhere_has_none(spec: Spec) -> None:
    spec(SUB, "lib/wrap.yaml")
    result = spec(HEAD + "steps:\n  - flow: gift\n    path: lib/wrap.yaml\n")
    assert result.plan is not None and result.plan["nodes"]["gift"]["timeout_ms"] is None


_EXPECTED_UNITS = ("expected a number with a unit: 250ms, 10s, 5m, 2h, or several units, largest first and each "
                   "once: 1m30s")


@pytest.mark.parametrize(("value", "message"), [
    ("soon", "'soon' is not a duration; " + _EXPECTED_UNITS),
    ("0s", "a duration must be positive, found '0s'"),
    ("31d", "'31d' is not a duration; " + _EXPECTED_UNITS + " (a duration is 30 days at most: 720h)"),
    ("1000h", "'1000h' is longer than the maximum of 30 days (720h)"),
])  # fmt: skip
def test_a_bad_flow_node_timeout_is_fd401_in_both_syntaxes(spec: Spec, value: str, message: str) -> None:
    spec(SUB, "lib/wrap.yaml")
    yaml = spec(HEAD + f"steps:\n  - a\n  - flow: gift\n    path: lib/wrap.yaml\n    timeout: {value}\n")
    flow = spec(f"flow t\nstep a\nflow gift path lib/wrap.yaml timeout {value}\n", "spec.flow")
    assert _found(yaml) == [("FD401", 7, 14, message)]
    assert _found(flow) == [("FD401", 3, len("flow gift path lib/wrap.yaml timeout ") + 1, message)]
    assert [d.path for d in yaml.diagnostics] == [d.path for d in flow.diagnostics] == ["/steps/1/timeout"]
    assert yaml.plan is None and flow.plan is None


def test_steps_of_a_sub_flow_are_not_visible_to_the_parent(spec: Spec) -> None:
    spec(SUB, "lib/wrap.yaml")
    result = spec(HEAD + """\
        steps:
          - flow: gift
            path: lib/wrap.yaml
          - after:
              with: {paper: "${ $steps.choose_paper.paper }"}
        """)
    assert [d.code for d in result.diagnostics] == ["FD303"]


@pytest.mark.parametrize("kind", ["sequence", "parallel"])
def test_a_group_without_a_result_cannot_be_read_through_steps(kind: str) -> None:
    children = "steps" if kind == "sequence" else "branches"
    message = only(HEAD + f"""\
        steps:
          - {kind}: g
            {children}: [a, b]
          - c: {{when: "${{ $steps.g.x }}"}}
        """, "FD303")
    assert f"names a {kind}, which has no result of its own" in message


def test_a_step_cannot_read_the_for_each_that_encloses_it() -> None:
    message = only(HEAD + """\
        steps:
          - for_each: lines
            items: "${ [1, 2] }"
            steps:
              - a: {when: "${ $steps.lines }"}
        """, "FD504")
    assert "'$steps.lines' reads step 'lines', which does not always finish before 'a' starts" in message


# --- retry, timeouts, compensation, defaults ----------------------------------------------------


BUILTIN_STEP = {"attempts": 1, "backoff": "exponential", "initial_ms": 1000, "max_ms": 30000, "multiplier": 2.0,
                "jitter": "none", "on": None, "not_on": []}
BUILTIN_COMP = {"attempts": 5, "backoff": "exponential", "initial_ms": 100, "max_ms": 10000, "multiplier": 2.0,
                "jitter": "none", "on": None, "not_on": []}


def test_retry_built_ins_and_shorthand() -> None:
    nodes = plan(HEAD + "steps:\n  - a\n  - b: {retry: 4, compensate: undo_b}\n")["nodes"]
    assert nodes["a"]["retry"] == BUILTIN_STEP
    assert nodes["b"]["retry"] == {**BUILTIN_STEP, "attempts": 4}
    assert nodes["b"]["compensate"] == {"worker": "undo_b", "with": None, "retry": BUILTIN_COMP, "timeout_ms": None}
    assert nodes["a"]["timeout_ms"] is None and nodes["a"]["compensate"] is None


def test_an_initial_delay_longer_than_the_built_in_max_raises_it() -> None:
    """`initial: 2m` with no `max` waited 30 s, the built-in cap, silently; a `max` the spec gives still holds."""
    nodes = plan(HEAD + "steps:\n  - a: {retry: {attempts: 3, initial: 2m}}\n"
                 "  - b: {retry: 2, compensate: {worker: u, retry: {initial: 20s}}}\n")["nodes"]
    assert nodes["a"]["retry"] == {**BUILTIN_STEP, "attempts": 3, "initial_ms": 120_000, "max_ms": 120_000}
    assert nodes["b"]["retry"] == {**BUILTIN_STEP, "attempts": 2}
    assert nodes["b"]["compensate"]["retry"] == {**BUILTIN_COMP, "initial_ms": 20_000, "max_ms": 20_000}
    nodes = plan(HEAD + "defaults:\n  retry: {max: 3m}\nsteps:\n  - a: {retry: {attempts: 3, initial: 2m}}\n")["nodes"]
    assert nodes["a"]["retry"]["max_ms"] == 180_000
    nodes = plan(HEAD + "defaults:\n  retry: {max: 10s}\nsteps:\n  - a: {retry: {initial: 2m}}\n  - b\n")["nodes"]
    assert nodes["a"]["retry"]["max_ms"] == 120_000 and nodes["b"]["retry"]["max_ms"] == 10_000


def test_retry_layers_merge_field_by_field() -> None:
    nodes = plan(HEAD + """\
        defaults:
          retry: {attempts: 3, backoff: linear, initial: 300ms, not_on: [Zeta, Alpha]}
          timeout: 20s
          compensate:
            retry: {attempts: 9, jitter: equal}
            timeout: 1m
        steps:
          - a
          - b:
              retry: {initial: 1s, max: 4s, "on": [Timeout, Busy]}
              timeout: 2s
              compensate:
                worker: undo_b
                retry: {max: 1m}
                timeout: 5s
          - c:
              compensate: undo_c
              retry: {backoff: exponential, multiplier: 3, jitter: full}
        """)["nodes"]
    assert nodes["a"]["retry"] == {**BUILTIN_STEP, "attempts": 3, "backoff": "linear", "initial_ms": 300,
                                   "not_on": ["Alpha", "Zeta"]}
    assert nodes["b"]["retry"] == {**BUILTIN_STEP, "attempts": 3, "backoff": "linear", "initial_ms": 1000,
                                   "max_ms": 4000, "on": ["Busy", "Timeout"], "not_on": ["Alpha", "Zeta"]}
    assert nodes["c"]["retry"]["multiplier"] == 3.0 and nodes["c"]["retry"]["jitter"] == "full"
    assert nodes["c"]["retry"]["backoff"] == "exponential"
    assert (nodes["a"]["timeout_ms"], nodes["b"]["timeout_ms"]) == (20_000, 2000)
    assert nodes["b"]["compensate"]["retry"] == {**BUILTIN_COMP, "attempts": 9, "jitter": "equal", "max_ms": 60_000}
    assert nodes["b"]["compensate"]["timeout_ms"] == 5000
    assert nodes["c"]["compensate"] == {"worker": "undo_c", "with": None, "timeout_ms": 60_000,
                                        "retry": {**BUILTIN_COMP, "attempts": 9, "jitter": "equal"}}


def test_run_timeout_and_flow_fields() -> None:
    p = plan("flowdsl: 1\nname: t\nversion: \"2.5\"\ndescription: d\ntimeout: 1m30s\nworkers: [m.w, a.w]\n"
             "input: {type: object}\nsteps: [a]\n")
    assert p["flow"] == {"name": "t", "version": "2.5", "description": "d", "workers": ["m.w", "a.w"],
                         "input_schema": {"type": "object"}, "timeout_ms": 90_000}
    assert p["plan_version"] == 1


def test_compensation_with_is_a_template_that_may_read_the_step_itself() -> None:
    nodes = plan(HEAD + """\
        steps:
          - charge:
              compensate:
                worker: refund
                with: {charge: "${ $steps.charge.id }", note: "undo ${ charge_id }"}
        """)["nodes"]
    template = nodes["charge"]["compensate"]["with"]
    assert set(template) == {"charge", "note"} and "$expr" in template["charge"]
    assert template["note"]["$format"][0] == "undo "


def test_llm_step_fields_and_module_default() -> None:
    nodes = plan(HEAD + """\
        defaults:
          llm: {module: chain_of_thought}
        steps:
          - write:
              llm:
                signature: "name, total: float -> greeting, tips: list[str]"
                instructions: Be brief.
          - classify:
              llm:
                signature:
                  inputs: {text: {type: str, desc: the message}}
                  outputs: {label: {enum: [a, b]}}
                module: predict
                lm: openai/gpt-4o-mini
                demos: [{text: hi, label: a}]
              fallback: rules.classify
        """)["nodes"]
    w, c = nodes["write"], nodes["classify"]
    assert (w["kind"], w["fallback"], "worker" in w) == ("llm", None, False)
    assert w["llm"]["signature"] == {
        "inputs": [{"name": "name", "type": "str", "desc": None, "enum": None},
                   {"name": "total", "type": "float", "desc": None, "enum": None}],
        "outputs": [{"name": "greeting", "type": "str", "desc": None, "enum": None},
                    {"name": "tips", "type": "list[str]", "desc": None, "enum": None}]}
    assert (w["llm"]["module"], w["llm"]["instructions"], w["llm"]["demos"]) == ("chain_of_thought", "Be brief.", [])
    assert w["writes"] == ["greeting", "tips"]
    assert c["llm"]["signature"]["inputs"] == [{"name": "text", "type": "str", "desc": "the message", "enum": None}]
    assert c["llm"]["signature"]["outputs"][0]["enum"] == ["a", "b"]
    assert (c["llm"]["module"], c["llm"]["lm"], c["fallback"]) == ("predict", "openai/gpt-4o-mini", "rules.classify")
    assert c["llm"]["demos"] == [{"text": "hi", "label": "a"}]
    assert c["writes"] == ["label"]  # a fallback's result is checked to be exactly the output fields


# --- data: with, output, expressions -----------------------------------------------------------


def test_templates() -> None:
    nodes = plan(HEAD + """\
        steps:
          - a:
              with:
                whole: "${ order.id }"
                text: "Order ${ order.id } costs ${ total }"
                escaped: "$${ not an expression }"
                mixed: "$${x} and ${ y }"
                plain: hello
                number: 3
                nested: [{k: "${ z }"}, [1, "${ z }"]]
                lit: {$gt: 5}
        """)["nodes"]
    w = nodes["a"]["with"]
    order_id = "x" + hashlib.sha256(b"order.id").hexdigest()[:12]
    assert w["whole"] == {"$expr": order_id}
    assert w["text"]["$format"][0::2] == ["Order ", " costs "]
    assert w["text"]["$format"][1] == {"$expr": order_id}
    assert w["escaped"] == "${ not an expression }"
    assert w["mixed"]["$format"][0] == "${x} and "
    assert (w["plain"], w["number"]) == ("hello", 3)
    assert w["nested"][0]["k"] == w["nested"][1][1] and "$expr" in w["nested"][1][1]
    assert w["lit"] == {"$literal": {"$gt": 5}}


def test_expressions_table() -> None:
    p = plan(HEAD + """\
        steps:
          - a
          - b:
              when: "${ $steps.a.ok and $input.flag }"
              with: {x: "${  order.id  }", y: "${ order.id }"}
        """)
    exprs = p["expressions"]
    assert len(exprs) == 2  # the same source (trimmed) is one expression
    when = exprs[p["nodes"]["b"]["when"]]
    assert when == {"source": "$steps.a.ok and $input.flag", "vars": ["input", "steps"], "steps": ["a"]}
    assert all(k == "x" + hashlib.sha256(v["source"].encode()).hexdigest()[:12] for k, v in exprs.items())


def test_outputs_and_writes() -> None:
    nodes = plan(HEAD + """\
        steps:
          - merged
          - named: {output: result}
          - mapped:
              output: {total: "${ sum + $context.tax }", n: "${ $count(items) }"}
        """)["nodes"]
    assert (nodes["merged"]["output"], nodes["merged"]["writes"]) == ({"mode": "merge"}, None)
    assert (nodes["named"]["output"], nodes["named"]["writes"]) == ({"mode": "name", "name": "result"}, ["result"])
    assert nodes["mapped"]["output"]["mode"] == "map" and sorted(nodes["mapped"]["output"]["map"]) == ["n", "total"]
    assert nodes["mapped"]["writes"] == ["n", "total"]


# --- stages, edges, critical path -----------------------------------------------------------------


def test_stages_edges_and_critical_path_of_a_diamond() -> None:
    p = plan(HEAD + """\
        steps:
          - fetch
          - fraud: {needs: [fetch]}
          - stock: {needs: [fetch]}
          - sequence: slow
            needs: [fetch]
            steps: [s1, s2]
          - accept: {needs: [fraud, stock, slow]}
          - audit: {needs: []}
        """)
    assert p["stages"] == [["fetch", "audit"], ["fraud", "stock", "s1"], ["s2"], ["accept"]]
    assert p["critical_path"] == ["fetch", "s1", "s2", "accept"]
    edges = {tuple(e) for e in p["edges"]}
    assert {("fetch", "fraud"), ("fetch", "stock"), ("fetch", "slow:start"), ("slow:start", "s1"), ("s1", "s2"),
            ("s2", "slow:end"), ("slow:end", "accept"), ("fraud", "accept"), ("stock", "accept"),
            (":start", "audit"), ("accept", ":end"), ("audit", ":end")} <= edges
    assert {k: n["stage"] for k, n in p["nodes"].items() if "stage" in n} == {
        "fetch": 0, "audit": 0, "fraud": 1, "stock": 1, "s1": 1, "s2": 2, "accept": 3}


def test_critical_path_ties_go_to_plan_order() -> None:
    p = plan(HEAD + "steps:\n  - parallel: p\n    branches: [b, a, c]\n  - z\n")
    assert p["critical_path"] == ["b", "z"]
    assert p["stages"] == [["b", "a", "c"], ["z"]]


def test_edges_stay_linear_for_wide_parallel_groups_in_a_row() -> None:
    width = 300
    branches = "".join(f"      - a{i}\n" for i in range(width))
    other = "".join(f"      - b{i}\n" for i in range(width))
    p = plan(HEAD + f"steps:\n  - parallel: p1\n    branches:\n{branches}  - parallel: p2\n    branches:\n{other}")
    # 2 edges per branch, plus :start→p1, p1→p2, p1→:end, p2→:end — not width * width step-to-step edges
    assert len(p["edges"]) == 4 * width + 4
    assert ["p1:end", "p2:start"] in p["edges"]
    assert p["critical_path"] == ["a0", "b0"]


def test_for_each_body_is_one_stage_per_step_and_switch_cases_share_stages() -> None:
    p = plan(NESTED)
    stage = {k: n["stage"] for k, n in p["nodes"].items() if "stage" in n}
    assert stage["body1"] == stage["l2"] + 1 and stage["body2"] == stage["body1"] + 1
    assert stage["case_a1"] == stage["case_b"] == stage["other"] == stage["body2"] + 1
    assert stage["finish"] == stage["case_a2"] + 1
    assert p["critical_path"] == ["start", "l1", "l2", "body1", "body2", "case_a1", "case_a2", "finish"]


# --- the plan's bytes ------------------------------------------------------------------------------


def test_plan_bytes_are_sorted_indented_json_with_a_final_newline() -> None:
    p = plan(HEAD + "steps: [b, a]\n")
    data = plan_bytes(p)
    assert data.endswith(b"}\n") and not data.endswith(b"\n\n")
    assert data == (json.dumps(json.loads(data), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert list(json.loads(data)) == sorted(p)
    assert b"spec.yaml" not in data  # no file names in a plan


# --- checks: one test per code with its message -----------------------------------------------------


def test_fd301_duplicate_ids_anywhere_in_the_flow() -> None:
    message = only(HEAD + "steps:\n  - a\n  - sequence: s\n    steps: [b, a]\n", "FD301")
    assert message.startswith("duplicate id 'a' (first used on line 4)")


def test_fd302_output_names_and_groups() -> None:
    assert "invalid id 'my-loop'" in only(HEAD + "steps:\n  - for_each: my-loop\n    items: '${ x }'\n"
                                          "    steps: [a]\n", "FD302")
    assert "invalid id 'bad-key'" in only(HEAD + "steps:\n  - a: {output: {bad-key: '${ x }'}}\n", "FD302")


def test_fd302_points_at_the_name_written_wrong_a_key_or_a_value(spec: Spec) -> None:
    result = spec("""\
        flowdsl: 1
        name: my-flow
        steps:
          - bad-step: {worker: my-worker!}
          - parallel: after-payment
            branches: [a]
        """)
    assert [(d.line, d.column, d.message.split(":")[0]) for d in result.diagnostics] == [
        (2, 7, "invalid id 'my-flow'"), (4, 5, "invalid step name 'bad-step'"),
        (4, 24, "invalid worker name 'my-worker!'"), (5, 15, "invalid id 'after-payment'")]
    flow = spec("flow my-flow\nstep a\n", "spec.flow")
    assert [(d.line, d.column) for d in flow.diagnostics] == [(1, 6)]


def test_fd303_needs_did_you_mean() -> None:
    assert only(HEAD + "steps:\n  - prepare\n  - ship: {needs: [prepar]}\n", "FD303") == (
        "'ship' needs 'prepar', which is not a step or group (did you mean 'prepare'?)")


def test_fd304_names_the_cycle_once() -> None:
    diags = errors(HEAD + "steps:\n  - a: {needs: [c]}\n  - b: {needs: [a]}\n  - c: {needs: [b]}\n"
                   "  - d: {needs: [d]}\n")
    assert [(c, m) for c, _, m in diags] == [("FD304", "dependency cycle: a → b → c → a"),
                                             ("FD304", "dependency cycle: d → d")]


def test_fd305_hint_names_the_group_to_put_needs_on() -> None:
    message = only(HEAD + """\
        steps:
          - a
          - sequence: outer
            steps:
              - sequence: inner
                steps:
                  - b: {needs: [a]}
        """, "FD305")
    assert message.endswith("(put it on 'outer', the enclosing group in the same list as 'a')")
    message = only(HEAD + "steps:\n  - sequence: g\n    steps:\n      - b: {needs: [g]}\n", "FD305")
    assert message.endswith("('g' is a group that encloses it)")


def test_fd306_only_for_a_constant_false_condition(spec: Spec) -> None:
    result = spec(HEAD + """\
        steps:
          - a: {when: "${ false }"}
          - b: {when: "${ 2 > 1 }"}
          - c: {when: "${ flag = false }"}
          - sequence: g
            when: "${ 'yes' = 'no' }"
            steps: [d]
        """)
    assert [(d.code, d.severity, d.line) for d in result.diagnostics] == [("FD306", "warning", 4),
                                                                          ("FD306", "warning", 8)]
    assert result.plan is not None  # a warning does not stop the plan


def test_fd307_conflicts_and_non_conflicts() -> None:
    assert plan(HEAD + """\
        steps:
          - a: {output: r}
          - b: {output: r}
          - switch: s
            on: "${ k }"
            cases:
              x: [c: {output: q}]
              y: [d: {output: q}]
          - for_each: loop
            items: "${ xs }"
            steps: [e: {output: r}]
        """)["nodes"]["b"]["writes"] == ["r"]
    message = only(HEAD + """\
        steps:
          - parallel: p
            branches:
              - for_each: loop
                items: "${ xs }"
                output: lines
                steps: [a]
              - b: {output: {lines: "${ l }"}}
        """, "FD307")
    assert message == "'b' and 'loop' may run at the same time and both write 'lines'; give one of them another " \
                      "output name"
    message = only(HEAD + """\
        steps:
          - a: {llm: {signature: "q -> answer"}}
          - b: {needs: [], llm: {signature: "q -> answer, score: int"}}
        """, "FD307")
    assert "'b' and 'a' may run at the same time and both write 'answer'" in message


def test_fd309_worker_on_an_llm_step() -> None:
    message = only(HEAD + "steps:\n  - a: {worker: w, llm: {signature: 'q -> a'}}\n", "FD309")
    assert "an LLM step has no worker; use 'fallback'" in message


def test_fd401_and_fd402_everywhere_a_policy_is_written() -> None:
    diags = errors(HEAD + """\
        timeout: forever
        defaults:
          timeout: 0
          retry: {initial: 5s, max: 1s}
          compensate: {timeout: 1 day, retry: {backoff: constant, multiplier: 2}}
        steps:
          - a: {compensate: {worker: u, timeout: -1s}}
        """)
    assert [(c, line) for c, line, _ in diags] == [("FD401", 3), ("FD401", 5), ("FD402", 6), ("FD401", 7),
                                                   ("FD402", 7), ("FD401", 9)]


def test_fd501_positions_and_forms() -> None:
    diags = errors(HEAD + """\
        steps:
          - for_each: loop
            items: "order.items"
            steps: [a]
          - switch: s
            on: "${ kind }  ${ other }"
            cases: {x: [b]}
          - c: {fail_when: "${ status = }"}
          - d: {output: {x: "${ (a }"}}
        """)
    assert [(c, line) for c, line, _ in diags] == [("FD501", 5), ("FD501", 8), ("FD501", 10), ("FD501", 11)]
    assert diags[0][2] == "'items' must be one expression written as \"${ ... }\", found 'order.items'"
    assert diags[2][2].startswith("in 'fail_when': ")


def test_fd502_scopes_of_variables() -> None:
    assert plan(HEAD + """\
        steps:
          - for_each: outer
            items: "${ xs }"
            as: x
            steps:
              - for_each: inner
                items: "${ $x.parts }"
                steps:
                  - a: {with: {p: "${ $item }", i: "${ $index }", o: "${ $x.id }", r: "${ $run.id }"}}
          - b:
              fail_when: "${ $context.limit < total }"
              output: {t: "${ ($f := function($v) { $v * 2 }; $f(total)) }"}
              with: {all: "${ $input }"}
        """)["nodes"]["a"]["scope"] == "inner"
    message = only(HEAD + "steps:\n  - a: {with: {x: \"${ $context.y }\"}}\n", "FD502")
    assert message.startswith("in 'with.x': undefined variable '$context' (it is defined only where a step's "
                              "result is read: fail_when, output, compensate.with); expected one of $input, $run")
    assert "(it is defined only inside for_each 'loop')" in only(HEAD + """\
        steps:
          - for_each: loop
            items: "${ xs }"
            steps: [a]
          - b: {when: "${ $index > 0 }"}
        """, "FD502")


def test_fd503_lists_each_forbidden_function() -> None:
    diags = errors(HEAD + "steps:\n  - a: {when: \"${ $millis() > 0 and $count($shuffle([1])) = 1 }\"}\n")
    assert [m.split(":")[1].strip() for _, _, m in diags] == ["'$millis' is not allowed", "'$shuffle' is not allowed"]


def test_fd504_reading_results() -> None:
    assert only(HEAD + "steps:\n  - a: {with: {x: \"${ $steps.a.y }\"}}\n", "FD504") == (
        "in 'with.x': 'a' cannot read its own result here")
    assert "which does not always finish before 'a' starts" in only(
        HEAD + "steps:\n  - a: {with: {x: \"${ $steps.b.y }\"}}\n  - b\n", "FD504")
    assert only(HEAD + """\
        steps:
          - for_each: loop
            items: "${ xs }"
            steps: [line]
          - total: {with: {x: "${ $steps.line.amount }"}}
        """, "FD504") == ("in 'with.x': '$steps.line' reads step 'line', which runs once per item of for_each "
                          "'loop'; read the loop's output instead")
    # allowed: an earlier step, a needs dependency, a step of the same iteration, the loop's own result after it
    allowed = plan(HEAD + """\
        steps:
          - a
          - for_each: loop
            items: "${ $steps.a.xs }"
            steps:
              - line
              - check: {with: {x: "${ $steps.line.ok }"}}
          - b: {needs: [loop], with: {x: "${ $steps.loop }", y: "${ $steps.a }"}}
        """)
    assert sorted(s for e in allowed["expressions"].values() for s in e["steps"]) == ["a", "a", "line", "loop"]


def test_fd601_to_fd603_from_the_signature_checker() -> None:
    assert only(HEAD + "steps:\n  - a: {llm: {signature: 'q -> a -> b'}}\n", "FD601").startswith(
        "malformed signature: found a second '->'")
    message = only(HEAD + "steps:\n  - a: {llm: {signature: {inputs: {q: integer}, outputs: {a: str}}}}\n",
                   "FD602")
    assert "found unknown type 'integer' for field 'q'" in message and "(did you mean 'int'?)" in message
    assert "demo 1" in only(HEAD + "steps:\n  - a: {llm: {signature: 'q -> n: int', demos: [{q: x, n: many}]}}\n",
                            "FD603")
    assert only(HEAD + "steps:\n  - a: {llm: {signature: 'card, q -> a', redact: [crad]}}\n", "FD601") == (
        "redact names 'crad', which is not a field of the signature; expected an input field: card, q "
        "(did you mean 'card'?)")
    assert "'a', which is an output field" in only(
        HEAD + "steps:\n  - a: {llm: {signature: 'q -> a', redact: [a]}}\n", "FD601")


def test_errors_stop_the_plan_but_every_diagnostic_is_collected(spec: Spec) -> None:
    result = spec(HEAD + """\
        steps:
          - a: {timeout: 0s, with: {x: "${ $nope }"}}
          - a
          - b: {with: {y: "${ unclosed"}}
        """)
    assert result.plan is None
    assert sorted(d.code for d in result.diagnostics) == ["FD301", "FD401", "FD501", "FD502"]


def test_checks_go_on_past_an_unknown_field_and_a_malformed_option(spec: Spec) -> None:
    """A misspelt field (FD202) or an option of the wrong shape (FD201) is set aside, and the rest of the spec
    is still checked: its duration, expression and reference errors are reported in the same run."""
    result = spec(HEAD + """\
        steps:
          - reserve_room:
              retry: {max_atempts: 3}
              timeout: 5 parsecs
          - charge_guest:
              when: "${ $steps.reserve_room.ok = }"
              needs: [nowhere]
          - for_each: each_guest
            items: "${ $.guests }"
            concurrency: 0
            steps:
              - greet: {with: {name: "${ $guest.name }"}}
        """)
    assert result.plan is None
    found = sorted((d.code, d.line) for d in result.diagnostics)
    # (FD502: the loop names no variable 'guest' — it has no 'as')
    assert found == [("FD201", 12), ("FD202", 5), ("FD303", 9), ("FD401", 6), ("FD501", 8), ("FD502", 14)]
    # nothing is said about what was set aside: the retry policy and the concurrency are not "missing"
    assert not [d for d in result.diagnostics if d.code not in ("FD201", "FD202") and
                ("retry" in d.path or "concurrency" in d.path)]


def test_checks_go_on_past_a_malformed_error_type_in_a_retry_filter(spec: Spec) -> None:
    """An error type is no id: nothing refers to it, so its retry policy is set aside like a misspelt field."""
    result = spec(HEAD + """\
        defaults: {retry: {attempts: 2, not_on: [my-error]}}
        steps:
          - notify: {retry: {attempts: 3, "on": [socket.timeout]}}
          - hold: {timeout: 10 s}
          - parallel: both
            branches:
              - a: {output: x}
              - b: {output: x}
        """)
    assert result.plan is None
    assert sorted((d.code, d.line) for d in result.diagnostics) == [
        ("FD302", 3), ("FD302", 5), ("FD307", 10), ("FD401", 6)]


def test_a_missing_loop_source_or_switch_value_is_stood_in_for_and_the_bodies_checked(spec: Spec) -> None:
    result = spec(HEAD + """\
        steps:
          - switch: by_country
            cases:
              DE: [{ship_de: {timeout: 5 parsecs}}]
          - for_each: each
            steps:
              - tag: {with: {x: "${ $item.sku + }"}}
        """)
    assert result.plan is None
    found = sorted((d.code, d.line, d.message.split(":")[0]) for d in result.diagnostics)
    assert found == [("FD201", 4, "missing required field 'on' in switch 'by_country'"),
                     ("FD201", 7, "missing required field 'items' in for_each 'each'"),
                     ("FD401", 6, "'5 parsecs' is not a duration; expected a number with a unit"),
                     ("FD501", 9, "in 'with.x'")]


@pytest.mark.parametrize("broken", [
    "  - sequence: s\n",  # a missing required field others depend on: the group has no steps
    "  - bad-name: {worker: w}\n",  # a malformed id (FD302): others may refer to it
    "  - a: {output: 5}\n",  # an option others refer to (output names)
])
def test_checks_stop_at_a_shape_error_that_cannot_be_set_aside(spec: Spec, broken: str) -> None:
    result = spec(HEAD + "steps:\n" + broken + "  - b: {with: {y: \"${ unclosed\"}}\n")
    assert result.plan is None
    assert {d.code for d in result.diagnostics} <= {"FD201", "FD302"}, result.diagnostics


# --- workers ---------------------------------------------------------------------------------------


@pytest.fixture
def worker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A worker module ``shop_workers_t`` importable from tmp_path, in a fresh registry."""
    from flowdsl.workers import registry

    monkeypatch.setattr(registry, "_workers", {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "shop_workers_t", raising=False)
    (tmp_path / "shop_workers_t.py").write_text(textwrap.dedent("""\
        from flowdsl.workers import worker

        @worker("reserve_stock")
        def reserve_stock(data, ctx):
            return {}

        @worker("release_stock")
        def release_stock(data, ctx):
            return None

        @worker("shop.rules.classify")
        def classify(data, ctx):
            return {"label": "a"}
        """), encoding="utf-8")
    return str(tmp_path)


def test_workers_known_and_unknown(spec: Spec, worker_module: str) -> None:
    result = spec(HEAD + """\
        workers: [shop_workers_t]
        steps:
          - reserve_stock: {compensate: {worker: relase_stock}}
          - label:
              llm: {signature: "q -> label"}
              fallback: shop.rules.clasify
          - ship: {worker: shop.ship}
        """, check_workers=True, search_path=worker_module)
    got = [(d.code, d.line, d.path, d.message.split(" by ")[0].split(": none")[0]) for d in result.diagnostics]
    assert got == [
        ("FD204", 5, "/steps/0/reserve_stock/compensate", "compensation 'relase_stock' is not a known worker"),
        ("FD204", 8, "/steps/1/label/fallback", "fallback 'shop.rules.clasify' is not a known worker"),
        # the step names its worker: the message tells the step from its worker
        ("FD204", 9, "/steps/2/ship/worker", "step 'ship': worker 'shop.ship' is not registered"),
    ]
    assert "(did you mean 'release_stock'?)" in result.diagnostics[0].message
    assert "(did you mean 'shop.rules.classify'?)" in result.diagnostics[1].message


def test_worker_module_found_beside_the_spec(spec: Spec, worker_module: str, tmp_path: Path) -> None:
    result = spec(HEAD + "workers: [shop_workers_t]\nsteps: [reserve_stock]\n", check_workers=True,
                  search_path=str(tmp_path / "elsewhere"))
    assert result.diagnostics == [] and result.plan is not None


def test_a_failed_import_reports_fd205_and_no_guesses(spec: Spec, worker_module: str) -> None:
    (Path(worker_module) / "broken_workers_t.py").write_text("raise RuntimeError('no config')\n")
    result = spec(HEAD + "workers: [shop_workers_t, broken_workers_t]\nsteps: [reserve_stock, unknown_one]\n",
                  check_workers=True, search_path=worker_module)
    (d,) = result.diagnostics
    assert d.code == "FD205" and d.path == "/workers/1"
    assert "cannot import worker module 'broken_workers_t': RuntimeError: no config" in d.message


def test_an_unknown_worker_tells_the_step_from_the_worker_it_names(spec: Spec, worker_module: str) -> None:
    result = spec(HEAD + """\
        workers: [shop_workers_t]
        steps:
          - reserve: {worker: reserve_stok}
          - shop.rules.clasify
          - release_stock: {worker: release_stoc, timeout: 1s}
        """, check_workers=True, search_path=worker_module)
    assert [(d.line, d.column, d.message) for d in result.diagnostics] == [
        (5, 23, "step 'reserve': worker 'reserve_stok' is not registered by the modules in 'workers:' "
                "(did you mean 'reserve_stock'?)"),
        # a step written as its worker's name: the name is both
        (6, 5, "step 'shop.rules.clasify' is not a known worker: none is registered under that name by the "
               "modules in 'workers:' (did you mean 'shop.rules.classify'?)"),
        (7, 29, "step 'release_stock': worker 'release_stoc' is not registered by the modules in 'workers:' "
                "(did you mean 'release_stock'?)"),
    ]


@pytest.mark.parametrize(("listed", "suggested"), [
    ("shop_worker_t", "shop_workers_t"),  # a module file in the searched directory
    ("shop_worker_t.sub", "shop_workers_t.sub"),  # a submodule of a misspelt module: the module is suggested
    ("shop_pkg_t.shipping_t", "shop_pkg_t.shiping_t"),  # a misspelt submodule: one of its package's modules
    ("shop_pkgs_t", "shop_pkg_t"),  # a package
    ("nowhere_near_anything", None),
])
def test_a_misspelt_worker_module_gets_a_did_you_mean(spec: Spec, worker_module: str, listed: str,
                                                      suggested: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.workers import WorkerImportError, import_worker_modules

    package = Path(worker_module) / "shop_pkg_t"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shiping_t.py").write_text("")
    monkeypatch.delitem(sys.modules, "shop_pkg_t", raising=False)
    result = spec(HEAD + f"workers: [{listed}]\nsteps: [reserve_stock]\n", check_workers=True,
                  search_path=worker_module)
    (d,) = result.diagnostics
    hint = f" (did you mean '{suggested}'?)" if suggested else ""
    assert d.code == "FD205" and d.message.startswith(f"cannot import worker module '{listed}'{hint}: "
                                                      "ModuleNotFoundError: No module named"), d.message
    # the same for `flowdsl worker -w` and the runtimes, which say the WorkerImportError itself
    with pytest.raises(WorkerImportError) as info:
        import_worker_modules([listed], worker_module)
    assert str(info.value).startswith(f"cannot import worker module '{listed}'{hint}: ModuleNotFoundError")
    assert info.value.suggestion == suggested


def test_only_the_first_missing_modules_of_a_spec_get_a_did_you_mean(spec: Spec, worker_module: str) -> None:
    """Each suggestion compares the name with every module of the directories searched: a spec listing thousands of
    missing modules is not slowed down by them."""
    listed = ", ".join(f"shop_worker_{i}" for i in range(10))
    result = spec(HEAD + f"workers: [{listed}]\nsteps: [a]\n", check_workers=True, search_path=worker_module)
    assert ["did you mean 'shop_workers_t'" in d.message for d in result.diagnostics] == [True] * 8 + [False] * 2


@pytest.mark.parametrize(("definition", "said"), [
    ("def w(data):", "function w takes 1 positional parameter (data); a worker must take the step's input and its "
                     "context: fn(data, ctx)"),
    ("def w():", "function w takes no parameters; a worker must take the step's input and its context: "
                 "fn(data, ctx)"),
    ("def w(data, ctx, extra):", "function w takes 3 positional parameters without a default (data, ctx, extra); "
                                 "a worker must take the step's input and its context: fn(data, ctx), and is given "
                                 "nothing else; give parameter 'extra' a default, or remove it"),
    ("def w(data, ctx, *, flag):", "function w has the keyword-only parameter 'flag' without a default; a worker "
                                   "must take the step's input and its context: fn(data, ctx), and is given nothing "
                                   "else; give it a default"),
    ("def w(data, *, ctx):", "function w takes 1 positional parameter (data) and the keyword-only parameter 'ctx'; a "
                             "worker must take the step's input and its context: fn(data, ctx); make parameter "
                             "'ctx' positional (before any '*')"),
])
def test_a_worker_of_the_wrong_signature_is_told_what_it_takes(spec: Spec, worker_module: str, definition: str,
                                                               said: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sig_workers_{abs(hash(definition)) % 10**8}"
    (Path(worker_module) / f"{name}.py").write_text(
        f"from flowdsl.workers import worker\n\n@worker('bad.w')\n{definition}\n    return {{}}\n")
    monkeypatch.delitem(sys.modules, name, raising=False)
    result = spec(HEAD + f"workers: [{name}]\nsteps: [bad.w]\n", check_workers=True, search_path=worker_module)
    (d,) = result.diagnostics
    assert d.code == "FD205" and f"TypeError: worker 'bad.w': {said} (in " in d.message, d.message


def test_no_import_skips_the_worker_checks(spec: Spec) -> None:
    result = spec(HEAD + "workers: [no_such_module_t]\nsteps: [anything]\n", check_workers=False)
    assert result.diagnostics == [] and result.plan is not None


# --- reading values: one rule for both syntaxes (docs/language.md, "How values are read") ------------


def _both(yaml_text: str, flow_text: str) -> tuple[CompileResult, CompileResult]:
    from flowdsl.api import compile_loaded, load_text

    y = compile_loaded(load_text(source(yaml_text), "t.yaml"), "t.yaml")
    f = compile_loaded(load_text(textwrap.dedent(flow_text), "t.flow"), "t.flow")
    return y, f


def _found(result: CompileResult) -> list[tuple[str, int | None, int | None, str]]:
    return [(d.code, d.line, d.column, d.message) for d in result.diagnostics]


def test_plain_scalars_read_the_same_in_both_syntaxes() -> None:
    """YAML 1.2 core scalars, without leading-zero integers; no YAML 1.1 booleans, octals, sexagesimals."""
    y, f = _both(HEAD + """\
        steps:
          - ok:
              with: {a: yes, b: off, c: 0777, e: 1_000, f: 0x10, g: 0o17, h: 1e3, i: True, j: NULL, k: FALSE,
                     l: 1., m: -0.5, n: 10s, o: 01, p: on, r: 12, s: y}
        """, """\
        flow t
        step ok with {a: yes, b: off, c: 0777, e: 1_000, f: 0x10, g: 0o17, h: 1e3, i: True, j: NULL, k: FALSE,
                      l: 1., m: -0.5, n: 10s, o: 01, p: on, r: 12, s: y}
        """)
    assert y.plan is not None and f.plan is not None, (_found(y), _found(f))
    assert plan_bytes(y.plan) == plan_bytes(f.plan)
    from flowdsl.api import load_text

    data = load_text(source("flowdsl: 1\nname: t\nsteps: [{ok: {with: {a: yes, b: off, c: 0777, d: 1:30, e: 1_000, "
                            "f: 0x10, g: 0o17, h: 1e3, i: True, j: NULL, k: ~, l: .5, m: +5, q: 2024-05-01}}}]\n"),
                     "t.yaml").data
    assert data["steps"][0]["ok"]["with"] == {
        "a": "yes", "b": "off", "c": "0777", "d": "1:30", "e": "1_000", "f": 16, "g": 15, "h": 1000.0, "i": True,
        "j": None, "k": None, "l": 0.5, "m": 5, "q": "2024-05-01"}  # fmt: skip
    assert type(data["steps"][0]["ok"]["with"]["h"]) is float


def test_durations_read_the_same_in_both_syntaxes() -> None:
    y, f = _both(HEAD + "timeout: 1e3\nsteps: [{a: {timeout: 0x10}}]\n", "flow t\ntimeout 1e3\nstep a timeout 0x10\n")
    assert y.plan is not None and f.plan is not None
    assert y.plan["flow"]["timeout_ms"] == f.plan["flow"]["timeout_ms"] == 1_000_000
    assert plan_bytes(y.plan) == plan_bytes(f.plan)
    y, f = _both(HEAD + "timeout: 1_000\nsteps: [a]\n", "flow t\ntimeout 1_000\nstep a\n")
    message = "'1_000' is not a duration; expected a number with a unit: 250ms, 10s, 5m, 2h, or several units, " \
              "largest first and each once: 1m30s"
    assert _found(y) == [("FD401", 3, 10, message)]
    assert _found(f) == [("FD401", 2, 9, message)]


@pytest.mark.parametrize(("written", "message"), [
    ("1e306", "'1e306' is longer than the maximum of 30 days (720h)"),
    ("2.5E+7", "'2.5E+7' is longer than the maximum of 30 days (720h)"),
    ("0x7FFFFFFF", "'0x7FFFFFFF' is longer than the maximum of 30 days (720h)"),
    ("1.0e-4", "'1.0e-4' is less than 1ms once rounded to whole milliseconds; durations are counted in "
               "milliseconds, and the shortest is 1ms"),
    ("-0.0", "a duration must be positive, found '-0.0'"),
    ("0e0", "a duration must be positive, found '0e0'"),
])  # fmt: skip
def test_a_bad_number_of_seconds_is_quoted_as_written_in_both_syntaxes(written: str, message: str) -> None:
    y, f = _both(HEAD + f"steps:\n  - a: {{retry: {{attempts: 2, initial: {written}}}}}\n",
                 f"flow t\nstep a retry {{attempts: 2, initial: {written}}}\n")
    assert [(c, m) for c, _, _, m in _found(y)] == [("FD401", message)]
    assert [(c, m) for c, _, _, m in _found(f)] == [("FD401", message)]


def test_fd402_quotes_the_durations_it_compares_as_written_in_both_syntaxes() -> None:
    y, f = _both(HEAD + "steps:\n  - a: {retry: {attempts: 2, initial: 1.5e3, max: 10}}\n",
                 "flow t\nstep a retry {attempts: 2, initial: 1.5e3, max: 10}\n")
    message = "retry 'initial' (1.5e3) is longer than 'max' (10)"
    assert [(c, m) for c, _, _, m in _found(y)] == [("FD402", message)]
    assert [(c, m) for c, _, _, m in _found(f)] == [("FD402", message)]


def test_an_overflowing_number_is_fd201_in_both_syntaxes() -> None:
    y, f = _both(HEAD + "steps:\n  - ok: {with: {a: 1e999}}\n", "flow t\nstep ok with {a: 1e999}\n")
    message = "'1e999' is not a finite number: it is beyond the largest number, about 1.8e308; expected a finite number"
    assert _found(y) == [("FD201", 4, 20, message)]
    assert _found(f) == [("FD201", 2, 18, message)]
    assert y.plan is None and f.plan is None
    assert [d.path for d in f.diagnostics] == ["/steps/0/ok/with/a"]


@pytest.mark.parametrize(("flow_value", "yaml_value", "code_point", "in_key"), [
    ('{"a\\tb": 1}', '{"a\\tb": 1}', 0x09, True),
    ('{c: "\\u0085"}', '{c: "\\x85"}', 0x85, False),
    ('{d: "\\u001b[31m"}', '{d: "\\e[31m"}', 0x1B, False),
    ('{a: "\\u0000"}', '{a: "\\0"}', 0x00, False),
    ('{"\\u0007": 1}', '{"\\a": 1}', 0x07, True),
])  # fmt: skip
def test_escaped_control_characters_are_fd110_in_both_syntaxes(flow_value: str, yaml_value: str, code_point: int,
                                                                in_key: bool) -> None:
    y, f = _both(HEAD + f"steps:\n  - ok: {{with: {yaml_value}}}\n", f"flow t\nstep ok with {flow_value}\n")
    where = "a key" if in_key else "a spec"
    message = f"control character U+{code_point:04X} is not allowed in {where}"
    assert [(c, m) for c, _, _, m in _found(y)] == [("FD110", message)]
    assert [(c, line, m) for c, line, _, m in _found(f)] == [("FD110", 2, message)]
    assert f.diagnostics[0].column == len("step ok with ") + 1 + flow_value.index('"')  # at the string


def test_tabs_and_newlines_stay_allowed_in_values() -> None:
    y, f = _both(HEAD + 'steps:\n  - ok: {with: {a: "x\\ty\\nz"}}\n', 'flow t\nstep ok with {a: "x\\ty\\nz"}\n')
    assert y.plan is not None and f.plan is not None
    assert plan_bytes(y.plan) == plan_bytes(f.plan)


@pytest.mark.parametrize(("yaml_bad", "flow_bad"), [(".nan", "1e999"), (".inf", "-1e999"), ("-.inf", "1e400")])
def test_a_number_that_is_not_finite_does_not_hide_other_diagnostics(yaml_bad: str, flow_bad: str) -> None:
    """The bad value is set aside with the option around it, as a schema violation is (docs/diagnostics.md)."""
    y, f = _both(HEAD + f"""\
        steps:
          - e10: {{worker: echo, timeout: {yaml_bad}}}
          - ok: {{when: "${{ a = }}"}}
          - b: {{timeout: soon, retry: {{attempts: 2, initial: {yaml_bad}}}}}
          - c: {{timeout: 0s}}
        """, f"""\
        flow t
        step e10 worker echo timeout {flow_bad}
        step ok when "${{ a = }}"
        step b timeout soon retry {{attempts: 2, initial: {flow_bad}}}
        step c timeout 0s
        """)
    for result, first in ((y, 4), (f, 2)):
        found = [(code, line) for code, line, _, _ in _found(result)]
        assert found == [("FD201", first), ("FD501", first + 1), ("FD401", first + 2), ("FD201", first + 2),
                         ("FD401", first + 3)], _found(result)
        assert result.plan is None


def test_a_number_that_is_not_finite_outside_an_option_stops_the_checks() -> None:
    """Nothing can be set aside around it: it is reported alone (data that others depend on)."""
    y, f = _both(HEAD + 'steps:\n  - a: {when: "${ = }"}\ninput: {maximum: .inf}\n',
                 'flow t\nstep a when "${ = }"\ninput {maximum: 1e999}\n')
    assert [c for c, *_ in _found(y)] == ["FD201"] and [c for c, *_ in _found(f)] == ["FD201"]


# --- the input schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "where", "ref"), [
    ('{$ref: "#/nowhere"}', "/input/$ref", "#/nowhere"),
    ('{$defs: {address: {type: object}}, properties: {ship_to: {$ref: "#/$defs/adress"}}}',
     "/input/properties/ship_to/$ref", "#/$defs/adress"),
    ('{properties: {a: {items: {$ref: "#missing_anchor"}}}}', "/input/properties/a/items/$ref", "#missing_anchor"),
    ('{anyOf: [{type: string}, {$ref: "https://example.com/order.json"}]}', "/input/anyOf/1/$ref",
     "https://example.com/order.json"),
    ('{$defs: {a: {$id: "a.json", $ref: "#/nowhere"}}}', "/input/$defs/a/$ref", "#/nowhere"),  # in a.json's scope
    ('{$dynamicRef: "other.json#meta"}', "/input/$dynamicRef", "other.json#meta"),
])  # fmt: skip
def test_an_input_schema_reference_that_does_not_resolve_is_fd206(schema: str, where: str, ref: str) -> None:
    """Run inputs are checked with references resolved inside the schema, never fetched: one that leads
    nowhere would fail every run, so it is reported when the spec is checked (docs/diagnostics.md, FD206)."""
    with pytest.raises(SpecError) as info:
        compile_text(HEAD + f"input: {schema}\nsteps: [a]\n")
    (d,) = info.value.diagnostics
    assert (d.code, d.path, d.line) == ("FD206", where, 3)
    hint = " (did you mean '#/$defs/address'?)" if ref == "#/$defs/adress" else ""
    assert d.message.startswith(f"the input schema's {where.rsplit('/', 1)[1]} '{ref}' cannot be resolved{hint}; "
                                "a reference must point inside the input schema")


@pytest.mark.parametrize("schema", [
    '{$defs: {address: {type: object}}, properties: {ship_to: {$ref: "#/$defs/address"}}}',
    '{$defs: {a: {$anchor: addr, type: object}}, items: {$ref: "#addr"}}',
    '{$defs: {a: {$id: "item.json", type: integer}}, items: {$ref: "item.json"}}',
    '{$defs: {a: {$id: "https://x.example/a.json", $defs: {b: {type: string}}, $ref: "#/$defs/b"}}}',
    '{$ref: "https://json-schema.org/draft/2020-12/schema"}',  # a bundled meta-schema
    '{properties: {"$ref": {type: string}}, const: {$ref: "#/nowhere"}}',  # a property, and data: no references
    '{$dynamicAnchor: meta, items: {$dynamicRef: "#meta"}}',
])  # fmt: skip
def test_input_schema_references_that_resolve_are_fine(schema: str) -> None:
    assert compile_text(HEAD + f"input: {schema}\nsteps: [a]\n")["flow"]["input_schema"] is not None


def test_an_input_schema_reference_to_something_that_is_no_schema_is_fd206() -> None:
    message = only(HEAD + 'input: {$defs: {a: {type: string}}, items: {$ref: "#/$defs/a/type"}}\nsteps: [a]\n',
                   "FD206")
    assert message.startswith("the input schema's $ref '#/$defs/a/type' points to \"string\", which is not a schema")


# --- messages that say what was wrong ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ('"1"', 'the language version must be the number 1, found the string "1"'),
    ("[1]", "the language version must be the number 1, found a list"),
    ("true", "the language version must be the number 1, found 'true'"),
    ("2", "unsupported language version 2; this flowdsl reads version 1"),
])  # fmt: skip
def test_a_wrong_language_version_says_what_was_found(value: str, message: str) -> None:
    assert errors(f"flowdsl: {value}\nname: t\nsteps: [a]\n") == [("FD203", 1, message)]


def test_a_version_of_the_wrong_type_names_the_types_it_may_have() -> None:
    assert only(HEAD + "version: [1]\nsteps: [a]\n", "FD201") == "expected a string or an integer, found a list"


def test_a_tab_indenting_yaml_is_named() -> None:
    for text in (HEAD + "steps:\n\t- a\n", HEAD + "steps:\n  - a:\n      timeout: 1s\n\t    retry: 2\n"):
        (code, line, message), = errors(text)
        assert code == "FD103" and line in (4, 6)
        assert message.startswith("found a tab: YAML cannot be indented with tabs") and message.endswith("use spaces")


def test_a_key_indented_between_two_levels_is_named_with_the_columns_around_it() -> None:
    text = HEAD + "steps:\n  - charge:\n      compensate: refund\n     timeout: 1s\n  - notify\n"
    assert errors(text) == [("FD103", 6, "did not find expected key (while parsing a block mapping started on line "
                                         "4); check the indentation of line 6: it starts at column 6, but the mapping "
                                         "started on line 4 has its keys at column 5, and the block inside it (line "
                                         "5) starts at column 7; a key starts in exactly the column of its sibling "
                                         "keys")]
    # blank lines and comments between are skipped; the block inside is the least indented of its lines
    text = HEAD + "input:\n  type: object\n  properties:\n    a:\n      type: string\n\n    # b\n   b: {}\n"
    (code, line, message), = errors(text)
    assert (code, line) == ("FD103", 10) and message.endswith(
        "check the indentation of line 10: it starts at column 4, but the mapping started on line 4 has its keys at "
        "column 3, and the block inside it (line 6) starts at column 5; a key starts in exactly the column of its "
        "sibling keys")


@pytest.mark.parametrize("text", [
    "steps:\n  - a:\n      worker: x\n    - b\n",  # not between two levels: at the keys' own column
    'steps:\n  - a: {with: {s: "abc" x}}\n',  # not at the start of a line, no expression
    "name2: x\n bad: 1\n",
])
def test_other_yaml_errors_get_no_indentation_or_quote_hint(text: str) -> None:
    for code, _, message in errors(HEAD + text):
        assert code == "FD103" and "check the indentation" not in message and "note:" not in message, message


@pytest.mark.parametrize(("value", "hint"), [
    ('{s: "${ amount + "x" }"}', 'write the expression\'s strings in single quotes ("${ amount + \'x\' }"), or '
                                'quote the whole value with \'...\' (\'${ amount + "x" }\')'),
    ('{s: "${ a }", t: "${ "x" & a }"}', 'write the expression\'s strings in single quotes ("${ \'x\' & a }"), or '
                                         'quote the whole value with \'...\' (\'${ "x" & a }\')'),
    ("\n        s: \"${ amount + \"x\" }\"",
     'write the expression\'s strings in single quotes ("${ amount + \'x\' }"), or quote the whole value with '
     '\'...\' (\'${ amount + "x" }\')'),
    ('{s: "${ \\"q\\" + "x" }"}', "write the expression's strings in single quotes, or quote the whole value "
                                  "with '...'"),  # escapes: no rewriting shown
    ("[\"${ it's + \"x\" }\"]", "write the expression's strings in single quotes, or quote the whole value "
                                "with '...'"),
])
def test_a_double_quote_inside_a_double_quoted_expression_is_named(value: str, hint: str) -> None:
    key = "branches" if value.startswith("[") else "with"
    text = HEAD + f"steps:\n  - a:\n      {key}: {value}\n"
    (code, _, message), = errors(text)
    assert code == "FD103" and "ends at the '\"' that was meant to start a string inside its expression: " in message
    assert message.endswith(hint), message


def test_a_compensation_on_a_group_says_where_compensations_go(tmp_path: Path) -> None:
    yaml_text = HEAD + ("steps:\n  - parallel: p\n    compensate: undo_p\n    branches: [a, b]\n"
                        "  - for_each: f\n    items: \"${ [1] }\"\n    compensate: undo_f\n    steps: [c]\n"
                        "  - flow: sub\n    path: sub.yaml\n    compensate: undo_s\n")
    (tmp_path / "sub.yaml").write_text(HEAD + "steps: [d]\n", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(yaml_text, encoding="utf-8")
    result = compile_spec(str(tmp_path / "spec.yaml"))
    found = [(d.code, d.line, d.message.split("; ", 1)[1]) for d in result.diagnostics]
    tail = "(when the run fails, the steps that completed are undone in reverse order, automatically)"
    assert found == [
        ("FD202", 5, "expected one of: branches, description, needs, parallel, when; a parallel group has no "
                     f"compensation of its own: give each step inside it its own 'compensate' {tail}"),
        ("FD202", 9, "expected one of: as, concurrency, description, for_each, items, needs, output, steps, when; a "
                     f"for_each has no compensation of its own: give each step inside it its own 'compensate' {tail}"),
        ("FD202", 13, "expected one of: description, flow, needs, output, path, timeout, when, with; a sub-flow has no "
                      "compensation of its own: give each step of the sub-flow (in its file) its own 'compensate' "
                      f"{tail}"),
    ]
    # the text syntax says its own word, and lists the options a statement can be written with
    (d,) = errors_of_flow("flow t\nsequence s undo undo_s {\n  step a undo undo_a\n}\n")
    assert d.message == ("unknown field 'undo'; expected one of: description, needs, when; a "
                         "sequence has no undo of its own: give each step inside it its own undo " + tail)
    # an unknown field of a step gets no such hint, nor another unknown field of a group
    assert "of its own" not in only(HEAD + "steps:\n  - a: {compensation: x}\n", "FD202")
    assert "of its own" not in only(HEAD + "steps:\n  - parallel: p\n    retry: 2\n    branches: [a]\n", "FD202")


def errors_of_flow(text: str) -> list[Any]:
    with pytest.raises(SpecError) as info:
        compile_text(text, filename="spec.flow")
    return list(info.value.diagnostics)


def test_an_unknown_llm_module_is_a_schema_violation() -> None:
    """An unknown word where the schema lists the allowed ones is FD201 (docs/diagnostics.md agrees)."""
    message = only(HEAD + 'steps:\n  - s: {llm: {signature: "q -> a", module: react}}\n', "FD201")
    assert message.startswith("expected one of \"predict\", \"chain_of_thought\"")


def test_eval_is_refused_for_what_it_does() -> None:
    message = only(HEAD + 'steps:\n  - a: {with: {x: "${ $eval(\'1 + 1\') }"}}\n', "FD503")
    assert message == "in 'with.x': '$eval' is not allowed: it evaluates a string as an expression at run time, " \
                      "out of reach of the checks made when the plan is compiled (variables, functions, step " \
                      "references); write the expression itself"


# --- docs/language.md: its examples compile ---------------------------------------------------------------

LANGUAGE_DOCS = Path(__file__).resolve().parent.parent / "docs" / "language.md"


def _docs_yaml_specs() -> list[str]:
    """The YAML examples of docs/language.md that are specs or parts of a steps list, as whole specs."""
    out = []
    for block in __import__("re").findall(r"```yaml\n(.*?)```", LANGUAGE_DOCS.read_text(encoding="utf-8"), 16):
        if block.startswith("flowdsl:"):
            out.append(block)
        elif block.startswith("steps:"):
            out.append(HEAD + block)
        elif block.startswith("  - "):
            out.append(HEAD + "steps:\n" + block)
    return out


def test_the_yaml_examples_in_the_language_docs_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spec-shaped example validates; the complete example also with its worker modules imported."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gift_wrap.yaml").write_text("flowdsl: 1\nname: gift_wrap\nsteps: [wrap]\n", encoding="utf-8")
    specs = _docs_yaml_specs()
    assert len(specs) >= 6
    for i, text in enumerate(specs):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(text, encoding="utf-8")
        result = compile_spec(str(path))
        assert [d.format() for d in result.diagnostics if d.severity == "error"] == [], text


def test_the_complete_example_in_the_language_docs_validates_with_its_workers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flowdsl.api import validate

    root = LANGUAGE_DOCS.parent.parent
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", [str(root), *sys.path])
    (complete,) = [s for s in _docs_yaml_specs() if "name: ecommerce_order" in s]
    path = tmp_path / "complete.yaml"
    path.write_text(complete, encoding="utf-8")
    assert [d.format() for d in validate(str(path), search_path=str(root))] == []


def test_an_alias_of_a_number_that_is_not_finite_is_set_aside_too() -> None:
    found = errors(HEAD + 'timeout: &t .nan\nsteps:\n  - a: {timeout: *t, when: "${ = }"}\n')
    assert [(code, line) for code, line, _ in found] == [("FD201", 3), ("FD501", 5)]


def test_a_name_too_long_is_said_to_be_too_long() -> None:
    long = "a" * 65
    assert only(HEAD + f"steps:\n  - {long}: {{worker: w.a}}\n", "FD302") == \
        f"invalid step name '{long}': it has 65 characters; an id has at most 64"
    assert only(HEAD + f"steps:\n  - w.{long}\n", "FD302") == \
        f"invalid worker name 'w.{long}': its part '{long[:20]}...' has 65 characters; an id has at most 64"
    assert only(HEAD + "steps:\n  - bad-name: {worker: w}\n", "FD302") == \
        "invalid step name 'bad-name': a step's name is an id, or the name of its worker (ids joined by dots)"


# --- FD311: a with value that is the name of a field, written without its ${ } --------------------------------


def test_fd311_warns_of_with_text_that_names_an_input_field_or_a_loop_variable(spec: Spec) -> None:
    text = HEAD + ("input: {type: object, required: [trip], properties: {trip: {type: object}, lines: {}}}\n"
                   "steps:\n"
                   "  - book: {worker: w, with: {trip: trip, mode: fast, n: \"trip ${ trip.id }\",\n"
                   "           t: \"${ 'trip' }\"}}\n"
                   "  - for_each: each\n    items: \"${ lines }\"\n    as: line\n    steps:\n"
                   "      - reserve: {worker: w, with: {line: line, item: item}, compensate: {worker: u, "
                   "with: {line: line}}}\n")
    result = spec(text)
    said = [(d.code, d.severity, d.message) for d in result.diagnostics]
    assert result.plan is not None  # (warnings: the plan is made)
    assert [(code, severity, msg.split(":")[0]) for code, severity, msg in said] == [
        ("FD311", "warning", "in 'with.trip'"), ("FD311", "warning", "in 'with.line'"),
        ("FD311", "warning", "in 'compensate.with.line'")], said
    assert "write '${ trip }' to pass the field" in said[0][2]
    assert "write '${ $line }' to pass the variable" in said[1][2]
    # no input schema, no loop: plain text is text
    assert spec(HEAD + "steps:\n  - book: {worker: w, with: {trip: trip}}\n").diagnostics == []
