"""`rolehost init`: into an empty folder, then `rolehost check`, the generated pytest file
and `rolehost start`, as a user runs them, for a worker and for an ASGI site."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rolehost.testing import wait_until
from support.cli import rolehost
from support.net import free_port, get

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """This checkout's rolehost, for the user's commands run in the new folder."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "web.py").write_text("mine")
    done = rolehost("init", str(tmp_path), "--role", "web", cwd=tmp_path)
    assert done.returncode == 1, done
    assert f"refusing to overwrite {tmp_path / 'web.py'}: nothing was written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.py"]
    assert (tmp_path / "web.py").read_text() == "mine"
    bad = rolehost("init", str(tmp_path / "x"), "--role", "db", cwd=tmp_path)
    assert bad.returncode == 2 and "'db' is not one of 'worker', 'web'" in bad.stderr, bad


@pytest.mark.slow
@pytest.mark.parametrize("role", ["worker", "web"])
def test_init_check_pytest_and_start(tmp_path: Path, role: str) -> None:
    folder = tmp_path / "my-service"
    done = rolehost("init", str(folder), "--role", role, "--site", "asgi", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["rolehost.toml", "test_service.py", "worker.py" if role == "worker" else "web.py"])
    toml = folder / "rolehost.toml"
    assert toml.read_text().count("\n# ") >= 3  # commented for a reader
    assert 'name = "my-service"' in toml.read_text()
    port = free_port()
    if role == "web":  # the generated port may be taken on this machine
        toml.write_text(toml.read_text().replace("port = 8080", f"port = {port}"))

    check = subprocess.run([sys.executable, "-m", "rolehost", "check"], cwd=folder,
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "rehearsal: every step passed" in check.stdout

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "test_service.py"], cwd=folder, env=_env(), capture_output=True,
                           text=True, timeout=180)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout

    start = subprocess.Popen([sys.executable, "-m", "rolehost", "start"], cwd=folder,
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        def ready() -> bool:
            status = subprocess.run([sys.executable, "-m", "rolehost", "status", "--json"],
                                    cwd=folder, env=_env(), capture_output=True, text=True,
                                    timeout=30)
            instances = json.loads(status.stdout)["instances"] if status.returncode == 0 else []
            return len(instances) == 2 and all(i["state"] == "ready" for i in instances)

        wait_until(ready, 60, "both instances ready")
        if role == "web":
            status, body = get(port, "/")
            assert status == 200 and body.startswith(b"hello from web_IN_"), body
        start.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop
        assert start.wait(60) == 0
    finally:
        if start.poll() is None:
            os.killpg(start.pid, signal.SIGKILL)
            start.wait()
        if start.stderr is not None:
            start.stderr.close()
