"""Carrying out one ``dispatch`` command: call the worker (or the model) and answer the kernel.

Stage: runtime (shared by every backend: the local asyncio runtime and the
Redis worker processes). Imports ``flowdsl.workers``, ``.codec`` and stdlib at import
time; ``flowdsl.llm`` (and through it DSPy) only when an LLM step runs. It
decides nothing about the run: no retries, no timeouts (the kernel's timers
enforce them), no ordering. A backend awaits :func:`execute` with a dispatch
command and feeds the input event it returns to the kernel, adding ``at``::

    event = await execute(command, lm=cli_lm)
    event["at"] = now_ms()
    decision = kernel.apply(plan, state, event)

What :func:`execute` does:

- kinds ``task``, ``compensate`` and ``fallback`` look up ``command["worker"]``
  in the registry and call it with a private copy of ``command["input"]`` and a
  :class:`~flowdsl.workers.StepContext`; async workers are awaited, sync ones
  run in a (daemon) thread so the event loop keeps going;
- kind ``fallback`` of an LLM step (its command carries the step's ``llm``
  block) gives the worker the step's checked signature inputs, as the model
  gets them, and checks its result against the signature's outputs;
- kind ``llm`` runs :func:`flowdsl.llm.run_llm_step` with the model chosen by
  :func:`flowdsl.llm.resolve_lm` (the step's ``lm``, then the caller's ``lm``,
  then the flow's ``defaults.llm.lm``, then ``$FLOWDSL_LM``; a name the caller
  binds in ``lms`` becomes that LM object) and masks the inputs the block's
  ``redact`` names; the prompt, the raw reply and the model
  go into the answer's ``meta`` as ``{"llm": {...}}``, which the kernel copies
  into the event it emits about that attempt (docs/kernel.md);
- an exception becomes ``task_failed`` with ``{"type": class name, "message":
  str(exc), "types": the class names of its MRO}`` (:func:`error_types`; plus a
  ``traceback`` field for the record; message and traceback made safe to write,
  see :func:`error_message`), and so does any
  other ``BaseException`` a worker raises: ``sys.exit()`` (type
  ``SystemExit``), ``KeyboardInterrupt``, ``GeneratorExit`` — all but a
  cancellation and the ``KeyboardInterrupt`` of a real Ctrl-C (see
  :func:`marking_sigint`), which propagate; a result that is not
  a JSON object (``None`` counts as ``{}``) becomes ``task_failed`` of type
  ``OutputInvalid``; a result that is one is answered as a plain copy
  (:func:`plain_json`), never as the object the worker returned;
- cancellation (``asyncio.CancelledError`` while the task running the attempt
  is being cancelled) propagates: the caller answers ``task_cancelled``. A
  ``CancelledError`` the worker raises itself, nothing cancelling it, is its
  failure (type ``CancelledError``). A sync worker cannot be interrupted:
  cancelling stops the wait, not the thread (see :func:`cancellable`), or,
  with :data:`wait_for_thread` set, not even the wait: the real answer comes.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import inspect
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from flowdsl.runtime.codec import dumps, loads
from flowdsl.workers import StepContext, StepLogger, Worker, WorkerRegistry, from_sigint, marking_sigint
from flowdsl.workers import registry as default_registry

__all__ = ["THREADS", "THREADS_ENV", "WORKER_KINDS", "WORKER_NOT_FOUND", "NotJSON", "cancellable", "copy_json",
           "error_message", "error_types", "execute", "json_problem", "marking_sigint", "missing_workers", "plain_json",
           "text_problem", "thread_limit", "wait_for_thread", "waiting_for_a_thread", "warm_llm", "worker_references"]

#: dispatch kinds that run a registered worker (``llm`` runs a model)
WORKER_KINDS = frozenset({"task", "compensate", "fallback"})
#: the error type of a dispatch whose worker is not registered in this process
WORKER_NOT_FOUND = "WorkerNotFound"
_TRACEBACK_LIMIT = 4000
#: characters of a worker's error message that are kept (:func:`error_message`)
MESSAGE_LIMIT = 16_000
_loggers: dict[str, logging.Logger] = {}


async def execute(command: Mapping[str, Any], *, registry: WorkerRegistry | None = None,
                  lm: object | str | None = None, env: Mapping[str, str] | None = None,
                  adapter: object | None = None, lms: Mapping[str, object] | None = None) -> dict[str, Any]:
    """Run one ``dispatch`` command; return the kernel input event that answers it (without ``at``).

    ``registry`` defaults to the process-wide one; ``lm`` is the caller's model
    (``--lm``: a model string, or a ``dspy.BaseLM`` for tests) and ``adapter``
    a DSPy adapter for LLM steps; ``lms`` maps model names to LM objects used
    instead of ``dspy.LM(name)``; ``env`` defaults to ``os.environ``. The event
    is ``task_succeeded`` (``result``) or ``task_failed`` (``error``), with
    ``meta: {"llm": {...}}`` for LLM steps that asked a model. Raises only
    ``asyncio.CancelledError``.
    """
    task_id = command["task_id"]
    try:
        if command["kind"] == "llm":
            return await _execute_llm(command, lm, env, adapter, lms)
        if command["kind"] == "fallback" and command.get("llm"):
            return await _execute_fallback(command, registry)
        call = _call(command, registry)
        if isinstance(call, dict):
            return call
        found, data, ctx = call
        result = await found.fn(data, ctx) if found.is_async else await _call_sync(found, data, ctx)
    except BaseException as exc:  # the worker's (or the model's) failure, whatever it is
        if not _is_failure(exc):
            raise
        return _failure_event(task_id, exc)
    return _answer(task_id, result)


async def _call_sync(found: Worker, data: Any, ctx: StepContext) -> Any:
    """Call a sync worker in a thread (and await what it returns, if that is awaitable)."""
    result = await _in_thread(found.fn, data, ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


def _call(command: Mapping[str, Any], registry: WorkerRegistry | None) -> tuple[Worker, Any, StepContext] | \
        dict[str, Any]:
    """The worker of a task/compensate/fallback dispatch with its arguments, or the failure event."""
    found = (registry or default_registry).get(command["worker"] or "")
    if found is None:
        return _failed(command["task_id"], WORKER_NOT_FOUND, f"no worker is registered under the name "
                       f"'{command['worker']}' in this process (are the spec's worker modules imported?)")
    logger = _logger(found.name)
    if _FAST_CONTEXT:
        ctx = _new(StepContext)
        fields = ctx.__dict__
        fields["run_id"], fields["step_id"], fields["attempt"], fields["idempotency_key"] = \
            command["run_id"], command["node"], command["attempt"], command["idempotency_key"]
        fields["compensating"] = command["kind"] == "compensate"
        fields["logger"] = StepLogger(logger, ctx)  # (what __post_init__ makes of a Logger)
    else:
        ctx = StepContext(command["run_id"], command["node"], command["attempt"], command["idempotency_key"],
                          command["kind"] == "compensate", logger)  # type: ignore[arg-type]  # (wrapped by it)
    return found, copy_json(command["input"]), ctx


#: a StepContext is filled in field by field (:func:`_call`): its frozen dataclass ``__init__`` (a setattr call per
#: field, then ``__post_init__``) was ~2 % of a Redis worker's instructions per step. Only while its fields are
#: these, in a ``__dict__`` (tests/redis/test_hot_path.py compares the two ways)
_FAST_CONTEXT = [f.name for f in dataclasses.fields(StepContext)] == ["run_id", "step_id", "attempt",
                                                                     "idempotency_key", "compensating", "logger"] \
    and "__slots__" not in vars(StepContext)
_new = object.__new__


def cancellable(command: Mapping[str, Any], registry: WorkerRegistry | None = None) -> bool:
    """Whether cancelling the coroutine of :func:`execute` stops the work itself.

    False for sync workers: their thread runs to its end whatever the caller
    does, so a runtime aborting a run should wait for their result (the step may
    have completed and need undoing) rather than report them cancelled.
    """
    if command["kind"] not in WORKER_KINDS:
        return True
    found = (registry or default_registry).get(command["worker"] or "")
    return found is None or found.is_async


def _answer(task_id: str, result: Any) -> dict[str, Any]:
    """The answer to a worker's result: a plain copy of it (:func:`plain_json`), never the object itself. A
    compensation's result is not used (the kernel reads none): whatever it returns — ``True``, ``"refunded"`` —
    it succeeded; checked, such an undo was judged failed, run again and left to a person."""
    if result is None or (not result and type(result) is dict) or ("#c" in task_id and _COMPENSATION.search(task_id)):
        return {"type": "task_succeeded", "task_id": task_id, "result": {}}
    if not isinstance(result, dict):
        return _failed(task_id, "OutputInvalid", f"the worker returned {type(result).__name__}, "
                       "expected a JSON object (a dict) or None")
    try:
        result = plain_json(result)
    except NotJSON as exc:
        return _failed(task_id, "OutputInvalid", f"the worker's result is not JSON: {exc}")
    return {"type": "task_succeeded", "task_id": task_id, "result": result}


#: the task id of a compensation's attempt: ``<run id>/<step>#c<n>``
_COMPENSATION = re.compile(r"#c[0-9]+\Z")


def _failed(task_id: str, type_: str, message: str) -> dict[str, Any]:
    return {"type": "task_failed", "task_id": task_id, "error": {"type": type_, "message": message}}


def _is_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of a worker's (or a model's) call, is that attempt's failure.

    Every exception is, and so is every other ``BaseException`` the worker raises itself: a worker calling
    ``sys.exit()`` or raising ``KeyboardInterrupt`` or ``GeneratorExit`` must end neither the run nor the
    worker process (on Redis, the step would then be taken over and end the next process too, one after the
    other). Not failures, and re-raised: a cancellation of the task running the attempt (a ``CancelledError``
    while that task is being cancelled — one the worker raises itself, nothing having cancelled it, is its
    failure), and the ``KeyboardInterrupt`` that a real Ctrl-C raised while the worker ran (marked by
    :func:`marking_sigint`): that one is the user's, and stops what it interrupted.
    """
    if isinstance(exc, asyncio.CancelledError):  # outside a task (a first step run by hand, or with no event
        try:  # loop running at all), no one cancelled it
            task = asyncio.current_task()
        except RuntimeError:
            return True
        return task is None or task.cancelling() == 0
    return not from_sigint(exc)


