"""`ServiceHarness`: a real controller for one definition, run in the background for the
length of a test, and driven through the control API as the CLI drives it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from rolehost.client import ApiError, Client, ControllerNotRunning
from rolehost.fabric.names import instance_id, parse_instance_name
from rolehost.fabric.rundir import RunDir
from rolehost.observability import logs, output
from rolehost.testing.waiting import HarnessError, wait_until


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

    def logs(self, name: str, slot: str = "production") -> str:
        """The log of instance `name` of the deployment in `slot` as `rolehost logs`
        prints it: the same text whatever `instance_log_format` the service has. After a
        swap, production's is the log of the deployment swapped in, which keeps its logs
        in its own folder (docs/deploying.md); once the controller is gone, or for an
        instance scaled in, production's is the one in the run directory."""
        role, index = parse_instance_name(name)
        path = self.run_dir.instance_log(instance_id(role, index))
        try:
            path = Path(self.client.instance(name, slot)["log"])
        except (ControllerNotRunning, OSError, ApiError):
            if slot != "production":  # only a running controller has another slot
                raise
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
            # None yet: the control API answers before the start has added them (all of
            # an empty list was "every instance back", and a test went on to a balancer
            # that did not listen yet). Once added, all are there, created and not back.
            instances = status["instances"]
            return status if instances and all(i["back"] for i in instances) else None

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
