"""A worker process's Prometheus metrics: what it did, what it holds, and the depth of the queues it serves.

Stage: runtime: redis. Imports prometheus_client (lazily: only a process that serves metrics pays for it), this
package's ``keys`` and ``serving``, and stdlib; the worker it reads is given to it, never imported.

``flowdsl worker --metrics-port PORT`` serves them at ``http://HOST:PORT/metrics`` (prometheus_client's own
threaded HTTP server); docs/runtime.md, "Metrics", lists them. They are read when scraped, not kept up to date:

- the process's counters (:class:`~flowdsl.runtime.redis.serving.WorkerStats`) and the runs whose end it wrote,
  by end state — plain integers the process counts anyway, read from the scraping thread;
- each step it executed, by worker, kind and outcome, with its duration (a histogram): the one cost on the hot
  path, taken only while metrics are served (:attr:`RedisWorker.on_step`);
- what Redis holds for the streams it serves (depth and pending entries), the armed timers, the dead letters
  and the runs listed — asked on the worker's own event loop at each scrape, at most :data:`SAMPLE_TIMEOUT_S`;
  when Redis does not answer in time, ``flowdsl_redis_up`` is 0 and those gauges are left out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.redis.keys import GROUP

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from flowdsl.runtime.redis.worker import RedisWorker

__all__ = ["SAMPLE_TIMEOUT_S", "STEP_BUCKETS", "MetricsServer", "WorkerMetrics", "serve_metrics"]

#: how long a scrape waits for Redis to say what it holds before it reports ``flowdsl_redis_up 0``
SAMPLE_TIMEOUT_S = 2.0
#: the bounds of the step duration histogram's buckets, in seconds: from a trivial step to a long call
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: the answer's type of a step → its outcome label
_OUTCOMES = {"task_succeeded": "succeeded", "task_failed": "failed", "task_cancelled": "cancelled"}

#: the process's counters: (metric name, WorkerStats field, help)
_COUNTERS = (
    ("steps_executed", "tasks", "steps this process executed"),
    ("steps_chained", "chained", "steps this process dispatched to itself and ran next, with no trip through a "
                                 "stream"),
    ("entries_reclaimed", "reclaimed", "stream entries taken over from processes whose lease had expired"),
    ("deliveries_dropped", "dropped", "deliveries of tasks no longer in flight, or held by another delivery"),
    ("results_rejected", "rejected", "results of this process refused: its lease was lost, or the attempt had "
                                     "ended"),
    ("attempts_expired", "expired", "attempts not started: their step's timeout had passed before pickup"),
    ("late_results", "late", "rejected successes reported again once their task had ended"),
    ("timers_fired", "timers", "timers this process fired"),
    ("runs_started", "runs_started", "runs this process started"),
    ("tasks_handed_back", "handed_back", "tasks given back to their queue while stopping"),
    ("dead_letters", "dead_letters", "messages this process set aside as dead letters"),
    ("starts_resent", "starts_resent", "start requests sent again, of runs whose submitter never sent them"),
)


@dataclass
class _Sample:
    """What Redis held at a scrape: per served stream (depth, pending), and the shared keys' sizes."""

    streams: list[tuple[str, int, int]]
    timers: int
    dead_letters: int
    runs: int


