"""Hostile expressions: every malformed ``${ ... }`` gets an FD501 that says what was expected and where,
never Python's own error text; a valid JSONata expression is never refused because of a ``}`` inside a
regular expression, a comment, a string or a quoted name; a failing built-in fails the step instead of
escaping the kernel; and a control character written as an escape in a Literal is refused as FD110.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import jsonata
import pytest

from flowdsl.api import compile_text
from flowdsl.diagnostics import CODES, Diagnostic, SpecError
from flowdsl.expr import ExpressionError, Slot, compile_expression, split_template
from flowdsl.expr_bounds import SIZE_LIMIT
from flowdsl.llm_signature import SignatureError, normalize_fields, parse_signature
from tests.kernel.plans import plan_of
from tests.kernel.sim import Sim, fail, ok

HEAD = "flowdsl: 1\nname: hostile\nsteps:\n  - a\n"
#: what Python says, never what flowdsl should
PYTHON_TEXT = re.compile(r"index out of range|\bNone\b|NoneType|has no attribute|not subscriptable|unhashable|"
                         r"recursion depth|Traceback|invalid literal|positional argument|[A-Z][a-z]+Error\b")


def quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def diagnostics(text: str) -> list[Diagnostic]:
    try:
        compile_text(text, filename="spec.flow" if text.startswith("flow ") else "spec.yaml")
    except SpecError as exc:
        return exc.diagnostics
    return []


def when(expression: str) -> list[Diagnostic]:
    return diagnostics(HEAD + f"  - b:\n      when: {quoted(expression)}\n")


def template(value: str) -> list[Diagnostic]:
    return diagnostics(HEAD + f"  - b:\n      with: {{x: {quoted(value)}}}\n")


# --- 1. where a slot ends ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "source"), [
    ("${ $match('a}', /\\}/) }", " $match('a}', /\\}/) "),
    ("${ /* } */ 1 }", " /* } */ 1 "),
    ("${ 1 /* { */ }", " 1 /* { */ "),
    ("${ $replace(name, /a{2}/i, '}') }", " $replace(name, /a{2}/i, '}') "),
    ("${ $split(s, /[{}]/)[0] }", " $split(s, /[{}]/)[0] "),
    ("${ $contains(s, /\\/\\}/) }", " $contains(s, /\\/\\}/) "),
    ("${ `odd}name` & \"b}\" }", " `odd}name` & \"b}\" "),
    ("${ ($f := function($v){ $v }; /* } */ $f(1)) }", " ($f := function($v){ $v }; /* } */ $f(1)) "),
    ("${ {'x': total / 2} }", " {'x': total / 2} "),
    ("${ a/b/c }", " a/b/c "),
    ("${ and / 2 }", " and / 2 "),
    ("${ x ~> /\\}{2}/ }", " x ~> /\\}{2}/ "),
])
def test_a_slot_ends_where_jsonata_ends_the_expression(text: str, source: str) -> None:
    """A '/' opens a regular expression only where an operand is expected (else it divides), '/*' a comment;
    a '}' inside either does not close the slot."""
    assert split_template(text) == [Slot(source, 2)]
    compile_expression(source)  # the engine reads the same expression
    assert template(text) == []
    assert split_template(f"a {text} b") == ["a ", Slot(source, 4), " b"]


def test_jsonata_refuses_an_unescaped_closing_brace_in_a_regular_expression_and_so_does_the_slot() -> None:
    """JSONata counts brackets inside a regular expression: '/}/' never ends (the engine says so too)."""
    with pytest.raises(jsonata.JException, match="No terminating / in regular expression"):
        jsonata.Jsonata("$match('a}', /}/)")
    (d,) = when("${ $match('a}', /}/) }")
    assert d.code == "FD501"
    assert "unclosed regular expression: expected a closing '/'" in d.message
    assert "escaped, like '\\}'" in d.message and 'at character 17 of the text: "/}/) }"' in d.message


# --- 2. malformed expressions ------------------------------------------------------------------------


MALFORMED = [
    # (the field's text, what the message says)
    ("${ 'abc }", "unclosed string literal: expected a closing ' (at character 4 of the text: \"'abc }\")"),
    ('${ "abc }', "unclosed string literal: expected a closing \""),
    ('${ "\\" }', "unclosed string literal"),  # the backslash escapes the quote
    ("${ 'a' } and ${ 'b }", "unclosed string literal: expected a closing ' (at character 17"),
    ("${ 1e999 }", "number out of range: 1e999; expected a finite number"),
    ("${ -1e999 }", "number out of range: 1e999"),
    ("${ 1" + "0" * 400 + " }", "number out of range: 1000"),
    ("${ /* abc }", "unclosed comment: expected '*/' to close the '/*' (at character 4"),
    ("${ 1 / }", "unexpected end of expression"),
    ("${ $ /a/ }", "unexpected end of expression"),
    ("${ '\\q' }", "unsupported escape '\\q' in a string literal; expected one of"),
    ("${ 'it\\'s' }", "a ' cannot be escaped: write the string between double quotes"),
    ("${ 'a\\' }", "unsupported escape '\\''"),
    ("${ '\\u12' }", "the escape '\\u' must be followed by 4 hex digits"),
    ("${ /abc }", "unclosed regular expression"),
    ("${ $split('a', /[/) }", "unclosed regular expression"),
    ("${ $match(s, /a**/) }", "invalid regular expression /a**/: multiple repeat"),
    ("${ ` }", "unclosed quoted name: expected a closing '`'"),
    ("${ }", "empty '${ }' (expected an expression between '${' and '}')"),
    ("${}", "empty '${ }'"),
    ("${ ${ 1 } }", "('${' does not nest: inside an expression, write the inner one without '${ }')"),
    ("${ a{ }", "unclosed '${' (expected a matching '}'; the '}' at character 7 closes the '{' at character 5 "
                "inside it)"),
    ("${ {'a': {'b': 1 }", "the '{' at character 4 inside it is not closed either"),
    ("${ 1 +", "unclosed '${' (expected a matching '}')"),
    ("${ a }${", "unclosed '${'"),
    ("${ ( }", "expected ) before end of expression"),
    ("${ ] }", "the symbol ] cannot be used as a unary operator"),
    ("${ [1,2 }", "expected ] before end of expression"),
    ("${ 'a' null }", "syntax error: null"),
    ("${ [1 null] }", "expected ], got null"),
    ("${ a ?? }", "unexpected end of expression"),
    ("${ " + "(" * 5000 + "1" + ")" * 5000 + " }", "the expression nests too deeply to be parsed"),
    ("${ 1 }}", "'when' must be one expression written as"),
]


@pytest.mark.parametrize(("text", "says"), MALFORMED, ids=[t[:24] for t, _ in MALFORMED])
def test_a_malformed_expression_is_one_fd501_saying_what_was_expected(text: str, says: str) -> None:
    (d,) = when(text)
    assert (d.code, d.path, d.line, d.column) == ("FD501", "/steps/1/b/when", 6, 13), d.format()
    assert says in d.message, d.message
    assert not PYTHON_TEXT.search(d.message), d.message


def test_the_engine_index_error_and_its_none_never_reach_the_user() -> None:
    """These three were "string index out of range", "number out of range: None" and "unclosed '${'"."""
    (d,) = when("${ 1 /* c }")
    assert d.message.startswith("in 'when': unclosed comment")
    (d,) = when("${ 1e999 }")
    assert d.message == ("in 'when': number out of range: 1e999; expected a finite number (at most about 1.8e308) "
                         '(at character 4 of the text: "1e999 }")')
    (d,) = when("${ 'abc }")
    assert d.message.startswith("in 'when': unclosed string literal")


@pytest.mark.parametrize("source", ["1 /* a comment at the end */", "$ / 2 /* c */", "/a/", "(1)/* c */"])
def test_a_source_ending_in_a_slash_is_read(source: str) -> None:
    """The engine read past such a source's end (IndexError)."""
    compile_expression(source)
    assert when(f"${{ {source} }}") == []


