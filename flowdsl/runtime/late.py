"""Answers that come after a run gave up on them: what may still answer late, what is in doubt, what is left to undo.

Stage: runtime (shared by every backend and the CLI). Imports the kernel's ``in_doubt`` and ``left_to_undo`` and
stdlib; no markup (what shows these does its own), and no runtime backend.

- Late answers (docs/kernel.md, "Late completions"): :func:`may_complete_late`, :func:`may_undo_late` and
  :func:`may_answer_late` say whether an attempt the run gave up on (it timed out) may still change what the run
  says; :data:`LATE_GRACE` and :func:`late_grace_seconds`, how long a run's end waits for them.
- In doubt: :func:`in_doubt_items` — the steps whose outcome is unknown (``RunResult.in_doubt``), with
  :func:`in_doubt_notice`, :func:`late_answer_effect`, :func:`stopped_waiting` and :func:`stopped_at_once`, the
  words for them.
- Intervention: :func:`left_to_undo_text` — what is left to undo by hand, as a log line; :func:`stopped_while`, when a
  run stopped at once stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from flowdsl.kernel import in_doubt, left_to_undo

__all__ = [
    "LATE_GRACE",
    "attempt_label",
    "in_doubt_items",
    "in_doubt_notice",
    "is_undo_attempt",
    "late_answer_effect",
    "late_grace_seconds",
    "left_to_undo_text",
    "may_answer_late",
    "may_complete_late",
    "may_undo_late",
    "stopped_at_once",
    "stopped_waiting",
    "stopped_while",
    "timed_out_attempts",
    "undo_begun",
]


_WHILE = {"starting": "as it started", "not_started": "before it started", "running": "while it ran",
          "aborting": "while cancelling its steps in flight (before undoing any)",
          "compensating": "while compensating (undoing the steps that completed)"}


def stopped_while(status: str) -> str:
    """When, in words, a run stopped at once (aborted) in state ``status`` stopped: ``while it ran``…"""
    return _WHILE.get(status, f"while {status}")


#: seconds a run's end is awaited, by default, for attempts it gave up on (they timed out) that still run and may
#: still complete a compensable step (``late_grace``; ``$FLOWDSL_LATE_GRACE`` overrides it): the local runtime holds
#: the run's end for them, and following a Redis run waits for them
LATE_GRACE = 30.0
_LATE_GRACE_MAX = 365 * 86400.0


def late_grace_seconds(value: float | None) -> float:
    """The ``late_grace`` option checked, in seconds: ``value``, else ``$FLOWDSL_LATE_GRACE``, else
    :data:`LATE_GRACE`; a ``ValueError`` (``TypeError``) saying what is wrong with it."""
    where = "late_grace"
    if value is None:
        text = os.environ.get("FLOWDSL_LATE_GRACE", "").strip()
        if not text:
            return LATE_GRACE
        where = "$FLOWDSL_LATE_GRACE"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"$FLOWDSL_LATE_GRACE must be a number of seconds, 0 to {_LATE_GRACE_MAX:.0f} (365 "
                             f"days); got {text!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"late_grace must be a number of seconds or None; got {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= _LATE_GRACE_MAX):
        raise ValueError(f"{where} must be a number of seconds, 0 to {_LATE_GRACE_MAX:.0f} (365 days); got {value!r}")
    return float(value)


def may_complete_late(plan: Mapping[str, Any], state: Mapping[str, Any], step: str, *, any_end: bool = False) -> bool:
    """Whether a success, now, of an attempt of ``step`` that the run gave up on would be a late completion
    (docs/kernel.md, "Late completions"): the step has a compensation, has no late completion yet, the run is under
    rules that have them, and the step ended ``failed`` or ``cancelled`` — or (rules 7) its undo has begun (it
    succeeded, or a late success of it joined the saga, and its compensation was dispatched: a success now would
    complete it again, after its undo). What the local runtime waits for after the run's end. ``any_end``: whatever
    the step's status short of ``succeeded`` (a run stopped at once, which hears nothing more: such a success would
    have an effect nobody undoes). Not a step passed over (``on_failure: continue``) of a run that completed: its
    success then changes nothing (docs/kernel.md, "Steps passed over")."""
    rec = state["nodes"].get(step)
    if rec is None or "late_completions" not in state:
        return False
    if "continued" in rec and state["status"] == "completed":  # (passed over: its effect was the run's wish)
        return False
    if rec["status"] == "succeeded" or "late_undo" in rec:
        # (before its undo began, a success of an attempt given up on is the same effect, undone with the step's)
        if not undo_begun(state, step):
            return False
    elif rec["status"] not in ("failed", "cancelled") and not any_end:
        return False
    if not (plan["nodes"].get(rec["node"]) or {}).get("compensate"):
        return False
    return all(entry["step"] != step for entry in state["late_completions"])


def undo_begun(state: Mapping[str, Any], step: str) -> bool:
    """Whether ``step``'s undo has begun (its compensation dispatched) under kernel rules 7 or later, which take a
    success of an attempt the run gave up on after that as a late completion: the step completed again after its
    undo (docs/kernel.md, "Late completions")."""
    comp = (state.get("compensations") or {}).get(step)
    return state.get("kernel", 1) >= 7 and comp is not None and comp["attempt"] >= 1


def may_undo_late(state: Mapping[str, Any], step: str) -> bool:
    """Whether a success, now, of an attempt of ``step``'s compensation that the run gave up on (it timed out) would
    still be taken: the compensation failed for good, under kernel rules version 5 or later, which then count the step
    undone (docs/kernel.md, "Late completions")."""
    comp = (state.get("compensations") or {}).get(step)
    return state.get("kernel", 1) >= 5 and comp is not None and comp["status"] == "failed"


def is_undo_attempt(task_id: str) -> bool:
    """Whether ``task_id`` is a compensation attempt's (``<run>/<step>#c<n>``)."""
    return task_id.rpartition("#")[2].startswith("c")


