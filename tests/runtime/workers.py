"""Scripted workers for the runtime tests and the conformance suite.

Importable by every runtime (the Redis one runs them in other processes), so
their behaviour travels in the run input, never in process state: the input's
``script`` maps an instance key (``a``, ``fe[1]/e``), or a node key, plus a
role suffix (``/compensate``, ``/fallback``) to an outcome, or to a list of
outcomes, one per attempt (the last one repeats). An outcome is a mapping:

- ``sleep``: seconds to wait first (``time.sleep`` in the sync workers);
- ``hang``: wait (practically) forever — until cancelled;
- ``raise``: an error type; the worker raises an exception of a class by that
  name (with ``message``);
- ``result``: the object to return (default ``{}``); ``return``: any value to
  return as it is (to test ``OutputInvalid``);
- ``stamp``: also return ``{"<id>_t0": start, "<id>_t1": end}`` (perf_counter
  seconds) to show overlapping execution;
- ``mark``: a path; the worker creates that file as it is called (a test waits
  for it to know that the worker runs), before anything else but
- ``after``: a path; the worker first waits until that file exists (another
  worker's ``mark``: this one goes on only once that one runs; at most 30 s,
  then it raises ``NeverMarked``);
- ``log``: a path; the worker appends a JSON line ``{role, key, attempt, pid}``
  (its idempotency key, attempt number and process) as it is called, after
  ``mark`` — the calls that survive a process killed (``flowdsl resume``);
- ``hang_unless``: a path; the worker hangs (as ``hang``) unless that file
  exists when it is called.

Workers are registered for the ids in :data:`IDS` under four prefixes, so a
spec writes ``- conf.a`` (id ``a``) with ``compensate: undo.a`` and
``fallback: fallback.a``; ``sync.a`` is the same worker as a sync function.
``PROBE`` lists, in this process only, the attempts that saw their
cancellation (the local runtime's tests read it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowdsl.workers import StepContext, registry

IDS = ("a", "b", "c", "d", "e", "f", "g", "p", "q", "r", "s", "u", "v", "w", "x", "y", "z")
#: (role, instance key) of every attempt that was cancelled while it ran, in this process
PROBE: list[tuple[str, str]] = []
_ERRORS: dict[str, type[Exception]] = {}
_FOREVER = 3600.0


def error_class(name: str) -> type[Exception]:
    """An exception class named ``name`` (the error type the runtime records)."""
    found = _ERRORS.get(name)
    if found is None:
        found = _ERRORS[name] = type(name, (Exception,), {})
    return found


def instance_key(ctx: StepContext) -> str:
    """The step's instance key, from its idempotency key ``<run id>/<instance key>[/compensate]``."""
    key = ctx.idempotency_key.split("/", 1)[1]
    return key.removesuffix("/compensate")


def outcome(data: dict[str, Any], ctx: StepContext, role: str) -> dict[str, Any]:
    script = data.get("script") or {}
    suffix = "" if role == "step" else f"/{role}"
    for key in (instance_key(ctx) + suffix, ctx.step_id + suffix):
        if key in script:
            found = script[key]
            if isinstance(found, list):
                found = found[min(ctx.attempt, len(found)) - 1]
            return dict(found)
    return {}


def _may_go(plan: dict[str, Any], t0: float) -> bool:
    """Whether the ``after`` file exists (or there is none); after 30 s without it, an error."""
    if "after" not in plan or Path(plan["after"]).exists():
        return True
    if time.perf_counter() - t0 > 30:
        raise error_class("NeverMarked")(f"{plan['after']} was not created within 30 s")
    return False


def _called(plan: dict[str, Any], ctx: StepContext, role: str) -> None:
    if "mark" in plan:
        Path(plan["mark"]).touch()
    if "log" in plan:
        with open(plan["log"], "a") as fh:
            fh.write(json.dumps({"role": role, "key": ctx.idempotency_key, "attempt": ctx.attempt,
                                 "pid": os.getpid()}) + "\n")
    if "hang_unless" in plan and not Path(plan["hang_unless"]).exists():
        plan["hang"] = True


def _answer(plan: dict[str, Any], ctx: StepContext, t0: float) -> Any:
    if "raise" in plan:
        raise error_class(plan["raise"])(plan.get("message", f"{plan['raise']} in {instance_key(ctx)}"))
    if "return" in plan:
        return plan["return"]
    result = dict(plan.get("result") or {})
    if plan.get("stamp"):
        key = instance_key(ctx).replace("/", "_")
        result.update({f"{key}_t0": t0, f"{key}_t1": time.perf_counter()})
    return result


def _async_worker(role: str) -> Callable[..., Any]:
    async def work(data: dict[str, Any], ctx: StepContext) -> Any:
        plan = outcome(data, ctx, role)
        t0 = time.perf_counter()
        try:
            while not _may_go(plan, t0):
                await asyncio.sleep(0.005)
            _called(plan, ctx, role)
            if plan.get("hang"):
                await asyncio.sleep(_FOREVER)
            elif plan.get("sleep"):
                await asyncio.sleep(float(plan["sleep"]))
        except asyncio.CancelledError:
            PROBE.append((role, instance_key(ctx)))
            raise
        return _answer(plan, ctx, t0)

    return work


def _sync_worker(role: str) -> Callable[..., Any]:
    def work(data: dict[str, Any], ctx: StepContext) -> Any:
        plan = outcome(data, ctx, role)
        t0 = time.perf_counter()
        while not _may_go(plan, t0):
            time.sleep(0.005)
        _called(plan, ctx, role)
        if plan.get("hang"):
            time.sleep(_FOREVER)
        elif plan.get("sleep"):
            time.sleep(float(plan["sleep"]))
        return _answer(plan, ctx, t0)

    return work


for _id in IDS:
    registry.register(f"conf.{_id}", _async_worker("step"))
    registry.register(f"sync.{_id}", _sync_worker("step"))
    registry.register(f"undo.{_id}", _async_worker("compensate"))
    registry.register(f"fallback.{_id}", _async_worker("fallback"))
