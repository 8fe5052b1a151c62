"""Redis runtime benchmark: flowdsl on Redis (1 and 2 worker processes) against a Celery 6-task chain and a
bare Redis Streams round trip (the floor), side by side on one private Redis.

Run it with ``.venv/bin/python -m benchmarks.bench_redis`` (``--runs 200`` for a
smoke run, ``--rounds 3`` to measure every row three times, round after round,
and print the median of each round's ratios — steadier on a shared machine —
``--profile`` to print a cProfile of an in-process flowdsl worker, ``--instructions``
to count with callgrind the instructions per step of one flowdsl worker process (also
with its Prometheus metrics on) and of the floor's loop: figures that do not move with
the machine's load).
Celery comes from the ``bench`` extra (``pip install -e '.[bench]'``); without it
the Celery rows are skipped with a message. It is a measurement, not a test:
nothing here asserts a time. Results and what the profile showed are recorded in
``benchmarks/RESULTS.md`` under "Redis runtime".

The workload: ``--runs`` (2,000) six-step runs whose steps do nothing (each
returns ``{}``), so what is measured is the machinery. Throughput is steps per
second from the first submission to the last run's end (all runs submitted at
once; ends are detected alike for every row, by polling the earliest runs not yet
seen ending); latency is the median wall time of one six-step run submitted alone
on an idle system (submit, execute, see the end), over ``--latency-runs`` (40) runs.

- **flowdsl**: ``flowdsl worker`` processes; the client submits with
  ``RedisClient.submit`` and waits for the run's end.
- **Celery**: ``chain(step.s(), … ×6)`` on a Celery app with this Redis as broker
  and result backend, with as many processes as the flowdsl row it is compared
  to, in two shapes: one ``celery worker`` with the prefork pool, and separate
  ``celery worker --pool solo`` processes; flowdsl is compared with the better
  figure of the two.
- **floor**: a worker process that ``XREADGROUP``s a message, ``XADD``s the next
  step's message and ``XACK``s, in batches (pipelined) — the least any engine that
  keeps its queue in Redis Streams does per step, with no state at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowdsl.workers import worker

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
PREFIX = "bench"
SPEC = "flowdsl: 1\nname: bench6\nworkers: [benchmarks.bench_redis]\nsteps:\n" + "".join(
    f"  - s{i}: {{worker: bench.step}}\n" for i in range(1, STEPS + 1))


@worker("bench.step")
async def bench_step(data: dict[str, Any], ctx: Any) -> None:
    return None


# --- a private redis-server ------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp"))
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(self.socket),
             "--dir", str(self.dir), "--save", "", "--appendonly", "no", "--logfile", str(self.dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        for _ in range(500):
            if self.socket.exists():
                try:
                    info = redis.Redis(unix_socket_path=str(self.socket)).info("server")
                    if int(info["process_id"]) == self.proc.pid:
                        self.version = info["redis_version"]
                        return
                except redis.ConnectionError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def flush(self) -> None:
        import redis

        redis.Redis(unix_socket_path=str(self.socket)).flushall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWDSL_LM", None)
    return env


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_all(url: str, ids: list[str], probe: Any, done: Any, window: int = 64) -> None:
    """Return once every run in ``ids`` has ended (``probe(pipeline, id)`` queues the check, ``done(reply)``
    reads it). Only the earliest ``window`` runs not yet seen ending are checked at a time: runs end about in
    the order they were submitted, and only the last end matters, so checking all of them every time would
    only load the machine being measured. Used alike for flowdsl and Celery."""
    import redis

    r = redis.Redis.from_url(url)
    left = list(ids)
    while left:
        pipe = r.pipeline(transaction=False)
        for run_id in left[:window]:
            probe(pipe, run_id)
        still = [i for i, reply in zip(left[:window], pipe.execute(), strict=True) if not done(reply)]
        left = still + left[window:]
        if still:
            time.sleep(0.01)
    r.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


# --- flowdsl -------------------------------------------------------------------------------------


def bench_flowdsl(server: Server, workers: int, runs: int, latency_runs: int) -> dict[str, float]:
    from flowdsl import compile_text
    from flowdsl.runtime.redis import Keys, RedisClient

    server.flush()
    procs = [_spawn([sys.executable, "-c", "from flowdsl.cli import main; main()", "worker", "--redis-url",
                     server.url, "--prefix", PREFIX, "-w", "benchmarks.bench_redis", "--concurrency", "256",
                     "--no-llm"]) for _ in range(workers)]
    plan = compile_text(SPEC)

    async def main() -> tuple[list[float], float, list[str]]:
        async with RedisClient(server.url, prefix=PREFIX) as client:
            while len(await client.workers()) < workers:
                await asyncio.sleep(0.05)
            await client.follow((await client.submit(plan, {}, run_id="warm")).run_id)  # warm-up
            lat = []
            for i in range(latency_runs):
                t = time.perf_counter()
                await client.follow((await client.submit(plan, {}, run_id=f"lat{i}")).run_id)
                lat.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            ids = []
            for i in range(0, runs, 250):
                subs = await asyncio.gather(*(client.submit(plan, {}, run_id=f"r{j}")
                                              for j in range(i, min(runs, i + 250))))
                ids += [s.run_id for s in subs]
        return lat, t0, ids

    try:
        lat, t0, ids = asyncio.run(main())
        keys = Keys(PREFIX)
        _wait_all(server.url, ids, lambda pipe, r: pipe.hget(keys.run(r), "status"), lambda s: s == b"completed")
        took = time.perf_counter() - t0
        return {"steps_per_s": runs * STEPS / took, "latency_ms": statistics.median(lat) * 1000, "seconds": took}
    finally:
        _stop(procs)


def profile_flowdsl(server: Server, runs: int) -> str:
    """cProfile of one in-process worker draining ``runs`` submitted runs (burst), with the garbage collector
    set as ``flowdsl worker`` sets it; also the worker's and Redis's CPU time per step, without the profiler."""
    import redis

    from flowdsl import compile_text
    from flowdsl.runtime.redis import RedisClient, RedisWorker, WorkerOptions
    from flowdsl.runtime.redis.serving import serving_gc

    server.flush()
    plan = compile_text(SPEC)

    async def submit(tag: str) -> None:
        async with RedisClient(server.url, prefix=PREFIX) as client:
            for i in range(0, runs, 250):
                await asyncio.gather(*(client.submit(plan, {}, run_id=f"{tag}{j}")
                                       for j in range(i, min(runs, i + 250))))

    async def main() -> str:
        await submit("p")
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        await RedisWorker(server.url, prefix=PREFIX, options=options).serve()
        prof.disable()
        took = time.perf_counter() - t
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        return f"{runs * STEPS / took:.0f} steps/s under the profiler\n" + out.getvalue()

    async def cpu() -> str:  # the same drain without the profiler: CPU time per step of the worker and of Redis
        await submit("c")
        r = redis.Redis(unix_socket_path=str(server.socket))
        before = _redis_cpu(r)
        c0 = time.process_time()
        await RedisWorker(server.url, prefix=PREFIX, options=options).serve()
        worker_us = (time.process_time() - c0) / (runs * STEPS) * 1e6
        redis_us = (_redis_cpu(r) - before) / (runs * STEPS) * 1e6
        return f"without the profiler: worker {worker_us:.0f} µs CPU per step, Redis {redis_us:.0f} µs CPU per step"

    options = WorkerOptions(burst=True, concurrency=256, llm=False, handle_signals=False)
    with serving_gc():
        return asyncio.run(cpu()) + "\n" + asyncio.run(main())


def drain(url: str, what: str) -> None:
    """Drain what was queued with one process, as ``--instructions`` counts it: ``flowdsl`` (an in-process
    burst worker, the garbage collector set as ``flowdsl worker`` sets it), ``flowdsl+metrics`` (the same, its
    steps timed for its Prometheus metrics, as with ``flowdsl worker --metrics-port``) or ``floor`` (the floor's
    loop, until the queue is empty)."""
    if what == "floor":
        floor_worker(url, until_empty=True)
        return
    from flowdsl.runtime.redis import RedisWorker, WorkerOptions
    from flowdsl.runtime.redis.metrics import WorkerMetrics
    from flowdsl.runtime.redis.serving import serving_gc

    async def serve() -> None:
        worker = RedisWorker(url, prefix=PREFIX, options=options)
        if what == "flowdsl+metrics":
            WorkerMetrics(worker)
        await worker.serve()

    options = WorkerOptions(burst=True, concurrency=256, llm=False, handle_signals=False)
    with serving_gc():
        asyncio.run(serve())


def instructions(server: Server, small: int = 100, large: int = 300) -> None:
    """Instructions per step of one process draining queued six-step runs, counted by callgrind: flowdsl's
    worker and the floor's loop. Each drains ``small`` and then ``large`` runs queued beforehand (by this
    process, not counted); the difference / (``large`` − ``small``) / 6 cancels start-up and imports. The
    figures do not depend on what else the machine is doing (Redis's own work is not counted)."""
    import re

    import redis

    from flowdsl import compile_text
    from flowdsl.runtime.redis import RedisClient

    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt-get install valgrind)")
    plan = compile_text(SPEC)

    async def submit(runs: int) -> None:
        async with RedisClient(server.url, prefix=PREFIX) as client:
            for i in range(0, runs, 250):
                await asyncio.gather(*(client.submit(plan, {}, run_id=f"i{j}") for j in range(i, min(runs, i + 250))))

    def count(what: str, runs: int) -> int:
        server.flush()
        if what == "floor":
            r = redis.Redis.from_url(server.url)
            r.xgroup_create("floor:q", "g", id="0", mkstream=True)
            pipe = r.pipeline(transaction=False)
            for i in range(runs):
                pipe.xadd("floor:q", {"r": f"r{i}", "s": "1"})
            pipe.execute()
        else:
            asyncio.run(submit(runs))
        code = f"from benchmarks.bench_redis import drain; drain({server.url!r}, {what!r})"
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                              "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True).stderr
        found = re.search(r"Collected : (\d+)", out)
        assert found is not None, out
        return int(found.group(1))

    per_step = {}
    for what in ("floor", "flowdsl", "flowdsl+metrics"):
        per_step[what] = (count(what, large) - count(what, small)) / ((large - small) * STEPS)
        print(f"{what}: {per_step[what] / 1e3:.1f}k instructions per step", flush=True)
    print(f"flowdsl's worker: ×{per_step['flowdsl'] / per_step['floor']:.1f} the floor's loop; its metrics cost "
          f"{(per_step['flowdsl+metrics'] - per_step['flowdsl']) / 1e3:.1f}k instructions per step")


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --- the floor: bare Redis Streams ---------------------------------------------------------------------


