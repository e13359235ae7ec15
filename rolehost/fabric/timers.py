"""An instance's timers, by name: what `Lifecycle` asks for with a schedule-timer action
("ready deadline", "silent", "stop"), carried out on the event loop. Scheduling a name
again replaces its timer; the boot's end cancels them all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

# A timer looked at twice fires this long after it expired, unless scheduled again in
# between. Not 0: under libuv (uvloop), a timer due now may run before the next poll for I/O.
SECOND_LOOK = 0.01


class Timers:
    def __init__(self, look_twice: Collection[str] = ()) -> None:
        """`look_twice`: the timers that wait for one more poll of the loop before they
        fire. The silence of a host is one: a controller that was busy itself may not
        yet have read the heartbeat that came in time, and reading it schedules the
        timer again."""
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._look_twice = frozenset(look_twice)

    def schedule(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `delay` seconds, unless `name` is cancelled or scheduled
        again first."""
        self.cancel(name)
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._handles.pop(name, None)
            callback()

        def look() -> None:
            self._handles[name] = loop.call_later(SECOND_LOOK, fire)

        first = look if name in self._look_twice else fire
        self._handles[name] = loop.call_later(delay, first)

    def cancel(self, name: str) -> None:
        if (handle := self._handles.pop(name, None)) is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for name in list(self._handles):
            self.cancel(name)

    def __contains__(self, name: str) -> bool:
        return name in self._handles
