"""A proxy between a test's worker and its redis-server that breaks connections on purpose (a bad network).

It listens on a unix socket of its own and runs in the test's event loop. Each connection made through it is
forwarded to the private redis-server, and may be

- **frozen** (:meth:`FaultProxy.freeze`): nothing more is forwarded either way and the sockets stay open — what a
  network path that drops packets without a reset does to an established connection (a lost NAT or conntrack
  entry, a firewall or load-balancer failover); connections made afterwards work;
- **reset** (:meth:`FaultProxy.reset_on`): when the client sends bytes holding a pattern, they are not forwarded
  and the connection is closed at once, both ways (a connection reset).

Connections are told apart by the name their client gives them (``CLIENT SETNAME``, in their first bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter):
        self.client, self.server = client, server
        self.name = b""
        self.frozen = asyncio.Event()  # set: frozen (never cleared: a frozen connection stays so)

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class FaultProxy:
    """A unix-socket proxy to the redis-server at ``target`` (a socket path); ``url`` is its own address."""

    def __init__(self, target: Path, directory: Path):
        self.target = target
        self.path = directory / "proxy.sock"
        self.url = f"unix://{self.path}?db=0"
        self.links: list[_Link] = []
        self.resets = 0  # connections reset by reset_on
        self._pattern: tuple[bytes, ...] = ()
        self._resets_left = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in self.links:
            link.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    def freeze(self, name_prefix: bytes) -> int:
        """Freeze the open connections whose client name starts with ``name_prefix``; returns how many."""
        frozen = [link for link in self.links if link.name.startswith(name_prefix) and not link.frozen.is_set()]
        for link in frozen:
            link.frozen.set()
        return len(frozen)

    def reset_on(self, *parts: bytes, count: int) -> None:
        """Reset the next ``count`` connections whose client sends bytes holding every one of ``parts`` (in one
        read), without forwarding those bytes."""
        self._pattern, self._resets_left = parts, count

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, server_writer)
        self.links.append(link)
        for pump in (self._pump(link, reader, server_writer, True), self._pump(link, server_reader, writer, False)):
            task = asyncio.get_running_loop().create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    from_client: bool) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while not link.frozen.is_set():
                data = await reader.read(65536)
                if not data:
                    break
                if from_client and not link.name and b"SETNAME" in data:
                    # *4\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$<n>\r\n<name>\r\n: the name is two lines further on
                    link.name = data[data.index(b"SETNAME"):].split(b"\r\n")[2]
                if from_client and self._resets_left and all(part in data for part in self._pattern):
                    self._resets_left -= 1
                    self.resets += 1
                    link.close()
                    return
                if link.frozen.is_set():
                    break  # (frozen while it read: what it read is never delivered)
                writer.write(data)
                await writer.drain()
            if link.frozen.is_set():
                await asyncio.Event().wait()  # frozen: the sockets stay open, nothing more goes through
        writer.transport.abort()  # (the other side closed: so does this one)
