"""FD314 and a group named after the field it reads: a ``for_each`` or sub-flow node without ``output:`` stores its
result under its id, so ``for_each: lines`` over ``${ lines }`` writes ``lines`` — but that field was in the context
before the group ran (the group read it), and a node beside the group that reads it means that value: no warning.
The group still provides the field to the nodes after it, and one named otherwise still races with its readers.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from flowdsl.api import compile_loaded, load_text


def fd314(text: str, name: str = "spec.yaml") -> list[str]:
    result = compile_loaded(load_text(textwrap.dedent(text), name), name)
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    assert {d.code for d in result.diagnostics} <= {"FD314"}, [d.format() for d in result.diagnostics]
    return [d.message for d in result.diagnostics]


def test_a_loop_named_after_the_list_it_iterates_beside_a_reader_of_that_list() -> None:
    assert fd314("""\
        flowdsl: 1
        name: price_order
        steps:
          - parallel: p
            branches:
              - for_each: lines
                items: "${ lines }"
                steps:
                  - price_line: {with: {line: "${ $item }"}}
              - count_lines: {with: {n: "${ $count(lines) }"}}
        """) == []


def test_a_sub_flow_named_after_the_field_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "normalise.yaml").write_text(textwrap.dedent("""\
        flowdsl: 1
        name: normalise
        steps:
          - trim_fields
        """), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    text = """\
        flowdsl: 1
        name: checkout
        steps:
          - parallel: p
            branches:
              - flow: order
                path: normalise.yaml
                with: {order: "${ order }"}
              - charge: {with: {amount: "${ order.total }"}}
        """
    assert fd314(text, str(spec)) == []


def test_the_group_still_provides_the_field_after_it_and_races_under_another_name() -> None:
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - for_each: lines
            items: "${ lines }"
            steps: [price_line]
          - parallel: p
            branches:
              - reprice: {output: {lines: "${ v }"}}
              - sum_lines: {with: {lines: "${ lines }"}}
          - parallel: q
            branches:
              - for_each: priced
                items: "${ lines }"
                steps: [rate_line]
              - report: {with: {priced: "${ priced }"}}
        """)
    assert len(found) == 1 and found[0].startswith("in 'with.priced': 'priced' is written by 'priced'"), found


def test_every_way_of_writing_a_read_is_still_found() -> None:
    # expressions are looked at only when one of the fields written beside them is a word of their text
    found = fd314("""\
        flowdsl: 1
        name: t
        steps:
          - parallel: p
            branches:
              - quote: {output: {rate: "${ v }", fee: "${ f }"}}
              - apply:
                  with:
                    a: "${ `rate` * 2 }"
                    b: "${ $.fee }"
                    c: "${ $sum([rate,1]) }"
                    d: "total: ${rate}"
                    e: "${ ratex + fees }"
        """)
    assert [m.split(":")[0] for m in found] == ["in 'with.a'", "in 'with.b'", "in 'with.c'", "in 'with.d'"]


def test_a_field_a_merging_step_returns_is_provided_once_its_output_names_it() -> None:
    text = """\
        flowdsl: 1
        name: refresh_customer
        steps:
          - load_customer{output}
          - parallel: p
            branches:
              - refresh_profile: {{output: customer}}
              - send_welcome: {{with: {{email: "${{ customer.email }}"}}}}
        """
    assert len(fd314(text.format(output=""))) == 1  # merged: what it returns is not known (docs/diagnostics.md)
    assert fd314(text.format(output=': {output: {customer: "${ customer }"}}')) == []
