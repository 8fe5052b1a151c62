"""The text syntax front end (flowdsl.textsyntax) and the writers (flowdsl.convert).

- every construct of the language reads to the data its YAML form loads to;
- round trips: YAML data -> .flow -> data, and .flow -> YAML -> data, exactly, over
  the conformance specs, the examples, a spec using every feature and generated specs;
- positions for every node and option value, in the shape of the YAML data;
- syntax errors: FD108 at the right line:col, saying what was found and what was
  expected; FD104, FD107, FD110; random input never raises.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowdsl.convert import convert_text, to_yaml
from flowdsl.diagnostics import CODES
from flowdsl.source import load_yaml
from flowdsl.textsyntax import (
    KEYWORDS,
    LLM_KEYS,
    NUMBER_RE,
    OPTION_KEYS,
    TOP_KEYS,
    WORD_RE,
    _grammar_text,
    _parser,
    parse_flow,
    to_flow,
)

ROOT = Path(__file__).resolve().parent.parent
YAML_SPECS = sorted((ROOT / "specs" / "conformance" / "valid").rglob("*.yaml")) + sorted(
    ROOT.glob("examples/*/flow.yaml")
)


def read(text: str) -> Any:
    """The data of a .flow text, which must have no diagnostic."""
    doc = parse_flow(text, "t.flow")
    assert doc.diagnostics == [], [d.format() for d in doc.diagnostics]
    return doc.data


def steps(text: str) -> list[Any]:
    return read(text)["steps"]  # type: ignore[no-any-return]


def from_yaml(text: str) -> Any:
    doc = load_yaml(text, "t.yaml")
    assert doc.diagnostics == [], [d.format() for d in doc.diagnostics]
    return doc.data


def assert_round_trips(data: dict[str, Any]) -> None:
    """data -> .flow -> data and data -> YAML -> data, exactly; the .flow writer is idempotent."""
    text = to_flow(data)
    doc = parse_flow(text, "rt.flow")
    assert doc.diagnostics == [], (text, [d.format() for d in doc.diagnostics])
    assert doc.data == data, text
    assert to_flow(doc.data) == text
    assert yaml.safe_load(to_yaml(data)) == data


# --- every construct ------------------------------------------------------------------------------


def test_the_header() -> None:
    text = """
# a comment line
flow orders   # a comment after a statement
version "1.2"
description "Take \\"an\\" order.\\nThen ship it."
workers examples.shop.workers, shared.workers
input {type: object, required: [order]}
timeout 5m
defaults retry 3 timeout 30s
step a
"""
    assert read(text) == {
        "flowdsl": 1, "name": "orders", "version": "1.2",
        "description": 'Take "an" order.\nThen ship it.',
        "workers": ["examples.shop.workers", "shared.workers"],
        "input": {"type": "object", "required": ["order"]}, "timeout": "5m",
        "defaults": {"retry": 3, "timeout": "30s"}, "steps": ["a"],
    }  # fmt: skip


@pytest.mark.parametrize(("text", "key", "value"), [
    ("flowdsl 2", "flowdsl", 2),
    ("version 1.2", "version", 1.2),
    ("version 3", "version", 3),
    ("version v2.1-beta", "version", "v2.1-beta"),
    ("workers a", "workers", ["a"]),
    ("workers [a, b]", "workers", ["a", "b"]),
    ("workers []", "workers", []),
    ('workers "a", b', "workers", ["a", "b"]),
    ("input true", "input", True),
    ("timeout 90", "timeout", 90),
    ("timeout 1.5", "timeout", 1.5),
    ("timeout 1m30s", "timeout", "1m30s"),
    ("defaults {}", "defaults", {}),
    ("defaults compensate {retry: {attempts: 9}} llm {lm: openai/gpt-4o-mini, module: predict}", "defaults",
     {"compensate": {"retry": {"attempts": 9}}, "llm": {"lm": "openai/gpt-4o-mini", "module": "predict"}}),
    ("defaults {\n  retry {attempts: 3, backoff: exponential}\n  timeout 30s\n}", "defaults",
     {"retry": {"attempts": 3, "backoff": "exponential"}, "timeout": "30s"}),
])  # fmt: skip
def test_header_statements(text: str, key: str, value: Any) -> None:
    data = read(f"flow f\n{text}\nstep a\n")
    assert data[key] == value and type(data[key]) is type(value)


def test_flowdsl_defaults_to_1_and_header_statements_may_come_anywhere() -> None:
    assert read("step a\nflow late\ntimeout 1h\nstep b") == {
        "flowdsl": 1, "name": "late", "timeout": "1h", "steps": ["a", "b"]}  # fmt: skip


@pytest.mark.parametrize(("text", "node"), [
    ("step validate_order", "validate_order"),
    ("step orders.checkout.validate_items", "orders.checkout.validate_items"),
    ('step "odd name"', "odd name"),
    ("step timeout", "timeout"),  # a keyword is a name where a name is expected
    ("step a {}", {"a": {}}),
    ("step a null", {"a": None}),
    ("step null", "null"),
    ("step a undo b", {"a": {"compensate": "b"}}),
    ("step a compensate b", {"a": {"compensate": "b"}}),
    ("step a undo {worker: b, with: {id: \"${ id }\"}, retry: 5, timeout: 3s}",
     {"a": {"compensate": {"worker": "b", "with": {"id": "${ id }"}, "retry": 5, "timeout": "3s"}}}),
    ("step charge_deposit worker payments.charge", {"charge_deposit": {"worker": "payments.charge"}}),
    ('step a with {email: "${ order.email }", n: 3, ok: true, none: null, f: -2.5e3}',
     {"a": {"with": {"email": "${ order.email }", "n": 3, "ok": True, "none": None, "f": -2500.0}}}),
    ("step a output result", {"a": {"output": "result"}}),
    ('step a output {total: "${ $sum(lines.price) }"}', {"a": {"output": {"total": "${ $sum(lines.price) }"}}}),
    ('step a when "${ x > 1 }" fail_when "${ status = \'bad\' }"',
     {"a": {"when": "${ x > 1 }", "fail_when": "${ status = 'bad' }"}}),
    ("step a needs b, c", {"a": {"needs": ["b", "c"]}}),
    ("step a needs [b]", {"a": {"needs": ["b"]}}),
    ("step a needs []", {"a": {"needs": []}}),
    ("step a retry 5", {"a": {"retry": 5}}),
    ("step a retry {attempts: 5, backoff: exponential, initial: 200ms, max: 5s, multiplier: 2.5,"
     " jitter: full, on: [PaymentGatewayTimeout], not_on: [CardDeclined]}",
     {"a": {"retry": {"attempts": 5, "backoff": "exponential", "initial": "200ms", "max": "5s",
                      "multiplier": 2.5, "jitter": "full", "on": ["PaymentGatewayTimeout"],
                      "not_on": ["CardDeclined"]}}}),
    ("step a timeout 10s", {"a": {"timeout": "10s"}}),
    ("step a timeout 10", {"a": {"timeout": 10}}),
    ('step a description "does a" fallback b', {"a": {"description": "does a", "fallback": "b"}}),
    ("step a timeout 1s {\n  retry 2\n\n  # a comment\n  when \"${ x }\" output y\n}",
     {"a": {"timeout": "1s", "retry": 2, "when": "${ x }", "output": "y"}}),
])  # fmt: skip
def test_task_steps(text: str, node: Any) -> None:
    assert steps(text) == [node]


@pytest.mark.parametrize(("text", "node"), [
    ('llm gen "a, b -> c"', {"gen": {"llm": {"signature": "a, b -> c"}}}),
    ("llm gen", {"gen": {"llm": {}}}),
    ('llm gen "a -> b" instructions "Be brief." module chain_of_thought lm openai/gpt-4o-mini fallback f',
     {"gen": {"llm": {"signature": "a -> b", "instructions": "Be brief.", "module": "chain_of_thought",
                      "lm": "openai/gpt-4o-mini"}, "fallback": "f"}}),
    ('llm gen {\n  signature {inputs: {q: str}, outputs: {tone: {enum: [formal, friendly]},'
     ' n: {type: "list[int]", desc: "numbers"}}}\n  demos [{q: hi, tone: formal, n: [1]}]\n'
     '  with {q: "${ question }"}\n  output answer\n  retry 2\n}',
     {"gen": {"llm": {"signature": {"inputs": {"q": "str"},
                                    "outputs": {"tone": {"enum": ["formal", "friendly"]},
                                                "n": {"type": "list[int]", "desc": "numbers"}}},
                      "demos": [{"q": "hi", "tone": "formal", "n": [1]}]},
              "with": {"q": "${ question }"}, "output": "answer", "retry": 2}}),
    # the generic option: the YAML llm: block as one value, on a step
    ('step gen llm {signature: "a -> b"}', {"gen": {"llm": {"signature": "a -> b"}}}),
])  # fmt: skip
def test_llm_steps(text: str, node: Any) -> None:
    assert steps(text) == [node]


def test_groups() -> None:
    text = """flow g
