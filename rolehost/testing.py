"""Rehearse a service from your own tests: a real controller, real processes.

    from rolehost.testing import ServiceHarness

    def test_worker_survives_a_crash():
        with ServiceHarness("rolehost.toml") as service:
            service.wait_ready(timeout=30)
            pid = service.kill("worker/0")
            service.wait_replaced("worker/0", pid, timeout=30)
            assert service.instance("worker/0")["restarts"] == 1

The harness starts `rolehost start` on a private run directory, talks to it over the
control API, and on exit stops it and checks that no process of it is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil

from rolehost import logs, output
from rolehost.client import Client, ControllerNotRunning
from rolehost.names import instance_id, parse_instance_name
from rolehost.rundir import RunDir

T = TypeVar("T")
POLL = 0.02  # seconds between looks at a condition that has no event to wait on


class HarnessError(AssertionError):
    """The service did not do what the test waited for; the message says what it did."""


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll `condition` until it returns something truthy; HarnessError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(POLL)


def run_dir_processes(run_dir: Path) -> list[psutil.Process]:
    """Every live process started for `run_dir`: its controller, hosts and their children."""
    wanted = str(run_dir)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = proc.info["cmdline"] or []
            if wanted in cmdline or proc.environ().get("ROLEHOST_RUN_DIR") == wanted:
                found.append(proc)
        except psutil.Error:
            continue
    return found


class ServiceHarness:
    """A controller for one definition, run in the background for the length of a test."""

    def __init__(
        self,
        definition: str | os.PathLike[str],
        run_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        python: str | os.PathLike[str] | None = None,
    ) -> None:
        """`python`: the interpreter the controller (and so each host) runs on, such as
        the virtual environment the service runs from in production; default this one."""
        self.definition = Path(definition).resolve()
        self.python = str(python or sys.executable)
        self._own_run_dir = run_dir is None
        # Short, private paths: a Unix socket path must fit in 107 bytes.
        self.run_dir = RunDir(
            Path(run_dir).resolve() if run_dir else Path(tempfile.mkdtemp(prefix="rolehost-"))
        )
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.client = Client(self.run_dir.socket)
        self.controller: subprocess.Popen[bytes] | None = None

    # Starting and stopping.

    def __enter__(self) -> ServiceHarness:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            try:
                self.assert_no_processes()
            finally:
                self.kill_leftovers()  # a leak fails the test, and still does not outlive it
            if self._own_run_dir and kind is None:
                shutil.rmtree(self.run_dir.path, ignore_errors=True)

    def kill_leftovers(self) -> None:
        for proc in run_dir_processes(self.run_dir.path):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    async def __aenter__(self) -> ServiceHarness:
        """The async variant: the blocking work runs on a worker thread."""
        import asyncio

        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.__exit__, kind, exc, tb)

    def start(self) -> None:
        self.run_dir.ensure()
        with open(self.run_dir.console_log, "ab") as out:
            self.controller = subprocess.Popen(
                [self.python, "-m", "rolehost", "start", "-f", str(self.definition),
                 "--run-dir", str(self.run_dir.path), "--no-console"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )

        def answering() -> bool:
            if self.controller is not None and self.controller.poll() is not None:
                raise HarnessError(
                    f"the controller exited with {self.controller.returncode}:\n{self.console()}"
                )
            try:
                self.client.status()
            except (ControllerNotRunning, OSError):
                return False
            return True

        wait_until(answering, self.start_timeout, "the controller to answer", self.console)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully through the API; kill the controller if it is not gone after
        `timeout`. Leftover processes are for `assert_no_processes` to find."""
        if self.controller is None:
            return
        if self.controller.poll() is None:
            with contextlib.suppress(ControllerNotRunning, OSError):
                self.client.request("POST", "/v1/shutdown", timeout=timeout)
            try:
                self.controller.wait(timeout)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait(10)

    def signal_controller(self, sig: int) -> None:
        assert self.controller is not None
        self.controller.send_signal(sig)

    def wait_controller_exit(self, timeout: float) -> int:
        assert self.controller is not None
        return self.controller.wait(timeout)

    def processes(self) -> list[psutil.Process]:
        return run_dir_processes(self.run_dir.path)

    def assert_no_processes(self, timeout: float = 5.0) -> None:
        """No process of this run directory may outlive the service (a few seconds' grace)."""
        left: list[psutil.Process] = []

        def none_left() -> bool:
            nonlocal left
            left = self.processes()
            return not left

        wait_until(none_left, timeout, "every process of the service to end",
                   lambda: "\n".join(f"  {p.pid} {' '.join(p.cmdline())}" for p in left))

    # Looking.

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def instance(self, name: str) -> dict[str, Any]:
        return self.client.instance(name)

    def events(self) -> list[dict[str, Any]]:
        return self.client.events()

    def logs(self, name: str) -> str:
        """The instance's log as `rolehost logs` prints it: the same text whatever
        `instance_log_format` the service has."""
        role, index = parse_instance_name(name)
        path = self.run_dir.instance_log(instance_id(role, index))
        return output.render_all(path.read_text(errors="replace")) if path.exists() else ""

    def console(self) -> str:
        """The controller's own output (without --no-console's silence: its errors)."""
        return "\n".join(logs.tail(self.run_dir.console_log, 40))

    def _describe(self) -> str:
        try:
            rows = self.status()["instances"]
        except (ControllerNotRunning, OSError) as exc:
            return f"(no status: {exc})\n{self.console()}"
        return "\n".join(
            f"  {i['id']}: {i['state']} ({i['why_not_back'] or i['reason']}) "
            f"last_error={i['last_error']}" for i in rows
        )

    # Waiting.

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every instance is back: ready, and in rotation on each of its input
        endpoints (probes passing), as a walk waits for it; return the status."""

        def ready() -> dict[str, Any] | None:
            status = self.status()
            return status if all(i["back"] for i in status["instances"]) else None

        return wait_until(ready, timeout, "every instance to be ready and in rotation",
                          self._describe)

    def wait_state(
        self, name: str, states: str | set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else states

        def reached() -> dict[str, Any] | None:
            snapshot = self.instance(name)
            return snapshot if snapshot["state"] in wanted else None

        return wait_until(reached, timeout, f"{name} to be {' or '.join(sorted(wanted))}",
                          self._describe)

    def url(self, role: str, endpoint: str) -> str:
        """The balancer's address for one endpoint, as `http://host:port`."""
        for balancer in self.status()["balancers"]:
            if (balancer["role"], balancer["endpoint"]) == (role, endpoint):
                return f"http://{balancer['address']}"
        raise HarnessError(f"no endpoint {role}.{endpoint}")

    def wait_replaced(self, name: str, pid: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until `name` is back (ready and in rotation) in a host process other than
        `pid`."""

        def replaced() -> dict[str, Any] | None:
            snapshot = self.instance(name)
            new = snapshot["pid"] not in (None, pid)  # None: the old host exited, not yet noted
            return snapshot if snapshot["back"] and new else None

        return wait_until(replaced, timeout, f"{name} to be back in a new host",
                          self._describe)

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0, what: str = ""
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events() if predicate(e)), None)

        return wait_until(found, timeout, what or "an event", self._describe)

    # Acting.

    def maintain(self, kind: str, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        """Carry out a maintenance event (`restart`, `reimage`, ...) on the instances."""
        return self.client.maintain(kind, list(names), wait=wait, timeout=24 * 3600)

    def upgrade(self, kind: str, manual: bool = False, wait: bool = True,
                timeout: float = 600.0) -> dict[str, Any]:
        """Walk `host-os`, `guest-os` or `agent` over the update domains; with `wait`,
        return once the walk succeeded, paused or halted (look at its `state`)."""
        self.client.upgrade(kind, manual)
        return self.wait_walk(timeout) if wait else self.client.walk()

    def set_setting(self, role: str, key: str, value: Any) -> dict[str, str]:
        """Change one setting of a role while it runs; returns what each instance did."""
        return self.client.configure(role, {key: value})

    def scale(self, role: str, count: int) -> list[str]:
        """Run `count` instances of `role`; returns the instances added or removed."""
        return self.client.scale(role, count)

    def package(self, version: str | None = None) -> dict[str, Any]:
        """Snapshot the definition and the roles' app folders as a deployable version."""
        return self.client.package(version)

    def deploy(self, version: str, rollback: bool = True, wait: bool = True,
               timeout: float = 600.0) -> dict[str, Any]:
        """In-place upgrade to `version`; with `wait`, return once the walk is over."""
        self.client.deploy(version, rollback)
        return self.wait_walk(timeout) if wait else self.client.walk()

    def walk_next(self, wait: bool = True, timeout: float = 600.0) -> dict[str, Any]:
        self.client.walk("next")
        return self.wait_walk(timeout) if wait else self.client.walk()

    def walk_abort(self) -> dict[str, Any]:
        return self.client.walk("abort")

    def wait_walk(self, timeout: float = 600.0) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            walk = self.client.walk()
            return walk if walk["state"] != "running" else None

        return wait_until(settled, timeout, "the walk to end, pause or halt", self._describe)

    def operations(self) -> list[dict[str, Any]]:
        """The history of management operations of this run directory."""
        result: list[dict[str, Any]] = self.client.operations()["operations"]
        return result

    def recycle(self, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.maintain("recycle", *names, wait=wait)

    def restart(self, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.maintain("restart", *names, wait=wait)

    def reimage(self, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.maintain("reimage", *names, wait=wait)

    def rebuild(self, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.maintain("rebuild", *names, wait=wait)

    def agent_update(self, *names: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.maintain("agent-update", *names, wait=wait)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to an instance's host process; return its pid."""
        pid = self.instance(name)["pid"]
        if pid is None:
            raise HarnessError(f"{name} has no host process ({self._describe()})")
        os.kill(pid, sig)
        return int(pid)


class LoadProbe:
    """Steady keep-alive HTTP load at a URL from background threads.

        with LoadProbe(service.url("web", "http"), clients=4) as load:
            service.restart("web/0")
        assert load.failures == [], load.failures

    Every response with a status of 400 or more, and every connection error, is a
    failure with its cause; a failed connection is opened again and the load goes on.
    """

    def __init__(self, url: str, clients: int = 4, timeout: float = 30.0,
                 method: str = "GET", body: bytes | None = None) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.clients, self.timeout, self.method, self.body = clients, timeout, method, body
        self.requests = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LoadProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, name=f"load-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.requests >= count, timeout, f"{count} requests")

    def _client(self) -> None:
        import http.client

        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(self.host, self.port,
                                                            timeout=self.timeout)
                connection.request(self.method, self.path, body=self.body)
                response = connection.getresponse()
                response.read()
                failure = None if response.status < 400 else f"HTTP {response.status}"
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self.requests += 1
                self.latencies.append(time.perf_counter() - began)
                if failure is not None:
                    self.failures.append(failure)
        if connection is not None:
            connection.close()

    def percentile(self, p: float) -> float:
        """The p-th percentile of latencies, in seconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0

    def report(self) -> dict[str, Any]:
        return {"requests": self.requests, "failures": len(self.failures),
                "causes": sorted(set(self.failures)),
                "p50_ms": round(self.percentile(50) * 1000, 2),
                "p99_ms": round(self.percentile(99) * 1000, 2)}


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
