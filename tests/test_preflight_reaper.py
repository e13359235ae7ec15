"""The controller's own children and its orphan reaper.

The controller is a child subreaper: on SIGCHLD it reaps every exited child whose pid is
not in `process._tracked` (re-parented orphans). A child it waits for itself must be in
`_tracked` before the reaper can run, or the reaper may take its exit status first. The
deploy preflight once ran `subprocess.run` on a worker thread: an entry point that
failed to import could be reaped by the reaper between the child's exit and
subprocess's own wait, which then reported exit code 0 (it gets ECHILD) and let a version
that does not load through the preflight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import uvloop

from rolehost.client import ApiError
from rolehost.definition import load
from rolehost.fabric import preflight
from rolehost.processes import privileges, process
from rolehost.testing import ServiceHarness, run_dir_processes, wait_until
from support.service import MakeService

T = TypeVar("T")

ROLE = """
class Role(RoleEntryPoint):
    def on_start(self):
        return True
"""

# Put on the controller's PYTHONPATH. Each time the controller spawns a preflight child
# (`rolehost.host --check`), this waits until the child has exited (a zombie nobody
# waited for yet), then runs one orphan-reaper pass on the controller's loop before
# whoever spawned the child gets to wait for it: from a worker thread, it blocks until
# the pass ran; on the loop thread, the pass is the loop's next callback. Each pass is
# logged, with whether the exited child was still there to be reaped when it ran.
REAP_BETWEEN_EXIT_AND_WAIT = '''
import asyncio, errno, json, os, subprocess, threading

if os.environ.get("TEST_NO_PIDFD"):
    def pidfd_open(pid, flags=0):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    os.pidfd_open = pidfd_open

_Popen = subprocess.Popen


class Popen(_Popen):
    def __init__(self, args, *rest, **kwargs):
        super().__init__(args, *rest, **kwargs)
        if not (isinstance(args, list) and "--check" in args):
            return
        from rolehost.processes import process

        loop = process._sigchld_loop
        if loop is None or not process._reap_orphans:
            return  # no orphan reaper in this process
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        ran = threading.Event()
        pid = self.pid

        def reap():
            try:
                zombie = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                zombie = None
            process.reap_orphans()
            with open(os.environ["TEST_REAP_LOG"], "a") as log:
                log.write(json.dumps({"pid": pid, "zombie": zombie is not None}) + "\\n")
            ran.set()

        loop.call_soon_threadsafe(reap)
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            ran.wait(30)


subprocess.Popen = Popen
'''


def _pids(h: ServiceHarness) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in h.status()["instances"]}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _no_preflight_child_left(h: ServiceHarness) -> None:
    """No `rolehost.host --check` child of the controller is left, and no zombie (an
    exited preflight child has no command line left to be told by)."""
    assert h.controller is not None
    left = []
    for proc in psutil.Process(h.controller.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE or "--check" in proc.cmdline():
                left.append(proc)
    assert not left, left


@pytest.mark.parametrize("pidfd", ["pidfd", "no-pidfd"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.timeout(120)
def test_a_reaper_pass_between_exit_and_wait_refuses_the_bad_version(
    make_service: MakeService, tmp_path: Path, loop: str, pidfd: str
) -> None:
    """Deterministic: the orphan reaper runs between the preflight child's exit and its
    wait, every time. The child is the controller's own: the reaper leaves it alone."""
    service = make_service(ROLE, instances=2)
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(REAP_BETWEEN_EXIT_AND_WAIT)
    reaps = tmp_path / "reaps.jsonl"
    env = {"PYTHONPATH": os.pathsep.join(
               p for p in (str(folder), os.environ.get("PYTHONPATH")) if p),
           "ROLEHOST_LOOP": loop, "TEST_REAP_LOG": str(reaps)}
    if pidfd == "no-pidfd":
        env["TEST_NO_PIDFD"] = "1"
    with service.harness(env=env) as h:
        h.wait_ready(30)
        before = _pids(h)
        code = service.toml.parent / "app" / "roles.py"
        code.write_text('raise RuntimeError("v2 is broken at import")\n' + code.read_text())
        h.package("v2")
        with pytest.raises(ApiError) as refused:
            h.client.deploy("v2")
        assert refused.value.status == 422, refused.value
        assert "RuntimeError: v2 is broken at import" in str(refused.value)
        # The reaper did pass while the exited child was there to be taken.
        passes = [json.loads(line) for line in reaps.read_text().splitlines()]
        assert passes and all(p["zombie"] for p in passes), passes
        logged = (h.run_dir.logs / "controller.log").read_text()
        assert ('"pidfd_unavailable"' in logged) is (pidfd == "no-pidfd")
        assert _pids(h) == before
        assert h.status()["walk"] is None
        _no_preflight_child_left(h)


