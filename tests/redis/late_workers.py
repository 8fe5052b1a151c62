"""Workers for the late-completion test (tests/redis/test_late_completion.py), in the ledger of
``tests.redis.fault_workers``.

``late.charge``: the first execution of an idempotency key blocks its process's thread until the file
``data["go"]`` exists (at most ``first_block`` seconds): a call into a payment gateway — a process paused there
finishes it, effect and all, the moment it resumes, before its event loop sees anything else. The test creates the
file just before it resumes the process, so the call cannot end before the process is paused, however slowly the
test gets to pausing it. Later executions wait ``later_sleep`` seconds, cancellably, then make the effect.
``late.refund`` records that it ran; ``late.fail`` fails after ``fail_after`` seconds — or, given ``fail_when``,
once that file exists (at most ``fail_after`` seconds, 30 by default), so that a test fails it when it is ready.

``late.charge_held``: as ``late.charge``, but a later execution that is cancelled does not stop at once: it
writes ``{"ev": "hold"}`` and keeps its task (answering nothing) until the file ``data["release"]`` exists (at
most ``hold_max`` seconds), then stops — a taker still holding the task while the run is being cancelled.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from flowdsl.workers import StepContext, worker
from tests.redis.fault_workers import _effect, _task_id, _write, first_execution


def _block_until_go(data: dict[str, Any]) -> None:
    """Block the whole process (on purpose: no event loop turn, no heartbeat) until ``data["go"]`` exists."""
    deadline = time.monotonic() + float(data.get("first_block", 60.0))
    while not os.path.exists(data["go"]) and time.monotonic() < deadline:
        time.sleep(0.01)


@worker("late.charge")
async def charge(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ledger = data["ledger"]
    _write(ledger, ev="begin", key=ctx.idempotency_key, task=_task_id(ctx))
    if first_execution(ledger, ctx):
        _block_until_go(data)
    else:
        await asyncio.sleep(float(data.get("later_sleep", 30.0)))
    _effect(ledger, ctx, _task_id(ctx))
    return {"charge_id": f"ch-{os.getpid()}"}


@worker("late.charge_held")
async def charge_held(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    ledger = data["ledger"]
    _write(ledger, ev="begin", key=ctx.idempotency_key, task=_task_id(ctx))
    if first_execution(ledger, ctx):
        _block_until_go(data)
    else:
        try:
            await asyncio.sleep(float(data.get("later_sleep", 30.0)))
        except asyncio.CancelledError:
            _write(ledger, ev="hold", key=ctx.idempotency_key, task=_task_id(ctx))
            deadline = time.monotonic() + float(data.get("hold_max", 30.0))
            while not os.path.exists(data["release"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            raise
    _effect(ledger, ctx, _task_id(ctx))
    return {"charge_id": f"ch-{os.getpid()}"}


@worker("late.refund")
async def refund(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _write(data["ledger"], ev="undo", key=ctx.idempotency_key, task=_task_id(ctx))
    return {}


@worker("late.fail")
async def fail(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if "fail_when" in data:
        deadline = time.monotonic() + float(data.get("fail_after", 30.0))
        while not os.path.exists(data["fail_when"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    else:
        await asyncio.sleep(float(data.get("fail_after", 2.0)))
    raise RuntimeError("out of stock")
