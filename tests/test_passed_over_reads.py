"""FD315: a read of a field that, before the reader, only steps with ``on_failure: continue`` write."""

from __future__ import annotations

import pytest

from flowdsl.api import compile_text
from flowdsl.diagnostics import SpecError
from tests.kernel.plans import spec_text


def _fd315(steps: list[object], **top: object) -> list[str]:
    """The FD315 messages of a spec of ``steps`` (the spec compiles: a warning never stops it)."""
    text = spec_text(steps, **top)
    from flowdsl.api import compile_loaded, load_text

    result = compile_loaded(load_text(text), "spec.yaml")
    assert result.plan is not None, [d.format() for d in result.diagnostics]
    return [d.message for d in result.diagnostics if d.code == "FD315"]


BONUS = {"award": {"on_failure": "continue", "output": {"points": "${ awarded }"}}}


def test_a_read_of_what_only_a_step_passed_over_writes_is_said():
    (message,) = _fd315([BONUS, {"receipt": {"with": {"points": "${ points }"}}}])
    assert message.startswith("in 'with.points': 'points' is written before 'receipt' only by 'award', which the "
                              "run goes on without when it fails (on_failure: continue)")


@pytest.mark.parametrize("read", ["${ points ? points : 0 }", "${ $exists(points) ? points : 0 }",
                                  "${ points = null ? 0 : points }"])
def test_a_read_that_asks_first_is_not(read: str):
    assert _fd315([BONUS, {"receipt": {"with": {"points": read}}}]) == []


def test_another_writer_before_it_or_the_input_schema_provides_the_field():
    also = {"base": {"output": {"points": "${ 0 }"}}}
    assert _fd315([also, BONUS, {"receipt": {"with": {"points": "${ points }"}}}]) == []
    schema = {"type": "object", "properties": {"points": {"type": "number"}}}
    assert _fd315([BONUS, {"receipt": {"with": {"points": "${ points }"}}}], input=schema) == []


def test_the_step_itself_a_step_before_it_and_a_loops_body_are_not_asked():
    assert _fd315([{"receipt": {"with": {"points": "${ points }"}}}, BONUS]) == []  # (it reads before it is written)
    assert _fd315([BONUS, {"for_each": "lines", "items": "${ [1, 2] }",
                           "steps": [{"line": {"with": {"points": "${ points }"}}}]}]) == []


def test_an_llm_steps_inputs_read_by_name_are_asked():
    llm = {"thank": {"llm": {"signature": "points -> note"}}}
    (message,) = _fd315([BONUS, llm])
    assert message.startswith("in 'llm.signature': the input field 'points' is written before 'thank' only by")


def test_a_warning_does_not_stop_the_plan():
    plan = compile_text(spec_text([BONUS, {"receipt": {"with": {"points": "${ points }"}}}]))
    assert plan["nodes"]["award"]["on_failure"] == "continue"
    with pytest.raises(SpecError):
        compile_text(spec_text([BONUS, {"receipt": {"with": {"points": "${ points "}}}]))


@pytest.mark.parametrize("when", ["${ $exists(points) }", "${ points != null }", "${ points }"])
def test_a_when_that_reads_the_field_guards_the_step_and_what_is_inside_its_group(when: str):
    assert _fd315([BONUS, {"receipt": {"when": when, "with": {"points": "${ points }"}}}]) == []
    group = {"sequence": "thanks", "when": when, "steps": [{"receipt": {"with": {"points": "${ points }"}}}]}
    assert _fd315([BONUS, group]) == []
    assert len(_fd315([BONUS, {"receipt": {"when": "${ true }", "with": {"points": "${ points }"}}}])) == 1
