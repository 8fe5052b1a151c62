"""A plan's shape is checked once (flowdsl.runtime.plancheck): not again for a plan the compiler made in this
process and left as it made it, nor for another object of a content found well shaped, nor twice by
`flowdsl show` for the plan of the record it reads. The check is counted by wrapping ``plan_problem``, the whole
check; each test starts with the memories of a fresh process."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdsl
from flowdsl.cli import app
from flowdsl.runtime import plancheck
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.plancheck import PlanError, check_plan
from tests.runtime.conformance import HEADER

SPEC = HEADER.format(name="once") + "steps: [conf.a, conf.b]\n"
SCRIPT = {"script": {"a": {"result": {"x": 1}}}}


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The plans ``plan_problem`` is asked about (each a whole check), from here on."""
    seen: list[Any] = []
    whole = plancheck.plan_problem

    def counted(plan: Any) -> str | None:
        seen.append(plan)
        return whole(plan)

    monkeypatch.setattr(plancheck, "plan_problem", counted)
    monkeypatch.setattr(plancheck, "_CHECKED", type(plancheck._CHECKED)())
    monkeypatch.setattr(plancheck, "_GOOD", type(plancheck._GOOD)())
    yield seen


def test_a_plan_compiled_in_this_process_is_not_checked_again(checks: list[Any]) -> None:
    plan = flowdsl.compile_text(SPEC)
    result = asyncio.run(run_flow(plan, SCRIPT, record=False))
    assert result.status == "completed"
    assert checks == []
    check_plan(plan)  # and once passed, it is remembered
    assert checks == []


def test_a_copy_of_a_compiled_plan_is_not_checked_but_one_changed_is(checks: list[Any]) -> None:
    """The compiler vouches for the content it made (by a digest): an equal copy passes unchecked; a copy changed
    even in a value's type is checked, once."""
    made = flowdsl.compile_text(SPEC)
    same = copy.deepcopy(made)
    check_plan(same)
    assert checks == []
    changed = copy.deepcopy(made)
    changed["nodes"]["a"]["order"] = True  # equal to 1 in Python, but not the content made
    with pytest.raises(PlanError):
        check_plan(changed)
    assert checks == [changed]


def test_a_plan_from_elsewhere_is_checked_once_by_content(checks: list[Any]) -> None:
    """A plan that was not compiled here (a file, a record) is checked on its first use; another object of the
    same content — read again, or one of more plans than are remembered by identity — is not checked again."""
    plan = copy.deepcopy(flowdsl.compile_text(SPEC))
    plancheck._GOOD.clear()  # (as if compiled elsewhere)
    check_plan(plan)
    check_plan(plan)
    check_plan(copy.deepcopy(plan))
    assert checks == [plan]
    plancheck._CHECKED.clear()
    check_plan(plan)
    assert checks == [plan]


@pytest.mark.parametrize("change", [
    lambda p: p["nodes"]["a"]["retry"].update(attempts=0),
    lambda p: p["nodes"]["a"].update(kind="sequence"),
    lambda p: p["nodes"]["b"]["deps"].append("nowhere"),
    lambda p: p["nodes"].pop("a"),
    lambda p: p["nodes"]["a"].update(order=True),  # equal to 1 in Python, but not an integer in JSON
])
def test_a_compiled_plan_changed_before_its_first_check_is_checked_and_refused(
        checks: list[Any], change: Any) -> None:
    plan = flowdsl.compile_text(SPEC)
    change(plan)
    with pytest.raises(PlanError, match="the plan is not a flowdsl execution plan: '"):
        flowdsl.run(plan, SCRIPT, record=False)
    assert checks == [plan]


def test_a_compiled_plan_changed_but_still_well_shaped_is_checked_and_runs(checks: list[Any]) -> None:
    plan = flowdsl.compile_text(SPEC)
    plan["nodes"]["b"]["retry"]["attempts"] = 2
    assert flowdsl.run(plan, SCRIPT, record=False).status == "completed"
    assert checks == [plan]


def test_show_checks_the_record_s_plan_once(tmp_path: Path, checks: list[Any]) -> None:
    """It was checked twice: by read_record (the header) and by result_from_record (the replay)."""
    plan = flowdsl.compile_text(SPEC)
    asyncio.run(run_flow(plan, SCRIPT, run_id="r1", runs_dir=tmp_path))
    assert checks == []
    for options in ([], ["--format", "json"]):
        checks.clear()
        plancheck._GOOD.clear()  # (as in another process than the one that ran it)
        shown = CliRunner().invoke(app, ["show", "r1", "--runs-dir", str(tmp_path), *options])
        assert shown.exit_code == 0, shown.output
        assert len(checks) == 1 and checks[0] == plan


def test_run_of_a_spec_file_does_not_check_the_plan_it_compiled(tmp_path: Path, checks: list[Any]) -> None:
    spec = tmp_path / "once.yaml"
    spec.write_text(SPEC)
    ran = CliRunner().invoke(app, ["run", str(spec), "--runs-dir", str(tmp_path), "--set", "script.a.result.x=1"])
    assert ran.exit_code == 0, ran.output
    assert checks == []


def test_a_record_s_malformed_plan_is_still_refused_by_show(tmp_path: Path) -> None:
    import json

    plan = flowdsl.compile_text(SPEC)
    asyncio.run(run_flow(plan, SCRIPT, run_id="r1", runs_dir=tmp_path))
    path = tmp_path / "r1.jsonl"
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["plan"]["nodes"]["a"]["retry"]["attempts"] = 0
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    shown = CliRunner().invoke(app, ["show", "r1", "--runs-dir", str(tmp_path)])
    assert shown.exit_code != 0
    assert "'nodes/a/retry/attempts': 0 is less than the minimum of 1" in shown.output
