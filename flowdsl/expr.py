"""Expressions: the one safe language for conditions and data mapping.

Stage: shared by the checks/compiler (parse, analyse) and the kernel
(evaluate). Imports only ``flowdsl.diagnostics``-free stdlib and jsonata.
The engine is JSONata through ``jsonata-python``; everything engine-specific
stays in this module behind ``compile_expression`` / ``Expression`` so the
engine could be swapped. Evaluation is bounded in time and recursion depth,
and what one built-in call may build in size (``flowdsl.expr_bounds``).

Templates: a string may hold ``${ expr }`` slots. A string that is exactly one
slot evaluates to the expression's value; otherwise the slots are interpolated.
``$${`` is a literal ``${``. A slot ends where JSONata's tokenizer, mirrored
here (``_scan``), ends the expression, which also says what the engine would
report badly while reading its tokens.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowdsl import expr_bounds, expr_errors

#: bounds applied to every evaluation
TIME_LIMIT_MS = 100
DEPTH_LIMIT = 200

_REPLAY = ("its value depends on the clock or chance, which would break deterministic replay; pass such values "
           "in the run input")
#: JSONata built-ins a spec may not call (FD503), and why: the message after "'$fn' is not allowed: "
REFUSED_FUNCTIONS: dict[str, str] = {
    "now": _REPLAY, "millis": _REPLAY, "random": _REPLAY, "shuffle": _REPLAY,
    "eval": "it evaluates a string as an expression at run time, out of reach of the checks made when the plan "
            "is compiled (variables, functions, step references); write the expression itself",
}  # fmt: skip
#: the names of :data:`REFUSED_FUNCTIONS` (the clock, chance, and ``$eval``)
NONDETERMINISTIC = frozenset(REFUSED_FUNCTIONS)


def refusal(function: str) -> str | None:
    """Why a spec may not call ``$function`` (see :data:`REFUSED_FUNCTIONS`), or None when it may."""
    return REFUSED_FUNCTIONS.get(function)


class ExpressionError(Exception):
    """An expression failed to parse or to evaluate.

    ``position`` is the 0-based character offset inside the expression source
    when the engine reports one. ``where`` is the option it was evaluated for
    (``with.s``, ``when``, ``output.total``; see :meth:`within`), and ``message``
    starts ``in '<where>': `` once it is known, as the checks' FD501 do;
    ``reason`` is the message without it.
    """

    def __init__(self, message: str, position: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = self.reason = message
        self.position = position
        self.code = code
        self.where: str | None = None

    def within(self, where: str) -> ExpressionError:
        """This error, placed inside ``where``: an option (``with``), or a key (``.s``) or index (``[0]``) of
        a template, prefixed to the place already known (``.s`` inside ``with`` is ``with.s``). Returns itself."""
        self.where = where + (self.where or "")
        if not self.where.startswith((".", "[")):
            self.message = f"in '{self.where}': {self.reason}"
            self.args = (self.message,)
        return self


@dataclass(frozen=True)
class Analysis:
    """What static analysis can tell about an expression."""

    variables: frozenset[str]  # free variables read (without the $)
    functions: frozenset[str]  # functions called by name
    step_refs: frozenset[str]  # ids read as $steps.<id>
    names: frozenset[str] = frozenset()  # the first names of paths (`order` in `order.total`): fields read


def expression_id(source: str) -> str:
    """Stable id of an expression in a plan: ``x`` + 12 hex digits of SHA-256."""
    return "x" + hashlib.sha256(source.strip().encode()).hexdigest()[:12]


def _jsonata() -> Any:
    limit = sys.getrecursionlimit()
    import jsonata  # local: keeps `flowdsl --help` fast

    # jsonata-python raises the process's recursion limit to 10,000 as it is imported: the host's limit is its
    # own (threads with small stacks crash past it instead of raising RecursionError), so it is put back
    sys.setrecursionlimit(limit)
    expr_bounds.install(jsonata)  # once: what one built-in call may build (see flowdsl.expr_bounds)
    return jsonata


class RegexTimeout(TimeoutError):
    """A regular expression ran out of its time (:data:`TIME_LIMIT_MS`); ``matches`` is how many matches it had
    made by then, when they were counted (None when not)."""

    def __init__(self, matches: int | None) -> None:
        super().__init__("regular expression timeout")
        self.matches = matches


class _BoundedPattern:
    """A regular expression literal, compiled with the ``regex`` library, each use bounded by
    :data:`TIME_LIMIT_MS`: a match in Python's ``re`` cannot be interrupted, so a pattern that backtracks
    exponentially on some input (``/^(a|aa)+$/`` on a long run of ``a``) would hold the run — on Redis, every
    process that takes its task over — for ever. It offers what the engine calls on a pattern, and ``groups``
    (how many it has) to ``flowdsl.expr_bounds``."""

    __slots__ = ("_pattern",)

    def __init__(self, pattern: Any) -> None:
        self._pattern = pattern

    @property
    def groups(self) -> int:
        groups: int = self._pattern.groups
        return groups

    def search(self, string: str) -> Any:
        return self._pattern.search(string, timeout=_REGEX_TIMEOUT_S)

    def finditer(self, string: str) -> Any:
        """The matches, counted: past the time bound, :class:`RegexTimeout` says how many were made."""
        made = 0
        try:
            for match in self._pattern.finditer(string, timeout=_REGEX_TIMEOUT_S):
                made += 1
                yield match
        except TimeoutError:
            raise RegexTimeout(made) from None

    def sub(self, repl: Any, string: str, count: int = 0) -> str:
        result: str = self._pattern.sub(repl, string, count, timeout=_REGEX_TIMEOUT_S)
        return result

    def split(self, string: str, maxsplit: int = 0) -> list[str]:
        result: list[str] = self._pattern.split(string, maxsplit, timeout=_REGEX_TIMEOUT_S)
        return result


_REGEX_TIMEOUT_S = TIME_LIMIT_MS / 1000


def _regex_engine(pattern: str, flags: Any) -> _BoundedPattern:
    """The engine's hook for a regular expression literal (``/pattern/flags``)."""
    import regex  # local: only specs with regular expressions pay its import

    try:
        compiled = regex.compile(pattern, (regex.IGNORECASE if flags.case_insensitive else 0)
                                 | (regex.MULTILINE if flags.multiline else 0))
    except regex.error as exc:
        pos, msg = getattr(exc, "pos", None), getattr(exc, "msg", str(exc))  # both set, but not in the stubs
        where = "" if pos is None else f" (at character {pos + 1} of it)"
        raise ExpressionError(f"invalid regular expression /{pattern}/: {msg}{where}") from None
    return _BoundedPattern(compiled)


