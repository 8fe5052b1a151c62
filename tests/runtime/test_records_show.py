"""Run records and `flowdsl show`: lines cut short (inside a UTF-8 character too), notes that agree with what
was read, the show hint, run ids, what a path really is, contradictory or empty options, lines the replay does
not explain, the JSON context of an unfinished run, a record that cannot be created, duplicate input keys."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime import record as record_module
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import RecordError, check_run_id, ends_mid_line, read_record
from flowdsl.runtime.redis import keys as keys_module
from flowdsl.runtime.timeline import late_completion_line
from tests.runtime.conformance import HEADER

TICK = "\u2713"  # three bytes in UTF-8
SCRIPT = {"a": {"result": {"t": f"done {TICK}"}}}


def cli(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=stdin)


def _spec(tmp_path: Path, steps: str = "steps: [conf.a, conf.b]\n", name: str = "rec") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEADER.format(name=name) + steps)
    return str(path)


def _record(tmp_path: Path, run_id: str = "r1", script: dict[str, Any] = SCRIPT) -> tuple[Path, list[bytes]]:
    """A completed run's record (a then b; a's result holds a 3-byte character) and its lines, each with its
    newline."""
    plan = compile_text(HEADER.format(name="rec") + "steps: [conf.a, conf.b]\n")
    result = asyncio.run(run_flow(plan, {"script": script}, run_id=run_id, runs_dir=tmp_path))
    assert result.status == "completed"
    path = tmp_path / f"{run_id}.jsonl"
    return path, path.read_bytes().splitlines(keepends=True)


def _line_of(lines: list[bytes], kind: str) -> int:
    return next(i for i, line in enumerate(lines) if json.loads(line)["type"] == kind)


# --- M2: a last line cut inside a UTF-8 character -------------------------------------------------------------


def test_a_last_line_cut_inside_a_utf8_character_is_left_out_with_the_note(tmp_path: Path) -> None:
    path, lines = _record(tmp_path)
    answer = _line_of(lines, "task_succeeded")  # the first one: a's result, with the 3-byte character
    tick = lines[answer].index(TICK.encode())
    for cut in (tick + 1, tick + 2, tick):  # inside the character (twice), and just before it
        path.write_bytes(b"".join(lines[:answer]) + lines[answer][:cut])
        shown = cli("show", "r1", "--runs-dir", str(tmp_path))
        assert shown.exit_code == 0, shown.stderr
        assert "the record's last line is incomplete" in shown.stdout and "not valid UTF-8" not in shown.stdout
        assert "a: attempt 1" in shown.stdout and "✓ a succeeded" not in shown.stdout  # as it stood before
        assert ends_mid_line(path) and read_record(path)[1].cut_short


def test_bytes_that_are_not_utf8_stay_an_error_with_their_line_and_column(tmp_path: Path) -> None:
    path, lines = _record(tmp_path)
    answer = _line_of(lines, "task_succeeded")
    tick = lines[answer].index(TICK.encode())
    bad = lines[answer][:tick] + b"\xff" + lines[answer][tick + 3 :]
    offset = len(b"".join(lines[:answer])) + tick
    path.write_bytes(b"".join(lines[:answer]) + bad + b"".join(lines[answer + 1 :]))  # inside the record
    shown = cli("show", "r1", "--runs-dir", str(tmp_path))
    assert (
        shown.exit_code == 2
        and f"r1.jsonl:{answer + 1}:{tick + 1}: not valid UTF-8 (byte 0xff at offset {offset})" in shown.stderr
    ), shown.stderr
    path.write_bytes(b"".join(lines[:answer]) + bad.rstrip(b"\n"))  # the last line, whole but for that byte
    shown = cli("show", "r1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and f"r1.jsonl:{answer + 1}:{tick + 1}: not valid UTF-8" in shown.stderr
    path.write_bytes(b"".join(lines[:answer]) + bad[: tick + 5])  # cut short too: still damage, not a cut
    assert cli("show", "r1", "--runs-dir", str(tmp_path)).exit_code == 2 and not ends_mid_line(path)


def test_a_line_holding_u2028_or_u0085_is_one_line(tmp_path: Path) -> None:
    """Lines are split at \\n alone, as written: characters str.splitlines() also breaks at stay in their line."""
    script = {"a": {"result": {"t": "x\u2028y\x85z\u2029"}}}
    path, _ = _record(tmp_path, script=script)
    header, events = read_record(path)
    assert header is not None and events[-1]["type"] == "run_finished"
    shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["context"]["script"] == script


# --- a whole last line without its newline ---------------------------------------------------------------------


def test_a_whole_last_line_without_its_newline_is_read_and_no_note_says_otherwise(tmp_path: Path) -> None:
    path, lines = _record(tmp_path)
    path.write_bytes(b"".join(lines).rstrip(b"\n"))
    assert not ends_mid_line(path) and not read_record(path)[1].cut_short
    shown = cli("show", "r1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0, shown.stderr
    assert "run finished" in shown.stdout and "incomplete" not in shown.stdout and "note" not in shown.stdout
    path.write_bytes(b"".join(lines)[:-5])  # cut for real: both say so
    assert ends_mid_line(path) and read_record(path)[1].cut_short
    assert "the record's last line is incomplete" in cli("show", "r1", "--runs-dir", str(tmp_path)).stdout


# --- one accurate note about how a record ends -----------------------------------------------------------------


def _aborted(tmp_path: Path) -> Path:
    """A record of run r1 ending with a hard stop (a second Ctrl-C) after a succeeded and b was scheduled."""
    path, lines = _record(tmp_path)
    keep = _line_of(lines, "task_succeeded") + 3  # a done, b scheduled
    stop = {
        "type": "runtime_aborted",
        "at": json.loads(lines[keep - 1])["at"],
        "run_id": "r1",
        "reason": "interrupted twice (Ctrl-C)",
        "status": "running",
    }
    path.write_bytes(b"".join(lines[:keep]) + json.dumps(stop).encode() + b"\n")
    return path


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_aborted_record_gets_one_note_and_it_names_the_abort(tmp_path: Path, fmt: str) -> None:
    _aborted(tmp_path)
    shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", fmt)
    assert shown.exit_code == 0, shown.stderr
    said = shown.stdout if fmt == "text" else shown.stderr  # (with --format json, notes go to stderr)
    assert said.count("the record ends before") == 1, said
    assert "stopped at once (interrupted twice (Ctrl-C))" in said
    assert "still going" not in said and "process stopped" not in said


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_header_only_record_gets_one_note(tmp_path: Path, fmt: str) -> None:
    path, lines = _record(tmp_path)
    path.write_bytes(lines[0])
    shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", fmt)
    assert shown.exit_code == 0, shown.stderr
    said = shown.stdout if fmt == "text" else shown.stderr  # (with --format json, notes go to stderr)
    assert said.count("the record ends before") == 1, said
    assert "before the run started" in said and "still going" not in said


# --- the show hint names what the user can type ----------------------------------------------------------------


def test_the_show_hint_uses_the_record_files_name(tmp_path: Path) -> None:
    path, lines = _record(tmp_path, "killed1")
    (tmp_path / "trunc.jsonl").write_bytes(b"".join(lines[:5]) + lines[5][:20])  # a copy, cut short
    shown = cli("show", "trunc", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0, shown.stderr
    hint = next(x for x in shown.stdout.splitlines() if x.startswith("record: "))
    assert hint.endswith(f"(flowdsl show trunc --runs-dir {tmp_path})"), hint
    (tmp_path / "copy of it.jsonl").write_bytes(path.read_bytes())  # a name that is no run id: the path
    shown = cli("show", str(tmp_path / "copy of it.jsonl"))
    hint = next(x for x in shown.stdout.splitlines() if x.startswith("record: "))
    assert hint.endswith(f"(flowdsl show '{tmp_path / 'copy of it.jsonl'}')"), hint


# --- run ids ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_id", "why"),
    [
        ("-x", "it begins with '-', so commands would read it as an option"),
        ("--", "it begins with '-'"),
        (".", "it begins with '.', so its record would be a hidden file ('..jsonl')"),
        ("..", "it begins with '.', so its record would be a hidden file ('...jsonl')"),
        (".hidden", "it begins with '.'"),
    ],
)
def test_run_ids_beginning_with_a_dash_or_a_dot_are_refused(tmp_path: Path, run_id: str, why: str) -> None:
    runs = tmp_path / "runs"
    r = cli("run", _spec(tmp_path), "--runs-dir", str(runs), "--run-id", run_id, "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    assert out["error"]["type"] == "UsageError" and f"invalid run id '{run_id}': {why}" in out["error"]["message"]
    assert "the first not - or ." in out["error"]["message"] and not runs.exists()
    with pytest.raises(ValueError, match="invalid run id"):
        keys_module.check_run_id(run_id)  # the Redis runtime: the same rule


def test_one_run_id_rule_for_both_runtimes() -> None:
    assert keys_module.check_run_id is record_module.check_run_id
    assert keys_module.RUN_ID_RE is record_module.RUN_ID_RE
    for good in ("a", "0", "_x", ":y", "a-.b", "x" * 128, "order-1042.v2"):
        assert check_run_id(good) == good


# --- what a path really is -------------------------------------------------------------------------------------


def test_a_runs_dir_that_is_a_file_is_called_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("run", _spec(tmp_path), "--runs-dir", str(afile), "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    assert out["error"] == {
        "type": "RecordUnwritable",
        "message": f"cannot keep run records in '{afile}': it is a file, not a directory (choose another "
        "directory: runs_dir= from Python, --runs-dir on the command line; or keep no record: record=False, "
        "--no-record)",
    }


def test_a_runs_dir_that_cannot_hold_records_is_said_in_the_api_s_words_too(tmp_path: Path) -> None:
    """The RecordError an embedder gets names the API's parameters (runs_dir=, record=False), not only the CLI's
    options (audit F8)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    plan = compile_text(HEADER.format(name="api") + "steps: [conf.a]\n")
    with pytest.raises(RecordError) as caught:
        asyncio.run(run_flow(plan, {}, runs_dir=afile))
    said = str(caught.value)
    assert "it is a file, not a directory" in said and "runs_dir=" in said and "record=False" in said, said


