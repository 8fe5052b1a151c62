"""The ASCII form's layout: rails between undo boxes, lanes that degrade instead of breaking, widths."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

import flowdsl
from flowdsl.render import RenderError, render
from flowdsl.render.ascii import cells, legend, width_of
from tests.render.cases import CONFORMANCE, NASTY, compile_plan, conformance_specs, example_specs

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


DAG_UNDOS = """
flowdsl: 1
name: dag
steps:
  - a: {compensate: undo_a}
  - b: {needs: [a], compensate: undo_b}
  - c: {needs: [a], compensate: undo_c}
  - d: {needs: [b], compensate: undo_d}
  - e: {needs: [c, d]}
"""


def test_a_rollback_list_with_undos_side_by_side_claims_only_the_order_the_plan_implies() -> None:
    """A run also orders undos by when the steps ran (here: d, then b and c if c completed before d started)."""
    for ascii_only, par in ((False, "∥"), (True, "||")):
        text = " ".join(_ascii(flowdsl.compile_text(DAG_UNDOS), ascii_only=ascii_only).split())
        assert (f"rollback: on failure, each completed step is undone, in the order the plan implies ({par}: no "
                "order between them; a run also goes by when the steps actually ran, so its order can differ): "
                f"1. ") in text and f"(for c) {par} " in text, text


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


# --- widths: every drawing fits the width it is given --------------------------------------------------------

WIDTHS = (40, 50, 60, 80, 120)


def _widest(text: str) -> int:
    return max(width_of(line) for line in text.splitlines())


@pytest.mark.parametrize("spec", conformance_specs() + example_specs(), ids=lambda p: p.parent.name
                         if p.name == "flow.yaml" else p.stem)
def test_every_case_fits_every_width(spec: Path) -> None:
    plan = compile_plan(spec)
    for width in WIDTHS:
        for ascii_only in (False, True):
            text = _ascii(plan, width=width, ascii_only=ascii_only)
            assert _widest(text) <= width, (width, ascii_only, text)
            assert "note: drawn" not in text


LONG_LOOPS = """
flowdsl: 1
name: long_loops
steps:
  - parallel: both
    branches:
      - charge: {compensate: refund}
      - for_each: a_rather_long_for_each_name_in_a_lane
        items: "${ order.lines }"
        as: line
        concurrency: 2
        steps: [ship: {compensate: unship}]
  - for_each: a_rather_long_for_each_name
    items: "${ order.lines }"
    steps: [echo]
