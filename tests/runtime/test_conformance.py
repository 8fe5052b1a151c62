"""The runtime conformance suite (tests/runtime/conformance.py), run against every runtime.

A runtime takes part through an entry of :data:`RUNTIMES`: a factory given the
pytest request (to reach other fixtures, e.g. a private Redis server) that
returns an object with ``async run(plan, run_input) -> RunResult``. The
workers it must be able to run are those of ``tests.runtime.workers``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.report import RunResult
from tests.redis.runtime import redis_runtime
from tests.runtime.conformance import CASES, Case, check, order_matches


class LocalRuntime:
    """The local asyncio runtime, records off."""

    async def run(self, plan: dict[str, Any], run_input: dict[str, Any]) -> RunResult:
        return await run_flow(plan, run_input, record=False)


#: runtime name -> factory(request); adding a backend is one line here
RUNTIMES: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "local": lambda request: LocalRuntime(),
    "redis": redis_runtime,  # a private redis-server, two `flowdsl worker` processes
}


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> Any:
    return RUNTIMES[request.param](request)


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWDSL_LM", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_runtime_conforms(runtime: Any, case: Case, tmp_path: Path) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    plan = compile_text(case.spec, filename=tmp_path / "spec.yaml")
    result = asyncio.run(runtime.run(plan, case.run_input()))
    check(case, result)


def test_case_names_are_unique_and_expectations_are_checkable() -> None:
    assert len({c.name for c in CASES}) == len(CASES)
    assert order_matches(["a", "c", "b", "d"], ["a", frozenset({"b", "c"}), "d"])
    assert not order_matches(["a", "b"], ["b", "a"])
    assert not order_matches(["a", "b", "c"], ["a", "b"])
