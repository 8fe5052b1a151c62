"""Hostile input for the renderers: rollback order at scale, Markdown fences, wide characters.

- The rollback order is derived from the plan's lists (linear in a sequence). It is checked
  against its definition — the reverse of the steps' partial order in the plan's flow graph,
  transitively reduced — on every shape, and flows of thousands of compensated steps are drawn in
  every text format (each took minutes when every pair of steps was compared).
- A ``--markdown`` fence is longer than any run of backticks in the diagram it holds.
- Text is wrapped by display width, the measure boxes are drawn by: CJK and emoji line up.
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import yaml
from markdown_it import MarkdownIt
from typer.testing import CliRunner

import flowdsl
from flowdsl.cli import app
from flowdsl.render import render
from flowdsl.render.view import PlanView, fenced, wrap
from tests.render.cases import compile_plan, conformance_specs, example_specs


def _flow(text: str) -> dict[str, Any]:
    return flowdsl.compile_text(text, filename="spec.flow")


def _text(plan: dict[str, Any], fmt: str) -> str:
    out = render(plan, fmt)
    assert isinstance(out, str)
    return out


def _reduced_reverse_order(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """The definition of the rollback edges, computed the slow way: ``(later, earlier)`` for compensated
    steps where ``earlier`` reaches ``later`` in the plan's flow graph (``edges``) and no compensated
    step lies between them; in plan order."""
    graph = nx.DiGraph([tuple(edge) for edge in plan["edges"]])
    comp = PlanView(plan).compensated_steps()
    order = {k: i for i, k in enumerate(comp)}
    precedes = nx.DiGraph()
    precedes.add_nodes_from(comp)
    for a in comp:
        if a in graph:
            precedes.add_edges_from((a, b) for b in nx.descendants(graph, a) & set(comp))
    reduced = nx.transitive_reduction(precedes)
    return sorted(((later, earlier) for earlier, later in reduced.edges), key=lambda e: (order[e[0]], order[e[1]]))


# --- rollback order: shapes ----------------------------------------------------------------


def test_a_sequence_undoes_each_compensated_step_right_after_the_next_one() -> None:
    view = PlanView(_flow("flow seq\nstep a undo ua\nstep b\nstep c undo uc\nstep d undo ud\n"))
    assert view.rollback_edges() == [("c", "a"), ("d", "c")]
    assert view.rollback_levels() == [["d"], ["c"], ["a"]]


def test_parallel_branches_are_undone_after_what_follows_them_and_before_what_precedes_them() -> None:
    view = PlanView(_flow("""flow par
step a undo ua
parallel p {
  sequence s {
    step b undo ub
    step c undo uc
  }
  step d undo ud
  step e
}
step f undo uf
"""))
    assert view.rollback_edges() == [("b", "a"), ("c", "b"), ("d", "a"), ("f", "c"), ("f", "d")]
    assert view.rollback_levels() == [["f"], ["c", "d"], ["b"], ["a"]]


def test_nested_groups_for_each_and_switch_cases() -> None:
    view = PlanView(_flow("""flow nested
step a undo ua
parallel outer {
  sequence left {
    step b undo ub
    parallel inner {
      step c undo uc
      step d undo ud
      step e
    }
    step f
  }
  for_each each items "${ $.items }" {
    step g undo ug
  }
}
switch pick on "${ $.x }" {
  case one { step h undo uh }
  default { step i undo ui }
}
"""))
    assert view.rollback_edges() == [("b", "a"), ("c", "b"), ("d", "b"), ("g", "a"), ("h", "c"), ("h", "d"),
                                     ("h", "g"), ("i", "c"), ("i", "d"), ("i", "g")]
    assert view.rollback_levels() == [["h", "i"], ["c", "d", "g"], ["b"], ["a"]]


def test_a_needs_graph_listed_out_of_order() -> None:
    plan = _flow("""flow dag
