"""ASCII renderer: a plan as boxes and arrows for a terminal, a code review or a commit message.

Stage: renderer. Reads the plan only (through :mod:`flowdsl.render.view`);
imports stdlib only.

The layout is built bottom-up from rectangular blocks that share one axis
column (where the flow enters and leaves):

- a step is a box (an LLM step a double-lined box); a step with a
  compensation has a dashed undo box beside it, reached by ``┄┄▷``; in a chain
  of steps the undo boxes line up and ``┆ ▲`` rails join them, pointing
  upwards, so the rollback path reads in reverse; a footer lists the whole
  rollback order;
- a plain sequence is a column of blocks joined by ``▼``;
- a parallel's branches are lanes side by side between a fork bar and a join
  bar (``╒═╧═╕`` ... ``╘═╤═╛``); a switch's cases are lanes under a
  decision, each captioned with its case; a list written with ``needs:`` is
  drawn layer by layer with buses between the layers and each node's needs
  written in its box;
- named groups (sequence, for_each, switch, sub-flow) are framed, with their
  title in the frame; a for_each says what it iterates and gathers.

When lanes do not fit the width (80 columns by default) they are drawn one
under another, hanging off a ``║`` rail, instead of being cut. Unicode box
drawing by default; ``ascii_only`` uses ``+-|`` and friends.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.render.runstate import RunStates
from flowdsl.render.view import Glyphs, PlanView, clean, retry_text, wrap

Row = list[str]  # one cell per display column; a wide character is followed by a "" cell

_LIGHT = {(1, 1, 0, 0): "│", (0, 0, 1, 1): "─", (1, 0, 0, 1): "└", (1, 0, 1, 0): "┘", (0, 1, 0, 1): "┌",
          (0, 1, 1, 0): "┐", (1, 1, 0, 1): "├", (1, 1, 1, 0): "┤", (0, 1, 1, 1): "┬", (1, 0, 1, 1): "┴",
          (1, 1, 1, 1): "┼"}
_DOUBLE = {(1, 1, 0, 0): "│", (0, 0, 1, 1): "═", (1, 0, 0, 1): "╘", (1, 0, 1, 0): "╛", (0, 1, 0, 1): "╒",
           (0, 1, 1, 0): "╕", (1, 1, 0, 1): "╞", (1, 1, 1, 0): "╡", (0, 1, 1, 1): "╤", (1, 0, 1, 1): "╧",
           (1, 1, 1, 1): "╪"}


@dataclass(frozen=True)
class _Frame:
    """Corner, edge and exit characters of a box or frame: tl, tr, bl, br, horizontal, vertical, exit."""

    tl: str
    tr: str
    bl: str
    br: str
    h: str
    v: str
    exit: str


@dataclass(frozen=True)
class _Chars:
    step: _Frame
    llm: _Frame
    undo: _Frame
    frames: dict[str, _Frame]
    line: str
    arrow: str
    up: str
    rail_dash: str
    undo_link: str
    rail: str
    rail_arrow: str
    start: str
    end: str
    light: dict[tuple[int, int, int, int], str] | None
    double: dict[tuple[int, int, int, int], str] | None
    marks: dict[str, str]

    def junction(self, key: tuple[int, int, int, int], double: bool) -> str:
        table = self.double if double else self.light
        if table is None:  # ASCII: a plus where lines meet, else the plain line
            up, down, left, right = key
            if (up or down) and (left or right):
                return "+"
            return "|" if up or down else ("=" if double else "-")
        return table.get(key, table[(1, 1, 0, 0)] if key[0] or key[1] else table[(0, 0, 1, 1)])


UNICODE = _Chars(
    step=_Frame("┌", "┐", "└", "┘", "─", "│", "┬"),
    llm=_Frame("╔", "╗", "╚", "╝", "═", "║", "╤"),
    undo=_Frame("┌", "┐", "└", "┘", "┄", "┆", "┬"),
    frames={"sequence": _Frame("╭", "╮", "╰", "╯", "╌", "╎", "┬"),
            "for_each": _Frame("╭", "╮", "╰", "╯", "─", "│", "┬"),
            "switch": _Frame("╭", "╮", "╰", "╯", "┈", "┊", "┬"),
            "flow": _Frame("┏", "┓", "┗", "┛", "━", "┃", "┯")},
    line="│", arrow="▼", up="▲", rail_dash="┆", undo_link="┄┄▷", rail="║", rail_arrow="╟─▶ ",
    start="●", end="◉", light=_LIGHT, double=_DOUBLE,
    marks={"succeeded": "✓", "failed": "✗", "compensated": "↺", "skipped": "⊘", "running": "▶",
           "pending": "·", "cancelled": "⊗"},
)
ASCII = _Chars(
    step=_Frame("+", "+", "+", "+", "-", "|", "+"),
    llm=_Frame("#", "#", "#", "#", "=", "#", "+"),
    undo=_Frame("+", "+", "+", "+", ".", ":", "+"),
    frames={"sequence": _Frame(".", ".", "'", "'", "-", ":", "+"),
            "for_each": _Frame(".", ".", "'", "'", "-", ":", "+"),
            "switch": _Frame(".", ".", "'", "'", "~", ":", "+"),
            "flow": _Frame("#", "#", "#", "#", "=", "#", "+")},
    line="|", arrow="v", up="^", rail_dash=":", undo_link="..>", rail="|", rail_arrow="+-> ",
    start="*", end="@", light=None, double=None,
    marks={"succeeded": "[ok]", "failed": "[FAILED]", "compensated": "[undone]", "skipped": "[skipped]",
           "running": "[running]", "pending": "[pending]", "cancelled": "[cancelled]"},
)


def cells(text: str) -> Row:
    """Text as display cells: wide characters take two, combining marks join the character before."""
    row: Row = []
    for ch in clean(text).replace("\n", " "):
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Cf", "Mn", "Me"):
            if row:
                row[-1 if row[-1] else -2] += ch
            continue
        row.append(ch)
        if unicodedata.east_asian_width(ch) in ("W", "F"):
            row.append("")
    return row


def width_of(text: str) -> int:
    return len(cells(text))


def to_ascii(text: str) -> str:
    """7-bit text: accents dropped (``ü`` -> ``u``), anything else without an ASCII base as ``?``."""
    out = []
    for ch in text:
        if ch.isascii():
            out.append(ch)
        elif not unicodedata.combining(ch):
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?")
    return "".join(out)


#: plan fields that hold node keys or expression ids: references, not display text
_REFERENCES = frozenset({"key", "parent", "scope", "deps", "children", "default", "root", "when", "fail_when",
                         "items"})


def ascii_plan(value: Any, field: str | None = None) -> Any:
    """A copy of a plan whose display texts are 7-bit; node keys and references between nodes are kept."""
    if isinstance(value, dict):
        if field in ("nodes", "expressions"):  # keyed by node keys and expression ids
            return {k: ascii_plan(v) for k, v in value.items()}
        return {k: v if k in _REFERENCES or (k == "on" and isinstance(v, str)) else ascii_plan(v, k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [ascii_plan(v, field) for v in value]
    return to_ascii(value) if isinstance(value, str) else value


@dataclass
class Block:
    """A rectangle of cells; the flow enters at the top and leaves at the bottom of column ``axis``.

    ``head_line``: the row above should continue a line rather than end in an arrow.
    ``undo``: (column, first row, last row) of the undo box of a step block.
    ``undo_inside``: a group holding compensated steps (a rollback rail must not skip past it).
    """

    rows: list[Row]
    axis: int
    head_line: bool = False
    undo: tuple[int, int, int] | None = None
    undo_inside: bool = False

    @property
    def width(self) -> int:
        return max((len(r) for r in self.rows), default=0)

    @property
    def height(self) -> int:
        return len(self.rows)


def _blank(width: int) -> Row:
    return [" "] * width


def _put(row: Row, col: int, text: str | Row) -> None:
    cs = cells(text) if isinstance(text, str) else text
    if len(row) < col + len(cs):
        row.extend(" " * (col + len(cs) - len(row)))
    row[col:col + len(cs)] = cs


def _pad(block: Block, width: int) -> None:
    for row in block.rows:
        if len(row) < width:
            row.extend(" " * (width - len(row)))


class _Ascii:
    def __init__(self, view: PlanView, states: RunStates | None, ascii_only: bool, width: int):
        self.view = view
        self.states = states
        self.c = ASCII if ascii_only else UNICODE
        self.g = Glyphs.pick(ascii_only)
        self.width = max(width, 40)

    # --- leaves ------------------------------------------------------------------------

    def mark(self, state: str | None) -> str:
        return f"{self.c.marks[state]} " if state is not None else ""

    def box(self, frame: _Frame, lines: list[str], inner: int) -> list[Row]:
        inner = max([inner, *(width_of(s) for s in lines)])
        top = cells(frame.tl + frame.h * (inner + 2) + frame.tr)
        rows = [top]
        for s in lines:
            row = cells(frame.v + " ")
            row += cells(s) + _blank(inner - width_of(s)) + cells(" " + frame.v)
            rows.append(row)
        rows.append(cells(frame.bl + frame.h * (inner + 2) + frame.br))
        return rows

    def step_lines(self, key: str, inner_max: int, needs: bool) -> list[str]:
        text = self.view.step_text(key, self.g, short_worker=True, needs=needs)
        state = self.states.steps.get(key, "pending") if self.states is not None else None
        title = self.mark(state) + text.title
        if self.states is not None and self.states.iterations.get(key):
            title += f" ×{self.states.iterations[key]}" if self.c is UNICODE else f" x{self.states.iterations[key]}"
        out = wrap(title, inner_max)
        for line in text.lines:
            out.extend(wrap(line, inner_max))
        if text.policy:
            out.extend(wrap(text.policy, inner_max))
        return out

    def step(self, key: str, avail: int, *, needs: bool = False, min_inner: int = 0) -> Block:
        """A step box; its undo box beside it when there is room, else in a dashed compartment below."""
        inner_max = max(min(36, avail - 4), 12)
        lines = self.step_lines(key, inner_max, needs)
        frame = self.c.llm if self.view.kind(key) == "llm" else self.c.step
        undo_lines: list[str] = []
        beside = False
        if self.view.node(key).get("compensate"):
            undo = self.view.undo_text(key, self.g)
            ustate = self.states.undos.get(key) if self.states is not None else None
            title = self.mark(ustate) + undo.title
            box_w = max([min_inner, *(width_of(s) for s in lines)]) + 4
            room = min(avail - box_w - width_of(self.c.undo_link) - 4, 30)
            beside = room >= 16
            size = room if beside else inner_max
            undo_lines = wrap(title, size) + (wrap(undo.policy, size) if undo.policy else [])
        if undo_lines and not beside:
            rows = self.box(frame, lines + undo_lines, min_inner)
            split = len(lines) + 1
            inner = len(rows[0]) - 4
            left, right = ("+", "+") if self.c is ASCII else ("├", "┤") if frame is self.c.step else ("╟", "╢")
            rows.insert(split, cells(left + self.c.undo.h * (inner + 2) + right))
        else:
            rows = self.box(frame, lines, min_inner)
        box_w, box_h = len(rows[0]), len(rows)
        axis = box_w // 2
        rows[-1][axis] = frame.exit
        block = Block(rows, axis)
        if undo_lines and beside:
            urows = self.box(self.c.undo, undo_lines, 0)
            col = box_w + width_of(self.c.undo_link)
            while len(block.rows) < len(urows):
                block.rows.append(_blank(box_w))
            for i, r in enumerate(urows):
                _put(block.rows[i], col, r)
            _put(block.rows[1], box_w, self.c.undo_link)
            block.undo = (col + 3, 0, len(urows) - 1)  # the rail column: aligned in a chain of equal boxes
            for r in block.rows[box_h:]:  # the flow line continues below a short step box
                r[axis] = self.c.line
        _pad(block, block.width)
        return block

    def note_rows(self, col: int, texts: list[str], width: int) -> list[Row]:
        """Rows with the flow line at ``col`` and text beside it."""
        out = []
        for t in texts:
            row = _blank(width)
            row[col] = self.c.line
            _put(row, col + 2, t)
            out.append(row)
        return out

    def line_block(self, height: int = 1) -> Block:
        return Block([[self.c.line] for _ in range(height)], 0, head_line=True)

    # --- composition ---------------------------------------------------------------------

    def stack(self, blocks: list[Block]) -> Block:
        """Blocks one under another on a shared axis, joined by arrows; undo rails between steps."""
        axis = max(b.axis for b in blocks)
        width = max(axis - b.axis + b.width for b in blocks)
        rows: list[Row] = []
        undos: list[tuple[int, int, int] | None] = []  # None: a group with undos of its own
        for i, b in enumerate(blocks):
            if i:
                gap = _blank(width)
                gap[axis] = self.c.line if b.head_line else self.c.arrow
                rows.append(gap)
            shift = axis - b.axis
            top = len(rows)
            for r in b.rows:
                rows.append(_blank(shift) + r + _blank(width - shift - len(r)))
            if b.undo is not None:
                undos.append((b.undo[0] + shift, top + b.undo[1], top + b.undo[2]))
            elif b.undo_inside:
                undos.append(None)
        for upper, lower in itertools.pairwise(undos):
            if upper is None or lower is None:
                continue
            (c1, _, bottom), (c2, next_top, _) = upper, lower
            span = range(bottom + 1, next_top)
            if c1 == c2 and len(span) and all(rows[i][c1] == " " for i in span):
                for i in span:
                    rows[i][c1] = self.c.rail_dash
                rows[bottom + 1][c1] = self.c.up
        return Block(rows, axis, head_line=blocks[0].head_line, undo_inside=bool(undos))

    def bus(self, width: int, ups: set[int], downs: set[int], double: bool) -> Row:
        row = _blank(width)
        cols = ups | downs
        lo, hi = min(cols), max(cols)
        for c in range(lo, hi + 1):
            key = (int(c in ups), int(c in downs), int(c > lo), int(c < hi))
            row[c] = self.c.junction(key, double)
        return row

    def lanes(self, build: Callable[[int], list[Block]], captions: list[str | None], avail: int,
              double: bool, tail: str | None) -> Block:
        """Lanes side by side between a fork and a join bus; one under another when too wide."""
        gap = 3
        n = len(captions)
        if n == 0:  # a group with nothing in it: the flow passes straight through
            return self.line_block() if tail is None else Block(self.note_rows(0, [tail], 1), 0, head_line=True)
        tries = [avail] + ([(avail - gap * (n - 1)) // n] if n > 1 and (avail - gap * (n - 1)) // n >= 16 else [])
        for lane_avail in tries:
            blocks = build(lane_avail)
            for b, cap in zip(blocks, captions, strict=True):
                _pad(b, max(b.width, b.axis + 2 + width_of(cap)) if cap else b.width)
            total = sum(b.width for b in blocks) + gap * (n - 1)
            if total <= avail or n == 1:
                return self._side_by_side(blocks, captions, double, tail)
        return self._stacked(build(avail - width_of(self.c.rail_arrow)), captions, tail)

    def _side_by_side(self, blocks: list[Block], captions: list[str | None], double: bool,
                      tail: str | None) -> Block:
        gap = 3
        axes, x = [], 0
        for b in blocks:
            axes.append(x + b.axis)
            x += b.width + gap
        width = x - gap
        axis = (axes[0] + axes[-1]) // 2
        nearest = min(axes, key=lambda a: (abs(a - axis), a))
        if abs(nearest - axis) <= 3:
            axis = nearest
        height = max(b.height for b in blocks)
        rows = [self.bus(width, {axis}, set(axes), double)]
        if any(captions):
            row = _blank(width)
            for a, cap in zip(axes, captions, strict=True):
                row[a] = self.c.line
                if cap:
                    _put(row, a + 2, cap)
            rows.append(row)
        row = _blank(width)
        for a, b in zip(axes, blocks, strict=True):
            row[a] = self.c.line if b.head_line else self.c.arrow
        rows.append(row)
        x = 0
        body = [_blank(width) for _ in range(height)]
        for b in blocks:
            for i in range(height):
                if i < b.height:
                    _put(body[i], x, b.rows[i])
                else:
                    body[i][x + b.axis] = self.c.line
            x += b.width + gap
        rows += body
        last = self.bus(width, set(axes), {axis}, double)
        if tail:
            _put(last, max(axes) + 2, tail)
        rows.append(last)
        return Block(rows, axis, head_line=True)

    def _stacked(self, blocks: list[Block], captions: list[str | None], tail: str | None) -> Block:
        c = self.c
        indent = width_of(c.rail_arrow)
        rows: list[Row] = []
        for b, cap in zip(blocks, captions, strict=True):
            if cap:
                rows.append(cells(c.rail + " " + cap))
            for i, r in enumerate(b.rows):
                rows.append(cells(c.rail_arrow if i == 0 else c.rail + " " * (indent - 1)) + r)
        rows.append(cells(c.rail + " " + (tail or "")))
        block = Block(rows, 0, head_line=True)
        _pad(block, block.width)
        return block

    def frame(self, kind: str, title: str, lines: list[str], inner: Block, avail: int,
              foot: list[str] | None = None) -> Block:
        """A titled frame around ``inner``: detail lines on top, an arrow into the inner block."""
        f = self.c.frames[kind]
        content_w = max(inner.width, min(max((width_of(s) for s in lines), default=0), avail - 4))
        texts = [t for s in lines for t in wrap(s, max(content_w, 12))]
        content_w = max([content_w, width_of(title) + 2, *(width_of(t) for t in texts)])
        body: list[Row] = [cells(t) for t in texts]
        arrow = _blank(content_w)
        arrow[inner.axis] = self.c.line if inner.head_line else self.c.arrow
        body.append(arrow)
        body += [list(r) for r in inner.rows]
        for t in foot or []:
            body += self.note_rows(inner.axis, [t], content_w)
        body.append(_blank(content_w))
        body[-1][inner.axis] = self.c.line
        top = cells(f.tl + f.h + " " + title + " ")
        top += cells(f.h * (content_w + 4 - len(top) - 1) + f.tr)
        rows = [top]
        for r in body:
            rows.append(cells(f.v + " ") + r + _blank(content_w - len(r)) + cells(" " + f.v))
        bottom = cells(f.bl + f.h * (content_w + 2) + f.br)
        bottom[inner.axis + 2] = f.exit
        rows.append(bottom)
        return Block(rows, inner.axis + 2)

    # --- nodes ---------------------------------------------------------------------------

    def node(self, key: str, avail: int, *, needs: bool = False, min_inner: int = 0) -> Block:
        if self.view.is_step(key):
            return self.step(key, avail, needs=needs, min_inner=min_inner)
        block = self.group(key, avail, needs)
        block.undo_inside = any(self.view.node(k).get("compensate") for k in self.view.steps_in(key))
        return block

    def group(self, key: str, avail: int, needs: bool) -> Block:
        view = self.view
        kind = view.kind(key)
        title = view.group_title(key)
        lines = view.group_lines(key, self.g, needs=needs)
        if kind == "parallel":
            kids = view.children(key)
            block = self.lanes(lambda a: [self.node(k, a) for k in kids], [None] * len(kids), avail,
                               True, "join")
            notes = [f"∥ {title}" if self.c is UNICODE else f"|| {title}", *lines]
            texts = [t for s in notes for t in wrap(s, max(avail - block.axis - 3, 16))]
            head = self.note_rows(block.axis, texts, block.width)
            return Block(head + block.rows, block.axis, head_line=True)
        inner_avail = avail - 4
        if kind == "switch":
            lanes = view.lanes(key)
            captions: list[str | None] = [lane.caption for lane in lanes]
            keys = [lane.keys for lane in lanes]
            if view.node(key).get("default") is None:
                captions.append("no match")
                keys.append(())
            inner = self.lanes(lambda a: [self.list_(ks, a) for ks in keys], captions, inner_avail, False,
                               "merge")
            return self.frame("switch", title, [*lines, view.switch_text(key)], inner, avail)
        if kind == "for_each":
            body = self.list_(view.lanes(key)[0].keys, inner_avail)
            fan = ("⇶ " if self.c is UNICODE else ">> ") + view.fan_out_text(key, self.g)
            return self.frame("for_each", title, [*lines, fan], body, avail,
                              foot=[view.gather_text(key, self.g)])
        body = self.list_(view.lanes(key)[0].keys if view.lanes(key) else (), inner_avail)
        return self.frame("flow" if kind == "flow" else "sequence", title, lines, body, avail)

    def list_(self, keys: tuple[str, ...], avail: int) -> Block:
        """A sibling list: a column when it is a plain chain, else layer by layer."""
        if not keys:
            return self.line_block()
        view = self.view
        if view.is_chain(keys):
            inner_max = max(min(36, avail - 4), 12)
            inner = max((width_of(s) for k in keys if view.is_step(k)
                         for s in self.step_lines(k, inner_max, False)), default=0)
            return self.stack([self.node(k, avail, min_inner=inner) for k in keys])
        layers = view.list_layers(keys)
        parts: list[Block] = []
        for layer in layers:
            if len(layer) == 1:
                parts.append(self.node(layer[0], avail, needs=True))
            else:
                parts.append(self.lanes(self._layer_builder(layer), [None] * len(layer), avail, False, None))
        return self.stack(parts)

    def _layer_builder(self, layer: list[str]) -> Callable[[int], list[Block]]:
        return lambda avail: [self.node(k, avail, needs=True) for k in layer]

    # --- the whole diagram -----------------------------------------------------------------

    def render(self) -> str:
        view, c = self.view, self.c
        body = self.list_(view.root, self.width)
        start = Block([cells(f"{c.start} start")], 0)
        end = Block([cells(f"{c.end} end")], 0, head_line=False)
        whole = self.stack([start, body, end])
        lines = [view.flow_title(self.g)]
        if view.flow.get("description"):
            lines += wrap(str(view.flow["description"]), self.width)
        lines.append("")
        lines += ["".join(r).rstrip() for r in whole.rows]
        lines += self.footer()
        return "\n".join(lines).rstrip("\n") + "\n"

    def footer(self) -> list[str]:
        view, c, g = self.view, self.c, self.g
        out: list[str] = []
        steps = [view.node(k) for k in view.steps()]
        present = {"retry": any(retry_text(n.get("retry"), g) for n in steps),
                   "timeout": any(n.get("timeout_ms") for n in steps),
                   "llm": any(n.get("kind") == "llm" for n in steps),
                   "undo": any(n.get("compensate") for n in steps)}
        meanings = {"retry": f"{g.retry.strip()} N: N attempts in all (backoff, delays)",
                    "timeout": f"{g.timeout.strip()}: timeout of each attempt",
                    "llm": f"{c.llm.tl}{c.llm.h}{c.llm.tr}: LLM step",
                    "undo": f"{c.undo_link} {g.undo}: compensation (undo)"}
        shown = [meanings[k] for k, on in present.items() if on]
        if shown:
            out += ["", *wrap("key: " + "; ".join(shown), self.width)]
        levels = view.rollback_levels()
        if levels:
            par = "∥" if c is UNICODE else "||"
            together = any(len(level) > 1 for level in levels)
            out += ["", *wrap("rollback: on failure, each completed step is undone, in this order"
                              + (f" ({par}: at the same time):" if together else ":"), self.width)]
            for i, level in enumerate(levels, 1):
                for j, k in enumerate(level):
                    worker = (view.node(k).get("compensate") or {}).get("worker")
                    head = f"{i:>3}. " if j == 0 else f"{par:>4} "
                    text = f"{g.undo} {worker} (for {to_ascii(k) if c is ASCII else k})"
                    out += [(head if n == 0 else " " * 5) + t for n, t in enumerate(wrap(text, self.width - 5))]
        if self.states is not None:
            out += ["", self.states.caption()]
            line = " "
            for state, mark in c.marks.items():
                entry = f" {mark} {state}"
                if len(line) + len(entry) > self.width:
                    out.append(line)
                    line = " "
                line += entry
            out.append(line)
        return out


def render_ascii(plan: Mapping[str, Any], *, run_states: RunStates | None = None, ascii_only: bool = False,
                 width: int = 80) -> str:
    """The plan as box-and-arrow text, at most ``width`` columns when it can be drawn so."""
    return _Ascii(PlanView(ascii_plan(plan) if ascii_only else plan), run_states, ascii_only, width).render()
