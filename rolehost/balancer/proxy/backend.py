"""An instance's side of the HTTP relay: a kept-alive connection to it, and the parser
of its responses."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httptools

from rolehost.balancer.proxy.heads import _HOP, HEAD_LIMIT, MAX_FIELDS, BadResponse, _check_reason
from rolehost.balancer.proxy.peer import _Peer
from rolehost.balancer.proxy.streams import CONNECT_TIMEOUT

if TYPE_CHECKING:
    from mypy_extensions import i64

    from rolehost.balancer import Backend
    from rolehost.balancer.proxy.exchange import _Exchange


class _ResponseParser:
    """httptools callbacks for one response from a backend: interim (1xx) answers first,
    then the response itself; anything after it is only noted (`extra`).

    The instance is user code, so its head is bounded as a client's is (`MAX_FIELDS`,
    `HEAD_LIMIT`, counted over its interim answers and trailer too) and its status must be
    one HTTP has (100 to 599; a 101 only where an upgrade was asked): else a callback
    raises `BadResponse`. httptools (llhttp, strict) refuses the rest: an invalid status
    line, bytes no field name may hold, an obs-fold, a Content-Length with a
    Transfer-Encoding or beside another."""

    __slots__ = ("_interim_now", "chunks", "complete", "extra", "feed", "fields", "head_done",
                 "headers", "interim", "keep_alive", "parser", "reason", "size", "unheaded",
                 "upgrading")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.feed = self.parser.feed_data  # looked up once, not at every read
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False  # read at the head: httptools forgets it once complete
        self.complete = False
        self.extra = False  # bytes past the end of the response: the connection is not reused
        self.chunks: list[bytes] = []
        self.interim: list[bytes] = []  # heads of 1xx answers, to pass on
        self._interim_now = False
        self.unheaded = 0  # bytes read before the head ended: bounded, as a request's
        # i64: mypyc keeps these as machine integers, not tagged ones (70 instructions a
        # response less, bench/response_head.py); a name for type checkers only, so the
        # interpreted relay imports no mypy_extensions.
        self.fields: i64 = 0  # header fields parsed (interim answers', trailer's too)
        self.size: i64 = 0  # their names' and values' bytes, and the reasons'
        self.upgrading = False  # an Upgrade was asked: a 101 is the answer, not a fault

    def reset(self) -> None:
        """Ready for the next response on the same connection (the parser and its
        callbacks refer to each other: one pair per connection, not per response)."""
        self.reason, self.headers = b"", []
        self.head_done = self.keep_alive = self.complete = self.extra = False
        self.unheaded = self.fields = self.size = 0
        self.chunks.clear()
        self.interim.clear()

    # No on_message_begin (one callback less per response): a response after the complete
    # one shows in its first callback, or in a parse error.

    def on_status(self, reason: bytes) -> None:
        if self.complete:
            self.extra = True
        else:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.extra = True
            return
        self.fields += 1
        self.size += len(name) + len(value)
        if self.fields > MAX_FIELDS:
            raise BadResponse(f"more than {MAX_FIELDS} header fields in the response")
        if self.size > HEAD_LIMIT:
            raise BadResponse("response head too large")
        if not self.head_done:  # a trailer field is dropped, as a request's is
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            self.extra = True
            return
        self.size += len(self.reason)
        if self.size > HEAD_LIMIT:
            raise BadResponse("response head too large")
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:
                raise BadResponse(f"status {status} in the response")
            if status != 101:  # an interim answer (100 Continue, ...)
                _check_reason(self.reason)
                lines = [b"HTTP/1.1 %d %s" % (status, self.reason)]
                lines += [n + b": " + v for n, v in self.headers if n.lower() not in _HOP]
                self.interim.append(b"\r\n".join(lines) + b"\r\n\r\n")
                self.reason, self.headers, self._interim_now = b"", [], True
                return
            if not self.upgrading:  # its bytes would follow as a tunnel nobody asked for
                raise BadResponse("a 101 answer to a request that asked for no upgrade")
        elif status > 599:
            raise BadResponse(f"status {status} in the response")
        self.head_done = True
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.extra = True
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._interim_now:
            self._interim_now = False
        else:
            self.complete = True


class BackendConnection(_Peer):
    """A keep-alive connection to one instance; it carries one exchange at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.exchange: _Exchange | None = None
        self.response: _ResponseParser | None = None  # the last one, reused when it ended
        # Exchanges so far, and when the balancer's sweep last saw the count change: by
        # these it closes a kept-alive connection that has stayed idle for idle_timeout.
        self.uses = 0
        self._uses_seen = 0
        self._idle = 0.0

    def idle_for(self, step: float) -> float:
        """Seconds, in the sweep's `step`s, that the connection has carried nothing."""
        if self.uses != self._uses_seen:
            self._uses_seen, self._idle = self.uses, 0.0
        else:
            self._idle += step
        return self._idle

    def parser(self) -> _ResponseParser:
        """A response parser for the next exchange: the last one if its response ended
        cleanly (a HEAD response, say, leaves it expecting a body)."""
        response = self.response
        if response is None or not response.complete or response.extra:
            response = self.response = _ResponseParser()
        else:
            response.reset()
        return response

    @classmethod
    async def open(cls, backend: Backend) -> BackendConnection:
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(cls, backend.host, backend.port), CONNECT_TIMEOUT
        )
        return connection

    @property
    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()
        self._wake(ConnectionResetError("the connection was closed"))

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_data(data)
        else:  # nothing was asked: whatever this is, the connection is of no use
            self.close()

    def eof_received(self) -> bool:
        if self.exchange is not None:
            self.exchange.backend_closed(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.exchange is not None:
            self.exchange.backend_closed(exc)


def _idle(backend: Backend) -> BackendConnection | None:
    """An idle keep-alive connection to `backend`, if one is still good."""
    while backend.idle:
        connection = backend.idle.pop()
        if connection.usable:
            return connection
        connection.close()
    return None