class WorkerMetrics:
    """A prometheus_client collector of one :class:`~flowdsl.runtime.redis.worker.RedisWorker`.

    ``registry`` (default: a new one holding this collector, the step histogram, and the process and platform
    collectors) is what an HTTP server exposes; the worker's ``on_step`` is set to time its steps.
    ``loop``: the worker's event loop, on which Redis is asked at each scrape (None: the running loop).
    """

    def __init__(self, worker: RedisWorker, *, registry: CollectorRegistry | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, Histogram
        from prometheus_client.platform_collector import PLATFORM_COLLECTOR

        self.worker = worker
        self.loop = loop or asyncio.get_running_loop()
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self._steps = Histogram("flowdsl_step_duration_seconds",
                                "steps this process executed, by worker, kind and outcome: how long each ran",
                                ["worker", "kind", "outcome"], buckets=STEP_BUCKETS, registry=registry)
        registry.register(self)
        worker.on_step = self.observe

    def observe(self, command: dict[str, Any], answer: str, seconds: float) -> None:
        """Count one step executed (the worker's ``on_step``)."""
        self._steps.labels(str(command.get("worker") or "(llm)"), str(command.get("kind") or ""),
                           _OUTCOMES.get(answer, answer)).observe(seconds)

    def describe(self) -> list[Metric]:
        return []  # (collected at each scrape: nothing to check at registration)

    def collect(self) -> Iterator[Metric]:
        """The metrics as they stand (prometheus_client calls it from the scraping thread)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        from flowdsl import __version__, kernel

        worker = self.worker
        stats = worker.stats
        yield InfoMetricFamily("flowdsl_worker", "this worker process", value={
            "name": worker.name, "prefix": worker.keys.prefix, "version": __version__,
            "rules": str(worker.options.rules or kernel.STATE_VERSION)})
        yield GaugeMetricFamily("flowdsl_worker_start_time_seconds", "when this process started (Unix time)",
                                value=worker.started_at)
        yield GaugeMetricFamily("flowdsl_worker_slots", "steps this process may run at once (--concurrency)",
                                value=worker.options.concurrency)
        yield GaugeMetricFamily("flowdsl_worker_steps_in_flight", "stream entries this process holds now",
                                value=worker.in_flight)
        advancer = getattr(worker, "advancer", None)
        yield GaugeMetricFamily("flowdsl_worker_runs_cached", "run states kept in memory (--cache-runs)",
                                value=advancer.cached_runs if advancer is not None else 0)
        for name, field, text in _COUNTERS:
            yield CounterMetricFamily(f"flowdsl_worker_{name}", text, value=getattr(stats, field))
        # (the advancer's own counts: WorkerStats gets them only when the process stops)
        yield CounterMetricFamily("flowdsl_worker_transitions", "run transitions this process wrote",
                                  value=advancer.transitions if advancer is not None else 0)
        yield CounterMetricFamily("flowdsl_worker_conflicts", "transitions tried again because another process "
                                  "wrote the run first", value=advancer.conflicts if advancer is not None else 0)
        ended = CounterMetricFamily("flowdsl_runs_finished", "runs whose end this process wrote, by end state (a "
                                    "late completion that turns an ended run needs_intervention counts again)",
                                    labels=["status"])
        for status, count in sorted(dict(advancer.finished if advancer is not None else {}).items()):
            ended.add_metric([status], count)
        yield ended
        sample = self._sample()
        yield GaugeMetricFamily("flowdsl_redis_up", f"whether Redis answered this scrape within "
                                f"{SAMPLE_TIMEOUT_S:g} s", value=1 if sample is not None else 0)
        if sample is None:
            return
        depth = GaugeMetricFamily("flowdsl_queue_depth", "entries in a stream this process serves (XLEN)",
                                  labels=["stream"])
        pending = GaugeMetricFamily("flowdsl_queue_pending", "entries of a stream this process serves delivered "
                                    "to some process and not acknowledged", labels=["stream"])
        for stream, length, held in sample.streams:
            depth.add_metric([stream], length)
            pending.add_metric([stream], held)
        yield depth
        yield pending
        yield GaugeMetricFamily("flowdsl_timers_armed", "timers armed in Redis, due or not", value=sample.timers)
        yield GaugeMetricFamily("flowdsl_dead_letters", "messages set aside as dead letters and not deleted",
                                value=sample.dead_letters)
        yield GaugeMetricFamily("flowdsl_runs_listed", "runs listed in Redis: in flight, and finished ones not "
                                "yet expired", value=sample.runs)

    def _sample(self) -> _Sample | None:
        """What Redis holds now, asked on the worker's loop; None when it does not answer in time (or the process
        is not connected yet, or its loop is gone)."""
        if getattr(self.worker, "store", None) is None or self.loop.is_closed():
            return None
        try:
            future = asyncio.run_coroutine_threadsafe(self._ask(), self.loop)
        except RuntimeError:  # (the loop closed meanwhile)
            return None
        try:
            return future.result(SAMPLE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None
        except Exception:  # (Redis unreachable, or refusing: said by the gauge, and by the worker's own log)
            return None

    async def _ask(self) -> _Sample:
        worker = self.worker
        keys = worker.keys
        pipe = worker.client.pipeline(transaction=False)  # type: ignore[union-attr]
        for stream in worker.streams:
            pipe.xlen(stream)
            pipe.execute_command("XPENDING", stream, GROUP)
        pipe.zcard(keys.timers)
        pipe.xlen(keys.dead)
        pipe.zcard(keys.runs)
        replies = await pipe.execute(raise_on_error=False)
        streams = []
        for i, stream in enumerate(worker.streams):
            length, held = replies[2 * i], replies[2 * i + 1]
            if isinstance(length, Exception):
                raise length
            streams.append((stream, int(length), _pending(held)))
        rest = replies[2 * len(worker.streams):]
        for reply in rest:
            if isinstance(reply, Exception):
                raise reply
        return _Sample(streams, int(rest[0]), int(rest[1]), int(rest[2]))


def _pending(reply: Any) -> int:
    """The count of an ``XPENDING`` summary (0 when the stream has no group yet)."""
    if isinstance(reply, Exception):
        if "NOGROUP" in str(reply):
            return 0
        raise reply
    if isinstance(reply, dict):  # (redis-py's reading of the summary form)
        return int(reply.get("pending") or 0)
    return int(reply[0] or 0)


class MetricsServer:
    """The HTTP server of a worker's metrics (:func:`serve_metrics`); :meth:`close` stops it."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int):
        from prometheus_client import start_http_server

        self.metrics = metrics
        self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "localhost"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (waits for a scrape in progress, at most a few seconds)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def serve_metrics(worker: RedisWorker, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``worker``'s metrics at ``http://host:port/metrics`` (port 0: a free one, :attr:`MetricsServer.port`)
    until :meth:`MetricsServer.close`; called on the worker's event loop. Raises OSError when the address cannot
    be bound."""
    return MetricsServer(WorkerMetrics(worker), host, port)
