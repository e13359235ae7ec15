"""Child processes of the controller: spawning, exit, channel, output and tree sweeps.

An instance's processes are found four ways, because each alone misses some:
- the host and its live descendants, by parentage (psutil);
- the host's process group, which its plain children share (killpg);
- descendants that detached into a session of their own and were orphaned: the
  controller is a child subreaper, so they are re-parented to it, and they carry a
  token in their environment: `DEPLOYMENT:INSTANCE:BOOT` for a boot's startup tasks,
  `DEPLOYMENT:INSTANCE:BOOT:hN` for its Nth host;
- and what drops its environment too: by its host's cgroup, where there is one
  (cgroups.py), or else, at the controller's stop, as a child of the controller that it
  did not start (`sweep_strays`).

Exits are seen through a pidfd, never by polling. Where pidfd_open is unavailable (Linux
before 5.3, valgrind, a seccomp profile that denies it), they are seen on SIGCHLD
instead, by a waitid(WNOWAIT) of each child watched that way: still no polling. Either
way, the tree is swept while the exited host is still an unreaped zombie, so its pid
and process group cannot be reused by an unrelated process before the sweep signals
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil
import structlog

from rolehost import protocol
from rolehost.processes import ownership

if TYPE_CHECKING:
    # Only named: a process is spawned as the user it is given, and privileges.py, which
    # decides who that is, asks this module whether orphans are reaped.
    pass

log = structlog.get_logger()

# Pids the controller reaps itself; the orphan reaper leaves them alone.
_tracked: set[int] = set()
# Pids watched without a pidfd, each with what to run once it has exited (a zombie).
_unwatched: dict[int, Callable[[], None]] = {}
_pidfd_unavailable: OSError | None = None  # why pidfd_open failed, once it did
_sigchld_loop: asyncio.AbstractEventLoop | None = None  # the loop SIGCHLD is handled on
_reap_orphans = False  # adopt_orphans asked for it: this process is a subreaper
_reaping: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
KILL_GRACE = 1.0  # seconds a swept process gets between SIGTERM and SIGKILL

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the controller: uvloop's when it is installed (the balancer
    relays faster on it), asyncio's otherwise, or when ROLEHOST_LOOP=asyncio."""
    if os.environ.get("ROLEHOST_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def adopt_orphans(loop: asyncio.AbstractEventLoop) -> bool:
    """Make this process the subreaper of its descendants, and reap the orphans it gets."""
    global _reap_orphans
    _reap_orphans = True
    _handle_sigchld(loop)
    return become_subreaper()


def reaping_orphans() -> bool:
    """Whether this process reaps orphans (`adopt_orphans`): then it must wait for its
    own children on the loop (`watch_exit`, `run`), never on another thread."""
    return _reap_orphans


def _handle_sigchld(loop: asyncio.AbstractEventLoop) -> None:
    """Run `_on_sigchld` on `loop` at each SIGCHLD (once installed, the next calls for the
    same loop do nothing)."""
    global _sigchld_loop
    if _sigchld_loop is loop:
        return
    try:
        loop.add_signal_handler(signal.SIGCHLD, _on_sigchld)
    except RuntimeError:
        # uvloop refuses SIGCHLD: libuv wants it for the children it spawns itself, and
        # rolehost spawns none through the loop (subprocess.Popen and pidfds only). A plain
        # handler does what add_signal_handler would: Python's C handler writes to the
        # wake-up fd uvloop set (signal.set_wakeup_fd), uvloop runs this handler on the
        # main thread, and the work itself runs as a loop callback, never in the middle of
        # a spawn (a pid is in `_tracked` before the loop runs anything else).
        def on_sigchld(signum: int, frame: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to do for it
                loop.call_soon_threadsafe(_on_sigchld)

        signal.signal(signal.SIGCHLD, on_sigchld)
        signal.siginterrupt(signal.SIGCHLD, False)  # SA_RESTART, as add_signal_handler
    _sigchld_loop = loop


def _on_sigchld() -> None:
    # Exits watched without a pidfd first: they only look (WNOWAIT), and their pids are
    # in `_tracked`, so the orphan reaper would leave them alone anyway.
    _check_unwatched()
    if _reap_orphans:
        reap_orphans()


def _check_unwatched() -> None:
    """Run the exit callback of each pid in `_unwatched` that has exited, leaving it a
    zombie (the callback reaps it, after its sweep)."""
    for pid, on_exit in list(_unwatched.items()):
        try:
            gone = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped by someone else: a pidfd would turn readable
            gone = True  # too, and the callback's waitpid says so
        if gone:
            del _unwatched[pid]
            on_exit()


def child_pids(pid: int | None = None) -> list[int]:
    """The children of `pid` (None: this process), from /proc/PID/task/*/children: a
    read per thread. psutil finds children by reading the stat file of every process
    on the machine, and the controller asks at every SIGCHLD and for every instance's
    sweep: with N instances, O(N) reads each, O(N^2) over a stop or a walk. psutil's
    scan where the files are missing (a kernel without CONFIG_PROC_CHILDREN, not Linux)."""
    tasks = Path(f"/proc/{'self' if pid is None else pid}/task")
    try:
        listed = [(task / "children").read_text() for task in tasks.iterdir()]
    except FileNotFoundError:
        if pid is not None and not tasks.parent.exists():
            return []  # gone
        return _scanned_children(pid)
    except OSError:  # gone meanwhile (ESRCH), or not ours to read
        return []
    return [int(each) for text in listed for each in text.split()]


def _scanned_children(pid: int | None) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendant_pids(pid: int) -> list[int]:
    """Every descendant of `pid`, children first."""
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in child_pids(p) if c not in found]
        found += children
        frontier = children
    return found


def _processes(pids: list[int]) -> list[psutil.Process]:
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    return processes


def reap_orphans() -> None:
    """Reap exited children that are not ours to wait for (re-parented orphans)."""
    for pid in child_pids():
        if pid in _tracked:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def tree_of(root: int | None, token: str | None) -> list[psutil.Process]:
    """The live processes of one instance: `root`'s descendants and its token's orphans."""
    found: dict[int, psutil.Process] = {}
    if root is not None:
        found.update((p.pid, p) for p in _processes([root, *descendant_pids(root)]))
    if not token:
        return list(found.values())
    # The orphans only: a psutil.Process per child is a read of its stat file, and the
    # controller's children are every instance's host (tracked): N reads per sweep made
    # a stop of N instances O(N^2) reads, on the threads that also hold the loop's GIL.
    orphans = [pid for pid in child_pids() if pid not in _tracked and pid not in found]
    for child in _processes(orphans):
        if not has_token(child, token):
            continue
        found[child.pid] = child
        found.update((p.pid, p) for p in _processes(descendant_pids(child.pid)))
    return list(found.values())


def has_token(proc: psutil.Process, token: str) -> bool:
    """Whether `proc` belongs to `token`: a boot's token covers its hosts' (`BOOT:hN`)."""
    try:
        found = proc.environ().get(protocol.TOKEN_ENV, "")
    except psutil.Error:
        return False
    return found == token or found.startswith(token + ":")


def signal_tree(root: int | None, token: str | None, sig: int) -> list[psutil.Process]:
    """Send `sig` to every process of the instance; return them for waiting."""
    procs = tree_of(root, token)
    if root is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    return procs


def sweep(root: int | None, token: str | None, exclude: int | None = None) -> int:
    """Terminate the instance's processes: SIGTERM, then SIGKILL after KILL_GRACE.

    Blocking (it waits); the controller runs it on a worker thread. Returns how many
    processes it had to signal, besides `exclude` (an exited host waiting to be reaped).
    """
    procs = [p for p in signal_tree(root, token, signal.SIGTERM) if p.pid != exclude]
    _kill_after_grace(procs)
    return len(procs)


def _kill_after_grace(terminated: list[psutil.Process]) -> None:
    """SIGKILL what is still alive of `terminated` (sent SIGTERM) after KILL_GRACE."""
    if not terminated:
        return
    _, alive = psutil.wait_procs(terminated, timeout=KILL_GRACE)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=KILL_GRACE)


