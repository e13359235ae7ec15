"""A maintenance operation on one instance (a restart, a reimage, a deploy's new
version...): claimed, then begun by the instance's supervisor at its next turn, and
settled when the instance is back or has ended otherwise (`lifecycle.settled`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rolehost.definition import Role
from rolehost.fabric.disks import Maintenance
from rolehost.fabric.lifecycle import State


@dataclass
class Operation:
    kind: Maintenance
    cause: str
    done: asyncio.Future[State]  # the state the instance settled in after it
    started: bool = False
    role: Role | None = None  # a deploy's new version of the role

    @property
    def name(self) -> str:
        """`kind: cause`, as `status` shows it and the boot's reason says it."""
        return f"{self.kind.value}: {self.cause}"
