"""The CLI's ``flowdsl workers``: the worker processes serving a prefix, and the depth of its task queues.

Stage: CLI support for runtime: redis. Imports this package (``client``, ``keys``, ``connection``), the body runner
of :mod:`flowdsl.runtime.redis.commands` and :mod:`flowdsl.shown`; rich only through the console the CLI hands in.

What it reads is what the runtime already records: each worker process's liveness record in ``{<prefix>}:workers``
(written at its start and at every heartbeat, deleted when it stops gracefully, forgotten by the other processes
ten leases after its last beat), and the task streams ``{<prefix>}:task:<worker>`` and ``{<prefix>}:llm``.
The Redis commands it sends are bounded: ``TIME``, ``HGETALL`` of the records, at most :data:`SCAN_PAGES` ``SCAN``
pages (``COUNT`` :data:`SCAN_COUNT`) looking for task streams, then one pipelined round trip of ``XLEN`` and
``XPENDING`` (summary form) for each of at most :data:`MAX_QUEUES` streams.
"""

from __future__ import annotations

import textwrap
from typing import Any

import redis

from flowdsl.runtime.codec import loads
from flowdsl.runtime.redis.client import RedisClient, is_live
from flowdsl.runtime.redis.commands import _guarded, _json_out
from flowdsl.runtime.redis.connection import describe_url, resolve_url
from flowdsl.runtime.redis.keys import GROUP
from flowdsl.shown import visible

__all__ = ["MAX_QUEUES", "SCAN_COUNT", "SCAN_PAGES", "workers_command", "workers_report"]

#: the most ``SCAN`` pages read looking for task streams, and the keys each asks Redis to look at
SCAN_PAGES = 10
SCAN_COUNT = 10_000
#: the most task streams whose depth is read (those beyond are counted, not read)
MAX_QUEUES = 500
_WIDTH = 80


