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
        compile_expression("[1..100000].($ * 2)").evaluate({})  # each item a step: the bound is checked
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


# --- what an evaluation error says ----------------------------------------------------------------------------

CARD = "4111111111111111"


@pytest.mark.parametrize(("source", "data", "says"), [
    ("$substring(amount, 1)", {"amount": 5, "card": {"number": CARD}},
     "argument 1 of $substring must be a string; got a number (5)"),
    ("$substring('abc', 'x')", {}, 'argument 2 of $substring must be a number; got a string ("x")'),
    ("$substring(x, 1)", {"x": None}, "argument 1 of $substring must be a string; got null"),
    ("$sum(items)", {"items": ["a"]}, 'argument 1 of $sum must be an array of numbers; got an array (["a"])'),
    ("$join(['a', 1])", {}, 'argument 1 of $join must be an array of strings; got an array of 2 items (["a", 1])'),
    ("s ~> $uppercase", {"s": 1}, "argument 1 of $uppercase must be a string; got a number (1)"),
    ("$uppercase(a, b)", {"a": "x"}, "$uppercase takes at most 1 argument; got 2 ($uppercase takes a string)"),
    ("$append()", {}, "$append needs 2 arguments; got 0"),
    ("x.$substring(1)", {"x": 5}, "argument 1 of $substring must be a string; it was left out, so $substring read it "
                                  "from the context, which is a number (5)"),
    ("$uppercase()", {"card": CARD, "amount": 5}, "argument 1 of $uppercase must be a string; it was left out, so "
                                                  "$uppercase read it from the context, an object of 2 keys"),
    ("$number(code)", {"code": "abc"}, '$number cannot convert a string ("abc") to a number'),
    ("$map(['a'], function($v) { $number($v) })", {}, '$number cannot convert a string ("a") to a number'),
    ("$toMillis('x')", {}, 'the argument of $toMillis must be an ISO 8601 timestamp; got a string ("x")'),
    ("$formatBase(1, 99)", {}, "the radix of $formatBase must be between 2 and 36; got a number (99)"),
    ("$power(10, 400)", {}, "$power failed: a number went beyond the range of a JSON number"),
    ("$sort([1, 'a'])", {}, "$sort failed: TypeError in the JSONata engine"),
    ("$reduce([1], function($a) { 1 })", {}, "the second argument of reduce function must be a function"),
    ("amount + 'x'", {"amount": 5}, "the right side of the '+' operator must be a number; got a string (\"x\")"),
    ("amount < 'x'", {"amount": 5}, "the values either side of the '<' operator must be of the same type; got a "
                                    "number (5) and a string (\"x\")"),
    ("$ < 5", {"card": CARD}, "the values either side of the '<' operator must be numbers or strings; got the "
                              "context (an object)"),
    ("$map([1], function($v) { $v + 'x' })", {}, "the right side of the '+' operator must be a number"),
    ("-s", {"s": "x"}, "the '-' operator negates numbers only; got a string (\"x\")"),
    ("{amount: 1}", {"amount": 5}, "a key of an object constructor must be a string; got a number (5)"),
    ("[1..s]", {"s": "a"}, "the right side of the range operator (..) must be an integer; got a string (\"a\")"),
    ("$foo()", {}, "'$foo' is not a function, so it cannot be called"),
    ("$error('Stop: ' & why)", {"why": "no stock"}, "Stop: no stock"),
])
def test_an_evaluation_error_says_what_was_wrong_in_plain_words(source: str, data: Any, says: str) -> None:
    """It was the engine's text: the values in the wrong slots ("argument {the whole context} of Object 1"),
    "Object" for "function", "an array of n", the argument counted wrong, or Python's own error naming no place."""
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source).evaluate(data)
    message = caught.value.message
    assert message.startswith(says), message
    assert CARD not in message and "Object" not in message and "None" not in message, message
    assert caught.value.where is None and caught.value.reason == message


BIG = {"items": [{"sku": f"sku-{i}", "name": "a long product name " * 3} for i in range(2000)],
       "note": "n" * 5000, "card": {"number": CARD}}


