"""Relaying traffic through a balancer: HTTP/1.1 per request, TCP per connection.

HTTP: httptools parses both sides; bodies stream through in chunks (re-framed, never
buffered whole); backend connections are kept alive and reused; a request whose backend
fails before any byte of the response came back is tried once more on another instance
when that is safe (an idempotent method, or nothing of it was sent yet). An Upgrade
request (WebSocket) becomes a tunnel once the instance answers 101.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
import structlog

from rolehost import metrics

if TYPE_CHECKING:
    from rolehost.balancer import Backend, Balancer

log = structlog.get_logger()

IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
# Hop-by-hop headers, and the framing headers the proxy writes itself.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
        b"transfer-encoding", b"content-length"}
REPLAY_LIMIT = 1024 * 1024  # a body larger than this is not kept for a retry
_READ = 65536
_BODY_QUEUE = 16  # chunks read ahead of the backend before the client is paused
CONNECT_TIMEOUT = 5.0


class BackendFailed(Exception):
    def __init__(self, why: str, request_sent: bool, response_started: bool) -> None:
        super().__init__(why)
        self.request_sent, self.response_started = request_sent, response_started


class Body:
    """A request body on its way: chunks the client parser puts, the relay gets."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._changed = asyncio.Event()
        self.ended = False

    def put(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._changed.set()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    async def get(self) -> bytes | None:
        while not self._chunks and not self.ended:
            self._changed.clear()
            await self._changed.wait()
        if self._chunks:
            chunk = self._chunks.popleft()
            self._changed.set()  # room for the reader
            return chunk
        return None

    async def room(self) -> None:
        while len(self._chunks) > _BODY_QUEUE:
            self._changed.clear()
            await self._changed.wait()


class Request:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.body = Body()
        self.replay: list[bytes] | None = []  # what was read so far, for a retry
        self.replay_size = 0
        self.tunnel_head = b""  # bytes after an Upgrade request's head: the tunnel's first
        self.responded = False  # some of a response went to the client: no retry then

    @property
    def chunked(self) -> bool:
        return any(k.lower() == b"transfer-encoding" for k, _ in self.headers)

    @property
    def length(self) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == b"content-length"), None)

    def remember(self, chunk: bytes) -> None:
        if self.replay is None:
            return
        self.replay_size += len(chunk)
        if self.replay_size > REPLAY_LIMIT:
            self.replay = None
        else:
            self.replay.append(chunk)


class _ClientParser:
    """httptools callbacks for requests from one client connection."""

    def __init__(self, requests: asyncio.Queue[Request | None]) -> None:
        self.requests = requests
        self.current: Request | None = None
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.current = Request()

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        request.method = self.parser.get_method().decode("ascii", "replace")
        request.version = self.parser.get_http_version()
        request.keep_alive = bool(self.parser.should_keep_alive())
        request.upgrade = bool(self.parser.should_upgrade())
        self.requests.put_nowait(request)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body.put(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.body.end()


class _ResponseParser:
    """httptools callbacks for one response from a backend."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False  # read at the head: httptools forgets it once complete
        self.complete = False
        self.chunks: list[bytes] = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class BackendConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, backend: Backend) -> BackendConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
        )
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


async def serve_http(
    balancer: Balancer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one client connection: its requests, one after the other."""
    requests: asyncio.Queue[Request | None] = asyncio.Queue()
    client = _ClientParser(requests)
    peer = writer.get_extra_info("peername")
    client_ip = peer[0] if isinstance(peer, tuple) else "unix"
    reading = asyncio.ensure_future(_read_client(reader, writer, client, requests))
    try:
        while (request := await requests.get()) is not None:
            if request.upgrade:
                await reading  # it stopped at the Upgrade head: the tunnel reads from here
                await _tunnel(balancer, request, reader, writer, client_ip)
                break
            if not await _forward(balancer, request, writer, client_ip):
                break
            await _discard(request.body)  # keep the stream in step if the relay stopped early
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _read_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    client: _ClientParser, requests: asyncio.Queue[Request | None],
) -> None:
    data = b""
    try:
        while data := await reader.read(_READ):
            client.parser.feed_data(data)
            if client.current is not None:
                await client.current.body.room()
    except httptools.HttpParserUpgrade as upgrade:
        # The head is queued; what follows it belongs to the tunnel, which reads on itself.
        assert client.current is not None
        client.current.tunnel_head = data[upgrade.args[0]:]
        client.current.body.end()
        return
    except httptools.HttpParserError as exc:
        await _reply(writer, 400, f"malformed request: {exc}".encode())
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        if client.current is not None and not client.current.body.ended:
            client.current.body.end()
        requests.put_nowait(None)


