"""Workers: named Python functions that steps run.

Stage: runtime-facing registry, imported by the checks (to know which workers
exist), the runtimes (to call them) and user worker modules. Imports nothing
from flowdsl.

A worker receives its input (a JSON object: the step's ``with:`` mapping, or
the context it sees) and a :class:`StepContext`; it returns a JSON object (or
``None`` for "no outputs") or raises. The exception's class name is the error
type that retry filters match::

    from flowdsl import worker

    @worker("reserve_items")
    async def reserve_items(data, ctx):
        return {"reservation_id": f"RES-{ctx.idempotency_key}"}
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

WorkerFn = Callable[..., Any] | Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class StepContext:
    """What a worker knows about the attempt it is running."""

    run_id: str
    step_id: str  # the node key (docs/plan.md)
    attempt: int  # 1-based
    idempotency_key: str  # stable across attempts and crashes: hand it to payment gateways
    compensating: bool = False  # True when running as a step's compensation
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("flowdsl.worker"))


@dataclass(frozen=True)
class Worker:
    name: str
    fn: WorkerFn
    is_async: bool
    module: str


class WorkerRegistry:
    """Name -> worker. The process-wide default is :data:`registry`."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def register(self, name: str, fn: WorkerFn) -> WorkerFn:
        existing = self._workers.get(name)
        if existing is not None and existing.fn is not fn and _origin(existing.fn) != _origin(fn):
            raise ValueError(f"worker {name!r} is already registered by {existing.module}")
        self._workers[name] = Worker(name, fn, inspect.iscoroutinefunction(fn), getattr(fn, "__module__", "?"))
        return fn

    def get(self, name: str) -> Worker | None:
        return self._workers.get(name)

    def names(self) -> set[str]:
        return set(self._workers)

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def unregister(self, name: str) -> None:
        self._workers.pop(name, None)


def _origin(fn: WorkerFn) -> tuple[str, str]:
    # a module re-imported (tests, reload) registers new function objects for the same names
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""))


#: the process-wide registry that ``@worker`` fills
registry = WorkerRegistry()


def worker(name: str | None = None, *, registry_: WorkerRegistry | None = None) -> Callable[[WorkerFn], WorkerFn]:
    """Register the decorated function (sync or async) as the worker ``name``.

    ``name`` defaults to the function's name. Worker names are ids joined by
    dots (``payments.charge``).
    """

    if callable(name):  # used bare, as ``@worker``: register the function under its own name
        return worker(registry_=registry_)(name)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"worker name must be a non-empty str (or leave it out: the function's name), "
                        f"got {name!r}")

    def decorate(fn: WorkerFn) -> WorkerFn:
        if not callable(fn):
            raise TypeError(f"@worker decorates a function (sync or async), got {type(fn).__name__}")
        (registry_ or registry).register(name or fn.__name__, fn)
        return fn

    return decorate


class WorkerImportError(Exception):
    """A worker module could not be imported. ``found``: it was found (importing it raised); ``searched``: the
    directories it was looked for in (besides the rest of ``sys.path``)."""

    def __init__(self, module: str, reason: str, *, found: bool = True, searched: Sequence[str] = (),
                 origin: str | None = None):
        where = f" (in {origin})" if origin else f" (searched {', '.join(searched)})" if not found and searched \
            else ""
        super().__init__(f"cannot import worker module '{module}': {reason}{where}")
        self.module = module
        self.reason = reason
        self.found = found
        self.searched = list(searched)
        self.origin = origin


def import_worker_modules(modules: Iterable[str], search_path: str | None = None,
                          also: Sequence[str | None] = ()) -> None:
    """Import each module so its ``@worker`` functions register.

    ``search_path`` (the current directory, or the project root), then the
    directories of ``also`` (the spec's directory), are put on ``sys.path``
    first, in that order, so spec-relative modules import. Raises
    :class:`WorkerImportError` naming the first module that fails: the error
    its import raised (any ``BaseException`` — ``sys.exit()`` at import time
    too — but a real Ctrl-C, which propagates), or, when it is nowhere, the
    directories searched.
    """
    places = list(dict.fromkeys(p for p in (search_path, *also) if p))
    for place in reversed(places):
        if place not in sys.path:
            sys.path.insert(0, place)
    for module in modules:
        _import_one(module, places)


def _import_one(module: str, places: list[str]) -> None:
    try:
        with marking_sigint():
            importlib.import_module(module)
    except BaseException as exc:  # any failure of user code at import time
        if from_sigint(exc):
            raise
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (module == missing or module.startswith(missing + ".")):
            raise WorkerImportError(module, _describe(exc), found=False, searched=places) from None
        raise WorkerImportError(module, _describe(exc), searched=places, origin=_origin_of(module)) from exc


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ fails
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _origin_of(module: str) -> str | None:
    """The file of the module that failed to import, when that can be told."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except BaseException:  # a parent package that itself fails to import: nothing more to say
        return None
    origin = getattr(spec, "origin", None)
    return origin if isinstance(origin, str) and origin not in ("built-in", "frozen") else None


# --- telling a real Ctrl-C from a KeyboardInterrupt that user code raises ------------------------------

_SIGNALLED = "_flowdsl_from_sigint"


def from_sigint(exc: BaseException) -> bool:
    """Whether ``exc`` is the ``KeyboardInterrupt`` of a real Ctrl-C that :func:`marking_sigint` saw."""
    return isinstance(exc, KeyboardInterrupt) and bool(getattr(exc, _SIGNALLED, False))


@contextlib.contextmanager
def marking_sigint() -> Iterator[None]:
    """While inside, the ``KeyboardInterrupt`` of a real Ctrl-C is marked as such (:func:`from_sigint`), so that
    user code raising ``KeyboardInterrupt`` itself (a worker, a worker module at import) can be told apart from
    the user pressing Ctrl-C: the first is that code's failure, the second stops what it interrupted.

    Wraps the current Python-level SIGINT handler; does nothing outside the main thread or when SIGINT is
    ignored, left to the system or handled by an event loop. The handler is restored on the way out.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    handler = _MarkingHandler(previous)
    try:
        signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):  # not settable here after all
        yield
        return
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, previous)


class _MarkingHandler:
    __slots__ = ("previous",)

    def __init__(self, previous: Callable[[int, Any], Any]):
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> Any:
        try:
            return self.previous(signum, frame)
        except KeyboardInterrupt as exc:
            setattr(exc, _SIGNALLED, True)
            raise
