"""JSON bytes for the runtimes: run records, Redis states, messages and journal entries.

Stage: runtime (shared). Imports orjson and stdlib only. orjson is the codec;
stdlib json takes what orjson refuses (integers beyond 64 bits, which a worker
may return and ``json_problem`` accepts), so every JSON value round-trips.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["dumps", "json_line", "loads"]

_SORTED = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# what stdlib json encodes (integers beyond 64 bits, which orjson would read back as floats) starts with
# this JSON whitespace, so that ``loads`` knows, without scanning, which reader keeps it exact
_EXACT = b" "


def dumps(value: Any, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON, keys sorted with ``sort_keys``; ``default`` turns what is not JSON into JSON
    (without it, such a value raises ``TypeError``)."""
    try:
        return orjson.dumps(value, default=default, option=_SORTED if sort_keys else None)
    except TypeError:  # an integer beyond 64 bits, a lone surrogate (or, without ``default``, a value that is not JSON)
        # a lone surrogate (which the runtimes keep out of run data, but a model's reply may hold one) is written
        # as its JSON escape, "\udc80", which reads back as the same string
        return _EXACT + json.dumps(value, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"),
                                   default=default).encode("utf-8", "backslashreplace")


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(value: Any) -> str:
    """``value`` as one line of JSON text for stdout (non-ASCII characters as they are, a newline after). A lone
    surrogate — a byte of a file name or an argument that was not UTF-8, kept by ``surrogateescape`` — is written
    as its JSON escape (``"\\udcff"``): UTF-8 output cannot carry it, and the object must still come out whole."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # (such a character can only be inside a JSON string: escaping it keeps the JSON)
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text + "\n"


def loads(raw: bytes | str) -> Any:
    """The JSON value of what :func:`dumps` wrote; integers of any size stay integers."""
    if raw[:1] in (_EXACT, " "):
        return json.loads(raw)
    return orjson.loads(raw)
