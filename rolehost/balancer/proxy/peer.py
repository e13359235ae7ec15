"""One end of the HTTP relay, the client's or an instance's: the protocol both
`client.HttpClient` and `backend.BackendConnection` are."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast


class _Peer(asyncio.Protocol):
    """One end of a relay: its transport, and `drain` for writers that must wait while the
    transport's buffer is over its high-water mark."""

    transport: asyncio.Transport
    send: Callable[[bytes], None]  # transport.write

    def __init__(self) -> None:
        self.lost = False
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.send = self.transport.write  # looked up once, not at every write

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake(exc or ConnectionResetError("the connection was closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(None)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the connection was closed")
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _wake(self, exc: Exception | None) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
