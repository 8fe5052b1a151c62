"""Compiler, read checks: a context field read that only a node running beside the reader writes (FD314).

Stage: compiler. Imports ``flowdsl.diagnostics``, ``flowdsl.model``,
``flowdsl.expr``, ``flowdsl.checks`` and ``flowdsl.compiler_checks`` — not
``flowdsl.compiler``, whose ``_Compiler`` inherits :class:`ReadChecks`.

By the merge rule (docs/language.md, "Data") a node sees its scope's input and
what the nodes it depends on wrote, never what a node that may run at the same
time writes. So a field that such a node writes, and that nothing the reader
sees provides — no node it depends on (of its scope, or, climbing out of a
``for_each``, of the scopes around it), not the run input's schema, not a
sub-flow's ``with:`` or input schema, not a loop variable — is read as null
every time. Writes are those FD307 knows (``output:`` names and mappings, LLM
output fields, ``for_each`` and sub-flow results); reads are the fields an
expression reads from the context itself (:func:`context_names`), and an LLM
step's input fields when it has no ``with:``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flowdsl import expr
from flowdsl.checks import BARE_FIELDS, _input_fields, expression_fields
from flowdsl.compiler_checks import _RACE_BITS, GraphChecks
from flowdsl.diagnostics import join
from flowdsl.model import Node

if TYPE_CHECKING:
    from flowdsl.model import Flow

#: the order questions (is one node before another, may two run at the same time) FD314 asks in one compilation
#: at most; past it (a hostile spec: thousands of readers and writers of one field in one list with ``needs``)
#: the fields left are not checked
_READ_PAIRS = 100_000
#: how many of the writers of a field a message names
_WRITERS_NAMED = 3
#: the most nodes a fix's ``needs`` is made minimal among (those the others wait for left out)
_MINIMISED = 16


class ReadChecks(GraphChecks):
    """FD314, inherited by the compiler (through it, the graph checks' order questions)."""

    root: Flow
    #: order questions left to ask (see _READ_PAIRS)
    read_pairs: int = _READ_PAIRS
    #: id of a flow -> the fields its input schema names
    inputs: dict[int, frozenset[str]]
    #: (writer, field) not taken to race with a reader: a group's result stored under its id, where the group reads
    #: that field itself (:func:`_named_after_what_it_reads`); it still provides the field to the nodes after it
    quiet: set[tuple[str, str]]

    def check_unseen_reads(self) -> None:
        """FD314: a node reads a top-level field of its context that a node that may run at the same time writes,
        and that nothing it sees provides (see the module's docstring)."""
        writers: dict[tuple[str | None, str], list[str]] = {}
        self.quiet = set()
        for key, e in self.entries.items():
            for name in self.writes(e.node) or []:
                if _named_after_what_it_reads(e.node, name):
                    self.quiet.add((key, name))
                writers.setdefault((e.scope, name), []).append(key)
        if not writers:
            return
        self.read_pairs = _READ_PAIRS
        self.inputs = {}
        written = {name for _, name in writers}
        # (a name that is no word — an output: name with a blank, FD302's — is looked for in every expression)
        words = written if all(_WORD.fullmatch(name) for name in written) else None
        for key, e in self.entries.items():
            for fname, path, names in _reads(e.node, self.writes(e.node), words):
                for name in sorted(names & written):
                    found = self.unseen(key, name, writers)
                    if self.read_pairs < 0:
                        return
                    if found:
                        self.err(e.node, "FD314", self.unseen_message(key, fname, name, found), path)

    def check_passed_over_reads(self) -> None:
        """FD315: a top-level node reads a top-level field of the context that, of the nodes before it, only steps
        with ``on_failure: continue`` write (and the run's input schema does not name): when they fail and are
        passed over, it reads null. Readers inside a for_each or a sub-flow are not asked (their scope's input may
        provide the field): a warning only where it surely applies."""
        optional = {key for key, e in self.entries.items() if e.node.on_failure == "continue"}
        if not optional:
            return
        writers: dict[str, list[str]] = {}
        for key, e in self.entries.items():
            if e.scope is None:
                for name in self.writes(e.node) or []:
                    writers.setdefault(name, []).append(key)
        names = {name for name, keys in writers.items() if not optional.isdisjoint(keys)}
        if not names:
            return
        self.read_pairs = _READ_PAIRS
        self.inputs = {}
        words = names if all(_WORD.fullmatch(name) for name in names) else None
        for key, e in self.entries.items():
            if e.scope is not None:
                continue
            for fname, path, read in _reads(e.node, self.writes(e.node), words):
                if fname in ("when", "on"):  # a condition that reads null is false, a switch takes its default
                    continue
                for name in sorted(read & names):
                    if name in self.input_fields(self.root) or self.when_reads(key, name):
                        continue
                    chain = self.chain(key)
                    before = [w for w in writers[name] if w != key and self.relation(w, key, chain) == "before"]
                    if self.read_pairs < 0:
                        return
                    if before and optional.issuperset(before) and not _guarded(e.node, path, fname, name):
                        self.err(e.node, "FD315", self.passed_over_message(e.node, fname, name, before), path)

    def when_reads(self, key: str, name: str) -> bool:
        """Whether the ``when`` of node ``key`` or of a group around it reads ``name``: what it guards runs only as
        that condition says (``when: "${ $exists(points) }"``), so a read inside is taken as asking first."""
        node: str | None = key
        while node is not None:
            n = self.entries[node].node
            if n.when is not None and any(name in names for fname, _, names in _reads(n, None, {name})
                                          if fname == "when"):
                return True
            node = self.entries[node].parent
        return False

    def passed_over_message(self, n: Node, fname: str, name: str, before: list[str]) -> str:
        keys = sorted(before, key=lambda k: self.entries[k].order)
        listed = self.listed(keys)
        what = f"the input field '{name}'" if fname == "llm.signature" else f"'{name}'"
        return (f"in '{fname}': {what} is written before '{n.id}' only by {listed}, which the run goes on without "
                f"when {'it fails' if len(keys) == 1 else 'they fail'} (on_failure: continue): '{n.id}' then reads "
                f"null there; read it with a default (\"${{ {name} ? {name} : ... }}\"), or leave "
                f"on_failure out of {listed}")


    def unseen(self, key: str, name: str, writers: dict[tuple[str | None, str], list[str]]) -> list[tuple[str, str]]:
        """The writers of ``name`` that may run at the same time as ``key`` (each with the node of its scope that
        holds ``key``: itself, or a ``for_each`` or sub-flow node around it), when nothing ``key`` sees provides
        ``name``; else [] (also when the questions to ask run out: see :data:`_READ_PAIRS`)."""
        beside: list[tuple[str, str]] = []
        reader = key
        while True:
            scope = self.entries[reader].scope
            found = writers.get((scope, name), ())
            chain = self.chain(reader) if found else {}
            for w in found:
                if w == reader:
                    continue
                relation = self.relation(w, reader, chain)
                if relation == "before" or self.read_pairs < 0:
                    return []
                if relation == "beside" and (w, name) not in self.quiet:
                    beside.append((w, reader))
            if scope is None:  # the run's input
                return [] if name in self.input_fields(self.root) else beside
            group = self.entries[scope].node
            if group.kind == "for_each":  # an iteration starts from what the for_each node sees
                if name in (group.as_, "index"):  # a loop variable read without its $ (FD310's)
                    return []
                reader = scope
                continue
            # a sub-flow's input: its `with:` (without one, what the sub-flow node sees), checked by its schema
            if group.subflow is not None and name in self.input_fields(group.subflow):
                return []
            if group.with_ is None:
                reader = scope
                continue
            return beside if isinstance(group.with_, dict) and name not in group.with_ else []

    def input_fields(self, flow: Flow) -> frozenset[str]:
        """The fields ``flow``'s input schema names (each flow's, once)."""
        found = self.inputs.get(id(flow))
        if found is None:
            found = self.inputs[id(flow)] = _input_fields(flow)
        return found

    def chain(self, r: str) -> dict[str | None, str | None]:
        """``r`` and each group around it -> the node below it on the way to ``r`` (None: ``r`` itself); the top
        (None) -> the outermost. What :meth:`GraphChecks.siblings` builds for each question, built once a reader."""
        chain: dict[str | None, str | None] = {}
        child: str | None = None
        node: str | None = r
        while node is not None:
            chain[node] = child
            child, node = node, self.entries[node].parent
        chain[None] = child
        return chain

    def relation(self, w: str, r: str, chain: dict[str | None, str | None]) -> str:
        """How ``w`` runs relative to ``r``: ``before`` (it has finished whenever ``r`` starts), ``beside`` (it may
        run at the same time: neither is surely before the other, nor would be once a ``needs`` that could not be
        followed is corrected), ``apart`` (one encloses the other, or they are in two cases of one switch) or
        ``after``. Each question costs one of :attr:`read_pairs`, or twice the size of the list asked about when
        that list is searched rather than looked up (:meth:`GraphChecks.leads`). ``chain``: :meth:`chain` of ``r``."""
        x: str | None = None
        node: str | None = w
        while node not in chain:
            assert node is not None
            x, node = node, self.entries[node].parent
        y = chain[node]  # x and y: the ancestors-or-selves of w and r below their innermost common ancestor
        if x is None or y is None:
            return "apart"
        ex = self.entries[x]
        if ex.lst != self.entries[y].lst:
            if ex.parent is None or self.entries[ex.parent].node.kind != "parallel":
                return "apart"  # two cases of one switch: never both run
            self.read_pairs -= 1
        else:
            size = len(self.members[ex.lst])
            self.read_pairs -= 1 if self.is_plain(ex.lst) or size * size <= 4 * _RACE_BITS else 2 * size
            if self.leads(x, y):
                return "before"
            if self.leads(y, x):
                return "after"
        if self.damaged and not (self.surely_not_before(w, r) and self.surely_not_before(r, w)):
            return "apart"
        return "beside"

    def unseen_message(self, key: str, fname: str, name: str, found: list[tuple[str, str]]) -> str:
        n = self.entries[key].node
        keys = sorted({w for w, _ in found}, key=lambda k: self.entries[k].order)
        what = f"the input field '{name}'" if fname == "llm.signature" else f"'{name}'"
        return (f"in '{fname}': {what} is written by {self.listed(keys)}, which may run at the same time as "
                f"'{n.id}', and by no node before it: '{n.id}' never sees that value (a node sees only what the "
                f"nodes it depends on wrote); {self.fixes(key, found)}")

    def listed(self, keys: list[str]) -> str:
        """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``, ``'a', 'b', 'c' and 4 other nodes``: the ids of ``keys``."""
        shown = [f"'{self.ident(k)}'" for k in keys[:_WRITERS_NAMED]]
        more = len(keys) - len(shown)
        if more:
            return ", ".join(shown) + f" and {more} other node{'s' if more > 1 else ''}"
        return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]

    def fixes(self, key: str, found: list[tuple[str, str]]) -> str:
        """How to order each writer before the reader: a ``needs`` in their common list, or, for two branches of a
        parallel, the reader moved after it."""
        needs: dict[str, dict[str, None]] = {}  # a node of the reader's -> the nodes it should also wait for
        moves: dict[str, str] = {}  # the node to move (the reader, or the for_each around it) -> the parallel
        for w, r in found:
            x, y = self.siblings(w, r)
            assert x is not None and y is not None
            parent = self.entries[x].parent
            if self.entries[x].lst != self.entries[y].lst and parent is not None:
                moves.setdefault(r, parent)
            else:
                needs.setdefault(y, {})[x] = None
        said = [f"move '{self.ident(r)}' after parallel '{self.ident(group)}'" for r, group in moves.items()]
        for y, wanted in needs.items():
            # a node that another of them waits for is waited for through it (when they are few enough to ask)
            xs = [x for x in wanted if not any(x != o and self.leads(x, o) for o in wanted)] \
                if len(wanted) <= _MINIMISED else list(wanted)
            node = self.entries[y].node
            around = f", the group around '{self.ident(key)}'" if y != key else ""
            if node.needs is None and len(xs) <= _WRITERS_NAMED:  # it waits for the node before it: written out
                listed = ", ".join([self.ident(d) for d in self.entries[y].deps] + [self.ident(x) for x in xs])
                said.append(f"add needs: [{listed}] to '{node.id}'{around}")
            else:
                said.append(f"add {self.listed(xs)} to the needs of '{node.id}'{around}")
        return " and ".join(said)

    def ident(self, key: str) -> str:
        return self.entries[key].node.id


