"""Hostile input to the checks: specs that made a check quadratic or its report a flood, values a check let
through that are known to be wrong before anything runs, and forms it did not see.

Each case gets a clear diagnostic — a code, a place, what was expected — in bounded time: FD307 between
many writers of one key, "did you mean" among many names, durations spelt with a part out of range, retry
attempts without bound, a for_each over a constant that is not a list, step results read with brackets or
``$lookup``, and a ``version`` YAML reads as a number with a fraction.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import flowdsl.compiler_checks
from flowdsl.api import compile_text
from flowdsl.compiler import _Compiler
from flowdsl.diagnostics import CODES, Diagnostic, SpecError, Suggestions
from flowdsl.model import build_flow, parse_duration

ROOT = Path(__file__).resolve().parent.parent
HEAD = "flowdsl: 1\nname: hostile\n"


def diagnostics_of(text: str, filename: str = "spec.yaml") -> list[Diagnostic]:
    """Every diagnostic the front end, checks and compiler give for ``text`` (none: it compiled)."""
    try:
        compile_text(text, filename=filename)
    except SpecError as exc:
        for d in exc.diagnostics:
            assert d.code in CODES and d.message == d.message.strip() and d.line is not None, d
        return exc.diagnostics
    return []


def spec(steps: str) -> str:
    return HEAD + textwrap.dedent(steps)


def timed(text: str, limit: float) -> list[Diagnostic]:
    started = time.perf_counter()
    diags = diagnostics_of(text)
    assert time.perf_counter() - started < limit
    return diags


# --- FD307: many writers of one key ----------------------------------------------------------------------------


def test_many_parallel_writers_of_one_key_give_one_diagnostic_each_quickly() -> None:
    # was one diagnostic per pair (499,500) in ~6 s
    branches = "".join(f"      - s{i}: {{output: r}}\n" for i in range(1000))
    diags = timed(HEAD + "steps:\n  - parallel: p\n    branches:\n" + branches, 3)
    assert [d.code for d in diags] == ["FD307"] * 999
    assert [d.line for d in diags] == list(range(7, 1006))
    assert diags[0].message == "'s1' and 's0' may run at the same time and both write 'r'; give one of them " \
                               "another output name"
    assert diags[-1].message == "'s999' may run at the same time as 's0', 's1', 's2' and 996 other nodes listed " \
                                "before it, which also write 'r'; give all but one of them another output name"


def test_many_writers_of_one_key_in_a_sequence_are_checked_in_linear_time() -> None:
    # a valid spec: each writer replaces the one before; was a graph search per pair (~10 s for 800)
    steps = "".join(f"  - s{i}: {{output: r}}\n" for i in range(800))
    assert timed(HEAD + "steps:\n" + steps, 2) == []


def test_many_writers_that_need_nothing_race_each_with_those_before() -> None:
    steps = "".join(f"  - s{i}: {{output: r, needs: []}}\n" for i in range(600))
    diags = timed(HEAD + "steps:\n" + steps, 3)
    assert len(diags) == 599 and diags[-1].message.startswith("'s599' may run at the same time as 's0', 's1', "
                                                              "'s2' and 596 other nodes listed before it")


@pytest.mark.parametrize(("writers", "last"), [
    (2, "'b' and 'a' may run at the same time and both write 'r'; give one of them another output name"),
    (3, "'c' may run at the same time as 'a' and 'b', which also write 'r'; give all but one of them another "
        "output name"),
    (5, "'e' may run at the same time as 'a', 'b', 'c' and 1 other node listed before it, which also write 'r'; "
        "give all but one of them another output name"),
])  # fmt: skip
def test_the_wording_names_a_few_racers_and_counts_the_rest(writers: int, last: str) -> None:
    branches = "".join(f"      - {chr(97 + i)}: {{output: r}}\n" for i in range(writers))
    diags = diagnostics_of(HEAD + "steps:\n  - parallel: p\n    branches:\n" + branches)
    assert len(diags) == writers - 1 and diags[-1].message == last


def test_writers_in_one_case_of_a_switch_race() -> None:
    # cases never both run; two branches of a parallel inside one case do (they were taken for exclusive)
    diags = diagnostics_of(spec("""\
        steps:
          - switch: s
            on: "${ k }"
            cases:
              x:
                - parallel: p
                  branches:
                    - c: {output: q}
                    - d: {output: q}
              y: [e: {output: q}]
        """))
    assert [(d.code, d.line) for d in diags] == [("FD307", 11)]
    assert diags[0].message.startswith("'d' and 'c' may run at the same time")


def test_needs_order_some_writers_and_not_others() -> None:
    diags = diagnostics_of(spec("""\
        steps:
          - a: {output: r}
          - b: {output: r, needs: []}
          - c: {output: r, needs: [a, b]}
          - d: {output: r, needs: [a]}
          - e: {output: r, needs: [c, d]}
        """))
    assert [(d.line, d.message.split(",")[0]) for d in diags] == [
        (5, "'b' and 'a' may run at the same time and both write 'r'; give one of them another output name"),
        (7, "'d' may run at the same time as 'b' and 'c'")]


def test_a_list_with_needs_too_large_to_search_every_pair_still_reports_races(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowdsl.compiler_checks, "_RACE_BITS", 4)
    diags = diagnostics_of(spec("""\
        steps:
          - a: {output: r}
          - b: {output: r, needs: []}
          - c: {output: r, needs: []}
          - d: {output: r, needs: [a, b, c]}
        """))
    # each reported pair races; which pairs are found depends on the order the deps are walked in
    assert [d.line for d in diags] == [5, 6]
    assert all(" may run at the same time and both write 'r'" in d.message for d in diags)


def _racers_in(message: str) -> int:
    """How many earlier writers an FD307 message counts."""
    if "and both write" in message:
        return 1
    listed = message.split(" may run at the same time as ", 1)[1].split(", which also write", 1)[0]
    more = re.search(r" and (\d+) other nodes? listed before it$", listed)
    return 3 + int(more.group(1)) if more else len(re.findall(r"'[^']*'", listed))


def _random_nodes(rng: random.Random, depth: int, ids: list[int], branches: bool = False) -> list[Any]:
    """A random list of nodes: steps that write 'r' or not, groups, and 'needs' forming an acyclic graph
    (none between ``branches`` of a parallel, which are not one list)."""
    nodes: list[Any] = []
    for _ in range(rng.randint(1, 4)):
        ids[0] += 1
        name = f"n{ids[0]}"
        kind = rng.choice(["step", "step", "step", "parallel", "sequence", "switch"] if depth < 3 else ["step"])
        if kind == "step":
            nodes.append({name: {"output": "r"} if rng.random() < 0.7 else {}})
        elif kind == "parallel":
            nodes.append({"parallel": name, "branches": _random_nodes(rng, depth + 1, ids, branches=True)})
        elif kind == "sequence":
            nodes.append({"sequence": name, "steps": _random_nodes(rng, depth + 1, ids)})
        else:
            nodes.append({"switch": name, "on": "${ k }", "cases": {
                "x": _random_nodes(rng, depth + 1, ids), "y": _random_nodes(rng, depth + 1, ids)}})
    names = [n.get("parallel") or n.get("sequence") or n.get("switch") or next(iter(n)) for n in nodes]
    if branches or rng.random() < 0.4:
        return nodes  # a plain sequence (or branches)
    order = list(range(len(nodes)))
    rng.shuffle(order)  # each node needs some of the nodes before it in this order: acyclic, may name later ones
    for at, i in enumerate(order):
        options = nodes[i] if names[i] not in nodes[i] or len(nodes[i]) > 1 else nodes[i][names[i]]
        options["needs"] = sorted(rng.sample([names[j] for j in order[:at]], rng.randint(0, at)))
    return nodes


class _Random:
    """A random flow, compiled (its graph checks made), and a search of its flow graph to check them against."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        flow, diags = build_flow({"flowdsl": 1, "name": "random", "steps": _random_nodes(rng, 0, [0])})
        assert diags == []
        self.compiler = _Compiler(flow)
        self.diagnostics = self.compiler.run(build=False).diagnostics
        assert {d.code for d in self.diagnostics} <= {"FD307"}

    def reaches(self, a: str, b: str) -> bool:
        """A path in the flow graph from ``a``'s exit to ``b``'s entry."""
        c = self.compiler
        source, target = c.exit(a), c.entry(b)
        seen, todo = {source}, [source]
        while todo:
            v = todo.pop()
            if v == target:
                return True
            for w in c.succ[v]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return False

    def chain(self, key: str) -> list[str]:
        out = [key]
        while (parent := self.compiler.entries[out[-1]].parent) is not None:
            out.append(parent)
        return out

    def exclusive(self, a: str, b: str) -> bool:
        """In two cases of the switch that is their innermost common ancestor."""
        up_a, up_b = self.chain(a), self.chain(b)
        common = next((k for k in up_a if k in up_b), None)
        node = self.compiler.entries[common].node if common is not None else None
        if node is None or node.kind != "switch":
            return False
        ids = [self.compiler.entries[up[up.index(common) - 1]].node.id for up in (up_a, up_b)]
        labels = [next(label for label, kids in node.cases if any(k.id == i for k in kids)) for i in ids]
        return labels[0] != labels[1]

    def check_order(self) -> None:
        for a in self.compiler.entries:
            for b in self.compiler.entries:
                assert a == b or self.compiler.before(a, b) == self.reaches(a, b), (a, b)


