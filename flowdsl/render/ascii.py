"""ASCII renderer: a plan as boxes and arrows for a terminal, a code review or a commit message.

Stage: renderer. Reads the plan only (through :mod:`flowdsl.render.view`);
imports stdlib only.

The layout is built bottom-up from rectangular blocks that share one axis
column (where the flow enters and leaves):

- a step is a box (an LLM step a double-lined box, a wait node a box
  titled ``⚐``); a step with a
  compensation has a dashed undo box beside it, reached by ``┄┄▷``; in a chain
  of steps the undo boxes line up and ``┆ ▲`` rails join them, pointing
  upwards, so the rollback path reads in reverse; a footer lists the whole
  rollback order;
- a plain sequence is a column of blocks joined by ``▼``;
- a parallel's branches are lanes side by side between a fork bar and a join
  bar (``╒═╧═╕`` ... ``╘═╤═╛``); a switch's cases are lanes under a
  decision, each captioned with its case; a list written with ``needs:`` is
  drawn layer by layer, every edge its own line (lines split below a box,
  merge just above the box they enter, and cross with a ``│`` cutting a ``─``),
  each node's needs written in its box; too wide for that, it is listed;
- named groups (sequence, for_each, switch, sub-flow) are framed, with their
  title in the frame; a for_each says what it iterates and gathers.

No line is longer than the width (80 columns by default, at least 40): lanes
that do not fit are drawn one under another, hanging off a ``║`` rail; text is
wrapped to the room left; a block that sticks out once lined up is redrawn
narrower, else the flow line jogs sideways to it. Only groups nested deeper than
the width allows are drawn wider, with a note saying so. Unicode box drawing by
default; ``ascii_only`` uses ``+-|`` and friends.
"""

from __future__ import annotations

import bisect
import itertools
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.render.runstate import RunStates
from flowdsl.render.view import Glyphs, PlanView, RenderError, char_width, clean, retry_text, text_width, wrap

#: the narrowest width the ASCII form is drawn at (``--width``'s minimum)
MIN_WIDTH = 40

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
    marks={"succeeded": "✓", "failed": "✗", "passed_over": "↷", "compensated": "↺", "skipped": "⊘",
           "running": "▶", "waiting": "‖", "pending": "·", "cancelled": "⊗"},
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
    marks={"succeeded": "[ok]", "failed": "[FAILED]", "passed_over": "[passed over]", "compensated": "[undone]",
           "skipped": "[skipped]", "running": "[running]", "waiting": "[waiting]", "pending": "[pending]",
           "cancelled": "[cancelled]"},
)


def cells(text: str) -> Row:
    """Text as display cells, one per terminal column as :func:`~flowdsl.render.view.char_width` counts
    them (the measure :func:`~flowdsl.render.view.wrap` uses): a wide character takes two, a combining
    mark joins the character before."""
    flat = clean(text).replace("\n", " ")
    if flat.isascii():  # one cell per character
        return list(flat)
    row: Row = []
    for ch in flat:
        size = char_width(ch)
        if not size:
            if row:
                row[-1 if row[-1] else -2] += ch
            continue
        row.append(ch)
        if size == 2:
            row.append("")
    return row


