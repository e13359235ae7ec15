"""An endpoint whose balancer is the user's (`balancer = "external"`): HAProxy, nginx, a
cloud load balancer. rolehost does not listen on the endpoint's port; it tells that
balancer which instances are in rotation, and drains an instance before it stops.

Each instance gets a readiness port of its own (`Endpoint.readiness_port_of`), not one
port with a path per instance: HAProxy's agent-check sends no path and is pointed at a
port per server (`agent-port`), and a cloud load balancer's probe and nginx's checks
likewise name a port per target. The port speaks two protocols, told apart by the first
line the client sends:

- HTTP (a line that begins with a method): 200 while the instance is in rotation, 503
  otherwise, with the reason in the body;
- anything else, or nothing within a moment: HAProxy's agent-check, one line
  (`up ready`, `drain`, `maint`, `down`, with `#reason`) and the connection closes. The
  exported configuration sends a line (`agent-send`), so no answer waits.

A drain (before a restart, walk, deploy, scale-in or stop) answers `drain`, waits until
the balancer has heard it (it asked again since; a balancer that never asked is none),
then until the instance's established connections are gone, up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from rolehost.balancer import Tally
from rolehost.definition import Endpoint

log = structlog.get_logger()

READ_TIMEOUT = 0.5  # an agent that sends nothing is answered after this
MAX_LINE = 8192  # bytes of a request line or header line; longer: hostile or broken
MAX_HEADERS = 100
DRAIN_POLL = 0.05  # seconds between two looks at the instance's connections
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
# /proc/net/tcp's states that are a connection in flight: ESTABLISHED, SYN_RECV.
IN_FLIGHT = {"01", "03"}
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"OPTIONS ", b"DELETE ", b"PATCH ")


def established(port: int, tables: tuple[Path, ...] = TCP_TABLES) -> int:
    """Connections in flight whose local port is `port` (the instance's side of each
    connection the balancer made to it). 0 where the tables are missing (not Linux): the
    drain then waits for the balancer to hear it only."""
    count = 0
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] in IN_FLIGHT and \
                    int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count


def agent_word(in_rotation: bool, why_out: str) -> str:
    """The agent-check answer for a rotation (without the reason)."""
    if in_rotation:
        return "up ready"
    if why_out.startswith(("draining", "busy", "probe failing")):
        return "drain"  # no new requests; those under way go on
    if why_out in ("failed", "stopped"):
        return "maint"  # down until someone acts
    return "down"


def printable(text: str) -> str:
    """A reason as one line of printable ASCII (it goes into an agent reply)."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in text)[:200]


class ExternalBackend:
    """One instance behind an external endpoint: its private port, rotation and
    readiness port."""

    def __init__(self, instance_id: str, host: str, port: int, readiness: int) -> None:
        self.instance_id, self.host, self.port = instance_id, host, port
        self.readiness = readiness
        self.in_rotation = False
        self.why_out = "starting"
        self.active = 0  # established connections, as last counted by a drain
        self.served = 0  # relayed: none here (the metrics read it as the pool's)
        self.asked = 0  # readiness answers given
        self.heard: asyncio.Event | None = None  # set at the next answer, if a drain awaits
        self.server: asyncio.AbstractServer | None = None

    def answered(self) -> None:
        self.asked += 1
        if self.heard is not None and not self.in_rotation:
            self.heard.set()

    def close_idle(self) -> None:
        """Nothing kept alive here: the external balancer keeps its own connections."""

    def snapshot(self) -> dict[str, Any]:
        return {"in_rotation": self.in_rotation, "why_out": None if self.in_rotation else
                self.why_out, "active": self.active, "served": self.served,
                "readiness": f"{self.host}:{self.readiness}", "readiness_answers": self.asked}