@pytest.mark.parametrize("seed", range(60))
def test_fd307_agrees_with_a_search_of_the_graph_for_every_pair(seed: int) -> None:
    flow = _Random(seed)
    flow.check_order()  # the order read from the tree of groups is the graph's
    found = {d.path: _racers_in(d.message) for d in flow.diagnostics}
    entries = flow.compiler.entries
    writers = [k for k, e in entries.items() if e.node.output.name == "r"]
    expected = {}
    for j, b in enumerate(writers):
        racing = sum(1 for a in writers[:j]
                     if not flow.reaches(a, b) and not flow.reaches(b, a) and not flow.exclusive(a, b))
        if racing:
            expected[entries[b].node.opts] = racing
    assert found == expected


@pytest.mark.parametrize("seed", range(20))
def test_the_order_of_nodes_in_lists_too_large_for_bit_sets_is_searched_alike(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowdsl.compiler_checks, "_RACE_BITS", 0)
    _Random(seed).check_order()


# --- "did you mean" among many names ----------------------------------------------------------------------------


def test_thousands_of_unknown_needs_among_thousands_of_siblings_are_fast() -> None:
    # was a comparison of every unknown name with every sibling: ~8 s
    steps = "".join(f"  - s{i}\n" for i in range(3000))
    needs = ", ".join(f"zz{i}q" for i in range(3000))
    diags = timed(HEAD + "steps:\n" + steps + f"  - b: {{needs: [{needs}]}}\n", 3)
    assert len(diags) == 3000 and {d.code for d in diags} == {"FD303"}