def test_a_record_that_is_a_directory_is_called_a_directory(tmp_path: Path) -> None:
    (tmp_path / "isdir.jsonl").mkdir()
    shown = cli("show", "isdir", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and f"{tmp_path / 'isdir.jsonl'} is a directory, not a run record" in shown.stderr
    shown = cli("show", str(tmp_path / "isdir.jsonl"))  # by its path
    assert shown.exit_code == 2 and f"{tmp_path / 'isdir.jsonl'} is a directory, not a run record" in shown.stderr
    assert "invalid run id" not in shown.stderr
    shown = cli("show", str(tmp_path / "nothing.jsonl"))
    assert shown.exit_code == 2 and "no run record at" in shown.stderr and "invalid run id" not in shown.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_not_a_regular_file_and_is_never_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for args in (["fifo", "--runs-dir", str(tmp_path)], [str(fifo)]):
        shown = cli("show", *args)
        assert shown.exit_code == 2 and f"{fifo} is not a regular file (a FIFO), so not a run record" in shown.stderr, (
            shown.stderr
        )
    code = (
        f"from flowdsl.runtime.record import read_record\ntry:\n    read_record({str(fifo)!r})\n"
        "except Exception as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert "is not a regular file (a FIFO)" in done.stdout, done.stderr  # said, not waiting for a writer


# --- empty and contradictory options ---------------------------------------------------------------------------


def test_an_empty_runs_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    r = cli("run", _spec(tmp_path), "--runs-dir", "", "--set", "script={}")
    assert r.exit_code == 2 and "Invalid value for '--runs-dir'" in r.output and "empty" in r.output, r.output
    assert set(os.listdir(tmp_path)) == before | {"rec.yaml"}  # no record in the current directory
    shown = cli("show", "r1", "--runs-dir", "")
    assert shown.exit_code == 2 and "Invalid value for '--runs-dir'" in shown.output
    drawn = cli("diagram", _spec(tmp_path), "--run", "r1", "--runs-dir", "")
    assert drawn.exit_code == 2 and "Invalid value for '--runs-dir'" in drawn.output and "empty" in drawn.output


def test_a_flowdsl_runs_dir_set_but_empty_is_refused_unless_no_record_or_runs_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWDSL_RUNS_DIR", "")
    spec = _spec(tmp_path)
    r = cli("run", spec, "--set", "script={}", "--format", "json")
    assert r.exit_code == 2 and "FLOWDSL_RUNS_DIR is set but empty" in json.loads(r.stdout)["error"]["message"]
    assert not (tmp_path / ".flowdsl").exists()  # not quietly the default directory
    assert cli("show", "r1").exit_code == 2 and "FLOWDSL_RUNS_DIR is set but empty" in cli("show", "r1").output
    assert cli("run", spec, "--set", "script={}", "--no-record").exit_code == 0
    assert cli("run", spec, "--set", "script={}", "--runs-dir", "runs", "--run-id", "r1").exit_code == 0
    assert cli("show", "r1", "--runs-dir", "runs").exit_code == 0


def test_show_of_a_path_that_is_no_record_file_says_what_it_is(tmp_path: Path) -> None:
    shown = cli("show", str(tmp_path))
    assert shown.exit_code == 2 and f"{tmp_path} is a directory, not a run record" in shown.output
    (tmp_path / "notes.txt").write_text("x")
    shown = cli("show", str(tmp_path / "notes.txt"))
    assert shown.exit_code == 2 and "invalid run id" in shown.output


def test_no_record_with_runs_dir_is_refused(tmp_path: Path) -> None:
    r = cli("run", _spec(tmp_path), "--no-record", "--runs-dir", str(tmp_path / "runs"), "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    assert out["error"]["type"] == "UsageError" and "contradict each other" in out["error"]["message"]
    assert "--no-record writes no record" in r.stderr and not (tmp_path / "runs").exists()


# --- lines the replay does not explain -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda e: {"type": "mystery_event", "step": "a", "at": e["at"]},
            "a line of type 'mystery_event', which flowdsl does not write",
        ),
        (lambda e: {"type": "step_failed"}, "a line of type 'step_failed', which flowdsl does not write"),
        (lambda e: {}, "a record line needs a 'type' (a string), found none"),
        (lambda e: {"type": None, "at": "x"}, "a record line needs a 'type' (a string), found null"),
        (
            lambda e: {**e, "type": "step_failed"},
            "the event 'step_failed' (step 'a', 'seq' 2) is not what replaying "
            "the run emits there ('step_scheduled', step 'a')",
        ),
        (lambda e: e, "the event 'step_scheduled' with 'seq' 2 is recorded twice"),
        (
            lambda e: {**e, "seq": 99},
            "the event 'step_scheduled' has 'seq' 99, at which replaying the run emits nothing",
        ),
        (lambda e: {**e, "type": "record"}, "a second header line (type 'record')"),
    ],
)
def test_a_line_show_does_not_understand_is_an_error_naming_it(tmp_path: Path, make: Any, message: str) -> None:
    path, lines = _record(tmp_path)
    at = _line_of(lines, "step_scheduled")  # a's: seq 2
    path.write_bytes(
        b"".join(lines[: at + 1]) + json.dumps(make(json.loads(lines[at]))).encode() + b"\n" + b"".join(lines[at + 1 :])
    )
    for fmt in ("text", "json"):
        shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", fmt)
        assert shown.exit_code == 2, shown.output
        assert f"{path}:{at + 2}: {message}" in shown.stderr, shown.stderr
        assert "None" not in shown.stderr
    with pytest.raises(RecordError):
        header, events = read_record(path)
        result_from_record(header, events, path)


