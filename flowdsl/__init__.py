"""flowdsl — a declarative workflow language with automatic saga compensation.

The public API, one function per stage::

    import flowdsl
    doc = flowdsl.load("flow.yaml")                 # front end: data + positions + diagnostics
    diags = flowdsl.validate("flow.yaml")           # checks: every diagnostic, sorted
    result = flowdsl.compile_spec("flow.yaml")      # compiler: plan + source map + diagnostics
    plan = flowdsl.compile_text(yaml_text)          # the same from text; raises SpecError

and ``@flowdsl.worker("name")`` to register workers; ``flowdsl.run(plan, input)`` (or
``await flowdsl.run_flow(...)``) runs a plan in-process and returns a ``RunResult``; ``flowdsl.resume(run_id)``
goes on with a recorded run whose process stopped before its end;
``flowdsl.check_input(plan, data)`` checks a run input before anything starts (raises ``InputError``);
``flowdsl.simulate(plan, input, script=flowdsl.Script(...))`` runs a plan on a virtual clock, each attempt
scripted (``flowdsl.Outcome``) or real, signals sent to it (``flowdsl.Signal``), for tests (docs/testing.md).
Heavy modules load lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

# (``typing.TYPE_CHECKING`` without importing typing, which takes ~40 ms with ``re``: ``import flowdsl`` runs
# before the ``flowdsl`` command can take a stop signal, see launch.py; type checkers read the name as true)
TYPE_CHECKING = False

# The names are imported on first use (``__getattr__``), so that ``import flowdsl`` stays cheap; type checkers
# and IDEs read them from the block below instead. The three lists must agree (tests/test_api.py checks it).
if TYPE_CHECKING:
    from flowdsl.api import CompileResult as CompileResult
    from flowdsl.api import compile_spec as compile_spec
    from flowdsl.api import compile_text as compile_text
    from flowdsl.api import load as load
    from flowdsl.api import load_text as load_text
    from flowdsl.api import plan_bytes as plan_bytes
    from flowdsl.api import validate as validate
    from flowdsl.diagnostics import Diagnostic as Diagnostic
    from flowdsl.diagnostics import SpecError as SpecError
    from flowdsl.runtime.inputs import InputError as InputError
    from flowdsl.runtime.local import LocalRun as LocalRun
    from flowdsl.runtime.local import RunAborted as RunAborted
    from flowdsl.runtime.local import RunIdInUse as RunIdInUse
    from flowdsl.runtime.local import SignalOutcome as SignalOutcome
    from flowdsl.runtime.local import WorkersMissing as WorkersMissing
    from flowdsl.runtime.local import check_input as check_input
    from flowdsl.runtime.local import run as run
    from flowdsl.runtime.local import run_flow as run_flow
    from flowdsl.runtime.plancheck import PlanError as PlanError
    from flowdsl.runtime.record import RecordError as RecordError
    from flowdsl.runtime.report import RunResult as RunResult
    from flowdsl.runtime.resume import NotResumable as NotResumable
    from flowdsl.runtime.resume import resume as resume
    from flowdsl.runtime.resume import resume_flow as resume_flow
    from flowdsl.runtime.simulate import Outcome as Outcome
    from flowdsl.runtime.simulate import Script as Script
    from flowdsl.runtime.simulate import Signal as Signal
    from flowdsl.runtime.simulate import Simulation as Simulation
    from flowdsl.runtime.simulate import SimulationError as SimulationError
    from flowdsl.runtime.simulate import simulate as simulate
    from flowdsl.runtime.simulate import simulate_flow as simulate_flow
    from flowdsl.workers import StepContext as StepContext
    from flowdsl.workers import StepLogger as StepLogger
    from flowdsl.workers import WorkerImportError as WorkerImportError
    from flowdsl.workers import WorkerRegistry as WorkerRegistry
    from flowdsl.workers import registry as registry
    from flowdsl.workers import worker as worker

_EXPORTS = {
    "load": "flowdsl.api",
    "load_text": "flowdsl.api",
    "validate": "flowdsl.api",
    "compile_spec": "flowdsl.api",
    "compile_text": "flowdsl.api",
    "plan_bytes": "flowdsl.api",
    "CompileResult": "flowdsl.api",
    "Diagnostic": "flowdsl.diagnostics",
    "SpecError": "flowdsl.diagnostics",
    "worker": "flowdsl.workers",
    "StepContext": "flowdsl.workers",
    "StepLogger": "flowdsl.workers",
    "registry": "flowdsl.workers",
    "WorkerImportError": "flowdsl.workers",
    "WorkerRegistry": "flowdsl.workers",
    "run": "flowdsl.runtime.local",
    "run_flow": "flowdsl.runtime.local",
    "LocalRun": "flowdsl.runtime.local",
    "RunAborted": "flowdsl.runtime.local",
    "RunIdInUse": "flowdsl.runtime.local",
    "SignalOutcome": "flowdsl.runtime.local",
    "WorkersMissing": "flowdsl.runtime.local",
    "check_input": "flowdsl.runtime.local",
    "InputError": "flowdsl.runtime.inputs",
    "PlanError": "flowdsl.runtime.plancheck",
    "RecordError": "flowdsl.runtime.record",
    "resume": "flowdsl.runtime.resume",
    "resume_flow": "flowdsl.runtime.resume",
    "NotResumable": "flowdsl.runtime.resume",
    "RunResult": "flowdsl.runtime.report",
    "simulate": "flowdsl.runtime.simulate",
    "simulate_flow": "flowdsl.runtime.simulate",
    "Outcome": "flowdsl.runtime.simulate",
    "Script": "flowdsl.runtime.simulate",
    "Signal": "flowdsl.runtime.simulate",
    "Simulation": "flowdsl.runtime.simulate",
    "SimulationError": "flowdsl.runtime.simulate",
}

__all__ = [
    "CompileResult", "Diagnostic", "InputError", "LocalRun", "NotResumable", "Outcome", "PlanError", "RecordError",
    "RunAborted", "RunIdInUse", "RunResult", "Script", "Signal", "SignalOutcome", "Simulation", "SimulationError",
    "SpecError", "StepContext", "StepLogger", "WorkerImportError", "WorkerRegistry", "WorkersMissing", "check_input",
    "compile_spec", "compile_text", "load", "load_text", "plan_bytes", "registry", "resume", "resume_flow", "run",
    "run_flow", "simulate", "simulate_flow", "validate", "worker",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowdsl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
