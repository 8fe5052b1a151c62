"""What one built-in call or operator may build when its result's size is a *product* of the sizes of what it is
given (``$replace``, ``$join``, ``$string``, ``&``, ``$clone``, the transform, ``=``, ``**``, ``$distinct``, the
expression's own value), the built-ins the engine did in quadratic time (``$distinct``, ``$spread``, ``$replace``
with a regular expression and a limit), and the messages of a timeout and of a regular expression out of time.

Each refusal is tested with sizes just over the limit: without the bound the call makes a few hundred KB at once
and the test fails on "no error", never by allocating gigabytes (those run in a subprocess under a 1 GiB limit).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonata
import pytest

from flowdsl.expr import ExpressionError, compile_expression
from flowdsl.expr_bounds import GROWTH, SHARED, SIZE_LIMIT, measure

TAIL = f"; the limit is {SIZE_LIMIT:,}, or {GROWTH} times what it is made of"
#: `$d`: a value whose JSON doubles at each of 14 steps of a $reduce, at no cost: some 230 KB written out
DOUBLED = "($d := $reduce([1..14], function($a, $i) { {'l': $a, 'r': $a} }, 'x');"


def doubled(depth: int = 14) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"l": value, "r": value}
    return value


#: the JSON of `$d` written out, and what it is made of: the deepest object ({"l":"x","r":"x"}: 17 characters),
#: and 13 above it ({"l":…,"r":…}: 13, each reference counting 1)
D_MADE = len(json.dumps(doubled(), separators=(",", ":")))
D_GIVEN = 17 + 13 * 13


def refused(source: str, data: Any = None) -> str:
    """The message of the ExpressionError that evaluating ``source`` over ``data`` raises (fails when none)."""
    with pytest.raises(ExpressionError) as raised:
        compile_expression(source).evaluate(data if data is not None else {})
    return raised.value.message


# --- 1. refused: a product of sizes -----------------------------------------------------------------------------

NOTE = {"note": " " * 400, "sep": "-" * 400}


@pytest.mark.parametrize(("source", "data", "says"), [
    # the audit's $replace(note, ' ', sep): 400 blanks, each becoming 400 dashes (60,000 of each asked for 3.6 GB)
    ("$replace(note, ' ', sep)", NOTE, f"$replace would make a string of 160,000 characters out of 801{TAIL}"),
    ("$replace(note, ' ', sep, 300)", NOTE,
     f"$replace would make a string of {400 + 300 * 399:,} characters out of 801{TAIL}"),
    ("$replace(note, ' ', '$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0$0')",
     {"note": " " * 4000}, f"$replace would make a string of {4000 * 31:,} characters out of {4000 + 1 + 62:,}{TAIL}"),
    # a regular expression: counted from its matches until over
    ("$replace(note, / /, sep)", NOTE, f"$replace would make a string of at least 100,150 characters out of 800{TAIL}"),
    # a group in a look-ahead: each of 501 empty matches puts the rest of the string (125,000 characters in all)
    ("$replace(s, /(?=(.*))/, '$1')", {"s": "a" * 500},
     f"$replace would make a string of at least 100,099 characters out of 502{TAIL}"),
    # a function giving the same long string for each match
    ("($big := big; $replace(s, /a/, function($m) { $big }))", {"s": "a" * 20, "big": "b" * 10_000},
     f"$replace would make a string of at least 110,009 characters out of 10,032{TAIL}"),
    # with a limit, its rounds replace in what they made: '$0$0' doubles the string at each round
    ("$replace(s, /.+/, '$0$0', 30)", {"s": "ab"},
     f"$replace would make (in its round 16) a string of 131,072 characters out of 6{TAIL}"),
    # the same long string many times in the array, or a long separator between short strings
    ("($big := big; $join([1..20].($big)))", {"big": "b" * 10_000},
     f"$join would make a string of 200,000 characters out of 10,021{TAIL}"),
    ("$join($split(s, ''), sep)", {"s": "x" * 300, "sep": "-" * 400},
     f"$join would make a string of {300 + 299 * 400:,} characters out of {400 + 300 * 3:,}{TAIL}"),
    # a value referring to the same parts from many places, written out as JSON
    (DOUBLED + " $string($d))", {}, f"$string would make a string of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $d & '')", {},
     f"the '&' operator would make a string of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $clone($d))", {}, f"$clone would copy JSON of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $d ~> |$|{}|)", {},
     f"the transform operator (|…|…|) would copy JSON of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $d = $reduce([1..14], function($a, $i) { {'l': $a, 'r': $a} }, 'x'))", {},
     f"the '=' operator would compare JSON of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $count($d.**))", {},
     f"the descendants operator (**) would walk JSON of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    (DOUBLED + " $count($distinct([$d, $d])))", {},
     f"$distinct would compare JSON of {2 * D_MADE + 3:,} characters out of {D_GIVEN + 5}{TAIL}"),
    (DOUBLED + " $d)", {}, f"the expression's value would be JSON of {D_MADE:,} characters out of {D_GIVEN}{TAIL}"),
    ("($big := big; [1..20].($big))", {"big": "b" * 10_000},
     f"the expression's value would be JSON of {20 * 10_002 + 21:,} characters out of {2 + 10_002 + 19 + 19:,}"
     f"{TAIL}"),
])
def test_a_result_that_is_a_product_of_sizes_is_refused_before_it_is_made(source: str, data: Any,
                                                                          says: str) -> None:
    started = time.perf_counter()
    assert refused(source, data) == says
    assert time.perf_counter() - started < 1


def test_the_audits_own_sizes_fail_at_once_in_a_process_that_cannot_have_gigabytes() -> None:
    """60,000 blanks and a 60,000-character separator from the run input: 3.6 GB and 3.8 s in one call, then
    reported as "evaluation timeout after 100 milliseconds"; a function or a join did as much."""
    script = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from flowdsl.expr import ExpressionError, compile_expression
data = {"note": " " * 60000, "sep": "-" * 60000}
out = []
for source in sys.argv[1:]:
    started = time.perf_counter()
    try:
        compile_expression(source).evaluate(data)
        out.append(["value", time.perf_counter() - started])
    except ExpressionError as exc:
        out.append([exc.message, time.perf_counter() - started])
print(json.dumps(out))
"""
    sources = ["$replace(note, ' ', sep)", "$replace(note, / /, sep)", "$replace(note, /( )/, '$1' & sep)",
               "$replace(note, / /, function($m) { sep })", "$join($split(note, ''), sep)",
               "($s := sep; $string([1..2000].($s)))"]
    done = subprocess.run([sys.executable, "-c", script, *sources], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    said = json.loads(done.stdout)
    assert [message for message, _ in said] == [
        f"$replace would make a string of 3,600,000,000 characters out of 120,001{TAIL}",
        # counted until over 10 times what it is made of: 20 matches of 59,999 more characters each
        f"$replace would make a string of at least 1,259,980 characters out of 120,000{TAIL}",
        f"$replace would make a string of at least 1,260,000 characters out of 120,002{TAIL}",
        f"$replace would make a string of at least 1,259,980 characters out of 120,021{TAIL}",
        f"$join would make a string of 3,600,000,000 characters out of 240,000{TAIL}",
        f"$string would make a string of {2 + 2_000 * 60_002 + 1_999:,} characters out of "
        f"{2 + 60_002 + 1_999 + 1_999:,}{TAIL}",
    ]
    assert all(took < 1 for _, took in said)


# --- 2. left alone: linear in what is given -----------------------------------------------------------------------


@pytest.mark.parametrize(("source", "data", "size"), [
    # over 100,000 characters, but no more than 10 times what they are made of (few matches: the engine makes
    # each one in Python, some 3 µs)
    ("$length($replace(s, '<', '&lt;'))", {"s": "x" * 100_000 + "<" * 500}, 102_000),
    ("$length($replace(s, /</, '&lt;'))", {"s": "x" * 100_000 + "<" * 500}, 102_000),
    ("$length($replace(s, /(<)/, '[$1$1]'))", {"s": "<" * 20 + "x" * 100_000}, 100_080),
    ("$length($replace(s, '<', r))", {"s": "<" * 20 + "x" * 6_000, "r": "-" * 5_000}, 106_000),  # 9.6 times
    ("$length($join(a, ', '))", {"a": [f"{i:0100d}" for i in range(1_500)]}, 1_500 * 100 + 1_499 * 2),
    ("$length($string(a, true))", {"a": [[[[f"{i:060d}" for i in range(2_000)]]]]},  # pretty-printed: indented
     len(json.dumps([[[[f"{i:060d}" for i in range(2_000)]]]], indent="  "))),
    ("$length($string(a))", {"a": [{"sku": f"S{i:060d}", "qty": i} for i in range(2_000)]},  # (few nodes: fast
     len(json.dumps([{"sku": f"S{i:060d}", "qty": i} for i in range(2_000)], separators=(",", ":")))),  # loaded)
    ("$length($string({'billing': a, 'shipping': a}))", {"a": {"street": "x" * 70_000}},
     len(json.dumps({"billing": {"street": "x" * 70_000}, "shipping": {"street": "x" * 70_000}},
                    separators=(",", ":")))),
    ("$length(a & '')", {"a": [f"{i:060d}" for i in range(2_000)]},
     len(json.dumps([f"{i:060d}" for i in range(2_000)], separators=(",", ":")))),
    ("$count($distinct(a))", {"a": [{"k": i % 50} for i in range(2_000)]}, 50),
])
def test_a_result_linear_in_what_is_given_is_made_as_before(source: str, data: Any, size: int) -> None:
    assert compile_expression(source).evaluate(data) == size


def test_a_value_sharing_a_part_a_few_times_is_made_as_before() -> None:
    address = {"street": "x" * 70_000}
    value = compile_expression("{'billing': a, 'shipping': a}").evaluate({"a": address})
    assert value == {"billing": address, "shipping": address}
    assert value["billing"] is not value["shipping"]  # two copies, as before
    items = compile_expression("items.{'sku': sku, 'w': $$.warehouse}").evaluate(
        {"items": [{"sku": f"S{i}"} for i in range(1_000)], "warehouse": {"code": "w" * 40}})
    assert len(items) == 1_000 and items[999] == {"sku": "S999", "w": {"code": "w" * 40}}


def test_null_in_a_value_is_still_null() -> None:
    """The engine's own pass turning its null into None walked the value written out: flowdsl does it instead."""
    assert compile_expression("{'a': null, 'b': [null, 1], 'c': $d}").evaluate({}, {"d": None}) \
        == {"a": None, "b": [None, 1]}
    assert compile_expression("null").evaluate({}) is None
    assert compile_expression("[null]").evaluate({}) == [None]


# --- 3. measure: a value's JSON, written out and as made ----------------------------------------------------------


def test_measure_is_the_length_of_the_json_written_out() -> None:
    rng = random.Random(7)

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 4 or roll < 0.3:
            return rng.choice([0, 17, -3, 2.5, True, False, None, "", "ab", "x" * rng.randint(0, 90)])
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {f"k{i}" * rng.randint(1, 3): value(depth + 1) for i in range(rng.randint(0, 4))}

    for _ in range(1_500):
        item = value(0)
        if isinstance(item, list | dict) and rng.random() < 0.4:
            item = [item, item, {"again": item}]
        assert measure(item)[0] == len(json.dumps(item, separators=(",", ":")))
        assert measure(item, pretty=True)[0] == len(json.dumps(item, indent="  "))


def test_measure_counts_each_part_once_in_what_a_value_is_made_of() -> None:
    long = "y" * (SHARED + 1)
    assert measure([long] * 3) == (3 * (SHARED + 4) + 1, 2 + SHARED + 3 + 1 + 1 + 2)
    short = "y" * SHARED
    assert measure([short] * 3)[1] == measure([short] * 3)[0]  # a short string counts wherever it is
    assert measure(doubled()) == (D_MADE, D_GIVEN)
    started = time.perf_counter()
    made, given = measure(doubled(200))  # 2**200 leaves written out, 200 objects made
    assert made > 2**200 and given < 3_000 and time.perf_counter() - started < 0.5


# --- 4. quadratic in the engine, linear here ---------------------------------------------------------------------


def test_distinct_of_many_items_gives_the_engines_result_within_the_time_bound() -> None:
    """The engine compared each item with each item kept: 37 s for $distinct([1..100000]); 20,000 items here
    ran past the time bound."""
    items = [*range(10_000), *range(10_000), 1.0, True, "1", None]
    assert compile_expression("$distinct(a)").evaluate({"a": items}) == [*range(10_000), "1", None]
    objects = [{"k": i, "l": [i, {"m": i}]} for i in range(1_500)] * 2
    assert compile_expression("$count($distinct(a))").evaluate({"a": objects}) == 1_500
    assert compile_expression("$distinct([1, 1.0, true, 'a', 'a', [1], [1.0], {'a': 1}, {'a': true}])").evaluate(
        {}) == [1, "a", [1], {"a": 1}]


def test_spread_of_many_items_gives_the_engines_result_within_the_time_bound() -> None:
    """The engine copied its result once per item: 36 s for 100,000 items; 10,000 ran past the time bound."""
    items = [{"k": i, "l": i} for i in range(10_000)]
    value = compile_expression("$spread(a)").evaluate({"a": items})
    assert len(value) == 20_000 and value[:3] == [{"k": 0}, {"l": 0}, {"k": 1}]
    assert compile_expression("$spread([[{'a': 1}], 3, [], [[]], {'b': 2}])").evaluate({}) == [{"a": 1}, 3, {"b": 2}]


def test_replace_with_a_limit_stops_once_nothing_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine replaced the first match of its result `limit` times, matching or not: 11 s for
    $replace('b', /a/, 'x', 3000000), for ever with a larger limit."""
    rounds = count_rounds(monkeypatch, stop_after=100_000)
    assert compile_expression("$replace(s, /a/, 'x', 1e12)").evaluate({"s": "babab"}) == "bxbxb"
    assert rounds == [2]  # two replacements; the round that found nothing is the last
    assert compile_expression("$replace(s, /a/, 'aa', 3)").evaluate({"s": "a"}) == "aaaa"  # (the engine's way)


def test_replace_with_a_limit_that_keeps_matching_is_stopped_by_the_time_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = count_rounds(monkeypatch, stop_after=1_000_000)  # without the bound: for ever, so stopped here
    started = time.perf_counter()
    said = refused("$replace(s, /a/, 'a', 1e12)", {"s": "a"})
    assert said == "evaluation timeout after 100 milliseconds. Check for infinite loop"
    assert time.perf_counter() - started < 1 and rounds[0] > 1


def count_rounds(monkeypatch: pytest.MonkeyPatch, stop_after: int) -> list[int]:
    """Count the rounds of the engine's ``$replace`` with a limit (one ``safe_replace_first`` each); past
    ``stop_after`` of them, fail."""
    functions = jsonata.functions.Functions
    original = functions.safe_replace_first
    rounds = [0]

    def counted(s: str, pattern: Any, replacement: str) -> Any:
        rounds[0] += 1
        if rounds[0] > stop_after:
            raise AssertionError(f"more than {stop_after:,} rounds")
        return original(s, pattern, replacement)

    monkeypatch.setattr(functions, "safe_replace_first", staticmethod(counted))
    return rounds


# --- 5. messages: a timeout, a regular expression out of time -----------------------------------------------------


def test_a_call_that_overran_the_bound_says_how_long_the_evaluation_took() -> None:
    """The audit's $replace ran 3.8 s in one call and was reported as a "timeout after 100 milliseconds"."""
    def busy() -> int:  # one call the bound cannot interrupt: 0.3 s of work (the bound is CPU time)
        until = time.thread_time() + 0.3
        while time.thread_time() < until:
            pass
        return 1

    slow = jsonata.Jsonata.JLambda(busy)
    with pytest.raises(ExpressionError) as raised:
        compile_expression("$slow()").evaluate({}, {"slow": slow})
    said = re.fullmatch(r"evaluation took (\d+\.\d+) s, over its bound of 100 ms: one operation ran that long "
                        r"before the bound could be checked \(an infinite loop, or too much work for one "
                        r"expression\)", raised.value.message)
    assert said is not None, raised.value.message
    assert 0.3 <= float(said.group(1)) < 2


def test_an_evaluation_stopped_at_its_bound_says_so_as_before() -> None:
    said = refused("[1..100000].($ * 2)")
    assert said == "evaluation timeout after 100 milliseconds. Check for infinite loop"


def test_a_regular_expression_with_too_many_matches_is_not_said_to_backtrack() -> None:
    """`$count($match(x, /a/))` over a million a's was said to backtrack too much: /a/ cannot backtrack."""
    said = refused("$count($match(x, /a/))", {"x": "a" * 1_000_000})
    assert re.fullmatch(r"a regular expression took longer than 100 ms on this data: it had made [\d,]+ matches by "
                        r"then, too many for one expression", said), said
    assert "backtrack" not in said


def test_a_regular_expression_that_backtracks_is_still_said_to() -> None:
    said = refused("$match(s, /^(a|aa)+$/)", {"s": "a" * 80 + "!"})
    assert said == ("a regular expression took longer than 100 ms on this data (0 matches by then): it backtracks "
                    "too much (write it so that each character can be matched one way only), or the text is too "
                    "long")
    said = refused("$split(s, /^(a|aa)+$/)", {"s": "a" * 80 + "!"})  # (its matches are not counted)
    assert said.endswith(": it backtracks too much (write it so that each character can be matched one way only), "
                         "or it matches too many times for one expression")


# --- 6. end to end, and the documentation ------------------------------------------------------------------------


def test_a_replace_from_the_run_input_fails_the_step_naming_the_option() -> None:
    from flowdsl import compile_text, run
    from flowdsl.workers import WorkerRegistry

    registry = WorkerRegistry()
    registry.register("echo_b6", lambda data, ctx: {"len": len(data["note"])})
    plan = compile_text("flowdsl: 1\nname: rep\nworkers: [nowhere_b6]\nsteps:\n  - normalise:\n"
                        "      worker: echo_b6\n      with: {note: \"${ $replace(note, ' ', sep) }\"}\n")
    said = {"type": "ExpressionError",
            "message": f"in 'with.note': $replace would make a string of 160,000 characters out of 801{TAIL}"}
    result = run(plan, NOTE, record=False, registry=registry, import_workers=False, handle_sigint=False)
    out = result.to_json()
    assert out["status"] == "failed" and out["failed_step"] == "normalise"
    assert out["error"] == said and out["steps"]["normalise"]["error"] == said
    result = run(plan, {"note": "a b c", "sep": "--"}, record=False, registry=registry, import_workers=False,
                 handle_sigint=False)
    assert result.status == "completed" and result.context["len"] == 7


def test_the_documented_growth_is_the_one_applied() -> None:
    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text().split())
    assert f"over {SIZE_LIMIT:,} characters **and** over {GROWTH} times what it is made of" in text
    assert f"each array, object and string of more than {SHARED} characters counted once" in text
    assert f"{TAIL[2:]}`" in text
