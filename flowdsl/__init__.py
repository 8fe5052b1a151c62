"""flowdsl — a declarative workflow language with automatic saga compensation.

The public API, one function per stage::

    import flowdsl
    doc = flowdsl.load("flow.yaml")                 # front end: data + positions + diagnostics
    diags = flowdsl.validate("flow.yaml")           # checks: every diagnostic, sorted
    result = flowdsl.compile_spec("flow.yaml")      # compiler: plan + source map + diagnostics
    plan = flowdsl.compile_text(yaml_text)          # the same from text; raises SpecError

and ``@flowdsl.worker("name")`` to register workers; ``flowdsl.run(plan, input)`` (or
``await flowdsl.run_flow(...)``) runs a plan in-process and returns a ``RunResult``.
Heavy modules load lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

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
    "registry": "flowdsl.workers",
    "run": "flowdsl.runtime.local",
    "run_flow": "flowdsl.runtime.local",
    "LocalRun": "flowdsl.runtime.local",
    "RunResult": "flowdsl.runtime.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowdsl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
