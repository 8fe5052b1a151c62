"""The end summary of a run, and the text helpers every display of a run shares.

Stage: runtime (shared by every backend and the CLI). Imports the kernel's names, ``.report``, ``.timing``, ``.late``,
``.parking`` and stdlib at import time; rich, ``flowdsl.shown``, ``flowdsl.stdio``, ``flowdsl.llm`` and ``.record`` only
inside the functions that use them (so ``flowdsl --help`` and library use stay light).

- :func:`print_summary` — the end summary: per-step status, attempts and duration,
  what was compensated in which order, wall time against the sum of step times,
  and the measured critical path; for a parked run, what each wait waits for, until when, and the command that
  goes on with it (:func:`parked_lines`).
- :func:`fallback_text`, :func:`fallback_reason` — what an LLM step's fallback means, plainly.
- :func:`wait_label`, :func:`wait_words` — what a wait node waits for (its signal and deadline, or its delay).
- :func:`show_command` — the ``flowdsl show`` command that finds a record; :func:`error_console`, where errors go
  beside a command's output.

Every piece of text these show that flowdsl did not write — error messages of workers and of the services
behind them, reasons, names read from a record, model replies — goes through ``_esc``: on one line, its
control characters written as JSON writes them (``\\n``, ESC as ``\\u001b``: ``flowdsl.shown.visible``), rich
markup escaped, emoji codes left alone. A message that spans lines is shown on one, ``\\n`` between its lines;
``--format json`` and the record keep it exact. ``.timeline`` (the live view, ``flowdsl show``) shows its text
through the same helpers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowdsl.kernel import END_STATES, LLM_NOT_CONFIGURED
from flowdsl.runtime.late import stopped_while
from flowdsl.runtime.parking import SHOWN_WAITS, at_text, signal_named, signal_option, timer_said
from flowdsl.runtime.report import RunResult
from flowdsl.runtime.timing import STEP_KINDS, _span, duration_text, timing

__all__ = ["error_console", "fallback_reason", "fallback_text", "parked_lines", "print_summary",
           "record_resume_command", "resume_command", "show_command", "wait_label", "wait_words"]


_STYLE = {"completed": "green", "succeeded": "green", "compensated": "yellow", "cancelled": "yellow",
          "failed": "red", "needs_intervention": "bold red", "running": "cyan", "retrying": "cyan",
          "cancelling": "yellow", "skipped": "dim", "pending": "dim", "aborting": "yellow",
          "compensating": "yellow", "done": "yellow", "waiting": "cyan"}
_MAX_ROWS = 40
#: steps passed over (on_failure: continue) named on their line, at most
_PASSED_SHOWN = 10


_PATH_SHOWN = 12  # steps of the critical path the summary names (the JSON object has them all)


def _seconds(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def error_console(console: Any) -> Any:
    """Where errors and notes go beside a command's output ``console``: stderr when that console writes to stdout
    (text output goes to stdout, errors never), else that console (stderr, where a ``--format json`` command
    records them, or a file it was given)."""
    import sys

    return _console() if getattr(console, "file", None) is sys.stdout else console


def _console(console: Any = None) -> Any:
    if console is not None:
        return console
    from flowdsl.stdio import console as new_console

    return new_console(stderr=True)


def _esc(text: Any) -> str:
    """Text that is not flowdsl's own as it is shown: on one line, its control characters written as JSON writes
    them (``flowdsl.shown.visible``: no escape sequence reaches the terminal, no line is forged), rich markup
    escaped. Every name, message and reason a summary, timeline or live view shows goes through it."""
    from rich.markup import escape

    from flowdsl.shown import visible

    escaped: str = escape(visible(text))
    return escaped


def _status(status: str) -> str:
    return f"[{_STYLE.get(status, 'white')}]{_esc(status)}[/]"


#: the kernel's words for a wait's deadline (``no signal 'paid' came within 30000 ms``), said as the spec wrote it
_WITHIN_MS = re.compile(r"within (\d+) ms\Z")


def _error_text(err: Mapping[str, Any] | None) -> str:
    if not err:
        return ""
    message = str(err.get("message") or "")
    if err.get("type") == "WaitTimeout":
        message = _WITHIN_MS.sub(lambda m: f"within {duration_text(int(m.group(1)))}", message)
    return f"{err.get('type')}: {message}" if message else str(err.get("type"))


def wait_label(node: Mapping[str, Any], key: str | None = None) -> str:
    """What wait ``node`` (a plan node; ``key``: the key an instance of a keyed wait takes its signal with) waits
    for, briefly: ``signal 'paid', up to 30s``, ``signal 'paid'``, ``signal 'delivered' key '1Z9'``, ``timer 2h``
    (text of the plan's and the run's: escape it to show it)."""
    if node.get("signal") is None:
        return f"timer {duration_text(node.get('delay_ms'))}"
    timeout = node.get("timeout_ms")
    return f"signal '{node['signal']}'" + (f" key '{key}'" if key is not None else "") + \
        (f", up to {duration_text(timeout)}" if timeout else "")


def wait_words(event: Mapping[str, Any]) -> str:
    """A wait's ``step_started`` event as the live view and ``show`` say it (markup): ``waits for signal 'paid'
    (up to 30s)``, ``waits for signal 'paid' (no deadline)``, ``waits for signal 'delivered' key '1Z9' (up to
    14d)``, ``waits 2h``."""
    ms = event.get("wait_ms")
    if event.get("signal") is None:
        return f"waits {duration_text(ms)}"
    deadline = f"up to {duration_text(ms)}" if ms else "no deadline"
    key = f" key '{_esc(event['key'])}'" if event.get("key") is not None else ""
    return f"waits for signal '{_esc(event['signal'])}'{key} ({deadline})"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_summary(result: RunResult, console: Any = None) -> None:
    """The end summary of a run, on stderr (rich)."""
    from rich.table import Table

    con = _console(console)
    rows = [(k, r) for k, r in result.steps.items() if r["kind"] in STEP_KINDS]
    shown = rows
    hidden = 0
    if len(rows) > _MAX_ROWS:
        shown = [(k, r) for k, r in rows if r["status"] != "succeeded" or "compensation" in r][:_MAX_ROWS]
        hidden = len(rows) - len(shown)
    order = {k: i + 1 for i, k in enumerate(result.compensated)}
    fell_back = {e["step"] for e in result.events if e["type"] == "fallback_started"}
    table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("step", no_wrap=True, min_width=max((len(k) for k, _ in shown), default=4))
    table.add_column("status", no_wrap=True, min_width=18)
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True, min_width=8)
    table.add_column("undo", no_wrap=True, min_width=12)
    errors: list[str] = []
    waited: list[str] = []  # a line per wait: what it waits for
    for key, row in shown:
        comp = row.get("compensation")
        undo = ""
        if comp is not None:
            status = comp["status"]
            if key in order:
                undo = f"[yellow]undone #{order[key]}[/]"
            elif status == "failed":
                undo = f"[red]undo failed[/] ×{comp['attempts']}"
            elif status in ("running", "retrying"):
                undo = f"[yellow]undoing[/] #{comp['attempts']}"
            else:
                undo = "[red]not undone[/]"
            if comp.get("error") and key not in order:
                errors.append(f"  {_esc(key)} (undo): {_esc(_clip(_error_text(comp['error']), 200))}")
        if row["error"]:
            errors.append(f"  {_esc(key)}: {_esc(_clip(_error_text(row['error']), 200))}")
        status, waits = row["status"], ""
        if row["kind"] == "wait":  # (a wait that waits is "waiting"; what it waits for under the table)
            status = "waiting" if status == "running" else status
            waits = " [dim]⚐[/]"
            node = (result.plan.get("nodes") or {}).get(row["node"]) or {}
            waited.append(f"  {_esc(key)}: {_esc(wait_label(node, row.get('key')))}")
        cell = _status(status) + waits + (" [yellow](fallback)[/]" if key in fell_back else "") + \
            (" [yellow](passed over, completed late)[/]" if row.get("completed_late") else
             " [yellow](passed over)[/]" if row.get("continued") else "")
        table.add_row(_esc(key), cell, str(row["attempts"] or ""), _seconds(_span(row)), undo)
    con.print()
    con.print(table)
    if hidden:
        said = {id(row) for _, row in shown}
        left = Counter("passed over" if row.get("continued") else row["status"] for _, row in rows
                       if id(row) not in said)
        what = ", ".join(f"{n} {status}" for status, n in sorted(left.items()))
        con.print(f"[dim]… and {hidden} more steps ({what})[/]")
    if waited:
        con.print("waits ⚐:")
        for line in waited:
            con.print(line)
    if errors:
        con.print("errors:")
        for line in errors:
            con.print(line)
    for e in result.events:
        if e["type"] == "fallback_started":
            line, detail = fallback_text(e, result.steps.get(e["step"], {}).get("status"))
            con.print(f"[yellow]⤷[/] {_esc(line)}")
            if detail:
                con.print(f"  [dim]{_esc(_clip(detail, 600))}[/]")
    con.print()
    stopped = result.intervention is not None and result.status not in END_STATES  # aborted: did not end
    state = f"[yellow]stopped at once {stopped_while(result.status)}[/]" if stopped else _status(result.status)
    if stopped and result.crashed is not None:  # (its process died: flowdsl.runtime.stopped)
        state = f"[bold red]crashed {stopped_while(result.status)}[/] ({_esc(result.crashed)})"
    if result.parked is not None:  # (its process let it go: flowdsl.runtime.parking)
        state = "[cyan]parked[/] — not over, and no process runs it"
    headline = f"[bold]{_esc(result.flow or '')}[/] {_esc(result.run_id)}: {state}"
    if result.error:
        where = f" at {_esc(result.failed_step)}" if result.failed_step else ""
        headline += f"{where} — {_esc(_error_text(result.error))}"
    con.print(headline)
    if result.parked is not None:
        for line in parked_lines(result):
            con.print(line, highlight=False)
    passed_over = [k for k, r in result.steps.items() if r.get("continued")]
    if passed_over:
        more = f", … ({len(passed_over) - _PASSED_SHOWN} more)" if len(passed_over) > _PASSED_SHOWN else ""
        con.print(f"[yellow]failed and passed over[/] (on_failure: continue): "
                  f"{', '.join(map(_esc, passed_over[:_PASSED_SHOWN]))}{more}")
    if result.compensated:
        undone = [f"{_esc(k)} ({_esc(_undo_worker(result, k))})" for k in result.compensated]
        con.print("compensated, in this order: " + " → ".join(undone))
    elif result.status in ("failed", "cancelled") and not result.in_doubt:
        con.print("nothing needed undoing")
    if result.intervention is not None:
        left = result.intervention["steps"]
        if left:
            why = " (the run stopped before they were undone)" if stopped else ""
            con.print(f"[bold red]left to undo by hand[/]{why}, in this order:")
            doubted = {i["step"] for i in result.in_doubt if i.get("undo_in_doubt")}
            for item in left:
                mark = " [yellow](its undo may have run: see below)[/]" if item["step"] in doubted else ""
                con.print(_left_text(item) + mark)
            slow = [_esc(item["step"]) for item in left if item.get("reason") and (item.get("after_undo") or
                    ((result.steps.get(item["step"]) or {}).get("error") or {}).get("type") == "StepTimeout")]
            if slow:
                con.print(f"[dim]hint: {', '.join(slow)} completed after {'its' if len(slow) == 1 else 'their'} "
                          "`timeout`: a worker that outlasts it still makes its effect; give the step a timeout "
                          "longer than its worker takes, or make the worker stop within it[/]")
        elif stopped:
            con.print("no completed step was left undone")
    if result.in_doubt:
        steps = any(not item.get("undo_in_doubt") for item in result.in_doubt)
        con.print("[bold red]outcome unknown[/]: check whether each took effect"
                  + (", and undo by hand the steps that did:" if steps else ":"))
        for item in result.in_doubt:
            con.print(_left_text(item))
    t = timing(result)
    line = f"wall {_seconds(t['wall_ms'])} · sum of step times {_seconds(t['step_time_sum_ms'])}"
    if t["wall_ms"] is not None and t["step_time_sum_ms"] > t["wall_ms"] > 0:
        line += (f" · parallelism saved {_seconds(t['parallel_saving_ms'])} "
                 f"(×{t['step_time_sum_ms'] / t['wall_ms']:.1f})")
    con.print(line)
    if t["critical_path"]:
        chain = t["critical_path"]
        if len(chain) > _PATH_SHOWN:  # a long chain: its ends, and how many steps between
            half = _PATH_SHOWN // 2
            chain = [*chain[:half], f"… {len(chain) - 2 * half} more …", *chain[-half:]]
        path = " → ".join(_esc(k) for k in chain)
        con.print(f"critical path {_seconds(t['critical_path_ms'])}: {path}")
    if result.record_path is not None:
        show = show_command(result.record_path)
        con.print(f"[dim]record: {_esc(result.record_path)}  ({_esc(show)})[/]")
        if result.record_error:
            con.print(f"[yellow]the record is incomplete: {_esc(result.record_error)}[/]")


def parked_lines(result: RunResult) -> list[str]:
    """What the summary of a parked run (``result.parked``) says under its headline (markup): a line per wait —
    what it waits for, until when, and the ``flowdsl resume`` command that goes on with it —, the next timer due when
    it is none of the waits' (a retry's backoff, the run's timeout), and the command that cancels the run instead."""
    parked = result.parked or {}
    resume = resume_command(result)
    lines = ["its waits, and how to go on with each:"]
    dues = set()
    waits = list(parked.get("waits") or ())
    for wait in waits:
        dues.add(wait.get("due_at"))
    for wait in waits[:SHOWN_WAITS]:
        key, signal, due = _esc(wait.get("wait")), wait.get("signal"), wait.get("due_at")
        if signal is None:
            lines.append(f"  {key}: timer, until {at_text(due)} — `{_esc(resume)}` once it is due")
            continue
        until = f"until {at_text(due)} (then it fails with WaitTimeout)" if due is not None else "no deadline"
        signal_key = str(wait["key"]) if wait.get("key") is not None else None
        option = signal_option(str(signal), signal_key)
        how = f"`{_esc(resume)} {_esc(option)}`" if option is not None else \
            "from Python (resume_flow(..., signals=[...])): the command line cannot give its key"
        lines.append(f"  {key}: {_esc(signal_named(str(signal), signal_key))}, {until} — {how}")
    if len(waits) > SHOWN_WAITS:
        lines.append(f"  … and {len(waits) - SHOWN_WAITS} more waits (`--format json` lists them all)")
    due = parked.get("due_at")
    if due is not None and due not in dues:
        others = sorted({timer_said(t) for t in (result.state.get("timers") or {}).values()
                         if t.get("purpose") not in ("wait", "wait_timeout")})  # (the waits' are said above)
        what = " or ".join(others) or "a timer"
        lines.append(f"  next due: {what}, {at_text(due)} — `{_esc(resume)}` fires it once it is due")
    lines.append(f"[dim]or `{_esc(resume)} --cancel` cancels the run (what completed is undone)[/]")
    return lines


