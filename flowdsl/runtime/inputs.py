"""Run input: read it (file, stdin, ``--set`` overrides) and check it against the plan's input schema.

Stage: runtime (shared by every backend and the CLI). Imports stdlib, jsonschema (and its
``referencing``), ``.execute`` (the depth bound and the checks of run data), ``flowdsl.diagnostics`` (how a
path is shown), ``flowdsl.expr_errors`` (how a value is quoted: as JSON, cut to 80 characters, as expression
errors quote theirs) and ``flowdsl.shown.visible`` (stdlib only: control characters written as JSON escapes).

An :class:`InputError`'s message is what the CLI prints and what an application may hand back to whoever sent
the input (docs/runtime.md, "Checking an input first"), so the input's own text in it is bounded and inert: a
value is quoted cut to 80 characters (with its size when it is longer), a key at most 80 characters of it, and
control characters, line breaks among them, are written as JSON escapes (``\\u001b``, ``\\n``): each line of
the message is one line, whatever the input holds.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from flowdsl.diagnostics import shown as shown_text
from flowdsl.expr_errors import QUOTE_LIMIT
from flowdsl.expr_errors import quote as quote_value
from flowdsl.runtime.execute import MAX_JSON_DEPTH, json_problem, text_problem
from flowdsl.shown import visible


class InputError(ValueError):
    """The run input is unreadable, not JSON, or does not satisfy the spec's input schema; the message says where.
    (A ``ValueError``, as runs raised for an input that is not JSON before it existed.)"""


def read_input(source: str | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The run input from a JSON file (``-`` for stdin, None for ``{}``) with ``key=value`` overrides.

    The file (or stdin) is read as bytes and must be UTF-8 (a byte order mark at its
    start is skipped, as in spec files). An override's key is
    a path of names joined by dots (``order.notify=false``), none of them empty;
    its value is JSON when it parses as JSON, else a string. An integer of more
    digits than Python reads (``sys.get_int_max_str_digits()``, 4,300 by default) is
    refused, in the file or in an override. Raises
    :class:`InputError` saying what is wrong and where.
    """
    data: dict[str, Any] = {}
    if source is not None:
        name = "stdin" if source == "-" else visible(shown_text(source))
        if source == "-":
            raw = _read_stdin()
        else:
            try:
                with open(source, "rb") as fh:
                    raw = _read_capped(fh, name)
            except OSError as exc:
                raise InputError(f"cannot read input file '{name}': {exc.strerror or exc}") from None
        text = (_decode(raw, name) if isinstance(raw, bytes) else raw).removeprefix("\ufeff")
        if not text.strip():  # (json's own "Expecting value" at 1:1 says nothing of why)
            raise InputError(f"{name} is empty" + (" (nothing was piped in)" if source == "-" else "")
                             + ": the run input must be a JSON object, e.g. {}")
        try:
            parsed = json.loads(text, object_pairs_hook=_distinct)
        except _DuplicateKey:
            raise InputError(_duplicate(text, name)) from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{exc.lineno}:{exc.colno}: input is not valid JSON: {exc.msg}") from None
        except ValueError as exc:  # an integer too long for int() (JSONDecodeError is a ValueError: caught above)
            raise InputError(_too_long(text, exc, name)) from None
        except RecursionError:
            raise InputError(f"{name}: the input nests too deeply to read (at most {MAX_JSON_DEPTH} levels "
                             "are accepted)") from None
        if not isinstance(parsed, dict):
            raise InputError(f"{name}: the run input must be a JSON object, found {_kind(parsed)}")
        data = parsed
        problem = json_problem(data)
        if problem is not None:
            raise InputError(f"{name}: the input is not plain JSON data: {visible(problem)}")
    given: dict[tuple[str, ...], str] = {}  # the keys set by --set so far: one set twice would be last-wins
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        bad = text_problem(item)
        if bad is not None:
            try:  # the bytes given on the command line, undecodable ones as \xNN
                shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:
                shown = item.encode("utf-8", "backslashreplace").decode("utf-8")
            raise InputError(f"--set {_said(shown)}: the argument {bad}")
        if not sep or not key:
            raise InputError(f"--set expects key=value, found '{_said(item)}'")
        path = key.split(".")
        if "" in path:
            raise InputError(f"--set {_said(item)}: the key '{_said(key)}' has an empty name; a key is one or more "
                             "names joined by single dots, with none empty (e.g. order.notify=false)")
        try:
            value = json.loads(raw_value, object_pairs_hook=_distinct, parse_constant=_not_json)
        except _DuplicateKey:
            raise InputError(_duplicate(raw_value, f"--set {_said(key)}", at_line=False)) from None
        except json.JSONDecodeError:  # (NaN and Infinity included: Python reads them, JSON has no such numbers)
            value = raw_value
        except ValueError as exc:  # an integer too long for int(): a number, refused rather than taken for text
            raise InputError(_too_long(raw_value, exc, f"--set {_said(key)}", at_line=False)) from None
        except RecursionError:
            raise InputError(f"--set {_said(key)}: the value nests too deeply to read (at most {MAX_JSON_DEPTH} levels "
                             "are accepted)") from None
        problem = json_problem(value)
        if problem is not None:
            raise InputError(f"--set {_said(key)}: the value is not plain JSON data: {visible(problem)}")
        here = tuple(path)
        earlier = next((k for k in given if k[:len(here)] == here or here[:len(k)] == k), None)
        if earlier is not None:
            raise InputError(f"--set {_said(item)}: it sets what --set {_said(given[earlier])} sets already (one would "
                             "silently replace the other, or a key inside it); give each key once")
        given[here] = item
        _assign(data, path, value, item)
    return data


