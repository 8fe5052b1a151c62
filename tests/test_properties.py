"""Property tests: the front end never raises anything but a diagnostic, and plans are deterministic.

The specs are drawn by strategies written here from specs/flowdsl.schema.json,
not by hypothesis-jsonschema: it cannot resolve the schema's recursive
``$ref``s (nodes hold nodes), and version 0.23.1 fails against the installed
hypothesis (``'many' object has no attribute 'more'``). The strategies draw
valid-ish data (every kind of node and option, durations, retry policies,
expressions from a small alphabet) with a share of slightly broken values
(bad ids, bad durations, unknown keys, wrong types, broken expressions), which
reaches the schema, model, checks and compiler far more often than random data
would. Example counts are bounded so the file runs in well under 30 s.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowdsl.api import compile_spec, compile_text, load_text, plan_bytes
from flowdsl.diagnostics import CODES, Diagnostic, SpecError
from flowdsl.runtime.plancheck import plan_problem

SETTINGS = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
#: for properties that compile a spec several times
FEW = settings(SETTINGS, max_examples=40)
#: for inputs that cost a millisecond or less
MANY = settings(SETTINGS, max_examples=500)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),  # the strategies' own repr, computed once
    # jsonata-python raises the recursion limit to 10,000 when it is imported (by the first compile)
    pytest.mark.filterwarnings("ignore:The recursion limit will not be reset"),
]


def check_diagnostics(diags: list[Diagnostic], filename: str) -> None:
    assert diags, "an error without any diagnostic"
    for d in diags:
        assert d.code in CODES and CODES[d.code][0] == d.severity, d
        assert d.message, d
        assert d.file == filename or d.file is None or d.file.endswith((".yaml", ".yml", ".flow")), d
        assert d.line is None or d.line >= 1, d
        assert d.column is None or d.column >= 1, d


def front_end(text: str, filename: str = "spec.yaml") -> dict[str, Any] | None:
    """Load and compile ``text``: the plan, or None after checking the diagnostics. Anything else raises."""
    doc = load_text(text, filename)
    if doc.data is None:
        check_diagnostics(doc.diagnostics, filename)
    try:
        plan = compile_text(text, filename=filename)
    except SpecError as exc:
        check_diagnostics(exc.diagnostics, filename)
        return None
    problem = plan_problem(plan)  # what the compiler makes has the shape specs/plan.schema.json states
    assert problem is None, problem
    return plan


def dump(data: Any) -> str:
    """YAML text of ``data`` in its own key order, with every string that flowdsl's loader (YAML 1.2 core)
    would read as something else quoted, as ``flowdsl convert`` writes it (``0E0`` is a number there)."""
    from flowdsl.convert import _dumper

    return yaml.dump(data, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=100)


# --- strategies: pieces ---------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=[  # (bidi: FD111)
    *"\u061c\u200e\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]), max_size=12)
IDS = st.sampled_from(["a", "b", "c", "check_stock", "pay", "refund", "ship", "notify", "_x", "S1", "a" * 64])
BAD_IDS = st.sampled_from(["1a", "a-b", "a b", "", "é", "a.b", "a" * 65, "$x", "a/b", "~", "a\tb", "a\n"])
WORKERS = st.one_of(IDS, st.builds(lambda a, b: f"{a}.{b}", IDS, IDS))
DURATIONS = st.sampled_from(["250ms", "10s", "5m", "2h", "1m30s", "1.5s", 30, 0.25, "2s500ms"])
BAD_DURATIONS = st.sampled_from(["0s", "-1s", "soon", "", "5", "1e400", "10x", 0, -3, "31d", "999999h", True, [],
                                 "30 s", "1h1h", "1s30m", "0.4ms"])
EXPRESSIONS = st.sampled_from([
    "${ order.id }", "${ order.total > 10 }", "${ $not(order.notify = false) }", "${ status = 'failed' }",
    "${ $steps.a.id }", "${ $input.order }", "${ $run.id }", "${ item.qty * 2 }", "${ {'k': order.id} }",
    "${ [1, 2, 3] }", "${ true }", "${ false }", "Order ${ order.id } shipped", "$${ literal }", "plain text",
    "${ $now() }", "${ $random() }", "${ $undefined }", "${ $nofunc(1) }", "${ ( }", "${", "${ }", "${ 'unclosed }",
    "${ $x := 1; $x + 1 }", "${ function($v) { $v + 1 }(2) }", "${ $steps.zz }", "${ $context.a }",
    "${ $item }", "${ $index }", "${ " + "(" * 30 + "1" + ")" * 30 + " }", "${ $eval('1') }",
])
ERROR_TYPES = st.sampled_from(["Timeout", "PaymentGatewayTimeout", "errors.Declined", "not valid", "StepTimeout"])
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12))
ANY_JSON = st.recursive(JSON_LEAVES, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)), max_leaves=8)


def sometimes(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good`` (five draws in six), sometimes ``bad``; hypothesis shrinks toward ``good``."""
    return st.one_of(good, good, good, good, good, bad)