class ExternalBalancer:
    """The rotation of one external endpoint's instances, served on readiness ports.
    Offers what `Instance` and the controller use of `Balancer`."""

    def __init__(self, role: str, name: str, endpoint: Endpoint) -> None:
        self.role, self.name, self.endpoint = role, name, endpoint
        self.label = f"{role}.{name}"
        self.backends: dict[str, ExternalBackend] = {}
        self.latency = Tally()  # nothing is relayed: stays empty, as metrics read it
        self.connections: set[Any] = set()
        self.max_connections = 0  # no client connection is rolehost's here
        self.stopping = False
        self.started = False
        self._starting: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self.endpoint.readiness_host, self.endpoint.readiness_port_of(0)

    def add(self, instance_id: str, port: int) -> ExternalBackend:
        index = int(instance_id.rpartition("_IN_")[2])  # ids are ROLE_IN_INDEX (names.py)
        backend = ExternalBackend(instance_id, self.endpoint.readiness_host, port,
                                  self.endpoint.readiness_port_of(index))
        self.backends[instance_id] = backend
        if self.started:  # a scale-out: its readiness port opens now
            task = asyncio.get_running_loop().create_task(self._serve_logged(backend))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        return backend

    def remove(self, instance_id: str) -> None:
        backend = self.backends.pop(instance_id)
        if backend.server is not None:
            backend.server.close()

    def set_rotation(self, instance_id: str, in_rotation: bool, why_out: str) -> None:
        backend = self.backends[instance_id]
        backend.why_out = why_out
        if backend.in_rotation == in_rotation:
            return
        backend.in_rotation = in_rotation
        log.info("rotation", instance=instance_id, endpoint=self.label,
                 in_rotation=in_rotation, reason=None if in_rotation else why_out)

    async def drain(self, instance_id: str, reason: str) -> bool:
        """Answer `drain`; wait until the balancer heard it and the instance's connections
        ended. False if drain_timeout ran out first."""
        backend = self.backends[instance_id]
        self.set_rotation(instance_id, False, f"draining: {reason}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.endpoint.drain_timeout
        if backend.asked:  # a balancer asks: it must hear the drain before it counts
            backend.heard = asyncio.Event()
            try:
                await asyncio.wait_for(backend.heard.wait(), self.endpoint.drain_timeout)
            except TimeoutError:
                log.warning("drain_not_heard", instance=instance_id, endpoint=self.label)
                return False
            finally:
                backend.heard = None
        while (active := established(backend.port)) > 0:
            backend.active = active
            if loop.time() >= deadline:
                log.warning("drain_timeout", instance=instance_id, active=active,
                            endpoint=self.label)
                return False
            await asyncio.sleep(DRAIN_POLL)
        backend.active = 0
        return True

    async def start(self) -> None:
        """Open every instance's readiness port (OSError if one is in use)."""
        for backend in self.backends.values():
            await self._serve(backend)
        self.started = True
        log.info("readiness_listening", endpoint=self.label, host=self.endpoint.readiness_host,
                 ports=sorted(b.readiness for b in self.backends.values()))

    async def _serve(self, backend: ExternalBackend) -> None:
        backend.server = await asyncio.start_server(
            lambda r, w: self._answer(backend, r, w), backend.host, backend.readiness,
            reuse_address=True, limit=MAX_LINE)

    async def _serve_logged(self, backend: ExternalBackend) -> None:
        try:
            await self._serve(backend)
        except OSError as exc:
            log.error("readiness_port_unavailable", instance=backend.instance_id,
                      address=f"{backend.host}:{backend.readiness}", error=exc.strerror)

    async def _answer(self, backend: ExternalBackend, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            try:
                first = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except TimeoutError:
                first = b""  # an agent that sends nothing
            if first.startswith(HTTP_METHODS):
                await asyncio.wait_for(self._skip_headers(reader), READ_TIMEOUT * 4)
                writer.write(self._http(backend, head=first.startswith(b"HEAD ")))
            else:
                word = agent_word(backend.in_rotation, backend.why_out)
                why = "" if backend.in_rotation else f" #{printable(backend.why_out)}"
                writer.write(f"{word}{why}\n".encode())
            backend.answered()
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT * 4)
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a client that sends too much or too slowly gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _skip_headers(reader: asyncio.StreamReader) -> None:
        for _ in range(MAX_HEADERS):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                return
        raise ValueError("too many headers")

    @staticmethod
    def _http(backend: ExternalBackend, head: bool) -> bytes:
        if backend.in_rotation:
            status, body = "200 OK", "in rotation\n"
        else:
            status, body = "503 Service Unavailable", f"{printable(backend.why_out)}\n"
        data = body.encode()
        return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: "
                f"{len(data)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                ).encode() + (b"" if head else data)

    def stop_accepting(self) -> None:
        """The controller begins to stop: the readiness ports answer on, so that the
        balancer hears each instance drain."""
        self.stopping = True

    async def close(self) -> None:
        for task in list(self._starting):
            task.cancel()
        for backend in self.backends.values():
            if backend.server is not None:
                backend.server.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "role": self.role, "endpoint": self.name, "protocol": self.endpoint.protocol.value,
            "balancer": "external",
            "address": f"{self.endpoint.host}:{self.endpoint.port}",
            "in_rotation": sorted(b.instance_id for b in self.backends.values() if b.in_rotation),
            "connections": 0,
        }
