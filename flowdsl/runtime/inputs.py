"""Run input: read it (file, stdin, ``--set`` overrides) and check it against the plan's input schema.

Stage: runtime (shared by every backend and the CLI). Imports stdlib, jsonschema and
``.execute`` (for the depth bound of run data).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from flowdsl.runtime.execute import MAX_JSON_DEPTH


class InputError(Exception):
    """The run input is unreadable or does not satisfy the spec's input schema; the message says where."""


def read_input(source: str | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The run input from a JSON file (``-`` for stdin, None for ``{}``) with ``key=value`` overrides.

    An override's key may be dotted (``order.notify=false``); its value is JSON when it
    parses as JSON, else a string.
    """
    data: Any = {}
    if source is not None:
        try:
            if source == "-":
                text = sys.stdin.read()
            else:
                with open(source, encoding="utf-8") as fh:
                    text = fh.read()
        except OSError as exc:
            raise InputError(f"cannot read input file '{source}': {exc.strerror or exc}") from None
        name = "stdin" if source == "-" else source
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{exc.lineno}:{exc.colno}: input is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise InputError(f"{name}: the input nests too deeply to read (at most {MAX_JSON_DEPTH} levels "
                             "are accepted)") from None
    if not isinstance(data, dict):
        raise InputError(f"the run input must be a JSON object, found {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects key=value, found '{item}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        except RecursionError:
            raise InputError(f"--set {key}: the value nests too deeply to read (at most {MAX_JSON_DEPTH} levels "
                             "are accepted)") from None
        _assign(data, key.split("."), value, item)
    return data


def _assign(data: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    target = data
    for part in path[:-1]:
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise InputError(f"--set {item}: '{part}' is not an object in the input")
        target = nxt
    target[path[-1]] = value


def check_input(plan: dict[str, Any], data: dict[str, Any]) -> None:
    """Raise InputError listing every way ``data`` fails the plan's input schema."""
    schema = plan["flow"].get("input_schema")
    if schema is None:
        return
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/' + '/'.join(map(str, e.absolute_path)) if e.absolute_path else '(top)'}: {e.message}"
                 for e in errors[:20]]
        raise InputError("the run input does not match the spec's input schema:\n" + "\n".join(lines))
