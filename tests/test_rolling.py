"""The update-domain roller's rules, with fake members and steps: no process. Walks,
deploys, their rollbacks and config offers all roll through it; their process-level
tests are test_walks.py, test_deploy.py, test_changes.py and test_scale.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from rolehost.fabric.rolling import Domain, Outcome, Rolled, blast, by_domain, plan, roll

T = TypeVar("T")
WAIT = 5.0  # seconds: a roll of fake steps that takes longer is stuck


@dataclass(frozen=True)
class Member:
    name: str
    update_domain: int


def members(count: int, domains: int) -> list[Member]:
    """web_0 .. web_{count-1}, in domains as the controller puts instances: index % domains."""
    return [Member(f"web_{n}", n % domains) for n in range(count)]


def run(work: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(work, WAIT)

    return asyncio.run(bounded())


class Steps:
    """A step that records when each member starts and answers, and fails the named ones."""

    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.failing = failing
        self.log: list[str] = []

    async def __call__(self, member: Member, domain: int) -> str:
        self.log.append(f"start {member.name} in {domain}")
        await asyncio.sleep(0)  # every member of the stage starts before any answers
        self.log.append(f"end {member.name}")
        if member.name in self.failing:
            raise RuntimeError(f"{member.name} did not come back")
        return f"{member.name} done"


def names(found: list[Member]) -> list[str]:
    return [m.name for m in found]


def test_members_are_grouped_by_update_domain_and_empty_domains_are_not_stages() -> None:
    groups = by_domain(members(3, 5), 5)
    assert [names(g) for g in groups] == [["web_0"], ["web_1"], ["web_2"], [], []]
    stages = plan(groups)
    assert [(s.number, names(s.members)) for s in stages] == [
        (0, ["web_0"]), (1, ["web_1"]), (2, ["web_2"])]
    # A stage keeps its domain's number when an earlier domain is empty.
    assert [s.number for s in plan([[], groups[1]])] == [1]


def test_domains_go_one_after_the_other_and_a_domain_all_at_once() -> None:
    steps = Steps()
    rolled = run(roll(plan(by_domain(members(4, 2), 2)), steps))
    assert steps.log == [
        "start web_0 in 0", "start web_2 in 0", "end web_0", "end web_2",
        "start web_1 in 1", "start web_3 in 1", "end web_1", "end web_3",
    ]
    assert [(o.member.name, o.domain, o.result) for o in rolled.outcomes] == [
        ("web_0", 0, "web_0 done"), ("web_2", 0, "web_2 done"),
        ("web_1", 1, "web_1 done"), ("web_3", 1, "web_3 done")]
    assert rolled.halted is None and rolled.unreached == [] and rolled.failures == []


def test_the_first_domain_with_a_failure_stops_the_roll_and_says_who_was_not_reached() -> None:
    steps = Steps(failing=("web_1",))
    rolled = run(roll(plan(by_domain(members(6, 3), 3)), steps))
    # Every member of the failing domain answers; no later domain begins.
    assert steps.log == [
        "start web_0 in 0", "start web_3 in 0", "end web_0", "end web_3",
        "start web_1 in 1", "start web_4 in 1", "end web_1", "end web_4",
    ]
    assert rolled.halted is not None and rolled.halted.number == 1
    assert [(o.member.name, o.failed) for o in rolled.outcomes] == [
        ("web_0", False), ("web_3", False), ("web_1", True), ("web_4", False)]
    assert [str(o.error) for o in rolled.failures] == ["web_1 did not come back"]
    assert [s.number for s in rolled.unreached] == [2]
    assert names(rolled.not_reached) == ["web_2", "web_5"]


def test_a_failure_in_the_last_domain_leaves_nothing_unreached() -> None:
    rolled = run(roll(plan(by_domain(members(2, 2), 2)), Steps(failing=("web_1",))))
    assert rolled.halted is not None and rolled.halted.number == 1
    assert rolled.unreached == []


def test_blast_mode_offers_every_member_at_once_and_leaves_none_unreached() -> None:
    steps = Steps(failing=("web_0",))
    rolled = run(roll(blast(members(4, 2)), steps))
    assert steps.log[:4] == [f"start web_{n} in 0" for n in range(4)]
    assert len(rolled.outcomes) == 4 and names([o.member for o in rolled.failures]) == ["web_0"]
    assert rolled.halted is not None and rolled.not_reached == []
    assert blast([]) == []


def test_hooks_see_each_domain_begin_and_answer_in_order() -> None:
    seen: list[str] = []

    def begin(stage: Domain[Member]) -> None:
        seen.append(f"begin {stage.number}: {', '.join(names(stage.members))}")

    def answered(stage: Domain[Member], outcomes: list[Outcome[Member, str]]) -> None:
        seen.append(f"answered {stage.number}: {[o.result for o in outcomes]}")

    run(roll(plan(by_domain(members(3, 2), 2)), Steps(), begin=begin, answered=answered))
    assert seen == ["begin 0: web_0, web_2", "answered 0: ['web_0 done', 'web_2 done']",
                    "begin 1: web_1", "answered 1: ['web_1 done']"]


def test_between_is_asked_only_between_domains_and_can_stop_the_roll() -> None:
    asked: list[int] = []

    def stop_after(last: int) -> Callable[[Domain[Member]], Awaitable[bool]]:
        async def between(done: Domain[Member]) -> bool:
            asked.append(done.number)
            return done.number < last

        return between

    steps = Steps()
    rolled = run(roll(plan(by_domain(members(3, 3), 3)), steps, between=stop_after(9)))
    assert asked == [0, 1]  # not before the first domain, not after the last
    assert rolled.unreached == []

    asked.clear()
    steps = Steps()
    rolled = run(roll(plan(by_domain(members(3, 3), 3)), steps, between=stop_after(0)))
    assert asked == [0] and steps.log == ["start web_0 in 0", "end web_0"]
    # Stopped, not halted: no member failed.
    assert rolled.halted is None and names(rolled.not_reached) == ["web_1", "web_2"]


def test_a_cancelled_roll_cancels_the_steps_under_way_and_begins_no_other_domain() -> None:
    began: list[int] = []
    answered: list[int] = []
    cancelled: list[str] = []
    under_way = 0

    async def hangs(member: Member, domain: int) -> None:
        nonlocal under_way
        under_way += 1
        try:
            await asyncio.sleep(WAIT * 2)  # cancelled long before
        except asyncio.CancelledError:
            cancelled.append(member.name)
            raise

    async def scenario() -> None:
        task = asyncio.ensure_future(roll(
            plan(by_domain(members(4, 2), 2)), hangs,
            begin=lambda s: began.append(s.number),
            answered=lambda s, o: answered.append(s.number)))
        for _ in range(100):  # a bound on the turns of the loop until both steps run
            if under_way == 2:
                break
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert sorted(cancelled) == ["web_0", "web_2"]
    assert began == [0] and answered == []


def test_a_roll_through_no_domain_does_nothing() -> None:
    steps = Steps()
    assert run(roll(plan([[], []]), steps)) == Rolled()
    assert steps.log == []
