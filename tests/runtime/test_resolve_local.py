"""`flowdsl resolve` of local runs: a run that needs a person (needs_intervention, in doubt, crashed, stopped at
once) gets a `resolved` line once its work by hand is done; `runs` lists it resolved (and no longer under
needs_intervention), `show` prints the resolution; a run that needs nothing, or still runs, is refused."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowdsl import compile_text
from flowdsl.cli import app
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.record import RecordError, read_record
from tests.runtime.conformance import HEADER
from tests.runtime.test_runs_local import NEEDS_HAND, SAGA
from tests.runtime.test_stopped_runs import _dead_process, _rewrite_header


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _run(runs: Path, run_id: str, script: dict[str, Any] | None = None) -> Path:
    plan = compile_text(HEADER.format(name="saga") + SAGA)
    asyncio.run(run_flow(plan, {"script": script or {}}, run_id=run_id, runs_dir=runs))
    return runs / f"{run_id}.jsonl"


def _listed(runs: Path, *args: str) -> dict[str, str]:
    r = cli("runs", "--backend", "local", "--runs-dir", str(runs), "--format", "json", *args)
    assert r.exit_code == 0, r.output
    return {row["run_id"]: row["status"] for row in json.loads(r.stdout)}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    _run(d, "hand1", NEEDS_HAND)
    _run(d, "hand2", NEEDS_HAND)
    _run(d, "ok1")
    _run(d, "comp1", {"d": {"raise": "Boom"}})
    return d


def test_a_needs_intervention_run_resolved_leaves_the_list_of_runs_to_handle(runs: Path) -> None:
    assert set(_listed(runs, "--status", "needs_intervention")) == {"hand1", "hand2"}
    done = cli("resolve", "hand1", "--runs-dir", str(runs), "--note", "refunded b and a by hand")
    assert done.exit_code == 0, done.output
    said = " ".join(done.stdout.split())
    assert "run hand1: resolved" in said and "(it was needs_intervention): refunded b and a by hand" in said
    assert f"@{socket.gethostname()}" in said
    assert set(_listed(runs, "--status", "needs_intervention")) == {"hand2"}  # the ones left to handle
    assert list(_listed(runs, "--status", "resolved")) == ["hand1"]
    assert _listed(runs)["hand1"] == "resolved"

    _, lines = read_record(runs / "hand1.jsonl")
    [line] = lines.resolutions
    assert (line["run_id"], line["note"], line["status"]) == ("hand1", "refunded b and a by hand",
                                                              "needs_intervention")
    assert line["by"].endswith(f"@{socket.gethostname()}") and isinstance(line["at"], int)

    shown = cli("show", "hand1", "--runs-dir", str(runs), "--format", "json")
    out = json.loads(shown.stdout)
    assert out["status"] == "needs_intervention"  # (the run's own end: the resolution is beside it)
    assert out["resolved"] == {"at": line["at"], "by": line["by"], "note": "refunded b and a by hand",
                               "status": "needs_intervention"}
    text = " ".join(cli("show", "hand1", "--runs-dir", str(runs)).stdout.split())
    assert "resolved" in text and "(it was needs_intervention): refunded b and a by hand" in text
    hint = " ".join(cli("show", "hand2", "--runs-dir", str(runs)).stdout.split())
    assert f"once it is finished by hand, `flowdsl resolve hand2 --runs-dir {runs} --note TEXT` says so" in hint


def test_the_json_object_of_resolve(runs: Path) -> None:
    done = cli("resolve", "hand2", "--runs-dir", str(runs), "--format", "json")
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert (out["run_id"], out["status"], out["resolved"]["note"], out["resolved"]["status"]) == (
        "hand2", "resolved", None, "needs_intervention")
    assert out["record"] == str(runs / "hand2.jsonl")
    again = cli("resolve", "hand2", "--runs-dir", str(runs), "--format", "json")
    assert again.exit_code == 1
    refused = json.loads(again.stdout)
    assert (refused["status"], refused["resolved"], refused["refused"]) == ("resolved", None, "AlreadyResolved")
    assert "was resolved already" in refused["reason"]


@pytest.mark.parametrize(("run_id", "status"), [("ok1", "completed"), ("comp1", "compensated")])
def test_a_run_that_needs_nothing_by_hand_is_refused(runs: Path, run_id: str, status: str) -> None:
    before = (runs / f"{run_id}.jsonl").read_bytes()
    r = cli("resolve", run_id, "--runs-dir", str(runs))
    assert r.exit_code == 1
    assert f"run {run_id} ended {status}, with nothing left to do by hand: there is nothing to resolve" in \
        " ".join(r.stderr.split())
    assert (runs / f"{run_id}.jsonl").read_bytes() == before


def test_usage_errors(runs: Path) -> None:
    missing = cli("resolve", "nope", "--runs-dir", str(runs))
    assert missing.exit_code == 2 and "no recorded run 'nope'" in missing.stderr
    assert "--backend redis" in missing.stderr
    mixed = cli("resolve", "hand1", "--backend", "redis", "--runs-dir", str(runs))
    assert mixed.exit_code == 2 and "--runs-dir and --force are for local run records" in mixed.stderr
    mixed = cli("resolve", "hand1", "--redis-url", "unix:///nowhere.sock", "--runs-dir", str(runs))
    assert mixed.exit_code == 2 and "--redis-url and --prefix need --backend redis" in mixed.stderr
    assert cli("resolve", "hand1", "--runs-dir", str(runs), "--note", "ok").exit_code == 0


def test_a_crashed_run_whose_last_line_was_cut_is_resolved_and_still_reads(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = _run(runs, "cr1")
    lines = path.read_bytes().splitlines(keepends=True)
    keep = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "step_succeeded") + 1
    path.write_bytes(b"".join(lines[:keep]) + lines[keep][:20])  # killed while writing a line
    _rewrite_header(path, process=_dead_process())
    assert _listed(runs)["cr1"] == "crashed"
    done = cli("resolve", "cr1", "--runs-dir", str(runs), "--note", "undid a")
    assert done.exit_code == 0, done.output
    assert "cut short when its process was killed" in " ".join(done.stderr.split())
    assert _listed(runs)["cr1"] == "resolved"
    _, events = read_record(path)
    assert not events.cut_short and events.resolutions[0]["status"] == "crashed"
    shown = cli("show", "cr1", "--runs-dir", str(runs), "--format", "json")
    assert shown.exit_code == 0, shown.output
    out = json.loads(shown.stdout)
    assert out["status"] == "crashed" and out["resolved"]["note"] == "undid a"


def test_an_aborted_run_is_resolved(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    plan = compile_text(HEADER.format(name="saga") + SAGA)

    async def aborted() -> None:  # a deadline on the awaiting task stops the run at once: runtime_aborted
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(run_flow(plan, {"script": {"d": {"hang": True}}}, run_id="ab1", runs_dir=runs), 0.3)

    asyncio.run(aborted())
    assert _listed(runs)["ab1"] == "aborted"
    done = cli("resolve", "ab1", "--runs-dir", str(runs), "--format", "json")
    assert done.exit_code == 0 and json.loads(done.stdout)["resolved"]["status"] == "aborted"
    assert _listed(runs, "--status", "aborted") == {}


# --- hardening: what is quoted, what else writes to the record -------------------------------------------------


def test_a_refusal_quotes_the_note_and_who_inert_on_one_line(runs: Path) -> None:
    note = "undid it\nresolved: nothing to see \x1b[2J\u202eevil"
    assert cli("resolve", "hand1", "--runs-dir", str(runs), "--note", note).exit_code == 0
    again = cli("resolve", "hand1", "--runs-dir", str(runs))
    assert again.exit_code == 1
    said = again.stderr.strip()
    assert "\n" not in said and "\x1b" not in said and "\u202e" not in said
    assert "undid it\\nresolved: nothing to see \\u001b[2J\\u202eevil" in said


def test_a_record_written_to_while_resolve_reads_it_is_not_resolved(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.runtime import record as recording
    from flowdsl.runtime import resolve as resolving

    runs = tmp_path / "runs"
    path = _run(runs, "grow1", NEEDS_HAND)
    real = recording.read_record

    def read_then_grow(*args: Any) -> Any:
        read = real(*args)
        with open(path, "ab") as fh:  # (a process still writing it, for all resolve could tell)
            fh.write(b'{"type": "timer_fired", "run_id": "grow1", "at": 1}\n')
        return read

    monkeypatch.setattr(recording, "read_record", read_then_grow)
    before = path.read_bytes()
    with pytest.raises(resolving.NotResolvable, match="written to while resolve read it"):
        resolving.resolve_record(path, note=None)
    assert b'"resolved"' not in path.read_bytes()[len(before):]


def test_the_record_judged_is_the_file_written_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a record replaced by another one under its name while resolve opened it: the line goes to the file judged
    from flowdsl.runtime import record as recording
    from flowdsl.runtime import resolve as resolving

    runs = tmp_path / "runs"
    path = _run(runs, "swap1")  # completed: nothing to resolve
    other = _run(tmp_path / "elsewhere", "swap1", NEEDS_HAND)
    real = recording._flock

    def lock_then_swap(fd: int) -> None:
        real(fd)
        other.replace(path)

    monkeypatch.setattr(recording, "_flock", lock_then_swap)
    with pytest.raises(RecordError, match="removed or replaced while resolve waited for it"):
        resolving.resolve_record(path, note=None)
    _, events = read_record(path)
    assert events.resolutions == []


def test_a_record_removed_while_resolve_waited_for_its_lock_is_said_to_be(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdsl.runtime import record as recording

    runs = tmp_path / "runs"
    path = _run(runs, "gone2", NEEDS_HAND)
    real = recording._flock

    def lock_after_prune(fd: int) -> None:
        path.unlink()  # (flowdsl prune, holding the lock, removed it)
        real(fd)

    monkeypatch.setattr(recording, "_flock", lock_after_prune)
    done = cli("resolve", "gone2", "--runs-dir", str(runs))
    assert done.exit_code == 2 and "removed or replaced while resolve waited for it" in " ".join(done.stderr.split())


def test_a_record_that_cannot_be_written_is_still_judged(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from flowdsl.runtime import record as recording

    real = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied")
        return real(path, flags, *args)

    monkeypatch.setattr(recording.os, "open", read_only)
    nothing = cli("resolve", "ok1", "--runs-dir", str(runs))  # completed: the answer is that, not "cannot write"
    assert nothing.exit_code == 1 and "nothing to resolve" in nothing.stderr
    needs = cli("resolve", "hand1", "--runs-dir", str(runs))
    assert needs.exit_code == 2 and "cannot write the run record" in needs.stderr and "Permission denied" in \
        needs.stderr
    monkeypatch.undo()
    assert _listed(runs)["hand1"] == "needs_intervention"
