"""The host process (the platform's WaWorkerHost): runs one instance of a role.

The controller starts it as `python -m rolehost.host` in a session of its own, with one
end of a socket pair in `ROLEHOST_CHANNEL_FD`, before it knows which instance it will
run: a standby that has already paid for the interpreter and these imports. Its first
message, `assign`, gives it the instance's `Context`, environment and folder.

Threads, each with one job:
- main:    import the entry point, on_start, then run (the platform's Run thread);
- channel: controller messages in, heartbeats out; when the channel reaches EOF the
           controller is gone, and this thread takes the instance's process tree down;
- status:  status-check handlers, at the role's interval or on demand;
- stop:    started once, by a stop message, run() returning or request_recycle();
- loop:    only if the role uses coroutines: the asyncio loop they all run on.

Speed matters here (a crashed instance waits for this process to boot), so the module
imports only what every role needs: asyncio, psutil and traceback load on demand.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import threading
import time

from rolehost import protocol
from rolehost.channel import Channel
from rolehost.entrypoint import RoleEntryPoint
from rolehost.environment import (
    Changing,
    Context,
    RoleEnvironment,
    RoleStatus,
    SettingChange,
    StatusCheck,
    TopologyChange,
)
from rolehost.protocol import ExitCode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future
    from typing import Any, NoReturn

    from rolehost.site import Site


class Host:
    """One instance's lifecycle inside its host process.

    The process is not the host's to end: `leave`, given by whoever runs it, is called
    with the exit code once the host is done (`main` exits the process with it;
    `rolehost.testing.RoleRun`, which drives a Host in a test's own process, never gets
    that far). `role`: an instance of the role's class, where the entry point need not
    be imported."""

    def __init__(self, context: Context, channel: Channel,
                 leave: Callable[[ExitCode], NoReturn] | None = None,
                 role: RoleEntryPoint | None = None) -> None:
        self.context = context
        self.channel = channel
        self.leave = leave or _leave
        self.role = role
        self._stop_lock = threading.Lock()
        self._stop_started = False
        self._loop: Any = None  # asyncio loop, started on the first coroutine
        self._loop_thread: threading.Thread | None = None
        # An async run(): its task, whether a stop cancelled it (both touched only on the
        # loop's thread, so a stop before its first step cannot slip through), its end.
        self._run_task: Any = None
        self._run_cancelled = False
        self._run_submitted = False
        self._run_over = threading.Event()
        self._stop_asked = threading.Event()  # the controller said stop
        # on_start has returned (or raised): lifecycle methods never overlap, so a stop
        # that comes during on_start waits for it; `started` says whether it succeeded.
        self._start_over = threading.Event()
        self._started = False
        self._start_result: Any = None
        self._status = _StatusLoop(self)
        self._site: Site | None = None  # a web role's: rolehost.site

    def _site_step(self, step: str) -> None:
        """Start the site or warm it up (a role without one has nothing to do): a failure
        fails the boot with the site's own message, or its application's traceback."""
        if self.context.site is None:
            return
        from rolehost.site import Site, SiteError

        try:
            if self._site is None:
                self._site = Site(self.context, self.context.site, self.request_recycle)
            getattr(self._site, step)()
        except BaseException as exc:
            if self._stop_started:
                self._start_over.set()  # a stop during the site's start has nothing to stop
                self._park()
            where = "site" if step == "start" else "warmup"
            self.report(where, f"{exc}\n" if isinstance(exc, SiteError) else _traceback())
            self._exit(ExitCode.CRASHED)

    # The lifecycle (main thread).

    def boot(self) -> NoReturn:
        try:
            if self.role is None:
                self.role = load_entry_point(self.context.entry_point, self.context.app_dir)()
        except BaseException:
            self._fail("import", ExitCode.BOOT_FAILED)
        self.send_state("starting")
        self._site_step("start")  # the site listens before on_start, which may use it
        try:
            started = self.start_role()
        except BaseException:
            self._stopping_or_fail("on_start")
        if self._stop_started:
            self._park()
        if not started:
            self.channel.send("recycle", reason=f"on_start returned {self._start_result!r}")
            self._exit(ExitCode.RECYCLE)
        self._site_step("warm_up")  # and only then may the instance be ready
        self._status.start()
        try:
            self.run_role()
        except BaseException:
            self._stopping_or_fail("run")
        self.begin_stop("run() returned", ExitCode.RECYCLE)
        self._park()

    def start_role(self) -> bool:
        """on_start; True if it returned a true value. Raised or not, it is over: a stop
        that came meanwhile may go on."""
        assert self.role is not None
        try:
            self._start_result = self.invoke(self.role.on_start)
            self._started = bool(self._start_result)
        finally:
            self._start_over.set()
        return self._started

    def run_role(self) -> None:
        """run(), until it returns (an async one: until a stop cancels it)."""
        assert self.role is not None
        self.invoke(self.role.run, main=True)

    @property
    def run_began(self) -> bool:
        """An async run() runs on the role's loop, where a stop will cancel it."""
        return self._run_task is not None

    def invoke(self, fn: Callable[..., Any], *args: Any, main: bool = False,
               timeout: float | None = None) -> Any:
        """Call user code: a coroutine it returns runs on the role's loop, and we wait."""
        result = fn(*args)
        if not hasattr(result, "__await__"):
            return result
        if main:
            self._run_submitted = True
            return self._submit(self._as_run(result)).result(timeout)
        return self._submit(result).result(timeout)

    async def _as_run(self, coroutine: Any) -> Any:
        """Run the role's async run() so that a stop can cancel it and wait for its end."""
        import asyncio

        try:
            if self._run_cancelled:
                coroutine.close()
                raise asyncio.CancelledError
            self._run_task = asyncio.current_task()
            return await coroutine
        finally:
            self._run_over.set()

    def _cancel_run(self) -> None:
        """On the loop's thread: cancel run() whether or not it has begun."""
        self._run_cancelled = True
        if self._run_task is not None:
            self._run_task.cancel()

    def _submit(self, coroutine: Any) -> Future[Any]:
        import asyncio

        with self._stop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(
                    target=self._loop.run_forever, name="rolehost-loop", daemon=True)
                self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close_loop(self) -> None:
        """Cancel what still runs on the role's loop, and end it: for a Host in a process
        that goes on (a test's); a host process just exits."""
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        import asyncio

        def end() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)  # after the cancellations have been delivered

        loop.call_soon_threadsafe(end)
        thread.join(5)
        if not thread.is_alive():
            loop.close()

    # Stopping (any thread may ask; the stop thread does it once).

    def request_recycle(self, reason: str) -> None:
        self.begin_stop(reason, ExitCode.RECYCLE)

    def begin_stop(self, reason: str, code: ExitCode) -> None:
        with self._stop_lock:
            if self._stop_started:
                return
            self._stop_started = True
        threading.Thread(
            target=self._stop, args=(reason, code), name="rolehost-stop", daemon=True
        ).start()

    def _stop(self, reason: str, code: ExitCode) -> NoReturn:
        if code is ExitCode.RECYCLE:
            # The stop is the controller's, as for one it begins: out of rotation, the
            # requests in flight drained (the role still serves them), then `stop`.
            self.channel.send("recycle", reason=reason, graceful=True)
            self._stop_asked.wait()
        RoleEnvironment.mark_stopping()
        self.send_state("stopping", reason)
        # Best effort: the deadline is the controller's, which kills this tree at
        # stop_timeout; this bound, just inside it, lets the host say what overran first.
        timeout = self.context.stop_timeout
        finished, error = bounded(self.graceful_stop, protocol.host_stop_bound(timeout))
        if not finished and not self._start_over.is_set():
            self.report(
                "on_stop", f"on_start did not return within stop_timeout ({timeout:g}s) "
                "of the stop; the instance is terminated\n", timed_out=True,
            )
        elif not finished:
            self.report(
                "on_stop", f"stopping handlers and on_stop did not finish within "
                f"stop_timeout ({timeout:g}s); the instance is terminated\n", timed_out=True,
            )
        elif error:
            self.report("on_stop", error)
        self._exit(code)

    def graceful_stop(self) -> None:
        """The stopping handlers, an async run() cancelled and awaited, then on_stop; for
        a role whose on_start returned true. Unbounded: the caller bounds it."""
        # A stop during on_start waits for it (wait_for_stop() already returns True, so
        # it may end early); one that did not succeed has nothing to stop, as without one.
        self._start_over.wait()
        if not self._started:
            return
        if self._site is not None:  # already out of rotation and drained
            self._site.stop()
        for handler in RoleEnvironment.handlers["stopping"]:
            try:
                self.invoke(handler)
            except Exception:
                self.report("stopping", _traceback())
        if self._run_submitted:  # an async run is cancelled, and its cleanup awaited
            self._loop.call_soon_threadsafe(self._cancel_run)
            self._run_over.wait()
        if self.role is not None:
            self.invoke(self.role.on_stop)

    # Messages from the controller (channel thread).

    def dispatch(self, message: protocol.Message) -> None:
        kind = message["type"]
        if kind == "stop":
            self._stop_asked.set()
            self.begin_stop(str(message.get("reason", "stop requested")), ExitCode.STOPPED)
        elif kind == "status_check":
            self._status.check_now()
        elif kind == "changing":
            _thread(self.changing, message)
        elif kind == "changed":
            _thread(self.changed, message)
        # The records apply at once, whatever the membership (`changed`) says; the
        # handlers run only if a listed instance moved.
        elif kind == "peers" and (moved := RoleEnvironment.apply_peers(message["instances"])):
            _thread(self._raise_changed, moved)

    def changing(self, message: protocol.Message) -> None:
        """Raise `changing`; answer whether a handler cancelled the change."""
        event = Changing(_changes(message))
        for handler in RoleEnvironment.handlers["changing"]:
            try:
                self.invoke(handler, event)
            except Exception:
                self.report("changing", _traceback())
        self.channel.send("changing_result", cancel=event.cancelled)

    def changed(self, message: protocol.Message) -> None:
        """Apply the new values, then raise `changed`."""
        changes: list[Any] = []
        # Before the handlers: a process one of them starts must see the new values.
        _update_environment(message.get("environment") or {})
        if "settings" in message:
            changes += RoleEnvironment.apply_settings(dict(message["settings"]))
        if "topology" in message:
            self.context.topology = dict(message["topology"])
            changes += [TopologyChange(r) for r in message.get("topology_changed", [])]
        self._raise_changed(changes)

    def _raise_changed(self, changes: list[Any]) -> None:
        for handler in RoleEnvironment.handlers["changed"]:
            try:
                self.invoke(handler, changes)
            except Exception:
                self.report("changed", _traceback())

    def orphaned(self) -> NoReturn:
        """The controller is gone: nobody else will stop this tree, so take it down now."""
        try:
            import psutil

            me = psutil.Process()
            doomed = me.children(recursive=True)
            # Descendants that detached into a session of their own, and the tasks of
            # this boot: the host's token is `BOOT:hN`, the tasks carry `BOOT`.
            boot = os.environ.get(protocol.TOKEN_ENV, "").rpartition(":")[0]
            if boot:
                doomed += [p for p in psutil.process_iter() if _has_token(p, boot, me.pid)]
            for proc in doomed:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        finally:
            self._exit(ExitCode.ORPHANED)

    def ask_status(self, check: StatusCheck, handlers: list[Callable[..., Any]] | None = None,
                   ) -> None:
        """Ask the status-check handlers (those registered now, unless given): any that
        says busy, with `check.busy()` or by returning it, makes `check` busy."""
        for handler in RoleEnvironment.handlers["status_check"] if handlers is None \
                else handlers:
            if self.invoke(handler, check) in (RoleStatus.BUSY, "busy"):
                check.busy()

    # Reporting and leaving.

    def send_state(self, state: str, reason: str = "") -> None:
        self.channel.send("state", state=state, reason=reason)

    def report(self, where: str, text: str, timed_out: bool = False) -> None:
        sys.stderr.write(f"rolehost: {where}: {text}")
        self.channel.send("error", where=where, traceback=text, timed_out=timed_out)

    def _stopping_or_fail(self, where: str) -> NoReturn:
        """User code raised. During a stop that is the stop's business; otherwise a crash."""
        if self._stop_started:
            self._park()
        self._fail(where, ExitCode.CRASHED)

    def _fail(self, where: str, code: ExitCode) -> NoReturn:
        self.report(where, _traceback())
        self._exit(code)

    def _park(self) -> NoReturn:
        """Wait for the stop thread, which owns the process's exit."""
        while True:
            time.sleep(3600)

    def _exit(self, code: ExitCode) -> NoReturn:
        self.leave(code)


