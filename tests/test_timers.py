"""An instance's timers (fabric/timers.py): a timer pushed back keeps its loop timer
(the silence timer is pushed back at every message of its host: issue 23), and still
fires at its last deadline, looked at twice where asked; one moved earlier fires then."""

from __future__ import annotations

import asyncio

import pytest

from rolehost.fabric import timers as timers_module
from rolehost.fabric.timers import SECOND_LOOK, Timers


def test_pushed_back_a_timer_keeps_its_loop_timer_and_fires_at_its_last_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers, fired = Timers(look_twice={"silent"}), dict[str, float]()
        armed = 0
        call_later = loop.call_later

        def counting(*args: object) -> asyncio.TimerHandle:
            nonlocal armed
            armed += getattr(args[1], "__module__", "") == timers_module.__name__  # not sleeps
            return call_later(*args)  # type: ignore[arg-type]

        loop.call_later = counting  # type: ignore[method-assign]
        began = loop.time()
        for _ in range(100):  # a hundred heartbeats, each pushing the deadline back
            heard = loop.time()
            timers.schedule("silent", 1.0, lambda: fired.setdefault("silent", loop.time()))
            await asyncio.sleep(0.002)
        # One loop timer for the hundred schedules (and one more each time it came
        # meanwhile, a second after it was armed: on a busy machine, the loop may be slow).
        assert armed <= 1 + (heard - began) // 1.0
        # Moved earlier: a loop timer of its own, at the new deadline.
        moved = loop.time()
        timers.schedule("stop", 5.0, lambda: fired.setdefault("stop", loop.time()))
        timers.schedule("stop", 0.05, lambda: fired.setdefault("stop", loop.time()))
        # Cancelled: never fires, even with its loop timer still to come.
        timers.schedule("gone", 0.05, lambda: fired.setdefault("gone", loop.time()))
        timers.cancel("gone")
        while "silent" not in fired:
            assert loop.time() - began < 10, "the silence timer never fired"
            await asyncio.sleep(0.01)
        # The last deadline, looked at twice.
        assert fired["silent"] >= heard + 1.0 + SECOND_LOOK - 0.002
        assert moved + 0.05 - 0.002 <= fired["stop"] < moved + 1.0
        assert "gone" not in fired and "silent" not in timers and "stop" not in timers

    asyncio.run(main())


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_a_timer_heard_in_its_second_look_waits_its_whole_delay_again(
        loop_factory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timers_module, "SECOND_LOOK", 1.0)  # a second look one can aim at
    if loop_factory == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        timers, fired = Timers(look_twice={"silent"}), list[float]()
        timers.schedule("silent", 0.05, lambda: fired.append(loop.time()))
        await asyncio.sleep(0.3)  # expired, in its second look
        heard = loop.time()
        timers.schedule("silent", 0.1, lambda: fired.append(loop.time()))
        while not fired:
            assert loop.time() - heard < 10
            await asyncio.sleep(0.01)
        assert fired[0] >= heard + 0.1 - 0.002 and len(fired) == 1

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
