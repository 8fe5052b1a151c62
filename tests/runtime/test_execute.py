"""Carrying out a dispatch: what ``execute`` answers, whatever the worker does."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Any

import pytest

from flowdsl.runtime.execute import WORKER_NOT_FOUND, execute
from flowdsl.workers import StepContext, WorkerRegistry

REG = WorkerRegistry()
SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="outside")


async def quick(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    SEEN.set("inside")  # a worker's context changes stay in its own copy, as in a task
    data["mutated"] = True  # its input is a private copy, nested data included
    data["lines"][0]["qty"] += 1
    data["lines"].append({"qty": 0})
    return {"echo": data["x"], "key": ctx.idempotency_key, "compensating": ctx.compensating}


async def slow(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    SEEN.set("inside")
    await asyncio.sleep(0.01)
    return {"after": SEEN.get()}


async def broken(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    raise KeyError("sku")


async def not_an_object(data: dict[str, Any], ctx: StepContext) -> Any:
    return [1, 2]


def blocking(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"sync": True}


async def too_deep(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    result: dict[str, Any] = {}
    inner = result
    for _ in range(5000):
        inner["x"] = inner = {}
    return result


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message here")


async def unprintable(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    raise Unprintable()


async def exits(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    sys.exit(3)


def exits_in_a_thread(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    sys.exit("bye")


for name, fn in {"quick": quick, "slow": slow, "broken": broken, "not_an_object": not_an_object,
                 "blocking": blocking, "too_deep": too_deep, "unprintable": unprintable, "exits": exits,
                 "exits_in_a_thread": exits_in_a_thread}.items():
    REG.register(name, fn)


def command(worker: str, kind: str = "task") -> dict[str, Any]:
    return {"op": "dispatch", "run_id": "r", "task_id": f"r/{worker}#1", "kind": kind, "step": worker,
            "node": worker, "worker": worker, "input": {"x": 7, "lines": [{"qty": 2**70 + 1}]}, "attempt": 1,
            "idempotency_key": f"r/{worker}", "timeout_ms": None, "llm": None}


def answer(cmd: dict[str, Any]) -> dict[str, Any]:
    """The answer of ``execute`` for one command, run in a task of its own as the runtimes run it."""
    async def go() -> dict[str, Any]:
        answered = await asyncio.get_running_loop().create_task(execute(cmd, registry=REG))
        assert SEEN.get() == "outside"  # the worker's context changes stayed in its task's copy
        return answered

    return asyncio.run(go())


@pytest.mark.parametrize("worker,kind", [("quick", "task"), ("quick", "compensate"), ("slow", "task"),
                                         ("broken", "task"), ("not_an_object", "fallback"), ("missing", "task")])
def test_a_worker_gets_a_private_copy_of_its_input(worker: str, kind: str) -> None:
    cmd = command(worker, kind)
    answer(cmd)
    assert cmd["input"] == {"x": 7, "lines": [{"qty": 2**70 + 1}]}


def test_what_each_worker_answers() -> None:
    assert answer(command("quick", "compensate")) == {
        "type": "task_succeeded", "task_id": "r/quick#1",
        "result": {"echo": 7, "key": "r/quick", "compensating": True}}
    assert answer(command("slow"))["result"] == {"after": "inside"}
    assert answer(command("broken"))["error"] == {"type": "KeyError", "message": "'sku'",
                                                   "types": ["KeyError", "LookupError", "Exception"]}
    assert answer(command("not_an_object"))["error"]["type"] == "OutputInvalid"
    assert answer(command("missing"))["error"]["type"] == WORKER_NOT_FOUND
    deep = answer(command("too_deep"))["error"]  # refused, not copied, encoded or recorded out of bounds
    assert deep == {"type": "OutputInvalid", "message": "the worker's result is not JSON: at /x/x/x/x/x/…: "
                                                        "the data nests deeper than 200 levels"}
    assert answer(command("unprintable"))["error"] == {  # the step fails, the run goes on
        "type": "Unprintable", "message": "(its message could not be read: RuntimeError: no message here)",
        "types": ["Unprintable", "Exception"]}
    # sys.exit() in a worker fails its step; it ends neither the run nor the process (nor, on Redis, every
    # process that would take the step over after it)
    assert answer(command("exits"))["error"] == {"type": "SystemExit", "message": "the worker called sys.exit(3)",
                                                  "types": ["SystemExit"]}
    in_thread = asyncio.run(execute(command("exits_in_a_thread"), registry=REG))
    assert in_thread["error"] == {"type": "SystemExit", "message": "the worker called sys.exit('bye')",
                                  "types": ["SystemExit"]}


@pytest.mark.parametrize("worker", ["not_an_object", "quick"])
def test_a_compensation_succeeds_whatever_it_returns(worker: str) -> None:
    """Its result is not used: an undo returning True or a status string was judged OutputInvalid, run again by
    its retry policy and left to a person (needs_intervention) although it had undone the step."""
    cmd = {**command(worker, "compensate"), "task_id": f"r/{worker}#c1", "idempotency_key": f"r/{worker}/compensate"}
    assert answer(cmd) == {"type": "task_succeeded", "task_id": f"r/{worker}#c1", "result": {}}
    assert answer(command("not_an_object"))["error"]["type"] == "OutputInvalid"  # a step's is checked
    sync = {**command("blocking", "compensate"), "task_id": "r/blocking#c2"}
    assert asyncio.run(execute(sync, registry=REG))["result"] == {}


def test_a_waiting_worker_can_be_cancelled() -> None:
    async def go() -> None:
        task = asyncio.get_running_loop().create_task(execute(command("slow"), registry=REG))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
