"""Hostile workers and run input: what a worker raises or returns, however odd, fails its step — it never hangs
the run, crashes the runtime or breaks the record — and run input the JSON readers refuse is a usage error.

Covered: error messages and tracebacks holding lone surrogates (a file name decoded with ``surrogateescape``),
integers too long to write as text, a sync worker's ``GeneratorExit``, exceptions whose ``__str__`` fails
and whose failure's ``__str__`` fails too, the safety nets under an attempt and under carrying out a decision,
and run input with over-long integers, a byte order mark or no stdin at all.

Workers live in a private registry (``registry=``), so nothing here leaks into the process-wide one; every
run is bounded, so that a hang fails its test instead of stopping the suite.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime import local as local_module
from flowdsl.runtime import record as record_module
from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.execute import NotJSON, error_message, execute, json_problem, plain_json
from flowdsl.runtime.inputs import InputError, read_input
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.record import encode_line, read_record
from flowdsl.workers import WorkerRegistry
from tests.runtime.conformance import HEADER

ROOT = Path(__file__).resolve().parents[2]
#: seconds a run may take before a test calls it hung (every run here takes milliseconds)
HUNG = 10.0
#: more digits than Python converts to text by default (sys.get_int_max_str_digits())
HUGE = 10**5000
NAME = b"report-\xff.csv".decode("utf-8", "surrogateescape")  # as os.listdir() gives an undecodable name


def sync_and_async(body: Callable[[], Any]) -> dict[str, Callable[..., Any]]:
    """The same worker body as a sync worker (run in a thread) and as an async one."""
    def sync_worker(data: Any, ctx: Any) -> Any:
        return body()

    async def async_worker(data: Any, ctx: Any) -> Any:
        return body()

    return {"sync": sync_worker, "async": async_worker}


def saga(bad: Callable[..., Any], log: list[str] | None = None, ok: Callable[..., Any] | None = None) -> \
        WorkerRegistry:
    """``ok`` (undone by ``undo``) then ``bad``."""
    reg = WorkerRegistry()

    async def done(data: Any, ctx: Any) -> Any:
        return {"done": True}

    async def undo(data: Any, ctx: Any) -> Any:
        if log is not None:
            log.append("undo")

    reg.register("ok", ok or done)
    reg.register("undo", undo)
    reg.register("bad", bad)
    return reg


PLAN = compile_text("flowdsl: 1\nname: hostile\nsteps:\n  - ok: {compensate: undo}\n  - bad\n")


def bounded(reg: WorkerRegistry, **options: Any) -> Any:
    """Run ``PLAN`` to its end — or fail the test, rather than hang it, when the run never ends."""
    options.setdefault("record", False)
    return asyncio.run(asyncio.wait_for(run_flow(PLAN, {}, registry=reg, import_workers=False, **options), HUNG))


def whole_record(path: Path) -> list[dict[str, Any]]:
    """The record's events, checked whole: valid UTF-8 JSON lines ending with the run's end."""
    header, lines = read_record(path)
    assert header is not None and lines[-1]["type"] == "run_finished", lines[-1]
    return lines


# --- H1: lone surrogates and over-long integers ------------------------------------------------------------


def _raise_with_a_file_name() -> Any:
    raise ValueError(f"cannot parse {NAME}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_error_message_with_a_lone_surrogate_fails_the_step_and_the_record_stays_whole(
        mode: str, tmp_path: Path) -> None:
    log: list[str] = []
    r = bounded(saga(sync_and_async(_raise_with_a_file_name)[mode], log), record=True, runs_dir=tmp_path,
                run_id="s1")
    assert (r.status, r.failed_step, r.compensated, log) == ("compensated", "bad", ["ok"], ["undo"])
    assert r.error["type"] == "ValueError"
    assert r.error["message"] == "cannot parse report-\\udcff.csv"  # the undecodable byte, escaped
    assert r.record_error is None
    lines = whole_record(tmp_path / "s1.jsonl")
    failed = next(line for line in lines if line["type"] == "task_failed")
    assert failed["error"]["message"] == "cannot parse report-\\udcff.csv"
    assert "\\udcff" in failed["traceback"] and "\udcff" not in failed["traceback"]


def _exit_with_a_surrogate() -> Any:
    sys.exit("\udc80")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_traceback_with_a_lone_surrogate_keeps_the_record_whole(mode: str, tmp_path: Path) -> None:
    r = bounded(saga(sync_and_async(_exit_with_a_surrogate)[mode]), record=True, runs_dir=tmp_path, run_id="s2")
    assert (r.status, r.compensated, r.record_error) == ("compensated", ["ok"], None)
    assert r.error == {"type": "SystemExit", "message": "the worker called sys.exit('\\udc80')",
                       "types": ["SystemExit"]}
    failed = next(line for line in whole_record(tmp_path / "s2.jsonl") if line["type"] == "task_failed")
    assert "SystemExit: \\udc80" in failed["traceback"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("result", [{"x": HUGE}, {"x": [1, {"y": -HUGE}]}], ids=["top", "nested"])
def test_a_result_with_an_integer_too_long_to_write_is_output_invalid(
        mode: str, result: dict[str, Any], tmp_path: Path) -> None:
    r = bounded(saga(sync_and_async(lambda: result)[mode]), record=True, runs_dir=tmp_path, run_id="i1")
    assert (r.status, r.compensated, r.record_error) == ("compensated", ["ok"], None)
    assert r.error["type"] == "OutputInvalid"
    assert "the integer has more than 4300 digits" in r.error["message"]
    whole_record(tmp_path / "i1.jsonl")


def test_json_problem_and_plain_json_refuse_integers_too_long_to_write_and_keep_the_rest() -> None:
    longest = 10**4300 - 1  # 4300 digits: the longest Python converts by default
    assert json_problem({"a": [longest, -longest]}) is None
    assert plain_json({"a": [longest]}) == {"a": [longest]}
    for bad, where in [({"a": HUGE}, "/a"), ({"a": [0, -HUGE]}, "/a/1"), (HUGE, "/"), ([{"b": HUGE}], "/0/b")]:
        problem = json_problem(bad)
        assert problem is not None and problem.startswith(f"at {where}: the integer has more than 4300 digits")
        with pytest.raises(NotJSON) as caught:
            plain_json(bad)
        assert str(caught.value) == problem


def test_the_codec_writes_a_lone_surrogate_as_its_escape_and_reads_it_back() -> None:
    value = {"m": f"cannot parse {NAME}", "n": 2**70}
    for sort_keys in (False, True):
        raw = dumps(value, sort_keys=sort_keys)
        raw.decode("utf-8")  # valid UTF-8
        assert loads(raw) == value
    assert json.loads(encode_line({"m": "\ud83d"})) == {"m": "\ud83d"}


def test_the_cli_prints_one_json_object_for_a_surrogate_error_without_a_record(tmp_path: Path) -> None:
    (tmp_path / "surr_workers.py").write_text(
        "from flowdsl import worker\n\n\n@worker('surr.ok')\nasync def ok(data, ctx):\n    return {}\n\n\n"
        "@worker('surr.undo')\nasync def undo(data, ctx):\n    return {}\n\n\n"
        "@worker('surr.bad')\nasync def bad(data, ctx):\n"
        "    raise ValueError('cannot parse ' + b'report-\\xff.csv'.decode('utf-8', 'surrogateescape'))\n")
    (tmp_path / "surr.yaml").write_text("flowdsl: 1\nname: surr\nworkers: [surr_workers]\nsteps:\n"
                                        "  - a: {worker: surr.ok, compensate: surr.undo}\n  - b: {worker: surr.bad}\n")
    proc = subprocess.run([sys.executable, "-m", "flowdsl", "run", "surr.yaml", "--no-record", "--format", "json"],
                          capture_output=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # this tree's flowdsl, whatever is installed
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    out = json.loads(proc.stdout.decode("utf-8"))  # exactly one JSON object, in UTF-8
    assert (out["status"], out["compensated"]) == ("compensated", ["a"])
    assert out["error"]["message"] == "cannot parse report-\\udcff.csv"


def test_a_record_line_the_encoder_refuses_stops_the_record_not_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The net under the encoder: a line it cannot encode (a runtime bug) is a record failure like a full disk —
    the run goes on unrecorded to its end, compensating, and says why — never a dead task or a hung run."""
    real = record_module.encode_line

    def picky(item: dict[str, Any]) -> bytes:
        if item.get("type") == "task_failed":
            raise ValueError("cannot encode this line")
        return real(item)

    monkeypatch.setattr(record_module, "encode_line", picky)
    log: list[str] = []
    r = bounded(saga(sync_and_async(_raise_with_a_file_name)["sync"], log), record=True, runs_dir=tmp_path,
                run_id="e1")
    assert (r.status, r.compensated, log) == ("compensated", ["ok"], ["undo"])
    assert r.record_error is not None and "ValueError: cannot encode this line" in r.record_error
    _, lines = read_record(tmp_path / "e1.jsonl")  # what was written before stays readable
    assert lines[-1]["type"] != "run_finished"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failure_carrying_out_a_decision_stops_the_run_loudly_instead_of_hanging(
        mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime bug while carrying out what the kernel decided after an attempt answered (here: dispatching the
    next step) goes to the hard-failure path: run() raises and the record ends with runtime_aborted."""
    def broken_execute(command: dict[str, Any], **options: Any) -> Any:
        if command["worker"] == "bad":
            raise RuntimeError("cannot dispatch")
        return execute(command, **options)

    monkeypatch.setattr(local_module, "execute", broken_execute)
    # ok answers from its own task, sync or async: either way the next dispatch fails
    reg = saga(sync_and_async(lambda: {})[mode], ok=sync_and_async(lambda: {"done": True})[mode])
    with pytest.raises(RuntimeError, match="carrying out a decision of run h1: RuntimeError: cannot dispatch"):
        bounded(reg, record=True, runs_dir=tmp_path, run_id="h1")
    _, lines = read_record(tmp_path / "h1.jsonl")
    assert lines[-1]["type"] == "runtime_aborted"
    assert lines[-1]["reason"] == "internal error: RuntimeError: cannot dispatch"


# --- H2: GeneratorExit, and the net under an attempt -----------------------------------------------------


def test_a_sync_worker_raising_generator_exit_fails_its_step_which_is_retried_then_compensated() -> None:
    calls: list[int] = []

    def closes(data: Any, ctx: Any) -> Any:
        calls.append(ctx.attempt)
        raise GeneratorExit("closed")

    log: list[str] = []
    plan = compile_text("flowdsl: 1\nname: hostile\nsteps:\n  - ok: {compensate: undo}\n"
                        "  - bad: {retry: {attempts: 2, initial: 1ms, on: [GeneratorExit]}}\n")
    r = asyncio.run(asyncio.wait_for(run_flow(plan, {}, registry=saga(closes, log), import_workers=False,
                                              record=False), HUNG))
    assert (r.status, r.failed_step, r.compensated, log) == ("compensated", "bad", ["ok"], ["undo"])
    assert r.error == {"type": "GeneratorExit", "message": "closed", "types": ["GeneratorExit"]}
    assert calls == [1, 2]


class Odd(BaseException):
    """Neither an Exception nor one of the BaseExceptions Python gives a meaning."""


class Mute(Exception):
    def __str__(self) -> str:
        raise Mute()


@pytest.mark.parametrize(("raised", "message"), [(Odd("odd"), "odd"), (Mute(), "(its message could not be read: "
                                                                            "Mute)")])
def test_whatever_escapes_an_attempt_is_answered_as_its_failure(
        raised: BaseException, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The net under execute() (which answers worker failures itself): an attempt whose coroutine raises anything
    but a cancellation or a real Ctrl-C still answers, so the run compensates instead of hanging."""
    async def escaping(command: Any, **options: Any) -> Any:
        if command["worker"] == "bad":
            raise raised
        return await execute(command, **options)

    monkeypatch.setattr(local_module, "execute", escaping)
    log: list[str] = []
    reg = saga(sync_and_async(lambda: {})["sync"], log)
    r = bounded(reg)
    assert (r.status, r.failed_step, r.compensated, log) == ("compensated", "bad", ["ok"], ["undo"])
    assert (r.error["type"], r.error["message"]) == (type(raised).__name__, message)


# --- H3: an exception whose __str__ fails, and whose failure's __str__ fails too ----------------------------


def _raise_mute() -> Any:
    raise Mute()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_exception_whose_message_and_its_failures_message_cannot_be_read_fails_its_step(
        mode: str, tmp_path: Path) -> None:
    log: list[str] = []
    r = bounded(saga(sync_and_async(_raise_mute)[mode], log), record=True, runs_dir=tmp_path, run_id="m1")
    assert (r.status, r.compensated, log) == ("compensated", ["ok"], ["undo"])
    assert r.error == {"type": "Mute", "message": "(its message could not be read: Mute)",
                       "types": ["Mute", "Exception"]}
    whole_record(tmp_path / "m1.jsonl")


def test_error_message_says_what_it_can() -> None:
    class Loud(Exception):
        def __str__(self) -> str:
            raise RuntimeError(f"no message for {NAME}")

    class Weird(Exception):
        def __str__(self) -> str:
            raise Odd()

    assert error_message(ValueError(NAME)) == "report-\\udcff.csv"
    assert error_message(Loud()) == "(its message could not be read: RuntimeError: no message for report-\\udcff.csv)"
    assert error_message(Weird()) == "(its message could not be read: Odd)"
    assert error_message(Mute()) == "(its message could not be read: Mute)"


# --- M3: run input ----------------------------------------------------------------------------------------


def test_an_input_file_with_an_integer_too_long_to_read_says_where(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text('{"note": "' + "9" * 5000 + '",\n "a": [1, -' + "9" * 5000 + "]}")
    with pytest.raises(InputError) as caught:
        read_input(str(path))
    assert str(caught.value).startswith(f"{path}:2:11: an integer of 5000 digits, more than the 4300 Python reads")
    assert "give a longer one as a string" in str(caught.value)


def test_a_set_value_with_an_integer_too_long_to_read_names_its_key() -> None:
    with pytest.raises(InputError, match=r"^--set order\.total: an integer of 5000 digits, more than the 4300"):
        read_input(None, ["order.total=" + "9" * 5000])


def test_flowdsl_run_refuses_an_integer_too_long_to_read_with_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "f.yaml"
    spec.write_text(HEADER.format(name="f") + "steps: [conf.a]\n")
    (tmp_path / "in.json").write_text('{"a": ' + "1" * 5000 + "}")
    for args in (["-i", str(tmp_path / "in.json")], ["--set", "a=" + "1" * 5000]):
        r = CliRunner().invoke(app, ["run", str(spec), "--no-record", *args])
        assert r.exit_code == 2, r.output
        assert "an integer of 5000 digits" in r.output and "Traceback" not in r.output


def test_input_from_a_closed_stdin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(InputError, match="cannot read the input from stdin: this process has no stdin"):
        read_input("-")
    closed = io.TextIOWrapper(io.BytesIO(b"{}"))
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    with pytest.raises(InputError, match="cannot read the input from stdin: "):
        read_input("-")


def test_flowdsl_run_with_stdin_closed_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "f.yaml"
    spec.write_text(HEADER.format(name="f") + "steps: [conf.a]\n")
    proc = subprocess.run([sys.executable, "-m", "flowdsl", "run", str(spec), "-i", "-", "--no-record"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2, proc.stderr
    assert "this process has no stdin" in proc.stderr and "Traceback" not in proc.stderr


def test_a_byte_order_mark_at_the_start_of_the_input_is_skipped_as_in_spec_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_input(str(path)) == {"a": 1}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'\xef\xbb\xbf{"b": 2}')))
    assert read_input("-") == {"b": 2}
    # positions count from after the mark, as in spec files (not a trailing comma: Python 3.13's json places and
    # words that error otherwise — at the comma, "Illegal trailing comma" — than 3.11 and 3.12 do)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1 x}')
    with pytest.raises(InputError, match=r"in\.json:1:9: input is not valid JSON: Expecting ',' delimiter"):
        read_input(str(path))
