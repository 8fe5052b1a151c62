"""The local runtime on uvloop's event loop, as web services run it (``uvloop.run()``, uvicorn): a Ctrl-C the run
was asked to take (``handle_sigint=True``) cancels it and undoes what completed — uvloop's signal handlers cannot
be seen from Python, and ``uvloop.run()``'s ``asyncio.Runner`` has a Ctrl-C handler of its own, which the run
hands back when it ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.runtime.test_local import ROOT

pytest.importorskip("uvloop")

SCRIPT = textwrap.dedent("""\
    import asyncio, json, signal, sys
    import uvloop
    import flowdsl
    from flowdsl.workers import WorkerRegistry

    registry = WorkerRegistry()
    done = []

    async def reserve(data, ctx):
        done.append("reserve")
        return {}

    async def release(data, ctx):
        done.append("release")
        return {}

    async def slow(data, ctx):
        signal.raise_signal(signal.SIGINT)  # (as a Ctrl-C would, while the step runs)
        await asyncio.sleep(30)
        return {}

    for name, fn in {"reserve": reserve, "release": release, "slow": slow}.items():
        registry.register(name, fn)
    plan = flowdsl.compile_text("flowdsl: 1\\nname: uv\\nsteps:\\n  - reserve: {compensate: release}\\n  - slow\\n")

    async def main():
        before = signal.getsignal(signal.SIGINT)
        result = await flowdsl.run_flow(plan, {}, record=False, registry=registry, import_workers=False,
                                        handle_sigint=%(take)s)
        after = signal.getsignal(signal.SIGINT)
        return {"status": result.status, "compensated": result.compensated, "done": done,
                "loop": type(asyncio.get_running_loop()).__module__, "handler_back": after == before}

    try:
        print(json.dumps(uvloop.run(main())))
    except KeyboardInterrupt:
        print(json.dumps({"interrupted": True, "done": done}))
    """)


def _run(take: bool) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"take": take}], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_under_uvloop_run_a_ctrl_c_the_run_takes_cancels_it_and_undoes_what_completed() -> None:
    out = _run(True)
    assert out == {"status": "cancelled", "compensated": ["reserve"], "done": ["reserve", "release"],
                   "loop": "uvloop", "handler_back": True}


def test_under_uvloop_run_a_ctrl_c_the_run_does_not_take_is_the_runners() -> None:
    """Without ``handle_sigint``, the Ctrl-C is ``asyncio.Runner``'s, as in any program: it cancels the main
    task (the run is stopped at once) and ``uvloop.run()`` raises KeyboardInterrupt."""
    out = _run(False)
    assert out == {"interrupted": True, "done": ["reserve"]}