"""


def _misaligned_frames(text: str) -> list[str]:
    """The top edges of the group frames in ``text`` whose sides are not straight down to their bottom corners."""
    rows = [cells(line) for line in text.splitlines()]
    bad = []
    for i, row in enumerate(rows):
        for left, ch in enumerate(row):
            if ch not in "╭┏":
                continue
            right = next(c for c in range(left + 1, len(row)) if row[c] in "╮┓")
            for below in rows[i + 1:]:
                corner = len(below) > left and below[left] in "╰┗"
                side = "╯┛" if corner else "│╎┊┃"
                if len(below) <= right or below[right] not in side or (len(below) > right + 1 and
                                                                        below[right + 1] not in " ┄"):
                    bad.append("".join(row))
                    break
                if corner:
                    break
    return bad


@pytest.mark.parametrize("spec", conformance_specs() + example_specs(), ids=lambda p: p.parent.name
                         if p.name == "flow.yaml" else p.stem)
def test_every_frame_is_closed_at_every_width(spec: Path) -> None:
    plan = compile_plan(spec)
    for width in WIDTHS:
        assert not _misaligned_frames(_ascii(plan, width=width)), width


def test_a_for_each_frame_is_widened_to_its_labels() -> None:
    """``gather → <id>`` below the body and ``⇶ each …`` above it fit inside the frame: it is widened to them,
    within the width (past it, the label is wrapped)."""
    plan = flowdsl.compile_text(LONG_LOOPS)
    for width in WIDTHS:
        text = _ascii(plan, width=width)
        assert not _misaligned_frames(text), text
        assert _widest(text) <= width, text
    lines = [line.strip() for line in _ascii(plan).splitlines()]
    top = lines.index("╭─ for_each a_rather_long_for_each_name ─────╮")
    assert lines[top + 1] == "│ ⇶ each item in order.lines, all at once    │"
    assert lines[top + 6] == "│     │ gather → a_rather_long_for_each_name │"
    plain = [line.strip() for line in _ascii(plan, ascii_only=True).splitlines()]
    top = plain.index(".- for_each a_rather_long_for_each_name ------.")
    assert plain[top + 6] == ":     | gather -> a_rather_long_for_each_name :"


CONDITIONS_AND_SWITCH = [(CONFORMANCE / "conditions.yaml", 60), (CONFORMANCE / "conditions.yaml", 50),
                         (CONFORMANCE / "switch.yaml", 50)]


@pytest.mark.parametrize(("spec", "width"), CONDITIONS_AND_SWITCH, ids=["conditions-60", "conditions-50", "switch-50"])
def test_group_frames_fit_the_width(spec: Path, width: int) -> None:
    text = _ascii(compile_plan(spec), width=width)
    assert _widest(text) <= width, text


STACKED_PARALLEL = """
flowdsl: 1
name: stacked
steps:
  - first
  - parallel: fan_out_group
    description: This parallel group has a rather long description that goes on and on and on to exceed the
      width of the terminal by far, and then some more words, really quite a lot of them
    branches:
      - a_rather_long_step_name_number_1: {compensate: undo_number_1_with_a_long_name}
      - a_rather_long_step_name_number_2: {compensate: undo_number_2}
      - a_rather_long_step_name_number_3
      - a_rather_long_step_name_number_4
      - a_rather_long_step_name_number_5
  - done
