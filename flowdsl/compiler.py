"""Compiler: a checked model to the execution plan (docs/plan.md).

Stage: compiler. Imports ``flowdsl.diagnostics``, ``flowdsl.model``,
``flowdsl.expr``, ``flowdsl.checks``, ``flowdsl.checks_retry`` (retry filters,
checked once the worker modules are imported), ``flowdsl.compiler_checks``,
``flowdsl.compiler_reads``, ``flowdsl.compiler_waits``,
``flowdsl.runtime.plancheck`` (to vouch for the plans it makes, which runtimes
then need not check) and, only to name a dependency cycle, networkx — networkx
lives here and only here. The
compiler owns the dependency graph, so the graph checks are made over it:
references in ``needs`` and cycles here, ``$steps`` references and outputs
written by nodes that may run concurrently in ``compiler_checks``.

The graph: each step (and each wait) is a vertex; each group ``g`` is two
vertices ``g:start`` and ``g:end`` with its children wired between them; the
whole flow sits between ``:start`` and ``:end``. Stages and the critical path
are longest-path computations over it where each step or wait weighs 1. The
graph is plain adjacency dicts (vertex -> successors/predecessors,
insertion-ordered, no duplicate edges): building and walking it is linear, and
networkx is imported only when a ``needs`` cycle has to be reported.

Module map: ``compiler`` (collecting the nodes, resolving ``needs``, wiring the
graph, building the plan; :func:`compile_flow`), ``compiler_checks`` (the
order of nodes read from the tree of groups, and the graph checks that read it:
:class:`~flowdsl.compiler_checks.GraphChecks`), ``compiler_reads`` (context
fields read that only a node running beside the reader writes:
:class:`~flowdsl.compiler_reads.ReadChecks`, a ``GraphChecks`` the compiler
inherits), ``compiler_waits`` (signals waited for twice, or inside a loop without a key:
:func:`~flowdsl.compiler_waits.check_signals`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowdsl import expr
from flowdsl.checks import check_flow
from flowdsl.checks_retry import check_retry_filters
from flowdsl.compiler_checks import _Entry, _step_reads
from flowdsl.compiler_reads import ReadChecks
from flowdsl.compiler_waits import check_signals
from flowdsl.diagnostics import Diagnostic, Suggestions, join, make
from flowdsl.model import Compensation, Flow, Node, Retry

if TYPE_CHECKING:
    import networkx as nx

#: the newest plan layout this compiler writes; a plan is written in the oldest layout that holds it, so that
#: older processes read what they can: 2 added a step's ``on_failure``, 3 the ``wait`` nodes, 4 a signal wait's
#: ``signal_key`` (docs/plan.md)
PLAN_VERSION = 4

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


def _retry(*layers: Retry | None) -> dict[str, Any]:
    """Field-by-field merge, later layers winning, over the first (a complete built-in)."""
    return dict(_merged_retry(layers))


@functools.lru_cache(maxsize=1024)
def _merged_retry(layers: tuple[Retry | None, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given: dict[str, int] = {}  # the layer each field came from
    for n, layer in enumerate(layers):
        if layer is None:
            continue
        for name in ("attempts", "backoff", "initial_ms", "max_ms", "multiplier", "jitter", "on", "not_on"):
            value = getattr(layer, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
                given[name] = n
    if given["initial_ms"] > given["max_ms"] and out["initial_ms"] > out["max_ms"]:
        # a cap from an earlier layer (the built-in one, `defaults:`) never shortens the delay a later one wrote:
        # `initial: 2m` waited 30 s (one layer giving both the wrong way round is FD402)
        out["max_ms"] = out["initial_ms"]
    out.setdefault("on", None)
    out["multiplier"] = float(out["multiplier"])
    out["not_on"] = sorted(out["not_on"])
    if out["on"] is not None:
        out["on"] = sorted(out["on"])
    return out


class _Compiler(ReadChecks):
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
        #: each sibling list's keys, in order (``_Entry.lst`` indexes it)
        self.members: list[list[str]] = []
        # what the graph checks learn and keep (see GraphChecks)
        self.damage: dict[str, int] = {}
        self.damage_exact = True
        self.plain: dict[int, bool] = {}
        self.topo: dict[int, list[str]] = {}
        self.after: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
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

    def ancestors(self, key: str) -> list[str]:
        out, p = [], self.entries[key].parent
        while p is not None:
            out.append(p)
            p = self.entries[p].parent
        return out

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
            if not e.node.is_leaf:
                for kids in self.child_keys(key):
                    self.wire(kids, key + ":start", key + ":end")
                if e.node.kind == "switch":
                    self.add_edge(key + ":start", key + ":end")

    def entry(self, key: str) -> str:
        return key if self.entries[key].node.is_leaf else key + ":start"

    def exit(self, key: str) -> str:
        return key if self.entries[key].node.is_leaf else key + ":end"

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
        """Each step's (and wait's) stage (the most steps and waits on a path before it) and the critical path.

        Ties between equally long paths go to the predecessor written first (then by name).
        """
        order = {k: e.order for k, e in self.entries.items()}
        weight = {v: 1 if v in self.entries and self.entries[v].node.is_leaf else 0 for v in self.succ}
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
        return {k: dist[k] for k, e in self.entries.items() if e.node.is_leaf}, path[::-1]

    def flow_edges(self) -> list[list[str]]:
        """The flow graph (docs/plan.md ``edges``): steps and group boundaries, linear in the plan's size."""
        return sorted([a, b] for a, succ in self.succ.items() for b in succ)

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
            if n.on_failure is not None:  # (written only when set: a plan without it is of plan_version 1)
                out["on_failure"] = n.on_failure
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
        elif n.kind == "wait":
            out.update({
                "signal": n.signal,
                "delay_ms": n.delay_ms,
                "timeout_ms": n.timeout_ms,
                "output": self.output(n),
                "writes": self.writes(n),
                "stage": stages.get(e.key, 0),
            })
            if n.signal_key is not None:  # (written only when set: a plan without it is of plan_version 3)
                out["signal_key"] = self.bare(n.signal_key)
            if n.on_failure is not None:
                out["on_failure"] = n.on_failure
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
        if n.kind == "wait" and n.signal is None:  # a timer's result is {}
            return []
        return None

    def compensation(self, c: Compensation | None, flow: Flow) -> dict[str, Any] | None:
        if c is None:
            return None
        d = flow.defaults
        return {"worker": c.worker, "with": self.template(c.with_) if c.with_ is not None else None,
                "retry": _retry(COMPENSATION_RETRY, d.compensate_retry, c.retry),
                "timeout_ms": c.timeout_ms if c.timeout_ms is not None else d.compensate_timeout_ms}

    # --- the whole plan ------------------------------------------------------------

    def run(self, build: bool = True) -> Compiled:
        """Graph checks, then (when ``build`` and they found no error) the plan."""
        self.collect(self.root.steps, self.root, "", None, None)
        self.check_unreachable()
        self.resolve_deps()
        self.diags.extend(check_signals(self.entries))
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
        self.check_unseen_reads()
        self.check_passed_over_reads()
        if not build or any(d.severity == "error" for d in self.diags):
            return Compiled(None, self.origins(), self.diags)
        nodes = {k: self.node_json(e, stage_of) for k, e in self.entries.items()}
        n_stages = max(stage_of.values(), default=-1) + 1
        stages: list[list[str]] = [[] for _ in range(n_stages)]
        for key in sorted(stage_of, key=lambda k: self.entries[k].order):
            stages[stage_of[key]].append(key)
        f = self.root
        plan = {
            "plan_version": _plan_version(nodes),
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


def _plan_version(nodes: dict[str, dict[str, Any]]) -> int:
    """The oldest plan layout that holds ``nodes``: 4 with a keyed wait (its ``signal_key``), 3 with a wait node, 2
    with a step's ``on_failure``, else 1."""
    if any(n["kind"] == "wait" for n in nodes.values()):
        return 4 if any("signal_key" in n for n in nodes.values()) else 3
    return 2 if any("on_failure" in n for n in nodes.values()) else 1


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


def compile_flow(flow: Flow, *, check_workers: bool = False, search_path: str | None = None,
                 extra: list[Diagnostic] | None = None) -> Compiled:
    """Check ``flow`` and, when it has no errors, compile it into a plan."""
    diags = list(extra or [])
    diags.extend(check_flow(flow, check_workers=check_workers, search_path=search_path))
    subflows = _subflows(flow)
    for sub in subflows:
        diags.extend(check_flow(sub, check_workers=check_workers, search_path=search_path))
    flows = [flow, *subflows]
    if check_workers and any(f.workers for f in flows) and not any(d.code == "FD205" for d in diags):
        # once every worker module is imported (the spec's and its sub-flows'), the exception classes are known;
        # not when none is listed (nothing was imported: the classes the workers raise are nowhere to be seen)
        diags.extend(check_retry_filters(flows))
    result = _Compiler(flow).run(build=not any(d.severity == "error" for d in diags))
    result.diagnostics = diags + result.diagnostics
    if any(d.severity == "error" for d in result.diagnostics):
        result.plan = None
    elif result.plan is not None:  # made here, so well shaped: a runtime's check of it is a comparison
        from flowdsl.runtime.plancheck import vouch

        vouch(result.plan)
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
