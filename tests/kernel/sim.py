"""A tiny synchronous driver for the kernel: a fake clock and a script of task outcomes.

Not a runtime: it exists to put the kernel through exact interleavings. Each
dispatched task looks up its outcome in the script by instance key, then node
key (``<key>/compensate`` for a compensation, ``<key>/fallback`` for a
fallback); a list gives one outcome per attempt (the last repeats); a callable
receives the dispatch command. Unscripted tasks succeed with ``{}`` after 10 ms.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowdsl.kernel import END_STATES, STATE_VERSION, apply, start_event, start_run


@dataclass(frozen=True)
class Outcome:
    kind: str  # ok | fail | hang
    after: int = 10
    result: Any = None
    error_type: str = "Error"
    message: str = "boom"
    cancellable: bool = True


def ok(result: Any = None, after: int = 10, cancellable: bool = True) -> Outcome:
    return Outcome("ok", after, result, cancellable=cancellable)


def fail(error_type: str = "Error", message: str = "boom", after: int = 10, cancellable: bool = True) -> Outcome:
    return Outcome("fail", after, None, error_type, message, cancellable)


def hang(cancellable: bool = True) -> Outcome:
    return Outcome("hang", cancellable=cancellable)


Script = dict[str, Any]


class Sim:
    """Run one flow to its end; every input event, command and emitted event is kept."""

    def __init__(self, plan: dict[str, Any], script: Script | None = None, *, input: Any = None,
                 run_id: str = "r1", seed: int = 7, at: int = 1000, cancel_at: int | None = None,
                 report_started: bool = False, check_json: bool = True, reload_state: bool = False,
                 kernel: int = STATE_VERSION, signals: list[tuple[Any, ...]] | None = None):
        self.plan = plan
        self.script = script or {}
        self.input = {} if input is None else input
        self.run_id, self.seed, self.now = run_id, seed, at
        self.cancel_at = cancel_at
        self.report_started = report_started
        self.check_json = check_json
        self.reload_state = reload_state  # feed the kernel a JSON copy of its state each time
        self.kernel = kernel  # the rules version the run starts under
        self.signals = signals or []  # (at, name, payload[, key]): sent to the run from outside at those times
        self.inputs: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.dispatches: list[dict[str, Any]] = []
        self.in_flight: dict[str, dict[str, Any]] = {}
        self.max_in_flight: dict[str, int] = {}
        self.state: dict[str, Any] = {}
        self._heap: list[tuple[int, int, dict[str, Any]]] = []
        self._n = 0
        self._timers: set[str] = set()
        self._finished = False

    # --- running -------------------------------------------------------------------

    def run(self, limit: int = 200_000) -> Sim:
        self.inputs.append({**start_event(self.run_id, self.input, at=self.now, seed=self.seed),
                            "kernel": self.kernel})
        self._absorb(start_run(self.plan, self.run_id, self.input, at=self.now, seed=self.seed, kernel=self.kernel),
                     set())
        if self.cancel_at is not None:
            self._push(self.cancel_at, {"type": "cancel_requested", "reason": "user asked"})
        for due, name, payload, *key in self.signals:  # (a keyed signal: its key fourth)
            self._push(due, {"type": "signal", "name": name, "payload": payload, **({"key": key[0]} if key else {})})
        while self._heap and limit > 0:
            limit -= 1
            due, _, event = heapq.heappop(self._heap)
            if event["type"] == "timer_fired" and event["timer_id"] not in self._timers:
                continue
            if event.get("_superseded"):
                continue
            self._timers.discard(event.get("timer_id", ""))
            if event["type"] in ("task_succeeded", "task_failed", "task_cancelled"):
                self.in_flight.pop(event["task_id"], None)
            self.now = max(self.now, due)
            event = {k: v for k, v in event.items() if not k.startswith("_")}
            event["at"] = self.now
            self.inputs.append(event)
            state = json.loads(json.dumps(self.state)) if self.reload_state else self.state
            before = set(state["tasks"])  # (apply updates the state in place)
            self._absorb(apply(self.plan, state, event), before)
        return self

    def _push(self, due: int, event: dict[str, Any]) -> dict[str, Any]:
        self._n += 1
        heapq.heappush(self._heap, (due, self._n, event))
        return event

    def _absorb(self, d: Any, before: set[str]) -> None:
        self.state = d.state
        # the tasks in flight change only by dispatches and by the decision's 'ended' list (docs/kernel.md)
        after = set(d.state["tasks"])
        assert after - before == {c["task_id"] for c in d.commands if c["op"] == "dispatch"}, d.commands
        assert sorted(before - after) == sorted(d.ended) and len(set(d.ended)) == len(d.ended), d.ended
        if self.check_json:
            assert json.loads(json.dumps(d.state)) == d.state
            json.dumps(d.commands)
            json.dumps(d.events)
        self.events.extend(d.events)
        for cmd in d.commands:
            self.commands.append(cmd)
            assert not self._finished or cmd["op"] != "dispatch", f"dispatch after the run finished: {cmd}"
            op = cmd["op"]
            if op == "dispatch":
                self._dispatch(cmd)
            elif op == "schedule_timer":
                self._timers.add(cmd["timer_id"])
                self._push(cmd["due_at"], {"type": "timer_fired", "timer_id": cmd["timer_id"]})
            elif op == "cancel_timer":
                self._timers.discard(cmd["timer_id"])
            elif op == "cancel_task":
                self._cancel(cmd["task_id"])
            elif op == "finish":
                assert cmd["status"] in END_STATES
                self._finished = True

    def _dispatch(self, cmd: dict[str, Any]) -> None:
        busy = sorted(t for t, task in self.in_flight.items() if task["cmd"]["kind"] != "compensate")
        self.dispatches.append({**cmd, "at": self.now, "steps_in_flight": busy})
        outcome = self.outcome(cmd)
        task: dict[str, Any] = {"cmd": cmd, "outcome": outcome, "event": None}
        self.in_flight[cmd["task_id"]] = task
        node = cmd["node"] + ("/compensate" if cmd["kind"] == "compensate" else "")
        running = sum(1 for t in self.in_flight.values()
                      if t["cmd"]["node"] == cmd["node"] and t["cmd"]["kind"] == cmd["kind"])
        self.max_in_flight[node] = max(self.max_in_flight.get(node, 0), running)
        if self.report_started:
            self._push(self.now, {"type": "task_started", "task_id": cmd["task_id"]})
        if outcome.kind == "ok":
            task["event"] = self._push(self.now + outcome.after, {"type": "task_succeeded",
                                                                  "task_id": cmd["task_id"],
                                                                  "result": outcome.result})
        elif outcome.kind == "fail":
            task["event"] = self._push(self.now + outcome.after, {
                "type": "task_failed", "task_id": cmd["task_id"],
                "error": {"type": outcome.error_type, "message": outcome.message}})

    def _cancel(self, task_id: str) -> None:
        task = self.in_flight.get(task_id)
        if task is None or not task["outcome"].cancellable:
            return
        if task["event"] is not None:
            task["event"]["_superseded"] = True
        self._push(self.now + 1, {"type": "task_cancelled", "task_id": task_id})

    def outcome(self, cmd: dict[str, Any]) -> Outcome:
        suffix = {"compensate": "/compensate", "fallback": "/fallback"}.get(cmd["kind"], "")
        value: Any = ok()
        for key in (cmd["step"] + suffix, cmd["node"] + suffix):
            if key in self.script:
                value = self.script[key]
                break
        if isinstance(value, list):
            value = value[min(cmd["attempt"], len(value)) - 1]
        if callable(value) and not isinstance(value, Outcome):
            value = value(cmd)
        assert isinstance(value, Outcome), value
        return value

    # --- looking at the run -----------------------------------------------------------------

    @property
    def status(self) -> str:
        status: str = self.state["status"]
        return status

    def of(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        """Emitted events of one type whose fields equal ``match``."""
        return [e for e in self.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]

    def steps(self, type_: str, **match: Any) -> list[str]:
        return [e["step"] for e in self.of(type_, **match)]

    def dispatched(self, kind: str = "task") -> list[str]:
        return [c["step"] for c in self.dispatches if c["kind"] == kind]

    def undone(self) -> list[str]:
        """Steps whose compensation succeeded, in order."""
        return self.steps("compensation_succeeded")


Behaviour = Callable[[dict[str, Any]], Outcome]
