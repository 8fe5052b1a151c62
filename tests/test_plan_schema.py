"""specs/plan.schema.json states the shape of what the compiler makes; plancheck holds plans to it.

Every golden plan (the conformance cases, the examples) has that shape; the property tests
(tests/test_properties.py) check it of every plan a generated spec compiles to.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    assert plan_schema()["properties"]["plan_version"] == {"const": PLAN_VERSION}


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
