"""A worker process's Prometheus metrics: what it did, what it holds, and the depth of the queues it serves.

Stage: runtime: redis. Imports prometheus_client (lazily: only a process that serves metrics pays for it),
``flowdsl.kernel`` (its end states), this package's ``keys`` and ``connection``, and stdlib; the worker it reads
is given to it, never imported.

``flowdsl worker --metrics-port PORT`` serves them at ``http://HOST:PORT/metrics`` (prometheus_client's own
threaded HTTP server); docs/runtime.md, "Metrics", lists them. They are read when scraped, not kept up to date:

- the process's counters (:class:`~flowdsl.runtime.redis.serving.WorkerStats`) and the runs whose end it wrote,
  by end state — plain integers the process counts anyway, read from the scraping thread;
- each step it executed, by worker, kind and outcome, with its duration (a histogram): the one cost on the hot
  path, taken only while metrics are served (:attr:`RedisWorker.on_step`);
- what Redis holds for the streams it serves (depth and pending entries), the armed timers, the dead letters
  and the runs listed — asked on the worker's own event loop, over a connection of the metrics' own, one
  question at a time however many scrape at once (a scrape that waited takes the answer of the one it waited
  for), at most :data:`SAMPLE_TIMEOUT_S`; when Redis does not answer in time ``flowdsl_redis_up`` is 0, when the
  loop does not take the question up in time ``flowdsl_worker_loop_responsive`` is 0 (and ``flowdsl_redis_up``
  is left out), when Redis refuses it (an ACL user without a command: said once in the log) Redis is up — in
  each case those gauges are left out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.kernel import END_STATES
from flowdsl.runtime.redis.connection import no_permission
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

log = logging.getLogger("flowdsl.redis")

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

    ``registry`` (default: a new one holding this collector, the step histogram, and prometheus_client's process,
    platform and garbage collector collectors) is what an HTTP server exposes; the worker's ``on_step`` is set
    to time its steps.
    ``loop``: the worker's event loop, on which Redis is asked at each scrape (None: the running loop).
    """

    def __init__(self, worker: RedisWorker, *, registry: CollectorRegistry | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Histogram
        from prometheus_client.platform_collector import PLATFORM_COLLECTOR

        self.worker = worker
        self.loop = loop or asyncio.get_running_loop()
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self._steps = Histogram("flowdsl_step_duration_seconds",
                                "steps this process executed, by worker, kind and outcome: how long each ran",
                                ["worker", "kind", "outcome"], buckets=STEP_BUCKETS, registry=registry)
        self._lock = threading.Lock()  # one question to Redis at a time, whatever the number of scrapes
        self._last: tuple[float, _Sample | None, str] | None = None  # (when, sample, state: see _sample)
        self._client: Any = None  # a connection of the metrics' own (made on the loop at the first scrape)
        self._closed = False
        self._refused_said = False
        self._children: dict[tuple[str, str, str], Any] = {}
        registry.register(self)
        worker.on_step = self.observe

    def observe(self, command: dict[str, Any], answer: str, seconds: float) -> None:
        """Count one step executed (the worker's ``on_step``)."""
        key = (str(command.get("worker") or "(llm)"), str(command.get("kind") or ""), _OUTCOMES.get(answer, answer))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._steps.labels(*key)
        child.observe(seconds)

    def describe(self) -> list[Metric]:
        return []  # (collected at each scrape: nothing to check at registration)

    async def aclose(self) -> None:
        """Close the metrics' own Redis connection (on the loop, once the HTTP server is closed)."""
        self._closed = True
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

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
        counts = dict(advancer.finished if advancer is not None else {})
        for status in sorted(END_STATES | set(counts)):  # (every end state from 0: rate() sees the first one)
            ended.add_metric([status], counts.get(status, 0))
        yield ended
        sample, state = self._shared_sample()
        yield GaugeMetricFamily("flowdsl_worker_loop_responsive", f"whether the worker's event loop took up this "
                                f"scrape's question within {SAMPLE_TIMEOUT_S:g} s (0: a step or the process blocks "
                                "it)", value=0 if state == "blocked" else 1)
        if state != "blocked":  # (a blocked loop says nothing of Redis: flowdsl_redis_up is left out then)
            yield GaugeMetricFamily("flowdsl_redis_up", f"whether Redis answered this scrape within "
                                    f"{SAMPLE_TIMEOUT_S:g} s (a refusal is an answer)",
                                    value=1 if state in ("ok", "refused") else 0)
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

    def _shared_sample(self) -> tuple[_Sample | None, str]:
        """:meth:`_sample`, asked by one scrape at a time; a scrape that waited for another's question takes its
        answer (so that the worker's loop and Redis see one question, however many scrape at once)."""
        came = time.monotonic()
        with self._lock:
            if self._last is not None and self._last[0] >= came:  # (answered while this scrape waited)
                return self._last[1], self._last[2]
            sample, state = self._sample()
            self._last = (time.monotonic(), sample, state)
            return sample, state

    def _sample(self) -> tuple[_Sample | None, str]:
        """What Redis holds now, asked on the worker's loop, and how that went: ``ok``; ``down`` (Redis did not
        answer in time, or the process is not connected, or has stopped); ``refused`` (an ACL refusal: said once
        in the log); ``blocked`` (the worker's loop did not take the question up in time)."""
        if self._closed or getattr(self.worker, "store", None) is None or self.loop.is_closed():
            return None, "down"
        started = threading.Event()
        coro = self._ask(started)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # (the loop closed meanwhile)
            coro.close()
            return None, "down"
        try:
            return future.result(SAMPLE_TIMEOUT_S), "ok"
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None, "down" if started.is_set() else "blocked"
        except Exception as exc:  # (Redis unreachable, or refusing: said by the gauge, and by the worker's own log)
            if no_permission(exc) and not self._refused_said:
                self._refused_said = True  # (once: each refusal is also an ACL LOG entry on the server)
                log.warning("worker %s: metrics: Redis refused this process's ACL user a command the scrape asks "
                            "(%s); the queue, timer, dead-letter and run gauges are left out (docs/runtime.md, "
                            "\"ACL users\")", self.worker.name, exc)
            return None, "refused" if no_permission(exc) else "down"

    async def _ask(self, started: threading.Event) -> _Sample:
        started.set()
        if self._closed:
            raise ConnectionError("the metrics are closed")
        worker = self.worker
        keys = worker.keys
        if self._client is None:  # (its own connection: the worker's pool is not grown, nor used once closed)
            from flowdsl.runtime.redis.connection import connect

            self._client = connect(worker.url, client_name=f"flowdsl-metrics:{worker.name}", max_connections=1,
                                   socket_timeout=SAMPLE_TIMEOUT_S)
        pipe = self._client.pipeline(transaction=False)
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
