"""A worker process's Prometheus metrics (``flowdsl worker --metrics-port``) and its JSON log lines
(``--log-format json``): what they say matches what the process did and what Redis holds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tests.runtime.workers  # noqa: F401  (registers the conf.* workers this process serves)
from flowdsl import compile_text
from flowdsl.runtime.redis import RedisClient
from flowdsl.runtime.redis.metrics import WorkerMetrics
from flowdsl.workers import WorkerRegistry
from tests.redis.inproc import serving, worker_here
from tests.redis.procs import ROOT, worker_env
from tests.runtime.conformance import HEADER

SAGA = HEADER.format(name="saga") + "steps:\n  - conf.a: {compensate: undo.a}\n  - conf.b\n"
ENDS = ("completed", "failed", "compensated", "needs_intervention", "cancelled")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) → value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def steps(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[tuple[str, str, str], float]:
    """The step histogram's counts: (worker, kind, outcome) → steps."""
    return {(d["worker"], d["kind"], d["outcome"]): v for (name, labels), v in found.items()
            if name == "flowdsl_step_duration_seconds_count" for d in [dict(labels)]}


async def ended(client: RedisClient, run_id: str) -> str:
    for _ in range(600):
        status = (await client.info(run_id)).status
        if status in ENDS:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not end")


def test_the_metrics_count_each_step_by_worker_and_outcome_each_run_end_and_what_redis_holds(
        url: str, prefix: str, tmp_path: Path) -> None:
    worker = worker_here(url, prefix, llm=False)
    release = tmp_path / "go"

    async def body() -> tuple[str, str, list[str]]:
        metrics = WorkerMetrics(worker)
        async with RedisClient(url, prefix=prefix) as client:
            ok = await client.submit(compile_text(SAGA), {"script": {}})
            bad = await client.submit(compile_text(SAGA), {"script": {"b": {"raise": "Declined"}}})
            statuses = [await ended(client, ok.run_id), await ended(client, bad.run_id)]
            held = await client.submit(compile_text(SAGA), {"script": {"a": {"after": str(release)}}})
            while not worker.in_flight:  # (its first step waits for the file)
                await asyncio.sleep(0.02)
            during = await asyncio.to_thread(generate_latest, metrics.registry)  # (a scrape is off the loop)
            release.touch()
            statuses.append(await ended(client, held.run_id))
            after = await asyncio.to_thread(generate_latest, metrics.registry)
        return during.decode(), after.decode(), statuses

    during_text, after_text, statuses = asyncio.run(serving([worker], body))
    assert statuses == ["completed", "compensated", "completed"]
    during, after = samples(during_text), samples(after_text)
    assert during[("flowdsl_worker_steps_in_flight", ())] == 1
    assert after[("flowdsl_worker_steps_in_flight", ())] == 0
    assert steps(after) == {("conf.a", "task", "succeeded"): 3, ("conf.b", "task", "succeeded"): 2,
                            ("conf.b", "task", "failed"): 1, ("undo.a", "compensate", "succeeded"): 1}
    assert after[("flowdsl_step_duration_seconds_sum", (("kind", "task"), ("outcome", "succeeded"),
                                                        ("worker", "conf.a")))] > 0
    assert {dict(labels)["status"]: v for (name, labels), v in after.items()
            if name == "flowdsl_runs_finished_total"} == {"completed": 2, "compensated": 1, "failed": 0,
                                                           "cancelled": 0, "needs_intervention": 0}
    assert after[("flowdsl_worker_steps_executed_total", ())] == 7
    assert after[("flowdsl_worker_runs_started_total", ())] == 3
    assert after[("flowdsl_worker_transitions_total", ())] >= 3
    assert after[("flowdsl_worker_slots", ())] == 32
    info = next(dict(labels) for (name, labels), _ in after.items() if name == "flowdsl_worker_info")
    assert info["name"] == worker.name and info["prefix"] == prefix
    # what Redis holds, asked at the scrape: the streams this process serves, its prefix's runs
    assert after[("flowdsl_redis_up", ())] == 1
    assert {dict(labels)["stream"] for (name, labels), _ in after.items()
            if name == "flowdsl_queue_depth"} == set(worker.streams)
    assert all(v == 0 for (name, _), v in after.items() if name in ("flowdsl_queue_depth", "flowdsl_queue_pending"))
    assert after[("flowdsl_runs_listed", ())] == 3
    assert after[("flowdsl_dead_letters", ())] == 0
    assert ("process_cpu_seconds_total", ()) in after  # (the process collector: CPU, memory, open files)
    assert any(name == "python_gc_collections_total" for name, _ in after)  # (the garbage collector's)