def may_answer_late(plan: Mapping[str, Any], state: Mapping[str, Any], attempt: Mapping[str, Any], *,
                    any_end: bool = False) -> bool:
    """Whether the answer of ``attempt`` (``{task_id, step, …}``), which the run gave up on, may still change what the
    run says: a step attempt's success a late completion (:func:`may_complete_late`, ``any_end`` as there), an undo
    attempt's success the step undone (:func:`may_undo_late`: its undo failed for good — or, in a run stopped at
    once, ``any_end``, waits to retry: what it leaves to undo by hand lists the step as failed, not in flight).
    What runtimes wait for after the run's end, and say is in doubt."""
    if is_undo_attempt(attempt["task_id"]):
        comp = (state.get("compensations") or {}).get(attempt["step"])
        return may_undo_late(state, attempt["step"]) or (
            any_end and comp is not None and comp["status"] == "retrying")
    return may_complete_late(plan, state, attempt["step"], any_end=any_end)


def in_doubt_notice(reason: str, items: Iterable[Mapping[str, Any]]) -> str:
    """The notice of a wait for late answers that stopped (``reason``) with ``items`` in doubt
    (:func:`in_doubt_items`): for steps, what they did is unknown — undo them by hand if they took effect; for undos
    (``undo_in_doubt``), whether they ran is unknown — check before undoing their step by hand."""
    items = list(items)
    steps = ", ".join(i["step"] for i in items if not i.get("undo_in_doubt"))
    undos = ", ".join(f"{i['step']} ({i['worker']})" for i in items if i.get("undo_in_doubt"))
    said = []
    if steps:
        said.append(f"what {steps} did is unknown — it may have completed; check it, and undo it by hand if it did")
    if undos:
        said.append(f"whether the undo of {undos} ran is unknown — it may have; check before undoing by hand")
    return f"stopped waiting ({reason}): " + "; ".join(said)


def late_answer_effect(attempts: Iterable[Mapping[str, Any]]) -> str:
    """What the answer of the attempts waited for after the run's end would do, for the notice of the wait: ``if it
    completed, its effect must be undone`` (a step's), ``if an undo completed, its step is undone`` (an undo's)."""
    kinds = {is_undo_attempt(a["task_id"]) for a in attempts}
    return " and ".join(w for w, k in (("if it completed, its effect must be undone", False),
                                       ("if an undo completed, its step is undone", True)) if k in kinds)


def attempt_label(attempt: Mapping[str, Any]) -> str:
    """``attempt 2``, ``fallback attempt 1`` for an attempt of the step's fallback worker (task id ``…#f1``), ``undo
    attempt 1`` for one of its compensation (``…#c1``)."""
    mark = str(attempt.get("task_id", "")).rpartition("#")[2][:1]
    kind = {"f": "fallback ", "c": "undo "}.get(mark, "")
    return f"{kind}attempt {attempt.get('attempt')}"


def timed_out_attempts(events: Iterable[Mapping[str, Any]]) -> set[Any]:
    """The task ids of the attempts that timed out: a step's (``step_timed_out``) or an undo's (its retry or failure
    for ``StepTimeout``)."""
    return {e.get("task_id") for e in events if e.get("type") == "step_timed_out" or (
        e.get("type") in ("compensation_retrying", "compensation_failed")
        and (e.get("error") or {}).get("type") == "StepTimeout")}