def width_of(text: str) -> int:
    """The columns ``text`` takes once drawn: ``len(cells(text))``."""
    return text_width(clean(text))


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
    ``strained``: drawn only by squeezing (a block redrawn narrower to line up, a jogging line,
    a ``needs:`` graph listed): lanes are not redrawn narrower into such a shape.
    """

    rows: list[Row]
    axis: int
    head_line: bool = False
    undo: tuple[int, int, int] | None = None
    undo_inside: bool = False
    strained: bool = False
    uses: frozenset[str] = frozenset()  # forms drawn in it that the key explains: "undo beside", "undo inside"

    @property
    def width(self) -> int:
        return max((len(r) for r in self.rows), default=0)

    @property
    def height(self) -> int:
        return len(self.rows)


def _uses(blocks: list[Block]) -> frozenset[str]:
    return frozenset().union(*(b.uses for b in blocks))


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
        if width < MIN_WIDTH:
            raise RenderError(f"width {width} is too narrow: the ASCII form needs at least {MIN_WIDTH} columns")
        self.width = width

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
        text = self.view.step_text(key, self.g, needs=needs)
        wait = self.view.kind(key) == "wait"
        state = self.states.state_of(key, wait=wait) if self.states is not None else None
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
        if self.view.is_step(key) and self.view.node(key).get("compensate"):
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
        block = Block(rows, axis, uses=frozenset({("undo beside" if beside else "undo inside")} if undo_lines else ()))
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

    def stack(self, blocks: list[Block], avail: int | None = None, *, link: str | None = None,
              rails: bool = True) -> Block:
        """Blocks one under another joined by arrows (``link`` instead, when given); undo rails between steps.

        The blocks share one axis when that fits ``avail``; else each block is placed as near that
        axis as the width allows, and the line jogs sideways (``└──┐``) between blocks that do not
        line up.
        """
        axis = max(b.axis for b in blocks)
        width = max(axis - b.axis + b.width for b in blocks)
        if avail is None or width <= avail:
            cols = [axis] * len(blocks)
        else:
            axis, cols = self._fit_axes(blocks, avail)
            width = max(max(x - b.axis + b.width for b, x in zip(blocks, cols, strict=True)), axis + 1)
        rows: list[Row] = []
        undos: list[tuple[int, int, int] | None] = []  # None: a group with undos of its own
        head_line = blocks[0].head_line
        prev = axis
        for i, b in enumerate(blocks):
            col = cols[i]
            if col != prev:
                rows.append(self.jog(width, prev, col))
                if i == 0:
                    head_line = True  # the row above must continue the line into the jog
            if i or col != prev:
                gap = _blank(width)
                gap[col] = (link or self.c.line) if b.head_line else (link or self.c.arrow)
                rows.append(gap)
            shift = col - b.axis
            top = len(rows)
            for r in b.rows:
                rows.append(_blank(shift) + r + _blank(width - shift - len(r)))
            if b.undo is not None:
                undos.append((b.undo[0] + shift, top + b.undo[1], top + b.undo[2]))
            elif b.undo_inside:
                undos.append(None)
            prev = col
        if prev != axis:
            rows.append(self.jog(width, prev, axis))
        for upper, lower in itertools.pairwise(undos if rails else []):
            if upper is None or lower is None:
                continue
            (c1, _, bottom), (c2, next_top, _) = upper, lower
            span = range(bottom + 1, next_top)
            if c1 == c2 and len(span) and all(rows[i][c1] == " " for i in span):
                for i in span:
                    rows[i][c1] = self.c.rail_dash
                rows[bottom + 1][c1] = self.c.up
        strained = any(b.strained for b in blocks) or any(c != axis for c in cols)
        return Block(rows, axis, head_line=head_line, undo_inside=bool(undos), strained=strained,
                     uses=_uses(blocks))

    @staticmethod
    def _fit_axes(blocks: list[Block], avail: int) -> tuple[int, list[int]]:
        """A shared axis column that most blocks can take within ``avail``, and each block's own column."""
        spans = [(b.axis, max(b.axis, avail - b.width + b.axis)) for b in blocks]
        los, his = sorted(lo for lo, _ in spans), sorted(hi for _, hi in spans)
        best, most = 0, -1
        for a in sorted(set(los) | set(his)):  # the leftmost column in the most spans, counted by bisection
            held = bisect.bisect_right(los, a) - bisect.bisect_left(his, a)
            if held > most:
                best, most = a, held
        return best, [min(max(best, lo), hi) for lo, hi in spans]

    def jog(self, width: int, above: int, below: int) -> Row:
        """A row that carries the flow line sideways from column ``above`` to column ``below``."""
        row = _blank(width)
        lo, hi = min(above, below), max(above, below)
        for c in range(lo, hi + 1):
            row[c] = self.c.junction((int(c == above), int(c == below), int(c > lo), int(c < hi)), False)
        return row

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
            if (total <= avail or n == 1) and (lane_avail == avail or not any(b.strained for b in blocks)):
                return self._side_by_side(blocks, captions, double, tail)
        return self._stacked(build(avail - width_of(self.c.rail_arrow)), captions, tail, avail)

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
        return Block(rows, axis, head_line=True, strained=any(b.strained for b in blocks), uses=_uses(blocks))

    def _stacked(self, blocks: list[Block], captions: list[str | None], tail: str | None, avail: int) -> Block:
        c = self.c
        indent = width_of(c.rail_arrow)
        rows: list[Row] = []
        for b, cap in zip(blocks, captions, strict=True):
            for line in wrap(cap, avail - 2) if cap else []:
                rows.append(cells(c.rail + " " + line))
            for i, r in enumerate(b.rows):
                rows.append(cells(c.rail_arrow if i == 0 else c.rail + " " * (indent - 1)) + r)
        rows.append(cells(c.rail + " " + (tail or "")))
        block = Block(rows, 0, head_line=True, strained=any(b.strained for b in blocks), uses=_uses(blocks))
        _pad(block, block.width)
        return block

    def frame(self, kind: str, title: str, lines: list[str], inner: Block, avail: int,
              foot: list[str] | None = None) -> Block:
        """A titled frame around ``inner``: detail lines on top, an arrow into the inner block."""
        f = self.c.frames[kind]
        title, *more = wrap(title, avail - 6)  # the title's first line in the frame's top edge
        lines = [" ".join(more), *lines] if more else lines
        foot = foot or []
        # the foot's notes sit right of the flow line, at the inner block's axis
        wanted = max([*(width_of(s) for s in lines), *(inner.axis + 2 + width_of(t) for t in foot)], default=0)
        content_w = max(inner.width, min(wanted, avail - 4))
        texts = [t for s in lines for t in wrap(s, max(content_w, 12))]
        notes = [t for s in foot for t in wrap(s, max(content_w - inner.axis - 2, 12))]
        content_w = max([content_w, width_of(title) + 2, *(width_of(t) for t in texts),
                         *(inner.axis + 2 + width_of(t) for t in notes)])
        body: list[Row] = [cells(t) for t in texts]
        arrow = _blank(content_w)
        arrow[inner.axis] = self.c.line if inner.head_line else self.c.arrow
        body.append(arrow)
        body += [list(r) for r in inner.rows]
        body += self.note_rows(inner.axis, notes, content_w)
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
        return Block(rows, inner.axis + 2, strained=inner.strained, uses=inner.uses)

    # --- nodes ---------------------------------------------------------------------------

    def node(self, key: str, avail: int, *, needs: bool = False, min_inner: int = 0) -> Block:
        if self.view.is_leaf(key):
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
            return Block(head + block.rows, block.axis, head_line=True, strained=block.strained, uses=block.uses)
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
        """A sibling list: a column when it is a plain chain, else its ``needs:`` graph layer by layer."""
        if not keys:
            return self.line_block()
        view = self.view
        if view.is_chain(keys):
            inner_max = max(min(36, avail - 4), 12)
            inner = max((width_of(s) for k in keys if view.is_leaf(k)
                         for s in self.step_lines(k, inner_max, False)), default=0)
            return self.column([self._chain_builder(k, inner) for k in keys], avail)
        graph = _Dag(view, keys)
        widest = max(len(slots) for slots in graph.slots)
        tries = [avail]
        narrow = min((avail - 3 * (len(slots) - 1) - sum(1 for s in slots if s[0] == "via"))
                     // max(1, sum(1 for s in slots if s[0] == "node")) for slots in graph.slots)
        if widest > 1 and 16 <= narrow < avail:
            tries.append(narrow)
        whole: dict[str, Block] = {}  # the boxes at the full width, which the listing reuses (dag copies them)
        for node_avail in tries:
            blocks = {k: self.node(k, node_avail, needs=True) for k in keys}
            whole = whole or blocks
            block = self.dag(graph, blocks, avail)
            if block is not None:
                return block
        return self.listing(graph, avail, whole)

    def _chain_builder(self, key: str, inner: int) -> Callable[[int], Block]:
        return lambda avail: self.node(key, avail, min_inner=min(inner, max(avail - 4, 12)))

    def column(self, builders: list[Callable[[int], Block]], avail: int) -> Block:
        """Blocks one under another on a shared axis; a block that would stick out past ``avail``
        once lined up is redrawn narrower (its text wrapped shorter, an undo box moved into its
        step's box) before the line is made to jog."""
        blocks = [build(avail) for build in builders]
        for _ in range(3):
            axis = max(b.axis for b in blocks)
            over = [i for i, b in enumerate(blocks) if axis - b.axis + b.width > avail and b.axis < axis]
            if not over:
                break
            for i in over:
                blocks[i] = builders[i](max(avail - (axis - blocks[i].axis), 16))
                blocks[i].strained = True
        return self.stack(blocks, avail)

    def listing(self, graph: _Dag, avail: int, boxes: Mapping[str, Block]) -> Block:
        """A ``needs:`` graph too wide to draw: its nodes (``boxes``, drawn at ``avail``) one under another
        in a valid run order, joined by a dotted line (an order of listing, not a dependency); each box
        says what it needs."""
        blocks = [boxes[k] for layer in graph.layers for k in layer]
        block = self.stack(blocks, avail, link=self.c.rail_dash, rails=False)
        block.undo_inside = block.undo_inside or any(b.undo is not None for b in blocks)
        block.strained = True
        return block

    def dag(self, graph: _Dag, blocks: dict[str, Block], avail: int) -> Block | None:
        """A ``needs:`` graph layer by layer, every edge drawn: a node's box is entered by exactly the
        lines of the nodes it needs; a line passing a layer runs beside its boxes; lines that cross
        without joining show a ``│`` cutting a ``─``. None when it is wider than ``avail`` or the
        edges cannot be routed."""
        gap = 3

        def extent(slot: tuple[str, str]) -> tuple[int, int]:  # (axis within, width) of a slot
            b = blocks.get(slot[1]) if slot[0] == "node" else None
            return (b.axis, b.width) if b is not None else (0, 1)

        def pack(i: int, wanted: list[int | None], current: list[int]) -> list[int]:
            """Layer ``i``'s axis columns, each as near the one wanted as the slots to its left allow."""
            cols: list[int] = []
            right: int | None = None
            for slot, want, now in zip(graph.slots[i], wanted, current, strict=True):
                ax, w = extent(slot)
                left = (now if want is None else want) - ax
                left = left if right is None else max(left, right + gap)
                cols.append(left + ax)
                right = left + w
            pushed = [c - w for c, w in zip(cols, wanted, strict=True) if w is not None]
            drift = sum(pushed) // len(pushed) if pushed else 0  # slots pushed right: centre them again
            return [c - drift for c in cols]

        def mean(cols: list[int]) -> int | None:
            return sum(cols) // len(cols) if cols else None

        xs = [pack(i, [None] * len(slots), [0] * len(slots)) for i, slots in enumerate(graph.slots)]
        n = len(graph.slots)
        # down (each slot under what feeds it), up (each slot over what it feeds), down again
        for i in range(1, n):
            xs[i] = pack(i, [mean([xs[i - 1][j] for j in f]) for f in graph.sources[i]], xs[i])
        for i in range(n - 2, -1, -1):
            xs[i] = pack(i, [mean([xs[i + 1][j] for j in t]) for t in graph.targets[i]], xs[i])
        for i in range(1, n):
            xs[i] = pack(i, [mean([xs[i - 1][j] for j in f]) for f in graph.sources[i]], xs[i])
        low = min(x - extent(s)[0] for slots, cols in zip(graph.slots, xs, strict=True)
                  for s, x in zip(slots, cols, strict=True))
        xs = [[x - low for x in cols] for cols in xs]
        width = 0
        for slots, cols in zip(graph.slots, xs, strict=True):
            for slot, x in zip(slots, cols, strict=True):
                b = blocks.get(slot[1]) if slot[0] == "node" else None
                width = max(width, x + (b.width - b.axis if b is not None else 1))
        if width > avail:  # known before drawing a row: a long graph that drifts wide costs no rows
            return None
        first = xs[0]
        axis = (first[0] + first[-1]) // 2
        nearest = min(first, key=lambda a: (abs(a - axis), a))
        if abs(nearest - axis) <= 3:
            axis = nearest
        single = first == [axis]  # one node first: the flow enters it straight, as in a chain
        rows: list[Row] = [] if single else [self.bus(width, {axis}, set(first), False)]
        for i, (slots, cols) in enumerate(zip(graph.slots, xs, strict=True)):
            row = _blank(width)
            for slot, x in zip(slots, cols, strict=True):
                b = blocks.get(slot[1]) if slot[0] == "node" else None
                row[x] = self.c.arrow if b is not None and not b.head_line else self.c.line
            if i or not single:
                rows.append(row)
            height = max((blocks[s[1]].height for s in slots if s[0] == "node"), default=0)
            band = [_blank(width) for _ in range(height)]
            for slot, x in zip(slots, cols, strict=True):
                if slot[0] == "node":
                    b = blocks[slot[1]]
                    for j in range(height):
                        if j < b.height:
                            _put(band[j], x - b.axis, b.rows[j])
                        else:
                            band[j][x] = self.c.line
                else:
                    for j in range(height):
                        band[j][x] = self.c.line
            rows += band
            if i + 1 < len(graph.slots):
                below = []
                for slot, x in zip(graph.slots[i + 1], xs[i + 1], strict=True):
                    ax, w = extent(slot)
                    below.append((x, x - ax, x - ax + w - 1))
                channel = self.channel(width, cols, below, graph.targets[i])
                if channel is None:
                    return None
                rows += channel
        if xs[-1] != [axis]:
            rows.append(self.bus(width, set(xs[-1]), {axis}, False))
        undo = any(self.view.node(s).get("compensate") for k in graph.keys for s in self.view.steps_in(k))
        head_line = not single or blocks[graph.slots[0][0][1]].head_line
        return Block(rows, axis, head_line=head_line, undo_inside=undo,
                     strained=any(b.strained for b in blocks.values()), uses=_uses(list(blocks.values())))

    def channel(self, width: int, above: list[int], below: list[tuple[int, int, int]],
                targets: list[list[int]]) -> list[Row] | None:
        """The rows joining a layer's slots (axis columns ``above``) to the next layer's (``below``:
        axis, first and last column of each). Every edge gets a column of its own over its target:
        a slot's line first splits to the columns of its edges (a row per slot that must split or
        move), then the columns over each target merge into its axis (one row). A line only ever
        splits or only ever merges, so no drawn path leads anywhere its slot does not; lines that
        cross without joining show a ``│`` cutting a ``─``. None when the edges cannot be routed so."""
        incoming: list[list[int]] = [[] for _ in below]
        for i, tgts in enumerate(targets):
            for j in tgts:
                incoming[j].append(i)
        sources = set(above)
        taken: set[int] = set()
        column: dict[tuple[int, int], int] = {}  # (source slot, target slot) -> the edge's column
        def elsewhere(c: int, j: int) -> bool:  # over another slot of the next layer
            return any(lo - 1 <= c <= hi + 1 for k, (_, lo, hi) in enumerate(below) if k != j)

        for j, (axis, lo, hi) in enumerate(below):
            srcs = sorted(incoming[j], key=lambda i: above[i])
            if len(srcs) == 1:  # one line in: it enters at the axis
                column[(srcs[0], j)] = axis
                taken.add(axis)
                continue
            for i in srcs:  # straight down where the slot's line already is, if over no other slot
                if above[i] not in taken and not elsewhere(above[i], j):
                    column[(i, j)] = above[i]
                    taken.add(above[i])
            for i in srcs:
                if (i, j) in column:
                    continue
                free = [c for c in range(lo, hi + 1) if c not in taken and c not in sources]
                if not free:
                    return None
                column[(i, j)] = min(free, key=lambda c: (abs(c - above[i]), c))
                taken.add(column[(i, j)])
        # rows that split: one per slot whose line does not simply drop into its one column
        splits = {i: sorted({column[(i, j)] for j in tgts}) for i, tgts in enumerate(targets)}
        moving = [i for i in range(len(above)) if splits[i] and splits[i] != [above[i]]]
        row_of: dict[int, int] = {}
        spans: list[list[tuple[int, int]]] = []
        pending = sorted(moving, key=lambda i: above[i])
        while pending:  # a slot whose column is another's edge column must split above that one
            ready = [i for i in pending if not any(above[o] in splits[i] for o in pending if o != i)]
            if not ready:
                return None
            i = ready[0]
            pending.remove(i)
            lo, hi = min(above[i], *splits[i]), max(above[i], *splits[i])
            r = max((row_of[o] + 1 for o in row_of if above[o] in splits[i]), default=0)
            while r < len(spans) and any(lo <= b + 1 and a - 1 <= hi for a, b in spans[r]):
                r += 1
            if r == len(spans):
                spans.append([])
            spans[r].append((lo, hi))
            row_of[i] = r
        merging = [j for j, (axis, _, _) in enumerate(below)
                   if {column[(i, j)] for i in incoming[j]} - {axis} and incoming[j]]
        merge_row: dict[int, int] = {}  # target slot -> its merge row
        merges: list[list[tuple[int, int]]] = []
        for j in sorted(merging, key=lambda j: min(column[(i, j)] for i in incoming[j])):
            cols = {column[(i, j)] for i in incoming[j]} | {below[j][0]}
            lo, hi = min(cols), max(cols)
            r = 0
            while r < len(merges) and any(lo <= b + 1 and a - 1 <= hi for a, b in merges[r]):
                r += 1
            if r == len(merges):
                merges.append([])
            merges[r].append((lo, hi))
            merge_row[j] = len(spans) + r
        height = len(spans) + len(merges)
        # vertical segments (column, top, bottom): the line crosses every row boundary between them
        segments: list[tuple[int, int, int]] = []
        junctions: dict[int, list[tuple[int, int, set[int]]]] = {}  # row -> (lo, hi, joined columns)
        for i in range(len(above)):
            top = row_of.get(i, -1)
            if i in row_of:
                segments.append((above[i], -1, top))
                cols = set(splits[i]) | {above[i]}
                junctions.setdefault(top, []).append((min(cols), max(cols), cols))
            for j in targets[i]:
                c = column[(i, j)]
                segments.append((c, top, merge_row.get(j, height)))
        for j in merging:
            axis = below[j][0]
            cols = {column[(i, j)] for i in incoming[j]} | {axis}
            junctions.setdefault(merge_row[j], []).append((min(cols), max(cols), cols))
            segments.append((axis, merge_row[j], height))
        # per row, the columns a line leaves upwards and downwards: each cell is looked at once
        ups: list[set[int]] = [set() for _ in range(height)]
        downs: list[set[int]] = [set() for _ in range(height)]
        for col, top, bottom in segments:
            for r in range(max(top + 1, 0), min(bottom, height - 1) + 1):
                ups[r].add(col)
            for r in range(max(top, 0), min(bottom - 1, height - 1) + 1):
                downs[r].add(col)
        rows = [_blank(width) for _ in range(height)]
        for r in range(height):
            span_of: dict[int, tuple[int, int, set[int]]] = {}
            for span in reversed(junctions.get(r, ())):  # where junction spans overlap, the first listed wins
                for c in range(span[0], span[1] + 1):
                    span_of[c] = span
            for c in ups[r] | downs[r] | span_of.keys():
                up, down = c in ups[r], c in downs[r]
                found = span_of.get(c)
                if found is None:
                    rows[r][c] = self.c.line
                elif c in found[2]:
                    rows[r][c] = self.c.junction((int(up), int(down), int(c > found[0]), int(c < found[1])), False)
                else:  # a line of another edge passes: it crosses, it does not join
                    rows[r][c] = self.c.line if up and down else self.c.junction((0, 0, 1, 1), False)
        return rows

    # --- the whole diagram -----------------------------------------------------------------

    def render(self) -> str:
        view, c = self.view, self.c
        body = self.list_(view.root, self.width)
        start = Block([cells(f"{c.start} start")], 0)
        end = Block([cells(f"{c.end} end")], 0, head_line=False)
        whole = self.stack([start, body, end], self.width)
        lines = wrap(view.flow_title(self.g), self.width)
        if view.flow.get("description"):
            lines += wrap(str(view.flow["description"]), self.width)
        lines.append("")
        lines += ["".join(r).rstrip() for r in whole.rows]
        lines += self.footer(whole.uses)
        drawn = max(width_of(line) for line in lines)
        if drawn > self.width:  # groups nested too deep for the width: say so rather than cut
            lines += ["", *wrap(f"note: drawn {drawn} columns wide: the groups of this flow nest too deeply "
                                f"to fit {self.width} (each level takes 4 columns)", self.width)]
        return "\n".join(lines).rstrip("\n") + "\n"

    def footer(self, uses: frozenset[str]) -> list[str]:
        view, c, g = self.view, self.c, self.g
        out: list[str] = []
        steps = [view.node(k) for k in view.steps()]
        present = {"retry": any(retry_text(n.get("retry"), g) for n in steps),
                   "timeout": any(n.get("timeout_ms") for n in steps),
                   "llm": any(n.get("kind") == "llm" for n in steps),
                   "undo": any(n.get("compensate") for n in steps)}
        undo = g.undo if c is UNICODE else f'"{g.undo}"'  # the ASCII symbol ends in a colon of its own
        if "undo beside" in uses:
            undo_entry = (f"{c.undo_link} {undo}", "compensation (undo)" + (
                f", beside its step or in its box below a {c.undo.h * 2} line" if "undo inside" in uses else ""))
        else:
            undo_entry = (undo, f"compensation (undo), in its step's box below a {c.undo.h * 2} line")
        meanings = {"retry": (f"{g.retry.strip()} N", "N attempts in all (backoff, delays)"),
                    "timeout": (g.timeout.strip(), "timeout of each attempt"),
                    "llm": (f"{c.llm.tl}{c.llm.h}{c.llm.tr}", "LLM step"),
                    "undo": undo_entry}
        shown = [meanings[k] for k, on in present.items() if on]
        if shown:
            out += ["", *legend(shown, self.width)]
        levels = view.rollback_levels()
        if levels:
            par = "∥" if c is UNICODE else "||"
            together = any(len(level) > 1 for level in levels)
            # steps with no order in the plan may still be ordered by a run, by when they actually ran
            out += ["", *wrap("rollback: on failure, each completed step is undone, "
                              + (f"in the order the plan implies ({par}: no order between them; a run also goes "
                                 "by when the steps actually ran, so its order can differ):" if together
                                 else "in this order:"), self.width)]
            for i, level in enumerate(levels, 1):
                for j, k in enumerate(level):
                    worker = (view.node(k).get("compensate") or {}).get("worker")
                    head = f"{i:>3}. " if j == 0 else f"{par:>4} "
                    text = f"{g.undo} {worker} (for {to_ascii(k) if c is ASCII else k})"
                    out += [(head if n == 0 else " " * 5) + t for n, t in enumerate(wrap(text, self.width - 5))]
        if self.states is not None:
            out += ["", *wrap(clean(self.states.caption()).replace("\n", " "), self.width)]  # (read from a record)
            line = " "
            listed = self.states.legend(view.has_waits())
            for state, mark in c.marks.items():
                if state not in listed:
                    continue
                entry = f" {mark} {state.replace('_', ' ')}"
                if width_of(line) + width_of(entry) > self.width:
                    out.append(line)
                    line = " "
                line += entry
            out.append(line)
        return out


def legend(entries: list[tuple[str, str]], width: int) -> list[str]:
    """The key under a drawing, ``key: symbol: meaning; symbol: meaning``, in lines at most ``width``
    columns wide. Lines break only between entries, the later ones indented under the first; an entry
    too wide for a line of its own is wrapped in its meaning, never in its symbol (``┄┄▷ ↶``)."""
    head = "key: "
    indent = " " * width_of(head)
    room = max(width - len(indent), 8)
    out: list[str] = []
    line, filled = head, False  # the line being filled, and whether it holds an entry yet
    for i, (symbol, meaning) in enumerate(entries):
        text = f"{symbol}: {meaning}" + (";" if i < len(entries) - 1 else "")
        if filled and width_of(line) + 1 + width_of(text) <= width:
            line += " " + text
            continue
        if filled:
            out.append(line)
            line = indent
        filled = True
        if width_of(text) <= room:
            line += text
            continue
        # too wide for a line: wrap it with the symbol as one word (a stand-in of its width, ASCII and
        # without spaces, is wrapped, then replaced), so the symbol stays whole on the entry's first line
        stand_in = "x" * width_of(f"{symbol}:")
        first, *more = wrap(f"{stand_in} {text[len(symbol) + 2:]}", room)
        lines = [line + f"{symbol}:" + first[len(stand_in):], *(indent + m for m in more)]
        line = lines.pop()
        out += lines
    out.append(line)
    return out


class _Dag:
    """A sibling list's ``needs:`` graph cut into layers, ready to draw.

    ``slots[i]``: what layer ``i`` holds, left to right: ``("node", key)`` for a node of that layer,
    ``("via", key)`` for the line of an earlier node passing the layer on its way to a later one
    (or to the list's end, for a node nothing in the list needs). ``sources[i][j]``: the slots of
    layer ``i - 1`` whose lines enter slot ``j`` of layer ``i``; ``targets[i][j]``: the slots of
    layer ``i + 1`` that slot ``j`` of layer ``i`` leads to.
    """

    def __init__(self, view: PlanView, keys: tuple[str, ...]):
        self.keys = keys
        inside = set(keys)
        self.layers = view.list_layers(keys)
        layer_of = {k: i for i, layer in enumerate(self.layers) for k in layer}
        self.needs = {k: [d for d in view.deps(k) if d in inside and layer_of[d] < layer_of[k]] for k in keys}
        end = len(self.layers)
        needed_by: dict[str, list[str]] = {k: [] for k in keys}
        for k in keys:
            for d in self.needs[k]:
                needed_by[d].append(k)
        reach = {k: max((layer_of[v] for v in needed_by[k]), default=end) for k in keys}
        order = {k: i for i, k in enumerate(keys)}
        vias: list[list[str]] = [[] for _ in self.layers]
        for k in keys:  # walked once, in list order: a long chain must not cost a scan of the list per layer
            for i in range(layer_of[k] + 1, reach[k]):
                vias[i].append(k)
        self.slots: list[list[tuple[str, str]]] = []
        self.sources: list[list[list[int]]] = []
        for i, layer in enumerate(self.layers):
            slots = [("node", k) for k in layer]
            slots += [("via", k) for k in vias[i]]
            if i == 0:
                self.slots.append(slots)
                self.sources.append([[] for _ in slots])
                continue
            prev = {s[1]: j for j, s in enumerate(self.slots[-1])}  # a key is in at most one slot per layer
            feeds = {s: sorted(prev[d] for d in (self.needs[s[1]] if s[0] == "node" else [s[1]])) for s in slots}
            slots.sort(key=lambda s: (sum(feeds[s]) / len(feeds[s]) if feeds[s] else 0.0, s[0] == "via",
                                      order[s[1]]))
            self.slots.append(slots)
            self.sources.append([feeds[s] for s in slots])
        self.targets: list[list[list[int]]] = [[[] for _ in slots] for slots in self.slots]
        for i in range(1, len(self.slots)):
            for j, feeds_j in enumerate(self.sources[i]):
                for f in feeds_j:
                    self.targets[i - 1][f].append(j)

    def edges(self) -> set[tuple[str, str]]:
        """``(needed, needing)`` pairs: what the drawing must show."""
        return {(d, k) for k in self.keys for d in self.needs[k]}


def render_ascii(plan: Mapping[str, Any], *, run_states: RunStates | None = None, ascii_only: bool = False,
                 width: int = 80) -> str:
    """The plan as box-and-arrow text, at most ``width`` columns when it can be drawn so."""
    return _Ascii(PlanView(ascii_plan(plan) if ascii_only else plan), run_states, ascii_only, width).render()
