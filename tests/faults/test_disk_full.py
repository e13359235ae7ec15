"""Fault 14: the run directory's disk fills up while logs and history are written.

The run directory is on a small tmpfs of its own. Mounting one needs root (or
CAP_SYS_ADMIN); where that is not possible, the tests skip and say why.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rolehost.client import ApiError
from rolehost.observability import logs
from rolehost.testing import ServiceHarness, wait_until
from support.faults import FAST, Bystander, role, state_events, wait_gone
from support.service import MakeService

SIZE = "4m"
FULL = "No space left on device"

# Both instances log a numbered line of about 200 bytes every 20 ms. A tmpfs gives a
# file space a page (4 KiB) at a time: a full disk shows in a log once its page is full.
ROLE = role("""
class Role(RoleEntryPoint):
    def run(self):
        n = 0
        while not RoleEnvironment.is_stopping:
            n += 1
            print(f"tick {n} " + "." * 190, flush=True)
            time.sleep(0.02)
""")

# Each boot installs a little more into os/, as a real setup step would: it needs space
# on the run directory's disk.
INSTALL = """
[[roles.web.startup_tasks]]
command = ["sh", "-c", "head -c 65536 /dev/zero >> \\"$ROLEHOST_OS_DIR/tools.bin\\""]
"""


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A tmpfs of SIZE, mounted for the test and unmounted after it, whatever happened."""
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command to make a small disk with")
    point = Path(tempfile.mkdtemp(prefix="rolehost-full-"))
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(point)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if done.returncode != 0:
        point.rmdir()
        pytest.skip(f"cannot mount a {SIZE} tmpfs (needs root or CAP_SYS_ADMIN): "
                    f"{(done.stderr or done.stdout).strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True, timeout=30,
                          check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, timeout=30,
                           check=False)  # still in use: detach it now, freed when let go
        point.rmdir()


