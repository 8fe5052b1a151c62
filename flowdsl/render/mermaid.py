"""Mermaid renderer: a plan as a ``flowchart TD`` that GitHub Markdown renders.

Stage: renderer. Reads the plan only (through :mod:`flowdsl.render.graph`);
imports stdlib only.

Groups are subgraphs; a parallel's branches sit side by side inside its
subgraph and meet at a ``join`` circle; a for_each opens with a trapezoid
(what it iterates, how many at once) and closes with an inverted one; a switch
is a rhombus whose edges carry the case labels. LLM steps are hexagons; wait
nodes are blue flag shapes (``>"..."]``), a running one drawn ``waiting``. Each
compensation is a dashed orange box reached from its step by a dashed ``undo``
edge; dashed ``then`` edges chain the undo boxes in rollback order, from the
last step's undo to the first's. Mermaid has no backwards edge (``<-.-`` parses
but draws no arrow head), so the undo chain runs down the page in the reverse
of the steps' order: read top to bottom, it is the rollback.

Escaping: every label is a quoted string in which ``"``, ``#``, ``%``, ``&``,
``<``, ``>``, ``|`` and backticks are written as Mermaid entities (``#quot;``,
``#35;``, ``#37;``, ...), so ids, descriptions and expressions may contain any
character. ``%`` matters beyond quoting: Mermaid reads a ``%%{init: ...}%%``
directive anywhere in the text, quoted labels included, so a label holding one
could restyle the diagram (hide the undo boxes with ``themeCSS``); with ``%`` as
an entity no user text can form ``%%``. A line that Mermaid's entity pass would
mistake for a ``style`` statement has its colons written as ``#58;`` too. Node ids are
derived injectively from plan keys (``_`` doubled, other non-alphanumerics as
``_<hex>_``) behind a prefix per role, so no id is a Mermaid keyword.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flowdsl.render.graph import STEP_ROLES, Cluster, Diagram, Edge, Vertex, VertexId, build, walk
from flowdsl.render.runstate import RunStates
from flowdsl.render.view import PlanView, clean, fenced, wrap

#: prefix of each vertex role's ids (distinct, so ids of different roles never collide)
_PREFIX = {"step": "s_", "llm": "l_", "wait": "w_", "undo": "u_", "join": "j_", "fanout": "f_", "gather": "g_",
           "decision": "d_", "merge": "m_", "empty": "e_", "start": "flow_start", "end": "flow_end"}
_SHAPE = {"step": ('["', '"]'), "llm": ('{{"', '"}}'), "wait": ('>"', '"]'), "undo": ('["', '"]'),
          "join": ('(("', '"))'), "fanout": ('[/"', '"\\]'), "gather": ('[\\"', '"/]'), "decision": ('{"', '"}'),
          "merge": ('(("', '"))'), "empty": ('["', '"]'), "start": ('(["', '"])'), "end": ('(["', '"])')}
_ENTITIES = {'"': "#quot;", "#": "#35;", "%": "#37;", "&": "#amp;", "<": "#lt;", ">": "#gt;", "`": "#96;",
             "|": "#124;"}
_KIND_CLASSES = {
    "step": "fill:#ffffff,stroke:#334155,color:#0f172a",
    "llm": "fill:#f3e8ff,stroke:#7e22ce,color:#3b0764",
    "wait": "fill:#f0f9ff,stroke:#0369a1,color:#0c4a6e",
    "undo": "fill:#fff7ed,stroke:#c2410c,color:#7c2d12,stroke-dasharray:5 4",
    "control": "fill:#f1f5f9,stroke:#64748b,color:#334155",
}
_STATE_CLASSES = {
    "pending": "fill:#ffffff,stroke:#cbd5e1,color:#64748b",
    "running": "fill:#dbeafe,stroke:#1d4ed8,color:#1e3a8a,stroke-width:2px",
    "waiting": "fill:#ccfbf1,stroke:#0f766e,color:#134e4a,stroke-width:2px,stroke-dasharray:6 3",
    "succeeded": "fill:#dcfce7,stroke:#15803d,color:#14532d",
    "failed": "fill:#fee2e2,stroke:#b91c1c,color:#7f1d1d,stroke-width:2px",
    "passed_over": "fill:#fefce8,stroke:#a16207,color:#713f12,stroke-dasharray:5 3",
    "compensated": "fill:#ede9fe,stroke:#6d28d9,color:#4c1d95",
    "skipped": "fill:#f3f4f6,stroke:#9ca3af,color:#6b7280,stroke-dasharray:3 3",
    "cancelled": "fill:#fef3c7,stroke:#b45309,color:#78350f",
}
_LINE = 48  # columns per label line before wrapping (a CJK character or an emoji takes two)


def node_id(role: str, key: str) -> str:
    """The Mermaid id of a vertex: injective over (role, key), always a plain identifier."""
    return _PREFIX[role] + _encode(key)


def cluster_id(key: str) -> str:
    """The Mermaid id of a group's subgraph (``c_`` prefix: no vertex id starts so)."""
    return "c_" + _encode(key)


def _encode(key: str) -> str:
    """ASCII letters and digits as they are, ``_`` doubled, anything else as ``_<hex>_``: injective."""
    out = []
    for ch in key:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch == "_":
            out.append("__")
        else:
            out.append(f"_{ord(ch):x}_")
    return "".join(out)