def _roles_toml(tmp_path: Path, count: int) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    lines = ["[service]", 'name = "test"', "upgrade_domains = 2", ""]
    for n in range(count):
        (app / f"role{n}.py").write_text("from rolehost import RoleEntryPoint\n"
                                         + textwrap.dedent(ROLE))
        lines += [f"[roles.r{n}]", f'entry_point = "role{n}:Role"', 'app = "app"',
                  "instances = 1", ""]
    toml = tmp_path / "rolehost.toml"
    toml.write_text("\n".join(lines))
    return toml


@pytest.mark.timeout(180)
def test_a_version_that_does_not_import_is_refused_every_time(tmp_path: Path) -> None:
    """No injection: the race as it happens. Four roles, each of whose entry point
    raises at import in the new version: their preflight children exit together, so
    each one's SIGCHLD runs the reaper while the others' exits are still unwaited."""
    roles = 4
    toml = _roles_toml(tmp_path, roles)
    with ServiceHarness(toml) as h:
        h.wait_ready(30)
        before = _pids(h)
        for n in range(roles):
            module = tmp_path / "app" / f"role{n}.py"
            module.write_text(f'raise RuntimeError("role{n} is broken at import")\n'
                              + module.read_text())
        h.package("v2")
        outcomes = []
        for _ in range(10):
            try:
                h.client.deploy("v2")
            except ApiError as exc:
                named = [n for n in range(roles) if f"role{n} is broken at import" in str(exc)]
                outcomes.append((exc.status, named))
            else:
                outcomes.append((200, []))
                h.wait_walk(120)  # the walk fails and rolls back; the next deploy may start
        assert outcomes == [(422, list(range(roles)))] * 10, outcomes
        # The CLI says so too, with its exit code for a bad definition (as `start` would).
        cli = subprocess.run(
            [sys.executable, "-m", "rolehost", "deploy", "v2", "-f", str(toml),
             "--run-dir", str(h.run_dir.path)],
            capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2, cli
        assert "version v2 does not load" in cli.stderr and "role3 is broken" in cli.stderr
        assert _pids(h) == before
        assert all(_alive(pid) for pid in before.values())
        assert h.status()["walk"] is None
        assert not [e for e in h.events() if e["event"] == "maintenance"]
        records = h.operations()
        assert [(r["kind"], r["outcome"]) for r in records] == [("deploy v2", "failed")] * 11
        _no_preflight_child_left(h)


# `process.run` and the preflight in this process (no orphan reaper here): the children
# carry ROLEHOST_RUN_DIR=tmp_path, so `run_dir_processes` finds any that is left.


NewLoop = Callable[[], asyncio.AbstractEventLoop]
LOOPS: dict[str, NewLoop] = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _loops() -> list[Any]:
    return [pytest.param(new_loop, id=name) for name, new_loop in LOOPS.items()]


@pytest.fixture
def tagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ROLEHOST_RUN_DIR", str(tmp_path))
    yield tmp_path
    wait_until(lambda: not run_dir_processes(tmp_path), 5, "no child left",
               lambda: str(run_dir_processes(tmp_path)))


def _on(new_loop: NewLoop, work: Coroutine[Any, Any, T]) -> T:
    loop = new_loop()
    try:
        return loop.run_until_complete(work)
    finally:
        loop.close()


@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.timeout(60)
def test_run_returns_the_exit_code_and_both_outputs(tagged: Path, new_loop: NewLoop) -> None:
    script = ("import os, sys; print('out'); print('err', file=sys.stderr); "
              "sys.stdout.flush(); os._exit(3)")
    done = _on(new_loop, process.run([sys.executable, "-c", script], tagged, 30))
    assert done == process.Completed(3, b"out\n", b"err\n")
    killed = _on(new_loop, process.run(["sh", "-c", "kill -TERM $$"], tagged, 30))
    assert killed == process.Completed(-signal.SIGTERM, b"", b"")
    assert not process._tracked


# Leaves a grandchild in its process group holding stdout, then exits or sleeps.
LEAVES_A_CHILD = "sleep 600 & echo $! ; {then}"


def _grandchild(done_or_stdout: bytes) -> int:
    return int(done_or_stdout.split()[0])


@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.timeout(60)
def test_run_sweeps_what_an_exited_child_left(tagged: Path, new_loop: NewLoop) -> None:
    began = time.monotonic()
    done = _on(new_loop, process.run(["sh", "-c", LEAVES_A_CHILD.format(then="exit 0")],
                                     tagged, 30))
    assert done.returncode == 0  # not held up by the grandchild's copy of stdout
    assert time.monotonic() - began < 30  # against the grandchild's 600 s, not 10 s of load
    # The sweep's SIGTERM reached it; a loaded machine lists it as sleeping until the
    # kernel has run it to act on the signal.
    grandchild = _grandchild(done.stdout)
    wait_until(lambda: not _alive(grandchild), 5, "the swept grandchild to be gone")


@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.timeout(60)
def test_run_kills_the_tree_on_timeout_and_on_cancel(tagged: Path, new_loop: NewLoop) -> None:
    pids = tagged / "pids"

    async def timing_out() -> None:
        argv = ["sh", "-c", f"echo $$ > {pids}; " + LEAVES_A_CHILD.format(then="sleep 600")]
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await process.run(argv, tagged, 0.5)
        assert time.monotonic() - began < 30  # cut at 0.5 s, against the sleep's 600 s

    async def cancelled() -> None:
        argv = ["sh", "-c", f"echo $$ > {pids}; sleep 600"]
        task = asyncio.ensure_future(process.run(argv, tagged, 600))
        await asyncio.to_thread(wait_until, lambda: pids.exists() and pids.read_text(), 10,
                                "the child to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    for work in (timing_out, cancelled):
        pids.unlink(missing_ok=True)
        _on(new_loop, work())
        # The child and its grandchild: gone, once the kernel has acted on the SIGKILLs
        # (a loaded machine lists one as sleeping for a moment after it was sent).
        wait_until(lambda: not run_dir_processes(tagged), 5, "the killed tree to be gone")
        child = int(pids.read_text())
        with pytest.raises(ChildProcessError):  # and reaped
            os.waitpid(child, os.WNOHANG)
    assert not process._tracked


BAD = 'raise RuntimeError("broken at import")\n'
SLOW = "import subprocess, time\nsubprocess.Popen(['sleep', '600'])\ntime.sleep(600)\n"


def _definition(tmp_path: Path, modules: dict[str, str]) -> Path:
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    lines = ["[service]", 'name = "test"', ""]
    for name, source in modules.items():
        (app / f"{name}.py").write_text(source + "from rolehost import RoleEntryPoint\n"
                                        "class Role(RoleEntryPoint):\n    pass\n")
        lines += [f"[roles.{name}]", f'entry_point = "{name}:Role"', 'app = "app"', ""]
    toml = tmp_path / "rolehost.toml"
    toml.write_text("\n".join(lines))
    return toml


def _import_timeout() -> float:
    """An import timeout that the good and bad roles' checks keep within, on this machine
    now: four times what a check of a role with nothing to import takes (an interpreter's
    start, rolehost's import), a second at least. A fixed second was outlasted by them
    under load, and they were reported as too slow too."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "rolehost.host", "--check", "m:Role", "."],
                   capture_output=True, timeout=120)
    return max(1.0, 4 * (time.monotonic() - began))


@pytest.mark.parametrize("way", ["sync", "asyncio", "uvloop"])
@pytest.mark.timeout(300)  # a hang's guard: the import timeout follows the machine's pace
def test_preflight_names_each_role_that_does_not_load(
    tagged: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    timeout = _import_timeout()
    monkeypatch.setattr(preflight, "IMPORT_TIMEOUT", timeout)
    toml = _definition(tagged, {"good": "", "bad": BAD, "slow": SLOW})
    definition = load(toml)
    began = time.monotonic()
    if way == "sync":  # the CLI's
        errors = preflight.entry_points(definition, toml)
    else:
        errors = _on(LOOPS[way], preflight.check_entry_points(definition, toml))
    assert time.monotonic() - began < timeout + 10  # cut at the timeout, not after its sleep
    shown = [str(e) for e in errors]
    assert len(shown) == 2, shown
    assert "roles.bad.entry_point: cannot load bad:Role" in shown[0]
    assert "RuntimeError: broken at import" in shown[0]
    # The user's frames only: importlib's and rolehost's own say nothing about their module.
    assert "importlib" not in shown[0] and "rolehost/" not in shown[0], shown[0]
    assert f"roles.slow.entry_point: importing slow:Role took over {timeout:g}s" in shown[1]
    # The slow import's `sleep 600` too, once the kernel has acted on its SIGKILL.
    wait_until(lambda: not run_dir_processes(tagged), 5, "the slow import's tree to be gone")


def test_the_blocking_preflight_is_refused_where_orphans_are_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "_reap_orphans", True)
    with pytest.raises(RuntimeError, match="await check_entry_points"):
        preflight.entry_points(load(_definition(tmp_path, {"good": ""})), None)


def test_the_privilege_probe_is_refused_where_orphans_are_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # privileges.check waits for its probe with subprocess.run; the reaper could take it.
    monkeypatch.setattr(process, "_reap_orphans", True)
    user = privileges.User.named(pwd.getpwuid(os.getuid()).pw_name)
    with pytest.raises(RuntimeError, match="decide who runs limited work first"):
        privileges.check(user, tmp_path)
