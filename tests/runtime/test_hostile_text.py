"""Text that is not flowdsl's own, shown to a person: worker error messages, keys and values of the run input,
names read from a record. It must neither drive the terminal (escape sequences), forge a line of output, be
changed on the way (rich's emoji codes and markup), nor be echoed whole when it is large; and run records,
which hold the run's input and outputs, are their owner's alone to read."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.render import render
from flowdsl.render.runstate import RunStates
from flowdsl.runtime.inputs import InputError, check_input
from flowdsl.runtime.local import run_flow
from flowdsl.shown import visible
from flowdsl.stdio import console
from tests.runtime.conformance import HEADER

#: what a worker's error message may hold: a window title (OSC), a screen clear and a colour (CSI), a C1 CSI, a
#: line of its own that passes for flowdsl's, a bidi override, an emoji code and rich markup
HOSTILE = ("upstream said: \x1b]0;OWNED\x07\x1b[2J\x1b[31mFAKE\r\nall good: completed \x9b2J \u202eevil "
           ":smile: [bold]x[/]")
#: none of these may reach the terminal as it is
RAW = ("\x1b", "\x07", "\x9b", "\r", "\u202e")


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _safe(text: str) -> None:
    """``text`` (what a command printed) holds no raw control character of HOSTILE, and HOSTILE's text is in it
    as written, on one line: escapes for what could drive the terminal, the emoji code and the markup kept."""
    assert not [ch for ch in RAW if ch in text], repr(text)
    assert not [line for line in text.splitlines() if line.startswith("all good")], text
    assert "upstream said: \\u001b]0;OWNED\\u0007\\u001b[2J\\u001b[31mFAKE\\r\\nall good: completed \\u009b2J " \
           "\\u202eevil :smile: [bold]x[/]" in text, text
    assert "😄" not in text


@pytest.fixture
def failed_run(tmp_path: Path) -> Iterator[tuple[str, Path, Any]]:
    """``flowdsl run`` of a step whose worker raises HOSTILE (its record in tmp_path/runs): spec, runs dir, result."""
    spec = tmp_path / "esc.yaml"
    spec.write_text(HEADER.format(name="esc") + "steps:\n  - a: {worker: conf.a, retry: 1}\n")
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"script": {"a": {"raise": "GatewayError", "message": HOSTILE}}}))
    runs = tmp_path / "runs"
    yield str(spec), runs, cli("run", str(spec), "-i", str(data), "--runs-dir", str(runs), "--run-id", "esc1")


def test_run_shows_a_worker_message_inert_and_on_one_line(failed_run: tuple[str, Path, Any]) -> None:
    _, _, done = failed_run
    assert done.exit_code == 1, done.output
    assert "GatewayError: upstream said" in done.stderr
    _safe(done.stderr)  # the progress line, the errors of the summary and its headline


def test_show_shows_a_recorded_message_inert(failed_run: tuple[str, Path, Any]) -> None:
    _, runs, _ = failed_run
    shown = cli("show", "esc1", "--runs-dir", str(runs))
    assert shown.exit_code == 0, shown.output
    assert "✗ a failed" in shown.stdout
    _safe(shown.stdout)  # the timeline and the summary


def test_json_output_keeps_the_message_exact(failed_run: tuple[str, Path, Any]) -> None:
    _, runs, _ = failed_run
    shown = cli("show", "esc1", "--runs-dir", str(runs), "--format", "json")
    assert json.loads(shown.stdout)["error"]["message"] == HOSTILE  # JSON escapes it, and it stays the same text


def test_visible_escapes_what_drives_a_terminal_and_nothing_else() -> None:
    assert visible("plain é 中文 🚀 [x] :smile:") == "plain é 中文 🚀 [x] :smile:"
    assert visible("a\nb\tc\rd\x00\x1b\x7f\x85\x9b\u2028\u2029\u200e\u202e\u2066") == \
        "a\\nb\\tc\\rd\\u0000\\u001b\\u007f\\u0085\\u009b\\u2028\\u2029\\u200e\\u202e\\u2066"
    assert visible(42) == "42"


def test_consoles_print_emoji_codes_as_written() -> None:
    con = console(stderr=True, record=True)
    con.print(":smile: :thumbs_up:")
    assert con.export_text() == ":smile: :thumbs_up:\n"


# --- the run input's keys and values in input errors ------------------------------------------------------------


def _plan(schema: dict[str, Any]) -> dict[str, Any]:
    return compile_text(HEADER.format(name="inp") + f"input: {json.dumps(schema)}\nsteps: [conf.a]\n")


def _input_error(plan: dict[str, Any], data: dict[str, Any]) -> str:
    with pytest.raises(InputError) as caught:
        check_input(plan, data)
    return str(caught.value)


def test_input_keys_are_shown_inert_as_a_json_pointer() -> None:
    plan = _plan({"type": "object", "additionalProperties": {"type": "string"}})
    said = _input_error(plan, {"\x1b[2J\x1b[31mFAKE\nerror: x": 1, "a/b~c": 2})
    lines = said.splitlines()
    assert lines[0] == "the run input does not match the spec's input schema:"
    assert lines[1:] == ["  at /\\u001b[2J\\u001b[31mFAKE\\nerror: x: 1 is not of type 'string'",
                         "  at /a~1b~0c: 2 is not of type 'string'"]


def test_input_values_are_quoted_bounded() -> None:
    plan = _plan({"type": "object", "properties": {"order": {"type": "object", "properties": {
        "currency": {"type": "string", "maxLength": 3}, "lines": {"type": "array", "maxItems": 1},
        "note": {"type": "integer"}}}}})
    said = _input_error(plan, {"order": {"currency": "E" * 2_000_000, "lines": list(range(100_000)),
                                         "note": "x\x1b" * 100}})
    assert len(said) < 1000, len(said)
    lines = said.splitlines()
    assert lines[1] == f'  at /order/currency: "{"E" * 78}… (a string of 2,000,000 characters) is too long'
    assert lines[2].startswith("  at /order/lines: [0, 1, 2, ") and lines[2].endswith(
        "… (an array of 100,000 items) is too long")
    assert lines[3].startswith('  at /order/note: "x\\u001bx\\u001b') and "(a string of 200 characters)" in lines[3]


def test_short_input_values_read_as_jsonschema_says_them() -> None:
    """docs/runtime.md, "Checking an input first"."""
    plan = _plan({"type": "object", "properties": {"amount": {"type": "number"}}})
    assert _input_error(plan, {"amount": "x"}).splitlines()[1] == "  at /amount: 'x' is not of type 'number'"


# --- records: their owner's alone ---------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(runs: Path, run_id: str) -> Path:
    plan = compile_text(HEADER.format(name="perm") + "steps: [conf.a]\n")
    result = asyncio.run(run_flow(plan, {"card": "4242424242424242"}, run_id=run_id, runs_dir=runs))
    assert result.status == "completed" and result.record_path is not None
    return Path(result.record_path)


def test_a_record_and_the_directory_made_for_it_are_the_owners_alone(tmp_path: Path) -> None:
    old = os.umask(0)  # however permissive the umask
    try:
        record = _run(tmp_path / "made" / "runs", "p1")
    finally:
        os.umask(old)
    assert _mode(record) == 0o600
    assert _mode(record.parent) == 0o700


def test_an_existing_records_directory_keeps_its_mode(tmp_path: Path) -> None:
    runs = tmp_path / "shared"
    runs.mkdir()
    runs.chmod(0o755)
    record = _run(runs, "p2")
    assert _mode(runs) == 0o755  # the user's choice
    assert _mode(record) == 0o600


# --- names read from a record, drawn ------------------------------------------------------------------------------


def test_an_ascii_caption_from_a_record_is_cleaned() -> None:
    plan = compile_text(HEADER.format(name="cap") + "steps: [conf.a]\n")
    states = RunStates(steps={"a": "failed"}, run_id="r\x1b[2J", status="failed\nall good: completed")
    drawn = render(plan, "ascii", run_states=states)
    assert isinstance(drawn, str)
    assert "\x1b" not in drawn
    assert not [line for line in drawn.splitlines() if line.startswith("all good")]


def test_a_cli_error_quoting_text_keeps_its_own_lines_and_makes_each_inert() -> None:
    """`flowdsl run`'s errors (a run aborted, a worker module that fails to import) quote text flowdsl did not
    write: each of their lines is shown inert, the lines themselves kept (an input error lists one per line)."""
    from flowdsl.cli_common import _escape

    assert _escape("boom: \x1b]0;OWNED\x07 [bold]x[/]\n  at /a: \u202efake") == \
        "boom: \\u001b]0;OWNED\\u0007 \\[bold]x\\[/]\n  at /a: \\u202efake"


def test_the_list_of_runs_shows_names_read_from_records_inert() -> None:
    from dataclasses import dataclass

    from flowdsl.runtime.listing import print_runs

    @dataclass
    class Listed:
        run_id: str = "r1"
        flow: str | None = "shop\x1b[2J\nall good"
        status: str = "completed"
        submitted_at: int | None = None
        started_at: int | None = None
        finished_at: int | None = None

    shown = console(record=True)
    shown.begin_capture()
    print_runs([Listed()], shown)
    out = shown.end_capture()
    assert "\x1b" not in out and "\n" not in out.splitlines()[1] and "shop\\u001b[2J\\n" in out, out
