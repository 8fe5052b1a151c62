"""`flowdsl runs --backend local`: the local runtime's run records listed as the Redis runs are — newest first by
the run's start, the same filters and JSON object — with records that end early shown as `show` shows them,
files that are not records skipped with a warning, and a directory of thousands read by its newest records'
ends only."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime import listing
from flowdsl.runtime import record as record_module
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.redis.client import RunInfo
from tests.runtime.conformance import HEADER

SAGA = ("steps:\n"
        "  - conf.a: {compensate: undo.a}\n"
        "  - conf.b:\n"
        "      compensate: {worker: undo.b, retry: {attempts: 2, initial: 10ms}}\n"
        "  - conf.c: {compensate: undo.c}\n"
        "  - conf.d\n")
#: d fails, c is undone, b's undo fails for good: a and b are left to undo by hand
NEEDS_HAND = {"d": {"raise": "Boom"}, "b/compensate": {"raise": "UndoDown"}}
T0 = 1_700_000_000_000  # a start time in ms (2023-11-14)


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def _run(runs: Path, run_id: str, script: dict[str, Any] | None = None, name: str = "saga",
         steps: str = SAGA) -> Path:
    plan = compile_text(HEADER.format(name=name) + steps)
    asyncio.run(run_flow(plan, {"script": script or {}}, run_id=run_id, runs_dir=runs))
    return runs / f"{run_id}.jsonl"


def _stamp(path: Path, started_ms: int, modified_ms: int | None = None) -> None:
    """Say in the record's header that its run was taken at ``started_ms``; its file modified at ``modified_ms``
    (default: a second after)."""
    lines = path.read_bytes().split(b"\n", 1)
    header = json.loads(lines[0])
    header["started_at"] = started_ms
    path.write_bytes(json.dumps(header, separators=(",", ":")).encode() + b"\n" + lines[1])
    when = (modified_ms if modified_ms is not None else started_ms + 1000) * 1_000_000
    os.utime(path, ns=(when, when))


def _listed(runs: Path, *args: str) -> list[dict[str, Any]]:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json", *args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert isinstance(out, list)
    return out


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Four runs of two flows: ok1 (completed), comp1 (compensated), hand1 (needs_intervention), other1 (flow
    'other', completed), started in the order other1, hand1, ok1, comp1 — neither their names' order nor the
    order their files were last written in."""
    d = tmp_path / "runs"
    for run_id, script, started, modified in (("ok1", {}, 3, 10), ("comp1", {"d": {"raise": "Boom"}}, 4, 5),
                                              ("hand1", NEEDS_HAND, 2, 11)):
        _stamp(_run(d, run_id, script), T0 + started * 60_000, T0 + modified * 60_000)
    _stamp(_run(d, "other1", name="other", steps="steps: [conf.a]\n"), T0 + 1 * 60_000, T0 + 12 * 60_000)
    return d


# --- order, filters, shape -------------------------------------------------------------------------------------


def test_runs_are_listed_newest_first_by_their_start(runs: Path) -> None:
    out = _listed(runs)
    assert [r["run_id"] for r in out] == ["comp1", "ok1", "hand1", "other1"]  # (by modification: other1 first)
    assert [r["submitted_at"] for r in out] == [T0 + m * 60_000 for m in (4, 3, 2, 1)]
    assert {r["run_id"]: r["status"] for r in out} == {"comp1": "compensated", "ok1": "completed",
                                                     "hand1": "needs_intervention", "other1": "completed"}
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["run", "flow", "status", "submitted", "took"]
    assert [line.split()[0] for line in lines[1:]] == ["comp1", "ok1", "hand1", "other1"]
    assert lines[3].split()[:3] == ["hand1", "saga", "needs_intervention"]


