"""The getting-started page's commands, run as written (the blocks marked to run)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rolehost.testing import run_dir_processes

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "getting-started.md"


def blocks() -> list[str]:
    text = PAGE.read_text()
    return re.findall(r"<!-- run: getting-started -->\n```sh\n(.*?)```", text, re.S)


def test_the_page_has_runnable_blocks() -> None:
    assert blocks(), "docs/getting-started.md lost its <!-- run: getting-started --> blocks"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks())))
def test_the_page_runs_as_written(tmp_path: Path, index: int) -> None:
    with socket.socket() as s:  # the page uses the sample's port as it is
        if s.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.skip("port 8080 is in use on this machine")
    # A copy of the repository's samples, so the page's run directory is not left in it.
    shutil.copytree(ROOT / "samples", tmp_path / "samples",
                    ignore=shutil.ignore_patterns(".rolehost", "__pycache__"))
    bin_dir = str(Path(sys.executable).parent)  # `rolehost` and `python` of this install
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    run_dir = tmp_path / "samples" / "web" / ".rolehost"
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks()[index]],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        assert "'failures': 0" in done.stdout
    finally:
        for proc in run_dir_processes(run_dir):
            proc.kill()
    assert not run_dir_processes(run_dir)