def sweep_strays() -> list[str]:
    """Terminate the children of this process that it did not start (not watched by
    `watch_exit`), and their descendants: processes re-parented to it, a child subreaper,
    whose instance no parentage, token or cgroup tied them to (a daemon that dropped its
    environment, where there are no cgroups). Only for a process that owns all its
    children: the controller and run-instance, at their stop. Returns what they were."""
    try:
        strays = [c for c in psutil.Process().children() if c.pid not in _tracked]
    except psutil.Error:
        return []
    found: dict[int, psutil.Process] = {}
    for child in strays:
        found[child.pid] = child
        with contextlib.suppress(psutil.Error):
            found.update((p.pid, p) for p in child.children(recursive=True))
    described = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:  # the reaper's, not a stray
                continue
            described.append(f"{proc.pid} {' '.join(proc.cmdline())}")
            proc.terminate()
    _kill_after_grace(list(found.values()))
    return described


def leftovers(run_dir: Path) -> list[psutil.Process]:
    """Processes an earlier controller of `run_dir` started and could not take down: it
    was killed while a startup task's detached descendant ran, say (a host takes its own
    tree down when its controller goes; a task has no one to), or while a host was
    stopped (SIGSTOP), unable to see it go. Found by their run directory, and their
    token or (a host, whose token came in `assign`) channel, in the environment they
    were started with: what /proc shows."""
    wanted = str(run_dir)
    marks = (protocol.TOKEN_ENV, protocol.CHANNEL_FD_ENV)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("ROLEHOST_RUN_DIR") == wanted and any(mark in env for mark in marks):
            found.append(proc)
    return found


