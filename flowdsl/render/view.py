"""A renderer-neutral reading of an execution plan: labels, policies, lists, rollback order.

Stage: renderer. Reads the plan (docs/plan.md) and nothing upstream of it;
imports stdlib only. Every renderer (Mermaid, ASCII, DOT) draws from the same
:class:`PlanView`, so the three forms say the same things about a flow: which
steps exist, in which lists and lanes, with which conditions, policies and
compensations, and in which order a failed run undoes its steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: the states a step can be drawn in (see :mod:`flowdsl.render.runstate`)
STATES = ("pending", "running", "succeeded", "failed", "compensated", "skipped", "cancelled")
STEP_KINDS = ("task", "llm")
GROUP_KINDS = ("sequence", "parallel", "for_each", "switch", "flow")


class RenderError(ValueError):
    """The plan cannot be drawn (malformed, unsupported version) or the format is unknown."""


@dataclass(frozen=True)
class Lane:
    """One list of sibling nodes inside a group: a branch, a switch case, a body.

    ``caption`` names it where the group needs a name per list: the switch case
    (``= express``, ``default``); None elsewhere.
    """

    caption: str | None
    keys: tuple[str, ...]


@dataclass(frozen=True)
class StepText:
    """What a step box says, line by line, before any format-specific markup."""

    title: str
    lines: tuple[str, ...]
    policy: str | None


@dataclass(frozen=True)
class Glyphs:
    """The symbols labels use: Unicode by default, plain ASCII for ``--ascii-only``."""

    llm: str
    retry: str
    timeout: str
    arrow: str
    undo: str
    sep: str
    le: str
    times: str

    @classmethod
    def pick(cls, ascii_only: bool) -> Glyphs:
        if ascii_only:
            return cls(llm="[LLM]", retry="retry ", timeout="timeout ", arrow="->", undo="undo:", sep=", ",
                       le="<=", times="x")
        return cls(llm="✦ LLM", retry="↻", timeout="◷", arrow="→", undo="↶", sep=" · ", le="≤", times="×")


def format_ms(ms: int | float | None) -> str:
    """A duration in the language's own notation: ``250ms``, ``1.5s``, ``2m``, ``1m30s``, ``2h``."""
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms % 1000:
        return f"{ms / 1000:g}s"
    seconds = ms // 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


def retry_text(retry: Mapping[str, Any] | None, glyphs: Glyphs) -> str | None:
    """A compact retry policy (``↻4 exp 200ms..2s on PaymentGatewayTimeout``), None for a single attempt."""
    if not retry or int(retry.get("attempts") or 1) <= 1:
        return None
    attempts = int(retry["attempts"])
    initial, cap = format_ms(retry.get("initial_ms")), format_ms(retry.get("max_ms"))
    backoff = retry.get("backoff") or "exponential"
    if backoff == "constant":
        delays = f"every {initial}"
    elif backoff == "linear":
        delays = f"lin {initial}..{cap}"
    else:
        mult = float(retry.get("multiplier") or 2.0)
        delays = f"exp{'' if mult == 2.0 else f'{glyphs.times}{mult:g}'} {initial}..{cap}"
    text = f"{glyphs.retry}{attempts} {delays}"
    if retry.get("on"):
        text += " on " + ",".join(str(t) for t in retry["on"])
    return text


def policy_text(holder: Mapping[str, Any], glyphs: Glyphs) -> str | None:
    """Retry and timeout of a step or a compensation on one line, None when both are the plain defaults."""
    parts = [retry_text(holder.get("retry"), glyphs)]
    if holder.get("timeout_ms"):
        parts.append(f"{glyphs.timeout}{format_ms(holder['timeout_ms'])}")
    kept = [p for p in parts if p]
    return glyphs.sep.join(kept) if kept else None


def wrap(text: str, width: int) -> list[str]:
    """Split text into lines of at most ``width`` characters, keeping its line breaks.

    Lines break at spaces; a word longer than a line breaks after a ``.``, ``/``,
    ``_`` or ``,`` where it can (``orders.fulfillment.`` | ``release_items``), else anywhere.
    """
    width = max(width, 8)
    out: list[str] = []
    for para in clean(text).split("\n"):
        line = ""
        for word in para.split():
            pieces = _split_word(word, width) if len(word) > width else [word]
            for i, piece in enumerate(pieces):
                joined = line + piece if i else (line + " " + piece if line else piece)
                if len(joined) <= width:
                    line = joined
                else:
                    if line:
                        out.append(line)
                    line = piece
        out.append(line)
    return out


