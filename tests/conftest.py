"""Shared test fixtures: golden files, the repository root, offline settings."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.goldens import Goldens

ROOT = Path(__file__).resolve().parent.parent
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network here: never fetch the cost map


def pytest_configure(config: pytest.Config) -> None:
    """A suite started with SIGINT or SIGHUP ignored (a background job, ``nohup``) would hand that on to every
    process it spawns, and the tests that stop a ``flowdsl`` process with Ctrl-C or a hang-up would see it ignore
    them (the CLI leaves an ignored signal alone, on purpose): the defaults, for this process and its children."""
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files (plans, diagnostics, diagrams) from the current output")


@pytest.fixture(autouse=True)
def _stop_signals_put_back() -> Iterator[None]:
    """Each test leaves SIGINT, SIGTERM and SIGHUP as it found them: a disposition left changed (ignored, say)
    would be inherited by every process a later test starts."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)


@pytest.fixture
def goldens(request: pytest.FixtureRequest) -> Goldens:
    return Goldens(bool(request.config.getoption("--update-goldens")))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def dspy() -> Any:
    """DSPy, offline: LiteLLM's cost map from its package (no download), no caches (each test sees its calls)."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before DSPy (and LiteLLM) is imported
    module = pytest.importorskip("dspy")
    module.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    return module


@pytest.fixture
def adapter(dspy: Any) -> Any:
    """DSPy's chat adapter without its JSON fallback: a bad answer fails at once, clearly."""
    return dspy.ChatAdapter(use_json_adapter_fallback=False)
