"""A deployment: what every instance run by one controller (or one run-instance) shares.

Its id, the service's settings, the run directory, the console, the standby host, who
limited work runs as, the observer told of every state change, the private ports given
out so far and those never to give, the watch on the hosts' memory, and what the
instances know of each other (discovery).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rolehost.definition import Service
from rolehost.fabric import ports
from rolehost.fabric.discovery import Discovery
from rolehost.fabric.memory import MemoryWatch
from rolehost.fabric.tasks import task_path
from rolehost.observability.logs import Console
from rolehost.processes import ownership, privileges
from rolehost.processes.cgroups import Cgroups
from rolehost.processes.hosts import Standby

if TYPE_CHECKING:
    from rolehost.fabric.instance import Instance


@dataclass
class Placement:
    """The slot a deployment is in: a swap moves it, so it is not the deployment's own."""

    slot: str = "production"

    def fields(self) -> dict[str, str]:
        """What an instance's events add: production, the common case, adds nothing."""
        return {} if self.slot == "production" else {"slot": self.slot}


@dataclass(frozen=True)
class Deployment:
    """What every instance of one controller shares."""

    id: str
    service: Service
    run_dir: Path
    console: Console | None
    standby: Standby
    run_as: privileges.RunAs  # who the hosts and limited tasks run as
    observer: Callable[[Instance], None] | None = None  # told of every state change
    ports: set[int] = field(default_factory=set)  # private ports given to instances
    # The ports the definition fixes (ports.fixed), never given as private ports.
    reserved: list[range] = field(default_factory=list)
    owner: str = ""  # ownership.identity() of the controller: in every process's environment
    cgroups: Cgroups | None = None  # the hosts' cgroups, once the run directory is claimed
    memory: MemoryWatch = field(default_factory=MemoryWatch)  # of every running host
    discovery: Discovery = field(default_factory=Discovery)  # each host's view of the others
    # Where its instances' folders and logs go: the run directory's instances/ and logs/,
    # or, for a staging deployment, its own folder's (fabric/slots.py).
    home: Path | None = None
    placement: Placement = field(default_factory=Placement)

    @property
    def folder(self) -> Path:
        return self.run_dir if self.home is None else self.home

    @classmethod
    def prepare(cls, service: Service, run_dir: Path, console: Console | None,
                observer: Callable[[Instance], None] | None = None) -> Deployment:
        """A new deployment in `run_dir`, which must exist; privileges.Unusable if the
        service's limited_user cannot run its hosts."""
        run_as = privileges.decide(service.limited_user, run_dir)
        owner = ownership.identity()
        environment = {**os.environ, "PATH": task_path(), "ROLEHOST_RUN_DIR": str(run_dir),
                       ownership.CONTROLLER_ENV: owner}
        cgroups = Cgroups(run_dir, owner)
        return cls(id=uuid.uuid4().hex, service=service, run_dir=run_dir, console=console,
                   standby=Standby(environment, run_dir, groups=cgroups), run_as=run_as,
                   observer=observer, owner=owner, cgroups=cgroups)

    def take_port(self, host: str) -> int:
        """A private port for an instance: free, and given to no other instance."""
        port = ports.choose(host, self.ports, reserved=self.reserved)
        self.ports.add(port)
        return port

    def release_ports(self, given: Iterable[int]) -> None:
        self.ports.difference_update(given)
