"""Graphviz renderer: a plan as DOT text, and as SVG or PNG through the ``dot`` program.

Stage: renderer. Reads the plan only (through :mod:`flowdsl.render.graph`);
imports stdlib, and the ``graphviz`` package lazily, only to run ``dot``.

Groups are clusters (``cluster:<key>``): a parallel's branches are lanes side
by side in a dashed cluster, meeting at a ``join`` circle; a for_each opens
with a trapezium and closes with an inverted one; a switch is a diamond whose
edges carry the case labels; a sub-flow is a shaded cluster. LLM steps are
purple hexagons; wait nodes are blue boxes with clipped corners (``diagonals``),
a running one drawn ``waiting``. Each compensation is a dashed orange box kept
on its step's rank, reached by a dashed ``undo`` edge; the ``then`` edges
between undo boxes are laid out forwards but drawn with ``dir=back``, so the
rollback path reads bottom to top beside the flow.

Every id is a quoted DOT string (``"step:<key>"``, backslashes and quotes
escaped) and every label an HTML-like label with ``&<>"`` escaped, so any
character in ids, descriptions and expressions is drawn as written.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

from flowdsl.render.graph import STEP_ROLES, Cluster, Diagram, Edge, Vertex, VertexId, build, walk
from flowdsl.render.runstate import RunStates
from flowdsl.render.view import PlanView, RenderError, clean, wrap

_FONT = "Helvetica"
_LINE = 44
_VERTEX_ATTRS = {
    "step": 'shape=box, style="rounded,filled", fillcolor="#ffffff", color="#334155"',
    "llm": 'shape=hexagon, style="filled", fillcolor="#f3e8ff", color="#7e22ce"',
    "wait": 'shape=box, style="filled,diagonals", fillcolor="#f0f9ff", color="#0369a1", fontcolor="#0c4a6e", '
            'margin="0.15,0.08"',
    "undo": 'shape=box, style="rounded,dashed,filled", fillcolor="#fff7ed", color="#c2410c", fontcolor="#7c2d12"',
    "start": 'shape=box, style="rounded,filled", fillcolor="#e2e8f0", color="#475569"',
    "end": 'shape=box, style="rounded,filled", fillcolor="#e2e8f0", color="#475569"',
    "join": 'shape=circle, style="filled", fillcolor="#dbeafe", color="#2563eb", fontsize=9, margin=0.02',
    "merge": 'shape=circle, style="filled", fillcolor="#f1f5f9", color="#64748b", fontsize=9, margin=0.02',
    "fanout": 'shape=invhouse, style="filled", fillcolor="#cffafe", color="#0891b2"',
    "gather": 'shape=house, style="filled", fillcolor="#cffafe", color="#0891b2"',
    "decision": 'shape=diamond, style="filled", fillcolor="#fef9c3", color="#a16207"',
    "empty": 'shape=box, style="dotted", color="#94a3b8"',
}
_CLUSTER_ATTRS = {
    "parallel": 'style="rounded,dashed", color="#2563eb", fontcolor="#1e40af"',
    "sequence": 'style="rounded", color="#94a3b8", fontcolor="#334155"',
    "for_each": 'style="rounded,bold", color="#0891b2", fontcolor="#155e75"',
    "switch": 'style="rounded,dotted", color="#a16207", fontcolor="#713f12"',
    "flow": 'style="rounded,filled", fillcolor="#f8fafc", color="#475569", penwidth=2, fontcolor="#0f172a"',
}
_STATE_COLORS = {  # fill, border
    "pending": ("#ffffff", "#cbd5e1"),
    "running": ("#dbeafe", "#1d4ed8"),
    "waiting": ("#ccfbf1", "#0f766e"),
    "succeeded": ("#dcfce7", "#15803d"),
    "failed": ("#fee2e2", "#b91c1c"),
    "passed_over": ("#fefce8", "#a16207"),
    "compensated": ("#ede9fe", "#6d28d9"),
    "skipped": ("#f3f4f6", "#9ca3af"),
    "cancelled": ("#fef3c7", "#b45309"),
}
_ROLE_PREFIX = {"step": "step", "llm": "llm", "wait": "wait", "undo": "undo", "join": "join", "fanout": "fanout",
                "gather": "gather", "decision": "switch", "merge": "merge", "empty": "empty",
                "start": "flow", "end": "flow"}


def quote(s: str) -> str:
    """A DOT quoted string (ids): backslashes and double quotes escaped."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def vertex_name(v: VertexId) -> str:
    role, key = v
    if role in ("start", "end"):
        return quote(f"flow:{role}")
    return quote(f"{_ROLE_PREFIX[role]}:{key}")


def html_label(title: str, lines: Iterable[str] = (), policy: str | None = None, *, bold: bool = True) -> str:
    """An HTML-like label ``<...>``: title (bold), wrapped lines, then the policy in small italics."""
    def esc(s: str) -> str:
        return html.escape(clean(s).replace("\n", " "), quote=True)

    head = "<BR/>".join(esc(t) for t in wrap(title, _LINE))
    parts = [f"<B>{head}</B>" if bold and head else head]
    for line in lines:
        parts.extend(esc(t) for t in wrap(line, _LINE))
    if policy:
        parts.append(f'<FONT POINT-SIZE="9"><I>{esc(policy)}</I></FONT>')
    return "<" + ("<BR/>".join(p for p in parts if p) or " ") + ">"


