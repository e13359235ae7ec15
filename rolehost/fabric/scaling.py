"""A scale of one role in one slot: new instances at the next indexes, started as new
VMs; the highest ones stopped gracefully and deleted with their disks; and the topology
change offered to the others one update domain at a time. The controller checks the
count and holds the one-operation lock; this is what it then does."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rolehost.definition import Role
from rolehost.fabric.offers import discard, offer_by_domain, ready_or_not

if TYPE_CHECKING:
    from rolehost.fabric.controller import Controller
    from rolehost.fabric.slots import Deployed


async def scale(controller: Controller, d: Deployed, role_name: str, role: Role, count: int,
                cause: str) -> list[str]:
    """Scale `role_name` of deployment `d` to `count`; the ids of the instances added and
    removed, once the added ones are ready (or failed)."""
    ours = sorted((i for i in d.instances.values() if i.role_name == role_name),
                  key=lambda i: i.index)
    assert controller.history is not None
    record = controller.history.begin(f"scale {role_name}",
                                      d.recorded({"instances": count, "cause": cause}), [])
    role = role.model_copy(update={"instances": count})
    d.set_role(role_name, role)
    # The role as stored, not as one of its instances runs it: after a settings change
    # that halted, UD 0 runs settings the role does not have.
    added = [d.add_instance(role_name, role, index)
             for index in range(len(ours), count)]
    # A scale-out creates a new VM: folders an earlier instance of the index left (one
    # a controller ran before it was stopped) must not give it that one's disks.
    await asyncio.to_thread(discard, added)
    starting = not controller.stopping  # else stopped already, and never to start
    if starting:
        for instance in added:
            # Set once all are added: each lists the ones added after it too.
            instance.topology = d.topology()
            instance.start(f"scaled out: {cause}")
    removed = ours[count:]
    await asyncio.gather(*(i.stop(f"scaled in: {cause}") for i in removed))
    for instance in removed:
        for balancer in instance.balancers.values():
            balancer.remove(instance.id)
        instance.output.close()
        d.deployment.discovery.remove(instance)
        d.deployment.release_ports(instance.ports.values())
        del d.instances[instance.id]
        d.census.remove(instance.id)
    # A scale-in deletes the VM: its disks go with it (its log stays, as the
    # controller's record of it).
    await asyncio.to_thread(discard, removed)
    record.instances = [i.id for i in added + removed]
    topology = d.topology()
    others = [i for i in d.instances.values() if i not in added]
    if not record.instances:  # the count that runs: no one is told of a change there was not
        others = []
    for instance in others:  # what their next boot sees, whether a halt spares them
        instance.topology = topology
    # Like a settings change: a handler that cancels recycles its instance, so all of
    # them at once would take the role down.
    what = f"topology change of {role_name} (scaled to {count})"
    # Recorded, and answered, once the new instances are ready, as an operation on an
    # instance is: not while they may still fail.
    ready = asyncio.ensure_future(ready_or_not(added, starting))
    try:
        await offer_by_domain(controller.history, d.definition.service, what, others, {}, record,
                              lambda i: i.change_topology(topology, role_name, cause),
                              alongside=ready,
                              awaited=f"{', '.join(i.id for i in added)} to get ready")
    finally:
        ready.cancel()
    return record.instances