def _named_after_what_it_reads(n: Node, name: str) -> bool:
    """Whether ``name`` is the id of a ``for_each`` or sub-flow node whose result goes under it (no ``output:``),
    and which reads that field of its context itself (``for_each: lines`` over ``${ lines }``; ``flow: order`` with
    ``with: {order: "${ order }"}``): the field is there before the node runs, and a node beside it that reads it
    means that value, not the result the group's id happens to store it under (not taken to race with it)."""
    if n.kind not in ("for_each", "flow") or n.id != name or n.output.mode != "name" or n.output.name != name:
        return False
    return any(name in names for _, _, names in _reads(n, None))


def _reads(n: Node, writes: list[str] | None, among: frozenset[str] | set[str] | None = None
           ) -> Iterator[tuple[str, str, frozenset[str]]]:
    """(field, JSON pointer, context fields read) for each field of ``n`` that reads its context: its conditions,
    ``key``, ``items``, ``on`` and ``with:`` values; its compensation's ``with:`` when what the step writes is known
    (it reads the step's context and what the step wrote); an LLM step's input fields when it has no ``with:``. Not
    ``fail_when`` or ``output`` mappings: they read the step's result. ``among``: the only fields asked about (an
    expression whose text has none of them as a word is not parsed: the check costs nothing where no field read
    is written by a node FD307 knows the writes of)."""
    for fname, text, path, reads_result in expression_fields(n, n.opts):
        if reads_result and not (fname.startswith("compensate.") and writes is not None):
            continue
        bare = fname in BARE_FIELDS
        names = _field_names(text, bare, among)
        if fname.startswith("compensate.") and writes is not None:
            names -= frozenset(writes)
        if names:
            yield fname, path, names
    if n.kind == "llm" and n.llm is not None and n.with_ is None:
        yield "llm.signature", join(n.opts, "llm", "signature"), frozenset(f.name for f in n.llm.inputs)


