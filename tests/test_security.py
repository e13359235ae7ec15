"""Security by default: who can reach the controller, and what listens where."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rolehost.testing import ServiceHarness
from support.net import free_port
from support.roles import IDLE, WEB
from support.service import MakeService


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_another_user_cannot_reach_the_control_socket(make_service: MakeService) -> None:
    service = make_service(IDLE)
    nobody = pwd.getpwnam("nobody")
    with service.harness() as h:
        h.wait_ready(30)
        # A forked child of this (root) process becomes `nobody` and tries to connect.
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child only
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(h.run_dir.socket))
                os._exit(0)  # connected: the test fails
            except PermissionError:
                os._exit(13)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 13  # EACCES, as it should be
        assert h.status()["instances"][0]["state"] == "ready"  # root still can


def test_nothing_listens_beyond_loopback_by_default(make_service: MakeService) -> None:
    port = free_port()
    service = make_service(WEB, instances=2, settings={"warmup": "0,0"}, extra=f"""
        [roles.web.endpoints.http]
        port = {port}
        """)
    with service.harness() as h:
        status = h.wait_ready(30)
        pids = [status["pid"], *(i["pid"] for i in status["instances"])]
        listening = [c.laddr for pid in pids
                     for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"]
        assert listening, "the balancer and the instances listen somewhere"
        assert all(address.ip == "127.0.0.1" for address in listening), listening


def test_secret_settings_never_show(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_changed(self.changed)
                key = RoleEnvironment.get_setting("api_key")
                probe(f"key length {len(key)}")  # the role reads it; it does not print it
                return True

            def changed(self, changes):
                probe(f"key length {len(RoleEnvironment.get_setting('api_key'))}")
        """,
        extra="""
        [roles.web.settings.api_key]
        value = "s3cr3t-alpha"
        secret = true
        """,
    )
    with service.harness() as h:
        h.wait_ready(30)
        assert "key length 12 web_IN_0" in service.probes()
        assert h.set_setting("web", "api_key", "s3cr3t-beta-2") == {"web_IN_0": "applied"}
        service.wait_probe("key length 13 web_IN_0")
        shown = json.dumps([h.status(), h.events(), h.operations()])
        assert "(secret)" in json.dumps(h.operations())
        written = "".join(p.read_text(errors="replace") for p in h.run_dir.path.rglob("*")
                          if p.is_file() and "packages" not in p.parts
                          and p.suffix in (".log", ".jsonl", ".json", ""))
        for value in ("s3cr3t-alpha", "s3cr3t-beta-2"):
            assert value not in shown and value not in written


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("shared_mode, content", [(0o1777, False), (0o755, True)])
def test_a_folder_others_use_is_refused_as_run_dir(
        make_service: MakeService, tmp_path: Path, shared_mode: int, content: bool) -> None:
    # Made private, /tmp or a home would lock their other users out.
    service = make_service(IDLE)
    shared = tmp_path / "shared"
    shared.mkdir()
    if content:
        (shared / "someone-elses").write_text("")
    os.chmod(shared, shared_mode)
    rolehost = [sys.executable, "-m", "rolehost"]
    start = subprocess.Popen([*rolehost, "start", "-f", str(service.toml), "--run-dir",
                              str(shared)], stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = start.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it took the folder and runs: stop it, then fail
        subprocess.run([*rolehost, "stop", "--run-dir", str(shared)], timeout=60)
        _, stderr = start.communicate(timeout=60)
    assert start.returncode == 1, stderr
    assert f"{shared} is not a run directory and is open to others (mode {shared_mode:o})" \
        in stderr
    assert f"such as {shared / 'rolehost'}" in stderr
    alone = subprocess.run([*rolehost, "run-instance", "web", "-f", str(service.toml),
                            "--run-dir", str(shared)], capture_output=True, text=True,
                           timeout=60)
    assert alone.returncode == 1 and "is not a run directory" in alone.stderr, alone.stderr
    assert mode(shared) == shared_mode
    assert sorted(p.name for p in shared.iterdir()) == (["someone-elses"] if content else [])


def test_a_run_dir_of_its_own_is_made_private(make_service: MakeService, tmp_path: Path) -> None:
    service = make_service(IDLE)
    run_dir = tmp_path / "rd"
    run_dir.mkdir(mode=0o755)  # new and empty: the service's own
    os.chmod(run_dir, 0o755)
    for _ in range(2):  # the second time it is a run directory that was loosened since
        with ServiceHarness(service.toml, run_dir=run_dir) as h:
            h.wait_ready(30)
            assert mode(run_dir) == 0o700 and mode(h.run_dir.socket) == 0o600
        os.chmod(run_dir, 0o755)


def test_the_package_store_is_private_and_holds_no_definition_in_an_app(
        tmp_path: Path) -> None:
    """The definition (secrets and all) is kept once, 0600, in folders only the controller
    may open; never in an app, though the default app folder holds it."""
    from rolehost.fabric.packages import Packages

    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "tool.sh", 0o755)
    source = tmp_path / "rolehost.toml"
    source.write_text('[service]\nname = "s"\n[roles.web]\nentry_point = "app:Web"\n'
                      '[roles.web.settings]\npassword = { value = "hunter2", secret = true }\n')
    os.chmod(source, 0o644)
    run_dir = tmp_path / ".rolehost"
    store = Packages(run_dir / "packages", run_dir)
    version = store.create(source, None)["version"]
    package = run_dir / "packages" / version

    def modes() -> dict[str, int]:
        return {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode)
                for p in (run_dir / "packages", package, package / "apps",
                          package / "apps" / "web", package / "rolehost.toml",
                          package / "apps" / "web" / "tool.sh")}

    expected = {"packages": 0o700, f"packages/{version}": 0o700,
                f"packages/{version}/apps": 0o700, f"packages/{version}/apps/web": 0o700,
                f"packages/{version}/rolehost.toml": 0o600,
                f"packages/{version}/apps/web/tool.sh": 0o755}
    assert modes() == expected
    assert sorted(p.name for p in (package / "apps" / "web").iterdir()) == ["app.py", "tool.sh"]
    # The same content packaged again: a store made before is put right (it kept a 0644
    # copy after the user chmod'ed the definition to 0600).
    os.chmod(package / "rolehost.toml", 0o644)
    os.chmod(package, 0o755)
    os.chmod(source, 0o600)
    assert store.create(source, None)["version"] == version
    assert modes() == expected