class _StatusLoop:
    """Runs the status-check handlers; reports ready or busy when the answer changes."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._now = threading.Event()
        self._last: tuple[RoleStatus, str] | None = None
        # A check that did not answer in time: it goes on being waited for, not
        # abandoned, as a handler that hangs would otherwise leave a thread behind
        # every interval.
        self._pending: tuple[Call, StatusCheck] | None = None

    def start(self) -> None:
        _thread(self._serve)

    def check_now(self) -> None:
        self._now.set()

    def _serve(self) -> None:
        interval = self.host.context.status_check_interval
        while not RoleEnvironment.is_stopping:
            answer = self._check(interval)
            if answer != self._last and not RoleEnvironment.is_stopping:
                self._last = answer
                self.host.send_state(answer[0].value, answer[1])
            self._now.wait(interval)
            self._now.clear()

    def _check(self, timeout: float) -> tuple[RoleStatus, str]:
        if self._pending is None:
            handlers = list(RoleEnvironment.handlers["status_check"])
            if not handlers:
                return RoleStatus.READY, ""
            check = StatusCheck()
            self._pending = (Call(lambda: self.host.ask_status(check, handlers)), check)
        call, check = self._pending
        if not call.wait(timeout):
            return RoleStatus.BUSY, f"status check did not answer within {timeout:g}s"
        self._pending = None
        if call.error:
            self.host.report("status_check", call.error)
            return RoleStatus.BUSY, f"status check raised: {call.error.strip().splitlines()[-1]}"
        reason = "a status check reported busy" if check.status is RoleStatus.BUSY else ""
        return check.status, reason


def _changes(message: protocol.Message) -> list[Any]:
    return [SettingChange(**c) for c in message.get("changes", [])] + [
        TopologyChange(role) for role in message.get("topology_changed", [])]


class Call:
    """`fn` running on a thread of its own, its outcome awaited for as long as one likes."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._done = threading.Event()
        _thread(self._run, fn)

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # an async run cancelled by the stop is not a failure
            if type(exc).__name__ != "CancelledError":
                self.error, self.exception = _traceback(), exc
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


