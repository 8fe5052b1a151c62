"""A lean asyncio Redis connection for the runtime's hot path: pipelined commands on one socket.

Stage: runtime: redis. Imports redis (for its URL parser and error classes)
and stdlib; hiredis when it is installed (its C reply parser and command
packer; a pure-Python RESP2 parser and packer otherwise).

Why: redis-py's asyncio client spends ~200 µs of CPU per round trip and packs
every argument in Python. This connection writes a whole batch of commands with
one ``write`` and hands each reply, in order, to its future, waking the task
that awaits it at once (:func:`_resolve`: no turn of the loop per reply) —
the :class:`~flowdsl.runtime.redis.scripts.Batcher` of workers and clients uses
it for every command (:meth:`WireConnection.send`: no task or extra future per
command), and blocking reads (``XREADGROUP``, ``XREAD``) get one of their own
(:meth:`WireConnection.blocking`). Replies are raw RESP2 (bulk strings as
bytes, arrays as lists, errors as ``redis.ResponseError`` instances).
Connection loss fails the commands in flight with ``ConnectionError``; the
next batch reconnects. A connection that goes silent without being closed (a
network path that drops packets, a NAT or firewall entry lost, a peer that
keeps the window shut: no reset ever comes) is found by a reply deadline
(``reply_timeout``): nothing received for that long while replies are awaited,
and it is closed, what waits on it failing with ``redis.TimeoutError`` (the
callers retry on a new connection); :attr:`WireConnection.stalled` says
meanwhile that Redis is not answering. TCP sockets also get keepalive probes.
TLS (``rediss://``) is not handled here: the
:class:`~flowdsl.runtime.redis.scripts.Batcher` then uses redis-py pipelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.asyncio.connection import parse_url
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - depends on the environment
    _hiredis = None

__all__ = ["DatabaseError", "NotRedisError", "WireConnection", "entry_fields", "stream_entries", "supported"]


class DatabaseError(redis.ResponseError):
    """The server refused to ``SELECT`` the database the URL names (``/N``, ``?db=N``): it has fewer."""

    def __init__(self, db: int, answer: str):
        super().__init__(f"the URL selects database {db}, which this Redis server refused ({answer}): a server "
                         "has the databases 0 to its `databases` setting - 1 (16 by default)")
        self.db = db


class NotRedisError(redis.ConnectionError):
    """The server answered with bytes that are not the Redis protocol (an HTTP server, a database of another
    kind): the connection is closed and every command in flight fails with this error."""


def supported(url: str) -> bool:
    """Whether this connection can serve ``url`` (plain TCP or a unix socket; TLS goes through redis-py)."""
    return url.startswith(("redis://", "unix://"))


def entry_fields(raw: list[bytes] | dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """A stream entry's fields as a dict (raw replies give a flat list; a deleted entry gives nothing)."""
    if isinstance(raw, list):
        return dict(zip(raw[::2], raw[1::2], strict=True))
    return raw or {}