def test_a_scrape_while_redis_does_not_answer_says_so_and_still_gives_the_process_s_counts(tmp_path: Path) -> None:
    worker = worker_here(f"unix://{tmp_path}/nothing-here.sock", "t", llm=False)

    async def body() -> str:
        metrics = WorkerMetrics(worker)
        while getattr(worker, "store", None) is None:  # (serve() has built its connections, and keeps retrying)
            await asyncio.sleep(0.01)
        return (await asyncio.to_thread(generate_latest, metrics.registry)).decode()

    found = samples(asyncio.run(serving([worker], body)))
    assert found[("flowdsl_redis_up", ())] == 0
    assert not any(name == "flowdsl_queue_depth" for name, _ in found)
    assert found[("flowdsl_worker_steps_executed_total", ())] == 0


def test_a_scrape_while_a_step_blocks_the_worker_s_loop_says_the_loop_not_redis(url: str, prefix: str,
                                                                                 tmp_path: Path) -> None:
    began = tmp_path / "began"

    async def blocking(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
        began.touch()
        time.sleep(3)  # (a CPU-bound step in an async worker: the loop does nothing else meanwhile)
        return {}

    registry = WorkerRegistry()
    registry.register("blocks.loop", blocking)
    worker = worker_here(url, prefix, registry, llm=False)
    plan = compile_text("flowdsl: 1\nname: blocks\nsteps:\n  - b: {worker: blocks.loop}\n")

    def scrape_once_it_blocks(metrics: WorkerMetrics) -> str:
        while not began.exists():
            time.sleep(0.01)
        return generate_latest(metrics.registry).decode()

    async def body() -> tuple[str, str]:
        metrics = WorkerMetrics(worker)
        async with RedisClient(url, prefix=prefix) as client:
            run = await client.submit(plan, {})
            blocked = await asyncio.to_thread(scrape_once_it_blocks, metrics)
            await ended(client, run.run_id)
        return blocked, (await asyncio.to_thread(generate_latest, metrics.registry)).decode()

    blocked_text, after_text = asyncio.run(serving([worker], body))
    blocked, after = samples(blocked_text), samples(after_text)
    assert blocked[("flowdsl_worker_loop_responsive", ())] == 0
    assert ("flowdsl_redis_up", ()) not in blocked  # (a blocked loop says nothing of Redis)
    assert not any(name == "flowdsl_queue_depth" for name, _ in blocked)
    assert after[("flowdsl_worker_loop_responsive", ())] == 1 and after[("flowdsl_redis_up", ())] == 1


def test_many_scrapes_at_once_ask_redis_one_question_at_a_time_on_one_connection_closed_at_the_end(
        url: str, prefix: str) -> None:
    worker = worker_here(url, prefix, llm=False)

    async def body() -> tuple[list[str], list[str], str]:
        metrics = WorkerMetrics(worker)
        async with RedisClient(url, prefix=prefix) as client:
            while not await client.redis.hexists(client.keys.workers, worker.name):  # (serving: connected)
                await asyncio.sleep(0.02)
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            texts = await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(
                pool, generate_latest, metrics.registry) for _ in range(48)))
        async with RedisClient(url, prefix=prefix) as client:
            names = [c.get("name", "") for c in await client.redis.client_list()]
            await metrics.aclose()
            after = [c.get("name", "") for c in await client.redis.client_list()]
        closed = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
        return [t.decode() for t in texts], [n for n in names if n == f"flowdsl-metrics:{worker.name}"], \
            closed if not any(n == f"flowdsl-metrics:{worker.name}" for n in after) else "still connected"

    texts, connections, closed = asyncio.run(serving([worker], body))
    assert all(samples(t)[("flowdsl_redis_up", ())] == 1 for t in texts)
    assert len(connections) == 1  # (the worker's own pool is not used, nor grown, by scrapes)
    assert samples(closed)[("flowdsl_redis_up", ())] == 0  # (closed: no connection opened again)


def _worker(url: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from flowdsl.cli import main; main()", "worker", "--redis-url",
                             url, "--prefix", prefix, "-w", "tests.runtime.workers", "--no-llm", *args],
                            cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _lines_until(proc: subprocess.Popen[str], needle: str, seen: list[str]) -> str:
    deadline = time.monotonic() + 30
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} from the worker: {''.join(seen)}")


