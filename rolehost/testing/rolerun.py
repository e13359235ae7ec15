"""`run_role`: one role's class run in the test's own process on temporary folders,
without a controller, by the real host code (`rolehost.host.Host`): its lifecycle
methods, handlers and stop as a host process runs them, step by step at the test's
pace. Where the host would report an error to its controller, the test gets the
exception; where it would exit, the run just ends."""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rolehost.channel import Channel
from rolehost.fabric.names import instance_id
from rolehost.host import Call, Host
from rolehost.testing.waiting import wait_until


class _Kept(Channel):
    """The host's channel, in process: what the host says is kept, not sent."""

    def __init__(self) -> None:
        self.said: list[dict[str, Any]] = []

    def send(self, type: str, **fields: Any) -> None:
        self.said.append({"type": type, **fields})


class _TestHost(Host):
    """The host, where an error it would report to its controller is kept, to be raised
    in the test: the exception itself, with its traceback."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.reported: list[BaseException] = []

    def report(self, where: str, text: str, timed_out: bool = False) -> None:
        self.reported.append(sys.exc_info()[1] or RuntimeError(f"{where}: {text}"))

    def raise_reported(self) -> None:
        if self.reported:
            error, self.reported[:] = self.reported[0], []
            raise error


class RoleRun:
    """One role run in this process on temporary folders: see `run_role`."""

    def __init__(
        self,
        cls: type[Any],
        settings: Mapping[str, Any] | None = None,
        resources: Mapping[str, int] | None = None,
        role: str = "role",
        index: int = 0,
        endpoints: Mapping[str, int] | None = None,
        stop_timeout: float | str | None = None,
    ) -> None:
        from rolehost.definition import Role, parse_duration
        from rolehost.environment import Context, RoleEnvironment

        # The definition's default and syntax: a role tested here meets the limit it
        # will meet when deployed, 5 minutes unless its tests say otherwise.
        limit = (Role.model_fields["stop_timeout"].default if stop_timeout is None
                 else parse_duration(stop_timeout))

        self.folder = Path(tempfile.mkdtemp(prefix="rolehost-role-"))
        for sub in ("app", "os/tmp", *(f"resources/{n}" for n in resources or {})):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.context = Context(
            instance_id=instance_id(role, index), role=role, index=index, update_domain=0,
            deployment_id="local", entry_point=f"{cls.__module__}:{cls.__qualname__}",
            app_dir=str(self.folder / "app"), os_dir=str(self.folder / "os"),
            stop_timeout=limit, status_check_interval=1.0,
            settings=dict(settings or {}),
            endpoints={n: {"host": "127.0.0.1", "port": p, "protocol": "http"}
                       for n, p in (endpoints or {}).items()},
            resources={n: {"path": str(self.folder / "resources" / n), "size_mb": size}
                       for n, size in (resources or {}).items()},
            topology={role: [instance_id(role, index)]},
        )
        self.environment = RoleEnvironment
        self.recycle_requested: str | None = None
        if RoleEnvironment.is_available:  # one RoleEnvironment per process, as in a host
            shutil.rmtree(self.folder, ignore_errors=True)
            raise RuntimeError("another role is running in this process: close it first "
                               "(run_role runs one role at a time, like a host)")
        # This run is the role's runtime (request_recycle() is kept, not acted on); the
        # host runs its lifecycle.
        RoleEnvironment.bind(self.context, self)
        self.channel = _Kept()
        self.role = cls()
        self.host = _TestHost(self.context, self.channel, role=self.role)
        self._run: threading.Thread | None = None
        self.stopped = self._closed = False
        # As in the host, the stopping handlers and on_stop are for a role whose
        # on_start returned true; after a false value or an exception they never run.
        self.started = False

    def __enter__(self) -> RoleRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Any, *args: Any, timeout: float = 30.0) -> Any:
        """Call user code by the host's own `invoke`: a coroutine runs on the role's event loop."""
        return self.host.invoke(fn, *args, timeout=timeout)

    def start(self) -> bool:
        """on_start(); True if it returned a true value."""
        self.started = self.host.start_role()
        return self.started

    def run(self) -> None:
        """Start run() (sync or async) in the background, as the host does after on_start."""
        import inspect

        self._run = threading.Thread(target=self._run_role, name="rolehost-run", daemon=True)
        self._run.start()
        if inspect.iscoroutinefunction(self.role.run):  # on the loop before a stop comes
            run = self._run
            wait_until(lambda: self.host.run_began or not run.is_alive(), 30,
                       "the async run() to begin")

    def _run_role(self) -> None:
        # What run() raises is the role's business here, as a crash is the host's.
        try:
            self.host.run_role()
        except BaseException:
            return

    def status(self) -> str:
        """Ask the status-check handlers by the host's own `ask_status`: "ready" or "busy"."""
        from rolehost.environment import StatusCheck

        check = StatusCheck()
        # A handler that raises propagates: the host would report busy, but a test
        # learns more from the handler's traceback than from "busy".
        self.host.ask_status(check)
        return check.status.value

    def change_settings(self, **settings: Any) -> bool:
        """Offer new settings: True if a `changing` handler cancelled (the host would
        then recycle); otherwise they apply and the `changed` handlers run."""
        old = self.context.settings
        changes = [{"name": k, "old": old.get(k), "new": v} for k, v in settings.items()
                   if old.get(k) != v]
        self.host.changing({"type": "changing", "changes": changes})
        self.host.raise_reported()
        answer = next(m for m in reversed(self.channel.said)
                      if m["type"] == "changing_result")
        if answer["cancel"]:
            return True
        self.host.changed({"type": "changed", "settings": {**old, **settings}})
        self.host.raise_reported()
        return False

    def stop(self, timeout: float | None = None) -> None:
        """A graceful stop, the host's: `stopping` handlers, an async run() cancelled,
        on_stop, within `timeout` (the run's stop_timeout: TimeoutError past it); only
        `is_stopping` if on_start has not returned true, as in the host."""
        if timeout is None:
            timeout = self.context.stop_timeout
        if self.stopped:
            return
        self.stopped = True
        if not self.started:
            self.environment.mark_stopping()
            return

        def graceful() -> None:  # as the host's stop thread
            self.environment.mark_stopping()
            self.host.graceful_stop()

        stop = Call(graceful)
        if not stop.wait(timeout):
            raise TimeoutError(f"the stopping handlers and on_stop did not finish within "
                               f"stop_timeout ({timeout:g}s)")
        if stop.exception is not None:
            raise stop.exception
        self.host.raise_reported()
        if self._run is not None:  # a sync run() ends on its own once stopping
            self._run.join(timeout)

    def request_recycle(self, reason: str) -> None:
        self.recycle_requested = reason

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            self.environment.unbind()
            self.host.close_loop()
            shutil.rmtree(self.folder, ignore_errors=True)


def run_role(
    cls: type[Any],
    settings: Mapping[str, Any] | None = None,
    resources: Mapping[str, int] | None = None,
    **options: Any,
) -> RoleRun:
    """Run one role in this process, with a real `RoleEnvironment` on temporary folders,
    for fast tests of on_start, run, on_stop and event handlers without a controller:

        with run_role(Worker, settings={"greeting": "hi"}, resources={"cache": 10}) as r:
            assert r.start()
            r.run()
            assert r.status() == "ready"
            r.stop()

    `resources` maps local-resource names to their size_mb.
    """
    return RoleRun(cls, settings, resources, **options)
