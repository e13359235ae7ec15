"""An instance as its processes see it: the environment variables of its host and its
startup tasks (identity, folders, settings), and the `Context` its host is assigned."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rolehost import protocol
from rolehost.definition import resource_variable, setting_variables
from rolehost.definition.site import site_context
from rolehost.environment import Context
from rolehost.fabric.tasks import task_path
from rolehost.processes import ownership

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance


def variables(instance: Instance) -> dict[str, str]:
    """The instance's identity, folders and settings, as its processes see them."""
    i, disks = instance, instance.disks
    found = {
        "ROLEHOST_RUN_DIR": str(i.deployment.run_dir),
        # Whose processes these are: a sweep leaves a live controller's alone.
        ownership.CONTROLLER_ENV: i.deployment.owner,
        "ROLEHOST_ROLE": i.role_name,
        "ROLEHOST_INSTANCE_ID": i.id,
        "ROLEHOST_INDEX": str(i.index),
        "ROLEHOST_UPDATE_DOMAIN": str(i.update_domain),
        "ROLEHOST_DEPLOYMENT_ID": i.deployment.id,
        "ROLEHOST_OS_DIR": str(disks.os),
        "ROLEHOST_APP_DIR": str(disks.app),
        "TMPDIR": str(disks.tmp),
    }
    for name in i.role.local_resources:
        found[resource_variable(name)] = str(disks.resource(name))
    return found | setting_variables(i.role.values)


def task_environment(instance: Instance, token: str) -> dict[str, str]:
    """A startup task's whole environment: the controller's, and the instance's."""
    return {**os.environ, **variables(instance), "PATH": task_path(),
            protocol.TOKEN_ENV: token}


def host_environment(instance: Instance, token: str) -> dict[str, str]:
    """What a host is assigned on top of the environment it was started with."""
    environment = variables(instance) | {"PATH": task_path(), protocol.TOKEN_ENV: token}
    if (user := instance.user) is not None:  # its role's (processes/identities.py)
        environment |= user.environment(instance.disks.os)
    return environment


def context(instance: Instance) -> Context:
    """The `Context` a host is assigned: what `RoleEnvironment` tells the role."""
    i, role = instance, instance.role
    return Context(
        instance_id=i.id,
        role=i.role_name,
        index=i.index,
        update_domain=i.update_domain,
        deployment_id=i.deployment.id,
        entry_point=role.entry_class,
        app_dir=str(i.disks.app),
        os_dir=str(i.disks.os),
        stop_timeout=role.stop_timeout,
        status_check_interval=role.status_check_interval,
        settings=role.values,
        endpoints=addresses(i),
        resources={
            name: {"path": str(i.disks.resource(name)), "size_mb": spec.size_mb}
            for name, spec in role.local_resources.items()
        },
        topology=i.topology,
        site=site_context(role.site, role.endpoints),
    )


def addresses(instance: Instance) -> dict[str, dict[str, Any]]:
    """Where each endpoint of the instance listens, input, internal and instance: what it
    binds, and what the other instances are told (discovery)."""
    return {name: {"host": instance.endpoint_host or host, "port": instance.ports[name],
                   "protocol": protocol}
            for name, (host, protocol) in instance.role.addresses().items()}
