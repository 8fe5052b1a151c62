"""LLM steps caught when the spec is checked: names DSPy takes for itself, conflicting outputs of steps
with a fallback, Literal values JSON cannot hold, templates in instructions, blank model strings, and
the hints of unknown field types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowdsl.api import SpecError, compile_text, validate
from flowdsl.diagnostics import Diagnostic
from flowdsl.llm_signature import (
    SignatureError,
    check_llm_block,
    normalize_fields,
    normalize_signature,
    parse_signature,
)


def diagnostics(spec: str) -> list[Diagnostic]:
    with pytest.raises(SpecError) as info:
        compile_text(spec)
    return list(info.value.diagnostics)


def one_step(llm: str, head: str = "") -> str:
    return f"flowdsl: 1\nname: t\n{head}steps:\n  - ask:\n      llm:\n{llm}"


# --- input fields DSPy's Predict takes for itself ----------------------------------------------


PREDICT_KEYWORDS = ["lm", "config", "demos", "new_signature", "prediction"]


@pytest.mark.parametrize("name", PREDICT_KEYWORDS)
def test_an_input_named_after_a_predict_keyword_is_fd601(name: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(f"question, {name} -> answer: int")
    err = info.value
    assert (err.code, err.offset) == ("FD601", 10)
    assert f"found the input field '{name}', a keyword argument DSPy's Predict takes for itself" in err.message
    assert "would not reach the model" in err.message and "expected another name" in err.message
    with pytest.raises(SignatureError) as info:
        normalize_fields({"inputs": {name: "str"}, "outputs": {"answer": "int"}})
    assert (info.value.code, info.value.path) == ("FD601", f"/inputs/{name}")
    # a plan built by hand is refused too, before DSPy would crash on it or drop the value
    normalized = {"inputs": [{"name": name, "type": "str", "desc": None, "enum": None}],
                  "outputs": [{"name": "answer", "type": "int", "desc": None, "enum": None}]}
    with pytest.raises(SignatureError, match="not a normalized field") as info:
        normalize_signature(normalized)
    assert info.value.path == "/inputs/0"


def test_an_input_named_after_a_predict_keyword_is_reported_at_the_signature() -> None:
    (d,) = diagnostics(one_step('        signature: "lm -> answer: int"\n'))
    assert (d.code, d.path, d.line, d.column) == ("FD601", "/steps/0/ask/llm/signature", 6, 20)
    assert d.message.startswith("malformed signature: found the input field 'lm'")


def test_outputs_may_be_named_after_predict_keywords() -> None:
    sig = parse_signature("question -> " + ", ".join(PREDICT_KEYWORDS))
    assert [f["name"] for f in sig["outputs"]] == PREDICT_KEYWORDS


@pytest.mark.parametrize("module_at", ["step", "defaults"])
def test_a_reasoning_input_under_chain_of_thought_is_fd601(module_at: str) -> None:
    if module_at == "step":
        spec = one_step('        signature: "reasoning, question -> answer"\n        module: chain_of_thought\n')
    else:
        spec = one_step('        signature: "reasoning, question -> answer"\n',
                        head="defaults: {llm: {module: chain_of_thought}}\n")
    (d,) = diagnostics(spec)
    assert (d.code, d.path) == ("FD601", "/steps/0/ask/llm/signature")
    assert "an input named 'reasoning' would not reach the model; rename the input field 'reasoning'" in d.message
    assert ("defaults: {llm: {module: ...}}" in d.message) == (module_at == "defaults")
    # predict keeps an input of that name: nothing takes it
    compile_text(one_step('        signature: "reasoning, question -> answer"\n'))
    block = {"signature": parse_signature("reasoning -> answer"), "module": "chain_of_thought"}
    assert [(c, p) for c, p, _ in check_llm_block(block)] == [("FD601", "/signature")]


# --- FD307 for LLM steps with a fallback -------------------------------------------------------


PARALLEL = """flowdsl: 1
name: c
steps:
  - parallel: both
    branches:
      - a:
          llm:
            signature: "text -> summary"
{a}
      - b:
          llm:
            signature: "text -> summary"
{b}
"""


@pytest.mark.parametrize(("a", "b"), [("fallback: canned", "fallback: canned"), ("fallback: canned", ""), ("", "")])
def test_concurrent_llm_steps_writing_one_output_conflict_with_or_without_a_fallback(a: str, b: str) -> None:
    (d,) = diagnostics(PARALLEL.format(a=f"          {a}" if a else "", b=f"          {b}" if b else ""))
    assert (d.code, d.path) == ("FD307", "/steps/0/branches/1/b")
    assert "'b' and 'a' may run at the same time and both write 'summary'" in d.message


def test_an_llm_step_with_a_fallback_writes_its_output_fields() -> None:
    plan = compile_text(one_step('        signature: "text -> title, tags: list[str]"\n      fallback: canned\n'))
    assert plan["nodes"]["ask"]["writes"] == ["tags", "title"]
    mapped = one_step('        signature: "text -> title"\n      fallback: canned\n      output: {t: "${ title }"}\n')
    assert compile_text(mapped)["nodes"]["ask"]["writes"] == ["t"]


# --- Literal values must be JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "offset", "says"),
    [
        ("1e400, 2.5", 27, "'1e400', not a valid Literal value of field 'level': it is beyond the range of a number"),
        ("1, -1e400", 30, "'-1e400', not a valid Literal value"),
        ("'\\ud800'", 27, "it holds the lone surrogate U+D800"),
    ],
)
def test_a_literal_value_json_cannot_hold_is_fd601(literal: str, offset: int, says: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(f"question -> level: Literal[{literal}]")
    err = info.value
    assert says in err.message and "expected quoted strings, finite numbers, True or False" in err.message
    assert (err.code, err.offset) == ("FD601", offset)
    with pytest.raises(SignatureError) as info:
        normalize_fields({"inputs": {"q": None}, "outputs": {"level": f"Literal[{literal}]"}})
    assert (info.value.code, info.value.path) == ("FD601", "/outputs/level")


def test_a_literal_beyond_the_range_of_a_number_leaves_no_infinity_in_the_plan() -> None:
    (d,) = diagnostics(one_step('        signature: "question -> level: Literal[1e400, 2.5]"\n'))
    assert (d.code, d.path) == ("FD601", "/steps/0/ask/llm/signature")
    assert parse_signature("q -> level: Literal[1e3, 2]")["outputs"][0]["enum"] == [1000.0, 2]  # finite: kept


# --- instructions and model strings --------------------------------------------------------------


@pytest.mark.parametrize("instructions", ["Answer about order ${ order.id } please", "Costs ${ x } and $${ y }",
                                          "a ${b"])
def test_a_template_in_instructions_is_fd201(instructions: str) -> None:
    spec = one_step(f'        signature: "question -> answer"\n        instructions: "{instructions}"\n')
    (d,) = diagnostics(spec)
    assert (d.code, d.path, d.line, d.column) == ("FD201", "/steps/0/ask/llm/instructions", 7, 23)
    assert d.message.startswith("the instructions contain \"${")
    assert "instructions are sent to the model as written" in d.message
    assert "add an input field to the signature" in d.message and "map it with 'with:'" in d.message


def test_instructions_without_a_template_are_fine() -> None:
    plan = compile_text(one_step('        signature: "question -> answer"\n        instructions: "Costs $5 {net}."\n'))
    assert plan["nodes"]["ask"]["llm"]["instructions"] == "Costs $5 {net}."


def test_a_literal_template_start_in_instructions_is_written_dollar_dollar_brace() -> None:
    plan = compile_text(one_step('        signature: "question -> answer"\n'
                                 '        instructions: "Quote shell variables as $${VAR}."\n'))
    assert plan["nodes"]["ask"]["llm"]["instructions"] == "Quote shell variables as ${VAR}."


def test_a_template_in_the_instructions_of_a_flow_file_is_fd201() -> None:
    with pytest.raises(SpecError) as info:
        compile_text('flow t\nllm ask "question -> answer" instructions "Use ${ order.id }"\n', filename="t.flow")
    (d,) = info.value.diagnostics
    assert (d.code, d.path) == ("FD201", "/steps/0/ask/llm/instructions")


def test_blank_model_strings_are_fd201(tmp_path: Path) -> None:
    path = tmp_path / "v3.yaml"
    path.write_text('flowdsl: 1\nname: v3\ndefaults:\n  llm: {lm: "   "}\nsteps:\n  - ask:\n      llm:\n'
                    '        signature: "question -> answer: int"\n        lm: "  "\n', encoding="utf-8")
    got = [(d.code, d.path, d.line, d.column) for d in validate(path, check_workers=False)]
    assert got == [("FD201", "/defaults/llm/lm", 4, 13), ("FD201", "/steps/0/ask/llm/lm", 9, 13)]
    messages = [d.message for d in validate(path, check_workers=False)]
    assert messages[0] == ("the model string \"   \" is blank; expected 'provider/model', e.g. 'openai/gpt-4o-mini', "
                           "or no 'lm' at all to use the model from --lm or FLOWDSL_LM")
    assert messages[1].endswith("the model from --lm, defaults.llm.lm or FLOWDSL_LM")


def test_a_model_string_with_spaces_around_it_is_fine() -> None:
    plan = compile_text(one_step('        signature: "q -> a"\n        lm: " openai/gpt-4o-mini "\n',
                                 head="defaults: {llm: {lm: ' openai/gpt-4o-mini'}}\n"))
    assert plan["nodes"]["ask"]["llm"]["lm"].strip() == "openai/gpt-4o-mini"


# --- hints for unknown types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "hint"),
    [
        ("lsit[str]", "(did you mean 'list[str]'?)"),
        ("integer", "(did you mean 'int'?)"),
        ("strng", "(did you mean 'str'?)"),
        ("Boolean", "(did you mean 'bool'?)"),
        ("list[string]", "(did you mean 'list[str]'?)"),
        ("array[int]", "(did you mean 'list[int]'?)"),
        ("literal['a', 'b']", "(did you mean 'Literal['a', 'b']'?)"),
        ("dict[str, Any]", "(did you mean 'dict'?)"),
        ("dict[str, int]", "(did you mean 'dict'? a dict field holds any JSON object; the types of its keys "
                           "and values are not declared)"),
        ("list[bool]", "(a list field holds str, int or float items: list[str], list[int] or list[float])"),
        ("list[dict]", "(a list field holds str, int or float items: list[str], list[int] or list[float])"),
        ("list[list[int]]", "(a list field holds str, int or float items: list[str], list[int] or list[float])"),
        ("Optional[str]", "(did you mean 'str'? a field is never optional: null is not a value)"),
        ("tuple[str]", "(a type with parameters is one of list[str], list[int], list[float] or Literal[...])"),
        ("list[str", "(its brackets do not pair up)"),
    ],
)
def test_unknown_types_get_a_meaningful_hint(type_: str, hint: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(f"a -> b: {type_}")
    assert info.value.code == "FD602"
    assert info.value.message == (f"found unknown type '{type_}' for field 'b'; expected one of str, int, float, "
                                  f"bool, list[str], list[int], list[float], dict or Literal[...] {hint}")


@pytest.mark.parametrize("type_", ["set", "datetime", "list(bool)", "Union[str, int]"])
def test_unknown_types_far_from_every_type_name_get_no_suggestion(type_: str) -> None:
    with pytest.raises(SignatureError) as info:
        normalize_fields({"inputs": {"a": None}, "outputs": {"b": type_}})
    assert info.value.path == "/outputs/b"
    assert "did you mean" not in info.value.message
    assert not re.search(r"'list\[(int|float)\]'\?", info.value.message)


@pytest.mark.parametrize("text", ["1e4300", "1" * 4301, "-" + "9" * 4301])
def test_an_integer_answer_with_more_digits_than_json_holds_is_refused_naming_the_limit(text: str) -> None:
    from flowdsl.llm_signature import coerce_value

    field = {"name": "n", "type": "int", "desc": None, "enum": None}
    with pytest.raises(ValueError, match="expected an integer of at most 4300 digits"):
        coerce_value(field, text)
    assert coerce_value(field, "1e4299") == 10 ** 4299  # 4,300 digits: the most that is written as text


def test_integer_answers_stay_bounded_when_python_sets_no_digit_limit() -> None:
    import sys
    import time

    from flowdsl.llm_signature import coerce_value

    field = {"name": "n", "type": "int", "desc": None, "enum": None}
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        t = time.perf_counter()
        for text in ("1e50000000", "7" * 100_000):
            with pytest.raises(ValueError, match="expected an integer of at most 4300 digits"):
                coerce_value(field, text)
        assert time.perf_counter() - t < 5
    finally:
        sys.set_int_max_str_digits(before)


# --- every wrong type of a signature at once ----------------------------------------------------


def test_every_unknown_type_of_a_string_signature_is_reported_at_once() -> None:
    from flowdsl.llm_signature import read_signature

    signature, errors = read_signature("subject, body -> category: string, urgent: boolean, score: integer")
    assert [(e.code, e.field, e.offset) for e in errors] == [
        ("FD602", "category", 27), ("FD602", "urgent", 43), ("FD602", "score", 59)]
    assert errors[0].describe().endswith('(at character 28 of the signature: "string, urgent: boolean, scor…")')
    # the fields in error stand as str, so that the rest of the step can be checked
    assert signature is not None
    assert [(f["name"], f["type"]) for f in signature["outputs"]] == [
        ("category", "str"), ("urgent", "str"), ("score", "str")]
    # parse_signature still raises the first error, as before
    with pytest.raises(SignatureError) as info:
        parse_signature("subject, body -> category: string, urgent: boolean")
    assert info.value.field == "category" and "'string'" in info.value.message


def test_every_wrong_field_of_a_mapping_signature_is_reported_at_once() -> None:
    from flowdsl.llm_signature import read_signature

    signature, errors = read_signature({"inputs": {"review": "text"},
                                        "outputs": {"stars": "integer", "tags": {"type": "list[bool]"}, "ok": "bool"}})
    assert [(e.code, e.field, e.path) for e in errors] == [
        ("FD602", "review", "/inputs/review"), ("FD602", "stars", "/outputs/stars"),
        ("FD602", "tags", "/outputs/tags/type")]
    assert signature is not None and [f["type"] for f in signature["outputs"]] == ["str", "str", "bool"]
    with pytest.raises(SignatureError) as info:
        normalize_fields({"inputs": {"review": "text"}, "outputs": {"stars": "integer"}})
    assert info.value.path == "/inputs/review"


def test_a_malformed_signature_stops_the_reading_after_the_types_found_before() -> None:
    from flowdsl.llm_signature import read_signature

    signature, errors = read_signature("a: string, 1b -> c")
    assert signature is None
    assert [(e.code, e.field) for e in errors] == [("FD602", "a"), ("FD601", None)]


def test_an_llm_step_with_unknown_types_is_checked_on_in_the_same_run() -> None:
    """Every unknown type, and the step's other mistakes (redact, with, module, demos), in one run."""
    found = diagnostics(
        "flowdsl: 1\nname: t\nsteps:\n"
        "  - classify:\n"
        "      llm:\n"
        '        signature: "subject, body -> category: string, urgent: boolean"\n'
        "        redact: [bdy]\n"
        "        demos:\n"
        "          - {subject: s, body: b, category: c, urgent: 3}\n"
        "          - {subject: s, body: b, category: c}\n"
        '      with: {subject: "${ subject }", bdy: "${ body }"}\n'
        "  - summarize:\n"
        '      llm: {signature: "body -> reasoning: strng, summary", module: chain_of_thought}\n')
    assert [(d.code, d.line, d.message.split(";")[0]) for d in found] == [
        ("FD602", 6, "in the signature: found unknown type 'boolean' for field 'urgent'"),
        ("FD602", 6, "in the signature: found unknown type 'string' for field 'category'"),
        ("FD601", 7, "redact names 'bdy', which is not a field of the signature"),
        # a field whose type is unknown has its demo value unchecked (urgent: 3), but not its presence
        ("FD603", 10, "demo 2 gives no value for 'urgent'"),
        ("FD604", 11, "'with' gives no value for the input field 'body'"),
        ("FD604", 11, "'with' gives 'bdy', which is not an input field of the signature (did you mean 'body'?)"),
        ("FD601", 13, "chain_of_thought adds its own 'reasoning' output"),
        ("FD602", 13, "in the signature: found unknown type 'strng' for field 'reasoning'"),
    ]
