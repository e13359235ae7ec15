"""Relaying traffic through a balancer: HTTP/1.1 per request, TCP per connection.

HTTP: httptools parses both sides; bodies stream through in chunks (re-framed, never
buffered whole); backend connections are kept alive and reused; a request whose backend
fails before any byte of the response came back is tried once more on another instance
when that is safe (an idempotent method, or nothing of it was sent yet). An Upgrade
request (WebSocket) becomes a tunnel once the instance answers 101.

The HTTP relay is built on protocols, not streams: the usual request (body all in, an
instance in rotation with an idle keep-alive connection) goes from the client's
`data_received` to the instance's transport, and its response from the instance's
`data_received` to the client's transport, with no task, future or buffer copy in
between. Whatever has to wait goes through a task (`HttpClient._serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import httptools
import structlog

from rolehost import metrics

if TYPE_CHECKING:
    from rolehost.balancer import Backend, Balancer

log = structlog.get_logger()

# Final: mypyc then reads these as statics, not from the module's dict on every use.
IDEMPOTENT: Final = {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}
# Hop-by-hop headers, and the framing headers the proxy writes itself.
_HOP: Final = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
               b"upgrade", b"transfer-encoding", b"content-length"}
# Their lengths: most headers are told apart from them without lowering and hashing.
_HOP_LENGTHS: Final = frozenset(len(name) for name in _HOP)
REPLAY_LIMIT: Final = 1024 * 1024  # a body larger than this is not kept for a retry
# A request head (its line and fields) larger than this is answered 431, a response head
# 502: httptools keeps a field whole until it ends, and the relay the head, so nothing
# else bounds them.
HEAD_LIMIT: Final = 64 * 1024
_SLASH: Final = ord("/")  # an int: mypyc compares a byte of the target without a slice
_READ: Final = 65536
_BODY_QUEUE: Final = 16  # chunks read ahead of the backend before the client is paused
CONNECT_TIMEOUT: Final = 5.0
# SO_LINGER on, for 0 s: close() then resets the connection. transport.abort() alone sends
# a FIN, under asyncio's loop and uvloop's alike.
_LINGER_0: Final = struct.pack("ii", 1, 0)


class Refused(Exception):
    """Raised in a parser callback: the request is answered `answer`, and the connection
    closes after it (httptools raises its own error, with this one as its context)."""

    def __init__(self, status: int, why: bytes) -> None:
        super().__init__(why.decode())
        self.answer = _reply_bytes(status, why)


class BackendFailed(Exception):
    def __init__(self, why: str, request_sent: bool, response_started: bool) -> None:
        super().__init__(why)
        self.request_sent, self.response_started = request_sent, response_started


class Body:
    """A request body on its way: chunks the client connection puts, the relay takes.

    `on_flow` is called when it becomes `full` (more than _BODY_QUEUE chunks wait: the
    client connection pauses reading) and when it stops being full (it reads on)."""

    __slots__ = ("_chunks", "_waiter", "discarding", "ended", "on_flow", "reset")

    def __init__(self, on_flow: Callable[[], None] | None = None) -> None:
        self._chunks: list[bytes] = []  # a few at most: popping the front is cheap
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.discarding = False  # the relay is done with it: the rest is read and dropped
        self.on_flow = on_flow
        self.reset = False  # it ended with the client's reset, not its close

    @property
    def full(self) -> bool:
        return len(self._chunks) > _BODY_QUEUE

    def put(self, chunk: bytes) -> None:
        if not self.discarding:
            self._chunks.append(chunk)
            self._wake()
            if len(self._chunks) == _BODY_QUEUE + 1 and self.on_flow is not None:
                self.on_flow()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def discard(self) -> None:
        full = self.full
        self.discarding = True
        self._chunks.clear()
        if full and self.on_flow is not None:
            self.on_flow()

    def take(self) -> bytes | None:
        """The next chunk if one is in, without waiting."""
        if not self._chunks:
            return None
        chunk = self._chunks.pop(0)
        if len(self._chunks) == _BODY_QUEUE and self.on_flow is not None:
            self.on_flow()
        return chunk

    async def get(self) -> bytes | None:
        """The next chunk; None at the end; ConnectionResetError at an end by reset."""
        while not self._chunks and not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.reset and not self._chunks:
            raise ConnectionResetError("the client reset the connection")
        return self.take()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    __slots__ = ("began", "body", "headers", "http10", "keep_alive", "method", "replay",
                 "replay_size", "responded", "trailing", "upgrade", "url")

    def __init__(self, on_flow: Callable[[], None] | None = None) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b"GET"
        self.keep_alive = True
        self.http10 = False  # an HTTP/1.0 request: its response never goes chunked
        self.upgrade = False
        self.trailing = False  # the head is complete: header fields now are trailer fields
        self.body = Body(on_flow)
        self.replay: list[bytes] | None = []  # what was read so far, for a retry
        self.replay_size = 0
        self.responded = False  # some of a response went to the client: no retry then
        self.began = 0.0  # when its relay began, for the latency histogram

    def remember(self, chunk: bytes) -> None:
        if self.replay is None:
            return
        self.replay_size += len(chunk)
        if self.replay_size > REPLAY_LIMIT:
            self.replay = None
        else:
            self.replay.append(chunk)


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


class HttpClient(_Peer):
    """One client connection of an HTTP endpoint: its requests, relayed one after the other.

    The usual request (its body all in, an instance in rotation with an idle keep-alive
    connection) is relayed in callbacks alone: parsed here, written to the instance, its
    response relayed by `_Exchange` as it comes. Anything that has to wait (an instance to
    come into rotation, a connection to open, a body still arriving, a retry, an Upgrade)
    is relayed by a task, `_serve`; the connection goes on in callbacks after it.
    """

    def __init__(self, balancer: Balancer) -> None:
        super().__init__()
        self.balancer = balancer
        self.parser = httptools.HttpRequestParser(self)
        self.feed = self.parser.feed_data  # looked up once, not at every read
        self.ip = b"unix"
        self.current: Request | None = None  # the request being parsed
        self.pending: deque[Request] = deque()  # parsed heads waiting for their turn
        self.active: Request | None = None  # the request being relayed
        self.exchange: _Exchange | None = None  # its exchange with an instance, if any
        self.task: asyncio.Task[None] | None = None  # the slow path relaying it, if any
        self.ended = False  # no request will follow the parsed ones
        self.malformed: bytes | None = None  # the 4xx answer to send once those are answered
        self.unheaded = 0  # bytes read since a request's head, or its body, last moved on
        # Reads, and write buffers drained: by these the balancer's sweep tells silence.
        self.progress = 0
        self._progress_seen = 0
        self._silent = 0.0
        self.tunnel: Body | None = None  # after an Upgrade head: the bytes that follow
        self.reading_paused = False
        self.on_flow = self._flow  # one bound method for all its requests' bodies

    # The connection.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.ip = (peer[0] if isinstance(peer, tuple) else "unix").encode()
        self.transport.set_write_buffer_limits(high=4 * _READ)
        self.balancer.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.balancer.connections.discard(self)
        if exc is not None and self.tunnel is not None:
            self.tunnel.reset = True  # passed on as a reset, as in TCP mode
        self.close()

    def close(self) -> None:
        """Give up on the connection and whatever is in flight on it."""
        self.ended = True
        if self.exchange is not None:
            self.exchange.abort()
        if self.task is not None:
            self.task.cancel()
        for body in (self.current.body if self.current else None, self.tunnel):
            if body is not None:
                body.end()
        self.transport.close()

    def abort(self) -> None:
        """`close`, without waiting to hand over what is buffered: the client reads none."""
        self.close()
        self.transport.abort()

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.tunnel.end()  # passed on as a half close
        elif self.current is not None and not self.current.body.ended:
            self.close()  # a request cut short can never be relayed whole
        else:
            self.ended = True  # what was asked is still answered (a half-closing client)
            if self.active is None and not self.pending:
                self.transport.close()
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.exchange is not None:
            self.exchange.pause_backend()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.progress += 1
        if self.exchange is not None:
            self.exchange.resume_backend()

    def silent_for(self, step: float) -> float:
        """Seconds, counted in the sweep's `step`s, that the client has done nothing while
        the balancer waits on it: sent nothing between requests, or within one not all
        in; or read nothing of a response the balancer holds for it (each one it leaves
        unread holds an instance's connection, and a thread of a threaded server).
        Waiting on an instance, in a tunnel, or not reading (the instance takes a body
        slower than it comes), the silence is not the client's."""
        waiting = self._paused or (self.tunnel is None and not self.reading_paused and (
            self.active is None or not self.active.body.ended))
        if self.progress != self._progress_seen or not waiting:
            self._progress_seen, self._silent = self.progress, 0.0
        else:
            self._silent += step
        return self._silent

    def write(self, data: bytes) -> None:
        if not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    # Parsing.

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if self.tunnel is not None:
            self.tunnel.put(data)
        elif not self.ended:
            self.unheaded += len(data)
            try:
                self.feed(data)
            except httptools.HttpParserUpgrade as upgrade:
                # The head is queued; what follows it belongs to the tunnel.
                assert self.current is not None
                self.current.body.end()
                self.current = None
                self.tunnel = Body(self._flow)
                if rest := data[upgrade.args[0]:]:
                    self.tunnel.put(rest)
            except httptools.HttpParserError as exc:
                refused = exc.__context__
                self._malformed(refused.answer if isinstance(refused, Refused) else
                                _reply_bytes(400, f"malformed request: {exc}".encode()))
            if self.unheaded > HEAD_LIMIT and not self.ended:
                self._malformed(_reply_bytes(431, b"request head too large"))
            if self.active is None:
                self._next()

    # No on_message_begin (one callback less per request): a request begins with the first
    # piece of its URL, which every request line has.

    def on_url(self, url: bytes) -> None:
        request = self.current
        if request is None or request.body.ended:
            request = self.current = Request(self.on_flow)
        request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None
        # A chunked body's trailer is dropped: merged into the head, it could smuggle in
        # fields (a second Host, credentials) the head never had (RFC 9110, 6.5.1).
        if not request.trailing:
            request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        request.trailing = True
        self.unheaded = 0
        parser = self.parser
        request.method = parser.get_method()
        request.keep_alive = keep = bool(parser.should_keep_alive())
        # Asking the version costs more than the rest of this callback: only a request
        # that is not plainly 1.1 keep-alive asks (1.1 keeps alive unless it says close,
        # 1.0 only if it says keep-alive).
        headers = request.headers
        if not keep or _count(headers, b"Connection", b"connection"):
            request.http10 = parser.get_http_version() == "1.0"
            # Its framing is faulty by definition (RFC 9112, 6.1): no guess at the body.
            if request.http10 and _count(headers, b"Transfer-Encoding", b"transfer-encoding"):
                raise Refused(400, b"an HTTP/1.0 request has no Transfer-Encoding")
        # One Host, which HTTP/1.1 requires (RFC 9112, 3.2): the instance must not have to
        # guess which of two the client meant.
        hosts = _count(headers, b"Host", b"host")
        if hosts > 1 or (hosts == 0 and parser.get_http_version() != "1.0"):
            raise Refused(400, b"a request needs one Host field" if hosts == 0 else
                          b"a request may have one Host field, not several")
        if request.url[0] != _SLASH and request.url != b"*":  # not the usual origin-form
            _origin_form(request, hosts)
        request.upgrade = bool(parser.should_upgrade())
        self.pending.append(request)
        if len(self.pending) > _BODY_QUEUE:
            self._flow()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body.put(body)
        self.unheaded = 0

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.body.end()

    def _malformed(self, answer: bytes) -> None:
        """Answer what came before, then `answer` and close; a request it cut short is
        dropped."""
        self.ended, self.malformed = True, answer
        cut = self.current
        if cut is not None and not cut.body.ended:
            if cut in self.pending:
                self.pending.remove(cut)
            elif cut is self.active:  # its relay cannot complete: nothing more is answered
                self.close()
            cut.body.end()

    def _flow(self) -> None:
        """Read while what was read is being used: a body or a tunnel a little ahead of the
        instance, a few pipelined requests."""
        full = (len(self.pending) > _BODY_QUEUE
                or (self.current is not None and self.current.body.full)
                or (self.tunnel is not None and self.tunnel.full))
        if full != self.reading_paused and not self.transport.is_closing():
            self.reading_paused = full
            if full:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # Relaying.

    def _next(self) -> None:
        """Start relaying the next request; or, when none will come, end the connection."""
        if not self.pending:
            if self.malformed is not None:
                self.write(self.malformed)
                self.transport.close()
            elif self.ended:
                self.transport.close()
            return
        request = self.active = self.pending.popleft()
        if self.reading_paused:
            self._flow()
        request.began = time.monotonic()
        backend = None
        if not request.upgrade:
            backend = self.balancer.pick_now()
            if backend is not None and request.body.ended:
                connection = _idle(backend)
                if connection is not None:  # the fast path
                    backend.begin()
                    _Exchange(self, request, backend, connection, awaited=False).start()
                    return
        self.task = asyncio.get_running_loop().create_task(self._serve(request, backend))

    def _exchanged(self, exchange: _Exchange, outcome: bool | Exception) -> None:
        """The end of a fast-path exchange."""
        backend, request = exchange.backend, exchange.request
        backend.end()
        if outcome is True or outcome is False:
            _served(self.balancer, backend, request.began)
            self._finished(request, outcome)
        elif isinstance(outcome, BackendFailed):  # the slow path decides whether to retry
            self.task = asyncio.get_running_loop().create_task(
                self._serve(request, backend, outcome))
        else:  # the client left: nobody to answer, and the instance did nothing wrong
            self._finished(request, False)

    async def _serve(self, request: Request, backend: Backend | None,
                     failure: BackendFailed | None = None) -> None:
        keep = False
        try:
            if request.upgrade:
                await _tunnel(self, request)
            else:
                keep = await _forward(self, request, backend, failure)
        except (ConnectionError, OSError):
            pass
        finally:
            self.task = None
            self._finished(request, keep)

    def _finished(self, request: Request, keep: bool) -> None:
        self.active = None
        if not keep or self.lost:
            self.ended = True
            self.transport.close()
            return
        if not request.body.ended:  # the relay stopped early: the rest is read and dropped
            request.body.discard()
        self._next()


class _ResponseParser:
    """httptools callbacks for one response from a backend: interim (1xx) answers first,
    then the response itself; anything after it is only noted (`extra`)."""

    __slots__ = ("_interim_now", "chunks", "complete", "extra", "feed", "head_done", "headers",
                 "interim", "keep_alive", "parser", "reason", "unheaded")

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

    def reset(self) -> None:
        """Ready for the next response on the same connection (the parser and its
        callbacks refer to each other: one pair per connection, not per response)."""
        self.reason, self.headers = b"", []
        self.head_done = self.keep_alive = self.complete = self.extra = False
        self.unheaded = 0
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
        elif not self.head_done:  # a trailer field is dropped, as a request's is
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            self.extra = True
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim answer (100 Continue, ...)
            lines = [b"HTTP/1.1 %d %s" % (status, self.reason)]
            lines += [n + b": " + v for n, v in self.headers if n.lower() not in _HOP]
            self.interim.append(b"\r\n".join(lines) + b"\r\n\r\n")
            self.reason, self.headers, self._interim_now = b"", [], True
            return
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


class _Exchange:
    """One attempt at one request on one backend connection.

    `start` writes the request (what of its body is in; `pump` streams the rest); the
    response is relayed to the client in the connection's callbacks as it comes. Nothing
    reaches the client before the head and the first body bytes (or the end) are in: a
    backend that dies before that has still sent the client nothing, and the request may
    be tried elsewhere. The outcome (client may continue: bool, or BackendFailed, or
    ClientGone) goes to the future `done` (`awaited`: the slow path waits for it), or else
    straight to the client connection's `_exchanged` (the fast path).
    """

    __slots__ = ("backend", "backend_paused", "chunked", "client", "connection", "done",
                 "framing", "over", "request", "response", "sent", "started")

    def __init__(self, client: HttpClient, request: Request, backend: Backend,
                 connection: BackendConnection, awaited: bool) -> None:
        self.client, self.request, self.backend = client, request, backend
        self.connection = connection
        self.done: asyncio.Future[bool] | None = None
        if awaited:
            self.done = asyncio.get_running_loop().create_future()
        self.response = connection.parser()
        self.framing = b""
        self.chunked = False
        self.started = False  # the response's head went to the client
        self.sent = False  # all of the request went to the instance
        self.over = False
        self.backend_paused = False
        connection.exchange = client.exchange = self
        connection.uses += 1
        if client._paused:
            self.pause_backend()

    def start(self) -> None:
        """The head, what an earlier attempt sent of the body, and what of it is in now."""
        request = self.request
        head, self.chunked = _request_head(request, self.client.ip)
        parts = [head]
        if request.replay:
            parts += [_frame(done, self.chunked) for done in request.replay]
        while (chunk := request.body.take()) is not None:
            request.remember(chunk)
            parts.append(_frame(chunk, self.chunked))
        if request.body.ended:
            if self.chunked:
                parts.append(b"0\r\n\r\n")
            self.sent = True
        self.connection.send(b"".join(parts) if len(parts) > 1 else head)

    async def pump(self) -> None:
        """The rest of the body, as the client sends it."""
        request, connection = self.request, self.connection
        try:
            while (chunk := await request.body.get()) is not None:
                if self.over:
                    continue  # the exchange ended early: the rest is only read
                request.remember(chunk)
                connection.transport.write(_frame(chunk, self.chunked))
                await connection.drain()
            if not self.over:
                if self.chunked:
                    connection.transport.write(b"0\r\n\r\n")
                self.sent = True
        except (ConnectionError, OSError) as exc:
            self.fail(BackendFailed(str(exc) or type(exc).__name__, True, request.responded))

    def response_data(self, data: bytes) -> None:
        response, request = self.response, self.request
        try:
            response.feed(data)
        except httptools.HttpParserError as exc:
            if response.complete:  # what follows a complete response: it is not reused
                response.extra = True
            else:
                self.fail(BackendFailed(f"malformed response: {exc}", True, request.responded))
                return
        if not response.head_done:
            response.unheaded += len(data)
            if response.unheaded > HEAD_LIMIT:
                self.fail(BackendFailed("response head too large", True, request.responded))
                return
        out = response.interim
        finished = response.head_done and (response.complete or request.method == b"HEAD")
        if response.head_done and not self.started and (response.chunks or finished):
            self.framing = _head(response, request, out)
            self.started = True
        if self.started and response.chunks:
            if self.framing in (b"chunked", b"close"):
                out += [_frame(chunk, True) for chunk in response.chunks]
            else:
                out += response.chunks
            response.chunks.clear()
        if finished and self.framing in (b"chunked", b"close"):
            out.append(b"0\r\n\r\n")
        if out:
            if not self._to_client(out):
                return
            out.clear()
        if finished:
            keep = response.keep_alive and not response.extra and self.framing != b"close"
            self._end(keep and self.sent, request.keep_alive and self.framing != b"raw")

    def backend_closed(self, exc: Exception | None) -> None:
        """The instance closed the connection (exc: with an error)."""
        response, request = self.response, self.request
        if exc is None and response.head_done:
            status = response.parser.get_status_code()
            if _framing(response, request, status) == b"close":  # the close ends the body
                out = response.interim
                if not self.started:  # an empty body
                    self.framing = _head(response, request, out)
                if self.framing == b"close":
                    out.append(b"0\r\n\r\n")
                if self._to_client(out):
                    self._end(False, request.keep_alive and self.framing != b"raw")
                return
        why = (str(exc) or type(exc).__name__) if exc is not None else \
            "connection closed before the response ended"
        self.fail(BackendFailed(why, True, request.responded))

    def _to_client(self, out: list[bytes]) -> bool:
        self.request.responded = True
        client = self.client
        if client.lost or client.transport.is_closing():
            self.abort()
            return False
        client.send(b"".join(out) if len(out) > 1 else out[0])
        return True

    def pause_backend(self) -> None:
        if not self.backend_paused and not self.connection.lost:
            self.backend_paused = True
            self.connection.transport.pause_reading()

    def resume_backend(self) -> None:
        if self.backend_paused and not self.connection.lost:
            self.backend_paused = False
            self.connection.transport.resume_reading()

    def fail(self, failed: BackendFailed) -> None:
        self._end(False, failed)

    def abort(self) -> None:
        """The client is gone."""
        self._end(False, ClientGone())

    def _end(self, keep_backend: bool, outcome: bool | Exception) -> None:
        if self.over:
            return
        self.over = True
        connection, backend, client = self.connection, self.backend, self.client
        connection.exchange = None
        if client.exchange is self:
            client.exchange = None
        if keep_backend and backend.in_rotation and connection.usable:
            self.resume_backend()
            backend.idle.append(connection)
        else:
            connection.close()
        done = self.done
        if done is None:
            client._exchanged(self, outcome)
        elif not done.done():
            if isinstance(outcome, Exception):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)


