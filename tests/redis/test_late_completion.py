"""A late completion on Redis: a worker paused past its lease finishes a compensable step after the run was
cancelled (or a parallel sibling failed for good); the run must end ``needs_intervention`` with the step left to
undo by hand, not ``cancelled``/``failed`` with the effect standing (docs/kernel.md, "Late completions").

Real ``flowdsl worker`` processes on the session's private redis-server; the test SIGSTOPs and SIGCONTs only the
processes it started, by PID, and stops them in a ``finally``. Bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from flowdsl import compile_text
from flowdsl.kernel import LATE_REASON
from flowdsl.runtime.redis import Keys, RedisClient
from tests.redis.fault_workers import make_ledger, read_ledger
from tests.redis.procs import ROOT, WorkerProcs, worker_env

SEQUENCE = """flowdsl: 1
name: late
steps:
  - charge: {worker: late.charge, compensate: late.refund}
  - ship: {worker: late.charge}
"""
PARALLEL = """flowdsl: 1
name: late_par
steps:
  - parallel: g
    branches:
      - charge: {worker: late.charge, compensate: late.refund}
      - reserve: {worker: late.fail}
"""

HELD = """flowdsl: 1
name: late_held
steps:
  - charge: {worker: late.charge_held, compensate: late.refund}
  - ship: {worker: late.charge}
"""

HELD_TIMEOUT = """flowdsl: 1
name: late_held_timeout
steps:
  - charge: {worker: late.charge_held, compensate: late.refund, timeout: 4s}
"""


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _pause_in_charge_until_taken_over(url: str, prefix: str, procs: WorkerProcs, ledger: str, spec: str,
                                      data: dict[str, Any], run_id: str) -> Any:
    """Submit the run; pause (SIGSTOP) the worker that begins charge — its first execution, a blocking call —
    and wait for another to take the task over after the lease: the same task id and idempotency key. Returns
    the paused process."""
    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text(spec), data, run_id=run_id, retention_s=3600)

    asyncio.run(submit())
    key = f"{run_id}/charge"
    first = _wait("charge to begin",
                  lambda: [e for e in read_ledger(ledger) if e["ev"] == "begin" and e["key"] == key], 15)[0]
    paused = next(p for p in procs.procs if p.pid == first["pid"])
    procs.signal(paused, signal.SIGSTOP)
    taker = _wait("the takeover", lambda: [e for e in read_ledger(ledger)
                                          if e["ev"] == "begin" and e["key"] == key and e["pid"] != paused.pid], 20)[0]
    assert taker["task"] == first["task"] == f"{key}#1"
    return paused


def _resume(procs: WorkerProcs, paused: Any, data: dict[str, Any]) -> None:
    """Let the paused process's blocked call end (it waits for the file ``data["go"]``), then resume it."""
    Path(data["go"]).touch()
    procs.signal(paused, signal.SIGCONT)


def _result_once(url: str, prefix: str, run_id: str, done: Any) -> Any:
    """The run's (result, journal, info) once ``done(result)`` and the journal's last event agree with it (the
    journal is read before the state)."""
    async def poll() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            while True:
                res, journal = await client.result(run_id)
                last = journal.events[-1] if journal.events else {}
                if res is not None and done(res) and last.get("status") == res.status:
                    return res, journal, await client.info(run_id)
                await asyncio.sleep(0.05)

    return asyncio.run(asyncio.wait_for(poll(), 20))