def resume_command(result: RunResult) -> str:
    """The ``flowdsl resume`` command that goes on with ``result``'s run, found by its record as ``flowdsl show``
    finds it (:func:`show_command`); by its run id when it has no record."""
    if result.record_path is None:
        return f"flowdsl resume {result.run_id}"
    return record_resume_command(result.record_path)


def record_resume_command(record: Path) -> str:
    """The ``flowdsl resume`` command that finds the record ``record``, as :func:`show_command` the ``show`` one."""
    return "flowdsl resume " + show_command(record).removeprefix("flowdsl show ")


def _left_text(item: Mapping[str, Any]) -> str:
    """One step left to undo by hand: its undo worker, how far that got, its last error, its idempotency key."""
    worker = _esc(item["worker"])
    if item.get("after_undo"):  # (the step completed again after its undo, or may have: kernel version 7)
        how = f"{worker} ran before that"
    elif item["status"] == "failed":
        how = f"{worker} failed (×{item['attempts']})"
    elif item["status"] == "in_flight" and not item.get("reason"):  # (with a reason: the step was in flight)
        how = f"{worker} was running when the run stopped: it may or may not have taken effect"
    else:
        how = f"{worker} was not run"
    err = f" — {_esc(_error_text(item['last_error']))}" if item["last_error"] else ""
    if item.get("reason"):  # a step that completed late (docs/kernel.md, "Late completions")
        how = f"{how} — {_esc(item['reason'])}"
    keys = f"the step's idempotency key {_esc(item['step_idempotency_key'])}, its undo's " \
        f"{_esc(item['idempotency_key'])}" if item.get("step_idempotency_key") else \
        f"idempotency key {_esc(item['idempotency_key'])}"
    return f"  {_esc(item['step'])}: {how}{err} [dim]({keys})[/]"