def sweep_leftovers(run_dir: Path) -> list[str]:
    """Terminate `leftovers(run_dir)` whose controller is provably gone; return what
    they were, for the log. OwnerAlive, signalling nothing, if any belongs to a
    controller that still runs (its run directory was deleted under it, say). One that
    names no controller (started by a rolehost before identities) is left alone too,
    and logged: nothing proves it is not a live service's."""
    procs, unproven = [], []
    alive: dict[int, list[int]] = {}
    for proc in leftovers(run_dir):
        try:
            owner = ownership.owner(proc.environ())
        except psutil.Error:
            continue
        if owner is None:
            unproven.append(proc.pid)
        elif owner.alive:
            alive.setdefault(owner.pid, []).append(proc.pid)
        else:
            procs.append(proc)
    if alive:
        pid, theirs = next(iter(alive.items()))
        raise ownership.OwnerAlive(pid, theirs)
    if unproven:
        log.warning("leftovers_left_alone", processes=unproven,
                    detail="they name no controller: nothing proves theirs is gone")
    described = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())}")
            proc.terminate()
    _kill_after_grace(procs)
    return described


def watch_exit(
    pid: int, before_reap: Callable[[], Awaitable[None]] | None = None
) -> asyncio.Future[int]:
    """A future of `pid`'s exit code (negative: the signal), seen through a pidfd, or
    on SIGCHLD where pidfd_open is unavailable.

    `before_reap` runs while the exited child is still a zombie, holding its pid. If it
    fails, the failure is logged and the child is reaped all the same: a future that
    never resolves would leave its instance waiting forever.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = _pidfd_open(pid)
    _tracked.add(pid)

    async def reap() -> None:
        if before_reap is not None:
            try:
                await before_reap()
            except Exception as exc:
                log.error("before_reap_failed", pid=pid, error=repr(exc))
        _, status = os.waitpid(pid, 0)
        _tracked.discard(pid)
        if not exited.done():  # cancelled by a waiter that was: the child is reaped all the same
            exited.set_result(os.waitstatus_to_exitcode(status))

    def start_reap() -> None:
        task = loop.create_task(reap())
        _reaping.add(task)
        task.add_done_callback(_reaping.discard)

    if pidfd is None:
        _handle_sigchld(loop)
        _unwatched[pid] = start_reap
        # An exit before the handler was installed, or before `pid` was in `_unwatched`,
        # sent a SIGCHLD that found nothing to do: look once now.
        loop.call_soon(_check_unwatched)
        return exited

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        start_reap()

    loop.add_reader(pidfd, readable)
    return exited


@dataclass(frozen=True)
class Completed:
    """How a child of `run` ended: its exit code (negative: the signal) and its output."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def run(argv: Sequence[str], cwd: str | Path, timeout: float) -> Completed:
    """Run a short-lived child of this process's own to its end, on the loop.

    Never `subprocess.run` (or any wait) on a worker thread while the orphan reaper is
    on: the reaper may reap the child between its exit and that wait, and subprocess
    then reports exit code 0 (its waitpid gets ECHILD). Here the child is spawned on
    the loop thread and handed to `watch_exit` at once, so its pid is in `_tracked`
    before the reaper can run. It gets a session of its own and no stdin. Its tree is
    swept before it is reaped; on `timeout` (TimeoutError) or cancellation it is killed
    with SIGKILL first. Either way it is reaped before this returns.
    """
    popen = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )
    assert popen.stdout is not None and popen.stderr is not None

    async def sweep_tree() -> None:  # while the exited child holds its pid and group
        await asyncio.to_thread(sweep, popen.pid, None, popen.pid)

    exited = watch_exit(popen.pid, sweep_tree)
    exited.add_done_callback(lambda f: setattr(popen, "returncode", f.result()))
    stdout, stderr = bytearray(), bytearray()
    pipes = (popen.stdout, popen.stderr)
    drained = [read_pipe(pipe, _Chunks(into.extend))
               for pipe, into in zip(pipes, (stdout, stderr), strict=True)]
    try:
        async with asyncio.timeout(timeout):
            code = await asyncio.shield(exited)
        # What it wrote just before it exited; a descendant that kept a pipe open was
        # swept with it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*drained), KILL_GRACE)
    except BaseException:
        if not exited.done():  # not reaped yet: the pid and group are still its own
            signal_tree(popen.pid, None, signal.SIGKILL)
            await asyncio.shield(exited)
        raise
    finally:
        loop = asyncio.get_running_loop()
        for pipe in pipes:  # a pipe still open: a descendant the sweep could not end
            if not pipe.closed:
                loop.remove_reader(pipe.fileno())
                pipe.close()
    return Completed(code, bytes(stdout), bytes(stderr))


