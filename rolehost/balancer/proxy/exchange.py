"""A request relayed to an instance: one attempt on one backend connection (the request
written, its response relayed to the client as it comes), and the attempts of one
request, with the retry when it is safe (an idempotent method, or nothing of it was
sent yet) and the 502 or 503 when none is left."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import httptools
import structlog

from rolehost.balancer.proxy.backend import BackendConnection, _idle
from rolehost.balancer.proxy.heads import (
    HEAD_LIMIT,
    BadResponse,
    _frame,
    _framing,
    _head,
    _reply,
    _request_head,
)
from rolehost.observability import metrics

if TYPE_CHECKING:
    from rolehost.balancer import Backend, Balancer
    from rolehost.balancer.proxy.client import HttpClient, Request

log = structlog.get_logger()


# Final: mypyc then reads these as statics, not from the module's dict on every use.
IDEMPOTENT: Final = {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}


class BackendFailed(Exception):
    def __init__(self, why: str, request_sent: bool, response_started: bool) -> None:
        super().__init__(why)
        self.request_sent, self.response_started = request_sent, response_started


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
        head, self.chunked = _request_head(request, self.client.ip, self.client.proto)
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
        # HttpParserUpgrade: a 101 after the complete response (one before it is refused)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if response.complete:  # what follows a complete response: it is not reused
                response.extra = True
            else:
                self.fail(_malformed(exc, request.responded))
                return
        if not response.head_done:
            response.unheaded += len(data)
            if response.unheaded > HEAD_LIMIT:
                self.fail(BackendFailed("response head too large", True, request.responded))
                return
        out = response.interim
        finished = response.head_done and (response.complete or request.method == b"HEAD")
        if response.head_done and not self.started and (response.chunks or finished):
            try:
                self.framing = _head(response, request, out)
            except BadResponse as bad:
                self.fail(BackendFailed(str(bad), True, request.responded))
                return
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
                    try:
                        self.framing = _head(response, request, out)
                    # not `exc`: an except's name is deleted after it (mypyc's build fails)
                    except BadResponse as bad:
                        self.fail(BackendFailed(str(bad), True, request.responded))
                        return
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


def _malformed(exc: Exception, responded: bool) -> BackendFailed:
    """What httptools' error on a response says: the relay's own reason when one of the
    parser's callbacks refused the head."""
    refused = exc.__context__
    if isinstance(refused, BadResponse):
        return BackendFailed(str(refused), True, responded)
    return BackendFailed(f"malformed response: {exc}", True, responded)


class ClientGone(Exception):
    """The client went away while its response was being written."""


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
