"""The runtime conformance suite: small flows × the outcomes every runtime must reproduce.

Each :class:`Case` is a spec (YAML text), a script for the workers of
``tests.runtime.workers`` (which steps fail how, on which attempt, with what
result), and the expected outcome: end state, order in which steps completed,
order of compensation, attempts per step, final context, the run's error type.
An expected order is a list whose items are step keys or sets of step keys
(those may come in any order among themselves).

A case's ``files`` are sub-flow spec files the suite writes beside the spec
before compiling it (the plan carries them; the runtimes never read them).

Timing only separates what must be separated (a branch that fails while
another hangs), with margins of tens of milliseconds, so a distributed runtime
passes the same cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

HEADER = "flowdsl: 1\nname: {name}\nworkers: [tests.runtime.workers]\n"
STEP_KINDS = ("task", "llm")

Order = Sequence[str | frozenset[str]]


@dataclass(frozen=True)
class Case:
    name: str
    steps: str  # the YAML after the header: `steps:` and any top-level keys
    script: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    succeeded: Order = ()
    compensated: Order = ()
    attempts: dict[str, int] = field(default_factory=dict)
    context: dict[str, Any] | None = None
    error: str | None = None
    failed_step: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    #: other spec files (sub-flows), by file name, written beside the spec (whose text names them in `path:`)
    files: dict[str, str] = field(default_factory=dict)
    #: the steps the run leaves to undo by hand (its ``intervention``), in order; None: not checked
    by_hand: Sequence[str] | None = None

    @property
    def spec(self) -> str:
        return HEADER.format(name=self.name) + self.steps

    def run_input(self) -> dict[str, Any]:
        return {**self.input, "script": self.script}


def any_order(*keys: str) -> frozenset[str]:
    return frozenset(keys)


def order_matches(actual: Sequence[str], expected: Order) -> bool:
    """Whether ``actual`` is ``expected`` with each set's members in some order."""
    i = 0
    for item in expected:
        group = {item} if isinstance(item, str) else set(item)
        chunk = actual[i:i + len(group)]
        if set(chunk) != group or len(chunk) != len(group):
            return False
        i += len(group)
    return i == len(actual)


def succeeded_steps(events: Iterable[dict[str, Any]]) -> list[str]:
    return [e["step"] for e in events if e["type"] == "step_succeeded" and e["kind"] in STEP_KINDS]


def check(case: Case, result: Any) -> None:
    """Assert that a runtime's ``RunResult`` is the outcome ``case`` expects."""
    where = f"case {case.name}"
    assert result.status == case.status, f"{where}: status {result.status}, error {result.error}"
    done = succeeded_steps(result.events)
    assert order_matches(done, case.succeeded), f"{where}: steps succeeded in the order {done}"
    assert order_matches(result.compensated, case.compensated), f"{where}: compensated {result.compensated}"
    for step, n in case.attempts.items():
        assert result.steps[step]["attempts"] == n, f"{where}: {step} made {result.steps[step]['attempts']} attempts"
    if case.context is not None:
        context = {k: v for k, v in result.context.items() if k != "script"}
        assert context == case.context, f"{where}: final context {context}"
    if case.error is not None:
        assert result.error is not None and result.error["type"] == case.error, f"{where}: error {result.error}"
    if case.failed_step is not None:
        assert result.failed_step == case.failed_step, f"{where}: failed step {result.failed_step}"
    if case.by_hand is not None:
        left = [i["step"] for i in (result.intervention or {}).get("steps") or ()]
        assert left == list(case.by_hand), f"{where}: left to undo by hand {left}"
    if case.status == "completed":
        assert result.error is None and result.compensated == []


