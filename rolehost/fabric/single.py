"""Single-instance mode (`rolehost run-instance ROLE`): one instance in the foreground,
for a container. Startup tasks, the host and the lifecycle rules as under the
controller, no balancer (the platform in front balances: the instance binds its
endpoints' declared ports itself), settings overridable by `ROLEHOST_SETTING_NAME`,
and a small HTTP port:

- `/startup` 200 once the startup tasks ran and on_start returned True;
- `/ready`   200 only while the instance would be in rotation (ready, not stopping);
- `/live`    200 while the instance is not failed;
- `/stop`    starts the graceful stop (a preStop hook): out of rotation at once, a
             drain delay, then `stopping` handlers and on_stop. SIGTERM does the same.

A second SIGTERM or SIGINT cuts the graceful stop short: the host's tree and the
startup tasks are killed, and the process exits EXIT_STOP_CUT_SHORT, as it does when
on_stop overran stop_timeout. Only signals count: the kubelet's SIGTERM after a preStop
hook's /stop is the one graceful stop, not a second. Once the instance has stopped,
signals are ignored until the process has exited: the exit code is the stop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from rolehost.control import api
from rolehost.control.api import Request, Routes, route
from rolehost.control.exits import EXIT_STOP_CUT_SHORT
from rolehost.definition import Definition, DefinitionError, Role, Secret, setting_variable
from rolehost.definition.scalars import setting_from_text
from rolehost.fabric.errors import Unavailable
from rolehost.fabric.instance import Instance
from rolehost.fabric.launcher import Launcher
from rolehost.fabric.lifecycle import RUNNING, State
from rolehost.fabric.rundir import RunDir
from rolehost.observability import logs
from rolehost.processes import process

log = structlog.get_logger()
ROUTES: Routes = []


def index_from_environment() -> int:
    """ROLEHOST_INDEX, else a StatefulSet pod's ordinal (`web-3` -> 3), else 0; ValueError
    for a ROLEHOST_INDEX that is no index (it was taken from the host name, unseen)."""
    if (value := os.environ.get("ROLEHOST_INDEX", "")).isdigit():
        return int(value)
    if value:
        raise ValueError(f"ROLEHOST_INDEX={value!r}: expected an index (0, 1, ...)")
    match = re.search(r"-(\d+)$", socket.gethostname())
    return int(match.group(1)) if match else 0


def settings_from_environment(role: Role, environ: Mapping[str, str], name: str = "") -> Role:
    """`ROLEHOST_SETTING_NAME` overrides a declared setting (from a ConfigMap or a Secret,
    say), read as the type the definition gives it (`setting_from_text`); a secret stays
    secret. A value that is not of that type is a DefinitionError that names the variable,
    never the value (it may be a secret's)."""
    settings: dict[str, Any] = dict(role.settings)
    for key, declared in role.settings.items():
        variable = setting_variable(key)
        if variable not in environ:
            continue
        current = declared.value if isinstance(declared, Secret) else declared
        try:
            value = setting_from_text(environ[variable], current)
        except ValueError as expected:
            raise DefinitionError(None, f"roles.{name}.settings.{key}" if name else key,
                                  f"{variable} is not {expected}, as the definition's value "
                                  "is (the value is not shown)") from None
        settings[key] = declared.model_copy(update={"value": value}) if isinstance(
            declared, Secret) else value
    return role.model_copy(update={"settings": settings})


class SingleInstance:
    def __init__(self, definition: Definition, role: str, index: int, run_dir: RunDir,
                 drain_delay: float, endpoint_host: str | None = None,
                 resources: Path | None = None, file: Path | None = None) -> None:
        self.definition, self.role_name, self.run_dir = definition, role, run_dir
        self.drain_delay = drain_delay
        self.launcher = Launcher(definition.service, run_dir.path, logs.Console(),
                                 self._observe)
        self.deployment = self.launcher.deployment
        spec = settings_from_environment(definition.roles[role], os.environ, role)
        self.instance = Instance(self.deployment, role, spec, index)
        # No balancer in front: the instance takes its endpoints' declared ports itself,
        # and an internal endpoint's if it declares one (a pod is a machine of its own).
        self.instance.ports |= {name: ep.port for name, ep in spec.endpoints.items()}
        self.instance.ports |= {name: ep.port for name, ep in spec.internal_endpoints.items()
                                if ep.port is not None}
        self.instance.endpoint_host = endpoint_host
        # No controller to tell it of others: it lists itself (docs/kubernetes.md says
        # how peers are found there).
        self.instance.topology = {role: [self.instance.id]}
        if resources is not None:
            self.instance.disks = replace(self.instance.disks,
                                          resources_root=resources.resolve())
        # No package here: app/ is copied from the source, which may hold the definition.
        self.instance.disks = replace(self.instance.disks, definition=file)
        self.started = False  # on_start returned True once, in this process's life
        self.stopping = False
        self.stop_reason = "stop requested"
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()  # a second signal: no more waiting on anything

    async def serve(self, host: str, port: int) -> int:
        await self.launcher.claim(self.run_dir)
        # Signals are counted, not stops: a preStop hook's /stop, then the kubelet's
        # SIGTERM, is one graceful stop; a supervisor's (or Ctrl-C's) second is not.
        self.launcher.supervise(lambda name: self.begin_stop(f"received {name}"),
                                self.force_stop)
        try:
            server = await api.serve_tcp(host, port, self, ROUTES)
        except OSError as exc:  # before the instance starts: nothing to stop
            raise CannotListen(f"cannot listen on {host}:{port} for the health endpoints: "
                               f"{exc.strerror or exc}") from None
        log.info("instance_mode", instance=self.instance.id, health=f"{host}:{port}")
        self.launcher.start([self.instance])
        await self._stop.wait()
        with contextlib.suppress(TimeoutError):  # endpoints catch up with /ready going 503
            await asyncio.wait_for(self._forced.wait(), self.drain_delay)
        await self.launcher.stop([self.instance], self.stop_reason)
        await server.close()
        self.launcher.close([self.instance])
        if self.instance.state is not State.STOPPED:
            return 1
        if self._forced.is_set() or self.instance.stop_outcome.cut_short:
            log.warning("instance_mode_stop_cut_short", instance=self.id,
                        forced=self._forced.is_set(), error=self.instance.last_error)
            return EXIT_STOP_CUT_SHORT
        return 0

    def _observe(self, instance: Instance) -> None:
        if instance.state in (State.READY, State.BUSY):
            self.started = True

    @property
    def id(self) -> str:
        return self.instance.id

    def begin_stop(self, reason: str = "stop requested") -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            log.info("instance_mode_stopping", instance=self.id, reason=reason)
            self._stop.set()

    def force_stop(self, why: str) -> None:
        """Cut the graceful stop short: no drain delay left, the host's tree and the
        startup tasks killed now. The instance still stops as usual, sweeping the tree."""
        if self.launcher.stopped or self._forced.is_set():  # nothing left to cut short
            return
        log.warning("instance_mode_forced_stop", instance=self.id, signal=why)
        self.begin_stop(f"received {why}")
        self._forced.set()
        self.instance.force_stop(self.stop_reason)

    def readiness(self) -> tuple[bool, str]:
        state = self.instance.state
        if self.stopping:
            # The instance itself stays ready through the drain delay, and says so: the
            # reason is the stop's. Once the host got the stop, it is `stopping` itself.
            what = "draining" if state in RUNNING else "stopping"
            return False, f"not ready: {what} ({self.stop_reason})"
        return self.instance.back, f"not ready: {self.instance.why_not_back()}"


def _answer(ok: bool, what: str) -> dict[str, Any]:
    if not ok:
        raise Unavailable(what)
    return {"ok": True}


@route("GET", "/startup", ROUTES)
async def _startup(single: Any, request: Request) -> Any:
    return _answer(single.started, "startup not complete")


@route("GET", "/ready", ROUTES)
async def _ready(single: Any, request: Request) -> Any:
    return _answer(*single.readiness())


@route("GET", "/live", ROUTES)
async def _live(single: Any, request: Request) -> Any:
    return _answer(single.instance.state is not State.FAILED, single.instance.reason)


@route("GET", "/stop", ROUTES)
@route("POST", "/stop", ROUTES)
async def _stop(single: Any, request: Request) -> Any:
    single.begin_stop(f"{request.method} /stop")
    return {"stopping": True}


class CannotListen(RuntimeError):
    """The health endpoints' address is taken, or cannot be listened on."""


def run(definition: Definition, file: Path, role: str, index: int, health: tuple[str, int],
        run_dir: Path | None, drain_delay: float, endpoint_host: str | None = None,
        resources: Path | None = None) -> int:
    where = RunDir(Path(run_dir).resolve() if run_dir else
                   Path(file).resolve().parent / f".rolehost-{role}-{index}")
    where.ensure()
    single = SingleInstance(definition, role, index, where, drain_delay, endpoint_host,
                            resources, Path(file))
    try:
        with asyncio.Runner(loop_factory=process.event_loop) as runner:  # uvloop's if any
            return runner.run(single.serve(*health))
    finally:
        if single.deployment.console is not None:
            single.deployment.console.flush()