def _not_json(name: str) -> Any:
    """``json.loads``' reader of ``NaN``, ``Infinity`` and ``-Infinity``: Python's extension, not JSON — refused as
    a JSON syntax error, so a ``--set`` value holding one is taken as a string, as any text that is not JSON is."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _read_stdin() -> bytes | str:
    """All of stdin; an InputError when there is none to read (closed: ``<&-``, or no console at all)."""
    stdin = sys.stdin
    if stdin is None:
        raise InputError("cannot read the input from stdin: this process has no stdin (it was closed); give the "
                         "input with --input FILE")
    try:
        stream = getattr(stdin, "buffer", None)
        return _read_capped(stream if stream is not None else stdin, "stdin")
    except InputError:
        raise  # (a ValueError too: said as it is)
    except (OSError, ValueError) as exc:  # ValueError: a stdin closed by the program itself
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"cannot read the input from stdin: {reason}; give the input with --input FILE") from None


#: the largest run input read, in bytes (256 MiB): a run's input is kept whole in memory (several times over) and in
#: its record (the Redis runtime refuses more than 170 MB at submission: docs/runtime.md, "Sizing"); a larger one —
#: or an endless source, ``-i /dev/zero`` — is refused as soon as this much has been read, never read until memory
#: runs out
MAX_INPUT_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 20


def _read_capped(stream: Any, name: str, limit: int | None = None) -> bytes | str:
    """All of ``stream`` (a binary one, else a text one), read a chunk at a time — so that a stop signal is
    taken between chunks — and at most ``limit`` (:data:`MAX_INPUT_BYTES`) long; an InputError naming ``name``
    and the limit when there is more."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    fileno = getattr(stream, "fileno", None)
    try:
        size = os.fstat(fileno()).st_size if fileno is not None else 0
    except (OSError, ValueError):  # (not a real file: a test's stream)
        size = 0
    if size > limit:  # a regular file said too long before a byte is read
        raise InputError(_too_large(name, limit))
    read = getattr(stream, "read1", None) or stream.read  # read1: one read(2), as soon as some bytes are there
    parts: list[Any] = []
    total = 0
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise InputError(_too_large(name, limit))
        parts.append(chunk)
    return parts[0][:0].join(parts) if parts else b""


def _too_large(name: str, limit: int) -> str:
    return (f"{name}: the run input is larger than {limit // (1024 * 1024)} MiB ({limit} bytes), the most flowdsl "
            "reads; expected a JSON object of at most that size (pass large data by reference: a path or a URL "
            "the workers read)")


#: a JSON string (skipped whole: digits inside it are text) or a JSON number
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?', re.S)


def _too_long(text: str, exc: ValueError, where: str, *, at_line: bool = True) -> str:
    """What to say about the ``ValueError`` of reading ``text`` as JSON: where (``where``, then line:column with
    ``at_line``) the integer too long to read is."""
    limit = sys.get_int_max_str_digits()
    for match in _TOKEN.finditer(text):
        digits = match.group().lstrip("-")
        if digits.isdigit() and len(digits) > limit > 0:  # (the first one: reading stopped there)
            at = match.start()
            if at_line:
                line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
                where = f"{where}:{line}:{column}"
            return (f"{where}: an integer of {len(digits)} digits, more than the {limit} Python reads "
                    "(sys.set_int_max_str_digits); expected a number of at most that many digits (give a longer "
                    "one as a string)")
    return f"{where}: the input cannot be read: {exc}"


