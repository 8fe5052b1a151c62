"""Every conformance spec and example renders in every format and option without error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from flowdsl.render import FORMATS, render
from flowdsl.render.view import Glyphs, retry_text
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


RETRY_FILTERS = """
flowdsl: 1
name: filters
steps:
  - charge:
      retry: {attempts: 4, "on": [GatewayTimeout], not_on: [CardDeclined, Fraud]}
      compensate: {worker: refund, retry: {attempts: 6, not_on: [AlreadyRefunded]}}
"""


def test_retry_filters_are_drawn_in_every_text_format() -> None:
    """What a retry retries (``on``) and what it never retries (``not_on``), in every form alike."""
    import re

    import flowdsl

    plan = flowdsl.compile_text(RETRY_FILTERS)
    for fmt in ("mermaid", "ascii", "dot"):
        for ascii_only in (False, True) if fmt == "ascii" else (False,):
            # at 40 columns the undo box moves into its step's box: each label's lines are read one after another
            out = render(plan, fmt, ascii_only=ascii_only, width=40) if fmt == "ascii" else render(plan, fmt)
            assert isinstance(out, str)
            words = re.sub(r"[│┆║|<>/]", " ", out).split()
            text = " ".join(words)
            assert "on GatewayTimeout not_on CardDeclined,Fraud" in text, (fmt, ascii_only)
            assert "not_on AlreadyRefunded" in text, (fmt, ascii_only)


@pytest.mark.parametrize(("retry", "label"), [
    ({"attempts": 2, "initial_ms": 10, "max_ms": 30000, "backoff": "exponential"}, "↻2 10ms"),
    ({"attempts": 4, "initial_ms": 200, "max_ms": 30000, "backoff": "exponential"}, "↻4 exp 200ms..800ms"),
    ({"attempts": 8, "initial_ms": 200, "max_ms": 2000, "backoff": "exponential"}, "↻8 exp 200ms..2s"),
    ({"attempts": 40, "initial_ms": 1, "max_ms": 5000, "backoff": "exponential", "multiplier": 1e6},
     "↻40 exp×1e+06 1ms..5s"),
    ({"attempts": 3, "initial_ms": 100, "max_ms": 30000, "backoff": "linear"}, "↻3 lin 100ms..200ms"),
    ({"attempts": 3, "initial_ms": 100, "max_ms": 30000, "backoff": "constant"}, "↻3 every 100ms"),
])
def test_a_retry_label_shows_the_waits_its_attempts_reach(retry: dict[str, Any], label: str) -> None:
    """The cap (``max``) is shown only when the retries reach it: ``↻2 exp 10ms..30s`` promised a 30 s wait that two
    attempts never have."""
    assert retry_text(retry, Glyphs.pick(False)) == label