@functools.lru_cache(maxsize=4096)
def _parse(source: str) -> Any:
    if not source.strip(_BLANKS):
        raise ExpressionError("the expression is empty; expected an expression between '${' and '}'")
    _scan(source, 0, slot=False)
    jsonata = _jsonata()
    try:
        # the engine's tokenizer reads the character after a '/' to see whether a comment starts, and after
        # a comment's '*/': at the end of the source that is an IndexError, so a blank ends such a source
        compiled = jsonata.Jsonata(source + " " if source.endswith("/") else source, _regex_engine)
    except jsonata.JException as exc:
        message = _message(exc)
        if "${" in source:
            message += " ('${' does not nest: inside an expression, write the inner one without '${ }')"
        raise ExpressionError(message, getattr(exc, "location", None), getattr(exc, "error", None)) from None
    except RecursionError:
        raise ExpressionError("the expression nests too deeply to be parsed") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        # its tokens were read by _scan: this is the engine failing on a construct it has no message for
        raise ExpressionError("cannot parse the expression: the JSONata engine fails on it without saying "
                              "why") from None
    # the data is plain JSON by contract (run input and results are checked where they enter): the engine's
    # own check would walk the whole context on every evaluation, making a step inside a for_each over n
    # items cost O(n) and the run O(n²)
    compiled.set_validate_input(False)
    # the engine's nulls are made None by to_json_value, which walks the value anyway: the engine's own pass
    # walks it outside the time bound, written out in full, so a value referring to the same parts from many
    # places (see to_json_value) took seconds, or for ever, there
    compiled.set_output_convert_nulls(False)
    return compiled