def _decode(raw: bytes, name: str) -> str:
    """``raw`` as strict UTF-8; an InputError naming the first bad byte, its offset and line:column if not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{name}:{line}:{col}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start}); the run input must be JSON text in UTF-8") from None


def read_json_object(where: str, *, text: str | None = None, file: str | None = None, what: str = "the payload",
                     example: str = "'{\"ok\": true}'", limit: int = MAX_INPUT_BYTES) -> dict[str, Any]:
    """A JSON object given as ``text``, or read from ``file`` (a path, ``-`` for stdin; UTF-8, a BOM allowed, at
    most ``limit`` bytes) — a signal's payload from the command line. Raises :class:`InputError` starting with
    ``where`` (the option, ``--data``) and saying what is wrong with ``what`` (``the payload``): a file (or stdin)
    that cannot be read, too large or not UTF-8, text that is not UTF-8 (a command-line argument's bytes that are
    not, which Python keeps as lone surrogates), empty text, not JSON, a key twice, nesting too deep, not an object,
    not plain JSON data; ``example`` shows the form expected."""
    if file is not None:
        try:
            if file == "-":
                raw = _read_stdin_bytes(where, limit)
            else:
                with open(file, "rb") as fh:
                    raw = fh.read(limit + 1)
        except OSError as exc:
            raise InputError(f"{where}: cannot read the file: {exc.strerror or exc}") from None
        if len(raw) > limit:
            raise InputError(f"{where}: larger than {limit // (1024 * 1024)} MiB: keep large data out of runs (store "
                             "it elsewhere and send its key)")
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    elif text is not None and (bad := _not_utf8(text)) is not None:  # (json would say "Expecting value")
        raise InputError(f"{where}: {what} is not UTF-8 text ({bad}); expected a JSON object, e.g. {example}")
    if text is None or not text.strip():
        raise InputError(f"{where}: {what} is empty; expected a JSON object, e.g. {example}")
    try:
        value = json.loads(text, object_pairs_hook=_distinct, parse_constant=_not_json)
    except _DuplicateKey:
        raise InputError(_duplicate(text, where, at_line=False)) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         f"expected a JSON object, e.g. {example}") from None
    except RecursionError:
        raise InputError(f"{where}: {what} nests too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # (an integer of more digits than Python converts)
        raise InputError(f"{where}: {what} cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: {what} must be a JSON object, found {_kind(value)}")
    problem = json_problem(value)
    if problem is not None:
        raise InputError(f"{where}: {what} is not plain JSON data: {visible(problem)}")
    return value


def _read_stdin_bytes(where: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of stdin (``read_json_object``'s ``file="-"``); an InputError when this process
    has no stdin to read (closed), an OSError when reading fails."""
    stdin = sys.stdin
    if stdin is None:
        raise InputError(f"{where}: cannot read stdin: this process has no stdin (it was closed)")
    try:
        raw = getattr(stdin, "buffer", stdin).read(limit + 1)
    except ValueError as exc:  # (a stdin closed by the program itself)
        raise InputError(f"{where}: cannot read stdin: {exc}") from None
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw


