"""A boot, carried out: the folders and the startup tasks (unless an agent update), a
standby host taken (in a cgroup of its own already) and assigned, then that host run
until it has exited. What each step means (the ready deadline, a failure, what follows
the boot) is the instance's lifecycle's; the end of a boot is `rolehost.fabric.stopping`'s.

These are the instance's own steps, in a room of their own: they drive its private
adapter (`Instance._set`, `_carry_out`, `_watch`...) as its supervisor does, and only it
calls them (`Instance._supervise`). The rooms around it: docs/design.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from rolehost.fabric import ports, probe
from rolehost.fabric.disks import Maintenance, apply
from rolehost.fabric.lifecycle import State
from rolehost.fabric.stopping import unless
from rolehost.fabric.tasks import TaskFailed, Tasks
from rolehost.fabric.variables import context, host_environment, task_environment
from rolehost.observability import metrics
from rolehost.processes.process import describe_exit

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance

log = structlog.get_logger()


async def run_boot(instance: Instance, kind: Maintenance, reason: str) -> None:
    """Folders and tasks (unless an agent update), then one host until it has exited."""
    instance.recycle_asked = asyncio.Event()
    instance.life.boot_begins(time.time())
    instance.starts += 1
    metrics.STARTS.labels(instance.role_name, kind.value).inc()
    instance._set(State.BOOTSTRAPPING, reason)
    log.info("boot", instance=instance.id, kind=kind.value, cause=reason)
    try:
        if await _bootstrap(instance, kind):
            await _run_host(instance)
    finally:
        instance.timers.cancel_all()


async def _bootstrap(instance: Instance, kind: Maintenance) -> bool:
    """Prepare the folders, run the tasks, assign a host. False: the boot ends here."""
    try:
        ports.reclaim(instance)  # before the tasks: they see the ports too
        # An agent update restarts the host of a boot whose tasks are done; a boot
        # cut short in its tasks starts over, tasks and all.
        rerun = kind.reruns_tasks or instance.tasks is None or instance.tasks.ended or \
            not instance.tasks.done
        if rerun:
            await instance._end_boot()
        # The deadline counts from here: the last boot's foreground tasks, which its
        # end waits for, are not this boot's.
        instance._carry_out(instance.life.ready_deadline_begins(time.time()))
        if instance.life.failed_reason is not None:
            return False
        if rerun:
            instance.boot += 1
            await asyncio.to_thread(apply, kind, instance.disks, instance.role,
                                    instance.deployment.run_dir)
            instance.measure()
            instance.tasks = Tasks(instance.id, instance.role, instance.disks,
                                   task_environment(instance, instance.boot_token),
                                   instance.output.write, instance.user)
            # False if a stop or an operation interrupted the tasks first.
            if not await unless(instance.tasks.run(), instance._interrupt):
                return False
        if instance.life.failed_reason is not None:  # the deadline passed in the tasks
            return False
        instance.hosts += 1
        token = f"{instance.boot_token}:h{instance.hosts}"
        # In a cgroup of its own already, where there are cgroups (processes/cgroups.py).
        process = await instance.deployment.standby.take(instance.id)
        if instance.life.failed_reason is not None:  # while the host was coming
            process.kill()
            return False
        # The instance's only once assigned, in this same turn of the loop: a message
        # sent to it before `assign` (discovery's peers) would be a standby's `release`.
        instance.process = process
    except TaskFailed as failed:
        if instance.life.failed_reason is None:  # a missed deadline explains itself
            instance.life.last_error = instance.life.run_error = str(failed)
        return False
    except Exception as exc:  # a bootstrap that cannot happen recycles, like a failed task
        instance.life.last_error = instance.life.run_error = f"bootstrap failed: {exc}"
        log.error("bootstrap_failed", instance=instance.id, error=str(exc))
        return False
    instance.process.assign(vars(context(instance)), host_environment(instance, token),
                            str(instance.disks.app), token,
                            instance._on_message, instance.output.write,
                            instance.deployment.service.heartbeat_interval, instance.user,
                            instance.deployment.discovery.table())
    return True


async def _run_host(instance: Instance) -> None:
    assert instance.process is not None
    instance._carry_out(instance.life.host_started(instance.process.pid))
    instance.deployment.memory.watch(instance.process.pid, instance._memory_measured)
    probes = probe.watch_all(instance.id, {
        name: (endpoint.host, instance.ports[name], endpoint.probe)
        for name, endpoint in instance.role.endpoints.items()
        if endpoint.probe is not None and name in instance.balancers}, instance._probe_result)
    try:
        code = await instance._watch(instance.process)
    finally:
        for task in probes:
            task.cancel()
        instance.deployment.memory.forget(instance.process.pid)
        instance.memory = None
    instance._carry_out(instance.life.exited(instance.process.pid, code, describe_exit(code)))