def _message(exc: Any) -> str:
    """The engine's message for a source it cannot parse, starting lowercase, with the tokens and values it
    names written as JSON writes them (the engine formats them with ``str``: a ``null`` token would read
    "None")."""
    args = [exc.current, exc.expected] + ([] if exc.extra is None else [exc.extra])
    return expr_errors.table_text(exc.error, args, _shown)


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(to_json_value(value), ensure_ascii=False)
    except ExpressionError:  # a number that is not finite, or a function
        return str(value) if isinstance(value, int | float) else "a function"


#: an expression that is one variable reference (``$item``): evaluated without the engine when it is bound
_BARE_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)\Z")


def _said(build: Callable[[Any, Any], str], exc: BaseException, data: Any) -> str:
    """``build(exc, data)``, the message of an evaluation error; should building it fail (an engine version whose
    errors it does not know), the error's code or class alone — never an exception out of the kernel, nor the
    engine's own text (which may quote the whole context)."""
    try:
        return build(exc, data)
    except Exception:
        return f"evaluation failed ({getattr(exc, 'error', None) or type(exc).__name__})"


#: past this many seconds, a timeout is said with the time the evaluation really took: the engine checks its bound
#: between the nodes of the expression, so one call that cannot be interrupted may run far past it
_OVERRAN_S = 2 * TIME_LIMIT_MS / 1000


def _timeout_message(took: float) -> str:
    """The message of the engine's timeout (D1012) raised after ``took`` seconds of evaluation."""
    if took < _OVERRAN_S:
        return f"evaluation timeout after {TIME_LIMIT_MS} milliseconds. Check for infinite loop"
    return (f"evaluation took {_seconds(took)}, over its bound of {TIME_LIMIT_MS} ms: one operation ran that long "
            "before the bound could be checked (an infinite loop, or too much work for one expression)")


def _seconds(took: float) -> str:
    return f"{took:.2f} s" if took < 10 else f"{took:.1f} s" if took < 100 else f"{took:,.0f} s"


#: a regular expression that made this many matches before its time was up is said to match too often
_MANY_MATCHES = 1000


def _regex_timeout_message(exc: BaseException) -> str:
    """What a regular expression running out of time means, from how many matches it had made (when counted:
    see _BoundedPattern.finditer): many matches (``/a/`` on a million a's), or a pattern that backtracks."""
    said = f"a regular expression took longer than {TIME_LIMIT_MS} ms on this data"
    matches = getattr(exc, "matches", None)
    backtracks = "it backtracks too much (write it so that each character can be matched one way only)"
    if matches is None:
        return f"{said}: {backtracks}, or it matches too many times for one expression"
    if matches >= _MANY_MATCHES:
        return f"{said}: it had made {matches:,} matches by then, too many for one expression"
    return f"{said} ({matches:,} match{'' if matches == 1 else 'es'} by then): {backtracks}, or the text is too long"


