"""A TCP relay in front of PostgreSQL that counts network round trips: every time a client speaks after the server
has answered (or first), that is one more round trip. It knows nothing of the protocol, so it counts what the wire
carries whatever the driver does: BEGIN, COMMIT, pool pre-pings, pipelined statements (one burst, one round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Counts:
    round_trips: int = 0
    client_bytes: int = 0
    server_bytes: int = 0
    connections: int = 0


class RoundTripCounter:
    """``with RoundTripCounter(pg_port) as relay:`` point the client at ``relay.port``; read ``relay.counts``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.counts = Counts()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        # set to a list to keep each round trip's request: (connection number, its first 4 KiB)
        self.record: list[tuple[int, bytes]] | None = None

    def snapshot(self) -> Counts:
        with self._lock:
            return Counts(**vars(self.counts))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, sock=sock))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        with self._lock:
            self.counts.connections += 1
            connection = self.counts.connections
        turn = {"client": False}  # whether the client is the one speaking now

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_client: bool) -> None:
            try:
                while chunk := await reader.read(65536):
                    with self._lock:
                        if from_client:
                            if not turn["client"]:
                                self.counts.round_trips += 1
                                turn["client"] = True
                                if self.record is not None:
                                    self.record.append((connection, chunk[:4096]))
                            self.counts.client_bytes += len(chunk)
                        else:
                            turn["client"] = False
                            self.counts.server_bytes += len(chunk)
                    writer.write(chunk)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        await asyncio.gather(
            pump(client_reader, server_writer, True), pump(server_reader, client_writer, False), return_exceptions=True
        )

    def __enter__(self) -> RoundTripCounter:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@contextlib.contextmanager
def counting(target_port: int) -> Iterator[RoundTripCounter]:
    with RoundTripCounter(target_port) as relay:
        yield relay
