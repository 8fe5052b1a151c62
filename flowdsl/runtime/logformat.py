"""Log records as JSON lines, for log shippers: ``flowdsl worker --log-format json``.

Stage: runtime support. Imports orjson (through :mod:`flowdsl.runtime.codec`), rich (to read a console line's
markup) and stdlib; nothing of flowdsl's runtimes.

- :class:`JsonFormatter` — one JSON object per record, on one line: ``time`` (UTC, ISO 8601 with milliseconds),
  ``level``, ``logger``, ``message``, then every attribute the record was given with ``extra=`` (``run_id``,
  ``flow``, ``status``, ``error_type``, ``left_to_undo``, ``dead_letter``, …: docs/runtime.md, "Worker logs"),
  and ``exception`` (the traceback's text) when there is one;
- :class:`LogConsole` — what a command prints for people (its start and stop lines, its errors), as log records
  instead, so that the whole of stderr is JSON lines;
- :func:`configure` — the process's logging, as text or as JSON lines, on stderr.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

from flowdsl.runtime.codec import dumps

__all__ = ["FORMATS", "JsonFormatter", "LogConsole", "configure"]

#: the values of ``--log-format``
FORMATS = ("text", "json")
#: the text format's line (``--log-format text``)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: the attributes every LogRecord has: what is not among them was given with ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module doc); a value JSON cannot hold is written as its ``repr``,
    a character no terminal should get as its JSON escape."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key if key not in out else f"extra.{key}"] = value  # (an extra named time, level, …: kept)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        raw = dumps(out, default=repr)  # (an extra JSON cannot hold: its repr)
        if raw[:1] == b" ":  # the codec fell back to stdlib json (an integer beyond 64 bits, a lone surrogate, a
            # key that is not a string), which writes NaN and infinities as bare tokens no strict reader takes
            return json.dumps(_finite(out), ensure_ascii=True, separators=(",", ":"), default=repr)
        return raw.decode()


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity as a string (strict JSON readers refuse the bare tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class LogConsole:
    """Stands for a rich console where a command's lines for people must be log records (JSON lines): each
    printed line becomes a record of ``logger`` with its markup removed — ERROR when it is labelled ``error:``,
    WARNING when ``warning:``, INFO otherwise."""

    file = sys.stderr

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def print(self, *objects: Any, **_: Any) -> None:
        from rich.text import Text

        text = " ".join(Text.from_markup(o).plain if isinstance(o, str) else str(o) for o in objects)
        level = logging.ERROR if text.startswith("error: ") else \
            logging.WARNING if text.startswith("warning: ") else logging.INFO
        self.logger.log(level, text.removeprefix("error: ").removeprefix("warning: "))


def configure(fmt: str, level: int) -> None:
    """The process's logging on stderr, at ``level``: text lines (``%(asctime)s %(levelname)s %(message)s``;
    handlers the process set up already stay as they are) or JSON lines (which replace the root logger's handlers:
    a line of text would break the stream a log shipper reads)."""
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler], force=True)
        logging.captureWarnings(True)  # (warnings.warn of a library or a step: a record, not raw text)
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format=TEXT_FORMAT)