def _failure_event(task_id: str, exc: BaseException) -> dict[str, Any]:
    """The ``task_failed`` event of a worker's failure (:func:`_is_failure`)."""
    if isinstance(exc, _Raised):
        exc = exc.exc
    event = _exception_event(task_id, exc)
    if isinstance(exc, asyncio.CancelledError):  # the runtime's own cancellations are never failures
        said = event["error"]["message"]
        event["error"]["message"] = ("the worker raised CancelledError itself; the runtime did not cancel the "
                                     "attempt" + (f" ({said})" if said else ""))
    return event


def _exception_event(task_id: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SystemExit):
        message = _readable(lambda: f"the worker called sys.exit({exc.code!r})")
    else:
        message = error_message(exc)
    event = _failed(task_id, type(exc).__name__, message)
    event["error"]["types"] = error_types(exc)
    text = _readable(lambda: "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    event["traceback"] = text if len(text) <= _TRACEBACK_LIMIT else "…" + text[-_TRACEBACK_LIMIT:]
    return event


def error_message(exc: BaseException) -> str:
    """``str(exc)``, safe to record and print: a lone surrogate in it (a file name decoded with
    ``surrogateescape``) is written as its escape (``\\udcff``); when ``__str__`` itself fails, a note saying
    what that second failure was (its type alone when its own message cannot be read either). A message longer
    than :data:`MESSAGE_LIMIT` characters is cut there, saying how much was left out: it goes into every event,
    record and journal entry of the failure (a worker quoting a whole response body in it)."""
    text = _readable(lambda: str(exc))
    if len(text) <= MESSAGE_LIMIT:
        return text
    return f"{text[:MESSAGE_LIMIT]}… ({len(text) - MESSAGE_LIMIT} more characters left out)"


def _readable(make: Callable[[], str]) -> str:
    """What ``make()`` gives (:func:`_safe`), or a note of why it could not be read."""
    try:
        return _safe(make())
    except BaseException as broken:  # whatever a hostile __str__/__repr__ raises, except a real Ctrl-C
        if from_sigint(broken):
            raise
        failure = broken
    try:  # the second failure's own message, read once: its __str__ may fail too
        said = _safe(str(failure))
    except BaseException as again:
        if from_sigint(again):
            raise
        said = ""
    return f"(its message could not be read: {type(failure).__name__}{': ' + said if said else ''})"


def _safe(text: str) -> str:
    """``text`` as a plain ``str`` that encodes as UTF-8: each lone surrogate becomes its escape, ``\\udcff``."""
    if type(text) is not str:
        text = str.__str__(text)
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_types(exc: BaseException) -> list[str]:
    """The error record's ``types``: the class names of ``exc``'s class and its bases, in method resolution
    order, up to but without ``BaseException`` and ``object`` (each name once) — what retry filters match, so
    that ``on: [ConnectionError]`` covers ``ConnectionRefusedError`` as ``except ConnectionError`` would."""
    return list(dict.fromkeys(cls.__name__ for cls in type(exc).__mro__ if cls not in (BaseException, object)))


def _logger(worker_name: str) -> logging.Logger:
    found = _loggers.get(worker_name)
    if found is None:
        found = _loggers[worker_name] = logging.getLogger(f"flowdsl.worker.{worker_name}")
    return found


# --- LLM steps ------------------------------------------------------------------


async def _execute_llm(command: Mapping[str, Any], lm: object | str | None, env: Mapping[str, str] | None,
                       adapter: object | None, lms: Mapping[str, object] | None) -> dict[str, Any]:
    from flowdsl.llm import InputInvalid, LLMNotConfigured, OutputInvalid, redact_text, run_llm_step

    block = command["llm"] or {}
    model = _model_of(block, lm, env, lms)
    data = command["input"] if isinstance(command["input"], dict) else {}
    task_id = command["task_id"]
    try:
        result = await run_llm_step(block, data, lm=model, step_key=command["step"], adapter=adapter,
                                    redact=block.get("redact") or ())
    except BaseException as exc:  # as for a worker: the attempt failed with this error type
        if not _is_failure(exc):
            raise
        event = _failure_event(task_id, exc)
        redact = block.get("redact") or ()
        if redact:  # a provider's message (and the traceback quoting it) may echo what the step sent
            event["error"]["message"] = redact_text(event["error"]["message"], data, redact, block)
            event["traceback"] = redact_text(event["traceback"], data, redact, block)
        name = model if isinstance(model, str) else getattr(model, "model", None)
        name = name if isinstance(name, str) else None
        if isinstance(exc, OutputInvalid):
            event["meta"] = {"llm": {"prompt": exc.prompt, "raw": exc.raw, "field": exc.field, "model": name}}
        elif not isinstance(exc, LLMNotConfigured | InputInvalid):  # the provider failed: say which model
            event["meta"] = {"llm": {"model": name}}
        return event
    meta = {"llm": {"prompt": result.prompt, "raw": result.raw, "reasoning": result.reasoning,
                    "model": result.model}}
    try:
        outputs = plain_json(result.outputs)
    except NotJSON as exc:  # (a value the signature's rules let through that JSON cannot hold)
        event = _failed(task_id, "OutputInvalid", f"LLM step '{command['step']}': the model's answer is "
                        f"malformed: {exc}")
        event["meta"] = meta
        return event
    return {"type": "task_succeeded", "task_id": task_id, "result": outputs, "meta": meta}


def _model_of(block: Mapping[str, Any], lm: object | str | None, env: Mapping[str, str] | None,
              lms: Mapping[str, object] | None) -> object | str | None:
    """The model an LLM step's block asks: a model string, an LM object, or None (none configured)."""
    from flowdsl.llm import resolve_lm

    step_lm = block.get("lm")
    if isinstance(step_lm, str) and step_lm.strip():
        model: object | str | None = step_lm.strip()
    elif lm is not None and not isinstance(lm, str):
        model = lm  # an LM object handed to the runtime (tests, notebooks)
    else:
        model = resolve_lm(None, block.get("default_lm"), lm, os.environ if env is None else env)
    if lms and isinstance(model, str) and model in lms:
        model = lms[model]  # a name the caller binds to an LM object of its own (a custom engine)
    return model


async def warm_llm(plan: Mapping[str, Any], *, lm: object | str | None = None, env: Mapping[str, str] | None = None,
                   lms: Mapping[str, object] | None = None, notice: Callable[[str], None] | None = None) -> None:
    """Before a run starts: import DSPy and check the model strings its LLM steps will use (each once per
    process), as their first attempts would — so that an attempt's ``timeout`` measures the model's call, not
    the ~1.5 s import of DSPy (and LiteLLM's, for a string only it can route). Does nothing when the plan has no
    LLM step that would ask a model by name; never raises: what fails here fails the step's attempt, as before.
    ``notice`` is told when this is about to take a while (DSPy not imported yet)."""
    from flowdsl.llm import prepare_models

    models = {model for node in plan["nodes"].values() if node.get("llm")
              for model in (_model_of(node["llm"], lm, env, lms),) if isinstance(model, str)}
    if not models:
        return
    if notice is not None and "dspy" not in sys.modules:
        notice("loading DSPy for the LLM steps before the run starts (a few seconds, once per process)")
    await prepare_models(sorted(models))


async def _execute_fallback(command: Mapping[str, Any], registry: WorkerRegistry | None) -> dict[str, Any]:
    """The fallback worker of an LLM step: given the model's inputs, its result checked like an answer.

    The worker gets exactly the signature's input fields, checked and converted
    as the model gets them (:func:`flowdsl.llm.step_inputs`); its result must give
    every output field a value of its type and nothing else
    (:func:`flowdsl.llm.check_fallback_result`), else the attempt fails with
    ``InputInvalid`` or ``OutputInvalid``.
    """
    from flowdsl.llm import check_fallback_result, step_inputs

    block = command["llm"]
    redact = block.get("redact") or ()
    data = command["input"] if isinstance(command["input"], dict) else {}
    values = step_inputs(block, data, step_key=command["step"], redact=redact)
    call = _call({**command, "input": values}, registry)
    if isinstance(call, dict):
        return call
    found, arg, ctx = call
    result = await found.fn(arg, ctx) if found.is_async else await _call_sync(found, arg, ctx)
    if isinstance(result, dict) and json_problem(result) is not None:
        return _answer(command["task_id"], result)  # not JSON: the worker's mistake, said as for any worker
    outputs = check_fallback_result(block, result, worker=found.name, step_key=command["step"], inputs=data,
                                    redact=redact)
    return _answer(command["task_id"], outputs)


# --- JSON data --------------------------------------------------------------------


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars): a worker may mutate its input freely.

    Small containers are copied in Python (cheapest for the usual small input); a large one goes through
    the JSON codec, in C, several times faster than a walk in Python — which matters because a step's
    input is its whole context (inside a for_each over n items, the n items)."""
    if isinstance(value, dict):
        if len(value) > _SMALL:
            return _bulk_copy(value)
        return {k: copy_json(v) if isinstance(v, dict | list) else v for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > _SMALL:
            return _bulk_copy(value)
        return [copy_json(v) if isinstance(v, dict | list) else v for v in value]
    return value


def _bulk_copy(value: Any) -> Any:
    """A large container through the codec, the cyclic garbage collector paused (as in :func:`plain_json`):
    decoding 300,000 rows would otherwise set off full collections that cost several times the copy."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return loads(dumps(value))
    finally:
        if paused:
            gc.enable()