"""


def test_stacked_parallel_wraps_its_description_and_folds_undo_boxes_in() -> None:
    plan = flowdsl.compile_text(STACKED_PARALLEL)
    for width in (80, 60, 50):
        text = _ascii(plan, width=width)
        assert _widest(text) <= width, text
        assert text.count("╟─▶") == 5 and "them" in text and "description" in text
    narrow = _ascii(plan, width=50)
    assert "┄┄▷" not in narrow and "├┄┄" in narrow  # no room beside: the undo goes into the step's box


def _nested(depth: int) -> str:
    body = "  - leaf_step: {compensate: undo_leaf}\n"
    for d in range(depth):
        body = f"  - sequence: level_{d}\n    steps:\n" + "".join("    " + line + "\n" for line in body.splitlines())
    return f"flowdsl: 1\nname: deep\nsteps:\n{body}"


def test_too_deep_to_fit_says_so() -> None:
    assert "note: drawn" not in _ascii(flowdsl.compile_text(_nested(6)), width=40)
    text = _ascii(flowdsl.compile_text(_nested(7)), width=40)
    assert re.search(r"note: drawn 4\d columns wide", " ".join(text.split())) and "each level takes 4 columns" in text
    assert _widest(_ascii(flowdsl.compile_text(_nested(7)), width=50)) <= 50


def test_width_below_the_minimum_is_an_error() -> None:
    with pytest.raises(RenderError, match="at least 40 columns"):
        render(compile_plan(CONFORMANCE / "sequence.yaml"), "ascii", width=39)


# --- needs: graphs: every edge drawn, no edge invented --------------------------------------------------------

_LINKS = {"│": "ud", "─": "lr", "┌": "dr", "┐": "dl", "└": "ur", "┘": "ul", "├": "udr", "┤": "udl", "┬": "dlr",
          "┴": "ulr", "┼": "udlr", "▼": "u"}
_STEP = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
_BACK = {"u": "d", "d": "u", "l": "r", "r": "l"}


def traced_edges(text: str) -> set[tuple[str, str]]:
    """The edges a drawing shows, found by following its lines from each box's exit down to the
    arrows that enter boxes; a ``│`` met while going sideways is a crossing and is passed."""
    grid = [list(line) for line in text.splitlines()]

    def at(r: int, c: int) -> str:
        return grid[r][c] if 0 <= r < len(grid) and 0 <= c < len(grid[r]) else " "

    boxes = []  # (top, left, right, bottom, id)
    for r, row in enumerate(grid):
        for c, ch in enumerate(row):
            line = "".join(row)
            if ch == "┌" and "┐" in line[c:]:
                right = line.index("┐", c)
                if set(line[c + 1:right]) != {"─"} or at(r + 1, c) != "│" or at(r + 1, right) != "│":
                    continue  # a corner of a line, not a box
                bottom = next(i for i in range(r + 1, len(grid)) if at(i, c) == "└")
                boxes.append((r, c, right, bottom, "".join(grid[r + 1][c + 2:right]).split()[0]))
    starts = [(b[4], b[3], next(c for c in range(b[1], b[2]) if at(b[3], c) == "┬")) for b in boxes]
    begin = next((r, "".join(row).index("● start")) for r, row in enumerate(grid) if "● start" in "".join(row))
    starts.append(("start", *begin))
    edges = set()
    for name, r0, c0 in starts:
        todo, seen = [(r0 + 1, c0, "u")], set()
        while todo:
            r, c, came = todo.pop()
            if (r, c, came) in seen:
                continue
            seen.add((r, c, came))
            ch = at(r, c)
            if ch == "▼":
                target = next((b[4] for b in boxes if b[0] == r + 1 and b[1] <= c <= b[2]), None)
                edges.add((name, target or ("end" if at(r + 1, c) == "◉" else "?")))
                continue
            links = _LINKS.get(ch, "")
            if ch == "│" and came in "lr":
                links = "lr"  # a crossing: straight on
            for d in links:
                if d != came and d != "u":
                    dr, dc = _STEP[d]
                    todo.append((r + dr, c + dc, _BACK[d]))
    return edges


DAGS = {
    "audit": "  - a\n  - b: {needs: [a]}\n  - c: {needs: [b]}\n  - d: {needs: [a]}\n  - e: {needs: [c, d]}\n"
             "  - f: {needs: [a]}\n",
    "criss_cross": "  - a\n  - b\n  - c: {needs: [a, b]}\n  - d: {needs: [a]}\n  - e: {needs: [b]}\n"
                   "  - f: {needs: [c, d, e]}\n  - g: {needs: [a]}\n",
    "skips": "  - a\n  - b: {needs: [a]}\n  - c: {needs: [b]}\n  - d: {needs: [c, a]}\n  - e: {needs: [a]}\n"
             "  - f: {needs: [e, b]}\n",
}


def _expected(plan: dict) -> set[tuple[str, str]]:
    nodes = plan["nodes"]
    needed = {d for k in plan["root"] for d in nodes[k]["deps"]}
    edges = {(d, k) for k in plan["root"] for d in nodes[k]["deps"]}
    edges |= {("start", k) for k in plan["root"] if not nodes[k]["deps"]}
    return edges | {(k, "end") for k in plan["root"] if k not in needed}


@pytest.mark.parametrize("name", sorted(DAGS))
def test_a_needs_graph_is_drawn_edge_for_edge(name: str) -> None:
    plan = flowdsl.compile_text(f"flowdsl: 1\nname: {name}\nsteps:\n{DAGS[name]}")
    for width in (80, 120):
        text = _ascii(plan, width=width)
        assert traced_edges(text) == _expected(plan), text


@pytest.mark.parametrize("spec", ["needs_diamond.yaml", "step_refs.yaml"])
def test_conformance_needs_graphs_are_drawn_edge_for_edge(spec: str) -> None:
    plan = compile_plan(CONFORMANCE / spec)
    assert traced_edges(_ascii(plan)) == _expected(plan)


def test_random_needs_graphs_never_show_a_false_edge() -> None:
    rng = random.Random(7)
    for case in range(40):
        n = rng.randint(3, 8)
        lines = []
        for i in range(n):
            deps = sorted({f"s{j}" for j in range(i) if rng.random() < 0.35})
            lines.append(f"  - s{i}: {{needs: [{', '.join(deps)}]}}\n" if deps else f"  - s{i}\n")
        plan = flowdsl.compile_text(f"flowdsl: 1\nname: r{case}\nsteps:\n{''.join(lines)}")
        for width in (60, 80, 120):
            text = _ascii(plan, width=width)
            assert _widest(text) <= width
            traced = traced_edges(text)
            if "┆" in text:  # too wide to draw: listed in a run order; the boxes' captions tell the needs
                listed = [k for k in plan["root"] if f"│ {k} " in text]
                order = sorted(listed, key=lambda k: text.index(f"│ {k} "))
                assert traced <= {("start", order[0]), (order[-1], "end")}, text
                for k in plan["root"]:
                    deps = plan["nodes"][k]["deps"]
                    assert not deps or f"needs: {', '.join(deps)}" in text
                continue
            assert traced == _expected(plan), text


def test_a_needs_graph_too_wide_is_listed_with_its_needs() -> None:
    spec = "".join(f"  - a_long_step_name_{i}: {{needs: [root_step]}}\n" for i in range(8))
    plan = flowdsl.compile_text(f"flowdsl: 1\nname: wide\nsteps:\n  - root_step\n{spec}")
    text = _ascii(plan, width=60)
    assert _widest(text) <= 60
    assert text.count("needs: root_step") == 8 and "┆" in text
    assert traced_edges(text) <= {("start", "root_step"), ("a_long_step_name_7", "end")}  # ┆ links are no edges


# --- the key --------------------------------------------------------------------------------------------------


def _key(text: str) -> str:
    lines = text.split("\n\n")
    return " ".join(next(block for block in lines if block.startswith("key:")).split())


def test_key_shows_only_the_undo_forms_drawn() -> None:
    beside = _key(_ascii(compile_plan(CONFORMANCE / "compensate.yaml")))
    assert "┄┄▷ ↶: compensation (undo)" in beside and "below a" not in beside
    inside = _key(_ascii(flowdsl.compile_text(_nested(5)), width=40))
    assert "┄┄▷" not in inside and "↶: compensation (undo), in its step's box below a ┄┄ line" in inside
    plain = _key(_ascii(compile_plan(CONFORMANCE / "compensate.yaml"), ascii_only=True))
    assert '..> "undo:": compensation (undo)' in plain and "::" not in plain
    plain_inside = _key(_ascii(flowdsl.compile_text(_nested(5)), width=40, ascii_only=True))
    assert "..>" not in plain_inside and "::" not in plain_inside


TRAVEL = """
flowdsl: 1
name: travel
timeout: 1m
defaults: {timeout: 5s}
steps:
  - parallel: reserve_all
    branches:
      - reserve_flight: {worker: travel.reserve_flight, compensate: travel.cancel_flight}
      - reserve_hotel: {worker: travel.reserve_hotel, compensate: travel.cancel_hotel}
  - charge:
      worker: travel.charge_card
      compensate: travel.refund_card
      retry: {attempts: 4, on: [PaymentGatewayTimeout]}
  - write_note:
      llm: {signature: "name -> note"}
      with: {name: "${ name }"}
      fallback: travel.plain_note
  - travel.send_confirmation
