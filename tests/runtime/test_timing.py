"""The measured critical path of a run (``flowdsl.runtime.timing.critical_path``): a chain of step instances,
one iteration's inside a ``for_each``, never longer than the run."""

from __future__ import annotations

from typing import Any

from flowdsl import compile_text
from flowdsl.runtime.timing import critical_path

LOOP = """flowdsl: 1
name: t
steps:
  - a
  - for_each: fe
    items: "${ items }"
    concurrency: 1
    steps: [s1, s2]
  - z
"""


def _row(node: str, start: int, end: int, status: str = "succeeded") -> dict[str, Any]:
    return {"node": node, "kind": "task", "started_at": start, "finished_at": end, "status": status}


def test_a_for_each_whose_iterations_ran_one_after_another_weighs_its_longest_iteration() -> None:
    """Three iterations of s1 (100 ms) then s2 (100 ms), one at a time: the loop took 600 ms, but no chain of
    dependent steps is longer than one iteration's — the rest was waiting for the slot. Each step's span from its
    first instance's start to its last's end (500 ms each) made a critical path of 1,100 ms in a 700 ms run."""
    plan = compile_text(LOOP)
    rows = {"a": _row("a", 0, 50)}
    for i in range(3):
        t = 50 + 200 * i
        rows[f"fe[{i}]/s1"] = _row("s1", t, t + 100)
        rows[f"fe[{i}]/s2"] = _row("s2", t + 100, t + 200 + (5 if i == 1 else 0))
    rows["z"] = _row("z", 655, 705)
    chain, ms = critical_path(plan, rows)
    assert (chain, ms) == (["a", "fe[1]/s1", "fe[1]/s2", "z"], 50 + 100 + 105 + 50)
    assert ms <= 705


def test_nested_loops_follow_one_iteration_of_each() -> None:
    plan = compile_text("""flowdsl: 1
name: t
steps:
  - for_each: outer
    items: "${ items }"
    steps:
      - for_each: inner
        items: "${ [1, 2] }"
        steps: [s]
      - after
""")
    rows = {"outer[0]/inner[0]/s": _row("s", 0, 10), "outer[0]/inner[1]/s": _row("s", 0, 30),
            "outer[0]/after": _row("after", 30, 40),
            "outer[1]/inner[0]/s": _row("s", 0, 20), "outer[1]/inner[1]/s": _row("s", 0, 15),
            "outer[1]/after": _row("after", 20, 45)}
    assert critical_path(plan, rows) == (["outer[1]/inner[0]/s", "outer[1]/after"], 45)


def test_of_chains_that_took_as_long_the_one_of_a_step_that_was_not_cancelled_is_named() -> None:
    """A failure cancels its sibling: both took 318 ms; the failed one decided the run's end."""
    plan = compile_text("flowdsl: 1\nname: t\nsteps:\n  - parallel: p\n    branches: [book_flight, book_hotel]\n")
    rows = {"book_flight": _row("book_flight", 0, 318, "cancelled"),
            "book_hotel": _row("book_hotel", 0, 318, "failed")}
    assert critical_path(plan, rows) == (["book_hotel"], 318)