def test_thousands_of_unknown_step_results_are_fast() -> None:
    steps = "".join(f"  - s{i}\n" for i in range(2000))
    reads = "".join(f"  - r{i}: {{with: {{x: \"${{ $steps.zz{i}q }}\"}}}}\n" for i in range(2000))
    diags = timed(HEAD + "steps:\n" + steps + reads, 4)
    assert len(diags) == 2000 and {d.code for d in diags} == {"FD303"}


def test_a_misspelt_need_is_still_suggested_among_many_siblings() -> None:
    steps = "".join(f"  - step_{i}\n" for i in range(3000))
    needs = ", ".join(["chek_fraud", *(f"zz{i}q" for i in range(3000))])
    diags = diagnostics_of(HEAD + "steps:\n  - check_fraud\n" + steps + f"  - b: {{needs: [{needs}]}}\n")
    assert "'b' needs 'chek_fraud', which is not a step or group (did you mean 'check_fraud'?)" in diags[0].message


def test_suggestions_are_difflibs_until_the_budget_is_spent_then_among_neighbours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"node_{i}" for i in range(500)] + ["check_fraud", "fetch_prices", "reserve_items"]
    exact = Suggestions(names)
    assert exact.hint("chek_fraud") == " (did you mean 'check_fraud'?)"
    assert exact.hint("fetch_price") == " (did you mean 'fetch_prices'?)"
    assert exact.hint("zzzz") == ""
    monkeypatch.setattr(flowdsl.diagnostics, "SUGGESTION_BUDGET", 0)
    near = Suggestions(names)
    assert near.hint("chek_fraud") == " (did you mean 'check_fraud'?)"  # shares its start
    assert near.hint("xreserve_items") == " (did you mean 'reserve_items'?)"  # shares its end
    assert near.hint("zzzz") == ""


