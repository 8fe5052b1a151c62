"""Semantic checks, retry filters: the error types an ``on``/``not_on`` names (FD313).

Stage: checks. Imports ``flowdsl.diagnostics`` and ``flowdsl.model`` only. Run
by the compiler after the worker modules of the spec and of its sub-flows were
imported (``check_workers``), and only then: a filter names exception classes
by their ``__name__`` (docs/language.md, "Retry"), and what classes exist is
known only once the code that raises them is loaded. A name that no exception
class of the process has, nor any error type flowdsl records itself
(:data:`FLOWDSL_ERROR_TYPES`), can never match: a misspelt ``on`` never
retries, a misspelt ``not_on`` never stops a retry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flowdsl.diagnostics import Diagnostic, Suggestions, join, make
from flowdsl.model import Flow, Retry, walk

#: the error types flowdsl records for a failure that is no exception a worker raised — the kernel's
#: (``flowdsl.kernel_engine``: a timeout, ``fail_when``, an expression, a cancel, an input or output that breaks
#: its schema; ``Error`` for a failure reported without a type), the runtimes' (``WorkerNotFound``, the Redis
#: ``ScheduleToStartTimeout``) — and the exception classes of ``flowdsl.llm`` that an LLM step's attempt fails
#: with, which a process checking a spec need not have imported. A filter matches them by this name (docs/kernel.md,
#: "Errors the kernel records"); tests/test_retry_filters.py checks that the list is what the code records
FLOWDSL_ERROR_TYPES = frozenset({
    "Cancelled", "Error", "ExpressionError", "FailWhen", "InputInvalid", "LLMNotConfigured", "OutputInvalid",
    "RunTimeout", "ScheduleToStartTimeout", "SignatureError", "StepTimeout", "SubflowTimeout", "TaskCancelled",
    "WorkerNotFound",
})


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
    any error type flowdsl records. Made once the worker modules are imported (the classes they define and import
    are then known); the caller does not make it when one of them could not be imported (FD205)."""
    known: set[str] | None = None
    suggest: Suggestions | None = None
    for flow in flows:
        for which, name, path in retry_filters(flow):
            if known is None:
                known = known_error_types()
            if name in known:
                continue
            suggest = suggest or Suggestions(known)
            yield make("FD313", f"retry filter '{which}' names '{name}', the name of no exception class in the "
                       f"worker modules or what they import, nor of an error type flowdsl records{suggest.hint(name)}: "
                       "it never matches; a filter matches exception class names (type(exc).__name__ and its bases)",
                       path, file=flow.file)
