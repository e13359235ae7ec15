"""A controller whose relay runs interpreted says so, with why, the cost and the fix.

The interpreted relay is a real one: the controller runs with a copy of the `rolehost`
package first on its PYTHONPATH, without the compiled extensions (`*.so`), so Python
imports `proxy.py` and `balancer.py` themselves, as on an install whose build had no C
compiler. The mypyc group module (`rolehost__mypyc`) is only imported by those extensions,
so it stays out too. (bench/instructions.py measures the interpreted relay the same way.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import rolehost
from rolehost import balancer
from rolehost.balancer import build
from rolehost.testing import run_dir_processes, wait_until
from support.net import free_port
from support.service import MakeService

ROLE = """
    class Role(RoleEntryPoint):
        pass
    """


def without_extensions(tmp_path: Path) -> dict[str, str]:
    """The environment of a controller that cannot import the compiled relay."""
    pure = tmp_path / "pure"
    shutil.copytree(Path(rolehost.__file__).parent, pure / "rolehost",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return {**os.environ, "PYTHONPATH": str(pure)}


def start(toml: Path, run_dir: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run `rolehost start` in the foreground until its instance is ready; stop it with
    Ctrl-C (SIGINT); return its console's lines. From the definition's folder, as a user
    would: `python -m` puts its working folder first on sys.path, and the checkout's (this
    suite's) holds the compiled relay."""
    console = run_dir.parent / "console.txt"
    with open(console, "wb") as out:
        controller = subprocess.Popen(
            [sys.executable, "-m", "rolehost", "start", "-f", str(toml), "--run-dir",
             str(run_dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=toml.parent, env=env)
    try:
        wait_until(lambda: "starting -> ready" in console.read_text(), 60,
                   "the instance to be ready", console.read_text)
        controller.send_signal(signal.SIGINT)
        assert controller.wait(60) == 0, console.read_text()
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(10)
        for proc in run_dir_processes(run_dir):
            proc.kill()
    return console.read_text().splitlines()


def events(run_dir: Path, name: str) -> list[dict[str, object]]:
    lines = (run_dir / "logs" / "controller.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def web(make_service: MakeService) -> Path:
    return make_service(ROLE, extra=f"""
        [roles.web.endpoints.http]
        port = {free_port()}
        """).toml


def test_an_interpreted_relay_is_a_warning_with_why_cost_and_fix(
        make_service: MakeService, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    console = start(web(make_service), run_dir, without_extensions(tmp_path))
    [started] = events(run_dir, "controller_started")
    assert started["relay"] == "interpreted"
    [warning] = events(run_dir, "relay_interpreted")
    assert warning["level"] == "warning"
    assert "the compiled extension is not installed" in str(warning["why"])
    assert "no C compiler" in str(warning["why"])
    assert "2.7x the CPU instructions per relayed request (79,000 against 29,000" in str(
        warning["cost"])
    fix = str(warning["fix"])
    assert "install a C compiler and the Python headers" in fix
    assert f"{sys.executable} -m pip install --force-reinstall --no-deps" in fix
    # On the console too, as the one line a foreground start shows for it.
    [line] = [line for line in console if "relay interpreted" in line]
    assert "[warning] relay interpreted why=the compiled extension is not installed" in line
    assert f"fix={fix}" in line


def test_a_service_without_a_balancer_is_not_warned(
        make_service: MakeService, tmp_path: Path) -> None:
    """Only a balancer relays: the rest of the controller is Python in either build."""
    run_dir = tmp_path / "rd"
    console = start(make_service(ROLE).toml, run_dir, without_extensions(tmp_path))
    [started] = events(run_dir, "controller_started")
    assert started["relay"] == "interpreted"
    assert events(run_dir, "relay_interpreted") == []
    assert not [line for line in console if "relay interpreted" in line]


@pytest.mark.skipif(balancer.relay_build() != "compiled",
                    reason="this install's relay is interpreted")
def test_a_compiled_relay_is_not_warned(make_service: MakeService, tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    start(web(make_service), run_dir)
    [started] = events(run_dir, "controller_started")
    assert started["relay"] == "compiled"
    assert events(run_dir, "relay_interpreted") == []
    assert build.relay_warning() is None


def test_the_fix_reinstalls_from_where_rolehost_was_installed_from() -> None:
    command = build.reinstall_command()
    assert command.startswith(f"{sys.executable} -m pip install --force-reinstall --no-deps ")
    # This suite runs from a checkout (`make test`: an editable install of it).
    root = Path(rolehost.__file__).resolve().parent.parent
    if (root / "setup.py").exists():
        assert command.endswith(str(root)), command