# --- durations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("1h60m", "'1h60m' has '60m' after a larger unit, where it must be less than 60m; write 2h"),
    ("1h90m", "'1h90m' has '90m' after a larger unit, where it must be less than 60m; write 2h30m"),
    ("1h90s", "'1h90s' has '90s' after a larger unit, where it must be less than 60s; write 1h1m30s"),
    ("1m60s", "'1m60s' has '60s' after a larger unit, where it must be less than 60s; write 2m"),
    ("2s1500ms", "'2s1500ms' has '1500ms' after a larger unit, where it must be less than 1000ms; write 3s500ms"),
    ("1.5m30s", "'1.5m30s' has a fraction in '1.5m', which is not its last part; only the last part may have "
                "one: write 2m"),
    ("1h 60m", "'1h 60m' has spaces; a duration is written without spaces: '2h'"),
    ("0s", "a duration must be positive, found '0s'"),
    ("1h99999999999m", "'1h99999999999m' is longer than the maximum of 30 days (720h)"),
])  # fmt: skip
def test_a_duration_part_out_of_range_is_refused_with_its_plain_spelling(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "ms"), [
    ("90m", 5_400_000), ("36h", 129_600_000), ("1500ms", 1500), ("1h59m", 7_140_000), ("1m59.5s", 119_500),
    ("1h0m", 3_600_000), ("1s999ms", 1999), ("30s", 30_000),
])  # fmt: skip
def test_a_first_part_of_any_size_and_parts_in_range_are_durations(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


def test_a_duration_out_of_range_is_fd401_where_it_is_written_in_both_syntaxes() -> None:
    (yaml_diag,) = diagnostics_of(HEAD + "steps:\n  - a: {timeout: 1h60m}\n")
    (flow_diag,) = diagnostics_of("flow hostile\nstep a timeout 1h60m\n", "spec.flow")
    for d, line, column in ((yaml_diag, 4, 18), (flow_diag, 2, 16)):
        assert (d.code, d.line, d.column) == ("FD401", line, column)
        assert d.message.endswith("write 2h")


# --- retry attempts -----------------------------------------------------------------------------------------------


def test_retry_attempts_are_at_most_a_thousand() -> None:
    diags = diagnostics_of(spec("""\
        steps:
          - a: {retry: {attempts: 1000000000}}
          - b: {retry: 1001}
          - c: {retry: 1e9}
          - d: {retry: 1000}
          - e: {retry: {attempts: 1000.0}}
          - f: {compensate: {worker: u, retry: 5000}}
        defaults:
          compensate: {retry: {attempts: 2000}}
        """))
    assert [(d.code, d.line) for d in diags] == [("FD201", 4), ("FD201", 5), ("FD201", 6), ("FD201", 9),
                                                 ("FD201", 11)]
    assert diags[0].message == "expected at most 1000 attempts, found 1000000000; to keep trying for longer, " \
                               "give a longer 'max' delay between attempts instead"
    assert "found 1e9;" in diags[2].message  # as written, not 1000000000.0


def test_the_published_schema_bounds_attempts() -> None:
    schema = json.loads((ROOT / "specs" / "flowdsl.schema.json").read_text())
    assert schema["$defs"]["retry"]["maximum"] == 1000
    assert schema["$defs"]["retry"]["properties"]["attempts"]["maximum"] == 1000


# --- for_each over a constant -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("items", "says"), [
    ("\"${ 5 }\"", "for_each 'loop' iterates over a number, 5, not a list: its steps would run once, with it as the "
                   "item; expected an expression that gives a list (\"${ [5] }\" for that one item; \"${ [1..5] }\" "
                   "to run the steps 5 times)"),
    ("\"${ 'abc' }\"", "iterates over a string, \"abc\", not a list"),
    ("\"${ {'k': 1} }\"", "iterates over an object, {\"k\": 1}, not a list"),
    ("\"${ 1 = 1 }\"", "iterates over true or false, true, not a list"),
    ("5", "expected an expression: ${ jsonata }, found 5; to run the steps 5 times, iterate over \"${ [1..5] }\""),
    ("[1, 2]", "expected an expression: ${ jsonata }, found a list; write the list as an expression: "
               "\"${ [1, 2] }\""),
    ("abc", "'items' must be one expression written as \"${ ... }\", found 'abc'"),
])  # fmt: skip
def test_a_for_each_over_a_constant_that_is_not_a_list_is_refused_before_it_runs(items: str, says: str) -> None:
    (d,) = diagnostics_of(HEAD + f"steps:\n  - for_each: loop\n    items: {items}\n    steps: [a]\n")
    assert (d.line, d.column, d.path) == (5, 12, "/steps/0/items")
    assert says in d.message


