"""Bytes relayed over streams, as they come: a TCP connection both ways and an Upgrade
tunnel's way out; a connection to an instance opened as streams; a reset passed on as
one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from rolehost.balancer import Backend


# Final: mypyc then reads these as statics, not from the module's dict on every use.
_READ: Final = 65536
CONNECT_TIMEOUT: Final = 5.0
# SO_LINGER on, for 0 s: close() then resets the connection. transport.abort() alone sends
# a FIN, under asyncio's loop and uvloop's alike.
_LINGER_0: Final = struct.pack("ii", 1, 0)


async def _open(backend: Backend) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
    )


async def _pipe(read: Callable[[], Awaitable[bytes | None]], sink: asyncio.StreamWriter
                ) -> None:
    """What `read` gives (until b"" or None), written to `sink`; then its end, passed on as
    a half close. A tunnel's way out, and both ways of a TCP connection."""
    try:
        while data := await read():
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        # A reset passed on as a FIN would pass a cut upload off as a complete one.
        _reset(sink.transport)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close `transport`'s connection with a reset (RST), what is buffered for it unsent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    cast(asyncio.Transport, transport).abort()