def fill(path: Path) -> None:
    """Append zeros to `path` until the disk is full, to the last page."""

    def once() -> bool:
        with open(path, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return os.statvfs(path.parent).f_bavail == 0  # no page freed meanwhile

    wait_until(once, 5, f"{path.parent} to be full")


def named(h: ServiceHarness, event: str) -> list[dict[str, Any]]:
    return [e for e in h.events() if e["event"] == event]


def by_file(h: ServiceHarness, event: str) -> dict[str, int]:
    """How many `event`s each file had."""
    counts: dict[str, int] = {}
    for e in named(h, event):
        counts[e["file"]] = counts.get(e["file"], 0) + 1
    return counts


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^\S+Z stdout \| tick (\d+) \.+$", text, re.MULTILINE)]


def test_disk_full_under_the_run_directory(make_service: MakeService, small_disk: Path) -> None:
    service = make_service(ROLE, instances=2, service=FAST, extra=INSTALL)
    filler = small_disk / "filler"
    with service.harness(run_dir=small_disk / "run") as h:
        try:
            bystander = Bystander(h)
            before = h.wait_state("web/0", "ready", 30)
            log0, log1 = (Path(h.instance(n)["log"]) for n in ("web/0", "web/1"))
            event_log = h.run_dir.logs / "controller.log"
            history = h.run_dir.path / "history.jsonl"
            watched = {str(log0), str(log1), str(event_log)}
            outputs = {str(log0), str(log1)}
            wait_until(lambda: len(ticks(h.logs("web/1"))) > 20, 10, "the role to log")

            # The disk fills up.
            fill(filler)
            wait_until(lambda: set(by_file(h, "log_write_failed")) >= outputs, 5,
                       "a log_write_failed event for each instance log",
                       lambda: str(h.events()[-5:]))
            sizes = {f: f.stat().st_size for f in (log0, log1)}
            time.sleep(1)  # about 50 lines per instance lost meanwhile: the passing of time
            # One warning per file, not one per lost line; no line cut in half.
            assert {f: n for f, n in by_file(h, "log_write_failed").items() if f in outputs} == (
                dict.fromkeys(outputs, 1))
            assert named(h, "log_write_failed")[0]["error"] == FULL
            for f, size in sizes.items():
                assert f.stat().st_size == size, f
                assert f.read_bytes().endswith(b"\n"), f
            assert h.controller is not None and h.controller.poll() is None
            bystander.check()

            # A restart needs room (app/ copied again, the startup task): it fails clearly,
            # and the instance recycles with back-off; the bystander is not touched.
            with pytest.raises(ApiError) as refused:
                h.restart("web/0")
            assert refused.value.status == 500
            assert "web_IN_0 did not become ready after restart" in str(refused.value)
            assert FULL in str(refused.value), refused.value
            wait_gone({before["pid"]})
            row = h.instance("web/0")
            assert row["state"] in ("recycling", "bootstrapping"), row
            assert FULL in row["last_error"], row
            recycled = len(state_events(h, "web_IN_0", "recycling"))
            wait_until(lambda: len(state_events(h, "web_IN_0", "recycling")) >= recycled + 2,
                       10, "retries with back-off")
            assert "next try in" in str(state_events(h, "web_IN_0", "recycling")[-1]["reason"])
            # By now the event log's own page is full too.
            wait_until(lambda: str(event_log) in by_file(h, "log_write_failed"), 10,
                       "the event log to fail")
            sizes[event_log] = event_log.stat().st_size
            assert by_file(h, "log_write_failed") == dict.fromkeys(watched, 1)
            # The history could not be written: said once, kept in memory and in the API.
            assert len(named(h, "history_write_failed")) == 1
            assert named(h, "history_write_failed")[0]["error"] == FULL
            [failed] = h.operations()
            assert (failed["kind"], failed["outcome"]) == ("restart", "failed")
            assert not history.exists() or failed["id"] not in history.read_text()
            bystander.check()

            # Space again: everything resumes, and says what was lost.
            filler.unlink()
            h.wait_state("web/0", "ready", 10)
            wait_until(lambda: set(by_file(h, "log_write_resumed")) >= watched, 5,
                       "a log_write_resumed event for each log")
            assert by_file(h, "log_write_resumed") == dict.fromkeys(watched, 1)
            resumed = {e["file"]: e for e in named(h, "log_write_resumed")}
            assert resumed[str(log1)]["lines_lost"] >= 40, resumed  # 20 ms a line, for > 1 s
            marker = re.compile(r"^\S+Z rolehost \| (\d+) lines \(\d+ bytes\) of output lost "
                                rf"here from \S+ to \S+: {FULL}$", re.MULTILINE)

            def resumed_lines() -> re.Match[str] | None:
                found = marker.search(text := h.logs("web/1"))
                return found if found and ticks(text[found.end():]) else None

            gap = wait_until(resumed_lines, 5, "new lines after the marker",
                             lambda: h.logs("web/1")[-500:])
            text = gap.string
            assert int(gap[1]) == resumed[str(log1)]["lines_lost"]
            print(f"{gap[0]!r}; restart: {refused.value}")
            ahead, behind = ticks(text[:gap.start()]), ticks(text[gap.end():])
            assert behind and behind[0] - ahead[-1] - 1 == int(gap[1])  # exactly those lost
            assert event_log.stat().st_size > sizes[event_log]
            assert json.loads(event_log.read_text().splitlines()[-1])  # JSON lines still

            # The next operation writes the history that was missing, then its own.
            (done,) = h.restart("web/0")
            assert done["state"] == "ready"
            [caught_up] = named(h, "history_write_resumed")
            assert caught_up["caught_up"] == [failed["id"]]
            lines = [json.loads(line) for line in history.read_text().splitlines()]
            assert [(o["kind"], o["outcome"]) for o in lines][-3:] == [
                ("restart", "failed"), ("restart", "running"), ("restart", "succeeded")]
            bystander.check()
        finally:
            filler.unlink(missing_ok=True)
    # The harness has checked, on leaving, that no process of the service is left.


def test_app_copy_on_a_full_disk(small_disk: Path) -> None:
    """Without a controller: deploying app/ on a full disk fails with a clear error and
    leaves app/ empty, so that the next boot (a recycle too) copies it again rather than
    run a half-copied app."""
    from rolehost.fabric.disks import Disks

    source = Path(tempfile.mkdtemp(prefix="rolehost-app-"))
    try:
        (source / "roles.py").write_text("class Role: pass\n" * 1000)
        disks = Disks(small_disk / "web_IN_0")
        filler = small_disk / "filler"
        fill(filler)
        with pytest.raises(OSError) as failed:
            disks.deploy(source, small_disk)
        assert str(failed.value) == (
            f"cannot copy the app into {disks.app}: [Errno 28] {FULL}: "
            f"'{source / 'roles.py'}' -> '{disks.app / 'roles.py'}'")
        assert disks.app.is_dir() and not any(disks.app.iterdir())
        filler.unlink()
        disks.deploy(source, small_disk)
        assert (disks.app / "roles.py").read_text() == (source / "roles.py").read_text()
    finally:
        shutil.rmtree(source)


def test_console_and_history_on_a_full_disk(small_disk: Path) -> None:
    """Without a controller: a console redirected to the full disk keeps trying (only a
    pipe that closes silences it for good), and the history loses no operation."""
    from rolehost.fabric.history import History

    history = History(small_disk / "history.jsonl")
    filler = small_disk / "filler"
    with open(small_disk / "console.txt", "w") as stream:
        console = logs.Console(stream)
        console.line("before")
        assert console.flush()
        fill(filler)
        for n in range(100):  # 10 kB: more than what is left of the file's page
            console.line(f"lost {n:03d} " + "." * 90)  # nothing escapes
        assert console.flush()
        assert console.enabled
        lost = history.begin("restart", {}, ["web_IN_0"])
        history.end(lost, "failed", "no space")
        assert not (small_disk / "history.jsonl").read_text()  # created, nothing in it
        assert [o.outcome for o in history.operations.values()] == ["failed"]  # in memory

        filler.unlink()
        console.line("after")
        assert console.flush()
        assert "after" in (small_disk / "console.txt").read_text()
        later = history.begin("reimage", {}, ["web_IN_1"])  # catches up first
    operations = History(small_disk / "history.jsonl").operations
    assert [(o.id, o.outcome) for o in operations.values()] == [
        (lost.id, "failed"), (later.id, "interrupted")]
