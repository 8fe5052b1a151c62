"""Semantic checks, retry filters: the error types an ``on``/``not_on`` names (FD313).

Stage: checks. Imports ``flowdsl.diagnostics`` and ``flowdsl.model`` only. Run
by the compiler after the worker modules of the spec and of its sub-flows were
imported (``check_workers``), and only then: a filter names exception classes
by their ``__name__`` (docs/language.md, "Retry"), and what classes exist is
known only once the code that raises them is loaded. A name that no exception
class of the process has, nor any error type flowdsl records itself
(:data:`FLOWDSL_ERROR_TYPES`), can never match: a misspelt ``on`` never
retries, a misspelt ``not_on`` never stops a retry.

What the process has is not all a worker can raise: a library a worker
function imports only when it runs (``import httpx`` inside the function, the
LM client of an LLM step) is not loaded yet, and its classes
(``ConnectTimeout``, ``RateLimitError``) cannot be told from a typo by their
absence. So only a name that reads as a misspelling of a known one is reported
(:func:`misspelt`): one letter off (two, in a name of 12 letters or more), or
a builtin alias whose class has another ``__name__`` (``IOError`` is
``OSError``). A name far from every known one is not reported.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator

from flowdsl.diagnostics import Diagnostic, join, make
from flowdsl.model import Flow, Retry, walk

#: the error types flowdsl records for a failure that is no exception a worker raised — the kernel's
#: (``flowdsl.kernel_engine``: a timeout, ``fail_when``, an expression, a cancel, an input or output that breaks
#: its schema, a signal wait's deadline, a keyed wait's key; ``Error`` for a failure reported without a type), the
#: runtimes'
#: (``WorkerNotFound``, the Redis ``ScheduleToStartTimeout``) — and the exception classes of ``flowdsl.llm`` that
#: an LLM step's attempt fails with, which a process checking a spec need not have imported. A filter matches them
#: by this name (docs/kernel.md, "Errors the kernel records"); tests/test_retry_filters.py checks that the list is
#: what the code records
FLOWDSL_ERROR_TYPES = frozenset({
    "Cancelled", "Error", "ExpressionError", "FailWhen", "InputInvalid", "LLMNotConfigured", "OutputInvalid",
    "RunTimeout", "ScheduleToStartTimeout", "SignatureError", "StepTimeout", "SubflowTimeout", "TaskCancelled",
    "WaitKeyInvalid", "WaitKeyTaken", "WaitTimeout", "WorkerNotFound",
})


#: names that are exception classes (or their root) but that no error's ``types`` holds: an error lists the class
#: names of its exception's MRO without ``BaseException`` and ``object`` (``flowdsl.runtime.execute.error_types``)
NEVER_MATCHED = frozenset({"BaseException", "object"})


def exception_names() -> set[str]:
    """The ``__name__`` of ``BaseException`` and of every subclass of it that exists in the process (found through
    ``type.__subclasses__``, recursively: classes of the worker modules and of everything they imported)."""
    names: set[str] = set()
    seen: set[type] = set()
    todo: list[type] = [BaseException]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        name = getattr(cls, "__name__", None)
        if isinstance(name, str):
            names.add(name)
        try:
            todo.extend(type.__subclasses__(cls))
        except TypeError:  # (a class whose metaclass is not a type subclass: none of a normal process)
            continue
    return names


def known_error_types() -> set[str]:
    """What a retry filter can match in this process: its exception class names and flowdsl's own error types."""
    return exception_names() | FLOWDSL_ERROR_TYPES


def retry_filters(flow: Flow) -> Iterator[tuple[str, str, str]]:
    """(which filter, the name it lists, its JSON pointer) for each error type a retry filter of ``flow`` names:
    ``defaults`` (for steps and for compensations), each step's own, each compensation's (sub-flows excluded)."""
    policies: list[tuple[Retry | None, str]] = [(flow.defaults.retry, "/defaults/retry"),
                                                (flow.defaults.compensate_retry, "/defaults/compensate/retry")]
    for node in walk(flow.steps):
        if node.is_step:
            policies.append((node.retry, join(node.opts, "retry")))
        if node.compensate is not None:
            policies.append((node.compensate.retry, join(node.compensate.loc.path, "retry")))
    for policy, path in policies:
        if policy is None:
            continue
        for which, names in (("on", policy.on), ("not_on", policy.not_on)):
            for i, name in enumerate(names or ()):
                yield which, name, join(path, which, i)


