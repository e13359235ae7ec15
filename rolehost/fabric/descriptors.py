"""The controller's file descriptors: the limit it runs under, and how it is shared.

Every client connection of a balancer costs the controller a descriptor, and one more for
its connection to an instance. So do the control API's connections, each health probe, and
each instance's pipes and process handle. Left unbounded, idle connections to a public
endpoint take the last descriptor, and then everything fails at once: probes (every
instance leaves rotation), the control API (`rolehost status` says the controller is
gone), new clients. So:

- at start the soft limit is raised to the hard one (systemd's default soft limit, 1024,
  is there for programs that use select(); the controller does not);
- a reserve is kept for the controller's own work (`reserve`), and what is left is shared
  among the endpoints' listeners (`listeners`: an endpoint with a `staging_port` has a
  second one while a staging deployment runs, and that deployment's instances count in
  the reserve, so that both slots fit the limit at once): each endpoint's
  `max_connections` defaults to its share (`default_max_connections`), and an explicit
  one larger than the share is warned about at start;
- a balancer at its `max_connections` stops accepting (rolehost/balancer/listener.py):
  new connections wait in the kernel's listen backlog, sized by `somaxconn`.
"""

from __future__ import annotations

import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from rolehost.definition import Definition

log = structlog.get_logger()

# The controller's own descriptors, whatever the instances: the control socket and a
# few of its connections, the metrics listener, logs, the event loop's own (epoll, its
# self-pipe, signal wake-ups), the history and the definition's watch.
RESERVE_BASE = 64
# Per instance: its host's stdin, stdout and stderr pipes, its control channel, its pidfd,
# its log file, a health probe per endpoint at a time, and a startup task's pipes.
RESERVE_PER_INSTANCE = 16
# Descriptors one client connection may cost: itself, and its connection to an instance
# (an HTTP keep-alive one, a TCP endpoint's, an Upgrade tunnel's).
PER_CONNECTION = 2
# A share below this is a limit too low to run on: the share is this still, and the start
# warns (an endpoint that takes 8 connections at a time is still an endpoint).
FLOOR = 8
# The default's ceiling, however high the limit: past some thousands of connections a
# single-threaded relay serves each one slowly, and each costs memory. HAProxy derives
# its default maxconn from the limit the same way, and caps it by memory.
CEILING = 10_000
# The exported systemd unit's LimitNOFILE, at least: room for the ceiling on a few
# endpoints (the unit sets the soft limit to it as well).
UNIT_LIMIT = 65_536
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True)
class Limit:
    """RLIMIT_NOFILE as the controller found it (`before`) and as it runs (`soft`)."""

    before: int
    soft: int
    hard: int


def raise_limit() -> Limit:
    """Raise the soft descriptor limit to the hard one. RLIM_INFINITY (no hard limit) is
    taken as the kernel's own ceiling, fs.nr_open: setrlimit refuses more than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return Limit(soft, soft, hard)
        return Limit(soft, target, hard)
    return Limit(soft, soft, hard)


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1024 * 1024


def reserve(instances: int) -> int:
    """Descriptors kept for the controller's own work with `instances` instances."""
    return RESERVE_BASE + RESERVE_PER_INSTANCE * instances


def listeners(definition: Definition) -> int:
    """The listeners the definition's endpoints may have open at once: one each, and a
    second for each with a `staging_port`, a staging deployment's (fabric/slots.py)."""
    return sum(1 + (e.staging_port is not None)
               for role in definition.roles.values() for e in role.endpoints.values())


def instances(definition: Definition) -> int:
    """The instances the definition may run at once: twice its count where a staging
    deployment may run beside production (an endpoint has a `staging_port`)."""
    count = sum(role.instances for role in definition.roles.values())
    staged = any(e.staging_port is not None
                 for role in definition.roles.values() for e in role.endpoints.values())
    return 2 * count if staged else count


def default_max_connections(soft: int, endpoints: int, instances: int) -> int:
    """Each listener's share of what the reserve leaves: the `max_connections` of an
    endpoint that sets none (`endpoints`: the listeners)."""
    if endpoints == 0:
        return FLOOR
    share = (soft - reserve(instances)) // (PER_CONNECTION * endpoints)
    return max(FLOOR, min(CEILING, share))


def needed(definition: Definition, default: int) -> int:
    """Descriptors the definition's endpoints and instances may need at once (both
    slots' where it has staging ports), each endpoint that sets no max_connections taken
    at `default`."""
    return reserve(instances(definition)) + PER_CONNECTION * sum(
        (e.max_connections or default) * (1 + (e.staging_port is not None))
        for role in definition.roles.values() for e in role.endpoints.values())


def unit_limit(definition: Definition) -> int:
    """LimitNOFILE for a systemd unit: UNIT_LIMIT, or what the definition needs with every
    default at the ceiling, if more."""
    return max(UNIT_LIMIT, needed(definition, CEILING))


def somaxconn() -> int:
    """The listen backlog: the kernel's own ceiling (net.core.somaxconn; 4096 since Linux
    5.4), which listen() would cut a larger one down to anyway. Connections beyond a
    balancer's max_connections wait there."""
    try:
        return max(1, int(SOMAXCONN.read_text()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


@dataclass(frozen=True)
class Budget:
    """How the controller shares its descriptors: what a balancer gets."""

    limit: Limit
    max_connections: int  # an endpoint's default
    backlog: int


def at_start(definition: Definition) -> Budget:
    """Raise the limit, share it among the definition's endpoints, and log how; warn when
    the explicit `max_connections` add up to more than the limit leaves them."""
    limit = raise_limit()
    endpoints, running = listeners(definition), instances(definition)
    share = default_max_connections(limit.soft, endpoints, running)
    budget = Budget(limit, share, somaxconn())
    if endpoints:  # the shares are the endpoints': a worker-only service has none to tell
        log.info("descriptor_limit", soft=limit.soft, was=limit.before, hard=limit.hard,
                 reserve=reserve(running), max_connections=share, backlog=budget.backlog,
                 listeners=endpoints)
    wanted = needed(definition, share)
    if endpoints and wanted > limit.soft:
        log.warning("descriptor_limit_low", soft=limit.soft, hard=limit.hard, needed=wanted,
                    detail="the endpoints' max_connections and the reserve need more "
                    "descriptors than the limit allows: raise the hard limit (LimitNOFILE "
                    "in a systemd unit, ulimit -Hn) or lower max_connections")
    return budget
