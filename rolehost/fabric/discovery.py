"""Discovery: each host's view of the service's instances (`RoleEnvironment.roles`).

A host's view joins two things. Which instances each role has is the topology, told
with `changing`/`changed` when a role scales, one update domain at a time
(`Instance.change_topology`). Where each instance listens and whether it is ready are
its record, which changes far more often (every boot, probe and drain) and is nobody's
to refuse: a record that changed is sent to every running host in a `peers` message.

Each record that changes would otherwise be one write to each of the N hosts: over a
start, where every instance comes up once, N^2 writes. So records are sent in batches,
at most one per `interval`, an interval that grows with the hosts to write to
(PER_HOST each, MOST at most): a batch costs N writes, so the writes a second stay
at 1 / PER_HOST while N <= MOST / PER_HOST, and a start, whose length grows with N on
one machine, costs O(N) writes. A change after a quiet interval goes out at the end of
the loop's turn, as before; in a burst, a host sees a change at most `interval` (0.5 s
at most) late, and each batch carries every record's latest version, so the last
batch is the truth. The records due go before a topology change's `changing` and
`changed` (`flush`), so that its handlers see where the instances listen. A host raises
`changed` for a record whose endpoints moved (a port something else took while the
instance was down), not for a ready flag (docs/concepts.md#discovery).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from rolehost.observability import metrics

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

Record = dict[str, Any]

PER_HOST = 0.025  # s of interval per running host: 40 writes a second
MOST = 0.5  # s: the longest a record waits for its batch


def record(instance: Instance) -> Record:
    """What every instance is told of `instance`: its identity, where each of its
    endpoints listens, and whether it is back (ready, and in rotation on its input
    endpoints)."""
    return {
        "id": instance.id, "role": instance.role_name, "index": instance.index,
        "update_domain": instance.update_domain, "ready": instance.back,
        "endpoints": instance.addresses(),
    }


class Discovery:
    """The deployment's instances, the record each was last sent with, and the table
    every host starts with, encoded once per change.

    Each host's `assign` carries the whole table: rebuilt and serialised for each, a
    start of N would be N^2 records built and encoded on the loop. So each instance's
    record is kept, built and encoded when it is seen to change (`seen`), and the
    table's bytes are the join of those, kept until a record changes: a start of N
    builds and encodes O(N) records, and copies the bytes it sends. A record changes
    only through `seen`: every state and rotation change, and a port moved (ports.py).
    """

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._sent: dict[str, Record] = {}
        self._due: set[str] = set()
        # Added before any host was given a table (a start adds every instance, then
        # starts them): nobody holds a record of these to be told it changed, and every
        # host is given them as they are when it starts. The first table is the version
        # sent; without this, each one's first change would be written to every host.
        self._unknown: set[str] = set()
        self._tabled = False  # a host has been given a table
        # Each instance's record as of its last change, as JSON, and as the table's
        # `"id":{...}`; an instance not yet seen has none until a table needs it.
        self._current: dict[str, tuple[Record, bytes, bytes]] = {}
        self._table: bytes | None = None  # `{"id":{...},...}`, until a record changes
        self._flush: asyncio.Handle | None = None
        self._last = float("-inf")  # the loop's time of the last batch
        self._interval = 0.0  # before the next batch; set by each from its hosts

    def add(self, instance: Instance) -> None:
        if not self._tabled:
            self._unknown.add(instance.id)
        self.instances[instance.id] = instance
        self._table = None

    def remove(self, instance: Instance) -> None:
        self.instances.pop(instance.id, None)
        self._sent.pop(instance.id, None)
        self._due.discard(instance.id)
        self._unknown.discard(instance.id)
        self._current.pop(instance.id, None)
        self._table = None

    def table(self) -> bytes:
        """Every instance's record as of now, as the JSON object (by id) a host starting
        now is given (`assign`'s `peers`)."""
        if self._table is None:
            for id, instance in self.instances.items():
                if id not in self._current:  # added, not seen yet
                    self._update(instance, record(instance))
            self._table = b"{" + b",".join(
                self._current[id][2] for id in self.instances) + b"}"
        self._sent |= {id: self._current[id][0] for id in self._unknown}
        self._unknown.clear()
        self._tabled = True
        return self._table

    def _update(self, instance: Instance, now: Record) -> None:
        encoded = json.dumps(now, separators=(",", ":"), default=str).encode()
        entry = json.dumps(instance.id).encode() + b":" + encoded
        self._current[instance.id] = now, encoded, entry
        self._table = None
        metrics.DISCOVERY_ENCODED.inc()

    def seen(self, instance: Instance) -> None:
        """`instance` changed (a state, back or not, a port): send its record if that
        changed, in the next batch: once this turn of the loop is over, or once the
        interval since the last batch is."""
        if instance.id not in self.instances:
            return
        now = record(instance)
        current = self._current.get(instance.id)
        if current is None or current[0] != now:
            self._update(instance, now)
        if self._sent.get(instance.id) == now:
            return
        self._sent[instance.id] = now
        self._due.add(instance.id)
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop, so no host running to be told (a scripted test)
                return
            wait = self._last + self._interval - loop.time()
            self._flush = (loop.call_later(wait, self._send) if wait > 0
                           else loop.call_soon(self._send))

    def flush(self) -> None:
        """Send the records due now, not at the end of the interval: before a topology
        change, so that a `changed` handler finds the instances it is told of where
        they listen."""
        if self._flush is not None:
            self._flush.cancel()
            self._send()

    def _send(self) -> None:
        self._flush = None
        self._last = asyncio.get_running_loop().time()
        # Each due record as it was last seen, which is the version `_sent` holds; the
        # message is encoded once, whatever the hosts it goes to.
        due = [self._current[i][1] for i in sorted(self._due)]
        message = b'{"type":"peers","instances":[' + b",".join(due) + b"]}\n"
        self._due.clear()
        hosts = 0
        for instance in self.instances.values():
            process = instance.process
            if process is not None and process.running:
                process.write(message)
                hosts += 1
        self._interval = min(MOST, PER_HOST * hosts)
        metrics.DISCOVERY_MESSAGES.inc(hosts)
        metrics.DISCOVERY_RECORDS.inc(hosts * len(due))