def test_a_record_as_written_passes_the_check(tmp_path: Path) -> None:
    path, _ = _record(tmp_path)
    header, events = read_record(path)
    assert result_from_record(header, events, path).status == "completed"
    assert result_from_record(header, list(events)).status == "completed"  # a plain list: no line numbers needed
    path.unlink()
    assert _aborted(tmp_path) and cli("show", "r1", "--runs-dir", str(tmp_path)).exit_code == 0


# --- the JSON context of a run that has not ended --------------------------------------------------------------


def test_show_json_of_an_unfinished_run_gives_a_null_context(tmp_path: Path) -> None:
    path, lines = _record(tmp_path)
    shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", "json")
    assert json.loads(shown.stdout)["context"] == {"script": SCRIPT, **SCRIPT["a"]["result"]}  # the final one
    path.write_bytes(b"".join(lines[: _line_of(lines, "task_succeeded") + 2]))
    shown = cli("show", "r1", "--runs-dir", str(tmp_path), "--format", "json")
    out = json.loads(shown.stdout)
    assert (out["status"], out["context"]) == ("running", None)
    path.write_bytes(lines[0])
    out = json.loads(cli("show", "r1", "--runs-dir", str(tmp_path), "--format", "json").stdout)
    assert (out["status"], out["context"]) == ("not_started", None)