def test_random_token_soup_gives_expression_errors_only() -> None:
    """A few hundred random arrangements of JSONata's tokens: each parses, or is refused with a message
    of flowdsl's or the engine's own, never Python's."""
    rng = random.Random(7)
    tokens = ["a", "$x", "$", "1", "1e3", "'s}'", '"q{"', "'a\\'b'", '"\\u0041"', "/a}/", "/\\}/", "/[}]/",
              "/*c}*/", "`n }`", "null", "*", "**", "%", "and", "in", "{", "}", "(", ")", "[", "]", ",", ":", ";",
              "?", "+", "-", "/", "=", "~>", "&", "..", ":=", "|", "@", "#", "^", "'", '"', "\\", "`", "/*", "*/",
              "$f(", "function($v){", "1e999", "{'k': ", " ", "\n"]
    for _ in range(600):
        source = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 8))).strip() or "1"
        for read, text in ((compile_expression, source), (split_template, "${" + source + "}")):
            try:
                read(text)
            except ExpressionError as exc:
                assert not PYTHON_TEXT.search(exc.message), (source, exc.message)


@pytest.mark.parametrize(("source", "says"), [
    ("$power(10, 400)", "a number went beyond the range of a JSON number"),
    ("$round(1, 400)", "a number went beyond the range of a JSON number"),
    ("$sum([1e308, 1e308])", "a number went beyond the range of a JSON number"),
    ("$fromMillis(1e20)", "in the JSONata engine"),
    ("$formatInteger(1, 'x')", "in the JSONata engine"),
    ("$fromMillis(1, '[Y')", "in the JSONata engine"),
    ("$spread(function(){1})", "expression produced a function, not a value"),
    ("1 / 0", "division by zero"),
])
def test_a_built_in_failing_inside_the_engine_is_an_expression_error(source: str, says: str) -> None:
    """Its OverflowError, RuntimeError or OSError escaped the kernel and stopped the run."""
    with pytest.raises(ExpressionError, match=re.escape(says)):
        compile_expression(source).evaluate({})