async def _forward(
    balancer: Balancer, request: Request, client: asyncio.StreamWriter, client_ip: str
) -> bool:
    """Relay one request; True if the client connection may carry another."""
    tried: set[str] = set()
    retried = False  # a request the backend may have seen is tried again once at most
    endpoint = f"{balancer.role}.{balancer.name}"
    began = time.monotonic()
    while True:
        backend = await balancer.pick(tried)
        if backend is None:
            metrics.ERRORS.labels(endpoint, "503").inc()
            await _reply(client, 503, b"no instance in rotation", retry_after=True)
            return request.keep_alive and request.body.ended
        tried.add(backend.instance_id)
        backend.begin()
        try:
            keep = await _exchange(backend, request, client, client_ip)
            metrics.REQUESTS.labels(endpoint, backend.instance_id).inc()
            metrics.LATENCY.labels(endpoint).observe(time.monotonic() - began)
            return keep
        except ClientGone:
            return False  # nobody to answer: no retry, and the instance did nothing wrong
        except BackendFailed as failed:
            where = {"instance": backend.instance_id, "reason": str(failed),
                     "method": request.method, "url": request.url.decode("latin-1")[:200],
                     "attempt": len(tried)}
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
        finally:
            backend.end()


async def _exchange(
    backend: Backend, request: Request, client: asyncio.StreamWriter, client_ip: str
) -> bool:
    connection = None
    while backend.idle and connection is None:
        candidate = backend.idle.pop()
        if candidate.usable:
            connection = candidate
        else:
            candidate.close()
    try:
        if connection is None:
            connection = await BackendConnection.open(backend)
    except (OSError, TimeoutError) as exc:
        raise BackendFailed(f"connect: {exc}", False, False) from None
    try:  # from here on, the backend may have seen (part of) the request
        await _send_request(connection, request, client_ip)
        keep_backend, keep_client = await _relay_response(connection, request, client)
    except (BackendFailed, ClientGone):
        connection.close()  # whatever it was in the middle of is of no use to anyone now
        raise
    except (OSError, asyncio.IncompleteReadError) as exc:
        connection.close()
        raise BackendFailed(str(exc) or type(exc).__name__, True, request.responded) from None
    if keep_backend and backend.in_rotation:
        backend.idle.append(connection)
    else:
        connection.close()
    return keep_client


async def _tunnel(
    balancer: Balancer, request: Request, reader: asyncio.StreamReader,
    client: asyncio.StreamWriter, client_ip: str,
) -> None:
    """An Upgrade (WebSocket, ...): pass the head on; after a 101, relay bytes both ways.
    The tunnel counts as in flight on its backend, so a drain waits for it."""
    backend = await balancer.pick()
    if backend is None:
        await _reply(client, 503, b"no instance in rotation", retry_after=True)
        return
    backend.begin()
    try:
        try:
            upstream = await BackendConnection.open(backend)
        except (OSError, TimeoutError):
            await _reply(client, 502, b"the instance refused the connection")
            return
        try:
            await _send_request(upstream, request, client_ip, upgrade=True)
            response, rest = _ResponseParser(), b""
            while not response.head_done:
                data = await upstream.reader.read(_READ)
                if not data:
                    await _reply(client, 502, b"the instance closed the connection")
                    return
                try:
                    response.parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    rest = data[upgrade.args[0]:]
            status = response.parser.get_status_code()
            head = [b"HTTP/1.1 %d %s" % (status, response.reason)]
            head += [n + b": " + v for n, v in response.headers]
            client.write(b"\r\n".join(head) + b"\r\n\r\n" + rest)
            if status != 101:  # refused: whatever body it had is not worth a framing guess
                return
            upstream.writer.write(request.tunnel_head)
            await asyncio.gather(_pipe(reader, upstream.writer), _pipe(upstream.reader, client))
        finally:
            upstream.close()
    finally:
        backend.end()


async def _send_request(
    connection: BackendConnection, request: Request, client_ip: str, upgrade: bool = False
) -> None:
    chunked = request.chunked
    lines = [f"{request.method} ".encode() + request.url + b" HTTP/1.1"]
    forwarded = client_ip.encode()
    for name, value in request.headers:
        lowered = name.lower()
        if lowered in _HOP and not (upgrade and lowered in (b"upgrade", b"connection")):
            continue
        if lowered == b"x-forwarded-for":
            forwarded = value + b", " + forwarded
            continue
        lines.append(name + b": " + value)
    lines += [b"X-Forwarded-For: " + forwarded, b"X-Forwarded-Proto: http"]
    if not upgrade:
        lines.append(b"Connection: keep-alive")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif request.length is not None:
        lines.append(b"Content-Length: " + request.length)
    writer = connection.writer
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    for done in list(request.replay or []):  # what an earlier attempt already read
        writer.write(_frame(done, chunked))
    while (chunk := await request.body.get()) is not None:
        request.remember(chunk)
        writer.write(_frame(chunk, chunked))
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()