def _field_names(text: str, bare: bool, among: frozenset[str] | set[str] | None = None) -> frozenset[str]:
    """The context fields one option's text reads (a condition: one ``${ }``; a template: each of its slots);
    nothing for text that does not parse (FD501, reported by the expression checks), nor, when ``among`` is given,
    for text in which no name of it is a word (a field read is written as its name: ``f``, ``$.f``, `` `f` ``)."""
    if among is not None and among.isdisjoint(_WORD.findall(text)):
        return frozenset()
    try:
        if bare:
            source = expr.single_expression(text)
            sources = [source] if source is not None else []
        else:
            sources = [p.source for p in expr.split_template(text) if isinstance(p, expr.Slot)]
        found: frozenset[str] = frozenset()
        for source in sources:
            found |= context_names(source)
        return found
    except expr.ExpressionError:
        return frozenset()


#: a word of an expression's text (a name is read as one: written names are identifiers)
_WORD = re.compile(r"\w+")

#: attributes of a JSONata syntax node whose expressions are evaluated against something other than the input of
#: the node itself: a path step's filters and sort terms, a grouping, a transform's pattern and update (relative
#: to each item or to the transformed value)
_RELATIVE = frozenset({"stages", "predicate", "group", "terms", "focus", "index", "tuple", "pattern", "update",
                       "delete", "seeking_parent", "ancestor"})


