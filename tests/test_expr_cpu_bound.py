"""The time bound of an evaluation counts the evaluating thread's CPU time, not the wall clock: a busy process
(a service's other threads holding the GIL, sync workers busy in theirs) must not fail an ordinary expression —
which a replay of its run, on a quieter machine, then decided otherwise."""

from __future__ import annotations

import threading
import time

import jsonata
import pytest

from flowdsl.expr import ExpressionError, compile_expression


def test_time_the_thread_spends_waiting_does_not_count() -> None:
    """180 ms of waiting (a stand-in for the GIL held by other threads) in an evaluation of little work."""
    wait = jsonata.Jsonata.JLambda(lambda x: (time.sleep(0.06), x)[1])
    assert compile_expression("[1, 2, 3].($wait($))").evaluate({}, {"wait": wait}) == [1, 2, 3]


def test_an_ordinary_expression_is_not_failed_by_threads_holding_the_gil() -> None:
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    threads = [threading.Thread(target=busy) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        expression = compile_expression("$count([1..1500].($ * 2))")  # ~10 ms of work, ~50-150 ms of wall time
        assert [expression.evaluate({}) for _ in range(5)] == [1500] * 5
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_work_that_runs_away_is_still_stopped_at_its_bound() -> None:
    expression = compile_expression("( $f := function($n){ $n > 0 ? $f($n-1) + $f($n-1) : 1 }; $f(40) )")
    started = time.thread_time()
    with pytest.raises(ExpressionError, match="evaluation timeout after 100 milliseconds"):
        expression.evaluate({})
    assert time.thread_time() - started < 1.0
