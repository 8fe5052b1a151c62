"""Kernel, saga half: aborting a run, undoing what completed, finishing.

Stage: kernel — pure; imports ``flowdsl.expr`` and the other ``kernel_*``
modules only; no I/O, no clock.

The compensation order (docs/kernel.md, "Failure, cancellation and compensation"): A *precedes* B
when A completed before B started, in the kernel's own event order (the
logical ``clock`` stamped at each step start ``t0`` and completion ``t1``).
Every plan dependency is such a precedence, and in a sequence it is the
completion order. A's compensation may start once every compensation of a step
it precedes has succeeded; compensations with no precedence between them run
concurrently (dispatched in reverse completion order). One that fails for good
blocks exactly the compensations that had to wait for it; all others still run,
and the run ends ``needs_intervention`` with the blocked and failed ones listed.
"""

from __future__ import annotations

import heapq
from typing import Any

from flowdsl.expr import ExpressionError
from flowdsl.kernel_core import END_STATES, Core, error
from flowdsl.kernel_program import Json, retry_delay, retryable
from flowdsl.kernel_wait import cancel_waits

#: a compensation's status -> its ``status`` in ``intervention``: ``failed`` (for good, or it was waiting to
#: retry when the run stopped), ``in_flight`` (running when the run stopped: it may or may not have taken effect)
_LEFT_STATUS = {"failed": "failed", "retrying": "failed", "running": "in_flight"}
#: the ``reason`` of a step left to undo by hand because it completed late (docs/kernel.md, "Late completions")
LATE_REASON = ("the step completed after the run had decided what to undo (a late result, e.g. from an attempt that "
               "had timed out, or on Redis from a worker whose lease had expired): its effect stands and its "
               "compensation was never run")
#: the ``reason`` of a late completion that joins the saga (kernel version 4+): nothing it follows was undone yet
LATE_JOINED_REASON = ("the step completed after the run had given up on it (a late result, e.g. from an attempt that "
                      "timed out), before anything it follows was undone: it is undone with the others")
#: the ``reason`` of a late completion of a step the run had passed over (``on_failure: continue``, version 8)
LATE_PASSED_REASON = ("the step completed after it had failed and the run had gone on without it (on_failure: "
                      "continue): its effect stands, and it is undone with the others if the run compensates")
#: ... and of one that arrives once the run has completed: the run wanted the step's effect; nothing is undone
LATE_DONE_REASON = ("the step completed after it had failed and the run had gone on without it (on_failure: "
                    "continue), once the run had completed: its effect stands, and nothing is undone")
#: the ``reason`` of a step whose worker succeeded but whose output map failed, and which then failed (version 4+)
UNMAPPED_REASON = ("the step's worker succeeded but its output map failed on the result, so the step failed: the "
                   "effect stands, and it is undone with the others")
#: the ``reason`` of a step left to undo by hand because an attempt the run had given up on succeeded after the step's
#: undo had begun (kernel version 7): ``{attempt}`` is that attempt's number
AFTER_UNDO_REASON = ("the step completed again after it was undone (attempt {attempt}'s result: an attempt the run had "
                     "given up on, e.g. one that had timed out, went on and succeeded after the step's undo had "
                     "begun): its effect stands, so the undo may have to be repeated by hand")
#: the ``reason`` of a step listed by ``left_to_undo`` because an attempt of it was in flight when the run stopped
IN_FLIGHT_REASON = ("an attempt of the step was in flight when the run stopped: it may have completed, and its "
                    "compensation was never run")
#: the same, for a step whose undo had begun (kernel version 7): an attempt the run had given up on still ran
IN_FLIGHT_AFTER_UNDO_REASON = ("an attempt of the step that the run had given up on was still running after the "
                               "step's undo had begun: it may have completed the step again, so the undo may have to "
                               "be repeated by hand")