step fetch undo unfetch
step decide undo undecide needs credit, identity
step credit undo uncredit needs fetch
step identity needs fetch
step audit undo unaudit needs []
step notify needs decide, audit
step archive undo unarchive needs notify
""")
    view = PlanView(plan)
    # identity has no undo: decide waits for fetch through it, but credit, after fetch, is nearer
    assert view.rollback_edges() == [("decide", "credit"), ("credit", "fetch"), ("archive", "decide"),
                                     ("archive", "audit")]
    assert view.rollback_levels() == [["archive"], ["decide", "audit"], ["credit"], ["fetch"]]
    assert view.rollback_edges() == _reduced_reverse_order(plan)


@pytest.mark.parametrize("spec", conformance_specs() + example_specs(), ids=lambda p: p.parent.name
                         if p.name == "flow.yaml" else p.stem)
def test_rollback_edges_of_every_golden_are_the_reduced_reverse_order(spec: Path) -> None:
    plan = compile_plan(spec)
    assert PlanView(plan).rollback_edges() == _reduced_reverse_order(plan)


def _random_list(rng: random.Random, depth: int, names: list[str]) -> list[dict[str, Any]]:
    """A sibling list of steps and groups, written with ``needs:`` (in a random run order, not the
    listed one) about a third of the time."""
    nodes = [_random_node(rng, depth, names) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.35:
        rank = rng.sample(range(len(nodes)), len(nodes))
        for i, (_, holder, _) in enumerate(nodes):
            earlier = [ident for j, (_, _, ident) in enumerate(nodes) if rank[j] < rank[i]]
            holder["needs"] = rng.sample(earlier, rng.randint(0, len(earlier)))
    return [node for node, _, _ in nodes]


def _random_node(rng: random.Random, depth: int, names: list[str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A node, the mapping its ``needs`` would go in (a step's own, a group's beside its kind), its id."""
    ident = f"n{len(names)}"
    names.append(ident)
    if depth == 0 or rng.random() < 0.55:
        body: dict[str, Any] = {"compensate": f"undo_{ident}"} if rng.random() < 0.6 else {}
        return {ident: body}, body, ident
    kind = rng.choice(["sequence", "parallel", "for_each", "switch"])
    node: dict[str, Any] = {kind: ident}
    if kind == "parallel":
        node["branches"] = [_random_node(rng, depth - 1, names)[0] for _ in range(rng.randint(1, 4))]
    elif kind == "switch":
        node["on"] = "${ $.x }"
        node["cases"] = {f"c{i}": _random_list(rng, depth - 1, names) for i in range(rng.randint(1, 3))}
        if rng.random() < 0.5:
            node["default"] = _random_list(rng, depth - 1, names)
    else:
        node["steps"] = _random_list(rng, depth - 1, names)
        if kind == "for_each":
            node["items"] = "${ $.items }"
    return node, node, ident


def test_rollback_edges_of_random_shapes_are_the_reduced_reverse_order() -> None:
    rng = random.Random(20261203)
    for _ in range(150):
        steps = _random_list(rng, 3, [])
        plan = flowdsl.compile_text(yaml.safe_dump({"flowdsl": 1, "name": "shapes", "steps": steps}))
        assert PlanView(plan).rollback_edges() == _reduced_reverse_order(plan)


# --- rollback order: scale -------------------------------------------------------------------


def test_thousands_of_compensated_steps_in_a_sequence_are_drawn_in_every_format() -> None:
    n = 3000
    plan = _flow("flow saga\n\n" + "".join(f"step s{i} undo u{i}\n" for i in range(n)))
    assert PlanView(plan).rollback_edges() == [(f"s{i}", f"s{i - 1}") for i in range(1, n)]
    mermaid = _text(plan, "mermaid")
    assert mermaid.count('-.->|"then"|') == n - 1 and f'u_s{n - 1} -.->|"then"| u_s{n - 2}' in mermaid
    assert _text(plan, "dot").count("label=<then>") == n - 1
    lines = _text(plan, "ascii").splitlines()
    assert f"  1. ↶ u{n - 1} (for s{n - 1})" in lines and f"{n}. ↶ u0 (for s0)" in lines
    assert max(len(line) for line in lines) <= 80