def bounded(fn: Callable[[], None], timeout: float) -> tuple[bool, str | None]:
    """Run `fn` on a thread of its own for at most `timeout`: (finished, traceback)."""
    call = Call(fn)
    finished = call.wait(timeout)
    return finished, call.error if finished else None


def load_entry_point(entry_point: str, app_dir: str) -> type[RoleEntryPoint]:
    module_name, _, class_name = entry_point.partition(":")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:  # where it came from: a `site.py` of the role's loses to Python's own
        where = str(getattr(module, "__file__", None) or "built in")
        shadowed = not where.startswith(app_dir) and os.path.exists(
            os.path.join(app_dir, *module_name.split(".")) + ".py")
        raise ImportError(f"module {module_name!r} ({where}) has no attribute {class_name!r}"
                          + (f"; a module of that name was imported before the one in "
                             f"{app_dir}: rename yours" if shadowed else ""))
    if not (isinstance(cls, type) and issubclass(cls, RoleEntryPoint)):
        raise TypeError(f"{entry_point} is not a subclass of rolehost.RoleEntryPoint")
    return cls


def _has_token(proc: Any, token: str, me: int) -> bool:
    try:
        found = proc.environ().get(protocol.TOKEN_ENV, "") if proc.pid != me else ""
    except Exception:  # gone, a zombie, or not ours to read
        return False
    return bool(found == token or found.startswith(token + ":"))


