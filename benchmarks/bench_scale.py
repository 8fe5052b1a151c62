"""Long runs: does the cost of one step stay flat as a run grows? A for_each over n items, n doubling, on the
local runtime and on Redis (one worker process in this process; and two ``flowdsl worker`` processes sharing
the one run).

Run it with ``.venv/bin/python -m benchmarks.bench_scale`` (``--quick`` for smaller n; ``--unbounded`` for the
same loop without its concurrency limit: every item in flight at once). It prints the time
per item for each n and the growth from one n to the next: ~1.0× per doubling is linear, ~2× quadratic.
It is a measurement, not a test: nothing here asserts a time. Results are recorded in
``benchmarks/RESULTS.md`` under "Long runs".

``--diagrams`` measures drawing instead, and needs no Redis: three ``.flow`` specs of n steps, each drawn in
each text format (Mermaid, ASCII, DOT), printing the time per step of each with the same growth per doubling
of n (``--case`` picks one):

- *sequence*: n steps in a sequence, each with a compensation (``step sI undo uI``);
- *needs chain*: n compensated steps each of which ``needs`` the two before it, listed last first — a long,
  narrow ``needs:`` graph (a chain in which each step needs only the one before it, in order, is the same plan
  as a sequence, and is drawn as one);
- *layered DAG*: n steps in layers of 10, each needing two steps of the layer above — a wide ``needs:`` graph.

The flow: ``for_each`` over ``items`` (16 at a time), one step per item whose input is mapped to the item
(``with: {x: "${ $item }"}``), the step doing nothing (``bench.step`` of bench_redis); the run input holds
the n items, so the state, the context and the for_each's result all grow with n.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.bench_redis import PREFIX, Server, _spawn, _stop

SPEC = """flowdsl: 1
name: scale
workers: [benchmarks.bench_redis]
steps:
  - for_each: each
    items: "${ $.items }"
    concurrency: 16
    steps:
      - one: {worker: bench.step, with: {x: "${ $item }"}}
