"""`run_role`: one role's class run in the test's own process on temporary folders,
without a controller: its lifecycle methods called as the host calls them."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rolehost.fabric.names import instance_id
from rolehost.testing.waiting import wait_until


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
        import asyncio

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
        RoleEnvironment.bind(self.context, self)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._loop_thread.start()
        self._run: Any = None  # a thread (sync run) or the asyncio task (async run)
        self._run_over = threading.Event()
        self._run_asked = False
        self.stopped = self._closed = False
        # As in the host, the stopping handlers and on_stop are for a role whose
        # on_start returned true; after a false value or an exception they never run.
        self.started = False
        self.role = cls()

    def __enter__(self) -> RoleRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Any, *args: Any, timeout: float = 30.0) -> Any:
        """Call user code as the host does: a coroutine runs on the role's event loop."""
        import asyncio

        result = fn(*args)
        if hasattr(result, "__await__"):
            return asyncio.run_coroutine_threadsafe(result, self._loop).result(timeout)
        return result

    def start(self) -> bool:
        """on_start(); True if it returned a true value."""
        self.started = bool(self.call(self.role.on_start))
        return self.started

    def run(self) -> None:
        """Start run() (sync or async) in the background, as the host does after on_start."""
        import asyncio
        import inspect

        self._run_asked = True
        if inspect.iscoroutinefunction(self.role.run):
            async def tracked() -> None:
                self._run = asyncio.current_task()
                try:
                    await self.role.run()
                finally:
                    self._run_over.set()

            asyncio.run_coroutine_threadsafe(tracked(), self._loop)
        else:
            self._run = threading.Thread(target=self.role.run, daemon=True)
            self._run.start()

    def status(self) -> str:
        """Ask the status-check handlers, as the host does: "ready" or "busy"."""
        from rolehost.environment import RoleStatus, StatusCheck

        check = StatusCheck()
        for handler in self.environment.handlers["status_check"]:
            # A handler that raises propagates: the host would report busy, but a test
            # learns more from the handler's traceback than from "busy".
            if self.call(handler, check) in (RoleStatus.BUSY, "busy"):
                check.busy()
        return check.status.value

    def change_settings(self, **settings: Any) -> bool:
        """Offer new settings: True if a `changing` handler cancelled (the host would
        then recycle); otherwise they apply and the `changed` handlers run."""
        from rolehost.environment import Changing, SettingChange

        old = self.context.settings
        event = Changing([SettingChange(k, old.get(k), v) for k, v in settings.items()
                          if old.get(k) != v])
        for handler in self.environment.handlers["changing"]:
            self.call(handler, event)
        if event.cancelled:
            return True
        changes = self.environment.apply_settings({**old, **settings})
        for handler in self.environment.handlers["changed"]:
            self.call(handler, changes)
        return False

    def stop(self, timeout: float | None = None) -> None:
        """A graceful stop: `stopping` handlers, an async run() cancelled, on_stop, each
        waited for up to `timeout` (the run's stop_timeout); only `is_stopping` if
        on_start has not returned true, as in the host."""
        if timeout is None:
            timeout = self.context.stop_timeout
        if self.stopped:
            return
        self.stopped = True
        self.environment.mark_stopping()
        if not self.started:
            return
        for handler in self.environment.handlers["stopping"]:
            self.call(handler, timeout=timeout)
        if self._run_asked and self._run is None:  # an async run() not on the loop yet
            wait_until(lambda: self._run, timeout, "the async run() to begin")
        if self._run is not None and not isinstance(self._run, threading.Thread):
            self._loop.call_soon_threadsafe(self._run.cancel)  # as the host: cancel, await
            self._run_over.wait(timeout)
        self.call(self.role.on_stop, timeout=timeout)
        if isinstance(self._run, threading.Thread):
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
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
            self._loop.close()
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