def _split_word(word: str, width: int) -> list[str]:
    """Pieces of a long word, each at most ``width`` long, ending after a ``.`` or ``/`` where
    possible, else after a ``_`` or ``,``, else anywhere."""
    pieces: list[str] = []
    while len(word) > width:
        cut = width
        for breaks in ("./", "_,"):
            found = [i + 1 for i, ch in enumerate(word[:width]) if ch in breaks and i + 1 >= width // 3]
            if found:
                cut = found[-1]
                break
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word] if word else pieces


def _case_order(match: Any) -> tuple[int, float, str]:
    """Where a switch case is drawn: numeric labels first, by value (``9`` before ``10``), then the
    others by their text (``false`` before ``true``); the plan stores them by text."""
    text = str(match)
    try:
        value = float(text)
    except ValueError:
        return (1, 0.0, text)
    return (0, value, text) if math.isfinite(value) else (1, 0.0, text)


def clean(text: Any) -> str:
    """Text safe for any label: tabs to spaces, every line break to ``\\n``, other control characters dropped."""
    s = str(text).replace("\r\n", "\n").replace("\t", " ")
    s = s.translate(_LINE_BREAKS)
    return "".join(ch for ch in s if ch == "\n" or not (ord(ch) < 32 or 127 <= ord(ch) < 160))


_LINE_BREAKS = {ord(ch): "\n" for ch in "\r\x0b\x0c\x85\u2028\u2029"}


