"""specs/plan.schema.json states the shape of what the compiler makes; plancheck holds plans to it.

Every golden plan (the conformance cases, the examples) has that shape; the property tests
(tests/test_properties.py) check it of every plan a generated spec compiles to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from flowdsl.runtime.plancheck import plan_problem, plan_schema

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PLANS = sorted([*ROOT.glob("specs/conformance/valid/*.plan.json"), *ROOT.glob("examples/*/flow.plan.json")])


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
