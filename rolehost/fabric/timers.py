"""An instance's timers, by name: what `Lifecycle` asks for with a schedule-timer action
("ready deadline", "silent", "stop"), carried out on the event loop. Scheduling a name
again replaces its timer; the boot's end cancels them all.

Pushed back, a timer keeps its loop timer and only moves its deadline: the silence timer
is scheduled again at every message of its host (a heartbeat every 2 s), and cancelling a
loop timer and making another each time was much of the idle controller's work at
hundreds of instances (issue 23). The loop timer, when it comes, sees the later deadline
and waits the rest of the way; a deadline moved earlier gets a loop timer of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass

# A timer looked at twice fires this long after it expired, unless scheduled again in
# between. Not 0: under libuv (uvloop), a timer due now may run before the next poll for I/O.
SECOND_LOOK = 0.01
# A loop timer that comes this little before its deadline fires (libuv counts whole ms).
_EARLY = 0.002


@dataclass
class _Timer:
    due: float  # loop time
    callback: Callable[[], None]
    handle: asyncio.TimerHandle | None = None
    at: float = 0.0  # when `handle` runs, loop time
    looked: bool = False  # expired once, and waiting for the second look


class Timers:
    def __init__(self, look_twice: Collection[str] = ()) -> None:
        """`look_twice`: the timers that wait for one more poll of the loop before they
        fire. The silence of a host is one: a controller that was busy itself may not
        yet have read the heartbeat that came in time, and reading it schedules the
        timer again."""
        self._timers: dict[str, _Timer] = {}
        self._look_twice = frozenset(look_twice)
        self._loop: asyncio.AbstractEventLoop | None = None

    def schedule(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `delay` seconds, unless `name` is cancelled or scheduled
        again first."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        due = self._loop.time() + delay
        timer = self._timers.get(name)
        if timer is not None and timer.handle is not None and timer.at <= due:
            timer.due, timer.callback, timer.looked = due, callback, False  # pushed back
            return
        self.cancel(name)
        timer = self._timers[name] = _Timer(due, callback)
        self._arm(name, timer, delay)

    def _arm(self, name: str, timer: _Timer, delay: float) -> None:
        assert self._loop is not None
        timer.at = self._loop.time() + delay
        timer.handle = self._loop.call_later(delay, self._come, name, timer)

    def _come(self, name: str, timer: _Timer) -> None:
        if self._timers.get(name) is not timer:  # cancelled or replaced meanwhile
            return
        assert self._loop is not None
        left = timer.due - self._loop.time()
        if left > _EARLY:  # pushed back since it was armed: the rest of the way
            self._arm(name, timer, left)
        elif name in self._look_twice and not timer.looked:
            timer.looked = True
            timer.due = self._loop.time() + SECOND_LOOK
            self._arm(name, timer, SECOND_LOOK)
        else:
            del self._timers[name]
            timer.callback()

    def cancel(self, name: str) -> None:
        if (timer := self._timers.pop(name, None)) is not None and timer.handle is not None:
            timer.handle.cancel()

    def cancel_all(self) -> None:
        for name in list(self._timers):
            self.cancel(name)

    def __contains__(self, name: str) -> bool:
        return name in self._timers