def floor_worker(url: str, until_empty: bool = False) -> None:
    """The floor's worker process: read a step, queue the next one, acknowledge — in pipelined batches
    (``until_empty``: return once a read finds nothing, as ``--instructions`` needs)."""
    import redis

    r = redis.Redis.from_url(url)
    with contextlib.suppress(redis.ResponseError):
        r.xgroup_create("floor:q", "g", id="0", mkstream=True)
    while True:
        reply = r.xreadgroup("g", "w", {"floor:q": ">"}, count=256, block=1 if until_empty else 1000)
        if not reply:
            if until_empty:
                return
            continue
        pipe = r.pipeline(transaction=False)
        for entry_id, fields in reply[0][1]:
            step = int(fields[b"s"])
            if step < STEPS:
                pipe.xadd("floor:q", {b"r": fields[b"r"], b"s": str(step + 1)})
            else:
                pipe.xadd("floor:done", {b"r": fields[b"r"]})
            pipe.xack("floor:q", "g", entry_id)
            pipe.xdel("floor:q", entry_id)
        pipe.execute()


def bench_floor(server: Server, runs: int, latency_runs: int) -> dict[str, float]:
    import redis

    server.flush()
    r = redis.Redis.from_url(server.url)
    r.xgroup_create("floor:q", "g", id="0", mkstream=True)
    code = f"from benchmarks.bench_redis import floor_worker; floor_worker({server.url!r})"
    proc = _spawn([sys.executable, "-c", code])
    try:
        last = "0-0"

        def wait_done(n: int) -> None:
            nonlocal last
            seen = 0
            while seen < n:
                reply = r.xread({"floor:done": last}, count=1000, block=1000)
                for _, entries in reply or ():
                    seen += len(entries)
                    last = entries[-1][0]

        r.xadd("floor:q", {"r": "warm", "s": "1"})
        wait_done(1)
        lat = []
        for i in range(latency_runs):
            t = time.perf_counter()
            r.xadd("floor:q", {"r": f"l{i}", "s": "1"})
            wait_done(1)
            lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i in range(runs):
            pipe.xadd("floor:q", {"r": f"r{i}", "s": "1"})
        pipe.execute()
        wait_done(runs)
        took = time.perf_counter() - t0
        return {"steps_per_s": runs * STEPS / took, "latency_ms": statistics.median(lat) * 1000, "seconds": took}
    finally:
        _stop([proc])


