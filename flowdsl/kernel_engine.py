"""Kernel, forward half: starting nodes, dispatching attempts, judging their outcomes.

Stage: kernel — pure; imports ``flowdsl.expr`` and the other ``kernel_*``
modules only; no I/O, no clock. :class:`Machine` handles one input event
(docs/kernel.md, "Input events") over the run state, in place. Nodes that
become ready are queued and started in FIFO order, so a long chain of skipped
or empty nodes never recurses.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from flowdsl.expr import ExpressionError, truthy
from flowdsl.kernel_core import (
    DONE,
    END_STATES,
    error,
    switch_label,
)
from flowdsl.kernel_program import STEP_KINDS, Json, _start_templates, retry_delay, retryable
from flowdsl.kernel_saga import Saga
from flowdsl.kernel_wait import begin_wait, receive, wait_timer_fired

#: the error type of an LLM call made with no model configured: never retried, goes to the fallback
LLM_NOT_CONFIGURED = "LLMNotConfigured"
#: the error type of an LLM step (or its fallback) given input fields that do not fit its signature: the same
#: context gives the same verdict, so it is not retried (kernel version 3 on)
INPUT_INVALID = "InputInvalid"
#: the error of a sub-flow node whose sub-flow did not finish within its file's `timeout:` (never retried)
SUBFLOW_TIMEOUT = "SubflowTimeout"
_RESULT_EVENTS = ("task_succeeded", "task_failed", "task_cancelled")


class Machine(Saga):
    """One decision: the start of a run, or one input event applied to its state."""

    __slots__ = ()  # (as Core's: no instance dict to make per decision)

    # --- entry points ------------------------------------------------------------

    def start(self) -> None:
        flow = self.p.flow
        state = self.s
        seq = state["seq"]
        state["seq"] = seq + 1
        self.events.append({"type": "run_started", "at": self.at, "seq": seq, "run_id": self.run_id, "step": None,
                            "node": None, "kind": None, "attempt": None, "task_id": None, "error": None,
                            "flow": flow.get("name"), "seed": state["seed"]})  # (emit's, without its lookups)
        problem = "it is not a JSON object" if not isinstance(self.s["input"], dict) else \
            self.p.schema_error(flow.get("input_schema"), self.s["input"])
        if problem is not None:
            self.s["error"] = error("InputInvalid", f"the run input does not match the flow's input schema: "
                                    f"{problem}")
            self.s["input"] = self.s["input"] if isinstance(self.s["input"], dict) else {}
            self.finish("failed")
            return
        if flow.get("timeout_ms"):
            self.schedule(f"{self.run_id}@timeout", flow["timeout_ms"], "run_timeout", None)
        self.s["remaining"] = len(self.p.root)
        if not self.p.root:
            self.finish("completed")
            return
        self._start_list(self.p.root, None)
        self._pump()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in _RESULT_EVENTS or kind == "task_started":
            task_id = event.get("task_id")
            if not isinstance(task_id, str):
                raise ValueError(f"event {kind!r} needs a 'task_id' string")
            meta = event.get("meta")
            if meta is not None and kind in ("task_succeeded", "task_failed"):
                if not isinstance(meta, dict):
                    raise ValueError(f"event {kind!r}: 'meta' must be an object, found {type(meta).__name__}")
                self.answer = (task_id, meta)
            task = self.tasks.get(task_id)
            if task is None:
                if kind != "task_started":
                    reason = "run finished" if self.s["status"] in END_STATES else "stale or unknown task"
                    self.emit("result_rejected", task_id=task_id, reason=reason, result_type=kind)
                    if kind == "task_succeeded":
                        self._late_completion(task_id, event.get("result"))
                return
            if kind == "task_started":
                self.emit("attempt_started", task["step"], attempt=task["attempt"], task_id=task_id)
            elif kind == "task_succeeded":
                self._task_succeeded(task_id, event.get("result"))
            elif kind == "task_failed":
                self._task_failed(task_id, _error_of(event.get("error")))
            else:
                self._task_cancelled(task_id)
        elif kind == "timer_fired":
            timer_id = event.get("timer_id")
            if not isinstance(timer_id, str):
                raise ValueError("event 'timer_fired' needs a 'timer_id' string")
            self._timer_fired(timer_id)
        elif kind == "cancel_requested":
            reason = event.get("reason") or "cancel requested"
            self.abort("cancelled", error("Cancelled", str(reason)), None)
        elif kind == "signal":
            receive(self, event)
        else:
            raise ValueError(f"unknown input event type {kind!r}")
        self._pump()

    # --- starting nodes -------------------------------------------------------------

    def _pump(self) -> None:
        while self.queue and self.s["status"] == "running":
            key, container = self.queue.popleft()
            self._begin(key, container)

    def _start_list(self, keys: list[str], container: str | None) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.extend((k, container) for k in keys if not self.p.deps[k])

    def _begin(self, key: str, container: str | None) -> None:
        lineage = self.lineage(container)
        iteration = lineage[0]
        ikey = iteration + "/" + key if iteration else key
        if ikey in self.nodes:
            return
        node = self.p.nodes[key]
        kind = node["kind"]
        try:
            if kind in STEP_KINDS and not node.get("when"):  # (the common case: its record from its template)
                begun, _, _, started, _ = self.p.starts.get(key) or _start_templates(self.p, key)
                self.nodes[ikey] = rec = begun.copy()
                rec["parent"] = container  # (one statement per key: a multiple assignment would build a tuple)
                rec["iter"] = iteration
                rec["flow"] = lineage[1]
                rec["started_at"] = self.at
                rec["t0"] = self.tick()
                self._step_started(ikey, started)
                return
            self.new_record(key, container, "running", lineage)
            if node.get("when") and not truthy(self.evaluate(ikey, node["when"], self.context(ikey), where="when")):
                self._skip(ikey, "when")
                self._node_done(ikey)
                return
            if kind in STEP_KINDS:  # (the record as above)
                rec = self.nodes[ikey]
                rec["attempt"] = 0
                rec["attempts"] = 0
                rec["phase"] = "main"
                rec["task"] = None
                rec["t0"] = self.tick()
                self._step_started(ikey, (self.p.starts.get(key) or _start_templates(self.p, key))[3])
            elif kind in ("sequence", "parallel"):
                self._open_group(ikey, node["children"])
            elif kind == "switch":
                self._begin_switch(ikey, node)
            elif kind == "for_each":
                self._begin_for_each(ikey, node)
            elif kind == "wait":
                begin_wait(self, ikey, node)
            else:
                self._begin_flow(ikey, node)
        except ExpressionError as exc:
            self._node_failed(ikey, error("ExpressionError", exc.message))

    def _step_started(self, ikey: str, started: dict[str, Any]) -> None:
        """A step (task or LLM step) just recorded as started: say so (``started``: its template of the event),
        and dispatch its first attempt."""
        state = self.s
        seq = state["seq"]
        state["seq"] = seq + 1
        started = started.copy()
        started["at"] = self.at
        started["seq"] = seq
        started["run_id"] = self.run_id
        started["step"] = ikey
        self.events.append(started)
        self._dispatch(ikey)

    def _open_group(self, ikey: str, children: list[str], **info: Any) -> None:
        self.nodes[ikey]["remaining"] = len(children)
        self.emit("step_started", ikey, **info)
        if children:
            self._start_list(children, ikey)
        else:
            self._group_done(ikey)

    def _begin_switch(self, ikey: str, node: dict[str, Any]) -> None:
        label = switch_label(self.evaluate(ikey, node["on"], self.context(ikey), where="on"))
        chosen: list[str] | None = None
        for case in node.get("cases") or ():
            if case["match"] == label:
                chosen = case["children"]
                break
        default = chosen is None and node.get("default") is not None
        if default:
            chosen = node["default"]
        self.nodes[ikey].update(case=label if chosen is not None and not default else None, default=default)
        for kids in self.p.child_lists(node["key"]):
            if kids != chosen:
                for kid in kids:
                    self._skip(self.new_record(kid, ikey, "skipped"), "switch")
        self._open_group(ikey, chosen or [], value=label, case=self.nodes[ikey]["case"], default=default)

    def _begin_for_each(self, ikey: str, node: dict[str, Any]) -> None:
        ctx = self.context(ikey)
        items = self.evaluate(ikey, node["items"], ctx, where="items")
        items = [] if items is None else items if isinstance(items, list) else [items]
        rec = self.nodes[ikey]
        rec.update(items=items, results=[None] * len(items), next=0, running=0, remaining=len(items),
                   scope_input=ctx)
        self.emit("step_started", ikey, items=len(items))
        if items:
            self._launch_iterations(ikey)
        else:
            self._atom_succeeded(ikey, rec.pop("results"))

    def _launch_iterations(self, ikey: str) -> None:
        rec = self.nodes[ikey]
        node = self.p.nodes[rec["node"]]
        cap = node.get("concurrency") or len(rec["items"])
        while rec["next"] < len(rec["items"]) and rec["running"] < cap:
            index = rec["next"]
            rec["next"] += 1
            rec["running"] += 1
            it_key = f"{ikey}[{index}]"
            self.iters[it_key] = {"fe": ikey, "index": index, "iter": rec["iter"], "flow": rec["flow"],
                                  "remaining": len(node["children"]), "status": "running"}
            self._start_list(node["children"], it_key)

    def _begin_flow(self, ikey: str, node: dict[str, Any]) -> None:
        ctx = self.context(ikey)
        template = node.get("with")
        data = dict(ctx) if template is None else self.render(ikey, template, ctx, where="with")
        problem = "it is not a JSON object" if not isinstance(data, dict) else \
            self.p.schema_error(node.get("input_schema"), data)
        if problem is not None:
            self._node_failed(ikey, error("InputInvalid", f"the input of sub-flow '{node['id']}' does not match "
                                          f"its input schema: {problem}"))
            return
        self.nodes[ikey]["scope_input"] = data
        if node.get("timeout_ms"):  # the sub-flow file's `timeout:` bounds this instance
            self.schedule(self.idempotency_key(ikey) + "@timeout", node["timeout_ms"], "flow_timeout", ikey)
        self._open_group(ikey, node["children"], flow_name=node.get("flow_name"))

    def _skip(self, ikey: str, reason: str) -> None:
        """Mark an instance and its whole subtree skipped (a for_each body has no instances to skip)."""
        stack = [(ikey, reason)]
        while stack:
            current, why = stack.pop()
            rec = self.nodes[current]
            rec.update(status="skipped", started_at=None, finished_at=self.at)
            self.emit("step_skipped", current, reason=why)
            if self.p.kind[rec["node"]] == "for_each":
                continue
            lists = self.p.child_lists(rec["node"])
            for kid in reversed([k for kids in lists for k in kids]):
                stack.append((self.new_record(kid, current, "skipped"), "parent"))

    # --- finishing nodes ---------------------------------------------------------------

    def _node_done(self, ikey: str) -> None:
        """A node succeeded or was skipped: start the siblings waiting for it, tell its container."""
        if self.s["status"] != "running":
            return
        nodes = self.nodes
        rec = nodes[ikey]
        pre = self.prefix(rec["iter"])
        deps = self.p.deps
        for dependent in self.p.dependents[rec["node"]]:
            for dep in deps[dependent]:
                other = nodes.get(pre + dep)
                if other is None or (other["status"] not in DONE and "continued" not in other):
                    break
            else:
                if self.queue is None:
                    self.queue = deque()
                self.queue.append((dependent, rec["parent"]))
        container = rec["parent"]
        if container is None:
            self.s["remaining"] -= 1
            if self.s["remaining"] == 0:
                self.finish("completed")
        elif container in self.iters:
            it = self.iters[container]
            it["remaining"] -= 1
            if it["remaining"] == 0:
                self._iteration_done(container)
        else:
            group = self.nodes[container]
            group["remaining"] -= 1
            if group["remaining"] == 0:
                self._group_done(container)

    def _group_done(self, ikey: str) -> None:
        rec = self.nodes[ikey]
        if self.p.kind[rec["node"]] == "flow":
            self.cancel_timer(self.idempotency_key(ikey) + "@timeout")
            self._atom_succeeded(ikey, self.scope_result(rec["node"], self.prefix(rec["iter"]), rec["scope_input"]))
            return
        rec.update(status="succeeded", finished_at=self.at)
        self.emit("step_succeeded", ikey)
        self._node_done(ikey)

    def _iteration_done(self, it_key: str) -> None:
        it = self.iters[it_key]
        it["status"] = "succeeded"
        fe = self.nodes[it["fe"]]
        fe["results"][it["index"]] = self.scope_result(fe["node"], it_key + "/", None)
        fe["running"] -= 1
        fe["remaining"] -= 1
        if fe["remaining"] == 0:
            self._atom_succeeded(it["fe"], fe.pop("results"))
        else:
            self._launch_iterations(it["fe"])

    def _atom_succeeded(self, ikey: str, result: Json) -> None:
        """A node with no attempt of its own finished — a for_each, a sub-flow, a wait (``kernel_wait``): apply its
        output rule (one that fails, fails the node) and record its result."""
        rec = self.nodes[ikey]
        try:
            out = self._mapped_output(ikey, result)
        except ExpressionError as exc:
            self._node_failed(ikey, error("ExpressionError", exc.message))
            return
        rec.update(status="succeeded", finished_at=self.at, result=result)
        if out is not None:
            rec["out"] = out
        self.emit("step_succeeded", ikey)
        self._node_done(ikey)

    def _mapped_output(self, ikey: str, result: Json) -> dict[str, Json] | None:
        if self.nodes[ikey]["node"] not in self.p.maps:
            return None
        rule = self.p.nodes[self.nodes[ikey]["node"]].get("output") or {}
        if rule.get("mode") != "map":
            return None
        ctx = self.context(ikey)
        return {name: self.evaluate(ikey, eid, result, where=f"output.{name}", context=ctx, own=result)
                for name, eid in rule["map"].items()}

    def _node_failed(self, ikey: str, err: dict[str, Any], task_id: str | None = None) -> None:
        """A node failed for good (``task_id``: by the outcome of that attempt): record it and abort the run — or,
        for a step with ``on_failure: continue`` in a running run (rules 8), go on as for a step skipped: its
        record says ``failed`` and ``continued``, and it gives no result."""
        rec = self.nodes[ikey]
        rec.update(status="failed", finished_at=self.at, error=err)
        if rec["node"] in self.p.continues and self.s["status"] == "running" and self.s["kernel"] >= 8:
            rec["continued"] = True
            # its place in the logical clock, as if it had completed now: a late success of it joins the saga as
            # completed before whatever starts after it (its dependents are undone first, as for any step)
            self.s["clock"] += 1
            rec["t1"] = self.s["clock"]
            self.emit("step_failed", ikey, attempt=rec.get("attempt"), task_id=task_id, error=err, continued=True)
            self.settle_late(ikey)
            self._node_done(ikey)
            return
        self.emit("step_failed", ikey, attempt=rec.get("attempt"), task_id=task_id, error=err)
        self.abort("failed", err, ikey)

    # --- attempts ------------------------------------------------------------------------

    def _dispatch(self, ikey: str) -> None:
        rec = self.nodes[ikey]
        node = self.p.nodes[rec["node"]]
        # its input: its ``with`` template over its context, or the whole context (shared, not copied: contexts,
        # like commands, are read-only — docs/kernel.md)
        try:
            template = node.get("with")
            data = self.context(ikey) if template is None else \
                self.render(ikey, template, self.context(ikey), where="with")
        except ExpressionError as exc:
            self._node_failed(ikey, error("ExpressionError", exc.message))
            return
        attempt: int = rec["attempt"] + 1
        rec["attempt"] = attempt
        rec["attempts"] += 1
        run_id = self.run_id
        idem = f"{run_id}/{ikey}"
        state = self.s
        seq = state["seq"]
        state["seq"] = seq + 1
        if rec["phase"] == "fallback":
            kind, task_id = "fallback", f"{idem}#f{attempt}"
            timeout: int | None = node.get("timeout_ms")
            worker = node["fallback"]
            command = {"op": "dispatch", "run_id": run_id, "task_id": task_id, "kind": kind, "step": ikey,
                       "node": rec["node"], "worker": worker, "input": data, "attempt": attempt,
                       "idempotency_key": idem, "timeout_ms": timeout, "llm": node.get("llm")}
            scheduled = {"type": "step_scheduled", "at": self.at, "seq": seq, "run_id": run_id, "step": ikey,
                         "node": rec["node"], "kind": self.p.kind[rec["node"]], "attempt": attempt,
                         "task_id": task_id, "error": None, "worker": worker, "task_kind": kind,
                         "idempotency_key": idem}
        else:  # (the main phase: from the step's templates, as on the straight line)
            task_id = f"{idem}#{attempt}"
            _, _, command, _, scheduled = self.p.starts.get(rec["node"]) or _start_templates(self.p, rec["node"])
            kind, timeout = command["kind"], command["timeout_ms"]
            command = command.copy()
            command["run_id"] = run_id
            command["task_id"] = task_id
            command["step"] = ikey
            command["input"] = data
            command["attempt"] = attempt
            command["idempotency_key"] = idem
            scheduled = scheduled.copy()
            scheduled["at"] = self.at
            scheduled["seq"] = seq
            scheduled["run_id"] = run_id
            scheduled["step"] = ikey
            scheduled["attempt"] = attempt
            scheduled["task_id"] = task_id
            scheduled["idempotency_key"] = idem
        self.tasks[task_id] = {"step": ikey, "kind": kind, "attempt": attempt,
                               "timer": task_id + "@timeout" if timeout else None}
        rec["status"] = "running"
        rec["task"] = task_id
        self.commands.append(command)
        if timeout:
            self.schedule(task_id + "@timeout", timeout, "attempt_timeout", ikey, task_id=task_id)
        self.events.append(scheduled)

    def _task_succeeded(self, task_id: str, result: Json) -> None:
        task = self.tasks.pop(task_id)
        self.ended.append(task_id)
        self.cancel_timer(task["timer"])
        ikey = task["step"]
        if task["kind"] == "compensate":
            self.compensation_succeeded(ikey, task_id)
            return
        rec = self.nodes[ikey]
        node = self.p.nodes[rec["node"]]
        result = {} if result is None else result
        if not isinstance(result, dict):
            self._attempt_failed(ikey, task_id, error("OutputInvalid", f"the worker returned "
                                                      f"{type(result).__name__}, expected a JSON object"))
            return
        try:
            if node.get("fail_when") and truthy(self.evaluate(ikey, node["fail_when"], result, where="fail_when",
                                                              context=self.context(ikey), own=result)):
                source = self.p.expressions[node["fail_when"]]["source"]
                self._attempt_failed(ikey, task_id, error("FailWhen", f"fail_when holds: {source}"))
                return
        except ExpressionError as exc:
            self._attempt_failed(ikey, task_id, error("ExpressionError", exc.message))
            return
        try:
            out = self._mapped_output(ikey, result)
        except ExpressionError as exc:
            if self.s["kernel"] >= 4 and node.get("compensate") and "late" not in rec:
                # the worker succeeded: its effect stands whatever its output map says. Kept as a success of an
                # earlier attempt is: undone with the rest if the step ends failed (settle_late)
                rec["late"] = {"task_id": task_id, "attempt": task["attempt"], "result": result, "unmapped": True}
            self._attempt_failed(ikey, task_id, error("ExpressionError", exc.message))
            return
        rec["status"] = "succeeded"  # (one statement per key: an update() with keywords builds a dict)
        rec["finished_at"] = self.at
        rec["task"] = None
        rec["result"] = result
        rec["error"] = None
        rec["t1"] = self.tick()
        rec.pop("late", None)  # an earlier attempt's success, kept: the same effect, undone as this one's
        if out is not None:
            rec["out"] = out
        done = self.step_event("step_succeeded", ikey, rec["node"], task["attempt"], task_id)
        answer = self.answer  # (as emit: the meta of the answer being handled)
        if answer is not None and answer[0] == task_id:
            done["meta"] = answer[1]
        if self.s["status"] == "running":
            self._node_done(ikey)
        else:
            self.maybe_compensate()

    def _late_completion(self, task_id: str, result: Json) -> None:
        """A success for a task no longer in flight: a *late completion* when it is an attempt the kernel dispatched
        of a step with a compensation whose record did not end ``succeeded`` (cancelled, failed, timed out: the run
        believes it had no effect) and its result is one the step would have succeeded with. Its effect stands but
        the run has already decided what to undo: recorded (``late_completions``), so that the run ends, or if it
        has ended now is, ``needs_intervention`` with the step's compensation left to run by hand (docs/kernel.md,
        "Late completions"). A success of an earlier attempt while the step is unresolved (waiting to retry, being
        cancelled, a newer attempt in flight) is kept on its record (``late``, the first only) and becomes a late
        completion if the step ends cancelled or failed (``settle_late``); nothing if it ends succeeded. A success
        of an attempt given up on of a step that succeeded (or whose late success joined the saga) changes nothing
        until the step's undo begins (the same effect, undone with the step's); after that (kernel version 7) it
        completed the step again, after its undo: a late completion left by hand (``after_undo``). Anything else
        (a duplicate, a non-compensable step, a compensation's attempt) changes nothing."""
        if "late_completions" not in self.s:
            return  # a run started under kernel version 1 (before this rule): its decisions stay version 1's
        prefix = self.run_id + "/"
        ikey, _, mark = task_id[len(prefix):].rpartition("#") if task_id.startswith(prefix) else ("", "", "")
        if mark.startswith("c"):
            self.late_undo(ikey, task_id, mark[1:])
            return
        fallback = mark.startswith("f")
        digits = mark[1:] if fallback else mark
        rec = self.nodes.get(ikey)
        if not (digits.isascii() and digits.isdigit()) or rec is None or not self.is_step(rec["node"]):
            return
        ended = rec["status"] in ("cancelled", "failed")
        again = rec["status"] == "succeeded" or "late_undo" in rec  # its effect taken: undone, or to be
        if again:  # kernel version 7: an attempt given up on that succeeded after the step's undo had begun
            if not self.undo_begun(ikey) or task_id == self._taken(ikey, rec) or any(
                    item["step"] == ikey for item in self.s["late_completions"]):
                return
        elif ended:
            # (a step that failed and was passed over, on_failure: continue, joins the saga when it completes late)
            if (self.s["status"] == "running" and "continued" not in rec) or \
                    any(item["step"] == ikey for item in self.s["late_completions"]):
                return
        elif rec["status"] not in ("running", "retrying", "cancelling") or "late" in rec:
            return
        node = self.p.nodes[rec["node"]]
        # the attempts dispatched, main (#n) and fallback (#f<n>) apart: ``attempt`` counts the current phase's,
        # ``attempts`` both phases' (the fallback phase comes after the main one, its ``attempt`` from 0)
        in_phase: int = rec.get("attempt", 0)
        if rec.get("phase") == "fallback":
            count = in_phase if fallback else rec.get("attempts", 0) - in_phase
        else:
            count = 0 if fallback else in_phase
        attempt = int(digits)
        if not node.get("compensate") or not 1 <= attempt <= count or digits != str(attempt):
            return
        result = {} if result is None else result
        if not isinstance(result, dict):
            return  # judged as on time: an attempt that failed (OutputInvalid), not a completion
        try:
            if node.get("fail_when") and truthy(self.evaluate(ikey, node["fail_when"], result, where="fail_when",
                                                              context=self.context(ikey), own=result)):
                return  # a result the step fails with: no effect to undo, as on time
        except ExpressionError:
            return
        late: dict[str, Any] = {"task_id": task_id, "attempt": attempt, "result": result}
        try:
            out = self._mapped_output(ikey, result)
        except ExpressionError:
            if self.s["kernel"] < 4:
                return
            out, late["unmapped"] = None, True  # its effect stands all the same, as on time (_task_succeeded)
        if out is not None:
            late["out"] = out
        if again:
            self.record_late_completion(ikey, late, after_undo=True)
        elif ended:
            self.late_completed(ikey, late)
        else:
            rec["late"] = late

    def _taken(self, ikey: str, rec: dict[str, Any]) -> str:
        """The task id of the attempt whose success step ``ikey``'s record ``rec`` holds: the latest attempt of its
        phase (it succeeded), or the late one that joined the saga (``late_undo``)."""
        if "late_undo" in rec:
            return str(rec["late_undo"]["task_id"])
        marker = "f" if rec.get("phase") == "fallback" else ""
        return f"{self.idempotency_key(ikey)}#{marker}{rec['attempt']}"

    def _task_failed(self, task_id: str, err: dict[str, Any]) -> None:
        task = self.tasks.pop(task_id)
        self.ended.append(task_id)
        self.cancel_timer(task["timer"])
        if task["kind"] == "compensate":
            self.compensation_attempt_failed(task["step"], task_id, err)
        else:
            self._attempt_failed(task["step"], task_id, err)

    def _task_cancelled(self, task_id: str) -> None:
        task = self.tasks.pop(task_id)
        self.ended.append(task_id)
        self.cancel_timer(task["timer"])
        err = error("TaskCancelled", "the runtime cancelled the attempt")
        if task["kind"] == "compensate":
            self.compensation_attempt_failed(task["step"], task_id, err)
        elif self.nodes[task["step"]]["status"] == "cancelling":
            self._cancelled(task["step"], task_id, None)
        else:
            self._attempt_failed(task["step"], task_id, err)

    def _cancelled(self, ikey: str, task_id: str, err: dict[str, Any] | None) -> None:
        rec = self.nodes[ikey]
        rec.update(status="cancelled", finished_at=self.at, task=None)
        if err is not None:
            rec["error"] = err
        reason = "the runtime confirmed the cancellation" if err is None else \
            "the attempt timed out while being cancelled"
        self.emit("step_cancelled", ikey, attempt=rec["attempt"], task_id=task_id, error=err, reason=reason)
        self.settle_late(ikey)
        self.maybe_compensate()

    def _attempt_failed(self, ikey: str, task_id: str, err: dict[str, Any]) -> None:
        """An attempt failed: retry it, switch to the fallback, or fail the step for good."""
        rec = self.nodes[ikey]
        node = self.p.nodes[rec["node"]]
        rec.update(error=err, task=None)
        if self.s["status"] != "running":
            rec.update(status="failed", finished_at=self.at)
            self.emit("step_failed", ikey, attempt=rec["attempt"], task_id=task_id, error=err)
            self.settle_late(ikey)
            self.maybe_compensate()
            return
        policy = node.get("retry") or {"attempts": 1}
        attempt: int = rec["attempt"]
        main_llm = node["kind"] == "llm" and rec["phase"] == "main"
        if (attempt < policy["attempts"] and retryable(policy, err)
                and not (main_llm and err["type"] == LLM_NOT_CONFIGURED)
                and not (err["type"] == INPUT_INVALID and node["kind"] == "llm" and self.s["kernel"] >= 3)):
            fallback = rec["phase"] == "fallback"
            delay = retry_delay(policy, attempt, self.s["seed"], ikey + ("/fallback" if fallback else ""))
            rec["status"] = "retrying"
            self.emit("step_retrying", ikey, attempt=attempt, task_id=task_id, error=err, delay_ms=delay,
                      next_attempt=attempt + 1)
            marker = "f" if fallback else ""
            self.schedule(f"{self.idempotency_key(ikey)}#{marker}{attempt + 1}@retry", delay, "retry", ikey)
            return
        if main_llm and node.get("fallback"):
            rec.update(phase="fallback", attempt=0)
            why = "no LM configured" if err["type"] == LLM_NOT_CONFIGURED else \
                f"the LLM call failed for good ({err['type']})"
            self.emit("fallback_started", ikey, attempt=attempt, task_id=task_id, error=err,
                      worker=node["fallback"], reason=f"{why} — using the fallback worker '{node['fallback']}'")
            self._dispatch(ikey)
            return
        self._node_failed(ikey, err, task_id)

    def _timer_fired(self, timer_id: str) -> None:
        timer = self.timers.pop(timer_id, None)
        if timer is None:
            return
        purpose = timer["purpose"]
        ikey = timer["step"]
        if purpose == "run_timeout":
            ms = self.p.flow.get("timeout_ms")
            self.abort("timeout", error("RunTimeout", f"the run did not finish within {ms} ms"), None)
        elif purpose == "flow_timeout":
            if self.s["status"] == "running" and self.nodes[ikey]["status"] == "running":
                node = self.p.nodes[self.nodes[ikey]["node"]]
                self._node_failed(ikey, error(SUBFLOW_TIMEOUT, f"the sub-flow '{node['id']}' did not finish "
                                              f"within {node['timeout_ms']} ms"))
        elif purpose in ("wait", "wait_timeout"):
            wait_timer_fired(self, ikey, purpose)
        elif purpose == "retry":
            if timer.get("compensation"):
                self.retry_compensation(ikey)
            elif self.s["status"] == "running" and self.nodes[ikey]["status"] == "retrying":
                self._dispatch(ikey)
        else:
            task_id = timer["task_id"]
            task = self.tasks.pop(task_id, None)
            if task is None:
                return
            self.ended.append(task_id)
            self.command("cancel_task", task_id=task_id, step=ikey)
            err = error("StepTimeout", f"the attempt did not finish within {self._timeout_of(task)} ms")
            if task["kind"] == "compensate":
                self.compensation_attempt_failed(ikey, task_id, err)
            elif self.nodes[ikey]["status"] == "cancelling":
                self._cancelled(ikey, task_id, err)
            else:
                self.emit("step_timed_out", ikey, attempt=task["attempt"], task_id=task_id, error=err)
                self._attempt_failed(ikey, task_id, err)

    def _timeout_of(self, task: dict[str, Any]) -> Any:
        node = self.p.nodes[self.nodes[task["step"]]["node"]]
        return (node.get("compensate") or {}).get("timeout_ms") if task["kind"] == "compensate" \
            else node.get("timeout_ms")


def _error_of(value: Json) -> dict[str, Any]:
    if isinstance(value, dict):
        err: dict[str, Any] = {"type": str(value.get("type") or "Error"), "message": str(value.get("message") or "")}
        types = value.get("types")  # the class names of the exception's MRO (absent in older records)
        if isinstance(types, list) and types and all(isinstance(t, str) for t in types):
            err["types"] = list(types)
        return err
    return {"type": "Error", "message": "" if value is None else str(value)}