class _Bounds:
    """The time and depth bounds of one evaluation (:data:`TIME_LIMIT_MS`, :data:`DEPTH_LIMIT`), checked as the
    engine enters and leaves each part of the expression — as its own ``set_runtime_bounds`` does, but on the CPU
    time of the evaluating thread, not the wall clock: on a busy process (a service's other threads holding the
    GIL, sync workers in their threads) an expression of 20 ms of work took over 100 ms of wall time and failed,
    and a replay of its run then decided otherwise. The clock is read at every 16th part (it costs a system
    call), and once more at the end."""

    __slots__ = ("count", "deadline", "depth")

    def __init__(self, frame: Any, started: float) -> None:
        self.depth = 0
        self.count = 0
        self.deadline = started + TIME_LIMIT_MS / 1000
        frame.set_evaluate_entry_callback(self.entered)
        frame.set_evaluate_exit_callback(self.left)

    def entered(self, expr: Any, data: Any, env: Any) -> None:
        if env.is_parallel_call:
            return
        self.depth += 1
        if self.depth > DEPTH_LIMIT:
            raise _jsonata().JException("D1011", -1)
        self._tick()

    def left(self, expr: Any, data: Any, env: Any, result: Any) -> None:
        if env.is_parallel_call:
            return
        self.depth -= 1
        self._tick()

    def _tick(self) -> None:
        self.count += 1
        if not self.count & 15:
            self.check()

    def check(self) -> None:
        """Raise the engine's timeout (D1012) when the evaluation has run past its bound."""
        if time.thread_time() > self.deadline:
            raise _jsonata().JException("D1012", -1, TIME_LIMIT_MS)


class Expression:
    """A compiled expression: parse once, evaluate many times with bounds."""

    def __init__(self, source: str):
        self.source = source.strip()
        self._compiled = _parse(self.source)
        bare = _BARE_VARIABLE.match(self.source)
        self._variable = bare.group(1) if bare else None

    def evaluate(self, data: Any, bindings: Mapping[str, Any] | None = None) -> Any:
        """Evaluate over ``data`` with ``bindings`` (names without ``$``)."""
        if self._variable is not None and bindings and self._variable in bindings:
            # `$item` and the like (the usual for_each mapping): the engine would return the binding itself
            return to_json_value(bindings[self._variable])
        jsonata = _jsonata()
        frame = self._compiled.create_frame()
        for name, value in (bindings or {}).items():
            frame.bind(name, value)
        # a cyclic collection landing in the evaluation (~150 ms in a process with DSPy loaded) must not fail an
        # ordinary expression, so the collector waits until it is done
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        started = time.thread_time()
        bounds = _Bounds(frame, started)
        try:
            with expr_bounds.evaluating(TIME_LIMIT_MS):
                result = self._compiled.evaluate(data, frame)
                bounds.check()  # (a last call may have run past the bound after the last check)
        except jsonata.JException as exc:
            if getattr(exc, "error", None) == "D1012":
                raise ExpressionError(_timeout_message(time.thread_time() - started), None, "D1012") from None
            # said from the error's code and values, never its text: that quotes values in full (the whole
            # context, for an argument JSONata reads from it) and in the wrong slots (see flowdsl.expr_errors)
            raise ExpressionError(_said(expr_errors.engine_message, exc, data), getattr(exc, "location", None),
                                  getattr(exc, "error", None)) from None
        except RecursionError:
            raise ExpressionError("expression recursed too deeply") from None
        except expr_bounds.TooLarge as exc:
            raise ExpressionError(str(exc)) from None
        except TimeoutError as exc:  # raised by the `regex` library: see _BoundedPattern
            raise ExpressionError(_regex_timeout_message(exc)) from None
        except Exception as exc:
            # a built-in failing inside the engine ($number('abc'), $power(10, 400), OverflowError from a date,
            # RuntimeError from a picture string): the step fails with it, where anything else would escape the
            # kernel and stop the run
            raise ExpressionError(_said(expr_errors.python_message, exc, data)) from None
        finally:
            if collecting:
                gc.enable()
        return to_json_value(result)

    def analyse(self) -> Analysis:
        return analyse(self.source)


@functools.lru_cache(maxsize=4096)
def compile_expression(source: str) -> Expression:
    """The compiled expression for ``source`` (cached: compile once per process)."""
    return Expression(source)


