"""The update-domain roller: one change carried out one update domain at a time.

Walks (maintenance, a deploy, a deploy's rollback) and offers (a settings change, a
topology change after a scale) keep the platform's rule: a change takes down one update
domain at a time. So every member of a domain gets the change at once, and the next
domain gets it only once each has answered and none failed. The first domain with a
failure stops the roll there: taking the next one down as well would leave no domain
serving. The members it never reached keep what they had, and the roll says which.

The roller knows nothing of instances. A member is anything with an `update_domain`,
and a step is any coroutine function, so its rules are tested with no process
(tests/test_rolling.py). What a change records as it goes (a walk's steps, an offer's
outcome per instance) it records from the hooks, as each domain begins and answers:
a roll that is cancelled (the controller stopping) leaves that record where it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class InDomain(Protocol):
    @property
    def update_domain(self) -> int: ...


T = TypeVar("T")
M = TypeVar("M", bound=InDomain)
R = TypeVar("R")


def by_domain(members: Iterable[M], count: int) -> list[list[M]]:
    """`members` by update domain, UD 0 first: all `count` domains, empty ones too."""
    listed = list(members)
    return [[m for m in listed if m.update_domain == ud] for ud in range(count)]


@dataclass(frozen=True)
class Domain(Generic[T]):
    """One stage of a roll: the members of update domain `number`."""

    number: int
    members: list[T]


def plan(groups: Sequence[Sequence[T]]) -> list[Domain[T]]:
    """The stages of a roll through `groups` (update domains, UD 0 first), each numbered by
    its place. Empty ones are left out: with fewer members than domains, the last domains
    are empty, and a stage there would pause or fail with nothing to roll."""
    return [Domain(number, list(group)) for number, group in enumerate(groups) if group]


def blast(members: Sequence[T]) -> list[Domain[T]]:
    """Every member in one stage (change_mode "blast"): nothing is left unreached."""
    return [Domain(0, list(members))] if members else []


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    member: T
    domain: int
    result: R | BaseException  # what the step returned, or raised: then the member failed

    @property
    def error(self) -> BaseException | None:
        return self.result if isinstance(self.result, BaseException) else None

    @property
    def failed(self) -> bool:
        return isinstance(self.result, BaseException)


@dataclass
class Rolled(Generic[T, R]):
    """How a roll ended. `halted` is the domain where a member failed; `unreached` the
    domains that never began, after a halt or when `between` stopped the roll."""

    outcomes: list[Outcome[T, R]] = field(default_factory=list)
    halted: Domain[T] | None = None
    unreached: list[Domain[T]] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome[T, R]]:
        return [outcome for outcome in self.outcomes if outcome.failed]

    @property
    def not_reached(self) -> list[T]:
        return [member for domain in self.unreached for member in domain.members]


async def roll(
    stages: Sequence[Domain[T]],
    step: Callable[[T, int], Awaitable[R]],
    *,
    begin: Callable[[Domain[T]], None] | None = None,
    answered: Callable[[Domain[T], list[Outcome[T, R]]], None] | None = None,
    between: Callable[[Domain[T]], Awaitable[bool]] | None = None,
) -> Rolled[T, R]:
    """Run `step(member, domain number)` on every member of each of `stages` in turn, a
    stage's members all at once, until a stage has a member whose step raised.

    `begin` is told of a stage before its steps start; `answered` of its outcomes, in
    the order of its members, once every one has answered. `between` is awaited after a
    stage that went well, before the next one begins: False stops the roll there (a walk
    aborted while it paused). Cancelled, the roll cancels the steps under way, and no
    stage begins after them; the outcomes of that stage are not reported."""
    rolled: Rolled[T, R] = Rolled()
    for position, stage in enumerate(stages):
        if position and between is not None and not await between(stages[position - 1]):
            rolled.unreached = list(stages[position:])
            break
        if begin is not None:
            begin(stage)
        results = await asyncio.gather(*(step(m, stage.number) for m in stage.members),
                                       return_exceptions=True)
        outcomes = [Outcome(member, stage.number, result)
                    for member, result in zip(stage.members, results, strict=True)]
        rolled.outcomes += outcomes
        if answered is not None:
            answered(stage, outcomes)
        if any(outcome.failed for outcome in outcomes):
            rolled.halted = stage
            rolled.unreached = list(stages[position + 1:])
            break
    return rolled
