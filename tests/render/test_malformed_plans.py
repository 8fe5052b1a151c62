"""Plans that do not come from the compiler: ``render()`` refuses a malformed one with a RenderError saying
what is wrong, never a traceback (a group holding itself used to recurse until RecursionError)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl
from flowdsl.cli import app
from flowdsl.render import RenderError, render

SPEC = """
flowdsl: 1
name: groups
steps:
  - a
  - sequence: grp
    steps: [b, c]
  - parallel: par
    branches: [d, e]
"""
TEXT_FORMATS = ("mermaid", "ascii", "dot")


@pytest.fixture
def plan() -> dict[str, Any]:
    return flowdsl.compile_text(SPEC)


def test_a_group_that_holds_itself_is_refused(plan: dict[str, Any]) -> None:
    plan["nodes"]["grp"]["children"].append("grp")
    for fmt in TEXT_FORMATS:
        with pytest.raises(RenderError, match="not a flowdsl execution plan: node 'grp' is listed more than once"):
            render(plan, fmt)


def test_a_group_inside_its_own_member_is_refused(plan: dict[str, Any]) -> None:
    plan["nodes"]["b"] = {**plan["nodes"]["grp"], "key": "b", "id": "b", "children": ["par"]}
    for fmt in TEXT_FORMATS:
        with pytest.raises(RenderError, match="node 'par' is listed more than once"):
            render(plan, fmt)


def test_a_node_in_two_lists_is_refused(plan: dict[str, Any]) -> None:
    plan["nodes"]["par"]["children"].append("b")
    with pytest.raises(RenderError, match="node 'b' is listed more than once"):
        render(plan, "ascii")


@pytest.mark.parametrize(("key", "field", "value", "message"), [
    ("b", "deps", 7, "'nodes/b/deps': 7 is not of type 'array'"),
    ("grp", "children", 5, "'nodes/grp/children': 5 is not of type 'array'"),
    ("b", "retry", 3, "'nodes/b/retry': 3 is not of type 'object'"),
    ("b", None, ["x"], r"'nodes/b': \['x'\] is not of type 'object'"),
])
def test_a_plan_that_cannot_be_drawn_is_refused_with_what_is_wrong(plan: dict[str, Any], key: str,
                                                                    field: str | None, value: Any,
                                                                    message: str) -> None:
    """The plan's own shape check (flowdsl.runtime.plancheck, specs/plan.schema.json) says what is wrong."""
    if field is None:
        plan["nodes"][key] = value
    else:
        plan["nodes"][key][field] = value
    for fmt in TEXT_FORMATS:
        with pytest.raises(RenderError, match=f"^not a flowdsl execution plan: {message}$"):
            render(plan, fmt)


def test_a_renderer_failure_on_a_well_formed_plan_is_not_disguised(plan: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise KeyError("a renderer bug")

    monkeypatch.setattr("flowdsl.render.ascii.render_ascii", broken)
    with pytest.raises(KeyError, match="a renderer bug"):
        render(plan, "ascii")


def test_well_formed_plans_still_draw(plan: dict[str, Any]) -> None:
    for fmt in TEXT_FORMATS:
        assert render(copy.deepcopy(plan), fmt)


def test_the_diagram_command_takes_specs_not_plans(plan: dict[str, Any], tmp_path: Path) -> None:
    """No plan from outside reaches the renderers from the command line: a plan file is not a spec."""
    plan["nodes"]["grp"]["children"].append("grp")
    target = tmp_path / "plan.json"
    target.write_text(json.dumps(plan), encoding="utf-8")
    result = CliRunner().invoke(app, ["diagram", str(target)])
    assert result.exit_code == 2 and "FD101" in result.stderr and "Traceback" not in result.stderr
