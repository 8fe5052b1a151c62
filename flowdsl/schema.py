"""Schema check: the spec data against specs/flowdsl.schema.json.

Stage: checks. Imports ``flowdsl.diagnostics``, jsonschema-rs and jsonschema. The schema file
ships inside the wheel (``flowdsl/_data``); in a source checkout it is read from
``specs/``. Each jsonschema error becomes a diagnostic with the JSON path of the
offending element; ``oneOf`` failures are reduced to their most relevant
branch with ``best_match`` (the schema is written with type-conditional keywords and
``if``/``then`` chains instead, so that each error names one expectation).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from flowdsl.diagnostics import (
    Diagnostic,
    aside_option,
    did_you_mean,
    drop_options,
    join,
    make,
    node_keyword,
    pointer,
    quote,
    tokens,
    walk_pointer,
)
from flowdsl.shown import visible

_ID_HINT = "ids are letters, digits and '_', starting with a letter or '_', at most 64 characters"
_WORKER_HINT = "worker names are ids joined by dots, like 'payments.refund'"
_SIGNAL_HINT = "signal names are written as ids: letters, digits and '_', starting with a letter or '_', at most 64 " \
    "characters"
_BAD_ERROR_TYPE = "invalid error type"
_ERROR_TYPE_HINT = ("error types are exception class names as type(exc).__name__ gives them, without a module: "
                    "'TimeoutError', 'ConnectionError' (a filter also matches subclasses)")


def data_file(name: str, repo_dir: str) -> Path:
    """A data file shipped in the wheel (``flowdsl/_data/NAME``), else from the source checkout."""
    packaged = resources.files("flowdsl").joinpath("_data", name)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / repo_dir / name


#: the schema files this module checks documents against: a spec, and a flow test file (docs/testing.md)
SPEC_SCHEMA = "flowdsl.schema.json"
TEST_SCHEMA = "flowdsl-test.schema.json"


@functools.lru_cache(maxsize=2)
def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(data_file(name, "specs").read_text(encoding="utf-8"))
    return schema


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of a flowdsl spec (version 1)."""
    return _schema(SPEC_SCHEMA)


_END = re.compile(r"(?<!\\)\$")


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """``pattern`` with ECMA-262 semantics, as JSON Schema specifies: ``$`` is the end of the string.

    Python's ``$`` also matches before a final newline, which would let ``"ab\n"`` pass as an id.
    """
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not re.search(_END.sub(r"\\Z", pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.lru_cache(maxsize=2)
def _validator(name: str = SPEC_SCHEMA) -> Any:
    from jsonschema import Draft202012Validator, validators

    cls = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})  # type: ignore[no-untyped-call,unused-ignore]
    return cls(_schema(name))


@functools.lru_cache(maxsize=2)
def _fast_validator(name: str = SPEC_SCHEMA) -> Any:
    """jsonschema-rs: a compiled validator, ~100× faster, used to pass valid documents quickly."""
    import jsonschema_rs

    return jsonschema_rs.Draft202012Validator(_schema(name))


def check_schema(data: Any, *, text_syntax: bool = False, schema: str = SPEC_SCHEMA) -> list[Diagnostic]:
    """Every schema violation of ``data``, as diagnostics with JSON paths (positions added later).

    A valid document (the usual case) is recognised by jsonschema-rs alone; python-jsonschema
    runs only to explain an invalid one, since its errors carry what the messages need. ``text_syntax``:
    ``data`` was read from a ``.flow`` file, whose words some hints use (``undo`` for ``compensate``).
    ``schema``: which document ``data`` is, :data:`SPEC_SCHEMA` or :data:`TEST_SCHEMA` (a flow test file).
    """
    if _fast_validator(schema).is_valid(data):
        return []
    diags: list[Diagnostic] = []
    for error in _validator(schema).iter_errors(data):
        if schema == SPEC_SCHEMA and _version_number(error):
            continue  # the model says it better, quoting the number as written (model._Builder.version)
        diags.extend(_convert(error, text_syntax))
    # a mis-indented step explains every error inside it: keep only that one
    misplaced = [d.path for d in diags if d.message.startswith("a step is a mapping with one key")]
    return [d for d in diags if not any(d.path.startswith(m + "/") for m in misplaced)]


