"""Expressions: bounded evaluation that does not depend on what else the process is doing."""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest

from flowdsl.expr import ExpressionError, compile_expression


def test_a_collector_pause_does_not_time_an_expression_out() -> None:
    """A full collection in a process with DSPy loaded takes ~150 ms here, more than the 100 ms bound:
    it must not turn an ordinary ``with:`` mapping into a random ExpressionError."""
    def slow_collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            time.sleep(0.15)

    expression = compile_expression('[1..3000].{"n": $}')  # thousands of new objects: collections are due
    gc.callbacks.append(slow_collector)
    try:
        value = expression.evaluate({})
    finally:
        gc.callbacks.remove(slow_collector)
    assert isinstance(value, list) and len(value) == 3000
    assert gc.isenabled()


def test_a_runaway_expression_is_still_stopped() -> None:
    with pytest.raises(ExpressionError, match="timeout after 100 milliseconds"):
        compile_expression("[1..9000000].($ * 2)").evaluate({})
    assert gc.isenabled()


class _Watched(list[int]):
    """A list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        _Watched.walks += 1
        return super().__iter__()


def test_an_expression_does_not_walk_context_data_it_does_not_read() -> None:
    """Inside a for_each over n items every step's context holds the n items: an evaluation that walked them
    (the engine's own input check) made each step O(n) and the run O(n²)."""
    data = {"items": _Watched(range(1000)), "order": {"total": 5}}
    assert compile_expression("order.total + $n").evaluate(data, {"n": 1}) == 6
    assert compile_expression("$item").evaluate(data, {"item": {"sku": "a"}}) == {"sku": "a"}
    assert _Watched.walks == 0
    assert compile_expression("$count(items)").evaluate(data) == 1000
