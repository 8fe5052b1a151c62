"""The e-commerce saga's scenarios on Redis with two worker processes: the same end states and the same
simulated-service state (stock, reservations, charges, refunds, shipments, messages, effects) as the local
runtime."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from examples.ecommerce_order import services as svc
from flowdsl import compile_spec
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.redis import RedisClient
from tests.redis.procs import ROOT, WorkerProcs
from tests.redis.services_file import load_state

ECOM = ROOT / "examples" / "ecommerce_order"
SCENARIOS = ["success", "invalid_order", "out_of_stock", "payment_declined", "gateway_timeout"]


def _plan() -> dict[str, Any]:
    result = compile_spec(str(ECOM / "flow.yaml"), check_workers=True)
    assert result.plan is not None, result.diagnostics
    return result.plan


def _local(plan: dict[str, Any]) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    out = {}
    for name in SCENARIOS:
        svc.STATE.reset()
        data = json.loads((ECOM / "inputs" / f"{name}.json").read_text())
        r = asyncio.run(run_flow(plan, data, run_id=f"ecom-{name}", record=False))
        out[name] = (r.status, r.compensated, svc.STATE.snapshot())
    svc.STATE.reset()
    return out


def test_scenarios_match_the_local_runtime_with_two_worker_processes(url: str, prefix: str, tmp_path: Path) -> None:
    plan = _plan()
    expected = _local(plan)
    state_file = tmp_path / "services.pickle"
    procs = WorkerProcs(url, prefix, ["tests.redis.ecom_shared"], lease=10.0,
                        env={"FLOWDSL_TEST_SERVICES": str(state_file)})
    try:
        procs.start(2)

        async def scenario(name: str) -> tuple[str, list[str], dict[str, Any], Any]:
            state_file.unlink(missing_ok=True)
            data = json.loads((ECOM / "inputs" / f"{name}.json").read_text())
            async with RedisClient(url, prefix=prefix) as client:
                sub = await client.submit(plan, data, run_id=f"ecom-{name}")
                r = await asyncio.wait_for(client.follow(sub.run_id), 60)
            return r.status, r.compensated, load_state(str(state_file)).snapshot(), r.error

        for name in SCENARIOS:
            got = asyncio.run(scenario(name))
            assert got[:2] == expected[name][:2], (name, got[3])
            assert got[2] == expected[name][2], f"{name}: the simulated services differ"
    finally:
        procs.stop_all()
