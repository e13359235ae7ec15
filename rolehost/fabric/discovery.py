"""Discovery: each host's view of the service's instances (`RoleEnvironment.roles`).

A host's view joins two things. Which instances each role has is the topology, told
with `changing`/`changed` when a role scales, one update domain at a time
(`Instance.change_topology`). Where each instance listens and whether it is ready are
its record, which changes far more often (every boot, probe and drain) and is nobody's
to refuse: a record that changed is sent to every running host at once, in a `peers`
message, coalesced over one turn of the loop. A host raises `changed` for a record whose
endpoints moved (a port something else took while the instance was down), not for a
ready flag (docs/concepts.md#discovery).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from rolehost.observability import metrics

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

Record = dict[str, Any]


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
    """The deployment's instances and the record each was last sent with."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._sent: dict[str, Record] = {}
        self._due: set[str] = set()
        self._flush: asyncio.Handle | None = None

    def add(self, instance: Instance) -> None:
        self.instances[instance.id] = instance

    def remove(self, instance: Instance) -> None:
        self.instances.pop(instance.id, None)
        self._sent.pop(instance.id, None)
        self._due.discard(instance.id)

    def records(self) -> dict[str, Record]:
        """Every instance's record as of now: what a host starting now is given."""
        return {i.id: record(i) for i in self.instances.values()}

    def seen(self, instance: Instance) -> None:
        """`instance` changed (a state, back or not, a port): send its record if that
        changed, once this turn of the loop is over."""
        if instance.id not in self.instances:
            return
        now = record(instance)
        if self._sent.get(instance.id) == now:
            return
        self._sent[instance.id] = now
        self._due.add(instance.id)
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop, so no host running to be told (a scripted test)
                return
            self._flush = loop.call_soon(self._send)

    def _send(self) -> None:
        self._flush = None
        message = {"type": "peers", "instances": [self._sent[i] for i in sorted(self._due)]}
        self._due.clear()
        hosts = 0
        for instance in self.instances.values():
            process = instance.process
            if process is not None and process.running:
                process.send(message)
                hosts += 1
        metrics.DISCOVERY_MESSAGES.inc(hosts)
        metrics.DISCOVERY_RECORDS.inc(hosts * len(message["instances"]))
