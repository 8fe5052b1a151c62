"""A run event by event: the live view while it goes, and the timeline of a recorded run (``flowdsl show``).

Stage: runtime (shared by every backend and the CLI). Imports the kernel's event names, ``.report``, ``.timing``,
``.parking``, ``.summary`` (its text helpers and the end summary) and stdlib at import time; rich only inside the
functions that draw (so ``flowdsl --help`` and library use stay light).

- :class:`LiveView` — the progress shown while a run goes: a rich ``Live`` table on
  stderr when stderr is a terminal (a real one: :func:`draws_live`), plain progress lines otherwise.
- :func:`print_timeline` — ``flowdsl show``: a recorded run, event by event, then the end summary;
  :func:`record_end_note`, what to say of a record that ends before its run did.
- :func:`late_completion_line`, :func:`undone_after_failure` — late answers as both say them; :func:`signal_line`,
  a signal sent to the run (a wait's own lines: ``.summary``'s :func:`~flowdsl.runtime.summary.wait_words`).

Text that is not flowdsl's own goes through ``.summary``'s ``_esc``, as there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flowdsl.kernel import END_STATES, INPUT_EVENTS
from flowdsl.runtime.parking import PARKED, SHOWN_WAITS, parked_text
from flowdsl.runtime.record import RESUMED, since_resumed
from flowdsl.runtime.report import NOT_STARTED, RunResult
from flowdsl.runtime.summary import (
    _clip,
    _console,
    _error_text,
    _esc,
    _seconds,
    _status,
    fallback_reason,
    print_summary,
    resume_command,
    wait_label,
    wait_words,
)
from flowdsl.runtime.timing import STEP_KINDS

if TYPE_CHECKING:
    from flowdsl.runtime.stopped import Standing

__all__ = ["LiveView", "draws_live", "late_completion_line", "print_timeline", "record_end_note", "signal_line",
           "undone_after_failure"]


#: what a ``runtime_resumed`` line's ``was`` says of the process before
_WAS = {"crashed": "died (the run was left where it stood)", "aborted": "stopped the run at once",
        "gone": "stopped (with --force: it could not be told from here)",
        "parked": "parked it (nothing was left but waiting)"}
_MARK = {"succeeded": "✓", "failed": "✗", "skipped": "–", "cancelled": "⊘", "running": "…", "retrying": "↻",
         "pending": "·", "cancelling": "⊘", "waiting": "⚐"}
#: the kernel's answers to a signal sent to the run (docs/kernel.md, "Waits")
_SIGNAL_EVENTS = ("signal_buffered", "signal_received", "signal_rejected")


def signal_line(e: Mapping[str, Any]) -> str | None:
    """A signal event as the live view and ``show`` say it (markup): ``signal 'paid' received by wait 'paid'``,
    ``signal 'paid' kept until wait 'paid' starts``, ``signal 'nope' rejected: <reason>`` — with its key when it
    has one, ``signal 'delivered' key '1Z9' received by wait 'parcels[1]/delivered'``; None for other events."""
    kind = e.get("type")
    key = e.get("key")
    name = f"{_esc(e.get('signal'))}'" + (f" key '{_esc(key)}'" if key is not None else "")
    if kind == "signal_buffered":
        wait = f"wait '{_esc(e.get('wait'))}'"
        until = f"an instance of {wait} starts with that key" if key is not None else f"{wait} starts"
        return f"[cyan]✉ signal '{name} kept until {until}[/]"
    if kind == "signal_received":
        kept = " (it had been kept until the wait started)" if e.get("buffered") else ""
        return f"[cyan]✉ signal '{name} received[/] by wait '{_esc(e.get('step'))}'{kept}"
    if kind == "signal_rejected":
        return f"[yellow]✉ signal '{name} rejected[/]: {_esc(e.get('reason'))}"
    return None


def late_completion_line(e: Mapping[str, Any], *, with_run_status: bool = False) -> str:
    """A ``late_completion`` event as the run display and ``show`` say it (markup): undone in the saga (kernel
    version 4, ``by_hand`` false) or left to run by hand."""
    step = _esc(e.get("step"))
    where = f", run {_esc(e.get('run_status'))}" if with_run_status else ""
    head = f"(attempt {_esc(e.get('attempt'))}{where})"
    if e.get("after_undo"):  # (kernel version 7)
        return (f"[bold red]! {step} completed again after it was undone[/] {head}: its effect stands; "
                f"{_esc(e.get('compensation'))} left to run again by hand")
    if e.get("by_hand", True):
        return (f"[bold red]! {step} completed late[/] {head}: its effect stands; {_esc(e.get('compensation'))} "
                "left to run by hand")
    if e.get("run_status") == "completed":  # (a step passed over, once the run had completed: rules 8)
        return f"[yellow]! {step} completed late[/] {head}: its effect stands, and nothing is undone"
    if e.get("run_status") == "running":  # (a step passed over, while the run goes on: rules 8)
        return (f"[yellow]! {step} completed late[/] {head}: its effect stands; undone by "
                f"{_esc(e.get('compensation'))} if the run compensates")
    return f"[yellow]! {step} completed late[/] {head}: undone with the rest by {_esc(e.get('compensation'))}"


def undone_after_failure(e: Mapping[str, Any]) -> str:
    """What a ``compensation_succeeded`` adds when its undo had failed for good (kernel version 5), for the run display
    and ``show``; empty otherwise."""
    if not e.get("after_failure"):
        return ""
    return (f": undo attempt {_esc(e.get('attempt'))}, given up on when it timed out, completed after all — "
            "nothing to undo by hand for it")


def draws_live(console: Any) -> bool:
    """Whether the live table (:class:`LiveView`, mode ``auto``) is drawn on ``console``: one made to be a terminal
    (rich's ``force_terminal=True``: its maker asks for it), else one writing to a real terminal — its file's
    descriptor is a tty, rich takes it for a terminal, and ``$TERM`` is not ``dumb`` (nor ``unknown``).
    ``FORCE_COLOR`` and ``TTY_COMPATIBLE`` make rich take any file for a terminal: they colour the progress lines of
    a CI log, but a log is no place for a table redrawn in place (each redraw would be written to it)."""
    forced = getattr(console, "_force_terminal", None)  # (rich keeps force_terminal=… there; None: not given)
    if forced is not None:
        return bool(forced)
    try:
        fd = console.file.fileno()
    except (AttributeError, OSError, ValueError):  # (a StringIO, a closed file: no descriptor, no terminal)
        return False
    try:
        tty = os.isatty(fd)
    except OSError:
        return False
    return tty and console.is_terminal and not console.is_dumb_terminal  # (dumb: $TERM is dumb or unknown)


class LiveView:
    """Progress while a run goes, on stderr: a rich ``Live`` table on a terminal, plain lines otherwise.

    Use as a context manager around the run and pass :meth:`on_event` and
    :meth:`notice` to the runtime. ``mode``: ``auto`` (live on a terminal — a real one,
    :func:`draws_live` —, lines otherwise: a file or a pipe, with colours when ``FORCE_COLOR`` asks), ``live``,
    ``lines`` or ``off``.
    """

    def __init__(self, plan: Mapping[str, Any], *, mode: str = "auto", console: Any = None):
        self.console = _console(console)
        if mode == "auto":
            mode = "live" if draws_live(self.console) else "lines"
        self.mode = mode
        self.plan = plan
        self.rows: dict[str, dict[str, Any]] = {}
        self.undo: dict[str, str] = {}
        self.status = "starting"
        self.run_id = ""
        self.t0: int | None = None
        self._t0_clock = time.monotonic()
        self._live: Any = None
        for key, node in plan["nodes"].items():
            if node["kind"] in STEP_KINDS and not _in_loop(plan, key):
                self.rows[key] = {"status": "pending", "attempt": 0, "start": None, "end": None}

    def __enter__(self) -> LiveView:
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=8,
                              transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def notice(self, text: str) -> None:
        self.console.print(f"[yellow]{_esc(text)}[/]")

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "run_started":
            self.run_id, self.t0, self.status = event["run_id"], event["at"], "running"
            if self.mode == "lines":
                self.console.print(f"[bold]{_esc(event.get('flow') or '')}[/] run {_esc(event['run_id'])} started")
            return
        if kind == "run_finished":
            self.status = event["status"]
            return
        if kind in _SIGNAL_EVENTS:  # (a refusal is said in the live table too: nothing else would show it)
            if self.mode == "lines" or (self.mode == "live" and kind == "signal_rejected"):
                self.console.print(f"{self._at(event)} {signal_line(event)}")
            return
        step = event["step"]
        if step is None or event["kind"] not in STEP_KINDS:
            return
        row = self.rows.setdefault(step, {"status": "pending", "attempt": 0, "start": None, "end": None})
        if kind == "step_scheduled":
            row.update(status="running", attempt=event["attempt"])
            if row["start"] is None:
                row["start"] = event["at"]
        elif kind == "step_started" and event["kind"] == "wait":
            row.update(status="waiting", start=event["at"],
                       waits=wait_label(self.plan["nodes"][event["node"]], event.get("key")))
        elif kind in ("step_succeeded", "step_failed", "step_cancelled", "step_skipped"):
            row.update(status=kind.removeprefix("step_"), end=event["at"])
        elif kind == "step_retrying":
            row["status"] = "retrying"
        elif kind == "fallback_started":
            row["fallback"] = event["worker"]
        elif kind.startswith("compensation_"):
            self.undo[step] = kind.removeprefix("compensation_")
            if kind == "compensation_started":
                self.status = "compensating"
        if self.mode == "lines":
            self._line(event, row)

    def _at(self, event: dict[str, Any]) -> str:
        return f"[dim]+{(event['at'] - (self.t0 or event['at'])) / 1000:7.3f}s[/]"

    def _line(self, event: dict[str, Any], row: dict[str, Any]) -> None:
        kind, step = event["type"], _esc(event["step"])
        at = self._at(event)
        err = _esc(_clip(_error_text(event.get("error")), 160))
        if kind == "step_started" and event["kind"] == "wait":
            self.console.print(f"{at} [cyan]⚐ {step}[/] {wait_words(event)}")
        elif kind == "step_succeeded":
            took = _seconds(row["end"] - row["start"]) if row["start"] is not None else ""
            self.console.print(f"{at} [green]✓[/] {step} [dim]{took}[/]")
        elif kind == "step_failed" and event.get("continued"):
            self.console.print(f"{at} [yellow]✗ {step}[/] — {err} [dim](on_failure: continue: the run goes on)[/]")
        elif kind == "step_failed":
            self.console.print(f"{at} [red]✗ {step}[/] — {err}")
        elif kind == "step_retrying":
            self.console.print(f"{at} [cyan]↻ {step}[/] attempt {event['attempt']} failed ({err}); "
                               f"retrying in {_seconds(event['delay_ms'])}")
        elif kind == "step_timed_out":
            self.console.print(f"{at} [yellow]⏱ {step}[/] timed out on attempt {event['attempt']}")
        elif kind == "step_skipped" and event.get("reason") != "parent":
            self.console.print(f"{at} [dim]– {step} skipped ({_esc(event.get('reason'))})[/]")
        elif kind == "step_cancelled":
            self.console.print(f"{at} [yellow]⊘ {step}[/] cancelled")
        elif kind == "fallback_started":
            self.console.print(f"{at} [yellow]⤷ {step}[/]: {_esc(fallback_reason(event))}")
        elif kind == "compensation_started" and event["attempt"] == 1:
            self.console.print(f"{at} [yellow]↶ undoing {step}[/] with {_esc(event['worker'])}")
        elif kind == "compensation_succeeded":
            self.console.print(f"{at} [yellow]↶ {step} undone[/]{undone_after_failure(event)}")
        elif kind == "compensation_retrying":
            self.console.print(f"{at} [yellow]↶ {step}[/] undo attempt {event['attempt']} failed ({err}); "
                               f"retrying in {_seconds(event['delay_ms'])}")
        elif kind == "compensation_failed":
            self.console.print(f"{at} [red]↶ undoing {step} failed for good[/] — {err}")
        elif kind == "late_completion":
            self.console.print(f"{at} {late_completion_line(event)}")

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self._t0_clock
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        head = Text.from_markup(f"[bold]{_esc(self.plan['flow'].get('name') or '')}[/] {_esc(self.run_id)} "
                                f"{_status(self.status)} [dim]{elapsed:.1f}s · "
                                + " · ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "[/]", emoji=False)
        height = max(5, self.console.size.height - 4)
        items = list(self.rows.items())
        if len(items) > height:  # keep what is happening in view
            busy = [(k, r) for k, r in items if r["status"] not in ("succeeded", "pending", "skipped")]
            done = [(k, r) for k, r in items if r["status"] in ("succeeded", "skipped")][-max(0, height - len(busy)):]
            items = (busy + done)[:height]
        table = Table(show_edge=False, box=None, pad_edge=False, show_header=False)
        for _ in range(4):
            table.add_column()
        now = (self.t0 or 0) + elapsed * 1000
        for key, row in items:
            took = ""
            if row["start"] is not None:
                took = _seconds((row["end"] if row["end"] is not None else now) - row["start"])
            undo = self.undo.get(key)
            fallback = row.get("fallback")
            waits = row.get("waits") if row["status"] == "waiting" else None
            table.add_row(f"{_MARK.get(row['status'], ' ')} {_esc(key)}", _status(row["status"]),
                          f"#{row['attempt']}" if row["attempt"] > 1 else "", took
                          + (f"  [cyan]{_esc(waits)}[/]" if waits else "")
                          + (f"  [yellow]fallback: {_esc(fallback)}[/]" if fallback else "")
                          + (f"  [yellow]undo: {_esc(undo)}[/]" if undo else ""))
        from rich.console import Group

        return Group(head, table)


def _in_loop(plan: Mapping[str, Any], key: str) -> bool:
    scope = plan["nodes"][key].get("scope")
    while scope is not None:
        if plan["nodes"][scope]["kind"] == "for_each":
            return True
        scope = plan["nodes"][scope].get("scope")
    return False


def print_timeline(result: RunResult, lines: Iterable[dict[str, Any]], console: Any = None, *,
                   live: bool = False, standing: Standing | None = None) -> None:
    """``flowdsl show``: every recorded event with its time from the start, then the summary. ``live``: the
    run is known to be still going (``flowdsl status`` of a Redis run), so an unfinished one is said to be.
    ``standing``: how a local record stands (``.stopped.settle``), for :func:`record_end_note`."""
    con = _console(console)
    items = list(lines)
    t0 = result.started_at if result.started_at is not None else next((e.get("at") for e in items), 0)
    con.print(f"[bold]{_esc(result.flow or '')}[/] run {_esc(result.run_id)}")
    for event in items:
        text = _timeline_text(event)
        if text is None:
            continue
        at = event.get("at")
        stamp = f"+{(at - t0) / 1000:8.3f}s" if isinstance(at, int | float) and t0 is not None else " " * 10
        con.print(f"[dim]{stamp}[/] {text}")
        meta = event.get("meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("llm"), Mapping):
            con.print(" " * 10 + f"   [dim]{_llm_text(meta['llm'])}[/]")
    early = record_end_note(result, items, standing)
    if early is not None and live and result.status != NOT_STARTED:
        con.print(f"[cyan]the run is still going: {_esc(result.status)} so far[/]")
    elif early is not None and result.parked is None:  # (parked: the timeline's last line says so, and the summary
        # what it waits for and how to go on)
        going = standing is not None and standing.live  # (its process runs: said as news, not as a warning)
        con.print(f"[{'cyan' if going else 'yellow'}]{_esc(early)}[/]")
    print_summary(result, con)


def record_end_note(result: RunResult, lines: Iterable[Mapping[str, Any]],
                    standing: Standing | None = None) -> str | None:
    """What to say of a record that ends before its run did (None when it holds the run's end): the run had not
    started, was stopped at once (its ``runtime_aborted`` reason), was parked (what it waits for, and the commands
    that go on with it: ``result.parked``), or its process stopped (or it still goes); or of one that ends while its
    runtime waited, after the run's end, for attempts the run had given up on.

    ``standing`` (``.stopped.settle`` of the record) says which when its process was looked at: still running, the
    run is still going (or its runtime still waits, ``Standing.awaited``: nothing is final, nor in doubt, yet); gone,
    it stopped; else that cannot be told here. Without it, both are said possible."""
    items = list(lines)
    process = standing.process if standing is not None else None
    state = process.state if process is not None else None  # live, gone, unknown; None when not looked at
    failed = items[-1] if items and items[-1].get("type") == "record_failed" else None
    # why it ends early: writing it failed (the run went on unrecorded), else its process stopped
    stopped = f"writing it failed ({failed.get('reason')}) and the run went on unrecorded" if failed is not None \
        else "its process stopped"
    if result.status != NOT_STARTED and any(e.get("type") == "run_finished" for e in items):
        kinds = {e.get("type") for e in items}
        if "runtime_waiting" in kinds and "runtime_waited" not in kinds:
            if state == "live":
                assert standing is not None
                awaited = list(standing.awaited)
                which = f"{len(awaited)} attempt(s) the run had given up on ({', '.join(awaited)})" if awaited \
                    else "the attempts the run had given up on"
                return (f"the run ended {result.status}, and its runtime still waits for {which}: their answers "
                        "may still change how the run ends (a late "
                        "success of a step with an undo makes it needs_intervention), so nothing is final, nor in "
                        "doubt, yet")
            if state == "unknown":
                stopped = "its process stopped, or still waits (which cannot be told here)"
            return ("the record ends while the runtime waited, after the run's end, for attempts the run had given "
                    f"up on: {stopped}, and what they did is unknown")
        return None
    if failed is not None and result.status in END_STATES:
        return (f"the record ends before the events of the run's end were all written ({stopped}); its input "
                f"events give the run's end: {result.status}")
    if failed is not None:
        return f"the record ends before the run did: {stopped}; state when the record stopped: {result.status}"
    if result.parked is not None:
        return (f"the run is parked: not over, and no process runs it; it "
                f"{parked_text(result.parked, resume_command(result))}; or cancel it with "
                f"`{resume_command(result)} --cancel`")
    aborted = next((e for e in items[since_resumed(items):] if e.get("type") == "runtime_aborted"), None)
    if result.status == NOT_STARTED:
        why = f" ({aborted.get('reason')})" if aborted else ""
        return (f"the record ends before the run started{why}: it holds no step, and the run had not started "
                "when it was written")
    if aborted is not None:
        return (f"the record ends before the run did: it was stopped at once ({aborted.get('reason')}); state when "
                f"it ended: {result.status}")
    if result.status in END_STATES:  # its input events give the end; the events it caused were not all written
        return (f"the record ends before the events of the run's end were all written (its process stopped while "
                f"writing them); its input events give the run's end: {result.status}")
    if result.crashed is not None:
        return f"the record ends before the run did: {result.crashed}, and the run stopped with it; state when it " \
            f"ended: {result.status}"
    if state == "live":  # (its record goes on as it goes)
        return f"the record ends before the run did: the run is still going; state so far: {result.status}"
    cannot = " — which cannot be told here" if state == "unknown" else ""
    return (f"the record ends before the run did: its process stopped without finishing it, or the run is still "
            f"going{cannot}; state when it ended: {result.status}")


def _llm_text(call: Mapping[str, Any]) -> str:
    """One line about a model call: the model, what was sent, the start of the reply (control characters
    escaped by :func:`_esc`: a reply is untrusted text, which must not drive the terminal)."""
    raw = " ".join(str(call.get("raw") or "").split())
    sent = f", {len(call['prompt'])} message(s) sent" if isinstance(call.get("prompt"), list) else ""
    reply = f", reply: {_esc(raw[:120])}{'…' if len(raw) > 120 else ''}" if "raw" in call else ""
    return f"llm: model {_esc(call.get('model') or '?')}{sent}{reply}"


def _timeline_text(e: Mapping[str, Any]) -> str | None:
    kind = e.get("type")
    step = _esc(e.get("step") or "")
    err = _esc(_error_text(e.get("error")))
    group = e.get("kind") not in STEP_KINDS
    if kind == "run_started":
        return f"[bold]run started[/] (flow {_esc(e.get('flow'))}, seed {_esc(e.get('seed'))})"
    if kind == "run_finished":
        tail = f" — {err}" if err else ""
        return f"[bold]run finished[/]: {_status(str(e.get('status')))}{tail}"
    if kind == "runtime_aborted":
        return f"[red]aborted by the runtime[/]: {_esc(e.get('reason'))}"
    if kind == RESUMED:
        named = e.get("process")
        process: Mapping[str, Any] = named if isinstance(named, Mapping) else {}
        ids = [str(a.get("task_id")) for a in e.get("attempts") or () if isinstance(a, Mapping)]
        again = f"; run again: {_esc(', '.join(ids))}" if ids else ""
        return (f"[bold]resumed[/] by {_esc(e.get('by'))} (pid {_esc(process.get('pid'))} on "
                f"{_esc(process.get('host'))}): its process had {_esc(_WAS.get(str(e.get('was')), e.get('was')))}"
                f"{again}")
    if kind == PARKED:
        listed = [w for w in e.get("waits") or () if isinstance(w, Mapping)]
        waits = [f"{_esc(w.get('wait'))} (" + ("timer" if w.get("signal") is None else f"signal '{_esc(w['signal'])}'"
                                               + (f" key '{_esc(w['key'])}'" if w.get("key") is not None else ""))
                 + ")" for w in listed[:SHOWN_WAITS]]
        if len(listed) > SHOWN_WAITS:
            waits.append(f"{len(listed) - SHOWN_WAITS} more")
        return (f"[cyan]parked[/]: nothing was left but waiting — {', '.join(waits) or 'no wait'} — and its process "
                "let the run go")
    if kind == "record_failed":
        return f"[yellow]the record stops here[/]: writing it failed ({_esc(e.get('reason'))}); the run went on"
    if kind == "runtime_waiting":
        ids = [str(a.get("task_id")) for a in e.get("attempts") or () if isinstance(a, Mapping)]
        grace = e.get("grace_ms")
        bound = _seconds(grace if isinstance(grace, int | float) else None)
        return (f"[yellow]waiting up to {bound} for {len(ids)} attempt(s) the run gave up on to answer[/]: "
                f"{_esc(', '.join(ids))}")
    if kind == "runtime_waited":
        ids = [str(a.get("task_id")) for a in e.get("unanswered") or () if isinstance(a, Mapping)]
        if not ids:
            return f"[dim]stopped waiting: {_esc(e.get('reason'))}[/]"
        return (f"[bold red]stopped waiting[/] ({_esc(e.get('reason'))}): {_esc(', '.join(ids))} did not answer — "
                "outcome unknown")
    if kind == "cancel_requested":
        return f"[yellow]cancel requested[/]: {_esc(e.get('reason') or '')}"
    if kind in INPUT_EVENTS or kind == "start":  # (a signal sent is said by the kernel's answer to it, below)
        return None
    if kind in _SIGNAL_EVENTS:
        return signal_line(e)
    if kind == "step_started" and e.get("kind") == "wait":
        return f"[cyan]⚐ {step}[/] {wait_words(e)}"
    if kind == "step_succeeded" and e.get("kind") == "wait":
        return f"[green]✓ {step}[/] done waiting"
    if kind == "step_started":
        return f"[dim]{step} started ({_esc(e.get('kind'))})[/]" if group else None
    if kind == "step_scheduled":
        who = f" {_esc(e['worker'])}" if e.get("worker") else ""
        return f"{step}: attempt {_esc(e.get('attempt'))} → {_esc(e.get('task_kind'))}{who}"
    if kind == "attempt_started":
        return f"{step}: attempt {_esc(e.get('attempt'))} picked up"
    if kind == "step_succeeded":
        return f"[dim]{step} done[/]" if group else f"[green]✓ {step}[/] succeeded (attempt {_esc(e.get('attempt'))})"
    if kind == "step_failed":
        if e.get("continued"):
            return f"[yellow]✗ {step} failed[/] — {err} [dim](on_failure: continue: the run goes on without it)[/]"
        return f"[red]✗ {step} failed[/] — {err}"
    if kind == "step_retrying":
        return (f"[cyan]↻ {step}[/] attempt {_esc(e.get('attempt'))} failed ({err}); "
                f"attempt {_esc(e.get('next_attempt'))} in {_seconds(e.get('delay_ms'))}")
    if kind == "step_timed_out":
        return f"[yellow]⏱ {step}[/] attempt {_esc(e.get('attempt'))} timed out"
    if kind == "step_skipped":
        return None if e.get("reason") == "parent" else f"[dim]– {step} skipped ({_esc(e.get('reason'))})[/]"
    if kind == "step_cancelled":
        return f"[yellow]⊘ {step} cancelled[/] — {_esc(e.get('reason') or '')}"
    if kind == "fallback_started":
        return f"[yellow]⤷ {step}[/]: {_esc(fallback_reason(e))}"
    if kind == "compensation_started":
        return f"[yellow]↶ {step}[/]: undo attempt {_esc(e.get('attempt'))} → {_esc(e.get('worker'))}"
    if kind == "compensation_succeeded":
        return f"[yellow]↶ {step} undone[/]{undone_after_failure(e)}"
    if kind == "compensation_retrying":
        return (f"[yellow]↶ {step}[/] undo attempt {_esc(e.get('attempt'))} failed ({err}); "
                f"attempt {_esc(e.get('next_attempt'))} "
                f"in {_seconds(e.get('delay_ms'))}")
    if kind == "compensation_failed":
        return f"[red]↶ undoing {step} failed for good[/] — {err}"
    if kind == "result_rejected":
        # not "ignored": a success may go on to be a late completion (the next line), undone or left by hand
        return (f"[dim]late {_esc(e.get('result_type'))} for {_esc(e.get('task_id'))}: not an answer the run "
                f"waits for ({_esc(e.get('reason'))})[/]")
    if kind == "late_completion":
        return late_completion_line(e, with_run_status=True)
    return f"[dim]{_esc(kind)} {step}[/]"