class ClientGone(Exception):
    """The client went away while its response was being written."""


def _idle(backend: Backend) -> BackendConnection | None:
    """An idle keep-alive connection to `backend`, if one is still good."""
    while backend.idle:
        connection = backend.idle.pop()
        if connection.usable:
            return connection
        connection.close()
    return None


def _served(balancer: Balancer, backend: Backend, began: float) -> None:
    """Count a relayed request."""
    backend.served += 1
    balancer.latency.observe(time.monotonic() - began)


async def _forward(client: HttpClient, request: Request, backend: Backend | None = None,
                   failure: BackendFailed | None = None) -> bool:
    """Relay one request; True if the client connection may carry another.

    `backend`: the instance already picked for it, if any; with `failure`, what became of
    the first attempt there (made by the fast path)."""
    balancer = client.balancer
    tried: set[str] = set()
    retried = False  # a request the backend may have seen is tried again once at most
    endpoint = balancer.label
    failed: BackendFailed | None = None  # the last attempt's
    where: dict[str, object] = {}  # and how the log tells it
    deadline: float | None = None  # of the wait for an instance: one for all attempts
    while True:
        if failure is None:
            if backend is None:
                if deadline is None:
                    deadline = balancer.deadline()
                backend = await balancer.pick(tried, deadline)
            # A retry with nowhere else to go; but when the controller stops, the next
            # try, after the Retry-After, is the one to make.
            if backend is None and failed is not None and not balancer.stopping:
                metrics.ERRORS.labels(endpoint, "502").inc()
                log.warning("backend_failed", **where, detail="no other instance to try")
                await _reply(client, 502, b"the instance failed before it answered")
                return False
            if backend is None:
                metrics.ERRORS.labels(endpoint, "503").inc()
                if balancer.stopping:
                    await _reply(client, 503, b"the service is stopping", retry_after=True)
                    return False
                keep = request.keep_alive and request.body.ended
                await _reply(client, 503, b"no instance in rotation", True, close=not keep)
                return keep
            tried.add(backend.instance_id)
            backend.begin()
            try:
                keep = await _exchange(client, backend, request)
            except ClientGone:
                return False  # nobody to answer: no retry, and the instance did nothing wrong
            except BackendFailed as exc:
                failure = exc
            else:
                _served(balancer, backend, request.began)
                return keep
            finally:
                backend.end()
        assert backend is not None and failure is not None
        tried.add(backend.instance_id)
        failed, failure, instance, backend = failure, None, backend.instance_id, None
        where = {"instance": instance, "reason": str(failed),
                 "method": request.method.decode("latin-1"),
                 "url": request.url.decode("latin-1")[:200], "attempt": len(tried)}
        if failed.response_started:
            metrics.ERRORS.labels(endpoint, "cut").inc()
            log.warning("response_cut", **where)
            return False  # part of a response is out: only closing can tell the client
        if not failed.request_sent:  # nothing left the proxy: any other instance may
            metrics.ERRORS.labels(endpoint, "retry").inc()
            log.info("retry", **where)
            continue
        if not retried and request.method in IDEMPOTENT and request.replay is not None:
            retried = True
            metrics.ERRORS.labels(endpoint, "retry").inc()
            log.info("retry", **where)
            continue
        metrics.ERRORS.labels(endpoint, "502").inc()
        log.warning("backend_failed", **where)
        await _reply(client, 502, b"the instance failed before it answered")
        return False


