"""Compiler, signal checks: a signal waited for by two waits (FD316), a signal wait inside a for_each with no
``key:`` (FD317).

Stage: compiler. Imports ``flowdsl.diagnostics``, ``flowdsl.model`` and ``flowdsl.compiler_checks`` (its
``_Entry``) only; :func:`check_signals` reads the nodes the compiler collected.

A signal sent to a run goes to the one wait of its plan that takes that name (docs/language.md, "Waiting:
signals and timers"), so a name may be taken by one wait node of a plan at most; and a wait that runs once per
item of a ``for_each`` tells its instances apart by its ``key:``, which a signal names. The checks read the nodes
as the plan holds them, sub-flows expanded — a sub-flow used twice holds its waits twice — and say each
problem where it can be fixed, in the innermost file that holds what clashes: at the wait, or, when the wait is
fine in its own file, at the sub-flow node that brings it (a second time, beside another wait of that signal, or
into a loop).
"""

from __future__ import annotations

import os

from flowdsl.compiler_checks import _Entry
from flowdsl.diagnostics import Diagnostic, join, make, quote
from flowdsl.model import Flow


def check_signals(entries: dict[str, _Entry]) -> list[Diagnostic]:
    """FD316 for each signal wait whose signal name a wait before it (in plan order) takes too, keyed or not; FD317
    for each signal wait with no ``key:`` inside a ``for_each``, directly or through sub-flows. Timer waits take no
    signal: never reported."""
    diags: list[Diagnostic] = []
    first: dict[str, _Entry] = {}
    for e in entries.values():
        n = e.node
        if n.kind != "wait" or n.signal is None:
            continue
        loop = _loop_around(e, entries) if n.signal_key is None else None
        if loop is not None:
            diags.append(_in_loop(e, loop, entries))
        taken = first.setdefault(n.signal, e)
        if taken is not e:
            diags.append(_twice(taken, e, entries))
    return diags


def _loop_around(e: _Entry, entries: dict[str, _Entry]) -> _Entry | None:
    """The innermost ``for_each`` that runs ``e`` once per item (its scopes, out through sub-flow nodes)."""
    scope = e.scope
    while scope is not None:
        around = entries[scope]
        if around.node.kind == "for_each":
            return around
        scope = around.scope
    return None


def _in_file(e: _Entry, flow: Flow, entries: dict[str, _Entry]) -> _Entry:
    """``e``, or the node around it written in ``flow``'s file: the sub-flow node that brings it there."""
    while e.flow is not flow:
        assert e.parent is not None  # (the root's nodes are the root flow's)
        e = entries[e.parent]
    return e


def _where(e: _Entry, said_in: str | None) -> str:
    """Where ``e`` is written, for a message reported in the file ``said_in``: ``line 4``, or
    ``line 4 of lib/approve.yaml`` when that is another file (named relative to ``said_in``'s directory)."""
    loc = e.node.loc
    if loc.file == said_in or loc.file is None:
        return loc.describe()
    base = os.path.dirname(os.path.abspath(said_in)) if said_in else os.getcwd()
    return f"{loc.describe()} of {os.path.relpath(os.path.abspath(loc.file), base).replace(os.sep, '/')}"


def _id_path(e: _Entry) -> str:
    """The pointer a diagnostic about ``e`` points at: a wait's signal name (its ``signal:`` when it has another
    name than its id, else its id); a sub-flow node's id."""
    n = e.node
    if n.kind == "wait":
        return join(n.opts, "signal" if n.signal != n.id else "wait")
    return join(n.opts, "flow") if n.kind == "flow" else n.loc.path


