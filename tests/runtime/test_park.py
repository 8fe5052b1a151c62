"""Parking a local run that has nothing left but waiting (``park=True``): when it parks and when it does not, the
``runtime_parked`` line and the result, and going on with it (``resume_flow``: signals, timers due meanwhile, a
cancel, parking again).

The CLI (``--park``, exit code 5) and the readers (``runs``, ``show``, ``prune``, ``resolve``) are tested in
tests/test_cli_park.py and tests/runtime/test_park_records.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.runtime.local import LocalRun, run_flow
from flowdsl.runtime.parking import PARKED
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import RecordError, read_record
from flowdsl.runtime.report import PARKED_EXIT
from flowdsl.runtime.resume import resume_flow
from flowdsl.runtime.stopped import settle
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), the wait for signal 'paid' (up to 1h, its payload stored as `confirmation`), then b
PAID = ("steps:\n  - conf.a: {compensate: undo.a}\n  - wait: paid\n    timeout: 1h\n    output: confirmation\n"
        "  - conf.b\n")


def plan(steps: str = PAID) -> dict[str, Any]:
    return compile_text(HEADER.format(name="pay") + steps)


def run(tmp_path: Path, steps: str = PAID, run_input: dict[str, Any] | None = None, **options: Any) -> Any:
    options.setdefault("park", True)
    return asyncio.run(run_flow(plan(steps), run_input or {}, run_id="r1", runs_dir=tmp_path, **options))


def resume(tmp_path: Path, **options: Any) -> Any:
    return asyncio.run(resume_flow("r1", runs_dir=tmp_path, **options))


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    return list(read_record(tmp_path / "r1.jsonl")[1])


def reread(tmp_path: Path) -> Any:
    header, read = read_record(tmp_path / "r1.jsonl")
    return result_from_record(header, read, tmp_path / "r1.jsonl")


def test_a_run_waiting_for_a_signal_is_parked_and_goes_on_when_resumed_with_it(tmp_path: Path) -> None:
    notices: list[str] = []
    result = run(tmp_path, on_notice=notices.append)
    assert result.status == "running" and result.exit_code == PARKED_EXIT == 5
    started = result.steps["paid"]["started_at"]
    assert result.parked == {"at": result.parked["at"], "waits": [{"wait": "paid", "signal": "paid",
                                                                    "due_at": started + 3_600_000}],
                             "due_at": started + 3_600_000}
    assert result.steps["a"]["status"] == "succeeded" and result.steps["b"]["status"] == "pending"
    said = result.to_json()
    assert (said["status"], said["stopped_in"], said["parked"], said["context"]) == \
        ("parked", "running", result.parked, None)
    last = lines(tmp_path)[-1]
    assert last["type"] == PARKED and last["waits"] == result.parked["waits"] and last["status"] == "running"
    assert len(notices) == 1 and notices[0].startswith("run r1 is parked: it waits for signal 'paid' (until ")
    assert f"`flowdsl resume r1 --runs-dir {tmp_path} --signal paid=JSON`" in notices[0]
    # the record, read back, says so; and its process (this one, still running) let it go: resumable at once
    again = reread(tmp_path)
    assert again.parked == result.parked and again.to_json()["status"] == "parked"
    header, read = read_record(tmp_path / "r1.jsonl")
    assert settle(header, read, again).stopped == "parked"

    ended = resume(tmp_path, signals={"paid": {"amount": 42}})
    assert ended.status == "completed" and ended.parked is None and ended.exit_code == 0
    assert ended.context == {"confirmation": {"amount": 42}}
    assert [r["was"] for r in ended.resumed] == ["parked"] and ended.resumed[0]["attempts"] == []
    assert reread(tmp_path).status == "completed" and reread(tmp_path).parked is None


def test_a_run_parks_only_once_no_attempt_runs(tmp_path: Path) -> None:
    steps = ("steps:\n  - parallel: both\n    branches:\n      - wait: paid\n      - sequence: slow\n"
             "        steps: [conf.a, conf.b]\n")
    result = run(tmp_path, steps, {"script": {"a": {"sleep": 0.2}, "b": {"sleep": 0.1}}})
    assert result.parked is not None
    assert (result.steps["a"]["status"], result.steps["b"]["status"]) == ("succeeded", "succeeded")
    assert result.parked["waits"] == [{"wait": "paid", "signal": "paid", "due_at": None}]
    assert result.parked["due_at"] is None  # no timer armed: only a signal goes on with it
    assert resume(tmp_path, signals=["paid"]).status == "completed"


def test_a_flow_without_waits_runs_to_its_end(tmp_path: Path) -> None:
    result = run(tmp_path, "steps: [conf.a, conf.b]\n")
    assert result.status == "completed" and result.parked is None and result.exit_code == 0
    assert PARKED not in {line["type"] for line in lines(tmp_path)}


def test_without_park_a_waiting_run_waits_in_its_process(tmp_path: Path) -> None:
    async def main() -> Any:
        local = LocalRun(plan(), {}, run_id="r1", runs_dir=tmp_path)
        task = asyncio.ensure_future(local.run())
        while "paid" not in (local.state.get("waits") or {}):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not task.done()
        await local.signal("paid")
        return await task

    assert asyncio.run(main()).status == "completed"


def test_park_needs_a_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="park=True needs record=True"):
        LocalRun(plan(), {}, record=False, park=True)
    with pytest.raises(TypeError, match="park must be a bool"):
        LocalRun(plan(), {}, runs_dir=tmp_path, park="yes")  # type: ignore[arg-type]


def test_a_timer_wait_parks_and_fires_when_resumed_after_it_fell_due(tmp_path: Path) -> None:
    steps = "steps:\n  - conf.a\n  - wait: cool\n    for: 150ms\n  - conf.b\n"
    result = run(tmp_path, steps)
    due = result.steps["cool"]["started_at"] + 150
    assert result.parked["waits"] == [{"wait": "cool", "signal": None, "due_at": due}]
    assert result.parked["due_at"] == due
    # resumed before it is due, with park: nothing to do but wait, so it parks again at once
    again = resume(tmp_path, park=True)
    assert again.parked is not None and again.parked["due_at"] == due and again.steps["b"]["status"] == "pending"
    assert [line["type"] for line in lines(tmp_path)][-3:] == [PARKED, "runtime_resumed", PARKED]
    assert reread(tmp_path).parked == again.parked
    time.sleep(max(0.0, (due - time.time() * 1000) / 1000) + 0.05)
    ended = resume(tmp_path)
    assert ended.status == "completed" and [r["was"] for r in ended.resumed] == ["parked", "parked"]
    fired = next(e for e in ended.events if e["type"] == "step_succeeded" and e["step"] == "cool")
    assert fired["at"] >= due


def test_a_retry_waiting_when_the_run_parks_is_armed_again_on_resume(tmp_path: Path) -> None:
    steps = ("steps:\n  - parallel: both\n    branches:\n      - wait: paid\n"
             "      - conf.a: {retry: {attempts: 2, backoff: constant, initial: 200ms, jitter: none}}\n")
    result = run(tmp_path, steps, {"script": {"a": [{"raise": "Flaky"}, {}]}})
    retry_due = result.parked["due_at"]
    assert result.steps["a"]["status"] == "retrying" and retry_due is not None
    assert result.parked["waits"] == [{"wait": "paid", "signal": "paid", "due_at": None}]
    time.sleep(max(0.0, (retry_due - time.time() * 1000) / 1000) + 0.05)
    ended = resume(tmp_path, signals=["paid"])
    assert ended.status == "completed" and ended.steps["a"]["attempts"] == 2


def test_a_parked_run_is_cancelled_as_it_is_resumed(tmp_path: Path) -> None:
    run(tmp_path)
    notices: list[str] = []
    ended = resume(tmp_path, cancel=True, on_notice=notices.append)
    assert ended.status == "cancelled" and ended.compensated == ["a"]
    assert not any("waits for signal" in n for n in notices), notices  # (its wait ends at once: not said)
    assert ended.steps["paid"]["status"] == "cancelled"
    assert [line.get("reason") for line in lines(tmp_path) if line["type"] == "cancel_requested"] == \
        ["cancelled as it was resumed"]


def test_a_signal_sent_to_a_parked_run_is_rejected_saying_how_to_go_on(tmp_path: Path) -> None:
    async def main() -> Any:
        local = LocalRun(plan(), {}, run_id="r1", runs_dir=tmp_path, park=True)
        result = await local.run()
        outcome = await local.signal("paid")
        return result, outcome

    result, outcome = asyncio.run(main())
    assert result.parked is not None and outcome.outcome == "rejected"
    assert outcome.reason.startswith(f"the run was parked already: `flowdsl resume r1 --runs-dir {tmp_path} --signal "
                                     "NAME=JSON`")


def test_a_parked_line_with_lines_after_it_is_refused(tmp_path: Path) -> None:
    run(tmp_path)
    path = tmp_path / "r1.jsonl"
    parked_at = lines(tmp_path)[-1]["at"]
    with path.open("ab") as fh:  # (an input event after the parked line, as if its process had gone on)
        fh.write(b'{"type":"signal","name":"paid","payload":{},"at":%d}\n' % (parked_at + 1))
    header, read = read_record(path)
    with pytest.raises(RecordError, match=r"'runtime_parked' line .* is the record's last line or followed by"):
        result_from_record(header, read, path)


def test_the_words_on_a_parked_run_give_each_way_on() -> None:
    from flowdsl.runtime.parking import parked_text

    timer = {"waits": [{"wait": "cool", "signal": None, "due_at": 0}], "due_at": 0}
    said = parked_text(timer, "flowdsl resume r1")
    assert said.startswith("waits for the end of wait 'cool' (") and said.endswith(
        ", when its next timer is due, `flowdsl resume r1`")
    assert "; go on from " in said
    both = {"waits": [{"wait": "paid", "signal": "paid", "due_at": None},
                      {"wait": "ok", "signal": "approved", "due_at": None}], "due_at": None}
    assert parked_text(both, "flowdsl resume r1") == (
        "waits for signal 'paid' (no deadline), and signal 'approved' (wait 'ok') (no deadline); go on with "
        "`flowdsl resume r1 --signal paid=JSON` or `flowdsl resume r1 --signal approved=JSON`")
    assert parked_text(both, None).endswith("(no deadline)")


def test_a_cancel_asked_from_another_thread_as_the_run_would_park_is_not_lost(tmp_path: Path) -> None:
    """The cancel is handed to the run's loop while the decision that starts the wait is carried out: the run does
    not park before it has arrived, and is cancelled."""
    import threading

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "step_started" and event["step"] == "paid":
            asker = threading.Thread(target=local.cancel, args=("asked elsewhere",))
            asker.start()
            asker.join()

    local = LocalRun(plan(), {}, run_id="r1", runs_dir=tmp_path, park=True, on_event=on_event)
    result = asyncio.run(local.run())
    assert result.parked is None and result.status == "cancelled" and result.compensated == ["a"]
    assert PARKED not in {line["type"] for line in lines(tmp_path)}


def test_a_record_that_cannot_be_written_as_the_run_would_park_keeps_the_run_waiting_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk found as the run would park: it is not parked (it could not go on from its record), says so, and
    says what it waits for, so that it can still be sent its signal."""
    import errno

    from flowdsl.runtime.record import RunRecorder

    full = False
    real = RunRecorder.flush

    def flush(self: RunRecorder) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    def on_event(event: dict[str, Any]) -> None:
        nonlocal full
        full = full or (event["type"] == "step_started" and event["step"] == "paid")

    notices: list[str] = []

    def on_notice(text: str) -> None:
        notices.append(text)
        if text.startswith("the run waits for signal 'paid'"):
            asyncio.get_running_loop().call_soon(local.signal, "paid", {"n": 1})

    monkeypatch.setattr(RunRecorder, "flush", flush)
    local = LocalRun(plan(), {}, run_id="r1", runs_dir=tmp_path, park=True, on_event=on_event, on_notice=on_notice)
    result = asyncio.run(asyncio.wait_for(local.run(), 30))  # (a run that never says it waits would wait for ever)
    assert result.parked is None and result.status == "completed" and result.record_error is not None
    said = [n for n in notices if "cannot be parked" in n or n.startswith("the run waits for signal")]
    assert len(said) == 2 and said[0].startswith("the run cannot be parked: its record is incomplete")
    assert said[1].startswith("the run waits for signal 'paid' (up to 1h")


