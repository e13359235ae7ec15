"""A root controller drops privileges: hosts and limited tasks run as the limited user.

The drop needs an interpreter the limited user can run. The one running these tests may
not be (pyenv keeps it under /root, which is 0700), so the test that sees the drop runs
the controller on a virtual environment of the system's Python, with rolehost copied in.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from rolehost.fabric.rundir import RunDir
from rolehost.processes import privileges
from rolehost.testing import HarnessError, ServiceHarness, wait_until
from support.python import reachable_python as reachable_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

ROLE = '''
import os
from pathlib import Path
from rolehost import RoleEntryPoint, RoleEnvironment

class Role(RoleEntryPoint):
    def on_start(self):
        seen = Path(RoleEnvironment.local_resource("data").path)
        try:
            os.listdir("/root")
            root_home = "readable"
        except PermissionError:
            root_home = "closed"
        (seen / "host").write_text(f"{os.getuid()} {os.getgid()} {os.environ['HOME']} {root_home}")
        return True
'''

DEFINITION = '''
[service]
name = "drop"
{service}

[roles.web]
entry_point = "roles:Role"

[roles.web.local_resources.data]
clean_on_recycle = false

[[roles.web.startup_tasks]]
command = 'echo "$(id -u) $HOME" > "$ROLEHOST_RESOURCE_DATA/limited-task"'
shell = true

[[roles.web.startup_tasks]]
command = 'id -u > "$ROLEHOST_RESOURCE_DATA/elevated-task"'
shell = true
context = "elevated"
'''


def write_service(folder: Path, service: str = "") -> Path:
    (folder / "roles.py").write_text(textwrap.dedent(ROLE))
    definition = folder / "rolehost.toml"
    definition.write_text(DEFINITION.format(service=service))
    return definition


def uids_of(pid: int) -> tuple[int, int]:
    uids = psutil.Process(pid).uids()
    return uids.real, uids.effective


@pytest.mark.slow
def test_hosts_and_limited_tasks_run_as_nobody(reachable_python: Path, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    definition = write_service(tmp_path, 'limited_user = "nobody"')
    with ServiceHarness(definition, python=reachable_python) as h:
        status = h.wait_ready(60)
        assert status["limited_user"]["name"] == "nobody"
        instance = status["instances"][0]
        assert uids_of(instance["pid"]) == (nobody.pw_uid, nobody.pw_uid)
        assert psutil.Process(instance["pid"]).gids().real == nobody.pw_gid
        assert uids_of(status["pid"]) == (0, 0)  # the controller keeps root

        root = h.run_dir.path / "instances" / "web_IN_0"
        data = root / "resources" / "data"
        host_saw = f"{nobody.pw_uid} {nobody.pw_gid} {root / 'os'} closed"
        assert (data / "host").read_text() == host_saw
        assert (data / "limited-task").read_text().split() == [str(nobody.pw_uid), str(root / "os")]
        assert (data / "elevated-task").read_text().strip() == "0"
        for folder in (root / "os", data):  # the user's, and no other user's to look in
            assert (folder.stat().st_uid, stat.S_IMODE(folder.stat().st_mode)) == (
                nobody.pw_uid, 0o700), folder
        for holder in (root, root / "resources"):  # the folders holding them stay root's
            assert (holder.stat().st_uid, stat.S_IMODE(holder.stat().st_mode)) == (0, 0o755)
        for path, mode in ((root / "app", 0o750), (root / "app" / "roles.py", 0o640)):
            # app/ is the user's to read only: root's, in its group
            found = path.stat()
            assert (found.st_uid, found.st_gid, stat.S_IMODE(found.st_mode)) == (
                0, nobody.pw_gid, mode), path

        # Only what the limited user needs is opened to it.
        mode = {p: stat.S_IMODE(p.stat().st_mode) for p in (
            h.run_dir.path, h.run_dir.path / "instances", h.run_dir.logs,
            h.run_dir.path / "packages", h.run_dir.socket)}
        assert mode == {h.run_dir.path: 0o711, h.run_dir.path / "instances": 0o711,
                        h.run_dir.logs: 0o700, h.run_dir.path / "packages": 0o700,
                        h.run_dir.socket: 0o600}

        # A reimage wipes os/ and deploys app/ again: both are the limited user's again.
        (data / "host").unlink()
        h.reimage("web_IN_0")
        wait_until(lambda: (data / "host").exists(), 30, "the host to start again")
        assert (data / "host").read_text().startswith(f"{nobody.pw_uid} ")
        assert (root / "os").stat().st_uid == nobody.pw_uid
        assert (root / "app" / "roles.py").stat().st_gid == nobody.pw_gid
        for private in (h.run_dir.path / "history.jsonl", h.run_dir.logs / "web_IN_0.log"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


LINKING_ROLE = '''
import os
from pathlib import Path
from rolehost import RoleEntryPoint, RoleEnvironment

class Role(RoleEntryPoint):
    """At its first start, tries to make the root controller work through links: in place
    of its folders, and of the folder the controller writes task markers to."""

    def on_start(self):
        data = Path(RoleEnvironment.local_resource("data").path)
        if (data / "tried").exists():
            (data / "started-again").write_text("yes")
            return True
        root, victim = data.parent.parent, RoleEnvironment.get_setting("victim")
        tried = []
        for name in ("os", "resources", "app"):
            try:
                (root / name).rename(root / f"{name}.old")
                (root / name).symlink_to(victim)
                tried.append(f"{name} moved")
            except PermissionError:
                tried.append(f"{name} refused")
        (data / "tried").write_text(", ".join(tried))
        markers = root / "os" / ".rolehost-markers"
        markers.rename(root / "os" / "markers.old")
        markers.symlink_to(victim)
        (root / "os" / "tmp").rmdir()
        (root / "os" / "tmp").symlink_to(victim)
        return False  # recycle: the controller prepares the folders again
'''


@pytest.mark.slow
def test_the_limited_user_cannot_steer_the_controller_through_links(
        reachable_python: Path, tmp_path: Path) -> None:
    """Whatever the role does to its folders, the root controller never wipes, hands over
    or writes anything outside them."""
    victim = Path(tempfile.mkdtemp(prefix="rolehost-victim-"))
    try:
        os.chmod(victim, 0o755)
        (victim / "keep").write_text("root's")
        (tmp_path / "roles.py").write_text(textwrap.dedent(LINKING_ROLE))
        definition = tmp_path / "rolehost.toml"
        definition.write_text(textwrap.dedent(f"""\
            [service]
            name = "links"
            backoff_initial = "100ms"

            [roles.web]
            entry_point = "roles:Role"

            [roles.web.settings]
            victim = "{victim}"

            [roles.web.local_resources.data]
            clean_on_recycle = false

            [roles.web.local_resources.scratch]

            [[roles.web.startup_tasks]]
            command = "true"
            once_per = "image"
            """))
        with ServiceHarness(definition, python=reachable_python) as h:
            h.wait_ready(60)
            data = h.run_dir.path / "instances" / "web_IN_0" / "resources" / "data"
            assert (data / "started-again").exists()
            assert (data / "tried").read_text() == "os refused, resources refused, app refused"
        assert [p.name for p in victim.iterdir()] == ["keep"]
        assert (victim.stat().st_uid, (victim / "keep").stat().st_uid) == (0, 0)
        assert (victim / "keep").read_text() == "root's"
    finally:
        shutil.rmtree(victim)


def test_default_user_that_cannot_run_the_interpreter_is_shown(tmp_path: Path) -> None:
    problem = privileges.check(privileges.User.named("nobody"), Path(tempfile.gettempdir()))
    if problem is None:
        pytest.skip("nobody can run this interpreter: the default drop works here")
    with ServiceHarness(write_service(tmp_path)) as h:
        status = h.wait_ready(30)
        assert status["limited_user"]["name"] == "root"
        assert "nobody cannot run" in status["limited_user"]["reason"]
        assert "[service] limited_user" in status["limited_user"]["reason"]
        assert "limited_user_unavailable" in (h.run_dir.logs / "controller.log").read_text()


@pytest.mark.parametrize("user, expected, detach", [
    ("nobody", "limited_user = 'nobody': nobody cannot run", False),
    ("no_such_user", "there is no user 'no_such_user'", False),
    ("no_such_user", "there is no user 'no_such_user'", True),
])
def test_a_named_user_that_cannot_run_the_hosts_starts_nothing(
        tmp_path: Path, user: str, expected: str, detach: bool) -> None:
    if user == "nobody" and privileges.check(
            privileges.User.named("nobody"), Path(tempfile.gettempdir())) is None:
        pytest.skip("nobody can run this interpreter")
    definition = write_service(tmp_path, f'limited_user = "{user}"')
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rolehost", "start", "-f", str(definition),
                           "--run-dir", str(run_dir), *(["--detach"] if detach else [])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert f"{definition}: [service] limited_user" in done.stderr
    assert not (run_dir / "control.sock").exists()
    assert not (run_dir / "instances" / "web_IN_0").exists()


def test_check_with_a_user_that_cannot_run_the_hosts_leaves_no_scratch_folder(
        tmp_path: Path) -> None:
    definition = write_service(tmp_path, 'limited_user = "no_such_user"')
    scratch = tmp_path / "tmp"  # the rehearsal's own TMPDIR: other runs' folders are not ours
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "rolehost", "check", "-f", str(definition)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 2, done.stderr
    assert (f"{definition}: [service] limited_user: there is no user 'no_such_user'"
            in done.stderr)
    assert list(scratch.iterdir()) == []


def test_a_folder_rolehost_did_not_make_is_not_opened_to_the_limited_user(
        reachable_python: Path, tmp_path: Path) -> None:
    """`--run-dir /root`: a 0700 folder of other files passes the run directory's own
    check (nobody else can open it), but opening it to the limited user (0711) would show
    the names in it to every user. The start is refused, the folder left as it was."""
    foreign = Path(tempfile.mkdtemp(prefix="rolehost-foreign-"))
    try:
        (foreign / ".bash_history").write_text("root's")
        harness = ServiceHarness(write_service(tmp_path), run_dir=foreign, python=reachable_python)
        with pytest.raises(HarnessError, match="exited with 2") as refused, harness:
            pass
        assert (f"each role's user must pass through the run directory {foreign}"
                in str(refused.value))
        assert f"{foreign} holds .bash_history" in str(refused.value)
        assert stat.S_IMODE(foreign.stat().st_mode) == 0o700
        assert not (foreign / "instances").exists()
        harness.assert_no_processes()
    finally:
        shutil.rmtree(foreign)


def test_a_run_directory_used_before_is_still_rolehosts(tmp_path: Path) -> None:
    # What a controller leaves in its run directory does not make it a foreign folder.
    run_dir = tmp_path / "run"
    for _ in range(2):
        with ServiceHarness(write_service(tmp_path), run_dir=run_dir) as h:
            h.wait_ready(30)
            h.restart("web_IN_0")
    assert RunDir(run_dir).strangers() == []
    assert (run_dir / "history.jsonl").exists() and (run_dir / "packages").is_dir()


def test_a_run_directory_rolehost_made_stays_its_own_whatever_it_holds(
        reachable_python: Path, tmp_path: Path) -> None:
    """A sample keeps its database in the run directory rolehost created (queue.db): the
    next start as root opens the folder to the limited user again, as it did the first
    time, rather than taking it for a foreign one."""
    run_dir = tmp_path / "run"
    for _ in range(2):
        with ServiceHarness(write_service(tmp_path), run_dir=run_dir,
                            python=reachable_python) as h:
            h.wait_ready(30)
        (run_dir / "queue.db").write_text("a role's")
    assert RunDir(run_dir).strangers() == []
