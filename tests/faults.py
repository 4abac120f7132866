"""A user-space TCP proxy to cut a server off and bring it back (the kernel here has no netem)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.up = True
        self.muted = False  # the server's bytes are dropped: requests arrive, replies never come back
        self.swallowing = False  # the clients' bytes are dropped: requests are sent, and never arrive
        self.reading = asyncio.Event()  # cleared by ``stall``: the clients' bytes are not read
        self.reading.set()
        self.accepted = 0  # connections taken (a client's reconnection attempts show here)
        # One more gate per connection, by the order they were taken (0: the first): ``stall(n)``;
        # found by the writer towards the server, so that subclasses' ``_pipe`` keep their signature.
        self._reading_of: list[asyncio.Event] = []
        self._gate_of: dict[asyncio.StreamWriter, asyncio.Event] = {}

    async def start(self, port: int = 0, *, tls: ssl.SSLContext | None = None) -> TcpProxy:
        """Listen (with ``tls``: a TLS listener that forwards the decrypted stream to the target)."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, port, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def seen(self, data: bytes, *, replies: bool) -> None:
        """Each chunk read, before it goes on (``replies``: the server's): a subclass's hook."""

    def drops(self, client: asyncio.StreamWriter) -> bool:
        """Whether the server's bytes to this client side are dropped (all of them while muted)."""
        return self.muted

    async def _stalled(self, writer: asyncio.StreamWriter) -> None:
        """Wait while the clients' bytes towards this writer are not to be read (``stall``)."""
        await self.reading.wait()
        if (gate := self._gate_of.get(writer)) is not None:
            await gate.wait()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        try:
            while True:
                if not replies:
                    await self._stalled(writer)
                if not (data := await reader.read(65536)):
                    break
                if not replies:
                    # Checked again once read: this pipe is nearly always inside read() when a test
                    # calls ``stall``, and the chunk it then returned went through (the server
                    # answered a request sent after the stall). Held here until ``resume``.
                    await self._stalled(writer)
                self.seen(data, replies=replies)
                if replies and self.drops(writer):
                    continue
                if not replies and self.swallowing:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        reading = asyncio.Event()
        reading.set()
        self._reading_of.append(reading)
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))
        self._gate_of[up_writer] = reading
        for t in (self._pipe(reader, up_writer, replies=False), self._pipe(up_reader, writer, replies=True)):
            task = asyncio.create_task(t)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self.up = False
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    def restore(self) -> None:
        self.up = True
        self.muted = False
        self.swallowing = False

    def mute(self) -> None:
        """Keep forwarding requests but drop every reply: a request is applied by the server and
        its client never learns it (what a coordinator dying after the write looks like)."""
        self.muted = True

    def stall(self, connection: int | None = None) -> None:
        """Stop reading what the clients send (what RabbitMQ does to a publisher's socket during a
        memory or disk alarm), for this proxy's connections only, until ``resume``; with
        ``connection``, for that one only (0: the first this proxy took)."""
        if connection is None:
            self.reading.clear()
        else:
            self._reading_of[connection].clear()

    def resume(self) -> None:
        self.reading.set()
        for reading in self._reading_of:
            reading.set()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