# --- a record that cannot be created or begun ------------------------------------------------------------------


def test_a_record_file_that_cannot_be_created_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root, os.access calls /sys/kernel writable, and creating a file there fails: refused, exit 2."""
    runs = tmp_path / "runs"
    real_create = record_module._create

    def refuse(path: Path) -> Any:
        if path.parent == runs:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_create(path)

    monkeypatch.setattr(record_module, "_create", refuse)
    for fmt in ("text", "json"):
        r = cli("run", _spec(tmp_path), "--runs-dir", str(runs), "--run-id", f"c{fmt}", "--format", fmt)
        assert r.exit_code == 2, r.output
        said = f"cannot create the run record {runs / f'c{fmt}.jsonl'}: Permission denied; the run did not start"
        assert f"error: {said}" in r.stderr and "Errno" not in r.stderr and "the run stopped" not in r.stderr
        if fmt == "json":
            assert json.loads(r.stdout) == {
                "status": "error",
                "run_id": "cjson",
                "error": {"type": "RecordUnwritable", "message": said},
            }


def test_a_record_whose_first_lines_cannot_be_written_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_module.RunRecorder, "flush", full)
    r = cli("run", _spec(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--run-id", "full1", "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    assert out["error"]["type"] == "RecordUnwritable" and out["error"]["message"] == (
        f"cannot write the run record {tmp_path / 'runs' / 'full1.jsonl'}: No space left on device; the run did not "
        "start"
    )
    assert not (tmp_path / "runs" / "full1.jsonl").exists()


# --- a key twice in one input object ---------------------------------------------------------------------------


def test_a_key_twice_in_the_input_is_refused_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "in.json"
    data.write_text('{"script": {},\n  "order": {"id": 1, "lines": [{"sku": "a", "qty": 1, "sku": "b"}]}}')
    r = cli("run", _spec(tmp_path), "--no-record", "--input", str(data), "--format", "json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    assert out["error"]["type"] == "InputInvalid"
    assert out["error"]["message"].startswith(f'{data}:2:55: the key "sku" appears twice in one object')
    r = cli("run", _spec(tmp_path), "--no-record", "--input", "-", stdin='{"script": {}, "\\u0073cript": {"a": 1}}')
    assert r.exit_code == 2 and 'stdin:1:16: the key "script" appears twice' in r.stderr, r.output
    r = cli("run", _spec(tmp_path), "--no-record", "--set", 'order={"id": 1, "id": 2}')
    assert r.exit_code == 2 and '--set order (at character 11 of the value): the key "id" appears twice' in r.stderr
    data.write_text('{"script": {"a": {"result": {"a": 1}}, "b": {"a": {"a": "a"}}}}')  # one key per object
    assert cli("run", _spec(tmp_path), "--no-record", "--input", str(data)).exit_code == 0


# --- lines that cannot be read at all --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "not a JSON line: it nests too deeply to read"),
        (b'{"type": "x", "n": ' + b"9" * 5000 + b"}", "not a JSON line: "),
    ],
)
def test_a_line_json_cannot_read_is_an_error_not_a_traceback(tmp_path: Path, line: bytes, message: str) -> None:
    path, lines = _record(tmp_path)
    path.write_bytes(lines[0] + line + b"\n" + b"".join(lines[1:]))
    shown = cli("show", "r1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 2 and f"{path}:2: {message}" in shown.stderr, shown.output
    assert shown.exception is None or isinstance(shown.exception, SystemExit)


# --- key order: a record keeps the order of the input's keys, which expressions can see ----------------------


def test_a_record_keeps_key_order_so_show_replays_what_ran(tmp_path: Path) -> None:
    """`$keys()` sees the input's key order; a record that sorted keys would replay a `when` differently."""
    spec = _spec(tmp_path, "steps:\n  - conf.a:\n      when: \"${ $keys(order)[0] = 'z' }\"\n  - conf.b\n", "order")
    run_input = json.dumps({"script": {}, "order": {"z": 1, "a": 2}})
    ran = cli("run", spec, "--input", "-", "--runs-dir", str(tmp_path), "--run-id", "k1", "--format", "json",
              stdin=run_input)
    assert ran.exit_code == 0, ran.output
    live = json.loads(ran.stdout)
    assert live["steps"]["a"]["status"] == "succeeded"
    assert list(live["context"]["order"]) == ["z", "a"]
    shown = cli("show", "k1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0, shown.output
    replayed = json.loads(shown.stdout)
    assert replayed["steps"]["a"]["status"] == "succeeded"
    assert list(replayed["context"]["order"]) == ["z", "a"]
    assert replayed["status"] == live["status"] and replayed["steps"] == live["steps"]


# --- a record changed by hand: every line as the replay emits it, none left out, one run -----------------------


def _edited(tmp_path: Path, edit: Any) -> tuple[Path, Any]:
    """The completed run's record with ``edit(lines)`` applied (a list of parsed lines, the header first)."""
    path, raw = _record(tmp_path)
    lines = [json.loads(line) for line in raw]
    edit(lines)
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    return path, cli("show", "r1", "--runs-dir", str(tmp_path), "--format", "json")


def _set_at(lines: list[dict[str, Any]], value: Any) -> None:
    next(e for e in lines if e["type"] == "step_succeeded")["at"] = value


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lines: _set_at(lines, 10**30), "the event 'step_succeeded' ('seq' 3) is not what replaying the run "
                                           "emits there: its 'at' differ"),
    (lambda lines: _set_at(lines, -5), "its 'at' differ"),
    (lambda lines: next(e for e in lines if e["type"] == "step_succeeded").update(error="x"), "its 'error' differ"),
    (lambda lines: lines.remove(next(e for e in lines if e["type"] == "step_started")),
     "the event 'step_started' ('seq' 1) that replaying the run emits is missing, though later ones are there"),
    (lambda lines: lines[0].update(run_id="other"), "the record's header is of run 'other' but its 'start' event of "
                                                    "run 'r1'"),
    (lambda lines: lines[1].update(seed="7"), "the seed must be an integer or None; got '7'"),
])
def test_a_record_changed_by_hand_is_refused_saying_what_differs(tmp_path: Path, edit: Any, message: str) -> None:
    _, shown = _edited(tmp_path, edit)
    assert shown.exit_code == 2, shown.output
    assert message in shown.stderr, shown.stderr
    assert "Traceback" not in shown.output


