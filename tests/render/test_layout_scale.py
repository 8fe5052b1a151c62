"""The ASCII layout of large ``needs:`` graphs: long chains and wide layers are drawn in near-linear time.

A chain of 1,200 nodes each needing the two before it took 12-19 s to draw, 2,400 nodes ~50 s: the
layout routed, cell by cell, every line of a drawing that drifted wider with each layer, only to
throw it away for the listing. These tests draw thousands of nodes and check what is drawn; they
assert no time (benchmarks/bench_scale.py --diagrams measures it).
"""

from __future__ import annotations

import inspect
import random
import re
import sys
from typing import Any

import pytest

import flowdsl
from flowdsl.render import render
from flowdsl.render.ascii import Block, _Ascii
from flowdsl.render.view import PlanView


def _flow(text: str) -> dict[str, Any]:
    return flowdsl.compile_text(text, filename="spec.flow")


def _ascii(plan: dict[str, Any]) -> list[str]:
    out = render(plan, "ascii")
    assert isinstance(out, str)
    return out.splitlines()


def _chain(n: int) -> dict[str, Any]:
    """n compensated steps, each needing the two before it, listed last first."""
    return _flow("flow chain\n" + "".join(
        f"step s{i} undo u{i} needs {', '.join(f's{j}' for j in (i - 1, i - 2) if j >= 0) or '[]'}\n"
        for i in reversed(range(n))))


def _layers(n: int, across: int) -> dict[str, Any]:
    """n steps in layers of ``across``, step j of a layer needing steps j and j + 1 of the layer above."""
    lines = ["flow layers"]
    for i in range(n):
        layer, j = divmod(i, across)
        above = sorted({f"l{layer - 1}_{k % across}" for k in (j, j + 1)}) if layer else []
        lines.append(f"step l{layer}_{j} needs {', '.join(above) or '[]'}")
    return _flow("\n".join(lines) + "\n")


def _titles(lines: list[str]) -> list[str]:
    """The step ids in the order their boxes are drawn (the first word of each box's first line)."""
    return re.findall(r"[│║] ([lsd]\d+(?:_\d+)?) +[│║]", "\n".join(lines))


def test_a_long_needs_chain_is_drawn() -> None:
    n = 2400
    lines = _ascii(_chain(n))
    assert max(len(line) for line in lines) <= 80
    # too long a drawing to line up in 80 columns: listed in an order the steps can run in
    assert _titles(lines) == [f"s{i}" for i in range(n)]
    assert any(line.startswith(f"│ needs: s{n - 3}, s{n - 2} ") for line in lines)
    assert f"  1. ↶ u{n - 1} (for s{n - 1})" in lines and f"{n}. ↶ u0 (for s0)" in lines


def test_a_wide_layered_dag_is_drawn() -> None:
    n, across = 1000, 10
    plan = _layers(n, across)
    lines = _ascii(plan)
    assert max(len(line) for line in lines) <= 80
    order = _titles(lines)
    assert sorted(order) == sorted(f"l{i // across}_{i % across}" for i in range(n))
    at = {key: i for i, key in enumerate(order)}
    for key, node in plan["nodes"].items():
        assert all(at[dep] < at[key] for dep in node["deps"]), key


def test_a_long_narrow_dag_is_drawn_as_a_graph() -> None:
    """Diamond after diamond: it fits the width, so every edge is routed, layer after layer."""
    k = 300
    lines = _ascii(_flow("flow diamonds\nstep d0 needs []\n" + "".join(
        f"step l{i} needs d{i}\nstep r{i} needs d{i}\nstep d{i + 1} needs l{i}, r{i}\n" for i in range(k))))
    text = "\n".join(lines)
    assert "┆" not in text  # drawn, not listed
    assert max(len(line) for line in lines) <= 80
    assert len(re.findall(r"┌─+┴─+┐", text)) == k  # each d splits into its l and r ...
    assert sum(line.count("▼") == 2 for line in lines) == k  # ... entered side by side
    assert [t for t in _titles(lines) if t.startswith("d")] == [f"d{i}" for i in range(k + 1)]


def test_a_graph_too_wide_to_draw_routes_no_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its width is known from the layout: no row of it is drawn before it is given up for the listing."""
    routed: list[int] = []
    channel = _Ascii.channel

    def counting(self: _Ascii, *args: Any) -> Any:
        routed.append(1)
        return channel(self, *args)

    monkeypatch.setattr(_Ascii, "channel", counting)
    lines = _ascii(_chain(200))
    assert any(line.strip() == "┆" for line in lines) and not routed  # listed


def test_needs_layers_are_found_without_recursion() -> None:
    """However deep the chain, listed in any order: the layering is a loop, not a recursion."""
    plan = _chain(3000)
    view = PlanView(plan)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 60)
    try:
        layers = view.list_layers(tuple(plan["root"]))
    finally:
        sys.setrecursionlimit(limit)
    assert layers == [[f"s{i}"] for i in range(3000)]


def test_blocks_share_the_axis_most_of_them_can_take() -> None:
    """The shared column of a stack is the leftmost one the most blocks can take (as counted pairwise)."""
    rng = random.Random(20261204)
    for _ in range(300):
        avail = rng.randint(40, 120)
        blocks = []
        for _ in range(rng.randint(1, 12)):
            width = rng.randint(1, avail + 20)
            blocks.append(Block([[" "] * width], rng.randint(0, width - 1)))
        spans = [(b.axis, max(b.axis, avail - b.width + b.axis)) for b in blocks]
        best = max(sorted({lo for lo, _ in spans} | {hi for _, hi in spans}),
                   key=lambda a: (sum(lo <= a <= hi for lo, hi in spans), -a))
        assert _Ascii._fit_axes(blocks, avail) == (best, [min(max(best, lo), hi) for lo, hi in spans])
