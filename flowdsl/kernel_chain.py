"""Kernel, the straight line: a plain step's success, with the plain step it starts, decided without the general
machinery (:func:`chain_step`).

Stage: kernel — pure; imports the other ``kernel_*`` modules only (``flowdsl.kernel`` tries :func:`chain_step`
before it builds a :class:`~flowdsl.kernel_engine.Machine`, which it falls back on for a context not cached). No
I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from flowdsl.kernel_core import _RECENT, Decision, RunState, trim
from flowdsl.kernel_engine import Machine
from flowdsl.kernel_program import Program, _start_templates

#: a plain step's ``step_succeeded`` event on the straight line, to copy and complete (``chain_step``)
_SUCCEEDED: dict[str, Any] = {"type": "step_succeeded", "at": None, "seq": None, "run_id": None, "step": None,
                              "node": None, "kind": "task", "attempt": None, "task_id": None, "error": None}


def chain_step(program: Program, state: dict[str, Any], event: dict[str, Any], at: int | float) -> Decision | None:
    """A plain step's success decided in one straight line, with the plain step it starts, if any: the
    decision, or None, having changed nothing, when the case does not apply.

    ``apply`` tries it before building a :class:`Machine` (the general path). It makes exactly the decision
    of ``handle`` → ``_task_succeeded`` → ``_node_done`` → ``_begin`` → ``_dispatch`` (the same state,
    commands and events, byte for byte: tests/kernel/test_chain.py compares them) in the cases that dominate
    long sequences and wide groups, ``Program.chain``: a task with no ``fail_when`` or output map that
    nothing waits for, or whose one dependent waits for it alone and is a task with no ``when`` or ``with``;
    its result an object (or null), and its container staying open. Anything unusual (a result of another
    type, ``meta`` that is not an object, a str subclass as ``task_id``) goes the general way, which judges it.
    """
    task_id = event.get("task_id")
    if type(task_id) is not str:
        return None
    tasks: dict[str, dict[str, Any]] = state["tasks"]
    task = tasks.get(task_id)
    if task is None or task["kind"] != "task":
        return None
    result = event.get("result")
    if result is None:
        result = {}
    elif type(result) is not dict:
        return None
    meta = event.get("meta")
    if meta is not None and type(meta) is not dict:
        return None
    nodes: dict[str, dict[str, Any]] = state["nodes"]
    step = task["step"]
    rec = nodes[step]
    key = rec["node"]
    nxt = program.chain.get(key)
    if nxt is None or state["status"] != "running":
        return None
    container = rec["parent"]
    holder = state if container is None else state["iterations"].get(container) or nodes[container]
    iteration = rec["iter"]
    ikey = (iteration + "/" + nxt if iteration else nxt) if nxt else ""
    remaining = holder["remaining"]
    if remaining <= 1 or ikey in nodes:
        return None
    # the step that succeeded
    commands: list[dict[str, Any]] = []
    run_id: str = state["run_id"]
    del tasks[task_id]
    timer = task["timer"]
    if timer is not None and state["timers"].pop(timer, None) is not None:
        commands.append({"op": "cancel_timer", "run_id": run_id, "timer_id": timer})
    clock = state["clock"] + 1
    state["clock"] = clock
    # (set in the order of the update() of _task_succeeded: the same keys in the same order. Here and below, one
    # statement per key: a multiple assignment would build a tuple)
    rec["status"] = "succeeded"
    rec["finished_at"] = at
    rec["task"] = None
    rec["result"] = result
    rec["error"] = None
    rec["t1"] = clock
    if "late" in rec:  # (as _task_succeeded)
        del rec["late"]
    holder["remaining"] = remaining - 1
    seq = state["seq"]
    done = _SUCCEEDED.copy()
    done["at"] = at
    done["seq"] = seq
    done["run_id"] = run_id
    done["step"] = step
    done["node"] = key
    done["attempt"] = task["attempt"]
    done["task_id"] = task_id
    if meta is not None:
        done["meta"] = meta
    if not nxt:
        state["seq"] = seq + 1
        return Decision(state, commands, [done], [task_id])
    # the step it starts, and that step's first attempt: its templates copied and completed
    _, chained, dispatch, started, scheduled = program.starts.get(nxt) or _start_templates(program, nxt)
    state["clock"] = clock = clock + 1
    state["seq"] = seq + 3
    idem = f"{run_id}/{ikey}"
    attempt_id = idem + "#1"
    timeout: int | None = dispatch["timeout_ms"]
    nodes[ikey] = record = chained.copy()
    record["parent"] = container
    record["iter"] = iteration
    record["flow"] = rec["flow"]
    record["started_at"] = at
    record["task"] = attempt_id
    record["t0"] = clock
    tasks[attempt_id] = {"step": ikey, "kind": "task", "attempt": 1,
                         "timer": attempt_id + "@timeout" if timeout else None}
    # its context, derived "dep": the step's own context plus its contribution (ContextCache.get and .put inline;
    # the step's context is not moved to the end of ``recent``: the step before put it there, in a sequence)
    ctx = None
    if type(state) is RunState:  # (a state rebuilt from JSON is a plain dict, with no cache)
        cache = state.contexts
        recent = cache.recent
        ctx = recent.get(step)
        if ctx is None:
            ctx = cache.checkpoints.get(step)
        if ctx is not None:
            if key in program.merges:
                if result:  # (an empty result adds nothing: the step's context, shared — contexts are read-only)
                    ctx = {**ctx, **result}
            else:
                ctx = {**ctx, **Machine(program, state, at).contribution(rec)}
            recent[ikey] = ctx
            if len(recent) > 2 * _RECENT:
                trim(recent, _RECENT)
    if ctx is None:  # (the step's own context is not cached: derived the general way)
        ctx = Machine(program, state, at).context(ikey)
    dispatch = dispatch.copy()
    dispatch["run_id"] = run_id
    dispatch["task_id"] = attempt_id
    dispatch["input"] = ctx
    dispatch["idempotency_key"] = idem
    started = started.copy()
    started["at"] = at
    started["seq"] = seq + 1
    started["run_id"] = run_id
    scheduled = scheduled.copy()
    scheduled["at"] = at
    scheduled["seq"] = seq + 2
    scheduled["run_id"] = run_id
    scheduled["task_id"] = attempt_id
    scheduled["idempotency_key"] = idem
    if iteration:
        dispatch["step"] = started["step"] = scheduled["step"] = ikey
    commands.append(dispatch)
    if timeout:
        timer = attempt_id + "@timeout"
        state["timers"][timer] = {"purpose": "attempt_timeout", "step": ikey, "task_id": attempt_id}
        commands.append({"op": "schedule_timer", "run_id": run_id, "timer_id": timer, "delay_ms": timeout,
                         "due_at": at + timeout, "purpose": "attempt_timeout", "step": ikey})
    return Decision(state, commands, [done, started, scheduled], [task_id])