def test_a_record_whose_end_events_were_not_all_written_says_so_not_that_the_run_went_on(tmp_path: Path) -> None:
    """Its input events give the run's end; the events of that end were cut off (a process stopped while writing):
    the note says so rather than "the record ends before the run did … state when it ended: completed"."""
    _, shown = _edited(tmp_path, lambda lines: lines.pop())  # run_finished, the last line
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["status"] == "completed"
    assert "the record ends before the events of the run's end were all written" in shown.stderr
    assert "before the run did" not in shown.stderr


def test_a_late_completion_says_whether_it_is_undone_or_left_by_hand() -> None:
    event = {"type": "late_completion", "step": "charge", "attempt": 1, "compensation": "refund",
             "run_status": "aborting"}
    old = late_completion_line(event, with_run_status=True)  # a run of kernel version 3 or older: no by_hand
    assert "run aborting" in old and "refund left to run by hand" in old
    assert late_completion_line({**event, "by_hand": True}) == late_completion_line(event)
    joined = late_completion_line({**event, "by_hand": False})
    assert "undone with the rest by refund" in joined and "by hand" not in joined


def test_the_show_hint_for_a_record_whose_name_starts_with_a_dash_is_not_an_option() -> None:
    """`flowdsl show -x.jsonl` is refused as an unknown option: the hint names it ./-x.jsonl."""
    from flowdsl.runtime.summary import show_command

    assert show_command(Path("-x.jsonl")) == "flowdsl show ./-x.jsonl"
    assert show_command(Path("/tmp/-x.jsonl")) == "flowdsl show /tmp/-x.jsonl"


