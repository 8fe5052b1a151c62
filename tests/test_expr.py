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


@pytest.mark.parametrize("value", [[5], [], {"a": [1]}, None, 1.5, 2.0, "s", [[1], [2, [3]]], True, 10**30])
def test_a_bare_variable_gives_what_the_engine_gives(value: Any) -> None:
    bare, through_the_engine = compile_expression("$item"), compile_expression("($item)")
    assert bare.evaluate({}, {"item": value}) == through_the_engine.evaluate({}, {"item": value})
    assert type(bare.evaluate({}, {"item": value})) is type(through_the_engine.evaluate({}, {"item": value}))


def test_a_bound_bare_variable_is_read_without_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """`with: {line: "${ $item }"}` is the usual for_each mapping: it costs a lookup, not an evaluation."""
    import flowdsl.expr as expr

    bare, unbound = compile_expression("$line"), compile_expression("$nothing_bound")

    def no_engine() -> Any:
        raise AssertionError("the engine was used")

    monkeypatch.setattr(expr, "_jsonata", no_engine)
    assert bare.evaluate({"big": list(range(10))}, {"line": {"sku": "a"}}) == {"sku": "a"}
    with pytest.raises(AssertionError):  # not bound: the engine decides (undefined, or a function's name)
        unbound.evaluate({}, {"line": 1})


def test_each_refused_function_has_its_own_reason() -> None:
    """FD503 lumps two reasons together: replay (clock, chance) and $eval, which escapes the checks."""
    from flowdsl.expr import NONDETERMINISTIC, builtin_functions, refusal

    assert {"now", "millis", "random", "shuffle", "eval"} == NONDETERMINISTIC
    assert builtin_functions() >= NONDETERMINISTIC
    for fn in ("now", "millis", "random", "shuffle"):
        assert "clock or chance" in (refusal(fn) or "")
    reason = refusal("eval") or ""
    assert reason.startswith("it evaluates a string as an expression at run time") and "clock" not in reason
    assert refusal("sum") is None
