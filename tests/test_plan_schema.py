"""specs/plan.schema.json states the shape of what the compiler makes; plancheck holds plans to it.

Every golden plan (the conformance cases, the examples) has that shape; the property tests
(tests/test_properties.py) check it of every plan a generated spec compiles to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from flowdsl import compiler
from flowdsl.runtime.plancheck import PLAN_VERSION, plan_problem, plan_schema

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PLANS = sorted([*ROOT.glob("specs/conformance/valid/*.plan.json"), *ROOT.glob("examples/*/flow.plan.json")])


def test_the_runtime_reads_the_plan_version_the_compiler_writes() -> None:
    """Two constants (the runtime does not import the compiler): a bump of one alone would have every
    runtime refuse every new plan, or read a new layout as the old one."""
    assert PLAN_VERSION == compiler.PLAN_VERSION
    assert plan_schema()["properties"]["plan_version"] == {"enum": list(range(1, PLAN_VERSION + 1))}


def test_the_plan_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(plan_schema())
    assert plan_schema() == json.loads((ROOT / "specs" / "plan.schema.json").read_text())


@pytest.mark.parametrize("path", GOLDEN_PLANS, ids=[str(p.relative_to(ROOT)) for p in GOLDEN_PLANS])
def test_every_golden_plan_has_the_schema_s_shape(path: Path) -> None:
    assert plan_problem(json.loads(path.read_text())) is None


def test_every_node_kind_has_a_golden_plan() -> None:
    """So the test above covers each kind's part of the schema."""
    kinds = {node["kind"] for path in GOLDEN_PLANS for node in json.loads(path.read_text())["nodes"].values()}
    assert kinds == set(plan_schema()["$defs"]["node"]["properties"]["kind"]["enum"])


@pytest.mark.parametrize(("case", "node", "change", "message"), [
    ("switch", "by_method", lambda n: n.update(cases=[{"match": "x"}]), "'children' is a required property"),
    ("switch", "by_method", lambda n: n.update(default=["nowhere"]), "names 'nowhere', which is not a key of 'nodes'"),
    ("for_each", None, lambda n: n.update(concurrency=0), "0 is less than the minimum of 1"),
    ("llm", None, lambda n: n["llm"].pop("signature"), "'signature' is a required property"),
    ("subflow", None, lambda n: n.update(path=3), "3 is not of type 'string'"),
    ("output", None, lambda n: n.update(output={"mode": "map", "map": {"k": "x000000000000"}}),
     "names the expression 'x000000000000', which is not in 'expressions'"),
])
def test_each_kind_s_fields_are_held_to_their_shape(case: str, node: str | None, change: object,
                                                      message: str) -> None:
    plan = json.loads((ROOT / "specs" / "conformance" / "valid" / f"{case}.plan.json").read_text())
    kind = {"for_each": "for_each", "subflow": "flow", "llm": "llm", "output": "task"}.get(case, case)
    key = node or next(k for k, n in plan["nodes"].items() if n["kind"] == kind)
    change(plan["nodes"][key])  # type: ignore[operator]
    problem = plan_problem(plan)
    assert problem is not None and problem.startswith(f"'nodes/{key}") and message in problem, problem


def _group_plan() -> dict[str, object]:
    """A compiled plan: a parallel group ``p`` of a sequence ``s`` (steps ``a``, ``b``) and a step ``c``."""
    from flowdsl import compile_text

    plan = compile_text("flowdsl: 1\nname: t\nsteps:\n  - parallel: p\n    branches:\n      - sequence: s\n"
                        "        steps: [a, b]\n      - c\n")
    return json.loads(json.dumps(plan))


def _edit(change: object) -> dict[str, object]:
    plan = _group_plan()
    change(plan["nodes"])  # type: ignore[operator]
    return plan


@pytest.mark.parametrize(("change", "said"), [
    (lambda nodes: nodes["s"]["children"].append("s"), "'nodes/s/children' lists 's', which 'nodes/p/children' "
                                                          "lists already: a node is in one place"),
    (lambda nodes: nodes["s"]["children"].append("c"), "'nodes/c/parent' is 'p', but 'c' is listed in "
                                                       "'nodes/s/children'"),
    (lambda nodes: nodes["c"].update(parent="s"), "'nodes/c/parent' is 's', but 'c' is listed in "
                                                      "'nodes/p/children'"),
    (lambda nodes: nodes["p"]["children"].remove("c"), "'nodes/c' is listed neither in 'root' nor in a group "
                                                         "under it"),
])
def test_nodes_that_do_not_form_one_tree_under_root_are_refused(change: object, said: str) -> None:
    problem = plan_problem(_edit(change))
    assert problem is not None and said in problem


def test_a_group_that_holds_itself_is_refused_before_the_kernel_sees_it() -> None:
    """It used to send the kernel round until RecursionError."""
    import asyncio

    from flowdsl.runtime.local import run_flow
    from flowdsl.runtime.plancheck import PlanError

    plan = _edit(lambda nodes: nodes["s"]["children"].append("s"))
    with pytest.raises(PlanError, match="a node is in one place"):
        asyncio.run(run_flow(plan, {}, record=False, import_workers=False))


def test_a_compiled_plan_forms_one_tree() -> None:
    assert plan_problem(_group_plan()) is None