def test_each_filter_and_the_limit(runs: Path) -> None:
    assert [r["run_id"] for r in _listed(runs, "--status", "NEEDS_Intervention")] == ["hand1"]
    assert [r["run_id"] for r in _listed(runs, "--status", "completed")] == ["ok1", "other1"]
    assert [r["run_id"] for r in _listed(runs, "--flow", "other")] == ["other1"]
    assert [r["run_id"] for r in _listed(runs, "--flow", "saga", "--status", "completed")] == ["ok1"]
    assert [r["run_id"] for r in _listed(runs, "-n", "2")] == ["comp1", "ok1"]
    assert [r["run_id"] for r in _listed(runs, "--limit", "1", "--flow", "saga")] == ["comp1"]
    none = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--status", "failed", "--flow", "saga")
    assert none.exit_code == 0 and f"no runs with status 'failed' and flow 'saga' recorded in {runs}" in \
        " ".join(none.stdout.split())


def test_the_json_object_has_the_keys_of_a_redis_run_and_the_records_times(runs: Path) -> None:
    redis_keys = list(RunInfo("r", "f", "completed", 1, 2, 3).to_json())
    out = _listed(runs)
    for item in out:
        assert list(item) == redis_keys
    shown = json.loads(cli("show", "hand1", "--runs-dir", str(runs), "--format", "json").stdout)
    hand = next(r for r in out if r["run_id"] == "hand1")
    assert (hand["flow"], hand["status"], hand["started_at"], hand["finished_at"]) == (
        "saga", shown["status"], shown["started_at"], shown["finished_at"])
    assert isinstance(hand["finished_at"], int) and hand["finished_at"] >= hand["started_at"]


def test_a_needs_intervention_run_is_found_and_shown_with_what_is_left_to_undo(runs: Path) -> None:
    found = _listed(runs, "--status", "needs_intervention")
    assert [r["run_id"] for r in found] == ["hand1"]
    shown = json.loads(cli("show", found[0]["run_id"], "--runs-dir", str(runs), "--format", "json").stdout)
    left = shown["intervention"]["steps"]
    assert [(s["step"], s["worker"], s["status"]) for s in left] == [("b", "undo.b", "failed"),
                                                                      ("a", "undo.a", "not_attempted")]
    assert left[0]["idempotency_key"] == "hand1/b/compensate" and left[0]["step_idempotency_key"] == "hand1/b"
    assert left[0]["last_error"]["type"] == "UndoDown" and left[0]["attempts"] == 2


def test_status_must_be_a_state_of_a_local_run(runs: Path) -> None:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--status", "submitted", "--format", "json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["status"] == "error" and "'submitted' is not a state of a local run" in out["error"]["message"]
    assert "aborted" in out["error"]["message"] and "not_started" in out["error"]["message"]


# --- records that end before their run did: as `show` says ------------------------------------------------------


def test_an_aborted_a_cut_and_a_header_only_record_are_listed_as_show_shows_them(tmp_path: Path) -> None:
    d = tmp_path / "runs"
    plan = compile_text(HEADER.format(name="saga") + SAGA)

    async def aborted() -> None:  # a deadline on the awaiting task stops the run at once: runtime_aborted
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(run_flow(plan, {"script": {"d": {"hang": True}}}, run_id="ab1", runs_dir=d), 0.3)

    asyncio.run(aborted())
    lines = _run(d, "whole", NEEDS_HAND).read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["process"]  # a record of an earlier flowdsl, which did not name its process: it cannot be told
    lines[0] = json.dumps(header).encode() + b"\n"
    (d / "cut1.jsonl").write_bytes(b"".join(lines[:6]) + lines[6][:25])  # killed mid-run, mid-line
    (d / "hdr1.jsonl").write_bytes(lines[0])
    (d / "whole.jsonl").unlink()
    out = {r["run_id"]: r for r in _listed(d)}
    for run_id in ("ab1", "cut1", "hdr1"):
        shown = json.loads(cli("show", run_id, "--runs-dir", str(d), "--format", "json").stdout)
        assert out[run_id]["status"] == shown["status"], run_id
        assert out[run_id]["finished_at"] is None and shown["finished_at"] is None
    assert (out["ab1"]["status"], out["cut1"]["status"], out["hdr1"]["status"]) == ("aborted", "running",
                                                                                      "not_started")
    assert out["hdr1"]["started_at"] is None and isinstance(out["hdr1"]["submitted_at"], int)
    assert [r["run_id"] for r in _listed(d, "--status", "aborted")] == ["ab1"]
    text = cli("runs", "--backend", "local", "--runs-dir", str(d))
    assert text.exit_code == 0
    said = " ".join(text.stderr.split())
    assert "note: 1 record(s) end before their run did (cut1): the process stopped, or the run still goes" in said


