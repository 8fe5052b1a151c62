"""Escaping and ids: whatever characters ids, labels and expressions hold, every form stays valid."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdsl
from flowdsl.render import render
from flowdsl.render.dot import quote
from flowdsl.render.mermaid import label, node_id, text
from tests.render.cases import NASTY
from tests.render.weird import DIRECTIVE_TEXTS, WEIRD_KEYS, empty_group_plans, weird_plan

HAS_DOT = shutil.which("dot") is not None


@given(st.text(max_size=20), st.text(max_size=20))
@settings(max_examples=300, deadline=None)
def test_mermaid_ids_are_injective_identifiers(a: str, b: str) -> None:
    ida, idb = node_id("step", a), node_id("step", b)
    assert re.fullmatch(r"[A-Za-z0-9_]+", ida)
    assert (ida == idb) == (a == b)


def test_mermaid_ids_of_roles_never_collide() -> None:
    roles = ["step", "llm", "undo", "join", "fanout", "gather", "decision", "merge", "empty"]
    ids = {node_id(role, key) for role in roles for key in WEIRD_KEYS}
    assert len(ids) == len(roles) * len(WEIRD_KEYS)
    assert "end" not in ids and "graph" not in ids


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_mermaid_text_never_closes_a_string(s: str) -> None:
    escaped = text(s)
    assert not set(escaped) & set('"<>`|%\n\r')  # no `%`: no `%%{init: ...}%%` directive in a label
    assert "#" not in re.sub(r"#(quot|35|37|amp|lt|gt|96|124);", "", escaped)


def test_mermaid_label_is_never_empty() -> None:
    assert label("") != "" and label("", ["", ""]) != ""


def test_nasty_spec_keeps_its_text_in_mermaid() -> None:
    out = render(flowdsl.compile_text(NASTY), "mermaid")
    assert isinstance(out, str)
    assert "<script>" not in out and "#lt;script#gt;" not in out  # description of the flow is not drawn
    assert "s_end[" in out and "\n    end\n" in out  # a step called `end` is s_end; `end` closes subgraphs only
    assert "#quot;]#quot;" in out  # the `when` expression, quotes escaped
    assert "= a#quot;b" in out and "= #lt;b#gt;#124;x#124;#lt;/b#gt;" in out  # case labels
    for line in out.splitlines():
        assert line.count('"') % 2 == 0, line


def test_no_label_holds_a_mermaid_directive() -> None:
    """Mermaid reads ``%%{init: ...}%%`` anywhere, quoted labels included: no ``%`` of user text gets through
    (tests/render/test_mermaid_parser.py checks the same with Mermaid's own parser)."""
    out = render(weird_plan(DIRECTIVE_TEXTS), "mermaid", run_states={"end": "failed"})
    assert isinstance(out, str)
    assert "%" not in out and "#37;#37;{init: {'theme':'forest'}}#37;#37;" in out


def test_quote_escapes_dot_strings() -> None:
    assert quote('a"b\\c') == '"a\\"b\\\\c"'


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz 'dot' is not installed")
def test_dot_draws_weird_keys_as_distinct_nodes() -> None:
    dot_text = render(weird_plan(), "dot")
    assert isinstance(dot_text, str)
    out = subprocess.run(["dot", "-Tjson"], input=dot_text.encode(), capture_output=True, check=True, timeout=60)
    names = {obj.get("name") for obj in json.loads(out.stdout).get("objects", [])}
    for key in WEIRD_KEYS:
        assert f"step:{key}" in names, key
    assert sum(1 for n in names if n and n.startswith("undo:")) == len(WEIRD_KEYS) // 2


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz 'dot' is not installed")
def test_svg_shows_markup_as_text() -> None:
    svg = render(flowdsl.compile_text(NASTY), "svg")
    assert isinstance(svg, str)
    assert "<script" not in svg and "<b>" not in svg
    assert "&lt;b&gt;" in svg and "ünïcødé 🚀 中文" in svg


def random_texts(n: int, seed: int = 7) -> list[str]:
    """Deterministic nasty strings for the Mermaid parser test."""
    alphabet = [*list('"\'`<>&|[]{}()#;:%-.=!/\\ \t\nabcXYZ019_'), "ü", "中", "🚀", "\u200b", "\x7f", "end", "-->"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_ascii_and_dot_survive_random_texts() -> None:
    plan = weird_plan(random_texts(40))
    for fmt in ("ascii", "dot", "mermaid"):
        assert render(plan, fmt)
    assert render(plan, "ascii", ascii_only=True).isascii()  # user text too: accents dropped, the rest as ?


def test_empty_groups_are_drawn_not_crashed_on() -> None:
    for kind, plan in empty_group_plans().items():
        for fmt in ("mermaid", "ascii", "dot"):
            assert render(plan, fmt), (kind, fmt)
