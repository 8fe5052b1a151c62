"""Workers: named Python functions that steps run.

Stage: runtime-facing registry, imported by the checks (to know which workers
exist), the runtimes (to call them) and user worker modules. Imports nothing
from flowdsl.

A worker receives its input (a JSON object: the step's ``with:`` mapping, or
the context it sees) and a :class:`StepContext`; it returns a JSON object (or
``None`` for "no outputs") or raises. The exception's class name is its error
type; retry filters match it or the name of any of its base classes::

    from flowdsl import worker

    @worker("reserve_items")
    async def reserve_items(data, ctx):
        return {"reservation_id": f"RES-{ctx.idempotency_key}"}
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

WorkerFn = Callable[..., Any] | Callable[..., Awaitable[Any]]
#: a worker function, whatever its signature: ``@worker`` gives it back unchanged, with its type
F = TypeVar("F", bound=Callable[..., Any])

#: a worker name: ids joined by dots, as the spec language has it (docs/language.md, "Names"; the schema's
#: ``worker``): an id is ASCII letters, digits and ``_``, not starting with a digit, at most 64 characters
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63})*\Z")
_NAME_RULE = ("worker names are ids joined by dots, like 'payments.refund'; an id is ASCII letters, digits and "
              "'_', not starting with a digit, at most 64 characters")


class StepLogger(logging.LoggerAdapter[logging.Logger]):
    """``ctx.logger``: the logger ``flowdsl.worker.<worker name>`` (:attr:`logger`), telling whose line it is.

    Every record carries the attributes ``run_id``, ``step_id``, ``attempt`` and ``idempotency_key`` (for
    formatters — ``%(run_id)s`` — filters and structured handlers; an ``extra=`` of the call is merged over
    them), and its message starts with ``[<idempotency key>#<attempt>]`` (``[order-42/charge#2] charging``),
    so that lines of concurrent runs, for_each iterations and attempts can be told apart under any format.
    """

    def __init__(self, logger: logging.Logger, ctx: StepContext):  # made for every attempt: kept cheap (the
        self.logger = logger  # ids are gathered on first use: most attempts log nothing)
        self._ctx = ctx

    @property
    def extra(self) -> dict[str, Any]:  # type: ignore[override]
        """The ids every record of this attempt carries."""
        ctx = self._ctx
        return {"run_id": ctx.run_id, "step_id": ctx.step_id, "attempt": ctx.attempt,
                "idempotency_key": ctx.idempotency_key}

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Prefix the message with ``[<idempotency key>#<attempt>]`` and add the attempt's ids to the record
        (``extra``; the call's own ``extra=`` wins on a clash)."""
        ids = self.extra
        extra = kwargs.get("extra")
        kwargs["extra"] = {**ids, **extra} if extra else ids
        return f"[{ids['idempotency_key']}#{ids['attempt']}] {msg}", kwargs


@dataclass(frozen=True)
class StepContext:
    """What a worker knows about the attempt it is running."""

    run_id: str
    step_id: str  # the node key (docs/plan.md)
    attempt: int  # 1-based
    idempotency_key: str  # stable across attempts and crashes: hand it to payment gateways
    compensating: bool = False  # True when running as a step's compensation
    #: a :class:`StepLogger` for this attempt over ``flowdsl.worker.<worker name>``: the ``logging.Logger``
    #: given (or the one a given StepLogger wraps; none: ``flowdsl.worker``) is wrapped with this context's ids
    logger: StepLogger = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        given: Any = self.logger
        base = given.logger if isinstance(given, logging.LoggerAdapter) else given
        if not isinstance(base, logging.Logger):
            base = logging.getLogger("flowdsl.worker")
        object.__setattr__(self, "logger", StepLogger(base, self))


@dataclass(frozen=True)
class Worker:
    """A registered worker (:meth:`WorkerRegistry.get`): its ``name``, the function ``fn`` called as
    ``fn(data, ctx)``, whether it is an ``async`` function (``is_async``; a sync one runs in a thread) and the
    ``module`` it was defined in (``"?"`` when unknown)."""

    name: str
    fn: WorkerFn
    is_async: bool
    module: str


def _check_callable(name: str, fn: Any) -> None:
    """Refuse, when it is registered, a callable that cannot be a worker: it would fail every attempt of its steps
    at run time, as the step's own failure — retried, then compensated like a business error."""
    if inspect.isclass(fn):
        raise TypeError(f"worker {name!r}: a class is not a worker (calling it makes an instance, not a result); "
                        "register a function, or an instance with a __call__")
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(f"worker {name!r}: a generator function is not a worker: a worker returns its result "
                        "(a dict) or None")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: called as it comes
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        found, remedy = _signature_problem(signature) or (f"cannot be called as fn(data, ctx) ({exc})", "")
        raise TypeError(f"worker {name!r}: {_describe_fn(fn)} {found}; a worker must take the step's input and "
                        f"its context: fn(data, ctx){remedy}") from None


def is_async(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine to await (an async worker, run on the event loop) rather than doing
    the work (a sync worker, run in a thread): an ``async def`` function or method, a ``functools.partial`` of one,
    or an instance of a class whose ``__call__`` is ``async def``. A sync function that returns a coroutine (an
    ``async def`` behind a decorator that does not use ``inspect.markcoroutinefunction``, Python 3.12+) cannot be
    told apart: it is called in a thread, and what it returns awaited."""
    if inspect.iscoroutinefunction(fn):
        return True
    if isinstance(fn, functools.partial):
        return is_async(fn.func)
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    call = inspect.getattr_static(type(fn), "__call__", None)  # (the class's own, as calling the object uses it)
    return inspect.iscoroutinefunction(call)


def _signature_problem(signature: inspect.Signature) -> tuple[str, str] | None:
    """Why a function of ``signature`` cannot be called as ``fn(data, ctx)``: what it takes, and what to change
    (``""``, or a remedy starting with ``"; "``); None when that cannot be told."""
    params = list(signature.parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    kw_required = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        if not params:
            return "takes no parameters", ""
        took = f"takes {_count(len(positional), 'positional parameter')}" + (
            f" ({', '.join(positional)})" if positional else "")
        if kw_required:  # fn(data, *, ctx): the context is given by position, not by name
            took += f" and the keyword-only {_names(kw_required)}"
            return took, f"; make {_names(kw_required[:2 - len(positional)])} positional (before any '*')"
        return took, ""
    if len(required) > 2:
        extra = required[2:]
        return (f"takes {len(required)} positional parameters without a default ({', '.join(required)})",
                f", and is given nothing else; give {_names(extra)} a default, or remove "
                f"{'it' if len(extra) == 1 else 'them'}")
    if kw_required:
        return (f"has the keyword-only {_names(kw_required)} without a default",
                f", and is given nothing else; give {'it' if len(kw_required) == 1 else 'them'} a default")
    return None


def _count(n: int, noun: str) -> str:
    return f"{'no' if n == 0 else n} {noun}{'' if n == 1 else 's'}"


def _names(names: list[str]) -> str:
    """``parameter 'x'``, ``parameters 'x' and 'y'``."""
    quoted = [f"'{n}'" for n in names]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return f"parameter{'' if len(names) == 1 else 's'} {listed}"


class WorkerRegistry:
    """Name -> worker. The process-wide default is :data:`registry`."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def register(self, name: str, fn: F) -> F:
        """Register ``fn`` as the worker ``name`` (ids joined by dots) and return it.

        A name is taken once: registering another callable under it raises ``ValueError`` — unless it is the
        same function defined again (its module imported again, a notebook cell run again: see
        :func:`_same_worker`), which then replaces the old one.
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
            raise ValueError(f"invalid worker name {shown}: {_NAME_RULE}")
        if not callable(fn):
            raise TypeError(f"a worker is a function (sync or async), got {type(fn).__name__}")
        _check_callable(name, fn)
        existing = self._workers.get(name)
        if existing is not None and not _same_worker(existing.fn, fn):
            raise ValueError(f"worker {name!r} is already registered ({_describe_fn(existing.fn)}, from "
                             f"{existing.module}); {_describe_fn(fn)} cannot take the name too: give it another "
                             f"name, or unregister {name!r} first")
        module = getattr(fn.func if isinstance(fn, functools.partial) else fn, "__module__", None)
        self._workers[name] = Worker(name, fn, is_async(fn), module if isinstance(module, str) else "?")
        return fn

    def get(self, name: str) -> Worker | None:
        """The worker registered as ``name``, or None."""
        return self._workers.get(name)

    def names(self) -> set[str]:
        """The names registered (a new set)."""
        return set(self._workers)

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def unregister(self, name: str) -> None:
        """Remove the worker ``name`` (nothing when there is none), so that the name can be registered again."""
        self._workers.pop(name, None)


def _same_worker(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` again, so that registering it under ``old``'s name is no conflict.

    The same object; a bound method of the same object; a partial of the same worker with equal arguments; or
    the same function defined again — a module imported again (a reload, a test) or a notebook cell run again
    makes new function objects for the same definitions. A function is known by its module and qualified
    name, which tell definitions apart only at a module's or a class's top level: the lambdas of a module, or
    the closures one factory makes, share theirs, so those are the same only when they come from another
    execution of their module (another ``__globals__``).
    """
    if old is new:
        return True
    if inspect.ismethod(old) and inspect.ismethod(new):
        return old.__self__ is new.__self__ and _same_worker(old.__func__, new.__func__)
    if isinstance(old, functools.partial) and isinstance(new, functools.partial):
        try:
            return _same_worker(old.func, new.func) and bool(old.args == new.args and old.keywords == new.keywords)
        except Exception:  # arguments that cannot be compared
            return False
    if not (inspect.isfunction(old) and inspect.isfunction(new)):
        return False
    if (old.__module__, old.__qualname__) != (new.__module__, new.__qualname__):
        return False
    nested = "<locals>" in new.__qualname__ or "<lambda>" in new.__qualname__
    return not nested or old.__globals__ is not new.__globals__


def _describe_fn(fn: Any) -> str:
    """A callable as an error message names it."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({_describe_fn(fn.func)}, ...)"
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(qualname, str):
        return f"{'method' if inspect.ismethod(fn) else 'function'} {qualname}"
    return f"{type(fn).__name__} object"


#: the process-wide registry that ``@worker`` fills
registry = WorkerRegistry()


@overload
def worker(name: F, *, registry_: WorkerRegistry | None = None) -> F: ...


@overload
def worker(name: str | None = None, *, registry_: WorkerRegistry | None = None) -> Callable[[F], F]: ...


def worker(name: Any = None, *, registry_: WorkerRegistry | None = None) -> Any:
    """Register the decorated function (sync or async) as the worker ``name``; the function is returned as it
    is, with its type: ``@worker``, ``@worker()`` and ``@worker("name")`` all work.

    ``name`` defaults to the function's ``__name__``. Worker names are ids joined by dots
    (``payments.charge``): another name is a ``ValueError``, and so is a name another function already has
    (:meth:`WorkerRegistry.register`). A callable without a usable ``__name__`` (a lambda, a
    ``functools.partial``, a callable object) needs its name given.
    """

    if callable(name):  # used bare, as ``@worker``: register the function under its own name
        return worker(registry_=registry_)(name)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"worker name must be a non-empty str (or leave it out: the function's name), "
                        f"got {name!r}")
    if registry_ is not None and not isinstance(registry_, WorkerRegistry):  # ({} registered into the default)
        raise TypeError(f"registry_ must be a WorkerRegistry or None; got {type(registry_).__name__}")
    target = registry if registry_ is None else registry_

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@worker decorates a function (sync or async), got {type(fn).__name__}")
        target.register(name or _own_name(fn), fn)
        return fn

    return decorate


def _own_name(fn: Any) -> str:
    """The name ``@worker()`` registers ``fn`` under: its ``__name__``, when that is a worker name."""
    own = getattr(fn, "__name__", None)
    if isinstance(own, str) and _NAME_RE.match(own):
        return own
    what = f"a {type(fn).__name__} object has no __name__" if own is None else \
        f"the function's name {own!r} is not a worker name" if isinstance(own, str) else \
        f"its __name__ is not a string but {type(own).__name__}"
    raise TypeError(f"@worker() cannot name this worker: {what}; give its name: @worker('payments.charge') "
                    f"({_NAME_RULE})")


class WorkerImportError(Exception):
    """A worker module could not be imported. ``found``: it was found (importing it raised); ``searched``: the
    directories it was looked for in (besides the rest of ``sys.path``); ``suggestion``: for a module that is
    nowhere, the module of a close name that is there (``travel_workers`` for ``travel_worker``), or None."""

    def __init__(self, module: str, reason: str, *, found: bool = True, searched: Sequence[str] = (),
                 origin: str | None = None, suggestion: str | None = None):
        where = f" (in {origin})" if origin else f" (searched {', '.join(searched)})" if not found and searched \
            else ""
        super().__init__(f"cannot import worker module '{module}'{did_you_mean_module(suggestion)}: {reason}{where}")
        self.module = module
        self.reason = reason
        self.found = found
        self.searched = list(searched)
        self.origin = origin
        self.suggestion = suggestion


def did_you_mean_module(suggestion: str | None) -> str:
    """`` (did you mean 'x'?)`` for :attr:`WorkerImportError.suggestion`, else ``""``."""
    return f" (did you mean '{suggestion}'?)" if suggestion else ""


def import_worker_modules(modules: Iterable[str], search_path: str | None = None,
                          also: Sequence[str | None] = (), *, suggest: bool = True) -> None:
    """Import each module so its ``@worker`` functions register.

    ``search_path`` (the current directory, or the project root), then the
    directories of ``also`` (the spec's directory), are put on ``sys.path``
    first, in that order, so spec-relative modules import; afterwards, a
    directory put there stays only if a module of ``modules`` was found in it
    (so that it can import its neighbours later, as a script's directory
    stays on ``sys.path``). No modules, or all of them imported already:
    ``sys.path`` is left alone (other threads see it: runs started by the
    thousand in a service import nothing after the first). Raises
    :class:`WorkerImportError` naming the first module that fails: the error
    its import raised (any ``BaseException`` — ``sys.exit()`` at import time
    too — but a real Ctrl-C, which propagates), or, when it is nowhere, the
    directories searched and (``suggest``) a module of a close name found there.
    """
    modules = [module for module in modules if module not in sys.modules]
    if not modules:
        return
    places = list(dict.fromkeys(p for p in (search_path, *also) if p))
    added = [place for place in places if place not in sys.path]
    for place in reversed(added):
        sys.path.insert(0, place)
    try:
        for module in modules:
            _import_one(module, places, suggest)
    finally:
        homes = _homes(modules)
        for place in added:
            if os.path.abspath(place) not in homes:
                with contextlib.suppress(ValueError):
                    sys.path.remove(place)


def _homes(modules: list[str]) -> set[str]:
    """The directories the (top-level packages of the) imported ``modules`` were found in."""
    homes: set[str] = set()
    for module in modules:
        top = sys.modules.get(module.partition(".")[0])
        if top is None:
            continue
        package = getattr(top, "__path__", None)
        if package is not None:  # a package (a namespace package has no __file__): its directories' parents
            homes.update(os.path.dirname(os.path.abspath(p)) for p in package if isinstance(p, str))
        elif isinstance(file := getattr(top, "__file__", None), str):
            homes.add(os.path.dirname(os.path.abspath(file)))
    return homes


def _import_one(module: str, places: list[str], suggest: bool) -> None:
    try:
        with marking_sigint():
            importlib.import_module(module)
    except BaseException as exc:  # any failure of user code at import time
        if from_sigint(exc):
            raise
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (module == missing or module.startswith(missing + ".")):
            close = _close_module(missing, places) if suggest else None
            raise WorkerImportError(module, describe_exception(exc), found=False, searched=places,
                                    suggestion=None if close is None else close + module[len(missing):]) from None
        raise WorkerImportError(module, describe_exception(exc), searched=places, origin=_origin_of(module)) from exc


#: entries of a directory looked at for a module name close to a missing one (a home directory can be large:
#: each name is compared with the missing one)
_MAX_ENTRIES = 2_000


def _close_module(missing: str, places: Sequence[str]) -> str | None:
    """A module name close to ``missing`` (a module that is nowhere) that can be imported: a ``*.py`` file or a
    package (a directory with an ``__init__.py``) in the directories searched — or, for a submodule
    (``pkg.sub``), in its package's directories. difflib's closest, at a ratio of 0.6 as every "did you mean"."""
    import difflib

    parent, _, leaf = missing.rpartition(".")
    if parent:
        package = sys.modules.get(parent)
        places = [p for p in getattr(package, "__path__", None) or () if isinstance(p, str)]
    names: set[str] = set()
    for place in places:
        try:
            names.update(_module_names(place, os.stat(place).st_mtime_ns))
        except OSError:  # a directory that cannot be read: nothing to suggest from it
            continue
    names.discard(leaf)
    close = difflib.get_close_matches(leaf, sorted(names), n=1, cutoff=0.6)
    return (f"{parent}.{close[0]}" if parent else close[0]) if close else None


@functools.lru_cache(maxsize=32)
def _module_names(place: str, stamp: int) -> frozenset[str]:
    """The modules in the directory ``place`` (its first :data:`_MAX_ENTRIES` entries), as of its modification
    time ``stamp`` (read once per version of the directory, however many modules are missing)."""
    names: set[str] = set()
    with os.scandir(place) as entries:
        for i, entry in enumerate(entries):
            if i >= _MAX_ENTRIES:
                break
            name, ext = os.path.splitext(entry.name)
            if ext == ".py" and name.isidentifier() and entry.is_file():
                names.add(name)
            elif not ext and entry.name.isidentifier() and entry.is_dir() and os.path.isfile(
                    os.path.join(entry.path, "__init__.py")):
                names.add(entry.name)
    return frozenset(names)


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception; never raises (an exception whose ``__str__`` fails included)."""
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


def signalled(exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """``exc`` marked as a real interrupt (:func:`from_sigint`): for a handler of another signal that stops what
    runs as Ctrl-C does (``flowdsl run``: SIGTERM, SIGHUP) to raise."""
    setattr(exc, _SIGNALLED, True)
    return exc


@contextlib.contextmanager
def marking_sigint() -> Iterator[None]:
    """While inside, the ``KeyboardInterrupt`` of a real Ctrl-C is marked as such (:func:`from_sigint`), so that
    user code raising ``KeyboardInterrupt`` itself (a worker, a worker module at import) can be told apart from
    the user pressing Ctrl-C: the first is that code's failure, the second stops what it interrupted.

    Wraps the current Python-level SIGINT handler; does nothing outside the main thread or when SIGINT is
    ignored, left to the system or handled by an event loop. The handler is restored on the way out. Uses that
    overlap without nesting (two runs in one loop: the first ends before the second) share one wrapper, which
    the last one out removes: wrappers never pile up over many runs.
    """
    current = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    handler: _MarkingHandler
    if isinstance(current, _MarkingHandler):
        handler = current
    elif not callable(current):
        yield
        return
    else:
        handler = _MarkingHandler(current)
        try:
            signal.signal(signal.SIGINT, handler)
        except (ValueError, OSError):  # not settable here after all
            yield
            return
    handler.users += 1
    try:
        yield
    finally:
        handler.users -= 1
        previous = handler.previous
        if handler.users == 0 and signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, sigint_to_restore(previous))


def sigint_to_restore(handler: Any) -> Any:
    """The SIGINT handler to put back where ``handler`` was taken: ``handler`` itself — unless it is the Ctrl-C
    handler of an ``asyncio.Runner`` (``asyncio.run()``) whose main task is done. Such a Runner puts Python's
    default back as its run ends, but only if its own handler is still there; a run that ends after it (a task
    cancelled as ``asyncio.run()`` closes) would otherwise leave the dead Runner's handler behind, and the next
    ``asyncio.run()`` would not take Ctrl-C."""
    func = getattr(handler, "func", None)
    owner = getattr(func, "__self__", None)
    if isinstance(handler, functools.partial) and getattr(func, "__name__", "") == "_on_sigint" \
            and type(owner).__module__ == "asyncio.runners":
        task = handler.keywords.get("main_task")
        if task is not None and task.done():
            return signal.default_int_handler
    return handler


class _MarkingHandler:
    __slots__ = ("previous", "users")

    def __init__(self, previous: Callable[[int, Any], Any]):
        self.previous = previous
        self.users = 0

    def __call__(self, signum: int, frame: Any) -> Any:
        try:
            return self.previous(signum, frame)
        except KeyboardInterrupt as exc:
            setattr(exc, _SIGNALLED, True)
            raise
