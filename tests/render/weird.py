"""A hand-written plan whose keys, ids and texts no compiler would produce, to prove the renderers
escape what they are given rather than what they expect."""

from __future__ import annotations

from typing import Any

WEIRD_KEYS = ["a/b", "a_2f_b", "a__b", "end", "x y", 'q"t', "graph", "o", "-->", "ünï/中文", "#35;", "a|b"]


def _task(key: str, deps: list[str], order: int, **extra: Any) -> dict[str, Any]:
    node = {"key": key, "id": key, "kind": "task", "worker": f"w.{order}", "deps": deps, "parent": None,
            "order": order, "scope": None, "when": None, "description": None, "spec_path": f"/steps/{order}",
            "with": None, "output": {"mode": "merge"}, "writes": None, "fail_when": None,
            "retry": {"attempts": 1, "backoff": "exponential", "initial_ms": 1000, "max_ms": 30000,
                      "multiplier": 2.0, "jitter": "none", "on": None, "not_on": []},
            "timeout_ms": None, "compensate": None, "stage": order}
    node.update(extra)
    return node


def weird_plan(descriptions: list[str] | None = None) -> dict[str, Any]:
    """A chain of steps keyed by :data:`WEIRD_KEYS`, every other one compensated, with odd texts."""
    descriptions = descriptions or []
    nodes: dict[str, Any] = {}
    prev: list[str] = []
    comp = {"worker": 'undo "it" <now>', "with": None, "timeout_ms": 2000,
            "retry": {"attempts": 3, "backoff": "constant", "initial_ms": 500, "max_ms": 500, "multiplier": 2.0,
                      "jitter": "none", "on": ["X|Y"], "not_on": []}}
    for i, key in enumerate(WEIRD_KEYS):
        desc = descriptions[i % len(descriptions)] if descriptions else f"step {key}"
        nodes[key] = _task(key, prev, i, description=desc, compensate=comp if i % 2 else None,
                           when="x1" if i == 3 else None)
        prev = [key]
    extra = [f"d{i}" for i in range(len(WEIRD_KEYS), len(descriptions))]
    for j, key in enumerate(extra, len(WEIRD_KEYS)):
        nodes[key] = _task(key, prev, j, description=descriptions[j])
        prev = [key]
    return {"plan_version": 1, "flow": {"name": 'weird "flow" <x>', "version": "1|2", "description": None,
                                         "workers": [], "input_schema": None, "timeout_ms": None},
            "root": WEIRD_KEYS + extra, "nodes": nodes,
            "expressions": {"x1": {"source": 'a = "]" or b = "end" or c = "-->"', "vars": [], "steps": []}},
            "stages": [], "critical_path": []}


def empty_group_plans() -> dict[str, dict[str, Any]]:
    """The weird plan with its first node turned into an empty group of each kind."""
    plan = weird_plan()
    first = plan["root"][0]
    out = {}
    for kind, extra in (("parallel", {"children": []}), ("sequence", {"children": []}),
                        ("switch", {"on": "x1", "cases": [], "default": None}),
                        ("for_each", {"children": [], "items": "x1", "as": "it", "concurrency": None})):
        group = {**plan["nodes"][first], "kind": kind, **extra}
        for field in ("worker", "compensate", "retry", "timeout_ms"):
            group.pop(field, None)
        out[kind] = {**plan, "nodes": {**plan["nodes"], first: group}}
    return out


#: texts that try to reach Mermaid's preprocessor or other syntax from inside a label: init/wrap
#: directives (Mermaid reads ``%%{...}%%`` anywhere, quoted labels included), a comment, front
#: matter, statements, entities written out, markup
DIRECTIVE_TEXTS = [
    "%%{init: {'themeCSS': '.undo {display:none}'}}%%",
    "%%{init: {'theme':'forest'}}%%",
    '%%{initialize: {"flowchart": {"htmlLabels": false}}}%%',
    "%%{wrap}%% and %%{ init: { 'theme': 'dark' } }%%",
    "%% a comment",
    "--- config: theme: forest ---",
    "style s_a fill:#f00;",
    'classDef undo display:none; "#quot;"',
    "x:#y; #35; #quot; &amp; &#37; #37;",
    "<b>bold</b> `md` **strong** [x] {y} (z)",
    "click s_a call alert() ; linkStyle 0 stroke:#fff",
]