CASES: list[Case] = [
    Case("sequence",
         "steps: [conf.a, conf.b, conf.c]\n",
         {"a": {"result": {"x": 1}}, "b": {"result": {"x": 2, "y": 3}}},
         succeeded=["a", "b", "c"], attempts={"a": 1, "b": 1, "c": 1}, context={"x": 2, "y": 3}),
    Case("parallel_then_join",
         "steps:\n"
         "  - parallel: p\n"
         "    branches: [conf.a, conf.b]\n"
         "  - conf.c\n",
         {"a": {"sleep": 0.05, "result": {"ra": 1}}, "b": {"result": {"rb": 2}}, "c": {"result": {"rc": 3}}},
         succeeded=[any_order("a", "b"), "c"], context={"ra": 1, "rb": 2, "rc": 3}),
    Case("merge_follows_plan_order_not_timing",
         "steps:\n"
         "  - parallel: p\n"
         "    branches: [conf.a, conf.b]\n",
         {"a": {"sleep": 0.06, "result": {"k": "from a", "only_a": 1}}, "b": {"result": {"k": "from b"}}},
         succeeded=["b", "a"], context={"k": "from b", "only_a": 1}),
    Case("needs_dag",
         "steps:\n"
         "  - conf.a\n"
         "  - conf.b: {needs: [a]}\n"
         "  - conf.c: {needs: [a]}\n"
         "  - conf.d: {needs: [b, c]}\n",
         succeeded=["a", any_order("b", "c"), "d"]),
    Case("retry_until_success",
         "steps:\n"
         "  - conf.a: {retry: {attempts: 3, initial: 10ms}}\n"
         "  - conf.b\n",
         {"a": [{"raise": "Flaky"}, {"raise": "Flaky"}, {"result": {"ok": True}}]},
         succeeded=["a", "b"], attempts={"a": 3, "b": 1}, context={"ok": True}),
    Case("retry_filter_does_not_retry_other_types",
         "steps:\n"
         "  - conf.a: {retry: {attempts: 3, initial: 10ms, 'on': [Flaky]}}\n",
         {"a": {"raise": "CardDeclined"}},
         status="failed", attempts={"a": 1}, error="CardDeclined", failed_step="a"),
    Case("retry_not_on",
         "steps:\n"
         "  - conf.a: {retry: {attempts: 3, initial: 10ms, not_on: [Fatal]}}\n",
         {"a": [{"raise": "Flaky"}, {"raise": "Fatal"}]},
         status="failed", attempts={"a": 2}, error="Fatal"),
    Case("failure_compensates_in_reverse_completion_order",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - conf.b: {compensate: undo.b}\n"
         "  - conf.c\n",
         {"a": {"result": {"ra": 1}}, "c": {"raise": "Boom"}},
         status="compensated", succeeded=["a", "b"], compensated=["b", "a"], error="Boom", failed_step="c",
         context={"ra": 1}),
    Case("failure_with_nothing_to_undo",
         "steps: [conf.a, conf.b]\n",
         {"b": {"raise": "Boom"}},
         status="failed", succeeded=["a"], compensated=[], error="Boom", failed_step="b"),
    Case("parallel_failure_cancels_siblings_and_undoes_completed",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - parallel: p\n"
         "    branches:\n"
         "      - conf.x: {compensate: undo.x}\n"
         "      - conf.y\n"
         "      - conf.z: {compensate: undo.z}\n",
         {"y": {"sleep": 0.08, "raise": "Boom"}, "z": {"hang": True}},
         status="compensated", succeeded=["a", "x"], compensated=["x", "a"], attempts={"z": 1}, error="Boom",
         failed_step="y"),
    Case("parallel_branches_undone_before_what_preceded_them",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - parallel: p\n"
         "    branches:\n"
         "      - conf.b: {compensate: undo.b}\n"
         "      - conf.c: {compensate: undo.c}\n"
         "  - conf.d\n",
         {"c": {"sleep": 0.03}, "d": {"raise": "Boom"}},
         status="compensated", succeeded=["a", "b", "c"], compensated=[any_order("b", "c"), "a"]),
    Case("compensation_retried_until_it_succeeds",
         "steps:\n"
         "  - conf.a:\n"
         "      compensate: {worker: undo.a, retry: {attempts: 3, initial: 10ms}}\n"
         "  - conf.b\n",
         {"b": {"raise": "Boom"}, "a/compensate": [{"raise": "UndoDown"}, {"result": {}}]},
         status="compensated", succeeded=["a"], compensated=["a"]),
    Case("compensation_failing_for_good_needs_intervention",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - conf.b:\n"
         "      compensate: {worker: undo.b, retry: {attempts: 2, initial: 10ms}}\n"
         "  - conf.c: {compensate: undo.c}\n"
         "  - conf.d\n",
         {"d": {"raise": "Boom"}, "b/compensate": {"raise": "UndoDown"}},
         status="needs_intervention", succeeded=["a", "b", "c"], compensated=["c"], error="Boom"),
    Case("attempt_timeout_then_retry",
         "steps:\n"
         "  - conf.a: {timeout: 100ms, retry: {attempts: 2, initial: 10ms}}\n",
         {"a": [{"hang": True}, {"result": {"v": 2}}]},
         succeeded=["a"], attempts={"a": 2}, context={"v": 2}),
    Case("attempt_timeout_spent",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - conf.b: {timeout: 60ms}\n",
         {"b": {"hang": True}},
         status="compensated", succeeded=["a"], compensated=["a"], error="StepTimeout", attempts={"b": 1}),
    Case("run_timeout",
         "timeout: 150ms\n"
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - conf.b\n",
         {"b": {"hang": True}},
         status="compensated", succeeded=["a"], compensated=["a"], error="RunTimeout"),
    Case("sub_flow_timeout",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - flow: sub\n"
         "    path: sub.yaml\n"
         "  - conf.d\n",
         {"sub/c": {"hang": True}},
         status="compensated", succeeded=["a", "sub/b"], compensated=["sub/b", "a"], attempts={"sub/c": 1},
         error="SubflowTimeout", failed_step="sub",
         files={"sub.yaml": HEADER.format(name="sub") + "timeout: 200ms\n"
                "steps:\n  - conf.b: {compensate: undo.b}\n  - conf.c\n"}),
    Case("sub_flow_within_its_timeout",
         "steps:\n"
         "  - flow: sub\n"
         "    path: sub.yaml\n"
         "  - conf.d\n",
         {"d": {"sleep": 0.3}},  # outlasts the sub-flow's timeout, which ended with the sub-flow
         succeeded=["sub/b", "d"],
         files={"sub.yaml": HEADER.format(name="sub") + "timeout: 150ms\nsteps: [conf.b]\n"}),
    Case("sub_flow_node_timeout_overrides_the_file_s",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - flow: sub\n"
         "    path: sub.yaml\n"
         "    timeout: 200ms\n"
         "  - conf.d\n",
         {"sub/c": {"hang": True}},
         status="compensated", succeeded=["a", "sub/b"], compensated=["sub/b", "a"], attempts={"sub/c": 1},
         error="SubflowTimeout", failed_step="sub",
         files={"sub.yaml": HEADER.format(name="sub") + "timeout: 1h\n"
                "steps:\n  - conf.b: {compensate: undo.b}\n  - conf.c\n"}),
    Case("sync_workers",
         "steps:\n"
         "  - parallel: p\n"
         "    branches: [sync.a, sync.b]\n"
         "  - sync.c: {compensate: undo.c}\n"
         "  - sync.d\n",
         {"a": {"sleep": 0.02, "result": {"ra": 1}}, "b": {"result": {"rb": 2}}, "d": {"raise": "ValueError"}},
         status="compensated", succeeded=[any_order("a", "b"), "c"], compensated=["c"], error="ValueError",
         context={"ra": 1, "rb": 2}),
    Case("late_success_while_aborting_is_undone",  # kernel version 4: nothing undone yet, so b joins the saga
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - parallel: p\n"
         "    branches:\n"
         "      - sync.b: {compensate: undo.b, timeout: 300ms}\n"  # its thread goes on past the timeout (300ms:
         "      - sync.c\n",  # time for its thread to start on a loaded machine, else it fails uncalled); c is still
         {"b": {"sleep": 0.6, "result": {"rb": 1}}, "c": {"sleep": 1.5}},  # running when b's late success comes
         status="compensated", succeeded=["a", "c"], compensated=["b", "a"], error="StepTimeout",
         failed_step="b"),
    Case("undo_that_timed_out_then_succeeded_is_counted",  # kernel version 5: after the run ended needs_intervention
         "steps:\n"
         "  - conf.a: {compensate: {worker: sync.u, timeout: 100ms, retry: 1}}\n"  # sync.u: a's script; its thread
         "  - conf.b\n",  # goes on past the undo's timeout, and its success arrives once the run has ended
         {"a": {"sleep": 0.4}, "b": {"raise": "ValueError"}},
         status="compensated", succeeded=["a"], compensated=["a"], error="ValueError", failed_step="b"),
    Case("step_completed_again_after_its_undo",  # kernel version 7: b's attempt 1 (its thread goes on past the
         "steps:\n"  # timeout) succeeds after the retry's success was undone: once the run has ended compensated
         "  - conf.a: {compensate: undo.a}\n"
         "  - sync.b:\n"
         "      timeout: 100ms\n"
         "      retry: {attempts: 2, initial: 10ms, on: [StepTimeout]}\n"
         "      compensate: undo.b\n"
         "  - conf.c\n",
         {"b": [{"sleep": 0.5, "result": {"rb": 1}}, {"result": {"rb": 2}}], "c": {"raise": "ValueError"}},
         status="needs_intervention", succeeded=["a", "b"], compensated=["b", "a"], attempts={"b": 2},
         error="ValueError", failed_step="c", by_hand=["b"]),
    Case("output_map_failing_after_the_worker_succeeded_is_undone",
         "steps:\n"
         "  - conf.a: {compensate: undo.a}\n"
         "  - conf.b: {compensate: undo.b, output: {amount: '${ $number(amount) }'}}\n",
         {"b": {"result": {"amount": "12,50"}}},
         status="compensated", succeeded=["a"], compensated=["b", "a"], error="ExpressionError", failed_step="b"),
    Case("when_skips",
         "steps:\n"
         "  - conf.a\n"
         "  - conf.b: {when: '${ go = true }'}\n"
         "  - conf.c\n",
         {"b": {"result": {"b_ran": True}}},
         succeeded=["a", "c"], attempts={"b": 0}, input={"go": False}, context={"go": False}),
    Case("fail_when",
         "steps:\n"
         "  - conf.a: {fail_when: \"${ status = 'bad' }\"}\n",
         {"a": {"result": {"status": "bad"}}},
         status="failed", error="FailWhen"),
    Case("result_not_an_object",
         "steps: [conf.a]\n",
         {"a": {"return": [1, 2]}},
         status="failed", error="OutputInvalid"),
    Case("output_name_and_map",
         "steps:\n"
         "  - conf.a: {output: ra}\n"
         "  - conf.b:\n"
         "      output: {double: '${ n * 2 }', seen: '${ $context.ra.n }'}\n",
         {"a": {"result": {"n": 5}}, "b": {"result": {"n": 7}}},
         succeeded=["a", "b"], context={"ra": {"n": 5}, "double": 14, "seen": 5}),
    Case("for_each_with_concurrency",
         "steps:\n"
         "  - for_each: fe\n"
         "    items: '${ items }'\n"
         "    concurrency: 2\n"
         "    steps: [conf.e]\n",
         {"fe[0]/e": {"sleep": 0.03, "result": {"v": 10}}, "fe[1]/e": {"result": {"v": 11}},
          "fe[2]/e": {"result": {"v": 12}}},
         succeeded=["fe[1]/e", any_order("fe[0]/e", "fe[2]/e")], input={"items": [1, 2, 3]},
         context={"items": [1, 2, 3], "fe": [{"v": 10}, {"v": 11}, {"v": 12}]}),
    Case("for_each_failure_undoes_finished_iterations",
         "steps:\n"
         "  - for_each: fe\n"
         "    items: '${ items }'\n"
         "    concurrency: 1\n"
         "    steps:\n"
         "      - conf.e: {compensate: undo.e}\n",
         {"fe[2]/e": {"raise": "Boom"}},
         status="compensated", succeeded=["fe[0]/e", "fe[1]/e"], compensated=["fe[1]/e", "fe[0]/e"],
         input={"items": ["i", "j", "k"]}),
    Case("switch",
         "steps:\n"
         "  - switch: sw\n"
         "    'on': '${ kind }'\n"
         "    cases:\n"
         "      x: [conf.x]\n"
         "      y: [conf.y]\n"
         "    default: [conf.z]\n",
         {"y": {"result": {"picked": "y"}}},
         succeeded=["y"], input={"kind": "y"}, context={"kind": "y", "picked": "y"}),
    Case("llm_without_a_model_uses_its_fallback",
         "steps:\n"
         "  - g:\n"
         "      llm: {signature: 'name, script: dict -> greeting'}\n"  # the fallback gets the inputs only
         "      fallback: fallback.g\n",
         {"g/fallback": {"result": {"greeting": "Hello Ann"}}},
         succeeded=["g"], input={"name": "Ann"}, context={"name": "Ann", "greeting": "Hello Ann"}),
]
