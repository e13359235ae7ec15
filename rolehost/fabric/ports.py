"""Private ports: where each instance listens, behind its role's public endpoint.

An instance keeps its port through its restarts and reimages. So the port is chosen
below the kernel's ephemeral range: a port from that range is free when chosen, but
while the instance is down between two boots the kernel may hand it to any outgoing
connection on the machine (the balancer's own, a probe's, a client's) as its local port,
and the instance's next bind fails. Below the range only a listener can take a port: a
program started meanwhile, or another controller that chose the same one. Each boot
checks, and an instance whose port something else listens on gets another
(`reclaim`).

The ports the definition fixes (`fixed`: an external balancer's instance and readiness
ports, one per instance index, an instance endpoint's public ports, the listeners') are
never chosen, though none may be bound yet: an external instance's port cannot move, so
one given to another instance would fail whichever bound second, at run time. Where
they leave the range too few ports for the instances, the definition is refused
(`crowding`, exit 2).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from rolehost.definition import Definition, DefinitionError, Role
from rolehost.definition.scalars import parse_address

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

log = structlog.get_logger()

EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default; where the file is missing (macOS: 49152)
SPAN = 2768  # ports just below the range: 30000-32767 under Linux's default


def private_range(ephemeral: Path = EPHEMERAL) -> range:
    """The ports instances get: the SPAN ports just below the ephemeral range (never
    below 1024). Empty when the ephemeral range starts at 1025 or lower."""
    try:
        low = int(ephemeral.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = DEFAULT_EPHEMERAL_LOW
    return range(max(1024, low - SPAN), max(1024, low))


def instance_ports(role: Role, index: int, take: Callable[[str], int]) -> dict[str, int]:
    """Every port instance `index` of `role` binds, by endpoint name: a private one
    (`take(host)`) for each input and internal endpoint, and the `index`-th public port
    of each instance endpoint, which the instance binds itself (no balancer)."""
    # An external balancer's configuration names each instance's port: fixed by index.
    found = {name: ep.private_port(index) if ep.external else take(ep.host)
             for name, ep in role.endpoints.items()}
    found |= {name: take(ep.host) for name, ep in role.internal_endpoints.items()}
    return found | {name: ep.ports[index] for name, ep in role.instance_endpoints.items()}


def private(role: Role) -> dict[str, str]:
    """The endpoints whose port is private, chosen by rolehost (and changed if something
    else took it), by name, with the address they bind. Not an external balancer's: its
    configuration names the port, which does not move."""
    return {name: ep.host for kind in (role.endpoints, role.internal_endpoints)
            for name, ep in kind.items() if not getattr(ep, "external", False)}


def fixed(definition: Definition) -> dict[str, range]:
    """The ports the definition fixes, by key path: each input endpoint's (`port`,
    `staging_port`, and an external one's instance and readiness ports), each instance
    endpoint's public ports, the metrics'. None is ever chosen as a private port."""
    found = {}
    if definition.service.metrics:
        port = parse_address(definition.service.metrics)[1]
        found["service.metrics"] = range(port, port + 1)
    for role_name, role in definition.roles.items():
        for name, ep in role.endpoints.items():
            found |= {f"roles.{role_name}.endpoints.{name}.{key}": ports
                      for key, ports in ep.port_ranges().items()}
        found |= {f"roles.{role_name}.instance_endpoints.{name}.public_ports": ep.ports
                  for name, ep in role.instance_endpoints.items()}
    return found


def crowding(definition: Definition, file: Path | None = None,
             span: range | None = None) -> list[DefinitionError]:
    """The fixed ports that leave fewer ports of `span` (private_range()) than the
    instances' private ports need at start, if they do: the start could only fail."""
    span = private_range() if span is None else span
    needed = sum(role.instances * len(private(role)) for role in definition.roles.values())
    inside = {key: ports for key, ports in fixed(definition).items()
              if ports.start < span.stop and span.start < ports.stop}
    if not span or not needed or not inside:
        return []
    left = sum(1 for port in span if not any(port in ports for ports in inside.values()))
    if left >= needed:
        return []
    first, *others = sorted(inside)
    also = f" with {', '.join(others)}" if others else ""
    return [DefinitionError(file, first, (
        f"ports {inside[first].start}-{inside[first].stop - 1}{also} leave {left} of the "
        f"ports {span.start}-{span.stop - 1}, which instances' private ports are chosen "
        f"from, and the instances need {needed}: move them out of that range"))]


def choose(host: str, taken: Collection[int], span: range | None = None,
           reserved: Sequence[range] = ()) -> int:
    """A port of `span` (private_range()) that nothing listens on and that is not in
    `taken` (the ports given to instances already, bound or not) nor in `reserved` (the
    ports the definition fixes), from a random start, so that controllers choosing at
    once rarely pick the same. Where the span is empty, any free port the kernel gives.
    OSError if every port of the span is in use."""
    span = private_range() if span is None else span
    if not span:
        return _bound(host, 0)
    start = random.randrange(len(span))
    for step in range(len(span)):
        port = span[(start + step) % len(span)]
        if port in taken or any(port in ports for ports in reserved):
            continue
        try:
            return _bound(host, port)
        except OSError:
            continue  # a listener has it
    raise OSError(f"no free private port in {span.start}-{span.stop - 1} on {host}")


def listened(host: str, port: int) -> bool:
    """Something listens on `port` (a connection lingering in TIME_WAIT does not count:
    the role's server can bind past it with SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def _bound(host: str, port: int) -> int:
    """Bind `port` (0: any), release it, return it. Without SO_REUSEADDR: a port with a
    connection lingering in TIME_WAIT is passed over, as a server that does not set it
    could not bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, port))
        return int(s.getsockname()[1])


def reclaim(instance: Instance) -> None:
    """Before the host starts: a private port that something else began to listen on
    while the instance was down is exchanged for a free one, and its balancer follows.
    Else the role could never bind it again, and would crash at every boot."""
    for name, host in private(instance.role).items():
        old = instance.ports[name]
        if not listened(host, old):
            continue
        new = instance.ports[name] = instance.deployment.take_port(host)
        instance.deployment.release_ports([old])
        if (balancer := instance.balancers.get(name)) is not None:
            backend = balancer.backends[instance.id]
            backend.port = new
            backend.close_idle()
        log.warning("port_moved", instance=instance.id, endpoint=name, old=old, new=new,
                    detail="something else listens on the old port")
        instance.deployment.discovery.seen(instance)  # the table a host starts with too
