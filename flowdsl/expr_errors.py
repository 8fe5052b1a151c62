"""Expression errors in plain words: the message of an evaluation the engine refused.

Stage: shared, used by ``flowdsl.expr`` only (the engine-specific half of its evaluation errors). Imports only
the stdlib and ``flowdsl.expr_bounds`` (the built-ins it does in the engine's stead); jsonata is imported lazily,
as in ``flowdsl.expr``.

jsonata-python's error objects (``JException``) carry a code (``T0411``), a position, and up to three values
(``current``, ``expected``, ``extra``), which its own table of texts formats positionally: the values land in
the wrong slots ("argument {the whole context} of Object 1"), the table says "Object" for "function", an array
type reads "array of n", and any value, the whole context included, is written out in full. The messages are
built here from the code and the values instead, each value said by its type and quoted at most
:data:`QUOTE_LIMIT` characters long, the whole context never. When the error concerns a built-in function
(its arguments do not fit it, or it failed on them), the function is found on the engine's stack as the
error unwound it (the innermost built-in that was running, with the arguments it was given): the message
names it and, for arguments, says which one is wrong and what it got. Python exceptions raised by a
built-in are said the same way.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from flowdsl import expr_bounds

#: at most this many characters of any value quoted in a message (an ellipsis and the value's size say the rest)
QUOTE_LIMIT = 80
#: at most this many characters of the spec's own message, ``$error``'s or ``$assert``'s (a Python exception's
#: text, which may hold a value, is cut to :data:`QUOTE_LIMIT`)
TEXT_LIMIT = 300

_NAMES = {"s": "a string", "n": "a number", "b": "a boolean", "l": "null", "o": "an object", "a": "an array",
          "f": "a function", "j": "a JSON value", "x": "any value", "m": "nothing"}
_PLURALS = {"s": "strings", "n": "numbers", "b": "booleans", "l": "nulls", "o": "objects", "a": "arrays",
            "f": "functions", "j": "JSON values", "x": "values"}
#: codes whose error concerns the built-in function that was running (its arguments, or its own failure)
_FUNCTION_CODES = re.compile(r"T041\d|T1010|D3\d{3}|D1004")


# --- values in words ---------------------------------------------------------------------------------------


def _null() -> Any:
    from jsonata.utils import Utils

    return Utils.NULL_VALUE


def _symbol(value: Any) -> str:
    """The signature letter of a value (``s``, ``n``, …, ``l`` for null, ``m`` for nothing)."""
    if value is None:
        return "m"
    if value is _null():
        return "l"
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        return "n"
    if isinstance(value, str):
        return "s"
    if isinstance(value, list | tuple):
        return "a"
    if isinstance(value, dict):
        return "o"
    return "f"


def _kind(value: Any) -> str:
    """What a value is, with its size when it is large: "a string of 300 characters", "an array of 2,000 items"."""
    symbol = _symbol(value)
    if symbol == "s" and len(value) > QUOTE_LIMIT:
        return f"a string of {len(value):,} characters"
    if symbol == "a" and len(value) > 1:
        return f"an array of {len(value):,} items"
    if symbol == "o" and len(value) > 1:
        return f"an object of {len(value):,} keys"
    return _NAMES[symbol]


def _json(value: Any) -> str:
    null = _null()
    return json.dumps(value, ensure_ascii=False, default=lambda v: None if v is null else "<function>")


def quote(value: Any) -> str:
    """``value`` written as JSON, cut to :data:`QUOTE_LIMIT` characters (an ellipsis ends a cut)."""
    if _symbol(value) in "mf":
        return "nothing" if value is None else "a function"
    try:
        text = _json(value)
    except (TypeError, ValueError, RecursionError):
        text = str(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


def describe(value: Any, whole: Any = None) -> str:
    """A value in words, for "got …": ``a number (5)``, ``a string of 300 characters ("abc…")``; ``whole`` is
    the data the expression ran over: that value is said by its type and size alone (it may be large, and hold
    what has no place in an error message), as is a function."""
    if value is None or value is _null():
        return _NAMES[_symbol(value)]
    if whole is not None and value is whole and isinstance(value, dict | list):
        return f"the context ({_kind(value)})"
    if _symbol(value) == "f":
        return "a function"
    return f"{_kind(value)} ({quote(value)})"


def _cut(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- the built-in function that was running ----------------------------------------------------------------


class Call:
    """The function that was running when the error was raised: a built-in's name (None for a function the
    expression defines with a signature, ``function($x)<n:n>{…}``), its signature's parameters, the arguments
    it was given (None when they could not be read), and the context it was called on."""

    __slots__ = ("args", "context", "name", "params")

    def __init__(self, name: str | None, params: list[Any], args: list[Any] | None, context: Any = None):
        self.name, self.params, self.args, self.context = name, params, args, context

    @property
    def label(self) -> str:
        return "the function" if self.name is None else "$" + self.name


@functools.lru_cache(maxsize=1)
def _engine_codes() -> tuple[Any, Any, frozenset[Any], dict[Any, Any]]:
    """The code objects the engine's stack is read by: its ``apply_inner`` (a call with its arguments),
    ``Signature.validate`` (arguments checked against a signature), its ``eval``s (an expression node being
    evaluated), and each built-in's implementation (mapped to the built-in), flowdsl's own included
    (``flowdsl.expr_bounds.INSTEAD``)."""
    from jsonata import jsonata, signature

    engine = jsonata.Jsonata
    natives: dict[Any, Any] = {}
    for fn in engine.static_frame.bindings.values():
        code = getattr(getattr(fn, "method", None), "__code__", None)
        if isinstance(fn, engine.JNativeFunction) and code is not None:
            natives.setdefault(code, fn)
    for name, instead in expr_bounds.INSTEAD.items():  # the built-ins flowdsl does itself stand for the engine's
        fn = engine.static_frame.bindings.get(name)
        if isinstance(fn, engine.JNativeFunction):
            natives.setdefault(instead.__code__, fn)
    evals = frozenset(f.__code__ for f in (engine.eval, engine._eval))
    return engine.apply_inner.__code__, signature.Signature.validate.__code__, evals, natives


def _frames(exc: BaseException) -> Iterator[Any]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def running_call(exc: BaseException) -> Call | None:
    """The built-in function the engine was running where ``exc`` was raised: the innermost of the built-ins,
    signature checks and expression nodes on the stack, when it is a built-in or its signature check (an error
    raised while evaluating an expression node — an operator inside a function passed to ``$map`` — concerns
    that node, not the built-in around it). None when there is none, or the engine's stack cannot be read."""
    try:
        return _running_call(exc)
    except Exception:  # (it reads the engine's private names: another version's stack is read as none at all)
        return None


