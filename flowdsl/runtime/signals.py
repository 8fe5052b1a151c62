"""Taking a stop signal on an event loop for a while, and giving back exactly what was there.

Stage: runtime (shared by the local runtime and the Redis worker). Imports the stdlib and ``flowdsl.workers``.

``loop.add_signal_handler`` then ``remove_signal_handler`` leaves the signal on its default action: the handler an
application had installed (``signal.signal``, the loop's own, ``asyncio.Runner``'s Ctrl-C) is dropped, and a SIGTERM
afterwards kills the process. :func:`take_signal` notes what was there before the first taker on a loop — the
Python-level handler, the loop's own handler (asyncio's unix loops keep them in ``_signal_handlers``) and the wakeup
fd — and :func:`give_back_signal` puts it back after the last one, the Python-level handler first, so that no
moment is left where the signal has its default action. A loop whose handlers cannot be seen (uvloop) while the
signal has a Python-level handler of its own (``uvloop.run()``'s ``asyncio.Runner``) is not touched at all: the
signal is taken with a Python-level handler that hands it to the loop, and given back by putting the one that was
there back. Takers nest: the signal goes to the last one that took it and back to the one before when it gives it
back. A signal that is ignored (a background job started by a shell, ``nohup``) stays ignored.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any

from flowdsl.workers import sigint_to_restore

__all__ = ["SIGNAL_WORDS", "TERM_SIGNALS", "give_back_signal", "signal_said", "take_signal"]

Callback = Callable[[int], None]

#: the signals that stop a command as Ctrl-C does, besides SIGINT, as far as the platform has them
TERM_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
#: what a stop signal did, in notices and reasons: (verb, its name for people)
SIGNAL_WORDS = {"SIGINT": ("interrupted", "Ctrl-C"), "SIGTERM": ("terminated", "SIGTERM"),
                "SIGHUP": ("hung up", "SIGHUP")}


def signal_said(signum: int) -> str:
    """What a stop signal did, for people: ``terminated (SIGTERM)``, ``hung up (SIGHUP)``, ``interrupted
    (Ctrl-C)``."""
    name = signal.Signals(signum).name
    verb, label = SIGNAL_WORDS.get(name, ("stopped", name))
    return f"{verb} ({label})"


class _Takers:
    """Who took each signal on one event loop (per signal, the last one has it), and what was there before the
    first: per signal, its Python-level handler and the loop's own handler; the wakeup fd."""

    def __init__(self, wakeup_fd: int):
        self.wakeup_fd = wakeup_fd
        self.before: dict[int, tuple[Any, Any]] = {}
        self.takers: dict[int, list[Callback]] = {}
        #: the signals taken with a Python-level handler (the loop's own cannot be seen: see the module doc)
        self.python_level: set[int] = set()

    def python_handler(self, loop: asyncio.AbstractEventLoop) -> Callable[[int, Any], None]:
        """The Python-level handler that hands a signal to the last taker of it, on ``loop``."""
        def handle(signum: int, frame: Any) -> None:
            queue = self.takers.get(signum)
            if queue:
                loop.call_soon_threadsafe(queue[-1], signum)
        return handle


_TAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Takers] = weakref.WeakKeyDictionary()


def _default(signum: int) -> Any:
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


def take_signal(loop: asyncio.AbstractEventLoop, signum: int, callback: Callback) -> bool:
    """Have ``callback(signum)`` called on ``loop`` for ``signum`` until :func:`give_back_signal`. False when the
    signal is left as it was: ignored; handled already by a loop whose handlers cannot be seen; or a loop with no
    signal support (Windows loops, a loop outside the main thread)."""
    takers = _TAKERS.get(loop)
    if takers is not None and signum in takers.takers:
        if signum not in takers.python_level:
            loop.add_signal_handler(signum, callback, signum)
        takers.takers[signum].append(callback)
        return True
    if threading.current_thread() is not threading.main_thread():
        return False  # (signal handlers are the main thread's alone)
    python_handler = signal.getsignal(signum)
    if python_handler is signal.SIG_IGN:
        return False
    handlers = getattr(loop, "_signal_handlers", None)
    if not isinstance(handlers, dict) and python_handler is not _default(signum):
        if python_handler is None or not loop.is_running():
            return False  # (a handler not set from Python; a loop not running could not take the call)
        if takers is None:
            takers = _TAKERS[loop] = _Takers(-1)
        takers.before[signum] = (python_handler, None)
        takers.takers[signum] = [callback]
        takers.python_level.add(signum)
        signal.signal(signum, takers.python_handler(loop))
        return True
    loop_handler = handlers.get(signum) if isinstance(handlers, dict) else None
    wakeup_fd = signal.set_wakeup_fd(-1) if isinstance(handlers, dict) and takers is None else -1
    try:
        loop.add_signal_handler(signum, callback, signum)
    except (NotImplementedError, RuntimeError, ValueError):
        if wakeup_fd != -1:
            signal.set_wakeup_fd(wakeup_fd)
        return False
    if takers is None:
        takers = _TAKERS[loop] = _Takers(wakeup_fd)
    takers.before[signum] = (python_handler, loop_handler)
    takers.takers[signum] = [callback]
    return True


def give_back_signal(loop: asyncio.AbstractEventLoop, signum: int, callback: Callback) -> None:
    """Undo a :func:`take_signal` that returned True: the signal goes back to the taker before, or, after the last,
    to what was there before the first."""
    takers = _TAKERS[loop]
    queue = takers.takers[signum]
    last = queue[-1] == callback
    queue.remove(callback)
    if queue:
        if last and signum not in takers.python_level:
            loop.add_signal_handler(signum, queue[-1], signum)
        return
    del takers.takers[signum]
    python_handler, loop_handler = takers.before.pop(signum)
    handlers = getattr(loop, "_signal_handlers", None)
    if signum in takers.python_level:
        takers.python_level.discard(signum)
        signal.signal(signum, sigint_to_restore(python_handler))
    elif isinstance(handlers, dict):
        # the Python-level handler back first, then the loop's entry dropped by hand: remove_signal_handler sets
        # SIG_DFL, and a SIGTERM between that and putting the saved handler back would kill the process
        signal.signal(signum, sigint_to_restore(python_handler) if python_handler is not None else _default(signum))
        if loop_handler is not None:
            handlers[signum] = loop_handler
        else:
            handlers.pop(signum, None)
            if not handlers:  # as remove_signal_handler does: nothing left for the loop's wakeup fd
                signal.set_wakeup_fd(-1)
    else:  # taken only from the default handler (see take_signal), which this puts back: nothing in between
        loop.remove_signal_handler(signum)
    if not takers.takers:  # the last signal taken on this loop: the wakeup fd as it was
        del _TAKERS[loop]
        if takers.wakeup_fd != -1:
            signal.set_wakeup_fd(takers.wakeup_fd)
