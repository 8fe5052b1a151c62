"""Expressions: the one safe language for conditions and data mapping.

Stage: shared by the checks/compiler (parse, analyse) and the kernel
(evaluate). Imports only ``flowdsl.diagnostics``-free stdlib and jsonata.
The engine is JSONata through ``jsonata-python``; everything engine-specific
stays in this module behind ``compile_expression`` / ``Expression`` so the
engine could be swapped. Evaluation is bounded in time and recursion depth.

Templates: a string may hold ``${ expr }`` slots. A string that is exactly one
slot evaluates to the expression's value; otherwise the slots are interpolated.
``$${`` is a literal ``${``.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    when the engine reports one.
    """

    def __init__(self, message: str, position: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.position = position
        self.code = code


@dataclass(frozen=True)
class Analysis:
    """What static analysis can tell about an expression."""

    variables: frozenset[str]  # free variables read (without the $)
    functions: frozenset[str]  # functions called by name
    step_refs: frozenset[str]  # ids read as $steps.<id>


def expression_id(source: str) -> str:
    """Stable id of an expression in a plan: ``x`` + 12 hex digits of SHA-256."""
    return "x" + hashlib.sha256(source.strip().encode()).hexdigest()[:12]


def _jsonata() -> Any:
    import jsonata  # local: keeps `flowdsl --help` fast

    return jsonata


@functools.lru_cache(maxsize=4096)
def _parse(source: str) -> Any:
    jsonata = _jsonata()
    try:
        compiled = jsonata.Jsonata(source)
    except jsonata.JException as exc:
        raise ExpressionError(_message(exc), getattr(exc, "location", None), getattr(exc, "error", None)) from None
    except (RecursionError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ExpressionError(f"cannot parse expression: {exc}") from None
    # the data is plain JSON by contract (run input and results are checked where they enter): the engine's
    # own check would walk the whole context on every evaluation, making a step inside a for_each over n
    # items cost O(n) and the run O(n²)
    compiled.set_validate_input(False)
    return compiled


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[0].lower() + text[1:] if text else text


#: an expression that is one variable reference (``$item``): evaluated without the engine when it is bound
_BARE_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)\Z")


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
        frame.set_runtime_bounds(TIME_LIMIT_MS, DEPTH_LIMIT)
        # the bound is wall time: a cyclic collection landing in the evaluation (~150 ms in a process with
        # DSPy loaded) must not fail an ordinary expression, so the collector waits until it is done
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            result = self._compiled.evaluate(data, frame)
        except jsonata.JException as exc:
            raise ExpressionError(_message(exc), getattr(exc, "location", None), getattr(exc, "error", None)) from None
        except RecursionError:
            raise ExpressionError("expression recursed too deeply") from None
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, ZeroDivisionError) as exc:
            raise ExpressionError(f"evaluation failed: {exc}") from None
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


def to_json_value(value: Any) -> Any:
    """Engine values to plain JSON values (sequences to lists, whole floats kept)."""
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ExpressionError("expression produced a non-finite number")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if callable(value) or type(value).__name__.startswith("J"):
        raise ExpressionError("expression produced a function, not a value")
    return json.loads(json.dumps(value, default=str))


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

    def children(node: Any) -> list[Any]:
        out: list[Any] = []
        for key, value in vars(node).items():
            if key.startswith("_"):
                continue
            items = value if isinstance(value, list) else [value]
            for item in items:
                for inner in item if isinstance(item, list | tuple) else [item]:
                    if hasattr(inner, "type") and hasattr(inner, "value"):
                        out.append(inner)
        return out

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
            if (
                len(parts) >= 2
                and getattr(parts[0], "type", None) == "variable"
                and parts[0].value == "steps"
                and getattr(parts[1], "type", None) == "name"
            ):
                steps.add(parts[1].value)
        elif kind == "variable" and node.value != "":
            used.add(node.value)
        stack.extend(children(node))
    free = frozenset(v for v in used if v not in bound and v not in functions)
    return Analysis(variables=free, functions=frozenset(functions - bound), step_refs=frozenset(steps))


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

    Raises ExpressionError (with the offset) for an unclosed ``${``.
    Braces inside string literals of the expression are respected.
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
            depth, j, quote = 1, start, ""
            while j < n:
                c = text[j]
                if quote:
                    if c == "\\":
                        j += 1
                    elif c == quote:
                        quote = ""
                elif c in "\"'`":
                    quote = c
                elif c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                raise ExpressionError("unclosed '${' (expected a matching '}')", i)
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(Slot(text[start:j], start))
            i = j + 1
            continue
        buf.append(text[i])
        i += 1
    if buf:
        parts.append("".join(buf))
    return tuple(parts)


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

    ``expressions`` is the plan's expression table (id -> {"source": ...}).
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
        return {k: evaluate_template(v, expressions, data, bindings) for k, v in template.items()}
    if isinstance(template, list):
        return [evaluate_template(v, expressions, data, bindings) for v in template]
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
        for key, value in vars(node).items():
            if key.startswith("_"):
                continue
            for item in value if isinstance(value, list) else [value]:
                for inner in item if isinstance(item, list | tuple) else [item]:
                    if hasattr(inner, "type") and hasattr(inner, "value"):
                        stack.append(inner)
    return True