def _in_loop(e: _Entry, loop: _Entry, entries: dict[str, _Entry]) -> Diagnostic:
    """FD317 for ``e``, a signal wait with no key that runs once per item of ``loop``: at ``e`` when it is written in
    the loop's file (where the loop's variable is in its scope: the hint reads it), else at the sub-flow node there
    that brings it (the key is then given in the sub-flow's file, from a value its ``with:`` passes)."""
    n = e.node
    at = _in_file(e, loop.flow, entries)
    why = (f"inside for_each '{loop.node.id}' with no key: a signal wait in a for_each body needs a "
           f"'{_option('key', e)}' telling which iteration a signal is for")
    if at is e:
        example = f'{_option("key", e)} "${{ ${loop.node.as_}.id }}"'
        message = (f"'{n.id}' waits for signal '{n.signal}' {why}, such as '{example}'; or wait before or after "
                   "the loop (a timer wait, with 'for', may stay inside)")
    else:
        message = (f"sub-flow '{at.node.id}' waits for signal '{n.signal}' (wait '{e.key[len(at.key) + 1:]}', "
                   f"{_where(e, at.node.loc.file)}) {why}: give that wait one in its file, from a value the sub-flow "
                   f"node's '{_option('with', at)}' passes it; or wait before or after the loop, outside the "
                   "sub-flow")
    return make("FD317", message, _id_path(at), file=at.node.loc.file)


def _option(name: str, e: _Entry) -> str:
    """An option as the file ``e`` is written in spells it: ``key:`` in YAML, ``key`` in a .flow file."""
    return name if (e.node.loc.file or "").endswith(".flow") else f"{name}:"


def _use(e: _Entry, entries: dict[str, _Entry]) -> str | None:
    """The key of the sub-flow node whose file ``e`` is written in (None: the root flow's file)."""
    key = e.parent
    while key is not None and entries[key].node.kind != "flow":
        key = entries[key].parent
    return key


def _brought(e: _Entry, use: str | None, entries: dict[str, _Entry]) -> _Entry:
    """``e``, or the node written in the file of ``use`` (a sub-flow node's key; None: the root flow's) that holds
    it: the sub-flow node that brings it there."""
    while (around := _use(e, entries)) != use:
        assert around is not None  # (``use`` is around ``e``)
        e = entries[around]
    return e


def _twice(first: _Entry, e: _Entry, entries: dict[str, _Entry]) -> Diagnostic:
    """FD316 for ``e``, a signal wait whose signal ``first`` (before it in plan order) takes too.

    Said in the innermost file that holds both waits (each file inside it is fine on its own): at ``e`` when it is
    written there, else at the sub-flow node there that brings it."""
    n = e.node
    uses_of_first = {first.key}
    use = _use(first, entries)
    while use is not None:
        uses_of_first.add(use)
        use = _use(entries[use], entries)
    meet = _use(e, entries)
    while meet is not None and meet not in uses_of_first:
        meet = _use(entries[meet], entries)
    at, other = _brought(e, meet, entries), _brought(first, meet, entries)
    file = at.node.loc.file
    option = "'signal <another name>'" if (file or "").endswith(".flow") else "'signal: <another name>'"
    if at is e:
        message = (f"signal '{n.signal}' is waited for by '{first.key}' ({_where(first, file)}) and by '{e.key}': "
                   f"a signal goes to one wait; give one of them {option}")
    elif e.node is first.node:  # one wait, its file reached twice from this one
        uses = f"two uses of sub-flow {quote(at.node.path)}, " if at.node.path == other.node.path else ""
        message = (f"signal '{n.signal}' is waited for by '{first.key}' and by '{e.key}': both are the wait "
                   f"'{n.id}' ({_where(e, file)}), reached through {uses}'{other.key}' ({_where(other, file)}) and "
                   f"'{at.key}'; a signal goes to one wait, so a sub-flow that waits for a signal can be used once "
                   "in a flow")
    else:
        through = "" if other is first else f", through sub-flow '{other.node.id}'"
        fix = (f"give '{first.node.id}' {option}" if other is first else
               "give one of the two waits another signal name in its own file, or use one of the sub-flows only")
        message = (f"sub-flow '{at.node.id}' waits for signal '{n.signal}' (wait '{e.key[len(at.key) + 1:]}', "
                   f"{_where(e, file)}), which '{first.key}' ({_where(first, file)}{through}) waits for too: a signal "
                   f"goes to one wait; {fix}")
    return make("FD316", message, _id_path(at), file=file)
