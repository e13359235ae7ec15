"""An Upgrade request (WebSocket, ...): its head passed on, and after the instance's 101,
the bytes relayed both ways; any other answer relayed, and the connection closed."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httptools
import structlog

from rolehost.balancer.proxy.backend import _ResponseParser
from rolehost.balancer.proxy.heads import (
    _HOP,
    HEAD_LIMIT,
    BadResponse,
    _check_reason,
    _has_length,
    _reply,
    _request_head,
)
from rolehost.balancer.proxy.streams import _READ, _open, _pipe, _reset
from rolehost.observability import metrics

if TYPE_CHECKING:
    from rolehost.balancer import Backend
    from rolehost.balancer.proxy.client import HttpClient, Request

log = structlog.get_logger()


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
        except (OSError, TimeoutError) as exc:
            await _failed(client, request, backend, f"connect: {exc}",
                          b"the instance refused the connection")
            return
        outbound: asyncio.Future[None] | None = None
        try:
            head, chunked = _request_head(request, client.ip, client.proto, upgrade=True)
            writer.write(head)
            # httptools hands over all that follows an Upgrade's head as tunnel bytes, a
            # body too. With a body they go at once, so that the instance can read it and
            # answer; else only after a 101 (a client's early words could be lost on a
            # server that reads the head through a buffer of its own).
            if client.tunnel is not None and (chunked or _has_length(request)):
                outbound = asyncio.ensure_future(_pipe(client.tunnel.get, writer))
            response, rest, upgraded = _ResponseParser(), b"", False
            response.upgrading = True
            while not response.head_done:
                data = await reader.read(_READ)
                if not data:
                    await _failed(client, request, backend, "connection closed before the "
                                  "response ended", b"the instance closed the connection")
                    return
                response.unheaded += len(data)
                if response.unheaded > HEAD_LIMIT:
                    await _failed(client, request, backend, "response head too large",
                                  b"the instance's response head is too large")
                    return
                try:
                    response.parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    rest, upgraded = data[upgrade.args[0]:], True
                except httptools.HttpParserError as exc:
                    refused = exc.__context__
                    await _failed(client, request, backend, str(refused) if isinstance(
                        refused, BadResponse) else f"malformed response: {exc}",
                        b"the instance sent a malformed response")
                    return
            try:
                _check_reason(response.reason)
            except BadResponse as bad:
                await _failed(client, request, backend, str(bad),
                              b"the instance sent a malformed response")
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


async def _failed(client: HttpClient, request: Request, backend: Backend, why: str,
                  answer: bytes) -> None:
    """The instance's answer to an Upgrade cannot be relayed: a 502, counted and logged as
    the relay's other 502s are (not retried: the tunnel may have carried bytes already)."""
    metrics.ERRORS.labels(client.balancer.label, "502").inc()
    log.warning("backend_failed", instance=backend.instance_id, reason=why,
                method=request.method.decode("latin-1"),
                url=request.url.decode("latin-1")[:200], attempt=1)
    await _reply(client, 502, answer)


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
