"""A condition's else branch (``x ? a : b``) is checked like the rest of an expression: jsonata-python keeps it
in a private attribute, and the checks did not look there — ``$now()`` (which breaks deterministic replay), an
unknown ``$steps.x`` or an undefined variable passed there."""

from __future__ import annotations

import pytest

import flowdsl

STEP = "flowdsl: 1\nname: el\nsteps:\n  - a\n  - b:\n      with:\n        t: \"${{ {expr} }}\"\n"


@pytest.mark.parametrize(("expr", "code"), [
    ("x ? 1 : $now()", "FD503"),
    ("x ? 1 : (y ? 2 : $random())", "FD503"),
    ("x ? 1 : $steps.nope.v", "FD303"),
    ("x ? 1 : $undefined_var", "FD502"),
])
def test_what_an_else_branch_holds_is_checked(expr: str, code: str) -> None:
    with pytest.raises(flowdsl.SpecError) as caught:
        flowdsl.compile_text(STEP.format(expr=expr))
    assert [d.code for d in caught.value.diagnostics if d.severity == "error"] == [code]


def test_a_step_an_else_branch_reads_is_one_the_expression_depends_on() -> None:
    plan = flowdsl.compile_text(STEP.format(expr="x ? 1 : $steps.a.v"))
    [entry] = plan["expressions"].values()
    assert (entry["source"], entry["steps"]) == ("x ? 1 : $steps.a.v", ["a"])
