"""FD314: a node reads a context field that only a node which may run at the same time writes, so it never sees
that value (docs/diagnostics.md, FD314; docs/language.md, "The merge rule").

The rule is the kernel's: a node sees its scope's input and its dependencies' contributions. The last tests run
flagged specs through the local runtime and show the reader getting null.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from flowdsl.api import CompileResult, compile_loaded, compile_spec, load_text
from flowdsl.compiler_reads import context_names
from flowdsl.diagnostics import CODES

ROOT = Path(__file__).resolve().parent.parent


def compiled(text: str, name: str = "spec.yaml") -> CompileResult:
    return compile_loaded(load_text(textwrap.dedent(text), name), name)


def fd314(text: str, name: str = "spec.yaml") -> list[tuple[int | None, str, str]]:
    """(line, field, message after the field) of each FD314; every other diagnostic is unexpected."""
    result = compiled(text, name)
    assert result.plan is not None, [d.format() for d in result.diagnostics]  # a warning: the plan is made
    out = []
    for d in result.diagnostics:
        assert d.code == "FD314", d.format()
        field, said = d.message.split(": ", 1)
        out.append((d.line, field, said))
    return out


def fixes(text: str, name: str = "spec.yaml") -> list[str]:
    """How each FD314 says to fix it (what follows the last ';')."""
    return [said.rsplit("; ", 1)[1] for _, _, said in fd314(text, name)]


# --- reported ---------------------------------------------------------------------------------------------------


def test_a_parallel_branch_reading_what_another_writes() -> None:
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - quote: {output: {f: "${ price }"}}
              - sequence: b
                steps:
                  - prepare
                  - use: {with: {f: "${ f }"}}
          - after: {with: {f: "${ f }"}}
        """)
    assert found == [(10, "in 'with.f'", "'f' is written by 'quote', which may run at the same time as 'use', and by "
                      "no node before it: 'use' never sees that value (a node sees only what the nodes it depends on "
                      "wrote); move 'use' after parallel 'p'")]


def test_a_needs_dag_says_which_needs_to_add() -> None:
    assert fixes("""\
        flowdsl: 1
        name: t
        steps:
          - fetch_order
          - quote: {needs: [fetch_order], output: {rate: "${ r }"}}
          - check_stock: {needs: [fetch_order]}
          - accept: {needs: [check_stock], with: {rate: "${ rate }"}}
          - audit: {needs: [], when: "${ rate > 1 }"}
          - later: {needs: [accept, quote], with: {rate: "${ rate }"}}
        """) == ["add 'quote' to the needs of 'accept'", "add 'quote' to the needs of 'audit'"]


def test_a_fix_waits_for_the_last_of_writers_one_after_another() -> None:
    assert fixes("""\
        flowdsl: 1
        name: t
        steps:
          - a: {output: {f: "${ 1 }"}}
          - b: {needs: [a], output: {f: "${ 2 }"}}
          - r: {needs: [], with: {f: "${ f }"}}
        """) == ["add 'b' to the needs of 'r'"]


def test_a_node_without_needs_in_a_dag_gets_the_whole_list_to_write() -> None:
    # c waits for b only (the node before it): its needs are written out with the writer added
    assert fixes("""\
        flowdsl: 1
        name: t
        steps:
          - a: {output: {f: "${ 1 }"}}
          - b: {needs: []}
          - c: {with: {f: "${ f }"}}
        """) == ["add needs: [b, a] to 'c'"]


def test_nested_groups_are_ordered_through_the_groups_around_them() -> None:
    assert fixes("""\
        flowdsl: 1
        name: t
        steps:
          - sequence: outer
            steps:
              - parallel: p
                branches:
                  - sequence: left
                    steps:
                      - parallel: inner
                        branches:
                          - w: {output: {f: "${ 1 }"}}
                          - x
                  - sequence: right
                    steps:
                      - y
                      - sequence: deep
                        steps:
                          - r: {when: "${ f = 1 }"}
              - seen: {when: "${ f = 1 }"}
          - sequence: dag
            steps:
              - g1: {output: {g: "${ 1 }"}}
              - sequence: s2
                needs: []
                steps:
                  - r2: {with: {g: "${ g }"}}
        """) == ["move 'r' after parallel 'p'", "add 'g1' to the needs of 's2', the group around 'r2'"]