def _thread(target: Callable[..., Any], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


def _update_environment(variables: dict[str, str | None]) -> None:
    """Set the host's own environment, which the processes the role starts from now on
    inherit (None: unset). Those it started before keep the copy they were given."""
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _leave(code: ExitCode) -> NoReturn:
    """End the host process. os._exit: the user's sync run() may still be executing on
    the main thread, and non-daemon threads of theirs must not keep a stopped instance
    alive."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def check(entry_point: str, app_dir: str, site: str | None = None) -> int:
    """`python -m rolehost.host --check ENTRY APP [SITE]`: can this entry point be loaded
    (else 2), and the site's application (else 3)?"""
    try:
        load_entry_point(entry_point, app_dir)
    except BaseException:
        sys.stderr.write(_traceback())
        return 2
    if site:
        from rolehost.site import load_application

        try:
            load_application(site, app_dir)
        except BaseException:
            sys.stderr.write(_traceback())
            return 3
    return 0


def become(uid: int, gid: int) -> None:
    """Drop root for the role's user, before any thread or role code runs: its uid and
    gid, no supplementary group of root's. The standby that becomes this host ran as
    root, the controller's user, until now: it serves any role, each with a user of its
    own. A failure exits: a host must never run role code as root by mistake."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        sys.stderr.write(f"rolehost: cannot become uid {uid}: {exc}\n")
        os._exit(ExitCode.BOOT_FAILED)


def main() -> NoReturn:
    if sys.argv[1:2] == ["--check"]:
        sys.exit(check(*sys.argv[2:5]))
    channel = Channel(int(os.environ[protocol.CHANNEL_FD_ENV]))
    assignment = channel.receive()
    if assignment is None:
        os._exit(ExitCode.ORPHANED)  # the controller went away before it needed us
    if assignment["type"] != "assign":
        os._exit(ExitCode.STOPPED)  # released: a standby the controller no longer needs
    if (user := assignment.get("user")) is not None:
        become(int(user["uid"]), int(user["gid"]))
    os.environ.update(assignment["env"])  # inherited by every process the role starts
    os.chdir(assignment["cwd"])
    context = Context(**assignment["context"])
    context.peers = assignment.get("peers", context.peers)  # apart: encoded apart
    interval = float(assignment.get("heartbeat", protocol.HEARTBEAT_INTERVAL))
    host = Host(context, channel, _leave)
    RoleEnvironment.bind(context, host)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # output reaches the log as it is printed

    def serve() -> None:
        channel.serve(host.dispatch, interval)
        host.orphaned()

    threading.Thread(target=serve, name="rolehost-channel", daemon=True).start()
    host.boot()


if __name__ == "__main__":
    main()
