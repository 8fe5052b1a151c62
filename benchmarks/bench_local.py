"""Local runtime benchmark: the runtime's overhead per step against a hand-written asyncio chain.

Run it with ``.venv/bin/python -m benchmarks.bench_local`` (``--quick`` for a
smoke run, ``--profile`` to print where the time of the 1,000-step sequence
goes). It is a measurement, not a test: nothing here asserts a time. Results
are recorded in ``benchmarks/RESULTS.md`` under "Local runtime".

Cases, each measured in the same process, interleaved, min and median of the repeats:

- a 1,000-step sequence and a 1,000-branch parallel group of trivial async
  workers (``return {}``), run by ``flowdsl.runtime.local.run_flow`` (records
  off, and on) and by a hand-written asyncio program calling the same function:
  a loop of awaits for the sequence, ``asyncio.gather`` for the group, each
  call given a copy of the context and a ``StepContext``, each result merged
  into the context — what the flow would be without flowdsl;
- the same sequence with sync workers (each call hops to a thread);
- three 200 ms steps in parallel, then a join step: the wall time.

``--instructions`` counts instructions instead of timing (each case run under
``valgrind --tool=callgrind`` once and six times; the difference / 5,000 is
the cost of one step): the same figures whatever else the machine is doing,
which timings on a shared 2-core machine are not.

Overhead per step = (runtime − hand-written) / steps; it is split into the
kernel's share (the same plan driven by ``kernel.apply`` alone, every dispatch
answered at once) and the runtime's own. Goals (issue): ≤ 30 µs
per step and ≤ 3× the hand-written program; the 3 × 200 ms group ≤ 210 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import yaml

from flowdsl import compile_text
from flowdsl.kernel import apply, prepare, start_run
from flowdsl.runtime.local import run_flow
from flowdsl.workers import StepContext, WorkerRegistry

REGISTRY = WorkerRegistry()


async def noop(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {}


def noop_sync(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {}


async def nap(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await asyncio.sleep(0.2)
    return {}


REGISTRY.register("bench.noop", noop)
REGISTRY.register("bench.noop_sync", noop_sync)
REGISTRY.register("bench.nap", nap)


def spec(steps: list[Any]) -> dict[str, Any]:
    text = yaml.safe_dump({"flowdsl": 1, "name": "bench", "steps": steps}, sort_keys=False)
    plan = compile_text(text)
    prepare(plan)  # the kernel's per-plan indexes are built once per plan, not per run
    return plan


def sequence_plan(n: int, worker: str = "bench.noop") -> dict[str, Any]:
    return spec([{f"s{i}": {"worker": worker}} for i in range(n)])


def parallel_plan(n: int) -> dict[str, Any]:
    return spec([{"parallel": "p", "branches": [{f"s{i}": {"worker": "bench.noop"}} for i in range(n)]}])


def join_plan() -> dict[str, Any]:
    return spec([{"parallel": "p", "branches": [{f"n{i}": {"worker": "bench.nap"}} for i in range(3)]},
                 {"join": {"worker": "bench.noop"}}])


# --- the hand-written programs ------------------------------------------------------------


async def hand_sequence(n: int, fn: Callable[..., Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for i in range(n):
        step = f"s{i}"
        result = await fn(dict(ctx), StepContext("hand", step, 1, f"hand/{step}"))
        ctx.update(result or {})
    return ctx


async def hand_sequence_sync(n: int) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for i in range(n):
        step = f"s{i}"
        result = await asyncio.to_thread(noop_sync, dict(ctx), StepContext("hand", step, 1, f"hand/{step}"))
        ctx.update(result or {})
    return ctx


async def hand_parallel(n: int) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    results = await asyncio.gather(*(noop(dict(ctx), StepContext("hand", f"s{i}", 1, f"hand/s{i}"))
                                     for i in range(n)))
    for result in results:
        ctx.update(result or {})
    return ctx


# --- measuring ------------------------------------------------------------------------------------


def timed(make: Callable[[], Awaitable[Any]]) -> float:
    async def once() -> float:
        t0 = time.perf_counter()
        await make()
        return time.perf_counter() - t0

    return asyncio.run(once())


def kernel_alone(plan: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    """The kernel's own share: start_run, then every dispatch answered at once by apply(), no I/O."""

    async def go() -> None:
        d = start_run(plan, "k", {}, at=0)
        state, pending, at = d.state, [c for c in d.commands if c["op"] == "dispatch"], 1
        while pending:
            later = []
            for c in pending:
                d = apply(plan, state, {"type": "task_succeeded", "task_id": c["task_id"], "at": at, "result": {}})
                later += [c for c in d.commands if c["op"] == "dispatch"]
            pending = later
        assert state["status"] == "completed"

    return go


