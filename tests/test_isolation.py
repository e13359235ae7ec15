"""Under a root controller, each role runs as a user of its own (allocated uids, as
systemd's DynamicUser does): a role cannot signal another role's processes, write its
app/, nor read the definition, whose secrets reach it only as settings.

The roles need an interpreter every user can run (support.python)."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import psutil
import pytest

from rolehost.processes import identities
from rolehost.testing import ServiceHarness, wait_until
from support.python import reachable_python as reachable_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="users of their own need root")

# Role `alpha` waits for the test to name `beta`'s host and folders (in alpha's own
# resource: the test's folders are closed to it), then tries each, and writes what it saw.
ROLES = '''
import json, os, signal, time
from pathlib import Path
from rolehost import RoleEntryPoint, RoleEnvironment

def attempt(action):
    try:
        action()
        return "done"
    except PermissionError:
        return "PermissionError"

class Role(RoleEntryPoint):
    def run(self):
        if RoleEnvironment.current_instance.role != "alpha":
            return RoleEnvironment.wait_for_stop()
        data = Path(RoleEnvironment.local_resource("data").path)
        while not (data / "target").exists():
            time.sleep(0.05)
        target = json.loads((data / "target").read_text())
        seen = {
            "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "kill": attempt(lambda: os.kill(target["pid"], signal.SIGKILL)),
            "write_other_app": attempt(lambda: Path(target["app"], "planted").write_text("x")),
            "read_other_app": attempt(lambda: os.listdir(target["app"])),
            "read_other_os": attempt(lambda: os.listdir(target["os"])),
            "write_own_app": attempt(lambda: Path("planted").write_text("x")),
            "read_own_app": sorted(os.listdir(".")),
            "definition": attempt(lambda: open(target["definition"]).read()),
            "packages": attempt(lambda: os.listdir(target["packages"])),
            "secret": RoleEnvironment.get_setting("password"),
        }
        (data / "seen.json").write_text(json.dumps(seen))
        RoleEnvironment.wait_for_stop()
'''

DEFINITION = '''
[service]
name = "isolated"

[roles.alpha]
entry_point = "roles:Role"

[roles.alpha.settings]
password = { value = "hunter2", secret = true }

[roles.alpha.local_resources.data]

[roles.beta]
entry_point = "roles:Role"
'''


def test_each_role_runs_as_a_user_of_its_own(reachable_python: Path, tmp_path: Path) -> None:
    (tmp_path / "roles.py").write_text(textwrap.dedent(ROLES))
    definition = tmp_path / "rolehost.toml"  # in the roles' app folder, "." by default
    definition.write_text(DEFINITION)
    with ServiceHarness(definition, python=reachable_python) as h:
        status = h.wait_ready(60)
        assert status["limited_user"]["name"] == "dynamic", status["limited_user"]
        hosts = {i["role"]: i["pid"] for i in status["instances"]}
        uids = {role: psutil.Process(pid).uids() for role, pid in hosts.items()}
        assert uids["alpha"].real != uids["beta"].real
        for role, found in uids.items():
            assert identities.FIRST_UID <= found.real < identities.FIRST_UID + identities.COUNT
            assert (found.real, found.effective) == (found.real, found.real), role
        instances = h.run_dir.path / "instances"
        beta = instances / "beta_IN_0"
        data = instances / "alpha_IN_0" / "resources" / "data"
        (data / "target").write_text(json.dumps({
            "pid": hosts["beta"], "app": str(beta / "app"), "os": str(beta / "os"),
            "definition": str(definition),
            "packages": str(h.run_dir.path / "packages")}))
        wait_until(lambda: (data / "seen.json").exists(), 30, "alpha to try")
        seen = json.loads((data / "seen.json").read_text())
        alpha_uid = uids["alpha"].real
        assert (seen["uid"], seen["gid"], seen["groups"]) == (alpha_uid, alpha_uid, [])
        # Before, both roles ran as nobody: alpha killed beta's host and wrote its app/.
        assert seen["kill"] == "PermissionError", seen
        assert psutil.Process(hosts["beta"]).is_running()
        assert seen["write_other_app"] == seen["read_other_app"] == "PermissionError", seen
        assert seen["read_other_os"] == "PermissionError", seen
        # Its own app/ it may read, not change; the definition was never copied into it
        # (it was: the default app folder holds it), and the original is closed to it.
        assert seen["write_own_app"] == "PermissionError", seen
        assert seen["read_own_app"] == ["roles.py"], seen
        assert seen["definition"] == seen["packages"] == "PermissionError", seen
        assert seen["secret"] == "hunter2"  # a setting, through RoleEnvironment
        assert not (beta / "app" / "planted").exists()
        row = h.instance("beta/0")
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", hosts["beta"], 0)
        app = instances / "alpha_IN_0" / "app"
        assert (app.stat().st_uid, app.stat().st_gid, stat.S_IMODE(app.stat().st_mode)) == (
            0, alpha_uid, 0o750)


def test_the_uids_of_a_run_directory_are_stable_and_held(tmp_path: Path) -> None:
    first = identities.Identities(tmp_path)
    web, worker = first.user_of("web"), first.user_of("worker")
    assert web.uid != worker.uid and first.user_of("web") == web
    assert (web.gid, web.name) == (web.uid, "rolehost-web")
    # Another controller (here, another holder in this process) gets other uids while
    # these are held; the same run directory gets the same ones once they are free.
    second = identities.Identities(tmp_path)
    assert second.user_of("web").uid not in (web.uid, worker.uid)
    for fd in first._locks:
        os.close(fd)
    third = identities.Identities(tmp_path)
    assert third.user_of("web") == web
    for fd in (*second._locks, *third._locks):
        os.close(fd)