@pytest.mark.parametrize("mode", ["cancel", "abort"])
def test_a_late_success_after_the_run_ended_makes_it_needs_intervention(
    url: str, prefix: str, tmp_path: Path, mode: str
) -> None:
    ledger = make_ledger(tmp_path)
    procs = WorkerProcs(url, prefix, ["tests.redis.late_workers"], lease=1.0)
    run_id = f"{prefix}-late"
    paused = None
    try:
        procs.start(2)
        # (abort: the sibling reserve fails once the file fail_when is made, after the takeover — at most 30 s on)
        data = {"ledger": ledger, "go": str(tmp_path / "go"), "later_sleep": 30.0,
                "fail_when": str(tmp_path / "fail"), "fail_after": 30.0}
        # worker A is paused inside charge; after the lease, worker B takes the task over
        paused = _pause_in_charge_until_taken_over(url, prefix, procs, ledger,
                                                   SEQUENCE if mode == "cancel" else PARALLEL, data, run_id)
        if mode == "abort":
            (tmp_path / "fail").touch()  # reserve fails for good while B runs charge: the run aborts

        async def end() -> Any:
            async with RedisClient(url, prefix=prefix) as client:
                if mode == "cancel":
                    await client.cancel(run_id, "customer cancelled")
                return await asyncio.wait_for(client.follow(run_id), 20)

        ended = asyncio.run(end())
        assert ended.status == ("cancelled" if mode == "cancel" else "failed"), (
            read_ledger(ledger), [(e["type"], e.get("step"), e.get("task_id"), e.get("at")) for e in ended.events])
        assert ended.steps["charge"]["status"] == "cancelled" and ended.compensated == [], (
            read_ledger(ledger),
            [(e["type"], e.get("step"), e.get("task_id")) for e in ended.events],
        )
        assert not [e for e in read_ledger(ledger) if e["ev"] == "effect"]  # B's attempt was cancelled
        # A resumes: its call returns, the charge is made, and it reports success after the run ended
        _resume(procs, paused, data)
        res, journal, info = _result_once(url, prefix, run_id, lambda r: r.status != ended.status)
        effects = [e for e in read_ledger(ledger) if e["ev"] == "effect"]
        assert [(e["pid"], e["applied"]) for e in effects] == [(paused.pid, True)]  # the charge stands
        assert not [e for e in read_ledger(ledger) if e["ev"] == "undo"]
        assert res.status == "needs_intervention" and info.status == "needs_intervention"
        [item] = res.intervention["steps"]
        assert item["step"] == "charge" and item["worker"] == "late.refund"
        assert item["step_idempotency_key"] == f"{run_id}/charge" and item["reason"] == LATE_REASON
        assert item["step_result"] == {"charge_id": f"ch-{paused.pid}"}
        types = [e["type"] for e in journal.events]
        assert types[-3:] == ["result_rejected", "late_completion", "run_finished"]
        assert journal.events[-1]["previous_status"] == ended.status
        # the run hash: the new status; the retention TTL its first end set is taken off (PERSIST): a run that needs
        # a person is kept until someone resolves it
        client = redis.Redis.from_url(url)
        try:
            key = Keys(prefix).run(run_id)
            assert client.hget(key, "status") == b"needs_intervention"
            assert client.pttl(key) == -1
            assert client.pttl(Keys(prefix).journal(run_id)) == -1
        finally:
            client.close()
        # `flowdsl status` shows it
        shown = subprocess.run(
            [
                sys.executable,
                "-c",
                "from flowdsl.cli import main; main()",
                "status",
                run_id,
                "--redis-url",
                url,
                "--prefix",
                prefix,
                "--format",
                "json",
            ],
            cwd=ROOT,
            env=worker_env(),
            capture_output=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["status"] == "needs_intervention"
    finally:
        if paused is not None:
            _resume(procs, paused, data)
        procs.stop_all()


def test_a_success_from_the_earlier_holder_while_the_taker_is_being_cancelled_is_taken_and_undone(
    url: str, prefix: str, tmp_path: Path
) -> None:
    """A resumes while B still holds the task, its attempt being cancelled (the run cancelled, B not yet answered):
    A's success is taken at once — the run asked for the attempt's cancellation, and an effect made must reach the
    kernel while it can still be undone. The charge succeeded while the run aborted, so it is refunded with the
    rest: the run ends cancelled, nothing left to a person. (Before, the success was refused for B's lease
    — a `lease_lost` note — and reported again a lease later, after the run had ended: needs_intervention.)"""
    ledger = make_ledger(tmp_path)
    release = tmp_path / "release"
    procs = WorkerProcs(url, prefix, ["tests.redis.late_workers"], lease=1.0)
    run_id = f"{prefix}-late-held"
    key = f"{run_id}/charge"
    paused = None
    data = {"ledger": ledger, "go": str(tmp_path / "go"), "later_sleep": 30.0, "release": str(release),
            "hold_max": 30.0}
    try:
        procs.start(2)
        paused = _pause_in_charge_until_taken_over(url, prefix, procs, ledger, HELD, data, run_id)

        async def cancel() -> None:
            async with RedisClient(url, prefix=prefix) as client:
                await client.cancel(run_id, "customer cancelled")

        asyncio.run(cancel())
        # B's attempt is cancelled but keeps the task (lease xr:<B>) until released
        _wait("the taker to hold the cancelled task", lambda: [e for e in read_ledger(ledger) if e["ev"] == "hold"], 15)
        _resume(procs, paused, data)
        res, journal, _ = _result_once(url, prefix, run_id, lambda r: r.status == "cancelled")
        assert not release.exists()  # B still holds the task: A's success did not wait for it
        assert res.compensated == ["charge"] and res.intervention is None
        assert res.steps["charge"]["status"] == "succeeded"
        effects = [e for e in read_ledger(ledger) if e["ev"] == "effect"]
        assert [(e["pid"], e["applied"]) for e in effects] == [(paused.pid, True)]  # A's charge is made
        assert [e["key"] for e in read_ledger(ledger) if e["ev"] == "undo"] == [f"{key}/compensate"]  # and refunded
        assert journal.notes == []  # never refused for a lost lease
        assert "late_completion" not in [e["type"] for e in journal.events]
        release.touch()  # B's attempt answers task_cancelled: the task is gone, its answer changes nothing
        _wait("B to let go", lambda: [e for e in read_ledger(ledger) if e["ev"] == "hold"] and not _held(url, prefix,
                                                                                                       run_id), 15)
        res, _, info = _result_once(url, prefix, run_id, lambda r: True)
        assert res.status == info.status == "cancelled" and res.compensated == ["charge"]
    finally:
        if paused is not None:
            _resume(procs, paused, data)
        procs.stop_all()


def _held(url: str, prefix: str, run_id: str) -> bool:
    """Whether any attempt of the run still has a lease in its tasks hash."""
    client = redis.Redis.from_url(url)
    try:
        return bool(client.hlen(Keys(prefix).tasks(run_id)))
    finally:
        client.close()


def test_a_late_success_while_the_taker_still_holds_a_timed_out_attempt_is_taken_at_once(
    url: str, prefix: str, tmp_path: Path
) -> None:
    """The attempt timed out (the run failed) while its taker B still holds it, ignoring its cancel; paused A
    resumes and reports the charge it made. The run gave up on the attempt, so B's kept lease does not fence A's
    answer: the late completion is recorded at once — not refused (``lease_lost``) until B lets go."""
    ledger = make_ledger(tmp_path)
    release = tmp_path / "release"
    procs = WorkerProcs(url, prefix, ["tests.redis.late_workers"], lease=1.0)
    run_id = f"{prefix}-late-timeout"
    paused = None
    try:
        procs.start(2)
        data = {"ledger": ledger, "go": str(tmp_path / "go"), "later_sleep": 30.0, "release": str(release),
                "hold_max": 30.0}
        paused = _pause_in_charge_until_taken_over(url, prefix, procs, ledger, HELD_TIMEOUT, data, run_id)
        # the timeout fails the run; B's attempt is cancelled but keeps the task until released
        _wait("the taker to hold the timed-out task", lambda: [e for e in read_ledger(ledger) if e["ev"] == "hold"],
              15)
        _resume(procs, paused, data)
        res, journal, _ = _result_once(url, prefix, run_id, lambda r: r.status == "needs_intervention")
        assert not release.exists()  # B still holds the task
        [item] = res.intervention["steps"]
        assert item["step"] == "charge" and item["step_result"] == {"charge_id": f"ch-{paused.pid}"}
        assert journal.events[-1]["previous_status"] == "failed"
        assert journal.notes == []  # never refused for a lost lease
    finally:
        release.touch()
        if paused is not None:
            _resume(procs, paused, data)
        procs.stop_all()
