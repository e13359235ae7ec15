"""The built-in load balancer: one per input endpoint, gated by readiness.

An instance is in rotation only while its instance says so (`Instance.in_rotation`:
ready, probes passing, not draining); the balancer never decides that itself. When none
is in rotation a request waits up to `queue_timeout` for one, then gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

import structlog

from rolehost.balancer import listener
from rolehost.definition import Balance, Endpoint, Protocol
from rolehost.observability.metrics import SECONDS

if TYPE_CHECKING:
    from rolehost.balancer import proxy

log = structlog.get_logger()
SLOW_START_FLOOR = 0.05
# A connection that has sent nothing for this long may be closed to make room for a new
# one at max_connections (`Balancer.reclaim`): a client sends its request at once.
RECLAIM_AFTER = 1.0


_BOUNDS: Final = tuple(float(bound) for bound in SECONDS)


class Tally:
    """A latency histogram kept as plain counts (metrics.StateCollector reads it)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(SECONDS) + 1)  # the last one: over the largest bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # A scan from the smallest bound, not bisect: nearly every relayed request lands in
        # the first bucket, and bisect's generic comparisons cost 10x as much.
        i = 0
        for bound in _BOUNDS:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus' cumulative buckets: (le, observations <= le)."""
        total, cumulative = 0, []
        for bound, count in zip((*map(str, SECONDS), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return cumulative


def relay_build() -> str:
    """How the relay runs: "compiled" when setup.py's mypyc build is installed (the
    usual case), "interpreted" when it could not be (no C compiler). By the module that
    relays each request: the package's `__init__` only names what its modules hold."""
    from rolehost.balancer.proxy import client

    return "interpreted" if (client.__file__ or "").endswith(".py") else "compiled"


class Backend:
    """One instance behind one endpoint: its private address, rotation and load."""

    def __init__(self, instance_id: str, host: str, port: int) -> None:
        self.instance_id, self.host, self.port = instance_id, host, port
        self.in_rotation = False
        self.joined = 0.0  # loop time it last entered rotation: slow start weighs it
        self.why_out = "starting"
        self.active = 0  # requests (http) or connections (tcp) being served
        self.served = 0  # requests relayed whole (http), connections handed over (tcp)
        self.idle: list[proxy.BackendConnection] = []  # keep-alive connections to reuse
        self._quiet: asyncio.Event | None = None  # set when `active` drops to 0, if awaited

    def begin(self) -> None:
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if self.active == 0 and self._quiet is not None:
            self._quiet.set()
            self._quiet = None

    async def quiet(self) -> None:
        """Wait until nothing is in flight."""
        while self.active:
            if self._quiet is None:
                self._quiet = asyncio.Event()
            await self._quiet.wait()

    def close_idle(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()

    def snapshot(self) -> dict[str, Any]:
        return {"in_rotation": self.in_rotation, "why_out": None if self.in_rotation else
                self.why_out, "active": self.active, "served": self.served}


class Balancer:
    """Listens on one endpoint's public address and spreads its traffic."""

    def __init__(self, role: str, name: str, endpoint: Endpoint, max_connections: int = 1024,
                 backlog: int = 4096, slot: str = "production") -> None:
        """`max_connections`: the client connections it keeps open at most, whatever the
        endpoint says (the controller resolves its default: fabric/descriptors.py);
        `backlog`: where the connections beyond it wait; `slot`: whose listener it is
        (fabric/slots.py)."""
        self.role, self.name, self.endpoint, self.slot = role, name, endpoint, slot
        self.max_connections = endpoint.max_connections or max_connections
        self.backlog = backlog
        # Read on every pick: kept as plain attributes, not looked up on the model each time.
        self._least_outstanding = endpoint.balance is Balance.least_outstanding
        self._slow_start = endpoint.slow_start
        self.backends: dict[str, Backend] = {}
        # The endpoint, as logs and metrics name it; the staging slot's listener apart.
        self.label = f"{role}.{name}" + ("" if slot == "production" else f"@{slot}")
        self.latency = Tally()  # seconds to relay a request
        self._turn = 0  # round-robin's position
        self._ready: list[Backend] | None = None  # in rotation; None: to be listed again
        self._rotation_changed = asyncio.Event()
        self._listener: listener.Listener | None = None
        self._sweep: asyncio.Task[None] | None = None
        # The controller is stopping: nothing new is accepted, and nothing waits for an
        # instance (each is leaving rotation for good).
        self.stopping = False
        # Client connections: tasks (tcp) and proxy.HttpClient protocols (http).
        self.connections: set[asyncio.Task[None] | proxy.HttpClient] = set()
        # https: the server context the listener terminates TLS with (balancer/tls.py).
        self.tls: ssl.SSLContext | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.endpoint.host, self.endpoint.port

    def add(self, instance_id: str, port: int) -> Backend:
        backend = Backend(instance_id, self.endpoint.host, port)
        self.backends[instance_id] = backend
        self._ready = None
        return backend

    def remove(self, instance_id: str) -> None:
        backend = self.backends.pop(instance_id)
        backend.close_idle()
        self._ready = None
        self._rotation_changed.set()
        self._rotation_changed = asyncio.Event()

    def set_rotation(self, instance_id: str, in_rotation: bool, why_out: str) -> None:
        backend = self.backends[instance_id]
        backend.why_out = why_out
        if backend.in_rotation == in_rotation:
            return
        backend.in_rotation = in_rotation
        self._ready = None
        backend.joined = asyncio.get_running_loop().time()
        if not in_rotation:
            backend.close_idle()  # idle keep-alive connections go; busy ones finish first
        log.info("rotation", instance=instance_id, endpoint=self.label,
                 in_rotation=in_rotation, reason=None if in_rotation else why_out)
        self._rotation_changed.set()
        self._rotation_changed = asyncio.Event()

    async def drain(self, instance_id: str, reason: str) -> bool:
        """Out of rotation, then wait for in-flight work; False if drain_timeout ran out."""
        backend = self.backends[instance_id]
        self.set_rotation(instance_id, False, f"draining: {reason}")
        if backend.active == 0:  # wait_for(..., 0) would time out before quiet() ran
            return True
        try:
            await asyncio.wait_for(backend.quiet(), self.endpoint.drain_timeout)
        except TimeoutError:
            log.warning("drain_timeout", instance=instance_id, active=backend.active,
                        endpoint=self.label)
            return False
        return True

    def exchange(self, other: Balancer) -> None:
        """The VIP swap: this listener and `other` take each other's instances, at once.
        The next request on either picks among its new ones; one in flight finishes on
        the instance it went to, which holds its own count of what it serves. Waiters
        for an instance in rotation look again."""
        self.backends, other.backends = other.backends, self.backends
        for balancer in (self, other):
            balancer._ready = None
            balancer._rotation_changed.set()
            balancer._rotation_changed = asyncio.Event()

    def pick_now(self, exclude: Collection[str] = ()) -> Backend | None:
        """A backend in rotation, or None if there is none right now."""
        ready = self._ready
        if ready is None:
            ready = self._ready = [b for b in self.backends.values() if b.in_rotation]
        if exclude:
            ready = [b for b in ready if b.instance_id not in exclude]
        if not ready:
            return None
        if self._slow_start > 0:
            now = asyncio.get_running_loop().time()
            weights = [self._weight(b, now) for b in ready]
            if min(weights) < 1.0:
                drawn = random.choices(ready, weights)[0]
                if not self._least_outstanding or self._weight(drawn, now) < 1.0:
                    return drawn
                # The draw first, then least-outstanding among the full-weight ones only: a
                # joining instance, which has the fewest in flight, would otherwise get
                # nearly every request from its first second.
                ready = [b for b, weight in zip(ready, weights, strict=True) if weight >= 1.0]
        if self._least_outstanding:
            least = min(b.active for b in ready)
            ready = [b for b in ready if b.active == least]
        self._turn += 1
        return ready[self._turn % len(ready)]

    def deadline(self) -> float:
        """The loop time a request that begins to wait now waits until (`pick`)."""
        return asyncio.get_running_loop().time() + self.endpoint.queue_timeout

    async def pick(self, exclude: Collection[str] = (), deadline: float | None = None
                   ) -> Backend | None:
        """A backend in rotation; wait until `deadline` (default: queue_timeout from now)
        for one. None: still none. A request tried again after an instance failed passes
        the deadline of its first wait: queue_timeout bounds its whole wait, not each
        attempt's (else N instances joining one after another and failing would hold it
        N x queue_timeout)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = self.deadline()
        while True:
            backend = self.pick_now(exclude)
            if backend is not None:
                return backend
            if self.stopping:
                return None
            if exclude and self.backends.keys() <= set(exclude):
                return None  # every instance was tried: waiting brings no other
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rotation_changed.wait(), remaining)

    def _weight(self, backend: Backend, now: float) -> float:
        """Slow start: a weight growing linearly from 0.05 to 1 over `slow_start` (the
        share it gives is weight / the sum of the weights: not linear)."""
        return min(1.0, max(SLOW_START_FLOOR, (now - backend.joined) / self._slow_start))

    async def start(self) -> None:
        """Listen; OSError if the address cannot be listened on."""
        from rolehost.balancer import proxy

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.connections.add(task)
            try:
                await proxy.serve_tcp(self, reader, writer)
            finally:
                self.released(task)

        def stream() -> asyncio.Protocol:  # what asyncio.start_server gives each connection
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(), connection)

        def http() -> asyncio.Protocol:  # protocols: see proxy.HttpClient
            return proxy.HttpClient(self)

        loop = asyncio.get_running_loop()
        if self.endpoint.protocol is Protocol.https:
            from rolehost.balancer import tls

            assert self.endpoint.certificate is not None and self.endpoint.key is not None
            self.tls = tls.server_context(self.endpoint.certificate, self.endpoint.key)
        sockets = listener.bind(self.endpoint.host, self.endpoint.port, self.backlog)
        self._listener = listener.Listener(
            sockets, stream if self.endpoint.protocol is Protocol.tcp else http, self.label,
            self.max_connections, self.reclaim, self.tls)
        self._listener.start()
        if self.endpoint.protocol is not Protocol.tcp and self.endpoint.idle_timeout > 0:
            self._sweep = loop.create_task(self._close_silent(self.endpoint.idle_timeout))
        log.info("balancer_listening", endpoint=self.label,
                 address=f"{self.endpoint.host}:{self.endpoint.port}",
                 protocol=self.endpoint.protocol.value, max_connections=self.max_connections,
                 backlog=self.backlog)

    def reclaim(self, most: int) -> int:
        """At max_connections, with clients waiting to be accepted: close up to `most`
        HTTP client connections that hold a slot for nothing (`HttpClient.reclaimable`:
        idle and silent, or never used), those accepted first first; how many. nginx
        closes idle keep-alive connections when it runs out of them, for the same
        reason: held idle, a thousand connections would otherwise keep every new
        client in the backlog. A TCP endpoint's connections are never idle to the
        balancer."""
        from rolehost.balancer import proxy

        now = asyncio.get_running_loop().time()
        idle = [c for c in self.connections
                if isinstance(c, proxy.HttpClient) and c.reclaimable(now, RECLAIM_AFTER)]
        idle.sort(key=lambda c: c.accepted)
        for client in idle[:most]:
            client.close()
        return min(most, len(idle))

    def released(self, connection: asyncio.Task[None] | proxy.HttpClient) -> None:
        """A client connection ended: one more may be accepted."""
        if connection in self.connections:
            self.connections.discard(connection)
            if self._listener is not None:
                self._listener.release()

    async def _close_silent(self, timeout: float) -> None:
        """Close the HTTP clients silent for `timeout` while the balancer waits on them, or
        sending one request head for as long, however steadily (a slow-loris holds a
        connection, and a descriptor, open forever otherwise), and the
        kept-alive connections to instances idle as long (a burst of traffic would leave
        them open for good, each a thread of a threaded server). Looked at four times
        per timeout, rather than a timer per request."""
        from rolehost.balancer import proxy

        step = timeout / 4
        while True:
            await asyncio.sleep(step)
            for client in list(self.connections):
                if isinstance(client, proxy.HttpClient) and (
                        client.silent_for(step) >= timeout or client.heading_for(step) >= timeout):
                    client.abort()
            for backend in self.backends.values():
                expired = [c for c in backend.idle if c.idle_for(step) >= timeout]
                for connection in expired:
                    backend.idle.remove(connection)
                    connection.close()

    def renew_certificate(self) -> None:
        """https: serve the certificate its files hold now, from the next handshake on;
        connections open keep theirs (tls.CertificateProblem: nothing changed)."""
        from rolehost.balancer import tls

        if self.tls is not None:
            assert self.endpoint.certificate is not None and self.endpoint.key is not None
            tls.renew(self.tls, self.endpoint.certificate, self.endpoint.key)
            log.info("certificate_renewed", endpoint=self.label,
                     certificate=str(self.endpoint.certificate))

    def stop_accepting(self) -> None:
        """The controller begins to stop: close the listener (a connection accepted now
        would only be dropped) and end every wait for an instance, so that a waiting
        request is answered 503 (a tcp connection closed) rather than dropped at `close`.
        Requests in flight go on: the instances drain them."""
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
        self._rotation_changed.set()
        self._rotation_changed = asyncio.Event()

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        if self._listener is not None:
            self._listener.close()
        tasks = []
        for connection in list(self.connections):
            if isinstance(connection, asyncio.Task):
                connection.cancel()
                tasks.append(connection)
            else:
                if connection.task is not None:
                    tasks.append(connection.task)
                connection.close()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await asyncio.sleep(0)  # closed connections are let go (connection_lost)
        for backend in self.backends.values():
            backend.close_idle()

    def snapshot(self) -> dict[str, Any]:
        return {
            "role": self.role, "endpoint": self.name, "slot": self.slot,
            "protocol": self.endpoint.protocol.value,
            "address": f"{self.endpoint.host}:{self.endpoint.port}",
            "in_rotation": sorted(b.instance_id for b in self.backends.values() if b.in_rotation),
            "connections": len(self.connections),
            "max_connections": self.max_connections,
        }