def test_a_loop_reading_what_a_node_beside_it_writes() -> None:
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - quote: {output: {rate: "${ r }"}}
              - for_each: lines
                items: "${ order.lines }"
                steps:
                  - price_line: {with: {rate: "${ rate }", sku: "${ $item.sku }"}}
              - for_each: by_rate
                items: "${ rate }"
                steps: [count]
        """)
    assert [(line, field, said.rsplit("; ", 1)[1]) for line, field, said in found] == [
        (10, "in 'with.rate'", "move 'lines' after parallel 'p'"),
        (12, "in 'items'", "move 'by_rate' after parallel 'p'"),
    ]


def test_every_field_that_reads_the_context() -> None:
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w: {output: {f: "${ 1 }", g: "${ 2 }"}}
              - sequence: s
                when: "${ f }"
                steps:
                  - a:
                      when: "${ $exists(g) }"
                      with: {x: "text ${ f } and ${ other }", y: ["${ g }"]}
                      output: {z: "${ f }"}
                      fail_when: "${ g }"
                      compensate: {worker: undo_a, with: {f: "${ f & z }"}}
                  - switch: k
                    on: "${ g }"
                    cases: {"1": [one]}
                  - ask:
                      llm: {signature: "g, question -> answer"}
        """)
    assert [(line, field) for line, field, _ in found] == [
        (8, "in 'when'"), (11, "in 'when'"), (12, "in 'with.x'"), (12, "in 'with.y[0]'"),
        (15, "in 'compensate.with.f'"), (17, "in 'on'"), (20, "in 'llm.signature'")]
    assert found[-1][2].startswith("the input field 'g' is written by 'w', which may run at the same time as 'ask'")


def test_sub_flows(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sub.yaml").write_text(textwrap.dedent("""\
        flowdsl: 1
        name: sub
        input: {type: object, properties: {given: {type: number}}}
        steps:
          - parallel: q
            branches:
              - a: {output: {h: "${ 1 }", given: "${ 2 }"}}
              - b: {with: {h: "${ h }", k: "${ k }", given: "${ given }"}}
        """), encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(textwrap.dedent("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w: {output: {k: "${ 1 }"}}
              - flow: bare
                path: lib/sub.yaml
              - flow: given
                path: lib/sub.yaml
                with: {h: "${ 1 }", k: 2}
        """), encoding="utf-8")
    result = compile_spec(str(tmp_path / "spec.yaml"))
    assert result.plan is not None
    found = sorted((Path(d.file or "").name, d.line, d.message.split(": ")[0], d.message.rsplit("; ", 1)[1])
                   for d in result.diagnostics)
    # 'given' is the sub-flow's input field; 'h' and 'k' are given by the second use's `with:`: only the first
    # use, which gets what its node sees, reads them unseen ('k' from the writer beside the sub-flow node)
    assert found == [("sub.yaml", 8, "in 'with.h'", "move 'b' after parallel 'q'"),
                     ("sub.yaml", 8, "in 'with.k'", "move 'bare' after parallel 'p'")]