def _running_call(exc: BaseException) -> Call | None:
    try:
        apply_code, validate_code, evals, natives = _engine_codes()
    except (ImportError, AttributeError):  # another engine version: the messages do without
        return None
    innermost: Any = None
    applying: Any = None
    for frame in _frames(exc):
        code = frame.f_code
        if code is apply_code:
            applying = frame
        elif code is validate_code or code in natives or code in evals:
            innermost = frame
    if innermost is None or innermost.f_code in evals:
        return None
    local = innermost.f_locals
    if innermost.f_code is validate_code:
        sig = local.get("self")
        fn = _native_of(sig)
        return Call(None if fn is None else fn.function_name, list(getattr(sig, "_params", None) or ()),
                    _list(local.get("args")), local.get("context"))
    fn = natives[innermost.f_code]
    args: list[Any] | None = None
    context = None
    if applying is not None and applying.f_locals.get("proc") is fn:
        args, context = _list(applying.f_locals.get("args")), applying.f_locals.get("input")
    return Call(fn.function_name, list(fn.signature._params) if fn.signature else [], args, context)


def _native_of(sig: Any) -> Any:
    from jsonata import jsonata

    fn = jsonata.Jsonata.static_frame.bindings.get(getattr(sig, "function_name", None))
    return fn if isinstance(fn, jsonata.Jsonata.JNativeFunction) and fn.signature is sig else None


def _list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, list | tuple) else None


# --- arguments against a signature ---------------------------------------------------------------------------


def _letters(param: Any) -> str:
    """The types a parameter accepts, as signature letters (``sf`` for ``(sf)``)."""
    kind: str = param.type or "x"
    return kind.strip("()")