@functools.lru_cache(maxsize=4096)
def context_names(source: str) -> frozenset[str]:
    """The top-level fields of the context that an expression reads: the first name of a path evaluated against
    the context itself (``order`` in ``order.total``; ``f`` in ``$.f`` and ``$$.f``), in conditions, function
    arguments, lambdas (which JSONata evaluates against the input of where they are written) and constructors —
    not the names read relative to something else (``price`` in ``items[price > 0]`` or ``order.(price * qty)``).
    Raises ExpressionError when the expression does not parse."""
    found: set[str] = set()
    seen: set[tuple[int, bool]] = set()
    stack: list[tuple[Any, bool]] = [(expr.syntax_tree(source), True)]
    while stack:
        node, at_root = stack.pop()
        if (id(node), at_root) in seen:
            continue
        seen.add((id(node), at_root))
        kind = getattr(node, "type", None)
        if kind == "path":
            steps: list[Any] = node.steps or []
            head: Any = steps[0] if steps else None
            first = getattr(head, "type", None)
            if at_root and first == "name":
                found.add(head.value)
            if first == "variable" and len(steps) > 1 and getattr(steps[1], "type", None) == "name" \
                    and (head.value == "$" or (head.value == "" and at_root)):
                found.add(steps[1].value)  # $$.f, and $.f where $ is the context
            stack.extend((step, at_root and i == 0) for i, step in enumerate(steps))
            stack.extend((child, False) for attr, child in _children(node) if attr != "steps")
            continue
        if kind == "name" and at_root:
            found.add(node.value)
        stack.extend((child, at_root and attr not in _RELATIVE) for attr, child in _children(node))
    return frozenset(found)


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    """(attribute, node) for each syntax node directly below ``node``: :func:`flowdsl.expr.ast_children`'s, with
    the attribute each is in, and a condition's ``else`` branch (which jsonata-python keeps in ``_else``)."""
    for attr, value in vars(node).items():
        if type(value) in _LEAVES or (attr.startswith("_") and attr != "_else"):
            continue  # (most of a syntax node's ~50 attributes: read the first way, a fifth of the time)
        for item in value if isinstance(value, list) else [value]:
            for inner in item if isinstance(item, list | tuple) else [item]:
                if hasattr(inner, "type") and hasattr(inner, "value"):
                    yield attr, inner