def test_flowdsl_worker_serves_its_metrics_over_http_and_logs_json_lines(url: str, prefix: str) -> None:
    proc = _worker(url, prefix, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--log-format", "json")
    lines: list[str] = []
    try:
        where = json.loads(_lines_until(proc, "metrics at http://", lines))["message"].split()[-1]
        _lines_until(proc, "serving", lines)

        async def submit() -> str:
            async with RedisClient(url, prefix=prefix) as client:
                run = await client.submit(compile_text(SAGA), {"script": {"b": {"raise": "Declined",
                                                                                "message": "no funds"}}})
                return run.run_id if await ended(client, run.run_id) == "compensated" else ""

        run_id = asyncio.run(submit())
        assert run_id
        with urllib.request.urlopen(where, timeout=10) as answer:
            assert answer.headers.get_content_type() == "text/plain"
            found = samples(answer.read().decode())
        assert steps(found) == {("conf.a", "task", "succeeded"): 1, ("conf.b", "task", "failed"): 1,
                                ("undo.a", "compensate", "succeeded"): 1}
        assert found[("flowdsl_runs_finished_total", (("status", "compensated"),))] == 1
        assert found[("flowdsl_redis_up", ())] == 1
        _lines_until(proc, f"run {run_id}", lines)
        os.kill(proc.pid, signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0
    records = [json.loads(line) for line in [*lines, *rest.splitlines(keepends=True)] if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    end = next(r for r in records if r.get("run_id") == run_id and r["logger"] == "flowdsl.redis")
    assert (end["level"], end["status"], end["error_type"], end["flow"]) == ("INFO", "compensated", "Declined",
                                                                             "saga")
    assert "no funds" in end["message"]
    step_lines = [r for r in records if r["logger"].startswith("flowdsl.worker.") and r.get("run_id") == run_id]
    assert all(r["idempotency_key"].startswith(run_id) for r in step_lines)
    assert records[-1]["message"].startswith(f"worker {records[0]['message'].split()[2].rstrip(':')} stopped: 3 step")
    assert records[0]["message"].startswith("flowdsl worker ")  # (the start line: a record, not rich text)
    # the metrics server stopped with the process
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(where.rsplit(":", 1)[1].split("/")[0]))) != 0


def test_a_metrics_port_already_taken_is_a_usage_error_said_on_one_line(url: str, prefix: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = _worker(url, prefix, "--burst", "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        json_mode = _worker(url, prefix, "--burst", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                            "--log-format", "json")
        outputs = [proc.communicate(timeout=60)[1] for proc in (text, json_mode)]
    assert (text.returncode, json_mode.returncode) == (2, 2)
    said = f"cannot serve metrics at 127.0.0.1:{port} (--metrics-host, --metrics-port): Address already in use"
    assert said in outputs[0] and "Traceback" not in outputs[0]
    records = [json.loads(line) for line in outputs[1].splitlines()]
    assert records[-1]["level"] == "ERROR" and records[-1]["message"] == said


def test_the_metrics_options_are_checked(url: str, prefix: str) -> None:
    proc = _worker(url, prefix, "--burst", "--metrics-port", "70000")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--metrics-port" in err and "Traceback" not in err
    proc = _worker(url, prefix, "--burst", "--log-format", "xml")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--log-format" in err and "Traceback" not in err
    proc = _worker(url, prefix, "--burst", "--metrics-host", "127.0.0.1")  # (no port: nothing would be served)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "give --metrics-port too" in " ".join(err.split()) and "Traceback" not in err


def test_json_logs_replace_the_root_handlers_a_worker_module_sets_up_and_take_warnings_as_records(
        url: str, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "noisy_workers.py").write_text(
        "import logging, sys, warnings\n"
        "warnings.warn('an old api', DeprecationWarning, stacklevel=1)\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='TEXT %(message)s', force=True)\n"
        "logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))\n"
        "import flowdsl\n"
        "@flowdsl.worker('noisy.step')\n"
        "async def step(data, ctx):\n"
        "    logging.getLogger('noisy').info('from the step')\n"
        "    warnings.warn('careful', UserWarning, stacklevel=1)\n"
        "    return {}\n")

    async def submit() -> None:
        async with RedisClient(url, prefix=prefix) as client:
            await client.submit(compile_text("flowdsl: 1\nname: noisy\nsteps:\n  - s: {worker: noisy.step}\n"),
                                {})

    asyncio.run(submit())
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "from flowdsl.cli import main; main()", "worker",
                           "--redis-url", url, "--prefix", prefix, "-w", "noisy_workers", "--no-llm", "--burst",
                           "--log-format", "json"], cwd=tmp_path,
                          env=worker_env({"PYTHONPATH": f"{ROOT}:{tmp_path}"}), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # (every line: a JSON object)
    assert any(r["logger"] == "py.warnings" and "an old api" in r["message"] for r in records)
    assert any(r["logger"] == "py.warnings" and "careful" in r["message"] for r in records)
    assert [r["message"] for r in records if r["logger"] == "noisy"] == ["from the step"]
