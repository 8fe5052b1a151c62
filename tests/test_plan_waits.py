"""plancheck refuses every wait node the kernel's ``prepare`` refuses or cannot run sensibly, with a PlanError
naming the field, before a runtime takes the plan: on the local runtime (``run_flow``, ``flowdsl.run``) and on
Redis (``RedisClient.submit``), where such a plan was a dead letter (its start failed on every worker).

- a signal taken by two waits, and a signal wait with no ``signal_key`` inside a ``for_each`` (what ``prepare``
  raises ValueError for; FD316 and FD317 in the compiler);
- a signal name that is not one (written as an id), and a wait's duration outside 1 ms to 30 days;
- a timer wait (a ``delay_ms``) with a ``timeout_ms``, an ``output`` other than merge, or an ``on_failure`` (FD309).
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

import flowdsl
from flowdsl import compile_text
from flowdsl.kernel import prepare
from flowdsl.runtime.plancheck import PlanError, plan_problem

#: a signal wait with a deadline (w1), one without (w2), a timer (t), and a for_each with a timer inside (tt)
SPEC = """\
flowdsl: 1
name: t
steps:
  - a
  - wait: w1
    timeout: 10s
    on_failure: continue
  - wait: w2
  - wait: t
    for: 1s
  - for_each: l
    items: "${ xs }"
    steps:
      - sequence: s
        steps:
          - wait: tt
            for: 1s
"""


def base() -> dict[str, Any]:
    return json.loads(json.dumps(compile_text(SPEC)))


def edited(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    plan = base()
    change(plan["nodes"])
    return plan


MONTH = 30 * 24 * 3_600_000

#: (what is changed, the problem plancheck says, whether the kernel's prepare refuses it too)
REFUSED: list[tuple[str, Callable[[dict[str, Any]], object], str, bool]] = [
    ("signal twice", lambda n: n["w2"].update(signal="w1"),
     "'nodes/w2/signal': plan nodes 'w1' and 'w2' both wait for signal 'w1' (a signal sent to a run is for one "
     "wait: FD316)", True),
    ("signal wait in a for_each", lambda n: n["tt"].update(signal="zz", delay_ms=None),
     "'nodes/tt/signal': plan node 'tt' waits for signal 'zz' inside for_each 'l' with no 'signal_key' (which "
     "iteration would a signal be for?): FD317", True),
    ("empty signal", lambda n: n["w2"].update(signal=""),
     "'nodes/w2/signal': '' does not match '^[A-Za-z_][A-Za-z0-9_]{0,63}$' (a signal name is written as an id; a "
     "timer wait's is null)", False),
    ("signal not an id", lambda n: n["w2"].update(signal="a b/c"), "'nodes/w2/signal': 'a b/c' does not match", False),
    ("signal too long", lambda n: n["w2"].update(signal="s" * 65), "'nodes/w2/signal': 'sssss", False),
    ("signal with a newline", lambda n: n["w2"].update(signal="w2\n"),
     "'nodes/w2/signal': 'w2\\n' is not a signal name (written as an id)", False),
    ("delay 0", lambda n: n["t"].update(delay_ms=0),
     "'nodes/t/delay_ms': 0 is less than the minimum of 1 (a wait's duration is 1 ms to 30 days (720h), as the "
     "language's durations are)", False),
    ("delay over 30 days", lambda n: n["t"].update(delay_ms=MONTH + 1),
     f"'nodes/t/delay_ms': {MONTH + 1} is greater than the maximum of {MONTH}", False),
    ("huge timeout", lambda n: n["w1"].update(timeout_ms=10**30),
     "'nodes/w1/timeout_ms': 1000000000000000000000000000000 is greater than the maximum of 2592000000", False),
    ("timeout on a timer", lambda n: n["t"].update(timeout_ms=5),
     "'nodes/t/timeout_ms': 5 is not of type 'null' (a timer wait, one with a delay_ms, has no deadline, no key, no "
     "payload to place and no on_failure: FD309)", False),
    ("output on a timer", lambda n: n["t"].update(output={"mode": "name", "name": "x"}),
     "'nodes/t/output/mode': 'merge' was expected (a timer wait, one with a delay_ms", False),
    ("on_failure on a timer", lambda n: n["t"].update(on_failure="continue"),
     "'nodes/t/on_failure': 'continue' is not of type 'null' (a timer wait, one with a delay_ms", False),
]  # fmt: skip


@pytest.mark.parametrize(("what", "change", "problem", "kernel"), REFUSED, ids=[r[0] for r in REFUSED])
def test_plancheck_refuses_a_wait_the_kernel_cannot_run(what: str, change: Callable[[dict[str, Any]], object],
                                                        problem: str, kernel: bool) -> None:
    plan = edited(change)
    said = plan_problem(plan)
    assert said is not None and said.startswith(problem), said
    if kernel:  # the same words as prepare's
        with pytest.raises(ValueError) as caught:
            prepare(copy.deepcopy(plan))
        assert str(caught.value) in said


@pytest.mark.parametrize(("what", "change"), [
    ("the plan as compiled", lambda n: None),
    ("30 days", lambda n: n["t"].update(delay_ms=MONTH)),
    ("a signal wait passed over with no timeout", lambda n: n["w2"].update(on_failure="continue")),
    ("a signal apart from the id", lambda n: n["w2"].update(signal="_Other_1")),
])  # fmt: skip
def test_plancheck_takes_the_waits_the_kernel_runs(what: str, change: Callable[[dict[str, Any]], object]) -> None:
    plan = edited(change)
    assert plan_problem(plan) is None
    prepare(plan)


def test_the_quick_check_and_the_whole_schema_agree_on_timer_waits() -> None:
    """The timer wait's conditional part is kept as it is in the derived per-kind schema (plancheck._flatten)."""
    from flowdsl.runtime.plancheck import _well_shaped
    from tests.test_plan_schema import _whole_schema

    changes: list[dict[str, Any]] = [
        {"timeout_ms": 5}, {"timeout_ms": None}, {"output": {"mode": "name", "name": "x"}}, {"on_failure": "continue"},
        {"on_failure": None}, {"signal": "x"}, {"signal": "x", "timeout_ms": 5}, {"delay_ms": None, "signal": "x",
                                                                                   "timeout_ms": 5}]
    for change in changes:
        plan = base()
        plan["nodes"]["t"].update(change)
        valid, problem = _whole_schema(plan)
        assert _well_shaped(plan) == valid, change
        assert plan_problem(plan) == problem, change