async def _exchange(client: HttpClient, backend: Backend, request: Request) -> bool:
    connection = _idle(backend)
    if connection is None:
        try:
            connection = await BackendConnection.open(backend)
        except (OSError, TimeoutError) as exc:
            raise BackendFailed(f"connect: {exc}", False, False) from None
    if client.lost:
        connection.close()
        raise ClientGone
    # from here on, the backend may have seen (part of) the request
    exchange = _Exchange(client, request, backend, connection, awaited=True)
    assert exchange.done is not None
    try:
        exchange.start()
        if not exchange.sent:
            await exchange.pump()
        return await exchange.done
    except asyncio.CancelledError:
        exchange.abort()
        if exchange.done.done() and not exchange.done.cancelled():
            exchange.done.exception()  # retrieved: nobody is left to
        raise


async def _open(backend: Backend) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
    )


async def _tunnel(client: HttpClient, request: Request) -> None:
    """An Upgrade (WebSocket, ...): pass the head on; after a 101, relay bytes both ways.
    The tunnel counts as in flight on its backend, so a drain waits for it."""
    backend = await client.balancer.pick()
    if backend is None:
        await _reply(client, 503, b"no instance in rotation", retry_after=True)
        return
    backend.begin()
    try:
        try:
            reader, writer = await _open(backend)
        except (OSError, TimeoutError):
            await _reply(client, 502, b"the instance refused the connection")
            return
        outbound: asyncio.Future[None] | None = None
        try:
            head, chunked = _request_head(request, client.ip, upgrade=True)
            writer.write(head)
            # httptools hands over all that follows an Upgrade's head as tunnel bytes, a
            # body too. With a body they go at once, so that the instance can read it and
            # answer; else only after a 101 (a client's early words could be lost on a
            # server that reads the head through a buffer of its own).
            if client.tunnel is not None and (chunked or _has_length(request)):
                outbound = asyncio.ensure_future(_pipe(client.tunnel.get, writer))
            response, rest, upgraded = _ResponseParser(), b"", False
            while not response.head_done:
                data = await reader.read(_READ)
                if not data:
                    await _reply(client, 502, b"the instance closed the connection")
                    return
                response.unheaded += len(data)
                if response.unheaded > HEAD_LIMIT:
                    await _reply(client, 502, b"the instance's response head is too large")
                    return
                try:
                    response.parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    rest, upgraded = data[upgrade.args[0]:], True
                except httptools.HttpParserError:
                    await _reply(client, 502, b"the instance sent a malformed response")
                    return
            status = response.parser.get_status_code()
            if status != 101 or client.tunnel is None:
                await _refused(client, reader, response, rest, upgraded)
                return
            lines = [b"HTTP/1.1 101 %s" % response.reason]
            lines += [n + b": " + v for n, v in response.headers]
            client.write(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
            outbound = outbound or asyncio.ensure_future(_pipe(client.tunnel.get, writer))
            await asyncio.gather(outbound, _tunnel_in(reader, client))
        finally:
            if outbound is not None and not outbound.done():
                outbound.cancel()
                await asyncio.gather(outbound, return_exceptions=True)
            if client.tunnel is not None and client.tunnel.reset:
                _reset(writer.transport)  # the client's reset ends the tunnel: passed on
            else:
                writer.close()
    finally:
        backend.end()


def _count(headers: list[tuple[bytes, bytes]], usual: bytes, lowered: bytes) -> int:
    """How many fields are named `usual`, in any case (`lowered`: the same, lower case).
    A loop, not sum() of a generator (an object per call), and the usual spelling tried
    before lowering: it runs for every request."""
    count = 0
    for name, _ in headers:
        if len(name) == len(usual) and (name == usual or name.lower() == lowered):
            count += 1
    return count


def _origin_form(request: Request, hosts: int) -> None:
    """An absolute-form target (`GET http://host/path`) is passed on in origin-form, with
    its authority as the Host: a server ignores the Host field then (RFC 9112, 3.2.2),
    so the instance must not see one that says otherwise."""
    if request.url[:7].lower() != b"http://" and request.url[:8].lower() != b"https://":
        raise Refused(400, b"a request target is a path or an http(s) URL")
    try:
        # Any: httptools gives None for a part the URL lacks, which its stub does not say
        url: Any = httptools.parse_url(request.url)
    except httptools.HttpParserInvalidURLError:
        raise Refused(400, b"malformed request target") from None
    if not url.host or url.userinfo:  # userinfo is an error in an http URI (RFC 9110, 4.2.4)
        raise Refused(400, b"malformed request target")
    request.url = (url.path or b"/") + (b"?" + url.query if url.query else b"")
    host = b"[%s]" % url.host if b":" in url.host else url.host  # IPv6, bracketed again
    authority = host + (b":%d" % url.port if url.port else b"")
    headers = request.headers
    if hosts:
        headers[:] = [(n, authority if n.lower() == b"host" else v) for n, v in headers]
    else:
        headers.append((b"Host", authority))


def _has_length(request: Request) -> bool:
    """A Content-Length other than 0."""
    return any(n.lower() == b"content-length" and v.strip() not in (b"", b"0")
               for n, v in request.headers)


async def _refused(client: HttpClient, reader: asyncio.StreamReader,
                   response: _ResponseParser, rest: bytes, upgraded: bool) -> None:
    """An instance's answer other than 101 to an Upgrade, body and all. The connection
    closes after it (it has become a tunnel on the client's side), so the close ends the
    body: no framing to rewrite."""
    status = response.parser.get_status_code()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason)]
    head += [b"%s: %s\r\n" % (n, v) for n, v in response.headers if n.lower() not in _HOP]
    client.write(b"".join(head) + b"Connection: close\r\n\r\n" + b"".join(response.chunks) + rest)
    response.chunks.clear()
    while not (response.complete or upgraded) and (data := await reader.read(_READ)):
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserError:
            break  # what came is out; the close tells the client it is all there is
        client.write(b"".join(response.chunks))
        response.chunks.clear()
        await client.drain()