def text(s: str) -> str:
    """Mermaid-safe label text: entities for the characters that end or reinterpret a string."""
    return "".join(_ENTITIES.get(ch, ch) for ch in clean(s).replace("\n", " "))


def _guard(line: str) -> str:
    """A vertex, edge or subgraph line (no colon of its own) that Mermaid's entity pass leaves intact.

    That pass (``encodeEntities``) drops the last ``;`` of a line matching ``style.*:\\S*#.*;`` or
    ``classDef.*:\\S*#.*;`` (meant for ``style x fill:#f00;``), which would spoil an entity such as
    ``#quot;``. A line that might match (a cheap superset, no backtracking) has its colons written as
    ``#58;``, so it cannot.
    """
    if ("style" in line or "classDef" in line) and ":" in line and "#" in line and ";" in line:
        return line.replace(":", "#58;")
    return line


def label(title: str, lines: Iterable[str] = (), policy: str | None = None) -> str:
    """A quoted label body: bold title, then wrapped lines, then the policy in italics."""
    parts = ["<b>" + "<br/>".join(text(t) for t in wrap(title, _LINE)) + "</b>"]
    for line in lines:
        parts.extend(text(t) for t in wrap(line, _LINE))
    if policy:
        parts.append("<i>" + text(policy) + "</i>")
    body = "<br/>".join(p for p in parts if p)
    return body or " "


def _vid(v: VertexId) -> str:
    return node_id(*v)


class _Writer:
    def __init__(self, diagram: Diagram, states: RunStates | None):
        self.d = diagram
        self.states = states
        self.out: list[str] = []
        waits = any(v.role == "wait" for v in walk(diagram.items))
        self.legend_states = states.legend(waits) if states is not None else ()

    def vertex(self, v: Vertex, indent: str) -> None:
        open_, close = _SHAPE[v.role]
        self.out.append(_guard(f"{indent}{_vid(v.id)}{open_}{label(v.title, v.lines, v.policy)}{close}"))

    def items(self, items: list[Vertex | Cluster], indent: str) -> None:
        for item in items:
            if isinstance(item, Cluster):
                self.out.append(_guard(f'{indent}subgraph {cluster_id(item.key)}["{label(item.title, item.lines)}"]'))
                self.items(item.items, indent + "    ")
                self.out.append(f"{indent}end")
            else:
                self.vertex(item, indent)

    def edge(self, e: Edge) -> str:
        lab = f'|"{text(e.label)}"|' if e.label else ""
        arrow = "-.->" if e.style in ("undo", "rollback") else "-->"
        return _guard(f"    {_vid(e.src)} {arrow}{lab} {_vid(e.dst)}")

    def write(self) -> str:
        self.out = ["flowchart TD"]
        self.items(self.d.items, "    ")
        if self.states is not None:
            self.legend()
        for e in self.d.edges:
            self.out.append(self.edge(e))
        if self.states is not None:  # invisible links keep the legend on one row (after the edges: linkStyle counts)
            self.out.append("    " + " ~~~ ".join(f"legend_{state}" for state in self.legend_states))
        self.styles()
        return "\n".join(self.out) + "\n"

    def legend(self) -> None:
        caption = self.states.caption() if self.states is not None else "run"
        self.out.append(_guard(f'    subgraph run_legend["{label(caption)}"]'))
        self.out.append("        direction LR")
        for state in self.legend_states:
            self.out.append(f'        legend_{state}["{text(state.replace("_", " "))}"]')
        self.out.append("    end")

    def styles(self) -> None:
        vertices = walk(self.d.items)
        classes: dict[str, list[str]] = {}
        for v in vertices:
            classes.setdefault(self.class_of(v), []).append(_vid(v.id))
        if self.states is not None:
            for state in self.legend_states:
                classes.setdefault("st_" + state, []).append(f"legend_{state}")
        for name, style in [*_KIND_CLASSES.items(), *(("st_" + k, s) for k, s in _STATE_CLASSES.items())]:
            if name in classes:
                self.out.append(f"    classDef {name} {style}")
        for name in sorted(classes):
            self.out.append(f"    class {','.join(classes[name])} {name}")
        undo_links = [str(i) for i, e in enumerate(self.d.edges) if e.style != "flow"]
        if undo_links:
            self.out.append(f"    linkStyle {','.join(undo_links)} stroke:#c2410c,color:#9a3412")

    def class_of(self, v: Vertex) -> str:
        if self.states is not None:
            if v.role in STEP_ROLES:
                return "st_" + self.states.state_of(v.key, wait=v.role == "wait")
            if v.role == "undo" and v.key in self.states.undos:
                return "st_" + self.states.undos[v.key]
        if v.role in STEP_ROLES or v.role == "undo":
            return v.role
        return "control"


def render_mermaid(plan: Mapping[str, Any], *, run_states: RunStates | None = None, markdown: bool = False) -> str:
    """The plan as Mermaid flowchart text (wrapped in a fenced ```` ```mermaid ```` block with ``markdown``)."""
    body = _Writer(build(PlanView(plan)), run_states).write()
    return fenced(body, "mermaid") if markdown else body