def in_doubt_items(plan: dict[str, Any], state: dict[str, Any], attempts: Iterable[Mapping[str, Any]], why: str,
                   events: Iterable[Mapping[str, Any]], *, any_end: bool = False) -> list[dict[str, Any]]:
    """The steps whose outcome is unknown, for :attr:`RunResult.in_doubt`: of ``attempts`` (``{task_id, step,
    attempt}``: attempts the run gave up on that had not answered when ``why``, a clause), those
    whose success would still count (:func:`may_answer_late`, ``any_end`` as there). For step attempts, one item per
    step, latest started first, as ``kernel.in_doubt`` gives it; for undo attempts (``undo_in_doubt``: the step may
    be undone already), the step's item in ``intervention``, after them. Each with ``task_ids`` and a ``reason``
    saying what happened."""
    events = list(events)
    timed_out = timed_out_attempts(events)
    by_step: dict[str, list[Mapping[str, Any]]] = {}
    undos: dict[str, list[Mapping[str, Any]]] = {}
    for attempt in attempts:
        if may_answer_late(plan, state, attempt, any_end=any_end):
            (undos if is_undo_attempt(attempt["task_id"]) else by_step).setdefault(attempt["step"], []).append(attempt)
    order = sorted(by_step, key=lambda k: (-state["nodes"][k].get("t0", 0), k))
    items = in_doubt(plan, state, order)
    for item in items:
        mine = by_step[item["step"]]
        numbers = ", ".join(attempt_label(a) for a in mine)
        what = "timed out" if all(a["task_id"] in timed_out for a in mine) else "timed out or was cancelled"
        item["task_ids"] = [a["task_id"] for a in mine]
        effect = ("it may have completed the step again after the step was undone, so the undo may have to be "
                  "repeated by hand") if item.get("after_undo") else \
            "it may have completed, and its compensation was never run"
        item["reason"] = (f"the run gave up on {numbers} of the step (it {what}), but its worker was still "
                          f"running when {why}: {effect}")
    # (a run stopped at once has no intervention in its state: what it leaves to undo is computed)
    left = (state.get("intervention") or {}).get("steps") or (left_to_undo(plan, state) if undos else [])
    for listed in left:
        mine = undos.get(listed["step"], []) if listed["status"] == "failed" else []
        if mine:
            numbers = ", ".join(attempt_label(a) for a in mine)
            what = "timed out" if all(a["task_id"] in timed_out for a in mine) else "timed out or was cancelled"
            items.append({**listed, "task_ids": [a["task_id"] for a in mine], "undo_in_doubt": True,
                          "reason": f"the run gave up on {numbers} of the step (it {what}), but its worker was still "
                                    f"running when {why}: the step may be undone already — check before undoing it "
                                    "by hand"})
    return items


def died_in_doubt(plan: dict[str, Any], state: dict[str, Any], attempts: Iterable[Mapping[str, Any]], why: str,
                  events: Iterable[Mapping[str, Any]], known: Iterable[str] = ()) -> list[dict[str, Any]]:
    """What a resumed run leaves in doubt of ``attempts``: those its earlier process had given up on (they timed out)
    and that died with it unanswered (``why``: how that process stopped), judged against the run's state now
    (:func:`in_doubt_items`, as for a run stopped at once) — but for a success after the step's undo, which a dead
    process cannot make (the undo came after it). ``known``: steps listed in doubt already (left out)."""
    seen = set(known)
    return [item for item in in_doubt_items(plan, state, attempts, why, events, any_end=True)
            if not item.get("after_undo") and item["step"] not in seen]


def stopped_waiting(reason: str) -> str:
    """The clause of an in-doubt ``reason`` for a wait after the run's end that stopped (``reason``)."""
    return f"the runtime stopped waiting for it ({reason})"


def stopped_at_once(reason: str) -> str:
    """The clause of an in-doubt ``reason`` for a run stopped at once (``reason``: the ``runtime_aborted`` one)."""
    return f"the run was stopped at once ({reason})"


def left_to_undo_text(items: Iterable[Mapping[str, Any]]) -> str:
    """What is left to undo by hand (``intervention["steps"]``, ``RunAborted.left_to_undo``) as plain text, for a
    log line: each step in the order to undo it, with its undo worker, how far that got and both idempotency
    keys; ``nothing`` when there is none."""
    said = []
    for item in items:
        if item.get("after_undo"):
            how = f"its undo {item.get('worker')} ran before that"
        elif item.get("status") == "failed":
            how = f"its undo {item.get('worker')} failed (x{item.get('attempts')})"
        elif item.get("status") == "in_flight" and not item.get("reason"):
            how = f"its undo {item.get('worker')} was running: it may or may not have taken effect"
        else:
            how = f"its undo {item.get('worker')} was not run"
        if item.get("reason"):
            how += f" ({item['reason']})"
        keys = f"step key {item['step_idempotency_key']}, undo key {item.get('idempotency_key')}" \
            if item.get("step_idempotency_key") else f"idempotency key {item.get('idempotency_key')}"
        said.append(f"{item.get('step')}: {how} [{keys}]")
    return "; ".join(said) if said else "nothing"