# --- the quick check (derived schemas) and the whole schema agree --------------------------------------------

#: values put in place of a field, or as a field a node does not have
_BAD_VALUES = (None, 0, 1.5, True, "x", [1], {})


def _smallest_with(kind: str | None) -> tuple[dict[str, Any], list[str | int]]:
    """The smallest golden plan with a node of ``kind`` (with an expression, for None), and where to damage it:
    that node (the top level, for None)."""
    plans = sorted((json.loads(path.read_text()) for path in GOLDEN_PLANS), key=lambda p: len(json.dumps(p)))
    if kind is None:
        return next(plan for plan in plans if plan["expressions"]), []
    plan = next(plan for plan in plans if any(node["kind"] == kind for node in plan["nodes"].values()))
    return plan, ["nodes", next(key for key, node in plan["nodes"].items() if node["kind"] == kind)]


def _damaged(plan: dict[str, Any], root: list[str | int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what was changed, a copy of ``plan`` so changed): each field under ``root`` (at any depth — retry,
    output, llm…; the first item of a list) removed, given each bad value, and each object there given an
    unknown field."""

    def paths(value: Any, at: list[str | int]) -> Iterator[tuple[list[str | int], Any]]:
        yield at, value
        members = list(value.items()) if isinstance(value, dict) else [(0, value[0])] if value and isinstance(
            value, list) else []
        for name, sub in members:
            if at or name != "nodes":  # (the nodes are damaged each from its own root)
                yield from paths(sub, [*at, name])

    def edited(path: list[str | int], change: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(plan))
        target = copy
        for part in path[:-1]:
            target = target[part]
        change(target, path[-1])
        return copy

    start: Any = plan
    for part in root:
        start = start[part]
    for path, value in paths(start, root):
        if len(path) > len(root):
            yield f"{path} removed", edited(path, lambda t, k: t.pop(k))
            for bad in _BAD_VALUES:
                yield f"{path} = {bad!r}", edited(path, lambda t, k, bad=bad: t.__setitem__(k, bad))
        if isinstance(value, dict):
            yield f"{path} + extra", edited([*path, "extra"], lambda t, k: t.__setitem__(k, 1))


def _whole_schema(plan: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether the whole schema accepts ``plan`` (``_validator().is_valid``: no error from ``iter_errors``), and
    what plan_problem said before the quick check: the whole schema over every node, then the references. One
    pass of the whole schema (the slow part, ~1 ms a node) answers both."""
    from flowdsl.runtime.plancheck import _references_problem, _said, _validator

    errors = list(_validator().iter_errors(plan))
    if plan.get("plan_version") not in range(1, PLAN_VERSION + 1) or type(plan.get("plan_version")) is not int:
        return not errors, plan_problem(plan)
    if errors:
        return False, _said(errors)
    return True, _references_problem(plan)


def _whole_schema_problem(plan: dict[str, Any]) -> str | None:
    """What plan_problem said before the quick check: the whole schema over every node, then the references."""
    return _whole_schema(plan)[1]


@pytest.mark.parametrize("path", GOLDEN_PLANS, ids=[str(p.relative_to(ROOT)) for p in GOLDEN_PLANS])
def test_the_quick_check_finds_each_golden_plan_well_shaped(path: Path) -> None:
    from flowdsl.runtime.plancheck import _well_shaped

    assert _well_shaped(json.loads(path.read_text()))


@pytest.mark.parametrize("kind", [None, *plan_schema()["$defs"]["node"]["properties"]["kind"]["enum"]])
def test_the_quick_check_and_the_whole_schema_agree_on_damaged_plans(kind: str | None) -> None:
    """plancheck asks derived per-kind schemas whether a plan is well shaped, and the whole schema only what is
    wrong: they must accept the same plans, and the message must be the one the whole schema gives. Each field
    of a node of ``kind`` (of the plan's top level, for None) is damaged in turn."""
    from flowdsl.runtime.plancheck import _well_shaped

    plan, root = _smallest_with(kind)
    tried = 0
    for what, damaged in _damaged(plan, root):
        valid, problem = _whole_schema(damaged)  # (is_valid is "iter_errors yields nothing": one pass for both)
        assert _well_shaped(damaged) == valid, what
        assert plan_problem(damaged) == problem, what
        tried += 1
    assert tried > 50


def test_the_quick_check_refuses_what_the_whole_schema_does_in_each_node_of_many() -> None:
    """Bad nodes among many well-shaped ones (which the message's search leaves out) are found, and the one
    said is the one the whole schema says."""
    from flowdsl import compile_text

    text = "flowdsl: 1\nname: many\nsteps:\n" + "".join(f"  - s{i}: {{worker: w, output: r{i % 3}}}\n"
                                                      for i in range(60))
    plan = json.loads(json.dumps(compile_text(text)))
    for key, change in (("s0", {"extra": 1}), ("s31", {"order": -1}), ("s59", {"kind": "llm"}),
                        ("s7", {"output": {"mode": "name"}}), ("s8", {"output": {"mode": "merge", "name": "x"}})):
        damaged = json.loads(json.dumps(plan))
        damaged["nodes"][key].update(change)
        damaged["nodes"]["s40"]["retry"]["jitter"] = "some"
        problem = plan_problem(damaged)
        assert problem is not None and problem == _whole_schema_problem(damaged), (key, problem)