def options_strategy(broken: bool) -> st.SearchStrategy[dict[str, Any]]:
    text = st.text(max_size=15) if broken else TEXT

    def v(good: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return sometimes(good, st.one_of(wrong, ANY_JSON)) if broken else good

    retry = st.one_of(
        st.integers(1, 6),
        st.fixed_dictionaries({}, optional={
            "attempts": v(st.integers(1, 6), st.integers(-2, 0)),
            "backoff": v(st.sampled_from(["constant", "linear", "exponential"]), st.just("fibonacci")),
            "initial": v(DURATIONS, BAD_DURATIONS), "max": v(DURATIONS, BAD_DURATIONS),
            "multiplier": v(st.sampled_from([1.5, 2, 3]), st.sampled_from([1, 0.5])),
            "jitter": v(st.sampled_from(["none", "full", "equal"]), st.just("some")),
            "on": st.lists(ERROR_TYPES, max_size=2, unique=True),
            "not_on": st.lists(ERROR_TYPES, max_size=2, unique=True),
        }))
    compensate = st.one_of(WORKERS, st.fixed_dictionaries({"worker": WORKERS}, optional={
        "with": st.dictionaries(IDS, EXPRESSIONS, max_size=2), "timeout": v(DURATIONS, BAD_DURATIONS),
        "retry": retry}))
    llm = st.fixed_dictionaries({"signature": st.sampled_from([
        "question -> answer", "a, b: int -> c: list[str]", "x -> y: float", "-> nothing", "a -> b: tuple",
        {"inputs": {"q": "str"}, "outputs": {"a": {"type": "int", "desc": "n"}}},
        {"inputs": {"q": "str"}, "outputs": {"tone": {"enum": ["formal", "friendly"]}}},
    ])}, optional={"instructions": text, "module": st.sampled_from(["predict", "chain_of_thought"]),
                   "demos": st.lists(st.dictionaries(IDS, JSON_LEAVES, max_size=2), max_size=2)})
    optional: dict[str, st.SearchStrategy[Any]] = {
        "compensate": compensate,
        "with": st.dictionaries(IDS, st.one_of(EXPRESSIONS, JSON_LEAVES), max_size=3),
        "output": st.one_of(IDS, st.dictionaries(IDS, EXPRESSIONS, min_size=1, max_size=2)),
        "when": EXPRESSIONS, "fail_when": EXPRESSIONS,
        "needs": st.lists(IDS, max_size=2, unique=True),
        "retry": v(retry, st.just(0)), "timeout": v(DURATIONS, BAD_DURATIONS),
        "description": text,
    }
    if broken:
        optional.update({"llm": llm, "fallback": WORKERS, "worker": WORKERS, "unknown_option": ANY_JSON,
                         "retyr": st.integers(1, 3)})
    return st.fixed_dictionaries({}, optional=optional)


def nodes_strategy(broken: bool) -> st.SearchStrategy[list[Any]]:
    """Lists of nodes of every kind, nested a few levels (ids may repeat: that is FD301, fine here)."""
    ident = sometimes(IDS, BAD_IDS) if broken else IDS
    text = st.text(max_size=8) if broken else TEXT
    step = st.one_of(WORKERS, st.builds(lambda k, o: {k: o}, WORKERS, st.one_of(st.none(), options_strategy(broken))))
    if broken:
        step = st.one_of(step, ANY_JSON, st.builds(lambda a, b: {a: None, b: {"timeout": "1s"}}, IDS, IDS))

    def groups(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        kid_list = st.lists(kids, min_size=0 if broken else 1, max_size=3)
        common = {"when": EXPRESSIONS, "needs": st.lists(IDS, max_size=1), "description": text}
        return st.one_of(
            st.fixed_dictionaries({"sequence": ident, "steps": kid_list}, optional=common),
            st.fixed_dictionaries({"parallel": ident, "branches": kid_list}, optional=common),
            st.fixed_dictionaries({"for_each": ident, "items": EXPRESSIONS, "steps": kid_list},
                                  optional={**common, "as": ident, "concurrency": st.integers(0, 5), "output": ident}),
            st.fixed_dictionaries({"switch": ident, "on": EXPRESSIONS,
                                   "cases": st.dictionaries(st.sampled_from(["x", "1", "true", "express", ""]),
                                                            kid_list, max_size=2)},
                                  optional={**common, "default": kid_list}),
        ) if not broken else st.one_of(
            st.fixed_dictionaries({"sequence": ident, "steps": kid_list}, optional=common),
            st.fixed_dictionaries({"flow": ident, "path": st.sampled_from(["missing.yaml", "", "../x.flow"])},
                                  optional={"with": st.dictionaries(IDS, EXPRESSIONS, max_size=2), "output": ident,
                                            "timeout": sometimes(DURATIONS, BAD_DURATIONS)}),
            st.dictionaries(st.sampled_from(["sequence", "parallel", "steps", "branches", "cases", "on", "items"]),
                            st.one_of(ident, kid_list, EXPRESSIONS), max_size=3),
        )

    return st.lists(st.recursive(step, groups, max_leaves=8), min_size=0 if broken else 1, max_size=4)


def top_strategy(broken: bool) -> st.SearchStrategy[dict[str, Any]]:
    def v(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return sometimes(good, bad) if broken else good

    return st.fixed_dictionaries({}, optional={
        "version": st.one_of(TEXT, st.integers(0, 9)),
        "description": v(TEXT, st.text(max_size=20)),
        "workers": st.lists(WORKERS, max_size=2, unique=not broken),
        "input": v(st.just({"type": "object", "required": ["order"]}),
                   st.one_of(st.just({"type": "nonsense"}), st.booleans(), ANY_JSON)),
        "timeout": v(DURATIONS, BAD_DURATIONS),
        "defaults": st.fixed_dictionaries({}, optional={
            "retry": st.one_of(st.integers(1, 3), st.just({"attempts": 2, "backoff": "linear"})),
            "timeout": v(DURATIONS, BAD_DURATIONS),
            "compensate": st.just({"retry": {"attempts": 3}, "timeout": "5s"}),
            "llm": st.just({"lm": "openai/gpt-4o-mini", "module": "predict"}),
        }),
        **({"stpes": st.just([])} if broken else {}),
    })


CLEAN = (nodes_strategy(broken=False), top_strategy(broken=False))
BROKEN = (nodes_strategy(broken=True), top_strategy(broken=True))
NAMES = sometimes(IDS, BAD_IDS)
VERSIONS = st.sampled_from([1, 1, 1, 2, "1", None])
DROPPED = st.lists(st.sampled_from(["flowdsl", "name", "steps"]), max_size=1)


@st.composite
def broken_specs(draw: st.DrawFn) -> Any:
    """Spec-shaped data: half of it schema-valid (ids that repeat, needs that point nowhere, broken expressions:
    work for the checks and the compiler), half with mistakes at every level (work for the loader and schema)."""
    broken = draw(st.booleans())
    nodes, top = BROKEN if broken else CLEAN
    doc: dict[str, Any] = {"flowdsl": draw(VERSIONS) if broken else 1, "name": draw(NAMES if broken else IDS),
                           "steps": draw(nodes)}
    doc.update(draw(top))
    if broken:
        for key in draw(DROPPED):
            doc.pop(key, None)
        if not draw(st.integers(0, 9)):
            return draw(ANY_JSON)
    return doc


# --- strategies: valid specs -------------------------------------------------------


VALID_EXPRESSIONS = st.sampled_from([
    "${ order.id }", "${ order.total > 10 }", "${ $not(order.notify = false) }", "${ $input.order.id }",
    "${ {'id': order.id, 'n': 1} }", "${ order.items }"])
VALID_RETRY = st.one_of(st.integers(1, 5), st.just({
    "attempts": 3, "backoff": "exponential", "initial": "100ms", "max": "2s", "jitter": "full", "on": ["Timeout"],
    "not_on": ["Declined"]}))
#: step options; "$ID" in a value is replaced by the step's id
VALID_OPTIONS = st.fixed_dictionaries({}, optional={
    "compensate": st.sampled_from(["undo_$ID",
                                   {"worker": "svc.undo_$ID", "with": {"ref": "${ ref }"}, "timeout": "5s"}]),
    "with": st.dictionaries(st.sampled_from(["a", "b", "order_id"]),
                            st.one_of(VALID_EXPRESSIONS, st.just("Order ${ order.id } done"), st.integers(0, 9)),
                            max_size=2),
    "when": VALID_EXPRESSIONS, "fail_when": st.just("${ status = 'failed' }"), "retry": VALID_RETRY,
    "timeout": DURATIONS, "description": TEXT, "output": st.just("out_$ID"),
})
VALID_TOP = st.fixed_dictionaries({}, optional={
    "version": st.just("1.0"), "description": TEXT, "workers": st.just(["svc"]),
    "input": st.just({"type": "object", "required": ["order"]}), "timeout": DURATIONS,
    "defaults": st.just({"retry": {"attempts": 2, "initial": "100ms", "max": "1s"}, "timeout": "30s",
                         "compensate": {"retry": {"attempts": 4}, "timeout": "10s"}}),
})
#: a tree of node kinds: "step", "named" (an id with an explicit worker) or (group kind, children)
KINDS = st.recursive(
    st.sampled_from(["step", "step", "named"]),
    lambda kids: st.tuples(st.sampled_from(["sequence", "parallel", "for_each", "switch"]),
                           st.lists(kids, min_size=1, max_size=3)),
    max_leaves=10)


def _with_id(value: Any, sid: str) -> Any:
    if isinstance(value, str):
        return value.replace("$ID", sid)
    if isinstance(value, dict):
        return {k: _with_id(v, sid) for k, v in value.items()}
    return value


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs that must compile: unique ids, distinct output names, well-formed options and expressions."""
    counter = iter(range(1, 10**6))

    def node(kind: Any) -> Any:
        if kind in ("step", "named"):
            sid = f"{kind[0]}{next(counter)}"
            opts = _with_id(draw(VALID_OPTIONS), sid)
            if kind == "named":
                return {sid: {"worker": "svc.shared", **opts}}
            return draw(st.sampled_from([sid, f"svc.{sid}", {sid: opts or None}]))
        group, kids = kind
        gid = f"{group[0]}{next(counter)}"
        children = [node(k) for k in kids]
        if group == "sequence":
            return {"sequence": gid, "steps": children}
        if group == "parallel":
            return {"parallel": gid, "branches": children}
        if group == "for_each":
            return {"for_each": gid, "items": "${ order.items }", "as": "line", "concurrency": 2, "steps": children}
        return {"switch": gid, "on": "${ order.shipping }", "cases": {"express": children[:1],
                                                                      "standard": children[1:] or [f"x{gid}"]},
                "default": [f"d{gid}"]}

    def chain(nodes: list[Any]) -> list[Any]:
        """Some steps wait for the node before them with an explicit ``needs``."""
        for i in range(1, len(nodes)):
            prev, cur = nodes[i - 1], nodes[i]
            prev_id = prev.rsplit(".", 1)[-1] if isinstance(prev, str) else next(
                (prev[g] for g in ("sequence", "parallel", "for_each", "switch") if g in prev), next(iter(prev)))
            if isinstance(cur, dict) and len(cur) == 1 and draw(st.booleans()):
                ((key, opts),) = cur.items()
                nodes[i] = {key: {**(opts or {}), "needs": [prev_id]}}
        return nodes

    top = draw(st.lists(KINDS, min_size=1, max_size=4))
    spec: dict[str, Any] = {"flowdsl": 1, "name": "generated", "steps": chain([node(k) for k in top])}
    spec.update(draw(VALID_TOP))
    return spec


def shuffled(data: Any, rng: random.Random) -> Any:
    """The same data with every mapping's keys in another order (lists keep theirs)."""
    if isinstance(data, dict):
        items = list(data.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(data, list):
        return [shuffled(v, rng) for v in data]
    return data


# --- properties ----------------------------------------------------------------------


@SETTINGS
@given(broken_specs())
@example({"flowdsl": 1, "name": "a", "steps": [{"a": {"when": "${"}}]})
@example({"flowdsl": 1, "name": "a", "steps": [{"a": {"with": {"x": "${"}}}]})
@example({"flowdsl": 1, "name": "a", "steps": [{"a": {"output": {"k": "${ ( }"}}}]})
@example({"flowdsl": 1, "name": "a", "steps": [{"for_each": "f", "items": "${", "steps": ["b"]}]})
@example({"flowdsl": 1, "name": "a", "steps": [{"switch": "w", "on": "${", "cases": {"x": ["b"]}}]})
def test_generated_specs_give_plans_or_diagnostics(data: Any) -> None:
    front_end(dump(data))


@MANY
@given(st.binary(max_size=300))
@example(b"\xff\xfe\x00")
@example(b"flowdsl: 1\nname: a\nsteps: [a]\n\x00")
@example(b"\xef\xbb\xbfflowdsl: 1\nname: a\nsteps: [a]\n")
def test_random_bytes_give_diagnostics(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("spec.yaml", "spec.flow"):
            path = Path(tmp) / name
            path.write_bytes(raw)
            result = compile_spec(str(path))
            if result.plan is None:
                check_diagnostics(result.diagnostics, str(path))


YAML_ALPHABET = st.sampled_from([
    *"abcxyz019 :-,[]{}&*!|>'\"#%@`?~\\\n\t.$",
    "flowdsl: 1\n", "name: a\n", "steps:\n", "  - ", "- ", ": ", "${ ", " }", "&a ", "*a", "!!str ", "!!python/",
    "---\n", "...\n", "<<: ", "sequence: ", "parallel: ", "branches:", "for_each: ", "items: ", "switch: ",
    "cases:", "compensate: ", "retry: ", "timeout: ", "needs: [", "when: ", "with: {", "    ", "\r\n", "é",
])
FLOW_ALPHABET = st.sampled_from([
    *"abc019 {}[]:,\"'\n.$-",
    "flow a\n", "step ", "llm ", "sequence ", "parallel ", "for_each ", "switch ", "case ", "default ", "undo ",
    "with ", "when ", "retry ", "timeout ", "needs ", "workers ", "defaults ", "output ", "on ", "items ",
    '"${ x }"', '{"k": 1}', " {\n", "}\n", "true ", "null ", "1.5 ", "10s ",
])


@MANY
@given(st.lists(YAML_ALPHABET, max_size=60).map("".join))
@example("flowdsl: 1\nname: a\nsteps:\n  - a\n")
@example("&a [*a]")
@example("- " * 200 + "x")
def test_yaml_like_text_gives_plans_or_diagnostics(text: str) -> None:
    front_end(text)


@MANY
@given(st.lists(FLOW_ALPHABET, max_size=50).map("".join))
@example("flow a\nstep b\n")
@example("flow a\n" + "sequence s {\n" * 120)
def test_flow_like_text_gives_plans_or_diagnostics(text: str) -> None:
    front_end(text, "spec.flow")


MUTATIONS = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]),
                                st.one_of(YAML_ALPHABET, FLOW_ALPHABET)), min_size=1, max_size=4)


def mutate(text: str, edits: list[tuple[int, str, str]]) -> str:
    """``text`` with a few small edits: pieces inserted, spans deleted or overwritten."""
    for pos, op, piece in edits:
        i = pos % (len(text) + 1)
        if op == "insert":
            text = text[:i] + piece + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + len(piece):]
        else:
            text = text[:i] + piece + text[i + len(piece):]
    return text