@pytest.mark.parametrize(("source", "says", "then"), [
    ("$substring(items, 1)", "argument 1 of $substring must be a string; got an array of 2,000 items (", ")"),
    ("$number(note)", "$number cannot convert a string of 5,000 characters (", ") to a number"),
    ("-note", "the '-' operator negates numbers only; got a string of 5,000 characters (", ")"),
    ("items < 5", "the values either side of the '<' operator must be numbers or strings; got an array of 2,000 "
                  "items (", ")"),
    ("$uppercase()", "argument 1 of $uppercase must be a string; it was left out, so $uppercase read it from the "
                     "context, an object of 3 keys", ""),
    ("$boolean($) and $ < 1", "the values either side of the '<' operator must be numbers or strings; got the context "
                              "(an object of 3 keys)", ""),
])
def test_a_value_quoted_in_an_evaluation_error_is_cut_short_and_the_whole_context_never(source: str, says: str,
                                                                                       then: str) -> None:
    """The whole context was quoted: 64 KB for a 2,000-item input, in the summary, the record, --format json and
    Redis, a card number included."""
    from flowdsl.expr_errors import QUOTE_LIMIT

    with pytest.raises(ExpressionError) as caught:
        compile_expression(source).evaluate(BIG)
    message = caught.value.message
    assert message.startswith(says) and message.endswith(then), message
    assert CARD not in message and "sku-3" not in message, message
    quoted = message[len(says):len(message) - len(then)]
    assert len(quoted) <= QUOTE_LIMIT and (not quoted or quoted.endswith("…")), message


def test_the_spec_s_own_error_message_is_kept_but_bounded_too() -> None:
    from flowdsl.expr_errors import TEXT_LIMIT

    with pytest.raises(ExpressionError) as caught:
        compile_expression("$error('Refused: ' & note)").evaluate(BIG)
    message = caught.value.message
    assert message.startswith("Refused: nnn") and message.endswith("…") and len(message) == TEXT_LIMIT


def test_an_error_inside_a_template_says_where_in_it() -> None:
    """The kernel adds the option (``with``); the template adds the keys and indexes down to the expression."""
    from flowdsl.expr import evaluate_template, expression_id

    source = "$substring(amount, 1)"
    table = {expression_id(source): {"source": source}}
    template = {"order": {"lines": ["x", {"$format": ["n: ", {"$expr": expression_id(source)}]}]}}
    with pytest.raises(ExpressionError) as caught:
        evaluate_template(template, table, {"amount": 5}, {})
    error = caught.value
    assert error.where == ".order.lines[1]" and error.message == error.reason  # not an option yet: no "in"
    assert error.within("with") is error
    assert error.where == "with.order.lines[1]"
    assert error.message == str(error) == ("in 'with.order.lines[1]': argument 1 of $substring must be a string; "
                                           "got a number (5)")


@pytest.mark.parametrize(("source", "data", "says"), [
    ("$sum(items)", {"items": ["a"], "card": CARD}, "argument 1 of $sum must be an array of numbers"),
    ("$substring(amount, 1)", {"amount": 5, "card": CARD},
     "argument 1 of the function was left out, and the context it is then read from does not fit it"),
    ("$substring('abc', 'x')", {}, "the arguments of $substring do not fit it"),
    ("$number(code)", {"code": "abc"},
     "evaluation failed: ValueError in the JSONata engine: could not convert string to float: 'abc'"),
    ("amount < 'x'", {"amount": 5}, "the values either side of the '<' operator must be of the same type; got a "
                                    "number (5) and a string (\"x\")"),
])
def test_without_the_engine_s_stack_an_error_is_said_from_its_code_and_values(
        monkeypatch: pytest.MonkeyPatch, source: str, data: Any, says: str) -> None:
    """The function and its arguments are read off the engine's stack; should another engine version hide them,
    the message still comes from the error's code and values (never the whole context)."""
    import flowdsl.expr_errors as expr_errors

    def unreadable() -> Any:
        raise AttributeError("no such engine internals")

    monkeypatch.setattr(expr_errors, "_engine_codes", unreadable)
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source).evaluate(data)
    assert caught.value.message == says


def test_a_message_that_cannot_be_built_falls_back_to_the_error_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The messages read the engine's private names (its stack, its signatures): should another version make that
    fail, the expression still fails as an ExpressionError, with the engine's code — never an exception out of the
    kernel, nor the engine's text quoting the whole context."""
    from flowdsl import expr_errors

    def broken(*args: Any) -> str:
        raise AttributeError("an engine version without _params")

    monkeypatch.setattr(expr_errors, "engine_message", broken)
    monkeypatch.setattr(expr_errors, "python_message", broken)
    monkeypatch.setattr(expr_errors, "_running_call", broken)
    with pytest.raises(ExpressionError) as caught:
        compile_expression("$substring(amount, 1)").evaluate({"amount": 5, "card": "4111111111111111"}, {})
    assert caught.value.message == "evaluation failed (T0411)"
    with pytest.raises(ExpressionError) as caught:
        compile_expression("$number('abc')").evaluate({}, {})
    assert caught.value.message == "evaluation failed (ValueError)"
    assert expr_errors.running_call(ValueError()) is None
