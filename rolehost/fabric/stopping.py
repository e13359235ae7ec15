"""The end of a boot, carried out: the drain before a host is asked to stop, and the
startup tasks that outlive their host (foreground ones may hold the end up to what is
left of the stop's deadline, then everything of the boot goes). What counts as an
overrun, and who owns the deadline, is the instance's lifecycle's (docs/design.md,
"Who owns which timeout")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Iterable
from typing import Any

import structlog

from rolehost.balancer import Balancer
from rolehost.balancer.external import ExternalBalancer
from rolehost.fabric.tasks import TaskRun, Tasks
from rolehost.processes.process import signal_tree, sweep

log = structlog.get_logger()


async def unless(work: Awaitable[Any], event: asyncio.Event) -> bool:
    """Await `work` unless `event` is set first, which cancels it: False then. The
    work's own exception propagates."""
    job = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(event.wait())
    await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not job.done():
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        return False
    job.result()
    return True


async def drain(balancers: Iterable[Balancer | ExternalBalancer], instance_id: str, reason: str,
                forced: asyncio.Event) -> None:
    """Let the requests in flight on every balancer finish (each endpoint's
    drain_timeout): a stop cut short (`forced`) waits for none of them."""
    waits = [b.drain(instance_id, reason) for b in balancers]
    if waits:
        await unless(asyncio.gather(*waits), forced)


async def end_tasks(tasks: Tasks, instance_id: str, boot_token: str, limit: float,
                    forced: asyncio.Event) -> list[TaskRun]:
    """The boot is over: its foreground tasks may run on for `limit` seconds (none if
    once `forced`: a stop cut short), then every task of the boot and its descendants are
    killed. Returns the foreground tasks killed for running past `limit` (none if forced:
    killed, not waited for)."""
    tasks.ended = True  # kept for `status` until the next boot begins
    overran: list[TaskRun] = []
    if tasks.foreground and not forced.is_set():
        log.info("waiting_for_foreground_tasks", instance=instance_id,
                 tasks=[r.label for r in tasks.foreground])
        overran = await tasks.wait_foreground(max(0.0, limit))
    tasks.kill()
    if forced.is_set():  # a task's detached descendants get no SIGTERM grace
        await asyncio.to_thread(signal_tree, None, boot_token, signal.SIGKILL)
    await asyncio.to_thread(sweep, None, boot_token)
    return [] if forced.is_set() else overran