DUPLICATE = edited(lambda n: n["w2"].update(signal="w1"))
SAID = "the plan is not a flowdsl execution plan: 'nodes/w2/signal': plan nodes 'w1' and 'w2' both wait for signal"


def test_the_local_runtime_refuses_such_a_plan_with_a_plan_error() -> None:
    """It raised a plain ValueError from the kernel's start (docs: a PlanError naming the field)."""
    from flowdsl.runtime.local import run_flow

    with pytest.raises(PlanError, match=SAID):
        asyncio.run(run_flow(DUPLICATE, {"xs": []}, record=False, import_workers=False))
    with pytest.raises(PlanError, match=SAID):
        flowdsl.run(DUPLICATE, {"xs": []}, record=False)
    in_loop = edited(lambda n: n["tt"].update(signal="zz", delay_ms=None))
    with pytest.raises(PlanError, match="'nodes/tt/signal': plan node 'tt' waits for signal 'zz' inside for_each"):
        flowdsl.run(in_loop, {"xs": []}, record=False)


def test_submit_refuses_such_a_plan_before_anything_reaches_redis() -> None:
    """RedisClient.submit checks the plan first: such a plan was stored, and its start went round the workers as
    tracebacks until it became a dead letter. (Nothing listens at the URL: nothing is sent.)"""
    from flowdsl.runtime.redis import RedisClient

    async def main() -> None:
        async with RedisClient("redis://127.0.0.1:1/0", prefix="never") as client:
            for plan, said in ((DUPLICATE, SAID), (edited(lambda n: n["t"].update(delay_ms=10**30)),
                                                   "'nodes/t/delay_ms': 1000000000000000000000000000000 is greater")):
                with pytest.raises(PlanError, match=said):
                    await client.submit(plan, {"xs": []}, run_id="bad")

    asyncio.run(main())
