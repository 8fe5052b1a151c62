"""Kernel, static half: a plan prepared for execution, and the retry arithmetic.

Stage: kernel — pure; imports ``flowdsl.expr`` and jsonschema only; no I/O,
no clock. A :class:`Program` holds the per-plan indexes the state machine
reads on every event (parents, scopes, dependents, the context-contributing
nodes of each scope), built once per plan. :func:`prepare` caches programs by
the plan object's identity, so a runtime may pass the same plan dict on every
call; plans must not be mutated once prepared.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.exceptions import Unresolvable

from flowdsl.expr import Expression, analyse, compile_expression

#: node kinds that run a worker (or a model) and can be compensated
STEP_KINDS = frozenset({"task", "llm"})
#: node kinds whose outcome enters their scope's context (the rest are transparent groups)
ATOM_KINDS = frozenset({"task", "llm", "for_each", "flow", "wait"})
#: groups that are neither atoms nor scopes
PLAIN_GROUPS = frozenset({"sequence", "parallel", "switch"})
#: the cap on any retry delay when the policy sets none (about 24.8 days)
MAX_DELAY_MS = 2**31 - 1

Json = Any
Node = dict[str, Any]


class Program:
    """The indexes of one plan. Build with :func:`prepare`."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.nodes: dict[str, Node] = plan["nodes"]
        self.expressions: dict[str, dict[str, Any]] = plan.get("expressions") or {}
        self.flow: dict[str, Any] = plan.get("flow") or {}
        self.root: list[str] = list(plan["root"])
        self.parent: dict[str, str | None] = {}
        self.scope: dict[str, str | None] = {}
        self._walk(self.root, None, None)
        stray = sorted(set(self.nodes) - set(self.parent))
        if stray:
            raise ValueError(f"plan nodes not reachable from the root: {', '.join(stray)}")
        self.kind: dict[str, str] = {k: n["kind"] for k, n in self.nodes.items()}
        self.order: dict[str, int] = {k: n["order"] for k, n in self.nodes.items()}
        self.deps: dict[str, tuple[str, ...]] = {k: tuple(n.get("deps") or ()) for k, n in self.nodes.items()}
        dependents: dict[str, list[str]] = {k: [] for k in self.nodes}
        for key, deps in self.deps.items():
            for dep in deps:
                dependents[dep].append(key)
        self.dependents = {k: tuple(sorted(v, key=self.order.__getitem__)) for k, v in dependents.items()}
        self.atoms_inside: dict[str, tuple[str, ...]] = {}
        for key in sorted(self.nodes, key=lambda k: -self.order[k]):
            self.atoms_inside[key] = self._atoms(key)
        scope_atoms: dict[str, list[str]] = {}
        for key, kind in self.kind.items():
            if kind in ATOM_KINDS:
                scope_atoms.setdefault(self.scope[key] or "", []).append(key)
        self.scope_atoms = {s: tuple(sorted(v, key=self.order.__getitem__)) for s, v in scope_atoms.items()}
        self.derive: dict[str, str] = {}
        self._derivations()
        #: nodes whose result merges into their scope's context, and nodes with an output ``map``
        #: (read on every step, so decided once here; ``Core.contribution`` handles the rest)
        self.merges: frozenset[str] = frozenset(k for k, n in self.nodes.items() if _merges(n))
        self.maps: frozenset[str] = frozenset(k for k, n in self.nodes.items()
                                              if (n.get("output") or {}).get("mode") == "map")
        #: steps whose failure for good does not fail the run (``on_failure: continue``, kernel rules 8)
        self.continues: frozenset[str] = frozenset(k for k, n in self.nodes.items()
                                                   if n.get("on_failure") == "continue")
        #: signal name -> the wait node taking it (rules 9); ``waits``: every wait node, signal or timer
        self.waits: frozenset[str] = frozenset(k for k, kind in self.kind.items() if kind == "wait")
        self.signals: dict[str, str] = self._signals()
        #: the signal names whose wait is keyed (its ``signal_key`` expression, the spec's ``key:``; rules 10): a signal
        #: of one names the key of its instance
        self.keyed: frozenset[str] = frozenset(n for n, k in self.signals.items()
                                               if self.nodes[k].get("signal_key") is not None)
        #: plain step -> the plain step it alone starts, or "" when nothing waits for it (``kernel_chain.chain_step``)
        self.chain: dict[str, str] = {}
        for key, node in self.nodes.items():
            if node["kind"] != "task" or node.get("fail_when") or key in self.maps:
                continue
            after = self.dependents[key]
            if not after:
                self.chain[key] = ""
            elif len(after) == 1:
                nxt = self.nodes[after[0]]
                if (nxt["kind"] == "task" and self.deps[after[0]] == (key,) and not nxt.get("when")
                        and nxt.get("with") is None and self.derive[after[0]] == "dep"):
                    self.chain[key] = after[0]
        #: step -> what starting it builds, as templates (``kernel_engine.StepTemplates``: made on first use)
        self.starts: dict[str, Any] = {}
        self.expr_vars: dict[str, frozenset[str]] = {}
        self.expr_steps: dict[str, frozenset[str] | None] = {}
        for eid, info in self.expressions.items():
            if "vars" in info:
                self.expr_vars[eid] = frozenset(info["vars"])
                self.expr_steps[eid] = frozenset(info.get("steps") or ()) or None
            else:
                found = analyse(info["source"])
                self.expr_vars[eid] = found.variables
                self.expr_steps[eid] = found.step_refs or None
        self._template_exprs: dict[int, frozenset[str]] = {}
        self._validators: dict[int, Draft202012Validator] = {}

    def _derivations(self) -> None:
        """How each node's context follows from another's (docs/kernel.md, "Performance").

        ``parent``: no deps inside a plain group, so the group's context; ``dep``:
        one dep whose atoms all come after everything it depends on in plan order,
        so that dep's context plus its atoms' contributions; ``scope``: the scope's
        input; ``full``: recomputed from the dependency closure.
        """
        hi: dict[str, int] = {}
        lists = [self.root] + [kids for key in self.nodes for kids in self.child_lists(key)]
        lists.sort(key=lambda kids: self.order[kids[0]] if kids else -1)
        for kids in lists:
            for key in _topological(kids, self.deps):
                parent = self.parent[key]
                top = hi[parent] if parent is not None and self.kind[parent] in PLAIN_GROUPS else -1
                for dep in self.deps[key]:
                    top = max(top, hi[dep], *(self.order[a] for a in self.atoms_inside[dep][-1:]))
                hi[key] = top
                deps = self.deps[key]
                if not deps:
                    plain = parent is not None and self.kind[parent] in PLAIN_GROUPS
                    self.derive[key] = "parent" if plain else "scope"
                elif len(deps) == 1 and all(self.order[a] > hi[deps[0]] for a in self.atoms_inside[deps[0]][:1]):
                    self.derive[key] = "dep"
                else:
                    self.derive[key] = "full"

    def _signals(self) -> dict[str, str]:
        """Signal name -> the wait node that takes it; ValueError for a plan that the compiler would have refused
        (FD316, FD317, FD309): two waits of one signal, a signal wait in a for_each body without a ``key`` (which
        iteration is it for?), a timer wait with one."""
        found: dict[str, str] = {}
        for key in sorted(self.waits, key=self.order.__getitem__):
            name = self.nodes[key].get("signal")
            if name is None:
                if self.nodes[key].get("signal_key") is not None:
                    raise ValueError(f"plan node {key!r} is a timer wait with a 'signal_key' (a signal wait's)")
                continue
            if name in found:
                raise ValueError(f"plan nodes {found[name]!r} and {key!r} both wait for signal {name!r}")
            scope = self.scope[key] if self.nodes[key].get("signal_key") is None else None
            while scope is not None:
                if self.kind[scope] == "for_each":
                    raise ValueError(f"plan node {key!r} waits for signal {name!r} inside for_each {scope!r} with no "
                                     "'signal_key' (which iteration would a signal be for?)")
                scope = self.scope[scope]
            found[name] = key
        return found

    def _walk(self, keys: list[str], parent: str | None, scope: str | None) -> None:
        for key in keys:
            self.parent[key] = parent
            self.scope[key] = scope
            inner = key if self.nodes[key]["kind"] in ("for_each", "flow") else scope
            for kids in self.child_lists(key):
                self._walk(kids, key, inner)

    def child_lists(self, key: str) -> list[list[str]]:
        """The sibling lists directly under a node (a switch has one per case, plus its default)."""
        node = self.nodes[key]
        if node["kind"] == "switch":
            lists = [list(case["children"]) for case in node.get("cases") or ()]
            return [*lists, list(node["default"])] if node.get("default") is not None else lists
        return [list(node["children"])] if node.get("children") else []

    def _atoms(self, key: str) -> tuple[str, ...]:
        if self.nodes[key]["kind"] in ATOM_KINDS:
            return (key,)
        found = [a for kids in self.child_lists(key) for k in kids for a in self.atoms_inside[k]]
        return tuple(sorted(found, key=self.order.__getitem__))

    def closure(self, key: str, *, cross_loops: bool) -> list[tuple[str, int]]:
        """Sibling nodes ``key`` transitively waits for, each with how many for_each bodies were left.

        Walks ``deps`` and then the enclosing plain groups; with ``cross_loops`` it
        continues out of for_each bodies (level + 1 per body), never out of a sub-flow.
        """
        out: list[tuple[str, int]] = []
        seen = {key}
        stack = [(key, 0)]
        while stack:
            node, level = stack.pop()
            for dep in self.deps[node]:
                if dep not in seen:
                    seen.add(dep)
                    out.append((dep, level))
                    stack.append((dep, level))
            parent = self.parent[node]
            if parent is None or parent in seen:
                continue
            kind = self.kind[parent]
            if kind in PLAIN_GROUPS or (cross_loops and kind == "for_each"):
                seen.add(parent)
                stack.append((parent, level + (kind == "for_each")))
        return out

    def atoms_before(self, key: str) -> list[str]:
        """The atoms of ``key``'s scope that it transitively depends on, in plan order."""
        atoms = [a for dep, _ in self.closure(key, cross_loops=False) for a in self.atoms_inside[dep]]
        atoms.sort(key=self.order.__getitem__)
        return atoms

    def steps_before(self, key: str, ids: frozenset[str] | None, atoms: bool) -> list[tuple[str, int]]:
        """Nodes (key, for_each levels up) whose results ``key`` reads as ``$steps.<id>``; ``ids`` None = all.
        ``atoms``: for_each and sub-flow nodes too (rules version 6), else tasks and LLM steps only."""
        kinds = ATOM_KINDS if atoms else STEP_KINDS
        return [(a, level) for dep, level in self.closure(key, cross_loops=True) for a in self.atoms_inside[dep]
                if self.kind[a] in kinds and (ids is None or self.nodes[a]["id"] in ids)]

    def expression(self, eid: str) -> Expression:
        return compile_expression(self.expressions[eid]["source"])

    def template_exprs(self, template: Json) -> frozenset[str]:
        """Expression ids used by a compiled template (memoised per template object)."""
        found = self._template_exprs.get(id(template))
        if found is None:
            ids: set[str] = set()
            _collect_exprs(template, ids)
            found = self._template_exprs[id(template)] = frozenset(ids)
        return found

    def vars_of(self, eids: Iterable[str]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for eid in eids:
            out |= self.expr_vars.get(eid, frozenset())
        return out

    def steps_of(self, eids: Iterable[str]) -> frozenset[str] | None:
        """Step ids the expressions read through ``$steps`` (None: cannot tell, so all)."""
        out: set[str] = set()
        for eid in eids:
            if "steps" not in self.expr_vars.get(eid, frozenset()):
                continue
            refs = self.expr_steps.get(eid)
            if refs is None:
                return None
            out |= refs
        return frozenset(out)

    def schema_error(self, schema: Json, value: Json) -> str | None:
        """The message of the most relevant violation of ``schema`` by ``value``, or None."""
        if schema is None:
            return None
        validator = self._validators.get(id(schema))
        if validator is None:  # references resolve inside the schema (or to a meta-schema): nothing is fetched
            validator = self._validators[id(schema)] = Draft202012Validator(schema, registry=Registry())
        try:
            error = best_match(validator.iter_errors(value))
        except Unresolvable as exc:  # (a compiled plan has none: FD206; a plan may come from elsewhere)
            ref = getattr(exc, "ref", None)
            return f"the schema cannot be used: its reference {ref!r} cannot be resolved (none is fetched)"
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{error.message} (at /{where})" if where else error.message


def _merges(node: Node) -> bool:
    """Whether a node's output rule (``Core.contribution``) is certainly a merge of its result."""
    rule = node.get("output")
    if not rule:
        return bool(node["kind"] != "for_each")
    return "mode" in rule and rule["mode"] != "name"


def _topological(keys: list[str], deps: dict[str, tuple[str, ...]]) -> list[str]:
    """The keys of one sibling list, each after its deps (plan order among the ready ones)."""
    members = set(keys)
    waiting = {k: sum(1 for d in deps[k] if d in members) for k in keys}
    users: dict[str, list[str]] = {k: [] for k in keys}
    for key in keys:
        for dep in deps[key]:
            if dep in members:
                users[dep].append(key)
    out = [k for k in keys if waiting[k] == 0]
    i = 0
    while i < len(out):
        key = out[i]
        i += 1
        for user in users[key]:
            waiting[user] -= 1
            if waiting[user] == 0:
                out.append(user)
    return out


def _collect_exprs(template: Json, out: set[str]) -> None:
    if isinstance(template, dict):
        if len(template) == 1:
            ((key, value),) = template.items()
            if key == "$expr":
                out.add(value)
                return
            if key == "$literal":
                return
        for value in template.values():
            _collect_exprs(value, out)
    elif isinstance(template, list):
        for value in template:
            _collect_exprs(value, out)


_CACHE: dict[int, tuple[dict[str, Any], Program]] = {}
#: plans whose Program is kept (a service runs a few hundred flows: above this, every apply() with a plan dict
#: rebuilt its Program); a runtime that holds a plan's Program for a run's life passes it instead of the dict
_CACHE_SIZE = 512
#: held while the cache changes: prepare() is called from several threads at once (flowdsl.run() in a threaded
#: server), and an eviction racing another (``pop(next(iter(...)))``) raised KeyError or "dictionary changed
#: size during iteration" out of apply()
_CACHE_LOCK = threading.Lock()


def prepare(plan: dict[str, Any] | Program) -> Program:
    """The :class:`Program` for ``plan`` (cached by the plan object's identity; safe from several threads)."""
    if isinstance(plan, Program):
        return plan
    hit = _CACHE.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    program = Program(plan)
    with _CACHE_LOCK:
        _CACHE.pop(id(plan), None)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[id(plan)] = (plan, program)
    return program


# --- retry policies -------------------------------------------------------------


def retryable(policy: dict[str, Any], err: dict[str, Any]) -> bool:
    """Whether a policy's ``on``/``not_on`` filters let an error be retried.

    A filter names an error type: it matches the error's ``type`` or any name in its ``types`` (the class
    names of the exception's MRO, so that a filter covers subclasses); an error without ``types`` — flowdsl's
    own, or one recorded before the field existed — matches by ``type`` alone.
    """
    names = {err["type"], *(err.get("types") or ())}
    if not names.isdisjoint(policy.get("not_on") or ()):
        return False
    allowed = policy.get("on")
    return allowed is None or not names.isdisjoint(allowed)


def retry_delay(policy: dict[str, Any], failed_attempt: int, seed: int, key: str) -> int:
    """Milliseconds to wait before attempt ``failed_attempt + 1`` (docs/kernel.md, "Retries").

    The jitter draw is ``sha256("<seed>:<key>:<failed_attempt>")`` read as a
    fraction in [0, 1): the same seed, key and attempt always give the same delay.
    """
    initial = float(policy.get("initial_ms") or 0)
    backoff = policy.get("backoff") or "constant"
    cap = policy.get("max_ms")
    limit = float(min(cap, MAX_DELAY_MS) if cap is not None else MAX_DELAY_MS)
    if backoff == "linear":
        base = initial * failed_attempt
    elif backoff == "exponential":
        try:
            base = initial * float(policy.get("multiplier") or 2.0) ** (failed_attempt - 1)
        except OverflowError:
            base = limit
    else:
        base = initial
    delay = int(min(base, limit))
    jitter = policy.get("jitter") or "none"
    if jitter == "none" or delay == 0:
        return delay
    digest = hashlib.sha256(f"{seed}:{key}:{failed_attempt}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    low = 0 if jitter == "full" else delay // 2
    return low + int(fraction * (delay - low + 1))


#: what starting a step (a task or an LLM step) builds, made once per program and step (``Program.starts``,
#: :func:`_start_templates`): (its record as ``_begin`` makes it, before the first attempt; its record as the
#: straight line leaves it, the first attempt dispatched; that attempt's ``dispatch`` command, ``step_started``
#: and ``step_scheduled`` events). A plain tuple: unpacked on the hot paths (a NamedTuple's is slower)
StepTemplates = tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]


def _start_templates(program: Program, key: str) -> StepTemplates:
    """:data:`StepTemplates` of step ``key``: with what is the same every time filled in (its ``step`` as outside
    for_each bodies), in the key order the general path gives each. Copying a template and setting what varies
    costs about half as much as building the dict."""
    node = program.nodes[key]
    kind, worker, timeout = node["kind"], node.get("worker"), node.get("timeout_ms")
    begun = {"node": key, "parent": None, "iter": None, "flow": None, "status": "running", "started_at": None,
             "finished_at": None, "error": None, "attempt": 0, "attempts": 0, "phase": "main", "task": None,
             "t0": None}
    chained = {**begun, "attempt": 1, "attempts": 1}
    dispatch = {"op": "dispatch", "run_id": None, "task_id": None, "kind": kind, "step": key, "node": key,
                "worker": worker, "input": None, "attempt": 1, "idempotency_key": None, "timeout_ms": timeout,
                "llm": node.get("llm") if kind == "llm" else None}
    started = {"type": "step_started", "at": None, "seq": None, "run_id": None, "step": key, "node": key,
               "kind": kind, "attempt": None, "task_id": None, "error": None}
    scheduled = {"type": "step_scheduled", "at": None, "seq": None, "run_id": None, "step": key, "node": key,
                 "kind": kind, "attempt": 1, "task_id": None, "error": None, "worker": worker, "task_kind": kind,
                 "idempotency_key": None}
    found = program.starts[key] = (begun, chained, dispatch, started, scheduled)
    return found
