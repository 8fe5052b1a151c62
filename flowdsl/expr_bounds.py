"""Size bounds: what one built-in call or operator of an expression may build.

Stage: shared, used by ``flowdsl.expr`` only (installed into the engine when ``flowdsl.expr`` first imports it).
Imports only the stdlib; the jsonata module is given by the caller.

The time bound on an evaluation is checked by the engine each time it enters or leaves a node of the expression,
so one built-in call runs to its end before it can be stopped: ``$pad("", 3000000000)`` ran 10.9 s and took
5.8 GB before being reported as a timeout, with the width read from the run's input. What one call may build is
therefore checked before it does the work.

Set by a number it is given, not by the size of what it works on, against :data:`SIZE_LIMIT`:

- ``$pad(s, width)``: a string of ``|width|`` characters;
- the range operator ``[a..b]``: an array of ``b - a + 1`` items (JSONata's own limit is 10,000,000, which
  costs seconds and hundreds of MB once the array is made into JSON);
- ``$fromMillis(ms, picture)``: a width modifier in the picture (``[M,5]``, ``[Y,2-4]``) pads a component to
  that many digits (and a year's maximum width is a power of ten of that many digits).

Set by a *product* of the sizes of what it is given, against :data:`SIZE_LIMIT` or :data:`GROWTH` times the size
of what it is made of (:func:`over`), whichever is more — so that work linear in data already there is left
alone, and a product of two sizes is not (``$replace(note, ' ', sep)`` with 60,000 characters each asked for
3.6 GB, in one call of 3.8 s):

- ``$replace(s, pattern, replacement)``: each match becomes the replacement (``$0``, ``$1`` copy the match or a
  group into it, and a function's result may be the same long string for each match); for a string pattern the
  result's size is computed from ``str.count``, for a regular expression it is bounded from the matches, found
  first (within the regular expression's own time bound) when a cheap bound does not settle it;
- ``$join(strings, separator)``: one separator between each two strings, and the same long string may be in the
  array many times (``[1..1000].$big``);
- ``$string(value)``, the ``&`` operator (which makes its sides into strings as ``$string`` does), ``$clone`` and
  the transform operator (``|…|…|``, which copies its input as JSON): the JSON of a value written out, where an
  array or object may be referred to from many places (``{'l': $a, 'r': $a}`` in a ``$reduce`` doubles the JSON
  at each step and takes no time: 30 steps make gigabytes), and pretty-printing indents each line by its depth;
- the ``=`` and ``!=`` operators, comparing such values item by item, and the descendants operator ``**``,
  walking one;
- ``$distinct`` on arrays of arrays or objects (compared as JSON, as above);
- the expression's value itself, made into JSON after the evaluation (checked by ``flowdsl.expr.to_json_value``
  when it meets a part twice).

:func:`measure` tells a value's JSON size written out (``made``) and the size of what it is made of (``given``:
each array, object and string of more than :data:`SHARED` characters counted once however often it is referred
to), in one pass over the distinct parts.

Quadratic in what they are given, so done here instead, with the same results: ``$distinct`` (the engine compared
each item with each item kept: 37 s for ``[1..100000]``) and ``$spread`` of an array (the engine copied the
result once per item: 36 s for 100,000 items). ``$replace`` with a regular expression and a limit (the engine
replaces the first match of its result ``limit`` times, from the start each time: 11 s for
``$replace('b', /a/, 'x', 3000000)``, and for ever with a larger limit) stops once nothing matches — what the
remaining rounds would change — and is checked against the time bound at each round (:func:`evaluating` gives
it the evaluation's deadline).

The others are bounded by their input (``$split``, ``$substring``, ``$uppercase``, ``$base64encode``,
``$encodeUrl``: at most a few characters for each one given; ``$match`` and ``$split`` with a regular expression
by its time bound), by their picture string's length (``$formatNumber``, ``$formatInteger``), by the range of a
JSON number (``$formatBase``: at most 1,100 digits; ``$formatInteger`` in words or letters), or by Python's
recursion limit (``$formatInteger`` in Roman numerals: 1,000 per ``m``, one recursion each); the functions that
call a function per item (``$map``, ``$filter``, ``$reduce``, ``$sort``, ``$each``, ``$sift``) are checked by the
time bound at each call.

Hooked where the engine runs these, once: ``Jsonata.JNativeFunction.call`` (every built-in call, with its
arguments checked against its signature), ``Jsonata.evaluate_range_expression``,
``Jsonata.evaluate_string_concat``, ``Jsonata.evaluate_equality_expression``, ``Jsonata.evaluate_descendants``
and ``Jsonata.Transformer.call``. The engine has no setting for any; :func:`install` refuses to run on an engine
that lacks them, rather than evaluate unbounded.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: the most characters of a string, or items of an array, that one built-in call or operator may build from a
#: size given as an argument. A range is the costly one: at 100,000 items, making it into JSON after the
#: evaluation takes about as long as the time bound (at 1,000,000, 0.7-1.4 s and 65 MB, all outside the bound);
#: and a range of more than some 10,000 items cannot be mapped within that bound anyway
SIZE_LIMIT = 100_000
#: how many times the size of what it is made of a call may build, when that is more than :data:`SIZE_LIMIT`:
#: escaping (``<`` into ``&lt;``), separators between short strings and pretty-printed JSON stay well within it
GROWTH = 10
#: a string of more than this many characters is counted once in what a value is made of, however often it is
#: referred to; a shorter one (a key, a code) wherever it is
SHARED = 64


class TooLarge(Exception):
    """A built-in call or operator would build more than :data:`SIZE_LIMIT`; the message says which and how much
    (``flowdsl.expr`` makes it an ``ExpressionError``)."""


def _refuse(what: str, size: int, unit: str) -> TooLarge:
    return TooLarge(f"{what} would make {unit} of {size:,} {'items' if unit == 'an array' else 'characters'}; "
                    f"the limit is {SIZE_LIMIT:,}")


def over(made: int, given: int) -> bool:
    """Whether building ``made`` characters out of ``given`` is refused: over :data:`SIZE_LIMIT` and over
    :data:`GROWTH` times ``given``."""
    return made > SIZE_LIMIT and made > GROWTH * given


def too_large(what: str, made: int, given: int, *, exact: bool = True) -> TooLarge:
    """The refusal of ``what`` ("$replace would make a string") for ``made`` characters out of ``given`` (at least
    ``made``, when not ``exact``: counted until it was over)."""
    return TooLarge(f"{what} of {'' if exact else 'at least '}{made:,} characters out of {given:,}; the limit is "
                    f"{SIZE_LIMIT:,}, or {GROWTH} times what it is made of")


def _count(value: Any) -> int | None:
    """``value`` as a count the engine would truncate it to, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def _args(args: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` arguments, None for those left out (as the engine passes them)."""
    return [*args[:n], *[None] * (n - len(args))]


# --- set by a number --------------------------------------------------------------------------------------------


def _check_pad(args: Sequence[Any]) -> None:
    string, width = _args(args, 2)
    n = _count(width)
    if n is not None and isinstance(string, str) and abs(n) > SIZE_LIMIT and abs(n) > len(string):
        raise _refuse("$pad", abs(n), "a string")


_MARKER = re.compile(r"\[([^\]]*)\]")


def _check_from_millis(args: Sequence[Any]) -> None:
    _check_picture("$fromMillis", args[1] if len(args) > 1 else None)


def _check_now(args: Sequence[Any]) -> None:
    """``$now(picture)`` formats with ``$fromMillis``'s pictures (refused in specs, but a plan may be written by
    hand)."""
    _check_picture("$now", args[0] if args else None)


def _check_picture(function: str, picture: Any) -> None:
    if not isinstance(picture, str):
        return
    for marker in _MARKER.finditer(picture):
        spec = "".join(marker.group(1).split())
        comma = spec.rfind(",")  # the engine's reading: the width modifier follows the last comma
        if comma < 0:
            continue
        for width in spec[comma + 1:].split("-"):
            digits = width.lstrip("0")
            if width.isdecimal() and (len(digits) > len(str(SIZE_LIMIT)) or int(digits or 0) > SIZE_LIMIT):
                size = f"{int(digits):,}" if len(digits) <= 30 else f"a {len(digits):,}-digit number of"
                modifier = spec[comma:] if len(spec) - comma <= 30 else spec[comma:comma + 29] + "…"
                raise TooLarge(f"{function} would pad a component of its picture to {size} characters (its "
                               f"width modifier '{modifier}'); the limit is {SIZE_LIMIT:,}")


# --- the size of a value's JSON -----------------------------------------------------------------------------------


def _leaf(value: Any) -> int:
    """The characters of a value that is not an array or object, written as JSON (a string's escapes aside)."""
    if isinstance(value, str):
        return len(value) + 2
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, int):
        # (str() of an int of over 4,300 digits raises; 10**15 has 16 digits)
        return len(str(value)) if -10**15 < value < 10**15 else value.bit_length() * 30103 // 100000 + 2
    if isinstance(value, float):
        return len(repr(value))
    return 4  # the engine's null, a function (written as "")


def _children(value: Any) -> Iterator[Any]:
    return iter(value.values()) if isinstance(value, dict) else iter(value)


def measure(value: Any, pretty: bool = False) -> tuple[int, int]:
    """``(made, given)`` for ``value``: the characters of its JSON written out (every reference to an array,
    object or string written in full; indented by two spaces a level when ``pretty``), and of what it is made of
    (each array, object and string of more than :data:`SHARED` characters counted once, a further reference to
    it as 1). A string's escapes are not counted. Linear in the distinct parts of ``value``, whatever its size
    written out."""
    if not isinstance(value, list | tuple | dict):
        size = _leaf(value)
        return size, size
    # per array or object measured: (characters flat, lines, sum of their indentation levels, keys): see _combine
    memo: dict[int, tuple[int, int, int, int]] = {}
    seen: set[int] = set()  # the long strings counted in `given`
    given = 0
    active = {id(value)}  # on the path being measured (a cycle, which JSON data cannot have, counts 0)
    stack: list[tuple[Any, Iterator[Any]]] = [(value, _children(value))]
    while stack:
        node, children = stack[-1]
        for child in children:
            if isinstance(child, list | tuple | dict) and id(child) not in memo and id(child) not in active:
                active.add(id(child))
                stack.append((child, _children(child)))
                break
        else:
            stack.pop()
            active.discard(id(node))
            sizes, own = _combine(node, memo, seen, pretty)
            memo[id(node)] = sizes
            given += own
    flat, lines, indent, keys = memo[id(value)]
    return (flat + keys + lines + 2 * indent if pretty else flat), given


def _combine(node: Any, memo: dict[int, tuple[int, int, int, int]], seen: set[int],
             pretty: bool) -> tuple[tuple[int, int, int, int], int]:
    """The sizes of ``node`` from those of its parts, and what it adds to ``given``."""
    flat = own = 2  # the brackets
    lines = indent = keys = count = 0
    children: Any = node
    if isinstance(node, dict):
        for key in node:
            size = len(key) + 3 if isinstance(key, str) else 6  # the quotes and the colon
            flat += size
            own += _once(key, size, seen) if isinstance(key, str) else size
        keys = len(node)
        children = node.values()
    for child in children:
        count += 1
        if isinstance(child, str):
            size = len(child) + 2
            flat += size
            own += size if size <= SHARED + 2 else _once(child, size, seen)  # (a short one: at once)
        elif isinstance(child, list | tuple | dict):
            c_flat, c_lines, c_indent, c_keys = memo.get(id(child), (0, 0, 0, 0))
            flat += c_flat
            own += 1
            if pretty:
                lines, indent, keys = lines + c_lines, indent + c_indent + c_lines, keys + c_keys
        else:
            size = _leaf(child)
            flat += size
            own += size
    if count:
        flat += count - 1  # the commas
        own += count - 1
        if pretty:
            lines += count + 1  # a line for each item, and one for the closing bracket
            indent += count  # each item's first line, one level in
    return (flat, lines, indent, keys), own


def _once(string: str, size: int, seen: set[int]) -> int:
    """What a string of ``size`` characters written out adds to ``given``: all of them when it is short or seen the
    first time, else 1."""
    if len(string) <= SHARED:
        return size
    if id(string) in seen:
        return 1
    seen.add(id(string))
    return size


def _check_value(what: str, value: Any, pretty: bool = False) -> None:
    """Refuse ``what`` (a phrase ending before "of N characters") on ``value`` when its JSON is too large."""
    if isinstance(value, list | tuple | dict):
        made, given = measure(value, pretty)
        if over(made, given):
            raise too_large(what, made, given)


def _check_string(args: Sequence[Any]) -> None:
    value, pretty = _args(args, 2)
    _check_value("$string would make a string", value, bool(pretty))


def _check_clone(args: Sequence[Any]) -> None:
    _check_value("$clone would copy JSON", _args(args, 1)[0])


# --- set by a product: $join, $replace --------------------------------------------------------------------------


def _check_join(args: Sequence[Any]) -> None:
    strings, separator = _args(args, 2)
    if not isinstance(strings, list | tuple) or not all(isinstance(s, str) for s in strings):
        return  # the engine refuses it
    separator = separator if isinstance(separator, str) else ""
    made = sum(map(len, strings)) + max(len(strings) - 1, 0) * len(separator)
    if made <= SIZE_LIMIT:
        return
    seen: set[int] = set()
    given = len(separator) + sum(_once(s, len(s) + 2, seen) for s in strings)  # (+2: a reference counts)
    if over(made, given):
        raise too_large("$join would make a string", made, given)


#: what JSONata reads in a replacement for a string pattern (which has no groups): ``$$`` is one ``$``, ``$0`` the
#: match; any other ``$`` is itself
_DOLLAR = re.compile(r"\$[$0]")


def _expansion(replacement: str, match: int) -> int:
    """The length of what ``$replace`` with a string pattern puts for each match, ``match`` characters long."""
    return len(replacement) + sum(-1 if token == "$$" else match - 2 for token in _DOLLAR.findall(replacement))


def _put(match: Any, literal: int, refs: list[int], groups: int | None) -> int:
    """How many characters the template puts for ``match``: its ``literal`` ones, and each group it refers to
    (a group may lie outside the match, in a look-ahead; a group the pattern has not is an error of the engine's
    and counts 0; with the pattern's groups unknown, each reference counts as the longest of them)."""
    size = literal
    for group in refs:
        if groups is None:
            size += max(end - start for start, end in match.regs)
        elif group <= groups:
            start, end = match.span(group)
            size += max(end - start, 0)
    return size


class _Tracked:
    """A regular expression whose ``sub`` with a function checks, result by result, what the replacement makes
    (``$replace(s, /./, function($m) { $big })`` puts the same long string for each match)."""

    def __init__(self, pattern: Any) -> None:
        self._pattern = pattern

    def search(self, string: str) -> Any:
        return self._pattern.search(string)

    def finditer(self, string: str) -> Any:
        return self._pattern.finditer(string)

    def split(self, string: str, maxsplit: int = 0) -> Any:
        return self._pattern.split(string, maxsplit)

    def sub(self, repl: Any, string: str, count: int = 0) -> Any:
        if not callable(repl):
            return self._pattern.sub(repl, string, count)
        made = given = len(string)
        seen: set[int] = set()

        def tracked(match: Any) -> Any:
            nonlocal made, given
            result = repl(match)
            if isinstance(result, str):
                made += len(result) - (match.end() - match.start())
                given += _once(result, len(result) + 2, seen)
                if over(made, given):
                    raise too_large("$replace would make a string", made, given, exact=False)
            return result

        return self._pattern.sub(tracked, string, count)


def _replace(jsonata: Any, call: Callable[[Sequence[Any]], Any], args: Sequence[Any]) -> Any:
    """``$replace``: its result's size checked before the work (see the module's docstring), and with a regular
    expression and a limit, its rounds done here."""
    string, pattern, replacement, limit = _args(args, 4)
    if not isinstance(string, str) or (limit is not None and (_count(limit) is None or limit < 0)) \
            or not ((isinstance(pattern, str) and pattern) or _is_pattern(pattern)):
        return call(args)  # the engine says what is wrong
    given = len(string) + (len(pattern) if isinstance(pattern, str) else 0) \
        + (len(replacement) if isinstance(replacement, str) else 0)
    if isinstance(pattern, str):
        if isinstance(replacement, str):
            matches = string.count(pattern)
            if limit is not None:
                matches = min(matches, math.ceil(limit))
            made = len(string) + matches * (_expansion(replacement, len(pattern)) - len(pattern))
            if over(made, given):
                raise too_large("$replace would make a string", made, given)
        return call(args)
    groups = getattr(pattern, "groups", None)
    if limit is not None:
        return _replace_rounds(jsonata, string, pattern, str(replacement), limit, groups, given)
    if isinstance(replacement, str):
        _check_regex_replace(jsonata, string, pattern, replacement, groups, given)
        return call(args)
    return call([string, _Tracked(pattern), replacement, limit])


def _is_pattern(value: Any) -> bool:
    return all(callable(getattr(value, name, None)) for name in ("search", "finditer", "sub", "split"))


#: a group reference in a template for Python's ``sub`` (``\g<1>``, ``\1``): the engine writes ``$1`` as ``\g<1>``
_GROUP_REF = re.compile(r"\\g<(\d+)>|\\([1-9][0-9]?)")


def _template(jsonata: Any, replacement: str) -> tuple[int, list[int]]:
    """What the template the engine makes of ``replacement`` for a regular expression puts for each match: how
    many characters of its own (escapes counted as written, at least what they make), and the groups it refers
    to (``$1`` as ``\\g<1>``)."""
    template: str = jsonata.functions.Functions.safe_replacement(replacement)
    literal, refs = len(template), []
    for ref in _GROUP_REF.finditer(template):
        refs.append(int(ref.group(1) or ref.group(2)))
        literal -= len(ref.group())
    return literal, refs


def _check_regex_replace(jsonata: Any, string: str, pattern: Any, replacement: str, groups: int | None,
                         given: int) -> None:
    """Refuse ``$replace(string, /…/, replacement)`` when what it makes is too large: bounded at first by
    ``len(string) + 1`` matches, each making the template with each reference the whole string; when that is not
    enough, counted from the matches themselves (found within the regular expression's time bound) until it is
    over."""
    literal, refs = _template(jsonata, replacement)
    if not over(len(string) + (len(string) + 1) * (literal + len(refs) * len(string)), given):
        return
    made = len(string)
    for match in pattern.finditer(string):
        made += _put(match, literal, refs, groups) - (match.end() - match.start())
        if over(made, given):
            raise too_large("$replace would make a string", made, given, exact=False)


def _replace_rounds(jsonata: Any, string: str, pattern: Any, replacement: str, limit: float, groups: int | None,
                    given: int) -> str:
    """``$replace`` with a regular expression and a limit, as the engine does it: ``ceil(limit)`` rounds, each
    replacing the first match of the result so far (the replacement's own text included); here the rounds stop
    once nothing matches (the rest would change nothing), each is checked before it is done, and all of them
    against the evaluation's deadline."""
    literal, refs = _template(jsonata, replacement)
    first = jsonata.functions.Functions.safe_replace_first
    deadline = _deadline()
    result, done = string, 0
    while done < limit:
        match = pattern.search(result)
        if match is None:
            if not done:  # the engine's own round, which refuses a replacement it cannot read
                result = first(result, pattern, replacement)
            break
        made = len(result) + _put(match, literal, refs, groups) - (match.end() - match.start())
        if over(made, given):
            raise too_large(f"$replace would make (in its round {done + 1:,}) a string", made, given)
        if time.thread_time() > deadline:
            raise _timeout(jsonata)
        result = first(result, pattern, replacement)
        done += 1
    return result


# --- quadratic in the engine: $distinct, $spread ----------------------------------------------------------------


def _distinct(jsonata: Any, call: Callable[[Sequence[Any]], Any], args: Sequence[Any]) -> Any:
    """``$distinct``: the engine's result (the first of each set of equal items, compared with Python's ``==``,
    in a list of the same kind), found with a set instead of comparing each item with each item kept."""
    (array,) = _args(args, 1)
    if not isinstance(array, list) or len(array) <= 1:
        return call(args)
    if any(isinstance(item, list | tuple | dict) for item in array):
        _check_value("$distinct would compare JSON", array)
    utils = jsonata.utils.Utils
    results = utils.create_sequence() if isinstance(array, utils.JList) else []
    kept: set[Any] = set()
    try:
        for item in array:
            key = _key(item)
            if key not in kept:
                kept.add(key)
                results.append(item)
    except TypeError:  # an item that cannot be hashed (a function): the engine's way
        return call(args)
    return results


def _key(value: Any) -> Any:
    """A hashable stand-in for ``value``, equal to another's exactly when the values are ``==``."""
    if isinstance(value, dict):
        return frozenset((key, _key(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return tuple(_key(item) for item in value)
    return value


def _spread(jsonata: Any, call: Callable[[Sequence[Any]], Any], args: Sequence[Any]) -> Any:
    """``$spread``: the engine's result, without copying it once per item of an array."""
    (value,) = _args(args, 1)
    return _spread_of(jsonata.utils.Utils, value) if isinstance(value, list) else call(args)


def _spread_of(utils: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return utils.create_sequence_from_iter({key: item} for key, item in value.items())
    if not isinstance(value, list):
        return value
    items: list[Any] = []
    appended = False
    for item in value:
        part = _spread_of(utils, item)
        if part is None:
            continue  # the engine's append() keeps the result as it is
        appended = True
        if isinstance(part, list):
            items.extend(part)
        else:
            items.append(part)
    return utils.JList(items) if appended else utils.create_sequence()


# --- the evaluation's deadline ------------------------------------------------------------------------------------

_LOCAL = threading.local()


@contextlib.contextmanager
def evaluating(limit_ms: int) -> Iterator[None]:
    """Within it, the rounds done here (:func:`_replace_rounds`) stop ``limit_ms`` of this thread's CPU time from
    now, as the time bound between the engine's nodes does (``flowdsl.expr`` evaluates within it)."""
    before = getattr(_LOCAL, "deadline", None), getattr(_LOCAL, "limit_ms", None)
    _LOCAL.deadline, _LOCAL.limit_ms = time.thread_time() + limit_ms / 1000, limit_ms
    try:
        yield
    finally:
        _LOCAL.deadline, _LOCAL.limit_ms = before


def _deadline() -> float:
    deadline = getattr(_LOCAL, "deadline", None)
    return time.thread_time() + 0.1 if deadline is None else float(deadline)


def _timeout(jsonata: Any) -> Exception:
    """The engine's own timeout error (D1012), as its bound between nodes raises it."""
    error: Exception = jsonata.jexception.JException("D1012", -1, getattr(_LOCAL, "limit_ms", None) or 100)
    return error


#: the built-ins checked, by name, with what checks their (validated) arguments
CHECKS: dict[str, Callable[[Sequence[Any]], None]] = {
    "pad": _check_pad, "fromMillis": _check_from_millis, "now": _check_now, "join": _check_join,
    "string": _check_string, "clone": _check_clone,
}
#: the built-ins done here, by name: each is given the jsonata module, the engine's call and the arguments
INSTEAD: dict[str, Callable[[Any, Callable[[Sequence[Any]], Any], Sequence[Any]], Any]] = {
    "replace": _replace, "distinct": _distinct, "spread": _spread,
}


def install(jsonata: Any) -> None:
    """Put the checks into the engine (once; idempotent). Raises RuntimeError on an engine version without the
    points hooked."""
    engine = jsonata.Jsonata
    if getattr(engine, "_flowdsl_size_bounds", False):
        return
    native: Any = getattr(engine, "JNativeFunction", None)
    native_call: Any = getattr(native, "call", None)
    transformer: Any = getattr(engine, "Transformer", None)
    transform_call: Any = getattr(transformer, "call", None)
    range_of: Any = getattr(engine, "evaluate_range_expression", None)
    concat: Any = getattr(engine, "evaluate_string_concat", None)
    equality: Any = getattr(engine, "evaluate_equality_expression", None)
    descendants: Any = getattr(engine, "evaluate_descendants", None)
    frame = getattr(engine, "static_frame", None)
    names = getattr(frame, "bindings", {})
    functions = getattr(getattr(jsonata, "functions", None), "Functions", None)
    if None in (native_call, transform_call, range_of, concat, equality, descendants) or any(
            getattr(names.get(name), "function_name", None) != name for name in (*CHECKS, *INSTEAD)) or any(
            getattr(functions, name, None) is None for name in ("safe_replacement", "safe_replace_first")) \
            or getattr(getattr(jsonata, "jexception", None), "JException", None) is None \
            or getattr(getattr(jsonata, "utils", None), "Utils", None) is None:
        raise RuntimeError("this version of jsonata-python has no JNativeFunction.call, Transformer.call, "
                           "evaluate_range_expression, evaluate_string_concat, evaluate_equality_expression, "
                           "evaluate_descendants, or "
                           "built-ins named as flowdsl expects: flowdsl cannot bound the size of what an "
                           "expression builds (flowdsl/expr_bounds.py)")

    def call(self: Any, input: Any, args: Any) -> Any:
        name = self.function_name
        if isinstance(args, list | tuple):
            check = CHECKS.get(name)
            if check is not None:
                check(args)
            instead = INSTEAD.get(name)
            if instead is not None:
                return instead(jsonata, lambda given: native_call(self, input, given), args)
        return native_call(self, input, args)

    def evaluate_range_expression(self: Any, lhs: Any, rhs: Any) -> Any:
        low, high = _count(lhs), _count(rhs)
        if low is not None and high is not None and isinstance(lhs, int) and isinstance(rhs, int) \
                and high - low + 1 > SIZE_LIMIT:
            raise _refuse("the range operator (..)", high - low + 1, "an array")
        return range_of(self, lhs, rhs)

    def evaluate_string_concat(self: Any, lhs: Any, rhs: Any) -> Any:
        for side in (lhs, rhs):
            _check_value("the '&' operator would make a string", side)
        return concat(self, lhs, rhs)

    def evaluate_equality_expression(self: Any, lhs: Any, rhs: Any, op: Any) -> Any:
        if isinstance(lhs, list | tuple | dict) and isinstance(rhs, list | tuple | dict):
            for side in (lhs, rhs):
                _check_value(f"the '{op}' operator would compare JSON", side)
        return equality(self, lhs, rhs, op)

    def evaluate_descendants(self: Any, expr: Any, input: Any) -> Any:
        _check_value("the descendants operator (**) would walk JSON", input)
        return descendants(self, expr, input)

    def transform(self: Any, input: Any, args: Any) -> Any:
        if isinstance(args, list | tuple) and args:
            _check_value("the transform operator (|…|…|) would copy JSON", args[0])
        return transform_call(self, input, args)

    native.call = call
    transformer.call = transform
    engine.evaluate_range_expression = evaluate_range_expression
    engine.evaluate_string_concat = evaluate_string_concat
    engine.evaluate_equality_expression = evaluate_equality_expression
    engine.evaluate_descendants = evaluate_descendants
    engine._flowdsl_size_bounds = True