@pytest.mark.parametrize("source", [
    "$contains(s, /^(a|aa)+$/)", "$match(s, /^(a|aa)+$/i)", "$replace(s, /^(a|aa)+$/, 'x')",
    "$split(s, /^(a|aa)+$/)", "s ~> $contains(/(a|aa)+!?b/)",
])
def test_a_regular_expression_that_backtracks_without_end_is_an_expression_error(source: str) -> None:
    """Python's re cannot be interrupted: /^(a|aa)+$/ on 80 a's and a '!' held the evaluation (so the run, and on
    Redis every process taking the task over) for ever, far past the 100 ms bound."""
    with pytest.raises(ExpressionError, match=r"a regular expression took longer than 100 ms on this data"):
        compile_expression(source).evaluate({"s": "a" * 80 + "!"})


def test_regular_expressions_match_as_before() -> None:
    assert compile_expression("$replace(s, /(a)(b)?/i, '[$1]')").evaluate({"s": "xAbA"}) == "x[A][A]"
    assert compile_expression("$split(s, /,\\s*/)").evaluate({"s": "a, b,c"}) == ["a", "b", "c"]
    assert compile_expression("$contains(s, /^B/m)").evaluate({"s": "a\nBc"}) is True
    assert compile_expression("$match(s, /a(b)/).groups").evaluate({"s": "xab"}) == ["b"]


def test_a_regular_expression_is_not_a_value() -> None:
    """It was written into the context as the string "re.compile('a')"."""
    with pytest.raises(ExpressionError, match="expression produced a regular expression, not a value"):
        compile_expression("/a/").evaluate({})


# --- 3. control characters written as escapes ----------------------------------------------------