def stream_entries(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """An ``XREAD``/``XREADGROUP`` reply as ``[(stream, [(entry id, fields)])]`` (nothing on a timeout)."""
    return [(stream, [(entry_id, entry_fields(fields)) for entry_id, fields in entries])
            for stream, entries in reply or ()]


# error replies whose first word redis-py turns into an error class of its own, which callers tell apart:
# NOSCRIPT (load the script again), LOADING (a restarted server still reading its data: transient) and NOPERM (the
# ACL user may not: a configuration error)
_ERRORS: dict[str, type[redis.RedisError]] = {"NOSCRIPT": NoScriptError, "LOADING": redis.BusyLoadingError,
                                              "NOPERM": NoPermissionError}


def _error(message: str) -> redis.RedisError:
    if message.startswith("ERR max number of clients reached"):  # a connection refused for now, as redis-py says
        return redis.ConnectionError(message)
    return _ERRORS.get(message.split(" ", 1)[0], ResponseError)(message)


def _encode(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise TypeError("booleans are not Redis arguments")
    if isinstance(arg, int | float):
        return repr(arg).encode()
    raise TypeError(f"cannot send a {type(arg).__name__} to Redis")


def pack(args: tuple[Any, ...] | bytes) -> bytes:
    """One command in RESP: ``*<n>\\r\\n$<len>\\r\\n<arg>\\r\\n…`` (bytes, str, int and float arguments); bytes
    are a command packed already (:meth:`~flowdsl.runtime.redis.scripts.Batcher.call_packed`), sent as they are."""
    if type(args) is bytes:
        return args
    if _hiredis is not None:
        packed: bytes = _hiredis.pack_command(args)  # encodes str (UTF-8), int and float itself, as _encode does
        return packed
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _PyReader:
    """A RESP2 reply parser (used when hiredis is not installed)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def gets(self) -> Any:
        start = self.pos
        try:
            value = self._read()
        except IndexError:
            self.pos = start
            return False
        return value

    def _line(self) -> bytes:
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            raise IndexError
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def _read(self) -> Any:
        kind = bytes(self.buf[self.pos:self.pos + 1])
        if not kind:
            raise IndexError
        if kind not in b"+-:$*":  # not Redis (a web server's "<!DOCTYPE", say): say so now, not at a CRLF
            raise redis.InvalidResponse(f"protocol error: a reply cannot start with {kind!r}")
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return _error(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if len(self.buf) < self.pos + n + 2:
                raise IndexError
            data = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise redis.ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader: Any = _hiredis.Reader(replyError=_error) if _hiredis is not None else _PyReader()
        # a future per command sent, in order; True: an error reply is raised by it, else it is its result
        self.waiting: deque[tuple[asyncio.Future[Any], bool]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.received = 0  # chunks received: the reply deadline's sign of life (WireConnection._check)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            _keepalive(sock)

    def data_received(self, data: bytes) -> None:
        self.received += 1
        self.reader.feed(data)
        try:  # the event loop calls this outside any task (a transport's callback): a reply's waiter is woken at once
            now = asyncio.current_task() is None
        except RuntimeError:  # (no event loop running: fed by hand)
            now = False
        while True:
            try:
                reply = self.reader.gets()
            except Exception as exc:  # hiredis.ProtocolError, or ours: never raise into asyncio (it prints it)
                self._garbled(data, exc)
                return
            if reply is False:
                return
            if self.waiting:
                future, raises = self.waiting.popleft()
                if future.done():
                    continue
                if raises and isinstance(reply, Exception):
                    future.set_exception(reply)
                elif now:
                    _resolve(future, reply)
                else:
                    future.set_result(reply)

    def _garbled(self, data: bytes, exc: Exception) -> None:
        """The server does not speak Redis: fail what waits, close the connection (the next batch reconnects)."""
        self.lost = NotRedisError(f"the server did not answer in the Redis protocol (it sent {bytes(data[:24])!r}…: "
                                  f"{exc}); is this the address of a Redis server?")
        self._fail()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = redis.ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        self._fail()

    def _fail(self) -> None:
        assert self.lost is not None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)


#: TCP keepalive of the lean sockets: probes after 30 s idle, every 10 s, the connection dropped after 3 unanswered
#: (redis-py's ``socket_keepalive`` leaves the system's 2 hours) — for an idle connection whose path died; one
#: with replies awaited is judged sooner by the reply deadline
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _keepalive(sock: Any) -> None:
    with contextlib.suppress(OSError):  # (not fatal: the reply deadline still finds a dead connection)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE:
            if hasattr(socket, name):  # (Linux; macOS has TCP_KEEPALIVE for the first, left at its default)
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    """``future.set_result(reply)``, and its one done callback — the wakeup of the task awaiting the reply — run
    now rather than at the loop's next turn.

    asyncio schedules a future's callbacks with ``loop.call_soon``: five calls in Python and a handle per reply,
    ~3 % of a worker's instructions per step. Replies are read by the event loop itself, outside any task, as
    such a handle would run, so the waiter may run here (:meth:`_Protocol.data_received` checks that no task is
    running); a future with no callback or several is resolved as usual. A callback's error is reported to the
    loop's exception handler, as a handle's would be."""
    callbacks = future._callbacks  # (asyncio's own: [(callback, context)] or None)
    if not callbacks or len(callbacks) != 1:
        future.set_result(reply)
        return
    ((callback, context),) = callbacks
    future.remove_done_callback(callback)
    future.set_result(reply)
    try:
        context.run(callback, future)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        future.get_loop().call_exception_handler({"message": f"Exception in callback {callback!r}",
                                                  "exception": exc, "future": future})


class WireConnection:
    """One pipelined connection to the Redis of ``url`` (``redis://`` or ``unix://``), opened on first use.

    ``reply_timeout`` (seconds; None: none) is the reply deadline: when nothing at all has been received for that
    long while replies are awaited (and nothing written is still draining), the connection is presumed dead — a
    path that drops packets gives no error, and a write into it "succeeds" — so it is closed and every command
    waiting on it fails with ``redis.TimeoutError``; the next command opens a new one. A blocking command
    (:meth:`blocking`) is bounded by its own deadline instead. ``on_silence(seconds, waiting)`` is called when a
    connection is given up so, ``on_answer(seconds)`` when Redis answers again afterwards (how long it had not):
    for the owner to say so, once each."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, client_name: str | None = None,
                 reply_timeout: float | None = None, on_silence: Callable[[float, int], None] | None = None,
                 on_answer: Callable[[float], None] | None = None):
        self.options = parse_url(url)
        self.connect_timeout = connect_timeout
        self.client_name = client_name
        self.reply_timeout = reply_timeout
        self.on_silence = on_silence
        self.on_answer = on_answer
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        # the reply deadline's watch (see _check): its next check, the last one's time and what it saw (the
        # connection, the chunks it had received, the bytes still to write), since when replies have been awaited
        # with nothing received (loop time), and since when Redis has not answered at all once a connection was
        # given up (until a reply comes on a new one)
        self._watch: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None
        self._checked_at = 0.0
        self._seen: tuple[_Protocol | None, int, int] = (None, 0, 0)
        self._quiet_since: float | None = None
        self._silent_since: float | None = None
        self._blocking = False

    @property
    def stalled(self) -> bool:
        """Whether Redis is not answering on this connection now: replies awaited and nothing received for a
        whole check of the reply deadline (a quarter of it), or a connection given up as dead and no reply on a
        new one yet. Always False without a reply deadline."""
        protocol = self._protocol
        if self._silent_since is not None:
            return protocol is None or protocol.lost is not None or not protocol.received
        return self._quiet_since is not None and protocol is not None and self._seen[0] is protocol and \
            protocol.received == self._seen[1]

    def _watching(self) -> None:
        """Start the reply deadline's checks (when it has one and they are not running in this event loop)."""
        if self.reply_timeout is None:
            return
        loop = asyncio.get_running_loop()
        if self._watch is not None and self._watch_loop is loop and not self._watch.cancelled():
            return
        if self._watch is not None:
            self._watch.cancel()
        self._checked_at = loop.time()
        self._watch_loop = loop
        self._watch = loop.call_later(self.reply_timeout / 4, self._check)

    def _check(self) -> None:
        """One check of the reply deadline (every quarter of it, while connected): replies awaited, nothing
        received and nothing written drained since the last check starts (or goes on) a silence; a silence as long
        as the deadline gives the connection up (:meth:`_give_up`). A check that comes late — the event loop was
        busy (a long computation, a paused process) — proves nothing: the bytes may be waiting to be read."""
        self._watch = None
        protocol = self._protocol
        assert self.reply_timeout is not None
        loop = asyncio.get_running_loop()
        now, interval = loop.time(), self.reply_timeout / 4
        late = now - self._checked_at > 2 * interval
        self._checked_at = now
        if protocol is None or protocol.lost is not None or protocol.transport is None:
            self._quiet_since = None
            return  # (watched again from the next connection on)
        if protocol.received:
            self._answered()
        seen, self._seen = self._seen, (protocol, protocol.received, protocol.transport.get_write_buffer_size())
        if not protocol.waiting or self._blocking or late or seen[0] is not protocol or seen[1] != protocol.received \
                or self._seen[2] < seen[2]:
            self._quiet_since = None  # nothing awaited, or a sign of life since the last check
        elif self._quiet_since is None:
            self._quiet_since = now  # (the replies awaited were asked for at most one check ago)
        elif now - self._quiet_since >= self.reply_timeout:
            self._give_up(protocol, now - self._quiet_since)
            return
        self._watch = loop.call_later(interval, self._check)

    def _answered(self) -> None:
        """Redis answered on this connection: after a connection was given up, that is over (said once)."""
        if self._silent_since is not None:
            silent, self._silent_since = asyncio.get_running_loop().time() - self._silent_since, None
            if self.on_answer is not None:
                self.on_answer(silent)

    def _give_up(self, protocol: _Protocol, silent: float) -> None:
        """Close a connection that has not answered for ``silent`` seconds: what waits on it fails now."""
        waiting = len(protocol.waiting)
        protocol.lost = redis.TimeoutError(
            f"no answer from Redis for {silent:.1f} s while {waiting} command(s) waited for their replies: the "
            "connection was presumed dead (a network path that drops packets without a reset) and closed")
        protocol._fail()
        if protocol.transport is not None:
            protocol.transport.abort()  # (not close(): it would wait to send what the dead path never takes)
        if self._protocol is protocol:
            self._protocol = None
        self._quiet_since = None
        if self._silent_since is None:
            self._silent_since = asyncio.get_running_loop().time() - silent
            if self.on_silence is not None:
                self.on_silence(silent, waiting)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            loop = asyncio.get_running_loop()
            opts = self.options
            try:
                if "path" in opts:
                    coro = loop.create_unix_connection(_Protocol, opts["path"])
                else:
                    coro = loop.create_connection(_Protocol, opts.get("host", "localhost"), opts.get("port", 6379))
                async with asyncio.timeout(self.connect_timeout):
                    _, protocol = await coro
            except (OSError, TimeoutError) as exc:
                raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from None
            hello: list[tuple[Any, ...]] = []
            if opts.get("password"):
                hello.append(("AUTH", opts["username"], opts["password"]) if opts.get("username")
                             else ("AUTH", opts["password"]))
            if opts.get("db"):
                hello.append(("SELECT", int(opts["db"])))
            if self.client_name:
                hello.append(("CLIENT", "SETNAME", self.client_name))
            try:
                if hello:
                    try:
                        async with asyncio.timeout(self.connect_timeout):
                            replies = await self._send(protocol, hello)
                    except TimeoutError:
                        raise redis.ConnectionError(f"cannot connect to Redis: no answer to {hello[0][0]} within "
                                                    f"{self.connect_timeout:g} s") from None
                    for command, reply in zip(hello, replies, strict=True):
                        if isinstance(reply, redis.ConnectionError):
                            raise reply  # (maxclients reached: the server's first answer, whatever was sent)
                        if isinstance(reply, Exception):
                            if command[0] == "CLIENT" and "setname" in str(reply).lower():
                                continue  # naming is optional: CLIENT renamed away, or an ACL without it
                            if command[0] == "SELECT":
                                raise DatabaseError(int(opts["db"]), str(reply))
                            raise redis.AuthenticationError(str(reply)) if "AUTH" in str(reply).upper() or \
                                "WRONGPASS" in str(reply) else reply
            except BaseException:  # refused, silent, or cancelled meanwhile: the socket is not left open
                if protocol.transport is not None:
                    protocol.transport.close()
                raise
            self._protocol = protocol
            if hello:  # (answered: Redis is back, if it had gone silent; else the deadline's next check sees it)
                self._answered()
            self._watching()
            return protocol

    @staticmethod
    async def _send(protocol: _Protocol, commands: Sequence[tuple[Any, ...] | bytes]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend((f, False) for f in futures)
        assert protocol.transport is not None
        protocol.transport.write(b"".join(pack(c) for c in commands))
        return list(await asyncio.gather(*futures))

    async def execute(self, commands: Sequence[tuple[Any, ...] | bytes]) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order (errors as ResponseError instances)."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        return await self._send(protocol, commands)

    async def blocking(self, command: tuple[Any, ...], block_ms: int) -> Any:
        """Run one blocking command (``XREAD … BLOCK``) on this connection, which it holds meanwhile: its
        reply, or its error raised. A connection silent past the block time by the reply deadline (15 s when it
        has none) is closed as dead."""
        self._blocking = True  # (the reply deadline's checks leave it to this one)
        try:
            async with asyncio.timeout(block_ms / 1000 + (self.reply_timeout or 15)):
                (reply,) = await self.execute([command])
        except TimeoutError:
            await self.aclose()
            raise redis.TimeoutError(f"no answer from Redis to {command[0]}") from None
        finally:
            self._blocking = False
        if isinstance(reply, Exception):
            raise reply
        return reply

    def send(self, commands: Sequence[tuple[Any, ...] | bytes], futures: list[asyncio.Future[Any]]) -> bool:
        """Write ``commands`` now, in one write, if connected: each future gets its reply (an error reply is
        raised by it; a lost connection fails every one). False, with nothing sent, when not connected:
        use :meth:`execute` (which connects). No task and no extra future per command: the hot path."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or protocol.transport is None or \
                protocol.transport.is_closing():
            return False
        protocol.waiting.extend((f, True) for f in futures)
        protocol.transport.write(b"".join([c if type(c) is bytes else pack(c) for c in commands]))
        return True

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