@SETTINGS
@given(valid_specs(), MUTATIONS)
def test_slightly_broken_yaml_gives_plans_or_diagnostics(spec: dict[str, Any], edits: Any) -> None:
    front_end(mutate(dump(spec), edits))


@SETTINGS
@given(valid_specs(), MUTATIONS)
def test_slightly_broken_flow_text_gives_plans_or_diagnostics(spec: dict[str, Any], edits: Any) -> None:
    from flowdsl import textsyntax

    front_end(mutate(textsyntax.to_flow(spec), edits), "spec.flow")


@MANY
@given(st.text(max_size=200))
def test_random_text_gives_diagnostics(text: str) -> None:
    front_end(text)
    front_end(text, "spec.flow")


@FEW
@given(valid_specs(), st.randoms(use_true_random=False))
def test_valid_specs_compile_to_the_same_bytes_twice_and_reordered(spec: dict[str, Any], rng: random.Random) -> None:
    text = dump(spec)
    try:
        first = plan_bytes(compile_text(text))
    except SpecError as exc:
        pytest.fail("a valid generated spec was rejected:\n" + "\n".join(d.format() for d in exc.diagnostics)
                    + "\n\n" + text)
    assert plan_bytes(compile_text(text)) == first
    reordered = dump(shuffled(spec, rng))
    assert plan_bytes(compile_text(reordered)) == first, "reordering mappings changed the plan:\n" + reordered


@FEW
@given(valid_specs())
def test_valid_specs_compile_the_same_from_the_text_syntax(spec: dict[str, Any]) -> None:
    from flowdsl import textsyntax

    yaml_plan = plan_bytes(compile_text(dump(spec)))
    flow_text = textsyntax.to_flow(spec)
    assert plan_bytes(compile_text(flow_text, filename="spec.flow")) == yaml_plan, flow_text
