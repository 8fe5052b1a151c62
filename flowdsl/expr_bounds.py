"""Size bounds: what one built-in call or operator of an expression may build.

Stage: shared, used by ``flowdsl.expr`` only (installed into the engine when ``flowdsl.expr`` first imports it).
Imports only the stdlib; the jsonata module is given by the caller.

The time bound on an evaluation is checked by the engine each time it enters or leaves a node of the expression,
so one built-in call runs to its end before it can be stopped: ``$pad("", 3000000000)`` ran 10.9 s and took
5.8 GB before being reported as a timeout, with the width read from the run's input. The built-ins and operators
whose result's size is set by an argument, not by the size of what they are given, are therefore checked before
they do the work, against :data:`SIZE_LIMIT`:

- ``$pad(s, width)``: a string of ``|width|`` characters;
- the range operator ``[a..b]``: an array of ``b - a + 1`` items (JSONata's own limit is 10,000,000, which
  costs seconds and hundreds of MB once the array is made into JSON);
- ``$fromMillis(ms, picture)``: a width modifier in the picture (``[M,5]``, ``[Y,2-4]``) pads a component to
  that many digits (and a year's maximum width is a power of ten of that many digits).

The others are bounded by their input (``$join``, ``$split``, ``$string``, ``$substring``, ``$replace``,
``&``), by their picture string's length (``$formatNumber``, ``$formatInteger``), by the range of a JSON number
(``$formatBase``: at most 1,100 digits; ``$formatInteger`` in words or letters), or by Python's recursion limit
(``$formatInteger`` in Roman numerals: 1,000 per ``m``, one recursion each).

Hooked at the two points where the engine runs these, once: ``Jsonata.JNativeFunction.call`` (every built-in
call, with its arguments checked against its signature) and ``Jsonata.evaluate_range_expression``. The
engine has no setting for either; :func:`install` refuses to run on an engine that lacks them, rather than
evaluate unbounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

#: the most characters of a string, or items of an array, that one built-in call or operator may build from a
#: size given as an argument. A range is the costly one: at 100,000 items, making it into JSON after the
#: evaluation takes about as long as the time bound (at 1,000,000, 0.7-1.4 s and 65 MB, all outside the bound);
#: and a range of more than some 10,000 items cannot be mapped within that bound anyway
SIZE_LIMIT = 100_000


class TooLarge(Exception):
    """A built-in call or operator would build more than :data:`SIZE_LIMIT`; the message says which and how much
    (``flowdsl.expr`` makes it an ``ExpressionError``)."""


def _refuse(what: str, size: int, unit: str) -> TooLarge:
    return TooLarge(f"{what} would make {unit} of {size:,} {'items' if unit == 'an array' else 'characters'}; "
                    f"the limit is {SIZE_LIMIT:,}")


def _count(value: Any) -> int | None:
    """``value`` as a count the engine would truncate it to, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def _check_pad(args: Sequence[Any]) -> None:
    string, width = [*args, None, None][:2]
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


#: the built-ins checked, by name, with what checks their (validated) arguments
CHECKS: dict[str, Callable[[Sequence[Any]], None]] = {"pad": _check_pad, "fromMillis": _check_from_millis,
                                                      "now": _check_now}


def install(jsonata: Any) -> None:
    """Put the checks into the engine (once; idempotent). Raises RuntimeError on an engine version without the
    two points hooked."""
    engine = jsonata.Jsonata
    if getattr(engine, "_flowdsl_size_bounds", False):
        return
    native: Any = getattr(engine, "JNativeFunction", None)
    native_call = getattr(native, "call", None)
    range_of = getattr(engine, "evaluate_range_expression", None)
    frame = getattr(engine, "static_frame", None)
    names = getattr(frame, "bindings", {})
    if native_call is None or range_of is None or any(
            getattr(names.get(name), "function_name", None) != name for name in CHECKS):
        raise RuntimeError("this version of jsonata-python has no JNativeFunction.call, evaluate_range_expression "
                           "or built-ins named as flowdsl expects: flowdsl cannot bound the size of what an "
                           "expression builds (flowdsl/expr_bounds.py)")

    def call(self: Any, input: Any, args: Any) -> Any:
        check = CHECKS.get(self.function_name)
        if check is not None and isinstance(args, list | tuple):
            check(args)
        return native_call(self, input, args)

    def evaluate_range_expression(self: Any, lhs: Any, rhs: Any) -> Any:
        low, high = _count(lhs), _count(rhs)
        if low is not None and high is not None and isinstance(lhs, int) and isinstance(rhs, int) \
                and high - low + 1 > SIZE_LIMIT:
            raise _refuse("the range operator (..)", high - low + 1, "an array")
        return range_of(self, lhs, rhs)

    native.call = call
    engine.evaluate_range_expression = evaluate_range_expression
    engine._flowdsl_size_bounds = True
