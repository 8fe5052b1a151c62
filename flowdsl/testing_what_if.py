"""Flow tests, what if: a flow's failure table — how it ends when each step fails for good, then its fallback,
then the undos that run needs; and when each wait with a timeout gets no signal (``flowdsl test --what-if``,
docs/testing.md).

Stage: tooling, beside :mod:`flowdsl.testing` (which imports it, and which it imports inside :func:`what_if`:
the test file's scripts and run ids), ``.testing_signals`` and the simulated runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.simulate import Outcome, Script, Simulation, SimulationError
from flowdsl.testing_signals import can_time_out, what_if_keyed, what_if_signals

if TYPE_CHECKING:
    from flowdsl.testing import FlowTests

__all__ = ["INJECTED", "WhatIf", "what_if"]

#: the error type of the failures :func:`what_if` injects (no retry filter names it, unless one names ``Exception``;
#: a retried attempt fails again, until the step's attempts run out)
INJECTED = "InjectedFailure"
#: the calls that show a scenario's failure was dispatched, by what was made to fail
_DISPATCHED = {"steps": ("task", "llm"), "fallback": ("fallback",), "undo": ("compensate",)}


@dataclass(frozen=True)
class WhatIf:
    """One scenario of :func:`what_if`: what was made to fail (``failing``: ``(table, step)`` pairs, table one of
    ``steps``, ``fallback``, ``undo`` — or ``wait``: that wait's signal is not sent, so its timeout passes; empty
    for the run as the file scripts it), in words (``said``), and how the run ended — its :class:`Simulation`, or
    ``error`` when it could not run as scripted. ``ran``: whether what was made to fail ran at all (a step a
    ``when`` or a ``switch`` skips never runs)."""

    failing: tuple[tuple[str, str], ...]
    said: str
    simulation: Simulation | None
    error: str | None = None

    @property
    def ran(self) -> bool:
        """Whether every step made to fail was dispatched (its attempts, fallback or undo as made to fail), and
        every wait made to time out started (an instance of it, in a for_each)."""
        sim = self.simulation
        if sim is None:
            return False
        return all(any(row.get("node") == step and row.get("status") not in (None, "skipped")
                       for row in sim.result.steps.values()) if table == "wait"
                   else any(c.node == step and c.kind in _DISPATCHED[table] for c in sim.calls)
                   for table, step in self.failing)

    def to_json(self) -> dict[str, Any]:
        """The scenario in ``flowdsl test --what-if -f json`` (docs/testing.md)."""
        sim = self.simulation
        result = sim.result if sim is not None else None
        return {"failing": [{"script": t, "step": s} for t, s in self.failing], "said": self.said,
                "ran": self.ran, "error": self.error, "status": result.status if result else None,
                "failed_step": result.failed_step if result else None,
                "compensated": result.compensated if result else None,
                "intervention": [i["step"] for i in (result.intervention or {}).get("steps") or ()] if result else None,
                "fallbacks": _fallbacks(sim) if sim is not None else None,
                "passed_over": [k for k, r in result.steps.items() if r.get("continued")] if result else None,
                "elapsed_ms": sim.elapsed_ms if sim is not None else None}


def _fallbacks(sim: Simulation) -> list[str]:
    """The steps whose fallback ran in ``sim``."""
    return list(dict.fromkeys(c.step for c in sim.calls if c.kind == "fallback"))


async def what_if(tests: FlowTests, *, lm: object | str | None = None,
                  lms: Mapping[str, object] | None = None) -> list[WhatIf]:
    """How the flow of ``tests`` ends when each of its task and LLM steps fails for good (every attempt, with
    :data:`INJECTED`), then its fallback too where it has one, and when each signal wait with a ``timeout`` gets
    no signal (it fails with ``WaitTimeout``); then — for each step with a compensation that one of those runs
    undid — when that undo fails for good too; first, the run with nothing made to fail. Each run starts from the
    file's ``input``, its file-level scripts and signals, and — for each signal wait whose signal the file does not
    send — that signal at the run's start with ``{}`` (a wait without one would wait for ever); a keyed wait's,
    which needs the key the wait takes as it starts, is sent to each instance as it starts, with its key and ``{}``
    (unless the file sends that signal with that key); what they leave unscripted calls the real workers.
    Scenarios are in the flow's order. Raises :class:`~flowdsl.runtime.inputs.InputError` when the flow refuses the
    file's input (a file whose cases each give their own)."""
    from flowdsl.runtime.inputs import check_input
    from flowdsl.runtime.simulate import simulate_flow
    from flowdsl.testing import _SCRIPT_TABLES, _merged, _run_id

    check_input(tests.plan, tests.input)
    fail = [Outcome.fail(INJECTED, "made to fail by flowdsl test --what-if")]

    async def scenario(failing: tuple[tuple[str, str], ...], said: str) -> WhatIf:
        tables = {t: _merged(dict(getattr(tests.defaults, t)), {step: fail for table, step in failing if table == t})
                  for t in _SCRIPT_TABLES}
        withheld = [s for t, s in failing if t == "wait"]
        script = Script(**tables, signals=what_if_signals(tests.plan, tests.defaults.signals, withheld),
                        keyed_at_start=what_if_keyed(tests.plan, withheld))
        try:
            sim = await simulate_flow(tests.plan, tests.input, script=script,
                                      run_id=_run_id(tests.file, said), lm=lm, lms=lms)
        except SimulationError as exc:
            return WhatIf(failing, said, None, str(exc))
        return WhatIf(failing, said, sim)

    nodes = tests.plan["nodes"]
    steps = sorted((k for k, n in nodes.items() if n["kind"] in ("task", "llm") or can_time_out(n)),
                   key=lambda k: nodes[k]["order"])
    found = [await scenario((), "nothing fails")]
    for step in steps:
        if nodes[step]["kind"] == "wait":
            found.append(await scenario((("wait", step),), f"wait {step} times out"))
            continue
        found.append(await scenario((("steps", step),), f"{step} fails"))
        if nodes[step].get("fallback"):
            found.append(await scenario((("steps", step), ("fallback", step)), f"{step} and its fallback fail"))
    undone: dict[str, WhatIf] = {}
    for item in list(found):
        for key in item.simulation.result.compensated if item.simulation is not None else ():
            undone.setdefault(key.rsplit("]/", 1)[-1], item)
    for key in sorted(undone, key=lambda k: nodes[k]["order"]):
        first = undone[key]
        found.append(await scenario((*first.failing, ("undo", key)), f"{first.said}, and undoing {key} fails"))
    return found
