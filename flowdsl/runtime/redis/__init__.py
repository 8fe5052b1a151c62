"""The Redis runtime: durable, distributed runs — state, journal, task queues and timers in Redis.

Stage: runtime: redis. A thin I/O shell around ``flowdsl.kernel``: worker
processes (:class:`RedisWorker`, ``flowdsl worker``) run steps with
``flowdsl.runtime.execute`` and apply their outcomes through the kernel in
atomic transitions; clients (:class:`RedisClient`, ``flowdsl run --backend
redis``, ``status``, ``runs``, ``cancel``, ``signal``, ``dead-letters``, ``resolve``) submit and watch runs, send
signals to them, put back the messages set aside as dead letters, and record a person's resolution of a run that
needed one.
docs/runtime.md ("Redis runtime") states the guarantees and the data model.

Modules: ``keys`` (every key name), ``connection`` (URLs, backoff),
``scripts`` (the Lua transitions, auto-pipelining), ``store`` (reads and
writes), ``advance`` (kernel in, atomic write out: events applied) and its parts: ``advance_start`` (a run's
start), ``advance_commit`` (the atomic write, the relay), ``advance_end`` (a run's end counted and logged), with
``advance_common`` (outcomes, limits, chain offers, the per-run lock); ``worker`` (the process
loop) and its stages: ``reading`` (stream reading, dead letters), ``control``
(start and cancel requests, signals), ``tasks`` (held tasks: run, report, chain),
``late_results``, ``lifecycle`` (startup checks, signals, shutdown) and
``upkeep`` (background loops), with ``serving`` (options, stats, what a worker
holds) and ``metrics`` (a process's Prometheus metrics, served only when asked); ``client`` (submit and watch) and
its parts: ``client_listing`` (a run's line, the runs, the live processes; ``run_waits``, what a run waits for, kept
in its hash for the listing), ``client_follow`` (a run read and
followed), ``client_operator`` (cancel, start requests, resolve), ``client_signals`` (signals sent to runs),
``client_dead_letters``;
``wire`` (the lean connection), ``commands`` (the CLI's Redis commands).
"""

from __future__ import annotations

from flowdsl.runtime.redis.client import (
    DeadLetter,
    DeadLetterNotFound,
    NothingToResolve,
    RedisClient,
    Resolution,
    RunGone,
    RunIdTaken,
    RunInfo,
    RunNotFound,
    RunWaits,
    SignalIdReused,
    SignalOutcome,
    StartRequest,
    Submission,
    UnknownSignal,
)
from flowdsl.runtime.redis.connection import RedisConfigError, resolve_prefix, resolve_url
from flowdsl.runtime.redis.keys import Keys
from flowdsl.runtime.redis.serving import WorkerOptions, WorkerStats
from flowdsl.runtime.redis.store import RunDamaged
from flowdsl.runtime.redis.worker import RedisWorker

__all__ = ["DeadLetter", "DeadLetterNotFound", "Keys", "NothingToResolve", "RedisClient", "RedisConfigError",
           "RedisWorker", "Resolution", "RunDamaged", "RunGone", "RunIdTaken", "RunInfo", "RunNotFound", "RunWaits",
           "SignalIdReused", "SignalOutcome", "StartRequest", "Submission", "UnknownSignal", "WorkerOptions",
           "WorkerStats", "resolve_prefix", "resolve_url"]
