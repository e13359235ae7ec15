"""One instance's supervisor: the adapter that carries out its lifecycle's rules with
real processes, timers and balancers.

The decisions are `rolehost.fabric.lifecycle`'s: this module feeds it the events (a
boot, the host started, a message, its exit, a timer, a stop, a force) and carries out
the actions it returns (`_carry_out`), and sequences boot after boot (`_supervise`): a
boot's steps (the folders, the startup tasks, a standby host) are `booting`'s, its end's
(the drain, the tasks that outlive their host) `stopping`'s. Every state change happens
in `Instance._set`, checked against the lifecycle's table. The rooms: docs/design.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterable
from typing import Any

import structlog

from rolehost import protocol
from rolehost.balancer import Balancer
from rolehost.balancer.external import ExternalBalancer
from rolehost.definition import Endpoint, Role
from rolehost.fabric import booting, changing, ports
from rolehost.fabric.actions import (
    HOST,
    READY_DEADLINE,
    SILENT,
    STOP,
    TASKS,
    Action,
    Answer,
    Drain,
    Enter,
    Interrupt,
    Kill,
    Log,
    Rotate,
    Sample,
    Schedule,
    Send,
)
from rolehost.fabric.deployment import Deployment
from rolehost.fabric.disks import Disks, Maintenance
from rolehost.fabric.errors import Conflict, OperationFailed
from rolehost.fabric.lifecycle import (
    After,
    Backoff,
    Lifecycle,
    ProbeResult,
    ReadyDeadline,
    State,
    StopOutcome,
)
from rolehost.fabric.memory import Usage
from rolehost.fabric.names import instance_id
from rolehost.fabric.operation import Operation
from rolehost.fabric.snapshot import snapshot
from rolehost.fabric.stopping import drain, end_tasks
from rolehost.fabric.tasks import Tasks
from rolehost.fabric.timers import Timers
from rolehost.fabric.usage import CpuLoad, DiskUsage
from rolehost.fabric.variables import addresses
from rolehost.observability import metrics
from rolehost.observability.output import OutputLog
from rolehost.processes.hosts import HostProcess

log = structlog.get_logger()


S = State


class Instance:
    def __init__(self, deployment: Deployment, role_name: str, role: Role, index: int) -> None:
        self.deployment = deployment
        self.role_name, self.role, self.index = role_name, role, index
        self.id = instance_id(role_name, index)
        self.update_domain = index % deployment.service.upgrade_domains
        self.user = deployment.run_as.user_of(role_name)  # who its hosts and tasks run as
        self.disks = Disks(deployment.folder / "instances" / self.id, owner=self.user)
        self.ports = ports.instance_ports(role, index, deployment.take_port)
        self.endpoint_host: str | None = None  # where the role binds, if not the endpoint's
        self.output = OutputLog(deployment.folder / "logs" / f"{self.id}.log", self.id,
                                deployment.service.instance_log_format, deployment.console)
        self.topology: dict[str, list[str]] = {}  # every role's instance ids; the controller's

        service = deployment.service
        # The state and every rule that decides it (rolehost/fabric/lifecycle.py): read through
        # the properties below, changed only by `_set` and the events fed to it.
        self.life = Lifecycle(self.id, Backoff(service.backoff_initial, service.backoff_max,
                                               service.stable_after),
                              ReadyDeadline(service.ready_deadline), since=time.time(),
                              heartbeat=service.heartbeat_interval)
        self.process: HostProcess | None = None
        self.tasks: Tasks | None = None
        self.boot = 0  # boots: disks and tasks; an agent update restarts the host only
        self.hosts = 0  # host processes started
        self.starts = 0  # boots and host restarts, whatever their cause
        self.cpu = CpuLoad()
        self.memory: int | None = None  # bytes: the host's tree's RSS, last measured
        self.usage = DiskUsage(self.id)
        deployment.discovery.add(self)

        self.recycle_asked = asyncio.Event()  # the host asks to be stopped, then recycled
        # A stop cut short (a second signal): no drain, no on_stop, no wait for tasks.
        self._forced = asyncio.Event()
        self._operation: Operation | None = None
        self._interrupt = asyncio.Event()  # a stop or an operation wants the host down
        self._changed = asyncio.Event()  # set, and replaced, at every transition
        # This boot's: the ready deadline, silence (looked at twice, see Timers), the stop.
        self.timers = Timers(look_twice={SILENT})
        self._task: asyncio.Task[None] | None = None
        # By endpoint name; set by the controller.
        self.balancers: dict[str, Balancer | ExternalBalancer] = {}
        self.changing_answer: asyncio.Future[bool] | None = None  # a `changing` awaiting its answer

    # What the lifecycle holds, as the rest of rolehost reads it.

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def reason(self) -> str:
        return self.life.reason

    @property
    def state_since(self) -> float:
        return self.life.since

    @property
    def ready_since(self) -> float | None:
        return self.life.ready_since

    @property
    def back_since(self) -> float | None:
        return self.life.back_since

    @property
    def last_error(self) -> str | None:
        return self.life.last_error

    @property
    def last_traceback(self) -> str | None:
        return self.life.last_traceback

    @property
    def next_try(self) -> float | None:
        return self.life.next_try

    @property
    def stop_outcome(self) -> StopOutcome:
        """Stops that overran stop_timeout, and whether the final one was cut short."""
        return self.life.stop

    def _set(self, state: State, reason: str = "", force: bool = False) -> None:
        """The only place an instance changes state. `force` is for a supervisor's crash."""
        previous = self.state
        if not self.life.change(state, reason, time.time(), force):
            return
        if state is S.READY and self.ready_since == self.state_since:  # this boot's first
            metrics.TIME_TO_READY.labels(self.role_name).observe(
                self.state_since - self.life.boot_began)
        log.info("state", instance=self.id, state=state.value, previous=previous.value,
                 reason=reason or None, **self.deployment.placement.fields())
        self._update_rotation()
        self._changed_now()

    def _changed_now(self) -> None:
        """A new state, or the instance came back or left: wake its waiters, tell the
        observer, and settle an operation that this ends."""
        self._changed.set()
        self._changed = asyncio.Event()
        self.deployment.discovery.seen(self)
        if self.deployment.observer is not None:
            self.deployment.observer(self)
        operation = self._operation
        if operation is not None and self.life.ends_operation(operation.started):
            self._operation = None
            if not operation.done.done():  # cancelled: its waiter was (a walk cut short)
                operation.done.set_result(self.state)

    @property
    def back(self) -> bool:
        """Ready, and in rotation on every input endpoint it serves (an endpoint with
        `ignore_status` too: there, the probe alone decides). The one rule for "the
        instance is back" that walks, deploys, config changes, `--wait`, scale-outs, the
        harness and systemd's READY=1 wait for (docs/walks.md)."""
        return self.life.back

    @property
    def settled_back(self) -> bool:
        """Back, or ended otherwise (failed, recycling, stopped): an operation is over.
        Ready but not yet in rotation is not an end: the ready deadline decides that."""
        return self.life.settled

    # Supervision: one boot after another until stopped.

    def start(self, cause: str = "deployment started") -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(cause),
                                                            name=self.id)
        self._task.add_done_callback(self._supervisor_ended)

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        """A bug in supervision must show, and must not leave processes behind."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.critical("supervisor_crashed", instance=self.id, error=repr(error), exc_info=error)
        self.life.last_error = f"rolehost internal error: {error!r}"
        self._carry_out([Kill(TASKS), Kill(HOST)])
        self._set(S.FAILED, self.life.last_error, force=True)

    async def _supervise(self, cause: str) -> None:
        """One boot after another, each followed by what the lifecycle says follows it."""
        kind, reason = Maintenance.START, cause
        while True:
            await booting.run_boot(self, kind, reason)
            after = self.life.boot_over(time.time(), self._pending_operation)
            if after.what is After.STOP:
                await self._end_boot()
                self._set(S.STOPPED, after.reason)
                return
            if after.what is After.OPERATION:
                kind, reason = self._take_operation()
                continue
            # Out of rotation first: foreground tasks may hold the end of the boot up to
            # stop_timeout, and the host is gone already.
            self._carry_out(after.actions)
            await self._end_boot()
            if after.what is After.FAIL:
                await self._interrupt.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interrupt.wait(),
                                           max(0.0, (self.next_try or 0.0) - time.time()))
                self.life.next_try = None
            if self.life.stop_reason is not None:
                self._set(S.STOPPED, self.life.stop_reason)
                return
            kind, reason = (
                self._take_operation() if self._pending_operation
                else (Maintenance.RECYCLE, after.reason))

    # Rotation: derived from the state, the probes and a drain, never kept apart.

    def _served(self) -> dict[str, Endpoint]:
        """The endpoints the instance serves behind a balancer."""
        return {name: self.role.endpoints[name] for name in self.balancers}

    def _update_rotation(self) -> bool:
        """Tell the balancers; True if the instance came back or left with it."""
        for name, balancer in self.balancers.items():
            balancer.set_rotation(self.id, *self.life.rotation(name, self.role.endpoints[name]))
        if not self.life.update_back(self._served(), time.time()):
            return False
        self.deployment.discovery.seen(self)  # a forced drain's has no state change
        if self.life.back:  # its ready deadline is met
            self.timers.cancel(READY_DEADLINE)
        return True

    def why_not_back(self) -> str:
        """Why the instance is not back, as `status` says it ("" while it is)."""
        return self.life.why_not_back(self._served())

    def _probe_result(self, name: str, result: ProbeResult) -> None:
        if self.life.probed(name, result) and self._update_rotation():
            self._changed_now()

    async def settled(self) -> State:
        """Wait until the instance is back, or failed, recycling or stopped."""
        while not self.settled_back:
            await self._changed.wait()
        return self.state

    async def back_or_ended(self) -> bool:
        """Wait until this boot came back (True), or the instance failed or stopped
        (False). Unlike `settled`, a recycle is not an end: the boots up to back share one
        ready deadline, and missing it fails the instance."""
        while self.back_since is None and self.state not in (S.FAILED, S.STOPPED):
            await self._changed.wait()
        return self.back_since is not None

    @property
    def _pending_operation(self) -> bool:
        """An operation asked for and not yet begun (one under way is settled by `_set`)."""
        return self._operation is not None and not self._operation.started

    def _take_operation(self) -> tuple[Maintenance, str]:
        assert self._operation is not None
        self._interrupt.clear()
        self._operation.started = True
        self.life.operation_begins()
        if self._operation.role is not None:
            self.role = self._operation.role  # what the next boot deploys and runs
        return self._operation.kind, self._operation.name

    async def _watch(self, process: HostProcess) -> int:
        """Wait for the host to exit; if a stop or operation comes first, stop it gracefully."""
        interrupt: asyncio.Future[Any] = asyncio.ensure_future(self._interrupt.wait())
        asked: asyncio.Future[Any] = asyncio.ensure_future(self.recycle_asked.wait())
        exited: asyncio.Future[Any] = process.exited
        await asyncio.wait({exited, interrupt, asked}, return_when=asyncio.FIRST_COMPLETED)
        interrupt.cancel()
        asked.cancel()
        if process.running:
            operation = self._operation.name if self._operation else None
            for action in self.life.host_must_stop(operation):
                if not isinstance(action, Drain):
                    self._carry_out([action])
                    continue
                await self._drain(action.reason)
                self._carry_out(self.life.drained(action.reason, time.time(),
                                                  self.role.stop_timeout))
        return await process.exited

    async def _drain(self, reason: str) -> None:
        """Out of rotation first; let requests in flight finish (each endpoint's
        drain_timeout); only then is the host asked to stop."""
        if self._forced.is_set():  # out of rotation all the same
            self._update_rotation()
            return
        await drain(self.balancers.values(), self.id, reason, self._forced)

    async def _end_boot(self) -> None:
        """The boot is over: foreground tasks may hold it up to stop_timeout, then all goes."""
        tasks = self.tasks
        if tasks is None or tasks.ended:
            return
        # The stop's deadline, if one is under way; else (the host exited on its own) the
        # end of the boot is a stop that begins now.
        limit = self.role.stop_timeout
        left = self.life.stop_begins(time.time(), limit)
        overran = await end_tasks(tasks, self.id, self.boot_token, left, self._forced)
        self.life.stop_over()
        self._carry_out(self.life.tasks_overran([run.label for run in overran], limit))

    @property
    def boot_token(self) -> str:
        return f"{self.deployment.id}:{self.id}:{self.boot}"

    # What the host says, and the timers: events for the lifecycle.

    def _on_message(self, message: protocol.Message) -> None:
        self._carry_out(self.life.message(message))

    def _expired(self, timer: str) -> None:
        if timer == READY_DEADLINE:
            metrics.DEADLINE_MISSES.labels(self.role_name).inc()
            running = [r.label for r in self.tasks.runs if r.state == "running"] \
                if self.tasks is not None else []
            self._carry_out(self.life.deadline_missed(running, self._served()))
        elif timer == SILENT:
            self._carry_out(self.life.heartbeat_missed())
        elif timer == STOP and (process := self.process) is not None and process.running:
            # The one owner of stop_timeout (docs/design.md): the host has had all of it.
            self._carry_out(self.life.stop_overdue(process.pid, self.role.stop_timeout))

    def _memory_measured(self, usage: Usage) -> None:
        self.memory = size = usage.rss
        if self.process is not None:  # the pass read its CPU too: the load's sample
            self.cpu.record(self.process.pid, usage.cpu)
        if actions := self.life.memory_measured(size, self.role.max_memory_bytes,
                                                self.role.max_memory):
            metrics.MEMORY_RECYCLES.labels(self.role_name).inc()
            self._carry_out(actions)

    def sample_cpu(self, fresh_for: float = 0.0) -> float | None:
        """The host's CPU, % of one core, over about the last 30 s (None: unknown); a
        sample younger than `fresh_for` seconds is reused."""
        process = self.process
        return self.cpu.sample(process.pid if process is not None and process.running else None,
                               fresh_for)

    def measure(self) -> None:
        """Refresh local-resource usage off the loop; warn when one is over its size."""
        if not self.role.local_resources:  # nothing to measure: no worker thread's turn
            return
        self.usage.measure({name: (self.disks.resource(name), spec.size_mb)
                            for name, spec in self.role.local_resources.items()})

    # Carrying out what the lifecycle asks.

    def _carry_out(self, actions: Iterable[Action]) -> None:
        """Do what the lifecycle asked, in order. A Drain is awaited by `_watch`, whose
        stop it begins."""
        for action in actions:
            match action:
                case Enter(state, reason):
                    self._set(state, reason)
                case Send(message):
                    if self.process is not None:
                        self.process.send(message)
                case Kill(target) if target == TASKS:
                    if self.tasks is not None:
                        self.tasks.kill()
                case Kill():
                    if self.process is not None and self.process.running:
                        self.process.kill()
                case Schedule(timer, delay) if delay <= 0:
                    self.timers.cancel(timer)
                    self._expired(timer)
                case Schedule(timer, delay):
                    self.timers.schedule(timer, delay, functools.partial(self._expired, timer))
                case Rotate():
                    self._update_rotation()
                    self._changed_now()
                case Interrupt(recycle):
                    (self.recycle_asked if recycle else self._interrupt).set()
                case Sample():  # the CPU is sampled by the memory pass
                    if self.usage.due:
                        self.measure()
                case Answer(cancel):
                    if self.changing_answer is not None and not self.changing_answer.done():
                        self.changing_answer.set_result(cancel)
                case Log(level, event, fields):
                    getattr(log, level)(event, instance=self.id, **fields)

    # Operations.

    async def stop(self, reason: str) -> None:
        """Graceful stop: `stopping` handlers and on_stop within stop_timeout, then the tree."""
        self.request_stop(reason)
        if self._task is not None:
            await self._task

    def request_stop(self, reason: str) -> None:
        """Begin the stop without waiting for it (`stop` waits)."""
        self._carry_out(self.life.stop_asked(reason))

    def force_stop(self, reason: str) -> bool:
        """Cut the stop short (a second signal): what is left of the drain is skipped,
        the host's tree and this boot's tasks are killed now, and the end of the boot
        waits for no foreground task. The instance still ends stopped, its tree swept.
        A stop already under way keeps its reason. False if it was stopped already:
        there was nothing to cut short."""
        if self.state is S.STOPPED or (self._task is not None and self._task.done()):
            return False
        # The end of the boot may be waiting on its foreground tasks: they are killed
        # now. Before that end, it comes at once (the host is killed) and kills them
        # itself, as ended: a background task killed with its boot is stopped, not failed.
        actions = self.life.force(reason, self.tasks is not None and self.tasks.ended)
        self._forced.set()
        self._carry_out(actions)
        return True

    @property
    def forced(self) -> bool:
        return self._forced.is_set()

    async def maintain(
        self, kind: Maintenance, cause: str, wait: bool, role: Role | None = None
    ) -> dict[str, Any]:
        """Carry out a maintenance event; with `wait`, return once ready again.

        Conflict if another operation is under way on this instance, or if the instance
        is stopping for good; OperationFailed (with `wait`) if it ends failed or recycling.
        """
        operation = self.claim(kind, cause, role)
        if not wait:
            return self.snapshot()
        return await self.carried_out(operation)

    def available(self) -> None:
        """Conflict unless a maintenance event could begin now."""
        if self.life.stop_reason is not None or self.state is S.STOPPED:
            raise Conflict(f"{self.id} is stopped")
        if self._operation is not None:
            raise Conflict(f"{self.id} is busy with another operation ({self.operation})")

    def claim(self, kind: Maintenance, cause: str, role: Role | None = None) -> Operation:
        """Begin a maintenance event. Synchronous, so that two requests in one turn of the
        loop cannot both have the instance."""
        self.available()
        operation = Operation(kind, cause, asyncio.get_running_loop().create_future(), role=role)
        self._operation = operation
        log.info("maintenance", instance=self.id, kind=kind.value, cause=cause)
        self._interrupt.set()
        return operation

    async def carried_out(self, operation: Operation) -> dict[str, Any]:
        """Wait for a claimed operation; OperationFailed if it ends failed or recycling."""
        kind = operation.kind
        if await operation.done is not S.READY:
            raise OperationFailed(
                # The state's own reason: last_error may be an older crash's.
                f"{self.id} did not become ready after {kind.value}: it is {self.state.value}"
                f" ({self.reason or self.last_error})",
            )
        return self.snapshot()

    def check_status(self) -> bool:
        """Ask the host to run its status checks now; False if no host is running."""
        if self.process is None or not self.process.running:
            return False
        self.process.send({"type": "status_check"})
        return True

    async def change_settings(self, role: Role, cause: str) -> str:
        """Offer `role`'s settings to the running host (rolehost/fabric/changing.py)."""
        return await changing.change_settings(self, role, cause)

    async def change_topology(self, topology: dict[str, list[str]], role: str,
                              cause: str) -> str:
        """Tell the host that `role`'s instances changed (rolehost/fabric/changing.py)."""
        return await changing.change_topology(self, topology, role, cause)

    async def changed(self) -> None:
        """Wait for the next transition, or for the instance to come back or leave."""
        await self._changed.wait()

    @property
    def operation(self) -> str | None:
        """The maintenance operation under way, if any: `kind: cause`."""
        return self._operation.name if self._operation is not None else None

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self)

    def addresses(self) -> dict[str, dict[str, Any]]:
        """Where each endpoint listens, input, internal and instance (discovery's record,
        the host's context, status)."""
        return addresses(self)