def test_a_wide_parallel_group_and_a_long_needs_chain_at_scale() -> None:
    n = 1500
    wide = _flow("flow wide\nstep a undo ua\nparallel p {\n" + "".join(f"  step b{i} undo ub{i}\n" for i in range(n))
                 + "}\nstep z undo uz\n")
    view = PlanView(wide)
    assert view.rollback_edges() == [(f"b{i}", "a") for i in range(n)] + [("z", f"b{i}") for i in range(n)]
    assert view.rollback_levels() == [["z"], [f"b{i}" for i in range(n)], ["a"]]
    assert _text(wide, "mermaid").count('-.->|"then"|') == _text(wide, "dot").count("label=<then>") == 2 * n
    lines = _text(wide, "ascii").splitlines()
    assert "  2. ↶ ub0 (for b0)" in lines and f"   ∥ ↶ ub{n - 1} (for b{n - 1})" in lines
    # each node needs the two before it, listed last first: the walk goes 3,000 deep, without recursion
    chain = _flow("flow chain\n" + "".join(
        f"step s{i} undo u{i} needs {', '.join(f's{j}' for j in (i - 1, i - 2) if j >= 0) or '[]'}\n"
        for i in reversed(range(2 * n))))
    view = PlanView(chain)
    assert view.rollback_edges() == [(f"s{i}", f"s{i - 1}") for i in reversed(range(1, 2 * n))]
    assert len(view.rollback_levels()) == 2 * n
    assert _text(chain, "mermaid").count('-.->|"then"|') == _text(chain, "dot").count("label=<then>") == 2 * n - 1


# --- Markdown fences ------------------------------------------------------------------------

BACKTICKS = r'''
flowdsl: 1
name: fenced
description: "Run it:\n```\nflowdsl run flow.yaml\n```\nor with ```` four."
steps:
  - a:
      description: "```"
      compensate: undo_a
  - b:
      description: "`````five"
'''


def test_a_fence_is_longer_than_any_run_of_backticks_in_what_it_holds() -> None:
    assert fenced("flowchart TD\n", "mermaid") == "```mermaid\nflowchart TD\n```\n"
    assert fenced("a ``` b\n`````\nc", "text") == "``````text\na ``` b\n`````\nc\n``````\n"