class Saga(Core):
    """Abort, cancellation of in-flight work, compensation and the end of a run."""

    __slots__ = ()

    # --- abort --------------------------------------------------------------------

    def abort(self, reason: str, err: dict[str, Any], step: str | None) -> None:
        """Stop a running run: cancel what is in flight, then compensate (``reason``: failed|cancelled|timeout).

        The run's and the sub-flows' timeout timers are cancelled: from here on only attempt timeouts apply."""
        if self.s["status"] != "running":
            return
        self.s.update(status="aborting", abort=reason, error=err, failed_step=step)
        self.queue = None
        if step is not None:
            self._fail_ancestors(self.nodes[step]["parent"], err)
            self.settle_late(step)
        for timer_id, timer in list(self.timers.items()):
            if timer["purpose"] in ("run_timeout", "flow_timeout"):
                self.cancel_timer(timer_id)
            elif timer["purpose"] == "retry":
                self.cancel_timer(timer_id)
                rec = self.nodes[timer["step"]]
                rec.update(status="cancelled", finished_at=self.at)
                self.emit("step_cancelled", timer["step"], attempt=rec["attempt"], error=rec["error"],
                          reason="the run was aborted while the step waited to retry")
                self.settle_late(timer["step"])
        cancel_waits(self)
        for task_id, task in self.tasks.items():
            self.nodes[task["step"]]["status"] = "cancelling"
            self.command("cancel_task", task_id=task_id, step=task["step"])
        self.maybe_compensate()

    def _fail_ancestors(self, container: str | None, err: dict[str, Any]) -> None:
        """The groups (and iterations) around a step that failed for good fail with it, innermost first,
        each with its ``step_failed`` event carrying the step's error."""
        while container is not None:
            if container in self.iters:
                it = self.iters[container]
                it["status"] = "failed"
                container = it["fe"]
                continue
            rec = self.nodes[container]
            if rec["status"] == "running":
                rec.update(status="failed", finished_at=self.at, error=err)
                self.emit("step_failed", container, error=err)
            container = rec["parent"]

    def maybe_compensate(self) -> None:
        """Begin compensating once nothing of the aborted run is in flight."""
        if self.s["status"] == "aborting" and not self.tasks:
            self._start_saga()

    # --- compensation ---------------------------------------------------------------

    def _undoable(self) -> list[tuple[int, str]]:
        """(completion mark, instance key) of every completed step that has a compensation (a late completion
        that joined the saga included)."""
        return [(rec["t1"], ikey) for ikey, rec in self.nodes.items()
                if (rec["status"] == "succeeded" or "late_undo" in rec) and self.is_step(rec["node"])
                and self.p.nodes[rec["node"]].get("compensate")]

    def _start_saga(self) -> None:
        done = self._undoable()
        if not done:
            late = self._late_left()
            if late:
                self.s["intervention"] = {"steps": late}
                self.finish("needs_intervention")
                return
            self.finish("cancelled" if self.s["abort"] == "cancelled" else "failed")
            return
        done.sort(reverse=True)
        waiting = [[-self.nodes[ikey]["t0"], ikey] for _, ikey in done]
        heapq.heapify(waiting)
        self.s.update(status="compensating", saga={"order": [ikey for _, ikey in done], "next": 0,
                                                   "waiting": waiting, "active": 0})
        self.s["compensations"] = {ikey: {"status": "pending", "attempt": 0, "task": None, "error": None,
                                          "started_at": None, "finished_at": None} for _, ikey in done}
        self.advance_saga()

    def advance_saga(self) -> None:
        """Dispatch every compensation whose successors are undone; finish when nothing can move.

        ``order`` lists the steps by completion, latest first; ``waiting`` is a
        heap of the start marks of the compensations not yet succeeded. Every
        step that completed after the latest such start may be undone now.
        """
        saga = self.s["saga"]
        comps: dict[str, dict[str, Any]] = self.s["compensations"]
        waiting: list[list[Any]] = saga["waiting"]
        while waiting and comps[waiting[0][1]]["status"] == "done":
            heapq.heappop(waiting)
        horizon = -waiting[0][0] if waiting else -1
        order: list[str] = saga["order"]
        while saga["next"] < len(order) and self.nodes[order[saga["next"]]]["t1"] > horizon:
            ikey = order[saga["next"]]
            saga["next"] += 1
            self._dispatch_compensation(ikey)
        if saga["active"] == 0:
            self._end_saga()

    def compensation_input(self, ikey: str, rec: dict[str, Any] | None = None) -> Json:
        """The context the step saw plus its contribution, or its compensation's ``with`` over that
        (``rec``: the step's record as it would be had it succeeded, for a late completion)."""
        rec = self.nodes[ikey] if rec is None else rec
        ctx = self.context(ikey)
        data = {**ctx, **self.contribution(rec)}
        template = self.p.nodes[rec["node"]]["compensate"].get("with")
        if template is None:
            return data
        return self.render(ikey, template, data, where="compensate.with", context=ctx, own=rec.get("result"))

    def _dispatch_compensation(self, ikey: str) -> None:
        comp = self.s["compensations"][ikey]
        spec = self.p.nodes[self.nodes[ikey]["node"]]["compensate"]
        try:
            data = self.compensation_input(ikey)
        except ExpressionError as exc:
            comp.update(status="failed", error=error("ExpressionError", exc.message), finished_at=self.at)
            self.emit("compensation_failed", ikey, attempt=comp["attempt"], error=comp["error"],
                      worker=spec["worker"])
            if comp["attempt"]:
                self.s["saga"]["active"] -= 1
            return
        if comp["status"] == "pending":
            self.s["saga"]["active"] += 1
        comp["attempt"] += 1
        attempt: int = comp["attempt"]
        idem = self.idempotency_key(ikey)
        task_id = f"{idem}#c{attempt}"
        timeout: int | None = spec.get("timeout_ms")
        self.tasks[task_id] = {"step": ikey, "kind": "compensate", "attempt": attempt,
                               "timer": task_id + "@timeout" if timeout else None}
        comp.update(status="running", task=task_id)
        if comp["started_at"] is None:
            comp["started_at"] = self.at
        self.command("dispatch", task_id=task_id, kind="compensate", step=ikey, node=self.nodes[ikey]["node"],
                     worker=spec["worker"], input=data, attempt=attempt,
                     idempotency_key=idem + "/compensate", timeout_ms=timeout, llm=None)
        if timeout:
            self.schedule(task_id + "@timeout", timeout, "attempt_timeout", ikey, task_id=task_id)
        self.emit("compensation_started", ikey, attempt=attempt, task_id=task_id, worker=spec["worker"],
                  idempotency_key=idem + "/compensate")

    def compensation_succeeded(self, ikey: str, task_id: str, attempt: int | None = None) -> None:
        """The compensation of ``ikey`` succeeded (``attempt``: the attempt whose success it is, when not the
        latest: :meth:`late_undo`)."""
        comp = self.s["compensations"][ikey]
        comp.update(status="done", task=None, finished_at=self.at, error=None)  # (as a step's, on success)
        self.s["saga"]["active"] -= 1
        self.s["compensated"].append(ikey)
        self.emit("compensation_succeeded", ikey, attempt=comp["attempt"] if attempt is None else attempt,
                  task_id=task_id)
        self.advance_saga()

    def compensation_attempt_failed(self, ikey: str, task_id: str, err: dict[str, Any]) -> None:
        comp = self.s["compensations"][ikey]
        spec = self.p.nodes[self.nodes[ikey]["node"]]["compensate"]
        policy = spec.get("retry") or {"attempts": 1}
        attempt: int = comp["attempt"]
        comp.update(error=err, task=None)
        if attempt < policy["attempts"] and retryable(policy, err):
            delay = retry_delay(policy, attempt, self.s["seed"], ikey + "/compensate")
            comp["status"] = "retrying"
            self.emit("compensation_retrying", ikey, attempt=attempt, task_id=task_id, error=err,
                      delay_ms=delay, next_attempt=attempt + 1)
            self.schedule(f"{self.idempotency_key(ikey)}#c{attempt + 1}@retry", delay, "retry", ikey,
                          compensation=True)
            return
        comp.update(status="failed", finished_at=self.at)
        self.s["saga"]["active"] -= 1
        self.emit("compensation_failed", ikey, attempt=attempt, task_id=task_id, error=err,
                  worker=spec["worker"])
        self.advance_saga()

    def late_undo(self, ikey: str, task_id: str, digits: str) -> None:
        """A success of an earlier attempt of a compensation that is not resolved yet — it timed out, and the
        compensation waits to retry or runs a newer attempt (kernel version 4+): the undo is done (one idempotency
        key: the newer attempt would make the same undo), so the compensation succeeds now; its retry timer is
        cancelled, or its newer attempt given up (``cancel_task``). Before, the success was rejected and the
        record could say the undo failed for good."""
        comp = (self.s.get("compensations") or {}).get(ikey)
        if self.s["kernel"] < 4 or comp is None:
            return
        latest: int = comp["attempt"]  # retrying: the attempt that failed; running: the one in flight
        if not (digits.isascii() and digits.isdigit()) or digits != str(int(digits)) \
                or not 1 <= int(digits) <= latest - (comp["status"] == "running"):
            return
        if comp["status"] == "failed":
            if self.s["kernel"] >= 5:
                self._undone_after_failure(ikey, task_id, int(digits))
            return
        if self.s["status"] != "compensating" or comp["status"] not in ("retrying", "running"):
            return
        if comp["status"] == "running":
            current = comp["task"]
            task = self.tasks.pop(current)
            self.ended.append(current)
            self.cancel_timer(task["timer"])
            self.command("cancel_task", task_id=current, step=ikey)
        else:
            self.cancel_timer(f"{self.idempotency_key(ikey)}#c{latest + 1}@retry")
        self.compensation_succeeded(ikey, task_id, attempt=int(digits))

    def _undone_after_failure(self, ikey: str, task_id: str, attempt: int) -> None:
        """A success of an attempt of a compensation that had failed for good — an attempt that timed out went on
        and succeeded (kernel version 5): the undo is done. While the run is compensating, the compensations it
        held back run now; once the run has ended, the step leaves its ``intervention`` (the steps held back stay
        listed: the run does not start them after its end), and a run left with nothing to undo by hand ends as
        its saga would have: ``compensated`` or ``cancelled``, ``run_finished`` said again with
        ``previous_status``. Before, the success was only rejected, and a person was told to undo the step again."""
        comp = self.s["compensations"][ikey]
        comp.update(status="done", task=None, finished_at=self.at, error=None)
        self.s["compensated"].append(ikey)
        self.emit("compensation_succeeded", ikey, attempt=attempt, task_id=task_id, after_failure=True)
        if self.s["status"] not in END_STATES:
            self.advance_saga()  # (its failure already left the compensations in flight)
            return
        kept = [item for item in (self.s["intervention"] or {}).get("steps") or ()
                if not (item["step"] == ikey and item["status"] == "failed")]
        if kept:
            self.s["intervention"] = {"steps": kept}
            return
        self.s["intervention"] = None
        self.finish("cancelled" if self.s["abort"] == "cancelled" else "compensated",
                    previous_status=self.s["status"])

    def retry_compensation(self, ikey: str) -> None:
        comp = self.s["compensations"][ikey]
        if self.s["status"] == "compensating" and comp["status"] == "retrying":
            self._dispatch_compensation(ikey)
            if comp["status"] == "failed":
                self.advance_saga()

    def _end_saga(self) -> None:
        comps: dict[str, dict[str, Any]] = self.s["compensations"]
        left = [k for k in self.s["saga"]["order"] if comps[k]["status"] != "done"]
        late = self._late_left()
        if left or late:
            self.s["intervention"] = {"steps": late + [self._left_to_undo(k) for k in left]}
            self.finish("needs_intervention")
        else:
            self.finish("cancelled" if self.s["abort"] == "cancelled" else "compensated")

    def left_to_undo(self) -> list[dict[str, Any]]:
        """Every completed step with a compensation that is not undone, in the order to undo it, each as
        ``intervention`` lists it, then every compensable step with an attempt in flight (``in_flight``): what a run
        stopped at once (its process aborted) leaves to undo by hand."""
        saga = self.s["saga"]
        order = saga["order"] if saga else [ikey for _, ikey in sorted(self._undoable(), reverse=True)]
        comps: dict[str, dict[str, Any]] = self.s["compensations"]
        left = [self._left_to_undo(k) for k in order if k not in comps or comps[k]["status"] != "done"]
        # then the compensable steps not resolved yet that may have made their effect: an attempt in flight (it may
        # have completed), or a success of an earlier attempt kept for when the step ends (it did), latest first
        open_ = sorted(((-rec["t0"], ikey) for ikey, rec in self.nodes.items()
                        if self.is_step(rec["node"]) and self.p.nodes[rec["node"]].get("compensate")
                        and (rec["status"] in ("running", "cancelling") or "late" in rec)))
        unresolved = [self._left_to_undo(ikey, self.nodes[ikey].get("late"), in_flight=True) for _, ikey in open_]
        return self._late_left() + left + unresolved  # as _end_saga lists them, then the unresolved ones

    def in_flight_item(self, ikey: str) -> dict[str, Any]:
        """Compensable step ``ikey`` as ``left_to_undo`` lists a step with an attempt in flight (it may have
        completed): for ``kernel.in_doubt``. For a step whose undo has begun (an attempt the run gave up on may
        complete it again: kernel version 7), ``after_undo`` is true, and its ``input`` is what its undo had."""
        return self._left_to_undo(ikey, in_flight=True)

    def undo_begun(self, ikey: str) -> bool:
        """Whether step ``ikey``'s undo has begun — its compensation dispatched at least once — under rules that
        count a success of an attempt given up on after that (kernel version 7): its effect would stand again."""
        comp = (self.s.get("compensations") or {}).get(ikey)
        return self.s["kernel"] >= 7 and comp is not None and comp["attempt"] >= 1

    def _left_to_undo(self, ikey: str, late: dict[str, Any] | None = None, in_flight: bool = False) -> dict[str, Any]:
        """One step left to undo by hand, as ``intervention`` lists it (``late``: its ``late_completions``
        entry, or the late success kept on its record, for a step that completed late: its compensation was never
        run, its input is built from the late result, and ``reason`` says why; ``in_flight``: a step whose
        attempt was in flight when the run stopped, listed ``in_flight`` with its input built from its context
        alone, unless it has such a late success)."""
        comp = self.s["compensations"].get(ikey) or {"status": "pending", "attempt": 0, "error": None}
        rec = self.nodes[ikey]
        if late is not None or in_flight:
            comp = {"status": "pending" if late is not None else "running", "attempt": 0, "error": None}
        if late is not None:
            rec = {**rec, "result": late["result"], **({"out": late["out"]} if "out" in late else {})}
        idem = self.idempotency_key(ikey)
        last = comp["error"]
        data: Json = None
        try:
            data = self.compensation_input(ikey, rec)
        except ExpressionError as exc:
            last = last or error("ExpressionError", exc.message)
        item = {"step": ikey, "node": rec["node"], "worker": self.p.nodes[rec["node"]]["compensate"]["worker"],
                "status": _LEFT_STATUS.get(comp["status"], "not_attempted"),
                "input": data, "idempotency_key": idem + "/compensate",
                "step_idempotency_key": idem, "attempts": comp["attempt"], "last_error": last,
                "step_result": rec.get("result") if late is not None or not in_flight else None}
        if late is not None and late.get("after_undo"):
            item["reason"] = AFTER_UNDO_REASON.format(attempt=late["attempt"])
            item["after_undo"] = True
        elif late is not None:
            item["reason"] = LATE_REASON
        elif in_flight and self.undo_begun(ikey):
            item.update(reason=IN_FLIGHT_AFTER_UNDO_REASON, after_undo=True)
        elif in_flight:
            item["reason"] = IN_FLIGHT_REASON
        return item

    def _late_left(self) -> list[dict[str, Any]]:
        """The late completions, as ``intervention`` lists them: the latest first (they completed last)."""
        late: list[dict[str, Any]] = self.s.get("late_completions") or []
        return [self._left_to_undo(entry["step"], entry) for entry in reversed(late)]

    def record_late_completion(self, ikey: str, late: dict[str, Any], *, after_undo: bool = False) -> None:
        """Step ``ikey``, whose record ended ``cancelled`` or ``failed``, completed late (``late``: ``{task_id,
        attempt, result, out?}``, judged a success): record it in ``late_completions`` and say so; the saga, if
        any, goes on and ends ``needs_intervention``; a run that has ended is made so now (docs/kernel.md,
        "Late completions"). ``after_undo`` (kernel version 7): the step had succeeded and its undo had begun when
        an attempt the run had given up on succeeded: it completed again, after its undo."""
        rec = self.nodes[ikey]
        entry: dict[str, Any] = {"step": ikey, "node": rec["node"], "task_id": late["task_id"],
                                 "attempt": late["attempt"], "idempotency_key": self.idempotency_key(ikey),
                                 "compensation": self.p.nodes[rec["node"]]["compensate"]["worker"],
                                 "result": late["result"], "at": self.at}
        if "out" in late:
            entry["out"] = late["out"]
        if after_undo:
            entry["after_undo"] = True
        self.s["late_completions"].append(entry)
        reason = AFTER_UNDO_REASON.format(attempt=late["attempt"]) if after_undo else LATE_REASON
        self._emit_late(ikey, late, reason, by_hand=True, after_undo=after_undo)
        if self.s["status"] in END_STATES:
            self.reopen_for_late_completion(entry)

    def _emit_late(self, ikey: str, late: dict[str, Any], reason: str, *, by_hand: bool,
                   after_undo: bool = False) -> None:
        """The ``late_completion`` event; ``by_hand`` (only under kernel version 4+, which can also undo the step
        in the saga): whether the step is left to undo by hand; ``after_undo`` (version 7, only when true): it
        completed again after its undo had begun."""
        extra: dict[str, Any] = {"by_hand": by_hand} if self.s["kernel"] >= 4 else {}
        if after_undo:
            extra["after_undo"] = True
        self.emit("late_completion", ikey, attempt=late["attempt"], task_id=late["task_id"],
                  idempotency_key=self.idempotency_key(ikey),
                  compensation=self.p.nodes[self.nodes[ikey]["node"]]["compensate"]["worker"],
                  run_status=self.s["status"], reason=reason, **extra)

    def late_completed(self, ikey: str, late: dict[str, Any]) -> None:
        """Step ``ikey``, whose record ended ``cancelled`` or ``failed``, completed late (``late``: ``{task_id,
        attempt, result, out?}``). Under kernel version 4+, while the run is aborting, or compensating with no step
        it follows undone or being undone, it joins the saga: undone with the others, latest completed first, the
        steps before it only after it (docs/kernel.md, "Late completions"). Otherwise it is left to undo by hand
        (:meth:`record_late_completion`)."""
        rec = self.nodes[ikey]
        status = self.s["status"]
        comps: dict[str, dict[str, Any]] = self.s["compensations"]
        passed = "continued" in rec  # (passed over: on_failure: continue, rules 8)
        joins = self.s["kernel"] >= 4 and (status == "aborting" or (status == "compensating" and all(
            comp["status"] == "pending" or self.nodes[k]["t1"] > rec["t0"] for k, comp in comps.items())) or (
            passed and status in ("running", "completed")))
        if not joins:
            self.record_late_completion(ikey, late)
            return
        if not (passed and status in ("running", "completed")):  # (passed over: its mark is where it was passed)
            self.s["clock"] += 1
            rec["t1"] = self.s["clock"]
        rec.update(result=late["result"],
                   late_undo={"task_id": late["task_id"], "attempt": late["attempt"], "at": self.at})
        if "out" in late:
            rec["out"] = late["out"]
        reason = LATE_DONE_REASON if status == "completed" else UNMAPPED_REASON if late.get("unmapped") else \
            LATE_PASSED_REASON if passed and status == "running" else LATE_JOINED_REASON
        self._emit_late(ikey, late, reason, by_hand=False)
        if status == "compensating":  # it completed last: the next to undo, before whatever it follows
            saga = self.s["saga"]
            saga["order"].insert(saga["next"], ikey)
            heapq.heappush(saga["waiting"], [-rec["t0"], ikey])
            comps[ikey] = {"status": "pending", "attempt": 0, "task": None, "error": None, "started_at": None,
                           "finished_at": None}
            self.advance_saga()

    def settle_late(self, ikey: str) -> None:
        """Step ``ikey`` has just ended ``cancelled`` or ``failed``: a success of an earlier attempt that arrived
        while it was unresolved (kept on its record as ``late``) is a late completion now, as if it arrived now."""
        late = self.nodes[ikey].pop("late", None)
        if late is not None:
            self.late_completed(ikey, late)

    def reopen_for_late_completion(self, entry: dict[str, Any]) -> None:
        """A late completion for a run that has ended: it is ``needs_intervention`` now, its ``intervention``
        listing the step first (before anything already left to undo), announced by ``run_finished`` again."""
        previous = self.s["status"]
        kept = (self.s["intervention"] or {}).get("steps") or []
        self.s["intervention"] = {"steps": [self._left_to_undo(entry["step"], entry), *kept]}
        self.finish("needs_intervention", previous_status=previous)

    # --- the end --------------------------------------------------------------------------

    def finish(self, status: str, **extra: Any) -> None:
        """End the run: settle leftover records and timers, record the final context, say so (``extra``: more
        fields of ``run_finished``)."""
        self.s.update(status=status, finished_at=self.at)
        self.queue = None
        for timer_id in list(self.timers):
            self.cancel_timer(timer_id)
        for rec in self.nodes.values():
            if rec["status"] == "running":
                rec.update(status="cancelled", finished_at=self.at)
        for it in self.iters.values():
            if it["status"] == "running":
                it["status"] = "cancelled"
        self.s["context"] = self.final_context()
        err = self.s["error"]
        self.emit("run_finished", self.s["failed_step"], error=err, status=status,
                  compensated=list(self.s["compensated"]), **extra)
        self.command("finish", status=status, error=err)