async def _tunnel_in(source: asyncio.StreamReader, client: HttpClient) -> None:
    try:
        while data := await source.read(_READ):
            client.write(data)
            await client.drain()
        if not client.lost and client.transport.can_write_eof():
            client.transport.write_eof()
    except (ConnectionError, OSError):
        _reset(client.transport)  # the instance's reset, passed on as one


def _request_head(request: Request, client_ip: bytes, upgrade: bool = False
                  ) -> tuple[bytes, bool]:
    """The head to send the instance, and whether the body goes chunked."""
    # mypyc builds each `%` of bytes in one allocation; the join copies a few pieces.
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method, request.url)]
    forwarded = coding = length = b""
    named: set[bytes] | None = None
    for name, value in request.headers:
        size = len(name)
        # 15: x-forwarded-for; x-forwarded-proto has transfer-encoding's 17
        if size in _HOP_LENGTHS or size == 15:
            lowered = name.lower()
            if lowered in _HOP:
                if lowered == b"transfer-encoding":
                    coding = b"%s, %s" % (coding, value) if coding else value
                elif lowered == b"content-length":
                    length = length or value
                elif lowered == b"connection":
                    named = _named(value, named)
                if not (upgrade and lowered in (b"upgrade", b"connection")):
                    continue
            elif lowered == b"x-forwarded-for":  # the hops so far, in their order
                forwarded = b"%s, %s" % (forwarded, value) if forwarded else value
                continue
            elif lowered == b"x-forwarded-proto":
                continue  # what the client spoke to the balancer, set below
        parts.append(b"%s: %s\r\n" % (name, value))
    if named:
        parts[1:] = _without(parts[1:], named)
    forwarded = b"%s, %s" % (forwarded, client_ip) if forwarded else client_ip
    chunked = bool(coding)
    if chunked:  # its codings kept, chunked last (httptools refuses a request otherwise)
        framing = b"Transfer-Encoding: %s\r\n" % coding
    elif length:
        framing = b"Content-Length: %s\r\n" % length
    else:
        framing = b""
    parts.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n%s%s\r\n"
                 % (forwarded, b"" if upgrade else b"Connection: keep-alive\r\n", framing))
    return b"".join(parts), chunked


