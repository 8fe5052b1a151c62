"""The time bound of an evaluation counts the evaluating thread's CPU time, not the wall clock: a busy process
(a service's other threads holding the GIL, sync workers busy in theirs) must not fail an ordinary expression —
which a replay of its run, on a quieter machine, then decided otherwise."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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


def test_a_record_whose_expression_ran_out_of_time_says_so_when_its_replay_decides_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`show` of a run whose expression ran out of its bound, replayed where it does not (another machine): the
    record is refused as before, but no longer said to have been changed only — the expression is named."""
    import flowdsl.expr
    from flowdsl import compile_text, run
    from flowdsl.runtime.rebuild import result_from_record
    from flowdsl.runtime.record import RecordError, read_record
    from flowdsl.workers import WorkerRegistry

    registry = WorkerRegistry()
    registry.register("count_c1", lambda data, ctx: {"n": data["n"]})
    plan = compile_text("flowdsl: 1\nname: slow\nworkers: [nowhere_c1]\nsteps:\n  - tally:\n      worker: count_c1\n"
                        "      with: {n: \"${ $count([1..50000].($ * 2)) }\"}\n")
    result = run(plan, {}, record=True, runs_dir=tmp_path, registry=registry, import_workers=False,
                 handle_sigint=False)
    assert result.status == "failed" and "evaluation timeout" in str(result.to_json()["steps"]["tally"]["error"])
    monkeypatch.setattr(flowdsl.expr, "TIME_LIMIT_MS", 60_000)  # replayed where it fits in its bound
    header, lines = read_record(next(tmp_path.glob("*.jsonl")))
    with pytest.raises(RecordError, match=r"or an expression close to its time bound .* at step 'tally'"):
        result_from_record(header, lines)