"""


def local_seconds(plan: dict[str, Any], n: int) -> float:
    from flowdsl.runtime.local import run_flow

    t = time.perf_counter()
    result = asyncio.run(run_flow(plan, {"items": list(range(n))}, record=False))
    took = time.perf_counter() - t
    assert result.status == "completed", result.error
    return took


def redis_seconds(server: Server, plan: dict[str, Any], n: int, processes: int) -> float:
    """One run of n items on Redis: 0 processes = one worker in this process, else ``flowdsl worker``s."""
    from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions

    server.flush()
    procs = [_spawn([sys.executable, "-c", "from flowdsl.cli import main; main()", "worker", "--redis-url",
                     server.url, "--prefix", PREFIX, "-w", "benchmarks.bench_redis", "--concurrency", "64",
                     "--no-llm"]) for _ in range(processes)]

    async def main() -> float:
        async with RedisClient(server.url, prefix=PREFIX) as client:
            while len(await client.workers()) < processes:
                await asyncio.sleep(0.05)
            t = time.perf_counter()
            sub = await client.submit(plan, {"items": list(range(n))})
            if processes == 0:
                options = WorkerOptions(burst=True, concurrency=64, llm=False, handle_signals=False)
                await RedisWorker(server.url, prefix=PREFIX, options=options).serve()
            result = await client.follow(sub.run_id)
            took = time.perf_counter() - t
            assert result.status == "completed", result.error
            return took

    try:
        return asyncio.run(main())
    finally:
        _stop(procs)


def sequence_flow(n: int) -> str:
    """n compensated steps in a sequence."""
    return "flow saga\n\n" + "".join(f"step s{i} undo u{i}\n" for i in range(n))


def needs_chain_flow(n: int) -> str:
    """n compensated steps, each needing the two before it, listed last first."""
    return "flow chain\n\n" + "".join(
        f"step s{i} undo u{i} needs {', '.join(f's{j}' for j in (i - 1, i - 2) if j >= 0) or '[]'}\n"
        for i in reversed(range(n)))


def layered_flow(n: int, across: int = 10) -> str:
    """n steps in layers of ``across``, step j of a layer needing steps j and j + 1 of the layer above."""
    lines = []
    for i in range(n):
        layer, j = divmod(i, across)
        above = {f"l{layer - 1}_{k % across}" for k in (j, j + 1)} if layer else set()
        lines.append(f"step l{layer}_{j} needs {', '.join(sorted(above)) or '[]'}\n")
    return "flow layers\n\n" + "".join(lines)


#: --diagrams cases: the flow of n steps, the sizes measured (then with --quick), what the header says
DIAGRAM_CASES: dict[str, tuple[Callable[[int], str], tuple[int, ...], tuple[int, ...], str]] = {
    "sequence": (sequence_flow, (1000, 2000, 4000, 8000), (500, 1000, 2000), "a sequence of n compensated steps"),
    "needs-chain": (needs_chain_flow, (300, 600, 1200, 2400), (300, 600, 1200),
                    "n compensated steps, each needing the two before it"),
    "layered-dag": (layered_flow, (300, 600, 1200, 2400), (300, 600, 1200),
                    "n steps in layers of 10, each needing two of the layer above"),
}


def diagram_seconds(flow: str, fmt: str) -> float:
    """Drawing (not compiling) a flow written in the text syntax in ``fmt``."""
    from flowdsl import compile_text
    from flowdsl.render import render

    plan = compile_text(flow, filename="bench.flow")
    t = time.perf_counter()
    render(plan, fmt)
    return time.perf_counter() - t


def diagrams(case: str, quick: bool) -> None:
    """Print the time per step of drawing each n of a case in each text format, and its growth from the n before."""
    make, sizes, quick_sizes, what = DIAGRAM_CASES[case]
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"µs per step to draw {what} (growth per doubling of n)")
    formats = ("mermaid", "ascii", "dot")
    print(f"{'n':>6s}" + "".join(f"{name:>22s}" for name in formats))
    last: dict[str, float] = {}
    for n in quick_sizes if quick else sizes:
        flow = make(n)
        cells = []
        for fmt in formats:
            per_step = diagram_seconds(flow, fmt) / n * 1e6
            growth = f"(×{per_step / last[fmt]:.2f})" if fmt in last else ""
            cells.append(f"{per_step:7.0f} µs {growth:>9s}")
            last[fmt] = per_step
        print(f"{n:6d}" + "".join(f"{cell:>22s}" for cell in cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n up to 2,000 instead of 8,000")
    parser.add_argument("--unbounded", action="store_true",
                        help="no concurrency limit: all n items in flight at once (a wide fan-out)")
    parser.add_argument("--diagrams", action="store_true",
                        help="time drawing flows of n steps in each text format instead (no Redis)")
    parser.add_argument("--case", choices=sorted(DIAGRAM_CASES), action="append",
                        help="with --diagrams: the flow to draw (repeatable) [default: every one]")
    args = parser.parse_args(argv)
    if args.case and not args.diagrams:
        parser.error("--case goes with --diagrams")
    if args.diagrams:
        for i, case in enumerate(args.case or DIAGRAM_CASES):
            if i:
                print()
            diagrams(case, args.quick)
        return
    from flowdsl import compile_text

    plan = compile_text(SPEC.replace("    concurrency: 16\n", "") if args.unbounded else SPEC)
    sizes = (500, 1000, 2000) if args.quick else (1000, 2000, 4000, 8000)
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"µs per item of a for_each over n items, {'all' if args.unbounded else 16} at a time "
          "(growth per doubling of n)")
    server = Server()
    try:
        columns: dict[str, Any] = {
            "local": lambda n: local_seconds(plan, n),
            "Redis, 1 process": lambda n: redis_seconds(server, plan, n, 0),
            "Redis, 2 processes": lambda n: redis_seconds(server, plan, n, 2),
        }
        print(f"{'n':>6s}" + "".join(f"{name:>26s}" for name in columns))
        last: dict[str, float] = {}
        for n in sizes:
            cells = []
            for name, measure in columns.items():
                per_item = measure(n) / n * 1e6
                growth = f"(×{per_item / last[name]:.2f})" if name in last else ""
                cells.append(f"{per_item:8.0f} µs {growth:>9s}")
                last[name] = per_item
            print(f"{n:6d}" + "".join(f"{cell:>26s}" for cell in cells), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
