"""One instance's supervisor: its state machine, its host process, its back-off.

Every state change of an instance happens in `Instance._set`, checked against
`TRANSITIONS`; everything else asks for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from rolehost import protocol
from rolehost.definition import Role, Service
from rolehost.disks import Disks
from rolehost.environment import Context
from rolehost.logs import Console, RotatingFile
from rolehost.process import HostProcess, describe_exit

log = structlog.get_logger()


class State(StrEnum):
    CREATED = "created"
    BOOTSTRAPPING = "bootstrapping"
    STARTING = "starting"
    BUSY = "busy"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RECYCLING = "recycling"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.CREATED: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
    S.BOOTSTRAPPING: frozenset({S.STARTING, S.RECYCLING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.STARTING: frozenset({S.BUSY, S.READY, S.STOPPING, S.RECYCLING, S.FAILED, S.STOPPED}),
    S.BUSY: frozenset({S.READY, S.STOPPING, S.RECYCLING, S.FAILED, S.STOPPED}),
    S.READY: frozenset({S.BUSY, S.STOPPING, S.RECYCLING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.RECYCLING, S.FAILED}),
    S.RECYCLING: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
    S.STOPPED: frozenset({S.BOOTSTRAPPING}),
    S.FAILED: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
}
RUNNING = frozenset({S.STARTING, S.BUSY, S.READY})
# Beyond stop_timeout, how long the controller waits before it kills a stopping host.
STOP_GRACE = 2.0


def parse_instance_name(name: str) -> tuple[str, int]:
    """`web/0` or `web_IN_0` -> ("web", 0)."""
    role, sep, index = name.rpartition("/") if "/" in name else name.rpartition("_IN_")
    if not sep or not role or not index.isdigit():
        raise ValueError(f"not an instance name: {name!r} (expected ROLE/INDEX or ROLE_IN_INDEX)")
    return role, int(index)


@dataclass(frozen=True)
class Deployment:
    """What every instance of one controller shares."""

    id: str
    service: Service
    run_dir: Path
    console: Console | None


class Instance:
    def __init__(self, deployment: Deployment, role_name: str, role: Role, index: int) -> None:
        self.deployment = deployment
        self.role_name, self.role, self.index = role_name, role, index
        self.id = f"{role_name}_IN_{index}"
        self.update_domain = index % deployment.service.upgrade_domains
        self.disks = Disks(deployment.run_dir / "instances" / self.id)
        self.ports = {name: _free_port(ep.host) for name, ep in role.endpoints.items()}
        self.output = RotatingFile(deployment.run_dir / "logs" / f"{self.id}.log")

        self.state = S.CREATED
        self.state_since = time.time()
        self.reason = ""
        self.process: HostProcess | None = None
        self.generation = 0
        self.restarts = 0
        self.failures = 0  # consecutive failures before `stable_after`: the back-off exponent
        self.last_error: str | None = None
        self.last_traceback: str | None = None
        self.ready_since: float | None = None
        self.next_try: float | None = None

        self._recycle_reason: str | None = None
        self._failed_reason: str | None = None
        self._run_error: str | None = None  # the error the current host reported
        self._stop_reason = "stop requested"
        self._stop_requested = asyncio.Event()
        self._changed = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # The state machine.

    def _set(self, state: State, reason: str = "") -> None:
        if state == self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.id}: no transition {self.state} -> {state}")
        previous, self.state, self.reason = self.state, state, reason
        self.state_since = time.time()
        if state is S.READY and self.ready_since is None:
            self.ready_since = self.state_since
            self._cancel_deadline()
        log.info("state", instance=self.id, state=state.value, previous=previous.value,
                 reason=reason or None)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, states: set[State], timeout: float) -> State:
        """Wait until the instance is in one of `states`; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while self.state not in states:
                await self._changed.wait()
        return self.state

    # Supervision.

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.id)

    async def _supervise(self) -> None:
        reason = "deployment started"
        while True:
            await self._incarnation(reason)
            if self._stop_requested.is_set():
                self._set(S.STOPPED, "stop requested")
                return
            if self._failed_reason is not None:
                self._set(S.FAILED, self._failed_reason)
                await self._stop_requested.wait()
                self._set(S.STOPPED, "stop requested")
                return
            reason = self._recycle_reason or self.last_error or "host exited"
            delay = self._backoff()
            self.next_try = time.time() + delay
            self._set(S.RECYCLING, f"{reason}; next try in {delay:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            self.next_try = None
            if self._stop_requested.is_set():
                self._set(S.STOPPED, "stop requested")
                return
            self.restarts += 1

    def _backoff(self) -> float:
        service = self.deployment.service
        stable = self.ready_since is not None and (
            time.time() - self.ready_since >= service.stable_after
        )
        if stable:
            self.failures = 0
            return 0.0
        self.failures += 1
        return float(min(service.backoff_initial * 2 ** (self.failures - 1), service.backoff_max))

    async def _incarnation(self, reason: str) -> None:
        """Bootstrap, start and watch one host process until it has exited."""
        self.generation += 1
        self._recycle_reason = None
        self.ready_since = None
        self._set(S.BOOTSTRAPPING, reason)
        self._arm_deadline()
        try:
            await asyncio.to_thread(self._prepare_disks)
            if self._stop_requested.is_set():
                return
            self.process = await HostProcess.spawn(
                [sys.executable, "-m", "rolehost.host"],
                env=self._environment(),
                cwd=str(self.disks.app),
                token=f"{self.deployment.id}:{self.id}:{self.generation}",
                on_message=self._on_message,
                on_output=self._on_output,
            )
        except Exception as exc:  # a bootstrap failure recycles, like a failed task
            self._cancel_deadline()
            self.last_error = f"bootstrap failed: {exc}"
            log.error("bootstrap_failed", instance=self.id, error=str(exc))
            return
        self._set(S.STARTING, f"host process {self.process.pid} started")
        self._arm_heartbeat()
        code = await self._watch(self.process)
        self._cancel_deadline()
        self._cancel_heartbeat()
        outcome = describe_exit(code)
        if code != protocol.ExitCode.STOPPED and not self._recycle_reason:
            self.last_error = self._run_error or f"host {outcome}"
        log.info("host_exited", instance=self.id, pid=self.process.pid, outcome=outcome)

    async def _watch(self, process: HostProcess) -> int:
        """Wait for the host to exit; if a stop is asked for first, stop it gracefully."""
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop_requested.wait())
        exited: asyncio.Future[Any] = process.exited
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if process.running:
            reason = self._stop_reason
            if self.state in RUNNING:
                self._set(S.STOPPING, reason)
            process.send({"type": "stop", "reason": reason})
            limit = self.role.stop_timeout + STOP_GRACE
            try:
                await asyncio.wait_for(asyncio.shield(process.exited), limit)
            except TimeoutError:
                log.error("stop_timeout", instance=self.id, pid=process.pid, waited=limit)
                self._run_error = (
                    f"did not stop within stop_timeout ({self.role.stop_timeout:g}s); killed"
                )
                self.last_error = self._run_error
                process.kill()
        return await process.exited

    def _prepare_disks(self) -> None:
        self.disks.create(self.role)
        if self.generation == 1:
            self.disks.deploy(self.role.app, self.deployment.run_dir)
        self.disks.clean_resources(self.role, only_clean_on_recycle=True)

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **self.variables()}
        env[protocol.CONTEXT_ENV] = self.context().to_json()
        return env

    def variables(self) -> dict[str, str]:
        """The instance's identity and folders, as its processes see them."""
        variables = {
            "ROLEHOST_RUN_DIR": str(self.deployment.run_dir),
            "ROLEHOST_ROLE": self.role_name,
            "ROLEHOST_INSTANCE_ID": self.id,
            "ROLEHOST_INDEX": str(self.index),
            "ROLEHOST_UPDATE_DOMAIN": str(self.update_domain),
            "ROLEHOST_DEPLOYMENT_ID": self.deployment.id,
            "ROLEHOST_OS_DIR": str(self.disks.os),
            "ROLEHOST_APP_DIR": str(self.disks.app),
            "TMPDIR": str(self.disks.tmp),
        }
        for name in self.role.local_resources:
            key = "ROLEHOST_RESOURCE_" + name.upper().replace("-", "_")
            variables[key] = str(self.disks.resource(name))
        return variables

    def context(self) -> Context:
        return Context(
            instance_id=self.id,
            role=self.role_name,
            index=self.index,
            update_domain=self.update_domain,
            deployment_id=self.deployment.id,
            entry_point=self.role.entry_point,
            app_dir=str(self.disks.app),
            os_dir=str(self.disks.os),
            stop_timeout=self.role.stop_timeout,
            status_check_interval=self.role.status_check_interval,
            settings=dict(self.role.settings),
            endpoints={
                name: {"host": ep.host, "port": self.ports[name], "protocol": ep.protocol.value}
                for name, ep in self.role.endpoints.items()
            },
            resources={
                name: {"path": str(self.disks.resource(name)), "size_mb": spec.size_mb}
                for name, spec in self.role.local_resources.items()
            },
        )

    # What the host says.

    def _on_message(self, message: protocol.Message) -> None:
        self._arm_heartbeat()
        kind = message["type"]
        if kind == "state":
            state, reason = State(message["state"]), str(message.get("reason") or "")
            if state is S.STOPPING and self.state in RUNNING:
                self._set(S.STOPPING, reason)
            elif state in (S.BUSY, S.READY) and self.state in RUNNING:
                self._set(state, reason)
        elif kind == "recycle":
            self._recycle_reason = str(message.get("reason", "recycle requested"))
        elif kind == "error":
            where, text = str(message.get("where")), str(message.get("traceback", ""))
            self.last_traceback = text
            summary = text.strip().splitlines()[-1] if text.strip() else "failed"
            self._run_error = f"{where}: {summary}"
            self.last_error = self._run_error
            log.error("role_error", instance=self.id, where=where, error=summary)

    def _on_output(self, data: bytes) -> None:
        self.output.write(data)
        if self.deployment.console is not None:
            self.deployment.console.output(self.id, data)

    # Deadlines.

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._failed_reason = None
        self._run_error = None
        deadline = self.deployment.service.ready_deadline
        self._deadline = asyncio.get_running_loop().call_later(deadline, self._deadline_missed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_missed(self) -> None:
        deadline = self.deployment.service.ready_deadline
        self._failed_reason = (
            f"waiting for host: not ready within the ready deadline ({deadline:g}s); "
            f"it was {self.state.value}"
        )
        self.last_error = self._run_error = self._failed_reason
        log.error("ready_deadline_missed", instance=self.id, state=self.state.value)
        if self.process is not None and self.process.running:
            self.process.kill()

    def _arm_heartbeat(self) -> None:
        self._cancel_heartbeat()
        self._heartbeat = asyncio.get_running_loop().call_later(
            protocol.UNRESPONSIVE_AFTER, self._unresponsive
        )

    def _cancel_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def _unresponsive(self) -> None:
        self._run_error = f"host unresponsive: silent for {protocol.UNRESPONSIVE_AFTER:g}s"
        log.error("host_unresponsive", instance=self.id)
        if self.process is not None and self.process.running:
            self.process.kill()

    # Operations.

    async def stop(self, reason: str) -> None:
        """Graceful stop: `stopping` handlers and on_stop within stop_timeout, then the tree."""
        self._stop_reason = reason
        self._stop_requested.set()
        if self._task is not None:
            await self._task

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role_name,
            "index": self.index,
            "update_domain": self.update_domain,
            "state": self.state.value,
            "reason": self.reason,
            "state_since": _iso(self.state_since),
            "pid": self.process.pid if self.process is not None and self.process.running else None,
            "restarts": self.restarts,
            "attempt": self.failures,
            "next_try": _iso(self.next_try),
            "last_error": self.last_error,
            "ready_since": _iso(self.ready_since) if self.state is S.READY else None,
            "endpoints": {
                name: {"host": ep.host, "port": self.ports[name]}
                for name, ep in self.role.endpoints.items()
            },
            "dirs": {"root": str(self.disks.root), "app": str(self.disks.app),
                     "os": str(self.disks.os), "resources": str(self.disks.resources)},
            "log": str(self.output.path),
        }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
