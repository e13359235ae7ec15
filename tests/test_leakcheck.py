"""The leak check (leakcheck.py) fails the test that leaked, and only that one.

It runs on a small suite of its own, in a pytest of its own: a session that leaks on
purpose cannot run inside this one without this one's check taking the leaks for its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).parent  # leakcheck.py's folder: the inner sessions import it from there

SUITE = '''
import os, pathlib, subprocess, sys, tempfile, pytest

RECORDS = pathlib.Path(os.environ["LEAK_RECORDS"])

def record(kind, value):
    with open(RECORDS / kind, "a") as f:
        f.write(f"{value}\\n")

def test_leaks_a_folder():
    record("folders", tempfile.mkdtemp(prefix="rolehost-"))

def test_leaks_a_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    record("pids", proc.pid)

def test_leaks_a_process_that_left_its_parent():
    # The shell exits at once: its sleep is nobody's child, and only its environment
    # (the session's token) says whose it is.
    subprocess.run(["sh", "-c", "sleep 301 >/dev/null 2>&1 & echo $! > $LEAK_RECORDS/orphan"],
                   check=True, timeout=30)

def test_a_process_still_exiting_is_no_leak():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])

def test_a_failed_test_keeps_its_folder():
    record("folders", tempfile.mkdtemp(prefix="rolehost-kept-"))
    assert False, "failed on purpose"

@pytest.fixture(scope="module")
def shared():
    folder = tempfile.mkdtemp(prefix="rolehost-module-")
    record("folders", folder)
    yield folder
    os.rmdir(folder)

def test_a_module_fixture_holds_its_folder(shared):
    assert os.path.isdir(shared)

def test_a_module_fixture_holds_it_still(shared):
    assert os.path.isdir(shared)

def test_clean():
    pass
'''


# Alone, and as `make test` runs the suite: in pytest-xdist's workers, each of which checks
# its own tests, and a controller that must not take its workers for leaks.
@pytest.mark.parametrize("parallel", [[], ["-n", "2", "--dist", "loadfile"]],
                         ids=["alone", "xdist"])
def test_the_leak_check_names_each_leak_and_the_test_that_made_it(
        tmp_path: Path, parallel: list[str]) -> None:
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(SUITE))
    env = {**os.environ, "LEAK_RECORDS": str(records),
           "PYTHONPATH": str(HERE)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "leakcheck", "-p", "no:cacheprovider",
             "-q", *parallel, "test_leaky.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        # A worker heads each report with its name and platform: not the check's words.
        out = re.sub(r"^\[gw\d+\] linux .*\n", "", done.stdout, flags=re.M)
        assert done.returncode == 1, out + done.stderr
        folders = (records / "folders").read_text().split()
        leaked, kept, module = folders[0], folders[1], folders[2]
        pid = int((records / "pids").read_text())
        orphan = int((records / "orphan").read_text())
        errors = dict(re.findall(r"_+ ERROR at teardown of (\w+) _+\n(.*?)\n(?=_|=)", out, re.S))
        assert set(errors) == {"test_leaks_a_folder", "test_leaks_a_process",
                               "test_leaks_a_process_that_left_its_parent"}, out
        assert errors["test_leaks_a_folder"] == f"this test left behind:\n  folder {leaked}"
        assert f"process (killed) pid {pid}: " in errors["test_leaks_a_process"]
        assert "time.sleep(300)" in errors["test_leaks_a_process"]
        assert f"pid {orphan}: sleep 301" in errors["test_leaks_a_process_that_left_its_parent"]
        assert "1 failed, 7 passed, 3 errors" in out, out
        if not parallel:  # a worker's terminal summary stays in the worker
            assert f"{kept}  (test_leaky.py::test_a_failed_test_keeps_its_folder)" in out
        assert "leaks: this session left behind" not in out  # nothing escaped the tests
        assert not os.path.isdir(module)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                       for p in (pid, orphan))
    finally:
        cleanup(records)


def cleanup(records: Path) -> None:
    """Whatever the inner session left, whether or not its check did its job."""
    for kind in ("pids", "orphan"):
        for pid in (records / kind).read_text().split() if (records / kind).exists() else []:
            try:
                proc = psutil.Process(int(pid))
                if "sleep" in " ".join(proc.cmdline()):  # the pid may be another's by now
                    proc.kill()
                    proc.wait(10)
            except psutil.Error:
                pass
    folders = records / "folders"
    for folder in folders.read_text().split() if folders.exists() else []:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_session_that_leaks_outside_any_test_fails_at_its_end(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "conftest.py").write_text(textwrap.dedent('''
        import os, tempfile

        def pytest_collection_finish(session):  # in no test
            with open(os.path.join(os.environ["LEAK_RECORDS"], "folders"), "w") as f:
                f.write(tempfile.mkdtemp(prefix="rolehost-"))
    '''))
    (tmp_path / "test_clean.py").write_text("def test_clean():\n    pass\n")
    env = {**os.environ, "LEAK_RECORDS": str(records),
           "PYTHONPATH": str(HERE)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "leakcheck", "-p", "no:cacheprovider", "-q"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        folder = (records / "folders").read_text()
        assert done.returncode == 1, done.stdout + done.stderr
        assert "1 passed" in done.stdout
        assert f"folder {folder}, from no single test" in done.stdout
    finally:
        cleanup(records)