# Connection options that name no other header field (or only a hop-by-hop one anyway).
_CONNECTION_OPTIONS: Final = {b"keep-alive", b"close", b"upgrade"}


def _named(connection: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """Add the header fields a Connection header names to `named`: they are hop-by-hop
    too, and go no further (RFC 9110, 7.6.1). None while it names none."""
    for token in connection.lower().split(b","):
        token = token.strip()
        if token and token not in _CONNECTION_OPTIONS:
            named = named or set()
            named.add(token)
    return named


def _without(lines: list[bytes], named: set[bytes]) -> list[bytes]:
    """The header lines ("name: value") of the fields not in `named`."""
    return [line for line in lines if line.split(b":", 1)[0].lower() not in named]


def _chunked_last(coding: bytes) -> bytes:
    """The Transfer-Encoding of a body that goes out chunked: the codings it came with
    (gzip, ...: the relay passes them on untouched), then chunked."""
    if not coding:
        return b"chunked"
    if coding.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
        return coding
    return coding + b", chunked"


def _frame(chunk: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk


def _framing(response: _ResponseParser, request: Request, status: int) -> bytes:
    """How the body reaches the client: its length, re-chunked, or none."""
    if request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return b"none"
    if any(n.lower() == b"content-length" for n, _ in response.headers):
        return b"length"
    if any(n.lower() == b"transfer-encoding" for n, _ in response.headers):
        return b"chunked"
    return b"close"  # read until the backend closes; the client gets it chunked


# b"HTTP/1.1 200 OK\r\n" by status, with its reason: a few statuses and reasons in practice.
_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}


def _head(response: _ResponseParser, request: Request, out: list[bytes]) -> bytes:
    """Append the response's head for the client to `out` (which the body joins, to go out
    in one write); its framing, as `_framing` says, but `raw` where an HTTP/1.0 client
    would get it chunked: the body as it comes, ended by closing the connection."""
    status: int = response.parser.get_status_code()
    reason = response.reason
    cached = _STATUS_LINES.get(status)
    if cached is not None and cached[0] == reason:
        line = cached[1]
    else:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = (reason, line)
    first = len(out)
    out.append(line)
    length = coding = b""
    named: set[bytes] | None = None
    for name, value in response.headers:
        if len(name) in _HOP_LENGTHS:
            lowered = name.lower()
            if lowered == b"content-length":
                length = length or value
                continue
            if lowered == b"transfer-encoding":
                coding = b"%s, %s" % (coding, value) if coding else value
                continue
            if lowered in _HOP:
                if lowered == b"connection":
                    named = _named(value, named)
                continue
        out.append(b"%s: %s\r\n" % (name, value))
    if named:
        out[first + 1:] = _without(out[first + 1:], named)
    connection = b"keep-alive" if request.keep_alive else b"close"
    if request.method == b"HEAD" or status == 204 or status == 304 or 100 <= status < 200:
        framing = b"none"
        if length and status >= 200 and status != 204:  # a HEAD's: what a GET would get
            out.append(b"Content-Length: %s\r\nConnection: %s\r\n\r\n" % (length, connection))
        else:
            out.append(b"Connection: %s\r\n\r\n" % connection)
    elif length:
        framing = b"length"
        out.append(b"Content-Length: %s\r\nConnection: %s\r\n\r\n" % (length, connection))
    elif request.http10:  # no chunked coding for HTTP/1.0: closing ends the body
        framing = b"raw"
        out.append(b"Connection: close\r\n\r\n")
    else:  # chunked, or read until the backend closes: the client gets it chunked
        framing = b"chunked" if coding else b"close"
        out.append(b"Transfer-Encoding: %s\r\nConnection: %s\r\n\r\n"
                   % (_chunked_last(coding), connection))
    return framing


def _reply_bytes(status: int, text: bytes, retry_after: bool = False, close: bool = True
                 ) -> bytes:
    """The balancer's own answer; `close`: the connection closes after it, and says so
    (RFC 9112, 9.6)."""
    reasons = {400: b"Bad Request", 431: b"Request Header Fields Too Large",
               501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable"}
    extra = (b"Retry-After: 1\r\n" if retry_after else b"") + (
        b"Connection: close\r\n" if close else b"")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reasons.get(status, b"Error"), len(text), extra, text))