@pytest.mark.parametrize("items", ["${ [1, 2] }", "${ [] }", "${ null }", "${ order.items }", "${ [1..3] }"])
def test_a_for_each_over_a_list_or_data_compiles(items: str) -> None:
    assert diagnostics_of(HEAD + f"steps:\n  - for_each: loop\n    items: \"{items}\"\n    steps: [a]\n") == []


def test_slow_constants_are_evaluated_within_a_budget() -> None:
    # each takes ~0.1 s (a range at the size limit, made into JSON after the time bound; a larger one fails at
    # once): without a budget, 120 of them take 10 s or more
    steps = "".join(f"  - s{i}: {{when: \"${{ [{i + 1}..100000] }}\"}}\n" for i in range(60))
    loops = "".join(f"  - for_each: l{i}\n    items: \"${{ [{i + 61}..100000] }}\"\n    steps: [t{i}]\n"
                    for i in range(60))
    assert timed(HEAD + "steps:\n" + steps + loops, 5) == []


# --- step results read with brackets or $lookup -------------------------------------------------------------------


def test_step_results_read_in_brackets_or_with_lookup_are_checked_like_the_dot_form() -> None:
    diags = diagnostics_of(spec("""\
        steps:
          - fetch_order
          - parallel: both
            branches:
              - charge
              - ship:
                  with:
                    order: "${ $steps['fetch_order'].id }"
                    charge: "${ $lookup($steps, 'charge') }"
                    typo: "${ $lookup($steps, 'fetch_ordr') }"
                    gone: "${ $steps[\\"fetch_ordr\\"] }"
        """))
    assert [(d.code, d.line, d.message) for d in diags] == [
        ("FD303", 10, "in 'with.order': '$steps[\"fetch_order\"]' is not the result of step 'fetch_order': in "
                      "JSONata '[...]' filters, it does not look up (a string keeps every result of $steps); write "
                      "'$steps.fetch_order'"),
        ("FD504", 11, "in 'with.charge': '$lookup($steps, \"charge\")' reads step 'charge', which does not always "
                      "finish before 'ship' starts; add it to 'needs' or move it earlier"),
        ("FD303", 12, "in 'with.typo': '$lookup($steps, \"fetch_ordr\")' names no step (did you mean "
                      "'fetch_order'?)"),
        ("FD303", 13, "in 'with.gone': '$steps[\"fetch_ordr\"]' names no step (did you mean 'fetch_order'?); and in "
                      "JSONata '[...]' filters, it does not look up (a string keeps every result of $steps): write "
                      "'$steps.<id>'"),
    ]  # fmt: skip
    # '.id' after the brackets is a field of the filtered value, never a step named 'id'
    assert not any("'$steps.id'" in d.message for d in diags)