"""


def _key_entries(text: str) -> list[str]:
    """The entries of the key (``symbol: meaning``), each with the ``;`` that ends it but the last."""
    joined = _key(text).removeprefix("key: ")
    return [e + ";" for e in joined.split("; ")[:-1]] + [joined.split("; ")[-1]]


@pytest.mark.parametrize("width", [40, 50, 60, 70, 80, 100, 120])
@pytest.mark.parametrize("ascii_only", [False, True])
def test_the_key_wraps_only_between_its_entries(width: int, ascii_only: bool) -> None:
    """Each ``symbol: meaning`` of the key is on one line (``┄┄▷ ↶`` was cut in two); one too wide for a line of
    its own wraps in its meaning, never in its symbol."""
    plans = [flowdsl.compile_text(TRAVEL)] + [compile_plan(s) for s in conformance_specs() + example_specs()]
    for plan in plans:
        text = _ascii(plan, width=width, ascii_only=ascii_only)
        if "\nkey: " not in text:
            continue
        lines = next(b for b in text.split("\n\n") if b.startswith("key: ")).splitlines()
        assert all(width_of(line) <= width for line in lines), lines
        assert all(line.startswith("     ") for line in lines[1:]), lines  # indented under the first entry
        for entry in _key_entries(text):
            symbol = entry.split(": ")[0] + ":"
            if width_of(entry) <= width - 5:
                assert any(entry in line for line in lines), (entry, lines)
            else:
                assert any(line[5:].startswith(symbol) for line in lines), (symbol, lines)


def test_a_key_entry_wider_than_a_line_keeps_its_symbol_whole() -> None:
    lines = legend([("┄┄▷ ↶", "compensation (undo), beside its step or in its box below a ┄┄ line"),
                    ("◷", "timeout of each attempt")], 40)
    assert lines == ["key: ┄┄▷ ↶: compensation (undo), beside",
                     "     its step or in its box below a ┄┄",
                     "     line; ◷: timeout of each attempt"]


# --- the worker line: as in every other form -------------------------------------------------------------------


def test_a_box_shows_its_worker_as_in_mermaid() -> None:
    """A ``worker:`` line whenever the worker is not the step id, in ASCII as in Mermaid and DOT: also when the
    id is the worker's last segment (``reserve_flight``, the shorthand ``- travel.send_confirmation``)."""
    text = _ascii(flowdsl.compile_text(TRAVEL), width=120)
    for worker in ("travel.reserve_flight", "travel.reserve_hotel", "travel.charge_card", "travel.send_confirmation"):
        assert f"worker: {worker} " in text, text
    assert "worker: travel.plain_note" not in text  # an LLM step names its fallback instead


