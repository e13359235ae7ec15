"""systemd's notify protocol (`Type=notify`): READY, STATUS, STOPPING and WATCHDOG.

Nothing happens unless systemd (or a test) sets `NOTIFY_SOCKET`. A failed send is
logged once and never stops the controller.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger()


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.ready = False
        self.stopped = False  # STOPPING=1 sent: every later STATUS says so
        self._status = ""
        self._failed = False
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> None:
        if not self.enabled:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("notify_failed", socket=self.address, error=str(exc))

    def counts(self, ready_by_role: dict[str, tuple[int, int]]) -> None:
        """Report (ready, total) per role, ready meaning back (ready and in rotation on
        every input endpoint); READY=1 once every role has an instance back.
        After STOPPING=1 the counts still fall as instances stop, but STATUS is the line
        `systemctl status` shows: it keeps saying that the service is stopping."""
        status = ", ".join(f"{role} {ready}/{total} ready"
                           for role, (ready, total) in ready_by_role.items())
        if self.stopped:
            status = f"stopping: {status}"
        if status == self._status:
            return
        self._status = status
        # Never READY=1 after STOPPING=1 (a stop during startup): systemd would read it
        # as the start having succeeded.
        if not self.ready and not self.stopped and all(
                ready > 0 for ready, _ in ready_by_role.values()):
            self.ready = True
            self.send(ready="1", status=status)
        else:
            self.send(status=status)

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping at half of WatchdogSec: systemd restarts a controller that goes silent."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not self.enabled or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return
        interval = int(usec) / 2e6

        def ping() -> None:
            self.send(watchdog="1")
            self._watchdog = loop.call_later(interval, ping)

        ping()

    def stopping(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.stopped = True
        self._status = "stopping"
        self.send(stopping="1", status=self._status)
