"""The drawing graph shared by the Mermaid and DOT renderers: clusters, vertices, edges.

Stage: renderer. Reads the plan through :class:`flowdsl.render.view.PlanView`;
imports stdlib only.

How a plan becomes a graph:

- a step is a vertex (``step`` or ``llm``); a step with a compensation gets an
  ``undo`` vertex beside it and a dashed ``undo`` edge to it; a wait node is a
  ``wait`` vertex (never compensated);
- every group is a cluster holding its children; a parallel's branches are
  lanes inside it, side by side, closed by a ``join`` vertex; a for_each opens
  with a ``fanout`` vertex and closes with a ``gather`` vertex; a switch opens
  with a ``decision`` vertex whose edges carry the case labels and closes with
  a ``merge`` vertex;
- within each sibling list, a node's ``deps`` become edges from the exits of
  each dependency to the node's entries; nodes without deps hang from the
  list's entry, nodes nothing waits for feed the list's exit;
- ``rollback`` edges run between undo vertices in rollback order (the reverse
  of the steps' partial order), so the undo path reads backwards.

Vertex ids are ``(role, key)`` pairs; each renderer maps them to its own syntax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowdsl.render.view import Glyphs, PlanView

VertexId = tuple[str, str]
#: vertex roles that stand for a leaf of the flow, a step or a wait (coloured by its run state)
STEP_ROLES = ("step", "llm", "wait")
_ROLE_OF_KIND = {"llm": "llm", "wait": "wait"}


@dataclass
class Vertex:
    """One drawn shape. ``key`` is the plan node it belongs to ('' for the flow's start and end)."""

    role: str
    key: str
    title: str
    lines: tuple[str, ...] = ()
    policy: str | None = None

    @property
    def id(self) -> VertexId:
        return (self.role, self.key)


@dataclass
class Cluster:
    """A group drawn as a box around its members (``kind`` is the group's kind)."""

    key: str
    kind: str
    title: str
    lines: tuple[str, ...]
    items: list[Vertex | Cluster] = field(default_factory=list)


@dataclass
class Edge:
    """``style`` is ``flow``, ``undo`` (step to its compensation) or ``rollback`` (undo order)."""

    src: VertexId
    dst: VertexId
    style: str = "flow"
    label: str | None = None


@dataclass
class Diagram:
    title: str
    items: list[Vertex | Cluster]
    edges: list[Edge]


class _Builder:
    def __init__(self, view: PlanView):
        self.view = view
        self.g = Glyphs.pick(False)
        self.edges: list[Edge] = []

    def edge(self, srcs: list[VertexId], dsts: list[VertexId], style: str = "flow",
             label: str | None = None) -> None:
        for s in srcs:
            for d in dsts:
                self.edges.append(Edge(s, d, style, label))

    def build_list(self, keys: tuple[str, ...], items: list[Vertex | Cluster],
                   owner: str) -> tuple[list[VertexId], list[VertexId]]:
        """Draw a sibling list into ``items``; return its (entries, exits)."""
        if not keys:
            v = Vertex("empty", owner, "(nothing)")
            items.append(v)
            return [v.id], [v.id]
        ends: dict[str, tuple[list[VertexId], list[VertexId]]] = {}
        for key in keys:
            ends[key] = self.build_node(key, items)
        inside = set(keys)
        waited_on = {d for k in keys for d in self.view.deps(k) if d in inside}
        entries: list[VertexId] = []
        exits: list[VertexId] = []
        for key in keys:
            deps = [d for d in self.view.deps(key) if d in inside]
            for d in deps:
                self.edge(ends[d][1], ends[key][0])
            if not deps:
                entries.extend(ends[key][0])
            if key not in waited_on:
                exits.extend(ends[key][1])
        return entries, exits

    def build_node(self, key: str, items: list[Vertex | Cluster]) -> tuple[list[VertexId], list[VertexId]]:
        view, kind = self.view, self.view.kind(key)
        if view.is_leaf(key):
            text = view.step_text(key, self.g)
            v = Vertex(_ROLE_OF_KIND.get(kind, "step"), key, text.title, text.lines, text.policy)
            items.append(v)
            if view.is_step(key) and view.node(key).get("compensate"):
                undo = view.undo_text(key, self.g)
                u = Vertex("undo", key, undo.title, undo.lines, undo.policy)
                items.append(u)
                self.edge([v.id], [u.id], "undo", "undo")
            return [v.id], [v.id]
        cluster = Cluster(key, kind, view.group_title(key), tuple(view.group_lines(key, self.g)))
        items.append(cluster)
        inner = cluster.items
        if kind == "parallel":
            join = Vertex("join", key, "join")
            entries: list[VertexId] = []
            for lane in view.lanes(key):
                lane_entries, lane_exits = self.build_list(lane.keys, inner, key)
                entries.extend(lane_entries)
                self.edge(lane_exits, [join.id])
            inner.append(join)
            return entries or [join.id], [join.id]
        if kind == "for_each":
            fan = Vertex("fanout", key, "for each", (view.fan_out_text(key, self.g),))
            inner.append(fan)
            body_entries, body_exits = self.build_list(view.lanes(key)[0].keys, inner, key)
            gather = Vertex("gather", key, view.gather_text(key, self.g))
            inner.append(gather)
            self.edge([fan.id], body_entries)
            self.edge(body_exits, [gather.id])
            return [fan.id], [gather.id]
        if kind == "switch":
            decision = Vertex("decision", key, "switch", (view.switch_text(key),))
            merge = Vertex("merge", key, "merge")
            inner.append(decision)
            has_default = view.node(key).get("default") is not None
            for lane in view.lanes(key):
                if not lane.keys:
                    self.edge([decision.id], [merge.id], label=lane.caption)
                    continue
                lane_entries, lane_exits = self.build_list(lane.keys, inner, key)
                self.edge([decision.id], lane_entries, label=lane.caption)
                self.edge(lane_exits, [merge.id])
            if not has_default:
                self.edge([decision.id], [merge.id], label="no match")
            inner.append(merge)
            return [decision.id], [merge.id]
        lane_keys = view.lanes(key)[0].keys if view.lanes(key) else ()
        return self.build_list(lane_keys, inner, key)


def build(view: PlanView) -> Diagram:
    """The drawing graph of a plan (deterministic: same plan, same graph)."""
    b = _Builder(view)
    g = b.g
    start = Vertex("start", "", view.flow_title(g))
    end = Vertex("end", "", "end")
    items: list[Vertex | Cluster] = [start]
    entries, exits = b.build_list(view.root, items, "")
    items.append(end)
    b.edge([start.id], entries)
    b.edge(exits, [end.id])
    for later, earlier in view.rollback_edges():
        b.edges.append(Edge(("undo", later), ("undo", earlier), "rollback", "then"))
    return Diagram(view.flow_title(g), items, b.edges)


def walk(items: list[Vertex | Cluster]) -> list[Vertex]:
    """Every vertex below ``items``, in drawing order."""
    out: list[Vertex] = []
    for item in items:
        if isinstance(item, Cluster):
            out.extend(walk(item.items))
        else:
            out.append(item)
    return out
