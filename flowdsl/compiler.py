"""Compiler: a checked model to the execution plan (docs/plan.md).

Stage: compiler. Imports ``flowdsl.diagnostics``, ``flowdsl.model``,
``flowdsl.expr``, ``flowdsl.checks`` and, only to name a dependency cycle,
networkx — networkx lives here and only here. The compiler owns the dependency
graph, so the graph checks are made here: references in ``needs`` and
``$steps``, cycles, and outputs written by nodes that may run concurrently.

The graph: each step is a vertex; each group ``g`` is two vertices ``g:start``
and ``g:end`` with its children wired between them; the whole flow sits
between ``:start`` and ``:end``. Stages and the critical path are longest-path
computations over it where each step weighs 1. The graph is plain adjacency
dicts (vertex -> successors/predecessors, insertion-ordered, no duplicate
edges): building and walking it is linear, and networkx is imported only when a
``needs`` cycle has to be reported. Whether one node always finishes before
another starts (FD504, FD307) is read from the tree of groups and the ``needs``
of one list (``_Compiler.before``), not searched in the graph for each pair.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowdsl import expr
from flowdsl.checks import Constants, check_flow
from flowdsl.diagnostics import Diagnostic, Suggestions, join, make
from flowdsl.model import Compensation, Flow, Node, Retry

if TYPE_CHECKING:
    import networkx as nx

PLAN_VERSION = 1
#: damaged ``needs`` tracked one by one (``_Compiler.spread_damage``); beyond, as one
_DAMAGE_BITS = 1024
#: the largest (nodes of a list with ``needs``) × (its nodes with writers of one name below them) for which
#: FD307 finds every pair that may race there (``_Compiler.list_races``); beyond, one pair per gap in their order
_RACE_BITS = 1 << 24
#: how many of the nodes a writer may race with an FD307 message names
_RACERS_NAMED = 3

STEP_RETRY = Retry(attempts=1, backoff="exponential", initial_ms=1000, max_ms=30_000, multiplier=2.0,
                   jitter="none", on=None, not_on=())
COMPENSATION_RETRY = Retry(attempts=5, backoff="exponential", initial_ms=100, max_ms=10_000, multiplier=2.0,
                           jitter="none", on=None, not_on=())


def plan_bytes(plan: dict[str, Any]) -> bytes:
    """The canonical serialisation of a plan: sorted keys, two-space indent, final newline."""
    return (json.dumps(plan, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Compiled:
    """What the compiler produced: the plan, where each node came from, and diagnostics."""

    plan: dict[str, Any] | None
    origins: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # key -> (file, spec_path)
    diagnostics: list[Diagnostic] = field(default_factory=list)


@dataclass
class _Entry:
    key: str
    node: Node
    flow: Flow
    parent: str | None
    scope: str | None
    order: int
    lst: int = 0  # the sibling list it is in (an index of ``_Compiler.members``)
    deps: list[str] = field(default_factory=list)


@dataclass
class _Racers:
    """The writers of one name that a writer may race with, listed before it: how many, the first few."""

    count: int = 0
    names: list[str] = field(default_factory=list)
    exact: bool = True  # False: at least ``count`` (a list with needs too large to search every pair)

    def add(self, keys: list[str], count: int, exact: bool = True) -> None:
        self.count += count
        self.names.extend(keys[:_RACERS_NAMED])
        self.exact = self.exact and exact


def _retry(*layers: Retry | None) -> dict[str, Any]:
    """Field-by-field merge, later layers winning, over the first (a complete built-in)."""
    return dict(_merged_retry(layers))


@functools.lru_cache(maxsize=1024)
def _merged_retry(layers: tuple[Retry | None, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        for name in ("attempts", "backoff", "initial_ms", "max_ms", "multiplier", "jitter", "on", "not_on"):
            value = getattr(layer, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
    out.setdefault("on", None)
    out["multiplier"] = float(out["multiplier"])
    out["not_on"] = sorted(out["not_on"])
    if out["on"] is not None:
        out["on"] = sorted(out["on"])
    return out


class _Compiler:
    def __init__(self, root: Flow):
        self.root = root
        self.entries: dict[str, _Entry] = {}
        self.diags: list[Diagnostic] = []
        self.exprs: dict[str, dict[str, Any]] = {}
        # the flow graph: vertex -> {successor: None} and vertex -> {predecessor: None}
        self.succ: dict[str, dict[str, None]] = {}
        self.pred: dict[str, dict[str, None]] = {}
        self.flows_workers: list[str] = list(root.workers)
        self.duplicates = False
        #: the entry vertices of nodes whose ``needs`` could not all be followed (an unknown name, a node of
        #: another list, a cycle): wired without those, so the graph may lack edges into them that the spec meant
        self.damaged: set[str] = set()
        #: vertex -> the damaged nodes that lead to it, a bit each (one bit for all when they are too many)
        self.damage: dict[str, int] = {}
        self.damage_exact = True
        #: each sibling list's keys, in order (``_Entry.lst`` indexes it); per list, whether it is a plain
        #: sequence (each node after the one before) and its nodes in an order that respects their deps
        self.members: list[list[str]] = []
        self.plain: dict[int, bool] = {}
        self.topo: dict[int, list[str]] = {}
        #: per list with ``needs`` (see ``leads``): each node's bit, and the bits of the nodes it comes after
        self.after: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        #: "did you mean" for ``$steps`` per flow namespace, built at its first unknown name
        self.suggest: dict[str, Suggestions] = {}

    # --- keys, parents, deps ---------------------------------------------------

    def collect(self, nodes: tuple[Node, ...], flow: Flow, prefix: str, parent: str | None,
                scope: str | None) -> None:
        lst = len(self.members)
        self.members.append([])
        for node in nodes:
            key = prefix + node.id
            if key in self.entries:
                self.duplicates = True  # FD301, reported by the checks
                continue
            self.entries[key] = _Entry(key, node, flow, parent, scope, len(self.entries), lst)
            self.members[lst].append(key)
            if node.kind == "flow":
                if node.subflow is not None:
                    self.flows_workers.extend(w for w in node.subflow.workers if w not in self.flows_workers)
                    self.collect(node.subflow.steps, node.subflow, key + "/", key, key)
            else:
                inner_scope = key if node.kind == "for_each" else scope
                for _, kids in node.child_lists():
                    self.collect(kids, flow, prefix, key, inner_scope)

    def lists(self, nodes: tuple[Node, ...], prefix: str) -> Iterator[tuple[str | None, tuple[Node, ...], str]]:
        """Every sibling list of a flow: (owning group key, nodes, key prefix)."""
        yield None, nodes, prefix
        yield from self._lists_below(nodes, prefix)

    def _lists_below(self, nodes: tuple[Node, ...], prefix: str) -> Iterator[tuple[str | None, tuple[Node, ...], str]]:
        for node in nodes:
            key = prefix + node.id
            if node.kind == "flow":
                if node.subflow is not None:
                    yield key, node.subflow.steps, key + "/"
                    yield from self._lists_below(node.subflow.steps, key + "/")
                continue
            for _, kids in node.child_lists():
                yield key, kids, prefix
                yield from self._lists_below(kids, prefix)

    def resolve_deps(self) -> None:
        """Each node's deps within its list (FD303, FD305 for a name that is none of them); FD304 for a cycle,
        unless an id is used twice (which node a name means is then not known)."""
        ids_anywhere = {e.node.id for e in self.entries.values()}
        for owner, nodes, prefix in self.lists(self.root.steps, ""):
            local = {n.id: n for n in nodes}
            suggest: Suggestions | None = None  # built at the list's first unknown name, then asked again
            sub: dict[str, list[str]] = {}  # key -> its deps, within this list
            for i, node in enumerate(nodes):
                key = prefix + node.id
                entry = self.entries.get(key)
                if entry is None or entry.node is not node:
                    continue
                if node.needs is None:
                    is_branch = owner is not None and self.entries[owner].node.kind == "parallel"
                    entry.deps = [prefix + nodes[i - 1].id] if i > 0 and not is_branch else []
                else:
                    for j, name in enumerate(node.needs):
                        path = join(node.opts, "needs", j)
                        if name in local:
                            entry.deps.append(prefix + name)
                            continue
                        if name in ids_anywhere:
                            self.err(node, "FD305", f"'{node.id}' needs '{name}', which is not in the same list; "
                                     f"'needs' names nodes of the same list{self.needs_hint(key, prefix + name)}",
                                     path)
                            # the fix may well go on an enclosing group (the hint says so)
                            self.damage_at(*self.ancestors(key))
                        else:
                            suggest = suggest or Suggestions(local)
                            self.err(node, "FD303", f"'{node.id}' needs '{name}', which is not a step or group"
                                     f"{suggest.hint(name)}", path)
                        self.damage_at(key)
                    entry.deps = sorted(set(entry.deps))
                sub[key] = entry.deps
            if self.duplicates or not _has_cycle(sub):
                continue
            for members, cycle in _cycles(_digraph(sub)):
                first = self.entries[cycle[0]].node
                names = " → ".join(self.entries[k].node.id for k in [*cycle, cycle[0]])
                self.err(first, "FD304", f"dependency cycle: {names}", join(first.opts, "needs"))
                # its members are wired as if they needed nothing, which leaves the graph acyclic
                for k in sorted(members, key=lambda k: self.entries[k].order):
                    self.entries[k].deps = []
                    self.damage_at(k)

    def damage_at(self, *keys: str) -> None:
        self.damaged.update(self.entry(k) for k in keys)

    def needs_hint(self, key: str, target: str) -> str:
        """Which enclosing group of ``key`` sits in ``target``'s list (where the ``needs`` belongs)."""
        if target not in self.entries:
            return ""
        home, name = self.entries[target].parent, self.entries[target].node.id
        p = self.entries[key].parent
        while p is not None:
            if p == target:
                return f" ('{name}' is a group that encloses it)"
            if self.entries[p].parent == home:
                return f" (put it on '{self.entries[p].node.id}', the enclosing group in the same list as '{name}')"
            p = self.entries[p].parent
        return ""

    def err(self, node: Node, code: str, message: str, path: str) -> None:
        self.diags.append(make(code, message, path, file=node.loc.file))

    # --- the graph -------------------------------------------------------------

    def add_vertex(self, v: str) -> None:
        if v not in self.succ:
            self.succ[v] = {}
            self.pred[v] = {}

    def add_edge(self, a: str, b: str) -> None:
        self.add_vertex(a)
        self.add_vertex(b)
        self.succ[a][b] = None
        self.pred[b][a] = None

    def wire(self, keys: list[str], start: str, end: str) -> None:
        for key in keys:
            e = self.entries[key]
            entry = self.entry(key)
            if e.deps:
                for d in e.deps:
                    self.add_edge(self.exit(d), entry)
            else:
                self.add_edge(start, entry)
            self.add_edge(self.exit(key), end)
            if not e.node.is_step:
                for kids in self.child_keys(key):
                    self.wire(kids, key + ":start", key + ":end")
                if e.node.kind == "switch":
                    self.add_edge(key + ":start", key + ":end")

    def entry(self, key: str) -> str:
        return key if self.entries[key].node.is_step else key + ":start"

    def exit(self, key: str) -> str:
        return key if self.entries[key].node.is_step else key + ":end"

    def child_keys(self, key: str) -> list[list[str]]:
        node = self.entries[key].node
        prefix = key + "/" if node.kind == "flow" else key[: len(key) - len(node.id)]
        if node.kind == "flow":
            return [[prefix + n.id for n in node.subflow.steps]] if node.subflow else []
        return [[prefix + n.id for n in kids] for _, kids in node.child_lists()]

    def topological_order(self) -> list[str]:
        """The graph's vertices, each after all its predecessors (Kahn's algorithm; the graph is acyclic)."""
        waiting = {v: len(p) for v, p in self.pred.items()}
        order = [v for v, n in waiting.items() if n == 0]
        for v in order:  # grows while it is walked
            for w in self.succ[v]:
                waiting[w] -= 1
                if waiting[w] == 0:
                    order.append(w)
        if len(order) != len(self.succ):
            raise RuntimeError("the flow graph has a cycle")  # the nodes of a needs cycle are wired without them
        return order

    def longest_paths(self) -> tuple[dict[str, int], list[str]]:
        """Each step's stage (the most steps on a path before it) and the critical path.

        Ties between equally long paths go to the predecessor written first (then by name).
        """
        order = {k: e.order for k, e in self.entries.items()}
        weight = {v: 1 if v in self.entries and self.entries[v].node.is_step else 0 for v in self.succ}
        dist: dict[str, int] = {}
        best_pred: dict[str, str | None] = {}
        for v in self.topological_order():
            preds = self.pred[v]
            if not preds:
                dist[v], best_pred[v] = 0, None
                continue
            best = min(preds, key=lambda p: (-(dist[p] + weight[p]), _rank(p, order))) if len(preds) > 1 \
                else next(iter(preds))
            dist[v], best_pred[v] = dist[best] + weight[best], best
        path: list[str] = []
        back: str | None = ":end"
        while back is not None:
            if weight.get(back):
                path.append(back)
            back = best_pred.get(back)
        return {k: dist[k] for k, e in self.entries.items() if e.node.is_step}, path[::-1]

    def flow_edges(self) -> list[list[str]]:
        """The flow graph (docs/plan.md ``edges``): steps and group boundaries, linear in the plan's size."""
        return sorted([a, b] for a, succ in self.succ.items() for b in succ)

    def spread_damage(self) -> None:
        """For each vertex, which damaged nodes lead to it (``self.damage``): a bit per damaged node, or, past
        ``_DAMAGE_BITS`` of them (hostile input), one bit for all, which bounds the work and memory."""
        self.damage_exact = len(self.damaged) <= _DAMAGE_BITS
        bits = {v: 1 << i if self.damage_exact else 1 for i, v in enumerate(sorted(self.damaged))}
        damage = self.damage
        for v in self.topological_order():
            found = bits.get(v, 0)
            for p in self.pred[v]:
                found |= damage[p]
            damage[v] = found

    def surely_not_before(self, a: str, b: str) -> bool:
        """True when ``a`` may not have finished when ``b`` starts, and fixing the damaged ``needs`` cannot
        change that (what FD504 and FD307 report).

        Fixing a ``needs`` that could not be followed adds edges into the damaged node D, from nodes that are
        not after it. That makes a new path from ``a`` to ``b`` only when D leads to ``b`` but not to ``a``
        (a path from ``a`` into D starts before D, and then goes on from D to ``b``).
        """
        found = self.damage.get(self.entry(b), 0)
        if found and (not self.damage_exact or found & ~self.damage[self.entry(a)]):
            return False
        return not self.before(a, b)

    def before(self, a: str, b: str) -> bool:
        """True when ``a`` has finished whenever ``b`` starts (a path leads from ``a``'s exit to ``b``'s entry).

        Read from the tree of groups rather than searched in the graph: a path between two nodes leaves the
        one's ancestor in their innermost common list by its exit and enters the other's by its entry (a group
        is entered only through its start, left only through its end), so it exists exactly when the deps of
        that list lead from the one ancestor to the other. Ancestors in two lists of one group (branches of a
        parallel, cases of a switch) are never ordered, nor is a node with a group enclosing it.
        """
        if a not in self.entries or b not in self.entries:
            raise KeyError(a if a not in self.entries else b)
        x, y = self.siblings(a, b)
        if x is None or y is None or self.entries[x].lst != self.entries[y].lst:
            return False
        return self.leads(x, y)

    def siblings(self, a: str, b: str) -> tuple[str | None, str | None]:
        """The ancestors-or-selves of ``a`` and ``b`` that are children of their innermost common ancestor (None
        for the one that is that ancestor itself)."""
        chain_a: dict[str | None, str | None] = {}
        child: str | None = None
        node: str | None = a
        while node is not None:
            chain_a[node] = child
            child, node = node, self.entries[node].parent
        chain_a[None] = child
        child, node = None, b
        while node not in chain_a:
            assert node is not None
            child, node = node, self.entries[node].parent
        return chain_a[node], child

    def leads(self, x: str, y: str) -> bool:
        """True when the deps of their list lead from ``x`` to ``y`` (two nodes of one list).

        A plain sequence compares positions; a list with ``needs`` is walked once into a bit set of what each
        node comes after, when that fits in 4 × ``_RACE_BITS`` bits (8 MB: 8,192 nodes), else searched from ``y``
        for each question.
        """
        lst = self.entries[x].lst
        if self.is_plain(lst):
            return self.entries[x].order < self.entries[y].order
        keys = self.members[lst]
        if lst not in self.after and len(keys) ** 2 <= 4 * _RACE_BITS:
            bit = {k: 1 << i for i, k in enumerate(keys)}
            after: dict[str, int] = {}
            for v in self.deps_order(lst):
                mask = 0
                for d in self.entries[v].deps:
                    mask |= after[d] | bit[d]
                after[v] = mask
            self.after[lst] = (bit, after)
        if lst in self.after:
            bit, after = self.after[lst]
            return bool(after[y] & bit[x])
        seen, todo = {y}, [y]
        while todo:
            for d in self.entries[todo.pop()].deps:
                if d == x:
                    return True
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return False

    def is_plain(self, lst: int) -> bool:
        """Whether list ``lst`` is a plain sequence: each node depends on the one before it, and only on it."""
        if lst not in self.plain:
            keys = self.members[lst]
            self.plain[lst] = all(self.entries[k].deps == ([keys[i - 1]] if i else []) for i, k in enumerate(keys))
        return self.plain[lst]

    def deps_order(self, lst: int) -> list[str]:
        """The nodes of list ``lst``, each after its deps (which are in the same list, and acyclic)."""
        if lst not in self.topo:
            keys = self.members[lst]
            waiting = {k: len(self.entries[k].deps) for k in keys}
            dependents: dict[str, list[str]] = {k: [] for k in keys}
            for k in keys:
                for d in self.entries[k].deps:
                    dependents[d].append(k)
            order = [k for k in keys if not waiting[k]]
            for k in order:  # grows while it is walked
                for w in dependents[k]:
                    waiting[w] -= 1
                    if not waiting[w]:
                        order.append(w)
            self.topo[lst] = order
        return self.topo[lst]

    # --- expressions and templates ---------------------------------------------

    def expression(self, source: str) -> str:
        source = source.strip()
        xid = expr.expression_id(source)
        if xid not in self.exprs:
            try:
                a = expr.analyse(source)
                reads = _step_reads(source)
                # the ids its $steps binding needs at run time; [] is all of them (a use that names no id)
                steps = [] if reads.opaque else sorted({ref for ref, form in reads.refs if form != "bracket"})
                info = {"source": source, "vars": sorted(a.variables), "steps": steps}
            except expr.ExpressionError:
                info = {"source": source, "vars": [], "steps": []}
            self.exprs[xid] = info
        return xid

    def bare(self, text: str | None) -> str | None:
        if text is None:
            return None
        source = expr.single_expression(text)
        return self.expression(source if source is not None else text)

    def template(self, value: Any) -> Any:
        if isinstance(value, str):
            if not expr.is_expression(value):
                return value.replace("$${", "${")
            single = expr.single_expression(value)
            if single is not None:
                return {"$expr": self.expression(single)}
            parts = expr.split_template(value)
            return {"$format": [p if isinstance(p, str) else {"$expr": self.expression(p.source)} for p in parts]}
        if isinstance(value, dict):
            if any(k.startswith("$") for k in value):
                return {"$literal": value}
            return {k: self.template(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.template(v) for v in value]
        return value

    # --- nodes -----------------------------------------------------------------

    def node_json(self, e: _Entry, stages: dict[str, int]) -> dict[str, Any]:
        n = e.node
        out: dict[str, Any] = {
            "key": e.key, "id": n.id, "kind": n.kind, "parent": e.parent, "deps": e.deps, "order": e.order,
            "scope": e.scope, "when": self.bare(n.when), "description": n.description, "spec_path": n.loc.path,
        }
        d = e.flow.defaults
        if n.is_step:
            out.update({
                "with": self.template(n.with_) if n.with_ is not None else None,
                "output": self.output(n),
                "writes": self.writes(n),
                "fail_when": self.bare(n.fail_when),
                "retry": _retry(STEP_RETRY, d.retry, n.retry),
                "timeout_ms": n.timeout_ms if n.timeout_ms is not None else d.timeout_ms,
                "compensate": self.compensation(n.compensate, e.flow),
                "stage": stages.get(e.key, 0),
            })
            if n.kind == "task":
                out["worker"] = n.worker
            else:
                assert n.llm is not None
                out["fallback"] = n.fallback
                out["llm"] = {
                    "signature": {"inputs": [_field(f) for f in n.llm.inputs],
                                  "outputs": [_field(f) for f in n.llm.outputs]},
                    # ('$${' is how the spec writes a literal '${': the model is sent '${')
                    "instructions": n.llm.instructions.replace("$${", "${") if n.llm.instructions else
                    n.llm.instructions,
                    "module": n.llm.module or d.llm_module or "predict",
                    "lm": n.llm.lm,
                    "default_lm": d.llm_lm,
                    "demos": list(n.llm.demos),
                    "redact": list(n.llm.redact),
                }
        elif n.kind == "switch":
            prefix = e.key[: len(e.key) - len(n.id)]
            out["on"] = self.bare(n.on)
            out["cases"] = [{"match": label, "children": [prefix + c.id for c in kids]} for label, kids in n.cases]
            out["default"] = [prefix + c.id for c in n.default] if n.default is not None else None
        else:
            out["children"] = self.child_keys(e.key)[0] if n.kind != "parallel" else [
                k for kids in self.child_keys(e.key) for k in kids]
            if n.kind == "for_each":
                out.update({"items": self.bare(n.items), "as": n.as_, "concurrency": n.concurrency,
                            "output": self.output(n)})
            elif n.kind == "flow":
                sub = n.subflow
                out.update({"path": n.path, "flow_name": sub.name if sub else None,
                            "input_schema": sub.input_schema if sub else None,
                            # the node's own `timeout:`, else the sub-flow file's
                            "timeout_ms": n.timeout_ms if n.timeout_ms is not None else (
                                sub.timeout_ms if sub else None),
                            "with": self.template(n.with_) if n.with_ is not None else None,
                            "output": self.output(n)})
        return out

    def output(self, n: Node) -> dict[str, Any]:
        if n.output.mode == "name":
            return {"mode": "name", "name": n.output.name}
        if n.output.mode == "map":
            return {"mode": "map", "map": {k: self.bare(v) for k, v in n.output.map}}
        return {"mode": "merge"}

    def writes(self, n: Node) -> list[str] | None:
        if n.output.mode == "name":
            return [n.output.name] if n.output.name else []
        if n.output.mode == "map":
            return sorted(k for k, _ in n.output.map)
        if n.kind == "llm" and n.llm is not None:  # a fallback's result is checked to be exactly these fields too
            return sorted(f.name for f in n.llm.outputs)
        return None

    def compensation(self, c: Compensation | None, flow: Flow) -> dict[str, Any] | None:
        if c is None:
            return None
        d = flow.defaults
        return {"worker": c.worker, "with": self.template(c.with_) if c.with_ is not None else None,
                "retry": _retry(COMPENSATION_RETRY, d.compensate_retry, c.retry),
                "timeout_ms": c.timeout_ms if c.timeout_ms is not None else d.compensate_timeout_ms}

    # --- graph checks ------------------------------------------------------------

    def check_step_refs(self, *, ordered: bool = True) -> None:
        """References to step results — ``$steps.<id>``, ``$lookup($steps, '<id>')`` and the mistaken
        ``$steps['<id>']`` — each checked alike: it must name a step (or loop, sub-flow) of its flow that has
        finished when the reader starts. Without ``ordered`` (the graph was not built) only the first is checked.
        """
        by_id: dict[tuple[str, str], str] = {}
        for key, e in self.entries.items():
            by_id[(self.namespace(key), e.node.id)] = key
        for key, e in self.entries.items():
            n = e.node
            for fname, text, path, _ in _expressions(n):
                for ref, form in sorted(_step_refs(text)):
                    shown = _REF_FORMS[form].format(ref)
                    target = by_id.get((self.namespace(key), ref))
                    if form == "bracket":
                        # JSONata reads '[...]' after a value as a filter, which a non-empty string passes whole
                        why = "in JSONata '[...]' filters, it does not look up (a string keeps every result of $steps)"
                        self.err(n, "FD303", f"in '{fname}': '{shown}' is not the result of step '{ref}': {why}; "
                                 f"write '$steps.{ref}'" if target is not None else
                                 f"in '{fname}': '{shown}' names no step{self.steps_hint(key, ref)}; and {why}: "
                                 "write '$steps.<id>'", path)
                    if target is None:
                        if form != "bracket":
                            self.err(n, "FD303", f"in '{fname}': '{shown}' names no step"
                                     f"{self.steps_hint(key, ref)}", path)
                    elif not ordered:
                        continue
                    elif self.entries[target].node.kind in ("sequence", "parallel", "switch"):
                        kind = self.entries[target].node.kind
                        self.err(n, "FD303", f"in '{fname}': '{shown}' names a {kind}, which has no result of "
                                 "its own; read one of its steps (or the context its steps wrote)", path)
                    elif target != key and self.surely_not_before(target, key):
                        self.err(n, "FD504", f"in '{fname}': '{shown}' reads step '{ref}', which does not "
                                 f"always finish before '{n.id}' starts; add it to 'needs' or move it earlier", path)
                    elif target == key and fname != "fail_when" and not fname.startswith(("output.", "compensate.")):
                        self.err(n, "FD504", f"in '{fname}': '{n.id}' cannot read its own result here", path)
                    elif (loop := self.inner_loop(target, key)) is not None:
                        self.err(n, "FD504", f"in '{fname}': '{shown}' reads step '{ref}', which runs once per "
                                 f"item of for_each '{loop}'; read the loop's output instead", path)

    def steps_hint(self, key: str, ref: str) -> str:
        """"did you mean" among the ids of ``key``'s flow (one index per flow, however many unknown names)."""
        ns = self.namespace(key)
        if ns not in self.suggest:
            self.suggest[ns] = Suggestions(e.node.id for k, e in self.entries.items() if self.namespace(k) == ns)
        return self.suggest[ns].hint(ref)

    def inner_loop(self, target: str, key: str) -> str | None:
        """The id of a ``for_each`` that runs ``target`` once per item but does not enclose ``key``."""
        scope = self.entries[target].scope
        while scope is not None:
            e = self.entries[scope]
            if e.node.kind == "for_each" and scope != key and not self.encloses(scope, key):
                return e.node.id
            scope = e.scope
        return None

    def namespace(self, key: str) -> str:
        return key.rsplit("/", 1)[0] if "/" in key else ""

    def encloses(self, group: str, key: str) -> bool:
        p = self.entries[key].parent
        while p is not None:
            if p == group:
                return True
            p = self.entries[p].parent
        return False

    def check_conflicts(self) -> None:
        """FD307: nodes that may run at the same time and write the same context key.

        One diagnostic per writer that may race with writers listed before it (the first of a racing set is
        named by the others), naming the first few of those and how many they are: n writers of one key give
        at most n - 1 diagnostics, not a pair each.
        """
        writers: dict[tuple[str | None, str], list[str]] = {}
        for key, e in self.entries.items():
            if e.node.is_step:
                written = self.writes(e.node) or []
            else:
                written = [e.node.output.name] if e.node.kind in ("for_each", "flow") and e.node.output.name else []
            for k in written:
                writers.setdefault((e.scope, k), []).append(key)
        for (_, name), keys in sorted(writers.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
            if len(keys) < 2:
                continue
            level: dict[str, _Racers] = {}
            for group in self.damage_classes(keys):
                if len(group) > 1:
                    self.races(group, level)
            for b in keys:
                self.report_races(b, name, level)

    def damage_classes(self, keys: list[str]) -> list[list[str]]:
        """``keys`` split so that two of them may be reported racing only within one part: a damaged ``needs``
        (one that could not be followed) may, once corrected, order two nodes when it leads to one of them and
        not to the other (see :meth:`surely_not_before`), so the parts are the keys that the same damaged nodes
        lead to — or, past ``_DAMAGE_BITS`` of those, the keys none leads to, and each other key alone."""
        if not self.damaged:
            return [keys]
        parts: dict[object, list[str]] = {}
        for k in keys:
            found = self.damage.get(self.entry(k), 0)
            parts.setdefault(found if found == 0 or self.damage_exact else ("alone", k), []).append(k)
        return list(parts.values())

    def races(self, writers: list[str], level: dict[str, _Racers]) -> None:
        """For writers of one key (in spec order), the racers each node on the way to them adds at its own
        level: to a node, the writers below its siblings listed before it that may run at the same time.

        Two writers may race as their ancestors below the innermost common one are related (:meth:`before`):
        two branches of a parallel always race, two cases of a switch never both run, and two nodes of one
        list race unless its deps lead from one to the other, which a plain sequence always does.
        """
        kids: dict[str | None, list[str]] = {}  # a node on the way to the writers (None: the top) -> its children
        below: dict[str, list[str]] = {}  # such a node -> the writers at or below it, in spec order
        for w in writers:
            node: str | None = w
            while node is not None:
                parent = self.entries[node].parent
                if node not in below:
                    below[node] = []
                    kids.setdefault(parent, []).append(node)
                below[node].append(w)
                node = parent
        for group, children in kids.items():
            if len(children) < 2:
                continue
            if group is not None and self.entries[group].node.kind == "parallel":
                count = 0  # the writers of the branches before, and the first few of them
                names: list[str] = []
                for c in children:
                    if count:
                        level.setdefault(c, _Racers()).add(names, count)
                    count += len(below[c])
                    names.extend(below[c][:_RACERS_NAMED - len(names)])
                continue
            by_list: dict[int, list[str]] = {}
            for c in children:
                by_list.setdefault(self.entries[c].lst, []).append(c)
            for lst, nodes in by_list.items():
                if len(nodes) > 1 and not self.is_plain(lst):
                    self.list_races(lst, nodes, below, level)

    def list_races(self, lst: int, nodes: list[str], below: dict[str, list[str]], level: dict[str, _Racers]) -> None:
        """The racers of ``nodes``, nodes of list ``lst`` (which has ``needs``) with writers below them.

        One pass over the list finds whether its deps order them all (the case of a valid spec): walked in an
        order that respects the deps, each must be reached from the one just before it. If not, the pairs that
        may race are found with bit sets of the nodes each node comes after and before — or, for a list too
        large for that, the pairs that failed that first test (each is such a pair) are reported.
        """
        order = self.deps_order(lst)
        rank = {k: i for i, k in enumerate(order)}
        chosen = set(nodes)
        latest: dict[str, str | None] = {}  # the latest node of ``nodes`` that leads to each node of the list
        for v in order:
            best: str | None = None
            for d in self.entries[v].deps:
                found = d if d in chosen else latest[d]
                if found is not None and (best is None or rank[found] > rank[best]):
                    best = found
            latest[v] = best
        ranked = sorted(nodes, key=rank.__getitem__)
        gaps = [(p, q) for p, q in itertools.pairwise(ranked) if latest[q] != p]
        if not gaps:
            return
        if len(order) * len(nodes) > _RACE_BITS:
            for p, q in gaps:
                first, then = sorted((p, q), key=lambda k: self.entries[k].order)
                level.setdefault(then, _Racers()).add(below[first], len(below[first]), exact=False)
            return
        bit = {k: 1 << i for i, k in enumerate(nodes)}
        after: dict[str, int] = {}
        dependents: dict[str, list[str]] = {k: [] for k in order}
        for v in order:
            mask = 0
            for d in self.entries[v].deps:
                mask |= after[d] | bit.get(d, 0)
                dependents[d].append(v)
            after[v] = mask
        ahead: dict[str, int] = {}
        for v in reversed(order):
            mask = 0
            for w in dependents[v]:
                mask |= ahead[w] | bit.get(w, 0)
            ahead[v] = mask
        weights: dict[int, int] = {}  # writers below a node -> the nodes with that many
        for k in nodes:
            weights[len(below[k])] = weights.get(len(below[k]), 0) | bit[k]
        for i, x in enumerate(nodes):
            free = ((1 << i) - 1) & ~(after[x] | ahead[x])
            if not free:
                continue
            racers = level.setdefault(x, _Racers())
            racers.count += sum(w * (free & mask).bit_count() for w, mask in weights.items())
            while free and len(racers.names) < _RACERS_NAMED:
                low = free & -free
                racers.names.extend(below[nodes[low.bit_length() - 1]][:_RACERS_NAMED])
                free ^= low

    def report_races(self, b: str, name: str, level: dict[str, _Racers]) -> None:
        """FD307 at ``b`` when it may race with writers of ``name`` listed before it (``level``: see races)."""
        total = _Racers()
        node: str | None = b
        while node is not None:
            found = level.get(node)
            if found is not None:
                total.add(found.names, found.count, found.exact)
            node = self.entries[node].parent
        if not total.count:
            return
        names = sorted(set(total.names), key=lambda k: self.entries[k].order)[:_RACERS_NAMED]
        shown = [f"'{self.entries[k].node.id}'" for k in names]
        nb = self.entries[b].node
        if total.count == 1 or (len(shown) == 1 and not total.exact):
            message = f"'{nb.id}' and {shown[0]} may run at the same time and both write '{name}'; give one of " \
                "them another output name"
        else:
            more = total.count - len(shown)
            if more > 0 or not total.exact:
                listed = ", ".join(shown) + (f" and {'at least ' if not total.exact else ''}{more} other "
                                             f"node{'s' if more != 1 else ''} listed before it" if more > 0 else
                                             " and maybe others")
            else:
                listed = ", ".join(shown[:-1]) + " and " + shown[-1]
            message = f"'{nb.id}' may run at the same time as {listed}, which also write '{name}'; give all but " \
                "one of them another output name"
        self.err(nb, "FD307", message, nb.opts)

    def ancestors(self, key: str) -> list[str]:
        out, p = [], self.entries[key].parent
        while p is not None:
            out.append(p)
            p = self.entries[p].parent
        return out

    def check_unreachable(self) -> None:
        constants = Constants()
        for e in self.entries.values():
            if e.node.when is None:
                continue
            known, value = constants.value(e.node.when)  # a malformed 'when' is FD501, reported by the checks
            if known and not expr.truthy(value):
                self.err(e.node, "FD306", f"'{e.node.id}' never runs: its 'when' is always false",
                         join(e.node.opts, "when"))

    # --- the whole plan ------------------------------------------------------------

    def run(self, build: bool = True) -> Compiled:
        """Graph checks, then (when ``build`` and they found no error) the plan."""
        self.collect(self.root.steps, self.root, "", None, None)
        self.check_unreachable()
        self.resolve_deps()
        if self.duplicates:
            # an id used twice makes what a name refers to ambiguous: the graph is not built, and of the
            # checks that read it only the names that no node has are reported
            self.check_step_refs(ordered=False)
            return Compiled(None, self.origins(), self.diags)
        root_keys = [n.id for n in self.root.steps if n.id in self.entries]
        self.add_vertex(":start")
        self.wire(root_keys, ":start", ":end")
        if self.damaged:
            self.spread_damage()
        stage_of, critical = self.longest_paths()
        self.check_step_refs()
        self.check_conflicts()
        if not build or any(d.severity == "error" for d in self.diags):
            return Compiled(None, self.origins(), self.diags)
        nodes = {k: self.node_json(e, stage_of) for k, e in self.entries.items()}
        n_stages = max(stage_of.values(), default=-1) + 1
        stages: list[list[str]] = [[] for _ in range(n_stages)]
        for key in sorted(stage_of, key=lambda k: self.entries[k].order):
            stages[stage_of[key]].append(key)
        f = self.root
        plan = {
            "plan_version": PLAN_VERSION,
            "flow": {"name": f.name, "version": f.version, "description": f.description,
                     "workers": self.flows_workers, "input_schema": f.input_schema, "timeout_ms": f.timeout_ms},
            "root": root_keys,
            "nodes": nodes,
            "expressions": self.exprs,
            "edges": self.flow_edges(),
            "stages": stages,
            "critical_path": critical,
        }
        return Compiled(plan, self.origins(), self.diags)

    def origins(self) -> dict[str, tuple[str | None, str]]:
        return {k: (e.node.loc.file, e.node.loc.path) for k, e in self.entries.items()}


def _rank(v: str, order: dict[str, int]) -> tuple[int, str]:
    base = v.split(":", 1)[0]
    return (order.get(base, -1), v)


def _field(f: Any) -> dict[str, Any]:
    return {"name": f.name, "type": f.type, "desc": f.desc, "enum": list(f.enum) if f.enum is not None else None}


def _has_cycle(deps: dict[str, list[str]]) -> bool:
    """True when following deps (vertex -> the vertices it depends on) can lead back to a vertex."""
    dependents: dict[str, list[str]] = {v: [] for v in deps}
    waiting = {v: 0 for v in deps}
    for v, ds in deps.items():
        for d in ds:
            if d in dependents:
                dependents[d].append(v)
                waiting[v] += 1
    ready = [v for v, n in waiting.items() if n == 0]
    done = 0
    while ready:
        v = ready.pop()
        done += 1
        for w in dependents[v]:
            waiting[w] -= 1
            if waiting[w] == 0:
                ready.append(w)
    return done != len(deps)


def _digraph(deps: dict[str, list[str]]) -> nx.DiGraph:
    """deps (vertex -> the vertices it depends on) as a networkx graph with edges dep -> vertex."""
    import networkx as nx

    g = nx.DiGraph()
    for key, ds in deps.items():
        g.add_node(key)
        g.add_edges_from((d, key) for d in ds)
    return g


def _cycles(g: nx.DiGraph) -> Iterator[tuple[set[str], list[str]]]:
    """Each strongly connected component that has a cycle, with one of its cycles starting at its first node."""
    import networkx as nx

    for comp in sorted(nx.strongly_connected_components(g), key=lambda c: min(c)):
        if len(comp) > 1 or any(g.has_edge(n, n) for n in comp):
            cycle = [u for u, _ in nx.find_cycle(g.subgraph(comp))]
            start = cycle.index(min(cycle))
            yield comp, cycle[start:] + cycle[:start]


def _expressions(n: Node) -> Iterator[tuple[str, str, str, bool]]:
    from flowdsl.checks import expression_fields

    yield from expression_fields(n, n.opts)


#: how each form of step reference is written, in messages
_REF_FORMS = {"dot": "$steps.{}", "lookup": '$lookup($steps, "{}")', "bracket": '$steps["{}"]'}


@dataclass(frozen=True)
class _Reads:
    """How an expression reads ``$steps``: the ids it names, each with its form (see :data:`_REF_FORMS`), and
    whether it also reads it in a way that names no id (``$keys($steps)``, ``$steps[0]``): ``opaque``."""

    refs: frozenset[tuple[str, str]]
    opaque: bool


@functools.lru_cache(maxsize=4096)
def _step_reads(source: str) -> _Reads:
    """The step references of one expression (raises ExpressionError when it does not parse).

    ``expr.analyse`` knows the ``$steps.<id>`` form only, and takes ``$steps['a'].v`` for a read of a step
    ``v``; the other forms are told apart on the parsed expression here.
    """
    if "steps" not in expr.analyse(source).variables:
        return _Reads(frozenset(), False)
    refs: set[tuple[str, str]] = set()
    opaque = False
    placed: set[int] = set()  # the $steps variables read as one of the forms
    stack: list[Any] = [expr._parse(source.strip()).ast]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kind = getattr(node, "type", None)
        if kind == "path" and _is_steps(node.steps[0]):
            head: Any = node.steps[0]
            second: Any = node.steps[1] if len(node.steps) > 1 else None
            placed.add(id(head))
            if getattr(head, "predicate", None):
                ref = _bracket(head)
                refs.update([(ref, "bracket")] if ref is not None else [])
                opaque = opaque or ref is None
            elif getattr(second, "type", None) == "name":
                refs.add((second.value, "dot"))
            else:
                opaque = True
        elif kind == "function" and getattr(node.procedure, "type", None) == "variable" \
                and node.procedure.value == "lookup" and len(node.arguments or []) == 2 \
                and _is_steps(node.arguments[0]) and not getattr(node.arguments[0], "predicate", None) \
                and getattr(node.arguments[1], "type", None) == "string":
            placed.add(id(node.arguments[0]))
            refs.add((node.arguments[1].value, "lookup"))
        elif _is_steps(node) and id(node) not in placed:
            ref = _bracket(node) if getattr(node, "predicate", None) else None
            refs.update([(ref, "bracket")] if ref is not None else [])
            opaque = opaque or ref is None
        stack.extend(_children(node))
    return _Reads(frozenset(refs), opaque)


def _is_steps(node: Any) -> bool:
    return getattr(node, "type", None) == "variable" and getattr(node, "value", None) == "steps"


def _bracket(node: Any) -> str | None:
    """``'a'`` for ``$steps['a']`` (a filter whose first predicate is one string), else None."""
    first = node.predicate[0]
    inner: Any = getattr(first, "expr", None)
    return str(inner.value) if getattr(first, "type", None) == "filter" and getattr(inner, "type", None) == "string" \
        else None


def _children(node: Any) -> list[Any]:
    """The parsed expression's nodes directly below ``node``."""
    out: list[Any] = []
    for name, value in vars(node).items():
        if name.startswith("_"):
            continue
        for item in value if isinstance(value, list) else [value]:
            for inner in item if isinstance(item, list | tuple) else [item]:
                if hasattr(inner, "type") and hasattr(inner, "value"):
                    out.append(inner)
    return out


def _step_refs(text: str) -> set[tuple[str, str]]:
    """(id, form) for each step reference in the slots of a template or condition."""
    refs: set[tuple[str, str]] = set()
    try:
        for part in expr.split_template(text):
            if isinstance(part, expr.Slot):
                refs |= _step_reads(part.source).refs
    except expr.ExpressionError:
        pass
    return refs


def compile_flow(flow: Flow, *, check_workers: bool = False, search_path: str | None = None,
                 extra: list[Diagnostic] | None = None) -> Compiled:
    """Check ``flow`` and, when it has no errors, compile it into a plan."""
    diags = list(extra or [])
    diags.extend(check_flow(flow, check_workers=check_workers, search_path=search_path))
    for sub in _subflows(flow):
        diags.extend(check_flow(sub, check_workers=check_workers, search_path=search_path))
    result = _Compiler(flow).run(build=not any(d.severity == "error" for d in diags))
    result.diagnostics = diags + result.diagnostics
    if any(d.severity == "error" for d in result.diagnostics):
        result.plan = None
    return result


def _subflows(flow: Flow) -> list[Flow]:
    """Every sub-flow ``flow`` uses, at any depth, each once however many times it is used (a file's model is
    shared by its uses: checking it again would only repeat its diagnostics)."""
    from flowdsl.model import walk

    found: dict[int, Flow] = {}
    todo = [flow]
    while todo:
        for node in walk(todo.pop().steps):
            if node.kind == "flow" and node.subflow is not None and id(node.subflow) not in found:
                found[id(node.subflow)] = node.subflow
                todo.append(node.subflow)
    return list(found.values())
