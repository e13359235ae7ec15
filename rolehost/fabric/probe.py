"""Health probes of an instance's endpoint: an HTTP GET of a path, or a TCP connect."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

import structlog

from rolehost.definition import Probe
from rolehost.fabric.lifecycle import ProbeResult as Result

log = structlog.get_logger()


async def once(host: str, port: int, spec: Probe) -> tuple[bool, str]:
    """One probe: (passed, what was seen)."""
    try:
        async with asyncio.timeout(spec.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if spec.path is None:
                    return True, "connected"
                writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                             "Connection: close\r\n\r\n".encode())
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return False, f"no answer within {spec.timeout:g}s"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    except ValueError:  # a status line over the reader's 64 KiB limit
        return False, "malformed answer"
    parts = status_line.split()
    # Three digits, as a status code has: int() of a longer run could raise, or be huge.
    code = int(parts[1]) if len(parts) > 1 and len(parts[1]) == 3 and parts[1].isdigit() else 0
    return 200 <= code < 400, f"HTTP {code}" if code else "not an HTTP answer"


async def watch(host: str, port: int, spec: Probe, report: Callable[[Result], None]) -> None:
    """Probe at `spec.interval` forever; report healthy after `healthy` passes in a row,
    unhealthy after `unhealthy` failures in a row (and every result while unhealthy)."""
    healthy, passes, failures = False, 0, 0
    while True:
        try:
            passed, seen = await once(host, port, spec)
        except Exception as exc:
            # Nothing awaits this task: were it to end, the instance's rotation would
            # freeze where it is. An answer `once` did not foresee is a failed probe.
            log.error("probe_error", host=host, port=port, error=repr(exc), exc_info=exc)
            passed, seen = False, f"probe error: {type(exc).__name__}"
        passes, failures = (passes + 1, 0) if passed else (0, failures + 1)
        if not healthy and passes >= spec.healthy:
            healthy = True
        elif healthy and failures >= spec.unhealthy:
            healthy = False
        report(Result(healthy, seen, passes))
        await asyncio.sleep(spec.interval)


def watch_all(instance_id: str, targets: dict[str, tuple[str, int, Probe]],
              report: Callable[[str, Result], None]) -> list[asyncio.Future[None]]:
    """A watch per endpoint of `targets` (name: host, port, probe), each reporting
    `report(name, result)`, until cancelled."""
    tasks: list[asyncio.Future[None]] = [
        asyncio.ensure_future(watch(host, port, spec, functools.partial(report, name)))
        for name, (host, port, spec) in targets.items()]
    for task in tasks:
        task.add_done_callback(functools.partial(_ended, instance_id))
    return tasks


def _ended(instance_id: str, task: asyncio.Future[None]) -> None:
    """A watch runs until cancelled: one that ended froze the rotation, a bug that must
    show (`watch` turns failures of a probe into failed probes)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.critical("probe_crashed", instance=instance_id, error=repr(error), exc_info=error)
