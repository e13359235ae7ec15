"""Changes offered to running instances (settings, topology): one update domain at a time,
or all at once with change_mode "blast", halting at a domain that does not take it; and
what a scale does around that (its new instances getting ready, removed ones' disks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from rolehost.definition import Service
from rolehost.fabric.errors import OperationFailed
from rolehost.fabric.history import History
from rolehost.fabric.instance import Instance
from rolehost.fabric.rolling import Outcome, blast, by_domain, plan, roll

log = structlog.get_logger()


async def offer_by_domain(history: History, service: Service, what: str,
                      instances: list[Instance],
                           outcome: dict[str, str], record: Any,
                           offer: Callable[[Instance], Awaitable[str]],
                           alongside: Awaitable[list[str]] | None = None,
                           awaited: str = "") -> None:
    """Offer a change to `instances` one update domain at a time (all at once with
    change_mode "blast"), filling `outcome` as each answers, and end `record`. A
    domain that does not take the change halts it there, as a walk halts: taking the
    next domain down would leave none serving. OperationFailed if any instance failed.

    `alongside` is the rest of the same operation, running meanwhile (a scale-out's
    new instances getting ready, which `awaited` names): `record` ends once it is over
    too, and the lines it returns are failures of the operation."""
    stages = (blast(instances) if service.change_mode == "blast"
              else plan(by_domain(instances, service.upgrade_domains)))

    def answered(_: object, outcomes: list[Outcome[Instance, str]]) -> None:
        for answer in outcomes:
            outcome[answer.member.id] = (answer.result if isinstance(answer.result, str)
                                         else f"failed: {answer.result}")

    headline: str | None = None
    more: list[str] = []
    over = waiting = False
    try:
        rolled = await roll(stages, lambda i, _: offer(i), answered=answered)
        if rolled.halted is not None:
            headline = f"{what} failed"
            if untouched := [i.id for i in instances if i in rolled.not_reached]:
                domain = rolled.halted.number
                headline = (f"{what} halted in update domain {domain}: not offered "
                            f"to {', '.join(untouched)}, which keep what they had")
                log.error("change_halted", change=what, domain=domain,
                          untouched=untouched)
        if alongside is not None:
            waiting = True
            more = await alongside
        over = True
    finally:
        if headline is None and not over:  # cancelled: the controller is stopping
            # Every domain has taken the change by then: only the wait was cut short.
            headline = (f"cut short while waiting for {awaited or 'the rest of it'}: the "
                        "controller is stopping" if waiting
                        else f"{what} cut short: the controller is stopping")
        failed = [f"{k}: {v}" for k, v in outcome.items() if v.startswith("failed")]
        lines = [line for line in [headline, *failed, *more] if line]
        history.end(record, "failed" if lines else "succeeded",
                         "; ".join(lines) or None)
    if lines:
        raise OperationFailed("\n".join(lines))


async def ready_or_not(instances: list[Instance], started: bool) -> list[str]:
    """Wait until each of `instances` is back (ready and in rotation), or failed (its
    ready deadline) or stopped; one line for each that is not back."""
    if not started:  # nothing would ever end the wait
        return [f"{i.id} was not started: the controller is stopping" for i in instances]
    ready = await asyncio.gather(*(i.back_or_ended() for i in instances))
    return [f"{i.id} did not become ready after it was added: it is {i.state.value} "
            f"({i.reason or i.last_error})" for i, up in zip(instances, ready, strict=True)
            if not up]


def discard(instances: list[Instance]) -> None:
    """Remove the folders of `instances`; one that cannot be removed is reported."""
    for instance in instances:
        try:
            instance.disks.discard()
        except OSError as exc:
            log.error("disks_not_removed", instance=instance.id, folder=str(instance.disks.root),
                      error=str(exc))
