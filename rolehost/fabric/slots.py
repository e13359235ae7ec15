"""Deployment slots: a staging deployment beside production, and the VIP swap.

The platform's way to ship: deploy the new version to the staging slot, try it on its own
address, then swap, so that production's public ports send new requests to it in one
step; swap again to go back. Each slot has its listeners, which never move: production's
on each input endpoint's `port`, staging's on its `staging_port`. What a swap exchanges is
the deployment behind them (`Balancer.exchange`: the backend pools, not the sockets, so no
connection is refused and a request in flight finishes where it went).

The controller holds a `Deployed` per slot (`Slots.production`, `Slots.staging`): a
deployment as it runs, with its own deployment id, instances, disks and logs (a staging
deployment's under `RUN_DIR/deployments/ID/`: the instance ids are production's, as on
the platform), startup tasks, and the listeners of the slot it is in. The controller's
`deployment`, `definition`, `version` and `instances` are production's, so that with no
staging deployment, the common case, nothing reads differently. Operations take a slot
(default production) and act on its `Deployed`. A swap exchanges the two `Deployed`, and
the pools behind the listeners.

Slots live as long as the controller: `rolehost start` starts the definition it is given,
in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from rolehost.balancer import Balancer
from rolehost.balancer.external import ExternalBalancer
from rolehost.definition import Definition, Role
from rolehost.definition.scalars import parse_address
from rolehost.fabric import capacity, descriptors, preflight
from rolehost.fabric.census import Census
from rolehost.fabric.deployment import Deployment, Placement
from rolehost.fabric.discovery import Discovery
from rolehost.fabric.errors import (
    Conflict,
    DoesNotLoad,
    DomainError,
    Invalid,
    NotFound,
    OperationFailed,
    RefusedInPreflight,
)
from rolehost.fabric.instance import Instance
from rolehost.fabric.memory import MEMORY_EVERY
from rolehost.fabric.names import instance_id, parse_instance_name
from rolehost.fabric.offers import discard, ready_or_not
from rolehost.observability.logs import iso

if TYPE_CHECKING:
    from rolehost.fabric.controller import Controller

log = structlog.get_logger()
PRODUCTION, STAGING = "production", "staging"
SLOTS = (PRODUCTION, STAGING)


@dataclass
class Deployed:
    """A deployment as it runs in a slot: what a swap moves to the other slot. Its
    `listeners` are the slot's, and go to the other deployment at a swap."""

    deployment: Deployment
    definition: Definition
    version: str  # the package it runs: the one `start` made, then each deploy's
    listeners: list[Balancer | ExternalBalancer]
    instances: dict[str, Instance] = field(default_factory=dict)
    census: Census = field(init=False)  # back and total per role (systemd's, in production)

    def __post_init__(self) -> None:
        self.census = Census(self.definition.roles)

    @property
    def slot(self) -> str:
        return self.deployment.placement.slot

    def recorded(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """A history record's arguments, with the slot unless production, the common case."""
        return arguments if self.slot == PRODUCTION else {**arguments, "slot": self.slot}

    def instance(self, name: str) -> Instance:
        try:
            role, index = parse_instance_name(name)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        instance = self.instances.get(instance_id(role, index))
        if instance is None:
            known = ", ".join(self.instances) or "none"
            where = "" if self.slot == PRODUCTION else f" in the {self.slot} slot"
            raise NotFound(f"no instance {name!r}{where} (instances: {known})")
        return instance

    def role(self, name: str) -> Role:
        if name not in self.definition.roles:
            known = ", ".join(self.definition.roles)
            raise NotFound(f"no role {name!r} (roles: {known})")
        return self.definition.roles[name]

    def set_role(self, name: str, role: Role) -> None:
        roles = {**self.definition.roles, name: role}
        self.definition = self.definition.model_copy(update={"roles": roles})

    def topology(self) -> dict[str, list[str]]:
        roles: dict[str, list[str]] = {name: [] for name in self.definition.roles}
        for instance in self.instances.values():
            roles[instance.role_name].append(instance.id)
        return roles

    def add_instance(self, role_name: str, role: Role, index: int) -> Instance:
        instance = Instance(self.deployment, role_name, role, index)
        instance.balancers = _listeners_for(self.listeners, role_name)
        for name, balancer in instance.balancers.items():
            balancer.add(instance.id, instance.ports[name])
        self.instances[instance.id] = instance
        self.census.add(role_name, instance.id)
        # Not started, and no topology yet: the caller sets it once every instance it
        # adds is there, then starts them.
        return instance


def qualified(instance: Instance) -> str:
    """The instance's name among both slots' instances, where its id alone names its twin
    in the other slot too: production's by its id, as before there were slots (scripts
    read it), the other slot's as `SLOT/DEPLOYMENT/ID`."""
    slot = instance.deployment.placement.slot
    if slot == PRODUCTION:
        return instance.id
    return f"{slot}/{instance.deployment.id}/{instance.id}"


def endpoints(definition: Definition) -> dict[str, str]:
    """Each input endpoint, `role.name`, with its protocol: what a swap needs alike."""
    return {f"{role_name}.{name}": ep.protocol.value
            for role_name, role in definition.roles.items()
            for name, ep in role.endpoints.items()}


def _listeners_for(listeners: list[Balancer | ExternalBalancer], role: str
                   ) -> dict[str, Balancer | ExternalBalancer]:
    return {b.name: b for b in listeners if b.role == role}


class Slots:
    """The deployment in each slot of one controller, and the operations on slots."""

    def __init__(self, controller: Controller, production: Deployed) -> None:
        self.controller = controller
        self.production = production
        self.staging: Deployed | None = None
        # The descriptors' shares, counted at start for both slots' listeners.
        self.budget: descriptors.Budget | None = None

    def deployed(self, slot: str) -> Deployed:
        """The deployment in `slot`: Invalid for no such slot, NotFound for none in it."""
        if slot == PRODUCTION:
            return self.production
        if slot != STAGING:
            raise Invalid(f"no slot {slot!r} (slots: {', '.join(SLOTS)})")
        if self.staging is None:
            raise NotFound("no staging deployment (rolehost deploy VERSION --slot staging)")
        return self.staging

    def instances(self) -> list[Instance]:
        """The staging deployment's instances (none without one)."""
        return list(self.staging.instances.values()) if self.staging is not None else []

    def listeners(self) -> list[Balancer | ExternalBalancer]:
        return self.staging.listeners if self.staging is not None else []

    def summary(self) -> dict[str, Any]:
        """Each slot's deployment, version and instance count: what `status` shows."""
        return {d.slot: {"deployment_id": d.deployment.id, "version": d.version,
                         "instances": len(d.instances)}
                for d in (self.production, self.staging) if d is not None}

    def status(self, slot: str) -> dict[str, Any]:
        """The service, and every instance of the deployment in `slot`."""
        c, d = self.controller, self.deployed(slot)
        # The memory pass's samples, when recent: one read per instance per status else.
        fresh = MEMORY_EVERY + 1
        cpu = {i.id: (i.role_name, i.update_domain, load) for i in d.instances.values()
               if (load := i.sample_cpu(fresh)) is not None}
        advice = capacity.static_advice(d.definition) + capacity.load_warnings(
            d.definition, cpu)
        return {
            "slot": d.slot,
            "slots": self.summary(),
            "capacity": advice,
            "cpu": {name: round(load, 1) for name, (_, _, load) in cpu.items()},
            "service": d.definition.service.name,
            "deployment_id": d.deployment.id,
            "version": d.version,
            "pid": os.getpid(),
            "run_dir": str(c.run_dir.path),
            "limited_user": {"name": d.deployment.run_as.name,
                             "reason": d.deployment.run_as.reason},
            "definition": str(c.definition_path),
            "started": iso(c.started),
            "upgrade_domains": d.definition.service.upgrade_domains,
            "instances": [i.snapshot() for i in d.instances.values()],
            "balancers": [b.snapshot() for b in d.listeners],
            "walk": c.walk.snapshot() if c.walk is not None else None,
        }

    async def deploy(self, version: str) -> dict[str, Any]:
        """Start a whole second deployment of package `version` in the staging slot, on
        the endpoints' staging ports; return once each instance is back (or not)."""
        c = self.controller
        await c._until_started()
        with c._exclusive(f"deploy {version} --slot staging"):
            new = await self._deployable(version)
            staged = await self._listening(version, new)
            assert c.history is not None
            self.staging = staged
            instances = [staged.add_instance(role_name, role, index)
                         for role_name, role in new.roles.items()
                         for index in range(role.instances)]
            record = c.history.begin(f"deploy {version}", {"version": version, "slot": STAGING},
                                     [i.id for i in instances])
            topology = staged.topology()
            starting = not c.stopping
            for instance in instances:
                instance.topology = topology
                if starting:
                    instance.start(f"deployed {version} to the staging slot")
            log.info("staging_deployed", slot=STAGING, version=version,
                     deployment=staged.deployment.id, instances=len(instances))
            problems = await ready_or_not(instances, starting)
            c.history.end(record, "failed" if problems else "succeeded",
                          "; ".join(problems) or None)
            if problems:
                raise OperationFailed("; ".join(problems) + ". The staging deployment stays, "
                                      "for a look: rolehost delete --slot staging removes it")
            return c.status(STAGING)

    async def _deployable(self, version: str) -> Definition:
        """The package `version`, once everything that can be checked with nothing
        touched is: no staging deployment yet, a staging port for each input endpoint,
        none taken by production, and entry points that load."""
        c = self.controller
        assert c.history is not None
        try:
            if self.staging is not None:
                raise Conflict(f"the staging slot holds version {self.staging.version} "
                               f"already: swap it in, or delete it first (rolehost delete "
                               "--slot staging)")
            new = c.packages.load(version)
            missing = [f"roles.{role_name}.endpoints.{name}.staging_port"
                       for role_name, role in new.roles.items()
                       for name, ep in role.endpoints.items() if ep.staging_port is None]
            if missing:
                raise Invalid(f"version {version} has no staging port for "
                              f"{', '.join(missing)}: each input endpoint needs one to "
                              "deploy to the staging slot")
            # Ports fixed per instance index are one deployment's: those the user's balancer
            # sends to, and an instance endpoint's public ones.
            fixed = {f"roles.{role_name}.endpoints.{name}"
                     for d in (c.definition, new) for role_name, role in d.roles.items()
                     for name, ep in role.endpoints.items() if ep.external}
            fixed |= {f"roles.{role_name}.instance_endpoints.{name}"
                      for role_name, role in new.roles.items()
                      for name in role.instance_endpoints}
            if fixed:
                raise Conflict(f"{', '.join(sorted(fixed))}: an endpoint whose balancer is "
                               "external, or an instance endpoint, has no staging slot (its "
                               "ports are fixed per instance index)")
            taken = {b.endpoint.port: b.label for b in c.balancers}
            if c.definition.service.metrics:
                taken[parse_address(c.definition.service.metrics)[1]] = "service.metrics"
            clashes = [f"roles.{role_name}.endpoints.{name}.staging_port = {ep.staging_port} "
                       f"is production's port for {taken[ep.staging_port]}"
                       for role_name, role in new.roles.items()
                       for name, ep in role.endpoints.items() if ep.staging_port in taken]
            if clashes:
                raise Conflict(f"version {version}: {'; '.join(clashes)}")
            # On the loop, not a thread: the orphan reaper must not take their exits.
            errors = await preflight.check_entry_points(new, None)
            if errors:
                raise DoesNotLoad(f"version {version} does not load:\n"
                                  + "\n".join(str(e) for e in errors))
        except DomainError as exc:
            record = c.history.begin(f"deploy {version}", {"version": version, "slot": STAGING},
                                     [])
            c.history.end(record, "failed", str(exc))
            raise RefusedInPreflight(exc) from None
        return new

    async def _listening(self, version: str, new: Definition) -> Deployed:
        """The staged deployment, its listeners bound: a staging port in use is refused
        like the rest of the preflight, with nothing started."""
        c = self.controller
        assert c.history is not None
        # Each listener's share of the descriptors, counted at start for production's
        # listeners and staging's alike (descriptors.listeners).
        assert self.budget is not None
        share, backlog = self.budget.max_connections, self.budget.backlog
        listeners: list[Balancer | ExternalBalancer] = [
            Balancer(role_name, name, ep.model_copy(update={"port": ep.staging_port}),
                     share, backlog, slot=STAGING)
            for role_name, role in new.roles.items() for name, ep in role.endpoints.items()]
        for listener in listeners:
            try:
                await listener.start()
            except OSError as exc:
                for each in listeners:
                    await each.close()
                host, port = listener.address
                why = Conflict(f"cannot listen on {host}:{port} for {listener.label}: "
                               f"{exc.strerror}")
                record = c.history.begin(f"deploy {version}",
                                         {"version": version, "slot": STAGING}, [])
                c.history.end(record, "failed", str(why))
                raise RefusedInPreflight(why) from None
        deployment_id = uuid.uuid4().hex
        home = c.run_dir.path / "deployments" / deployment_id
        mode = os.stat(c.run_dir.path).st_mode & 0o777  # 0711 when a limited user runs hosts
        for folder in (home.parent, home, home / "instances"):
            folder.mkdir(mode=mode, exist_ok=True)
            os.chmod(folder, mode)
        # The production deployment's run_as, standby host, cgroups (one a host: never
        # shared with production's) and set of private ports given out: one controller,
        # one user, no port given twice.
        deployment = dataclasses.replace(
            c.deployment, id=deployment_id, service=new.service, home=home,
            placement=Placement(STAGING), discovery=Discovery())
        return Deployed(deployment, new, version, listeners)

    async def delete(self, slot: str) -> dict[str, Any]:
        """Stop and remove the staging deployment, and close its listeners."""
        if slot != STAGING:
            raise Invalid(f"only the staging slot can be deleted, not {slot!r}: production "
                          "stops with the controller (rolehost stop)")
        c = self.controller
        await c._until_started()
        staged = self.staging
        if staged is None:
            raise NotFound("no staging deployment to delete")
        assert c.history is not None
        with c._exclusive("delete --slot staging"):
            instances = list(staged.instances.values())
            record = c.history.begin("delete", {"slot": STAGING, "version": staged.version},
                                     [i.id for i in instances])
            for listener in staged.listeners:
                listener.stop_accepting()
            await asyncio.gather(*(i.stop("the staging deployment was deleted")
                                   for i in instances))
            for listener in staged.listeners:
                await listener.close()
            for instance in instances:
                instance.output.close()
                staged.deployment.discovery.remove(instance)
                staged.deployment.release_ports(instance.ports.values())
            # Its disks go with it, as a scale-in's; the logs stay, as the record.
            await asyncio.to_thread(discard, instances)
            self.staging = None
            c.history.end(record, "succeeded")
            log.info("staging_deleted", slot=STAGING, version=staged.version,
                     deployment=staged.deployment.id)
            return {"deleted": staged.version, "deployment_id": staged.deployment.id}

    async def swap(self) -> dict[str, Any]:
        """Exchange the deployments behind production's and staging's listeners, every
        input endpoint at once. Refused, with nothing touched, without a staging
        deployment, when the endpoints differ, or while a staging instance is not back."""
        c = self.controller
        await c._until_started()
        assert c.history is not None
        try:
            staged = self.staging
            if staged is None:
                raise NotFound("no staging deployment to swap with (rolehost deploy VERSION "
                               "--slot staging)")
            c._one_at_a_time()
            production = self.production
            ours, theirs = endpoints(production.definition), endpoints(staged.definition)
            if ours != theirs:
                raise Conflict("the input endpoints of the two slots differ (production: "
                               f"{_listed(ours)}; staging: {_listed(theirs)}): a swap "
                               "needs the same names and protocols")
            pairs = {(b.role, b.name): b for b in production.listeners}
            not_back = [f"{i.id} ({i.why_not_back() or i.state.value})"
                        for i in staged.instances.values() if not i.back]
            if not_back:
                raise Conflict(f"staging instances not back (ready and in rotation): "
                               f"{', '.join(not_back)}")
        except DomainError as exc:
            record = c.history.begin("swap", {}, [])
            c.history.end(record, "failed", str(exc))
            raise
        # From here to the end, no await: no request is picked between two listeners'
        # exchanges, and no operation sees half a swap.
        arguments = {"production": staged.version, "staging": production.version}
        record = c.history.begin("swap", arguments, [])
        for listener in staged.listeners:
            public = pairs[listener.role, listener.name]
            # No external endpoint has a staging deployment (_deployable).
            assert isinstance(public, Balancer) and isinstance(listener, Balancer)
            public.exchange(listener)
        production.listeners, staged.listeners = staged.listeners, production.listeners
        self.production, self.staging = staged, production
        staged.deployment.placement.slot, production.deployment.placement.slot = (
            PRODUCTION, STAGING)
        for deployed in (staged, production):
            for instance in deployed.instances.values():
                instance.balancers = _listeners_for(deployed.listeners, instance.role_name)
        c.history.end(record, "succeeded")
        log.info("swapped", production=staged.version, staging=production.version,
                 production_deployment=staged.deployment.id,
                 staging_deployment=production.deployment.id)
        return self.summary()


def _listed(found: dict[str, str]) -> str:
    return ", ".join(f"{name} ({protocol})" for name, protocol in sorted(found.items())) or "none"