class _Writer:
    def __init__(self, diagram: Diagram, states: RunStates | None):
        self.d = diagram
        self.states = states
        self.out: list[str] = []

    def write(self) -> str:
        self.out = [
            "digraph flowdsl {",
            f'    graph [rankdir=TB, newrank=true, fontname="{_FONT}", fontsize=12, labelloc=t, '
            f'nodesep=0.3, ranksep=0.35, label={html_label(self.d.title)}];',
            f'    node [fontname="{_FONT}", fontsize=11, margin="0.12,0.05"];',
            f'    edge [fontname="{_FONT}", fontsize=9, color="#334155", arrowsize=0.7];',
        ]
        self.items(self.d.items, "    ")
        if self.states is not None:
            self.legend()
        for e in self.d.edges:
            self.out.append("    " + self.edge(e))
        self.out.append("}")
        return "\n".join(self.out) + "\n"

    def items(self, items: list[Vertex | Cluster], indent: str) -> None:
        paired: list[str] = []
        step_role: dict[str, str] = {}
        for item in items:
            if isinstance(item, Cluster):
                self.out.append(f"{indent}subgraph {quote('cluster:' + item.key)} {{")
                self.out.append(f"{indent}    graph [{_CLUSTER_ATTRS.get(item.kind, '')}, "
                                f"label={html_label(item.title, item.lines)}];")
                self.items(item.items, indent + "    ")
                self.out.append(f"{indent}}}")
            else:
                self.out.append(f"{indent}{vertex_name(item.id)} [{self.attrs(item)}];")
                if item.role in STEP_ROLES:
                    step_role[item.key] = item.role
                elif item.role == "undo" and item.key in step_role:  # keep the undo box beside its step
                    paired.append(f"{indent}{{rank=same; {vertex_name((step_role[item.key], item.key))}; "
                                  f"{vertex_name(item.id)};}}")
        self.out.extend(paired)

    def attrs(self, v: Vertex) -> str:
        bold = v.role in STEP_ROLES or v.role == "undo"
        title = "start" if v.role == "start" else v.title  # the flow's title is the graph's label
        parts = [_VERTEX_ATTRS[v.role], f"label={html_label(title, v.lines, v.policy, bold=bold)}"]
        state = None
        if self.states is not None:
            if v.role in STEP_ROLES:
                state = self.states.state_of(v.key, wait=v.role == "wait")
            elif v.role == "undo":
                state = self.states.undos.get(v.key)
        if state is not None:
            fill, border = _STATE_COLORS[state]
            parts.append(f'fillcolor="{fill}", color="{border}", penwidth=2')
            if state == "skipped":
                parts.append('fontcolor="#6b7280"')
        return ", ".join(parts)

    def edge(self, e: Edge) -> str:
        lab = f", label={html_label(e.label, bold=False)}" if e.label else ""
        if e.style == "undo":
            return (f"{vertex_name(e.src)} -> {vertex_name(e.dst)} "
                    f'[style=dashed, color="#c2410c", fontcolor="#9a3412"{lab}];')
        if e.style == "rollback":
            return (f"{vertex_name(e.dst)} -> {vertex_name(e.src)} "
                    f'[dir=back, style=dashed, color="#c2410c", fontcolor="#9a3412"{lab}];')
        return f"{vertex_name(e.src)} -> {vertex_name(e.dst)}{f' [{lab[2:]}]' if lab else ''};"

    def legend(self) -> None:
        caption = self.states.caption() if self.states is not None else "run"
        self.out.append('    subgraph "cluster:legend" {')
        self.out.append(f'        graph [style="rounded", color="#94a3b8", label={html_label(caption)}];')
        names = []
        waits = any(v.role == "wait" for v in walk(self.d.items))
        for state in self.states.legend(waits) if self.states is not None else ():
            fill, border = _STATE_COLORS[state]
            name = quote(f"legend:{state}")
            names.append(name)
            self.out.append(f'        {name} [shape=box, style="rounded,filled", fillcolor="{fill}", '
                            f'color="{border}", fontsize=9, label={html_label(state.replace("_", " "), bold=False)}];')
        self.out.append(f"        {{rank=same; {'; '.join(names)};}}")
        self.out.append(f"        {' -> '.join(names)} [style=invis];")
        self.out.append("    }")


def render_dot(plan: Mapping[str, Any], *, run_states: RunStates | None = None) -> str:
    """The plan as Graphviz DOT text."""
    return _Writer(build(PlanView(plan)), run_states).write()


def render_image(dot_text: str, fmt: str) -> bytes:
    """Lay out DOT text with Graphviz's ``dot`` program into ``svg`` or ``png`` bytes."""
    try:
        import graphviz
    except ImportError:
        raise RenderError("drawing SVG or PNG needs the Python package 'graphviz' (pip install graphviz)") from None
    try:
        data: bytes = graphviz.Source(dot_text).pipe(format=fmt, encoding=None)
    except graphviz.ExecutableNotFound:
        raise RenderError("drawing SVG or PNG needs Graphviz's 'dot' program, which was not found on PATH; "
                          "install the 'graphviz' system package (Debian/Ubuntu: apt-get install graphviz, "
                          "macOS: brew install graphviz)") from None
    except graphviz.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode("utf-8", "replace").strip()
        raise RenderError(f"Graphviz failed to lay out the diagram: {detail or exc}") from None
    return data