@pytest.mark.parametrize("literal", ["'\\x1b[31m'", "'\\033'", "'\\N{ESCAPE}'", "'a\\x00'", "'\\x85'"])
def test_a_control_character_written_as_an_escape_in_a_literal_is_fd110(literal: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(f"question -> level: Literal['ok', {literal}]")
    assert (info.value.code, info.value.offset) == ("FD110", 33)
    assert "control character U+" in info.value.message and "written here as an escape" in info.value.message
    with pytest.raises(SignatureError) as info:
        normalize_fields({"inputs": {"q": None}, "outputs": {"level": f"Literal[{literal}]"}})
    assert (info.value.code, info.value.path) == ("FD110", "/outputs/level")


def test_an_escaped_control_character_in_a_literal_is_reported_at_the_signature() -> None:
    llm = "  - ask:\n      llm:\n        signature: 'q -> level: Literal[''\\x1b[31m'', b]'\n"
    (d,) = diagnostics(HEAD + llm)
    assert (d.code, d.path, d.line, d.column) == ("FD110", "/steps/1/ask/llm/signature", 7, 20)
    assert CODES[d.code] == ("error", "invalid characters")
    assert "control character U+001B is not allowed in a spec (written here as an escape)" in d.message
    typed = "  - ask:\n      llm:\n        signature:\n          inputs: {q: str}\n" \
            "          outputs: {level: {type: \"Literal['\\\\x1b[31m']\"}}\n"
    (d,) = diagnostics(HEAD + typed)
    assert (d.code, d.path) == ("FD110", "/steps/1/ask/llm/signature/outputs/level/type")
    (d,) = diagnostics("flow hostile\nllm ask \"q -> level: Literal['\\\\x1b[31m', 'b']\"\n")
    assert (d.code, d.path) == ("FD110", "/steps/0/ask/llm/signature")


def test_tab_and_newline_escapes_stay_allowed_in_a_literal_as_in_any_value() -> None:
    assert parse_signature("q -> level: Literal['a\\tb', 'c\\nd']")["outputs"][0]["enum"] == ["a\tb", "c\nd"]


@pytest.mark.parametrize("text", [
    HEAD + "  - ask:\n      llm:\n        signature: \"q -> level: Literal['\\e[31m', b]\"\n",
    HEAD + "  - ask:\n      llm:\n        signature:\n          inputs: {q: str}\n"
           "          outputs: {level: {enum: [\"\\x1b[31m\", b]}}\n",
    "flow hostile\nllm ask \"q -> level: Literal['\\u001b[31m', 'b']\"\n",
])
def test_the_front_ends_own_escapes_were_already_refused(text: str) -> None:
    """YAML's "\\e" and "\\x1b" and the text syntax's "\\u001b" are read before the Literal is: FD110 there."""
    (d,) = diagnostics(text)
    assert d.code == "FD110" and d.message == "control character U+001B is not allowed in a spec"


# --- 4. an evaluation error says where it happened ----------------------------------------------------------

CARD = "4111111111111111"
SUBSTRING = "argument 1 of $substring must be a string; got a number (5)"
NUMBER = '$number cannot convert a string ("abc") to a number'


@pytest.mark.parametrize(("steps", "script", "run_input", "step", "says"), [
    ([{"b": {"when": "${ $substring(amount, 1) = 'x' }"}}], {}, {"amount": 5, "card": CARD}, "b",
     f"in 'when': {SUBSTRING}"),
    ([{"b": {"with": {"s": "${ $substring(amount, 1) }"}}}], {}, {"amount": 5, "card": CARD}, "b",
     f"in 'with.s': {SUBSTRING}"),
    ([{"b": {"with": {"order": {"lines": ["x", "${ $sum(items) }"]}}}}], {}, {"items": ["a"]}, "b",
     "in 'with.order.lines[1]': argument 1 of $sum must be an array of numbers; got an array ([\"a\"])"),
    ([{"b": {"with": {"note": "code ${ $number(code) }"}}}], {}, {"code": "abc"}, "b", f"in 'with.note': {NUMBER}"),
    ([{"for_each": "each", "items": "${ $split(csv, 1) }", "steps": ["b"]}], {}, {"csv": "a,b"}, "each",
     "in 'items': argument 2 of $split must be a string or a function; got a number (1)"),
    ([{"switch": "s", "on": "${ $uppercase(mode) }", "cases": {"A": ["x"]}}], {}, {"mode": 1}, "s",
     "in 'on': argument 1 of $uppercase must be a string; got a number (1)"),
    ([{"a": {"fail_when": "${ $number(code) > 1 }"}}], {"a": ok({"code": "abc"})}, {}, "a",
     f"in 'fail_when': {NUMBER}"),
    ([{"a": {"output": {"total": "${ $number(code) }"}}}], {"a": ok({"code": "abc"})}, {}, "a",
     f"in 'output.total': {NUMBER}"),
    ([{"for_each": "each", "items": "${ rows }", "steps": ["b"], "output": {"n": "${ $substring($count($), 1) }"}}],
     {}, {"rows": [1]}, "each", "in 'output.n': argument 1 of $substring must be a string; got a number (1)"),
])
def test_an_evaluation_error_names_the_option_it_happened_in(steps: list[Any], script: dict[str, Any],
                                                             run_input: dict[str, Any], step: str, says: str) -> None:
    """The run's error said only the engine's words: not whether `with`, `when` or an output map failed, nor which
    of a template's keys (the checks' FD501 say "in 'with.trip': …": the same names)."""
    sim = Sim(plan_of(steps), script, input=run_input).run()
    assert sim.status == "failed" and sim.state["failed_step"] == step
    assert sim.state["error"] == {"type": "ExpressionError", "message": says}
    assert [e["error"] for e in sim.of("step_failed", step=step)][-1:] == [sim.state["error"]]


def test_a_compensation_whose_with_fails_names_it() -> None:
    comp = {"worker": "undo_a", "with": {"n": "${ $number(code) }"}}
    sim = Sim(plan_of([{"a": {"compensate": comp}}, "b"]), {"a": ok({"code": "abc"}), "b": fail()}).run()
    assert sim.status == "needs_intervention"
    said = {"type": "ExpressionError", "message": f"in 'compensate.with.n': {NUMBER}"}
    assert sim.state["intervention"]["steps"][0]["last_error"] == said
    assert [e["error"] for e in sim.of("compensation_failed", step="a")] == [said]


def test_a_failed_evaluation_over_a_large_input_quotes_none_of_it_end_to_end() -> None:
    """The local runtime's result (what `flowdsl run --format json` prints): the error, the step's error and its
    event said where and what in a few dozen characters; they quoted the whole 2,000-item context (64 KB),
    card number included, three times over."""
    from flowdsl import compile_text, run
    from flowdsl.workers import WorkerRegistry

    registry = WorkerRegistry()
    registry.register("pay_e7", lambda data, ctx: {})
    plan = compile_text("flowdsl: 1\nname: big\nworkers: [nowhere_e7]\nsteps:\n  - pay:\n"
                        "      worker: pay_e7\n      with: {s: \"${ $substring(amount, 1) }\"}\n")
    run_input = {"amount": 5, "card": {"number": CARD},
                 "items": [{"sku": f"sku-{i}", "name": "a long product name"} for i in range(2000)]}
    result = run(plan, run_input, record=False, registry=registry, import_workers=False, handle_sigint=False)
    out = json.loads(json.dumps(result.to_json()))
    said = {"type": "ExpressionError", "message": f"in 'with.s': {SUBSTRING}"}
    assert out["status"] == "failed" and out["failed_step"] == "pay"
    assert out["error"] == said and out["steps"]["pay"]["error"] == said
    assert [e["error"] for e in out["events"] if e.get("error")] == [said, said]  # step_failed, run_finished
    out.pop("context")  # the run's input, where it belongs
    assert CARD not in json.dumps(out) and len(json.dumps(out)) < 3000


# --- 5. what one built-in call may build -------------------------------------------------------------------------

LIMIT = f"the limit is {SIZE_LIMIT:,}"
PAD_OVER = f"$pad would make a string of {SIZE_LIMIT + 1:,} characters; {LIMIT}"
RANGE_OVER = f"the range operator (..) would make an array of {SIZE_LIMIT + 1:,} items; {LIMIT}"


def bounded(source: str, data: Any) -> tuple[Any, float, int]:
    """The value of ``source`` over ``data`` (or its ExpressionError), the seconds it took and the peak of what
    Python allocated meanwhile."""
    expression = compile_expression(source)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        value: Any = expression.evaluate(data)
    except ExpressionError as exc:
        value = exc
    finally:
        took, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return value, took, peak


@pytest.mark.parametrize(("source", "data", "says"), [
    ("$pad('', n)", {"n": SIZE_LIMIT + 1}, PAD_OVER),
    ("$pad('ab', -n, '-')", {"n": SIZE_LIMIT + 1}, PAD_OVER),
    ("s ~> $pad(n)", {"s": "x", "n": SIZE_LIMIT + 1}, PAD_OVER),
    ("$map([1, 2], function($v) { $pad('', $v * n) })", {"n": SIZE_LIMIT // 2 + 1},
     f"$pad would make a string of {SIZE_LIMIT + 2:,} characters; {LIMIT}"),
    ("[1..n]", {"n": SIZE_LIMIT + 1}, RANGE_OVER),
    ("$count([-n..0])", {"n": SIZE_LIMIT}, RANGE_OVER),
    ("$fromMillis(0, '[M,' & $string(n) & ']')", {"n": SIZE_LIMIT + 1},
     f"$fromMillis would pad a component of its picture to {SIZE_LIMIT + 1:,} characters (its width modifier "
     f"',{SIZE_LIMIT + 1}'); "
     f"{LIMIT}"),
    ("$fromMillis(0, '[Y,2-' & $string(n) & ']')", {"n": SIZE_LIMIT + 1},
     f"$fromMillis would pad a component of its picture to {SIZE_LIMIT + 1:,} characters (its width modifier "
     f"',2-{SIZE_LIMIT + 1}'); "
     f"{LIMIT}"),
    # ($now is refused in specs, FD503, but a plan written by hand may hold it)
    ("$now('[M,' & $string(n) & ']')", {"n": SIZE_LIMIT + 1},
     f"$now would pad a component of its picture to {SIZE_LIMIT + 1:,} characters (its width modifier "
     f"',{SIZE_LIMIT + 1}'); {LIMIT}"),
])
def test_a_built_in_that_would_build_over_the_limit_fails_at_once(source: str, data: Any, says: str) -> None:
    """The time bound is checked between evaluation steps: one built-in call ran to its end, so `$pad('', n)` with
    n = 3,000,000,000 from the run input ran 10.9 s and took 5.8 GB before it was called a timeout."""
    value, took, peak = bounded(source, data)
    assert isinstance(value, ExpressionError) and value.message == says
    assert took < 1 and peak < 20_000_000


@pytest.mark.parametrize(("source", "data", "size"), [
    ("$length($pad('', n))", {"n": SIZE_LIMIT}, SIZE_LIMIT),
    ("$length($pad('ab', -n, '-'))", {"n": SIZE_LIMIT}, SIZE_LIMIT),
    ("$length($pad(s, n))", {"s": "x" * (SIZE_LIMIT + 5), "n": SIZE_LIMIT + 3}, SIZE_LIMIT + 5),  # s as it is
    ("$count([1..n])", {"n": SIZE_LIMIT}, SIZE_LIMIT),
    ("$length($fromMillis(0, '[M,' & $string(n) & ']'))", {"n": SIZE_LIMIT}, SIZE_LIMIT),
])
def test_a_built_in_at_the_limit_works_as_before(source: str, data: Any, size: int) -> None:
    assert compile_expression(source).evaluate(data) == size


def test_the_size_bounds_leave_small_results_as_they_were() -> None:
    assert compile_expression("[$pad('ab', 5, '-'), $pad('ab', -5), [2..4], $fromMillis(0, '[Y,2-4]-[M,3]')]"
                              ).evaluate({}) == ["ab---", "   ab", [2, 3, 4], "1970-001"]


def test_a_call_asking_for_gigabytes_fails_at_once_in_a_process_that_cannot_have_them() -> None:
    """Under a 1 GiB address-space limit: each of these allocated (or tried to allocate) gigabytes, and a process
    on Redis, a worker's event loop, stopped heartbeating while it did."""
    script = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from flowdsl.expr import ExpressionError, compile_expression
out = []
for source in sys.argv[1:]:
    started = time.perf_counter()
    try:
        compile_expression(source).evaluate({"n": 3000000000})
        out.append(["value", time.perf_counter() - started])
    except ExpressionError as exc:
        out.append([exc.message, time.perf_counter() - started])
print(json.dumps(out))
"""
    sources = ["$pad('', n)", "[0..n * 10]", "$fromMillis(0, '[M,' & $string(n) & ']')",
               "$fromMillis(0, '[Y,1-' & $string(n) & ']')"]
    done = subprocess.run([sys.executable, "-c", script, *sources], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    said = json.loads(done.stdout)
    assert [message for message, _ in said] == [
        f"$pad would make a string of 3,000,000,000 characters; {LIMIT}",
        f"the range operator (..) would make an array of 30,000,000,001 items; {LIMIT}",
        "$fromMillis would pad a component of its picture to 3,000,000,000 characters (its width modifier "
        f"',3000000000'); {LIMIT}",
        "$fromMillis would pad a component of its picture to 3,000,000,000 characters (its width modifier "
        f"',1-3000000000'); {LIMIT}",
    ]
    assert all(took < 1 for _, took in said)


def test_a_pad_width_from_the_run_input_fails_the_step_naming_the_option() -> None:
    """`$pad('', order.n)`: one run input made the process allocate gigabytes; on Redis, a worker's event loop."""
    from flowdsl import compile_text, run
    from flowdsl.workers import WorkerRegistry

    registry = WorkerRegistry()
    registry.register("fill_b5", lambda data, ctx: {"len": len(data["s"])})
    plan = compile_text("flowdsl: 1\nname: pad\nworkers: [nowhere_b5]\nsteps:\n  - fill:\n"
                        "      worker: fill_b5\n      with: {s: \"${ $pad('', order.n) }\"}\n")
    said = {"type": "ExpressionError",
            "message": f"in 'with.s': $pad would make a string of 3,000,000,000 characters; {LIMIT}"}
    started = time.perf_counter()
    result = run(plan, {"order": {"n": 3_000_000_000}}, record=False, registry=registry, import_workers=False,
                 handle_sigint=False)
    assert time.perf_counter() - started < 1
    out = result.to_json()
    assert out["status"] == "failed" and out["failed_step"] == "fill"
    assert out["error"] == said and out["steps"]["fill"]["error"] == said
    result = run(plan, {"order": {"n": 12}}, record=False, registry=registry, import_workers=False,
                 handle_sigint=False)
    assert result.status == "completed" and result.context["len"] == 12


def test_a_range_from_the_run_input_fails_the_for_each_naming_its_items() -> None:
    steps = [{"for_each": "each", "items": "${ [1..count] }", "steps": ["b"]}]
    sim = Sim(plan_of(steps), {}, input={"count": 20_000_000}).run()
    assert sim.status == "failed" and sim.state["failed_step"] == "each"
    assert sim.state["error"] == {"type": "ExpressionError", "message": "in 'items': the range operator (..) would "
                                  f"make an array of 20,000,000 items; {LIMIT}"}


def test_the_documented_size_limit_is_the_one_applied() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    assert f"at most **{SIZE_LIMIT:,}** characters or items" in text
