"""A balancer's listening sockets, which stop accepting at the endpoint's max_connections.

HAProxy's `maxconn`, not asyncio's `create_server`: asyncio's server accepts whatever the
backlog holds, up to the last descriptor; once the process has none left, every probe,
every control API call and every instance's restart fails with it (EMFILE). Here a
balancer with `limit` connections open accepts no more: new connections wait in the
kernel's listen backlog (`somaxconn`; beyond it the kernel drops their SYNs, and the
clients try again). When one waits there, the balancer closes connections that hold a
slot for nothing (`Balancer.reclaim`: idle, or never used, oldest first, as nginx closes
idle keep-alive connections when it runs out), so that a thousand idle connections do
not keep every new client waiting; with none to close, it looks again every
RECLAIM_EVERY seconds, and accepts as soon as any connection closes. Out of descriptors
all the same (another process's share of the system's, say: ENFILE), it tries again a
little later. Either limit, reached, is logged (`connection_limit`,
`descriptors_exhausted`: at most once per LOG_EVERY seconds, with how many times since)
and counted (`rolehost_limits_reached`).

Not compiled with the relay (setup.py compiles balancer/__init__.py and the proxy
package): it runs once per connection, not per request.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections.abc import Callable

import structlog

from rolehost.observability import metrics

log = structlog.get_logger()
# Out of descriptors: the errors accept() fails with while the process, the system or
# the kernel's memory for sockets has none to give.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
HANDSHAKE_TIMEOUT = 10.0  # https: a handshake not done in this long is given up
RETRY_AFTER = 0.1  # seconds before accepting again after running out of descriptors
LOG_EVERY = 10.0  # seconds between two log lines of one limit of one endpoint
BATCH = 64  # connections accepted per wake-up at most: the loop's other work goes on
RECLAIM = 16  # idle connections closed at most per wake-up at the limit (nginx: 32)
RECLAIM_EVERY = 1.0  # seconds between two looks for idle connections to close, at the limit


def bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to, as asyncio's create_server
    binds them (SO_REUSEADDR, IPv6 sockets IPv6 only); OSError if one cannot be."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                (i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts on `sockets` while fewer than `limit` connections are open; each accepted
    socket is handed to a transport and a protocol from `factory`. The balancer calls
    `release` as each one ends."""

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol],
                 label: str, limit: int, reclaim: Callable[[int], int] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        """`reclaim(n)`: close up to n connections that hold a slot for nothing; how many
        it closed (each calls `release` as it ends). `tls`: each connection's handshake
        comes first (an https endpoint), given up after HANDSHAKE_TIMEOUT."""
        self.tls = tls
        self.sockets, self.factory, self.label, self.limit = sockets, factory, label, limit
        self.reclaim = reclaim
        self.open = 0  # accepted and not yet released
        self.accepting = False
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._handovers: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # event: (last logged, count since)

    def start(self) -> None:
        if self.accepting or self.closed:
            return
        self.accepting = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop(self) -> None:
        if self.accepting:
            self.accepting = False
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())

    def release(self) -> None:
        """A connection ended: accept again if the limit held new ones back."""
        self.open -= 1
        if not self.accepting and self.open < self.limit and not self.closed:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self.start()

    def close(self) -> None:
        """Stop listening; connections being handed over are dropped."""
        self._stop()
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            sock.close()
        for task in self._handovers:
            task.cancel()

    def _accept(self, listening: socket.socket) -> None:
        if self.open >= self.limit:  # and a connection waits: make room, or look later
            self._stop()
            reclaimed = self.reclaim(RECLAIM) if self.reclaim is not None else 0
            if not reclaimed:
                self._retry = self._loop.call_later(RECLAIM_EVERY, self._retried)
            self._reached("connections", connection_limit=self.limit, reclaimed=reclaimed)
            return
        for _ in range(BATCH):
            if self.open >= self.limit:
                return  # if more wait, the socket is readable again at once
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    continue  # ECONNABORTED and the like: that client left; others wait
                self._stop()
                self._retry = self._loop.call_later(RETRY_AFTER, self._retried)
                self._reached("descriptors", error=exc.strerror, open=self.open)
                return
            self.open += 1
            sock.setblocking(False)
            # What asyncio's and uvloop's servers set on each connection: a response's
            # head and body, written apart, must not wait for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._hand_over(sock))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)

    def _retried(self) -> None:
        self._retry = None
        self.start()

    async def _hand_over(self, sock: socket.socket) -> None:
        # No protocol took it (cancelled at close, or the socket failed at once): it is
        # released here, as no connection_lost will.
        try:
            if self.tls is None:
                await self._loop.connect_accepted_socket(self.factory, sock)
            else:  # a failed or silent handshake is an OSError (TimeoutError) too
                await self._loop.connect_accepted_socket(
                    self.factory, sock, ssl=self.tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except OSError:
            sock.close()
            self.release()
        except asyncio.CancelledError:
            sock.close()
            self.release()
            raise

    def _reached(self, limit: str, **detail: object) -> None:
        metrics.LIMITS.labels(self.label, limit).inc()
        if limit == "descriptors":
            self._log("descriptors_exhausted", 1, detail="accepting again shortly", **detail)
            return
        reclaimed = detail.pop("reclaimed")
        assert isinstance(reclaimed, int)
        self._log("connection_limit", 1, **detail,
                  detail="new connections wait in the listen backlog until one closes")
        if reclaimed:
            self._log("connections_reclaimed", reclaimed, detail="idle connections closed "
                      "to make room for the ones waiting")

    def _log(self, event: str, count: int, **detail: object) -> None:
        """Log `event` at most once per LOG_EVERY seconds, with the `count` since."""
        now = time.monotonic()
        last, times = self._logged.get(event, (-LOG_EVERY, 0))
        times += count
        if now - last < LOG_EVERY:
            self._logged[event] = (last, times)
            return
        self._logged[event] = (now, 0)
        log.warning(event, endpoint=self.label, open=self.open, times=times, **detail)
