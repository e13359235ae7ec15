"""TCP endpoints: connection-level balancing, one backend connection per client
connection, the client read while it waits in the queue for an instance."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any

import structlog

from rolehost.balancer.proxy.streams import _READ, _open, _pipe
from rolehost.observability import metrics

if TYPE_CHECKING:
    from rolehost.balancer import Backend, Balancer

log = structlog.get_logger()


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
