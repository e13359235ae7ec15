"""The controller (the platform's fabric controller): one asyncio process per service.

It owns the run directory, the instances and the control API, and offers the
operations that the API and the CLI are skins over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from rolehost.balancer import Balancer, build, relay_build, tls
from rolehost.balancer.external import ExternalBalancer
from rolehost.control import api
from rolehost.definition import (
    MAX_INSTANCES,
    MIN_INSTANCES,
    Definition,
    DefinitionErrors,
    Role,
    Secret,
    parse_role,
)
from rolehost.definition.scalars import parse_address
from rolehost.fabric import descriptors, packages, ports, preflight, scaling
from rolehost.fabric.census import Census
from rolehost.fabric.deployment import Deployment
from rolehost.fabric.disks import Maintenance, Upgrade
from rolehost.fabric.edits import Edits
from rolehost.fabric.errors import (
    Conflict,
    DoesNotLoad,
    DomainError,
    Invalid,
    NotFound,
    OperationFailed,
    RefusedInPreflight,
    Unavailable,
)
from rolehost.fabric.history import History
from rolehost.fabric.instance import Instance
from rolehost.fabric.keeper import Keeper
from rolehost.fabric.launcher import Launcher
from rolehost.fabric.lifecycle import State
from rolehost.fabric.offers import offer_by_domain
from rolehost.fabric.operation import Operation
from rolehost.fabric.rolling import by_domain
from rolehost.fabric.rundir import RunDir
from rolehost.fabric.slots import PRODUCTION, Deployed, Slots, qualified
from rolehost.fabric.walks import Walk
from rolehost.fabric.watch import watch_file
from rolehost.observability import logs, metrics
from rolehost.observability.notify import Notifier

log = structlog.get_logger()


class StartError(RuntimeError):
    """The service cannot start as defined on this machine (a port in use, ...)."""


class Controller:
    def __init__(
        self,
        definition: Definition,
        definition_path: Path,
        run_dir: RunDir,
        console: logs.Console | None = None,
    ) -> None:
        self.definition_path = definition_path
        self.run_dir = run_dir
        self.console = console
        self.started = time.time()
        self.launcher = Launcher(definition.service, run_dir.path, console,
                                 self._state_changed)
        self.notifier = Notifier()
        # Production's listeners, whatever deployment runs behind them (slots.py).
        self.balancers: list[Balancer | ExternalBalancer] = []
        # The deployment in each slot; `start` makes production's.
        self.slots = Slots(self, Deployed(self.launcher.deployment, definition, "",
                                          self.balancers))
        self.history: History | None = None  # loaded once the run directory is ours
        self.walk: Walk | None = None
        self.changing: str | None = None  # a settings change, a scale or a deploy's checks
        self.running = False
        self.edits = Edits(self, definition)  # saved edits of the file, applied
        self.packages = packages.Packages(run_dir.path / "packages", run_dir.path)
        self._background: set[asyncio.Future[Any]] = set()
        self._shutdown = asyncio.Event()
        self._stopped = asyncio.Event()
        # Set once serve() has added and started the instances of the definition, or
        # given up starting: the control API answers before that.
        self._started = asyncio.Event()
        self._shutdown_reason = "stop requested"
        self._forced: str | None = None  # the second signal's name, once one came
        # Once stopped: the instances whose stop was cut short (on_stop overran
        # stop_timeout, or a second signal forced it), each with why, by slot, deployment
        # and id (slots.qualified): production's and staging's have the same ids.
        self.cut_short: dict[str, str] = {}

    async def serve(self) -> None:
        """Run the service until asked to stop; return once every instance is stopped."""
        await self.launcher.claim(self.run_dir)
        self.history = History(self.run_dir.path / "history.jsonl")
        # Run what was packaged, not the working tree: see packages.py.
        started = await asyncio.to_thread(self.packages.create, self.definition_path, None)
        self.definition = self.packages.load(started["version"])
        self.version = started["version"]
        if not self.launcher.supervise(self._stop_signal, self._force_signal):
            log.warning("subreaper_unavailable", detail="detached grandchildren may escape")
        keeper = Keeper(self.run_dir, self.launcher.lock,
                        await api.serve(self.run_dir.socket, self),
                        lambda: api.serve(self.run_dir.socket, self),
                        lambda: [i.output.file for i in self.instances.values()],
                        lambda why: self.in_background(self.shutdown(why)))
        keeper.start()
        collector = metrics.StateCollector(self)
        metrics.REGISTRY.register(collector)
        metrics_server = None
        try:
            if self.definition.service.metrics:
                address = self.definition.service.metrics
                try:
                    metrics_server = await api.serve_metrics(*parse_address(address), self)
                except OSError as exc:
                    raise StartError(f"cannot serve metrics on {address}: "
                                     f"{exc.strerror}") from None
            budget = self.slots.budget = descriptors.at_start(self.definition)
            self.deployment.reserved.extend(ports.fixed(self.definition).values())
            for role_name, role in self.definition.roles.items():
                self.balancers += [
                    ExternalBalancer(role_name, name, ep) if ep.external else
                    Balancer(role_name, name, ep, budget.max_connections, budget.backlog)
                    for name, ep in role.endpoints.items()]
                for index in range(role.instances):
                    self.production.add_instance(role_name, role, index)
            for balancer in self.balancers:  # listening first: a port in use starts nothing
                try:
                    await balancer.start()
                except OSError as exc:
                    host, port = balancer.address
                    raise StartError(f"cannot listen on {host}:{port} for "
                                     f"{balancer.role}.{balancer.name}: {exc.strerror}") from None
            run_as = self.deployment.run_as
            if run_as.degraded:
                log.warning("limited_user_unavailable", detail=run_as.reason)
            log.info("controller_started", service=self.definition.service.name, pid=os.getpid(),
                     limited_user=run_as.name, relay=relay_build(),
                     version=self.version,
                     run_dir=str(self.run_dir.path), deployment=self.deployment.id,
                     instances=len(self.instances))
            # Only a service with a balancer relays: without one, the build costs nothing.
            relays = any(isinstance(b, Balancer) for b in self.balancers)
            if relays and (interpreted := build.relay_warning()) is not None:
                log.warning("relay_interpreted", **interpreted)
            topology = self.production.topology()  # one for all: per instance, it was O(N^2)
            for instance in self.instances.values():
                instance.topology = topology
            self.running = True
            self.launcher.start(self.instances.values())
            self._started.set()
            loop = asyncio.get_running_loop()
            watcher = watch_file(self.definition_path, loop, self.edits.saved)
            self.notifier.start_watchdog(loop)
            await self._shutdown.wait()
            log.info("controller_stopping", reason=self._shutdown_reason)
            if self._forced is not None:  # the second signal came before the first was seen
                self._force(self._forced)
            for balancer in self.balancers + self.slots.listeners():
                balancer.stop_accepting()
            self.notifier.stopping()
            if self.walk is not None and self.walk.task is not None and not self.walk.over:
                self.walk.task.cancel()  # the walk stops where it is; instances stop below
                await asyncio.gather(self.walk.task, return_exceptions=True)
            everyone = list(self.instances.values()) + self.slots.instances()
            await self.launcher.stop(everyone, self._shutdown_reason)
            self.cut_short = {
                qualified(i): f"forced by a second signal ({self._forced})" if i.forced
                else i.last_error or "did not stop within stop_timeout"
                for i in everyone if i.stop_outcome.cut_short}
            watcher.stop()
            if self.cut_short:
                log.warning("controller_stop_cut_short", instances=self.cut_short)
            log.info("controller_stopped")
        except StartError as exc:
            log.error("start_failed", error=str(exc))
            raise
        finally:
            self._started.set()  # an operation waiting for the start is answered
            self._stopped.set()
            for balancer in self.balancers + self.slots.listeners():
                await balancer.close()
            if metrics_server is not None:
                await metrics_server.close()
            metrics.REGISTRY.unregister(collector)
            await keeper.close()
            self.launcher.close([*self.instances.values(), *self.slots.instances()])

    def _stop_signal(self, name: str) -> None:
        self._shutdown_reason = f"controller received {name}"
        self._shutdown.set()

    def _force_signal(self, name: str) -> None:
        # A second signal: the user will not wait for graceful stops.
        log.warning("forced_stop", signal=name)
        self._forced = name
        self._force(name)

    def _force(self, why: str) -> None:
        """Cut every instance's stop short: hosts, their trees and tasks killed now."""
        for instance in [*self.instances.values(), *self.slots.instances()]:
            instance.force_stop(f"controller received {why}")

    def _state_changed(self, instance: Instance) -> None:
        # Counted in its deployment's census, whichever slot it is in: a swap makes the
        # staging one production's, and systemd is told production's.
        for d in (self.production, self.slots.staging):
            # Else removed by a scale-in, and counted out.
            if d is not None and d.deployment is instance.deployment and \
                    instance.id in d.instances:
                d.census.seen(instance.id, instance.back)
        self.notifier.counts(self.census.counts())

    # Operations: what the control API and the CLI offer.

    # Production's deployment, as the rest of rolehost reads it: a swap changes which.

    @property
    def production(self) -> Deployed:
        return self.slots.production

    @property
    def deployment(self) -> Deployment:
        return self.production.deployment

    @property
    def definition(self) -> Definition:
        return self.production.definition

    @definition.setter
    def definition(self, definition: Definition) -> None:
        self.production.definition = definition

    @property
    def version(self) -> str:
        return self.production.version

    @version.setter
    def version(self, version: str) -> None:
        self.production.version = version

    @property
    def instances(self) -> dict[str, Instance]:
        return self.production.instances

    @property
    def census(self) -> Census:
        """Back and total per role of production, for systemd."""
        return self.production.census

    def status(self, slot: str = PRODUCTION) -> dict[str, Any]:
        return self.slots.status(slot)

    def instance(self, name: str, slot: str = PRODUCTION) -> Instance:
        return self.slots.deployed(slot).instance(name)

    async def maintain(
        self, kind: Maintenance, names: list[str], wait: bool, cause: str,
        slot: str = PRODUCTION,
    ) -> list[dict[str, Any]]:
        """Carry out `kind` on each named instance at once; every name is checked first."""
        if not names:
            raise Invalid("name at least one instance")
        await self._until_started()
        d = self.slots.deployed(slot)
        instances = list({i.id: i for i in (d.instance(n) for n in names)}.values())
        self._one_at_a_time(instances=False)
        busy = [i.id for i in instances if i.operation is not None]
        if busy:
            raise Conflict(f"another operation is under way on {', '.join(busy)}")
        for instance in instances:
            instance.available()
        assert self.history is not None
        record = self.history.begin(kind.value, d.recorded({"cause": cause}),
                                    [i.id for i in instances])
        # Claimed now, with no await since the check: a second request in the same turn
        # of the loop finds them busy.
        operations = [i.claim(kind, cause) for i in instances]
        started = [i.snapshot() for i in instances]
        carried_out = asyncio.ensure_future(self._carry_out(instances, operations, record))
        if not wait:
            self._background.add(carried_out)
            carried_out.add_done_callback(self._background.discard)
            return started
        results = await carried_out
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise OperationFailed("; ".join(str(f) for f in failures))
        return [r for r in results if isinstance(r, dict)]

    async def _carry_out(
        self, instances: list[Instance], operations: list[Operation], record: Any
    ) -> list[Any]:
        """Every instance's part of one operation, and its line in the history."""
        assert self.history is not None
        results = await asyncio.gather(
            *(i.carried_out(o) for i, o in zip(instances, operations, strict=True)),
            return_exceptions=True,
        )
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        self.history.end(record, "failed" if errors else "succeeded", "; ".join(errors) or None)
        return list(results)

    async def upgrade(self, upgrade: Upgrade, manual: bool,
                      slot: str = PRODUCTION) -> dict[str, Any]:
        """Walk `upgrade` across the update domains of the deployment in `slot`."""
        await self._until_started()
        d = self.slots.deployed(slot)
        self._one_at_a_time()
        return self._start_walk(f"upgrade {upgrade.value}", upgrade.event, manual,
                                arguments=d.recorded({}) or None, deployed=d)

    async def deploy(self, version: str, rollback: bool, manual: bool) -> dict[str, Any]:
        """In-place upgrade to a package. Everything that can be checked is checked first,
        with every instance untouched; then a walk, rolled back if a domain fails."""
        await self._until_started()
        with self._exclusive(f"deploy {version}"):  # the checks await: nothing may start
            new = await self._deployable(version)
            running = dict(self.definition.roles)
            # The package carries its own instance counts, as a .cscfg does on the platform:
            # a `rolehost scale` since the last package is undone by the deploy, not a reason
            # to refuse it. Only the instances the package keeps are walked; the others stop,
            # or the missing ones start on the new version, once every domain has moved, so
            # that a rollback has nothing more to put back.
            kept = [i for i in self.instances.values()
                    if i.index < new.roles[i.role_name].instances]
            walk = self._start_walk(f"deploy {version}", Maintenance.DEPLOY, manual,
                                    roles=dict(new.roles), rollback=running if rollback else None,
                                    arguments={"version": version, "previous": self.version,
                                               "rollback": rollback}, instances=kept)

        async def deployed() -> None:
            # The package's roles with the counts that run: each role takes the package's
            # count as its scale sets it, so a scale that fails or never runs (the
            # controller stopping) leaves no count in the definition that nothing runs.
            running_counts = {name: sum(i.role_name == name for i in self.instances.values())
                              for name in new.roles}
            self.definition = new.model_copy(update={"roles": {
                name: role.model_copy(update={"instances": running_counts[name]})
                for name, role in new.roles.items()}})
            self.version = version
            log.info("deployed", version=version)
            # Every role's count is tried, whichever fails: one role's new instance that
            # does not get ready is no reason to leave another role at the old count.
            failed = []
            for name, role in new.roles.items():
                if running_counts[name] != role.instances:
                    try:
                        await scaling.scale(self, self.production, name, role,
                                            role.instances, f"deploy {version}")
                    except DomainError as exc:
                        failed.append(f"scale {name} to {role.instances}: {exc}")
            if failed:
                raise RuntimeError("; ".join(failed))

        assert self.walk is not None
        self.walk.on_success = deployed
        return walk

    async def _deployable(self, version: str) -> Definition:
        """The package `version`, once everything that can be checked with every instance
        untouched is: it can replace the running one in place, and its entry points load."""
        assert self.history is not None
        try:
            new = self.packages.load(version)
            problems = packages.compatibility(self.definition, new)
            if problems:
                raise Conflict(f"version {version} cannot replace the running one in place: "
                               f"{'; '.join(problems)}. A fresh start is needed (rolehost "
                               "stop, then rolehost start)")
            # On the loop, not a thread: the orphan reaper must not take their exits.
            errors = await preflight.check_entry_points(new, None)
            if errors:
                raise DoesNotLoad(f"version {version} does not load:\n"
                                  + "\n".join(str(e) for e in errors))
        except DomainError as exc:
            # The walk's record tells a deploy that got past its preflight; this one that
            # it did not.
            record = self.history.begin(f"deploy {version}",
                                        {"version": version, "previous": self.version}, [])
            self.history.end(record, "failed", str(exc))
            raise RefusedInPreflight(exc) from None
        return new

    def _one_at_a_time(self, instances: bool = True) -> None:
        """Conflict while a walk, a settings change or a scale is under way, and (`instances`)
        while any instance has an operation under way. Two at once could take down a
        second update domain before the first came back, or lose one change to the other."""
        if self.walk is not None and not self.walk.over:
            raise Conflict(f"walk {self.walk.id} is {self.walk.state.value}: one operation "
                           "at a time (rolehost walk next / abort)")
        if self.changing is not None:
            raise Conflict(f"{self.changing} is under way: one operation at a time")
        if instances and (busy := [i.id for i in [*self.instances.values(),
                                                   *self.slots.instances()] if i.operation]):
            raise Conflict(f"another operation is under way on {', '.join(busy)}")

    async def _until_started(self) -> None:
        """Hold an operation that arrives while serve() is still adding and starting the
        instances until it has: a scale run before it would add instances under the ids
        serve() then adds again, and start those serve() starts too. Unavailable if the
        start failed."""
        if not self._started.is_set():  # no await once started: the checks stay atomic
            await self._started.wait()
        if not self.running:
            raise Unavailable("the controller did not start: nothing to operate on")
        # Every instance is on its way out: a scale-in now would take one from the stop
        # (its overrun unreported, its disks gone), a restart would race it.
        if self._shutdown.is_set():
            raise Unavailable("the controller is stopping: no operation starts now")

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold the service for `what` (a service-wide operation that is not a walk)."""
        self._one_at_a_time()
        self.changing = what
        try:
            yield
        finally:
            self.changing = None

    def _start_walk(self, label: str, event: Maintenance, manual: bool,
                    roles: dict[str, Role] | None = None,
                    rollback: dict[str, Role] | None = None,
                    arguments: dict[str, Any] | None = None,
                    instances: list[Instance] | None = None,
                    deployed: Deployed | None = None) -> dict[str, Any]:
        """Walk `instances` (default: all of the deployment's, production's by default)."""
        assert self.history is not None
        d = deployed or self.production
        count = d.definition.service.upgrade_domains
        walked = list(d.instances.values()) if instances is None else instances
        grouped = by_domain(walked, count)
        # Down already outside the first domain: walking it would take a second one down.
        # Busy is the role's own say, and passes; ready but out of rotation is down.
        down = [f"{i.id} is {i.why_not_back() if i.state is State.READY else i.state.value}"
                + (f" ({i.reason})" if i.reason else "")
                for d in [d for d in grouped if d][1:] for i in d
                if not (i.back or i.state is State.BUSY)]
        if down:
            raise Conflict(f"{'; '.join(down)}: a walk would take a second update domain "
                           "down; bring it back first (rolehost restart)")
        self.walk = Walk(label, event, manual, grouped, self.history, roles, rollback,
                         arguments)
        self.walk.start()
        return self.walk.snapshot()

    async def configure(
        self, role_name: str, settings: dict[str, Any], cause: str, replace: bool = False,
        slot: str = PRODUCTION,
    ) -> dict[str, str]:
        """Change a role's settings (merged, or the whole table with `replace`), per update
        domain or all at once (`change_mode`); returns what each instance did."""
        await self._until_started()
        d = self.slots.deployed(slot)
        role = d.role(role_name)
        self._one_at_a_time()
        # A new value for a secret setting stays secret. (A table, not a Secret: the value
        # is checked below, with the rest.)
        settings = {k: {"value": v, "secret": True} if k in role.secrets
                    and not isinstance(v, Secret) else v for k, v in settings.items()}
        merged = dict(settings) if replace else {**role.settings, **settings}
        try:
            new = parse_role(role_name, {**role.model_dump(), "settings": merged})
        except DefinitionErrors as exc:
            raise Invalid(f"invalid settings for {role_name}:\n{exc}") from None
        # A config change takes the role's renewed certificates (the platform's rotation).
        self.renew_certificates(role_name, d)
        with self._exclusive(f"config {role_name}"):
            return await self._change_settings(d, role_name, new, settings, cause)

    def renew_certificates(self, role_name: str | None = None,
                           deployed: Deployed | None = None) -> None:
        """Serve what the certificate files of the https endpoints (of `role_name`, or
        all; of the slot `deployed` is in, or production's) hold now, from the next
        handshake on. Invalid if one cannot serve: then none is renewed."""
        listeners = (deployed or self.production).listeners
        renewing = [b for b in listeners if isinstance(b, Balancer)
                    and b.tls is not None and role_name in (None, b.role)]
        for balancer in renewing:
            assert balancer.endpoint.certificate is not None and balancer.endpoint.key
            try:
                tls.check(balancer.endpoint.certificate, balancer.endpoint.key)
            except tls.CertificateProblem as problem:
                raise Invalid(f"roles.{balancer.role}.endpoints.{balancer.name}.{problem.key}:"
                              f" {problem.message}") from None
        for balancer in renewing:
            balancer.renew_certificate()

    async def _change_settings(self, d: Deployed, role_name: str, new: Role,
                               settings: dict[str, Any], cause: str) -> dict[str, str]:
        assert self.history is not None
        ours = [i for i in d.instances.values() if i.role_name == role_name]
        shown = new.redacted({k: v.value if isinstance(v, Secret) else v
                              for k, v in settings.items()})
        record = self.history.begin(f"config {role_name}",
                                    d.recorded({"settings": shown, "cause": cause}),
                                    [i.id for i in ours])
        outcome: dict[str, str] = {}
        try:
            await offer_by_domain(self.history, d.definition.service, f"config {role_name}",
                                  ours, outcome, record, lambda i: i.change_settings(new, cause))
        finally:
            # Stored once every instance has them, even one that failed with them. A halt
            # leaves the later domains on the old settings, and those stay the role's: the
            # next change is offered against them, not against settings that failed.
            if len(outcome) == len(ours):
                d.set_role(role_name, new)
        return outcome

    async def scale(self, role_name: str, count: int, cause: str,
                    slot: str = PRODUCTION) -> list[str]:
        """Add instances (new indexes) or stop the highest ones gracefully."""
        await self._until_started()
        d = self.slots.deployed(slot)
        role = d.role(role_name)
        if not MIN_INSTANCES <= count <= MAX_INSTANCES:
            raise Invalid(f"instances must be between {MIN_INSTANCES} and {MAX_INSTANCES}")
        most, key = role.most_instances
        if count > most:  # an instance past the range would have no port of its own
            raise Invalid(f"{role_name} can run at most {most} instances: "
                          f"roles.{role_name}.{key} has {most} ports")
        with self._exclusive(f"scale {role_name}"):
            return await scaling.scale(self, d, role_name, role, count, cause)

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def in_background(self, work: Any) -> None:
        """Run `work` on the loop with nobody awaiting it: a failure is logged."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.error(
            "change_failed", error=str(t.exception())))

    def package(self, version: str | None, source: Path | None = None) -> dict[str, Any]:
        """Package `source` (default: the running definition file): a copy of the service
        whose settings say v2, to deploy in place or to the staging slot."""
        return self.packages.create(source or self.definition_path, version)

    def current_walk(self) -> Walk:
        if self.walk is None:
            raise NotFound("no walk has run since the controller started")
        return self.walk

    def operations(self) -> dict[str, Any]:
        assert self.history is not None
        return self.history.summary()

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Events numbered above `since` (each event's `seq`)."""
        return logs.recent(since)

    async def shutdown(self, reason: str) -> None:
        """Stop every instance gracefully; return when they all are stopped."""
        if not self._shutdown.is_set():
            self._shutdown_reason = reason
            self._shutdown.set()
        await self._stopped.wait()

