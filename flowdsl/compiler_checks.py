"""Compiler, graph checks: what the dependency graph says about the nodes of a spec.

Stage: compiler. Imports ``flowdsl.diagnostics``, ``flowdsl.model``,
``flowdsl.expr`` and ``flowdsl.checks`` only — not networkx, and not
``flowdsl.compiler``, whose ``_Compiler`` inherits :class:`GraphChecks` and
builds the state the checks read (the entries, the flow graph, the damaged
``needs``). The checks: ``$steps`` references (FD303, FD504), outputs written
by nodes that may run at the same time (FD307), a ``when`` that is always
false (FD306). The compiler also reads :func:`_step_reads` to record which
step results an expression needs.

Whether one node always finishes before another starts (FD504, FD307) is read
from the tree of groups and the ``needs`` of one list
(:meth:`GraphChecks.before`), not searched in the graph for each pair. A
``needs`` that could not be followed leaves the graph without edges the spec
meant: what may change once it is fixed is never reported
(:meth:`GraphChecks.spread_damage`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowdsl import expr
from flowdsl.checks import Constants
from flowdsl.diagnostics import Suggestions, join
from flowdsl.model import Flow, Node

#: damaged ``needs`` tracked one by one (``GraphChecks.spread_damage``); beyond, as one
_DAMAGE_BITS = 1024
#: the largest (nodes of a list with ``needs``) × (its nodes with writers of one name below them) for which
#: FD307 finds every pair that may race there (``GraphChecks.list_races``); beyond, one pair per gap in their order
_RACE_BITS = 1 << 24
#: how many of the nodes a writer may race with an FD307 message names
_RACERS_NAMED = 3


@dataclass
class _Entry:
    """One node of the flow as the compiler keys it (its sub-flow's key prefix and its own id)."""

    key: str
    node: Node
    flow: Flow
    parent: str | None
    scope: str | None
    order: int
    lst: int = 0  # the sibling list it is in (an index of ``GraphChecks.members``)
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


class GraphChecks:
    """The graph checks, inherited by the compiler: they read the state it builds, declared here."""

    entries: dict[str, _Entry]
    pred: dict[str, dict[str, None]]
    damaged: set[str]
    members: list[list[str]]
    #: vertex -> the damaged nodes that lead to it, a bit each (one bit for all when they are too many)
    damage: dict[str, int]
    damage_exact: bool
    #: per sibling list, whether it is a plain sequence (each node after the one before) and its nodes in an
    #: order that respects their deps
    plain: dict[int, bool]
    topo: dict[int, list[str]]
    #: per list with ``needs`` (see ``leads``): each node's bit, and the bits of the nodes it comes after
    after: dict[int, tuple[dict[str, int], dict[str, int]]]
    #: "did you mean" for ``$steps`` per flow namespace, built at its first unknown name
    suggest: dict[str, Suggestions]

    if TYPE_CHECKING:  # the compiler's
        def err(self, node: Node, code: str, message: str, path: str) -> None: ...
        def entry(self, key: str) -> str: ...
        def topological_order(self) -> list[str]: ...
        def writes(self, n: Node) -> list[str] | None: ...

    # --- order -------------------------------------------------------------------

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
                    shown = _REF_FORMS[form].format(ref if len(ref) <= 64 else ref[:61] + "...")  # (an id: <= 64)
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
            for k in self.writes(e.node) or []:  # a group other than for_each and flow writes nothing itself
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

    def check_unreachable(self) -> None:
        constants = Constants()
        for e in self.entries.values():
            if e.node.when is None:
                continue
            known, value = constants.value(e.node.when)  # a malformed 'when' is FD501, reported by the checks
            if known and not expr.truthy(value):
                self.err(e.node, "FD306", f"'{e.node.id}' never runs: its 'when' is always false",
                         join(e.node.opts, "when"))


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
    stack: list[Any] = [expr.syntax_tree(source)]
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
        stack.extend(expr.ast_children(node))
    return _Reads(frozenset(refs), opaque)


def _is_steps(node: Any) -> bool:
    return getattr(node, "type", None) == "variable" and getattr(node, "value", None) == "steps"


def _bracket(node: Any) -> str | None:
    """``'a'`` for ``$steps['a']`` (a filter whose first predicate is one string), else None."""
    first = node.predicate[0]
    inner: Any = getattr(first, "expr", None)
    return str(inner.value) if getattr(first, "type", None) == "filter" and getattr(inner, "type", None) == "string" \
        else None


def _step_refs(text: str) -> set[tuple[str, str]]:
    """(id, form) for each step reference in the slots of a template or condition."""
    refs: set[tuple[str, str]] = set()
    try:
        for part in expr.split_template(text):
            if isinstance(part, expr.Slot):
                refs |= _step_reads(part.source).refs
    except expr.ExpressionError:
        pass  # (a malformed expression is FD501, reported by the expression checks)
    return refs