def test_a_run_made_needs_intervention_again_after_its_end_is_listed_by_its_last_end(tmp_path: Path) -> None:
    """A late completion emits `run_finished` again: the last one is the run's end (docs/kernel.md)."""
    path = _run(tmp_path, "late1", {"d": {"raise": "Boom"}})
    lines = path.read_bytes().splitlines(keepends=True)
    end = json.loads(lines[-1])
    assert end["type"] == "run_finished" and end["status"] == "compensated"
    again = {**end, "seq": end["seq"] + 1, "at": end["at"] + 5, "status": "needs_intervention",
             "previous_status": "compensated"}
    path.write_bytes(b"".join(lines) + json.dumps(again).encode() + b"\n")
    assert [(r["status"], r["finished_at"]) for r in _listed(tmp_path)] == [("needs_intervention", end["at"] + 5)]


# --- files that are not records; the directory -----------------------------------------------------------------


def test_files_that_are_not_records_are_skipped_with_one_warning_each(runs: Path) -> None:
    (runs / "notes.txt").write_text("not a record\n")
    (runs / "empty.jsonl").write_bytes(b"")
    (runs / "plain.jsonl").write_text("hello\n")
    (runs / "other.jsonl").write_text('{"type": "start", "at": 1}\n')
    (runs / "dir.jsonl").mkdir()
    (runs / "archive").mkdir()  # a directory: not looked into, nothing said
    (runs / ".hidden").write_text("x")  # a hidden file: nothing said
    good = (runs / "ok1.jsonl").read_bytes().splitlines(keepends=True)
    (runs / "badbytes.jsonl").write_bytes(b"".join(good[:-1]) + good[-1][:30] + b"\xff" + good[-1][31:])  # its end
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json")
    assert r.exit_code == 0, r.output
    assert [x["run_id"] for x in json.loads(r.stdout)] == ["comp1", "ok1", "hand1", "other1"]
    warnings = r.stderr.strip().splitlines()
    assert all(w.startswith("warning: ") and w.endswith("; skipped") for w in warnings), warnings
    assert "Traceback" not in r.stderr
    named = sorted(next(n for n in ("notes.txt", "empty", "plain", "other", "dir", "badbytes") if n in w)
                   for w in warnings)
    assert named == ["badbytes", "dir", "empty", "notes.txt", "other", "plain"], warnings
    said = " ".join(r.stderr.split())
    assert "empty.jsonl is empty, not a run record" in said
    assert "plain.jsonl:1: not a run record: its first line is not JSON" in said
    assert "dir.jsonl is a directory, not a run record" in said
    assert "badbytes.jsonl:" in said and "not valid UTF-8 (byte 0xff" in said  # named as show names it
    text = cli("runs", "--backend", "local", "--runs-dir", str(runs))  # the warnings go to stderr, the table not
    assert text.exit_code == 0 and "warning" not in text.stdout and len(text.stderr.strip().splitlines()) == 6


def test_a_missing_directory_holds_no_runs_and_a_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    r = cli("runs", "--backend", "local", "--runs-dir", str(missing))
    assert r.exit_code == 0 and f"no runs: {missing} does not exist" in " ".join(r.stdout.split())
    assert _listed(missing) == []
    (tmp_path / "f").write_text("x")
    r = cli("runs", "--backend", "local", "--runs-dir", str(tmp_path / "f"), "--format", "json")
    assert r.exit_code == 2 and "is not a directory" in json.loads(r.stdout)["error"]["message"]


def test_the_records_directory_comes_from_the_environment_as_for_run_and_show(runs: Path) -> None:
    r = cli("runs", "--backend", "local", "--format", "json", env={"FLOWDSL_RUNS_DIR": str(runs)})
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 4
    r = cli("runs", "--backend", "local", env={"FLOWDSL_RUNS_DIR": ""})
    assert r.exit_code == 2 and "FLOWDSL_RUNS_DIR is set but empty" in r.stderr


