"""Every conformance spec and example renders in every format and option without error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flowdsl.render import FORMATS, render
from tests.render.cases import compile_plan, conformance_specs, example_specs

SPECS = conformance_specs() + example_specs()
HAS_DOT = shutil.which("dot") is not None


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_renders_in_every_format(spec: Path) -> None:
    plan = compile_plan(spec)
    states = {key: "succeeded" for key in plan["nodes"]}
    for fmt in FORMATS:
        if fmt in ("svg", "png") and not HAS_DOT:
            continue
        for run_states in (None, states):
            out = render(plan, fmt, run_states=run_states)
            assert out, (spec, fmt)
            if fmt == "png":
                assert isinstance(out, bytes) and out.startswith(b"\x89PNG")
            else:
                assert isinstance(out, str)
            if fmt == "svg":
                assert "<svg" in out
    ascii_only = render(plan, "ascii", ascii_only=True)
    assert isinstance(ascii_only, str) and ascii_only.isascii()
    fenced = render(plan, "mermaid", markdown=True)
    assert isinstance(fenced, str) and fenced.startswith("```mermaid\nflowchart TD\n") and fenced.endswith("```\n")


@pytest.mark.parametrize("spec", example_specs(), ids=lambda p: p.parent.name)
def test_examples_fit_80_columns(spec: Path) -> None:
    for ascii_only in (False, True):
        text = render(compile_plan(spec), "ascii", ascii_only=ascii_only)
        assert isinstance(text, str)
        widest = max(len(line) for line in text.splitlines())
        assert widest <= 80, f"{spec}: {widest} columns"