sequence checkout { validate reserve "charge card" }
parallel after_payment when "${ ok }" needs checkout description "both" {
  sequence fulfilment { reserve_items pick_items
    pack_items }
  step confirm_charge undo void_charge
  reconcile
  step parallel
}
for_each charge_lines items "${ order.items }" as line concurrency 4 output charges { charge_line }
switch shipping on "${ order.shipping }" {
  case express { ship_express }
  case "same day" {
    step courier timeout 1h
  }
  case 1 { one }
  case true { yes_ }
  default { ship_standard track }
}
switch empty on "${ x }" {}
flow gift_wrap path gift_wrap.yaml with {items: "${ order.items }"} output wrapping
flow sub {
  path lib/sub.yaml
  when "${ x }"
  timeout 5m
}
sequence nothing {}
"""
    assert steps(text) == [
        {"sequence": "checkout", "steps": ["validate", "reserve", "charge card"]},
        {"parallel": "after_payment", "when": "${ ok }", "needs": ["checkout"], "description": "both",
         "branches": [
             {"sequence": "fulfilment", "steps": ["reserve_items", "pick_items", "pack_items"]},
             {"confirm_charge": {"compensate": "void_charge"}},
             "reconcile",
             "parallel",
         ]},
        {"for_each": "charge_lines", "items": "${ order.items }", "as": "line", "concurrency": 4,
         "output": "charges", "steps": ["charge_line"]},
        {"switch": "shipping", "on": "${ order.shipping }",
         "cases": {"express": ["ship_express"], "same day": [{"courier": {"timeout": "1h"}}],
                   "1": ["one"], "true": ["yes_"]},
         "default": ["ship_standard", "track"]},
        {"switch": "empty", "on": "${ x }", "cases": {}},
        {"flow": "gift_wrap", "path": "gift_wrap.yaml", "with": {"items": "${ order.items }"}, "output": "wrapping"},
        {"flow": "sub", "path": "lib/sub.yaml", "when": "${ x }", "timeout": "5m"},
        {"sequence": "nothing", "steps": []},
    ]  # fmt: skip


def test_json_values() -> None:
    text = """step a with {
  # comments and newlines are allowed inside a value
  "quoted key": "x\\u00e9\\t",
  1: one,            # keys are read as written, as strings
  true: [1, 2.0, -3, 1e3, 0.5],
  null: {},
  nested: {list: [[], {}, [a, "b c", 10s, 01]],},
  word: openai/gpt-4o-mini,
}
"""
    assert steps(text) == [{"a": {"with": {
        "quoted key": "xé\t", "1": "one", "true": [1, 2.0, -3, 1000.0, 0.5], "null": {},
        "nested": {"list": [[], {}, ["a", "b c", "10s", "01"]]}, "word": "openai/gpt-4o-mini"}}}]  # fmt: skip


def test_line_ends_bom_and_tabs() -> None:
    assert read("\ufeffflow f\r\nstep a\ttimeout 1s\r\n\r\nstep b\r") == {
        "flowdsl": 1, "name": "f", "steps": [{"a": {"timeout": "1s"}}, "b"]}  # fmt: skip


@pytest.mark.parametrize("last", ["step charge # retry 5", "step b # undo refund", "step b # needs a",
                                  "parallel p { a\n  b\n} # needs x", "step b # was: null {}", "step b #"])
def test_a_comment_on_the_last_line_without_a_newline_is_a_comment(last: str) -> None:
    """The lexer started again inside such a comment and read its words: `# retry 5` gave the step 5 attempts."""
    text = "flow t\nstep a\n" + last
    assert read(text) == read(text + "\n")


def test_ignored_text_at_the_end_is_read_in_one_pass() -> None:
    """Each space of a run ending the text was the start of another scan to its end: 100,000 spaces took 6 s,
    a few megabytes hours. (A million here: a hang without the fix.)"""
    for tail in (" " * 1_000_000, "\t" * 1_000_000, "# " + " " * 1_000_000):
        assert read("flow t\nstep a" + tail) == {"flowdsl": 1, "name": "t", "steps": ["a"]}


def test_a_switch_reads_with_its_keys_in_the_yaml_order() -> None:
    """The reader put `default` before `cases`: the data differed in key order from its YAML twin."""
    data = read('flow t\nswitch s on "${ x }" {\n  default { b }\n  case 1 { a }\n}\n')
    yaml_twin = from_yaml("flowdsl: 1\nname: t\nsteps:\n  - switch: s\n    on: ${ x }\n    cases: {'1': [a]}\n"
                          "    default: [b]\n")
    assert data == yaml_twin and list(data["steps"][0]) == list(yaml_twin["steps"][0]) == ["switch", "on", "cases",
                                                                                              "default"]


def test_the_writer_escapes_line_and_paragraph_separators_in_strings() -> None:
    """Written raw, many editors and tools showed the one-line string broken in two."""
    data = {"flowdsl": 1, "name": "t", "description": "a\u2028b\u2029c", "steps": ["a"]}
    text = to_flow(data)
    assert "\u2028" not in text and "\u2029" not in text and '"a\\u2028b\\u2029c"' in text
    assert read(text) == data


def test_bytes_are_read_as_utf8() -> None:
    assert parse_flow('flow "café"\nstep a'.encode()).data == {"flowdsl": 1, "name": "café", "steps": ["a"]}


# --- the docs -------------------------------------------------------------------------------------


def _docs_section() -> str:
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    return text[text.index("\n## Text syntax\n") :]


def test_the_docs_complete_example_reads_as_its_yaml_twin() -> None:
    docs = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    yaml_example = re.search(r"## A complete example\n\n```yaml\n(.*?)```", docs, re.S)
    flow_example = re.search(r"\n```\n(flow ecommerce_order\n.*?)```", _docs_section(), re.S)
    assert yaml_example and flow_example
    assert read(flow_example.group(1)) == from_yaml(yaml_example.group(1))


def test_every_example_in_the_docs_section_reads() -> None:
    blocks = re.findall(r"\n```\n(.*?)```", _docs_section(), re.S)
    flow_blocks = [b for b in blocks if not b.startswith("orders.flow:")]
    assert len(flow_blocks) >= 4
    for block in flow_blocks:
        assert read(block)["steps"]


# --- positions ------------------------------------------------------------------------------------

SKETCH = """flow ecommerce_order
workers examples.ecommerce.workers

