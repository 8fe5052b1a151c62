"""Mermaid validity, proved with Mermaid's own parser (npm package ``mermaid`` under jsdom).

Every diagram — each conformance spec and example, with and without run states,
a plan with wait nodes and one with keyed waits (each with and without a run), the nasty spec, a plan with
weird keys and random texts, plans and a spec whose labels try to smuggle in
Mermaid directives, the Mermaid blocks of docs/diagrams.md, and a deliberately
broken one as a control — is parsed in one Node.js process (Mermaid takes a
couple of seconds to load), by ``mermaid_texts.mjs`` run from tests/mermaid.
Each must parse, set no configuration (a label holding ``%%{init: ...}%%``
would, were ``%`` not escaped), and the hostile labels must read back exactly
as written; wait nodes must be read as their own shape. Install the checker with
``npm ci --prefix tests/mermaid`` (``.ci/run`` does); the tests skip only when
``node`` or the installed checker is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import flowdsl
from flowdsl.render import STATES, render
from flowdsl.render.runstate import derive_states
from tests.render.cases import NASTY, compile_plan, conformance_specs, example_specs
from tests.render.test_escaping import random_texts
from tests.render.wait_plans import keyed_plan, keyed_run, wait_plan, waiting_run
from tests.render.weird import DIRECTIVE_TEXTS, empty_group_plans, weird_plan

CHECKER = Path(__file__).resolve().parents[1] / "mermaid"
SCRIPT = Path(__file__).with_name("mermaid_texts.mjs")
BROKEN = "flowchart TD\n    a[\"unclosed] --> end\n"
#: a spec that puts directives wherever user text reaches a Mermaid label: flow name aside (an id),
#: descriptions of steps and groups, conditions, switch case labels (edge labels), compensations
DIRECTIVE_SPEC = "\n".join([
    "flowdsl: 1", "name: directive_flow", "steps:",
    "  - a:", f"      description: {json.dumps(DIRECTIVE_TEXTS[0])}", "      compensate: undo_a",
    f"      when: {json.dumps('${ x = ' + json.dumps(DIRECTIVE_TEXTS[1]) + ' }')}",
    "  - switch: pick", f"    description: {json.dumps(DIRECTIVE_TEXTS[2])}",
    f"    'on': {json.dumps('${ k & ' + json.dumps(DIRECTIVE_TEXTS[3]) + ' }')}",
    "    cases:", *(f"      {json.dumps(t)}: [c{i}]" for i, t in enumerate(DIRECTIVE_TEXTS)),
    "  - parallel: lanes", f"    description: {json.dumps(DIRECTIVE_TEXTS[6])}",
    "    branches: [b1, b2]", ""])


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
    waits = wait_plan()
    out["waits"] = str(render(waits, "mermaid"))
    out["waits +run"] = str(render(waits, "mermaid", run_states=derive_states(waits, waiting_run())))
    keyed = keyed_plan()
    out["keyed waits"] = str(render(keyed, "mermaid"))
    out["keyed waits +run"] = str(render(keyed, "mermaid", run_states=derive_states(keyed, keyed_run())))
    out["nasty"] = str(render(flowdsl.compile_text(NASTY), "mermaid"))
    out["weird keys"] = str(render(weird_plan(), "mermaid"))
    out["random texts"] = str(render(weird_plan(random_texts(60)), "mermaid", run_states={"end": "failed"}))
    out["directives"] = str(render(weird_plan(DIRECTIVE_TEXTS), "mermaid"))
    out["directives +run"] = str(render(weird_plan(DIRECTIVE_TEXTS), "mermaid", run_states={"end": "failed"}))
    out["directive spec"] = str(render(flowdsl.compile_text(DIRECTIVE_SPEC), "mermaid"))
    for kind, plan in empty_group_plans().items():
        out[f"empty {kind}"] = str(render(plan, "mermaid"))
    docs = (CHECKER.parents[1] / "docs" / "diagrams.md").read_text(encoding="utf-8")
    for i, block in enumerate(re.findall(r"^```mermaid\n(.*?)^```$", docs, flags=re.M | re.S)):
        out[f"docs/diagrams.md block {i + 1}"] = block
    out["control: broken"] = BROKEN
    out["control: directive"] = "%%{init: {'theme': 'forest'}}%%\nflowchart TD\n    a --> b\n"
    return out


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Every diagram, and what Mermaid's parser made of each: ``{error, config, texts}``."""
    node = _node()
    diagrams = _diagrams()
    proc = subprocess.run([node, "--input-type=module", "--eval", SCRIPT.read_text(encoding="utf-8")],
                          input=json.dumps(diagrams).encode(), capture_output=True, timeout=120, cwd=CHECKER)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    results = json.loads(proc.stdout)
    assert set(results) == set(diagrams)
    return diagrams, results


def test_every_diagram_parses_with_mermaid(parsed: tuple[dict[str, str], dict[str, dict[str, Any]]]) -> None:
    diagrams, results = parsed
    assert results["control: broken"]["error"], "the checker accepted a broken diagram: it is not checking"
    failures = {name: r["error"] for name, r in results.items() if r["error"] and name != "control: broken"}
    assert not failures, "\n\n".join(f"{name}:\n{err}\n--- diagram ---\n{diagrams[name]}"
                                     for name, err in failures.items())[:8000]


def test_no_label_sets_mermaid_configuration(parsed: tuple[dict[str, str], dict[str, dict[str, Any]]]) -> None:
    """A ``%%{init: ...}%%`` in a label would set the theme, or CSS that hides the undo boxes."""
    _, results = parsed
    assert results["control: directive"]["config"], "the checker does not see directives: it is not checking"
    configured = {name: r["config"] for name, r in results.items() if r["config"] and not name.startswith("control")}
    assert not configured


def test_hostile_labels_read_back_as_written(parsed: tuple[dict[str, str], dict[str, dict[str, Any]]]) -> None:
    """Each hostile text is shown whole (line breaks of wrapping aside): nothing was taken as syntax."""
    _, results = parsed
    for name in ("directives", "directives +run", "directive spec"):
        shown = ["".join(t.split()) for t in results[name]["texts"]]
        for hostile in DIRECTIVE_TEXTS:
            want = "".join(hostile.split())
            assert any(want in t for t in shown), (name, hostile, results[name]["texts"])


def test_wait_nodes_are_flags_steps_boxes(parsed: tuple[dict[str, str], dict[str, dict[str, Any]]]) -> None:
    """Mermaid reads a wait node as its own shape (the flag ``>"..."]``, type ``odd``), not a step's box."""
    _, results = parsed
    for name in ("waits", "waits +run"):
        shapes = results[name]["shapes"]
        assert {k: v for k, v in shapes.items() if k.startswith("w_")} == dict.fromkeys(
            ("w_payment__confirmed", "w_approval", "w_cooling__off", "w_settle"), "odd"), shapes
        assert shapes["s_process__payment"] == shapes["s_ship__order"] == "square"
    for name in ("keyed waits", "keyed waits +run"):
        shapes = results[name]["shapes"]
        assert {k: v for k, v in shapes.items() if k.startswith("w_")} == {"w_delivered": "odd", "w_paid": "odd"}