def _not_utf8(text: str) -> str | None:
    """Where ``text`` (a command-line argument) is not UTF-8 text — the first byte that was not UTF-8 (kept by
    Python as a lone surrogate, ``surrogateescape``), or a lone surrogate — said as a clause; None when it is."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        at = exc.start
    try:
        byte = text[at].encode("utf-8", "surrogateescape")[0]
    except UnicodeEncodeError:  # (a lone surrogate that stands for no byte)
        return f"a lone surrogate, U+{ord(text[at]):04X}, at character {at + 1}"
    return f"byte 0x{byte:02x} at offset {len(text[:at].encode('utf-8'))}"


class _DuplicateKey(Exception):
    """A JSON object with a key twice (not a ValueError: the json module's own errors are those)."""


def _distinct(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: an object's members as a dict; :class:`_DuplicateKey` when a key comes twice (json
    would keep the last one silently)."""
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _DuplicateKey
    return members


#: a JSON string (skipped whole), or a character that opens, closes or separates
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.S)


def _duplicate(text: str, where: str, *, at_line: bool = True) -> str:
    """What to say about JSON ``text`` holding a key twice in one object: the key, and where (``where``, then
    line:column with ``at_line``, else the character) its second occurrence is."""
    objects: list[set[str] | None] = []  # per open container: the keys seen (None for an array)
    key_next = False
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in "{[":
            objects.append(set() if token == "{" else None)
            key_next = token == "{"
        elif token in "}]":
            objects.pop()
            key_next = False
        elif token == ",":
            key_next = bool(objects) and objects[-1] is not None
        elif token == ":":
            key_next = False
        elif key_next and objects and objects[-1] is not None:
            key, keys, key_next = json.loads(token), objects[-1], False
            if key in keys:
                at = match.start()
                if at_line:
                    line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
                    where = f"{where}:{line}:{column}"
                else:
                    where = f"{where} (at character {at + 1} of the value)"
                return (f"{where}: the key {_quoted(key)} appears twice in one object; "
                        "expected each key once (JSON readers differ on which one counts)")
            keys.add(key)
    return f"{where}: a key appears twice in one object; expected each key once"


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _assign(data: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    target = data
    for i, part in enumerate(path[:-1]):
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise InputError(f"--set {_said(item)}: '{_said('.'.join(path[:i + 1]))}' is not an object in the input "
                             f"(it is {_kind(nxt)})")
        target = nxt
    target[path[-1]] = value


def check_input(plan: dict[str, Any], data: dict[str, Any]) -> None:
    """Raise InputError listing every way ``data`` fails the plan's input schema.

    A reference (``$ref``) is resolved inside the schema or to a bundled JSON Schema meta-schema, never
    fetched; one that does not resolve (FD206 when the spec is compiled; a plan may come from elsewhere)
    is an InputError too, saying which.
    """
    schema = plan["flow"].get("input_schema")
    if schema is None:
        return
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.exceptions import Unresolvable

    try:
        errors = sorted(Draft202012Validator(schema, registry=Registry()).iter_errors(data),
                        key=lambda e: list(e.absolute_path))
    except Unresolvable as exc:
        ref = getattr(exc, "ref", None)
        which = f" to '{ref}'" if isinstance(ref, str) else ""
        raise InputError(f"the spec's input schema cannot be used to check the run input: a reference{which} in "
                         "it cannot be resolved (a reference must point inside the schema; none is fetched)") from None
    if errors:
        lines = [f"  at {_pointer(e.absolute_path)}: {_schema_message(e)}" for e in errors[:20]]
        raise InputError("the run input does not match the spec's input schema:\n" + "\n".join(lines))


#: the longest line about one schema error, in characters (what is left of the spec's own text past the value)
_MESSAGE_LIMIT = 300


def _said(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Text of the input's (a key, a ``--set`` argument) as a message shows it: at most ``limit`` characters (an
    ellipsis ends a cut), control characters as JSON escapes."""
    return visible(text if len(text) <= limit else text[:limit - 1] + "…")


def _quoted(value: Any) -> str:
    """A value of the input's as a message quotes it: JSON, cut to 80 characters, with its size when it was cut
    (``"aaaa…" (a string of 2,000,000 characters)``); control characters as JSON escapes."""
    said = visible(quote_value(value))
    if said.endswith("…"):
        size = {str: "a string of {:,} characters", list: "an array of {:,} items", dict: "an object of {:,} keys"}
        for kind, words in size.items():
            if isinstance(value, kind):
                said += f" ({words.format(len(value))})"
    return said


def _pointer(path: Iterable[Any]) -> str:
    """Where in the input, as a JSON Pointer (``/order/items/0``: ``~`` and ``/`` in a key as ``~0`` and ``~1``),
    each key at most 80 characters; ``(top)`` for the input itself."""
    tokens = [_said(str(t).replace("~", "~0").replace("/", "~1")) for t in path]
    return "/" + "/".join(tokens) if tokens else "(top)"


def _schema_message(error: Any) -> str:
    """jsonschema's message for one error (``'x' is not of type 'number'``), on one line, with the input's value
    in it quoted bounded when it is long (:func:`_quoted`: jsonschema writes it out whole, 2 MB of it as well)."""
    message = str(error.message)
    if len(message) > QUOTE_LIMIT:  # (else the value in it is short: as jsonschema says it)
        try:
            whole = repr(error.instance)
        except RecursionError:
            whole = ""
        if len(whole) > QUOTE_LIMIT and message.startswith(whole):
            message = _quoted(error.instance) + message[len(whole):]
        elif len(whole) > QUOTE_LIMIT and whole in message:
            message = message.replace(whole, _quoted(error.instance))
    message = visible(message)
    return message if len(message) <= _MESSAGE_LIMIT else message[:_MESSAGE_LIMIT - 1] + "…"
