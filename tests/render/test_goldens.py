"""Golden diagrams for every conformance spec and both examples, in every text format.

Regenerate with ``make goldens`` (``pytest --update-goldens``) after an intended change.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowdsl.render import render
from tests.render.cases import TEXT_FORMATS, compile_plan, conformance_specs, example_specs, golden_path

SPECS = conformance_specs() + example_specs()


def _id(spec: Path) -> str:
    return spec.parent.name if spec.name == "flow.yaml" else spec.stem


def test_there_are_cases() -> None:
    assert len(example_specs()) >= 2
    assert conformance_specs(), "no conformance specs found under specs/conformance/valid"


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_golden(spec: Path, fmt: str, goldens) -> None:
    goldens.check(golden_path(spec, fmt), render(compile_plan(spec), fmt))


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_deterministic(spec: Path) -> None:
    """Same plan, same bytes: rendering twice, or from a second compilation, changes nothing."""
    first, second = compile_plan(spec), compile_plan(spec)
    for fmt in TEXT_FORMATS:
        assert render(first, fmt) == render(first, fmt) == render(second, fmt)