step validate_order
step check_inventory  undo release_inventory
step process_payment  undo refund_payment  timeout 10s  retry 5
llm  generate_confirmation "customer_name, order_details, total_amount -> greeting, order_summary, next_steps"
parallel after_payment {
  sequence fulfilment { reserve_items  pick_items  pack_items  ship_items }
  sequence accounting { confirm_charge  reconcile }
}
step notify_customer when "${ order.notify != false }" with {email: "${ order.email }"}
"""


def test_positions_follow_the_yaml_data_shape() -> None:
    doc = parse_flow(SKETCH, "sketch.flow")
    pos, keys = doc.positions.positions, doc.positions.key_positions
    assert doc.positions.file == "sketch.flow"
    assert pos["/name"] == (1, 6) and keys["/name"] == (1, 1)
    assert pos["/workers/0"] == (2, 9)
    assert pos["/steps/0"] == (4, 6)
    assert pos["/steps/1/check_inventory/compensate"] == (5, 28)
    assert keys["/steps/1/check_inventory/compensate"] == (5, 23)
    assert pos["/steps/2/process_payment/timeout"] == (6, 52)
    assert pos["/steps/3"] == (7, 6) and pos["/steps/3/generate_confirmation/llm/signature"] == (7, 28)
    assert pos["/steps/4"] == (8, 1) and pos["/steps/4/parallel"] == (8, 10)
    assert pos["/steps/4/branches/0"] == (9, 3) and pos["/steps/4/branches/1/sequence"] == (10, 12)
    assert pos["/steps/4/branches/0/steps/2"] == (9, 52)
    assert pos["/steps/5/notify_customer/with/email"] == (12, 69)
    assert keys["/steps/5/notify_customer/with/email"] == (12, 62)


def _pointers(value: Any, ptr: str = "") -> list[str]:
    """The pointer of every element of ``value`` (keys escaped as in RFC 6901)."""
    out = [ptr]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out += _pointers(v, ptr + "/" + str(k).replace("~", "~0").replace("/", "~1"))
    return out


@pytest.mark.parametrize("path", YAML_SPECS, ids=[p.name for p in YAML_SPECS])
def test_every_element_has_a_position(path: Path) -> None:
    doc = parse_flow(to_flow(from_yaml(path.read_text(encoding="utf-8"))), "p.flow")
    missing = [p for p in _pointers(doc.data) if p not in doc.positions.positions and p != "/flowdsl"]
    assert missing == []
    lines = to_flow(doc.data).count("\n")
    assert all(1 <= line <= lines and col >= 1 for line, col in doc.positions.positions.values())


def test_positions_of_escaped_keys() -> None:
    doc = parse_flow('step a with {"x/y~z": 1}')
    assert doc.positions.positions["/steps/0/a/with/x~1y~0z"] == (1, 23)


# --- round trips ----------------------------------------------------------------------------------

EVERYTHING = """
flowdsl: 1
name: everything
version: 2.5
description: "Every construct: \\"quotes\\", unicode é, a tab\\t, a newline\\n."
workers: [examples.a.workers, b]
input:
  type: object
  required: [order]
  properties:
    order: {type: object, properties: {id: {type: string}, total: {type: number, minimum: 0}}}
    notify: {type: boolean, default: true}
timeout: 90
defaults:
  retry: {attempts: 3, backoff: exponential, initial: 200ms, max: 5s, multiplier: 2, jitter: full}
  timeout: 30s
  compensate: {retry: {attempts: 9, not_on: [Fatal]}, timeout: 1m}
  llm: {lm: openai/gpt-4o-mini, module: chain_of_thought}