async def workers_report(client: RedisClient) -> dict[str, Any]:
    """The report ``flowdsl workers --format json`` prints (docs/runtime.md, ``flowdsl workers``)."""
    keys = client.keys
    raw = await client.store.call("HGETALL", keys.workers)
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    secs, micros = await client.redis.time()
    now = int(secs) * 1000 + int(micros) // 1000
    processes: list[dict[str, Any]] = []
    for name, value in items:
        try:
            record = loads(value)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            record = {}
        names = record.get("workers")
        processes.append({
            "name": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
            "live": is_live(record, now) if record else False,
            "age_ms": max(0, now - int(record["seen"])) if "seen" in record else None,
            "host": record.get("host"), "pid": record.get("pid"), "started": record.get("started"),
            "lease_ms": record.get("lease_ms"), "concurrency": record.get("concurrency"),
            "workers": [str(n) for n in names] if isinstance(names, list) else [],
            "llm": bool(record.get("llm")), "version": record.get("version"), "rules": record.get("rules")})
    processes.sort(key=lambda p: (not p["live"], p["name"]))
    served = {n for p in processes if p["live"] for n in p["workers"]}
    llm_served = any(p["live"] and p["llm"] for p in processes)

    # the task streams: those found by a bounded SCAN, and those of every name a record (live or not) lists
    task_prefix = keys.queue("")
    found: set[str] = set()
    complete: bool | None = True
    try:
        cursor, pages = 0, 0
        while pages < SCAN_PAGES:
            cursor, page = await client.redis.scan(cursor, match=task_prefix + "*", count=SCAN_COUNT)
            pages += 1
            found.update(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in page)
            if int(cursor) == 0:
                break
        else:
            complete = False
    except redis.ResponseError as exc:  # an ACL user without SCAN: only the names the records list
        if "NOPERM" not in str(exc):
            raise
        complete = None
    names = sorted({k[len(task_prefix):] for k in found} | {n for p in processes for n in p["workers"]})
    streams: list[tuple[str | None, str]] = [(n, keys.queue(n)) for n in names][:MAX_QUEUES]
    streams.append((None, keys.llm))
    async with client.redis.pipeline(transaction=False) as pipe:
        for _, stream in streams:
            pipe.xlen(stream)
            pipe.execute_command("XPENDING", stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
    queues = []
    for i, (worker, stream) in enumerate(streams):
        depth, pending = replies[2 * i], replies[2 * i + 1]
        if isinstance(depth, Exception):
            raise depth
        if isinstance(pending, Exception):
            if "NOGROUP" not in str(pending):
                raise pending
            pending = 0  # no process ever read this stream: nothing is delivered
        elif isinstance(pending, dict):  # (redis-py's reading of the summary form)
            pending = pending.get("pending") or 0
        else:
            pending = pending[0] or 0
        is_served = llm_served if worker is None else worker in served
        if worker is None and not (depth or pending or is_served):
            continue  # no LLM step was ever dispatched here and none would be served
        queues.append({"worker": worker, "llm": worker is None, "stream": stream, "depth": int(depth),
                       "pending": int(pending), "served": is_served})
    return {"prefix": keys.prefix, "now": now, "live": sum(p["live"] for p in processes), "processes": processes,
            "queues": queues, "unserved": [q["worker"] for q in queues if not q["served"] and not q["llm"]],
            "complete": complete, "more_queues": max(0, len(names) - MAX_QUEUES)}


def _ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s ago"
    if ms < 3_600_000:
        return f"{ms // 60_000}m{ms % 60_000 // 1000:02d}s ago"
    return f"{ms // 3_600_000}h{ms % 3_600_000 // 60_000:02d}m ago"


def _lines(report: dict[str, Any], where: str) -> list[str]:
    """The text of the report, every line at most 80 columns (a name longer than that on a line of its own)."""
    out: list[str] = []
    procs = report["processes"]
    live = report["live"]
    if not procs:
        head = f"no worker process is recorded in Redis at {where}"
    else:
        head = (f"{live} live worker process{'' if live == 1 else 'es'} in Redis at {where}"
                + ("" if live else " (none is live: start one with `flowdsl worker`)"))
    out += textwrap.wrap(head, _WIDTH, subsequent_indent="  ", break_on_hyphens=False)
    for p in procs:
        state = "live" if p["live"] else "NOT LIVE"
        out.append(f"  {visible(p['name'])}")
        facts = [f"{state}, last seen {_ago(p['age_ms'])}"]
        if p["host"] is not None or p["pid"] is not None:
            facts.append(f"host {visible(p['host'] if p['host'] is not None else '?')} pid "
                         f"{visible(p['pid'] if p['pid'] is not None else '?')}")
        if p["concurrency"] is not None:
            facts.append(f"slots {visible(p['concurrency'])}")
        if p["version"] is not None:
            facts.append(f"version {visible(p['version'])}")
        if p["rules"] is not None:
            facts.append(f"rules {visible(p['rules'])}")
        out += textwrap.wrap(" · ".join(facts), _WIDTH, initial_indent="    ", subsequent_indent="      ",
                             break_on_hyphens=False)
        serves = [visible(n) for n in p["workers"]] + (["(LLM steps)"] if p["llm"] else [])
        out += textwrap.wrap("serves: " + (", ".join(serves) or "nothing"), _WIDTH, initial_indent="    ",
                             subsequent_indent="      ", break_on_hyphens=False)
    queues = report["queues"]
    if queues:
        out += ["", "task queues (depth: XLEN, pending: delivered and not acknowledged):",
                f"  {'DEPTH':>7} {'PENDING':>7}  WORKER"]
        for q in queues:
            name = "(LLM steps)" if q["llm"] else visible(q["worker"])
            flag = "" if q["served"] else "  ! no live process serves it"
            out.append(f"  {q['depth']:>7} {q['pending']:>7}  {name}{flag}")
    if report["more_queues"]:
        out.append(f"  … and {report['more_queues']} more task queue(s), not read")
    if report["complete"] is False:
        out.append(f"(task queues looked for among the first {SCAN_PAGES * SCAN_COUNT} keys only: a queue "
                   "no record names may be missing)")
    elif report["complete"] is None:
        out.append("(SCAN was refused: only the queues of names some record lists are shown)")
    if report["unserved"]:
        out += textwrap.wrap("not served by any live process: " + ", ".join(visible(n) for n in report["unserved"]),
                             _WIDTH, subsequent_indent="  ", break_on_hyphens=False)
    return out


def workers_command(*, url: str | None, prefix: str | None, as_json: bool, console: Any) -> int:
    """List the worker processes recorded under the prefix and its task queues. Exit 0 (also when none is live),
    2 when Redis cannot be reached or refuses."""

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            report = await workers_report(client)
            where = f"{describe_url(resolve_url(url))} under the prefix '{client.keys.prefix}'"
        if as_json:
            _json_out(report)
            return 0
        from rich.markup import escape

        for line in _lines(report, where):
            console.print(escape(line), highlight=False, soft_wrap=True)
        return 0

    return _guarded(console, url, body)
