"""``flowdsl status`` of a Redis run still going: where each attempt in flight is — queued for a worker, and
whether any live process serves it, or running, and on which process — and what each of its waits waits for.

Stage: CLI support for runtime: redis. Imports this package's ``client`` (its reads), ``flowdsl.runtime.parking``
(how a signal is named) and :mod:`flowdsl.shown`; rich only through the console the CLI hands in.

A run's state says a step is ``running`` from its dispatch on; what became of the dispatch is in the run's tasks
hash (docs/runtime.md, "The Redis data model": ``q`` queued, ``r:<token>`` running, ``xq``/``xr:<token>`` a cancel
requested, the token naming the process that holds it) and in the worker processes' liveness records. A step
whose worker no live process serves waits in its queue for ever (or until its schedule-to-start timeout): that is
said plainly, with the command that would serve it.

A ``wait`` node holds no attempt: while it waits, the run's state lists it under ``waits`` (docs/kernel.md,
"Waits"), and its timer — a timer wait's end, a signal wait's deadline — is in the timer set like any other
(:func:`waits`): said with how long it has waited and, for a signal, the command that sends it — with the key of a
keyed wait's instance (``--key``). A timer whose time has passed is said to be overdue, and, when no worker process
is live, that nothing fires it until one runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowdsl.runtime.parking import signal_named
from flowdsl.shown import UNSAFE, visible

if TYPE_CHECKING:
    from flowdsl.runtime.redis.client import Journal, RedisClient

__all__ = ["InFlight", "Waiting", "in_flight", "say_in_flight", "say_waiting", "span", "waits"]


@dataclass(frozen=True)
class InFlight:
    """One attempt the run has in flight, as Redis holds it now."""

    step: str  # its instance key
    task_id: str
    attempt: int
    kind: str  # task, llm, fallback, compensate
    worker: str | None  # None: an LLM step's call (the LLM stream)
    state: str  # queued, running, cancelling (queued or running, a cancel requested)
    process: str | None  # the worker process holding it (running), else None
    process_live: bool | None  # whether that process was seen recently (None: nobody holds it)
    served_by: int  # live processes that serve its queue
    age_ms: int | None  # since its dispatch (None: its dispatch is not in the journal read)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "task_id": self.task_id, "attempt": self.attempt, "kind": self.kind,
                "worker": self.worker, "state": self.state, "process": self.process,
                "process_live": self.process_live, "served_by": self.served_by, "age_ms": self.age_ms}


async def in_flight(client: RedisClient, run_id: str, journal: Journal) -> list[InFlight]:
    """The attempts ``run_id`` has in flight (its tasks hash), each with its step and worker (from the dispatch's
    ``step_scheduled`` event in ``journal``) and who serves or holds it (the liveness records), in dispatch
    order."""
    raw = await client.store.call("HGETALL", client.keys.tasks(run_id))
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    leases = {_text(field): _text(value) for field, value in items}
    leases = {task_id: lease for task_id, lease in leases.items() if task_id[:2] not in ("d:", "g:")}  # (no
    # deadlines, no given-up marks: the attempts)
    if not leases:
        return []
    scheduled = {e.get("task_id"): e for e in journal.events if e.get("type") == "step_scheduled"}
    records = await client.workers(every=True)  # (a holder's record too, if it is no longer live)
    secs, micros = await client.redis.time()
    now = int(secs) * 1000 + int(micros) // 1000
    live = [r for r in records if r["live"]]
    live_names = {r["name"] for r in live}
    found = []
    order = {task_id: i for i, task_id in enumerate(scheduled)}
    for task_id, lease in leases.items():
        event = scheduled.get(task_id) or {}
        kind = str(event.get("task_kind") or event.get("kind") or "task")
        worker = None if kind == "llm" else (str(event["worker"]) if event.get("worker") else None)
        holder = lease.split("|")[1] if lease.startswith(("r:", "xr:")) and lease.count("|") >= 2 else None
        served = sum(1 for r in live if (r.get("llm") if worker is None else worker in (r.get("workers") or ())))
        at = event.get("at")
        found.append(InFlight(
            step=str(event.get("step") or task_id.rsplit("#", 1)[0].removeprefix(run_id + "/")), task_id=task_id,
            attempt=int(event.get("attempt") or 0), kind=kind, worker=worker,
            state="cancelling" if lease.startswith("x") else "running" if holder is not None else "queued",
            process=holder, process_live=None if holder is None else holder in live_names, served_by=served,
            age_ms=max(0, now - at) if isinstance(at, int) else None))
    found.sort(key=lambda f: order.get(f.task_id, len(order)))
    return found


@dataclass(frozen=True)
class Waiting:
    """One wait of the run that is waiting: for a signal (``signal``; ``key``, the key a keyed wait's instance takes
    it with), or for its timer (``signal`` None)."""

    step: str  # its instance key
    signal: str | None
    waited_ms: int | None  # since it started (None: its start time is not in the state)
    # a timer wait: until it ends; a signal wait: until its timeout (None: it has none); negative: overdue by that
    due_in_ms: int | None
    key: str | None = None  # a keyed wait's key (None: unkeyed, or a timer wait)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "signal": self.signal, "key": self.key, "waited_ms": self.waited_ms,
                "due_in_ms": self.due_in_ms}


def waits(plan: dict[str, Any], state: dict[str, Any], now: int) -> list[Waiting]:
    """The waits of a run (its kernel ``state``) that are waiting, in plan order, as of ``now`` (ms, the clock of
    the run's ``at`` times: the Redis server's)."""
    found = []
    for key, wait in (state.get("waits") or {}).items():
        rec = state["nodes"].get(key) or {}
        node = plan["nodes"].get(rec.get("node"), {})
        started = rec.get("started_at")
        waited = max(0, now - started) if isinstance(started, int) else None
        span = node.get("delay_ms") if node.get("signal") is None else node.get("timeout_ms")
        due = span - waited if isinstance(span, int) and waited is not None else None
        taken = wait.get("key") if isinstance(wait, dict) else None
        found.append((node.get("order", 0), Waiting(key, node.get("signal"), waited, due,
                                                    taken if isinstance(taken, str) else None)))
    return [w for _, w in sorted(found, key=lambda pair: pair[0])]


def say_waiting(console: Any, run_id: str, items: list[Waiting], live: int | None = None) -> None:
    """After a running run's timeline: a line per wait that is waiting — what for, how long so far, when its timer
    is due (or that it is overdue: with ``live`` 0, that no live worker process fires it), and for a signal the
    command that sends it."""
    from rich.markup import escape

    for item in items:
        due = item.due_in_ms
        if due is not None and due <= 0:
            late = ("its deadline passed" if item.signal is not None else "its time came") + f" {span(-due)} ago: " + (
                "overdue — no worker process is live to fire it: it fires as soon as one runs (`flowdsl worker`)"
                if live == 0 else "overdue, a worker process fires it now")
        if item.signal is None:
            said = f"wait {visible(item.step)}: waiting for its timer{_ago(item.waited_ms)}" + (
                "" if due is None else f"; it ends in {span(due)}" if due > 0 else f"; {late}")
        else:
            said = (f"wait {visible(item.step)}: waiting for {signal_named(item.signal, item.key)}"
                    f"{_ago(item.waited_ms)}"
                    + ("" if due is None else f" (it times out in {span(due)})" if due > 0 else f" ({late})")
                    + " — " + _sends(run_id, item.signal, item.key))
        console.print(f"[cyan]{escape(said)}[/]", highlight=False, soft_wrap=True)


def _sends(run_id: str, name: str, key: str | None) -> str:
    """How a waiting wait is sent its signal: the ``flowdsl signal`` command (with ``--key``, quoted for a shell
    when it must be, for a keyed wait), or, for a key no command line shows safely (a control or bidirectional
    formatting character, :data:`~flowdsl.shown.UNSAFE`), the Python call."""
    if key is None:
        return f"`flowdsl signal {visible(run_id)} {visible(name)} --data JSON` sends it"
    if UNSAFE.search(key) is not None:
        return (f"its key holds a character no command line shows safely: `RedisClient.signal({visible(run_id)!r}, "
                f"{visible(name)!r}, key=...)` sends it")
    return f"`flowdsl signal {visible(run_id)} {visible(name)} --key {shlex.quote(key)} --data JSON` sends it"


def span(ms: int, *, tenths: bool = True) -> str:
    """A duration in words for a person: ``12.5 s`` (``12 s`` without ``tenths``), ``40 min``, ``3.5 h``,
    ``2.0 days``."""
    seconds = ms / 1000
    if seconds < 90:
        return f"{seconds:.1f} s" if tenths else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _ago(ms: int | None) -> str:
    return "" if ms is None else f" for {ms / 1000:.1f} s"


def say_in_flight(console: Any, items: list[InFlight], modules: list[str]) -> None:
    """After a running run's timeline: a line per attempt in flight — a warning for one queued that no live
    process serves (with the command that would serve it, ``modules`` being the flow's worker modules) or held by
    a process no longer seen."""
    from rich.markup import escape

    serve = " ".join(f"-w {visible(m)}" for m in modules) or "-w MODULE"
    for item in items:
        what = f"step {visible(item.step)} (attempt {item.attempt}" + (
            f", {item.kind}" if item.kind not in ("task", "llm") else "") + ")"
        queue = "the LLM steps' queue" if item.worker is None else f"the queue of worker '{visible(item.worker)}'"
        if item.process is not None:
            said = f"{what}: running on {visible(item.process)}" + _ago(item.age_ms) + (
                ", a cancel requested" if item.state == "cancelling" else "")
            if not item.process_live:
                console.print(f"[yellow]warning[/]: {escape(said)}, a process not seen for more than three leases "
                              "(killed, paused, cut off): another process takes the attempt over once its lease "
                              "expires — if one serves it", highlight=False, soft_wrap=True)
                continue
            console.print(f"[dim]{escape(said)}[/]", highlight=False, soft_wrap=True)
        elif item.served_by:
            count = f"{item.served_by} live process{'es' if item.served_by > 1 else ''}"
            console.print(f"[dim]{escape(f'{what}: queued{_ago(item.age_ms)} in {queue}, served by {count}')}[/]",
                          highlight=False, soft_wrap=True)
        else:
            how = ("a process that runs LLM steps (`flowdsl worker` without --no-llm)" if item.worker is None else
                   f"`flowdsl worker {serve}`")
            console.print(f"[yellow]warning[/]: {escape(f'{what} has waited{_ago(item.age_ms)} in {queue}')}, which "
                          f"no live worker process serves: it waits until one does (start {escape(how)}), or until "
                          "its schedule-to-start timeout, if the run has one", highlight=False, soft_wrap=True)
