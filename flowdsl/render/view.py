"""A renderer-neutral reading of an execution plan: labels, policies, lists, rollback order.

Stage: renderer. Reads the plan (docs/plan.md) and nothing upstream of it;
imports stdlib only (and ``flowdsl.durations``). Every renderer (Mermaid, ASCII, DOT) draws from the same
:class:`PlanView`, so the three forms say the same things about a flow: which
steps exist, in which lists and lanes, with which conditions, policies and
compensations, and in which order a failed run undoes its steps.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl.durations import duration_text as format_ms

#: the states a step can be drawn in (see :mod:`flowdsl.render.runstate`); ``waiting`` is a wait node's running
STATES = ("pending", "running", "waiting", "succeeded", "failed", "passed_over", "compensated", "skipped",
          "cancelled")
#: the node kinds that run a worker (retries, timeouts, compensations)
STEP_KINDS = ("task", "llm")
#: the node kinds that are leaves of the flow graph, drawn as one box each: the steps and the wait nodes
LEAF_KINDS = (*STEP_KINDS, "wait")
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


#: the plan layouts this renderer draws (docs/plan.md; 2 added a step's ``on_failure``, drawn with its policies;
#: 3 the ``wait`` nodes; 4 a signal wait's key)
PLAN_VERSIONS = (1, 2, 3, 4)
#: the field of a keyed wait's plan node holding its key expression's id
WAIT_KEY = "signal_key"


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
    wait: str

    @classmethod
    def pick(cls, ascii_only: bool) -> Glyphs:
        if ascii_only:
            return cls(llm="[LLM]", retry="retry ", timeout="timeout ", arrow="->", undo="undo:", sep=", ",
                       le="<=", times="x", wait="[wait]")
        return cls(llm="✦ LLM", retry="↻", timeout="◷", arrow="→", undo="↶", sep=" · ", le="≤", times="×",
                   wait="⚐")


def retry_text(retry: Mapping[str, Any] | None, glyphs: Glyphs) -> str | None:
    """A compact retry policy (``↻4 exp 200ms..800ms on PaymentGatewayTimeout not_on CardDeclined``): the
    attempts, the backoff with the first and the longest wait between attempts (``max_ms`` only when the retries
    reach it), the error types retried (``on``) and never retried (``not_on``); None for a single attempt."""
    if not retry or int(retry.get("attempts") or 1) <= 1:
        return None
    attempts = int(retry["attempts"])
    initial = format_ms(retry.get("initial_ms"))
    backoff = retry.get("backoff") or "exponential"
    mult = float(retry.get("multiplier") or 2.0)
    longest = format_ms(_longest_delay(retry, attempts - 1, mult))  # (the cap only when the retries reach it)
    if backoff == "constant":
        delays = f"every {initial}"
    elif longest == initial:  # one retry (or a cap at the first delay): one wait
        delays = initial
    elif backoff == "linear":
        delays = f"lin {initial}..{longest}"
    else:
        delays = f"exp{'' if mult == 2.0 else f'{glyphs.times}{mult:g}'} {initial}..{longest}"
    text = f"{glyphs.retry}{attempts} {delays}"
    if retry.get("on"):
        text += " on " + ",".join(str(t) for t in retry["on"])
    if retry.get("not_on"):
        text += " not_on " + ",".join(str(t) for t in retry["not_on"])
    return text


def _longest_delay(retry: Mapping[str, Any], retries: int, mult: float) -> float:
    """The longest wait between two attempts (before jitter, which only shortens it): the last retry's,
    ``max_ms`` when the backoff reaches it (docs/kernel.md, "Retries")."""
    initial = float(retry.get("initial_ms") or 0)
    cap = retry.get("max_ms")
    if retry.get("backoff") == "linear":
        base = initial * retries
    elif retry.get("backoff") == "constant":
        base = initial
    else:
        try:
            base = initial * mult ** (retries - 1)
        except OverflowError:  # (any cap is reached long before)
            base = math.inf
    return min(base, float(cap)) if cap is not None else base


def policy_text(holder: Mapping[str, Any], glyphs: Glyphs) -> str | None:
    """Retry and timeout of a step or a compensation on one line (and a step's ``on_failure: continue``), None
    when all are the plain defaults."""
    parts = [retry_text(holder.get("retry"), glyphs)]
    if holder.get("timeout_ms"):
        parts.append(f"{glyphs.timeout}{format_ms(holder['timeout_ms'])}")
    if holder.get("on_failure") == "continue":
        parts.append("on failure: continue")
    kept = [p for p in parts if p]
    return glyphs.sep.join(kept) if kept else None


@functools.lru_cache(maxsize=4096)
def char_width(ch: str) -> int:
    """The terminal columns a character takes: 2 for a wide or fullwidth one (CJK, most emoji), 0 for
    a combining mark or a format character (it joins the character before), else 1."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Cf", "Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    """The terminal columns ``text`` takes on one line: the sum of :func:`char_width`."""
    if text.isascii():  # every ASCII character takes one column
        return len(text)
    return sum(char_width(ch) for ch in text)


def wrap(text: str, width: int) -> list[str]:
    """Split text into lines at most ``width`` columns wide (:func:`text_width`), keeping its line breaks.

    Lines break at spaces; a word wider than a line breaks after a ``.``, ``/``, ``_`` or ``,``
    where it can (``orders.fulfillment.`` | ``release_items``), else anywhere.
    """
    width = max(width, 8)
    out: list[str] = []
    for para in clean(text).split("\n"):
        line, used = "", 0
        for word in para.split():
            pieces = _split_word(word, width) if text_width(word) > width else [word]
            for i, piece in enumerate(pieces):
                space = 0 if i or not line else 1  # the pieces of one word join without a space
                size = text_width(piece)
                if used + space + size <= width:
                    line, used = line + " " * space + piece, used + space + size
                else:
                    if line:
                        out.append(line)
                    line, used = piece, size
        out.append(line)
    return out


def _split_word(word: str, width: int) -> list[str]:
    """Pieces of a wide word, each at most ``width`` columns, ending after a ``.`` or ``/`` where
    possible, else after a ``_`` or ``,``, else anywhere (never between a character and its
    combining marks)."""
    pieces: list[str] = []
    left = text_width(word)
    while left > width:
        ends: list[tuple[int, int]] = []  # (length, columns) of each start of the word that fits
        used = 0
        for i, ch in enumerate(word):
            used += char_width(ch)
            if used > width:
                break
            if i + 1 == len(word) or char_width(word[i + 1]):
                ends.append((i + 1, used))
        cut, cols = ends[-1]
        for breaks in ("./", "_,"):
            found = [(n, c) for n, c in ends if word[n - 1] in breaks and c >= width // 3]
            if found:
                cut, cols = found[-1]
                break
        pieces.append(word[:cut])
        word, left = word[cut:], left - cols
    return [*pieces, word] if word else pieces


def fenced(text: str, info: str) -> str:
    """``text`` as a Markdown fenced code block (info string ``info``) that nothing in it can close.

    CommonMark closes a backtick fence only with a line of at least as many backticks, so the
    fence is one longer than the longest run of backticks in ``text``, and never shorter than 3.
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}{info}\n{body}{fence}\n"


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
    s = str(text)
    if s.isascii() and s.isprintable():  # the common case: nothing to replace or drop
        return s
    return s.replace("\r\n", "\n").translate(_CLEAN)