def test_a_read_placed_in_the_expression_forms_jsonata_reads_from_the_context() -> None:
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w: {output: {g: "${ 1 }"}}
              - r:
                  with:
                    a: "${ $map(items, function($v){ $v + g }) }"
                    b: "${ flag ? 1 : g }"
                    c: "${ $.g }"
                    d: "${ {'k': g} }"
                    e: "${ ($x := g; $x + 1) }"
        """)
    assert [field for _, field, _ in found] == ["in 'with.a'", "in 'with.b'", "in 'with.c'", "in 'with.d'",
                                                "in 'with.e'"]


# --- not reported -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [
    'r: {with: {f: "${ $steps.w.f }"}}',  # a step's result, not the context (FD504, an error here)
    'r: {with: {f: "${ $input.f }"}}',  # a variable
    'r: {with: {f: "${ items[f > 1] }"}}',  # relative to each item
    'r: {with: {f: "${ order.(f * 2) }"}}',  # relative to order
    'r: {with: {f: "${ other.f }"}}',
    'r: {output: {z: "${ f }"}, fail_when: "${ f > 1 }"}',  # the step's own result
    'r: {with: {x: "${ g }"}}',  # nobody writes g
    'r: {with: {f: "f"}}',  # text
    'r',  # a step without with gets its context: which fields it reads is not known
])
def test_what_is_not_a_read_of_the_context(reader: str) -> None:
    result = compiled(f"""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w: {{output: {{f: "${{ 1 }}"}}}}
              - {reader}
        """)
    assert [d.format() for d in result.diagnostics if d.code == "FD314"] == []


def test_what_the_reader_sees_provides_the_field() -> None:
    assert fd314("""\
        flowdsl: 1
        name: t
        input: {type: object, required: [from_input], properties: {also_input: {type: number}}}
        steps:
          - early: {output: {f: "${ 1 }"}}
          - parallel: p
            branches:
              - w: {output: {f: "${ 2 }", from_input: "${ 3 }", also_input: "${ 4 }"}}
              - r: {with: {f: "${ f }", a: "${ from_input }", b: "${ also_input }"}}
          - after: {with: {f: "${ f }"}}
        """) == []


def test_a_writer_that_runs_after_the_reader_or_in_another_case_is_not_beside_it() -> None:
    assert fd314("""\
        flowdsl: 1
        name: t
        steps:
          - first: {with: {f: "${ f }"}}
          - w: {output: {f: "${ 1 }"}}
          - switch: s
            on: "${ kind }"
            cases:
              a: [{w2: {output: {g: "${ 1 }"}}}]
              b: [{r2: {with: {g: "${ g }"}}}]
          - parallel: p
            branches:
              - sequence: inside
                when: "${ h }"
                steps: [{w3: {output: {h: "${ 1 }"}}}]
              - sequence: dag
                steps:
                  - w4: {output: {i: "${ 1 }"}}
                  - r4: {needs: [w4], with: {i: "${ i }"}}
        """) == []


def test_a_loop_variable_read_without_its_dollar_is_fd310_s() -> None:
    result = compiled("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w: {output: {line: "${ 1 }", index: "${ 2 }"}}
              - for_each: lines
                items: "${ order.lines }"
                as: line
                steps:
                  - r: {with: {sku: "${ line.sku }", at: "${ index }"}}
        """)
    assert sorted(d.code for d in result.diagnostics) == ["FD310", "FD310"]


