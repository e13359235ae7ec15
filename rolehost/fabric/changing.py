"""A change offered to one running host, as the platform offers a configuration change:
the role's `changing` handlers may cancel it, and the instance then recycles to apply
it; otherwise it applies in place and the `changed` handlers run. One update domain at
a time across the service is `rolehost.fabric.offers`'s business; this is one instance's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from rolehost.definition import Role, setting_variables
from rolehost.fabric.disks import Maintenance
from rolehost.fabric.errors import OperationFailed
from rolehost.fabric.lifecycle import State

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

log = structlog.get_logger()
S = State
CHANGING_TIMEOUT = 30.0  # a host that does not answer `changing` is recycled to apply


async def change_settings(instance: Instance, role: Role, cause: str) -> str:
    """Offer `role`'s settings to the running host (see `offer`)."""
    old, new = instance.role.values, role.values
    changes = [{"name": k, "old": old.get(k), "new": new.get(k)}
               for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if not changes:
        return "unchanged"
    # The host's own environment follows; a removed setting's variable goes (None).
    environment = dict.fromkeys(setting_variables(old)) | setting_variables(new)
    return await offer(instance, {"changes": changes},
                       {"settings": role.values, "environment": environment}, role, cause)


async def change_topology(instance: Instance, topology: dict[str, list[str]], role: str,
                          cause: str) -> str:
    """Tell the host that `role`'s instances changed (see `offer`)."""
    instance.topology = topology
    return await offer(instance, {"topology_changed": [role]},
                       {"topology": topology, "topology_changed": [role]}, instance.role,
                       cause)


async def offer(instance: Instance, changing: dict[str, Any], changed: dict[str, Any],
                role: Role, cause: str) -> str:
    """`changing` handlers may cancel, and the instance recycles to apply the change;
    otherwise it applies now and `changed` is raised. Returns what happened: applied,
    recycled, or (no running host) at the next start."""
    while instance.state is S.STARTING:  # its host has the old values: offer once it is up
        await instance.changed()
    process = instance.process
    if process is None or not process.running or instance.state not in (S.READY, S.BUSY):
        instance.role = role
        return "applied at the next start"
    # Whatever the host answers, its instance's next boot runs the new role: if the host
    # dies in its handler, that boot is the recycle that applies the change.
    instance.role = role
    starts = instance.starts
    answer = instance.changing_answer = asyncio.get_running_loop().create_future()
    # The records due go first, here and before `changed`: a handler finds the instances
    # it is told of where they listen, not where they did up to a discovery interval ago.
    instance.deployment.discovery.flush()
    process.send({"type": "changing", **changing})
    try:
        await asyncio.wait({answer, process.exited}, timeout=CHANGING_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        instance.changing_answer = None
    exited = process.exited.done()
    # No answer: apply by recycling, which needs none.
    cancel = answer.result() if answer.done() else True
    log.info("changing", instance=instance.id, cause=cause, cancelled=cancel, exited=exited,
             changes=[c["name"] for c in changing.get("changes", [])]
             + [f"topology of {r}" for r in changing.get("topology_changed", [])])
    if exited:  # a recycle asked for now would be a second one
        return await _back_after_crash(instance, starts)
    if cancel:
        await instance.maintain(Maintenance.RECYCLE, f"change: {cause}", wait=True, role=role)
        return "recycled"
    instance.role = role
    instance.deployment.discovery.flush()
    process.send({"type": "changed", **changed})
    return "applied"


async def _back_after_crash(instance: Instance, starts: int) -> str:
    """Wait for the boot after a crash (the back-off, then one boot) to settle, as an
    operation is waited for: a change must not move on while the instance is down."""
    while not (instance.state in (S.FAILED, S.STOPPED)
               or (instance.starts > starts and instance.settled_back)):
        await instance.changed()
    if not instance.back:
        raise OperationFailed(
            f"{instance.id} did not become ready after its host exited in `changing`: it is "
            f"{instance.state.value} ({instance.reason or instance.last_error})")
    return "recycled (its host exited in `changing`)"