def _version_number(error: Any) -> bool:
    """Whether ``error`` is a ``version`` that is a number with a fraction (``version: 1.10``, read as 1.1).

    The schema allows a string or an integer; such a number is refused by the model instead, which has the
    text as written to quote (``write it as a string: version: "1.10"``), where this check has only 1.1.
    """
    return list(error.absolute_path) == ["version"] and error.validator == "type" and isinstance(error.instance, float)


def _path(error: Any) -> str:
    return pointer(*error.absolute_path)


def _show(value: Any) -> str:
    """A value as JSON writes it, cut to 40 characters, with what a message must not hold escaped."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return visible(text if len(text) <= 40 else text[:37] + "...")


_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "nothing"}


def _found(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"'{str(value).lower()}'"
    if value is None:
        return "nothing"
    return _show(value)


def _what(schema: Any) -> str:
    """A phrase for what a schema expects, from its description, ref or type."""
    if not isinstance(schema, dict):
        return "a valid value"
    if "description" in schema:
        return str(schema["description"])
    ref = schema.get("$ref", "")
    if ref.endswith("/id"):
        return "an id"
    if ref.endswith("/worker"):
        return "a worker name"
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    t = schema.get("type")
    if isinstance(t, str):
        return _TYPE_NAMES.get(t, t)
    if isinstance(t, list) and t:
        names = [str(_TYPE_NAMES.get(x, x)) for x in t]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return "a valid value"


def _convert(error: Any, text_syntax: bool = False) -> Iterator[Diagnostic]:
    from jsonschema.exceptions import best_match

    path = _path(error)
    v = error.validator
    inst = error.instance
    if v in ("oneOf", "anyOf") and error.context:
        yield from _convert(best_match(error.context), text_syntax)
    elif v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        listed = _written_options(allowed, inst) if text_syntax else allowed
        for key in sorted(set(inst) - set(allowed)):
            where = _where(error.absolute_path)
            hint = _group_hint(key, inst, text_syntax)
            # (a step's option on a wait is no misspelling of a wait's: 'with' does not mean 'wait')
            meant = "" if hint and node_keyword(inst) == "wait" else did_you_mean(key, allowed)
            written = "undo" if text_syntax and key == "compensate" else key
            yield make("FD202", f"unknown field {quote(written)}{where}{meant}; "
                       f"expected one of: {', '.join(listed)}{hint}", join(path, key))
    elif v == "required":
        for key in error.validator_value:
            if key not in inst:
                yield make("FD201", f"missing required field '{key}'{_where(error.absolute_path, inst)}", path)
    elif v == "const" and list(error.absolute_path) == ["flowdsl"]:
        if isinstance(inst, int | float) and not isinstance(inst, bool):
            yield make("FD203", f"unsupported language version {_show(inst)}; this flowdsl reads version 1", path)
        else:
            found = f"the string {_show(inst)}" if isinstance(inst, str) else _found(inst)
            yield make("FD203", f"the language version must be the number 1, found {found}", path)
    elif v == "const":
        yield make("FD201", f"expected {_what(error.schema)}, found {_found(inst)}", path, found=_number(inst))
    elif v == "pattern" or (v == "propertyNames" and error.context):
        yield from _pattern(error, path)
    elif v == "maxProperties" and _is_step_mapping(error):
        yield _misindented_step(inst, path)
    elif v == "type":
        yield make("FD201", f"expected {_what(error.schema)}, found {_found(inst)}{_items_hint(error)}"
                   f"{_wait_id_hint(error)}", path, found=_number(inst))
    elif v == "enum":
        yield make("FD201", f"expected one of {', '.join(_show(x) for x in error.validator_value)}, "
                   f"found {_found(inst)}{did_you_mean(str(inst), map(str, error.validator_value))}", path,
                   found=_number(inst))
    elif v == "minItems":
        yield make("FD201", f"expected at least {error.validator_value} item(s), found an empty list", path)
    elif v == "minProperties":
        yield make("FD201", f"expected at least {error.validator_value} entry, found an empty mapping", path)
    elif v in ("minimum", "exclusiveMinimum"):
        op = ">=" if v == "minimum" else ">"
        parts = list(error.absolute_path)
        name = f" for '{parts[-1]}'" if parts and isinstance(parts[-1], str) else ""
        yield make("FD201", f"expected a number {op} {error.validator_value}{name}, found {_show(inst)}", path,
                   found=_number(inst))
    elif v == "maximum":
        yield make("FD201", _too_many(error), path, found=_number(inst))
    elif v == "uniqueItems":
        yield make("FD201", f"list has repeated entries: {_show(inst)}", path)
    else:
        yield make("FD201", error.message, path)


#: the keys of a group that a ``.flow`` file writes as its statement, not as options: its keyword and its body
_BODY_KEYS = frozenset({"steps", "branches", "cases", "default"})


def _written_options(allowed: list[str], inst: Any) -> list[str]:
    """The fields ``allowed`` as options of the text syntax name them: ``undo`` for ``compensate``, and without a
    node's keyword and body (``wait a``, ``sequence s { ... }`` are the statement itself)."""
    kw = node_keyword(inst) if isinstance(inst, dict) else None
    return sorted("undo" if key == "compensate" else key for key in allowed
                  if kw is None or (key != kw and key not in _BODY_KEYS))