def _expected(param: Any) -> str:
    letters = _letters(param)
    if letters == "a" and param.subtype:
        return f"an array of {_PLURALS.get(param.subtype[0], 'values')}"
    names = [_NAMES.get(c, c) for c in letters]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _optional(param: Any) -> bool:
    return bool(param.regex) and param.regex.endswith("?") and not param.context


def _fits(param: Any, value: Any) -> bool:
    letters, symbol = _letters(param), _symbol(value)
    if symbol == "m" or letters == "x" or (letters == "j" and symbol != "f"):
        return True
    if letters == "a":
        if not param.subtype:
            return True
        items = value if isinstance(value, list | tuple) else [value]
        return all(_symbol(item) == param.subtype[0] for item in items)
    return symbol in letters


def _takes(params: list[Any]) -> str:
    words = [_expected(p) + (" (optional)" if _optional(p) else "") for p in params]
    if not words:
        return "no arguments"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def argument_problem(call: Call, code: str | None, whole: Any) -> str | None:
    """What is wrong with the arguments ``call`` was given, against its signature; None when that cannot be
    told. ``T0411`` (JSONata read a left-out argument from the context, which did not fit) is said of the
    context when fewer arguments were given than the function needs, else of the arguments as written."""
    if call.args is None or not call.params:
        return None
    fn, params, args = call.label, call.params, call.args
    needed = sum(1 for p in params if not _optional(p))
    variadic = bool(params[-1].regex) and params[-1].regex.endswith("+")
    if code == "T0411" and len(args) < needed:
        for index, param in enumerate(params):
            if param.context:
                context = call.context
                said = _kind(context) if context is whole else "which is " + describe(context, whole)
                return (f"argument {index + 1} of {fn} must be {_expected(param)}; it was left out, so {fn} read "
                        f"it from the context, {said}")
    for index, value in enumerate(args):
        if index >= len(params) and not variadic:
            return f"{fn} takes at most {_count(len(params))}; got {len(args)} ({fn} takes {_takes(params)})"
        param = params[min(index, len(params) - 1)]
        if not _fits(param, value):
            return f"argument {index + 1} of {fn} must be {_expected(param)}; got {describe(value, whole)}"
    if len(args) < needed:
        return f"{fn} needs {_count(needed)}; got {len(args)} ({fn} takes {_takes(params)})"
    return None


def _count(n: int) -> str:
    return f"{n} argument" + ("" if n == 1 else "s")


# --- messages ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, str]:
    """The engine's texts by code, with "function" where its table says "Object"."""
    from jsonata.jexception import JException

    return {code: text.replace("Object", "function") for code, text in JException.error_codes.items()}


def table_text(code: str, values: list[Any], shown: Any = None) -> str:
    """The engine's text for ``code`` with ``values`` in its slots, each written by ``shown`` (default
    :func:`quote`), starting lowercase; a code the table does not know is itself the text (the engine
    raises some errors with a sentence for a code)."""
    text = _table().get(code)
    if text is None:
        text = code
    elif text == "{{{message}}}":  # $error's and $assert's: the spec's own words, as written
        return _cut(str(values[0])) if values and values[0] is not None else code
    else:
        slots = iter(values)
        write = shown or quote
        text = re.sub(r"\{\{\w+\}\}", lambda _: write(next(slots, None)), text)
    text = text.strip() or code
    return text[0].lower() + text[1:]


def engine_message(exc: Any, whole: Any) -> str:
    """The message of the engine's error ``exc`` (a ``JException``) raised evaluating over ``whole``."""
    code: str = exc.error
    current, expected, extra = exc.current, exc.expected, exc.extra
    call = running_call(exc) if _FUNCTION_CODES.fullmatch(code or "") else None
    if code in ("T0410", "T0411", "T0412"):
        said = argument_problem(call, code, whole) if call is not None else None
        if said is not None:
            return said
        if call is not None and call.params:
            return f"the arguments of {call.label} do not fit it: it takes {_takes(call.params)}"
        return _signature_fields(code, current, expected, extra)
    said = _operator_message(code, current, expected, extra, whole)
    if said is not None:
        return said
    if code == "D3100" and call is not None and call.args and len(call.args) > 1:
        return f"the radix of $formatBase must be between 2 and 36; got {describe(call.args[1], whole)}"
    text = table_text(code, [current, expected] + ([] if extra is None else [extra]))
    # the built-in named when its text does not name it; never before $error's and $assert's: the spec's own words
    if call is not None and call.name is not None and call.name not in text and code not in ("D3137", "D3141"):
        text = f"${call.name}: {text}"
    return text


