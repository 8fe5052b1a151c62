"""Workers for the fault tests: they keep a ledger of every execution and apply side effects idempotently.

Imported by ``flowdsl worker`` processes that the tests SIGKILL, SIGSTOP and
restart. The run input names the ledger directory (``ledger``); each execution
appends JSON lines to ``<ledger>/ledger.jsonl`` (one ``write`` of a short line
with O_APPEND: atomic between processes):

- ``{"ev": "begin", "key", "task", "pid", "t"}`` when the step starts;
- ``{"ev": "effect", "key", "task", "pid", "t", "applied"}`` when its side effect
  is made: ``applied`` is true only for the first effect under that idempotency
  key (the effect is a file created with O_EXCL, like a payment gateway that
  honours idempotency keys).

A test then checks that every step's effect was applied exactly once, that
every execution of a step used the same key, and that no step began again
after it was recorded as done.

Workers: ``fault.step`` (sleeps ``step_sleep`` seconds; fails attempt 1 of the
steps listed in ``flaky``), ``fault.slow_once`` (the first execution of a key
sleeps ``first_sleep`` seconds, later ones answer at once), ``fault.long``
(sleeps ``long_sleep`` seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from flowdsl.workers import StepContext, worker


class Flaky(Exception):
    """A transient failure of a first attempt (retried)."""


def _write(ledger: str, **line: Any) -> None:
    data = (json.dumps({**line, "pid": os.getpid(), "t": time.time()}) + "\n").encode()
    fd = os.open(os.path.join(ledger, "ledger.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _effect(ledger: str, ctx: StepContext, task: str) -> bool:
    name = ctx.idempotency_key.replace("/", "__")
    try:
        fd = os.open(os.path.join(ledger, "effects", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        applied = False
    else:
        os.close(fd)
        applied = True
    _write(ledger, ev="effect", key=ctx.idempotency_key, task=task, applied=applied)
    return applied


def first_execution(ledger: str, ctx: StepContext) -> bool:
    """Whether this is the first execution of the step's idempotency key (across processes: a marker file)."""
    marker = Path(ledger) / ("first-" + ctx.idempotency_key.replace("/", "__"))
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _task_id(ctx: StepContext) -> str:
    return f"{ctx.idempotency_key}#{ctx.attempt}"


@worker("fault.step")
async def step(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ledger = data["ledger"]
    _write(ledger, ev="begin", key=ctx.idempotency_key, task=_task_id(ctx))
    await asyncio.sleep(float(data.get("step_sleep", 0.2)))
    if ctx.step_id in (data.get("flaky") or []) and ctx.attempt == 1:
        raise Flaky(f"first attempt of {ctx.step_id} fails")
    _effect(ledger, ctx, _task_id(ctx))
    return {f"{ctx.step_id}_by": os.getpid()}


@worker("fault.slow_once")
async def slow_once(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ledger = data["ledger"]
    _write(ledger, ev="begin", key=ctx.idempotency_key, task=_task_id(ctx))
    if first_execution(ledger, ctx):
        await asyncio.sleep(float(data.get("first_sleep", 3.0)))
    _effect(ledger, ctx, _task_id(ctx))
    return {"by": os.getpid()}


@worker("fault.long")
async def long(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ledger = data["ledger"]
    _write(ledger, ev="begin", key=ctx.idempotency_key, task=_task_id(ctx))
    await asyncio.sleep(float(data.get("long_sleep", 2.0)))
    _effect(ledger, ctx, _task_id(ctx))
    return {"long_by": os.getpid()}


def read_ledger(ledger: str | Path) -> list[dict[str, Any]]:
    path = Path(ledger) / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_ledger(directory: Path) -> str:
    (directory / "effects").mkdir(parents=True, exist_ok=True)
    return str(directory)