_SMALL = 16  # entries up to which copy_json copies a container in Python


#: how deep data passed to and from workers may nest (the run input, results): deeper data is refused, so
#: that every copy, encoding and record of it stays well inside the encoders' and interpreter's bounds
MAX_JSON_DEPTH = 200


def json_problem(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Where and why ``value`` is not plain JSON data (None when it is).

    Accepted: dicts with string keys, lists, strings (valid Unicode: no lone
    surrogates), booleans, None, ints (of at most the digits Python converts to text:
    ``sys.get_int_max_str_digits()``, 4,300 by default) and finite floats, nested at most
    :data:`MAX_JSON_DEPTH` levels — what survives
    a JSON round trip unchanged, so that a recorded run replays to the same
    state and the Redis runtime can store it.
    """
    if isinstance(value, dict | list) and depth >= MAX_JSON_DEPTH:
        shown = "/".join(path.split("/")[:6])
        return f"at {shown}/…: the data nests deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"at {path or '/'}: the key {k!r} is not a string"
            if not k.isascii() and text_problem(k) is not None:
                return f"at {path or '/'}: the key {k!r} {text_problem(k)}"
            if type(v) is str:
                if not v.isascii() and text_problem(v) is not None:
                    return f"at {path}/{k}: the text {text_problem(v)}"
            elif not (v is None or (type(v) in _SCALARS and -_LONG < v < _LONG)):
                problem = json_problem(v, f"{path}/{k}", depth + 1)
                if problem is not None:
                    return problem
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            if type(v) is str:
                if not v.isascii() and text_problem(v) is not None:
                    return f"at {path}/{i}: the text {text_problem(v)}"
            elif not (v is None or (type(v) in _SCALARS and -_LONG < v < _LONG)):
                problem = json_problem(v, f"{path}/{i}", depth + 1)
                if problem is not None:
                    return problem
        return None
    if isinstance(value, str):
        problem = None if value.isascii() else text_problem(value)
        return None if problem is None else f"at {path or '/'}: the text {problem}"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        if _int_fits(value):
            return None
        return (f"at {path or '/'}: the integer has more than {sys.get_int_max_str_digits()} digits, more than "
                "Python converts to text (sys.set_int_max_str_digits); pass such a number as a string")
    if isinstance(value, float):
        return None if math.isfinite(value) else f"at {path or '/'}: {value} is not a JSON number"
    return f"at {path or '/'}: a {type(value).__name__} is not JSON (use dicts, lists, strings, numbers, booleans)"


_SCALARS = frozenset({int, bool})
#: ints closer to zero than this are short enough for any int-str limit (which is 640 digits at least)
_LONG = 1 << 2000


def _int_fits(value: int) -> bool:
    """Whether ``value`` can be written as JSON text and read back: Python refuses to convert ints of more than
    ``sys.get_int_max_str_digits()`` digits to text (and back), and the JSON codecs with it."""
    if -_LONG < value < _LONG:
        return True
    try:
        int.__repr__(value)
    except ValueError:
        return False
    return True


class NotJSON(ValueError):
    """Raised by :func:`plain_json`: the message says where and why the data is not JSON (as :func:`json_problem`)."""


def plain_json(value: Any) -> Any:
    """A deep copy of ``value`` made of plain JSON types, checked as :func:`json_problem` checks it — one walk.

    What a worker returns (and the run input) is kept this way: nothing the caller holds on to — a cached
    object it returned, a shared constant — is shared with the run, so changing it later changes neither the
    run's context nor what its record replays to. Subclasses become their plain type (a ``str`` enum or
    another ``str`` subclass a ``str``, an ``IntEnum`` an ``int``, an ``OrderedDict`` a ``dict``…), so the
    context holds plain JSON types only, whatever its size. Raises :class:`NotJSON` when ``value`` is not JSON.

    The cyclic garbage collector is paused meanwhile: a copy allocates only acyclic containers, and a large
    one (300,000 rows) would otherwise set off full collections that cost as much as the copy itself.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _plain(value, 0)
    except _NotPlain:
        pass
    finally:
        if paused:
            gc.enable()
    raise NotJSON(json_problem(value) or f"a {type(value).__name__} is not JSON")


