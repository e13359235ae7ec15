"""The launcher's order and its stop signals, with fake instances and the process-wide
pieces (the orphan reaper, the signal handlers) stubbed: they would stay on in the test
process. The drivers' process-level tests are test_run_instance.py (a second signal,
signals after the stop), faults/test_controller.py and test_build_check.py."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from rolehost import definition
from rolehost.fabric.instance import Instance
from rolehost.fabric.launcher import Launcher
from rolehost.processes import process

WAIT = 5.0  # seconds: fake stops that take longer are stuck


class FakeInstance:
    def __init__(self, name: str, seen: list[str],
                 before_return: Callable[[], None] | None = None) -> None:
        self.name, self.seen, self.before_return = name, seen, before_return

    def start(self) -> None:
        self.seen.append(f"start {self.name}")

    async def stop(self, reason: str) -> None:
        await asyncio.sleep(0)
        self.seen.append(f"stop {self.name} ({reason})")
        if self.before_return is not None:
            self.before_return()


def fakes(*instances: FakeInstance) -> list[Instance]:
    return cast(list[Instance], list(instances))


@dataclass
class Rig:
    launcher: Launcher
    seen: list[str]  # what the launcher and the fakes were asked to do, in order
    handler: list[Callable[[int], None]]  # the stop-signal handler, once `supervise` ran


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    """A launcher whose reaper, signal handlers and standby host only record."""
    parsed = definition.parse({"service": {"name": "s", "limited_user": "root"},
                               "roles": {"web": {"entry_point": "m:C", "app": "."}}},
                              tmp_path / "rolehost.toml")
    seen: list[str] = []
    handler: list[Callable[[int], None]] = []

    def adopt(loop: asyncio.AbstractEventLoop) -> bool:
        seen.append("adopt")
        return True

    monkeypatch.setattr(process, "adopt_orphans", adopt)
    monkeypatch.setattr(process, "handle_stop_signals",
                        lambda loop, callback: handler.append(callback))
    monkeypatch.setattr(process, "ignore_stop_signals", lambda: seen.append("signals ignored"))
    launcher = Launcher(parsed.service, tmp_path, None)

    async def close() -> None:
        seen.append("standby closed")

    monkeypatch.setattr(launcher.deployment.standby, "warm", lambda: seen.append("warm"))
    monkeypatch.setattr(launcher.deployment.standby, "close", close)
    return Rig(launcher, seen, handler)


def run(work: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(work, WAIT)

    asyncio.run(bounded())


def test_the_standby_host_is_warmed_before_the_instances_start(
        rig: Rig) -> None:
    under_test, seen = rig.launcher, rig.seen
    under_test.start(fakes(FakeInstance("a", seen), FakeInstance("b", seen)))
    assert seen == ["warm", "start a", "start b"]


def test_the_first_signal_stops_the_second_forces_and_later_ones_are_ignored(
        rig: Rig) -> None:
    under_test, seen, handler = rig.launcher, rig.seen, rig.handler

    async def scenario() -> None:
        assert under_test.supervise(lambda name: seen.append(f"stop on {name}"),
                                    lambda name: seen.append(f"force on {name}"))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            handler[0](sig)

    run(scenario())
    assert seen == ["adopt", "stop on SIGTERM", "force on SIGINT"]


def test_without_a_stop_callback_no_signal_is_taken(
        rig: Rig) -> None:
    under_test, seen, handler = rig.launcher, rig.seen, rig.handler

    async def scenario() -> None:
        under_test.supervise()
        await under_test.stop(fakes(FakeInstance("a", seen)), "over")

    run(scenario())
    assert handler == []
    # Nothing was taken, so nothing is given up: the default actions stay.
    assert seen == ["adopt", "stop a (over)", "standby closed"]


def test_the_stop_gives_up_the_signals_as_the_last_instance_stops_then_closes_the_standby(
        rig: Rig) -> None:
    under_test, seen, handler = rig.launcher, rig.seen, rig.handler

    def signal_arrives() -> None:
        # What the real handler does: queue the callback on the loop, to run once the
        # stop that is ending has returned.
        asyncio.get_running_loop().call_soon(handler[0], signal.SIGINT)

    async def scenario() -> None:
        under_test.supervise(lambda name: seen.append(f"stop on {name}"),
                             lambda name: seen.append(f"force on {name}"))
        handler[0](signal.SIGTERM)
        await under_test.stop(fakes(FakeInstance("a", seen),
                                    FakeInstance("b", seen, signal_arrives)), "SIGTERM")

    run(scenario())
    assert seen == ["adopt", "stop on SIGTERM", "stop a (SIGTERM)", "stop b (SIGTERM)",
                    "signals ignored", "standby closed"]
    assert under_test.stopped
