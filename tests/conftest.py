"""Shared test fixtures: golden files, the repository root, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.goldens import Goldens

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite golden files (plans, diagnostics, diagrams) from the current output")


@pytest.fixture
def goldens(request: pytest.FixtureRequest) -> Goldens:
    return Goldens(bool(request.config.getoption("--update-goldens")))


@pytest.fixture
def root() -> Path:
    return ROOT