def _signature_fields(code: str, current: Any, expected: Any, extra: Any) -> str:
    """A signature error said from the engine's values alone (T0410: the argument's number, counted wrong by
    jsonata-python, and the function's name; T0411: the context, and the argument's number; T0412: the
    argument's number, the function's name, the type of the items)."""
    name = f"${expected}" if code != "T0411" and isinstance(expected, str) and expected.isidentifier() \
        else "the function"
    if code == "T0412":
        return f"argument {current} of {name} must be an array of {_PLURALS.get(str(extra)[:1], 'values')}"
    if code == "T0411":
        return (f"argument {expected} of the function was left out, and the context it is then read from does "
                f"not fit it")
    return f"the arguments of {name} do not fit it"


def _operator_message(code: str, current: Any, expected: Any, extra: Any, whole: Any) -> str | None:
    """The message of an error raised by an operator or a constructor, from the values the engine gives it."""
    if code in ("T2001", "T2002"):
        side = "left" if code == "T2001" else "right"
        return f"the {side} side of the '{current}' operator must be a number; got {describe(expected, whole)}"
    if code in ("T2003", "T2004"):
        side = "left" if code == "T2003" else "right"
        return f"the {side} side of the range operator (..) must be an integer; got {describe(current, whole)}"
    if code == "T2006":
        return f"the right side of the '~>' operator must be a function; got {describe(current, whole)}"
    if code in ("T2007", "T2008"):
        rule = "be of the same type" if code == "T2007" else "be numbers or strings"
        return (f"the values an order-by clause compares must {rule}; got {describe(current, whole)} and "
                f"{describe(expected, whole)}")
    if code == "T2009":
        return (f"the values either side of the '{extra}' operator must be of the same type; got "
                f"{describe(current, whole)} and {describe(expected, whole)}")
    if code == "T2010":
        return (f"the values either side of the '{current}' operator must be numbers or strings; got "
                f"{describe(expected, whole)}")
    if code == "D1002":
        return f"the '-' operator negates numbers only; got {describe(expected, whole)}"
    if code == "T1003":
        return f"a key of an object constructor must be a string; got {describe(current, whole)}"
    if code == "D1009":
        return f"two keys of an object constructor evaluate to the same key: {quote(current)}"
    if code in ("T1005", "T1007"):
        return f"'{current}' is not a function (did you mean '${current}'?)"
    if code in ("T1006", "T1008"):
        what = f"'${current}'" if isinstance(current, str) and current else "the value"
        return f"{what} is not a function, so it cannot be {'called' if code == 'T1006' else 'partially applied'}"
    if code == "D2014":
        return f"the range operator (..) may give at most 1,000,000 items; this one would give {quote(current)}"
    return None


def python_message(exc: BaseException, whole: Any) -> str:
    """The message of a Python exception raised inside the engine (a built-in failing on what it was given)."""
    call = running_call(exc)
    fn = f"${call.name}" if call is not None else None
    if isinstance(exc, ZeroDivisionError):
        return f"{fn + ' failed' if fn else 'evaluation failed'}: division by zero"
    if isinstance(exc, ArithmeticError):  # $power(10, 400), $round(1, 400), $sum of huge numbers
        return f"{fn + ' failed' if fn else 'evaluation failed'}: a number went beyond the range of a JSON number"
    if call is not None and call.args:
        if call.name == "number" and isinstance(exc, ValueError):
            return f"$number cannot convert {describe(call.args[0], whole)} to a number"
        if call.name == "toMillis" and isinstance(exc, ValueError):
            return f"the argument of $toMillis must be an ISO 8601 timestamp; got {describe(call.args[0], whole)}"
    text = _cut(str(exc), QUOTE_LIMIT)
    return f"{fn + ' failed' if fn else 'evaluation failed'}: {type(exc).__name__} in the JSONata engine: {text}"
