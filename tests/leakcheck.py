"""The suite's leak check: no test may leave a process or a /tmp/rolehost-* folder behind.

Registered for the whole suite by ../conftest.py; elsewhere, `-p leakcheck` with this
folder on the Python path (tests/test_leakcheck.py runs it so). `-p no:rolehost-leakcheck`
turns it off, to look at what a test leaves running.

Each test is checked after its teardown (its fixtures' included) against what existed
before its setup, and fails there, naming what it leaked; the end of the session checks
everything again, for what no single test can be blamed for. Only this session's leftovers
count, because other sessions of the suite may run on the same machine at the same time:

- a process is this session's if it descends from the pytest process, or if its
  environment carries this session's token (`ROLEHOST_TEST_SESSION`, which every child
  inherits): a controller that detached from its parent is still found that way. One
  that is still exiting gets `GRACE` seconds before it counts. Once reported, a leaked
  process is killed: it must not outlive the run, nor be blamed on the next test.
- a folder is this session's if the pytest process made it: an audit hook records every
  `os.mkdir` of a /tmp/rolehost-* folder. A new folder that some other process made
  cannot be told apart from one another session made at the same moment, so it is only
  listed at the end (if it is still there), never blamed. The suite's own processes make
  none but the `rolehost check` rehearsal's scratch folder, which it removes unless the
  rehearsal failed (tests of that point its TMPDIR elsewhere). Leaked folders are left
  in place, to be looked at.

A test that failed keeps its folders without a second error: ServiceHarness keeps a
failed test's run directory on purpose, for inspection. A test that uses a fixture wider
than a function (a module's, say) may leave what that fixture holds until a later test
tears it down: its leftovers are judged at the end of the session instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

TOKEN = "ROLEHOST_TEST_SESSION"
PREFIX = "rolehost-"
GRACE = 5.0  # for a process still exiting: harnesses wait for their own, so this is spare
POLL = 0.05

Key = tuple[int, float]  # (pid, create time): a pid alone may be reused within a session


@dataclass(frozen=True)
class Proc:
    pid: int
    created: float
    command: str

    @property
    def key(self) -> Key:
        return self.pid, self.created

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.created and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command[:200]}"


@dataclass
class Leftovers:
    """What one test (or the session) left: processes still alive, folders still there."""

    processes: list[Proc] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.folders)

    def describe(self, processes_fate: str = "killed") -> list[str]:
        lines = [f"  process ({processes_fate}) {p}" for p in self.processes]
        return lines + [f"  folder {f}" for f in self.folders]


def _proc(process: psutil.Process) -> Proc | None:
    try:
        if process.status() == psutil.STATUS_ZOMBIE:  # exited; only its parent's wait is left
            return None
        command = " ".join(process.cmdline()) or process.name()
        return Proc(process.pid, process.create_time(), command)
    except psutil.Error:
        return None


def wait_gone(processes: Iterable[Proc], timeout: float) -> list[Proc]:
    """The processes still alive after up to `timeout` seconds."""
    alive = list(processes)
    deadline = time.monotonic() + timeout
    while alive:
        alive = [p for p in alive if p.alive()]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    return alive


def kill(processes: list[Proc]) -> None:
    for proc in processes:
        if proc.alive():
            with contextlib.suppress(psutil.Error):
                psutil.Process(proc.pid).kill()
    wait_gone(processes, GRACE)


class LeakCheck:
    """The plugin: one per session."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        os.environ[TOKEN] = self.token  # before any test starts a process
        self.roots = {os.path.realpath(d) for d in ("/tmp", tempfile.gettempdir())}
        self.made: set[str] = set()
        sys.addaudithook(self._audit)
        self.known = {p.key: p for p in self.processes()}  # alive at the last check
        self.at_start = set(self.known)
        self.seen = self.folders()  # listed at the last check
        self.deferred: dict[str, str] = {}  # folder or pid -> the test it appeared in
        self.reported: set[str] = set()
        self.kept: dict[str, str] = {}  # folder -> the failed test that kept it
        self.foreign: dict[str, str] = {}  # folder not made here -> test it appeared in
        self.session_leaks: list[str] = []

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "os.mkdir":  # the hook sees every audited event: return at once
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError, IndexError):
            return
        if os.path.basename(path).startswith(PREFIX) and os.path.dirname(path) in self.roots:
            self.made.add(path)

    def processes(self) -> Iterator[Proc]:
        """This session's live processes, other than pytest itself."""
        me = psutil.Process()
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            found.update((p.pid, p) for p in me.children(recursive=True))
        for process in psutil.process_iter(["environ"]):
            environ = process.info.get("environ") or {}  # None where access is denied
            if environ.get(TOKEN) == self.token and process.pid != me.pid:
                found.setdefault(process.pid, process)
        for process in found.values():
            if (proc := _proc(process)) is not None:
                yield proc

    def folders(self) -> set[str]:
        names = set()
        for root in self.roots:
            try:
                with os.scandir(root) as entries:
                    names |= {os.path.join(root, e.name) for e in entries
                              if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)}
            except OSError:
                continue
        return names

    # The hooks.

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self) -> None:
        # What collection made is no test's: the session's end judges it.
        self.known = {p.key: p for p in self.processes()}
        self.seen = self.folders()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and report.when in ("setup", "call"):
            item.stash[_FAILED] = True
        return report

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            self.check(item)

    def check(self, item: pytest.Item) -> None:
        """After `item`'s teardown: fail it for what it left, unless a wider fixture may
        hold that (then the session's end judges it)."""
        new = [p for p in self.processes() if p.key not in self.known]
        alive = wait_gone(new, GRACE)
        folders = self.folders()
        appeared = folders - self.seen
        mine = sorted(f for f in appeared if f in self.made)
        for folder in appeared - set(mine):
            self.foreign.setdefault(folder, item.nodeid)
        left = Leftovers(alive, mine)
        wide = _wide_fixtures(item)
        if left and wide:
            self.deferred.update({str(p.pid): item.nodeid for p in alive})
            self.deferred.update({f: f"{item.nodeid} (its {', '.join(wide)} may hold it)"
                                  for f in mine})
            left = Leftovers()
        elif item.stash.get(_FAILED, False):
            self.kept.update({f: item.nodeid for f in mine})
            left.folders = []
        kill(left.processes)
        self.reported.update(left.folders)
        self.known = {p.key: p for p in self.processes()}
        self.seen = self.folders()
        if left:
            pytest.fail("\n".join(["this test left behind:", *left.describe()]), pytrace=False)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        alive = wait_gone([p for p in self.processes() if p.key not in self.at_start], GRACE)
        kill(alive)
        folders = sorted(f for f in self.made if os.path.isdir(f)
                         and f not in self.reported and f not in self.kept)
        lines = [f"  process (killed) {p}, from {self.deferred.get(str(p.pid), 'no single test')}"
                 for p in alive]
        lines += [f"  folder {f}, from {self.deferred.get(f, 'no single test')}" for f in folders]
        if lines:
            self.session_leaks = lines
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter
        if self.kept:
            write.section("rolehost folders kept by failed tests (for inspection)")
            for folder, test in sorted(self.kept.items()):
                write.line(f"{folder}  ({test})")
        foreign = sorted(f for f in self.foreign if os.path.isdir(f))
        if foreign:
            write.section("new /tmp/rolehost-* folders this process did not make")
            write.line("another session's, or one a child process left (not judged):",
                       yellow=True)
            for folder in foreign:
                write.line(f"{folder}  (appeared during {self.foreign[folder]})")
        if self.session_leaks:
            write.section("leaks: this session left behind", red=True)
            for line in self.session_leaks:
                write.line(line, red=True)


_FAILED = pytest.StashKey[bool]()


def _wide_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures `item` uses that outlive it, but pytest's own (tmp_path_factory...):
    theirs hold no process and no rolehost folder."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    wide = []
    for name, definitions in info.name2fixturedefs.items():
        if not definitions:
            continue
        definition = definitions[-1]
        module = getattr(definition.func, "__module__", "") or ""
        if definition.scope != "function" and not module.startswith(("_pytest", "pytest")):
            wide.append(name)
    return sorted(wide)


def _distributes(config: pytest.Config) -> bool:
    """Whether this process hands the tests to pytest-xdist's workers rather than running
    them: each worker checks its own tests (with a token of its own), and the workers,
    which carry this process's token, would otherwise be this process's leaks."""
    return not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"


def pytest_configure(config: pytest.Config) -> None:
    if not _distributes(config) and \
            not config.pluginmanager.has_plugin("rolehost-leakcheck") and \
            not config.pluginmanager.is_blocked("rolehost-leakcheck"):
        config.pluginmanager.register(LeakCheck(), "rolehost-leakcheck")