steps:
  - validate_order
  - orders.checkout.validate_items
  - plain_mapping:
  - empty_mapping: {}
  - timeout
  - check_inventory:
      compensate: release_inventory
      fail_when: "${ inventory_status = 'insufficient' }"
  - charge_deposit:
      worker: payments.charge
      compensate: {worker: payments.refund, with: {amount: "${ deposit }"}, retry: 10, timeout: 2s}
      with: {amount: "${ order.total * 0.1 }", "weird key/~": [1, 2.5, true, null, "1.5", "true", 10s]}
      output: {deposit_id: "${ id }"}
      when: "${ order.total > 100 }"
      needs: [validate_order]
      retry: {attempts: 5, on: [PaymentGatewayTimeout]}
      timeout: 10
      description: Take a deposit.
  - generate_confirmation:
      llm:
        signature: "customer_name, total: float -> greeting, next_steps: list[str]"
        instructions: Write a friendly order confirmation.
        module: predict
        lm: openai/gpt-4o
        demos:
          - {customer_name: Ann, total: 9.5, greeting: "Hi Ann!", next_steps: ["We ship tomorrow"]}
      fallback: template_confirmation
      output: confirmation
  - classify:
      llm:
        signature:
          inputs: {subject: str, body: {type: str, desc: "the message"}}
          outputs: {tone: {enum: [formal, friendly]}, score: int}
  - parallel: after_payment
    when: "${ ok }"
    description: both sides
    branches:
      - sequence: fulfilment
        steps: [reserve_items, pick_items, pack_items, ship_items]
      - sequence: accounting
        needs: []
        steps: [confirm_charge, {reconcile: {retry: 2}}]
      - step
  - for_each: charge_lines
    items: "${ order.items }"
    as: line
    concurrency: 4
    output: charges
    steps:
      - charge_line: {with: {sku: "${ $line.sku }", position: "${ $index + 1 }"}}
  - switch: shipping
    on: "${ order.shipping }"
    cases:
      express: [ship_express]
      "same day": [{courier: {timeout: 1h}}]
      "1": [page]
      standard: [ship_standard, track]
    default: [ship_standard]
  - flow: gift_wrap
    path: lib/gift_wrap.yaml
    with: {items: "${ order.items }", message: "${ order.gift_message }"}
    output: wrapping
    when: "${ order.gift }"
    timeout: 2m30s
  - wait: payment_confirmed
    timeout: 30m
    output: confirmation
    description: the payment provider's webhook
  - wait: approval
    signal: manager_approved
    timeout: 1h
    output: {approved_by: "${ manager }"}
    on_failure: continue
    when: "${ order.total > 1000 }"
    needs: [payment_confirmed]
  - wait: cooling_off
    for: 2h
  - notify_customer:
      when: "${ $not(order.notify = false) }"
      with:
        email: "${ order.email }"
        message: "Order ${ order.id } is on its way"
"""


def test_a_spec_with_every_construct_round_trips() -> None:
    assert_round_trips(from_yaml(EVERYTHING))


@pytest.mark.parametrize("path", YAML_SPECS, ids=[p.name for p in YAML_SPECS])
def test_conformance_specs_and_examples_round_trip(path: Path) -> None:
    data = from_yaml(path.read_text(encoding="utf-8"))
    assert_round_trips(data)
    assert from_yaml(to_yaml(data)) == data


def test_flow_to_yaml_and_back() -> None:
    data = read(SKETCH)
    assert yaml.safe_load(to_yaml(data)) == data
    assert from_yaml(to_yaml(data)) == data
    assert read(to_flow(from_yaml(to_yaml(data)))) == data


def test_the_canonical_flow_text() -> None:
    long, other = "x" * 40, "y" * 40
    data = from_yaml(f"""
flowdsl: 1
steps:
  - a: {{timeout: 1s, compensate: undo_a}}
  - sequence: s
    steps: [b, {{c: {{with: {{x: 1}}}}}}]
  - b: {{with: {{long: {long}, other: {other}}}}}
defaults: {{timeout: 30s}}
name: canon
""")
    assert (
        to_flow(data)
        == f"""flow canon
defaults timeout 30s

step a undo undo_a timeout 1s
sequence s {{
  b
  step c with {{x: 1}}
}}
step b {{
  with {{
    long: {long},
    other: {other}
  }}
}}
"""
    )


def test_the_canonical_yaml_text() -> None:
    data = read("step a timeout 1s undo b\nflow f\nworkers w\nsequence s { c d }\nstep e {}\nstep g null")
    assert (
        to_yaml(data)
        == """flowdsl: 1
name: f
workers: [w]
steps:
- a:
    compensate: b
    timeout: 1s
- sequence: s
  steps: [c, d]
- e: {}
- g: null
"""
    )


def test_a_sub_flow_s_timeout_is_written_with_its_options_and_round_trips() -> None:
    data = from_yaml("""
flowdsl: 1
name: f
steps:
  - flow: gift
    description: Wrap it
    timeout: 5m
    needs: []
    path: gift.yaml