def _diagram(*args: str) -> str:
    result = CliRunner().invoke(app, ["diagram", *args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("fmt", "info"), [("ascii", "text"), ("mermaid", "mermaid"), ("dot", "dot")])
def test_a_markdown_diagram_holding_backticks_is_one_code_block(fmt: str, info: str, tmp_path: Path) -> None:
    spec = tmp_path / "fenced.yaml"
    spec.write_text(BACKTICKS, encoding="utf-8")
    plain = _diagram(str(spec), "-f", fmt)
    if fmt == "ascii":
        assert "\n```\n" in plain  # the flow's description puts a fence line of its own in the drawing
    markdown = _diagram(str(spec), "-f", fmt, "--markdown")
    target = tmp_path / "diagram.md"
    _diagram(str(spec), "-f", fmt, "-o", str(target))
    for text in (markdown, target.read_text(encoding="utf-8")):
        tokens = MarkdownIt("commonmark").parse(text)
        assert [(t.type, t.info, t.content) for t in tokens] == [("fence", info, plain)]


def test_python_render_fences_mermaid_the_same_way() -> None:
    plan = flowdsl.compile_text(BACKTICKS)
    out = render(plan, "mermaid", markdown=True)
    assert isinstance(out, str)
    tokens = MarkdownIt("commonmark").parse(out)
    assert [(t.type, t.info, t.content) for t in tokens] == [("fence", "mermaid", _text(plan, "mermaid"))]


# --- display width ----------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    """A line as terminal columns: East Asian wide and fullwidth characters take two (a "" fills the
    second), combining marks and format characters none."""
    row: list[str] = []
    for ch in line:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        row.append(ch)
        if unicodedata.east_asian_width(ch) in ("W", "F"):
            row.append("")
    return row


CJK_TEXT = "注文の必須項目、商品、数量、価格、合計金額をすべて確認します 🚀🚀🚀 then orders.validate_注文_all"


@pytest.mark.parametrize("width", [8, 13, 20, 36, 48])
def test_wrap_measures_display_columns(width: int) -> None:
    lines = wrap(CJK_TEXT, width)
    assert all(len(_cells(line)) <= width for line in lines), lines
    assert "".join(lines).replace(" ", "") == CJK_TEXT.replace(" ", "")  # nothing lost, nothing added
    accented = "e\u0301" * 30  # é as e and a combining acute: one column each
    pieces = wrap(accented, width)
    assert [len(_cells(p)) for p in pieces] == [width] * (30 // width) + ([30 % width] if 30 % width else [])
    assert not any(unicodedata.combining(p[0]) for p in pieces)


CJK = r'''
flowdsl: 1
name: chumon
description: "注文を検証し、在庫を確保し、カードに請求し、商品を発送して、お客様に通知します。失敗したら補償します。"
steps:
  - validate:
      worker: orders.validate
      description: "注文の必須項目、商品、数量、価格、合計金額をすべて確認します 🚀🚀🚀"
  - reserve:
      worker: stock.reserve
      description: "すべての商品を確保するか、何も確保しない"
      compensate: stock.release
  - parallel: heiko
    description: "倉庫と請求を同時に処理する 📦💳"
    branches:
      - sequence: soko
        steps:
          - pack:
              worker: wh.pack
              description: "商品を梱包する🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁🎁"
              compensate: wh.unpack
          - ship
      - charge:
          worker: pay.charge
          description: "カードに請求する💳💳💳💳💳💳💳💳💳💳💳💳💳💳"
          compensate: pay.refund
  - switch: haiso
    "on": "${ order.method }"
    cases:
      速達便でお届けします:
        - express: {worker: ship.express, description: "速達で発送します。追跡番号をお客様にお送りします。"}
      通常便: [standard]
  - notify:
      description: "🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉"
'''
#: step ids the language does not allow, but a plan handed to the renderer may hold
WIDE_IDS = {"validate": "注文検証のステップ", "reserve": "在庫確保", "charge": "請求💳"}


def _box_at(grid: list[list[str]], row: int, col: int) -> tuple[int, int, int, int]:
    """The box around the text at (row, col): top row, left and right columns, bottom row; asserts
    that every row between has its side at exactly those two columns."""
    left = col - 2
    assert grid[row][left] in "│┆", (row, col)
    top = row
    while grid[top][left] != "┌":
        top -= 1
        assert grid[top][left] in "│┆├┌", (top, left)
    right = left + 1
    while grid[top][right] in "─┄┬":
        right += 1
    assert grid[top][right] == "┐", grid[top]
    bottom = top + 1
    while grid[bottom][left] != "└":
        assert grid[bottom][left] in "│┆├" and grid[bottom][right] in "│┆┤", "".join(grid[bottom])
        bottom += 1
    assert grid[bottom][right] == "┘" and all(c in "─┄┬┴" for c in grid[bottom][left + 1:right])
    return top, left, right, bottom


@pytest.mark.parametrize("width", [40, 50, 60, 80, 120])
def test_boxes_of_cjk_and_emoji_text_line_up_within_the_width(width: int) -> None:
    plan = flowdsl.compile_text(CJK)
    for key, ident in WIDE_IDS.items():
        plan["nodes"][key]["id"] = ident
    out = render(plan, "ascii", width=width)
    assert isinstance(out, str)
    assert "note:" not in out  # nothing here nests deeply: it all fits
    lines = out.splitlines()
    assert max(len(_cells(line)) for line in lines) <= width
    grid = [_cells(line) + [" "] * (width + 1 - len(_cells(line))) for line in lines]
    steps = [*WIDE_IDS.values(), "pack", "ship", "express", "standard", "notify"]
    boxes = []
    for title in [*steps, "↶ stock.release", "↶ wh.unpack", "↶ pay.refund"]:  # beside a step or in its box
        row = next(i for i, line in enumerate(lines) if title in line)
        col = len(_cells(lines[row][:lines[row].index(title)]))
        boxes.append(_box_at(grid, row, col))
    assert len(set(boxes[:len(steps)])) == len(steps)
