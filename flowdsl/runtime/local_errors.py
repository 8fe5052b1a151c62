"""What a local run raises of its own, and the run ids in progress in this process.

Stage: runtime: local. Imports ``.late`` (how a stopped run's state is said), ``.report`` (the result object),
``flowdsl.runtime.execute`` (the workers a plan names), ``flowdsl.workers`` (the process-wide registry) and stdlib. The
modules of :class:`~flowdsl.runtime.local.LocalRun` share it; it imports none of them. Every name here is
imported from :mod:`flowdsl.runtime.local`, their documented home:

- :class:`RunAborted` — the run was stopped at once (:meth:`~flowdsl.runtime.local.LocalRun.abort`, a second
  Ctrl-C or stop signal);
- :class:`WorkersMissing` — the plan names workers that are not registered (with :func:`_registered_elsewhere`,
  those the process-wide registry has when the run was given another one);
- :class:`RunIdInUse` — a run of this id is in progress in this process (:func:`_claim` takes an id,
  :func:`_release_id` gives it back).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowdsl.runtime.execute import worker_references
from flowdsl.runtime.late import stopped_while
from flowdsl.runtime.report import NOT_STARTED, RunResult
from flowdsl.workers import WorkerRegistry
from flowdsl.workers import registry as default_registry

__all__ = ["RunAborted", "RunIdInUse", "WorkersMissing"]


class RunAborted(Exception):
    """The run was stopped at once (a second Ctrl-C or stop signal, :meth:`LocalRun.abort`): steps in flight
    were abandoned and nothing more was compensated.

    ``status`` is the state it stopped in; ``result`` the run as it stood then (None when it had not started),
    its ``intervention`` listing what is left to undo by hand: the completed steps with a compensation that were
    not undone, in the order to undo them (``kernel.left_to_undo``), also in ``left_to_undo``.
    """

    def __init__(self, run_id: str, status: str, record: Path | None, *, result: RunResult | None = None):
        where = f"; its record ends at {record}" if record else ""
        left: list[dict[str, Any]] = (result.intervention or {}).get("steps", []) if result is not None else []
        if status == NOT_STARTED:
            super().__init__(f"run {run_id} was aborted before it started: nothing ran{where}")
        else:
            todo = ("left to undo by hand: " + ", ".join(str(item["step"]) for item in left)) if left else \
                "no completed step was left undone"
            resume = f" (`flowdsl resume {run_id}` goes on with it from there)" if record else ""
            super().__init__(f"run {run_id} was aborted {stopped_while(status)}: steps in flight were abandoned "
                             f"and nothing more was compensated; {todo}{where}{resume}")
        self.run_id = run_id
        self.status = status
        self.record = record
        self.result = result
        self.left_to_undo = left


class WorkersMissing(ValueError):
    """The plan names workers that are not registered: the run does not start.

    ``problems``: one sentence per missing worker. ``elsewhere``: the names of those that are registered in the
    process-wide registry (``flowdsl.workers.registry``, where ``@flowdsl.worker`` and the spec's ``workers:``
    modules register) while the run was given another one (``registry=``), which it looks them up in alone.
    """

    def __init__(self, problems: list[str], *, elsewhere: Iterable[str] = ()):
        self.problems = problems
        self.elsewhere = sorted(set(elsewhere))
        hints = []
        if self.elsewhere:
            names = ", ".join(f"'{name}'" for name in self.elsewhere)
            hints.append(f"{names} {'is' if len(self.elsewhere) == 1 else 'are'} registered in the process-wide "
                         "registry (@flowdsl.worker, and the spec's 'workers:' modules when import_workers is true, "
                         "register there), not in the registry passed as registry=, the only one the run looks in: "
                         "register them in that registry (registry.register(name, fn), or "
                         "@flowdsl.worker(name, registry_=registry)), or pass no registry")
        if len(self.elsewhere) < len(problems):
            hints.append("register workers with @flowdsl.worker in a module that the spec's 'workers:' lists")
        super().__init__("the run cannot start: " + "; ".join(problems) + " (" + "; ".join(hints) + ")")


class RunIdInUse(ValueError):
    """A run with this id is in progress in this process: a second one would hand its workers the same idempotency
    keys (two orders, one key: a payment gateway takes the second for a repeat of the first). ``run_id``: the id."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"run id '{run_id}' is in use by a run in progress in this process: two runs of one id "
                         "would hand their workers the same idempotency keys; give each run an id of its own (or "
                         "none: a new one is made)")


#: the ids of the runs in progress in this process (:meth:`LocalRun.run`), and the lock taking one
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _claim(run_id: str) -> None:
    with _LIVE_LOCK:
        if run_id in _LIVE:
            raise RunIdInUse(run_id)
        _LIVE.add(run_id)


def _release_id(run_id: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(run_id)


def _registered_elsewhere(plan: dict[str, Any], registry: WorkerRegistry | None) -> list[str]:
    """The workers the plan names that ``registry`` (one given instead of the process-wide one) lacks but the
    process-wide registry has."""
    if registry is None or registry is default_registry:
        return []
    return sorted({name for _, _, name in worker_references(plan) if name not in registry and name in default_registry})