@functools.lru_cache(maxsize=1)
def _null() -> Any:
    """The engine's null (``null`` in an expression: None is "no value")."""
    return _jsonata().utils.Utils.NULL_VALUE


class _Shared(Exception):
    """A value refers to the same array, object or long string from two places (see :func:`to_json_value`)."""


def to_json_value(value: Any) -> Any:
    """Engine values to plain JSON values (sequences to lists, whole floats kept).

    An expression may refer to one array, object or string from many places (``{'l': $a, 'r': $a}`` in a
    ``$reduce`` doubles its value at each step, at no cost): written out, such a value may be exponentially larger
    than what it is made of. So when a part is met twice, the value is measured first, and refused as
    ``flowdsl.expr_bounds`` refuses what a built-in would make (more than ``SIZE_LIMIT`` characters, and more than
    ``GROWTH`` times what it is made of)."""
    if not isinstance(value, Mapping | list | tuple):
        return _to_json(value, None)
    try:
        return _to_json(value, set())
    except _Shared:
        made, given = expr_bounds.measure(value)
        if expr_bounds.over(made, given):
            raise ExpressionError(str(expr_bounds.too_large("the expression's value would be JSON", made, given))
                                  ) from None
        return _to_json(value, None)


def _to_json(value: Any, seen: set[int] | None) -> Any:
    """:func:`to_json_value`, raising :class:`_Shared` when ``seen`` is given and a part is met twice."""
    if isinstance(value, str):
        if seen is not None and len(value) > expr_bounds.SHARED:
            if id(value) in seen:
                raise _Shared
            seen.add(id(value))
        return value
    if isinstance(value, Mapping):
        if seen is not None:
            if id(value) in seen:
                raise _Shared
            seen.add(id(value))
        return {str(k): _to_json(v, seen) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if seen is not None:
            if id(value) in seen:
                raise _Shared
            seen.add(id(value))
        return [_to_json(v, seen) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ExpressionError("expression produced a non-finite number")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if value is _null():
        return None
    if callable(value) or type(value).__module__.partition(".")[0] == "jsonata":  # a lambda is a parser node
        raise ExpressionError("expression produced a function, not a value")
    if isinstance(value, _BoundedPattern):
        raise ExpressionError("expression produced a regular expression, not a value")
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError, RecursionError):
        raise ExpressionError(f"expression produced a {type(value).__name__}, not JSON data") from None


def truthy(value: Any) -> bool:
    """JSONata's boolean cast, used for `when` and `fail_when`."""
    if value is None:
        return False
    if isinstance(value, list):
        return any(truthy(v) for v in value)
    if isinstance(value, dict):
        return bool(value)
    if isinstance(value, str):
        return value != ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return True


# --- static analysis --------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def analyse(source: str) -> Analysis:
    """Free variables, called functions and ``$steps.<id>`` references (cached: a pure function of the source)."""
    root = _parse(source.strip()).ast
    seen: set[int] = set()
    bound: set[str] = set()
    used: set[str] = set()
    functions: set[str] = set()
    steps: set[str] = set()
    names: set[str] = set()

    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kind = getattr(node, "type", None)
        if kind == "bind" and getattr(node.lhs, "type", None) == "variable":
            bound.add(node.lhs.value)
        elif kind == "lambda":
            for arg in node.arguments or []:
                if getattr(arg, "type", None) == "variable":
                    bound.add(arg.value)
        elif kind == "function" or kind == "partial":
            proc: Any = getattr(node, "procedure", None)
            if getattr(proc, "type", None) == "variable":
                functions.add(proc.value)
        elif kind == "path":
            parts = node.steps or []
            if parts and getattr(parts[0], "type", None) == "name":
                names.add(parts[0].value)
            if (
                len(parts) >= 2
                and getattr(parts[0], "type", None) == "variable"
                and parts[0].value == "steps"
                and getattr(parts[1], "type", None) == "name"
            ):
                steps.add(parts[1].value)
        elif kind == "variable" and node.value != "":
            used.add(node.value)
        stack.extend(ast_children(node))
    free = frozenset(v for v in used if v not in bound and v not in functions)
    return Analysis(variables=free, functions=frozenset(functions - bound), step_refs=frozenset(steps),
                    names=frozenset(names))


@functools.lru_cache(maxsize=1)
def builtin_functions() -> frozenset[str]:
    """Names of JSONata's built-in functions (without the ``$``)."""
    return frozenset(_jsonata().Jsonata.static_frame.bindings.keys())


# --- templates --------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One ``${ ... }`` inside a string; ``offset`` is where its source starts."""

    source: str
    offset: int


def split_template(text: str) -> list[str | Slot]:
    """Split a string into literal parts and expression slots (a fresh list; see ``_split``)."""
    return list(_split(text))


@functools.lru_cache(maxsize=8192)
def _split(text: str) -> tuple[str | Slot, ...]:
    """Split a string into literal parts and expression slots.

    A slot ends at the ``}`` that closes its ``${``, found by :func:`_scan` as JSONata reads the source:
    braces inside string literals, regular expressions, comments and quoted names do not count. Raises
    ExpressionError (with the offset) for an unclosed or empty ``${ }``, or a malformed token inside one.
    """
    parts: list[str | Slot] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("$${", i):
            buf.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            start = i + 2
            end = _scan(text, start, slot=True)
            if not text[start:end].strip(_BLANKS):
                raise ExpressionError("empty '${ }' (expected an expression between '${' and '}')", i)
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(Slot(text[start:end], start))
            i = end + 1
            continue
        buf.append(text[i])
        i += 1
    if buf:
        parts.append("".join(buf))
    return tuple(parts)


# --- reading tokens -------------------------------------------------------------

# JSONata's tokenizer (jsonata/tokenizer.py), mirrored so that a slot's end is found as the engine reads the
# source, and so that what the engine reports badly (a number out of range "None", an escape as an "empty
# regular expression") or fails on with Python's own error (an unclosed comment) is said here instead.
_BLANKS = " \t\n\r"
#: the single-character operators: each ends a name
_OPERATOR_CHARS = frozenset(".[]{}(),@#;:?+-*/%|=<>^&!~")
#: the two-character operators, matched before the single ones
_PAIRS = frozenset({"..", ":=", "!=", ">=", "<=", "**", "~>", "?:", "??"})
#: what may follow a backslash in a string literal, besides ``u`` and four hex digits
_ESCAPES = '"\\/bfnrt'
_NUMBER = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[Ee][-+]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
#: words that are operators after an operand and field names where an operand is expected
_KEYWORDS = frozenset({"and", "or", "in"})


def _scan(text: str, start: int, *, slot: bool) -> int:
    """Read the expression source in ``text`` from ``start`` token by token, as JSONata's tokenizer does.

    Returns the offset of the ``}`` that closes the slot when ``slot``, else ``len(text)``. Raises
    ExpressionError, with the offset and what was expected, for a token the engine would refuse: an
    unclosed string literal, comment, regular expression or quoted name, an unsupported escape, a number
    beyond the range of a float; and for an unclosed slot.

    As in JSONata, a ``/`` starts a regular expression where an operand is expected (at the start, after an
    operator or an opening bracket) and divides after an operand; ``/*`` always opens a comment.
    """
    what = "text" if slot else "expression"
    operand, opened = True, []  # whether an operand comes next; offsets of the '{' still open
    last_pair: tuple[int, int] | None = None  # the last '{' closed at the slot's own level, and its '}'
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c in _BLANKS:
            i += 1
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            if close < 0:
                raise _token_error("unclosed comment: expected '*/' to close the '/*'", text, i, what)
            i = close + 2
        elif c == "/" and operand:
            i, operand = _regex_end(text, i, what), False
        elif c in "\"'":
            i, operand = _string_end(text, i, what), False
        elif c == "`":
            close = text.find("`", i + 1)
            if close < 0:
                raise _token_error("unclosed quoted name: expected a closing '`'", text, i, what)
            i, operand = close + 1, False
        elif c == "{":
            opened.append(i)
            i, operand = i + 1, True
        elif c == "}":
            if slot and not opened:
                return i
            if opened:
                top = opened.pop()
                if not opened:
                    last_pair = (top, i)
            i, operand = i + 1, False
        elif text[i:i + 2] in _PAIRS:
            # '**' where an operand is expected is the descendant wildcard: itself an operand
            operand = not (text[i:i + 2] == "**" and operand)
            i += 2
        elif c in _OPERATOR_CHARS:
            # ')' and ']' end an operand; '*' and '%' where one is expected are the wildcard and the parent
            operand = not (c in ")]" or (c in "*%" and operand))
            i += 1
        elif number := _NUMBER.match(text, i):
            if not math.isfinite(float(number.group())):
                raise _token_error(f"number out of range: {number.group()}; expected a finite number (at most "
                                   "about 1.8e308)", text, i, what)
            i, operand = number.end(), False
        else:
            j = i
            while j < n and text[j] not in _BLANKS and text[j] not in _OPERATOR_CHARS:
                j += 1
            operand = text[i:j] in _KEYWORDS and not operand
            i = j
    if slot:
        hint = ""
        if opened:
            hint = f"; the '{{' at character {opened[0] + 1} inside it is not closed either"
        elif last_pair is not None and not text[last_pair[1] + 1:].strip(_BLANKS):
            hint = (f"; the '}}' at character {last_pair[1] + 1} closes the '{{' at character {last_pair[0] + 1} "
                    "inside it")
        raise ExpressionError(f"unclosed '${{' (expected a matching '}}'{hint})", start - 2)
    return n


def _regex_end(text: str, i: int, what: str) -> int:
    """The offset after the regular expression opened by the ``/`` at ``i``, and after its flags.

    JSONata's rule: it ends at a ``/`` no backslash escapes, outside the brackets opened inside it (a bracket
    counts unless a backslash precedes it).
    """
    depth, j, n = 0, i + 1, len(text)
    while j < n:
        c = text[j]
        if c == "/" and depth == 0 and _backslashes_before(text, j) % 2 == 0:
            j += 1
            while j < n and text[j] in "im":
                j += 1
            return j
        if c in "([{" and text[j - 1] != "\\":
            depth += 1
        elif c in ")]}" and text[j - 1] != "\\":
            depth -= 1
        j += 1
    raise _token_error("unclosed regular expression: expected a closing '/' (brackets inside it must pair up "
                       "or be escaped, like '\\}')", text, i, what)


def _backslashes_before(text: str, j: int) -> int:
    k = j
    while text[k - 1] == "\\":  # stops at the regular expression's opening '/' at the latest
        k -= 1
    return j - k


def _string_end(text: str, i: int, what: str) -> int:
    """The offset after the string literal opened by the quote at ``i``."""
    quote, j, n = text[i], i + 1, len(text)
    while j < n:
        c = text[j]
        if c == quote:
            return j + 1
        if c == "\\" and j + 1 < n:
            after = text[j + 1]
            if after == "u":
                if not _HEX4.fullmatch(text, j + 2, j + 6):
                    raise _token_error("the escape '\\u' must be followed by 4 hex digits", text, j, what)
                j += 6
                continue
            if after not in _ESCAPES:
                hint = "; a ' cannot be escaped: write the string between double quotes" if after == "'" else ""
                raise _token_error(f"unsupported escape '\\{after}' in a string literal; expected one of "
                                   f"\\\" \\\\ \\/ \\b \\f \\n \\r \\t or \\u and 4 hex digits{hint}", text, j, what)
        j += 2 if c == "\\" else 1
    raise _token_error(f"unclosed string literal: expected a closing {quote}", text, i, what)


def _token_error(message: str, text: str, offset: int, what: str) -> ExpressionError:
    """``message`` with where it is, counted in characters from 1 and quoted (as signatures do)."""
    shown = " ".join(text[offset:].split())
    shown = shown if len(shown) <= 30 else shown[:29] + "…"
    return ExpressionError(f"{message} (at character {offset + 1} of the {what}: "
                           f"{json.dumps(shown, ensure_ascii=False)})", offset)


def is_expression(text: str) -> bool:
    """True when ``text`` contains at least one ``${ }`` slot."""
    return "${" in text.replace("$${", "")


def single_expression(text: str) -> str | None:
    """The source when ``text`` is exactly one ``${ expr }`` slot (surrounding blanks allowed)."""
    parts = split_template(text.strip())
    if len(parts) == 1 and isinstance(parts[0], Slot):
        return parts[0].source
    return None


def evaluate_template(template: Any, expressions: Mapping[str, Any], data: Any, bindings: Mapping[str, Any]) -> Any:
    """Evaluate a compiled plan template (see docs/plan.md, "Templates").

    ``expressions`` is the plan's expression table (id -> {"source": ...}). An ``ExpressionError`` says
    where in the template it happened (``.order.total``, ``[0]``: see :meth:`ExpressionError.within`).
    """
    if isinstance(template, dict):
        if len(template) == 1:
            ((key, value),) = template.items()
            if key == "$expr":
                return compile_expression(expressions[value]["source"]).evaluate(data, bindings)
            if key == "$format":
                return "".join(
                    part if isinstance(part, str) else _stringify(
                        evaluate_template(part, expressions, data, bindings))
                    for part in value
                )
            if key == "$literal":
                return value
        out = {}
        for k, v in template.items():
            try:
                out[k] = evaluate_template(v, expressions, data, bindings)
            except ExpressionError as exc:
                raise exc.within(f".{k}") from None
        return out
    if isinstance(template, list):
        items = []
        for i, v in enumerate(template):
            try:
                items.append(evaluate_template(v, expressions, data, bindings))
            except ExpressionError as exc:
                raise exc.within(f"[{i}]") from None
        return items
    return template


def _stringify(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


_DATA_NODE_TYPES = frozenset({"path", "name", "variable", "wildcard", "descendant", "parent", "function",
                              "partial", "lambda", "apply", "bind", "regex", "transform"})


@functools.lru_cache(maxsize=8192)
def is_constant(source: str) -> bool:
    """True when the expression reads no data, variable or function (its value never changes); cached like
    ``_parse``, being a pure function of the source."""
    stack, seen = [_parse(source.strip()).ast], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "type", None) in _DATA_NODE_TYPES:
            return False
        stack.extend(ast_children(node))
    return True


def syntax_tree(source: str) -> Any:
    """The parsed expression's syntax tree (jsonata-python's), from the parse cache; ``ExpressionError`` when it
    does not parse."""
    return _parse(source.strip()).ast


def ast_children(node: Any) -> list[Any]:
    """The nodes of a parsed expression (jsonata-python's syntax tree) directly below ``node``, found in its
    public attributes, lists and tuples of them included, and in ``_else`` (a condition's else branch, the one
    private attribute that holds a part of the expression: without it, ``x ? 1 : $now()`` passed every check)."""
    out: list[Any] = []
    for key, value in vars(node).items():
        if key.startswith("_") and key != "_else":
            continue
        for item in value if isinstance(value, list) else [value]:
            for inner in item if isinstance(item, list | tuple) else [item]:
                if hasattr(inner, "type") and hasattr(inner, "value"):
                    out.append(inner)
    return out
