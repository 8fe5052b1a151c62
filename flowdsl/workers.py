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

import importlib
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
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

    def decorate(fn: WorkerFn) -> WorkerFn:
        (registry_ or registry).register(name or fn.__name__, fn)
        return fn

    return decorate


class WorkerImportError(Exception):
    def __init__(self, module: str, reason: str):
        super().__init__(f"cannot import worker module '{module}': {reason}")
        self.module = module
        self.reason = reason


def import_worker_modules(modules: Iterable[str], search_path: str | None = None) -> None:
    """Import each module so its ``@worker`` functions register.

    ``search_path`` (the spec's directory, or the project root) is put on
    ``sys.path`` first so spec-relative modules import. Raises
    :class:`WorkerImportError` naming the first module that fails.
    """
    if search_path and search_path not in sys.path:
        sys.path.insert(0, search_path)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure of user code at import time
            raise WorkerImportError(module, f"{type(exc).__name__}: {exc}") from exc