class _NotPlain(Exception):
    """Inside :func:`plain_json`'s walk: not JSON (why and where is said afterwards, by :func:`json_problem`)."""


def _plain(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is dict:
        return _plain_dict(value, depth)
    if kind is list:
        return _plain_list(value, depth)
    if kind is str:
        if not value.isascii() and text_problem(value) is not None:
            raise _NotPlain
        return value
    if value is None or kind is bool or (kind is int and -_LONG < value < _LONG):
        return value
    return _plain_other(value, depth)


def _plain_dict(value: dict[Any, Any], depth: int) -> dict[str, Any]:
    if depth >= MAX_JSON_DEPTH:
        raise _NotPlain
    out = {}
    for k, v in value.items():
        if type(k) is not str:
            if not isinstance(k, str):
                raise _NotPlain
            k = str.__str__(k)
        if not k.isascii() and text_problem(k) is not None:
            raise _NotPlain
        out[k] = v if type(v) is str and v.isascii() else _plain(v, depth + 1)  # (the common case inline)
    return out


def _plain_list(value: list[Any], depth: int) -> list[Any]:
    if depth >= MAX_JSON_DEPTH:
        raise _NotPlain
    return [v if type(v) is str and v.isascii() else _plain(v, depth + 1) for v in value]


def _plain_other(value: Any, depth: int) -> Any:
    """A float, or a subclass of a JSON type, as its plain type."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotPlain
        return value if type(value) is float else float.__float__(value)
    if isinstance(value, str):
        return _plain(str.__str__(value), depth)
    if isinstance(value, int):  # bool has no subclasses: an int subclass (IntEnum, IntFlag) is a number
        value = int.__int__(value)
        if not _int_fits(value):  # too long to write as text
            raise _NotPlain
        return value
    if isinstance(value, dict):
        return _plain_dict(value, depth)
    if isinstance(value, list):
        return _plain_list(value, depth)
    raise _NotPlain


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (None when it can): it holds a lone surrogate — an undecodable
    byte smuggled in by ``surrogateescape`` (command-line arguments, file names) or a ``\\ud800`` JSON escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {exc.start + 1})"
        return f"holds a lone surrogate (\\u{code:04x} at character {exc.start + 1}), which is not valid Unicode"
    return None


# --- checking a plan's workers -----------------------------------------------------


def worker_references(plan: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(node key, role, worker name)`` for every worker a plan names: step, fallback, compensation."""
    for key, node in plan["nodes"].items():
        if node["kind"] == "task" and node.get("worker"):
            yield key, "step", node["worker"]
        if node.get("fallback"):
            yield key, "fallback", node["fallback"]
        if node.get("compensate"):
            yield key, "compensation", node["compensate"]["worker"]


def missing_workers(plan: Mapping[str, Any], registry: WorkerRegistry | None = None) -> list[str]:
    """One line per worker the plan names that is not registered (empty when all are)."""
    reg = registry or default_registry
    return [f"step '{key}' names the worker '{name}', which is not registered" if role == "step" else
            f"{role} '{name}' of step '{key}' is not a registered worker"
            for key, role, name in worker_references(plan) if name not in reg]


# --- sync workers ------------------------------------------------------------------


#: the environment variable that sets how many worker threads a process may have (:data:`THREADS` by default)
THREADS_ENV = "FLOWDSL_THREADS"
#: worker threads a process may have by default; ``$FLOWDSL_THREADS`` sets another number (1 to :data:`MAX_THREADS`)
THREADS = 256
MAX_THREADS = 10_000
#: seconds between two warnings that every worker thread is busy
_SATURATED_SAID_EVERY = 60.0
_pool_log = logging.getLogger("flowdsl.threads")


def thread_limit(env: Mapping[str, str] | None = None) -> int:
    """How many worker threads a process may have: ``$FLOWDSL_THREADS``, else :data:`THREADS`. A value that is not
    a whole number from 1 to :data:`MAX_THREADS` is a ``ValueError`` saying so."""
    text = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
    if not text:
        return THREADS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_THREADS:
        raise ValueError(f"{THREADS_ENV} must be a whole number from 1 to {MAX_THREADS} (how many threads sync "
                         f"workers may use at once in this process); got {text[:40]!r}")
    return limit


class _DaemonThreads:
    """A thread pool of daemon threads, growing on demand up to ``limit`` (None: :func:`thread_limit`, read when the
    first thread starts).

    Unlike ``asyncio.to_thread`` (the loop's default executor, joined at exit),
    a sync worker stuck in a thread after its attempt timed out or its run was
    cancelled cannot keep the process from exiting. It keeps its thread, though: the pool counts those
    (:meth:`given_up`) to say why a job waits (:meth:`busy`), and warns on ``flowdsl.threads`` when every thread
    is busy and a job has to wait (at most once a minute).
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._pending = 0
        self._given_up: set[Future[Any]] = set()  # running jobs whose caller gave up on them
        self._said_at: float | None = None

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self.limit is None:
                try:
                    self.limit = thread_limit()
                except ValueError as exc:
                    self.limit = THREADS
                    _pool_log.warning("%s; using %d", exc, THREADS)
            self._pending += 1
            full = self._pending > self._idle and self._threads >= self.limit
            if self._pending > self._idle and not full:
                self._threads += 1
                threading.Thread(target=self._serve, name=f"flowdsl-worker-{self._threads}", daemon=True).start()
            self._jobs.put((future, call))
            now = time.monotonic()
            say = full and (self._said_at is None or now - self._said_at >= _SATURATED_SAID_EVERY)
            if say:
                self._said_at = now
            waiting, given_up = self._pending - self._idle, len(self._given_up)
        if say:
            _pool_log.warning(
                "all %d worker threads of this process are busy (%d of them with attempts that timed out or were "
                "cancelled and cannot be stopped); %d sync worker call(s) wait for a free thread, and a step whose "
                "timeout passes meanwhile fails without being called — set %s to allow more threads, bound a "
                "for_each with concurrency, or make the workers async", self.limit, given_up, waiting, THREADS_ENV)
        return future

    def given_up(self, future: Future[Any]) -> None:
        """The caller of the running job ``future`` gave up on it (its attempt timed out, its run ended): it holds
        its thread until it returns."""
        with self._lock:
            if not future.done():
                self._given_up.add(future)

    def busy(self) -> tuple[int, int, int]:
        """``(limit, busy threads, busy with jobs given up on)``, now."""
        with self._lock:
            return self.limit or THREADS, self._threads - self._idle, len(self._given_up)

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, call = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting coroutine, whatever it is
                future.set_exception(_Raised(exc) if isinstance(exc, StopIteration | GeneratorExit) else exc)
            else:
                future.set_result(result)
            with self._lock:  # (after: given_up() does not count a job that is done)
                self._given_up.discard(future)


def waiting_for_a_thread(timeout_ms: Any) -> str:
    """Why an attempt whose timeout (``timeout_ms``) passed while it waited for a free worker thread was never
    called: the message of its ``StepTimeout``."""
    limit, busy, given_up = _threads.busy()
    held = f", {given_up} of them with attempts that timed out or were cancelled and cannot be stopped" \
        if given_up else ""
    return (f"the attempt was never called: it waited for a free worker thread until its timeout ({timeout_ms} ms) "
            f"passed — {'all' if busy >= limit else busy} of this process's {limit} worker threads were busy"
            f"{held} (${THREADS_ENV} sets how many there may be)")


class _Raised(Exception):
    """A ``StopIteration`` or ``GeneratorExit`` a sync worker raised, on its way out of the thread, wrapped:
    asyncio cannot set a ``StopIteration`` on a future (nor may it leave a coroutine), and a ``GeneratorExit``
    thrown into the awaiting task closes its coroutines instead (their answer is lost, the task dies without
    one); :func:`_failure_event` unwraps it."""

    def __init__(self, exc: BaseException):
        super().__init__(exc)
        self.exc = exc


_threads = _DaemonThreads()  # (its limit read when its first thread starts)


#: Set, in the task awaiting :func:`execute`, to a callable saying whether that task, cancelled while a sync worker's
#: thread runs, goes on waiting for the thread and returns its real answer (a runtime that feeds late answers to the
#: kernel while its run is live) instead of raising ``CancelledError``; asked at each cancel. Unset: a cancel stops
#: the wait. Either way, an attempt cancelled while it still waits for a free thread is never called. When the
#: callable has a ``thread_submitted`` method, it is handed the job's ``concurrent.futures.Future`` as the job is
#: queued (its ``running()``/``done()`` then say whether the worker was called).
wait_for_thread: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "flowdsl_wait_for_thread", default=None)


async def _in_thread(fn: Callable[..., Any], data: Any, ctx: StepContext) -> Any:
    context = contextvars.copy_context()
    context.run(wait_for_thread.set, None)  # the runtime's, for this wait: not the worker's own calls
    future = _threads.submit(lambda: context.run(fn, data, ctx))
    submitted = getattr(wait_for_thread.get(), "thread_submitted", None)
    if submitted is not None:
        submitted(future)
    while True:
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling() == 0:
                raise  # the worker raised it itself: its failure (_is_failure)
            wait = wait_for_thread.get()
            if future.cancel():  # it had not started: it never will
                raise
            _threads.given_up(future)  # it runs on, holding its thread, whether or not it is waited for
            if wait is None or not wait():
                raise
            task.uncancel()  # this cancel is handled: the task is no longer being cancelled