def test_what_an_overdue_timer_starts_is_held_until_every_overdue_timer_has_fired(tmp_path: Path) -> None:
    """Parked past both its timer wait's end and its run's timeout: on resume the wait ends, then the run times out
    — the step after the wait, started by the first, is never called."""
    calls = tmp_path / "calls"
    steps = "timeout: 400ms\nsteps:\n  - conf.a: {compensate: undo.a}\n  - wait: cool\n    for: 100ms\n  - conf.b\n"
    result = run(tmp_path, steps, {"script": {"b": {"log": str(calls)}}})
    assert result.parked is not None
    time.sleep(max(0.0, (result.started_at + 400 - time.time() * 1000) / 1000) + 0.05)
    ended = resume(tmp_path)
    assert ended.status == "compensated" and ended.error["type"] == "RunTimeout"
    assert ended.steps["cool"]["status"] == "succeeded" and ended.steps["b"]["status"] == "cancelled"
    assert not calls.exists(), "b was called after the run's timeout"


def test_a_parked_line_whose_due_at_is_no_time_is_refused(tmp_path: Path) -> None:
    """`resume --due` would never find such a run due: the record is refused as changed by hand, saying why."""
    run(tmp_path)
    path = tmp_path / "r1.jsonl"
    raw = path.read_bytes().splitlines(keepends=True)
    parked = json.loads(raw[-1])
    parked["due_at"] = "soon"
    path.write_bytes(b"".join([*raw[:-1], json.dumps(parked).encode() + b"\n"]))
    header, read = read_record(path)
    with pytest.raises(RecordError, match=r"'due_at' \(a time, or null\)"):
        result_from_record(header, read, path)
