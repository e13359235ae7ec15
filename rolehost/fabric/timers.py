"""An instance's timers, by name: what `Lifecycle` asks for with a schedule-timer action
("ready deadline", "silent", "stop"), carried out on the event loop. Scheduling a name
again replaces its timer; the boot's end cancels them all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timers:
    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def schedule(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `delay` seconds, unless `name` is cancelled or scheduled
        again first."""
        self.cancel(name)

        def fire() -> None:
            self._handles.pop(name, None)
            callback()

        self._handles[name] = asyncio.get_running_loop().call_later(delay, fire)

    def cancel(self, name: str) -> None:
        if (handle := self._handles.pop(name, None)) is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for name in list(self._handles):
            self.cancel(name)

    def __contains__(self, name: str) -> bool:
        return name in self._handles
