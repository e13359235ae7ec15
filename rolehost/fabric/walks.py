"""Update-domain walks: a maintenance event applied one update domain at a time.

UD 0 first, then 1, ...: within a UD every instance of every role gets the event at
once, and the walk moves on only when each is ready again. An instance that ends
failed, or not ready, halts the walk where it is: a second UD is never taken down
while the first has not come back. In `manual` mode the walk pauses after each UD
it walked (an empty UD is skipped) until `next`; `abort` ends a paused or halted walk.
A deploy's rollback walks back the same way, one UD at a time, from the failed UD down
to UD 0. The rolling from one UD to the next is rolling.py's, as it is for config offers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import structlog

from rolehost.definition import Role
from rolehost.fabric.disks import Maintenance
from rolehost.fabric.errors import Conflict, DomainError
from rolehost.fabric.history import HALTED_AT_STOP, History, Operation
from rolehost.fabric.instance import Instance
from rolehost.fabric.rolling import Domain, Outcome, Rolled, plan, roll

log = structlog.get_logger()
Snapshot = dict[str, Any]  # an instance's, once a step of the walk brought it back


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
            rolled = await roll(plan(self.domains), self._maintain, begin=self._begin,
                                answered=self._answered,
                                between=self._pause if self.manual else None)
            if rolled.halted is not None:
                self.error = _halted_in(rolled)
                log.error("walk_halted", walk=self.id, domain=rolled.halted.number,
                          error=self.error)
                await (self._halt() if self.rollback is None else self._roll_back())
                return
            if rolled.unreached:  # aborted while paused: abort() ended the record
                return
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

    def _begin(self, domain: Domain[Instance]) -> None:
        self.domain = domain.number
        log.info("walk_domain", walk=self.id, domain=domain.number,
                 instances=[i.id for i in domain.members])
        for instance in domain.members:
            self._step(domain.number, instance, "in progress")
        self._history.touched(self.record, [i.id for i in domain.members])

    async def _maintain(self, instance: Instance, domain: int) -> Snapshot:
        return await instance.maintain(
            self.event, f"walk {self.id}, update domain {domain}", wait=True,
            role=self.roles[instance.role_name] if self.roles else None)

    def _answered(self, domain: Domain[Instance],
                  outcomes: list[Outcome[Instance, Snapshot]]) -> None:
        for outcome in outcomes:
            # Not just "failed": that is also an instance state ("waiting for host"), and
            # the instance is most often recycling. Say the step failed, and where it left
            # the instance.
            self._step(domain.number, outcome.member,
                       f"{self.event.value} failed, instance {outcome.member.state.value}"
                       if outcome.failed else "ready")

    async def _pause(self, walked: Domain[Instance]) -> bool:
        """Manual mode, between two domains: wait for `next`; False if aborted instead."""
        self.state = WalkState.PAUSED
        log.info("walk_paused", walk=self.id, after_domain=walked.number)
        await self._resume.wait()
        self._resume.clear()
        if self._aborted:
            return False
        self.state = WalkState.RUNNING
        return True

    async def _halt(self) -> None:
        assert self.error is not None
        self.state = WalkState.HALTED
        self._history.halted(self.record, self.error)
        await self._resume.wait()  # only `abort` moves a halted walk

    async def _roll_back(self) -> None:
        """Put every instance this walk touched back on the version it had, one update
        domain at a time: the failed domain first (it is down already), then back towards
        UD 0. A domain that does not come back halts the rollback there."""
        rollback = self.rollback
        assert rollback is not None
        moved = [[i for i in d if self.progress[i.id] != "pending"] for d in self.domains]
        cause = f"rollback of walk {self.id}"

        def begin(domain: Domain[Instance]) -> None:
            self.domain = domain.number
            log.info("walk_rollback_domain", walk=self.id, domain=domain.number,
                     instances=[i.id for i in domain.members])
            for instance in domain.members:
                self._step(domain.number, instance, "rolling back")

        def answered(domain: Domain[Instance],
                     outcomes: list[Outcome[Instance, Snapshot]]) -> None:
            for outcome in outcomes:
                self._step(domain.number, outcome.member,
                           f"rollback failed: {outcome.error}" if outcome.failed
                           else "rolled back")

        # The domains not yet put back serve while one goes back: all at once, no domain
        # would be in rotation (the platform's rule is one domain down at a time).
        rolled = await roll(plan(moved)[::-1], lambda i, _: i.maintain(
            Maintenance.DEPLOY, cause, wait=True, role=rollback[i.role_name]),
            begin=begin, answered=answered)
        for domain in rolled.unreached:  # on the new version and serving: left for a person
            for instance in domain.members:
                self._step(domain.number, instance, "not rolled back")
        back_count = sum(1 for d in moved for i in d if self.progress[i.id] == "rolled back")
        self.error = (f"{self.error}; rolled back {back_count} of {sum(map(len, moved))} "
                      "instances to the running version")
        if rolled.halted is not None:  # what could not be put back waits for a person: halted
            self.error = f"{self.error}; the rollback {_halted_in(rolled)}"
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


def _halted_in(rolled: Rolled[Instance, Snapshot]) -> str:
    """Where a roll halted, and why: a domain error says it all, anything else (a bug, a
    cancelled wait) shows its type."""
    assert rolled.halted is not None
    return f"halted in update domain {rolled.halted.number}: " + "; ".join(
        str(o.error) if isinstance(o.error, DomainError) else repr(o.error)
        for o in rolled.failures)
