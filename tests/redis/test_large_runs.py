"""Runs whose data grows past what Redis takes in one value (512 MB): a state too large is not written whole (the
run is loaded from its last snapshot and its journal), and a transition too large is never sent — the entry is
set aside at once with a message saying why, not retried for ever on a dropped connection. The limits are made
small here (the module constants) so that a few KB stand for hundreds of MB."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient, advance, store
from flowdsl.workers import StepContext, worker
from tests.redis.inproc import serving, worker_here

SPEC = ("flowdsl: 1\nname: big\nworkers: [tests.runtime.workers, tests.redis.test_large_runs]\nsteps:\n"
        "  - conf.a: {compensate: undo.a}\n  - b: {worker: big.fill}\n  - c: {worker: big.fill}\n"
        "  - d: {worker: big.fill}\n")


@worker("big.fill")
async def fill(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A result of ``data["n"]`` bytes (the input stays small: only the results grow the run)."""
    return {f"{ctx.step_id}_data": "x" * int(data["n"])}


def test_a_state_larger_than_the_snapshot_limit_is_loaded_from_its_journal(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(advance, "SNAPSHOT_LIMIT", 6_000)  # (read when a worker's Advancer is made)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SPEC), {"n": 2_500}, run_id="grows")
            result = await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))
            state, version, sv = await client.store.call("HMGET", client.keys.run("grows"), "state", "v", "sv")
            return result, json.loads(state), int(version), int(sv)

    with caplog.at_level(logging.WARNING, logger="flowdsl.redis"):
        result, snapshot, version, snapshot_version = asyncio.run(main())
    # the run completed, and reading it replays the journal after the last snapshot small enough to be written
    assert result.status == "completed"
    assert {"b_data", "c_data", "d_data"} <= set(result.context)
    assert snapshot_version < version and len(json.dumps(snapshot)) <= 6_000
    assert "its state is 16 KB, more than is written whole (6 KB)" in caplog.text


def test_a_transition_larger_than_redis_takes_sets_its_entry_aside_at_once_saying_why(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(store, "TRANSITION_LIMIT", 20_000)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(SPEC), {"n": 30_000}, run_id="huge")
            worker = worker_here(url, prefix, burst=True)
            stats = await asyncio.wait_for(worker.serve(), 30)
            letters = await client.dead_letters_of(sub.run_id)
            info = await client.info(sub.run_id)
            return stats, letters, info

    with caplog.at_level(logging.ERROR, logger="flowdsl.redis"):
        stats, letters, info = asyncio.run(main())
    assert stats.dead_letters == 1 and len(letters) == 1 and info.status == "running"
    assert "more than one transition may" in letters[0].reason and "keep large data out of runs" in letters[0].reason
    assert "Traceback" not in caplog.text and "cannot be handled" in caplog.text
    assert stats.tasks == 2  # a, then b once: its result is not run for again (a dead letter at once)


def test_a_run_input_larger_than_a_run_takes_is_refused_at_submission(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its start could never be written (the first transition holds the input three times): refused before anything
    is sent, saying how large it is and what a run takes — the CLI's one-line error, exit 2."""
    from flowdsl.runtime.redis import client as client_module

    monkeypatch.setattr(client_module, "INPUT_LIMIT", 10_000)

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            with pytest.raises(ValueError) as refused:
                await client.submit(compile_text(SPEC), {"n": 1, "blob": "x" * 20_000}, run_id="too-big")
            runs = await client.runs(limit=10)
            await client.submit(compile_text(SPEC), {"n": 1, "blob": "x" * 9_000}, run_id="fits")
            return str(refused.value), [r.run_id for r in runs]

    said, listed = asyncio.run(main())
    assert said.startswith("the run input is 20 KB as JSON: a run on Redis takes at most 10 KB of input"), said
    assert "too-big" not in listed


def test_a_state_too_large_to_write_whole_is_not_encoded_again_at_every_step(
        url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a snapshot was too large, the next try waits as a snapshot of that size would: it was made (and thrown
    away) at every transition after it, the whole state encoded per step for nothing."""
    monkeypatch.setattr(advance, "SNAPSHOT_LIMIT", 3_000)
    skipped: list[int] = []
    real = advance.Advancer._snapshot

    def counting(self: advance.Advancer, record: Any, state: Any) -> bytes:
        raw = real(self, record, state)
        if not raw:
            skipped.append(record.version)
        return raw

    monkeypatch.setattr(advance.Advancer, "_snapshot", counting)
    steps = "".join(f"  - s{i}: {{worker: big.fill}}\n" for i in range(40))
    spec = f"flowdsl: 1\nname: long\nworkers: [tests.redis.test_large_runs]\nsteps:\n{steps}"

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            sub = await client.submit(compile_text(spec), {"n": 200}, run_id="long")
            return await serving([worker_here(url, prefix)], lambda: client.follow(sub.run_id))

    result = asyncio.run(main())
    assert result.status == "completed" and len(result.context) >= 40
    assert 1 <= len(skipped) <= 4, skipped  # (a chain tries every CHAIN_REPLAY transitions, and at its end)
