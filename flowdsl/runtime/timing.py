"""How long a run took: wall time against the sum of step times, and the measured critical path.

Stage: runtime (shared by every backend and the CLI). Imports ``flowdsl.durations`` and stdlib only
(``.report``'s ``RunResult`` for type checking alone: ``.report`` imports this module for the ``timing`` object of
its JSON).

- :func:`timing` — the ``timing`` object of ``--format json`` and the timing lines of the end summary: wall time,
  the sum of step times, the saving from parallelism and the critical path.
- :func:`critical_path` — the chain of step instances through the plan's edges that took longest in a run.
- :data:`STEP_KINDS` — the node kinds that are steps (timed, shown as rows): tasks, LLM steps and waits (a wait's
  time counts as a step's: on the critical path, in the sum of step times); groups are not.
- :func:`duration_text` (from ``flowdsl.durations``) — a duration as the language writes it (``250ms``, ``30s``,
  ``2h``): a wait's delay or deadline as its spec gave it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowdsl.durations import duration_text

if TYPE_CHECKING:
    from flowdsl.runtime.report import RunResult

__all__ = ["STEP_KINDS", "critical_path", "duration_text", "timing"]


STEP_KINDS = ("task", "llm", "wait")


def _span(row: Mapping[str, Any]) -> int | None:
    if row["started_at"] is None or row["finished_at"] is None:
        return None
    return int(row["finished_at"] - row["started_at"])


def critical_path(plan: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], int]:
    """The chain of steps through the plan's edges that took longest in this run, and its milliseconds.

    The chain is of step instances (``charge``, ``lines[2]/charge``): inside a ``for_each`` it follows one
    iteration, and the loop weighs what its longest iteration's chain took — time an iteration spent waiting for
    a slot (``concurrency``) is on no chain, so the path is never longer than the run. Steps that did not run
    weigh nothing and are left out. Of chains that took as long, the one with more steps, then the one with fewer
    cancelled steps (a sibling cut short by a failure is not what decided the run's end).
    """
    # per plan vertex, its instances: iteration prefix ("", "lines[2]/") -> (span ms, cancelled)
    spans: dict[str, dict[str, tuple[int, bool]]] = {}
    for key, row in steps.items():
        span = _span(row) if row["kind"] in STEP_KINDS else None
        node = row["node"]
        if span is not None and key.endswith(node) and (len(key) == len(node) or key[-len(node) - 1] == "/"):
            spans.setdefault(node, {})[key[:len(key) - len(node)]] = (span, row.get("status") == "cancelled")
    nodes = plan["nodes"]

    def loops(v: str) -> tuple[str, ...]:  # the for_each nodes around vertex v, outermost first
        key = v.rpartition(":")[0] if v not in nodes and v.endswith((":start", ":end")) else v
        found: list[str] = []
        parent = nodes[key].get("parent") if key in nodes else None
        while parent:
            if nodes[parent]["kind"] == "for_each":
                found.append(parent)
            parent = nodes[parent].get("parent")
        return tuple(reversed(found))

    # the plan's edges are the flow graph: steps plus weightless group-boundary vertices ("g:start", "g:end")
    preds: dict[str, list[str]] = {}
    succs: dict[str, list[str]] = {}
    for a, b in plan.get("edges") or ():
        for v in (a, b):
            preds.setdefault(v, [])
            succs.setdefault(v, [])
        preds[b].append(a)
        succs[a].append(b)

    def rank(v: str) -> int:
        return nodes[v]["order"] if v in nodes else -1

    iterations: dict[str, set[str]] = {}  # a for_each -> the prefixes of its iterations that ran a step
    for node, by_prefix in spans.items():
        for loop in loops(node):
            for prefix in by_prefix:
                at = prefix.find(f"{loop}[")
                while at > 0 and prefix[at - 1] != "/":
                    at = prefix.find(f"{loop}[", at + 1)
                if at >= 0:
                    iterations.setdefault(loop, set()).add(prefix[:prefix.index("/", at) + 1])
    waiting = {k: len(preds[k]) for k in preds}
    ready = sorted((k for k in preds if waiting[k] == 0), key=rank)
    # per vertex and iteration prefix: (longest time to it, steps on that chain, not cancelled ones, the vertex and
    # prefix it came through)
    Best = tuple[int, int, int, "tuple[str, str] | None"]
    best: dict[str, dict[str, Best]] = {}
    while ready:
        v = ready.pop(0)
        inner = loops(v)
        into: dict[str, Best] = {}
        for u in preds[v]:
            outer = loops(u)
            for prefix, (ms, count, kept, _) in best[u].items():
                if len(inner) > len(outer):  # into a loop: every iteration starts from here
                    targets = [p for p in iterations.get(inner[-1], ()) if p.startswith(prefix)] or [prefix]
                elif len(inner) < len(outer):  # out of a loop: its iteration's chain, in the prefix around it
                    targets = [prefix[:prefix.rindex("/", 0, len(prefix) - 1) + 1] if prefix.count("/") > 1
                               else ""]
                else:
                    targets = [prefix]
                for target in targets:
                    if target not in into or (ms, count, kept) > into[target][:3]:
                        into[target] = (ms, count, kept, (u, prefix))
        if not preds[v]:
            into[""] = (0, 0, 0, None)
        mine = spans.get(v, {})
        best[v] = {p: (ms + mine[p][0], count + 1, kept + (not mine[p][1]), via) if p in mine else
                   (ms, count, kept, via) for p, (ms, count, kept, via) in into.items()}
        for nxt in succs[v]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    ends = [(ms, count, kept, -rank(v), v, p) for v, by in best.items() for p, (ms, count, kept, _) in by.items()]
    if not ends:
        return [], 0
    *_, end, prefix = max(ends)
    total = best[end][prefix][0]
    chain: list[str] = []
    cur: tuple[str, str] | None = (end, prefix)
    while cur is not None:
        v, p = cur
        if p in spans.get(v, {}):
            chain.append(p + v)
        cur = best[v][p][3]
    return list(reversed(chain)), total


def timing(result: RunResult) -> dict[str, Any]:
    """Wall time, the sum of step times, the saving from parallelism and the measured critical path (ms)."""
    spans = [s for row in result.steps.values() if row["kind"] in STEP_KINDS and (s := _span(row)) is not None]
    wall = None
    if result.finished_at is not None and result.started_at is not None:
        wall = int(result.finished_at - result.started_at)
    chain, chain_ms = critical_path(result.plan, result.steps) if result.plan else ([], 0)
    total = sum(spans)
    return {"wall_ms": wall, "step_time_sum_ms": total,
            "parallel_saving_ms": max(0, total - wall) if wall is not None else None,
            "critical_path": chain, "critical_path_ms": chain_ms, "runtime_wall_ms": result.wall_ms}