@pytest.mark.parametrize("spec", conformance_specs() + example_specs(), ids=lambda p: p.parent.name
                         if p.name == "flow.yaml" else p.stem)
def test_every_form_shows_the_same_worker_lines(spec: Path) -> None:
    """As many ``worker:`` lines in ASCII as in Mermaid and DOT (a box of ASCII may wrap the worker's name)."""
    plan = compile_plan(spec)
    mermaid = re.findall(r"worker: ([\w.]+)", str(render(plan, "mermaid")))
    assert re.findall(r"worker: ([\w.]+)", str(render(plan, "dot"))) == mermaid
    for ascii_only in (False, True):
        assert _ascii(plan, ascii_only=ascii_only).count("worker:") == len(mermaid), (spec, ascii_only)


# --- switch cases ---------------------------------------------------------------------------------------------

NUMERIC_SWITCH = """
flowdsl: 1
name: numeric
steps:
  - switch: level
    on: "${ level }"
    cases:
      10: [ten]
      9: [nine]
      zebra: [z]
      2: [two]
"""


def test_switch_cases_are_drawn_numbers_by_value_then_text() -> None:
    plan = flowdsl.compile_text(NUMERIC_SWITCH)
    assert [c["match"] for c in plan["nodes"]["level"]["cases"]] == ["10", "2", "9", "zebra"]  # the plan: text
    for fmt, marks in (("ascii", ("= 2", "= 9", "= 10", "= zebra")),
                       ("mermaid", ('"= 2"', '"= 9"', '"= 10"', '"= zebra"'))):
        text = render(plan, fmt)
        assert isinstance(text, str)
        positions = [text.index(m) for m in marks]
        assert positions == sorted(positions), (fmt, text)