def test_the_timeline_does_not_call_a_rejected_result_ignored_before_its_late_completion() -> None:
    """`show` said a late success was "ignored", then that it was undone (a late completion)."""
    from flowdsl.runtime.timeline import _timeline_text

    line = _timeline_text({"type": "result_rejected", "result_type": "task_succeeded", "task_id": "r/charge#1",
                           "reason": "stale or unknown task"})
    assert line is not None and "ignored" not in line
    assert "late task_succeeded for r/charge#1: not an answer the run waits for (stale or unknown task)" in line


def test_a_record_whose_messages_another_version_worded_differently_is_shown(tmp_path: Path) -> None:
    """Prose — an error's message, a reason — may be worded otherwise by another version (a runtime expression
    error names its option now) without any decision differing: such a record is read (its result in this version's
    words); a decision edited by hand is still refused."""
    plan = compile_text(HEADER.format(name="rec") + "steps:\n  - conf.a: {with: {s: '${ $substring(amount, 1) }'}}\n")
    result = asyncio.run(run_flow(plan, {"amount": 5}, run_id="r2", runs_dir=tmp_path))
    assert result.status == "failed" and "in 'with.s'" in result.error["message"]
    path = tmp_path / "r2.jsonl"
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    old = "context value is not a compatible type with argument 5 of Object 1"
    for line in lines:
        if isinstance(line.get("error"), dict) and line["error"].get("type") == "ExpressionError":
            line["error"]["message"] = old
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    shown = cli("show", "r2", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0, shown.output
    out = json.loads(shown.stdout)
    assert out["status"] == "failed" and out["error"]["type"] == "ExpressionError", out
    assert out["error"]["message"].startswith("in 'with.s': ")
    for line in lines:  # the error's type is a decision: changing it is still refused
        if isinstance(line.get("error"), dict):
            line["error"]["type"] = "StepTimeout"
    path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    refused = cli("show", "r2", "--runs-dir", str(tmp_path), "--format", "json")
    assert refused.exit_code == 2 and "its 'error' differ" in refused.stderr, refused.output


def test_a_record_check_leaves_out_prose_only() -> None:
    from flowdsl.runtime.rebuild import _decisions

    failed = {"type": "step_failed", "seq": 2, "error": {"type": "ExpressionError", "message": "old words"}}
    assert _decisions(failed) == {"type": "step_failed", "seq": 2, "error": {"type": "ExpressionError"}}
    late = {"type": "late_completion", "step": "a", "reason": "old words", "by_hand": True}
    assert _decisions(late) == {"type": "late_completion", "step": "a", "by_hand": True}
    skipped = {"type": "step_skipped", "step": "a", "reason": "when"}  # which way the kernel went: compared
    assert _decisions(skipped) == skipped
