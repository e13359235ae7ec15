"""Fault 13: an instance's os/ or app/ folder is deleted under it, then it is restarted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rolehost.testing import wait_until
from support.faults import FAST, Bystander, role, wait_gone
from support.service import MakeService


@pytest.mark.parametrize("folder", ["os", "app"])
def test_folder_deleted_while_running_then_restart(
    make_service: MakeService, folder: str
) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                import tempfile
                with tempfile.NamedTemporaryFile(dir=os.environ["TMPDIR"]) as f:
                    f.write(b"scratch")
                probe(f"on_start cwd={os.getcwd() == str(RoleEnvironment.app_dir)}")
                return True
        """), instances=2, service=FAST, extra="""
        [[roles.web.startup_tasks]]
        command = ["sh", "-c", "test -f roles.py && touch $ROLEHOST_OS_DIR/task-ran"]
        """)
    with service.harness() as h:
        bystander = Bystander(h)
        row = h.wait_state("web/0", "ready", 30)
        doomed = Path(row["dirs"][folder])
        shutil.rmtree(doomed)
        # Nothing watches the folders: the instance runs on until something boots it.
        assert h.instance("web/0")["state"] == "ready"
        (after,) = h.restart("web/0")
        assert after["state"] == "ready" and after["pid"] != row["pid"]
        assert after["last_error"] is None
        wait_gone({row["pid"]})
        os_dir, app = Path(after["dirs"]["os"]), Path(after["dirs"]["app"])
        assert (app / "roles.py").exists() and (os_dir / "tmp").is_dir()
        assert (os_dir / "task-ran").exists()  # the startup task ran again in a whole app/
        wait_until(lambda: service.count("on_start") == 3, 5, "the restarted on_start")
        assert service.probes()[-1] == "on_start cwd=True web_IN_0"
        bystander.check()
