"""An instance as `status` and the control API show it: one JSON-able dict, read from
the instance and its lifecycle, its balancers, tasks and disks. Nothing here decides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rolehost.definition import Role
from rolehost.fabric.lifecycle import State
from rolehost.observability.logs import iso

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance


def snapshot(instance: Instance) -> dict[str, Any]:
    i, life = instance, instance.life
    process, ready = i.process, i.state is State.READY
    return {
        "id": i.id,
        "role": i.role_name,
        "index": i.index,
        "update_domain": i.update_domain,
        "state": i.state.value,
        "reason": i.reason,
        "state_since": iso(i.state_since),
        "pid": process.pid if process is not None and process.running else None,
        "memory_bytes": i.memory,
        "max_memory_bytes": i.role.max_memory_bytes,  # what memory_bytes recycles over
        "restarts": max(0, i.starts - 1),
        "attempt": life.backoff.failures,
        "next_try": iso(i.next_try),
        "last_error": i.last_error,
        "ready_since": iso(i.ready_since) if ready else None,
        "back": i.back,
        "back_since": iso(i.back_since) if i.back else None,
        # Ready but not back: why (not ready, the state and reason say why).
        "why_not_back": i.why_not_back() or None if ready else None,
        "operation": i.operation,
        "endpoints": {
            name: {**address, "kind": _kind(i.role, name), **endpoint_status(i, name)}
            for name, address in i.addresses().items()
        },
        "tasks": i.tasks.snapshot() if i.tasks is not None else [],
        "resources": {
            name: {"path": str(i.disks.resource(name)), "size_mb": spec.size_mb,
                   "used_mb": round(i.usage.used.get(name, 0.0), 3),
                   "over": i.usage.used.get(name, 0.0) > spec.size_mb}
            for name, spec in i.role.local_resources.items()
        },
        "dirs": {"root": str(i.disks.root), "app": str(i.disks.app),
                 "os": str(i.disks.os), "resources": str(i.disks.resources)},
        "log": str(i.output.path),
    }


def endpoint_status(instance: Instance, name: str) -> dict[str, Any]:
    """The balancer's view of the instance on endpoint `name`, and its probe's."""
    balancer = instance.balancers.get(name)
    if balancer is None:
        return {}
    status = balancer.backends[instance.id].snapshot()
    if (result := instance.life.probes.get(name)) is not None:
        spec = instance.role.endpoints[name].probe
        status["probe"] = {"healthy": result.healthy, "seen": result.seen,
                           "passes": result.passes,
                           "needed": spec.healthy if spec is not None else 1}
    return status


def _kind(role: Role, endpoint: str) -> str:
    """An endpoint's kind, as `status` shows it: input, internal or instance."""
    if endpoint in role.internal_endpoints:
        return "internal"
    return "instance" if endpoint in role.instance_endpoints else "input"