async def _reply(client: HttpClient, status: int, text: bytes, retry_after: bool = False,
                 close: bool = True) -> None:
    client.write(_reply_bytes(status, text, retry_after, close))
    with contextlib.suppress(ConnectionError):
        await client.drain()


async def serve_tcp(
    balancer: Balancer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Connection-level balancing: one backend connection per client connection."""
    tried: set[str] = set()
    early = b""  # what the client sent while it waited for an instance
    failed = ""  # the last instance that refused, and how: for the log
    where: dict[str, object] = {}
    deadline: float | None = None  # of the wait for an instance: one for all attempts
    try:
        while True:
            backend = balancer.pick_now(tried)
            if backend is None:
                if deadline is None:
                    deadline = balancer.deadline()
                backend, sent = await _queued(balancer, tried, deadline, reader, early)
                if sent is None:
                    return  # the client left while it waited: nothing to relay
                early = sent
            if backend is None:
                if failed:
                    metrics.ERRORS.labels(balancer.label, "502").inc()
                    log.warning("backend_failed", **where, detail="no other instance to try")
                else:
                    metrics.ERRORS.labels(balancer.label, "503").inc()
                return
            tried.add(backend.instance_id)
            try:
                upstream_reader, upstream = await _open(backend)
            except (OSError, TimeoutError) as exc:
                # Nothing was sent: another instance may take it.
                failed = f"connect: {exc}"
                where = {"instance": backend.instance_id, "reason": failed,
                         "attempt": len(tried)}
                metrics.ERRORS.labels(balancer.label, "retry").inc()
                log.info("retry", **where)
                continue
            backend.begin()
            backend.served += 1
            try:
                if early:
                    upstream.write(early)
                await asyncio.gather(_pipe(functools.partial(reader.read, _READ), upstream),
                                     _pipe(functools.partial(upstream_reader.read, _READ), writer))
            finally:
                backend.end()
                upstream.close()
            return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _queued(balancer: Balancer, tried: set[str], deadline: float,
                  reader: asyncio.StreamReader, early: bytes
                  ) -> tuple[Backend | None, bytes | None]:
    """`balancer.pick(tried, deadline)`, reading the client meanwhile: a client that resets, or
    closes before it sent anything, has left, and must not hold a descriptor in the
    queue to be relayed as an empty connection later. Its bytes: `early`, and what it
    sent while it waited (read up to _READ; beyond, the reader's own limit holds it
    back); None if it left."""
    picking = asyncio.ensure_future(balancer.pick(tried, deadline))
    reading: asyncio.Future[bytes] | None = None
    sent, size, ended = [early], len(early), False
    try:
        while True:
            if reading is not None and reading.done():
                data = reading.result()
                reading = None
                if not data and not size:
                    return None, None
                ended = not data  # it sent, then half closed: relayed, end and all
                sent.append(data)
                size += len(data)
            if picking.done():
                return picking.result(), b"".join(sent)
            if reading is None and not ended and size < _READ:
                reading = asyncio.ensure_future(reader.read(_READ))
            waits: set[asyncio.Future[Any]] = {picking}
            if reading is not None:
                waits.add(reading)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    except (ConnectionError, OSError):
        return None, None
    finally:
        # A read cancelled before it returned leaves its bytes in the reader.
        for waiting in (picking, reading):
            if waiting is not None and not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)


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
