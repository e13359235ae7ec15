"""README.md's example, run as written: its worker.py and rolehost.toml, and its one-liner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from rolehost.testing import run_dir_processes

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def example() -> dict[str, str]:
    """The Example section's blocks: each file by the name in its first line, and the
    one-liner."""
    section = README.read_text().split("## Example", 1)[1].split("\n## ", 1)[0]
    found = {}
    for language, text in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        if language == "sh":
            found["one-liner"] = text.strip()
        else:
            name = text.splitlines()[0].lstrip("# ").strip()  # `# worker.py`
            found[name] = text
    assert set(found) == {"worker.py", "rolehost.toml", "one-liner"}, sorted(found)
    return found


def test_the_one_liner_shows_what_the_worker_printed(tmp_path: Path) -> None:
    """It printed an empty log: the worker printed nothing for its first 5 s, and the
    one-liner is done before that."""
    folder = tmp_path / "hello"
    folder.mkdir()
    blocks = example()
    for name in ("worker.py", "rolehost.toml"):
        (folder / name).write_text(blocks[name])
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep
           + os.environ.get("PATH", "")}
    try:
        done = subprocess.run(["bash", "-c", blocks["one-liner"]], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        for proc in run_dir_processes(folder / ".rolehost"):
            proc.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("started hello (controller pid ")
    assert lines[-1] == "stopped"
    # What `rolehost logs worker/0` printed: between the status table's last row and the stop.
    last_row = max(i for i, line in enumerate(lines) if line.startswith("worker_IN_"))
    log = lines[last_row + 1:-1]
    assert log, done.stdout
    # Each line as the log keeps it: its time and stream, then what the role printed.
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z stdout \| ")
    assert all(stamp.match(line) for line in log), done.stdout
    printed = [stamp.sub("", line) for line in log]
    assert printed[0] == "hello from worker_IN_0", done.stdout
    assert all(line == "hello again from worker_IN_0" for line in printed[1:]), done.stdout
    assert "`hello from worker_IN_0`" in README.read_text()  # what the README says it shows
