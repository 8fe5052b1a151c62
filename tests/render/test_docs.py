"""docs/diagrams.md is a golden: every diagram on it is what the renderers draw today.

A ``<!-- diagram: SPEC FORMAT [run=INPUT] -->`` comment is followed by a fenced
block holding that drawing; ``run=INPUT`` first records a run of the example
with ``inputs/INPUT.json`` on the local runtime (run id ``r-INPUT``) and draws
its states. A ``<!-- image: SPEC svg [run=INPUT] -->`` comment is followed by a
Markdown image whose SVG is rewritten by ``--update-goldens`` when Graphviz is
installed (SVG text depends on the Graphviz version, so it is not compared).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from flowdsl.render import render
from flowdsl.render.runstate import RunStates, derive_states, read_events
from tests.render.cases import ROOT, compile_plan

DOC = ROOT / "docs" / "diagrams.md"
MARKER = re.compile(r"^<!-- (diagram|image): (\S+) (\w+)(?: run=(\w+))? -->\n", re.M)
FENCE = re.compile(r"```(\w+)\n(.*?)^```\n", re.M | re.S)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)\n")


class _Drawer:
    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.states: dict[tuple[str, str], RunStates] = {}

    def run_states(self, spec: str, run_input: str | None) -> RunStates | None:
        if run_input is None:
            return None
        if (spec, run_input) not in self.states:
            from flowdsl.runtime.local import run

            plan = compile_plan(ROOT / spec)
            data = json.loads((ROOT / spec).parent.joinpath("inputs", f"{run_input}.json").read_text())
            run_id = f"r-{run_input}"
            run(plan, data, run_id=run_id, runs_dir=self.runs_dir / spec.replace("/", "_"), seed=1)
            events = read_events(self.runs_dir / spec.replace("/", "_") / f"{run_id}.jsonl")
            self.states[(spec, run_input)] = derive_states(plan, events)
        return self.states[(spec, run_input)]

    def draw(self, spec: str, fmt: str, run_input: str | None) -> Any:
        return render(compile_plan(ROOT / spec), fmt, run_states=self.run_states(spec, run_input))


def regenerate(text: str, drawer: _Drawer, images: dict[Path, str]) -> str:
    """The page with every marked diagram redrawn; marked images are collected into ``images``."""
    out: list[str] = []
    pos = 0
    for mark in MARKER.finditer(text):
        what, spec, fmt, run_input = mark.groups()
        out.append(text[pos:mark.end()])
        pos = mark.end()
        if what == "diagram":
            fence = FENCE.match(text, pos)
            assert fence is not None, f"docs/diagrams.md: no fenced block after {mark.group(0).strip()}"
            out.append(f"```{fence.group(1)}\n{drawer.draw(spec, fmt, run_input)}```\n")
            pos = fence.end()
        else:
            image = IMAGE.match(text, pos)
            assert image is not None, f"docs/diagrams.md: no image after {mark.group(0).strip()}"
            images[DOC.parent / image.group(1)] = drawer.draw(spec, fmt, run_input) if shutil.which("dot") else ""
    out.append(text[pos:])
    return "".join(out)


def test_docs_diagrams_are_current(goldens, tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    images: dict[Path, str] = {}
    fresh = regenerate(text, _Drawer(tmp_path), images)
    assert len(MARKER.findall(text)) >= 9
    goldens.check(DOC, fresh)
    for path, svg in images.items():
        if goldens.update and svg:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(svg, encoding="utf-8")
        assert path.is_file(), f"{path} is missing: run `make goldens` (with Graphviz installed)"