def show_command(record: Path) -> str:
    """The ``flowdsl show`` command that finds the record ``record``: the run id it is looked up by is its file's
    name (``<run_id>.jsonl``; whatever id is inside a copied or renamed record), with ``--runs-dir`` when the record
    is not in the directory ``flowdsl show`` looks in by default ($FLOWDSL_RUNS_DIR or .flowdsl/runs); the
    record's path when its name is not a run id."""
    import shlex

    from flowdsl.runtime.record import RUN_ID_RE, runs_dir

    record = Path(record)
    run_id = record.name.removesuffix(".jsonl")
    if record.suffix != ".jsonl" or not RUN_ID_RE.match(run_id):
        text = str(record)
        return f"flowdsl show {shlex.quote('./' + text if text.startswith('-') else text)}"  # not an option
    try:
        default = runs_dir()
    except ValueError:  # $FLOWDSL_RUNS_DIR set but empty: no default directory to look in
        default = None
    if default is not None and record.parent.resolve() == default.resolve():
        return f"flowdsl show {run_id}"
    return f"flowdsl show {run_id} --runs-dir {shlex.quote(str(record.parent))}"


def fallback_text(event: Mapping[str, Any], status: str | None) -> tuple[str, str]:
    """What a ``fallback_started`` event means, plainly, given the step's final status; and the error behind it.

    ``generate_confirmation: no LM configured — used fallback template_confirmation``
    """
    err = event.get("error") or {}
    why = _fallback_why(err)
    worker = event.get("worker")
    done = {"succeeded": f"used fallback {worker}", "failed": f"its fallback {worker} failed too"}.get(
        str(status), f"fallback {worker} {status or 'started'}")
    return f"{event.get('step')}: {why} — {done}", _error_text(err)


def _fallback_why(err: Mapping[str, Any]) -> str:
    """Why an LLM step went to its fallback, from its last error: an ``LLMNotConfigured`` says whether no model was
    named, or one was but cannot be used (its message tells which), any other error that the call failed."""
    if err.get("type") != LLM_NOT_CONFIGURED:
        return f"the LLM call failed for good ({err.get('type')})"
    from flowdsl.llm import not_configured_why

    return not_configured_why(str(err.get("message") or ""))


def fallback_reason(event: Mapping[str, Any]) -> str:
    """A ``fallback_started`` event's reason as shown: the kernel's, which says ``no LM configured`` for every
    ``LLMNotConfigured``, with what its error says instead (``the model string is invalid — using …``)."""
    reason = str(event.get("reason") or "")
    said = "no LM configured"
    if (event.get("error") or {}).get("type") == LLM_NOT_CONFIGURED and reason.startswith(said):
        return _fallback_why(event["error"]) + reason[len(said):]
    return reason


def _undo_worker(result: RunResult, key: str) -> str:
    node = result.steps.get(key, {}).get("node", key)
    comp = (result.plan.get("nodes", {}).get(node) or {}).get("compensate") or {}
    return str(comp.get("worker", "?"))
