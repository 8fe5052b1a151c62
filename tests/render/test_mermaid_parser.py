"""Mermaid validity, proved with Mermaid's own parser (npm package ``mermaid`` under jsdom).

Every diagram — each conformance spec and example, with and without run states,
the nasty spec, a plan with weird keys and random texts, the Mermaid blocks of
docs/diagrams.md, and a deliberately broken one as a control — is parsed in one Node.js process (Mermaid takes a
couple of seconds to load). Install the checker with
``npm ci --prefix tests/mermaid`` (``.ci/run`` does); the test skips only when
``node`` or the installed checker is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import flowdsl
from flowdsl.render import STATES, render
from tests.render.cases import NASTY, compile_plan, conformance_specs, example_specs
from tests.render.test_escaping import random_texts
from tests.render.weird import empty_group_plans, weird_plan

CHECKER = Path(__file__).resolve().parents[1] / "mermaid"
BROKEN = "flowchart TD\n    a[\"unclosed] --> end\n"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (needed to run Mermaid's parser)")
    if not (CHECKER / "node_modules" / "mermaid" / "package.json").is_file() \
            or not (CHECKER / "node_modules" / "jsdom" / "package.json").is_file():
        pytest.skip("the Mermaid checker is not installed: run `npm ci --prefix tests/mermaid`")
    return node


def _diagrams() -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in conformance_specs() + example_specs():
        plan = compile_plan(spec)
        name = f"{spec.parent.name}/{spec.stem}"
        keys = sorted(plan["nodes"])
        cycling = {key: STATES[i % len(STATES)] for i, key in enumerate(keys)}
        out[name] = str(render(plan, "mermaid"))
        out[name + " +run"] = str(render(plan, "mermaid", run_states=cycling))
    out["nasty"] = str(render(flowdsl.compile_text(NASTY), "mermaid"))
    out["weird keys"] = str(render(weird_plan(), "mermaid"))
    out["random texts"] = str(render(weird_plan(random_texts(60)), "mermaid", run_states={"end": "failed"}))
    for kind, plan in empty_group_plans().items():
        out[f"empty {kind}"] = str(render(plan, "mermaid"))
    docs = (CHECKER.parents[1] / "docs" / "diagrams.md").read_text(encoding="utf-8")
    for i, block in enumerate(re.findall(r"^```mermaid\n(.*?)^```$", docs, flags=re.M | re.S)):
        out[f"docs/diagrams.md block {i + 1}"] = block
    out["control: broken"] = BROKEN
    return out


def test_every_diagram_parses_with_mermaid() -> None:
    node = _node()
    diagrams = _diagrams()
    proc = subprocess.run([node, str(CHECKER / "check.mjs")], input=json.dumps(diagrams).encode(),
                          capture_output=True, timeout=120, cwd=CHECKER)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    results = json.loads(proc.stdout)
    assert set(results) == set(diagrams)
    assert results.pop("control: broken"), "the checker accepted a broken diagram: it is not checking"
    failures = {name: err for name, err in results.items() if err}
    assert not failures, "\n\n".join(f"{name}:\n{err}\n--- diagram ---\n{diagrams[name]}"
                                     for name, err in failures.items())[:8000]