# --- Celery ---------------------------------------------------------------------------------------------


@functools.cache  # one app per broker: every row uses the same server
def celery_app(url: str | None = None) -> Any:
    from celery import Celery

    broker = (url or os.environ["FLOWDSL_BENCH_REDIS"]).replace("unix://", "redis+socket://")
    app = Celery("bench", broker=broker, backend=broker)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)

    @app.task(name="bench.celery_step")
    def step(previous: Any = None) -> dict[str, Any]:
        return {}

    return app


if os.environ.get("FLOWDSL_BENCH_REDIS"):  # a `celery worker` importing this module
    app = celery_app()


def bench_celery(server: Server, workers: int, runs: int, latency_runs: int,
                 pool: str = "prefork") -> dict[str, float] | None:
    """``pool`` prefork: one ``celery worker`` with ``workers`` pool processes (plus its consumer process);
    solo: ``workers`` separate ``celery worker --pool solo`` processes, each running tasks itself, as a
    ``flowdsl worker`` does (for no-op tasks the faster of the two on this machine)."""
    try:
        import celery  # noqa: F401
    except ImportError:
        print("Celery is not installed: skipping it (pip install -e '.[bench]')", file=sys.stderr)
        return None
    from celery import chain

    server.flush()
    env = {"FLOWDSL_BENCH_REDIS": server.url}
    command = [sys.executable, "-m", "celery", "-A", "benchmarks.bench_redis", "worker", "--loglevel", "WARNING"]
    shapes = [["--pool", "prefork", "--concurrency", str(workers)]] if pool == "prefork" else \
        [["--pool", "solo", "--hostname", f"solo{i}@%h"] for i in range(workers)]
    procs = [subprocess.Popen(command + shape, cwd=ROOT, env={**_env(), **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for shape in shapes]
    app = celery_app(server.url)
    step = app.tasks["bench.celery_step"]
    try:
        def one() -> Any:
            return chain(*[step.s() for _ in range(STEPS)]).apply_async()

        while len(app.control.ping(timeout=0.5)) < len(procs):  # every worker process is consuming
            time.sleep(0.1)
        one().get(timeout=60)  # warm-up
        lat = []
        for _ in range(latency_runs):
            t = time.perf_counter()
            one().get(timeout=60)
            lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        ids = [one().id for _ in range(runs)]
        # AsyncResult.get() on 2,000 pending results hangs in Celery 5.x: watch the result keys
        _wait_all(server.url, ids, lambda pipe, t: pipe.exists(f"celery-task-meta-{t}"), bool)
        took = time.perf_counter() - t0
        return {"steps_per_s": runs * STEPS / took, "latency_ms": statistics.median(lat) * 1000, "seconds": took}
    finally:
        _stop(procs)


# --- the report ------------------------------------------------------------------------------------------


Row = dict[str, float] | None
FLOOR = "floor (bare Redis Streams, 1 process)"


def measure_round(server: Server, runs: int, latency_runs: int) -> dict[str, Row]:
    """Every row once, one after the other: the floor, flowdsl with 1 and 2 processes, Celery's four shapes."""
    rows: dict[str, Row] = {FLOOR: bench_floor(server, runs, latency_runs)}
    for n in (1, 2):
        rows[_flowdsl_row(n)] = bench_flowdsl(server, n, runs, latency_runs)
    for n in (1, 2):
        for pool in ("prefork", "solo"):
            rows[_celery_row(pool, n)] = bench_celery(server, n, runs, latency_runs, pool)
    return rows


def ratios(rows: dict[str, Row]) -> dict[int, dict[str, float]]:
    """Per flowdsl row (1, 2 processes): its share of the floor's throughput and, against Celery's better
    figure of its two pools with as many processes, its throughput and latency ratios."""
    out: dict[int, dict[str, float]] = {}
    floor = rows[FLOOR]
    for n in (1, 2):
        fd = rows[_flowdsl_row(n)]
        assert fd is not None and floor is not None
        out[n] = {"floor": fd["steps_per_s"] / floor["steps_per_s"]}
        celery = [row for pool in ("prefork", "solo") if (row := rows[_celery_row(pool, n)]) is not None]
        if celery:
            out[n]["celery"] = fd["steps_per_s"] / max(c["steps_per_s"] for c in celery)
            out[n]["latency"] = fd["latency_ms"] / min(c["latency_ms"] for c in celery)
    return out


def print_round(rows: dict[str, Row]) -> None:
    print(f"{'':36s} {'steps/s':>9s} {'median run':>11s}")
    for name, row in rows.items():
        if row is None:
            print(f"{name:36s} {'skipped':>9s}")
        else:
            print(f"{name:36s} {row['steps_per_s']:9.0f} {row['latency_ms']:9.1f} ms")
    for n, r in ratios(rows).items():
        print(_ratio_line(n, r))


def _ratio_line(n: int, r: dict[str, float]) -> str:
    line = f"flowdsl ({n}): {r['floor']:.0%} of the floor's throughput"
    if "celery" in r:
        line += f", {r['celery']:.1f}× Celery's throughput, latency {r['latency']:.2f}× Celery's"
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every row this many times, one round after another; print each round and "
                             "the median of each ratio over the rounds")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of an in-process worker")
    parser.add_argument("--instructions", action="store_true",
                        help="count the instructions per step of one flowdsl worker and of the floor's loop "
                             "(callgrind), not time")
    args = parser.parse_args(argv)
    server = Server()
    rounds: list[dict[str, Row]] = []
    try:
        if args.profile:
            print(profile_flowdsl(server, min(args.runs, 1000)))
            return
        if args.instructions:
            instructions(server)
            return
        import redis

        print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"Redis {server.version}, redis-py {redis.__version__}, {args.runs} runs × {STEPS} steps", flush=True)
        for i in range(args.rounds):
            rounds.append(measure_round(server, args.runs, args.latency_runs))
            if args.rounds > 1:
                print(f"round {i + 1} of {args.rounds}")
            print_round(rounds[-1])
            sys.stdout.flush()
    finally:
        server.stop()
    if len(rounds) > 1:  # each round's ratios compare rows measured minutes apart at most; their median
        print(f"median over {len(rounds)} rounds of each round's ratios")
        per = [ratios(rows) for rows in rounds]
        for n in (1, 2):
            keys = per[0][n].keys()
            print(_ratio_line(n, {k: statistics.median(r[n][k] for r in per) for k in keys}))


def _flowdsl_row(n: int) -> str:
    return f"flowdsl, {n} worker process{'es' if n > 1 else ''}"


def _celery_row(pool: str, n: int) -> str:
    return f"Celery chain, {pool} {n} process{'es' if n > 1 else ''}"


if __name__ == "__main__":
    main()