#: what :func:`clean` does to a character: a tab is a space, a line break ``\n``, another control character dropped
_CLEAN: dict[int, str | None] = {i: None for i in (*range(32), *range(127, 160)) if i != ord("\n")}
_CLEAN |= {ord("\t"): " "} | {ord(ch): "\n" for ch in "\r\x0b\x0c\x85\u2028\u2029"}


def dependency_order(keys: Iterable[str], deps: Mapping[str, list[str]]) -> list[str]:
    """``keys`` ordered so that each comes after the ones it depends on (``deps``, keys outside ignored).

    A depth-first walk from each key in turn, iterative so a long chain cannot exhaust Python's
    stack; an edge back into the walk's own path (a cycle, in a malformed plan) is ignored.
    """
    out: list[str] = []
    seen: set[str] = set()  # placed, or on the walk's path
    for first in keys:
        if first in seen:
            continue
        seen.add(first)
        stack = [(first, iter(deps.get(first, ())))]
        while stack:
            key, rest = stack[-1]
            for d in rest:
                if d in deps and d not in seen:
                    seen.add(d)
                    stack.append((d, iter(deps[d])))
                    break
            else:
                stack.pop()
                out.append(key)
    return out


class PlanView:
    """Read-only helpers over one plan; cheap to build, holds no format-specific state."""

    def __init__(self, plan: Mapping[str, Any]):
        if not isinstance(plan, Mapping) or not isinstance(plan.get("nodes"), Mapping) \
                or not isinstance(plan.get("root"), list):
            raise RenderError("not an execution plan: expected an object with 'root' and 'nodes'")
        if plan.get("plan_version", 1) not in PLAN_VERSIONS:
            raise RenderError(f"unsupported plan_version {plan.get('plan_version')!r}; this renderer draws versions "
                              f"{PLAN_VERSIONS[0]} to {PLAN_VERSIONS[-1]}")
        self.plan = plan
        self.nodes: Mapping[str, Mapping[str, Any]] = plan["nodes"]
        self.root: tuple[str, ...] = tuple(plan["root"])
        self.flow: Mapping[str, Any] = plan.get("flow") or {}
        self.expressions: Mapping[str, Any] = plan.get("expressions") or {}
        listed: set[str] = set()
        stack = list(reversed(self.root))
        while stack:  # the lists must form a tree, or drawing a group would recurse into itself without end
            key = stack.pop()
            if key not in self.nodes:
                raise RenderError(f"plan node '{key}' is referenced but not defined")
            if key in listed:
                raise RenderError(f"not a flowdsl execution plan: node '{key}' is listed more than once (each "
                                  "node is in one list, the root's or one group's, and no group holds itself)")
            listed.add(key)
            stack.extend(reversed(self.children(key)))

    # --- structure -------------------------------------------------------------------

    def node(self, key: str) -> Mapping[str, Any]:
        return self.nodes[key]

    def kind(self, key: str) -> str:
        return str(self.nodes[key].get("kind"))

    def is_step(self, key: str) -> bool:
        """A node that runs a worker (task, llm): the only kind with retries, timeouts and compensations."""
        return self.kind(key) in STEP_KINDS

    def is_leaf(self, key: str) -> bool:
        """A node drawn as one box, with no lists of its own: a step or a wait."""
        return self.kind(key) in LEAF_KINDS

    def has_waits(self) -> bool:
        """Whether any node of the plan is a wait (the run-state legends show ``waiting`` only then)."""
        return any(isinstance(n, Mapping) and n.get("kind") == "wait" for n in self.nodes.values())

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
        deps = {k: [d for d in self.deps(k) if d in inside] for k in keys}
        level: dict[str, int] = {}
        for k in dependency_order(keys, deps):  # each after its deps: one pass, no recursion however deep
            level[k] = 1 + max((level[d] for d in deps[k] if d in level), default=-1)
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

    def step_text(self, key: str, glyphs: Glyphs, *, needs: bool = False) -> StepText:
        """Title, detail lines and policy line of a step (in every form: a ``worker:`` line when the
        worker is not the step's id); ``needs`` lists the step's dependencies. A wait node's are
        :meth:`wait_text`'s."""
        node = self.nodes[key]
        if node.get("kind") == "wait":
            return self.wait_text(key, glyphs, needs=needs)
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
            if worker and worker != title:
                lines.append(f"worker: {worker}")
        lines.extend(self.common_lines(key, needs=needs))
        if node.get("fail_when"):
            lines.append(f"fail when: {self.expr(node['fail_when'])}")
        return StepText(title, tuple(lines), policy_text(node, glyphs))

    def wait_text(self, key: str, glyphs: Glyphs, *, needs: bool = False) -> StepText:
        """A wait node's box: ``⚐ id`` (``⚐ id (by key)`` for a keyed wait), then ``wait for signal 'x'`` (a
        keyed wait's ``key: <expression>`` under it; its deadline, ``up to 30m``, on the policy line, with ``on
        failure: continue``) or, for a timer, ``wait 2h``; no worker, retry or undo."""
        node = self.nodes[key]
        policy: list[str] = []
        lines: list[str] = []
        keyed = False
        if node.get("signal") is None:
            lines.append(f"wait {format_ms(node.get('delay_ms'))}")
        else:
            lines.append(f"wait for signal '{clean(node['signal'])}'")
            keyed = node.get(WAIT_KEY) is not None
            if keyed:
                lines.append(f"key: {self.expr(node[WAIT_KEY])}")
            if node.get("timeout_ms"):
                policy.append(f"up to {format_ms(node['timeout_ms'])}")
        if node.get("on_failure") == "continue":
            policy.append("on failure: continue")
        title = f"{glyphs.wait} {node.get('id') or key}" + (" (by key)" if keyed else "")
        return StepText(title, (*lines, *self.common_lines(key, needs=needs)), glyphs.sep.join(policy) or None)

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
        """``gather → lines`` (the output name), or ``gather → count, total`` (the keys of an output mapping)."""
        output = self.nodes[key].get("output") or {}
        mapped = output.get("map") if isinstance(output, Mapping) and output.get("mode") == "map" else None
        if isinstance(mapped, Mapping) and mapped:
            return f"gather {glyphs.arrow} {', '.join(str(k) for k in mapped)}"
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

    def rollback_edges(self) -> list[tuple[str, str]]:
        """``(later, earlier)`` pairs of compensated steps: undo ``later`` before ``earlier``.

        The reverse of the steps' partial order, transitively reduced, sorted in plan order;
        steps that may run concurrently have no edge between them. ``earlier`` is each last
        compensated step to finish before ``later`` starts: derived from the plan's lists, so a
        sequence costs linear time however long it is (not a comparison of every pair of steps).
        """
        comp = self.compensated_steps()
        order = {k: i for i, k in enumerate(comp)}
        entry = self._undone_before()
        edges = [(later, earlier) for later in comp for earlier in entry.get(later, ())]
        return sorted(edges, key=lambda e: (order[e[0]], order[e[1]]))

    def _undone_before(self) -> dict[str, tuple[str, ...]]:
        """For each node, the compensated steps that are the last to finish before it starts: where
        its rollback edges lead.

        Bottom-up, each node's *last*: its own compensated steps that no other of its own follows
        (a step's is itself). Top-down, each node's entry: the last of the nearest nodes of its list
        that it waits for, directly or not, among those holding a compensated step — those follow
        everything before the list, so nothing else counts — or, when there are none, its group's.
        """
        lists: list[tuple[str | None, tuple[str, ...]]] = [(None, self.root)]
        lists += [(k, tuple(self.children(k))) for k in self.all_keys() if not self.is_leaf(k)]
        last: dict[str, tuple[str, ...]] = {
            k: (k,) for k in self.steps() if self.nodes[k].get("compensate")}
        nearest: dict[str, tuple[str, ...]] = {}
        for owner, keys in reversed(lists):  # inner groups first: a group's last is made of its nodes'
            before, final = self._nearest_holding(keys, lambda k: bool(last.get(k)))
            nearest.update(before)
            if owner is not None:
                last[owner] = tuple(s for t in final for s in last[t])
        entry: dict[str, tuple[str, ...]] = {}
        for owner, keys in lists:  # outer groups first: a node's entry may be its group's
            outer = entry.get(owner, ()) if owner is not None else ()
            for k in keys:
                if k not in entry:
                    entry[k] = tuple(s for t in nearest.get(k, ()) for s in last[t]) or outer
        return entry

    def _nearest_holding(self, keys: tuple[str, ...], holds: Callable[[str], bool]
                         ) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        """In one sibling list, for each node the nearest nodes it waits for that ``holds``, and
        the list's own last nodes that hold (those no other holding node of the list waits for).

        A plain chain is walked once; a ``needs:`` graph keeps, per node, the set of holding
        nodes it waits for as a bit mask, to drop a candidate that another one waits for."""
        nearest: dict[str, tuple[str, ...]] = {}
        if self.is_chain(keys):
            found: tuple[str, ...] = ()
            for k in keys:
                nearest[k] = found
                found = (k,) if holds(k) else found
            return nearest, found
        inside = set(keys)
        deps = {k: [d for d in self.deps(k) if d in inside] for k in keys}
        bit = {k: 1 << i for i, k in enumerate(k for k in keys if holds(k))}
        waits: dict[str, int] = {}  # the holding nodes each node waits for, directly or not

        def nearest_of(candidates: Iterable[str]) -> tuple[str, ...]:
            unique = dict.fromkeys(candidates)
            hidden = 0
            for t in unique:
                hidden |= waits.get(t, 0)
            return tuple(t for t in unique if not hidden & bit[t])

        for k in dependency_order(keys, deps):
            mask = 0
            for d in deps[k]:
                mask |= waits.get(d, 0) | bit.get(d, 0)
            waits[k] = mask
            nearest[k] = nearest_of(t for d in deps[k] for t in ((d,) if d in bit else nearest.get(d, ())))
        return nearest, nearest_of(k for k in keys if k in bit)

    def rollback_levels(self) -> list[list[str]]:
        """Compensated steps grouped by when they are undone: the first list is undone first."""
        comp = self.compensated_steps()
        later_of: dict[str, list[str]] = {k: [] for k in comp}
        for later, earlier in self.rollback_edges():
            later_of[earlier].append(later)
        level: dict[str, int] = {}
        for k in dependency_order(comp, later_of):
            level[k] = 1 + max((level[x] for x in later_of[k] if x in level), default=-1)
        levels: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for k in comp:
            levels[level[k]].append(k)
        return levels