def _frame(chunk: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk


async def _relay_response(
    connection: BackendConnection, request: Request, client: asyncio.StreamWriter
) -> tuple[bool, bool]:
    """Stream the response to the client: (backend reusable, client may continue).

    Nothing reaches the client before the head and the first body bytes (or the end)
    are in: a backend that dies before that has still sent the client nothing, and the
    request may be tried elsewhere. Each read from the backend is one write to the client.
    """
    response = _ResponseParser()
    framing = b""
    while True:
        data = await connection.reader.read(_READ)
        out = bytearray()
        if not data:
            status = response.parser.get_status_code() if response.head_done else 0
            if response.head_done and _framing(response, request, status) == b"close":
                if not request.responded:  # an empty body, delimited by the close itself
                    out += _head(response, status, b"close", request.keep_alive)
                out += b"0\r\n\r\n"
                await _to_client(client, request, bytes(out), drain=True)
                return False, request.keep_alive
            raise BackendFailed("connection closed before the response ended", True,
                                request.responded)
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise BackendFailed(f"malformed response: {exc}", True, request.responded) from None
        status = response.parser.get_status_code()
        if response.head_done and status == 100:  # an interim answer: pass it on, read on
            await _to_client(client, request, b"HTTP/1.1 100 Continue\r\n\r\n", drain=True)
            response = _ResponseParser()
            continue
        finished = response.complete or (response.head_done and request.method == "HEAD")
        if response.head_done and not request.responded and (response.chunks or finished):
            framing = _framing(response, request, status)
            out += _head(response, status, framing, request.keep_alive)
        if (request.responded or out) and response.chunks:
            rechunk = framing in (b"chunked", b"close")
            for chunk in response.chunks:
                out += _frame(chunk, rechunk)
            response.chunks.clear()
        if finished and framing in (b"chunked", b"close"):
            out += b"0\r\n\r\n"
        if out:
            await _to_client(client, request, bytes(out), drain=finished)
        if finished:
            return response.keep_alive and framing != b"close", request.keep_alive


class ClientGone(Exception):
    """The client went away while its response was being written."""


async def _to_client(
    client: asyncio.StreamWriter, request: Request, data: bytes, drain: bool
) -> None:
    request.responded = True
    if client.is_closing():
        raise ClientGone
    client.write(data)
    if drain or client.transport.get_write_buffer_size() > 4 * _READ:
        try:
            await client.drain()
        except (ConnectionError, OSError):
            raise ClientGone from None


def _framing(response: _ResponseParser, request: Request, status: int) -> bytes:
    """How the body reaches the client: its length, re-chunked, or none."""
    if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b"none"
    for name, value in response.headers:
        if name.lower() == b"content-length":
            return b"length:" + value
    if any(n.lower() == b"transfer-encoding" for n, _ in response.headers):
        return b"chunked"
    return b"close"  # read until the backend closes; the client gets it chunked


def _head(response: _ResponseParser, status: int, framing: bytes, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, response.reason or b"")]
    lines += [n + b": " + v for n, v in response.headers if n.lower() not in _HOP]
    if framing.startswith(b"length:"):
        lines.append(b"Content-Length: " + framing[7:])
    elif framing in (b"chunked", b"close"):
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _discard(body: Body) -> None:
    while await body.get() is not None:
        pass


async def _reply(
    writer: asyncio.StreamWriter, status: int, text: bytes, retry_after: bool = False
) -> None:
    reasons = {400: b"Bad Request", 501: b"Not Implemented", 502: b"Bad Gateway",
               503: b"Service Unavailable"}
    extra = b"Retry-After: 1\r\n" if retry_after else b""
    writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                 % (status, reasons.get(status, b"Error"), len(text), extra, text))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def serve_tcp(
    balancer: Balancer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Connection-level balancing: one backend connection per client connection."""
    tried: set[str] = set()
    try:
        while True:
            backend = await balancer.pick(tried)
            if backend is None:
                return
            tried.add(backend.instance_id)
            try:
                upstream = await BackendConnection.open(backend)
            except (OSError, TimeoutError):
                continue  # nothing was sent: another instance may take it
            backend.begin()
            metrics.REQUESTS.labels(f"{balancer.role}.{balancer.name}", backend.instance_id).inc()
            try:
                await asyncio.gather(_pipe(reader, upstream.writer), _pipe(upstream.reader, writer))
            finally:
                backend.end()
                upstream.close()
            return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(_READ):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
