"""Renderers: draw an execution plan as Mermaid, ASCII art or Graphviz (DOT, SVG, PNG).

Stage: renderer. Reads the plan (docs/plan.md) and, for run states, a run's
recorded events — nothing upstream of the plan; imports stdlib, the
``graphviz`` package lazily for SVG and PNG, and :mod:`flowdsl.runtime.plancheck`
lazily to say what is wrong with a plan it could not draw. One module per format
(:mod:`.mermaid`, :mod:`.ascii`, :mod:`.dot`) over a shared reading of the
plan (:mod:`.view`, :mod:`.graph`); :mod:`.runstate` turns a run's events
into per-step states; :mod:`.command` is the ``flowdsl diagram`` command.

    from flowdsl.render import render
    text = render(plan, "mermaid")                       # str
    svg = render(plan, "svg", run_states={"charge": "failed"})   # bytes
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowdsl.render.runstate import RunStates

#: every format and whether it is text (str) or binary (bytes)
FORMATS = {"mermaid": "text", "ascii": "text", "dot": "text", "svg": "text", "png": "binary"}
#: file extension of each format's golden/output file
EXTENSIONS = {"mermaid": ".mmd", "ascii": ".ascii.txt", "dot": ".dot", "svg": ".svg", "png": ".png"}
#: the text forms ``markdown`` (``--markdown``) wraps, and the info string of each one's fenced block
FENCES = {"mermaid": "mermaid", "ascii": "text", "dot": "dot"}

__all__ = ["EXTENSIONS", "FENCES", "FORMATS", "STATES", "RenderError", "RunStates", "render"]

#: re-exports loaded on first use, so that `flowdsl --help` (which registers the diagram command) stays light
_LAZY = {"STATES": "flowdsl.render.view", "RenderError": "flowdsl.render.view", "RunStates": "flowdsl.render.runstate"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowdsl.render' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def render(plan: Mapping[str, Any], fmt: str, *, run_states: RunStates | Mapping[str, str] | None = None,
           ascii_only: bool = False, markdown: bool = False, width: int | None = None) -> str | bytes:
    """Draw ``plan`` in ``fmt`` (mermaid, ascii, dot, svg, png); ``png`` is bytes, the rest text.

    ``run_states`` colours (or, in ASCII, marks) each step by its state in a run:
    a :class:`RunStates` from :func:`flowdsl.render.runstate.derive_states`, or a plain
    ``{node key: state}`` mapping. ``ascii_only`` restricts the ASCII form to
    7-bit characters; ``markdown`` wraps a text form (Mermaid, ASCII, DOT) in a
    fenced Markdown block (:data:`FENCES` names each one's info string), as
    ``flowdsl diagram --markdown`` does; ``width`` is the ASCII form's target width
    (default 80, at least 40). Raises :class:`RenderError` for an unknown format, an
    option the format does not take, a plan that cannot be drawn (a malformed one:
    the message says what is wrong with it), or a missing Graphviz.
    """
    from flowdsl.render.runstate import RunStates
    from flowdsl.render.view import RenderError, fenced

    if fmt not in FORMATS:
        raise RenderError(f"unknown diagram format '{fmt}'; expected one of {', '.join(FORMATS)}")
    for given, option, applies, forms in (
            (ascii_only, "ascii_only", ("ascii",), "the ascii format"),
            (width is not None, "width", ("ascii",), "the ascii format"),
            (markdown, "markdown", tuple(FENCES), f"the text formats ({', '.join(FENCES)})")):
        if given and fmt not in applies:
            raise RenderError(f"{option} applies to {forms}, not {fmt}")
    states = RunStates.of(run_states)
    plan = dict(plan)
    try:
        drawn = _draw(plan, fmt, states, ascii_only, width)
    except RenderError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # a plan from outside the compiler may be malformed anywhere; the shape check costs more than drawing
        # (~0.1 ms a node), so it runs only to explain a failure, not before every drawing
        from flowdsl.runtime.plancheck import plan_problem

        problem = plan_problem(plan)
        if problem is None:
            raise
        raise RenderError(f"not a flowdsl execution plan: {problem}") from exc
    return fenced(drawn, FENCES[fmt]) if markdown and isinstance(drawn, str) else drawn


def _draw(plan: dict[str, Any], fmt: str, states: RunStates | None, ascii_only: bool,
          width: int | None) -> str | bytes:
    if fmt == "mermaid":
        from flowdsl.render.mermaid import render_mermaid

        return render_mermaid(plan, run_states=states)
    if fmt == "ascii":
        from flowdsl.render.ascii import render_ascii

        return render_ascii(plan, run_states=states, ascii_only=ascii_only, width=80 if width is None else width)
    from flowdsl.render.dot import render_dot, render_image

    dot_text = render_dot(plan, run_states=states)
    if fmt == "dot":
        return dot_text
    data = render_image(dot_text, fmt)
    return data.decode("utf-8") if fmt == "svg" else data
