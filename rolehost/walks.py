"""Update-domain walks: a maintenance event applied one update domain at a time.

UD 0 first, then 1, ...: within a UD every instance of every role gets the event at
once, and the walk moves on only when each is ready again. An instance that ends
failed, or not ready, halts the walk where it is: a second UD is never taken down
while the first has not come back. In `manual` mode the walk pauses after each UD
it walked (an empty UD is skipped) until `next`; `abort` ends a paused or halted walk.
A deploy's rollback walks back the same way, one UD at a time, from the failed UD down
to UD 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import structlog

from rolehost.definition import Role
from rolehost.disks import Maintenance
from rolehost.errors import Conflict, DomainError
from rolehost.history import HALTED_AT_STOP, History, Operation
from rolehost.instance import Instance

log = structlog.get_logger()


class WalkState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # manual mode, between two UDs
    HALTED = "halted"  # an instance did not come back: waiting for `abort`
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled back"  # a deploy that halted, its moved instances put back


class Walk:
    """One walk. A deploy passes the new version's `roles`, and the running ones as
    `rollback` to put moved instances back if a domain does not come back, and says in
    `arguments` what its history record should (a deploy: the version, and the one it
    replaces)."""

    def __init__(
        self,
        label: str,
        event: Maintenance,
        manual: bool,
        domains: list[list[Instance]],
        history: History,
        roles: dict[str, Role] | None = None,
        rollback: dict[str, Role] | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.label, self.event, self.manual, self.domains = label, event, manual, domains
        self.roles, self.rollback = roles, rollback
        self.state = WalkState.RUNNING
        self.domain = 0
        self.error: str | None = None
        self.progress: dict[str, str] = {i.id: "pending" for d in domains for i in d}
        # Every change of `progress`, in order: a poll sees where each instance is, and
        # misses the steps taken since the last one (a domain ready, then rolled back).
        self.steps: list[dict[str, Any]] = []
        # The record lists an instance once its domain is walked: one a walk halted or
        # aborted before never had the event.
        self.record: Operation = history.begin(
            label, {**(arguments or {}), "mode": "manual" if manual else "auto"}, []
        )
        self._history = history
        # Awaited once every domain is done, before the walk is over: what it does (a
        # deploy's switch of version and scale) still holds the service.
        self.on_success: Callable[[], Awaitable[None]] | None = None
        self._resume = asyncio.Event()
        self._aborted = False
        self.task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def over(self) -> bool:
        return self.state in (WalkState.SUCCEEDED, WalkState.ABORTED, WalkState.ROLLED_BACK)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._walk(), name=f"walk {self.id}")

    async def _walk(self) -> None:
        try:
            # With fewer instances than domains, the last domains are empty: a pause after
            # one, or before one, would wait for `next` with nothing walked or to walk.
            walked = [number for number, instances in enumerate(self.domains) if instances]
            for number in walked:
                self.domain = number
                if not await self._domain(number, self.domains[number]):
                    return
                if self.manual and number < walked[-1]:
                    self.state = WalkState.PAUSED
                    log.info("walk_paused", walk=self.id, after_domain=number)
                    await self._resume.wait()
                    self._resume.clear()
                    if self._aborted:
                        return
                    self.state = WalkState.RUNNING
            if self.on_success is not None:
                try:
                    await self.on_success()
                except asyncio.CancelledError:
                    # Every domain moved (a deploy switched version first thing): the walk
                    # did succeed; what followed it is what the controller's stop cut short.
                    self.error = "after the last domain: cut short, the controller is stopping"
                    self.state = WalkState.SUCCEEDED
                    self._history.end(self.record, "succeeded", self.error)
                    raise
                except Exception as exc:  # every domain is done: the walk succeeded all the same
                    self.error = f"after the last domain: {exc}"
                    log.error("walk_finish_failed", walk=self.id, error=self.error)
            self.state = WalkState.SUCCEEDED
            self._history.end(self.record, "succeeded", self.error)
        except asyncio.CancelledError:
            if self.state is WalkState.HALTED:
                # It had failed already, and an `abort` would have said so: a stop ends it
                # the same way, as the next controller ends one whose controller was killed.
                self.state = WalkState.ABORTED
                self._history.end(self.record, "failed", f"{self.error}; {HALTED_AT_STOP}")
            elif not self.over:
                self.state = WalkState.ABORTED
                self._history.end(self.record, "aborted", "the controller is stopping")
            raise

    async def _domain(self, number: int, instances: list[Instance]) -> bool:
        log.info("walk_domain", walk=self.id, domain=number,
                 instances=[i.id for i in instances])
        for instance in instances:
            self._step(number, instance, "in progress")
        self._history.touched(self.record, [i.id for i in instances])
        cause = f"walk {self.id}, update domain {number}"
        results = await asyncio.gather(
            *(i.maintain(self.event, cause, wait=True,
                         role=self.roles[i.role_name] if self.roles else None)
              for i in instances),
            return_exceptions=True,
        )
        failed = []
        for instance, result in zip(instances, results, strict=True):
            if isinstance(result, BaseException):
                # Not just "failed": that is also an instance state ("waiting for host"),
                # and the instance is most often recycling. Say the step failed, and where
                # it left the instance.
                self._step(number, instance,
                           f"{self.event.value} failed, instance {instance.state.value}")
                failed.append(str(result) if isinstance(result, DomainError) else repr(result))
            else:
                self._step(number, instance, "ready")
        if not failed:
            return True
        self.error = f"halted in update domain {number}: " + "; ".join(failed)
        log.error("walk_halted", walk=self.id, domain=number, error=self.error)
        if self.rollback is not None:
            await self._roll_back()
            return False
        await self._halt()
        return False

    async def _halt(self) -> None:
        assert self.error is not None
        self.state = WalkState.HALTED
        self._history.halted(self.record, self.error)
        await self._resume.wait()  # only `abort` moves a halted walk

    async def _roll_back(self) -> None:
        """Put every instance this walk touched back on the version it had, one update
        domain at a time: the failed domain first (it is down already), then back towards
        UD 0. A domain that does not come back halts the rollback there."""
        assert self.rollback is not None
        moved = [i for d in self.domains for i in d if self.progress[i.id] != "pending"]
        cause = f"rollback of walk {self.id}"
        # The domains not yet put back serve while one goes back: all at once, no domain
        # would be in rotation (the platform's rule is one domain down at a time).
        halted: str | None = None
        for number in range(len(self.domains) - 1, -1, -1):
            instances = [i for i in self.domains[number] if self.progress[i.id] != "pending"]
            if not instances:
                continue
            if halted is not None:  # on the new version and serving: left for a person
                for instance in instances:
                    self._step(number, instance, "not rolled back")
                continue
            self.domain = number
            log.info("walk_rollback_domain", walk=self.id, domain=number,
                     instances=[i.id for i in instances])
            for instance in instances:
                self._step(number, instance, "rolling back")
            results = await asyncio.gather(
                *(i.maintain(Maintenance.DEPLOY, cause, wait=True,
                             role=self.rollback[i.role_name])
                  for i in instances),
                return_exceptions=True,
            )
            failed = []
            for instance, result in zip(instances, results, strict=True):
                if isinstance(result, BaseException):
                    self._step(number, instance, f"rollback failed: {result}")
                    failed.append(str(result) if isinstance(result, DomainError)
                                  else repr(result))
                else:
                    self._step(number, instance, "rolled back")
            if failed:
                halted = f"the rollback halted in update domain {number}: " + "; ".join(failed)
        back = sum(1 for i in moved if self.progress[i.id] == "rolled back")
        self.error = (f"{self.error}; rolled back {back} of {len(moved)} instances to the "
                      "running version")
        if halted is not None:  # what could not be put back waits for a person: halted
            self.error = f"{self.error}; {halted}"
            log.error("walk_rollback_halted", walk=self.id, error=self.error)
            await self._halt()
            return
        self.state = WalkState.ROLLED_BACK
        self._history.end(self.record, "failed", self.error)

    def _step(self, domain: int, instance: Instance, step: str) -> None:
        self.progress[instance.id] = step
        self.steps.append({"seq": len(self.steps) + 1, "instance": instance.id,
                           "domain": domain, "step": step})

    def next(self) -> None:
        if self.state is not WalkState.PAUSED:
            raise Conflict(f"walk {self.id} is {self.state.value}, not paused")
        self._resume.set()

    def abort(self) -> None:
        if self.state not in (WalkState.PAUSED, WalkState.HALTED):
            raise Conflict(
                f"walk {self.id} is {self.state.value}: only a paused or halted walk can be aborted"
            )
        self._aborted = True
        outcome = "failed" if self.state is WalkState.HALTED else "aborted"
        self.state = WalkState.ABORTED
        self._history.end(self.record, outcome, self.error or "aborted by request")
        self._resume.set()

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """The walk as it stands, with its steps after the `since`-th (a follower asks
        only for those it has not shown)."""
        return {
            "id": self.id, "label": self.label, "state": self.state.value,
            "mode": "manual" if self.manual else "auto", "domain": self.domain,
            "domains": [[i.id for i in d] for d in self.domains], "progress": self.progress,
            "steps": self.steps[since:], "error": self.error,
            "seconds": round(time.time() - self.record.started, 3),
        }


def domains(instances: list[Instance], count: int) -> list[list[Instance]]:
    """Instances by update domain, UD 0 first."""
    return [[i for i in instances if i.update_domain == ud] for ud in range(count)]
