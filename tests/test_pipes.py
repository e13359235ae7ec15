"""Output pipes of children are read on the loop and closed exactly once, on both loops.

uvloop's `connect_read_pipe` closes the descriptor twice (MagicStack/uvloop#763): libuv
closes it, then the file object closes the same number again. If another thread opened a
file in between (a sweep's psutil reading /proc), the second close takes that file away.
The window is too narrow to hit on purpose, so the test counts the closes with strace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

READER = textwrap.dedent("""\
    import asyncio, os, subprocess, sys
    import uvloop
    from rolehost.processes.process import Lines, read_pipe

    async def main() -> None:
        child = subprocess.Popen(["printf", "one\\\\ntwo\\\\nthree"], stdout=subprocess.PIPE)
        lines, ended = [], []
        print("fd", child.stdout.fileno(), os.getpid(), flush=True)
        await asyncio.wait_for(
            read_pipe(child.stdout, Lines(lines.append, lambda: ended.append(1))), 10)
        assert child.stdout.closed, "the pipe is closed at its end"
        assert lines == [b"one", b"two", b"three"] and ended == [1], (lines, ended)
        assert child.wait(10) == 0
        for _ in range(10):
            await asyncio.sleep(0)

    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
    print("ok", flush=True)
    """)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_read_pipe_reads_all_and_closes_once(loop: str, tmp_path: Path) -> None:
    trace = tmp_path / "close.trace"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=close", "-o", str(trace),
         sys.executable, "-c", READER, loop],
        capture_output=True, text=True, timeout=50,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "ok"
    _, number, pid = done.stdout.split()[:3]
    closes = re.findall(rf"^{pid} +close\({number}\) += (.*)$", trace.read_text(), re.M)
    # Closed once, successfully. A second close of the number is the bug: EBADF here,
    # where no other thread reopened it in between.
    assert closes[:1] == ["0"], closes
    assert not [c for c in closes if "EBADF" in c], closes
    assert not [p for p in psutil.Process().children() if "strace" in p.name()]
