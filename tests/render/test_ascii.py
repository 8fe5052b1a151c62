"""The ASCII form's layout: rails between undo boxes, lanes that degrade instead of breaking, widths."""

from __future__ import annotations

import flowdsl
from flowdsl.render import render
from flowdsl.render.ascii import width_of
from tests.render.cases import CONFORMANCE, NASTY, compile_plan

RAIL_AROUND_A_GROUP = """
flowdsl: 1
name: rail
steps:
  - a: {compensate: undo_a}
  - parallel: p
    branches:
      - b: {compensate: undo_b}
      - c
  - d: {compensate: undo_d}
"""


def _ascii(plan: dict, **options: object) -> str:
    out = render(plan, "ascii", **options)  # type: ignore[arg-type]
    assert isinstance(out, str)
    return out


def test_undo_boxes_of_a_chain_are_joined_by_an_upward_rail() -> None:
    lines = _ascii(compile_plan(CONFORMANCE / "compensate.yaml")).splitlines()
    first = next(i for i, line in enumerate(lines) if "↶ credit_source" in line)
    second = next(i for i, line in enumerate(lines) if "↶ ledger.reverse_credit" in line)
    arrow = next(i for i, line in enumerate(lines) if "▲" in line)
    assert first < arrow < second
    assert lines.index("rollback: on failure, each completed step is undone, in this order:") > second
    assert "  1. ↶ ledger.reverse_credit (for credit_target)" in lines
    assert "  2. ↶ credit_source (for debit_source)" in lines


def test_a_rail_never_skips_past_a_group_with_undos_of_its_own() -> None:
    text = _ascii(flowdsl.compile_text(RAIL_AROUND_A_GROUP))
    assert "▲" not in text and "┆ ↶ undo_b" in text
    assert text.index("1. ↶ undo_d (for d)") < text.index("2. ↶ undo_b (for b)") < text.index("3. ↶ undo_a (for a)")


def test_lanes_side_by_side_when_they_fit() -> None:
    lines = _ascii(flowdsl.compile_text(RAIL_AROUND_A_GROUP)).splitlines()
    row = next(line for line in lines if "│ b │" in line)
    assert "│ c │" in row  # both branches on one row
    assert any("╒" in line and "╕" in line for line in lines) and any(line.rstrip().endswith("join") for line in lines)


def test_wide_flows_degrade_to_stacked_lanes_within_the_width() -> None:
    branches = "\n".join(f"      - a_rather_long_step_name_number_{i}: {{compensate: undo_number_{i}}}"
                         for i in range(6))
    spec = f"flowdsl: 1\nname: wide\nsteps:\n  - start_here\n  - parallel: fan\n    branches:\n{branches}\n  - done\n"
    for width in (80, 60):
        text = _ascii(flowdsl.compile_text(spec), width=width)
        assert max(width_of(line) for line in text.splitlines()) <= width
        assert text.count("╟─▶") == 6 and "║ join" in text
        assert all(f"a_rather_long_step_name_number_{i}" in text for i in range(6))


def test_wide_characters_keep_boxes_aligned() -> None:
    spec = 'flowdsl: 1\nname: wide_chars\nsteps:\n  - greet: {description: "中文 🚀 ünï e\u0301 tab\\there"}\n'
    lines = _ascii(flowdsl.compile_text(spec)).splitlines()
    top = next(i for i, line in enumerate(lines) if "┌" in line)
    bottom = next(i for i, line in enumerate(lines) if "┘" in line)
    widths = {width_of(line.rstrip()) for line in lines[top:bottom + 1]}
    assert len(widths) == 1, lines[top:bottom + 1]
    assert any("中文 🚀 ünï" in line for line in lines)


def test_nasty_text_stays_within_the_width() -> None:
    text = _ascii(flowdsl.compile_text(NASTY))
    assert max(width_of(line) for line in text.splitlines()) <= 80
    assert '= a"b' in text and "when: a = \"]\" and b != '|'" in text
    plain = _ascii(flowdsl.compile_text(NASTY), ascii_only=True)
    assert plain.isascii() and "unic?de ? ??" in plain


def test_ascii_only_uses_no_box_drawing() -> None:
    plan = compile_plan(CONFORMANCE / "parallel_nested.yaml")
    plain = _ascii(plan, ascii_only=True)
    assert plain.isascii() and "+--" in plain and " v" in plain
    assert _ascii(plan).count("\n") == plain.count("\n")  # same layout, other characters