def read_pipe(pipe: IO[bytes], protocol: asyncio.Protocol) -> asyncio.Future[None]:
    """Feed what `pipe` delivers to `protocol` (`data_received`, then `connection_lost`
    at its end, when `pipe` is closed); the future resolves then.

    In place of `loop.connect_read_pipe`: uvloop's pipe transport closes its descriptor
    twice (MagicStack/uvloop#763), which can close a file another thread (a sweep's
    psutil) has just opened under that number. Here the pipe is closed once, by its
    file object, on both loops.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    receive = protocol.data_received

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            receive(data)
            return
        loop.remove_reader(fd)
        pipe.close()
        protocol.connection_lost(None)
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    return ended


class _Chunks(asyncio.Protocol):
    """Hands each chunk read to a callback."""

    def __init__(self, on_chunk: Callable[[bytes], None]) -> None:
        self._on_chunk = on_chunk

    def data_received(self, data: bytes) -> None:
        self._on_chunk(data)


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the kernel or a sandbox does not provide them."""
    global _pidfd_unavailable
    if _pidfd_unavailable is not None:
        return None
    try:
        return os.pidfd_open(pid)
    except AttributeError as exc:  # a Python built without it
        _pidfd_unavailable = OSError(errno.ENOSYS, str(exc))
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):
            raise
        _pidfd_unavailable = exc
    log.warning("pidfd_unavailable", error=_pidfd_unavailable.strerror,
                errno=errno.errorcode.get(_pidfd_unavailable.errno or 0, "?"),
                detail="child exits are seen on SIGCHLD instead")
    return None


class Lines(asyncio.Protocol):
    """Splits a byte stream into newline-terminated records for a callback."""

    def __init__(self, on_line: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._buffer = b""
        self._on_line = on_line
        self._on_eof = on_eof

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" not in data:
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._on_line(line)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buffer:
            self._on_line(self._buffer)
            self._buffer = b""
        self._on_eof()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        return f"exited with {code} ({protocol.ExitCode(code).name.lower()})"
    except ValueError:
        return f"exited with {code}"


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def handle_stop_signals(loop: asyncio.AbstractEventLoop,
                        callback: Callable[[int], None]) -> None:
    """Run `callback(signum)` on `loop` at each SIGTERM and SIGINT. A plain handler, as
    for SIGCHLD above, not the loop's own: a loop puts the default actions back when its
    handlers are removed (and when it closes), so a late signal, while the process
    exits, would end it by the signal (130, 143) whatever the stop's exit code. Nor can
    blocking the signals cover that moment: another thread would take them."""
    def on_signal(signum: int, frame: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to do for it
            loop.call_soon_threadsafe(callback, signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
        signal.siginterrupt(sig, False)  # SA_RESTART, as add_signal_handler


def ignore_stop_signals() -> None:
    """Everything is stopped (the controller's instances, run-instance's one): a late
    SIGTERM or SIGINT has nothing left to stop, and must not decide the exit code. Each
    handler gives way to SIG_IGN in one step, which stays until the process is gone (no
    child is started after this)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
