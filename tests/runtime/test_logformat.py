"""Log records as JSON lines (``flowdsl worker --log-format json``): every record one object on one line, with
the facts it was given as keys; a command's lines for people as records too."""

from __future__ import annotations

import io
import json
import logging

import pytest

from flowdsl.runtime.logformat import JsonFormatter, LogConsole


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def _records(out: io.StringIO) -> list[dict[str, object]]:
    lines = out.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_a_record_is_one_json_line_with_its_extras_as_keys() -> None:
    logger, out = _logger("flowdsl.test.json")
    logger.warning("run %s ended %s", "r1", "needs_intervention",
                   extra={"run_id": "r1", "status": "needs_intervention", "left_to_undo": ["b", "a"]})
    [record] = _records(out)
    assert record["level"] == "WARNING" and record["logger"] == "flowdsl.test.json"
    assert record["message"] == "run r1 ended needs_intervention"
    assert (record["run_id"], record["status"], record["left_to_undo"]) == ("r1", "needs_intervention", ["b", "a"])
    assert str(record["time"]).endswith("Z") and len(str(record["time"])) == len("2026-12-05T11:29:39.746Z")
    assert not {"args", "msg", "levelno", "pathname", "exc_info"} & set(record)  # (no LogRecord internals)


def test_a_message_with_newlines_and_control_characters_stays_on_one_line_and_inert() -> None:
    logger, out = _logger("flowdsl.test.inert")
    logger.error("forged\n2026-01-01 INFO all fine \x1b[2J", extra={"reason": "a\nb"})
    assert out.getvalue().count("\n") == 1 and "\x1b" not in out.getvalue()
    [record] = _records(out)
    assert record["message"] == "forged\n2026-01-01 INFO all fine \x1b[2J" and record["reason"] == "a\nb"


def test_an_exception_s_traceback_and_a_value_json_cannot_hold_are_kept_as_text() -> None:
    logger, out = _logger("flowdsl.test.exc")
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("it failed", extra={"thing": object(), "big": 2**80})
    [record] = _records(out)
    assert "ValueError: bad value" in str(record["exception"]) and "Traceback" in str(record["exception"])
    assert str(record["thing"]).startswith("<object object at") and record["big"] == 2**80


@pytest.mark.parametrize(("printed", "level", "message"), [
    ("[red]error[/]: cannot import worker module 'x'", "ERROR", "cannot import worker module 'x'"),
    ("[yellow]warning[/]: the module(s) m registered no worker", "WARNING", "the module(s) m registered no worker"),
    ("[bold]flowdsl worker[/] w1: 2 worker(s)", "INFO", "flowdsl worker w1: 2 worker(s)"),
])
def test_a_console_line_becomes_a_record_at_its_level_without_its_markup(printed: str, level: str,
                                                                         message: str) -> None:
    logger, out = _logger("flowdsl.test.console")
    LogConsole(logger).print(printed, highlight=False)
    [record] = _records(out)
    assert (record["level"], record["message"]) == (level, message)


def _strict(line: str) -> dict[str, object]:
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    found: dict[str, object] = json.loads(line, parse_constant=refuse)
    return found


def test_a_record_is_strict_json_even_with_nan_beside_what_the_fast_encoder_refuses() -> None:
    logger, out = _logger("flowdsl.test.strict")
    logger.info("odd values", extra={"score": float("nan"), "limit": float("inf"), "big": 2**80,
                                     "label": "bad \udcff byte"})
    record = _strict(out.getvalue().strip())
    assert (record["score"], record["limit"], record["big"]) == ("nan", "inf", 2**80)
    assert str(record["label"]).startswith("bad ")


def test_an_extra_named_like_a_key_of_the_record_is_kept_beside_it() -> None:
    logger, out = _logger("flowdsl.test.clash")
    logger.info("clash", extra={"time": "yesterday", "level": "low"})
    [record] = _records(out)
    assert record["level"] == "INFO" and record["extra.level"] == "low" and record["extra.time"] == "yesterday"
