"""`flowdsl convert`: a switch case label is written so that it reads back as the string it is, without FD312.

A YAML label written in quotes (``"2.50":``) is the string ``2.50``; written bare in the text syntax
(``case 2.50``) it would read as the same string but be warned about (FD312: it spells the number 2.5 otherwise
than 2.5 is matched as). The writer quotes exactly the labels FD312's rule (``flowdsl.checks.case_label_mismatch``)
flags, so YAML -> .flow -> YAML gives the same plan and no warning the YAML did not have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flowdsl.api import CompileResult, compile_loaded, load_text, plan_bytes
from flowdsl.checks import case_label_mismatch
from flowdsl.cli import app
from flowdsl.convert import to_yaml
from flowdsl.textsyntax import to_flow

#: labels FD312 flags when written bare (numbers, booleans and null spelt otherwise than they are matched as)
FLAGGED = ["2.50", "1.50", "01", "007", "-0", "+0", "3.0", "1.", "1e3", "1E3", "1e-7", "0x10", "-0x10", "0o17",
           "0b101", "1_000", "1_0.5", "True", "TRUE", "False", "Null", "NULL", "~", ".inf", "-.inf", ".nan", "1e999",
           ".5", "+1"]
#: labels a value is matched as, and strings that do not read as a number: written bare
BARE = ["0", "1", "-1", "42", "1.5", "-0.25", "1e-07", "true", "false", "null", "express", "same_day", "a.b", "a-b",
        "10s", "1m30s", "v1", "nan", "inf", "NaN", "1__", "yes", "on", "step", "default", "case"]


def switch(labels: list[str]) -> dict[str, Any]:
    cases = {label: [f"s{i}"] for i, label in enumerate(labels)}
    return {"flowdsl": 1, "name": "t",
            "steps": [{"switch": "pick", "on": "${ order.kind }", "cases": cases, "default": ["other"]}]}


def compiled(text: str, filename: str) -> CompileResult:
    result = compile_loaded(load_text(text, filename), filename)
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    return result


def case_lines(text: str) -> list[str]:
    return [line.strip().removesuffix(" { " + line.strip().split(" { ")[-1]) for line in text.splitlines()
            if line.strip().startswith("case ")]


def test_a_label_fd312_would_flag_is_written_quoted_and_others_bare() -> None:
    text = to_flow(switch(["2.50", "1.5", "True", "true", "express", "01", "1.0e3"]))
    assert case_lines(text) == ['case "2.50"', "case 1.5", 'case "True"', "case true", "case express", 'case "01"',
                                'case "1.0e3"']


@pytest.mark.parametrize("label", FLAGGED)
def test_the_labels_quoted_are_those_fd312_flags(label: str) -> None:
    assert case_label_mismatch(label) is not None
    (line,) = case_lines(to_flow(switch([label])))
    assert line.startswith('case "')


@pytest.mark.parametrize("label", BARE)
def test_the_labels_left_bare_read_back_as_written(label: str) -> None:
    assert case_label_mismatch(label) is None
    (line,) = case_lines(to_flow(switch([label])))
    assert line == f"case {label}"


def test_yaml_to_flow_to_yaml_gives_the_same_plan_and_no_warning() -> None:
    labels = FLAGGED + BARE
    yaml_text = to_yaml(switch(labels))  # every label quoted where YAML would read it otherwise
    from_yaml = compiled(yaml_text, "spec.yaml")
    assert from_yaml.diagnostics == []
    flow_text = to_flow(load_text(yaml_text, "spec.yaml").data)
    from_flow = compiled(flow_text, "spec.flow")
    assert from_flow.diagnostics == []  # was one FD312 per flagged label, written bare
    back = to_yaml(load_text(flow_text, "spec.flow").data)
    assert back == yaml_text
    assert from_flow.plan is not None and from_yaml.plan is not None
    assert plan_bytes(from_flow.plan) == plan_bytes(from_yaml.plan) == plan_bytes(compiled(back, "back.yaml").plan)


def test_flowdsl_convert_writes_a_quoted_yaml_label_quoted(tmp_path: Path) -> None:
    spec = tmp_path / "prices.yaml"
    spec.write_text('flowdsl: 1\nname: prices\nsteps:\n  - switch: by_price\n    on: "${ price }"\n    cases:\n'
                    '      "2.50": [cheap]\n      "10.00": [dear]\n      2.5: [exact]\n', encoding="utf-8")
    out = tmp_path / "prices.flow"
    result = CliRunner().invoke(app, ["convert", str(spec), "--to", "flow", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert case_lines(text) == ['case "2.50"', 'case "10.00"', "case 2.5"]
    result = CliRunner().invoke(app, ["validate", "--no-import", str(out)])
    assert result.exit_code == 0 and "FD312" not in result.output and "warning" not in result.output


#: labels of the characters numbers are spelt with, the labels above, and words
_LABELS = st.one_of(st.text(alphabet="0123456789.+-_eExXoObB", min_size=1, max_size=8), st.sampled_from(FLAGGED + BARE),
                    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(_LABELS, min_size=1, max_size=6, unique=True))
def test_no_label_is_written_so_that_it_reads_back_otherwise_or_with_a_warning(labels: list[str]) -> None:
    data = switch(labels)
    text = to_flow(data)
    doc = load_text(text, "gen.flow")
    assert doc.diagnostics == [] and doc.data == data, text
    result = compile_loaded(doc, "gen.flow")
    assert [d.format() for d in result.diagnostics if d.code == "FD312"] == [], text


def test_convert_says_the_warnings_of_the_spec_it_converts(tmp_path: Path) -> None:
    """A bare label FD312 warns about comes out quoted, with no warning left to see: convert says it first, on
    stderr (stdout is the converted text)."""
    spec = tmp_path / "c.yaml"
    spec.write_text('flowdsl: 1\nname: c\nsteps:\n  - switch: s\n    on: "${ k }"\n    cases:\n      1.50: [a]\n')
    result = CliRunner().invoke(app, ["convert", str(spec), "--to", "flow"])
    assert result.exit_code == 0
    assert 'case "1.50" { a }' in result.stdout and "FD312" not in result.stdout
    assert "c.yaml:7:7: warning FD312: case '1.50' can only match the string '1.50'" in result.stderr