def check_retry_filters(flows: Iterable[Flow]) -> Iterator[Diagnostic]:
    """FD313: a name in a retry filter (``on``, ``not_on``) that no exception class of the process is called, nor
    any error type flowdsl records, and that reads as a misspelling of one that is (:func:`misspelt`). Made once
    the worker modules are imported (the classes they define and import are then known); the caller does not make
    it when one of them could not be imported (FD205)."""
    known: set[str] | None = None
    near: Misspellings | None = None
    for flow in flows:
        for which, name, path in retry_filters(flow):
            if name in NEVER_MATCHED:
                yield make("FD313", f"retry filter '{which}' names '{name}', which never matches: a filter matches "
                           "the class of the exception a worker raised and its bases up to, but not including, "
                           "BaseException (and flowdsl's own error types by their name); name 'Exception' to "
                           f"match every exception, or leave '{which}' out", path, file=flow.file)
                continue
            if known is None:
                known = known_error_types()
            if name in known:
                continue
            near = near or Misspellings(known)
            meant = near.meant(name)
            if meant is None:  # perhaps a class of code not imported yet: not told from a typo, not reported
                continue
            yield make("FD313", f"retry filter '{which}' names '{name}', the name of no exception class in the "
                       f"worker modules or what they import, nor of an error type flowdsl records (did you mean "
                       f"'{meant}'?): it never matches; a filter matches exception class names (type(exc).__name__ "
                       "and its bases)", path, file=flow.file)


#: the letters a name may be off by and still be taken for a misspelling: one, two from this length on
_LONG_NAME = 12
#: edit-distance cells one compilation computes at most (a hostile spec: thousands of unknown names); past it the
#: names left are looked up only among the aliases
_CELLS = 2_000_000


def _aliases() -> dict[str, str]:
    """Python's builtin names of exception classes whose ``__name__`` is another (``IOError``, ``EnvironmentError``:
    ``OSError``): a filter naming them never matches (the error records ``OSError``)."""
    return {name: obj.__name__ for name, obj in vars(builtins).items()
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__name__ != name}


class Misspellings:
    """Which known error type an unknown filter name misspells, if any (:func:`misspelt`), asked of one set of
    known names any number of times, in bounded time (see :data:`_CELLS`)."""

    def __init__(self, known: Iterable[str]):
        self.aliases = _aliases()
        self.by_length: dict[int, list[str]] = {}
        # private classes (``_OptionError``) are no name a filter is meant to give
        for name in sorted(set(known)):
            if not name.startswith("_"):
                self.by_length.setdefault(len(name), []).append(name)
        self.cells = _CELLS
        self.asked: dict[str, str | None] = {}

    def meant(self, name: str) -> str | None:
        if name not in self.asked:
            self.asked[name] = self._meant(name)
        return self.asked[name]

    def _meant(self, name: str) -> str | None:
        if name in self.aliases:
            return self.aliases[name]
        limit = 2 if len(name) >= _LONG_NAME else 1
        best: tuple[int, str] | None = None
        for size in range(len(name) - limit, len(name) + limit + 1):
            for other in self.by_length.get(size, ()):
                if self.cells <= 0:
                    return best[1] if best else None
                self.cells -= len(name) * (2 * limit + 1)
                d = misspelt(name, other, limit)
                if d is not None and (best is None or (d, other) < best):
                    best = (d, other)
        return best[1] if best else None


def misspelt(name: str, known: str, limit: int) -> int | None:
    """How many letters ``name`` is off from ``known`` (inserted, deleted, replaced, or two neighbours swapped:
    the optimal string alignment distance) when that is at most ``limit`` and the two do not differ only by a
    start one of them has (``LMTimeoutError`` is no misspelling of ``TimeoutError``, ``herror`` of ``error``:
    other classes of libraries not imported yet); else None."""
    if abs(len(name) - len(known)) > limit or name.endswith(known) or known.endswith(name):
        return None
    inf = limit + 1
    prev2: list[int] = []
    prev = list(range(len(known) + 1))
    for i in range(1, len(name) + 1):
        row = [i] + [inf] * len(known)
        lo, hi = max(1, i - limit), min(len(known), i + limit)
        for j in range(lo, hi + 1):
            cost = 0 if name[i - 1] == known[j - 1] else 1
            v = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and name[i - 1] == known[j - 2] and name[i - 2] == known[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            row[j] = v
        if min(row[lo - 1:hi + 1]) > limit:
            return None
        prev2, prev = prev, row
    return prev[len(known)] if prev[len(known)] <= limit else None