def test_options_of_the_other_backend_are_refused(runs: Path) -> None:
    r = cli("runs", "--runs-dir", str(runs))  # redis is the default of `runs`: say what to add
    assert r.exit_code == 2 and "add --backend local" in " ".join(r.stderr.split())
    r = cli("runs", "--backend", "local", "--redis-url", "redis://x", "--format", "json")
    assert r.exit_code == 2 and "need --backend redis" in json.loads(r.stdout)["error"]["message"]


def test_redis_unreachable_at_its_default_names_the_local_listing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`flowdsl runs` lists Redis runs; a user of the local runtime typing it met only `cannot reach Redis`."""
    from flowdsl.runtime.redis import connection

    monkeypatch.setattr(connection, "DEFAULT_URL", f"unix://{tmp_path}/none.sock")  # (never the shared 6379)
    monkeypatch.delenv("FLOWDSL_REDIS_URL", raising=False)
    r = cli("runs")
    assert r.exit_code == 2 and "cannot reach Redis" in r.stderr
    assert "`flowdsl runs --backend local`" in r.stderr
    r = cli("runs", "--redis-url", f"unix://{tmp_path}/none.sock")  # a server named: no such note
    assert r.exit_code == 2 and "cannot reach Redis" in r.stderr and "--backend local" not in r.stderr


# --- thousands of records: read by their ends, the newest only ---------------------------------------------------


class _Counting:
    """A file opened by the listing: how many bytes were read from it."""

    def __init__(self, fh: Any, tally: dict[str, int], name: str):
        self.fh, self.tally, self.name = fh, tally, name

    def read(self, *args: Any) -> bytes:
        data: bytes = self.fh.read(*args)
        self.tally[self.name] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read by the listing, per file name; a whole replay of a record fails the test."""
    tally: dict[str, int] = {}

    def counting_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        name = Path(path).name
        tally.setdefault(name, 0)
        return _Counting(open(path, mode, *args, **kwargs), tally, name)

    def no_replay(path: Any) -> Any:
        raise AssertionError(f"{path} was read whole")

    monkeypatch.setattr(listing, "open", counting_open, raising=False)
    monkeypatch.setattr(record_module, "read_record", no_replay)
    return tally


def test_two_thousand_records_list_the_newest_twenty_reading_about_twenty(tmp_path: Path,
                                                                          reads: dict[str, int]) -> None:
    d = tmp_path / "runs"
    template = _run(d, "T0000", {"d": {"raise": "Boom"}}).read_bytes()
    (d / "T0000.jsonl").unlink()
    order = list(range(2000))
    order = order[::2] + order[1::2]  # written out of order; each file's time says when its run started
    for i in order:
        path = d / f"T{i:04d}.jsonl"
        path.write_bytes(template.replace(b"T0000", f"T{i:04d}".encode()))
        _stamp(path, T0 + i * 1000, T0 + i * 1000 + 300)
    out = _listed(d, "-n", "20")
    assert [r["run_id"] for r in out] == [f"T{i:04d}" for i in range(1999, 1979, -1)]
    assert all(r["status"] == "compensated" for r in out)
    assert 20 <= len(reads) <= 25, sorted(reads)  # the newest files, and those within the clock slack
    size = len(template)
    assert all(n <= size + 16 for n in reads.values())
    reads.clear()
    assert [r["run_id"] for r in _listed(d, "--status", "compensated", "-n", "3")] == ["T1999", "T1998", "T1997"]
    assert len(reads) <= 8


def test_a_long_record_is_read_by_its_first_lines_and_its_end(tmp_path: Path, reads: dict[str, int]) -> None:
    steps = "steps:\n  - for_each: fe\n    items: '${ items }'\n    concurrency: 100\n    steps: [conf.e]\n"
    plan = compile_text(HEADER.format(name="long") + steps)
    asyncio.run(run_flow(plan, {"items": list(range(2000)), "script": {}}, run_id="long1", runs_dir=tmp_path))
    size = (tmp_path / "long1.jsonl").stat().st_size
    assert size > 1_000_000
    out = _listed(tmp_path)
    assert [(r["run_id"], r["flow"], r["status"]) for r in out] == [("long1", "long", "completed")]
    assert reads["long1.jsonl"] < 200_000, reads  # the header, the start line, the last 64 KiB
