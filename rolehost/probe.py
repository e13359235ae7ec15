"""Health probes of an instance's endpoint: an HTTP GET of a path, or a TCP connect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from rolehost.definition import Probe


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
    parts = status_line.split()
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return 200 <= code < 400, f"HTTP {code}" if code else "not an HTTP answer"


async def watch(host: str, port: int, spec: Probe, report: Callable[[bool, str], None]) -> None:
    """Probe at `spec.interval` forever; report healthy after `healthy` passes in a row,
    unhealthy after `unhealthy` failures in a row (and every result while unhealthy)."""
    healthy, passes, failures = False, 0, 0
    while True:
        passed, seen = await once(host, port, spec)
        passes, failures = (passes + 1, 0) if passed else (0, failures + 1)
        if not healthy and passes >= spec.healthy:
            healthy = True
        elif healthy and failures >= spec.unhealthy:
            healthy = False
        report(healthy, seen)
        await asyncio.sleep(spec.interval)