def _number(value: Any) -> str | None:
    """How a message shows ``value`` when it is a number (which the file may have written otherwise)."""
    return _show(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _items_hint(error: Any) -> str:
    """For a for_each's ``items`` that is not an expression: how to write the list it seems to mean."""
    parts = list(error.absolute_path)
    inst = error.instance
    # (a step named 'items' is a mapping of options, whose schema is not an expression's)
    if not parts or parts[-1] != "items" or not str(error.schema.get("description", "")).startswith("an expr"):
        return ""
    if isinstance(inst, list):
        text = json.dumps(inst, ensure_ascii=False, default=str)
        return f"; write the list as an expression: \"${{ {text if len(text) <= 40 else '[...]'} }}\""
    if isinstance(inst, int) and not isinstance(inst, bool) and 0 < inst <= 10_000:
        return f"; to run the steps {inst} times, iterate over \"${{ [1..{inst}] }}\""
    return ""


def _wait_id_hint(error: Any) -> str:
    """For a wait's id that is a mapping or nothing (``- wait:`` with other keys beside it): how a wait is written,
    and how a step named ``wait`` is (its options under its name, the mapping's one key)."""
    if list(error.schema_path)[-3:] != ["properties", "wait", "type"] or not (error.instance is None
                                                                              or isinstance(error.instance, dict)):
        return ""
    return ("; a wait is written '- wait: <its id>', its options beside 'wait' (a step named 'wait' is a mapping "
            "with that one key, its options under it: '- wait: {worker: ...}')")


def _too_many(error: Any) -> str:
    """The message for a number above its schema maximum: retry attempts (the only one)."""
    parts = list(error.absolute_path)
    name = f"'{parts[-1]}'" if parts and isinstance(parts[-1], str) else "the value"
    found = _show(error.instance)
    if parts and parts[-1] in ("attempts", "retry"):
        return (f"expected at most {error.validator_value} attempts, found {found}; to keep trying for longer, "
                "give a longer 'max' delay between attempts instead")
    return f"expected a number <= {error.validator_value} for {name}, found {found}"


def _where(path: Any, inst: Any = None) -> str:
    parts = list(path)
    if not parts:
        return " at the top level"
    if isinstance(inst, dict):
        kw = node_keyword(inst)
        if kw is not None and isinstance(inst[kw], str):
            return f" in {kw} {quote(inst[kw])}"
    if parts[-1] == "compensate":
        return " in the compensation"
    if parts[-1] in ("retry",):
        return " in the retry policy"
    if parts[-1] in ("llm",):
        return " in the llm block"
    if parts[-1] == "defaults":
        return " in defaults"
    return ""


#: a group's (or a wait's) kind as a message names it, in the schema's order of precedence
_GROUP_NAMES = {"sequence": "a sequence", "parallel": "a parallel group", "for_each": "a for_each",
                "switch": "a switch", "flow": "a sub-flow", "wait": "a wait"}


#: why a wait does not take an option a step has (or what is meant by a word for a timer)
_WAIT_HINTS = {
    "compensate": "; a wait changes nothing, so there is nothing to undo",
    "retry": "; a wait is not retried: give it a longer 'timeout'",
    **dict.fromkeys(("worker", "with", "fail_when", "fallback", "llm"), "; a wait runs no worker: that is an option "
                    "of steps"),
    **dict.fromkeys(("delay", "duration", "sleep"), "; a timer wait is written with 'for' and its duration"),
}


def _group_hint(key: str, inst: Any, text_syntax: bool) -> str:
    """For a ``compensate`` (``undo``) or an ``on_failure`` written on a group, a ``compensate`` or a ``retry``
    written on a wait, and a ``key`` written on a step or a group: where they go instead, or why there is none."""
    kind = node_keyword(inst) if isinstance(inst, dict) else None
    if kind == "wait":
        return _WAIT_HINTS.get(key, "")
    if key == "key":
        inside = ": give it to the wait inside the for_each, to tell which iteration a signal is for" \
            if kind == "for_each" else " (which of its instances a signal is for)"
        return f"; 'key' is an option of a signal wait{inside}"
    if kind is not None and key == "on_failure":
        inside = "of the sub-flow (in its file)" if kind == "flow" else "inside it"
        return (f"; {_GROUP_NAMES[kind]} has no on_failure of its own: give it to the steps {inside} that the run "
                "can do without (task and LLM steps)")
    if key != "compensate" or kind is None:
        return ""
    word = "undo" if text_syntax else "'compensate'"
    inside = "of the sub-flow (in its file)" if kind == "flow" else "inside it"
    return (f"; {_GROUP_NAMES[kind]} has no {'undo' if text_syntax else 'compensation'} of its own: give each step "
            f"{inside} its own {word} (when the run fails, the steps that completed are undone in reverse order, "
            "automatically)")


def _is_step_mapping(error: Any) -> bool:
    return isinstance(error.instance, dict) and error.schema.get("maxProperties") == 1


#: keys of a mis-indented step that its message names, at most
_KEYS_NAMED = 8


def _named(keys: list[str], show: Any) -> str:
    """The first :data:`_KEYS_NAMED` of ``keys`` as ``show`` writes each, and how many more there are."""
    named = ", ".join(show(k) for k in keys[:_KEYS_NAMED])
    return named + (f" and {len(keys) - _KEYS_NAMED} more" if len(keys) > _KEYS_NAMED else "")


def _misindented_step(inst: dict[str, Any], path: str) -> Diagnostic:
    keys = list(inst)
    name = next((k for k in keys if inst[k] is None), keys[0])
    others = [k for k in keys if k != name]
    return make(
        "FD201",
        f"a step is a mapping with one key, its name; found {len(keys)} keys "
        f"({_named(keys, lambda k: quote(k)[1:-1])}). "
        f"If {_named(others, quote)} {'is an option' if len(others) == 1 else 'are options'} "
        f"of step {quote(name)}, indent {'it' if len(others) == 1 else 'them'} under it",
        path,
    )


def _pattern(error: Any, path: str) -> Iterator[Diagnostic]:
    if error.validator == "propertyNames":
        bad = [e.instance for e in error.context]
        for name in bad:
            hint = _WORKER_HINT if "\\." in error.validator_value.get("pattern", "") else _ID_HINT
            yield make("FD302", f"invalid name {quote(name)}: {_too_long(name) or hint}", join(path, name))
        return
    value = error.instance
    if str(error.schema.get("description", "")).startswith("an error type"):  # a retry filter's entry
        shown = quote(value) if isinstance(value, str) else _show(value)
        dotted = "; a dotted name never matches" if isinstance(value, str) and "." in value else ""
        yield make("FD302", f"{_BAD_ERROR_TYPE} {shown}: {_too_long(value) or _ERROR_TYPE_HINT}{dotted}", path)
        return
    hint = _WORKER_HINT if "\\." in error.validator_value else _ID_HINT
    kind = "worker name" if hint is _WORKER_HINT else "id"
    if str(error.schema.get("description", "")).startswith("a signal name"):
        kind, hint = "signal name", _SIGNAL_HINT
    a_key = "propertyNames" in error.schema_path  # a key of the mapping at ``path``, else the value there
    if hint is _WORKER_HINT and a_key:  # a step mapping's key: id or worker
        kind, hint = "step name", "a step's name is an id, or the name of its worker (ids joined by dots)"
    shown = quote(value) if isinstance(value, str) else _show(value)
    longest = "a signal name" if kind == "signal name" else "an id"
    yield make("FD302", f"invalid {kind} {shown}: {_too_long(value, longest) or hint}", path, at_value=not a_key)


_ID_CHARS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _too_long(value: Any, what: str = "an id") -> str | None:
    """Why a name made of well-formed ids is still refused: one of them is over 64 characters (``what``: what
    the message says has at most 64, a signal name or an id)."""
    if not isinstance(value, str):
        return None
    parts = value.split(".")
    if not all(_ID_CHARS.match(part) for part in parts):
        return None
    long = next((part for part in parts if len(part) > 64), None)
    if long is None:
        return None
    which = "it" if long == value else f"its part '{long[:20]}...'"
    return f"{which} has {len(long)} characters; {what} has at most 64"


# --- checking past shape errors ----------------------------------------------------

#: required fields that nothing else refers to, and the stand-in a spec missing one is checked with
_STAND_INS: dict[str, str] = {"items": "${ [] }", "on": "${ '' }"}
_MISSING = re.compile(r"missing required field '([^']*)'")


def set_aside(data: Any, diags: list[Diagnostic]) -> tuple[Any, list[str]] | None:
    """A copy of ``data`` without the elements the schema diagnostics ``diags`` blame, and their paths;
    None when a diagnostic blames something whose removal would change the rest of the spec.

    An unknown field (FD202) is dropped; any other violation (FD201) is dropped with the innermost option
    around it that nothing else refers to (:data:`flowdsl.diagnostics.SET_ASIDE`: a retry policy, a timeout,
    a condition, a compensation, …), and so is a malformed error type in a retry filter (FD302: nothing refers
    to one); a missing ``items`` of a for_each or ``on`` of a switch is stood in for by an expression
    (:data:`_STAND_INS`). Any other missing field, a malformed id (FD302), a step of the wrong form or an
    unsupported version (FD203) cannot be set aside. What remains must pass the schema, else None.
    """
    cuts: list[list[str]] = []
    stand_ins: list[tuple[list[str], str]] = []
    for d in diags:
        if d.severity != "error":
            continue
        parts = tokens(d.path)
        if d.code == "FD202" and parts:
            cuts.append(parts)
            continue
        if d.code != "FD201" and not (d.code == "FD302" and d.message.startswith(_BAD_ERROR_TYPE)):
            return None
        option = aside_option(d.path, data)
        missing = _MISSING.match(d.message)
        if option is not None:
            cuts.append(option)
        elif missing is not None and missing.group(1) in _STAND_INS:
            stand_ins.append(([*parts, missing.group(1)], _STAND_INS[missing.group(1)]))
        else:
            return None
    import copy

    kept = copy.deepcopy(data)
    paths = drop_options(kept, cuts)
    if paths is None:
        return None
    for parts, value in stand_ins:
        parent = walk_pointer(kept, parts[:-1])
        if not isinstance(parent, dict):
            return None
        parent[parts[-1]] = value
        paths.append(pointer(*parts))
    return (kept, paths) if paths and _valid_but_version(kept) else None


def _valid_but_version(data: Any) -> bool:
    """Whether ``data`` passes the schema, but for a ``version`` that is a number with a fraction, which the
    model reports (see :func:`_version_number`)."""
    if isinstance(data, dict) and isinstance(data.get("version"), float):
        data = {k: v for k, v in data.items() if k != "version"}
    return bool(_fast_validator().is_valid(data))