#: the types of a syntax node's attributes that hold no node below it
_LEAVES = frozenset({type(None), str, int, float, bool})


def _guarded(n: Node, path: str, fname: str, name: str) -> bool:
    """Whether the option at ``path`` asks whether ``name`` is there before relying on it: an expression with a
    condition (``points ? points : 0``, ``$exists(points) ? … : …``) whose test reads ``name`` (FD315's advice)."""
    if fname == "llm.signature":
        return False
    text = next((t for _, t, p, _ in expression_fields(n, n.opts) if p == path), None)
    if text is None:
        return False
    try:
        if fname in BARE_FIELDS:
            single = expr.single_expression(text)
            sources = [single] if single is not None else []
        else:
            sources = [p.source for p in expr.split_template(text) if isinstance(p, expr.Slot)]
        trees = [expr.syntax_tree(source) for source in sources]
    except expr.ExpressionError:
        return False
    stack = list(trees)
    while stack:
        node = stack.pop()
        if node.type == "condition" and _names(getattr(node, "condition", None), name):
            return True
        stack.extend(expr.ast_children(node))
    return False


def _names(node: Any, name: str) -> bool:
    """Whether the syntax tree below ``node`` names the field ``name`` (a path step of that name)."""
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if current.type == "name" and current.value == name:
            return True
        stack.extend(expr.ast_children(current))
    return False