def compare(label: str, n: int, runtime: Callable[[], Awaitable[Any]], hand: Callable[[], Awaitable[Any]],
            kernel: Callable[[], Awaitable[Any]], repeats: int) -> dict[str, Any]:
    """Runtime, hand-written program and kernel alone, interleaved; min and median of ``repeats``."""
    for make in (runtime, hand, kernel):
        timed(make)  # warm-up: imports, caches
    rt: list[float] = []
    hw: list[float] = []
    kn: list[float] = []
    for _ in range(repeats):
        rt.append(timed(runtime))
        hw.append(timed(hand))
        kn.append(timed(kernel))
    row: dict[str, Any] = {"case": label, "steps": n}
    for stat, pick in (("min", min), ("median", statistics.median)):
        r, h, k = pick(rt), pick(hw), pick(kn)
        row[stat] = {"runtime_ms": r * 1e3, "hand_ms": h * 1e3, "kernel_ms": k * 1e3,
                     "overhead_us": (r - h) / n * 1e6, "kernel_us": k / n * 1e6,
                     "own_us": (r - h - k) / n * 1e6, "ratio": r / h}
        m = row[stat]
        print(f"{label:<42} {stat:>6}: {r * 1e3:7.1f} ms, hand {h * 1e3:6.1f} ms → overhead "
              f"{m['overhead_us']:5.1f} µs/step (kernel {m['kernel_us']:5.1f}, runtime {m['own_us']:5.1f}), "
              f"×{m['ratio']:.1f}", flush=True)
    return row


def run_plan(plan: dict[str, Any], runs_dir: str | None = None) -> Callable[[], Awaitable[Any]]:
    async def go() -> Any:
        result = await run_flow(plan, {}, record=runs_dir is not None, runs_dir=runs_dir, registry=REGISTRY,
                                import_workers=False)
        assert result.status == "completed", result.error
        return result

    return go


def profile(plan: dict[str, Any]) -> None:
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(run_plan(plan)())
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(
        r"kernel\.py:\d+\((apply|start_run)\)|local\.py|execute\.py:\d+\(execute\)")
    print(out.getvalue())


def case_runner(case: str, n: int, runs_dir: str) -> Callable[[], Awaitable[Any]]:
    """One benchmark case by name: ``<hand|kernel|runtime|recorded>-<sequence|group>``."""
    what, shape = case.split("-")
    plan = sequence_plan(n) if shape == "sequence" else parallel_plan(n)
    if what == "hand":
        return (lambda: hand_sequence(n, noop)) if shape == "sequence" else (lambda: hand_parallel(n))
    if what == "kernel":
        return kernel_alone(plan)
    return run_plan(plan, runs_dir if what == "recorded" else None)


def run_case(case: str, n: int, times: int) -> None:
    """Run one case ``times`` times in this process (what ``--instructions`` counts)."""
    with tempfile.TemporaryDirectory() as tmp:
        make = case_runner(case, n, tmp)

        async def go() -> None:
            for _ in range(times):
                await make()

        asyncio.run(go())


def instructions(n: int) -> None:
    """Instructions per step of every case, counted by callgrind (needs valgrind)."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt-get install valgrind)")

    def count(case: str, times: int) -> int:
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                              "-m", "benchmarks.bench_local", "--run-case", case, "--times", str(times),
                              "--steps", str(n)], capture_output=True, text=True, check=True).stderr
        found = re.search(r"Collected : (\d+)", out)
        assert found is not None, out
        return int(found.group(1))

    for shape in ("sequence", "group"):
        per_step = {what: (count(f"{what}-{shape}", 6) - count(f"{what}-{shape}", 1)) / (5 * n)
                    for what in ("hand", "kernel", "runtime", "recorded")}
        hand = per_step["hand"]
        print(f"{shape} of {n}: " + ", ".join(f"{what} {v / 1e3:.1f}k" for what, v in per_step.items())
              + f" instructions per step; runtime ×{per_step['runtime'] / hand:.2f}, "
              f"recorded ×{per_step['recorded'] / hand:.2f} the hand-written program", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps, 3 repeats")
    parser.add_argument("--profile", action="store_true", help="cProfile the 1,000-step sequence")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--instructions", action="store_true", help="count instructions (callgrind), not time")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--times", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_case:
        run_case(args.run_case, args.steps, args.times)
        return
    if args.instructions:
        instructions(100 if args.quick else 1000)
        return
    n = 100 if args.quick else 1000
    repeats = 3 if args.quick else args.repeats
    print(f"Python {platform.python_version()} on {platform.machine()} {platform.system()}, "
          f"{os.cpu_count()} CPUs; {n} steps, median of {repeats}", flush=True)
    seq, par, seq_sync = sequence_plan(n), parallel_plan(n), sequence_plan(n, "bench.noop_sync")
    if args.profile:
        profile(seq)
        return
    with tempfile.TemporaryDirectory() as tmp:
        compare(f"sequence of {n}, records off", n, run_plan(seq), lambda: hand_sequence(n, noop),
                kernel_alone(seq), repeats)
        compare(f"sequence of {n}, recorded", n, run_plan(seq, tmp), lambda: hand_sequence(n, noop),
                kernel_alone(seq), repeats)
        compare(f"parallel group of {n}, records off", n, run_plan(par), lambda: hand_parallel(n),
                kernel_alone(par), repeats)
        compare(f"parallel group of {n}, recorded", n, run_plan(par, tmp), lambda: hand_parallel(n),
                kernel_alone(par), repeats)
        compare(f"sequence of {n} sync workers, records off", n, run_plan(seq_sync),
                lambda: hand_sequence_sync(n), kernel_alone(seq_sync), repeats)
    join = join_plan()
    walls = sorted(timed(run_plan(join)) * 1e3 for _ in range(max(3, repeats // 2)))
    print(f"{'3 × 200 ms in parallel, then a join':<44} wall median {statistics.median(walls):.1f} ms "
          f"(min {walls[0]:.1f}, max {walls[-1]:.1f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
