"""An LLM step run by a Redis worker that has no model: the message points at the worker, not the submitter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.llm import ON_REDIS_WORKER
from flowdsl.runtime.redis import RedisClient
from tests.redis.inproc import worker_here

PLAN = compile_text("flowdsl: 1\nname: ask\nsteps:\n  - ask:\n      llm: {signature: 'q -> a'}\n")


def test_a_step_with_no_model_on_a_redis_worker_says_to_give_the_worker_one(url: str, prefix: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    async def main() -> Any:
        async with RedisClient(url, prefix=prefix) as client:
            run_id = (await client.submit(PLAN, {"q": "?"})).run_id
            await worker_here(url, prefix, burst=True).serve()  # an embedded worker: no CLI involved
            result, _ = await client.result(run_id)
            return result

    result = asyncio.run(main())
    assert result.status == "failed"
    error = result.steps["ask"]["error"]
    assert error["type"] == "LLMNotConfigured" and "give the Redis worker one: 'flowdsl worker --lm MODEL'" in \
        error["message"]
    assert ON_REDIS_WORKER.get() is False  # only while it serves