def test_a_bracket_reference_to_a_later_step_is_fd504_too() -> None:
    diags = diagnostics_of(HEAD + "steps:\n  - a: {with: {x: \"${ $steps['b'] }\"}}\n  - b\n")
    assert [d.code for d in diags] == ["FD303", "FD504"]


def test_an_expression_that_reads_steps_as_a_whole_binds_every_step_it_may_read() -> None:
    plan = compile_text(spec("""\
        steps:
          - a
          - b
          - c:
              with:
                one: "${ $steps.a }"
                all: "${ $keys($steps) }"
          - d: {with: {x: "${ $lookup($steps, 'b').v }"}}
        """))
    by_source = {e["source"]: e["steps"] for e in plan["expressions"].values()}
    assert by_source["$keys($steps)"] == []  # [] binds every step before it, not only 'a'
    assert by_source["$steps.a"] == ["a"]
    assert by_source["$lookup($steps, 'b').v"] == ["b"]


# --- version ------------------------------------------------------------------------------------------------------


def test_the_published_schema_takes_a_version_string_or_integer_only() -> None:
    import jsonschema

    schema = json.loads((ROOT / "specs" / "flowdsl.schema.json").read_text())
    assert schema["properties"]["version"]["type"] == ["string", "integer"]
    base = {"flowdsl": 1, "name": "v", "steps": ["a"]}
    jsonschema.validate({**base, "version": 2}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**base, "version": 1.1}, schema)


@pytest.mark.parametrize(("text", "filename", "hint"), [
    (HEAD + "version: 1.10\nsteps: [a]\n", "spec.yaml", 'version: "1.10"'),
    ("flow hostile\nversion 1.10\nstep a\n", "spec.flow", 'version "1.10"'),
])  # fmt: skip
def test_a_version_with_a_fraction_gets_the_hint_quoting_it_as_written(text: str, filename: str, hint: str) -> None:
    (d,) = diagnostics_of(text, filename)
    assert d.code == "FD201" and d.message.startswith(f"the version 1.10 is read as the number 1.1; write it as a "
                                                      f"string: {hint}")


def test_the_version_hint_survives_other_schema_errors() -> None:
    diags = diagnostics_of(HEAD + "version: 1.10\ndescription: 1.10\nsteps:\n  - a: {retry: {attempts: 0}}\n")
    assert [(d.code, d.line) for d in diags] == [("FD201", 3), ("FD201", 4), ("FD201", 6)]
    assert diags[0].message.startswith("the version 1.10 is read as the number 1.1")
    assert diags[1].message == "expected a string, found 1.10"  # as written, not 1.1


def test_a_schema_error_quotes_a_number_as_written_in_both_syntaxes() -> None:
    (y,) = diagnostics_of(HEAD + "description: 0x1F\nsteps: [a]\n")
    (f,) = diagnostics_of("flow hostile\ndescription 1e3\nstep a\n", "spec.flow")
    assert y.message == "expected a string, found 0x1F" and f.message == "expected a string, found 1e3"
    (c,) = diagnostics_of(HEAD + "steps:\n  - for_each: l\n    items: \"${ xs }\"\n    concurrency: 0e0\n"
                                 "    steps: [a]\n")
    assert c.message == "expected a number >= 1 for 'concurrency', found 0e0"
