"""Kernel, shared machinery: one decision's working set over the run state.

Stage: kernel — pure; imports ``flowdsl.expr`` and the other ``kernel_*``
modules only; no I/O, no clock. A :class:`Core` lives for the handling of one
input event: it mutates the run state in place and collects the commands and
events of the decision. This module holds what every transition needs —
the :class:`Decision` it returns, emitting, timers, instance records, and the
data rules: the context a node sees, contributions, expression bindings
(docs/kernel.md, "Data").
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from flowdsl.expr import ExpressionError, evaluate_template
from flowdsl.kernel_program import STEP_KINDS, Json, Program

Record = dict[str, Any]
#: statuses of a node instance that count as "done" for its dependents
DONE = ("succeeded", "skipped")
#: the states in which a run is over
END_STATES = frozenset({"completed", "failed", "compensated", "needs_intervention", "cancelled"})
#: contexts kept per run state: the most recently used, and checkpoints left by long rebuilds
_RECENT = 64
_CHECKPOINTS = 128
_CHECKPOINT_EVERY = 32


class ContextCache:
    """Contexts derived for one run (they never change once their node has started).

    Plain dicts, oldest first (a dict keeps insertion order): ``recent`` in the order of use, ``checkpoints`` in
    the order they were left; each keeps between its limit (``_RECENT``, ``_CHECKPOINTS``) and twice as many
    entries, trimmed to the newest ones when it grows past that. (An ``OrderedDict``, or evicting one entry per
    entry put, costs several times as much, and the straight line puts one per chained step:
    ``kernel_chain.chain_step``.)
    """

    __slots__ = ("checkpoints", "recent")

    def __init__(self) -> None:
        self.recent: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[str, dict[str, Any]] = {}

    def get(self, ikey: str) -> dict[str, Any] | None:
        recent = self.recent
        hit = recent.get(ikey)
        if hit is not None:
            del recent[ikey]  # (moved to the end: the most recently used)
            recent[ikey] = hit
            return hit
        return self.checkpoints.get(ikey)

    def put(self, ikey: str, ctx: dict[str, Any], *, checkpoint: bool = False) -> None:
        if checkpoint:
            self.checkpoints[ikey] = ctx
            if len(self.checkpoints) > 2 * _CHECKPOINTS:
                trim(self.checkpoints, _CHECKPOINTS)
        else:
            self.recent[ikey] = ctx
            if len(self.recent) > 2 * _RECENT:
                trim(self.recent, _RECENT)


def trim(store: dict[str, Any], size: int) -> None:
    """Keep the last ``size`` entries of ``store`` (in insertion order) only."""
    for key in list(islice(store, len(store) - size)):
        del store[key]


class RunState(dict[str, Any]):
    """A run state: a plain dict as far as JSON, equality and the docs are concerned.

    It also carries, as an attribute that is never serialised, a cache of the
    contexts recently derived for it; a state rebuilt from JSON works the same
    and starts with an empty cache. Copies and pickles drop the cache.
    """

    __slots__ = ("contexts",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.contexts = ContextCache()

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunState, (dict(self),))

    def __deepcopy__(self, memo: dict[int, Any]) -> RunState:
        import copy

        return RunState(copy.deepcopy(dict(self), memo))


@dataclass(frozen=True)
class Decision:
    """The outcome of one transition: the new state, commands to carry out, events that happened.

    ``ended``: the task ids the transition took out of flight (answered or timed out), in order. Every task
    it put in flight has a ``dispatch`` command; so a runtime keeping its own record of the tasks in flight
    updates it from these two, without comparing the whole ``state["tasks"]`` before and after.
    """

    state: dict[str, Any]
    commands: list[dict[str, Any]]
    events: list[dict[str, Any]]
    ended: list[str] = field(default_factory=list)

    def __init__(self, state: dict[str, Any], commands: list[dict[str, Any]], events: list[dict[str, Any]],
                 ended: list[str] | None = None):
        # one per input event: filled in directly (the generated frozen __init__ costs a setattr call per field)
        fields = self.__dict__
        fields["state"], fields["commands"], fields["events"] = state, commands, events
        fields["ended"] = ended if ended is not None else []

    @property
    def finished(self) -> bool:
        return self.state["status"] in END_STATES


class Core:
    """The run state, the plan's program and the output of the decision being made."""

    __slots__ = ("_ctx", "answer", "at", "commands", "ended", "events", "iters", "nodes", "p", "queue", "run_id",
                 "s", "tasks", "timers")

    def __init__(self, program: Program, state: dict[str, Any], at: int | float):
        self.p = program
        self.s = state
        self.at = at
        self.run_id: str = state["run_id"]
        self.nodes: dict[str, Record] = state["nodes"]
        self.iters: dict[str, Record] = state["iterations"]
        self.tasks: dict[str, Record] = state["tasks"]
        self.timers: dict[str, Record] = state["timers"]
        self.commands: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        #: the task ids this decision took out of flight (answered, timed out), in order
        self.ended: list[str] = []
        #: (node, container) of the nodes ready to start, in order: made when first needed (most decisions
        #: start nothing), emptied when the run stops
        self.queue: deque[tuple[str, str | None]] | None = None
        #: (task id, meta) of the answer being handled: ``meta`` goes into the events about that task
        self.answer: tuple[str, dict[str, Any]] | None = None
        # (a state rebuilt from JSON is a plain dict: no cache to keep, a fresh one for this decision)
        self._ctx: ContextCache = state.contexts if isinstance(state, RunState) else ContextCache()

    # --- output ----------------------------------------------------------------

    def emit(self, type_: str, step: str | None = None, *, attempt: int | None = None,
             task_id: str | None = None, error: dict[str, Any] | None = None, **extra: Any) -> None:
        node = None
        if step is not None:
            rec = self.nodes.get(step)
            if rec is not None:
                node = rec["node"]
        state = self.s
        seq = state["seq"]
        event = {"type": type_, "at": self.at, "seq": seq, "run_id": self.run_id, "step": step,
                 "node": node, "kind": None if node is None else self.p.kind[node],
                 "attempt": attempt, "task_id": task_id, "error": error}
        if extra:
            event.update(extra)
        answer = self.answer
        if answer is not None and task_id == answer[0]:
            event["meta"] = answer[1]
        state["seq"] = seq + 1
        self.events.append(event)

    def step_event(self, type_: str, ikey: str, node: str, attempt: int | None = None,
                   task_id: str | None = None) -> dict[str, Any]:
        """Emit an event about step instance ``ikey`` of plan node ``node`` with no error and no ``meta``
        (:meth:`emit` without its lookups, for the hot paths); returns it for extra fields to be added."""
        state = self.s
        seq = state["seq"]
        state["seq"] = seq + 1
        event = {"type": type_, "at": self.at, "seq": seq, "run_id": self.run_id, "step": ikey, "node": node,
                 "kind": self.p.kind[node], "attempt": attempt, "task_id": task_id, "error": None}
        self.events.append(event)
        return event

    def command(self, op: str, **fields: Any) -> None:
        self.commands.append({"op": op, "run_id": self.run_id, **fields})

    def tick(self) -> int:
        self.s["clock"] += 1
        clock: int = self.s["clock"]
        return clock

    def schedule(self, timer_id: str, delay_ms: int, purpose: str, step: str | None, **info: Any) -> None:
        self.timers[timer_id] = {"purpose": purpose, "step": step, **info}
        self.command("schedule_timer", timer_id=timer_id, delay_ms=delay_ms, due_at=self.at + delay_ms,
                     purpose=purpose, step=step)

    def cancel_timer(self, timer_id: str | None) -> None:
        if timer_id is not None and self.timers.pop(timer_id, None) is not None:
            self.command("cancel_timer", timer_id=timer_id)

    def idempotency_key(self, ikey: str) -> str:
        return f"{self.run_id}/{ikey}"

    # --- instances ---------------------------------------------------------------

    @staticmethod
    def prefix(iteration: str | None) -> str:
        return iteration + "/" if iteration else ""

    def lineage(self, container: str | None) -> tuple[str | None, str | None]:
        """(innermost iteration, innermost sub-flow instance) of a container's children."""
        if container is None:
            return None, None
        if container in self.iters:
            return container, self.iters[container]["flow"]
        rec = self.nodes[container]
        return rec["iter"], container if self.p.kind[rec["node"]] == "flow" else rec["flow"]

    def new_record(self, key: str, container: str | None, status: str,
                   lineage: tuple[str | None, str | None] | None = None) -> str:
        """Record a new instance of ``key`` in ``container`` (``lineage``: the container's, if known)."""
        iteration, flow = self.lineage(container) if lineage is None else lineage
        ikey = iteration + "/" + key if iteration else key
        self.nodes[ikey] = {"node": key, "parent": container, "iter": iteration, "flow": flow, "status": status,
                            "started_at": self.at, "finished_at": None, "error": None}
        return ikey

    # --- data ----------------------------------------------------------------------

    def scope_input(self, rec: Record) -> dict[str, Json]:
        scope = self.p.scope[rec["node"]]
        if scope is None:
            base: dict[str, Json] = self.s["input"]
        elif self.p.kind[scope] == "for_each":
            base = self.nodes[self.iters[rec["iter"]]["fe"]]["scope_input"]
        else:
            base = self.nodes[rec["flow"]]["scope_input"]
        return base

    def context(self, ikey: str) -> dict[str, Json]:
        """The context node instance ``ikey`` sees: its scope's input plus its dependencies' contributions.

        Follows the program's derivations back to a known context (cached, a
        scope input, or one recomputed from the closure), then rebuilds forward,
        keeping every ``_CHECKPOINT_EVERY``-th context and the one asked for.
        Read-only: callers copy before changing.
        """
        cache = self._ctx
        hit = cache.get(ikey)
        if hit is not None:
            return hit
        fast = self._context_step(ikey)
        if fast is not None:
            return fast
        chain: list[tuple[str, str]] = []
        current = ikey
        while True:
            hit = cache.get(current) if chain else None  # ``ikey`` itself was just looked up
            if hit is not None:
                base = hit
                break
            rec = self.nodes[current]
            how = self.p.derive[rec["node"]]
            if how == "parent":
                chain.append((current, ""))
                current = rec["parent"]
            elif how == "dep":
                dep = self.prefix(rec["iter"]) + self.p.deps[rec["node"]][0]
                chain.append((current, dep))
                current = dep
            else:
                base = self._compute(current, rec, how)
                if how == "full" and chain:
                    cache.put(current, base)
                break
        owned = False  # True while ``base`` is a fresh dict nobody else holds
        for i, (key, dep) in enumerate(reversed(chain)):
            if dep:
                pre = self.prefix(self.nodes[dep]["iter"])
                for atom in self.p.atoms_inside[self.nodes[dep]["node"]]:
                    done = self.nodes.get(pre + atom)
                    if done is not None and done["status"] == "succeeded":
                        if not owned:
                            base, owned = dict(base), True
                        base.update(self.contribution(done))
            last = i == len(chain) - 1
            if owned and (last or i % _CHECKPOINT_EVERY == _CHECKPOINT_EVERY - 1):
                cache.put(key, base, checkpoint=not last)
                owned = False
        if not chain:
            cache.put(ikey, base)
        return base

    def _context_step(self, ikey: str) -> dict[str, Json] | None:
        """``context(ikey)`` in one step when it derives from a cached context (the common case), else None.

        The same result and cache effects as the general walk over a chain of one.
        """
        nodes = self.nodes
        rec = nodes[ikey]
        key = rec["node"]
        how = self.p.derive[key]
        cache = self._ctx
        if how == "parent":  # the group's context, shared as it is (the general walk does not cache it either)
            group = rec["parent"]
            base = cache.get(group)
            if base is None and self.p.derive[nodes[group]["node"]] == "scope":
                base = self.scope_input(nodes[group])
            return base
        if how != "dep":
            return None
        iteration = rec["iter"]
        dep = (iteration + "/" if iteration else "") + self.p.deps[key][0]
        base = cache.get(dep)
        if base is None:
            return None
        iteration = nodes[dep]["iter"]
        pre = iteration + "/" if iteration else ""
        owned = False
        for atom in self.p.atoms_inside[nodes[dep]["node"]]:
            done = nodes.get(pre + atom)
            if done is not None and done["status"] == "succeeded":
                if not owned:
                    base, owned = dict(base), True
                base.update(self.contribution(done))
        if owned:
            cache.put(ikey, base)
        return base

    def _compute(self, ikey: str, rec: Record, how: str) -> dict[str, Json]:
        if how == "scope":
            return self.scope_input(rec)
        pre = self.prefix(rec["iter"])
        ctx = dict(self.scope_input(rec))
        for atom in self.p.atoms_before(rec["node"]):
            dep = self.nodes.get(pre + atom)
            if dep is not None and dep["status"] == "succeeded":
                ctx.update(self.contribution(dep))
        return ctx

    def contribution(self, rec: Record) -> dict[str, Json]:
        """What a succeeded atom adds to its scope's context, by its output rule."""
        if "out" in rec:
            out: dict[str, Json] = rec["out"]
            return out
        if rec["node"] in self.p.merges:
            result = rec.get("result")
            return result if isinstance(result, dict) else {}
        node = self.p.nodes[rec["node"]]
        rule = node.get("output") or ({"mode": "name", "name": node["id"]} if node["kind"] == "for_each"
                                      else {"mode": "merge"})
        result = rec.get("result")
        if rule["mode"] == "name":
            return {rule["name"]: result}
        return result if isinstance(result, dict) else {}

    def scope_result(self, scope: str, prefix: str, base: dict[str, Json] | None) -> dict[str, Json]:
        """``base`` (or nothing) plus every succeeded atom of one scope instance, in plan order."""
        out = dict(base) if base is not None else {}
        nodes, merges = self.nodes, self.p.merges
        for atom in self.p.scope_atoms.get(scope, ()):
            rec = nodes.get(prefix + atom)
            if rec is not None and rec["status"] == "succeeded":
                if atom in merges and "out" not in rec:  # (contribution's usual case, inline: once per atom)
                    result = rec.get("result")
                    if result and isinstance(result, dict):
                        out.update(result)
                else:
                    out.update(self.contribution(rec))
        return out

    def final_context(self) -> dict[str, Json]:
        return self.scope_result("", "", self.s["input"])

    def bindings(self, ikey: str, eids: frozenset[str], *, context: dict[str, Json] | None = None,
                 own: Json = None) -> dict[str, Json]:
        """Variables for expressions ``eids`` evaluated for ``ikey`` (``own``: its result, as ``$steps.<id>``)."""
        need = self.p.vars_of(eids)
        rec = self.nodes[ikey]
        out: dict[str, Json] = {"run": {"id": self.run_id}}
        if "input" in need:
            out["input"] = self.nodes[rec["flow"]]["scope_input"] if rec["flow"] else self.s["input"]
        chain: list[tuple[str, Json, int]] = []
        iteration = rec["iter"]
        while iteration:
            it = self.iters[iteration]
            fe = self.nodes[it["fe"]]
            chain.append((self.p.nodes[fe["node"]].get("as") or "item", fe["items"][it["index"]], it["index"]))
            iteration = it["iter"]
        for name, item, _ in reversed(chain):
            out[name] = item
        if chain:
            out["index"] = chain[0][2]
        if "steps" in need:
            out["steps"] = self.steps_binding(ikey, self.p.steps_of(eids))
            if own is not None:
                out["steps"][self.p.nodes[rec["node"]]["id"]] = own
        if context is not None:
            out["context"] = context
        return out

    def steps_binding(self, ikey: str, ids: frozenset[str] | None) -> dict[str, Json]:
        rec = self.nodes[ikey]
        out: dict[str, Json] = {}
        for key, levels in self.p.steps_before(rec["node"], ids, self.s["kernel"] >= 6):
            iteration = rec["iter"]
            for _ in range(levels):
                iteration = self.iters[iteration]["iter"]
            dep = self.nodes.get(self.prefix(iteration) + key)
            if dep is not None and dep["status"] == "succeeded":
                out[self.p.nodes[key]["id"]] = dep.get("result")
        return out

    def evaluate(self, ikey: str, eid: str, data: Json, *, where: str, context: dict[str, Json] | None = None,
                 own: Json = None) -> Json:
        """Expression ``eid`` over ``data``; an ``ExpressionError`` names the option ``where`` it is (``when``,
        ``output.total``), as the checks name it."""
        bindings = self.bindings(ikey, frozenset((eid,)), context=context, own=own)
        try:
            return self.p.expression(eid).evaluate(data, bindings)
        except ExpressionError as exc:
            raise exc.within(where) from None

    def render(self, ikey: str, template: Json, data: Json, *, where: str, context: dict[str, Json] | None = None,
               own: Json = None) -> Json:
        """Template ``template`` over ``data``; an ``ExpressionError`` names the option ``where`` it is
        (``with``, ``compensate.with``) and the place inside it (``with.order.total``)."""
        bindings = self.bindings(ikey, self.p.template_exprs(template), context=context, own=own)
        try:
            return evaluate_template(template, self.p.expressions, data, bindings)
        except ExpressionError as exc:
            raise exc.within(where) from None

    def is_step(self, key: str) -> bool:
        return self.p.kind[key] in STEP_KINDS


def error(type_: str, message: str) -> dict[str, str]:
    return {"type": type_, "message": message}


def switch_label(value: Json) -> str:
    """The case label a switch value selects: strings as they are, anything else by its JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
