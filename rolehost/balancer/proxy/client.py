"""A client's side of the HTTP relay: its connection (`HttpClient`), the requests parsed
on it, and each request's body on its way to the instance."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import httptools

from rolehost.balancer.proxy.backend import _idle
from rolehost.balancer.proxy.exchange import BackendFailed, _Exchange, _forward, _served
from rolehost.balancer.proxy.heads import (
    HEAD_LIMIT,
    MAX_FIELDS,
    URL_LIMIT,
    Refused,
    _count,
    _origin_form,
    _reply_bytes,
)
from rolehost.balancer.proxy.peer import _Peer
from rolehost.balancer.proxy.streams import _READ
from rolehost.balancer.proxy.tunnel import _tunnel

if TYPE_CHECKING:
    from rolehost.balancer import Backend, Balancer


# Final: mypyc then reads these as statics, not from the module's dict on every use.
REPLAY_LIMIT: Final = 1024 * 1024  # a body larger than this is not kept for a retry
_SLASH: Final = ord("/")  # an int: mypyc compares a byte of the target without a slice
_BODY_QUEUE: Final = 16  # chunks read ahead of the backend before the client is paused


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
    __slots__ = ("began", "body", "fields", "head_size", "headers", "http10", "keep_alive",
                 "method", "replay", "replay_size", "responded", "trailing", "upgrade", "url")

    def __init__(self, on_flow: Callable[[], None] | None = None) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.fields = 0  # header and trailer fields parsed
        self.head_size = 0  # their names' and values' bytes
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
        self.proto = b"http" if balancer.tls is None else b"https"  # X-Forwarded-Proto
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
        self.accepted = 0.0  # the loop's time at connection_made
        # The head in progress when the sweep last looked, and for how long (`heading_for`).
        self._head_seen: tuple[Request | None, bool] | None = None
        self._heading = 0.0
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
        self.accepted = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.balancer.released(self)
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

    def heading_for(self, step: float) -> float:
        """Seconds, counted in the sweep's `step`s, that one request head has been on its
        way, however steadily its bytes come: a slowloris sends a byte now and then, and
        is never silent (nginx's client_header_timeout bounds a head's time the same
        way). A head is told from the next by the request its URL began; before any
        URL byte, by the one before it."""
        current = self.current
        in_head = self.unheaded > 0 and self.tunnel is None and (
            current is None or not current.trailing or current.body.ended)
        seen = (current, current is not None and current.body.ended) if in_head else None
        if seen is None or seen != self._head_seen:
            self._head_seen, self._heading = seen, 0.0
        else:
            self._heading += step
        return self._heading

    def reclaimable(self, now: float, after: float) -> bool:
        """Whether the connection holds a slot for nothing: no request in progress or
        partly read, and either silent for a step of the balancer's sweep or, having
        never sent a byte, open for `after` seconds (the balancer at max_connections
        closes these first: `Balancer.reclaim`)."""
        if self.active is not None or self.pending or self.unheaded or self.tunnel is not None:
            return False
        if self.current is not None and not self.current.body.ended:
            return False
        return self._silent > 0 or (self.progress == 0 and now - self.accepted >= after)

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
        if len(request.url) > URL_LIMIT:
            raise Refused(414, b"request target longer than %d bytes" % URL_LIMIT)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None
        request.fields += 1
        request.head_size += len(name) + len(value)
        if request.fields > MAX_FIELDS:
            raise Refused(431, b"more than %d header fields" % MAX_FIELDS)
        if request.head_size > HEAD_LIMIT:
            raise Refused(431, b"request head too large")
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