def test_a_writer_whose_writes_are_not_known_is_not_reported() -> None:
    # a step without `output:` merges its whole result, whatever keys it has: none is known
    assert fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - w
              - r: {with: {f: "${ f }"}}
        """) == []


def test_nothing_is_guessed_where_a_needs_could_not_be_followed() -> None:
    result = compiled("""\
        flowdsl: 1
        name: t
        steps:
          - w: {output: {f: "${ 1 }"}}
          - b: {needs: []}
          - c: {needs: [b, nope], with: {f: "${ f }"}}
        """)
    assert [d.code for d in result.diagnostics] == ["FD303"]


def test_the_repository_s_flows_read_nothing_unseen() -> None:
    specs = [*sorted((ROOT / "examples").glob("*/flow.yaml")), *sorted((ROOT / "examples").glob("*/flow.flow")),
             *sorted((ROOT / "specs" / "conformance" / "valid").glob("*.yaml")),
             *sorted((ROOT / "specs" / "conformance" / "valid").glob("*.flow"))]
    assert len(specs) > 20
    for path in specs:
        assert [d.format() for d in compile_spec(str(path)).diagnostics if d.code == "FD314"] == []


def test_fd314_is_a_documented_warning() -> None:
    assert CODES["FD314"] == ("warning", "read of a value that only a concurrent node writes")


# --- what an expression reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "names"), [
    ("f", {"f"}), ("order.total", {"order"}), ("items[price > limit].sku", {"items"}),
    ("order.(price * qty)", {"order"}), ("$map(items, function($v){ $v.price * rate })", {"items", "rate"}),
    ("f ? g : h", {"f", "g", "h"}), ("$.f", {"f"}), ("$steps.a.b", set()), ("$input.f", set()),
    ("{'x': f, 'y': a.b}", {"f", "a"}), ("items.{'k': price}", {"items"}), ("items{kind: $sum(price)}", {"items"}),
    ("items^(price)", {"items"}), ("a ~> $sum()", {"a"}), ("($x := f; $x + g)", {"f", "g"}), ("[f, -g]", {"f", "g"}),
    ("`my field`.x", {"my field"}), ("$sum(lines.amount)", {"lines"}), ("'text'", set()), ("*.amount", set()),
])
def test_context_names(source: str, names: set[str]) -> None:
    assert context_names(source) == names


# --- the rule is the kernel's ------------------------------------------------------------------------------------


def test_what_is_reported_is_what_a_run_gets() -> None:
    """The reader of a flagged spec gets null; once the fix the message gives is made, the value."""
    from flowdsl.runtime.local import run
    from flowdsl.workers import WorkerRegistry

    seen: dict[str, object] = {}
    reg = WorkerRegistry()
    reg.register("quote", lambda data, ctx: {"price": 5})
    reg.register("prepare", lambda data, ctx: {})
    reg.register("use", lambda data, ctx: seen.update(f=data["f"]) or {})
    flagged = """\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - quote: {output: {f: "${ price }"}}
              - sequence: b
                steps:
                  - prepare
                  - use: {with: {f: "${ f }"}}
        """
    assert fixes(flagged) == ["move 'use' after parallel 'p'"]
    fixed = """\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - quote: {output: {f: "${ price }"}}
              - sequence: b
                steps: [prepare]
          - use: {with: {f: "${ f }"}}
        """
    assert fd314(fixed) == []
    for text, expected in ((flagged, None), (fixed, 5)):
        plan = compiled(text).plan
        assert plan is not None
        result = run(plan, {}, registry=reg, record=False, handle_sigint=False, import_workers=False)
        assert result.status == "completed" and seen.pop("f") == expected


def test_many_readers_and_writers_of_one_field_are_checked_quickly() -> None:
    # every step writes and reads one field, in a list with needs: each is ordered after the one before it
    n = 3000
    steps = "".join(f"  - w{i}: {{needs: [{f'w{i - 1}' if i else ''}], output: {{f: \"${{ f }}\"}}, "
                    f"with: {{f: \"${{ f }}\"}}}}\n" for i in range(n))
    started = time.perf_counter()
    result = compiled("flowdsl: 1\nname: t\nsteps:\n" + steps)
    assert result.plan is not None and result.diagnostics == []
    assert time.perf_counter() - started < 30


def test_thousands_of_readers_beside_thousands_of_writers_are_checked_in_bounded_time() -> None:
    # 3000 writers of f one after the other, and 3000 readers of f that need nothing: each reader may run beside
    # every writer; the questions are bounded, so the first readers are reported and the rest left unchecked
    n = 3000
    steps = "".join(f"  - w{i}: {{needs: [{f'w{i - 1}' if i else ''}], output: {{f: \"${{ 1 }}\"}}}}\n"
                    for i in range(n))
    steps += "".join(f"  - r{i}: {{needs: [], with: {{f: \"${{ f }}\"}}}}\n" for i in range(n))
    started = time.perf_counter()
    result = compiled("flowdsl: 1\nname: t\nsteps:\n" + steps)
    assert time.perf_counter() - started < 10
    assert result.plan is not None and 0 < len(result.diagnostics) < 100
    assert {d.code for d in result.diagnostics} == {"FD314"}
    assert result.diagnostics[0].message.endswith(
        "'f' is written by 'w0', 'w1', 'w2' and 2997 other nodes, which may run at the same time as 'r0', and by no "
        "node before it: 'r0' never sees that value (a node sees only what the nodes it depends on wrote); add "
        "'w0', 'w1', 'w2' and 2997 other nodes to the needs of 'r0'")
