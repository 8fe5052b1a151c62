"""The ``flowdsl`` process's standard streams: set up once at start (:func:`install`, from ``flowdsl.launch``), then
written through guards, so that a stdout that cannot be written is said as such, once, by ``flowdsl.cli.main``.

Stage: cli (its first step, with ``flowdsl.launch``). Imports only the stdlib (rich inside :func:`console`), so
the runtime's displays use :func:`console` from here at no cost.

- A descriptor 0, 1 or 2 that is closed at start is opened on /dev/null, so that no file the process opens later
  takes its number (asyncio's epoll descriptor became fd 1, and a worker's ``os.write(1, …)`` then failed).
  A closed stdout is still remembered: writing output to it raises :class:`OutputError` (``stdout is closed``),
  so a command whose output has nowhere to go fails saying so. A closed stdin stays ``sys.stdin is None``
  (``run -i -`` says it has none).
- stdout: an error writing it raises :class:`OutputError` — not an ``OSError``, which the Redis commands take for
  Redis being unreachable. Every write is flushed at once, so the error comes from the write that failed, not
  from the interpreter's flush at exit. A reader that went away (``| head``) is an :class:`OutputError` too,
  with ``broken_pipe``. After a failure the descriptor is pointed at /dev/null, so nothing buffered raises again.
- stderr: an error writing it is dropped — there is nowhere left to say it; the exit code is the command's.
- Text that is not flowdsl's own (a worker's error message, a key of the run input, a model's reply, a name
  read from a record) is written through :func:`flowdsl.shown.visible` wherever a person reads it, so that it
  cannot drive the terminal (escape sequences: colours, the window title, the clipboard, clearing the screen) nor
  forge a line of output. The consoles (:func:`console`) turn rich's emoji codes off and never highlight, so that
  text is shown as it was written (``:smile:`` stays ``:smile:``).
- Characters stdout's encoding cannot carry (``PYTHONIOENCODING=ascii``, a Latin-1 locale) are written as
  backslash escapes in text (``\\u2192``), as on stderr; JSON (:func:`write_json`) is then written in ASCII
  with JSON's ``\\uXXXX`` escapes, so it stays valid JSON of the same value.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: the exit code when the command's output could not be written to stdout (full, closed, a write error): what it
#: did is done (a run ran, a cancel was sent), but it could not report it
EXIT_OUTPUT_LOST = 3
#: the exit code when the reader of stdout went away (``| head``): 128 + SIGPIPE, as a shell reports a program
#: that a broken pipe ended
EXIT_BROKEN_PIPE = 141

#: the width of a console that is not a terminal: rich would take ``COLUMNS`` (or 80) and drop or shorten table
#: columns to fit; a file or a pipe gets every line whole
UNBOUNDED_WIDTH = 100_000


class OutputError(Exception):
    """stdout could not be written: ``reason`` (an errno's text, or ``it is closed``); ``broken_pipe`` when its
    reader went away. ``context`` collects what the command had done that the lost output would have said
    (``the run r1 was submitted …``): :func:`report` says it on stderr."""

    def __init__(self, reason: str, *, broken_pipe: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.broken_pipe = broken_pipe
        self.context: list[str] = []

    def __str__(self) -> str:
        return "; ".join([f"cannot write to stdout: {self.reason}", *self.context])


class _State:
    """What the guards of one stream (its text and binary sides) share: whether it was closed at start, and the
    error that ended it."""

    def __init__(self, closed: bool, fd: int | None):
        self.closed = closed
        self.fd = fd
        self.failed: OutputError | None = None


def _fd_of(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except Exception:
        return None


class _Output:
    """A guard around stdout (text, or its ``buffer``): see the module's docstring."""

    def __init__(self, stream: Any, state: _State):
        self._stream = stream
        self._state = state

    @property
    def guarded(self) -> Any:
        """The stream written to."""
        return self._stream

    @property
    def buffer(self) -> _Output:
        return _Output(self._stream.buffer, self._state)

    def _lost(self, exc: OSError) -> OutputError:
        failure = OutputError(exc.strerror or str(exc), broken_pipe=isinstance(exc, BrokenPipeError))
        self._state.failed = failure
        if self._state.fd is not None:  # what is still buffered goes nowhere, rather than raise again at exit
            _to_devnull(self._state.fd)
        return failure

    def write(self, data: Any) -> int:
        if not data:
            return int(self._stream.write(data) or 0)  # (click tells a text stream from a binary one this way)
        state = self._state
        if state.failed is not None:
            raise state.failed
        if state.closed:
            state.failed = OutputError("it is closed")
            raise state.failed
        try:
            written = self._stream.write(data)
            self._stream.flush()
        except OSError as exc:
            raise self._lost(exc) from None
        return int(written or 0)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._state.failed is not None or self._state.closed:
            with contextlib.suppress(OSError, ValueError):  # (pointed at /dev/null: nothing to say, nor raise)
                self._stream.flush()
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._lost(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Errors:
    """A guard around stderr: an error writing it is dropped (there is nowhere left to say it), and stderr is
    pointed at /dev/null so that the interpreter's flush at exit does not fail either."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.failed = False

    @property
    def guarded(self) -> Any:
        return self._stream

    def _drop(self) -> None:
        self.failed = True
        fd = _fd_of(self._stream)
        if fd is not None:
            _to_devnull(fd)

    def write(self, data: Any) -> int:
        try:
            written = self._stream.write(data)
            self._stream.flush()
        except OSError:
            self._drop()
            return len(data)
        return int(written or 0)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._drop()

    @property
    def buffer(self) -> Any:
        return _Errors(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _to_devnull(fd: int) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


_installed = False


def install() -> None:
    """Set up the process's standard streams (see the module's docstring). Called once, by ``flowdsl.launch.main``
    before anything else opens a file; a second call does nothing."""
    global _installed
    if _installed:
        return
    _installed = True
    closed = {fd: _closed(fd) for fd in (0, 1, 2)}
    for fd in (0, 1, 2):
        if closed[fd]:
            try:
                opened = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            except OSError:
                continue
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    out_closed = closed[1] or sys.stdout is None
    stdout: Any = sys.stdout
    if stdout is None:
        stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    else:
        _escaping(stdout)
    sys.stdout = _Output(stdout, _State(out_closed, _fd_of(stdout)))
    stderr: Any = sys.stderr
    if stderr is None:
        stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    else:
        _escaping(stderr)
    sys.stderr = _Errors(stderr)


def _escaping(stream: Any) -> None:
    """Make ``stream`` write what its encoding cannot carry as backslash escapes rather than fail."""
    with contextlib.suppress(Exception):
        stream.reconfigure(errors="backslashreplace")


def like_stdout(old: Any, stream: Any) -> Any:
    """``stream``, a new text stream on stdout's descriptor (``run --format json`` keeps one while descriptor 1
    points at stderr), guarded as ``old`` (``sys.stdout``) is: its errors are an :class:`OutputError`, and a
    stdout closed at start stays closed."""
    _escaping(stream)
    if isinstance(old, _Output):
        return _Output(stream, _State(old._state.closed, _fd_of(stream)))
    return stream


def not_output() -> None:
    """The command writes no output of its own to stdout (``flowdsl worker``: its log goes to stderr): what the
    code it runs prints there is that code's business, written as to any stdout — dropped when stdout was closed
    at start (descriptor 1 is then /dev/null), never an :class:`OutputError` failing a step."""
    if isinstance(sys.stdout, _Output):
        sys.stdout = sys.stdout.guarded


def check_open(stream: Any = None) -> None:
    """Raise :class:`OutputError` now when ``stream`` (``sys.stdout``) was closed at start: a command whose one
    output is a JSON object on stdout says so before it does anything."""
    out = sys.stdout if stream is None else stream
    if isinstance(out, _Output) and out._state.closed:
        out._state.failed = out._state.failed or OutputError("it is closed")
        raise out._state.failed


def _is_unicode(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def _json_escapes(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    said = []
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        if code > 0xFFFF:  # as a UTF-16 surrogate pair, as JSON spells it
            code -= 0x10000
            said.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            said.append(f"\\u{code:04x}")
    return "".join(said), exc.end


codecs.register_error("flowdsl.json", _json_escapes)


def json_text(text: str, stream: Any = None) -> str:
    """``text``, JSON, as ``stream`` (``sys.stdout``) can carry it: as it is in a UTF encoding; else in ASCII, each
    other character as its ``\\uXXXX`` escape (it can only be inside a JSON string, so the JSON stays valid and
    means the same)."""
    out = sys.stdout if stream is None else stream
    encoding = getattr(out, "encoding", None) or "utf-8"
    if _is_unicode(encoding) or text.isascii():
        return text
    return text.encode("ascii", "flowdsl.json").decode("ascii")


def write_json(text: str, stream: Any = None) -> None:
    """Write ``text`` (JSON, its newline included) to ``stream`` (``sys.stdout``) as :func:`json_text` says, and
    flush it: an error writing it is raised here, not lost in the flush at exit."""
    out = sys.stdout if stream is None else stream
    out.write(json_text(text, out))
    out.flush()


def flush_stdout() -> None:
    """Flush stdout: an error is raised (an :class:`OutputError` once :func:`install` ran)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def report(exc: OutputError) -> int:
    """Say ``exc`` on stderr — one line, ``error: cannot write to stdout: …``, with what the command had done —
    and give the exit code: :data:`EXIT_BROKEN_PIPE` for a reader that went away (said only when there is
    something it must not lose, a run's id), else :data:`EXIT_OUTPUT_LOST`. stdout is left pointing at
    /dev/null, so that the interpreter's flush at exit raises nothing."""
    fd = _fd_of(sys.stdout)
    if fd is not None:
        _to_devnull(fd)
    if not exc.broken_pipe or exc.context:
        try:
            sys.stderr.write(f"error: {exc}\n" if not exc.broken_pipe else
                             f"note: stdout's reader went away; {'; '.join(exc.context)}\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
    return EXIT_BROKEN_PIPE if exc.broken_pipe else EXIT_OUTPUT_LOST


def console(*, stderr: bool = False, record: bool = False) -> Any:
    """A rich console writing to stdout (or ``stderr``) when it prints, as the commands use them: no highlighting,
    no emoji codes (``:smile:`` in a message stays as it is), no wrapping of long lines; and when it is not a
    terminal, as wide as any line (``COLUMNS`` would have tables drop or shorten columns in a file: a terminal alone
    is as narrow as it is)."""
    from rich.console import Console

    made = Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=True, record=record)
    if not made.is_terminal:
        made.width = UNBOUNDED_WIDTH
    return made
