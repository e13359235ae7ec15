"""rolehost.testing's in-process runner and the pytest plugin's fixtures."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from rolehost import RoleEntryPoint, RoleEnvironment, StatusCheck
from rolehost.testing import ServiceHarness


class Worker(RoleEntryPoint):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.beats = threading.Event()

    def on_start(self) -> bool:
        self.greeting = RoleEnvironment.get_setting("greeting")
        self.cache = RoleEnvironment.local_resource("cache").path
        RoleEnvironment.on_stopping(lambda: self.calls.append("stopping"))
        RoleEnvironment.on_status_check(self.check)
        RoleEnvironment.on_changing(lambda e: e.cancel() if e.changes[0].name == "db" else None)
        RoleEnvironment.on_changed(lambda changes: self.calls.append(f"changed {changes[0].name}"))
        self.calls.append("on_start")
        return True

    def check(self, status: StatusCheck) -> None:
        if not (self.cache / "warm").exists():
            status.busy()

    def run(self) -> None:
        (self.cache / "warm").touch()
        self.beats.set()
        RoleEnvironment.wait_for_stop()
        self.calls.append("run ended")

    def on_stop(self) -> None:
        self.calls.append("on_stop")


class AsyncWorker(RoleEntryPoint):
    async def on_start(self) -> bool:
        self.began = self.cancelled = False
        return True

    async def run(self) -> None:
        self.began = True
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_run_role_drives_a_role_in_process(rolehost_role: Any) -> None:
    with rolehost_role(Worker, settings={"greeting": "hi", "db": "a"},
                       resources={"cache": 10}) as run:
        assert run.start()
        assert run.role.greeting == "hi" and run.role.cache.is_dir()
        assert RoleEnvironment.current_instance.id == "role_IN_0"
        assert run.status() == "busy"
        run.run()
        assert run.role.beats.wait(5)
        assert run.status() == "ready"
        assert run.change_settings(greeting="hello") is False
        assert RoleEnvironment.get_setting("greeting") == "hello"
        assert run.change_settings(db="b") is True  # cancelled: the host would recycle
        RoleEnvironment.request_recycle()
        assert run.recycle_requested == "request_recycle() called"
        run.stop()
        assert run.role.calls == ["on_start", "changed greeting", "stopping", "on_stop",
                                  "run ended"]
    assert not RoleEnvironment.is_available


def test_run_role_cancels_an_async_run(rolehost_role: Any) -> None:
    run = rolehost_role(AsyncWorker)
    assert run.start()
    run.run()
    run.stop()
    assert run.role.cancelled


HELLO = Path(__file__).parent.parent / "samples" / "hello" / "rolehost.toml"


@pytest.mark.rolehost(str(HELLO))
def test_the_service_fixture_runs_the_marked_definition(rolehost_service: ServiceHarness) -> None:
    status = rolehost_service.wait_ready(timeout=30)
    assert [i["id"] for i in status["instances"]] == ["worker_IN_0", "worker_IN_1"]


def test_a_role_stopped_before_run_stops_at_once(rolehost_role: Any) -> None:
    run = rolehost_role(AsyncWorker)
    assert run.start()
    began = time.monotonic()
    run.stop(timeout=5)  # run() was never started: nothing to cancel or wait for
    assert time.monotonic() - began < 2, "stop() waited for a run() that never began"
    assert run.stopped and RoleEnvironment.is_stopping
    assert not run.role.began  # nor did it start one to stop it


def test_the_harness_has_an_async_variant() -> None:
    async def rehearse() -> list[str]:
        async with ServiceHarness(HELLO) as service:
            status = await asyncio.to_thread(service.wait_ready, 30)
            return [i["state"] for i in status["instances"]]

    assert asyncio.run(rehearse()) == ["ready", "ready"]


def test_one_role_runs_at_a_time(rolehost_role: Any) -> None:
    first = rolehost_role(AsyncWorker)
    with pytest.raises(RuntimeError, match="another role is running in this process"):
        rolehost_role(AsyncWorker)
    first.close()
    assert rolehost_role(AsyncWorker).start()


class Checked(RoleEntryPoint):
    def on_start(self) -> bool:
        RoleEnvironment.on_status_check(self.check)
        return True

    def check(self, status: StatusCheck) -> None:
        raise LookupError("backlog table missing")


def test_a_status_check_that_raises_fails_the_test(rolehost_role: Any) -> None:
    run = rolehost_role(Checked)
    assert run.start()
    with pytest.raises(LookupError, match="backlog table missing") as error:
        run.status()
    assert error.traceback[-1].name == "check"  # the handler's own frame, not a wrapper


class Refuses(RoleEntryPoint):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_start(self) -> bool:
        RoleEnvironment.on_stopping(lambda: self.calls.append("stopping"))
        if RoleEnvironment.get_setting("fail") == "raise":
            raise LookupError("no database")
        return False

    def on_stop(self) -> None:
        self.calls.append("on_stop")


@pytest.mark.parametrize("fail", ["return", "raise"])
def test_no_on_stop_after_on_start_failed(rolehost_role: Any, fail: str) -> None:
    # As in the host (docs/concepts.md): an instance whose on_start returned false or
    # raised recycles without its stopping handlers or on_stop.
    with rolehost_role(Refuses, settings={"fail": fail}) as run:
        if fail == "raise":
            with pytest.raises(LookupError):
                run.start()
        else:
            assert run.start() is False
    assert run.role.calls == []
    assert run.stopped and not RoleEnvironment.is_available


class SlowToStop(RoleEntryPoint):
    async def on_stop(self) -> None:
        await asyncio.sleep(60)


def test_run_role_takes_the_definitions_stop_timeout(rolehost_role: Any) -> None:
    """`run_role` defaulted stop_timeout to 30 s where a deployed role gets 5 minutes, and
    stop() waited 30 s whatever stop_timeout said."""
    import time

    from rolehost.testing import run_role

    with run_role(SlowToStop) as run:
        assert run.context.stop_timeout == 300.0  # as `[roles.NAME] stop_timeout`'s default
    run = rolehost_role(SlowToStop, stop_timeout="200ms")  # a duration, as in rolehost.toml
    assert run.context.stop_timeout == 0.2
    assert run.start()
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        run.stop()
    assert time.monotonic() - began < 5


class StoppingFails(RoleEntryPoint):
    def on_start(self) -> bool:
        self.calls: list[str] = []
        RoleEnvironment.on_stopping(self.stopping)
        return True

    def stopping(self) -> None:
        raise LookupError("queue gone")

    def on_stop(self) -> None:
        self.calls.append("on_stop")


def test_run_role_stops_as_the_host_does(rolehost_role: Any) -> None:
    """`run_role` drives the real host code: a `stopping` handler that raises is reported
    (here: raised in the test) and the stop goes on to on_stop, as in a host process."""
    run = rolehost_role(StoppingFails)
    assert run.start()
    with pytest.raises(LookupError, match="queue gone"):
        run.stop()
    assert run.role.calls == ["on_stop"]


def test_a_host_leaves_through_its_owner_not_by_itself(rolehost_role: Any) -> None:
    """The Host says with which code it is done; only whoever runs it ends the process
    (`host.main` exits, a test's run does not). It used to call os._exit itself."""
    from rolehost.host import Host
    from rolehost.protocol import ExitCode

    run = rolehost_role(Refuses, settings={"fail": "return"})
    codes: list[ExitCode] = []

    def leave(code: ExitCode) -> NoReturn:
        codes.append(code)
        raise SystemExit(code)

    with pytest.raises(SystemExit):
        Host(run.context, run.channel, leave, role=run.role).boot()
    assert codes == [ExitCode.RECYCLE]
    assert run.channel.said == [{"type": "state", "state": "starting", "reason": ""},
                                {"type": "recycle", "reason": "on_start returned False"}]