""")
    text = 'flow f\n\nflow gift path gift.yaml needs [] timeout 5m description "Wrap it"\n'
    assert to_flow(data) == text
    assert read(text) == data
    assert to_yaml(data).endswith("- flow: gift\n  path: gift.yaml\n  needs: []\n  timeout: 5m\n"
                                  "  description: Wrap it\n")
    assert_round_trips(data)


def test_convert_text_dispatches() -> None:
    data = read(SKETCH)
    assert convert_text(data, "flow") == to_flow(data)
    assert convert_text(data, "yaml") == to_yaml(data)
    with pytest.raises(ValueError, match="unknown format 'json'"):
        convert_text(data, "json")


@pytest.mark.parametrize(("data", "message"), [
    ({"flowdsl": 1, "name": "x", "stpes": []}, "/stpes: not a key"),
    ({"name": "x", "steps": [{"a": {"tiemout": 1}}]}, "/steps/0/a/tiemout: not an option"),
    ({"name": "x", "steps": [{"a": {"timeout": float("inf")}}]}, "/steps/0/a/timeout: the number inf"),
    ({"name": "x", "steps": [{"a": {"with": {1: "x"}}}]}, "mapping keys are strings"),
    ({"name": "x", "steps": [{"a": {}, "b": {}}]}, "/steps/0: a step is a mapping with exactly one key"),
    ({"name": "x", "steps": [3]}, "/steps/0: a node is a name or a mapping"),
    ({"name": "x", "steps": []}, "/steps: a non-empty list"),
    ({"name": 5, "steps": ["a"]}, "/name: a name must be a string"),
    ({"name": "x", "steps": [{"sequence": "s", "steps": "a"}]}, "/steps/0/steps: a list of nodes"),
])  # fmt: skip
def test_data_the_text_syntax_cannot_express(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        to_flow(data)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("flow x\nstpe a", 2, 1,
     "unexpected 'stpe', expected one of: step, llm, wait, sequence, parallel, for_each, switch, flow, workers, "
     "defaults, flowdsl, version, description, input, timeout, end of input (did you mean 'step'?)"),
    ("step a tiemout 5s", 1, 8, "unexpected 'tiemout', expected one of: an option (undo, with, output, when, "
     "needs, ...), '{', end of input, end of line (did you mean 'timeout'?)"),
    ("step a timeout\nstep b", 1, 15, "unexpected end of line, expected a value"),
    ("step a timeout", 1, 15, "unexpected end of input, expected a value"),
    ("parallel p {\n  a\n  step b\n", 4, 1, "unexpected end of input, expected one of: step, llm, wait, "
     "sequence, parallel, for_each, switch, flow, '}', a name, a string (the '{' on line 1 is not closed)"),
    ("step a with {x: [1, 2}", 1, 22, "unexpected '}', expected one of: ',', ']'"),
    ("step a with {x 1}", 1, 16, "unexpected '1', expected ':'"),
    ('step "abc', 1, 6, "unclosed string: a string is written in double quotes on one line"),
    ('step a when "\\q"', 1, 14, "invalid escape '\\q' in a string: a string takes the JSON escapes \\\" \\\\"),
    ('step a when "ab\\u12x"', 1, 16, "invalid escape '\\u12' in a string: '\\u' takes 4 hex digits"),
    ('step a when "ab\\', 1, 13, "unclosed string"),
    ("step a timeout 20 s", 1, 19, "unexpected 's' after the number 20: a duration is written without spaces: "
     "'20s'"),
    ("timeout 5 m\nstep a", 1, 11, "a duration is written without spaces: '5m'"),
    ("step a with {x: 1\nstep b", 2, 1, "unexpected 'step', expected one of: ',', '}' (the '{' on line 1 is not "
     "closed)"),
    ("step a with {x: [1,\n 2\nstep b", 3, 1, "(the '[' on line 1 is not closed)"),
    ("step a @", 1, 8, "unexpected character '@', expected one of: an option"),
    ("step a b", 1, 8, "unexpected 'b', expected one of: an option"),
    ("sequence s { step a b }", 1, 21, "unexpected 'b'"),
    ("sequence s { a\n  b } c", 2, 7, "unexpected 'c', expected one of: end of input, end of line"),
    ("flow x {\n  needs\n}", 2, 8, "unexpected end of line, expected one of: '[', a name, a string"),
    ("switch s on x {\n  a\n}", 2, 3, "unexpected 'a', expected one of: case, default, '}'"),
    ('llm g "a -> b" "c"', 1, 16, "unexpected string '\"c\"'"),
    ("step", 1, 5, "unexpected end of input, expected one of: a name, a string"),
    ("{", 1, 1, "unexpected '{'"),
    # habits from YAML: a ':' after a keyword, an expression not in quotes
    ("step a compensate: b", 1, 18, "unexpected ':', expected a value; options take no ':' in the text syntax: "
     "write 'compensate <value>'"),
    ("step a {\n  with: {x: 1}\n}", 2, 7, "options take no ':' in the text syntax: write 'with <value>'"),
    ("flow: x", 1, 5, "keywords take no ':' in the text syntax: write 'flow <value>'"),
    ("step a with {x: ${ order.id }}", 1, 17, "unexpected character '$', expected a value; quote an expression: "
     '"${ order.id }"'),
    ('step a when ${ x = "y" }', 1, 13, 'quote an expression: "${ … }"'),
    ("step a when ${ {'a': 1}.a = 1 }", 1, 13, 'quote an expression: "${ {\'a\': 1}.a = 1 }"'),
    ("step a when ${ x", 1, 13, 'quote an expression: "${ … }"'),
])  # fmt: skip
def test_syntax_errors(text: str, line: int, column: int, message: str) -> None:
    doc = parse_flow(text, "bad.flow")
    assert doc.data is None
    (diag,) = doc.diagnostics
    assert (diag.code, diag.file, diag.line, diag.column) == ("FD108", "bad.flow", line, column), diag.message
    assert message in diag.message


@pytest.mark.parametrize("text", ["step timeout: 3", "step a with {x: $y}"])
def test_no_yaml_hint_where_it_would_not_help(text: str) -> None:
    """A step named by a keyword is no option; a '$' that starts no ``${`` is no expression left unquoted."""
    (diag,) = parse_flow(text, "bad.flow").diagnostics
    assert "take no ':'" not in diag.message and "quote an expression" not in diag.message


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("step a timeout 1s timeout 2s", 1, 19, "duplicate option 'timeout' (first written on line 1)"),
    ("step a undo b {\n  compensate c\n}", 2, 3, "duplicate option 'compensate'"),
    ('llm a "x -> y" signature "z -> w"', 1, 16, "duplicate option 'signature'"),
    ('llm g llm {signature: "a -> b"}', 1, 7, "an 'llm' statement holds the llm block's options itself"),
    ("flow a\nflow b", 2, 1, "duplicate statement 'flow'"),  # the statement as written, not its key 'name'
    ("step a undo b undo c", 1, 15, "duplicate option 'undo'"),
    ("timeout 1s\ntimeout 2s", 2, 1, "duplicate statement 'timeout'"),
    ("step a with {x: 1, \"x\": 2}", 1, 20, "duplicate key 'x'"),
    ("switch s on x {\n  case a { b }\n  case a { c }\n}", 3, 8, "duplicate case 'a'"),
    ("switch s on x {\n  default { b }\n  default { c }\n}", 3, 3, "duplicate case 'default'"),
])  # fmt: skip
def test_duplicates(text: str, line: int, column: int, message: str) -> None:
    doc = parse_flow(text, "dup.flow")
    assert doc.data is None
    (diag,) = doc.diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD104", line, column)
    assert message in diag.message and diag.path


def test_invalid_characters() -> None:
    doc = parse_flow("flow f\nstep a\x07", "c.flow")
    assert doc.data is None
    (diag,) = doc.diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD110", 2, 7)
    assert "U+0007" in diag.message
    (diag,) = parse_flow(b"flow f\nstep \xff").diagnostics
    assert (diag.code, diag.line) == ("FD110", 2) and "not valid UTF-8" in diag.message
    (diag,) = parse_flow("step a\ud800").diagnostics
    assert diag.code == "FD110"


def test_nesting_too_deep() -> None:
    (diag,) = parse_flow("step a with " + "[" * 150 + "]" * 150).diagnostics
    assert (diag.code, diag.line, diag.column) == ("FD107", 1, 113)
    nested = "".join(f"sequence s{i} {{\n" for i in range(120)) + "a\n" + "}\n" * 120
    (diag,) = parse_flow(nested).diagnostics
    assert (diag.code, diag.line) == ("FD107", 101)
    # a sequence is two data levels (its mapping and its steps list): the YAML loader's bound of 100
    # data levels applies to the text syntax too, so both syntaxes accept exactly the same specs
    ok = "".join(f"sequence s{i} {{\n" for i in range(45)) + "a\n" + "}\n" * 45
    assert parse_flow(ok).diagnostics == []
    deep = "".join(f"sequence s{i} {{\n" for i in range(60)) + "a\n" + "}\n" * 60
    assert [d.code for d in parse_flow(deep).diagnostics] == ["FD107"]


def test_numbers_too_long_for_python_are_fd201_in_both_syntaxes() -> None:
    (diag,) = parse_flow("timeout " + "9" * 5000, "a.flow").diagnostics
    assert (diag.code, diag.line, diag.column, diag.path) == ("FD201", 1, 9, "/timeout")
    assert "has more than 4000 digits" in diag.message
    (twin,) = load_yaml("timeout: " + "9" * 5000, "a.yaml").diagnostics
    assert (twin.code, twin.line, twin.column, twin.message) == ("FD201", 1, 10, diag.message)


# --- the grammar ----------------------------------------------------------------------------------


def test_the_grammar_and_the_vocabulary_agree() -> None:
    grammar = _grammar_text()
    assert grammar == (ROOT / "grammar" / "flowdsl.lark").read_text(encoding="utf-8")
    parser = _parser()
    words = set(parser.keywords)
    assert {*OPTION_KEYS, *TOP_KEYS, *LLM_KEYS, "undo", "needs"} <= words
    assert words <= KEYWORDS
    terminals = dict(re.findall(r"^(WORD|NUMBER): /(.*)/$", grammar, re.M))
    assert terminals["WORD"].replace("\\/", "/") == WORD_RE.pattern
    assert terminals["NUMBER"] == NUMBER_RE.pattern


def test_fd108_is_a_catalogued_code() -> None:
    assert CODES["FD108"] == ("error", "text syntax error")


def test_ten_thousand_steps_parse_quickly() -> None:
    lines = ["flow big", "defaults retry 3 timeout 30s", ""]
    for i in range(10_000):
        if i % 4 == 0:
            lines.append(f"step s{i}")
        elif i % 4 == 1:
            lines.append(f'step s{i} undo u{i} timeout 10s when "${{ order.total > {i} }}"')
        elif i % 4 == 2:
            lines.append(
                f"step s{i} {{\n  retry {{attempts: 4, backoff: exponential, on: [Timeout]}}\n"
                f'  with {{order_id: "${{ order.id }}", n: {i}}}\n  output out_{i}\n}}'
            )
        else:
            lines.append(f"parallel p{i} {{\n  sequence q{i} {{ a{i} b{i} }}\n  c{i}\n}}")
    text = "\n".join(lines)
    _parser()  # build the tables outside the measurement
    start = time.process_time()
    doc = parse_flow(text)
    elapsed = time.process_time() - start
    assert len(doc.data["steps"]) == 10_000
    assert elapsed < 3.0, f"10,000 steps took {elapsed:.2f}s of CPU"


# --- properties ---------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from([
    "step", "llm", "wait", "sequence", "parallel", "for_each", "switch", "flow", "case", "default", "workers",
    "defaults", "timeout", "signal", "key", "for", "undo", "with", "needs", "retry", "on", "items", "a", "b.c", "10s",
    "3", "-1.5",
    '"s"', '"${ x }"', "{", "}", "[", "]", ",", ":", "\n", " ", "  ", "#c\n", "true", "null", '"', "\\", "@",
])  # fmt: skip


def _check_never_raises(text: str) -> None:
    doc = parse_flow(text, "g.flow")
    if doc.data is None:
        assert doc.diagnostics
        for d in doc.diagnostics:
            assert d.code in {"FD104", "FD107", "FD108", "FD109", "FD110"}, d
            assert d.line is not None and d.file == "g.flow"
    else:
        assert doc.diagnostics == [] and doc.data["flowdsl"] == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_raises(text: str) -> None:
    _check_never_raises(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=60).map(" ".join))
def test_random_token_soup_never_raises(text: str) -> None:
    _check_never_raises(text)


#: what a spec's strings can hold: no control characters (FD110 in both syntaxes, written raw or escaped), no
#: bidirectional controls or marks (FD111)
_BIDI = [*"\u061c\u200e\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=[
    *map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), *_BIDI]), max_size=10)  # fmt: skip
_printable = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters=_BIDI),
                     max_size=10)
_ID_START = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_id_start, _id_rest = st.sampled_from(_ID_START), st.text(_ID_START + "0123456789", max_size=6)


@st.composite
def _identifiers(draw: st.DrawFn) -> str:
    """A word of r"[A-Za-z_][A-Za-z0-9_]{0,6}": the words ``st.from_regex`` of it draws, a third of the time (a
    generated spec draws dozens)."""
    return draw(_id_start) + draw(_id_rest)


_ids = _identifiers()
_names = st.one_of(_ids, st.sampled_from(sorted(KEYWORDS)), st.builds("{}.{}".format, _ids, _ids))
_step_names = _names.filter(lambda n: n not in ("sequence", "parallel", "for_each", "switch", "flow", "wait"))
_durations = st.one_of(st.sampled_from(["10s", "200ms", "1m30s", "5m"]), st.integers(1, 100),
                       st.floats(0.1, 100, allow_nan=False))  # fmt: skip


def _specs(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Spec data in the shapes the schema allows (not necessarily meaningful), strings from ``text``."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
        st.sampled_from(["10s", "1.5", "true", "01", "-3", "a b", "${ x }", "yes", "on", "True", "NULL", "~", "",
                         "1e3", "0o17", "0x1F", "1.", ".5", "+5", "1_000", "1:30", "0777", "1e999", ".inf",
                         "tab\there", "two\nlines"]),
    )
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.one_of(text, _ids), c, max_size=3)),
                          max_leaves=8)  # fmt: skip
    mappings = st.dictionaries(st.one_of(text, _ids), values, max_size=3)
    retry = st.one_of(st.integers(1, 9), st.fixed_dictionaries({}, optional={
        "attempts": st.integers(1, 9), "backoff": st.sampled_from(["constant", "linear", "exponential"]),
        "initial": _durations, "max": _durations, "multiplier": st.floats(1.1, 4),
        "jitter": st.sampled_from(["none", "full", "equal"]), "on": st.lists(_ids, max_size=2, unique=True),
        "not_on": st.lists(_ids, max_size=2, unique=True)}))  # fmt: skip
    compensate = st.one_of(
        _names,
        st.fixed_dictionaries({"worker": _names}, optional={"with": mappings, "retry": retry, "timeout": _durations}),
    )
    field = st.one_of(
        st.sampled_from(["str", "int", "list[str]"]),
        st.fixed_dictionaries(
            {}, optional={"type": st.just("float"), "desc": text, "enum": st.lists(scalars, min_size=1, max_size=2)}
        ),
    )
    fields = st.dictionaries(_ids, field, min_size=1, max_size=2)
    llm = st.fixed_dictionaries({"signature": st.one_of(text, st.fixed_dictionaries(
        {"inputs": fields, "outputs": fields}))}, optional={
        "instructions": text, "module": st.sampled_from(["predict", "chain_of_thought"]), "lm": text,
        "demos": st.lists(st.dictionaries(_ids, values, max_size=2), max_size=2)})  # fmt: skip
    options = st.fixed_dictionaries({}, optional={
        "worker": _names, "compensate": compensate, "with": mappings,
        "output": st.one_of(_ids, st.dictionaries(_ids, text, min_size=1, max_size=2)), "when": text,
        "fail_when": text, "needs": st.lists(_ids, max_size=3, unique=True), "retry": retry,
        "timeout": _durations, "fallback": _names, "description": text})  # fmt: skip
    steps = st.one_of(
        _names,
        st.builds(lambda n: {n: None}, _step_names),
        st.builds(lambda n, o: {n: o}, _step_names, options),
        st.builds(lambda n, o, m: {n: {**o, "llm": m}}, _step_names, options, llm),
    )
    common = {"when": text, "needs": st.lists(_ids, max_size=2, unique=True), "description": text}

    def groups(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        nodes = st.lists(children, min_size=1, max_size=3)

        def group(keyword: str, fixed: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[Any]:
            return st.builds(
                lambda i, d: {keyword: i, **d}, _ids, st.fixed_dictionaries(fixed, optional={**common, **optional})
            )

        return st.one_of(
            group("sequence", {"steps": nodes}, {}),
            group("parallel", {"branches": nodes}, {}),
            group("for_each", {"items": text, "steps": nodes},
                  {"as": _ids, "concurrency": st.integers(1, 9), "output": _ids}),
            group("switch", {"on": text, "cases": st.dictionaries(st.one_of(text, _ids), nodes, min_size=1,
                                                                  max_size=2)}, {"default": nodes}),
            group("flow", {"path": text.filter(bool)}, {"with": mappings, "output": _ids, "timeout": _durations}),
        )  # fmt: skip

    waits = st.builds(lambda i, d: {"wait": i, **d}, _ids, st.fixed_dictionaries({}, optional={
        **common, "signal": _ids, "key": text, "timeout": _durations, "for": _durations,
        "output": st.one_of(_ids, st.dictionaries(_ids, text, min_size=1, max_size=2)),
        "on_failure": st.sampled_from(["continue", "compensate"])}))  # fmt: skip

    return st.fixed_dictionaries(
        {"flowdsl": st.just(1), "name": _ids, "steps": st.lists(st.recursive(st.one_of(steps, waits), groups,
                                                                             max_leaves=8), min_size=1, max_size=4)},
        optional={
            "version": st.one_of(text, st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
            "description": text, "workers": st.lists(_names, unique=True, max_size=3),
            "input": st.one_of(st.booleans(), mappings), "timeout": _durations,
            "defaults": st.fixed_dictionaries({}, optional={
                "retry": retry, "timeout": _durations,
                "compensate": st.fixed_dictionaries({}, optional={"retry": retry, "timeout": _durations}),
                "llm": st.fixed_dictionaries({}, optional={"lm": text.filter(bool),
                                                           "module": st.just("predict")})}),
        },
    )  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs(_text))
def test_generated_specs_round_trip_through_the_text_syntax(data: dict[str, Any]) -> None:
    text = to_flow(data)
    doc = parse_flow(text, "gen.flow")
    assert doc.diagnostics == [], (text, [d.format() for d in doc.diagnostics])
    assert doc.data == data, text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs(_text))
def test_generated_specs_round_trip_through_yaml(data: dict[str, Any]) -> None:
    text = to_yaml(data)
    assert yaml.safe_load(text) == data  # a YAML 1.1 reader too
    doc = load_yaml(text, "gen.yaml")
    assert doc.diagnostics == [] and doc.data == data, text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs(_printable))
def test_generated_specs_round_trip_through_the_yaml_loader(data: dict[str, Any]) -> None:
    """flowdsl's own loader refuses control characters anywhere, so the text here has none."""
    assert from_yaml(to_yaml(data)) == data


# --- values: the rule the YAML loader applies (docs/language.md, "How values are read") -------------


def test_bare_values_read_as_the_yaml_loader_reads_them() -> None:
    text = "{a: yes, b: 0777, c: 1_000, d: 0x1F, e: 0o17, f: 1e3, g: True, h: NULL, i: FALSE, j: 1., k: 10s}"
    flow = steps(f"step s with {text}")[0]["s"]["with"]
    assert flow == from_yaml(f"flowdsl: 1\nname: t\nsteps: [{{s: {{with: {text}}}}}]\n")["steps"][0]["s"]["with"]
    assert flow == {"a": "yes", "b": "0777", "c": "1_000", "d": 31, "e": 15, "f": 1000.0, "g": True, "h": None,
                    "i": False, "j": 1.0, "k": "10s"}


def test_names_are_read_as_written() -> None:
    """Where the grammar takes only a name, a word is that name: `step null` runs the worker null."""
    assert read("flow True\nworkers NULL, x\nstep null\nstep TRUE timeout 1s\nsequence False { null }") == {
        "flowdsl": 1, "name": "True", "workers": ["NULL", "x"],
        "steps": ["null", {"TRUE": {"timeout": "1s"}}, {"sequence": "False", "steps": ["null"]}]}  # fmt: skip


@pytest.mark.parametrize(("line", "word", "hint"), [
    ("as line", "as", True), ("description \"x\"", "description", True), ("needs a", "needs", True),
    ("a timeout", "timeout", True), ("undo refund", "undo", True), ("workers", "workers", False),
    ("case", "case", False),
])
def test_a_keyword_in_a_line_of_step_names_is_refused(line: str, word: str, hint: bool) -> None:
    """A group's options written inside its body were read as steps (`as line` in a for_each's body: steps `as`
    and `line`), valid with --no-import; a step named by a keyword is written `step as`, as the writer does."""
    doc = parse_flow(f"flow t\nfor_each f items [1] {{\n  {line}\n  charge\n}}\n", "t.flow")
    [diag] = doc.diagnostics
    assert diag.code == "FD108" and diag.line == 3 and diag.path.startswith("/steps/0/steps/")
    assert f"'{word}' is a keyword, not a step name here" in diag.message
    assert f"written `step {word}`" in diag.message
    assert ("a group's options go on its own line, before its '{'" in diag.message) == hint
    assert read(f"flow t\nsequence s {{\n  step {word}\n}}\n")["steps"][0]["steps"] == [word]


@pytest.mark.parametrize("value", ["True", "NULL", "false", "0x1F", "0o17", "1e3", "1.", "1e999", "12"])
def test_strings_that_would_read_as_values_are_quoted_by_the_writers(value: str) -> None:
    data = {"flowdsl": 1, "name": "t", "steps": [{"s": {"with": {"v": value}, "worker": value}}, value]}
    flow = to_flow(data)
    assert f'"{value}"' in flow and parse_flow(flow).data == data, flow
    text = to_yaml(data)
    assert load_yaml(text).data == data and yaml.safe_load(text) == data, text


@pytest.mark.parametrize("value", ["yes", "0777", "1_000", "10s", "x"])
def test_strings_that_read_as_themselves_stay_bare(value: str) -> None:
    data = {"flowdsl": 1, "name": "t", "steps": [{"s": {"with": {"v": value}}}]}
    assert f"with {{v: {value}}}" in to_flow(data)
    assert parse_flow(to_flow(data)).data == data


def test_a_number_that_is_not_finite_is_set_aside_with_its_option() -> None:
    doc = parse_flow("flow t\nstep a timeout 1e999 with {x: 1}\nstep b retry {attempts: 2, initial: -1e999}", "t.flow")
    assert [(d.code, d.line, d.column, d.path) for d in doc.diagnostics] == [
        ("FD201", 2, 16, "/steps/0/a/timeout"), ("FD201", 3, 37, "/steps/1/b/retry/initial")]
    assert doc.data == {"flowdsl": 1, "name": "t", "steps": [{"a": {"with": {"x": 1}}}, {"b": {}}]}
    yaml_twin = load_yaml("flowdsl: 1\nname: t\nsteps:\n  - a: {timeout: 1e999, with: {x: 1}}\n"
                          "  - b: {retry: {attempts: 2, initial: -1e999}}\n", "t.yaml")
    assert yaml_twin.data == doc.data
    assert [d.message for d in yaml_twin.diagnostics] == [d.message for d in doc.diagnostics]
    # outside an option that can be set aside, nothing is read
    assert parse_flow("flow t\nstep a\ninput {maximum: 1e999}").data is None


@pytest.mark.parametrize(("flow", "yaml", "kept"), [
    # a step whose name is an option's: its output map is no option that can be set aside (nothing is read)
    ("step timeout worker a output {x: 1e999}\nstep b", "  - timeout: {worker: a, output: {x: 1e999}}\n  - b\n",
     None),
    ("step when output {x: -1e999}", "  - when: {output: {x: -1e999}}\n", None),
    # a key named like an option inside input: or with: is the user's; with: is set aside whole
    ("step a\ninput {properties: {retry: {maximum: 1e999}}}", "  - a\ninput: {properties: {retry: {maximum: 1e999}}}\n",
     None),
    ("step a with {timeout: 1e999, y: 2} retry 2", "  - a: {with: {timeout: 1e999, y: 2}, retry: 2}\n",
     [{"a": {"retry": 2}}]),
    ("step a undo {worker: u, with: {retry: 1e999}}", "  - a: {compensate: {worker: u, with: {retry: 1e999}}}\n",
     [{"a": {"compensate": {"worker": "u"}}}]),
    # a group or case named like an option: the option inside it is what is set aside
    ('sequence timeout {\n  step a timeout 1e999 retry 2\n}', "  - sequence: timeout\n    steps:\n"
     "      - a: {timeout: 1e999, retry: 2}\n", [{"sequence": "timeout", "steps": [{"a": {"retry": 2}}]}]),
    ('switch s on "${ x }" {\n  case retry { step a retry {initial: 1e999} }\n}',
     '  - switch: s\n    "on": "${ x }"\n    cases: {retry: [{a: {retry: {initial: 1e999}}}]}\n',
     [{"switch": "s", "on": "${ x }", "cases": {"retry": [{"a": {}}]}}]),
])  # fmt: skip
def test_a_value_is_set_aside_only_with_an_option_where_options_are(flow: str, yaml: str, kept: Any) -> None:
    """The option around a bad value is found by the document's structure, not by the names along its path."""
    doc = parse_flow("flow t\n" + flow + "\n", "t.flow")
    twin = load_yaml("flowdsl: 1\nname: t\nsteps:\n" + yaml, "t.yaml")
    assert [d.code for d in doc.diagnostics] == [d.code for d in twin.diagnostics] == ["FD201"]
    if kept is None:
        assert doc.data is None and twin.data is None
    else:
        assert doc.data is not None and twin.data is not None
        assert doc.data["steps"] == twin.data["steps"] == kept


def test_an_escaped_lone_surrogate_is_refused_in_names_keys_labels_and_values() -> None:
    for text in ('step "a\\ud800b"', 'flow "\\udfff"', 'step a with {"\\ud800": 1}', 'step a with {x: "\\ud800"}',
                 'switch s on "${ x }" {\n  case "\\udc00" { c }\n}', 'llm a "\\ud800 -> b"'):
        (diag,) = parse_flow(text).diagnostics
        assert diag.code == "FD110" and "lone surrogate U+D" in diag.message, text
        assert parse_flow(text).data is None
    assert parse_flow('flow t\nstep a with {x: "\\ud83d\\ude00"}').data["steps"] == [{"a": {"with": {"x": "😀"}}}]


@pytest.mark.parametrize("text", ['step "a\\u0007b"', 'step "a\\tb" timeout 1s', 'switch s on "${ x }" {\n'
                                  '  case "a\\nb" { c }\n}', 'flow "\\u0085t"'])
def test_escaped_control_characters_are_refused_in_names_keys_and_labels(text: str) -> None:
    (diag,) = parse_flow(text).diagnostics
    assert diag.code == "FD110" and "control character U+" in diag.message


@pytest.mark.parametrize(("char", "said"), [("\ufffe", "noncharacter U+FFFE"), ("\uffff", "noncharacter U+FFFF"),
                                             ("\x1b", "control character U+001B")])
def test_a_character_a_spec_may_not_hold_is_named_for_what_it_is(char: str, said: str) -> None:
    """U+FFFE was called a control character; both front ends share the check."""
    for text, name in ((f'flow t\nstep a description "x{char}"\n', "t.flow"),
                       (f'flowdsl: 1\nname: t\nsteps: [a, "x{char}"]\n', "t.yaml")):
        [diag] = (parse_flow(text, name) if name.endswith(".flow") else load_yaml(text, name)).diagnostics
        assert diag.code == "FD110" and diag.message == f"{said} is not allowed in a spec"