class PlanView:
    """Read-only helpers over one plan; cheap to build, holds no format-specific state."""

    def __init__(self, plan: Mapping[str, Any]):
        if not isinstance(plan, Mapping) or not isinstance(plan.get("nodes"), Mapping) \
                or not isinstance(plan.get("root"), list):
            raise RenderError("not an execution plan: expected an object with 'root' and 'nodes'")
        if plan.get("plan_version", 1) != 1:
            raise RenderError(f"unsupported plan_version {plan.get('plan_version')!r}; this renderer draws version 1")
        self.plan = plan
        self.nodes: Mapping[str, Mapping[str, Any]] = plan["nodes"]
        self.root: tuple[str, ...] = tuple(plan["root"])
        self.flow: Mapping[str, Any] = plan.get("flow") or {}
        self.expressions: Mapping[str, Any] = plan.get("expressions") or {}
        for key in self._walk(self.root):
            if key not in self.nodes:
                raise RenderError(f"plan node '{key}' is referenced but not defined")
        self._before: dict[str, frozenset[str]] = {}

    # --- structure -------------------------------------------------------------------

    def node(self, key: str) -> Mapping[str, Any]:
        return self.nodes[key]

    def kind(self, key: str) -> str:
        return str(self.nodes[key].get("kind"))

    def is_step(self, key: str) -> bool:
        return self.kind(key) in STEP_KINDS

    def lanes(self, key: str) -> list[Lane]:
        """The sibling lists of a group, in drawing order (a parallel has one lane per branch)."""
        node = self.nodes[key]
        kind = node.get("kind")
        if kind == "parallel":
            return [Lane(None, (child,)) for child in node.get("children") or ()]
        if kind == "switch":
            cases = sorted(node.get("cases") or (), key=lambda case: _case_order(case.get("match")))
            lanes = [Lane(f"= {case.get('match')}", tuple(case.get("children") or ())) for case in cases]
            if node.get("default") is not None:
                lanes.append(Lane("default", tuple(node["default"])))
            return lanes
        if kind in GROUP_KINDS:
            return [Lane(None, tuple(node.get("children") or ()))]
        return []

    def children(self, key: str) -> list[str]:
        return [k for lane in self.lanes(key) for k in lane.keys]

    def _walk(self, keys: tuple[str, ...] | list[str]) -> Iterator[str]:
        seen: set[str] = set()
        stack = list(reversed(keys))
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            yield key
            if key in self.nodes:
                stack.extend(reversed(self.children(key)))

    def all_keys(self) -> list[str]:
        """Every node reachable from the root, in plan (depth-first) order."""
        return list(self._walk(self.root))

    def steps(self) -> list[str]:
        return [k for k in self.all_keys() if self.is_step(k)]

    def steps_in(self, key: str) -> list[str]:
        """The steps of a node: itself when it is a step, else every step below it."""
        return [k for k in self._walk([key]) if self.is_step(k)]

    def deps(self, key: str) -> list[str]:
        return [d for d in self.nodes[key].get("deps") or () if d in self.nodes]

    def list_layers(self, keys: tuple[str, ...]) -> list[list[str]]:
        """A sibling list's nodes by longest path from the list's start (dependencies outside it ignored)."""
        inside = set(keys)
        level: dict[str, int] = {}

        def depth(k: str, trail: frozenset[str]) -> int:
            if k not in level:
                ds = [d for d in self.deps(k) if d in inside and d not in trail]
                level[k] = 1 + max((depth(d, trail | {k}) for d in ds), default=-1)
            return level[k]

        for k in keys:
            depth(k, frozenset())
        layers: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for k in keys:
            layers[level[k]].append(k)
        return layers

    def is_chain(self, keys: tuple[str, ...]) -> bool:
        """True when each node of the list waits for exactly the one before it (a plain sequence)."""
        return all(self.deps(k) == ([keys[i - 1]] if i else []) for i, k in enumerate(keys))

    def expr(self, expr_id: str | None) -> str:
        """The source text of an expression id (``?`` when the plan does not define it)."""
        if expr_id is None:
            return ""
        entry = self.expressions.get(expr_id)
        if isinstance(entry, Mapping) and entry.get("source") is not None:
            return clean(entry["source"]).replace("\n", " ")
        return "?"

    # --- text --------------------------------------------------------------------------

    def step_text(self, key: str, glyphs: Glyphs, *, short_worker: bool = False,
                  needs: bool = False) -> StepText:
        """Title, detail lines and policy line of a step; ``short_worker`` hides a worker whose last
        segment is the id, ``needs`` lists the step's dependencies."""
        node = self.nodes[key]
        title = str(node.get("id") or key)
        lines: list[str] = []
        if node.get("kind") == "llm":
            title = f"{glyphs.llm} {title}"
            sig = (node.get("llm") or {}).get("signature") or {}
            outs = [str(f.get("name")) for f in sig.get("outputs") or () if isinstance(f, Mapping)]
            if outs:
                lines.append(f"{glyphs.arrow} {', '.join(outs)}")
            if node.get("fallback"):
                lines.append(f"fallback: {node['fallback']}")
        else:
            worker = str(node.get("worker") or "")
            hidden = worker.rsplit(".", 1)[-1] == title if short_worker else worker == title
            if worker and not hidden:
                lines.append(f"worker: {worker}")
        lines.extend(self.common_lines(key, needs=needs))
        if node.get("fail_when"):
            lines.append(f"fail when: {self.expr(node['fail_when'])}")
        return StepText(title, tuple(lines), policy_text(node, glyphs))

    def common_lines(self, key: str, *, needs: bool = False) -> list[str]:
        """Lines every node may carry: its description, its ``when``, its ``needs``."""
        node = self.nodes[key]
        lines: list[str] = []
        if node.get("description"):
            lines.extend(clean(node["description"]).split("\n"))
        if node.get("when"):
            lines.append(f"when: {self.expr(node['when'])}")
        if needs and self.deps(key):
            lines.append("needs: " + ", ".join(str(self.nodes[d].get("id") or d) for d in self.deps(key)))
        return lines

    def group_title(self, key: str) -> str:
        """``parallel after``, ``for_each charge_lines``, ``sub-flow wrap: gift_wrap``."""
        node = self.nodes[key]
        kind, ident = str(node.get("kind")), str(node.get("id") or key)
        if kind == "flow":
            name = node.get("flow_name")
            return f"sub-flow {ident}" + (f": {name}" if name and name != ident else "")
        return f"{kind} {ident}"

    def group_lines(self, key: str, glyphs: Glyphs, *, needs: bool = False) -> list[str]:
        """The detail lines of a group frame (description, condition, what it iterates or reads)."""
        node = self.nodes[key]
        lines: list[str] = []
        if node.get("kind") == "flow" and node.get("path"):
            timeout = node.get("timeout_ms")  # bounds each run of the sub-flow, as the flow title's `run ◷`
            lines.append(f"from {node['path']}"
                         + (f"{glyphs.sep}run {glyphs.timeout}{format_ms(timeout)}" if timeout else ""))
        return lines + self.common_lines(key, needs=needs)

    def fan_out_text(self, key: str, glyphs: Glyphs) -> str:
        """``each line in order.items, ≤4 at once`` for a for_each node."""
        node = self.nodes[key]
        limit = node.get("concurrency")
        at_once = f"{glyphs.le}{limit} at once" if limit else "all at once"
        return f"each {node.get('as') or 'item'} in {self.expr(node.get('items'))}, {at_once}"

    def gather_text(self, key: str, glyphs: Glyphs) -> str:
        output = self.nodes[key].get("output") or {}
        name = output.get("name") if isinstance(output, Mapping) else None
        return f"gather {glyphs.arrow} {name or self.nodes[key].get('id') or key}"

    def switch_text(self, key: str) -> str:
        return f"on {self.expr(self.nodes[key].get('on'))}"

    def undo_text(self, key: str, glyphs: Glyphs) -> StepText:
        comp = self.nodes[key].get("compensate") or {}
        return StepText(f"{glyphs.undo} {comp.get('worker')}", (), policy_text(comp, glyphs))

    def flow_title(self, glyphs: Glyphs) -> str:
        name = str(self.flow.get("name") or "flow")
        parts = [name + (f" v{self.flow['version']}" if self.flow.get("version") else "")]
        if self.flow.get("timeout_ms"):
            parts.append(f"run {glyphs.timeout}{format_ms(self.flow['timeout_ms'])}")
        return glyphs.sep.join(parts)

    # --- compensation ------------------------------------------------------------------

    def compensated_steps(self) -> list[str]:
        """Steps with a compensation, in plan order."""
        return [k for k in self.steps() if self.nodes[k].get("compensate")]

    def before(self, key: str) -> frozenset[str]:
        """Every step that has finished before ``key`` starts, by the plan's lists and dependencies."""
        if key not in self._before:
            self._before[key] = frozenset()  # guards against cycles in a malformed plan
            parent = self.nodes[key].get("parent")
            acc: set[str] = set(self.before(parent)) if isinstance(parent, str) and parent in self.nodes else set()
            for d in self.deps(key):
                acc.update(self.steps_in(d))
                acc.update(self.before(d))
            self._before[key] = frozenset(acc)
        return self._before[key]

    def rollback_edges(self) -> list[tuple[str, str]]:
        """``(later, earlier)`` pairs of compensated steps: undo ``later`` before ``earlier``.

        The reverse of the steps' partial order, transitively reduced, sorted in plan order;
        steps that may run concurrently have no edge between them.
        """
        comp = self.compensated_steps()
        order = {k: i for i, k in enumerate(comp)}
        edges: list[tuple[str, str]] = []
        for later in comp:
            earlier = [a for a in comp if a in self.before(later)]
            for a in earlier:
                if not any(a in self.before(c) for c in earlier if c != a):
                    edges.append((later, a))
        return sorted(edges, key=lambda e: (order[e[0]], order[e[1]]))

    def rollback_levels(self) -> list[list[str]]:
        """Compensated steps grouped by when they are undone: the first list is undone first."""
        comp = self.compensated_steps()
        later_of: dict[str, list[str]] = {k: [] for k in comp}
        for later, earlier in self.rollback_edges():
            later_of[earlier].append(later)
        level: dict[str, int] = {}

        def depth(k: str) -> int:
            if k not in level:
                level[k] = 1 + max((depth(x) for x in later_of[k]), default=-1)
            return level[k]

        for k in comp:
            depth(k)
        levels: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for k in comp:
            levels[level[k]].append(k)
        return levels
