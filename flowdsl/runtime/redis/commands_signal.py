"""The CLI's ``flowdsl signal``: a signal sent to a Redis run, and what the run made of it.

Stage: CLI support for runtime: redis. Imports this package's ``client`` and ``commands`` (how a Redis command runs
and says its errors), ``flowdsl.runtime.inputs`` (reading the data), ``flowdsl.runtime.parking`` (how a signal is
named), ``flowdsl.shown`` and stdlib; rich only through the console the CLI hands in. ``flowdsl.cli_redis`` imports
it inside the command only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flowdsl.runtime.inputs import read_json_object
from flowdsl.runtime.parking import signal_named
from flowdsl.runtime.redis.client import RedisClient, SignalOutcome
from flowdsl.runtime.redis.commands import _following, _guarded, _json_out, _say, _stopped_json
from flowdsl.shown import visible

__all__ = ["DEFAULT_TIMEOUT_S", "EXIT_NOT_APPLIED", "read_signal_data", "signal_command", "signal_stopped"]

#: the largest data file ``--data-file`` reads (the client refuses a larger payload anyway)
_DATA_FILE_LIMIT = 256 * 1024 * 1024
#: how long ``flowdsl signal`` waits for the run to apply the signal, unless ``--timeout`` says
DEFAULT_TIMEOUT_S = 60.0
#: the exit code of ``flowdsl signal`` when the run has not applied the signal within ``--timeout``: it was sent,
#: and is applied once a worker process takes it
EXIT_NOT_APPLIED = 5


def read_signal_data(data: str | None, data_file: str | None) -> dict[str, Any] | None:
    """The signal's data from ``--data`` (JSON text) or ``--data-file`` (a JSON file, ``-`` for stdin): a JSON
    object, or None when neither is given. Raises ``ValueError`` saying what is wrong and where."""
    if data is not None and data_file is not None:
        raise ValueError("--data and --data-file do not go together: give the signal's data one way")
    if data is None and data_file is None:
        return None
    example = "'{\"amount\": 42}'"
    if data is not None:
        return read_json_object("--data", text=data, what="the signal's data", example=example)
    assert data_file is not None
    where = "--data-file " + ("- (stdin)" if data_file == "-" else visible(data_file))
    return read_json_object(where, file=data_file, what="the signal's data", example=example, limit=_DATA_FILE_LIMIT)


def signal_command(run_id: str, name: str, *, url: str | None, prefix: str | None, data: dict[str, Any] | None,
                   signal_id: str | None, wait: bool, as_json: bool, console: Any,
                   ended: list[int] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                   key: str | None = None) -> int:
    """Send signal ``name`` with ``data`` (and ``key``, for a keyed wait) to run ``run_id``
    (:meth:`RedisClient.signal`) and, with ``wait``, say what the run made of it. Exit 0 received or kept for its
    wait (buffered; with ``wait`` False: sent); 1 rejected (the kernel's reason said); 2 no such run, no wait of its
    flow takes ``name``, a key missing for a keyed wait's signal or given for another, its id was used for another
    signal, or Redis cannot be reached; :data:`EXIT_NOT_APPLIED` not applied within ``timeout_s`` (sent: outcome
    ``sent``, with a ``reason`` saying so).

    With ``wait``, a stop signal before the outcome is printed ends it as it ends ``cancel --wait``
    (``commands._following``: exit 130, saying whether the signal was sent; it is applied all the same). ``ended``
    gets the exit code once the outcome (or that it stopped) is printed."""
    done: list[int] = ended if ended is not None else []
    sent: list[SignalOutcome] = []

    async def body() -> int:
        async with RedisClient(url, prefix=prefix) as client:
            outcome = await client.signal(run_id, name, data, key=key, signal_id=signal_id, wait=False)
            sent.append(outcome)
            late = False
            if wait and outcome.outcome == "sent":
                try:
                    outcome = await client.signal_outcome(
                        run_id, outcome.id, timeout_s=timeout_s,
                        on_notice=lambda text: _say(console, text, "yellow", "note"))
                except TimeoutError:
                    late = True
                    outcome = replace(outcome, reason=(
                        f"not applied within {timeout_s:g} s: it was sent, and a worker process applies it once it "
                        f"takes it (the same command with `--id {outcome.id}` asks again for its outcome, never "
                        "applying it twice)"))
            status = (await client.info(run_id)).status
            code = EXIT_NOT_APPLIED if late else 1 if outcome.outcome == "rejected" else 0
            done.append(code)  # (printed before the client closes, with nothing awaited in between: see _following)
            _said(console, outcome, status, as_json)
            return code

    if not wait:
        return _guarded(console, url, body)
    return _following(console, url, body, done,
                      lambda: signal_stopped(console, run_id, as_json, sent[-1] if sent else None))


def _said(console: Any, outcome: SignalOutcome, status: str, as_json: bool) -> None:
    """Say the signal's outcome: the JSON object, or a line (stdout; a rejection on stderr, with its reason)."""
    from rich.markup import escape

    if as_json:
        _json_out({**outcome.to_json(), "status": status})
        return
    run, named = escape(visible(outcome.run_id)), escape(signal_named(outcome.signal, outcome.key))
    wait = escape(visible(outcome.wait or "?"))
    if outcome.outcome == "received":
        console.print(f"{named} received by wait '{wait}' of run {run}"
                      + (f" (the run is {escape(status)} now)" if status != "running" else ""), highlight=False)
    elif outcome.outcome == "buffered" and outcome.key is not None:
        console.print(f"{named} kept by run {run}: no instance of its wait '{wait}' has started with that key yet, "
                      "and the one that does takes it", highlight=False)
    elif outcome.outcome == "buffered":
        console.print(f"{named} kept by run {run}: its wait '{wait}' has not started, and takes it when it starts",
                      highlight=False)
    elif outcome.outcome == "sent" and outcome.reason:  # (waited for, not applied in time)
        _say(console, f"{signal_named(outcome.signal, outcome.key)} to run {outcome.run_id} {outcome.reason}",
             "yellow", "note")
    elif outcome.outcome == "sent":
        console.print(f"{named} sent to run {run} (id {escape(outcome.id)}): a worker process applies it once; "
                      f"`flowdsl status {run}` shows it", highlight=False)
    else:
        _say(console, f"{signal_named(outcome.signal, outcome.key)} rejected by run {outcome.run_id}: "
             f"{outcome.reason}", "yellow", "note")


def signal_stopped(console: Any, run_id: str, as_json: bool, sent: SignalOutcome | None) -> None:
    """``signal`` stopped by a stop signal before its outcome was printed; ``sent``: what sending it said, None
    before Redis took it (it may have been sent, or not)."""
    if sent is not None and sent.outcome == "sent":
        said = ("stopped waiting; the signal was sent and is applied all the same (the same command with `--id "
                f"{sent.id}` asks again for its outcome, never applying it twice)")
    elif sent is not None:
        said = f"stopped; the signal was {sent.outcome}" + (f": {sent.reason}" if sent.reason else "")
    else:
        said = ("stopped before Redis confirmed the signal: it may not have been sent (`flowdsl status "
                f"{run_id}` says whether the run has it)")
    _say(console, said, "yellow", "interrupted")
    if as_json:
        _stopped_json(run_id, said)
